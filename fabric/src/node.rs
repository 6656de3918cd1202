//! An [`Endpoint`] driven by real sockets and a real clock: the event loop shared by `fabricd`,
//! the CLI and the bench. One thread: an epoll set holding both receiving sockets and a
//! [`Timer`] kept armed for the endpoint's next timeout (moved only when an earlier one
//! appears), so a round trip costs one `epoll_wait` and one `send` per side and no timer
//! set-up: received frames are taken from each socket's receive ring ([`RxRing`]) without a
//! system call, and frames are sent from a third socket outside the epoll set.
//! epoll rather than `ppoll` because the set is registered once, where `ppoll` polls every fd
//! and adds and removes a wait-queue entry per fd on every wait.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::auth::{self, AuthError, KeyFile, Keyring, Sealer};
use crate::endpoint::{Config, Endpoint, Event};
use crate::frame::{ETHERTYPE_CONTROL, ETHERTYPE_MONITOR};
use crate::packet::{self, PacketError, PacketSocket, RxRing, Timer};

/// The epoll set's tokens: the control socket, the monitoring socket, the timer.
const TOKENS: usize = 3;
const CTL_TOKEN: usize = 0;
const MON_TOKEN: usize = 1;
const TIMER_TOKEN: usize = 2;

/// Errors of this module.
#[derive(Debug, Error)]
pub enum NodeError {
    /// Socket set-up.
    #[error(transparent)]
    Packet(#[from] PacketError),
    /// Keys.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Socket I/O.
    #[error("network I/O on {0}")]
    Io(String, #[source] std::io::Error),
}

/// Slots of the control socket's receive ring (2 KiB each): four full windows of 256 frames. A
/// ring walked through 2 MiB stays warmer in the caches than one of 8 MiB (the receive buffer
/// the socket had before): with both ends on one CPU, 128 slots gave 10.3–10.9 µs mean round
/// trips against 10.8–11.1 µs with 4096, and 1024 slots were level with or below 4096. A burst
/// larger than the ring is dropped and resent like any loss.
const CTL_RING_SLOTS: usize = 1024;
/// Slots of the monitoring socket's ring: one report of a few frames per host and interval.
const MON_RING_SLOTS: usize = 256;
/// Most frames taken from one ring per step.
const RECEIVE_MAX: usize = 256;

/// How often the key file is checked for changes (rotation).
const KEY_RELOAD_EVERY: Duration = Duration::from_secs(2);

/// A node on one interface.
#[derive(Debug)]
pub struct Node {
    ep: Endpoint,
    ctl: PacketSocket,
    mon: PacketSocket,
    /// Sends every frame: a socket of its own, in no epoll set, so the kernel's "writable
    /// again" wake-up after each sent frame finds no waiter (on `ctl` it ran epoll's callback
    /// for every frame sent).
    tx: PacketSocket,
    /// [`packet::monotonic_us`] when the node started: [`Node::now`]'s zero.
    start_us: u64,
    /// [`Node::now`]'s zero on the wall clock, µs since the Unix epoch.
    start_unix_us: u64,
    key_path: PathBuf,
    key_mtime: Option<SystemTime>,
    /// When the key file is next checked (µs on [`Node::now`]'s clock).
    next_key_check: u64,
    /// Receive rings of `ctl` and `mon`.
    ctl_ring: RxRing,
    mon_ring: RxRing,
    /// The frame being sent (its buffer goes back to the endpoint for a later frame).
    tx_buf: Vec<u8>,
    epoll: Epoll,
    timer: Timer,
    /// When `timer` fires (µs on [`Node::now`]'s clock), if armed.
    armed: Option<u64>,
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl Node {
    /// Opens both EtherTypes on `iface` with the keys in `key_file`.
    pub fn open(iface: &str, key_file: &Path, cfg: Config) -> Result<Node, NodeError> {
        let keys = KeyFile::load(key_file)?;
        let ctl = PacketSocket::open(iface, ETHERTYPE_CONTROL)?;
        let mon = PacketSocket::open(iface, ETHERTYPE_MONITOR)?;
        let tx = PacketSocket::open(iface, 0)?;
        let ring = |s: &PacketSocket, slots| {
            s.rx_ring(slots)
                .map_err(|e| NodeError::Io(format!("{iface} receive ring"), e))
        };
        let (ctl_ring, mon_ring) = (ring(&ctl, CTL_RING_SLOTS)?, ring(&mon, MON_RING_SLOTS)?);
        let timer = Timer::new().map_err(|e| NodeError::Io(iface.into(), e))?;
        let epoll = Epoll::new().map_err(|e| NodeError::Io("epoll".into(), e))?;
        for (token, fd) in [ctl.as_raw_fd(), mon.as_raw_fd(), timer.as_raw_fd()]
            .into_iter()
            .enumerate()
        {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token as u64),
                )
                .map_err(|e| NodeError::Io("epoll".into(), e))?;
        }
        let start_us = packet::monotonic_us();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let sealer = Sealer::new(auth::random_id()?, wall.as_secs(), auth::preferred_alg());
        let ep = Endpoint::new(cfg, ctl.mac(), Keyring::new(&keys), sealer, 0);
        log::info!(
            "fabric node on {iface} ({}), sender id {:08x}, {:?}, key epochs up to {}",
            crate::frame::mac_to_string(&ctl.mac()),
            ep.id(),
            auth::preferred_alg(),
            keys.newest()
        );
        Ok(Node {
            ep,
            ctl,
            mon,
            tx,
            start_us,
            start_unix_us: u64::try_from(wall.as_micros()).unwrap_or(u64::MAX),
            key_path: key_file.to_path_buf(),
            key_mtime: mtime(key_file),
            next_key_check: KEY_RELOAD_EVERY.as_micros() as u64,
            ctl_ring,
            mon_ring,
            tx_buf: Vec::new(),
            epoll,
            timer,
            armed: None,
        })
    }

    /// Microseconds since the node started (the endpoint's clock).
    pub fn now(&self) -> u64 {
        packet::monotonic_us().saturating_sub(self.start_us)
    }

    /// Where [`Node::now`] counts from, in µs since the Unix epoch (to report its times).
    pub fn clock_origin_unix_us(&self) -> u64 {
        self.start_unix_us
    }

    /// The endpoint.
    pub fn endpoint(&mut self) -> &mut Endpoint {
        &mut self.ep
    }

    /// The endpoint, read-only.
    pub fn ep(&self) -> &Endpoint {
        &self.ep
    }

    /// Next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.ep.poll_event()
    }

