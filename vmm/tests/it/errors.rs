//! Bad input: every error the issue lists gives its one clear line and the right exit status
//! (2 for usage, 1 for runtime), never a panic.

use std::process::Command;

use crate::common::vmm;

fn expect(args: &[&str], status: i32, message: &str) {
    let out = vmm().args(args).output().expect("vmm runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(status), "{args:?}: {stderr}");
    assert!(
        stderr.contains(message),
        "{args:?}: expected {message:?} in {stderr:?}"
    );
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    let lines = stderr
        .lines()
        .filter(|l| l.starts_with("vmm: error:"))
        .count();
    assert_eq!(lines, 1, "{args:?}: one error line, got {stderr:?}");
}

#[test]
fn impossible_layouts_are_usage_errors() {
    let two = ["--numa-nodes", "2", "--vcpus", "2"];
    let with = |extra: &[&'static str]| [&two[..], extra].concat();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "--vnode",
                "vcpus=0,memory=64M",
                "--vnode",
                "vcpus=2,memory=64M",
            ],
            "vcpu 1 is in no vnode",
        ),
        (
            vec![
                "--vnode",
                "vcpus=0-1,memory=64M",
                "--vnode",
                "vcpus=1,memory=64M",
            ],
            "vcpu 1 is assigned twice",
        ),
        (
            vec![
                "--memory",
                "256M",
                "--vnode",
                "vcpus=0,memory=64M",
                "--vnode",
                "vcpus=1,memory=64M",
            ],
            "add up to 128M but --memory is 256M",
        ),
        (
            vec!["--vnode", "vcpus=0,memory=1000001"],
            "not a multiple of 4 KiB",
        ),
        (
            vec!["--vnode", "vcpus=0,memory=64M,host-node=7"],
            "host node 7 does not exist",
        ),
        (
            with(&["--distances", "11,20;20,10"]),
            "to itself is 11, must be 10",
        ),
        (
            with(&["--distances", "10,255;255,10"]),
            "is 255, must be in 11..=254",
        ),
        (
            with(&["--distances", "10,10;10,10"]),
            "is 10, must be in 11..=254",
        ),
        (
            with(&["--distances", "10,20,30;20,10,30"]),
            "row 0 has 3 entries for 2 vnodes",
        ),
        (
            vec!["--numa-nodes", "4", "--vcpus", "2"],
            "4 vnodes but only 2 vcpus",
        ),
        (vec!["--numa-nodes", "0"], "at least one vnode"),
        (
            vec!["--memory", "100T"],
            "of guest memory requested but the node has",
        ),
        (vec!["--memory", "12Q"], "bad size \"12Q\""),
        (vec!["--vnode", "vcpus=x"], "bad vnode spec"),
        (vec!["--passes", "1"], "runs 2..=64 STREAM passes"),
        (vec!["--vcpus", "300"], "at most 256 vCPUs"),
        (
            vec!["--numa-nodes", "1", "--memory", "8M"],
            "at least 18 MiB",
        ),
        (vec!["--overcommit"], "--overcommit only applies with --pin"),
    ];
    for (args, message) in cases {
        expect(&args, 2, message);
    }
}

#[test]
fn pinning_onto_too_few_cpus_says_to_overcommit() {
    let cpus = numa::HostTopology::current().unwrap().cpus.len();
    let vcpus = (cpus + 1).to_string();
    expect(
        &["--vcpus", &vcpus, "--pin"],
        2,
        "use --overcommit to share",
    );
}

#[test]
fn json_errors_are_machine_readable() {
    let out = vmm()
        .args(["--numa-nodes", "0", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["kind"], "usage");
    assert!(j["error"].as_str().unwrap().contains("at least one vnode"));
}

#[test]
fn kvm_missing_or_forbidden_is_a_runtime_error() {
    // A private mount namespace whose /dev/kvm is gone, or exists without permission for an
    // unprivileged user. Needs root (unshare); our machines and CI run as root.
    // SAFETY: geteuid has no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !crate::common::have("unshare") || !root {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root with unshare"
        );
        eprintln!("SKIP kvm_missing_or_forbidden_is_a_runtime_error: needs root and unshare");
        return;
    }
    let bin = env!("CARGO_BIN_EXE_vmm");
    let script = format!("mount -t tmpfs none /dev && exec {bin} --numa-nodes 1 --memory 64M");
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/dev/kvm does not exist"), "{stderr}");

    // The binary must be reachable by an unprivileged user for the permission case.
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let copy = dir.path().join("vmm");
    std::fs::copy(bin, &copy).unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&copy)
        .args(["--numa-nodes", "1", "--memory", "64M"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no permission to open /dev/kvm"),
        "{stderr}"
    );
}
