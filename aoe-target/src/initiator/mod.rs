//! The initiator core: discovery, IDENTIFY, and pipelined ATA reads and writes to one target
//! over a raw socket, with a window of outstanding frames, an RTT-based retransmit timer, new
//! tags on every retransmission (as Linux does) and handling of duplicate and late replies.
//!
//! Tags carry bit 31, which the Linux driver leaves to userland tools (aoe-anchors §1.8), so a
//! kernel initiator on the same host ignores our replies.

mod control;

pub use control::{RttEstimator, Window};

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::sys::{PacketSocket, SysError};
use crate::wire::{
    ata_cmd, padded_len, query_config_frame, write_ata_request, AtaArg, Command, ConfigArg, Header,
    Mac, AFLAG_EXTENDED, AFLAG_WRITE, ATA_DATA, ATA_STATUS_FAILED, BROADCAST_MAJOR,
    BROADCAST_MINOR, SECTOR,
};

/// Errors of the initiator.
#[derive(Debug, thiserror::Error)]
pub enum InitiatorError {
    /// Socket trouble.
    #[error(transparent)]
    Sys(#[from] SysError),
    /// Sending or receiving failed.
    #[error("network I/O")]
    Io(#[from] std::io::Error),
    /// No target answered discovery.
    #[error("no target e{shelf}.{slot} answered on {iface}")]
    NoTarget {
        /// Shelf.
        shelf: u16,
        /// Slot.
        slot: u8,
        /// Interface.
        iface: String,
    },
    /// The target answered with the AoE error flag.
    #[error("AoE error {0}")]
    Aoe(u8),
    /// The target answered with an ATA error status.
    #[error("ATA status {status:#04x} error {error:#04x}")]
    Ata {
        /// Status register.
        status: u8,
        /// Error register.
        error: u8,
    },
    /// A read reply carried less data than asked.
    #[error("short read reply: {got} of {want} bytes")]
    Runt {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// No reply within the operation timeout.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// A request does not fit the target.
    #[error("{0}")]
    Invalid(String),
}

/// A target that answered discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetInfo {
    /// Its MAC.
    pub mac: Mac,
    /// Shelf.
    pub shelf: u16,
    /// Slot.
    pub slot: u8,
    /// Advertised buffer count.
    pub bufcnt: u16,
    /// Firmware version.
    pub firmware: u16,
    /// Sectors per frame it accepts (0 in the reply means 2).
    pub max_sectors: u8,
    /// Config string.
    pub config: Vec<u8>,
}

/// Broadcasts a Query Config for `shelf.slot` (0xFFFF/0xFF for all) and collects the answers
/// that arrive within `wait`; for one specific address it returns at the first answer.
pub fn discover(
    sock: &PacketSocket,
    shelf: u16,
    slot: u8,
    wait: Duration,
) -> Result<Vec<TargetInfo>, InitiatorError> {
    let tag = 0x8000_0000 | (std::process::id() & 0xffff);
    let f = query_config_frame(sock.mac(), shelf, slot, tag)
        .map_err(|e| InitiatorError::Invalid(e.to_string()))?;
    sock.send(&f)?;
    let mut found: Vec<TargetInfo> = Vec::new();
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 16384];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Some(n) = sock.recv_timeout(&mut buf, left)? else {
            continue;
        };
        let frame = &buf[..n];
        let (Ok(h), Ok(c)) = (Header::parse(frame), ConfigArg::parse(frame)) else {
            continue;
        };
        let matches = h.response
            && !h.error_flag
            && h.command == Command::Config
            && h.tag == tag
            && (shelf == BROADCAST_MAJOR || h.major == shelf)
            && (slot == BROADCAST_MINOR || h.minor == slot);
        if matches
            && !found
                .iter()
                .any(|t| t.mac == h.src && t.slot == h.minor && t.shelf == h.major)
        {
            found.push(TargetInfo {
                mac: h.src,
                shelf: h.major,
                slot: h.minor,
                bufcnt: c.buffer_count,
                firmware: c.firmware,
                max_sectors: if c.sector_count == 0 {
                    2
                } else {
                    c.sector_count
                },
                config: c.string.to_vec(),
            });
            if shelf != BROADCAST_MAJOR && slot != BROADCAST_MINOR {
                break;
            }
        }
    }
    Ok(found)
}

/// One ATA request of at most one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// READ SECTORS EXT.
    Read {
        /// First sector.
        lba: u64,
        /// Sectors (at most the target's sectors per frame).
        count: u8,
    },
    /// WRITE SECTORS EXT.
    Write {
        /// First sector.
        lba: u64,
        /// Data, a multiple of 512 bytes.
        data: Vec<u8>,
    },
    /// IDENTIFY DEVICE.
    Identify,
    /// FLUSH CACHE EXT.
    Flush,
}

