//! Shared fixtures of the network tests: a pair of network namespaces joined by a veth pair,
//! and a target process, both torn down on drop.

#![allow(dead_code)] // each test binary uses a different subset

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use aoe_target::initiator::Session;
use aoe_target::sys::with_netns;

/// True when the tests can make namespaces; otherwise prints why they skip.
pub fn can_run(test: &str) -> bool {
    // SAFETY-free check: root is uid 0 in /proc/self/status.
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if !root {
        eprintln!("SKIP {test}: needs root for network namespaces");
        return false;
    }
    true
}

fn run(cmd: &[&str]) {
    let st = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdout(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(st.success(), "{cmd:?} failed");
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Two namespaces (`t`: target side, `i`: initiator side) joined by veth `tv`/`iv`.
pub struct NetPair {
    pub t: String,
    pub i: String,
    pub tv: String,
    pub iv: String,
}

impl NetPair {
    pub fn new(mtu: u32) -> NetPair {
        let id = format!(
            "{}{}",
            std::process::id() % 100_000,
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let p = NetPair {
            t: format!("aoeT{id}"),
            i: format!("aoeI{id}"),
            tv: format!("aoet{id}"),
            iv: format!("aoei{id}"),
        };
        run(&["ip", "netns", "add", &p.t]);
        run(&["ip", "netns", "add", &p.i]);
        run(&[
            "ip", "link", "add", &p.tv, "netns", &p.t, "type", "veth", "peer", "name", &p.iv,
            "netns", &p.i,
        ]);
        p.set_mtu(mtu);
        for (ns, dev) in [(&p.t, &p.tv), (&p.i, &p.iv)] {
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        p
    }

    /// Sets the MTU of both ends of the veth pair.
    pub fn set_mtu(&self, mtu: u32) {
        for (ns, dev) in [(&self.t, &self.tv), (&self.i, &self.iv)] {
            run(&["ip", "-n", ns, "link", "set", dev, "mtu", &mtu.to_string()]);
        }
    }

    /// A session from the initiator side.
    pub fn session(&self, shelf: u16, slot: u8) -> Session {
        let iv = self.iv.clone();
        with_netns(&self.i, || {
            Session::open(&iv, shelf, slot, Duration::from_secs(3))
        })
        .expect("setns")
        .expect("session")
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.t, &self.i] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// An `aoe-target` process in a namespace, killed on drop.
pub struct Target {
    pub child: Option<Child>,
    pub status: PathBuf,
    pub log: PathBuf,
}

pub fn target_bin() -> &'static str {
    env!("CARGO_BIN_EXE_aoe-target")
}

impl Target {
    /// Starts the target in `ns` with `args`, and waits until its status file appears.
    pub fn start<S: AsRef<OsStr>>(ns: &str, dir: &Path, args: &[S]) -> Target {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let status = dir.join(format!("status{n}.json"));
        let log = dir.join(format!("target{n}.log"));
        let _ = std::fs::remove_file(&status);
        let child = Command::new("timeout")
            .args(["-s", "KILL", "300", "ip", "netns", "exec", ns, target_bin()])
            .args(args)
            .args([
                "--status-file",
                status.to_str().unwrap(),
                "--probe-ms",
                "200",
            ])
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .expect("spawn aoe-target");
        let t = Target {
            child: Some(child),
            status,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !t.status.exists() {
            assert!(
                Instant::now() < deadline,
                "target did not start: {}",
                t.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        t
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default()
    }

    pub fn status_json(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(&self.status).expect("status file");
        serde_json::from_str(&text).expect("status JSON")
    }

    /// Waits until the status file is rewritten (so it reflects recent traffic).
    pub fn fresh_status(&self) -> serde_json::Value {
        let before = std::fs::metadata(&self.status)
            .and_then(|m| m.modified())
            .ok();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let now = std::fs::metadata(&self.status)
                .and_then(|m| m.modified())
                .ok();
            if now != before {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.status_json()
    }

    /// The pid of the aoe-target process itself (below `timeout` and `ip netns exec`).
    pub fn pid(&self) -> u32 {
        let root = self.child.as_ref().unwrap().id();
        // `timeout` execs nothing; `ip netns exec` execs the target, so it is timeout's child.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let children = std::fs::read_to_string(format!("/proc/{root}/task/{root}/children"))
                .unwrap_or_default();
            if let Some(pid) = children
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
            {
                return pid;
            }
            assert!(Instant::now() < deadline, "no target pid");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn signal(&self, sig: &str) {
        run(&["kill", &format!("-{sig}"), &self.pid().to_string()]);
    }

    /// Waits for exit; returns the exit code.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = child.try_wait().ok().flatten() {
                self.child = None;
                return st.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(pid) = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", c.id()))
            {
                for p in pid.split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", p]).status();
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs a command bounded by `timeout` and returns (exit code, stdout+stderr).
pub fn run_bounded<S: AsRef<OsStr> + std::fmt::Debug>(
    secs: u32,
    ns: &str,
    cmd: &[S],
) -> (i32, String) {
    let out = Command::new("timeout")
        .args(["-s", "KILL", &secs.to_string(), "ip", "netns", "exec", ns])
        .args(cmd)
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// The flags of one export: `--iface IFACE --shelf S --slot N --file FILE`, then `extra`.
pub fn export_args(iface: &str, shelf: u16, slot: u8, file: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--iface",
        iface,
        "--shelf",
        &shelf.to_string(),
        "--slot",
        &slot.to_string(),
        "--file",
        file.to_str().expect("UTF-8 path"),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// The target binary with [`export_args`], for [`run_bounded`].
pub fn target_cmd(iface: &str, shelf: u16, slot: u8, file: &Path, extra: &[&str]) -> Vec<String> {
    let mut cmd = vec![target_bin().to_string()];
    cmd.extend(export_args(iface, shelf, slot, file, extra));
    cmd
}

/// Creates `dir/name` as a sparse file of `size` bytes and returns its path.
pub fn sparse_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(size))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path
}

/// What most network tests start from: two namespaces joined at `mtu` and a scratch directory
/// holding a sparse `disk.img` of `size` bytes.
pub struct Scratch {
    pub net: NetPair,
    pub dir: tempfile::TempDir,
    pub img: PathBuf,
}

impl Scratch {
    /// `None` (the reason printed) when `test` cannot run here.
    pub fn new(test: &str, mtu: u32, size: u64) -> Option<Scratch> {
        if !can_run(test) {
            return None;
        }
        let net = NetPair::new(mtu);
        let dir = tempfile::tempdir().expect("tempdir");
        let img = sparse_file(dir.path(), "disk.img", size);
        Some(Scratch { net, dir, img })
    }
}

/// A deterministic pattern for write checks.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
