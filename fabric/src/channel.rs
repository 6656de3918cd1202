//! The reliable channel to one peer, as an I/O-free state machine (time is passed in, in µs).
//!
//! Designs from `fabric-anchors.md` §1: 32-bit sequence numbers on the wire (extended to 64 bits
//! here so wrap-around needs no special cases), cumulative acks piggy-backed on every frame,
//! standalone acks after 16 frames or a short delay (TIPC), selective-ack blocks so one loss
//! does not resend a window (TIPC Gap ACK blocks; selective repeat rather than RoCE's go-back-N),
//! a retransmission timeout from a Jacobson/Karels RTT estimator (AoE) with a 1 ms floor and
//! exponential back-off, and a send window: min(congestion window, receiver-advertised window).

use std::collections::{BTreeMap, VecDeque};

use thiserror::Error;

/// Errors of this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ChannelError {
    /// The send queue is full: the peer is not keeping up.
    #[error("send queue full ({0} messages)")]
    QueueFull(usize),
}

/// Tunables of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelConfig {
    /// Lower bound of the retransmission timeout.
    pub rto_min_us: u64,
    /// Upper bound of the retransmission timeout (after back-off).
    pub rto_max_us: u64,
    /// Retransmission timeout before the first RTT sample.
    pub rto_initial_us: u64,
    /// Most frames in flight, and the receive buffer we advertise.
    pub window: u32,
    /// Initial congestion window.
    pub cwnd_initial: u32,
    /// Longest a received frame waits for its acknowledgement.
    pub ack_delay_us: u64,
    /// Standalone ack after this many unacknowledged frames.
    pub ack_every: u32,
    /// Most messages queued before `push` fails.
    pub max_queue: usize,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            rto_min_us: 1_000,
            rto_max_us: 500_000,
            rto_initial_us: 20_000,
            window: 256,
            cwnd_initial: 32,
            ack_delay_us: 200,
            ack_every: 16,
            max_queue: 65_536,
        }
    }
}

/// Extends a 32-bit wire sequence number to the 64-bit value closest to `reference`.
pub fn extend(wire: u32, reference: u64) -> u64 {
    let base = reference & !0xffff_ffff;
    let candidates = [
        base.wrapping_sub(1 << 32) | u64::from(wire),
        base | u64::from(wire),
        base.wrapping_add(1 << 32) | u64::from(wire),
    ];
    candidates
        .into_iter()
        .min_by_key(|c| c.abs_diff(reference))
        .unwrap_or(u64::from(wire))
}

/// The wire form of an extended sequence number (its low 32 bits).
pub fn wire(seq: u64) -> u32 {
    (seq & 0xffff_ffff) as u32
}

/// Jacobson/Karels smoothed RTT and retransmission timeout (RFC 6298 constants).
#[derive(Debug, Clone, Copy)]
pub struct RttEstimator {
    srtt: Option<u64>,
    rttvar: u64,
    min: u64,
    max: u64,
    initial: u64,
}

impl RttEstimator {
    /// An estimator with the given bounds.
    pub fn new(min: u64, max: u64, initial: u64) -> RttEstimator {
        RttEstimator {
            srtt: None,
            rttvar: 0,
            min,
            max,
            initial,
        }
    }

    /// Adds one sample, in µs.
    pub fn sample(&mut self, rtt: u64) {
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(s) => {
                self.rttvar = (3 * self.rttvar + s.abs_diff(rtt)) / 4;
                self.srtt = Some((7 * s + rtt) / 8);
            }
        }
    }

    /// Smoothed RTT, if any sample arrived.
    pub fn srtt(&self) -> Option<u64> {
        self.srtt
    }

    /// The retransmission timeout before back-off.
    pub fn rto(&self) -> u64 {
        match self.srtt {
            None => self.initial,
            Some(s) => (s + 4 * self.rttvar).clamp(self.min, self.max),
        }
    }

    /// The timeout after `backoff` consecutive expiries (doubling, capped).
    pub fn rto_backed_off(&self, backoff: u32) -> u64 {
        (self.rto() << backoff.min(16)).min(self.max)
    }
}

#[derive(Debug)]
struct Inflight {
    payload: Vec<u8>,
    last_sent: u64,
    sends: u32,
    /// Timeouts since the last (re)start: the frame's own exponential back-off.
    backoff: u32,
    sacked: bool,
}

