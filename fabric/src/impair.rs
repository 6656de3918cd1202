//! A link impairment forwarder: reads every frame arriving on one interface and writes it to
//! the other, with random loss, duplication, delay and jitter (which reorders). Our kernel has
//! no `netem` (network-tests.md), so the tests put this in a middle namespace between two veth
//! pairs; where netem exists it can be used instead.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::frame::{self, MAX_FRAME_LEN};
use crate::packet::{self, PacketError, PacketSocket, ETH_P_ALL};

/// What to do to frames.
#[derive(Debug, Clone, Copy, Default)]
pub struct ImpairConfig {
    /// Percent of frames dropped.
    pub loss_pct: f64,
    /// Percent of frames sent twice.
    pub dup_pct: f64,
    /// Fixed one-way delay, µs.
    pub delay_us: u64,
    /// Extra random delay in `[0, jitter)`, µs (reorders frames).
    pub jitter_us: u64,
    /// Seed of the random generator.
    pub seed: u64,
    /// Attacks mixed into the traffic (tests of the authentication).
    pub attack: AttackConfig,
}

/// Hostile frames the forwarder can inject, each a percentage of forwarded frames.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttackConfig {
    /// Send a copy with one bit flipped after the Ethernet header (forged).
    pub corrupt_pct: f64,
    /// Send a copy cut short (truncated).
    pub truncate_pct: f64,
    /// Send a frame of random bytes with the fabric EtherType (garbage).
    pub garbage_pct: f64,
    /// Send again a frame forwarded 64 frames earlier (replayed).
    pub replay_pct: f64,
    /// Send a copy claiming the next protocol version (`frame::VERSION + 1`).
    pub version_pct: f64,
}

/// What the forwarder did.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ImpairStats {
    /// Frames read.
    pub received: u64,
    /// Frames written (duplicates included).
    pub forwarded: u64,
    /// Frames dropped.
    pub dropped: u64,
    /// Extra copies sent.
    pub duplicated: u64,
    /// Hostile frames injected.
    pub injected: u64,
}

/// splitmix64: a few lines of deterministic randomness for a test tool (no need for `rand`).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn chance(&mut self, pct: f64) -> bool {
        pct > 0.0 && (self.next() % 1_000_000) as f64 / 10_000.0 < pct
    }
}

/// Hostile frames derived from `frame` (only fabric frames are attacked).
fn attacks(
    a: &AttackConfig,
    rng: &mut SplitMix,
    frame: &[u8],
    history: &mut VecDeque<Vec<u8>>,
) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let ours = frame.len() > frame::OVERHEAD
        && (frame[12..14] == frame::ETHERTYPE_CONTROL.to_be_bytes()
            || frame[12..14] == frame::ETHERTYPE_MONITOR.to_be_bytes());
    if !ours {
        return out;
    }
    let body = frame.len() - frame::ETH_HEADER_LEN;
    if rng.chance(a.corrupt_pct) {
        let mut f = frame.to_vec();
        let at = frame::ETH_HEADER_LEN + (rng.next() as usize % body);
        f[at] ^= 1 << (rng.next() % 8);
        out.push(f);
    }
    if rng.chance(a.truncate_pct) {
        out.push(frame[..frame::ETH_HEADER_LEN + (rng.next() as usize % body)].to_vec());
    }
    if rng.chance(a.garbage_pct) {
        let mut f = frame[..frame::ETH_HEADER_LEN].to_vec();
        f.extend((0..60 + rng.next() % 200).map(|_| rng.next() as u8));
        out.push(f);
    }
    if rng.chance(a.replay_pct) && history.len() >= 64 {
        out.extend(history.front().cloned());
    }
    if rng.chance(a.version_pct) {
        let mut f = frame.to_vec();
        f[frame::ETH_HEADER_LEN + 4] = frame::VERSION.wrapping_add(1);
        out.push(f);
    }
    out
}

/// A frame held back: due time, arrival order, output socket, bytes.
type Held = (u64, u64, usize, Vec<u8>);

