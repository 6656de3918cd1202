//! Conformance of the target engine to AoE r11 as digested in aoe-anchors §1, one test per
//! command and error, driven in memory through `MemBackend`.

use aoe_target::wire::{
    ata_cmd, write_ata_request, AtaArg, Command, ConfigArg, ConfigCmd, Header, Mac, MaskArg,
    MaskCmd, MaskDirective, ReserveArg, ReserveCmd, AFLAG_EXTENDED, AFLAG_WRITE, ATA_DATA,
    BROADCAST_MAJOR, BROADCAST_MINOR,
};
use aoe_target::{Engine, ExportSpec, FrameBuf, IoOp, IoTarget, MemBackend, ThinMap};

const ME: Mac = Mac([0x02, 0, 0, 0, 0, 0x99]);
const HOST: Mac = Mac([0x02, 0, 0, 0, 0, 0x01]);
const OTHER: Mac = Mac([0x02, 0, 0, 0, 0, 0x02]);
const SECTORS: u64 = 4096;

struct Rig {
    engine: Engine,
    io: MemBackend,
}

fn spec() -> ExportSpec {
    ExportSpec {
        shelf: 7,
        slot: 1,
        sectors: SECTORS,
        bufcnt: 16,
        config: Vec::new(),
        masks: Vec::new(),
        serial: "7.1:test".into(),
        writeback: false,
        read_only: false,
    }
}

impl Rig {
    fn new(max_sectors: u8) -> Rig {
        Rig::with(max_sectors, spec(), None)
    }

    fn thin(block: u32) -> Rig {
        let map = ThinMap::new(SECTORS, block).unwrap();
        Rig::with(2, spec(), Some(map))
    }

    fn with(max_sectors: u8, spec: ExportSpec, map: Option<ThinMap>) -> Rig {
        let mut engine = Engine::new(ME, max_sectors);
        engine.add_export(spec, map);
        let mut io = MemBackend::default();
        io.data.push(vec![0u8; (SECTORS * 512) as usize]);
        io.map.push(vec![0u8; 1 << 20]);
        io.capacity.push(None);
        Rig { engine, io }
    }

    /// Sends `frame`, runs the engine, returns the replies.
    fn exchange(&mut self, frame: &[u8]) -> Vec<Vec<u8>> {
        let mut buf = FrameBuf::frame(self.engine.frame_capacity());
        buf.fill_from(frame);
        self.engine.on_frame(buf);
        self.io.run(&mut self.engine);
        std::mem::take(&mut self.io.sent)
    }

    fn one(&mut self, frame: &[u8]) -> Vec<u8> {
        let mut r = self.exchange(frame);
        assert_eq!(r.len(), 1, "expected exactly one reply");
        let f = r.pop().unwrap();
        assert!(f.len() >= 60, "reply of {} bytes is not padded", f.len());
        f
    }
}

fn header(src: Mac, major: u16, minor: u8, cmd: Command, tag: u32) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    Header::request(ME, src, major, minor, cmd, tag)
        .write(&mut f)
        .unwrap();
    f
}

fn ata(src: Mac, aflags: u8, cmd: u8, lba: u64, count: u8, data: &[u8]) -> Vec<u8> {
    let mut f = header(src, 7, 1, Command::Ata, 0x1234);
    write_ata_request(&mut f, aflags, cmd, lba, count).unwrap();
    f.truncate(ATA_DATA);
    f.extend_from_slice(data);
    if f.len() < 60 {
        f.resize(60, 0);
    }
    f
}

fn write_ext(src: Mac, lba: u64, data: &[u8]) -> Vec<u8> {
    let count = u8::try_from(data.len() / 512).unwrap();
    ata(
        src,
        AFLAG_EXTENDED | AFLAG_WRITE,
        ata_cmd::WRITE_EXT,
        lba,
        count,
        data,
    )
}

fn read_ext(src: Mac, lba: u64, count: u8) -> Vec<u8> {
    ata(src, AFLAG_EXTENDED, ata_cmd::READ_EXT, lba, count, &[])
}

fn config(src: Mac, ccmd: ConfigCmd, s: &[u8]) -> Vec<u8> {
    let mut f = header(src, 7, 1, Command::Config, 5);
    f.resize(32 + s.len().max(28), 0);
    let n = ConfigArg::request(ccmd, s).write(&mut f).unwrap();
    f.truncate(n.max(60));
    f
}

