//! Helpers for the tests that run the `vmm` binary.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `vmm` binary cargo built for these tests.
pub fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
}

/// True when this machine has a usable /dev/kvm. On our machines it always does; elsewhere a
/// test that needs it says why it skips.
pub fn kvm_or_skip(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: /dev/kvm is not usable, and CI must run every KVM check"
        );
        eprintln!("SKIP {test}: /dev/kvm is not usable on this machine");
    }
    ok
}

/// Starts vmm with `args` and `--json`, both outputs piped.
pub fn spawn_json(args: &[&str]) -> Child {
    vmm()
        .args(args)
        .arg("--json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmm starts")
}

/// Runs vmm with `args` and `--json`, bounded by `limit`; returns status, parsed stdout, stderr.
pub fn run_json(args: &[&str], limit: Duration) -> (Option<i32>, Value, String) {
    let out = wait_bounded(spawn_json(args), limit);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {stdout}\nstderr: {stderr}"));
    (out.status.code(), json, stderr)
}

/// Waits for `child`, killing it after `limit`.
pub fn wait_bounded(mut child: Child, limit: Duration) -> Output {
    let end = Instant::now() + limit;
    loop {
        if child.try_wait().expect("wait works").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > end {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "vmm did not finish within {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A JSON array of numbers as u32s.
pub fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_u64().expect("number") as u32)
        .collect()
}

/// Reads `Cpus_allowed_list` of every thread of `pid` whose name starts with `prefix`.
pub fn thread_affinities(pid: u32, prefix: &str) -> Vec<(String, Vec<u32>)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let dir = t.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let name = name.trim().to_string();
        if !name.starts_with(prefix) {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        if let Some(list) = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        {
            out.push((name, numa::parse_cpu_list(list.trim()).expect("cpu list")));
        }
    }
    out.sort();
    out
}

/// Whether a tool is on PATH.
pub fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| Path::new(&d).join(tool).is_file()))
}
