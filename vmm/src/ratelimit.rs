//! A fixed-window rate limit for log lines a guest can trigger, so a misbehaving guest cannot
//! flood the host's logs.

use std::time::{Duration, Instant};

/// Allows at most `burst` events per `window`.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    window: Duration,
    start: Instant,
    used: u32,
}

impl RateLimit {
    /// A limit of `burst` events per `window`.
    pub fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst,
            window,
            start: Instant::now(),
            used: 0,
        }
    }

    /// True when one more event fits the current window.
    pub fn allow(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.start) >= self.window {
            self.start = now;
            self.used = 0;
        }
        self.used += 1;
        self.used <= self.burst
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_per_window() {
        let mut r = RateLimit::new(3, Duration::from_millis(50));
        assert_eq!((0..10).filter(|_| r.allow()).count(), 3);
        std::thread::sleep(Duration::from_millis(60));
        assert!(r.allow());
    }
}
