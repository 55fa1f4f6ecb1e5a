//! A worker's scale settings (`workerctl_worker_scale`), valid by
//! construction: what `workerctl worker scale` accepts, and what a row
//! edited by hand is clamped to.

/// The most replicas a worker may ask for; a typo like `--max 1000` is
/// refused rather than obeyed.
pub(crate) const MAX_REPLICAS: u32 = 64;
/// Ready messages one replica is expected to handle (KEDA's default `value`).
pub(crate) const DEFAULT_PER_REPLICA: u32 = 20;

/// A worker's scale settings: between `min` and `max` replicas, one per
/// `per_replica` ready messages. Made by [`ScaleBounds::new`], so always
/// `min ≤ max`, `1 ≤ max ≤ MAX_REPLICAS` and `per_replica ≥ 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ScaleBounds {
    min: u32,
    max: u32,
    per_replica: u32,
}

/// Why scale settings were refused; each says which value to change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BoundsError {
    #[error("--min {min} is more than --max {max}")]
    MinAboveMax { min: u32, max: u32 },
    #[error("--max must be at least 1 (to run no replica, disable the worker)")]
    MaxZero,
    #[error("--max {max} is more than {MAX_REPLICAS}, the most replicas a worker may have")]
    MaxTooHigh { max: u32 },
    #[error("--per-replica must be at least 1")]
    PerReplicaZero,
}

impl ScaleBounds {
    pub fn new(min: u32, max: u32, per_replica: u32) -> Result<ScaleBounds, BoundsError> {
        if max == 0 {
            return Err(BoundsError::MaxZero);
        }
        if max > MAX_REPLICAS {
            return Err(BoundsError::MaxTooHigh { max });
        }
        if min > max {
            return Err(BoundsError::MinAboveMax { min, max });
        }
        if per_replica == 0 {
            return Err(BoundsError::PerReplicaZero);
        }
        Ok(ScaleBounds {
            min,
            max,
            per_replica,
        })
    }

    /// Settings read from a row that may have been edited by hand: clamped
    /// into range rather than refused, so a bad row still runs something.
    pub(crate) fn lenient(min: i64, max: i64, per_replica: i64) -> ScaleBounds {
        let clamp = |v: i64, lo: u32, hi: u32| v.clamp(i64::from(lo), i64::from(hi)) as u32;
        let max = clamp(max, 1, MAX_REPLICAS);
        ScaleBounds {
            min: clamp(min, 0, max),
            max,
            per_replica: clamp(per_replica, 1, u32::MAX),
        }
    }

    pub fn min(&self) -> u32 {
        self.min
    }
    pub fn max(&self) -> u32 {
        self.max
    }
    pub fn per_replica(&self) -> u32 {
        self.per_replica
    }

    /// Whether the replica count is fixed (`min == max`): no queue depth needed.
    pub(crate) fn is_fixed(&self) -> bool {
        self.min == self.max
    }

    /// `n`, within `[min, max]`.
    pub fn clamp(&self, n: u32) -> u32 {
        n.clamp(self.min, self.max)
    }
}

impl Default for ScaleBounds {
    /// One replica, always: what every worker had before replicas.
    fn default() -> Self {
        ScaleBounds {
            min: 1,
            max: 1,
            per_replica: DEFAULT_PER_REPLICA,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_refused_with_the_value_to_change() {
        assert_eq!(
            ScaleBounds::new(5, 4, 20),
            Err(BoundsError::MinAboveMax { min: 5, max: 4 })
        );
        assert_eq!(ScaleBounds::new(0, 0, 20), Err(BoundsError::MaxZero));
        assert_eq!(
            ScaleBounds::new(1, MAX_REPLICAS + 1, 20),
            Err(BoundsError::MaxTooHigh {
                max: MAX_REPLICAS + 1
            })
        );
        assert_eq!(ScaleBounds::new(1, 2, 0), Err(BoundsError::PerReplicaZero));
        assert!(ScaleBounds::new(0, MAX_REPLICAS, 1).is_ok());
    }

    #[test]
    fn rows_edited_by_hand_are_clamped_into_range() {
        let b = ScaleBounds::lenient(-3, 1_000, 0);
        assert_eq!((b.min(), b.max(), b.per_replica()), (0, MAX_REPLICAS, 1));
        let b = ScaleBounds::lenient(9, 2, 20);
        assert_eq!((b.min(), b.max()), (2, 2));
    }
}