    /// Sends whatever the endpoint has queued (after `send` calls).
    pub fn flush(&mut self) -> Result<(), NodeError> {
        let now = self.now();
        self.flush_at(now)
    }

    /// [`Node::flush`] with the time already read.
    fn flush_at(&mut self, now: u64) -> Result<(), NodeError> {
        self.ep.poll(now);
        while self.ep.poll_transmit_into(&mut self.tx_buf) {
            if let Err(e) = self.tx.send(&self.tx_buf) {
                // A downed link (ENETDOWN) must not stop the daemon: the channel resends.
                log::debug!("send on {}: {e}", self.tx.iface());
            }
        }
        Ok(())
    }

    fn reload_keys(&mut self, now: u64) {
        if now < self.next_key_check {
            return;
        }
        self.next_key_check = now + KEY_RELOAD_EVERY.as_micros() as u64;
        let m = mtime(&self.key_path);
        if m == self.key_mtime {
            return;
        }
        self.key_mtime = m;
        match KeyFile::load(&self.key_path) {
            Ok(k) => {
                log::info!("key file reloaded: epochs up to {}", k.newest());
                self.ep.set_keys(Keyring::new(&k), now);
            }
            Err(e) => log::error!("key file not reloaded, keeping the old keys: {e}"),
        }
    }

    /// Makes the timer fire by `wake` (> `now`): kept if it already fires at or before it.
    fn arm(&mut self, wake: u64, now: u64) -> Result<(), NodeError> {
        if self.armed.is_some_and(|a| a <= wake) {
            return Ok(());
        }
        self.timer
            .arm(Duration::from_micros(wake - now))
            .map_err(|e| NodeError::Io("timerfd".into(), e))?;
        self.armed = Some(wake);
        Ok(())
    }

    /// Waits for frames or the next timer, at most until `deadline` (µs on [`Node::now`]'s
    /// clock), handles them, and transmits what is due. Events are left for `poll_event`.
    ///
    /// The clock is read twice: before the wait and after it.
    pub fn step(&mut self, deadline: u64) -> Result<(), NodeError> {
        let now = self.now();
        self.flush_at(now)?;
        let wake = self
            .ep
            .next_timeout()
            .min(deadline)
            .min(now + KEY_RELOAD_EVERY.as_micros() as u64);
        // A timeout already due: only look at what is there (0); otherwise sleep until a
        // frame or the timer (-1: the timer bounds the wait).
        let timeout_ms = if wake <= now {
            0
        } else {
            self.arm(wake, now)?;
            -1
        };
        let mut events = [EpollEvent::default(); TOKENS];
        let n = match self.epoll.wait(timeout_ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(NodeError::Io("epoll".into(), e)),
        };
        let mut ready = [false; TOKENS];
        for ev in &events[..n] {
            if let Some(r) = ready.get_mut(ev.data() as usize) {
                *r = true;
            }
        }
        if ready[TIMER_TOKEN] {
            self.armed = None;
            self.timer
                .consume()
                .map_err(|e| NodeError::Io("timerfd".into(), e))?;
        }
        let now = self.now();
        for token in [CTL_TOKEN, MON_TOKEN] {
            if ready[token] {
                self.receive(token, now)?;
            }
        }
        self.reload_keys(now);
        self.flush_at(now)
    }

    /// Takes the frames waiting in the ring of the socket `token` names and hands them to the
    /// endpoint; bounded so one busy socket cannot starve the timers (the rest stays readable
    /// for the next wait). A wake-up with no frame is the socket's error (ENETDOWN: the
    /// interface went down), which is taken so it does not keep the socket ready; the link
    /// supervision notices the silence.
    fn receive(&mut self, token: usize, now: u64) -> Result<(), NodeError> {
        let (sock, ring) = if token == CTL_TOKEN {
            (&self.ctl, &mut self.ctl_ring)
        } else {
            (&self.mon, &mut self.mon_ring)
        };
        let ep = &mut self.ep;
        if ring.drain(RECEIVE_MAX, |f| ep.handle_frame(now, f)) == 0 {
            match sock.take_error() {
                Ok(Some(e)) if e.raw_os_error() == Some(libc::ENETDOWN) => {
                    log::warn!("{} is down", sock.iface());
                }
                Ok(Some(e)) => return Err(NodeError::Io(sock.iface().into(), e)),
                Ok(None) => {}
                Err(e) => return Err(NodeError::Io(sock.iface().into(), e)),
            }
        }
        Ok(())
    }
}