/// Counters of a session.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SessionStats {
    /// Frames sent (retransmissions included).
    pub sent: u64,
    /// Retransmissions.
    pub retransmits: u64,
    /// Replies to a request's earlier tag (after a retransmission).
    pub late_replies: u64,
    /// Replies matching nothing outstanding (duplicates, very late).
    pub unmatched_replies: u64,
    /// Window collapses.
    pub timeouts: u64,
}

#[derive(Debug)]
struct Outstanding {
    user: u64,
    frame: Vec<u8>,
    expect: usize,
    /// When the request was submitted.
    first_sent: Instant,
    sent_at: Instant,
    retries: u32,
    old_tags: Vec<u32>,
}

/// Result of one request: the read data (empty for others) or the error.
pub type Completion = (u64, Result<Vec<u8>, InitiatorError>);

/// A session with one target.
#[derive(Debug)]
pub struct Session {
    sock: PacketSocket,
    target: TargetInfo,
    sectors: u64,
    window: Window,
    rtt: RttEstimator,
    op_timeout: Duration,
    next_tag: u32,
    queue: VecDeque<(u64, Vec<u8>, usize, Instant)>,
    inflight: HashMap<u32, Outstanding>,
    retired: HashMap<u32, u32>,
    stats: SessionStats,
    rx: Vec<u8>,
}

impl Session {
    /// Opens `iface`, discovers `shelf.slot` (waiting up to `wait`), and IDENTIFYs it.
    pub fn open(
        iface: &str,
        shelf: u16,
        slot: u8,
        wait: Duration,
    ) -> Result<Session, InitiatorError> {
        let sock = PacketSocket::open(iface, 8 << 20)?;
        let target = discover(&sock, shelf, slot, wait)?
            .into_iter()
            .next()
            .ok_or_else(|| InitiatorError::NoTarget {
                shelf,
                slot,
                iface: iface.into(),
            })?;
        let mut s = Session {
            window: Window::new(target.bufcnt, 256),
            rtt: RttEstimator::new(Duration::from_millis(50), Duration::from_millis(200)),
            op_timeout: Duration::from_secs(30),
            next_tag: 0,
            queue: VecDeque::new(),
            inflight: HashMap::new(),
            retired: HashMap::new(),
            stats: SessionStats::default(),
            rx: vec![0u8; 16384],
            sectors: 0,
            sock,
            target,
        };
        let id = s.run(vec![Request::Identify])?.remove(0)?;
        let word = |w: usize| u64::from(u16::from_le_bytes([id[2 * w], id[2 * w + 1]]));
        s.sectors = if word(83) & 0x0400 != 0 {
            (0..4).fold(0, |acc, i| acc | (word(100 + i) << (16 * i)))
        } else {
            word(60) | (word(61) << 16)
        };
        Ok(s)
    }

    /// How long a request may take from submission (queueing and retransmissions included)
    /// before it fails.
    pub fn set_op_timeout(&mut self, t: Duration) {
        self.op_timeout = t;
    }

    /// The target.
    pub fn target(&self) -> &TargetInfo {
        &self.target
    }

    /// Disk size in sectors (from IDENTIFY).
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Counters.
    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// The window.
    pub fn window(&self) -> &Window {
        &self.window
    }

    /// Requests queued or in flight.
    pub fn pending(&self) -> usize {
        self.queue.len() + self.inflight.len()
    }

    /// Queues `req`; its completion comes back from [`Session::poll`] with `user`.
    pub fn submit(&mut self, user: u64, req: &Request) -> Result<(), InitiatorError> {
        let max = usize::from(self.target.max_sectors);
        let (aflags, cmd, lba, count, data, expect): (u8, u8, u64, usize, &[u8], usize) = match req
        {
            Request::Read { lba, count } => (
                AFLAG_EXTENDED,
                ata_cmd::READ_EXT,
                *lba,
                usize::from(*count),
                &[],
                usize::from(*count) * SECTOR,
            ),
            Request::Write { lba, data } => {
                if data.len() % SECTOR != 0 {
                    return Err(InitiatorError::Invalid(
                        "write length is not a multiple of 512".into(),
                    ));
                }
                let n = data.len() / SECTOR;
                (
                    AFLAG_EXTENDED | AFLAG_WRITE,
                    ata_cmd::WRITE_EXT,
                    *lba,
                    n,
                    data,
                    0,
                )
            }
            Request::Identify => (0, ata_cmd::IDENTIFY, 0, 1, &[], SECTOR),
            Request::Flush => (AFLAG_EXTENDED, ata_cmd::FLUSH_EXT, 0, 0, &[], 0),
        };
        if count > max && !matches!(req, Request::Identify) {
            return Err(InitiatorError::Invalid(format!(
                "{count} sectors exceed the target's {max} per frame"
            )));
        }
        let count = u8::try_from(count).map_err(|_| InitiatorError::Invalid("count".into()))?;
        let mut f = vec![0u8; padded_len(ATA_DATA + data.len())];
        write_ata_request(&mut f, aflags, cmd, lba, count)
            .map_err(|e| InitiatorError::Invalid(e.to_string()))?;
        f[ATA_DATA..ATA_DATA + data.len()].copy_from_slice(data);
        self.queue.push_back((user, f, expect, Instant::now()));
        Ok(())
    }