/// Counters of one channel (also summed per endpoint).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ChannelStats {
    /// Messages sent for the first time.
    pub sent: u64,
    /// Retransmissions after a timeout.
    pub timeout_retransmits: u64,
    /// Retransmissions of holes reported by selective acks.
    pub fast_retransmits: u64,
    /// Messages delivered in order to the application.
    pub delivered: u64,
    /// Duplicate frames received (dropped).
    pub duplicates: u64,
    /// Frames received out of order (buffered).
    pub out_of_order: u64,
}

/// The sending half: queue, frames in flight, timers, windows.
#[derive(Debug)]
pub struct Tx {
    cfg: ChannelConfig,
    next_seq: u64,
    cum_acked: u64,
    /// Frames sent and not cumulatively acknowledged: sequence numbers `cum_acked..next_seq`,
    /// contiguous, so a ring indexed by `seq - cum_acked` (no tree, no allocation per frame).
    inflight: VecDeque<Inflight>,
    queue: VecDeque<Vec<u8>>,
    cwnd: u32,
    ssthresh: u32,
    cwnd_acc: u32,
    peer_window: u32,
    rtt: RttEstimator,
}

impl Tx {
    /// A sender whose first sequence number is 1.
    pub fn new(cfg: ChannelConfig) -> Tx {
        Tx {
            cfg,
            next_seq: 1,
            cum_acked: 1,
            inflight: VecDeque::new(),
            queue: VecDeque::new(),
            cwnd: cfg.cwnd_initial.min(cfg.window).max(1),
            ssthresh: cfg.window,
            cwnd_acc: 0,
            peer_window: cfg.window,
            rtt: RttEstimator::new(cfg.rto_min_us, cfg.rto_max_us, cfg.rto_initial_us),
        }
    }

    /// Queues a message.
    pub fn push(&mut self, payload: Vec<u8>) -> Result<(), ChannelError> {
        if self.queue.len() >= self.cfg.max_queue {
            return Err(ChannelError::QueueFull(self.queue.len()));
        }
        self.queue.push_back(payload);
        Ok(())
    }

    /// The payload of frame `seq`, if it is in flight (to seal what `poll`/`on_ack` listed).
    pub fn payload(&self, seq: u64) -> Option<&[u8]> {
        let i = usize::try_from(seq.checked_sub(self.cum_acked)?).ok()?;
        self.inflight.get(i).map(|f| &f.payload[..])
    }

    /// Index range in `inflight` of sequence numbers `s..e` (clamped to what is in flight).
    fn slots(&self, s: u64, e: u64) -> std::ops::Range<usize> {
        let idx = |q: u64| {
            usize::try_from(q.saturating_sub(self.cum_acked))
                .unwrap_or(usize::MAX)
                .min(self.inflight.len())
        };
        idx(s)..idx(e)
    }

    /// Messages queued or in flight.
    pub fn outstanding(&self) -> usize {
        self.queue.len() + self.inflight.len()
    }

    /// The RTT estimator.
    pub fn rtt(&self) -> &RttEstimator {
        &self.rtt
    }

    /// Current congestion window.
    pub fn cwnd(&self) -> u32 {
        self.cwnd
    }

