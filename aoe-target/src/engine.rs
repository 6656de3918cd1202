//! The target engine: turns received AoE frames into replies and backing I/O requests.
//!
//! It performs no I/O itself (a "sans-I/O" core, as vm-superio's devices are generic over
//! their side effects): the driver hands it frames ([`Engine::on_frame`]) and I/O completions
//! ([`Engine::on_io_done`]) and executes the [`Action`]s it queues — send a frame, or run a
//! read, write or sync on the export's data file or thin map. [`crate::server`] drives it with
//! an AF_PACKET socket and io_uring; [`MemBackend`] drives it in memory for tests and fuzzing.
//!
//! Command semantics follow aoe-anchors §1 (vblade's behaviour where it is right).

use std::collections::VecDeque;
use std::time::Instant;

use crate::buf::FrameBuf;
use crate::ratelimit::RateLimiter;
use crate::thin::{ThinMap, MAP_PAGE};
use crate::wire::{
    ata_cmd, identify_page, padded_len, AoeError, AtaArg, AtaReply, Command, ConfigArg, ConfigCmd,
    Header, Mac, MaskArg, MaskCmd, MaskDirective, MaskError, ReserveArg, ReserveCmd, AOE_VERSION,
    ATA_DATA, ATA_ERR_ABRT, ATA_ERR_IDNF, ATA_STATUS_DRDY, CONFIG_STRING, DIRECTIVE_LEN,
    IDENTIFY_LEN, SECTOR,
};

/// Firmware version advertised in Query Config replies.
pub const FIRMWARE_VERSION: u16 = 0x4001;
/// Most entries of the MAC mask list (as vblade).
pub const MAX_MASKS: usize = 32;
/// ATA error UNC: a read failed in the backing store.
const ATA_ERR_UNC: u8 = 0x40;

/// What one export serves.
#[derive(Debug, Clone)]
pub struct ExportSpec {
    /// Shelf (major) address; 0xFFFF is reserved for broadcast.
    pub shelf: u16,
    /// Slot (minor) address; 0xFF is reserved for broadcast.
    pub slot: u8,
    /// Advertised size in sectors.
    pub sectors: u64,
    /// Buffer count advertised and honoured: requests beyond this many in flight are dropped.
    pub bufcnt: u16,
    /// Initial config string.
    pub config: Vec<u8>,
    /// Initial MAC mask list.
    pub masks: Vec<Mac>,
    /// IDENTIFY serial number.
    pub serial: String,
    /// Acknowledge writes once in the page cache instead of once durable.
    pub writeback: bool,
    /// Refuse writes.
    pub read_only: bool,
}

/// Which file of an export an I/O targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoTarget {
    /// The backing data (file or block device).
    Data,
    /// The thin map file.
    Map,
}

/// An I/O operation. Reads and writes use `buf.data(len)` as their memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: usize,
    },
    /// Write `len` bytes at `offset`; `durable`: complete only once on stable storage.
    Write {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: usize,
        /// Needs O_DSYNC semantics.
        durable: bool,
    },
    /// fdatasync the file.
    Sync,
}

/// A backing I/O the driver must run, then report with [`Engine::on_io_done`].
#[derive(Debug)]
pub struct IoRequest {
    /// Identifies the request in [`Engine::on_io_done`].
    pub id: usize,
    /// Index of the export.
    pub export: usize,
    /// File.
    pub target: IoTarget,
    /// Operation.
    pub op: IoOp,
    /// Memory of the operation (handed back on completion).
    pub buf: FrameBuf,
}

/// Work for the driver.
#[derive(Debug)]
pub enum Action {
    /// Transmit this frame (already padded), then hand the buffer back with
    /// [`Engine::recycle`].
    Send(FrameBuf),
    /// Run this I/O.
    Io(IoRequest),
}

/// Counters of one export, reported in the status JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExportStats {
    /// Completed read commands.
    pub reads: u64,
    /// Completed write commands.
    pub writes: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub written_bytes: u64,
    /// Completed flushes.
    pub flushes: u64,
    /// Other commands answered (identify, config, mask, reserve, ...).
    pub other_commands: u64,
    /// Requests in flight now.
    pub outstanding: u64,
    /// Replies with the AoE error flag.
    pub aoe_errors: u64,
    /// ATA commands answered with the ERR status (range, abort, I/O failure).
    pub ata_errors: u64,
    /// Backing I/O that failed.
    pub io_errors: u64,
    /// Writes refused because the backing store is out of space.
    pub no_space_errors: u64,
    /// Requests dropped because the buffer count was exhausted.
    pub dropped_over_bufcnt: u64,
    /// True after a write failed for lack of space (until a write succeeds again).
    pub out_of_space: bool,
}

/// Status of one export.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportStatus {
    /// `e<shelf>.<slot>`.
    pub name: String,
    /// Shelf.
    pub shelf: u16,
    /// Slot.
    pub slot: u8,
    /// Advertised buffer count.
    pub bufcnt: u16,
    /// Advertised bytes.
    pub advertised_bytes: u64,
    /// Bytes in blocks marked written in the thin map (advertised bytes without a map).
    pub used_bytes: u64,
    /// Thin map present.
    pub thin_map: bool,
    /// Write-back mode.
    pub writeback: bool,
    /// Current config string (lossy UTF-8).
    pub config: String,
    /// Counters.
    #[serde(flatten)]
    pub stats: ExportStats,
}

