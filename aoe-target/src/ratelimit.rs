//! A token bucket for log lines the network can trigger (so a flood of bad frames cannot flood
//! the log).

use std::time::{Duration, Instant};

/// Allows `burst` events at once and then one per `period`; counts what it suppressed.
#[derive(Debug)]
pub struct RateLimiter {
    burst: u32,
    period: Duration,
    tokens: u32,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimiter {
    /// A limiter with `burst` tokens refilled one per `period`.
    pub fn new(burst: u32, period: Duration) -> RateLimiter {
        RateLimiter {
            burst,
            period,
            tokens: burst,
            last: None,
            suppressed: 0,
        }
    }

    /// True if an event at `now` may be logged. On true, also returns how many events were
    /// suppressed since the last allowed one (and resets that count).
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last);
            let refill = elapsed.as_nanos() / self.period.as_nanos().max(1);
            if refill > 0 {
                let refill = u32::try_from(refill).unwrap_or(u32::MAX);
                self.tokens = self.tokens.saturating_add(refill).min(self.burst);
                self.last = Some(now);
            }
        } else {
            self.last = Some(now);
        }
        if self.tokens == 0 {
            self.suppressed += 1;
            return None;
        }
        self.tokens -= 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_limits_then_refills() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(2, Duration::from_secs(1));
        assert_eq!(r.allow(t0), Some(0));
        assert_eq!(r.allow(t0), Some(0));
        assert_eq!(r.allow(t0), None);
        assert_eq!(r.allow(t0), None);
        assert_eq!(r.allow(t0 + Duration::from_millis(1500)), Some(2));
        assert_eq!(r.allow(t0 + Duration::from_millis(1600)), None);
    }
}