    /// Processes the peer's cumulative ack (`wire_ack`: next sequence number it expects), its
    /// selective-ack blocks (`[start, end)` on the wire) and its advertised window. The
    /// sequence numbers to resend are appended to `out` (their payloads: [`Tx::payload`]).
    pub fn on_ack(
        &mut self,
        now: u64,
        wire_ack: u32,
        sacks: &[(u32, u32)],
        window: u16,
        stats: &mut ChannelStats,
        out: &mut Vec<u64>,
    ) {
        self.peer_window = u32::from(window);
        // The fast-retransmit guard comes from the estimate before this ack's samples.
        let guard = self
            .rtt
            .srtt()
            .map_or(self.rtt.rto(), |s| s + self.rtt.rttvar);
        let ack = extend(wire_ack, self.cum_acked);
        if ack > self.cum_acked && ack <= self.next_seq {
            let mut newly = 0u32;
            for f in self.inflight.drain(..self.slots(self.cum_acked, ack).end) {
                newly += 1;
                // Karn: only frames sent once give an unambiguous RTT sample; a frame acked
                // selectively was sampled then (waiting for the hole would inflate the RTT).
                if f.sends == 1 && !f.sacked {
                    self.rtt.sample(now.saturating_sub(f.last_sent));
                }
            }
            self.cum_acked = ack;
            self.grow(newly);
        }
        let mut highest_sacked = None;
        for &(s, e) in sacks {
            let (s, e) = (extend(s, self.cum_acked), extend(e, self.cum_acked));
            if s < self.cum_acked || e > self.next_seq || s >= e {
                continue;
            }
            let r = self.slots(s, e);
            let first = self.cum_acked + r.start as u64;
            for (i, f) in self.inflight.range_mut(r).enumerate() {
                if !f.sacked && f.sends == 1 {
                    self.rtt.sample(now.saturating_sub(f.last_sent));
                }
                f.sacked = true;
                highest_sacked = highest_sacked.max(Some(first + i as u64));
            }
        }
        // Holes below the highest selectively acked frame were lost (or are late: with
        // reordering a spurious resend is possible, the receiver drops the duplicate). Resend
        // each hole at most once per smoothed RTT plus its deviation (TIPC: not again within
        // 1 ms), so a resend in flight is not resent again before its ack can be back.
        if let Some(hi) = highest_sacked {
            let r = self.slots(self.cum_acked, hi);
            for (i, f) in self.inflight.range_mut(r).enumerate() {
                if !f.sacked && now.saturating_sub(f.last_sent) >= guard {
                    f.last_sent = now;
                    f.sends += 1;
                    stats.fast_retransmits += 1;
                    out.push(self.cum_acked + i as u64);
                }
            }
        }
    }

    fn grow(&mut self, newly: u32) {
        for _ in 0..newly {
            if self.cwnd < self.ssthresh {
                self.cwnd += 1;
            } else {
                self.cwnd_acc += 1;
                if self.cwnd_acc >= self.cwnd {
                    self.cwnd_acc = 0;
                    self.cwnd += 1;
                }
            }
        }
        self.cwnd = self.cwnd.min(self.cfg.window);
    }

    /// Frames due now: expired retransmissions, then new messages as far as the window allows.
    /// Their sequence numbers are appended to `out` (their payloads: [`Tx::payload`]).
    pub fn poll(&mut self, now: u64, stats: &mut ChannelStats, out: &mut Vec<u64>) {
        let mut expired = false;
        for (i, f) in self.inflight.iter_mut().enumerate() {
            if !f.sacked && now >= f.last_sent + self.rtt.rto_backed_off(f.backoff) {
                f.last_sent = now;
                f.sends += 1;
                f.backoff += 1;
                expired = true;
                stats.timeout_retransmits += 1;
                out.push(self.cum_acked + i as u64);
            }
        }
        if expired {
            // Random loss on a LAN is rarely congestion: like TIPC, halve but keep a floor
            // (the initial window) so one loss does not throttle the channel to a trickle.
            self.ssthresh = (self.cwnd / 2).max(self.cfg.cwnd_initial.min(self.cfg.window));
            self.cwnd = self.ssthresh;
        }
        let limit = self.cwnd.min(self.peer_window.max(1));
        while self.inflight.len() < limit as usize {
            let Some(payload) = self.queue.pop_front() else {
                break;
            };
            let seq = self.next_seq;
            self.next_seq += 1;
            stats.sent += 1;
            out.push(seq);
            self.inflight.push_back(Inflight {
                payload,
                last_sent: now,
                sends: 1,
                backoff: 0,
                sacked: false,
            });
        }
    }

    /// Resends everything not yet acknowledged at the next `poll` (the link came back).
    pub fn kick(&mut self) {
        for f in self.inflight.iter_mut() {
            f.last_sent = 0;
            f.backoff = 0;
        }
    }

    /// When `poll` next has something to do, if ever without new input.
    pub fn next_timeout(&self) -> Option<u64> {
        let window_open = self.inflight.len() < self.cwnd.min(self.peer_window.max(1)) as usize;
        let retx = self
            .inflight
            .iter()
            .filter(|f| !f.sacked)
            .map(|f| f.last_sent + self.rtt.rto_backed_off(f.backoff))
            .min();
        if window_open && !self.queue.is_empty() {
            return Some(0);
        }
        retx
    }
}