fn status(reply: &[u8]) -> (u8, u8, u8) {
    let a = AtaArg::parse(reply).unwrap();
    (a.cmd_status(), a.err_feature(), a.sector_count())
}

fn aoe_error(reply: &[u8]) -> Option<u8> {
    let h = Header::parse(reply).unwrap();
    h.error_flag.then_some(h.error)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn broadcast_discovery_gets_config_reply_with_own_address() {
    let mut rig = Rig::new(17);
    let f = header(HOST, BROADCAST_MAJOR, BROADCAST_MINOR, Command::Config, 0);
    let r = rig.one(&f);
    let h = Header::parse(&r).unwrap();
    assert!(h.response && !h.error_flag);
    assert_eq!((h.major, h.minor, h.tag, h.version), (7, 1, 0, 1));
    assert_eq!((h.dst, h.src), (HOST, ME));
    let c = ConfigArg::parse(&r).unwrap();
    assert_eq!(c.buffer_count, 16);
    assert_eq!(c.sector_count, 17);
    assert_eq!(c.version, 1);
    assert_eq!(c.ccmd, ConfigCmd::Read);
    assert!(c.string.is_empty());
    // Shelf broadcast with our slot, and slot broadcast with our shelf, both match.
    assert_eq!(
        rig.exchange(&header(HOST, BROADCAST_MAJOR, 1, Command::Config, 0))
            .len(),
        1
    );
    assert_eq!(
        rig.exchange(&header(HOST, 7, BROADCAST_MINOR, Command::Config, 0))
            .len(),
        1
    );
}

#[test]
fn frames_not_for_us_are_ignored() {
    let mut rig = Rig::new(2);
    assert!(rig
        .exchange(&header(HOST, 8, 1, Command::Config, 0))
        .is_empty());
    assert!(rig
        .exchange(&header(HOST, 7, 2, Command::Config, 0))
        .is_empty());
    let mut resp = header(HOST, 7, 1, Command::Config, 0);
    resp[14] |= 0x08;
    assert!(rig.exchange(&resp).is_empty(), "responses are ignored");
    let mut ip = header(HOST, 7, 1, Command::Config, 0);
    ip[12] = 0x08;
    ip[13] = 0x00;
    assert!(rig.exchange(&ip).is_empty());
    assert!(rig.exchange(&[0u8; 10]).is_empty());
    assert_eq!(rig.engine.ignored(), 5);
}

#[test]
fn unknown_command_is_error_1_and_bad_version_error_5() {
    let mut rig = Rig::new(2);
    let r = rig.one(&header(HOST, 7, 1, Command::Other(7), 9));
    assert_eq!(aoe_error(&r), Some(1));
    assert_eq!(Header::parse(&r).unwrap().tag, 9);
    let mut v2 = header(HOST, 7, 1, Command::Config, 0);
    v2[14] = 0x20;
    assert_eq!(aoe_error(&rig.one(&v2)), Some(5));
}

#[test]
fn config_string_commands() {
    let mut rig = Rig::new(2);
    // set on empty succeeds and returns the string
    let r = rig.one(&config(HOST, ConfigCmd::Set, b"hello-aoe"));
    assert_eq!(aoe_error(&r), None);
    assert_eq!(ConfigArg::parse(&r).unwrap().string, b"hello-aoe");
    // identical set is accepted (as vblade)
    assert_eq!(
        aoe_error(&rig.one(&config(HOST, ConfigCmd::Set, b"hello-aoe"))),
        None
    );
    // different set: error 4 with the current string
    let r = rig.one(&config(HOST, ConfigCmd::Set, b"xyz"));
    assert_eq!(aoe_error(&r), Some(4));
    assert_eq!(ConfigArg::parse(&r).unwrap().string, b"hello-aoe");
    // test: exact match answers, miss is silent
    assert_eq!(
        rig.exchange(&config(HOST, ConfigCmd::Test, b"hello-aoe"))
            .len(),
        1
    );
    assert!(rig
        .exchange(&config(HOST, ConfigCmd::Test, b"hello"))
        .is_empty());
    // prefix
    assert_eq!(
        rig.exchange(&config(HOST, ConfigCmd::TestPrefix, b"hello"))
            .len(),
        1
    );
    assert!(rig
        .exchange(&config(HOST, ConfigCmd::TestPrefix, b"help"))
        .is_empty());
    // force set
    let r = rig.one(&config(HOST, ConfigCmd::ForceSet, b"xyz"));
    assert_eq!(ConfigArg::parse(&r).unwrap().string, b"xyz");
    assert_eq!(ConfigArg::parse(&r).unwrap().ccmd, ConfigCmd::ForceSet);
    // undefined ccmd: error 2
    assert_eq!(
        aoe_error(&rig.one(&config(HOST, ConfigCmd::Other(9), b""))),
        Some(2)
    );
    // a string longer than the frame gets no reply
    let mut bad = config(HOST, ConfigCmd::ForceSet, b"abc");
    bad[30] = 0x03;
    assert!(rig.exchange(&bad).is_empty());
}

#[test]
fn identify_reports_lba48_size() {
    let mut rig = Rig::new(2);
    let r = rig.one(&ata(HOST, 0, ata_cmd::IDENTIFY, 0, 1, &[]));
    assert_eq!(r.len(), ATA_DATA + 512);
    assert_eq!(status(&r), (0x40, 0, 0));
    let w = |n: usize| u16::from_le_bytes([r[ATA_DATA + 2 * n], r[ATA_DATA + 2 * n + 1]]);
    assert_eq!(w(83) & 0x0400, 0x0400);
    assert_eq!(w(86) & 0x3400, 0x3400);
    assert_eq!(u64::from(w(100)) | (u64::from(w(101)) << 16), SECTORS);
    assert_eq!(u32::from(w(60)) | (u32::from(w(61)) << 16), SECTORS as u32);
}

#[test]
fn write_then_read_back_ext_and_28_bit() {
    let mut rig = Rig::new(17);
    let data = pattern(1, 17 * 512);
    let r = rig.one(&write_ext(HOST, 100, &data));
    assert_eq!(status(&r), (0x40, 0, 0));
    assert_eq!(r.len(), 60);
    let r = rig.one(&read_ext(HOST, 100, 17));
    assert_eq!(status(&r), (0x40, 0, 0));
    assert_eq!(&r[ATA_DATA..], &data[..]);
    // 28-bit READ with 0xE0 in LBA3, as Linux sends it.
    let mut f = ata(HOST, 0, ata_cmd::READ, 101, 1, &[]);
    f[31] |= 0xE0;
    let r = rig.one(&f);
    assert_eq!(&r[ATA_DATA..ATA_DATA + 512], &data[512..1024]);
    // 28-bit WRITE
    let d2 = pattern(9, 512);
    let r = rig.one(&ata(HOST, AFLAG_WRITE, ata_cmd::WRITE, 5, 1, &d2));
    assert_eq!(status(&r).0, 0x40);
    assert_eq!(&rig.io.data[0][5 * 512..6 * 512], &d2[..]);
    let st = &rig.engine.status()[0];
    assert_eq!((st.stats.writes, st.stats.reads), (2, 2));
    assert_eq!(st.stats.written_bytes, 18 * 512);
    assert_eq!(st.stats.outstanding, 0);
}

#[test]
fn too_many_sectors_is_error_2() {
    let mut rig = Rig::new(2);
    assert_eq!(aoe_error(&rig.one(&read_ext(HOST, 0, 3))), Some(2));
    // write whose payload is shorter than the sector count
    let mut f = write_ext(HOST, 0, &pattern(0, 1024));
    f.truncate(ATA_DATA + 512);
    assert_eq!(aoe_error(&rig.one(&f)), Some(2));
}

#[test]
fn sectors_per_frame_follow_an_mtu_change() {
    let mut rig = Rig::new(2);
    assert_eq!(aoe_error(&rig.one(&read_ext(HOST, 0, 17))), Some(2));
    // The driver saw the MTU go to 9000 (on a Query Config): replies advertise 17 sectors
    // and 17-sector frames are served; receive buffers grow to hold them.
    rig.engine.set_max_sectors(17);
    assert_eq!(rig.engine.max_sectors(), 17);
    assert!(rig.engine.frame_capacity() >= ATA_DATA + 17 * 512);
    let c = rig.one(&config(HOST, ConfigCmd::Read, b""));
    assert_eq!(ConfigArg::parse(&c).unwrap().sector_count, 17);
    let data = pattern(3, 17 * 512);
    assert_eq!(status(&rig.one(&write_ext(HOST, 3, &data))).0 & 0x01, 0);
    let r = rig.one(&read_ext(HOST, 3, 17));
    assert_eq!(&r[ATA_DATA..ATA_DATA + data.len()], &data[..]);
    // And back down to 1500: 17 sectors are error 2 again.
    rig.engine.set_max_sectors(2);
    assert_eq!(aoe_error(&rig.one(&read_ext(HOST, 0, 17))), Some(2));
}

#[test]
fn out_of_range_is_idnf_and_last_sector_works() {
    let mut rig = Rig::new(2);
    let last = SECTORS - 1;
    let d = pattern(3, 512);
    assert_eq!(status(&rig.one(&write_ext(HOST, last, &d))), (0x40, 0, 0));
    let r = rig.one(&read_ext(HOST, last, 1));
    assert_eq!(&r[ATA_DATA..ATA_DATA + 512], &d[..]);
    assert_eq!(status(&rig.one(&read_ext(HOST, last, 2))), (0x41, 0x10, 2));
    assert_eq!(
        status(&rig.one(&read_ext(HOST, SECTORS, 1))),
        (0x41, 0x10, 1)
    );
    assert_eq!(status(&rig.one(&read_ext(HOST, u64::MAX >> 16, 1))).1, 0x10);
    assert_eq!(status(&rig.one(&write_ext(HOST, SECTORS, &d))).1, 0x10);
    assert_eq!(rig.engine.status()[0].stats.ata_errors, 4);
}

#[test]
fn unknown_opcode_aborts_and_check_power_answers() {
    let mut rig = Rig::new(2);
    assert_eq!(
        status(&rig.one(&ata(HOST, 0, ata_cmd::SMART, 0, 0, &[]))),
        (0x41, 0x04, 0)
    );
    assert_eq!(status(&rig.one(&ata(HOST, 0, 0x99, 0, 0, &[]))).1, 0x04);
    assert_eq!(
        status(&rig.one(&ata(HOST, 0, ata_cmd::CHECK_POWER, 0, 0, &[]))),
        (0x40, 0, 0xFF)
    );
}

#[test]
fn flush_syncs_for_real() {
    let mut rig = Rig::thin(4096);
    rig.io.hold = true;
    rig.exchange(&ata(HOST, AFLAG_EXTENDED, ata_cmd::FLUSH_EXT, 0, 0, &[]));
    assert_eq!(rig.io.held(), 2, "data and map are synced");
    rig.io.release(&mut rig.engine, 0);
    assert!(rig.io.sent.is_empty(), "no reply before both syncs");
    rig.io.release(&mut rig.engine, 0);
    let r = std::mem::take(&mut rig.io.sent);
    assert_eq!(status(&r[0]), (0x40, 0, 0));
    let r = Rig::new(2).one(&ata(HOST, 0, ata_cmd::FLUSH, 0, 0, &[]));
    assert_eq!(status(&r), (0x40, 0, 0));
}

#[test]
fn mac_mask_list() {
    let mut rig = Rig::new(2);
    let mask = |cmd: MaskCmd, dirs: &[MaskDirective]| {
        let mut f = header(HOST, 7, 1, Command::Mask, 1);
        f.resize(28 + 8 * dirs.len().max(4), 0);
        MaskArg::write(&mut f, cmd, 0, dirs).unwrap();
        f
    };
    let r = rig.one(&mask(MaskCmd::Read, &[]));
    assert_eq!(MaskArg::parse(&r).unwrap().directives().count(), 0);
    let add = |mac| MaskDirective {
        dcmd: MaskDirective::ADD,
        mac,
    };
    let r = rig.one(&mask(MaskCmd::Edit, &[add(HOST)]));
    let m = MaskArg::parse(&r).unwrap();
    assert_eq!(m.merror(), 0);
    assert_eq!(
        m.directives().map(|d| d.mac).collect::<Vec<_>>(),
        vec![HOST]
    );
    // Unlisted MACs are silently ignored.
    assert!(rig
        .exchange(&header(OTHER, 7, 1, Command::Config, 0))
        .is_empty());
    assert_eq!(
        rig.exchange(&header(HOST, 7, 1, Command::Config, 0)).len(),
        1
    );
    // Bad directive: MError 2, DirCount = index of the failing directive.
    let bad = MaskDirective {
        dcmd: 9,
        mac: OTHER,
    };
    let r = rig.one(&mask(MaskCmd::Edit, &[add(OTHER), bad]));
    assert_eq!((r[26], r[27]), (2, 1), "MError 2 at directive 1");
    assert_eq!(rig.engine.masks(0), &[HOST, OTHER]);
    // Full list: MError 3.
    let many: Vec<MaskDirective> = (0..40u8).map(|i| add(Mac([4, 0, 0, 0, 0, i]))).collect();
    let r = rig.one(&mask(MaskCmd::Edit, &many));
    assert_eq!((r[26], r[27]), (3, 30), "MError 3 at directive 30");
    assert_eq!(rig.engine.masks(0).len(), 32);
    // Delete, and a bad MCmd.
    let del = MaskDirective {
        dcmd: MaskDirective::DELETE,
        mac: OTHER,
    };
    rig.one(&mask(MaskCmd::Edit, &[del]));
    assert!(!rig.engine.masks(0).contains(&OTHER));
    assert_eq!(aoe_error(&rig.one(&mask(MaskCmd::Other(5), &[]))), Some(2));
    // Truncated directive list: error 2.
    let mut t = mask(MaskCmd::Edit, &[add(HOST)]);
    t[27] = 50;
    assert_eq!(aoe_error(&rig.one(&t)), Some(2));
}

#[test]
fn reserve_release() {
    let mut rig = Rig::new(2);
    let rr = |src: Mac, cmd: ReserveCmd, macs: &[Mac]| {
        let mut f = header(src, 7, 1, Command::Reserve, 2);
        f.resize(26 + 6 * macs.len().max(6), 0);
        ReserveArg::write(&mut f, cmd, macs).unwrap();
        f
    };
    let r = rig.one(&rr(HOST, ReserveCmd::Set, &[HOST]));
    assert_eq!(aoe_error(&r), None);
    assert_eq!(ReserveArg::parse(&r).unwrap().macs().unwrap(), vec![HOST]);
    // Others get error 6 on ATA, except IDENTIFY.
    assert_eq!(aoe_error(&rig.one(&read_ext(OTHER, 0, 1))), Some(6));
    assert_eq!(
        aoe_error(&rig.one(&ata(OTHER, 0, ata_cmd::IDENTIFY, 0, 1, &[]))),
        None
    );
    assert_eq!(aoe_error(&rig.one(&read_ext(HOST, 0, 1))), None);
    // Set by a non-member: error 6, list unchanged.
    let r = rig.one(&rr(OTHER, ReserveCmd::Set, &[OTHER]));
    assert_eq!(aoe_error(&r), Some(6));
    assert_eq!(ReserveArg::parse(&r).unwrap().macs().unwrap(), vec![HOST]);
    // Read.
    let r = rig.one(&rr(OTHER, ReserveCmd::Read, &[]));
    assert_eq!(ReserveArg::parse(&r).unwrap().macs().unwrap(), vec![HOST]);
    // Force set, then release by the holder.
    rig.one(&rr(OTHER, ReserveCmd::ForceSet, &[OTHER]));
    assert_eq!(aoe_error(&rig.one(&read_ext(HOST, 0, 1))), Some(6));
    rig.one(&rr(OTHER, ReserveCmd::Set, &[]));
    assert_eq!(aoe_error(&rig.one(&read_ext(HOST, 0, 1))), None);
    // Bad RCmd, and a MAC list longer than the frame: error 2.
    assert_eq!(
        aoe_error(&rig.one(&rr(HOST, ReserveCmd::Other(7), &[]))),
        Some(2)
    );
    let mut t = rr(HOST, ReserveCmd::ForceSet, &[HOST]);
    t[25] = 100;
    assert_eq!(aoe_error(&rig.one(&t)), Some(2));
}

#[test]
fn concurrent_durable_writes_share_one_fdatasync() {
    let mut rig = Rig::new(2);
    rig.io.hold = true;
    let d = pattern(1, 1024);
    for lba in [0, 2, 4, 6] {
        rig.exchange(&write_ext(HOST, lba, &d));
    }
    let ops = rig.io.held_ops();
    let dsync: Vec<bool> = ops
        .iter()
        .map(|(_, op)| matches!(op, IoOp::Write { durable: true, .. }))
        .collect();
    assert_eq!(
        dsync,
        vec![true, false, false, false],
        "a lone write uses O_DSYNC, joiners do not"
    );
    // The first completes on its own.
    rig.io.release(&mut rig.engine, 0);
    assert_eq!(rig.io.sent.len(), 1);
    // The second's data completes: an fdatasync starts for it; no ack before it ends.
    rig.io.release(&mut rig.engine, 0);
    assert_eq!(rig.io.held_ops()[2], (IoTarget::Data, IoOp::Sync));
    assert_eq!(rig.io.sent.len(), 1);
    // The third and fourth complete while that sync runs: they wait for the next one.
    rig.io.release(&mut rig.engine, 0);
    rig.io.release(&mut rig.engine, 0);
    assert_eq!(rig.io.held_ops(), vec![(IoTarget::Data, IoOp::Sync)]);
    rig.io.release(&mut rig.engine, 0);
    assert_eq!(rig.io.sent.len(), 2);
    // One fdatasync covers both.
    assert_eq!(rig.io.held_ops(), vec![(IoTarget::Data, IoOp::Sync)]);
    rig.io.release(&mut rig.engine, 0);
    assert_eq!(rig.io.sent.len(), 4);
    assert!(rig.io.sent.iter().all(|r| status(r) == (0x40, 0, 0)));
    assert_eq!(rig.engine.outstanding(), 0);
    // Write-back mode never syncs.
    let mut wb = Rig::with(
        2,
        ExportSpec {
            writeback: true,
            ..spec()
        },
        None,
    );
    wb.io.hold = true;
    wb.exchange(&write_ext(HOST, 0, &d));
    wb.exchange(&write_ext(HOST, 2, &d));
    assert!(wb
        .io
        .held_ops()
        .iter()
        .all(|(_, op)| matches!(op, IoOp::Write { durable: false, .. })));
    wb.io.release(&mut wb.engine, 0);
    wb.io.release(&mut wb.engine, 0);
    assert_eq!(wb.io.sent.len(), 2);
    assert_eq!(wb.io.held(), 0);
}

#[test]
fn buffer_count_is_honoured() {
    let mut rig = Rig::new(2);
    rig.io.hold = true;
    for i in 0..17 {
        rig.exchange(&read_ext(HOST, i, 1));
    }
    assert_eq!(rig.io.held(), 16);
    assert_eq!(rig.engine.status()[0].stats.dropped_over_bufcnt, 1);
    assert_eq!(rig.engine.status()[0].stats.outstanding, 16);
    for _ in 0..16 {
        rig.io.release(&mut rig.engine, 0);
    }
    assert_eq!(rig.io.sent.len(), 16);
    assert_eq!(rig.engine.outstanding(), 0);
}

#[test]
fn thin_unwritten_reads_zero_without_io_and_first_write_orders_map_first() {
    let mut rig = Rig::thin(4096);
    rig.io.data[0].fill(0xEE); // garbage that must never be read for unwritten blocks
    let r = rig.one(&read_ext(HOST, 8, 2));
    assert!(r[ATA_DATA..ATA_DATA + 1024].iter().all(|b| *b == 0));
    rig.io.hold = true;
    let d = pattern(5, 1024);
    rig.exchange(&write_ext(HOST, 8, &d));
    assert_eq!(rig.io.held(), 1, "only the map page is written first");
    rig.io.release(&mut rig.engine, 0); // map page durable -> data write goes out
    assert_eq!(rig.io.held(), 1);
    assert!(rig.io.sent.is_empty());
    rig.io.release(&mut rig.engine, 0);
    let r = std::mem::take(&mut rig.io.sent);
    assert_eq!(status(&r[0]), (0x40, 0, 0));
    let m = rig.engine.map(0).unwrap();
    assert_eq!(m.generation(1), 1);
    assert_eq!(m.used_bytes(), 4096);
    // A rewrite of a written block sends map and data together.
    rig.exchange(&write_ext(HOST, 8, &d));
    assert_eq!(rig.io.held(), 2);
    rig.io.release(&mut rig.engine, 1);
    assert!(
        rig.io.sent.is_empty(),
        "no ack before the map page is durable"
    );
    rig.io.release(&mut rig.engine, 0);
    assert_eq!(rig.io.sent.len(), 1);
    assert_eq!(rig.engine.map(0).unwrap().generation(1), 2);
    // The map file holds the generations.
    let back = ThinMap::decode(&{
        let mut f = rig.engine.map(0).unwrap().header_bytes();
        f.extend_from_slice(&rig.io.map[0][4096..]);
        f
    })
    .unwrap();
    assert_eq!(back.generation(1), 2);
    assert_eq!(back.generation(0), 0);
}

#[test]
fn out_of_space_fails_writes_and_keeps_reads() {
    let mut rig = Rig::thin(4096);
    rig.io.capacity[0] = Some(64 * 1024);
    let d = pattern(7, 1024);
    assert_eq!(status(&rig.one(&write_ext(HOST, 0, &d))), (0x40, 0, 0));
    let r = rig.one(&write_ext(HOST, 1000, &d));
    assert_eq!(status(&r), (0x41, 0x04, 2));
    let st = &rig.engine.status()[0];
    assert!(st.stats.out_of_space);
    assert_eq!(st.stats.no_space_errors, 1);
    let r = rig.one(&read_ext(HOST, 0, 2));
    assert_eq!(&r[ATA_DATA..ATA_DATA + 1024], &d[..]);
    assert_eq!(status(&rig.one(&write_ext(HOST, 2, &d))).0, 0x40);
    assert!(!rig.engine.status()[0].stats.out_of_space);
}

#[test]
fn config_string_persists_in_thin_map() {
    let mut rig = Rig::thin(4096);
    rig.one(&config(HOST, ConfigCmd::Set, b"owner=a"));
    let back = ThinMap::decode(&{
        let mut f = rig.io.map[0][..4096].to_vec();
        f.extend_from_slice(&rig.io.map[0][4096..]);
        f
    })
    .unwrap();
    assert_eq!(back.config(), b"owner=a");
    let mut engine = Engine::new(ME, 2);
    engine.add_export(spec(), Some(back));
    assert_eq!(engine.status()[0].config, "owner=a");
}

#[test]
fn two_exports_both_answer_broadcast() {
    let mut engine = Engine::new(ME, 2);
    engine.add_export(spec(), None);
    engine.add_export(ExportSpec { slot: 2, ..spec() }, None);
    let mut io = MemBackend::default();
    let mut buf = FrameBuf::frame(engine.frame_capacity());
    buf.fill_from(&header(
        HOST,
        BROADCAST_MAJOR,
        BROADCAST_MINOR,
        Command::Config,
        0,
    ));
    engine.on_frame(buf);
    io.run(&mut engine);
    let slots: Vec<u8> = io
        .sent
        .iter()
        .map(|f| Header::parse(f).unwrap().minor)
        .collect();
    assert_eq!(slots.len(), 2);
    assert!(slots.contains(&1) && slots.contains(&2));
}

proptest::proptest! {
    /// Garbage, truncated, oversized or wrong-version frames never panic the engine, and it
    /// still serves afterwards.
    #[test]
    fn garbage_never_panics(frames in proptest::collection::vec(
        proptest::collection::vec(proptest::num::u8::ANY, 0..1100), 1..20),
        aoe in proptest::bool::ANY) {
        let mut rig = Rig::thin(4096);
        for mut f in frames {
            if aoe && f.len() >= 20 {
                f[12] = 0x88; f[13] = 0xa2; f[14] = (f[14] & 0x0f) | 0x10;
                f[16] = 0; f[17] = 7; f[18] = 1;
                f[19] %= 5;
            }
            rig.exchange(&f);
        }
        let r = rig.one(&header(HOST, 7, 1, Command::Config, 3));
        proptest::prop_assert!(Header::parse(&r).unwrap().response);
        proptest::prop_assert_eq!(rig.engine.outstanding(), 0);
    }
}