    fn new_tag(&mut self) -> u32 {
        self.next_tag = self.next_tag.wrapping_add(1);
        0x8000_0000 | (self.next_tag & 0x7fff_ffff)
    }

    fn stamp_and_send(&mut self, frame: &mut [u8], tag: u32) -> std::io::Result<()> {
        let h = Header::request(
            self.target.mac,
            self.sock.mac(),
            self.target.shelf,
            self.target.slot,
            Command::Ata,
            tag,
        );
        // The frame is at least the header long (padded_len >= 60).
        let _ = h.write(frame);
        self.stats.sent += 1;
        self.sock.send(frame).map(|_| ())
    }

    /// Sends what the window allows, waits up to `wait` for replies, retransmits what timed
    /// out, and returns the requests that finished.
    pub fn poll(&mut self, wait: Duration) -> Result<Vec<Completion>, InitiatorError> {
        let mut done = Vec::new();
        let now = Instant::now();
        // A request fails once it has waited `op_timeout` since submission, queued or not.
        while let Some((user, _, _, at)) = self.queue.front() {
            if now.duration_since(*at) < self.op_timeout {
                break;
            }
            done.push((*user, Err(InitiatorError::Timeout(self.op_timeout))));
            self.queue.pop_front();
        }
        while self.inflight.len() < self.window.size() as usize {
            let Some((user, mut frame, expect, submitted)) = self.queue.pop_front() else {
                break;
            };
            let tag = self.new_tag();
            self.stamp_and_send(&mut frame, tag)?;
            self.inflight.insert(
                tag,
                Outstanding {
                    user,
                    frame,
                    expect,
                    first_sent: submitted,
                    sent_at: now,
                    retries: 0,
                    old_tags: Vec::new(),
                },
            );
        }
        let rto = self.rtt.rto();
        let next_timeout = self
            .inflight
            .values()
            .map(|o| (o.sent_at + rto).saturating_duration_since(now))
            .min()
            .unwrap_or(wait);
        let mut timeout = wait.min(next_timeout);
        loop {
            let mut rx = std::mem::take(&mut self.rx);
            let got = self.sock.recv_timeout(&mut rx, timeout);
            let n = match got {
                Ok(Some(n)) => n,
                Ok(None) => {
                    self.rx = rx;
                    break;
                }
                Err(e) => {
                    self.rx = rx;
                    return Err(e.into());
                }
            };
            if let Some(c) = self.on_reply(&rx[..n]) {
                done.push(c);
            }
            self.rx = rx;
            timeout = Duration::ZERO;
        }
        self.retransmit(&mut done)?;
        Ok(done)
    }

    fn on_reply(&mut self, frame: &[u8]) -> Option<Completion> {
        let h = Header::parse(frame).ok()?;
        if !h.response
            || h.command != Command::Ata
            || h.src != self.target.mac
            || h.major != self.target.shelf
            || h.minor != self.target.slot
        {
            return None;
        }
        let tag = match self.retired.remove(&h.tag) {
            Some(current) => {
                self.stats.late_replies += 1;
                current
            }
            None => h.tag,
        };
        let Some(o) = self.inflight.remove(&tag) else {
            self.stats.unmatched_replies += 1;
            return None;
        };
        for t in &o.old_tags {
            self.retired.remove(t);
        }
        if o.retries == 0 {
            self.rtt.sample(o.sent_at.elapsed());
        }
        self.window.on_reply();
        let result = if h.error_flag {
            Err(InitiatorError::Aoe(h.error))
        } else {
            match AtaArg::parse(frame) {
                Err(_) => Err(InitiatorError::Runt {
                    got: frame.len(),
                    want: ATA_DATA,
                }),
                Ok(a) if a.cmd_status() & ATA_STATUS_FAILED != 0 => Err(InitiatorError::Ata {
                    status: a.cmd_status(),
                    error: a.err_feature(),
                }),
                Ok(a) if a.data().len() < o.expect => Err(InitiatorError::Runt {
                    got: a.data().len(),
                    want: o.expect,
                }),
                Ok(a) => Ok(a.data()[..o.expect].to_vec()),
            }
        };
        Some((o.user, result))
    }

