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

/// `fabricd` flags that turn its monitoring agent off (tests of the control plane).
pub const NO_MONITOR: [&str; 2] = ["--monitor-interval-secs", "0"];

/// A controller: `fabric` run in one namespace, on one interface, with one key file.
#[derive(Clone, Copy)]
pub struct Ctl<'a> {
    pub ns: &'a Netns,
    pub iface: &'a str,
    pub key: &'a Path,
}

impl<'a> Ctl<'a> {
    pub fn new(ns: &'a Netns, iface: &'a str, key: &'a Path) -> Ctl<'a> {
        Ctl { ns, iface, key }
    }

    /// The same controller with another key file.
    pub fn with_key(self, key: &'a Path) -> Ctl<'a> {
        Ctl { key, ..self }
    }

    /// `fabric --iface IFACE --key-file KEY` in the namespace, to add arguments to.
    pub fn cmd(&self) -> Command {
        let mut c = self.ns.cmd(FABRIC);
        c.args(["--iface", self.iface, "--key-file"]).arg(self.key);
        c
    }

    /// Runs `fabric ARGS`; returns (exit code, stdout, stderr).
    pub fn run(&self, args: &[&str], timeout: Duration) -> (i32, String, String) {
        let mut c = self.cmd();
        c.args(args);
        run_timeout(c, timeout)
    }

    /// Runs `fabric --json ARGS` and parses its output; panics on failure.
    pub fn json(&self, args: &[&str], timeout: Duration) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let (code, out, err) = self.run(&all, timeout);
        assert_eq!(code, 0, "fabric {all:?} failed: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("fabric {all:?}: {e}: {out}"))
    }

    /// `fabric --json stats HOST`.
    pub fn stats(&self, host: &str) -> serde_json::Value {
        self.json(&["stats", host], Duration::from_secs(20))
    }
}

/// Two namespaces joined by a veth pair and a fresh key file: most tests' set-up.
pub struct Pair {
    pub a: Netns,
    pub b: Netns,
    pub ia: String,
    pub ib: String,
    pub key: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Pair {
    /// Namespaces named after `tag` (`<tag>A…`, `<tag>B…`).
    pub fn new(tag: &str) -> Pair {
        let (a, b) = (
            Netns::new(&format!("{tag}A")),
            Netns::new(&format!("{tag}B")),
        );
        let (ia, ib) = veth(&a, &b);
        let dir = tempfile::tempdir().unwrap();
        let key = keygen(dir.path(), "key");
        Pair {
            a,
            b,
            ia,
            ib,
            key,
            dir,
        }
    }

    /// A controller in namespace A.
    pub fn ctl_a(&self) -> Ctl<'_> {
        Ctl::new(&self.a, &self.ia, &self.key)
    }

    /// A controller in namespace B.
    pub fn ctl_b(&self) -> Ctl<'_> {
        Ctl::new(&self.b, &self.ib, &self.key)
    }

    /// `fabricd` called `name` in namespace B with `extra` flags.
    pub fn fabricd_b(&self, name: &str, extra: &[&str]) -> Proc {
        fabricd(&self.b, &self.ib, name, &self.key, extra)
    }
}

/// The `vmm` a VM test runs.
pub struct TestVmm {
    pub path: PathBuf,
    /// The real vmm of this build (false: a stand-in script).
    pub real: bool,
}

/// The `vmm` of this build (`target/<profile>/vmm`, next to the `deps/` directory the test
/// runs from) when the workspace build made it, as CI always does. Otherwise (a crate-only
/// `cargo test -p fabric`, never under CI) a stand-in script in `dir` that prints its
/// arguments and sleeps, and says so.
pub fn test_vmm(dir: &Path) -> TestVmm {
    let built = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.join("vmm")))
        .filter(|p| p.is_file());
    if let Some(path) = built {
        println!("using the real vmm {} (its built-in guest)", path.display());
        return TestVmm { path, real: true };
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI builds the whole workspace, so target/<profile>/vmm must exist"
    );
    let path = dir.join("vmm-stand-in");
    std::fs::write(&path, "#!/bin/sh\necho \"STAND-IN vmm $*\"\nsleep 60\n").unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    println!(
        "NOTE: vmm is not built (run the workspace's tests): using a STAND-IN ({})",
        path.display()
    );
    TestVmm { path, real: false }
}
