//! Capped exponential backoff and error reporting shared by every retry in
//! workerctl: crash restarts, failed passes, and reconnecting to Postgres
//! and Docker. Pure helpers, no I/O.

use std::time::Duration;

/// The delay before retry number `step` (0-based): `initial · 2^step`, at most `max`.
pub fn delay(initial: Duration, max: Duration, step: u32) -> Duration {
    initial
        .saturating_mul(2u32.saturating_pow(step.min(31)))
        .min(max)
}

/// An error and its causes on one line: "cannot start x: No such image".
/// Log it once, where the error is handled.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let part = e.to_string();
        // Some errors repeat their source's message in their own; say it once.
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn delay_doubles_from_initial_and_is_capped() {
        let max = Duration::from_secs(30);
        assert_eq!(delay(S, max, 0), S);
        assert_eq!(delay(S, max, 3), Duration::from_secs(8));
        assert_eq!(delay(S, max, 5), max);
        assert_eq!(delay(S, max, u32::MAX), max);
    }

    #[test]
    fn error_chain_names_every_cause() {
        let inner = std::io::Error::other("disk full");
        assert_eq!(error_chain(&Wrapped(inner)), "wrapped: disk full");
    }

    #[test]
    fn error_chain_says_a_repeated_cause_once() {
        let inner = std::io::Error::other("disk full");
        let outer = std::io::Error::other(format!("wrapped: {inner}"));
        assert_eq!(error_chain(&Wrapped(outer)), "wrapped: wrapped: disk full");
        let echo = Echo(std::io::Error::other("disk full"));
        assert_eq!(error_chain(&echo), "write failed: disk full");
    }

    /// Displays its source's message in its own, as some library errors do.
    #[derive(Debug)]
    struct Echo(std::io::Error);
    impl std::fmt::Display for Echo {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "write failed: {}", self.0)
        }
    }
    impl std::error::Error for Echo {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[derive(Debug)]
    struct Wrapped(std::io::Error);
    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("wrapped")
        }
    }
    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}