#[derive(Debug)]
enum Pending {
    Read {
        export: usize,
        len: usize,
    },
    Write {
        export: usize,
        len: usize,
        offset: u64,
        /// Map pages (with versions) that must be durable before the reply.
        needs: Vec<(usize, u64)>,
        /// Data not yet submitted: waiting for the first generation to be durable.
        deferred: Option<FrameBuf>,
        data_done: bool,
        /// The data went out without O_DSYNC and waits for a group fdatasync.
        awaiting_sync: bool,
        /// The data write was submitted with O_DSYNC.
        dsync: bool,
        failed: Option<std::io::ErrorKind>,
        /// The buffer, back from the data write, kept for the reply.
        reply: Option<FrameBuf>,
    },
    /// An fdatasync covering the writes listed in the export's `sync_running`.
    GroupSync {
        export: usize,
    },
    Flush {
        export: usize,
        remaining: u8,
        failed: bool,
        reply: Option<FrameBuf>,
    },
    MapPage {
        export: usize,
        page: usize,
        version: u64,
    },
    MapHeader,
}

#[derive(Debug)]
struct Export {
    spec: ExportSpec,
    map: Option<ThinMap>,
    config: Vec<u8>,
    masks: Vec<Mac>,
    reserve: Vec<Mac>,
    stats: ExportStats,
    /// Pending ids of writes waiting for map pages.
    waiting: Vec<usize>,
    /// Data writes submitted and not completed.
    data_writes: usize,
    /// Writes whose data completed without O_DSYNC, for the next group fdatasync.
    sync_queue: Vec<usize>,
    /// Writes covered by the group fdatasync in flight (empty: none in flight).
    sync_running: Vec<usize>,
    log: RateLimiter,
}

/// Buffer bytes for frames of up to `max_sectors` sectors of data, with 64 bytes of slack.
fn frame_cap(max_sectors: u8) -> usize {
    ATA_DATA + usize::from(max_sectors.max(1)) * SECTOR + 64
}

/// The target engine for the exports on one interface.
#[derive(Debug)]
pub struct Engine {
    mac: Mac,
    max_sectors: u8,
    frame_cap: usize,
    exports: Vec<Export>,
    pending: Vec<Option<Pending>>,
    free_ids: Vec<usize>,
    pool: Vec<FrameBuf>,
    actions: VecDeque<Action>,
    ignored: u64,
}

impl Engine {
    /// An engine for interface address `mac` whose frames carry at most `max_sectors` sectors
    /// (see [`crate::wire::sectors_per_frame`]).
    pub fn new(mac: Mac, max_sectors: u8) -> Engine {
        Engine {
            mac,
            max_sectors: max_sectors.max(1),
            frame_cap: frame_cap(max_sectors),
            exports: Vec::new(),
            pending: Vec::new(),
            free_ids: Vec::new(),
            pool: Vec::new(),
            actions: VecDeque::new(),
            ignored: 0,
        }
    }

    /// Adds an export with an optional thin map; returns its index. The config string comes
    /// from the map when it holds one.
    pub fn add_export(&mut self, spec: ExportSpec, map: Option<ThinMap>) -> usize {
        let config = match &map {
            Some(m) if !m.config().is_empty() => m.config().to_vec(),
            _ => spec.config.clone(),
        };
        self.exports.push(Export {
            masks: spec.masks.clone(),
            spec,
            map,
            config,
            reserve: Vec::new(),
            stats: ExportStats::default(),
            waiting: Vec::new(),
            data_writes: 0,
            sync_queue: Vec::new(),
            sync_running: Vec::new(),
            log: RateLimiter::new(5, std::time::Duration::from_secs(10)),
        });
        self.exports.len() - 1
    }

    /// Sectors per frame now (the driver re-reads the MTU on Query Config).
    pub fn max_sectors(&self) -> u8 {
        self.max_sectors
    }

    /// Changes the sectors per frame after an MTU change: Query Config replies advertise the
    /// new count, ATA requests are checked against it, and new receive buffers are sized for it
    /// (buffers of the old size are dropped as they come back).
    pub fn set_max_sectors(&mut self, max_sectors: u8) {
        self.max_sectors = max_sectors.max(1);
        self.frame_cap = frame_cap(max_sectors);
        self.pool.clear();
    }

    /// Bytes a receive buffer needs: the largest frame this engine accepts or sends.
    pub fn frame_capacity(&self) -> usize {
        self.frame_cap
    }

    /// A buffer for receiving a frame (from the pool when possible).
    pub fn alloc(&mut self) -> FrameBuf {
        self.pool
            .pop()
            .unwrap_or_else(|| FrameBuf::frame(self.frame_cap))
    }

    /// Returns a buffer to the pool.
    pub fn recycle(&mut self, mut buf: FrameBuf) {
        if buf.capacity() == self.frame_cap && self.pool.len() < 4096 {
            buf.clear();
            self.pool.push(buf);
        }
    }

    /// The next action for the driver.
    pub fn next_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// True when actions wait for the driver.
    pub fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    /// Requests in flight over all exports.
    pub fn outstanding(&self) -> usize {
        self.pending.iter().filter(|p| p.is_some()).count()
    }

    /// Frames ignored (not AoE, not for us, responses, masked, malformed).
    pub fn ignored(&self) -> u64 {
        self.ignored
    }

