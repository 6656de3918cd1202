//! Helpers for the network tests: namespaces, veth pairs, processes, all cleaned up on drop.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

pub const FABRICD: &str = env!("CARGO_BIN_EXE_fabricd");
pub const FABRIC: &str = env!("CARGO_BIN_EXE_fabric");
pub const IMPAIR: &str = env!("CARGO_BIN_EXE_fabric-impair");

/// Whether the network tests can run here; prints why not.
pub fn can_run() -> bool {
    // Root: the Uid line of /proc/self/status.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(1) == Some("0"));
    if !root {
        println!("SKIPPED: network namespace tests need root");
        return false;
    }
    if Command::new("ip").arg("-V").output().is_err() {
        println!("SKIPPED: `ip` (iproute2) is not installed");
        return false;
    }
    true
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique short name (interface names are at most 15 bytes).
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace, deleted on drop (which also removes its interfaces).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let name = unique(prefix);
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn ip(&self, args: &[&str]) {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend_from_slice(args);
        sh(&v);
    }

    /// A command run inside the namespace.
    pub fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, prog]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill what still runs inside, then delete.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Joins `a` and `b` with a veth pair; returns the interface names (in `a`, in `b`).
pub fn veth(a: &Netns, b: &Netns) -> (String, String) {
    let (x, y) = (unique("fa"), unique("fb"));
    sh(&["ip", "link", "add", &x, "type", "veth", "peer", "name", &y]);
    sh(&["ip", "link", "set", &x, "netns", &a.name]);
    sh(&["ip", "link", "set", &y, "netns", &b.name]);
    a.ip(&["link", "set", &x, "up"]);
    b.ip(&["link", "set", &y, "up"]);
    (x, y)
}

/// A child process killed on drop, with its stderr lines forwarded to a channel (timestamped
/// on arrival) and echoed to the test output.
pub struct Proc {
    pub child: Child,
    pub lines: Receiver<(Instant, String)>,
    pub what: String,
}

impl Proc {
    pub fn spawn(mut cmd: Command, what: &str) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{what}: {e}"));
        let (tx, rx) = channel();
        for stream in [
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            let tag = what.to_string();
            std::thread::spawn(move || {
                for l in BufReader::new(stream).lines().map_while(Result::ok) {
                    println!("[{tag}] {l}");
                    let _ = tx.send((Instant::now(), l));
                }
            });
        }
        Proc {
            child,
            lines: rx,
            what: what.into(),
        }
    }

    /// Waits for a line containing `pat`; returns when it arrived.
    pub fn wait_for(&self, pat: &str, timeout: Duration) -> Instant {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((t, l)) if l.contains(pat) => return t,
                Ok(_) => {}
                Err(_) => panic!("{}: no line with {pat:?} within {timeout:?}", self.what),
            }
        }
    }

    /// Stops with SIGTERM and waits (SIGKILL after 5 s).
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a command with a timeout; returns (exit code, stdout, stderr).
pub fn run_timeout(mut cmd: Command, timeout: Duration) -> (i32, String, String) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let end = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            _ if Instant::now() > end => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("wait");
                panic!(
                    "timed out after {timeout:?}: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fresh key file in `dir`.
pub fn keygen(dir: &Path, name: &str) -> PathBuf {
    let out = sh(&[FABRIC, "keygen"]);
    let p = dir.join(name);
    std::fs::write(&p, out.stdout).unwrap();
    p
}

/// Starts `fabricd` in `ns` on `iface`; waits until it runs.
pub fn fabricd(ns: &Netns, iface: &str, name: &str, key: &Path, extra: &[&str]) -> Proc {
    let mut c = ns.cmd(FABRICD);
    c.args(["--iface", iface, "--name", name, "--key-file"])
        .arg(key)
        .args(extra)
        .env("RUST_LOG", "info");
    let p = Proc::spawn(c, name);
    p.wait_for("running on", Duration::from_secs(10));
    p
}

/// Runs `fabric` in `ns` with `args`; returns (exit code, stdout, stderr).
pub fn fabric(
    ns: &Netns,
    iface: &str,
    key: &Path,
    args: &[&str],
    timeout: Duration,
) -> (i32, String, String) {
    let mut c = ns.cmd(FABRIC);
    c.args(["--iface", iface, "--key-file"]).arg(key).args(args);
    run_timeout(c, timeout)
}

/// Like [`fabric`], and parses stdout as JSON; panics on failure.
pub fn fabric_json(
    ns: &Netns,
    iface: &str,
    key: &Path,
    args: &[&str],
    timeout: Duration,
) -> serde_json::Value {
    let (code, out, err) = fabric(ns, iface, key, args, timeout);
    assert_eq!(code, 0, "fabric {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("fabric {args:?}: {e}: {out}"))
}