/// Forwards between interfaces `a` and `b` until `stop` is set.
pub fn run(
    a: &str,
    b: &str,
    cfg: ImpairConfig,
    stop: &AtomicBool,
) -> Result<ImpairStats, PacketError> {
    let socks = [
        PacketSocket::open(a, ETH_P_ALL)?,
        PacketSocket::open(b, ETH_P_ALL)?,
    ];
    let mut rng = SplitMix(cfg.seed);
    let mut stats = ImpairStats::default();
    let start = Instant::now();
    let now = || start.elapsed().as_micros() as u64;
    let mut queue: BinaryHeap<Reverse<Held>> = BinaryHeap::new();
    let mut order = 0u64;
    let mut buf = vec![0u8; MAX_FRAME_LEN + 64];
    let mut history: VecDeque<Vec<u8>> = VecDeque::new();
    let fds = [socks[0].as_raw_fd(), socks[1].as_raw_fd()];
    while !stop.load(Ordering::Relaxed) {
        let t = now();
        let wait = queue
            .peek()
            .map_or(100_000, |Reverse((due, ..))| due.saturating_sub(t))
            .min(100_000);
        let ready = packet::wait_readable(&fds, libc::POLLIN, Some(Duration::from_micros(wait)))
            .unwrap_or_default();
        for (i, r) in ready.into_iter().enumerate() {
            if !r {
                continue;
            }
            while let Ok(Some(n)) = socks[i].recv(&mut buf) {
                stats.received += 1;
                if rng.chance(cfg.loss_pct) {
                    stats.dropped += 1;
                    continue;
                }
                let copies = if rng.chance(cfg.dup_pct) { 2 } else { 1 };
                stats.duplicated += copies - 1;
                let frame = &buf[..n];
                for f in attacks(&cfg.attack, &mut rng, frame, &mut history) {
                    stats.injected += 1;
                    order += 1;
                    queue.push(Reverse((now(), order, 1 - i, f)));
                }
                history.push_back(frame.to_vec());
                if history.len() > 64 {
                    history.pop_front();
                }
                for _ in 0..copies {
                    let jitter = if cfg.jitter_us > 0 {
                        rng.next() % cfg.jitter_us
                    } else {
                        0
                    };
                    order += 1;
                    queue.push(Reverse((
                        now() + cfg.delay_us + jitter,
                        order,
                        1 - i,
                        buf[..n].to_vec(),
                    )));
                }
            }
        }
        let t = now();
        while queue.peek().is_some_and(|Reverse((due, ..))| *due <= t) {
            let Some(Reverse((_, _, out, f))) = queue.pop() else {
                break;
            };
            // A failed send (interface down) is a lost frame, like on a real link.
            if socks[out].send(&f).is_ok() {
                stats.forwarded += 1;
            }
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attacks_only_fabric_frames() {
        let a = AttackConfig {
            corrupt_pct: 100.0,
            truncate_pct: 100.0,
            garbage_pct: 100.0,
            replay_pct: 100.0,
            version_pct: 100.0,
        };
        let mut rng = SplitMix(1);
        let mut hist: VecDeque<Vec<u8>> = (0..64).map(|i| vec![i as u8; 80]).collect();
        let mut f = vec![0u8; 100];
        f[12..14].copy_from_slice(&[0x88, 0xB5]);
        let out = attacks(&a, &mut rng, &f, &mut hist);
        assert_eq!(out.len(), 5);
        assert_ne!(out[0], f);
        assert!(out[1].len() < f.len());
        assert_eq!(out[3], vec![0u8; 80]);
        assert_eq!(out[4][18], frame::VERSION + 1);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        assert!(attacks(&a, &mut rng, &f, &mut hist).is_empty());
    }

    #[test]
    fn chance_is_roughly_right() {
        let mut r = SplitMix(42);
        let hits = (0..100_000).filter(|_| r.chance(10.0)).count();
        assert!((9_000..11_000).contains(&hits), "{hits}");
        assert!(!(0..1000).any(|_| r.chance(0.0)));
    }
}