    /// Sum of the exports' buffer counts: how many receive buffers the driver should post.
    pub fn total_bufcnt(&self) -> usize {
        self.exports
            .iter()
            .map(|e| usize::from(e.spec.bufcnt))
            .sum()
    }

    /// Status of every export.
    pub fn status(&self) -> Vec<ExportStatus> {
        self.exports
            .iter()
            .map(|e| ExportStatus {
                name: format!("e{}.{}", e.spec.shelf, e.spec.slot),
                shelf: e.spec.shelf,
                slot: e.spec.slot,
                bufcnt: e.spec.bufcnt,
                advertised_bytes: e.spec.sectors * SECTOR as u64,
                used_bytes: e
                    .map
                    .as_ref()
                    .map_or(e.spec.sectors * SECTOR as u64, ThinMap::used_bytes),
                thin_map: e.map.is_some(),
                writeback: e.spec.writeback,
                config: String::from_utf8_lossy(&e.config).into_owned(),
                stats: e.stats.clone(),
            })
            .collect()
    }

    /// The thin map of export `i`, if any.
    pub fn map(&self, i: usize) -> Option<&ThinMap> {
        self.exports.get(i).and_then(|e| e.map.as_ref())
    }

    /// Handles a received frame.
    pub fn on_frame(&mut self, buf: FrameBuf) {
        let Ok(h) = Header::parse(buf.as_slice()) else {
            self.ignored += 1;
            return self.recycle(buf);
        };
        if h.response {
            self.ignored += 1;
            return self.recycle(buf);
        }
        let targets: Vec<usize> = (0..self.exports.len())
            .filter(|&i| {
                let e = &self.exports[i];
                h.addresses(e.spec.shelf, e.spec.slot)
                    && (e.masks.is_empty() || e.masks.contains(&h.src))
            })
            .collect();
        let Some((&last, rest)) = targets.split_last() else {
            self.ignored += 1;
            return self.recycle(buf);
        };
        for &i in rest {
            let mut copy = self.alloc();
            copy.fill_from(buf.as_slice());
            self.dispatch(i, &h, copy);
        }
        self.dispatch(last, &h, buf);
    }

    fn dispatch(&mut self, e: usize, h: &Header, buf: FrameBuf) {
        if h.version != AOE_VERSION {
            return self.reply_error(e, h, buf, AoeError::BadVersion);
        }
        match h.command {
            Command::Ata => self.ata(e, h, buf),
            Command::Config => self.config(e, h, buf),
            Command::Mask => self.mask(e, h, buf),
            Command::Reserve => self.reserve(e, h, buf),
            Command::Other(_) => self.reply_error(e, h, buf, AoeError::BadCommand),
        }
    }

    fn reply_header(&self, e: usize, h: &Header) -> Header {
        let s = &self.exports[e].spec;
        h.reply(self.mac, s.shelf, s.slot)
    }

    /// Sends `buf` with the reply header (error flag as given) and `len` bytes, padded.
    fn send(&mut self, mut buf: FrameBuf, hdr: Header, len: usize) {
        let len = padded_len(len).min(buf.capacity());
        let full = buf.full_mut();
        if hdr.write(full).is_err() {
            return self.recycle(buf);
        }
        buf.set_len(len);
        self.actions.push_back(Action::Send(buf));
    }

    fn reply_error(&mut self, e: usize, h: &Header, mut buf: FrameBuf, err: AoeError) {
        self.exports[e].stats.aoe_errors += 1;
        let hdr = self.reply_header(e, h).with_error(err);
        let len = buf.len().min(crate::wire::MIN_FRAME_LEN);
        zero_from(&mut buf, len);
        self.send(buf, hdr, len);
    }

    fn new_id(&mut self, p: Pending) -> usize {
        if let Some(id) = self.free_ids.pop() {
            self.pending[id] = Some(p);
            id
        } else {
            self.pending.push(Some(p));
            self.pending.len() - 1
        }
    }

    fn take_pending(&mut self, id: usize) -> Option<Pending> {
        let p = self.pending.get_mut(id)?.take()?;
        self.free_ids.push(id);
        Some(p)
    }

