//! When `nc-data download` tries a file again, and when it gives up.
//!
//! A failed attempt is either transient (a 5xx or 429 answer, a reset or timed-out connection, a body shorter
//! than its Content-Length, a file that does not parse as parquet) and worth another try after a wait, or
//! permanent (a 404: the file is not there, and asking again will not make it appear).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Exponential backoff: the wait after failed attempt k (1-based) is `base_delay * 2^(k-1)`, capped at
/// `max_delay`; after `attempts` failed attempts the file has failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 10 attempts, waits 1, 2, 4, ... 60 s: about 4 minutes of a server's bad patch is ridden out per file.
    fn default() -> Self {
        RetryPolicy {
            attempts: 10,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt `attempt` (1-based) before the next one.
    pub fn delay(&self, attempt: u32) -> Duration {
        // 2^(attempt-1) saturates rather than overflowing for absurd attempt counts.
        let factor = 1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
        self.base_delay.saturating_mul(factor).min(self.max_delay)
    }
}

/// Why one attempt at one file failed, and whether another attempt could help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub cause: String,
    pub permanent: bool,
}

impl Failure {
    pub fn transient(cause: impl Into<String>) -> Self {
        Failure {
            cause: cause.into(),
            permanent: false,
        }
    }

    pub fn permanent(cause: impl Into<String>) -> Self {
        Failure {
            cause: cause.into(),
            permanent: true,
        }
    }
}

/// An HTTP status other than 200: 408 (request timeout), 429 (too many requests) and every 5xx are the
/// server's passing trouble and are retried; anything else (404 above all) will not change by asking again.
pub fn classify_status(status: u16, reason: &str) -> Failure {
    let cause = format!("HTTP {status} {reason}").trim_end().to_string();
    if status == 408 || status == 429 || (500..600).contains(&status) {
        Failure::transient(cause)
    } else {
        Failure::permanent(cause)
    }
}

/// Sleep for `wait`, waking early (returning false) when `stop` is raised, so that a failing run ends
/// promptly instead of sitting out a minute-long backoff.
pub fn sleep_unless_stopped(wait: Duration, stop: &AtomicBool) -> bool {
    let until = Instant::now() + wait;
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= until {
            return true;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(50)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_then_cap() {
        let p = RetryPolicy {
            attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
        };
        let waits: Vec<u64> = (1..=7).map(|k| p.delay(k).as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(p.delay(200), Duration::from_millis(1000));
    }

    #[test]
    fn statuses_split_into_retried_and_final() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(!classify_status(s, "").permanent, "{s}");
        }
        for s in [400, 401, 403, 404, 410] {
            assert!(classify_status(s, "").permanent, "{s}");
        }
        assert_eq!(classify_status(404, "Not Found").cause, "HTTP 404 Not Found");
    }
}
