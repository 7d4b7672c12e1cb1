//! Health verdicts from check results, as Docker defines them: failures in
//! the start period do not count, a success makes the task healthy, and
//! `retries` consecutive failures make it unhealthy. Pure.

use crate::api::service::HealthCheck;

/// A task's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Health {
    /// No verdict yet.
    Starting,
    /// The last check passed.
    Healthy,
    /// `retries` checks in a row failed (outside the start period).
    Unhealthy,
}

/// Consecutive failures, and whether the task was ever healthy.
#[derive(Clone, Debug, Default)]
pub(crate) struct HealthTracker {
    failures: u32,
    healthy: bool,
}

impl HealthTracker {
    /// Records one check that ended `since_start_ms` after the task started.
    pub(crate) fn record(&mut self, passed: bool, since_start_ms: u64, check: &HealthCheck) -> Health {
        if passed {
            self.failures = 0;
            self.healthy = true;
            return Health::Healthy;
        }
        if since_start_ms >= check.start_period_ms || self.healthy {
            self.failures += 1;
        }
        if self.failures >= check.retries {
            Health::Unhealthy
        } else if self.healthy {
            Health::Healthy
        } else {
            Health::Starting
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(retries: u32, start_period_ms: u64) -> HealthCheck {
        HealthCheck {
            command: "true".into(),
            interval_ms: 1000,
            timeout_ms: 1000,
            retries,
            start_period_ms,
        }
    }

    #[test]
    fn failures_in_the_start_period_do_not_count() {
        let c = check(2, 10_000);
        let mut t = HealthTracker::default();
        for at in [1000, 2000, 9000] {
            assert_eq!(t.record(false, at, &c), Health::Starting);
        }
        assert_eq!(t.record(false, 10_000, &c), Health::Starting);
        assert_eq!(t.record(false, 11_000, &c), Health::Unhealthy);
    }

    #[test]
    fn a_success_resets_the_count() {
        let c = check(3, 0);
        let mut t = HealthTracker::default();
        assert_eq!(t.record(true, 0, &c), Health::Healthy);
        assert_eq!(t.record(false, 1, &c), Health::Healthy);
        assert_eq!(t.record(false, 2, &c), Health::Healthy);
        assert_eq!(t.record(true, 3, &c), Health::Healthy);
        for at in 4..6 {
            assert_eq!(t.record(false, at, &c), Health::Healthy);
        }
        assert_eq!(t.record(false, 6, &c), Health::Unhealthy);
    }
}