    fn ata(&mut self, e: usize, h: &Header, buf: FrameBuf) {
        let Ok(arg) = AtaArg::parse(buf.as_slice()) else {
            self.ignored += 1;
            return self.recycle(buf);
        };
        let (cmd, count, lba, is_write_flag) = (
            arg.cmd_status(),
            arg.sector_count(),
            arg.lba(),
            arg.is_write(),
        );
        let data_len = arg.data().len();
        let ex = &self.exports[e];
        if cmd != ata_cmd::IDENTIFY && !ex.reserve.is_empty() && !ex.reserve.contains(&h.src) {
            return self.reply_error(e, h, buf, AoeError::Reserved);
        }
        match cmd {
            ata_cmd::READ | ata_cmd::READ_EXT | ata_cmd::WRITE | ata_cmd::WRITE_EXT => {
                let write = matches!(cmd, ata_cmd::WRITE | ata_cmd::WRITE_EXT);
                let len = usize::from(count) * SECTOR;
                if count > self.max_sectors || (write && (!is_write_flag || data_len < len)) {
                    return self.reply_error(e, h, buf, AoeError::BadArgument);
                }
                if lba
                    .checked_add(u64::from(count))
                    .is_none_or(|end| end > ex.spec.sectors)
                {
                    return self.ata_reply(e, h, buf, AtaReply::failed(ATA_ERR_IDNF, count), 0);
                }
                if write && ex.spec.read_only {
                    return self.ata_reply(e, h, buf, AtaReply::failed(ATA_ERR_ABRT, count), 0);
                }
                if usize::try_from(ex.stats.outstanding).unwrap_or(usize::MAX)
                    >= usize::from(ex.spec.bufcnt)
                {
                    self.exports[e].stats.dropped_over_bufcnt += 1;
                    return self.recycle(buf);
                }
                if write {
                    self.start_write(e, buf, lba * SECTOR as u64, len);
                } else {
                    self.start_read(e, h, buf, lba * SECTOR as u64, len);
                }
            }
            ata_cmd::IDENTIFY => {
                let page = identify_page(
                    ex.spec.sectors,
                    &ex.spec.serial,
                    env!("CARGO_PKG_VERSION"),
                    "aoe-target io_uring",
                );
                let mut buf = buf;
                buf.data_mut(IDENTIFY_LEN).copy_from_slice(&page);
                self.exports[e].stats.other_commands += 1;
                self.ata_reply(e, h, buf, AtaReply::OK, IDENTIFY_LEN);
            }
            ata_cmd::CHECK_POWER => {
                self.exports[e].stats.other_commands += 1;
                let r = AtaReply {
                    error: 0,
                    sector_count: 0xFF,
                    status: ATA_STATUS_DRDY,
                };
                self.ata_reply(e, h, buf, r, 0);
            }
            ata_cmd::FLUSH | ata_cmd::FLUSH_EXT => self.start_flush(e, buf),
            _ => self.ata_reply(e, h, buf, AtaReply::failed(ATA_ERR_ABRT, count), 0),
        }
    }

    /// Sends an ATA reply with `data_len` bytes of data already in the buffer.
    fn ata_reply(&mut self, e: usize, h: &Header, mut buf: FrameBuf, r: AtaReply, data_len: usize) {
        if r.status & crate::wire::ATA_STATUS_ERR != 0 {
            self.exports[e].stats.ata_errors += 1;
        }
        let hdr = self.reply_header(e, h);
        if r.write(buf.full_mut()).is_err() {
            return self.recycle(buf);
        }
        zero_from(&mut buf, ATA_DATA + data_len);
        self.send(buf, hdr, ATA_DATA + data_len);
    }

    fn start_read(&mut self, e: usize, h: &Header, mut buf: FrameBuf, offset: u64, len: usize) {
        let ex = &mut self.exports[e];
        let unwritten = ex
            .map
            .as_ref()
            .is_some_and(|m| m.all_unwritten(m.blocks_of(offset, len as u64)));
        if unwritten || len == 0 {
            // Thin: never-written blocks read as zeros without touching the backing store.
            buf.data_mut(len).fill(0);
            ex.stats.reads += 1;
            ex.stats.read_bytes += len as u64;
            return self.ata_reply(e, h, buf, AtaReply::OK, len);
        }
        ex.stats.outstanding += 1;
        let id = self.new_id(Pending::Read { export: e, len });
        self.actions.push_back(Action::Io(IoRequest {
            id,
            export: e,
            target: IoTarget::Data,
            op: IoOp::Read { offset, len },
            buf,
        }));
    }

    fn start_write(&mut self, e: usize, buf: FrameBuf, offset: u64, len: usize) {
        let ex = &mut self.exports[e];
        ex.stats.outstanding += 1;
        let (needs, first) = match ex.map.as_mut() {
            Some(m) => {
                let blocks = m.blocks_of(offset, len as u64);
                let first = m.any_unwritten(blocks.clone());
                let gen = m.next_generation();
                (m.mark(blocks, gen), first)
            }
            None => (Vec::new(), false),
        };
        let deferred_until_map = first && !needs.is_empty();
        let id = self.new_id(Pending::Write {
            export: e,
            len,
            offset,
            needs: needs.clone(),
            deferred: None,
            data_done: false,
            awaiting_sync: false,
            dsync: false,
            failed: None,
            reply: None,
        });
        if !needs.is_empty() {
            self.exports[e].waiting.push(id);
            for (page, _) in &needs {
                self.write_map_page(e, *page);
            }
        }
        if deferred_until_map && !self.map_durable(e, &needs) {
            if let Some(Some(Pending::Write { deferred, .. })) = self.pending.get_mut(id) {
                *deferred = Some(buf);
            }
        } else {
            self.submit_data_write(e, id, buf, offset, len);
        }
    }

    /// Submits a data write. Durable mode: a lone write goes out with O_DSYNC (one round
    /// trip); a write that joins others in flight goes out plain and is made durable by one
    /// fdatasync shared by every write that completed meanwhile (group commit), so a queue of
    /// writes costs one cache flush instead of one each.
    fn submit_data_write(&mut self, e: usize, id: usize, buf: FrameBuf, offset: u64, len: usize) {
        let ex = &mut self.exports[e];
        let durable = !ex.spec.writeback && ex.data_writes == 0 && ex.sync_queue.is_empty();
        ex.data_writes += 1;
        if let Some(Some(Pending::Write { dsync, .. })) = self.pending.get_mut(id) {
            *dsync = durable;
        }
        self.actions.push_back(Action::Io(IoRequest {
            id,
            export: e,
            target: IoTarget::Data,
            op: IoOp::Write {
                offset,
                len,
                durable,
            },
            buf,
        }));
    }

