//! I/O-free pieces of the initiator: the window of outstanding frames and the retransmit
//! timer.

use std::time::Duration;

/// The window of frames outstanding to one target, after the Linux driver (aoe-anchors §1.8):
/// it starts at half the target's buffer count, grows by one per reply below `ssthresh`
/// (slow start) and by one per full window above it (congestion avoidance), and on a timeout
/// halves `ssthresh` and collapses to one frame.
#[derive(Debug, Clone)]
pub struct Window {
    max: u32,
    cwnd: u32,
    ssthresh: u32,
    acked_in_window: u32,
}

impl Window {
    /// A window for a target that advertises `bufcnt` buffers, capped at `cap`.
    pub fn new(bufcnt: u16, cap: u32) -> Window {
        let max = u32::from(bufcnt).clamp(1, cap.max(1));
        let half = (max / 2).max(1);
        Window {
            max,
            cwnd: half,
            ssthresh: half,
            acked_in_window: 0,
        }
    }

    /// Frames that may be outstanding now.
    pub fn size(&self) -> u32 {
        self.cwnd
    }

    /// The slow-start threshold.
    pub fn ssthresh(&self) -> u32 {
        self.ssthresh
    }

    /// A reply arrived in time.
    pub fn on_reply(&mut self) {
        if self.cwnd < self.ssthresh {
            self.cwnd += 1;
        } else {
            self.acked_in_window += 1;
            if self.acked_in_window >= self.cwnd {
                self.acked_in_window = 0;
                self.cwnd += 1;
            }
        }
        self.cwnd = self.cwnd.min(self.max);
    }

    /// A frame timed out.
    pub fn on_timeout(&mut self) {
        self.ssthresh = (self.cwnd / 2).max(1);
        self.cwnd = 1;
        self.acked_in_window = 0;
    }
}

/// Round-trip estimator and retransmit timeout (`2·srtt + 8·rttvar`, the Linux driver's
/// `2·avg + 8·mdev`: wider than TCP's `srtt + 4·rttvar` because a storage target's service
/// time swings with disk queueing and cache flushes, not only with the network), with a
/// floor in milliseconds — where the Linux driver's first timeout is seconds (aoe-anchors
/// §1.8) — and exponential backoff on consecutive timeouts.
#[derive(Debug, Clone)]
pub struct RttEstimator {
    srtt: Option<Duration>,
    rttvar: Duration,
    floor: Duration,
    ceiling: Duration,
    initial: Duration,
    backoff: u32,
}

impl RttEstimator {
    /// An estimator whose timeout never goes below `floor` and starts at `initial`.
    pub fn new(floor: Duration, initial: Duration) -> RttEstimator {
        RttEstimator {
            srtt: None,
            rttvar: Duration::ZERO,
            floor,
            ceiling: Duration::from_secs(3),
            initial,
            backoff: 0,
        }
    }

    /// Feeds one sample (only from frames sent once, per Karn's rule: the caller's job).
    pub fn sample(&mut self, rtt: Duration) {
        self.backoff = 0;
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(s) => {
                let diff = s.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((s * 7 + rtt) / 8);
            }
        }
    }

    /// A timeout happened: double the timeout until a sample arrives.
    pub fn on_timeout(&mut self) {
        self.backoff = (self.backoff + 1).min(8);
    }

    /// Smoothed round-trip time.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// The current retransmit timeout.
    pub fn rto(&self) -> Duration {
        let base = match self.srtt {
            None => self.initial,
            Some(s) => s * 2 + self.rttvar * 8,
        };
        (base.max(self.floor) * (1 << self.backoff)).min(self.ceiling)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_slow_start_congestion_avoidance_collapse() {
        let mut w = Window::new(64, 64);
        assert_eq!((w.size(), w.ssthresh()), (32, 32));
        // At ssthresh: +1 per full window.
        for _ in 0..31 {
            w.on_reply();
        }
        assert_eq!(w.size(), 32);
        w.on_reply();
        assert_eq!(w.size(), 33);
        w.on_timeout();
        assert_eq!((w.size(), w.ssthresh()), (1, 16));
        // Slow start: +1 per reply up to ssthresh.
        for _ in 0..15 {
            w.on_reply();
        }
        assert_eq!(w.size(), 16);
        for _ in 0..10_000 {
            w.on_reply();
        }
        assert_eq!(w.size(), 64, "capped at the buffer count");
        let small = Window::new(1, 64);
        assert_eq!(small.size(), 1);
        assert_eq!(Window::new(200, 64).size(), 32);
    }

    #[test]
    fn rto_has_a_millisecond_floor_and_backs_off() {
        let mut r = RttEstimator::new(Duration::from_millis(10), Duration::from_millis(100));
        assert_eq!(r.rto(), Duration::from_millis(100));
        r.sample(Duration::from_micros(200));
        assert_eq!(r.rto(), Duration::from_millis(10), "floor");
        for _ in 0..50 {
            r.sample(Duration::from_millis(20));
        }
        let rto = r.rto();
        assert!(
            rto >= Duration::from_millis(40) && rto < Duration::from_millis(60),
            "{rto:?}"
        );
        r.on_timeout();
        assert!(r.rto() >= rto * 2 - Duration::from_micros(1));
        for _ in 0..20 {
            r.on_timeout();
        }
        assert_eq!(r.rto(), Duration::from_secs(3), "ceiling");
        r.sample(Duration::from_millis(20));
        assert!(r.rto() < Duration::from_millis(100));
        assert!(r.srtt().is_some());
    }
}
