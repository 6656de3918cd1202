//! Crash consistency (kill -9 during a write stream) and out-of-space behaviour of a thin
//! export, over a veth pair with our initiator core.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use aoe_target::initiator::{InitiatorError, Request};
use aoe_target::ThinMap;
use common::{can_run, export_args, pattern, NetPair, Target};

#[test]
fn kill_9_loses_no_acknowledged_write_and_map_agrees() {
    if !can_run("kill_9_loses_no_acknowledged_write_and_map_agrees") {
        return;
    }
    let net = NetPair::new(9000);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("thin.img");
    let map = dir.path().join("thin.img.aoemap");
    let extra = ["--thin", "256M", "--block-size", "4K", "--bufcnt", "64"];
    let args = export_args(&net.tv, 5, 5, &img, &extra);
    let mut t = Target::start(&net.t, dir.path(), &args);
    let mut s = net.session(5, 5);
    s.set_op_timeout(Duration::from_secs(1));
    // Write i goes to block i (8 sectors = 4 KiB = one map block, one frame at MTU 9000).
    const WRITES: u64 = 4000;
    let mut acked: Vec<u64> = Vec::new();
    let mut failed = 0u64;
    let mut killed = false;
    let mut next = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while (next < WRITES && !killed) || s.pending() > 0 {
        assert!(Instant::now() < deadline, "stream did not finish");
        // Keep a stream of 128 writes queued or in flight; stop adding at the kill.
        while !killed && next < WRITES && s.pending() < 128 {
            s.submit(
                next,
                &Request::Write {
                    lba: 8 * next,
                    data: pattern(next, 4096),
                },
            )
            .unwrap();
            next += 1;
        }
        for (i, r) in s.poll(Duration::from_millis(20)).unwrap() {
            match r {
                Ok(_) => acked.push(i),
                Err(_) => failed += 1,
            }
        }
        if !killed && acked.len() >= 500 {
            t.signal("KILL");
            killed = true;
        }
    }
    assert!(killed, "the target was killed mid-stream");
    assert!(failed > 0, "writes were in flight at the kill");
    assert!(acked.len() >= 500);
    t.wait(Duration::from_secs(10));
    // On disk right after the crash: every acknowledged block is marked, and every block
    // marked unwritten reads zeros.
    let m = ThinMap::load_file(&map).unwrap();
    let data = std::fs::read(&img).unwrap();
    let mut gens = HashMap::new();
    for &i in &acked {
        let g = m.generation(i);
        assert_ne!(g, 0, "acked write {i} not in the map");
        assert_eq!(
            &data[(i * 4096) as usize..((i + 1) * 4096) as usize],
            &pattern(i, 4096)[..],
            "acked write {i}"
        );
        assert!(gens.insert(g, i).is_none(), "generation {g} used twice");
    }
    for b in 0..WRITES {
        if m.generation(b) == 0 {
            assert!(
                data[(b * 4096) as usize..((b + 1) * 4096) as usize]
                    .iter()
                    .all(|x| *x == 0),
                "unmarked block {b} holds data"
            );
        }
    }
    // Restart: everything acknowledged reads back through the target.
    let _t2 = Target::start(&net.t, dir.path(), &args);
    let mut s = net.session(5, 5);
    for &i in &acked {
        assert_eq!(
            s.read(8 * i, 8).unwrap(),
            pattern(i, 4096),
            "after restart, write {i}"
        );
    }
    // The restarted target keeps counting generations upward.
    s.write(8 * WRITES, &pattern(1, 4096)).unwrap();
    let max_before = gens.keys().max().copied().unwrap_or(0);
    std::thread::sleep(Duration::from_millis(100));
    assert!(ThinMap::load_file(&map).unwrap().generation(WRITES) > max_before);
}

struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn out_of_space_fails_writes_cleanly_and_reads_go_on() {
    if !can_run("out_of_space_fails_writes_cleanly_and_reads_go_on") {
        return;
    }
    let net = NetPair::new(9000);
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2M", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs");
    let _fs = Tmpfs(small.clone());
    let img = small.join("over.img");
    let map = dir.path().join("over.map");
    let extra = [
        "--thin",
        "64M",
        "--map",
        map.to_str().unwrap(),
        "--block-size",
        "4K",
    ];
    let t = Target::start(
        &net.t,
        dir.path(),
        &export_args(&net.tv, 6, 0, &img, &extra),
    );
    let mut s = net.session(6, 0);
    s.set_op_timeout(Duration::from_secs(20));
    // 4 MiB of writes into a 2 MiB file system.
    let mut ok = 0u64;
    let mut enospc = 0u64;
    for i in 0..1024u64 {
        match s.write(8 * i, &pattern(i, 4096)) {
            Ok(()) => ok += 1,
            Err(InitiatorError::Ata { status, error }) => {
                assert_eq!((status, error), (0x41, 0x04));
                enospc += 1;
            }
            Err(e) => panic!("write {i}: {e}"),
        }
    }
    assert!(ok > 100 && enospc > 100, "ok {ok}, out of space {enospc}");
    // Reads keep working, and the acknowledged data is intact.
    for i in 0..ok.min(100) {
        assert_eq!(s.read(8 * i, 8).unwrap(), pattern(i, 4096));
    }
    let st = t.fresh_status();
    let e = &st["exports"][0];
    assert_eq!(e["out_of_space"], true);
    assert!(e["no_space_errors"].as_u64().unwrap() >= enospc);
    assert!(e["used_bytes"].as_u64().unwrap() < e["advertised_bytes"].as_u64().unwrap());
    assert!(t.stderr().contains("out of space"), "{}", t.stderr());
}