    /// Records that data write `id`, queued without O_DSYNC, is being written with it after
    /// all (the driver merged it with an adjacent write that needs O_DSYNC into one durable
    /// write): its completion then needs no group fdatasync.
    pub fn write_goes_dsync(&mut self, id: usize) {
        if let Some(Some(Pending::Write { dsync, .. })) = self.pending.get_mut(id) {
            *dsync = true;
        }
    }

    fn map_durable(&self, e: usize, needs: &[(usize, u64)]) -> bool {
        self.exports[e]
            .map
            .as_ref()
            .is_none_or(|m| needs.iter().all(|(p, v)| m.is_durable(*p, *v)))
    }

    fn write_map_page(&mut self, e: usize, page: usize) {
        let durable = !self.exports[e].spec.writeback;
        let Some(m) = self.exports[e].map.as_mut() else {
            return;
        };
        let Some((offset, version, bytes)) = m.take_page_write(page) else {
            return;
        };
        let mut buf = FrameBuf::page(MAP_PAGE);
        buf.data_mut(MAP_PAGE).copy_from_slice(&bytes);
        let id = self.new_id(Pending::MapPage {
            export: e,
            page,
            version,
        });
        self.actions.push_back(Action::Io(IoRequest {
            id,
            export: e,
            target: IoTarget::Map,
            op: IoOp::Write {
                offset,
                len: MAP_PAGE,
                durable,
            },
            buf,
        }));
    }

    fn start_flush(&mut self, e: usize, buf: FrameBuf) {
        let has_map = self.exports[e].map.is_some();
        self.exports[e].stats.outstanding += 1;
        let id = self.new_id(Pending::Flush {
            export: e,
            remaining: if has_map { 2 } else { 1 },
            failed: false,
            reply: Some(buf),
        });
        let targets: &[IoTarget] = if has_map {
            &[IoTarget::Data, IoTarget::Map]
        } else {
            &[IoTarget::Data]
        };
        for &target in targets {
            self.actions.push_back(Action::Io(IoRequest {
                id,
                export: e,
                target,
                op: IoOp::Sync,
                buf: FrameBuf::empty(),
            }));
        }
    }

    /// Handles the completion of I/O `id`: `res` is the byte count or the error.
    pub fn on_io_done(&mut self, id: usize, res: std::io::Result<usize>, buf: FrameBuf) {
        match self.pending.get_mut(id) {
            Some(Some(Pending::Write {
                export,
                len,
                data_done,
                awaiting_sync,
                dsync,
                failed,
                reply,
                ..
            })) => {
                // The write completes once the map pages it needs are durable too.
                *data_done = true;
                if failed.is_none() {
                    *failed = match &res {
                        Ok(n) if *n == *len => None,
                        Ok(_) => Some(std::io::ErrorKind::WriteZero),
                        Err(err) => Some(err.kind()),
                    };
                }
                *reply = Some(buf);
                let e = *export;
                let ex = &mut self.exports[e];
                ex.data_writes -= 1;
                if failed.is_none() && !*dsync && !ex.spec.writeback {
                    *awaiting_sync = true;
                    ex.sync_queue.push(id);
                    self.start_group_sync(e);
                }
                return self.try_finish_write(id);
            }
            Some(Some(Pending::Flush {
                remaining, failed, ..
            })) if *remaining > 1 => {
                *remaining -= 1;
                *failed |= res.is_err();
                return;
            }
            _ => {}
        }
        match self.take_pending(id) {
            Some(Pending::Read { export, len }) => self.read_done(export, len, res, buf),
            Some(Pending::Flush {
                export,
                failed,
                reply,
                ..
            }) => {
                let failed = failed || res.is_err();
                self.exports[export].stats.outstanding -= 1;
                self.exports[export].stats.flushes += 1;
                if let Some(r) = reply {
                    self.finish_ata(export, r, failed, 0, ATA_ERR_ABRT);
                }
            }
            Some(Pending::MapPage {
                export,
                page,
                version,
            }) => {
                let ok = matches!(res, Ok(n) if n == MAP_PAGE);
                if let Some(m) = self.exports[export].map.as_mut() {
                    m.page_written(page, version, ok);
                }
                if !ok {
                    self.io_error(export, "thin map write", &res);
                    self.fail_waiting_on(export, page);
                }
                // Newer changes to the page may have arrived meanwhile.
                self.write_map_page(export, page);
                for wid in self.exports[export].waiting.clone() {
                    self.try_finish_write(wid);
                }
            }
            Some(Pending::GroupSync { export }) => {
                let covered = std::mem::take(&mut self.exports[export].sync_running);
                let failed = res.as_ref().err().map(std::io::Error::kind);
                if let Err(err) = &res {
                    self.io_error(export, "fdatasync", &Err(std::io::Error::from(err.kind())));
                }
                for wid in covered {
                    if let Some(Some(Pending::Write {
                        awaiting_sync,
                        failed: f,
                        ..
                    })) = self.pending.get_mut(wid)
                    {
                        *awaiting_sync = false;
                        if f.is_none() {
                            *f = failed;
                        }
                    }
                    self.try_finish_write(wid);
                }
                self.start_group_sync(export);
            }
            Some(Pending::MapHeader) => {
                if let Err(err) = res {
                    log::warn!("thin map header write failed: {err}");
                }
            }
            Some(Pending::Write { .. }) | None => self.recycle(buf),
        }
    }

