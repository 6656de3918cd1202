//! The `aoe-target` binary in a network namespace, driven over a veth pair by our initiator
//! core: discovery, sizes, read/write at MTU 1500 and 9000, errors, garbage, status, shutdown,
//! operator errors.

mod common;

use std::path::Path;
use std::time::Duration;

use aoe_target::initiator::InitiatorError;
use aoe_target::wire::{Command, Header, Mac, MIN_FRAME_LEN};
use common::{
    can_run, export_args, pattern, run_bounded, sparse_file, target_bin, target_cmd, NetPair,
    Scratch, Target,
};

#[test]
fn serves_an_initiator_at_mtu_1500() {
    if !can_run("serves_an_initiator_at_mtu_1500") {
        return;
    }
    let net = NetPair::new(1500);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("thin.img");
    let t = Target::start(
        &net.t,
        dir.path(),
        &export_args(&net.tv, 7, 1, &img, &["--thin", "64M", "--bufcnt", "32"]),
    );
    let mut s = net.session(7, 1);
    assert_eq!(s.target().bufcnt, 32);
    assert_eq!(s.target().max_sectors, 2);
    assert_eq!(s.sectors(), 64 << 11);
    // Never-written region of a thin device reads zeros.
    assert!(s.read(1000, 64).unwrap().iter().all(|b| *b == 0));
    // Several sizes, odd ones included.
    for (lba, sectors) in [(0u64, 2u64), (10, 6), (100, 17), (4096, 2048)] {
        let data = pattern(lba, (sectors * 512) as usize);
        s.write(lba, &data).unwrap();
        assert_eq!(s.read(lba, sectors).unwrap(), data, "lba {lba} x{sectors}");
    }
    // Last sector, and past the end.
    let last = s.sectors() - 1;
    let d = pattern(9, 512);
    s.write(last, &d).unwrap();
    assert_eq!(s.read(last, 1).unwrap(), d);
    match s.read(last, 2) {
        Err(InitiatorError::Ata { status, error }) => assert_eq!((status, error), (0x41, 0x10)),
        other => panic!("read past the end: {other:?}"),
    }
    s.flush().unwrap();
    // Garbage frames do not stop the target.
    let me = s.mac();
    for len in [14usize, 23, 24, 30, 36, 60, 1000] {
        let mut f = pattern(len as u64, len.max(MIN_FRAME_LEN));
        if len >= 24 {
            Header::request(Mac::BROADCAST, me, 7, 1, Command::from(f[19] % 4), 1)
                .write(&mut f)
                .unwrap();
        }
        s.send_raw(&f).unwrap();
    }
    assert_eq!(s.read(0, 2).unwrap(), pattern(0, 1024));
    let st = t.fresh_status();
    let e = &st["exports"][0];
    assert_eq!(e["name"], "e7.1");
    assert_eq!(e["advertised_bytes"], 64u64 << 20);
    // 64 KiB map blocks: block 0 (LBAs 0-117), 16 blocks for the 1 MiB at 2 MiB, the last.
    assert_eq!(e["used_bytes"], 18 * 65536);
    assert!(e["writes"].as_u64().unwrap() >= 1030);
    assert!(e["ata_errors"].as_u64().unwrap() >= 1);
    assert_eq!(e["outstanding"], 0);
    assert!(e["thin_map"].as_bool().unwrap());
}

/// Also the page-cache (--writeback) path: reads and writes served without the ring.
#[test]
fn jumbo_frames_carry_17_sectors() {
    let Some(Scratch { net, dir, img }) =
        Scratch::new("jumbo_frames_carry_17_sectors", 9000, 32 << 20)
    else {
        return;
    };
    let t = Target::start(
        &net.t,
        dir.path(),
        &export_args(&net.tv, 3, 0, &img, &["--writeback"]),
    );
    let mut s = net.session(3, 0);
    assert_eq!(s.target().max_sectors, 17);
    let data = pattern(17, 17 * 512 * 20);
    s.write(77, &data).unwrap();
    assert_eq!(s.read(77, 17 * 20).unwrap(), data);
    // The data is in the backing file at the same offset (direct mapping).
    let file = std::fs::read(&img).unwrap();
    assert_eq!(&file[77 * 512..77 * 512 + data.len()], &data[..]);
    let st = t.fresh_status();
    assert_eq!(st["exports"][0]["writeback"], true);
    assert_eq!(st["exports"][0]["o_direct"], false);
}