/// Most selective-ack blocks in one ack.
pub const MAX_SACK_BLOCKS: usize = 16;

/// The receiving half: in-order delivery, reorder buffer, ack scheduling.
#[derive(Debug)]
pub struct Rx {
    cfg: ChannelConfig,
    next: u64,
    ooo: BTreeMap<u64, Vec<u8>>,
    unacked: u32,
    ack_due: Option<u64>,
}

impl Rx {
    /// A receiver expecting sequence number 1.
    pub fn new(cfg: ChannelConfig) -> Rx {
        Rx {
            cfg,
            next: 1,
            ooo: BTreeMap::new(),
            unacked: 0,
            ack_due: None,
        }
    }

    /// Takes a DATA frame; in-order messages are handed to `deliver`, in order (the frame's
    /// own payload without a copy).
    pub fn on_data(
        &mut self,
        now: u64,
        wire_seq: u32,
        payload: &[u8],
        stats: &mut ChannelStats,
        mut deliver: impl FnMut(&[u8]),
    ) {
        let seq = extend(wire_seq, self.next);
        if seq < self.next || self.ooo.contains_key(&seq) {
            // The peer missed our ack: answer at once.
            stats.duplicates += 1;
            self.ack_due = Some(now);
            return;
        }
        if seq >= self.next + u64::from(self.cfg.window) {
            // Beyond what we advertised: drop, the sender will resend.
            return;
        }
        if seq > self.next {
            stats.out_of_order += 1;
            self.ooo.insert(seq, payload.to_vec());
            self.ack_due = Some(now);
            return;
        }
        deliver(payload);
        self.next += 1;
        stats.delivered += 1;
        while let Some(p) = self.ooo.remove(&self.next) {
            deliver(&p);
            self.next += 1;
            stats.delivered += 1;
        }
        self.unacked += 1;
        let due = if self.unacked >= self.cfg.ack_every || !self.ooo.is_empty() {
            now
        } else {
            now + self.cfg.ack_delay_us
        };
        self.ack_due = Some(self.ack_due.map_or(due, |d| d.min(due)));
    }

    /// The peer asked for an immediate ack (a probe).
    pub fn ack_now(&mut self, now: u64) {
        self.ack_due = Some(now);
    }

    /// The cumulative ack to send (wire form).
    pub fn cum_ack(&self) -> u32 {
        wire(self.next)
    }

    /// The receive window to advertise.
    pub fn window(&self) -> u16 {
        let free = self.cfg.window.saturating_sub(self.ooo.len() as u32);
        u16::try_from(free).unwrap_or(u16::MAX)
    }

    /// Whether frames are buffered out of order (an ack must carry selective-ack blocks).
    pub fn has_gaps(&self) -> bool {
        !self.ooo.is_empty()
    }

    /// Selective-ack blocks `[start, end)` (wire form) for the buffered out-of-order frames.
    pub fn sack_blocks(&self) -> Vec<(u32, u32)> {
        let mut blocks: Vec<(u64, u64)> = Vec::new();
        for &s in self.ooo.keys() {
            match blocks.last_mut() {
                Some(b) if b.1 == s => b.1 = s + 1,
                _ => {
                    if blocks.len() == MAX_SACK_BLOCKS {
                        break;
                    }
                    blocks.push((s, s + 1));
                }
            }
        }
        blocks
            .into_iter()
            .map(|(s, e)| (wire(s), wire(e)))
            .collect()
    }

    /// Whether a standalone ack is due at `now`.
    pub fn ack_due(&self, now: u64) -> bool {
        self.ack_due.is_some_and(|d| d <= now)
    }

    /// When a standalone ack falls due.
    pub fn next_timeout(&self) -> Option<u64> {
        self.ack_due
    }