    /// Issues an fdatasync for the queued writes unless one is in flight (its completion
    /// starts the next).
    fn start_group_sync(&mut self, e: usize) {
        let ex = &mut self.exports[e];
        if !ex.sync_running.is_empty() || ex.sync_queue.is_empty() {
            return;
        }
        ex.sync_running = std::mem::take(&mut ex.sync_queue);
        let id = self.new_id(Pending::GroupSync { export: e });
        self.actions.push_back(Action::Io(IoRequest {
            id,
            export: e,
            target: IoTarget::Data,
            op: IoOp::Sync,
            buf: FrameBuf::empty(),
        }));
    }

    fn read_done(&mut self, e: usize, len: usize, res: std::io::Result<usize>, mut buf: FrameBuf) {
        self.exports[e].stats.outstanding -= 1;
        match res {
            Ok(n) => {
                // A short read can only be past the end of a file shorter than advertised:
                // that part reads as zeros.
                if n < len {
                    buf.data_mut(len)[n..].fill(0);
                }
                self.exports[e].stats.reads += 1;
                self.exports[e].stats.read_bytes += len as u64;
                self.finish_ata(e, buf, false, len, 0);
            }
            Err(err) => {
                self.io_error(e, "read", &Err(err));
                self.finish_ata(e, buf, true, 0, ATA_ERR_UNC);
            }
        }
    }

    fn fail_waiting_on(&mut self, e: usize, page: usize) {
        for wid in self.exports[e].waiting.clone() {
            if let Some(Some(Pending::Write { needs, failed, .. })) = self.pending.get_mut(wid) {
                if needs.iter().any(|(p, _)| *p == page) {
                    *failed = Some(std::io::ErrorKind::Other);
                    needs.clear();
                }
            }
        }
    }

    fn try_finish_write(&mut self, id: usize) {
        let (e, ready_data, done) = match self.pending.get(id) {
            Some(Some(Pending::Write {
                export,
                needs,
                deferred,
                data_done,
                awaiting_sync,
                ..
            })) => {
                let durable = self.map_durable(*export, needs);
                (
                    *export,
                    deferred.is_some() && durable,
                    *data_done && durable && !*awaiting_sync,
                )
            }
            _ => return,
        };
        if ready_data {
            if let Some(Some(Pending::Write {
                deferred,
                offset,
                len,
                failed,
                ..
            })) = self.pending.get_mut(id)
            {
                let (offset, len, failed) = (*offset, *len, *failed);
                if let Some(buf) = deferred.take() {
                    if failed.is_some() {
                        // The map write failed: do not write the data.
                        self.pending[id] = None;
                        self.free_ids.push(id);
                        self.exports[e].waiting.retain(|&w| w != id);
                        self.exports[e].stats.outstanding -= 1;
                        return self.finish_ata(e, buf, true, 0, ATA_ERR_ABRT);
                    }
                    self.submit_data_write(e, id, buf, offset, len);
                }
            }
            return;
        }
        if !done {
            return;
        }
        let Some(Pending::Write {
            export,
            len,
            failed,
            reply,
            ..
        }) = self.take_pending(id)
        else {
            return;
        };
        let ex = &mut self.exports[export];
        ex.waiting.retain(|&w| w != id);
        ex.stats.outstanding -= 1;
        let Some(buf) = reply else { return };
        match failed {
            None => {
                ex.stats.writes += 1;
                ex.stats.written_bytes += len as u64;
                ex.stats.out_of_space = false;
                self.finish_ata(export, buf, false, 0, 0);
            }
            Some(kind) => {
                if kind == std::io::ErrorKind::StorageFull
                    || kind == std::io::ErrorKind::QuotaExceeded
                {
                    ex.stats.no_space_errors += 1;
                    if !ex.stats.out_of_space {
                        log::error!(
                            "e{}.{}: backing store out of space: writes fail with ATA ABRT, reads go on",
                            ex.spec.shelf,
                            ex.spec.slot
                        );
                    }
                    ex.stats.out_of_space = true;
                } else {
                    self.io_error(export, "write", &Err(std::io::Error::from(kind)));
                }
                self.finish_ata(export, buf, true, 0, ATA_ERR_ABRT);
            }
        }
    }

    fn io_error(&mut self, e: usize, what: &str, res: &std::io::Result<usize>) {
        let ex = &mut self.exports[e];
        ex.stats.io_errors += 1;
        if let Some(suppressed) = ex.log.allow(Instant::now()) {
            log::warn!(
                "e{}.{}: {what} failed: {res:?} ({suppressed} similar messages suppressed)",
                ex.spec.shelf,
                ex.spec.slot
            );
        }
    }

    /// Completes an ATA command whose request frame is still in `buf`.
    fn finish_ata(&mut self, e: usize, buf: FrameBuf, failed: bool, data_len: usize, err: u8) {
        let Ok(h) = Header::parse(buf.as_slice()) else {
            return self.recycle(buf);
        };
        let count = AtaArg::parse(buf.as_slice()).map_or(0, |a| a.sector_count());
        let r = if failed {
            AtaReply::failed(err, count)
        } else {
            AtaReply::OK
        };
        self.ata_reply(e, &h, buf, r, data_len);
    }

