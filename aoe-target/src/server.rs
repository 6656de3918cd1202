//! The target's event loop: one AF_PACKET socket and one io_uring carry the frames and the
//! backing I/O of every export on an interface. Receives, sends and disk I/O are all queued on
//! the ring, so many requests are in flight at once (up to each export's buffer count).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::buf::{FrameBuf, MappedData};
use crate::config::TargetOptions;
use crate::engine::{Action, Engine, ExportSpec, IoOp, IoRequest, IoTarget};
use crate::mapped::{FileMap, ResidencyGuess};
use crate::pring::{Geometry, RxRing};
use crate::store::{Backing, StoreError};
use crate::sys::{self, PacketSocket, SysError};
use crate::uring::{Completion, Op, Part, Uring};
use crate::wire::{
    query_config_frame, sectors_per_frame, Command, ConfigArg, ConfigCmd, Header, Mac, ATA_DATA,
    BROADCAST_MAJOR, HEADER_LEN, MIN_FRAME_LEN, SECTOR,
};

/// Token of the socket poll (engine I/O ids are small integers).
const POLL: u64 = u64::MAX;
/// Frames taken from the socket per batch before the disk completions get a turn.
const RECV_BATCH: usize = 256;
/// Frames per recvmmsg/sendmmsg call.
const MMSG: usize = 32;
/// How long the idle loop waits for a frame before looking at signals and the status.
const RECV_WAIT: Duration = Duration::from_millis(200);
/// Bytes of the Ethernet header (the MTU counts what follows it).
const ETH_HEADER: usize = 14;
/// Most frames gathered into one page-cache read or write.
const MAX_RUN: usize = 64;

