//! Interop with the Linux kernel initiator: Debian's stock kernel (cloud-amd64) with `aoe.ko`
//! in a QEMU TCG guest, attached by a tap to a namespace where `aoe-target` runs. The guest's
//! /init (tests/guest/aoe-init.sh) runs the I/O checks with busybox dd and O_DIRECT; the host
//! kills and restarts the target while a write is in flight. Run at MTU 1500 and at 9000
//! (jumbo frames on the tap and in the guest: the driver then moves 17 sectors a frame).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use aoe_target::wire::sectors_per_frame;
use common::{can_run, export_args, Target};

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn sh(cmd: &[&str]) {
    let st = Command::new(cmd[0])
        .args(&cmd[1..])
        .status()
        .expect("spawn");
    assert!(st.success(), "{cmd:?}");
}

/// The guest image, built once per test binary: the tests run in parallel and must not build
/// into the same cache at the same time.
fn image() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(build_image)
}

fn build_image() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let init = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/aoe-init.sh");
    let out = Command::new("timeout")
        .args([
            "600",
            root.join("ci/images/build-initramfs.sh").to_str().unwrap(),
        ])
        .args([
            "--flavour",
            "cloud-amd64",
            "--modules",
            "aoe virtio_net virtio_pci",
            "--init",
        ])
        .arg(&init)
        .output()
        .expect("build-initramfs.sh");
    assert!(
        out.status.success(),
        "image build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn linux_aoe_driver_in_qemu_against_target() {
    if can_run("linux_aoe_driver_in_qemu_against_target") {
        guest_run(1500);
    }
}

#[test]
fn linux_aoe_driver_with_jumbo_frames() {
    if can_run("linux_aoe_driver_with_jumbo_frames") {
        guest_run(9000);
    }
}

/// Boots the guest on a tap of MTU `mtu` (the guest sets its eth0 to the same, from the
/// kernel command line) and runs every check of tests/guest/aoe-init.sh.
fn guest_run(mtu: u32) {
    let image = image();
    let id = std::process::id() % 100_000;
    let ns = Netns(format!("aoeQ{id}m{mtu}"));
    let tap = format!("aoetap{id}{}", mtu / 1000);
    sh(&["ip", "netns", "add", &ns.0]);
    sh(&[
        "ip", "-n", &ns.0, "tuntap", "add", "dev", &tap, "mode", "tap",
    ]);
    sh(&[
        "ip",
        "-n",
        &ns.0,
        "link",
        "set",
        &tap,
        "mtu",
        &mtu.to_string(),
        "up",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("linux.img");
    let args = export_args(&tap, 7, 1, &img, &["--thin", "64M"]);
    let mut target = Some(Target::start(&ns.0, dir.path(), &args));
    let mut qemu = Command::new("timeout")
        .args([
            "-s",
            "KILL",
            "600",
            "ip",
            "netns",
            "exec",
            &ns.0,
            "qemu-system-x86_64",
        ])
        .args(["-accel", "tcg", "-cpu", "qemu64", "-m", "512", "-smp", "1"])
        .arg("-kernel")
        .arg(image.join("vmlinuz"))
        .arg("-initrd")
        .arg(image.join("initramfs.cpio"))
        .args([
            "-append",
            &format!("console=ttyS0 quiet panic=-1 aoe_mtu={mtu}"),
        ])
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-no-reboot",
        ])
        .args([
            "-netdev",
            &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
        ])
        .args(["-device", "virtio-net-pci,netdev=n0,romfile="])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-system-x86_64");
    let (tx, rx) = mpsc::channel();
    let stdout = qemu.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut checks: Vec<(String, bool)> = Vec::new();
    let mut size = None;
    let mut done = false;
    let mut restarted = false;
    let mut console = String::new();
    let deadline = Instant::now() + Duration::from_secs(540);
    while Instant::now() < deadline && !done {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(1)) else {
            if qemu.try_wait().ok().flatten().is_some() {
                break;
            }
            continue;
        };
        console.push_str(&line);
        console.push('\n');
        // SeaBIOS escape sequences may precede a marker on the same line.
        let Some(at) = line.find("AOE-") else {
            continue;
        };
        let words: Vec<&str> = line[at..].split_whitespace().collect();
        match words.as_slice() {
            ["AOE-CHECK", name, result] => checks.push((name.to_string(), *result == "PASS")),
            ["AOE-SIZE", n] => size = n.parse::<u64>().ok(),
            ["AOE-PHASE", "restart-begin"] => {
                std::thread::sleep(Duration::from_millis(100));
                if let Some(t) = target.take() {
                    t.signal("KILL");
                }
                std::thread::sleep(Duration::from_millis(500));
                target = Some(Target::start(&ns.0, dir.path(), &args));
                restarted = true;
            }
            ["AOE-DONE"] => done = true,
            _ => {}
        }
    }
    let _ = qemu.kill();
    let _ = qemu.wait();
    assert!(done, "guest did not finish; console:\n{console}");
    assert!(restarted, "the target was not restarted mid-run");
    assert_eq!(
        size,
        Some(64 << 11),
        "size seen by Linux; console:\n{console}"
    );
    let want = [
        "discovery",
        "write-1k",
        "write-3k",
        "write-17-sectors",
        "write-1m",
        "last-sector",
        "read-past-end",
        "thin-zeros",
        "restart-inflight-write",
        "restart-readback",
        "restart-earlier-intact",
    ];
    for w in want {
        let r = checks.iter().find(|(n, _)| n == w);
        assert_eq!(
            r.map(|(_, ok)| *ok),
            Some(true),
            "check {w}; console:\n{console}"
        );
    }
    // What the driver puts in a frame: (MTU - 36) / 512 sectors, as the target advertises.
    let payload = sectors_per_frame(mtu) as usize * 512;
    assert!(
        console.contains(&format!("AOE-PAYLOAD {payload}\n")),
        "{payload}-byte frames at MTU {mtu}:\n{console}"
    );
    // The restarted target received writes: the 24 MiB write was still in flight at the kill.
    let st = target.as_ref().unwrap().fresh_status();
    assert!(st["exports"][0]["writes"].as_u64().unwrap() > 0, "{st}");
}