    fn config(&mut self, e: usize, h: &Header, buf: FrameBuf) {
        let frame = buf.as_slice();
        if frame.len() < CONFIG_STRING {
            self.ignored += 1;
            return self.recycle(buf);
        }
        let ccmd = ConfigCmd::from(frame[CONFIG_STRING - 3]);
        let arg_string: Vec<u8> = match ConfigArg::parse(frame) {
            Ok(c) => c.string.to_vec(),
            // A read ignores the string; anything else with a bad length gets no reply.
            Err(_) if ccmd == ConfigCmd::Read => Vec::new(),
            Err(_) => {
                self.ignored += 1;
                return self.recycle(buf);
            }
        };
        let ex = &mut self.exports[e];
        let mut error = None;
        let mut changed = false;
        match ccmd {
            ConfigCmd::Read => {}
            ConfigCmd::Test if arg_string != ex.config => return self.recycle(buf),
            ConfigCmd::TestPrefix if !ex.config.starts_with(&arg_string) => {
                return self.recycle(buf)
            }
            ConfigCmd::Test | ConfigCmd::TestPrefix => {}
            ConfigCmd::Set if !ex.config.is_empty() && ex.config != arg_string => {
                error = Some(AoeError::ConfigPresent);
            }
            ConfigCmd::Set | ConfigCmd::ForceSet => {
                changed = ex.config != arg_string;
                ex.config = arg_string;
            }
            ConfigCmd::Other(_) => error = Some(AoeError::BadArgument),
        }
        ex.stats.other_commands += 1;
        if changed {
            self.persist_config(e);
        }
        let mut hdr = self.reply_header(e, h);
        if let Some(err) = error {
            hdr = hdr.with_error(err);
            self.exports[e].stats.aoe_errors += 1;
        }
        let ex = &self.exports[e];
        let reply = ConfigArg {
            buffer_count: ex.spec.bufcnt,
            firmware: FIRMWARE_VERSION,
            sector_count: self.max_sectors,
            version: AOE_VERSION,
            ccmd,
            string: &ex.config,
        };
        let mut buf = buf;
        match reply.write(buf.full_mut()) {
            Ok(len) => {
                zero_from(&mut buf, len);
                self.send(buf, hdr, len);
            }
            Err(_) => self.recycle(buf),
        }
    }

    fn persist_config(&mut self, e: usize) {
        let ex = &mut self.exports[e];
        let Some(m) = ex.map.as_mut() else { return };
        m.set_config(&ex.config);
        let header = m.header_bytes();
        let durable = !ex.spec.writeback;
        let mut buf = FrameBuf::page(MAP_PAGE);
        buf.data_mut(MAP_PAGE).copy_from_slice(&header);
        let id = self.new_id(Pending::MapHeader);
        self.actions.push_back(Action::Io(IoRequest {
            id,
            export: e,
            target: IoTarget::Map,
            op: IoOp::Write {
                offset: 0,
                len: MAP_PAGE,
                durable,
            },
            buf,
        }));
    }

    fn mask(&mut self, e: usize, h: &Header, mut buf: FrameBuf) {
        let frame = buf.as_slice();
        if frame.len() < crate::wire::ARG + crate::wire::MASK_ARG_LEN {
            self.ignored += 1;
            return self.recycle(buf);
        }
        let Ok(arg) = MaskArg::parse(frame) else {
            return self.reply_error(e, h, buf, AoeError::BadArgument);
        };
        let mcmd = arg.mcmd();
        let directives: Vec<MaskDirective> = arg.directives().collect();
        let ex = &mut self.exports[e];
        ex.stats.other_commands += 1;
        let mut merror = 0u8;
        let mut failed_at = None;
        match mcmd {
            MaskCmd::Read => {}
            MaskCmd::Edit => {
                for (i, d) in directives.iter().enumerate() {
                    match d.dcmd {
                        MaskDirective::NONE => {}
                        MaskDirective::ADD if ex.masks.contains(&d.mac) => {}
                        MaskDirective::ADD if ex.masks.len() >= MAX_MASKS => {
                            merror = MaskError::ListFull as u8;
                            failed_at = Some(i);
                            break;
                        }
                        MaskDirective::ADD => ex.masks.push(d.mac),
                        MaskDirective::DELETE => ex.masks.retain(|m| *m != d.mac),
                        _ => {
                            merror = MaskError::BadDirective as u8;
                            failed_at = Some(i);
                            break;
                        }
                    }
                }
            }
            MaskCmd::Other(_) => return self.reply_error(e, h, buf, AoeError::BadArgument),
        }
        // On a failed directive the reply carries the error and, in DirCount, how many
        // directives were applied (as vblade); otherwise the current list.
        let list: Vec<MaskDirective> = match failed_at {
            Some(_) => Vec::new(),
            None => ex
                .masks
                .iter()
                .map(|&mac| MaskDirective {
                    dcmd: MaskDirective::NONE,
                    mac,
                })
                .collect(),
        };
        let hdr = self.reply_header(e, h);
        match MaskArg::write(buf.full_mut(), mcmd, merror, &list) {
            Ok(mut len) => {
                if let Some(i) = failed_at {
                    buf.full_mut()[crate::wire::ARG + 3] = u8::try_from(i).unwrap_or(u8::MAX);
                    len = crate::wire::ARG + crate::wire::MASK_ARG_LEN;
                }
                debug_assert!(len <= crate::wire::ARG + 4 + MAX_MASKS * DIRECTIVE_LEN);
                zero_from(&mut buf, len);
                self.send(buf, hdr, len);
            }
            Err(_) => self.recycle(buf),
        }
    }