/// Durable (O_DIRECT) mode at MTU 1500: the frames of a request that arrive together become
/// one vectored read or write of the disk (`vectored_ios`), and land at the right offsets; a
/// run cut short by a file truncated under the running target gives the frames it covered
/// their data and reads the rest as zeros (frame by frame), and nothing fails.
#[test]
fn durable_frames_merge_into_one_disk_io() {
    use std::os::unix::fs::FileExt;
    let Some(Scratch { net, dir, img }) =
        Scratch::new("durable_frames_merge_into_one_disk_io", 1500, 8 << 20)
    else {
        return;
    };
    let t = Target::start(&net.t, dir.path(), &export_args(&net.tv, 3, 4, &img, &[]));
    let mut s = net.session(3, 4);
    assert_eq!(s.target().max_sectors, 2);
    let data = pattern(11, 128 * 512);
    s.write(64, &data).unwrap();
    assert_eq!(s.read(64, 128).unwrap(), data);
    let file = std::fs::read(&img).unwrap();
    assert_eq!(&file[64 * 512..64 * 512 + data.len()], &data[..]);
    let st = t.fresh_status();
    assert_eq!(st["exports"][0]["o_direct"], true);
    assert_eq!(
        st["rx_ring"], true,
        "frames come through the PACKET_MMAP ring"
    );
    let merged = st["vectored_ios"].as_u64().unwrap();
    assert!(merged >= 2, "{merged} vectored disk I/Os");

    // The file ends 6 KiB into a 16 KiB read: 6 KiB of data, then zeros.
    let tail = pattern(12, 32 * 512);
    s.write(8000, &tail).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    f.set_len(8000 * 512 + 6144).unwrap();
    let mut want = tail[..6144].to_vec();
    want.resize(tail.len(), 0);
    assert_eq!(s.read(8000, 32).unwrap(), want);
    assert_eq!(s.read(64, 128).unwrap(), data);
    let mut back = vec![0u8; 6144];
    f.read_exact_at(&mut back, 8000 * 512).unwrap();
    assert_eq!(back, tail[..6144]);
    let st = t.fresh_status();
    assert_eq!(st["outstanding"], 0);
    assert_eq!(st["exports"][0]["io_errors"], 0);
}

/// Page-cache reads are sent from a mapping of the backing file: what was written through
/// the target reads back from it; data written to the file behind the target's back and
/// dropped from the page cache comes through the ring; and a file truncated under the
/// running target (the mapping now reaches past its end) reads as zeros past the new end
/// (the pages left the page cache, so the read goes to the ring and comes back short), with
/// no SIGBUS, also after a run of hits has thinned out the `mincore` checks, and the rest
/// still reads.
#[test]
fn page_cache_reads_come_from_the_mapping() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let Some(Scratch { net, dir, img }) =
        Scratch::new("page_cache_reads_come_from_the_mapping", 1500, 8 << 20)
    else {
        return;
    };
    let t = Target::start(
        &net.t,
        dir.path(),
        &export_args(&net.tv, 3, 2, &img, &["--writeback"]),
    );
    let mut s = net.session(3, 2);
    let data = pattern(5, 64 * 512);
    s.write(100, &data).unwrap();
    assert_eq!(s.read(100, 64).unwrap(), data);
    let mapped = t.fresh_status()["sent_from_map"].as_u64().unwrap();
    assert!(mapped >= 32, "{mapped} replies sent from the mapping");

    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let behind = pattern(6, 16 * 512);
    f.write_all_at(&behind, 2000 * 512).unwrap();
    f.sync_all().unwrap();
    // SAFETY: fadvise on a valid descriptor has no memory effects.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0);
    assert_eq!(s.read(2000, 16).unwrap(), behind);

    // Cached pages past the future end, sent from the mapping once, then cut off.
    let tail = pattern(7, 8 * 512);
    s.write(12000, &tail).unwrap();
    assert_eq!(s.read(12000, 8).unwrap(), tail);
    // Enough hits in a row that most reads go out without a mincore (ResidencyGuess): the
    // read past the new end then fails inside sendmmsg (EFAULT, no SIGBUS), is retransmitted
    // and checked.
    for i in 0..300u64 {
        assert_eq!(
            s.read(100 + i % 56, 8).unwrap(),
            data[(i % 56) as usize * 512..][..4096]
        );
    }
    f.set_len(4 << 20).unwrap();
    assert_eq!(
        s.read(12000, 8).unwrap(),
        vec![0u8; 8 * 512],
        "past the new end of the file reads as zeros (a short read)"
    );
    assert_eq!(s.read(100, 64).unwrap(), data);
    let st = t.fresh_status();
    assert_eq!(st["outstanding"], 0);
    assert_eq!(st["exports"][0]["io_errors"], 0);
}

/// The MTU is re-read on every Query Config (as vblade does): raised to 9000 on a running
/// target, the next session gets 17 sectors per frame and they are served; lowered again, 2.
/// In page-cache mode, so the pipelined frames of each transfer are gathered into runs
/// (one preadv2/pwritev for adjacent frames) and land at the right offsets.
#[test]
fn follows_mtu_changes() {
    let Some(Scratch { net, dir, img }) = Scratch::new("follows_mtu_changes", 1500, 8 << 20) else {
        return;
    };
    let t = Target::start(
        &net.t,
        dir.path(),
        &export_args(&net.tv, 3, 1, &img, &["--writeback"]),
    );
    assert_eq!(net.session(3, 1).target().max_sectors, 2);
    for (mtu, spf) in [(9000, 17), (1500, 2)] {
        net.set_mtu(mtu);
        let mut s = net.session(3, 1);
        assert_eq!(s.target().max_sectors, spf, "MTU {mtu}");
        let data = pattern(u64::from(mtu), 17 * 512 * 3);
        s.write(40, &data).unwrap();
        assert_eq!(s.read(40, 17 * 3).unwrap(), data, "MTU {mtu}");
        let file = std::fs::read(&img).unwrap();
        assert_eq!(
            &file[40 * 512..40 * 512 + data.len()],
            &data[..],
            "MTU {mtu}"
        );
        let st = t.fresh_status();
        assert_eq!(st["mtu"], mtu);
        assert_eq!(st["sectors_per_frame"], spf);
    }
}

