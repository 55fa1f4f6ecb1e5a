//! `workerctl worker scale ID|NAME [--min N] [--max M] [--per-replica P]`:
//! sets how many replicas a worker runs. A value left out keeps the one
//! stored (a worker never scaled has min 1, max 1, 20 per replica); the
//! result is checked as a whole (min ≤ max ≤ [`MAX_REPLICAS`]) before
//! anything is written.

use clap::Args;

use super::store;
use crate::cli::CliError;
use crate::config::Config;
use crate::model::WorkerId;
use crate::model::{MAX_REPLICAS, ScaleBounds};
use crate::store::scale as scale_store;

#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// The worker's id, or its exact name.
    #[arg(value_name = "ID|NAME")]
    pub worker: String,
    /// The fewest replicas; 0 lets an idle worker scale to zero.
    #[arg(long, value_name = "N")]
    pub min: Option<u32>,
    /// The most replicas (at most 64).
    #[arg(long, value_name = "M")]
    pub max: Option<u32>,
    /// Ready messages per replica: replicas = ceil(ready / this), within
    /// min and max. Default 20 (KEDA's).
    #[arg(long, value_name = "P")]
    pub per_replica: Option<u32>,
}

pub(super) async fn run(config: &Config, a: ScaleArgs) -> Result<(), CliError> {
    if a.min.is_none() && a.max.is_none() && a.per_replica.is_none() {
        return Err(CliError::BadArgument(
            "nothing to set: give --min, --max or --per-replica".into(),
        ));
    }
    let db = store::connect(config.database_url.expose()).await?;
    let target = db.resolve(&a.worker).await?;
    let id = WorkerId(target.id);
    let current = scale_store::load(db.pool(), id)
        .await
        .map_err(|e| db.store_failed(e))?;
    let new = merge(current, &a)?;
    let found = scale_store::set(db.pool(), id, new)
        .await
        .map_err(|e| db.store_failed(e))?;
    if !found {
        return Err(CliError::UnknownId(target.id));
    }
    println!(
        "worker {}: {} (was {})",
        target.name,
        describe(new),
        describe(current)
    );
    Ok(())
}

/// The stored settings with the given ones in their place, checked.
fn merge(current: ScaleBounds, a: &ScaleArgs) -> Result<ScaleBounds, CliError> {
    let min = a.min.unwrap_or(current.min());
    let max = a.max.unwrap_or(current.max());
    let per_replica = a.per_replica.unwrap_or(current.per_replica());
    ScaleBounds::new(min, max, per_replica).map_err(|e| {
        let mut text = e.to_string();
        if a.max.is_none() && min > max {
            text.push_str(" (the stored max); give --max too");
        } else if a.min.is_none() && min > max {
            text.push_str(" (the stored min); give --min too");
        }
        CliError::BadArgument(text)
    })
}

fn describe(b: ScaleBounds) -> String {
    if b.is_fixed() {
        format!("{} replica(s)", b.min())
    } else {
        format!(
            "{} to {} replicas, one per {} ready messages",
            b.min(),
            b.max(),
            b.per_replica()
        )
    }
}

const _: () = assert!(MAX_REPLICAS == 64, "update the --max help text");

#[cfg(test)]
mod tests {
    use super::*;

    fn args(min: Option<u32>, max: Option<u32>, per: Option<u32>) -> ScaleArgs {
        ScaleArgs {
            worker: "w".into(),
            min,
            max,
            per_replica: per,
        }
    }

    #[test]
    fn values_left_out_keep_the_stored_ones() {
        let stored = ScaleBounds::new(1, 4, 50).expect("valid");
        let new = merge(stored, &args(Some(0), None, None)).expect("valid");
        assert_eq!((new.min(), new.max(), new.per_replica()), (0, 4, 50));
    }

    #[test]
    fn a_min_above_the_stored_max_says_to_give_max_too() {
        let err = merge(ScaleBounds::default(), &args(Some(3), None, None)).expect_err("refused");
        assert_eq!(
            err.one_line(),
            "--min 3 is more than --max 1 (the stored max); give --max too"
        );
    }

    #[test]
    fn a_max_over_the_cap_is_refused() {
        let err = merge(ScaleBounds::default(), &args(None, Some(500), None)).expect_err("refused");
        assert!(
            err.one_line().contains("more than 64"),
            "{}",
            err.one_line()
        );
    }
}