    fn reserve(&mut self, e: usize, h: &Header, mut buf: FrameBuf) {
        let Ok(arg) = ReserveArg::parse(buf.as_slice()) else {
            self.ignored += 1;
            return self.recycle(buf);
        };
        let rcmd = arg.rcmd();
        let macs = arg.macs();
        let ex = &mut self.exports[e];
        ex.stats.other_commands += 1;
        let mut error = None;
        match rcmd {
            ReserveCmd::Read => {}
            ReserveCmd::Set if !ex.reserve.is_empty() && !ex.reserve.contains(&h.src) => {
                error = Some(AoeError::Reserved);
            }
            ReserveCmd::Set | ReserveCmd::ForceSet => match macs {
                Ok(m) => ex.reserve = m,
                Err(_) => error = Some(AoeError::BadArgument),
            },
            ReserveCmd::Other(_) => error = Some(AoeError::BadArgument),
        }
        let list = ex.reserve.clone();
        let mut hdr = self.reply_header(e, h);
        if let Some(err) = error {
            hdr = hdr.with_error(err);
            self.exports[e].stats.aoe_errors += 1;
        }
        match ReserveArg::write(buf.full_mut(), rcmd, &list) {
            Ok(len) => {
                zero_from(&mut buf, len);
                self.send(buf, hdr, len);
            }
            Err(_) => self.recycle(buf),
        }
    }

    /// The current MAC mask list of export `e` (for tests and status).
    pub fn masks(&self, e: usize) -> &[Mac] {
        &self.exports[e].masks
    }
}

/// Zeroes the buffer from `from` up to the minimum frame length, so padding carries no stale
/// bytes of the request.
fn zero_from(buf: &mut FrameBuf, from: usize) {
    let to = crate::wire::MIN_FRAME_LEN.min(buf.capacity());
    if from < to {
        buf.full_mut()[from..to].fill(0);
    }
}

/// Runs an engine's I/O against memory: for unit tests, conformance tests and fuzzing.
#[derive(Debug, Default)]
pub struct MemBackend {
    /// Data of each export.
    pub data: Vec<Vec<u8>>,
    /// Map file of each export.
    pub map: Vec<Vec<u8>>,
    /// Frames the engine sent.
    pub sent: Vec<Vec<u8>>,
    /// Byte capacity of each export's data: writes ending beyond it fail with "no space".
    pub capacity: Vec<Option<usize>>,
    /// Hold I/O instead of completing it (to test ordering); see [`MemBackend::release`].
    pub hold: bool,
    held: Vec<IoRequest>,
}

impl MemBackend {
    /// Runs every queued action of `engine` until none is left (held I/O excepted).
    pub fn run(&mut self, engine: &mut Engine) {
        while let Some(a) = engine.next_action() {
            match a {
                Action::Send(buf) => {
                    self.sent.push(buf.as_slice().to_vec());
                    engine.recycle(buf);
                }
                Action::Io(req) if self.hold => self.held.push(req),
                Action::Io(req) => self.execute(engine, req),
            }
        }
    }

    /// I/O held so far.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The operations held so far, in submission order.
    pub fn held_ops(&self) -> Vec<(IoTarget, IoOp)> {
        self.held.iter().map(|r| (r.target, r.op)).collect()
    }

    /// Completes held I/O number `i` (in submission order) and runs what follows.
    pub fn release(&mut self, engine: &mut Engine, i: usize) {
        if i < self.held.len() {
            let req = self.held.remove(i);
            self.execute(engine, req);
            self.run(engine);
        }
    }

    fn file(&mut self, target: IoTarget, e: usize) -> &mut Vec<u8> {
        let files = match target {
            IoTarget::Data => &mut self.data,
            IoTarget::Map => &mut self.map,
        };
        if files.len() <= e {
            files.resize(e + 1, Vec::new());
        }
        &mut files[e]
    }

    fn execute(&mut self, engine: &mut Engine, mut req: IoRequest) {
        let cap = self.capacity.get(req.export).copied().flatten();
        let res = match req.op {
            IoOp::Read { offset, len } => {
                let f = self.file(req.target, req.export);
                let out = req.buf.data_mut(len);
                let start = usize::try_from(offset).unwrap_or(usize::MAX).min(f.len());
                let n = (f.len() - start).min(out.len());
                out[..n].copy_from_slice(&f[start..start + n]);
                Ok(n)
            }
            IoOp::Write { offset, len, .. } => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                if req.target == IoTarget::Data && cap.is_some_and(|c| start + len > c) {
                    Err(std::io::Error::from(std::io::ErrorKind::StorageFull))
                } else {
                    let data = req.buf.data(len).to_vec();
                    let f = self.file(req.target, req.export);
                    if f.len() < start + len {
                        f.resize(start + len, 0);
                    }
                    f[start..start + len].copy_from_slice(&data);
                    Ok(len)
                }
            }
            IoOp::Sync => Ok(0),
        };
        engine.on_io_done(req.id, res, req.buf);
    }
}