/// Errors of the target.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Socket or interface trouble.
    #[error(transparent)]
    Sys(#[from] SysError),
    /// A backing store cannot be used.
    #[error("e{shelf}.{slot}")]
    Store {
        /// Shelf.
        shelf: u16,
        /// Slot.
        slot: u8,
        /// Cause.
        #[source]
        source: StoreError,
    },
    /// Another target answers for the address.
    #[error("e{shelf}.{slot} is already served on {iface} by {mac}")]
    Taken {
        /// Shelf.
        shelf: u16,
        /// Slot.
        slot: u8,
        /// Interface.
        iface: String,
        /// The other target.
        mac: Mac,
    },
    /// io_uring or the socket failed while running.
    #[error("{what}")]
    Io {
        /// What failed.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A running target.
#[derive(Debug)]
pub struct Server {
    iface: String,
    sock: PacketSocket,
    engine: Engine,
    backings: Vec<Backing>,
    /// Read-only mappings of the page-cache (not O_DIRECT) backing files, by export.
    maps: Vec<Option<FileMap>>,
    /// Whether the next read sent from each export's mapping needs a `mincore` first.
    residency: Vec<ResidencyGuess>,
    /// Replies whose data was sent from a mapping.
    sent_from_map: u64,
    /// O_DIRECT reads and writes that carried a run of more than one frame.
    vectored_ios: u64,
    status_file: Option<PathBuf>,
    started: Instant,
    /// The PACKET_MMAP receive ring, when the kernel gave us one (else frames come by
    /// recvmmsg).
    rx_ring: Option<RxRing>,
    /// Receive buffers of the next recvmmsg (or the frames just taken from the ring).
    rx: Vec<FrameBuf>,
    /// Frame lengths of the last recvmmsg.
    rx_lens: Vec<usize>,
    /// Replies waiting for the next sendmmsg.
    tx: Vec<FrameBuf>,
    /// Adjacent page-cache reads or writes waiting to be done in one call.
    run: Vec<IoRequest>,
}

impl Server {
    /// Opens the interface and every backing store, and checks that no other target on the
    /// segment answers for our addresses (waiting `probe` for replies; zero skips the check).
    pub fn open(opts: &TargetOptions, probe: Duration) -> Result<Server, ServerError> {
        let rcvbuf = opts
            .exports
            .iter()
            .map(|e| usize::from(e.bufcnt))
            .sum::<usize>()
            * 10_000
            * 2;
        let sock = PacketSocket::open(&opts.interface, rcvbuf.max(4 << 20))?;
        let mut engine = Engine::new(sock.mac(), 1);
        let mut backings = Vec::new();
        let mut maps = Vec::new();
        for o in &opts.exports {
            let store_err = |source| ServerError::Store {
                shelf: o.shelf,
                slot: o.slot,
                source,
            };
            if !probe.is_zero() {
                if let Some(mac) = probe_taken(&sock, o.shelf, o.slot, probe)? {
                    return Err(ServerError::Taken {
                        shelf: o.shelf,
                        slot: o.slot,
                        iface: opts.interface.clone(),
                        mac,
                    });
                }
            }
            let mut b = Backing::open(o).map_err(store_err)?;
            let spec = ExportSpec {
                shelf: o.shelf,
                slot: o.slot,
                sectors: b.sectors,
                bufcnt: o.bufcnt,
                config: o.config.as_bytes().to_vec(),
                masks: o.mask_macs().map_err(|e| store_err(e.into()))?,
                serial: format!("{}.{}:{}", o.shelf, o.slot, hostname()),
                writeback: o.writeback,
                read_only: o.read_only,
            };
            engine.add_export(spec, b.map.take());
            // Page-cache reads are sent from a mapping of the file; without one (mmap
            // refused) they are read into the frame as before.
            let map = (!b.direct)
                .then(|| FileMap::new(&b.data, b.sectors * SECTOR as u64))
                .and_then(|m| {
                    m.map_err(|e| {
                        log::warn!("e{}.{}: mmap of the backing file: {e}", o.shelf, o.slot)
                    })
                    .ok()
                });
            maps.push(map);
            backings.push(b);
        }
        // After the probes (they read with recv). Slots for jumbo frames even on a smaller
        // MTU, so a raised MTU is served without a new ring; four frames a buffer (a 4 KiB
        // request at MTU 1500) of every export.
        let frames = (engine.total_bufcnt() * 4).clamp(256, 4096);
        let geo = Geometry::new((sock.mtu() as usize).max(9000) + ETH_HEADER, frames);
        let rx_ring = RxRing::new(sock.as_raw_fd(), geo)
            .map_err(|e| log::warn!("{e}; receiving with recvmmsg"))
            .ok();
        let ring_mtu = rx_ring
            .as_ref()
            .map(|r| r.geometry().max_frame() - ETH_HEADER);
        engine.set_max_sectors(link_sectors(sock.mtu(), ring_mtu));
        Ok(Server {
            iface: opts.interface.clone(),
            sock,
            engine,
            backings,
            residency: vec![ResidencyGuess::default(); maps.len()],
            maps,
            sent_from_map: 0,
            vectored_ios: 0,
            status_file: opts.status_file.clone(),
            started: Instant::now(),
            rx_ring,
            rx: Vec::with_capacity(MMSG),
            rx_lens: Vec::with_capacity(MMSG),
            tx: Vec::with_capacity(MMSG),
            run: Vec::new(),
        })
    }

    /// The interface MAC.
    pub fn mac(&self) -> Mac {
        self.sock.mac()
    }

    /// The interface MTU.
    pub fn mtu(&self) -> u32 {
        self.sock.mtu()
    }

    /// The status as JSON: interface, exports, counters, used vs advertised bytes.
    pub fn status(&self) -> serde_json::Value {
        let exports: Vec<serde_json::Value> = self
            .engine
            .status()
            .into_iter()
            .zip(&self.backings)
            .map(|(s, b)| {
                let mut v = serde_json::to_value(s).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("allocated_bytes".into(), b.allocated_bytes().into());
                    o.insert("o_direct".into(), b.direct.into());
                }
                v
            })
            .collect();
        serde_json::json!({
            "interface": self.iface,
            "mac": self.sock.mac().to_string(),
            "mtu": self.sock.mtu(),
            "sectors_per_frame": self.engine.max_sectors(),
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "outstanding": self.engine.outstanding(),
            "ignored_frames": self.engine.ignored(),
            "sent_from_map": self.sent_from_map,
            "vectored_ios": self.vectored_ios,
            "rx_ring": self.rx_ring.is_some(),
            "exports": exports,
        })
    }

    fn write_status(&self) {
        let Some(path) = &self.status_file else {
            return;
        };
        if let Err(e) = write_atomic(path, &self.status()) {
            log::warn!("status file {}: {e}", path.display());
        }
    }

    /// Serves until SIGTERM or SIGINT, then drains: stops receiving, lets every request in
    /// flight complete and be answered, syncs the files, writes and returns the final status.
    ///
    /// Frames are received with `recvmmsg` (up to [`MMSG`] frames a call). While disk I/O is
    /// on the ring, the socket is drained without waiting whenever a one-shot io_uring poll
    /// reports it readable (and after every batch of disk completions): many receive requests
    /// parked on one socket would all be woken by every frame. With nothing on the ring, the
    /// loop waits in `recvmmsg` itself (up to 200 ms, to look at signals and the status). Replies are gathered and go out with one `sendmmsg`
    /// per batch; the disk I/O runs on the ring. So a busy target makes about one system call
    /// per frame (the page-cache read in `--writeback` mode, or its share of `io_uring_enter`)
    /// instead of three.
    pub fn run(mut self) -> Result<serde_json::Value, ServerError> {
        let io = |what| move |source| ServerError::Io { what, source };
        sys::install_terminate_handler().map_err(io("signal handler"))?;
        let entries = (self.engine.total_bufcnt() * 4)
            .next_power_of_two()
            .clamp(256, 4096);
        let mut ring =
            Uring::new(u32::try_from(entries).unwrap_or(4096)).map_err(io("io_uring"))?;
        let fd = self.sock.as_raw_fd();
        self.announce();
        self.write_status();
        let tick = RECV_WAIT;
        self.sock.set_recv_timeout(tick).map_err(io("socket"))?;
        let mut draining = false;
        let mut poll_armed = false;
        let mut last_status = Instant::now();
        loop {
            if !draining {
                // Nothing on the ring (no disk I/O, no poll): wait for frames in the receive
                // call itself, one system call as vblade's read; page-cache hits then complete
                // without the ring at all.
                let idle = ring.in_flight() == 0;
                self.receive_batch(idle).map_err(io("receive"))?;
            }
            self.submit_actions(&mut ring).map_err(io("io_uring"))?;
            if ring.in_flight() > 0 || draining {
                if !poll_armed && !draining {
                    ring.push(Op::Poll(fd), POLL, FrameBuf::empty())
                        .map_err(io("io_uring"))?;
                    poll_armed = true;
                }
                for c in ring.wait(tick).map_err(io("io_uring"))? {
                    if c.parts.first().is_some_and(|p| p.token == POLL) {
                        poll_armed = false;
                    } else {
                        self.complete(&mut ring, c).map_err(io("io_uring"))?;
                    }
                }
                // Replies to what just completed go out before the next receive batch.
                self.submit_actions(&mut ring).map_err(io("io_uring"))?;
            }
            if last_status.elapsed() >= Duration::from_secs(1) {
                self.write_status();
                last_status = Instant::now();
            }
            if sys::terminate_requested() && !draining {
                log::info!(
                    "terminating: draining {} requests",
                    self.engine.outstanding()
                );
                draining = true;
                ring.cancel_polls().map_err(io("io_uring"))?;
            }
            if draining && self.engine.outstanding() == 0 && ring.in_flight() == 0 {
                self.submit_actions(&mut ring).map_err(io("io_uring"))?;
                break;
            }
        }
        for b in &self.backings {
            b.data.sync_all().map_err(io("sync"))?;
            if let Some(f) = &b.map_file {
                f.sync_all().map_err(io("sync"))?;
            }
        }
        self.write_status();
        Ok(self.status())
    }

    /// Hands every queued frame (up to a batch) to the engine; with `wait`, first waits up
    /// to the socket's receive timeout for one.
    fn receive_batch(&mut self, wait: bool) -> std::io::Result<()> {
        if self.rx_ring.is_some() {
            return self.receive_ring(wait);
        }
        let mut taken = 0;
        while taken < RECV_BATCH {
            while self.rx.len() < MMSG {
                let b = self.engine.alloc();
                self.rx.push(b);
            }
            let n = {
                let mut slices: Vec<&mut [u8]> =
                    self.rx.iter_mut().map(FrameBuf::full_mut).collect();
                self.sock
                    .recv_many(&mut slices, &mut self.rx_lens, wait && taken == 0)?
            };
            let mut got: Vec<FrameBuf> = self.rx.drain(..n).collect();
            for (buf, &len) in got.iter_mut().zip(&self.rx_lens) {
                buf.set_len(len);
            }
            for buf in got {
                self.on_frame(buf);
            }
            taken += n;
            if n < MMSG {
                break;
            }
        }
        // Buffers sized for an MTU no longer in use are dropped here by the engine.
        for b in self.rx.drain(..) {
            self.engine.recycle(b);
        }
        Ok(())
    }

    /// [`Server::receive_batch`] from the PACKET_MMAP ring: copies each frame the kernel
    /// handed over into a frame buffer (whose data area is aligned for O_DIRECT) and gives
    /// the slot back; waits (`poll`) only if `wait` and the ring is empty.
    fn receive_ring(&mut self, wait: bool) -> std::io::Result<()> {
        let Some(ring) = self.rx_ring.as_mut() else {
            return Ok(());
        };
        if wait && !ring.ready() {
            self.sock.wait_readable(RECV_WAIT)?;
        }
        while self.rx.len() < RECV_BATCH {
            let Some(frame) = ring.take() else {
                break;
            };
            let mut buf = self.engine.alloc();
            buf.fill_from(frame.bytes());
            drop(frame);
            self.rx.push(buf);
        }
        let mut got = std::mem::take(&mut self.rx);
        for buf in got.drain(..) {
            self.on_frame(buf);
        }
        self.rx = got;
        Ok(())
    }

    /// Hands one received frame to the engine (after following the MTU on a Query Config).
    fn on_frame(&mut self, buf: FrameBuf) {
        if is_config_query(buf.as_slice()) {
            let ring_mtu = self
                .rx_ring
                .as_ref()
                .map(|r| r.geometry().max_frame() - ETH_HEADER);
            follow_mtu(&mut self.sock, &mut self.engine, ring_mtu);
        }
        self.engine.on_frame(buf);
    }

    /// Sends the gathered replies. A reply whose data lies in a mapped backing file goes out
    /// as its header followed by the mapped range. A frame the kernel refuses is dropped (the
    /// initiator retransmits), logged at debug level only.
    fn flush_sends(&mut self) {
        let marks: Vec<Option<MappedData>> =
            self.tx.iter_mut().map(FrameBuf::take_mapped).collect();
        let frames: Vec<_> = self
            .tx
            .iter()
            .zip(&marks)
            .map(|(buf, mark)| {
                let frame = buf.as_slice();
                let range = mark.and_then(|m| {
                    let map = self.maps.get(m.export)?.as_ref()?;
                    // Only a reply of header plus exactly the mapped data (reads of at
                    // least one sector need no padding).
                    (frame.len() == ATA_DATA + m.len)
                        .then(|| map.range(m.offset, m.len))
                        .flatten()
                });
                match range {
                    Some(r) => {
                        self.sent_from_map += 1;
                        (&frame[..ATA_DATA], Some(r))
                    }
                    None => (frame, None),
                }
            })
            .collect();
        let mut sent = 0;
        while sent < frames.len() {
            match self.sock.send_many(&frames[sent..]) {
                Ok(n) => sent += n.max(1),
                Err(e) => {
                    log::debug!("send failed: {e}");
                    // A page of the mapping gone (the file shrank): check every read again.
                    if let (Some(m), (_, Some(_))) = (marks[sent], frames[sent]) {
                        self.residency[m.export].distrust();
                    }
                    sent += 1;
                }
            }
        }
        drop(frames);
        for b in self.tx.drain(..) {
            self.engine.recycle(b);
        }
    }

    /// Runs the engine's actions: replies are gathered for one `sendmmsg`, disk I/O goes to
    /// the ring, and page-cache I/O of adjacent frames is gathered into runs (see
    /// [`Server::flush_run`]).
    fn submit_actions(&mut self, ring: &mut Uring) -> std::io::Result<()> {
        loop {
            let Some(a) = self.engine.next_action() else {
                if self.run.is_empty() {
                    break;
                }
                // Completing the run queues its replies. Nothing else is waiting: with the
                // ring idle too, the run is all there is to do.
                let lone = ring.in_flight() == 0;
                self.flush_run(ring, lone)?;
                continue;
            };
            match a {
                Action::Send(buf) => {
                    self.tx.push(buf);
                    if self.tx.len() >= MMSG {
                        self.flush_sends();
                    }
                }
                Action::Io(req) if self.mergeable(&req) => {
                    let joins = self.run.last().is_some_and(|l| adjacent(l, &req));
                    if !joins || self.run.len() >= MAX_RUN {
                        self.flush_run(ring, false)?;
                    }
                    self.run.push(req);
                }
                Action::Io(req) => {
                    self.flush_run(ring, false)?;
                    let req = if ring.in_flight() == 0 && !self.engine.has_actions() {
                        self.lone_io(req)
                    } else {
                        Some(req)
                    };
                    if let Some(req) = req {
                        self.push_ring(ring, req)?;
                    }
                }
            }
        }
        self.flush_sends();
        Ok(())
    }

    /// True for data I/O that can be gathered into runs of adjacent frames: page-cache I/O
    /// served in the event loop (`--writeback` data reads and writes), and O_DIRECT reads
    /// and writes whose every buffer suits O_DIRECT (each frame's data area is page-aligned
    /// and a whole number of sectors long, and the store only uses O_DIRECT where it needs
    /// no more than sector alignment), so the frames' data areas can be the iovecs of one
    /// read or write.
    fn mergeable(&self, req: &IoRequest) -> bool {
        if req.target != IoTarget::Data {
            return false;
        }
        if self.backings[req.export].direct {
            let len = io_len(&req.op);
            matches!(req.op, IoOp::Read { .. } | IoOp::Write { .. })
                && len % SECTOR == 0
                && (req.buf.data(len).as_ptr() as usize) % SECTOR == 0
        } else {
            matches!(
                req.op,
                IoOp::Read { .. } | IoOp::Write { durable: false, .. }
            )
        }
    }

    /// Page-cache mode: a read that hits the cache completes here without a ring round trip;
    /// a write-back write is a plain write into the cache (as vblade's), because io_uring
    /// would hand buffered writes the file system cannot do without blocking (ext4: no
    /// RWF_NOWAIT) to a worker thread. The frames of one initiator request that arrive
    /// together (at MTU 1500 a 4 KiB request is four 1 KiB frames) are adjacent on disk:
    /// the run takes them with one `preadv2`/`pwritev` instead of one call each (ggaoed
    /// merges them the same way). Reads that miss the cache go to the ring, frame by frame.
    fn flush_run(&mut self, ring: &mut Uring, lone: bool) -> std::io::Result<()> {
        let mut run = std::mem::take(&mut self.run);
        let Some(first) = run.first() else {
            return Ok(());
        };
        if self.backings[first.export].direct {
            return self.flush_direct_run(ring, run, lone);
        }
        let fd = self.backings[first.export].data.as_raw_fd();
        let offset = io_offset(&first.op);
        let write = matches!(first.op, IoOp::Write { .. });
        let total: usize = run.iter().map(|r| io_len(&r.op)).sum();
        let export = first.export;
        let done = if write {
            let bufs: Vec<&[u8]> = run.iter().map(|r| r.buf.data(io_len(&r.op))).collect();
            sys::pwritev(fd, &bufs, offset, false).map(Some)
        } else if let Some(map) = &self.maps[export] {
            // Resident data is sent from the mapping (one copy, page cache to packet,
            // instead of two through the frame); the rest goes to the ring.
            let guess = &mut self.residency[export];
            let sendable = map.range(offset, total).is_some_and(|r| {
                if !guess.should_check() {
                    return true;
                }
                let resident = r.resident();
                guess.record(resident);
                resident
            });
            if sendable {
                for mut r in run {
                    let len = io_len(&r.op);
                    r.buf.set_mapped(MappedData {
                        export,
                        offset: io_offset(&r.op),
                        len,
                    });
                    self.engine.on_io_done(r.id, Ok(len), r.buf);
                }
                return Ok(());
            }
            Ok(None)
        } else {
            let mut bufs: Vec<&mut [u8]> = run
                .iter_mut()
                .map(|r| {
                    let len = io_len(&r.op);
                    r.buf.data_mut(len)
                })
                .collect();
            sys::pread_nowait(fd, &mut bufs, offset)
        };
        match done {
            Ok(Some(n)) if n == total => {
                for r in run {
                    let len = io_len(&r.op);
                    self.engine.on_io_done(r.id, Ok(len), r.buf);
                }
            }
            // A lone write's short count or error is its result.
            res if write && run.len() == 1 => {
                let r = run.remove(0);
                self.engine
                    .on_io_done(r.id, res.map(|n| n.unwrap_or(0)), r.buf);
            }
            // Otherwise frame by frame: writes get their own result, reads (cache misses or
            // errors) go to the ring.
            _ => {
                for r in run {
                    if write {
                        let buf = r.buf.data(io_len(&r.op));
                        let res = sys::pwritev(fd, &[buf], io_offset(&r.op), false);
                        self.engine.on_io_done(r.id, res, r.buf);
                    } else {
                        self.push_ring(ring, r)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// O_DIRECT: the frames of a run (at MTU 1500 a 4 KiB request is four 1 KiB frames)
    /// become one read or write of the disk, with one iovec per frame's data area, instead
    /// of one each (the device then sees the request as the initiator made it, as fio's
    /// single 4 KiB read). When one of the writes must be durable on completion (O_DSYNC: it
    /// was queued with nothing else in flight), the whole run is written with RWF_DSYNC and
    /// the others need no group fdatasync either. A run that is all there is to do (`lone`,
    /// as at queue depth one) is done synchronously (see [`Server::lone_io`]); otherwise it
    /// goes on the ring and [`Server::complete`] hands each frame its share of the result.
    fn flush_direct_run(
        &mut self,
        ring: &mut Uring,
        mut run: Vec<IoRequest>,
        lone: bool,
    ) -> std::io::Result<()> {
        if run.len() == 1 {
            let req = run.remove(0);
            let req = if lone { self.lone_io(req) } else { Some(req) };
            return match req {
                Some(req) => self.push_ring(ring, req),
                None => Ok(()),
            };
        }
        self.vectored_ios += 1;
        let fd = self.backings[run[0].export].data.as_raw_fd();
        let offset = io_offset(&run[0].op);
        let op = match run[0].op {
            IoOp::Write { .. } => {
                let dsync = run
                    .iter()
                    .any(|r| matches!(r.op, IoOp::Write { durable: true, .. }));
                if dsync {
                    for r in &run {
                        self.engine.write_goes_dsync(r.id);
                    }
                }
                Op::Writev { fd, offset, dsync }
            }
            _ => Op::Readv { fd, offset },
        };
        let parts: Vec<Part> = run
            .into_iter()
            .map(|r| Part {
                token: r.id as u64,
                len: io_len(&r.op),
                buf: r.buf,
            })
            .collect();
        if !lone {
            return ring.push_parts(op, parts);
        }
        let mut parts = parts;
        let result = match op {
            Op::Writev { dsync, .. } => {
                let bufs: Vec<&[u8]> = parts.iter().map(|p| p.buf.data(p.len)).collect();
                sys::pwritev(fd, &bufs, offset, dsync)
            }
            _ => {
                let mut bufs: Vec<&mut [u8]> =
                    parts.iter_mut().map(|p| p.buf.data_mut(p.len)).collect();
                sys::preadv(fd, &mut bufs, offset)
            }
        };
        self.complete(ring, Completion { op, result, parts })
    }

    /// Hands the result of a backing I/O to the engine. A vectored read or write (a run of
    /// frames) gives each frame its share: the frames it covered completely succeed; after a
    /// short count or an error, the frames not covered are done again one by one on the ring,
    /// so each gets its own result (a read past the end of a file shorter than advertised
    /// reads as zeros, a failed sector fails only its frame, as without merging).
    fn complete(&mut self, ring: &mut Uring, c: Completion) -> std::io::Result<()> {
        let Completion { op, result, parts } = c;
        let (fd, mut offset, dsync) = match op {
            Op::Readv { fd, offset } => (fd, offset, None),
            Op::Writev { fd, offset, dsync } => (fd, offset, Some(dsync)),
            _ => {
                if let Some(p) = parts.into_iter().next() {
                    let id = usize::try_from(p.token).unwrap_or(usize::MAX);
                    self.engine.on_io_done(id, result, p.buf);
                }
                return Ok(());
            }
        };
        let mut left = match &result {
            Ok(n) => *n,
            Err(e) => {
                log::debug!("vectored I/O of {} frames failed: {e}", parts.len());
                0
            }
        };
        for p in parts {
            let id = usize::try_from(p.token).unwrap_or(usize::MAX);
            if left >= p.len {
                left -= p.len;
                self.engine.on_io_done(id, Ok(p.len), p.buf);
            } else {
                left = 0;
                let len = p.len;
                let op = match dsync {
                    Some(dsync) => Op::Write {
                        fd,
                        offset,
                        len,
                        dsync,
                    },
                    None => Op::Read { fd, offset, len },
                };
                ring.push(op, p.token, p.buf)?;
            }
            offset += p.len as u64;
        }
        Ok(())
    }

    /// Runs a lone data read or write (nothing else in flight or waiting, as at queue depth
    /// one) synchronously, as vblade does: at QD1 the ring only adds a round trip (submit,
    /// then wait for the completion and the socket poll). Hands back anything else, for the
    /// ring.
    fn lone_io(&mut self, mut req: IoRequest) -> Option<IoRequest> {
        if req.target != IoTarget::Data {
            return Some(req);
        }
        let fd = self.backings[req.export].data.as_raw_fd();
        let res = match req.op {
            IoOp::Read { offset, len } => sys::preadv(fd, &mut [req.buf.data_mut(len)], offset),
            IoOp::Write {
                offset,
                len,
                durable,
            } => sys::pwritev(fd, &[req.buf.data(len)], offset, durable),
            IoOp::Sync => return Some(req),
        };
        self.engine.on_io_done(req.id, res, req.buf);
        None
    }

    /// Queues one backing I/O on the ring.
    fn push_ring(&mut self, ring: &mut Uring, req: IoRequest) -> std::io::Result<()> {
        let b = &self.backings[req.export];
        let fd = match (req.target, &b.map_file) {
            (IoTarget::Map, Some(f)) => f.as_raw_fd(),
            _ => b.data.as_raw_fd(),
        };
        let op = match req.op {
            IoOp::Read { offset, len } => Op::Read { fd, offset, len },
            IoOp::Write {
                offset,
                len,
                durable,
            } => Op::Write {
                fd,
                offset,
                len,
                dsync: durable,
            },
            IoOp::Sync => Op::Sync(fd),
        };
        ring.push(op, req.id as u64, req.buf)
    }

    /// Broadcasts one unsolicited Config reply per export at start-up, as vblade does (but
    /// with the version nibble set, aoe-anchors §1.6).
    fn announce(&self) {
        for s in self.engine.status() {
            let mut f = vec![0u8; 64];
            let req = Header::request(
                self.sock.mac(),
                Mac::BROADCAST,
                s.shelf,
                s.slot,
                Command::Config,
                0,
            );
            let hdr = req.reply(self.sock.mac(), s.shelf, s.slot);
            let hdr = Header {
                dst: Mac::BROADCAST,
                ..hdr
            };
            let arg = ConfigArg {
                buffer_count: s.bufcnt,
                firmware: crate::engine::FIRMWARE_VERSION,
                sector_count: sectors_per_frame(self.sock.mtu()),
                version: crate::wire::AOE_VERSION,
                ccmd: ConfigCmd::Read,
                string: s.config.as_bytes(),
            };
            f.resize(HEADER_LEN + 8 + s.config.len() + MIN_FRAME_LEN, 0);
            if hdr.write(&mut f).is_ok() {
                if let Ok(n) = arg.write(&mut f) {
                    f.truncate(n.max(MIN_FRAME_LEN));
                    let _ = self.sock.send(&f);
                }
            }
        }
    }
}

/// Bytes of a read or write (0 for a sync).
fn io_len(op: &IoOp) -> usize {
    match *op {
        IoOp::Read { len, .. } | IoOp::Write { len, .. } => len,
        IoOp::Sync => 0,
    }
}

/// Offset of a read or write (0 for a sync).
fn io_offset(op: &IoOp) -> u64 {
    match *op {
        IoOp::Read { offset, .. } | IoOp::Write { offset, .. } => offset,
        IoOp::Sync => 0,
    }
}

/// True when `next` continues `last` on disk: same export, both reads or both writes, and it
/// starts where `last` ends.
fn adjacent(last: &IoRequest, next: &IoRequest) -> bool {
    let same_kind = matches!(
        (&last.op, &next.op),
        (IoOp::Read { .. }, IoOp::Read { .. }) | (IoOp::Write { .. }, IoOp::Write { .. })
    );
    same_kind
        && last.export == next.export
        && io_offset(&last.op) + io_len(&last.op) as u64 == io_offset(&next.op)
}

/// True for a Query Config request: the moment an initiator learns the sectors per frame.
fn is_config_query(frame: &[u8]) -> bool {
    Header::parse(frame).is_ok_and(|h| !h.response && h.command == Command::Config)
}

/// Sectors per frame at link MTU `mtu`, and no more than a receive-ring slot carries
/// (`ring_mtu`: the ring's longest frame less its Ethernet header).
fn link_sectors(mtu: u32, ring_mtu: Option<usize>) -> u8 {
    let cap = ring_mtu.map_or(u32::MAX, |m| u32::try_from(m).unwrap_or(u32::MAX));
    sectors_per_frame(mtu.min(cap))
}

/// Re-reads the interface MTU (vblade does so on every Query Config) and, when it changed,
/// the sectors per frame with it, so the reply advertises what the link carries now.
fn follow_mtu(sock: &mut PacketSocket, engine: &mut Engine, ring_mtu: Option<usize>) {
    let before = sock.mtu();
    match sock.refresh_mtu() {
        Ok(mtu) if mtu != before => {
            let spf = link_sectors(mtu, ring_mtu);
            log::info!("MTU {before} -> {mtu}: {spf} sectors per frame");
            engine.set_max_sectors(spf);
        }
        Ok(_) => {}
        Err(e) => log::warn!("{e}"),
    }
}

/// Sends a Query Config for `shelf.slot` and reports the MAC of any other target answering
/// within `wait`.
pub fn probe_taken(
    sock: &PacketSocket,
    shelf: u16,
    slot: u8,
    wait: Duration,
) -> Result<Option<Mac>, ServerError> {
    let io = |source| ServerError::Io {
        what: "probe",
        source,
    };
    let tag = 0x8000_0000 | (std::process::id() & 0x7fff_ffff);
    let f = query_config_frame(sock.mac(), shelf, slot, tag)
        .map_err(|_| io(std::io::Error::other("frame")))?;
    if let Err(e) = sock.send(&f) {
        // A link without carrier (a tap no VM has opened yet) cannot carry the probe.
        log::warn!("cannot probe for e{shelf}.{slot} ({e}); not checking for a duplicate");
        return Ok(None);
    }
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 16384];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Some(n) = sock.recv_timeout(&mut buf, left).map_err(io)? else {
            continue;
        };
        if let Ok(h) = Header::parse(&buf[..n]) {
            if h.response
                && h.command == Command::Config
                && h.major == shelf
                && h.major != BROADCAST_MAJOR
                && h.minor == slot
                && h.src != sock.mac()
            {
                return Ok(Some(h.src));
            }
        }
    }
    Ok(None)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn write_atomic(path: &Path, v: &serde_json::Value) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(v)?)?;
    std::fs::rename(&tmp, path)
}