    fn retransmit(&mut self, done: &mut Vec<Completion>) -> Result<(), InitiatorError> {
        let now = Instant::now();
        let rto = self.rtt.rto();
        let expired: Vec<u32> = self
            .inflight
            .iter()
            .filter(|(_, o)| now.duration_since(o.sent_at) >= rto)
            .map(|(t, _)| *t)
            .collect();
        if expired.is_empty() {
            return Ok(());
        }
        self.stats.timeouts += 1;
        self.window.on_timeout();
        self.rtt.on_timeout();
        for old in expired {
            let Some(mut o) = self.inflight.remove(&old) else {
                continue;
            };
            if now.duration_since(o.first_sent) >= self.op_timeout {
                for t in &o.old_tags {
                    self.retired.remove(t);
                }
                done.push((o.user, Err(InitiatorError::Timeout(self.op_timeout))));
                continue;
            }
            let tag = self.new_tag();
            let mut frame = std::mem::take(&mut o.frame);
            self.stamp_and_send(&mut frame, tag)?;
            self.stats.retransmits += 1;
            o.frame = frame;
            o.old_tags.push(old);
            for t in &o.old_tags {
                self.retired.insert(*t, tag);
            }
            o.sent_at = now;
            o.retries += 1;
            self.inflight.insert(tag, o);
        }
        Ok(())
    }

    /// Runs `reqs` through the window and returns their results in order.
    pub fn run(
        &mut self,
        reqs: Vec<Request>,
    ) -> Result<Vec<Result<Vec<u8>, InitiatorError>>, InitiatorError> {
        let n = reqs.len();
        for (i, r) in reqs.iter().enumerate() {
            self.submit(i as u64, r)?;
        }
        let mut out: Vec<Option<Result<Vec<u8>, InitiatorError>>> = (0..n).map(|_| None).collect();
        let mut left = n;
        while left > 0 {
            for (user, res) in self.poll(Duration::from_millis(50))? {
                if let Some(slot) = usize::try_from(user).ok().and_then(|u| out.get_mut(u)) {
                    if slot.is_none() {
                        left -= 1;
                    }
                    *slot = Some(res);
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|r| r.unwrap_or(Err(InitiatorError::Timeout(self.op_timeout))))
            .collect())
    }

    fn frames(&self, lba: u64, sectors: u64) -> impl Iterator<Item = (u64, u8)> {
        let max = u64::from(self.target.max_sectors.max(1));
        (0..sectors.div_ceil(max)).map(move |i| {
            let start = lba + i * max;
            let n = max.min(lba + sectors - start);
            (start, n as u8)
        })
    }

    /// Reads `sectors` sectors from `lba`, split into frames.
    pub fn read(&mut self, lba: u64, sectors: u64) -> Result<Vec<u8>, InitiatorError> {
        let reqs: Vec<Request> = self
            .frames(lba, sectors)
            .map(|(lba, count)| Request::Read { lba, count })
            .collect();
        let mut out = Vec::with_capacity(usize::try_from(sectors).unwrap_or(0) * SECTOR);
        for r in self.run(reqs)? {
            out.extend_from_slice(&r?);
        }
        Ok(out)
    }

    /// Writes `data` (a multiple of 512 bytes) at `lba`, split into frames.
    pub fn write(&mut self, lba: u64, data: &[u8]) -> Result<(), InitiatorError> {
        if data.len() % SECTOR != 0 {
            return Err(InitiatorError::Invalid(
                "write length is not a multiple of 512".into(),
            ));
        }
        let reqs: Vec<Request> = self
            .frames(lba, (data.len() / SECTOR) as u64)
            .map(|(l, count)| {
                let from = usize::try_from(l - lba).unwrap_or(0) * SECTOR;
                Request::Write {
                    lba: l,
                    data: data[from..from + usize::from(count) * SECTOR].to_vec(),
                }
            })
            .collect();
        for r in self.run(reqs)? {
            r?;
        }
        Ok(())
    }

    /// FLUSH CACHE EXT.
    pub fn flush(&mut self) -> Result<(), InitiatorError> {
        self.run(vec![Request::Flush])?.remove(0).map(|_| ())
    }

    /// Sends a raw frame (tests of malformed input); the header is left as given.
    pub fn send_raw(&self, frame: &[u8]) -> Result<(), InitiatorError> {
        self.sock.send(frame)?;
        Ok(())
    }

    /// Our MAC.
    pub fn mac(&self) -> Mac {
        self.sock.mac()
    }
}