#[test]
fn sigterm_drains_and_exits_cleanly() {
    let Some(Scratch { net, dir, img }) =
        Scratch::new("sigterm_drains_and_exits_cleanly", 1500, 8 << 20)
    else {
        return;
    };
    let mut t = Target::start(&net.t, dir.path(), &export_args(&net.tv, 1, 1, &img, &[]));
    let mut s = net.session(1, 1);
    let data = pattern(5, 256 * 1024);
    s.write(0, &data).unwrap();
    t.signal("TERM");
    assert_eq!(t.wait(Duration::from_secs(10)), Some(0), "{}", t.stderr());
    let file = std::fs::read(&img).unwrap();
    assert_eq!(&file[..data.len()], &data[..]);
    assert_eq!(t.status_json()["outstanding"], 0);
}

#[test]
fn operator_errors_are_clear() {
    let Some(Scratch { net, dir, img }) = Scratch::new("operator_errors_are_clear", 1500, 1 << 20)
    else {
        return;
    };
    let (rc, out) = run_bounded(20, &net.t, &target_cmd("nosuch0", 1, 1, &img, &[]));
    assert_eq!(rc, 1);
    assert!(
        out.contains("network interface \"nosuch0\" does not exist"),
        "{out}"
    );
    let missing = Path::new("/nonexistent/disk.img");
    let (rc, out) = run_bounded(20, &net.t, &target_cmd(&net.tv, 1, 1, missing, &[]));
    assert_eq!(rc, 1);
    assert!(
        out.contains("backing file /nonexistent/disk.img") && out.contains("No such file"),
        "{out}"
    );
    let (rc, out) = run_bounded(20, &net.t, &target_cmd(&net.tv, 65535, 1, &img, &[]));
    assert_eq!(rc, 2, "{out}");
    let (rc, _) = run_bounded(20, &net.t, &[target_bin(), "--shelf", "1"]);
    assert_eq!(rc, 2);
    // shelf.slot already served on the segment: a second target on the peer side sees the
    // first one answer its Query Config.
    let _first = Target::start(&net.t, dir.path(), &export_args(&net.tv, 4, 2, &img, &[]));
    let probe = ["--probe-ms", "1000"];
    let (rc, out) = run_bounded(20, &net.i, &target_cmd(&net.iv, 4, 2, &img, &probe));
    assert_eq!(rc, 1);
    assert!(out.contains("e4.2 is already served on"), "{out}");
}

#[test]
fn config_file_serves_several_exports() {
    if !can_run("config_file_serves_several_exports") {
        return;
    }
    let net = NetPair::new(1500);
    let dir = tempfile::tempdir().unwrap();
    let raw = sparse_file(dir.path(), "raw.img", 4 << 20);
    let thin = dir.path().join("thin.img");
    let conf = dir.path().join("aoe.toml");
    std::fs::write(
        &conf,
        format!(
            "interface = \"{}\"\n\n[[export]]\nshelf = 2\nslot = 0\nfile = \"{}\"\n\n[[export]]\nshelf = 2\nslot = 1\nfile = \"{}\"\nthin = \"1G\"\nconfig = \"owner=test\"\nbufcnt = 8\n",
            net.tv,
            raw.display(),
            thin.display()
        ),
    )
    .unwrap();
    let t = Target::start(&net.t, dir.path(), &["--config", conf.to_str().unwrap()]);
    let mut a = net.session(2, 0);
    let mut b = net.session(2, 1);
    assert_eq!(a.sectors(), 8192);
    assert_eq!(b.sectors(), 2 << 20);
    assert_eq!(b.target().bufcnt, 8);
    assert_eq!(b.target().config, b"owner=test");
    a.write(1, &pattern(1, 1024)).unwrap();
    b.write(1, &pattern(2, 1024)).unwrap();
    assert_eq!(a.read(1, 2).unwrap(), pattern(1, 1024));
    assert_eq!(b.read(1, 2).unwrap(), pattern(2, 1024));
    let st = t.fresh_status();
    let names: Vec<&str> = st["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["e2.0", "e2.1"]);
    assert_eq!(st["exports"][1]["advertised_bytes"], 1u64 << 30);
    assert_eq!(st["exports"][1]["used_bytes"], 65536);
}