    /// An ack (piggy-backed or standalone) went out.
    pub fn acked(&mut self) {
        self.unacked = 0;
        self.ack_due = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extend_handles_wrap() {
        assert_eq!(extend(5, 3), 5);
        assert_eq!(extend(0xffff_fffe, 0x1_0000_0002), 0xffff_fffe);
        assert_eq!(extend(2, 0xffff_fffe), 0x1_0000_0002);
        assert_eq!(wire(0x1_0000_0002), 2);
    }

    #[test]
    fn rtt_estimator_floor_and_backoff() {
        let mut r = RttEstimator::new(1_000, 500_000, 20_000);
        assert_eq!(r.rto(), 20_000);
        for _ in 0..20 {
            r.sample(30);
        }
        assert_eq!(r.rto(), 1_000, "1 ms floor");
        assert_eq!(r.rto_backed_off(3), 8_000);
        assert_eq!(r.rto_backed_off(30), 500_000);
        r.sample(100_000);
        assert!(r.rto() > 50_000);
    }

    #[test]
    fn sack_blocks_merge_ranges() {
        let cfg = ChannelConfig::default();
        let mut rx = Rx::new(cfg);
        let mut st = ChannelStats::default();
        let mut d = Vec::new();
        for s in [3, 4, 6, 9, 10, 11] {
            rx.on_data(0, s, b"x", &mut st, |m| d.push(m.to_vec()));
        }
        assert!(d.is_empty());
        assert_eq!(rx.sack_blocks(), vec![(3, 5), (6, 7), (9, 12)]);
        assert_eq!(rx.cum_ack(), 1);
        rx.on_data(0, 1, b"a", &mut st, |m| d.push(m.to_vec()));
        rx.on_data(0, 2, b"b", &mut st, |m| d.push(m.to_vec()));
        assert_eq!(d.len(), 4);
        assert_eq!(rx.cum_ack(), 5);
        rx.on_data(0, 2, b"b", &mut st, |m| d.push(m.to_vec()));
        assert_eq!(st.duplicates, 1);
        assert_eq!(st.out_of_order, 6);
    }

    #[test]
    fn one_loss_resends_one_frame() {
        let cfg = ChannelConfig::default();
        let mut tx = Tx::new(cfg);
        let mut st = ChannelStats::default();
        for i in 0..10u8 {
            tx.push(vec![i]).unwrap();
        }
        let mut out = Vec::new();
        tx.poll(0, &mut st, &mut out);
        assert_eq!(out.len(), 10);
        // Frames 1 and 2 acked after 30 µs, frame 3 lost: the peer sacks 4..=10.
        let mut re = Vec::new();
        tx.on_ack(30, 3, &[], 256, &mut st, &mut re);
        assert!(re.is_empty());
        tx.on_ack(5_000, 3, &[(4, 11)], 256, &mut st, &mut re);
        assert_eq!(re, vec![3]);
        assert_eq!(tx.payload(3), Some(&[2u8][..]));
        assert_eq!(tx.payload(12), None);
        assert_eq!(st.fast_retransmits, 1);
        // Nothing else is due until the RTO of frame 3.
        let mut again = Vec::new();
        tx.poll(5_001, &mut st, &mut again);
        assert!(again.is_empty());
        tx.on_ack(5_100, 11, &[], 256, &mut st, &mut again);
        assert_eq!(tx.outstanding(), 0);
        assert_eq!(tx.next_timeout(), None);
    }

    #[test]
    fn timeout_backs_off_and_window_limits() {
        let cfg = ChannelConfig {
            cwnd_initial: 4,
            ..ChannelConfig::default()
        };
        let mut tx = Tx::new(cfg);
        let mut st = ChannelStats::default();
        for i in 0..10u8 {
            tx.push(vec![i]).unwrap();
        }
        let mut out = Vec::new();
        tx.poll(0, &mut st, &mut out);
        assert_eq!(out.len(), 4, "congestion window");
        out.clear();
        tx.poll(20_000, &mut st, &mut out);
        assert_eq!(out.len(), 4, "initial RTO expired");
        assert_eq!(tx.next_timeout(), Some(20_000 + 40_000), "doubled");
        // The back-off is per frame: a frame sent now waits the plain RTO.
        tx.push(vec![10]).unwrap();
        // The receiver's window caps the flight.
        out.clear();
        tx.on_ack(60_000, 5, &[], 2, &mut st, &mut out);
        tx.poll(60_000, &mut st, &mut out);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn queue_bound() {
        let mut tx = Tx::new(ChannelConfig {
            max_queue: 2,
            ..ChannelConfig::default()
        });
        tx.push(vec![]).unwrap();
        tx.push(vec![]).unwrap();
        assert_eq!(tx.push(vec![]), Err(ChannelError::QueueFull(2)));
    }
}
