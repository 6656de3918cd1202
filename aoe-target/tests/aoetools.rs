//! aoetools (`aoeping`, `aoecfg`, Debian package `aoetools`) against our target, compared with
//! vblade (Debian package `vblade`) on the same segment: the answers must match where vblade
//! is right, and ours must also work where vblade's unpadded replies fail (aoe-anchors §2.1).

mod common;

use std::process::{Child, Command, Stdio};

use common::{can_run, export_args, run_bounded, sparse_file, NetPair, Target};

struct Vblade(Child);

impl Drop for Vblade {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn aoeping_and_aoecfg_answer_as_vblade_does() {
    if !can_run("aoeping_and_aoecfg_answer_as_vblade_does") {
        return;
    }
    for tool in ["aoeping", "aoecfg", "vblade"] {
        assert!(
            have(tool),
            "{tool} missing: install the Debian packages in ci/packages/aoe-target.txt"
        );
    }
    let net = NetPair::new(1500);
    let dir = tempfile::tempdir().unwrap();
    let ours = sparse_file(dir.path(), "ours.img", 64 << 20);
    let theirs = sparse_file(dir.path(), "vblade.img", 64 << 20);
    let _t = Target::start(&net.t, dir.path(), &export_args(&net.tv, 7, 1, &ours, &[]));
    let _v = Vblade(
        Command::new("timeout")
            .args([
                "-s",
                "KILL",
                "120",
                "ip",
                "netns",
                "exec",
                &net.t,
                "vblade",
                "7",
                "2",
                &net.tv,
                theirs.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("vblade"),
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    let ns = net.i.clone();
    let iv = net.iv.clone();
    let tool = |slot: u8, args: &[&str]| -> (i32, String) {
        let slot = slot.to_string();
        let mut cmd: Vec<&str> = args.to_vec();
        cmd.extend(["7", &slot, &iv]);
        run_bounded(6, &ns, &cmd)
    };
    // vblade's bug: with an empty config string its replies are 32 bytes, which aoetools drop.
    let (rc, _) = tool(2, &["aoeping", "-s", "2"]);
    assert_ne!(
        rc, 0,
        "vblade answered aoeping with a runt reply: the bug is gone?"
    );
    let (rc, out) = tool(1, &["aoeping", "-v", "-s", "2"]);
    assert_eq!(
        rc, 0,
        "our target must answer aoeping with an empty config string: {out}"
    );
    assert!(out.contains("found e7.1"), "{out}");
    // Give vblade a config string long enough (>= 28 bytes) for 60-byte replies; the set
    // itself succeeds even if aoecfg misses the reply.
    let long = "0123456789012345678901234567890";
    tool(2, &["aoecfg", "-c", "set", "-s", long, "-t", "2"]);
    let script: Vec<Vec<&str>> = vec![
        vec!["aoecfg", "-c", "set", "-s", long, "-t", "2"],
        vec!["aoecfg", "-c", "read", "-t", "2"],
        vec![
            "aoecfg",
            "-c",
            "set",
            "-s",
            "another-owner-another-owner-xx",
            "-t",
            "2",
        ],
        vec!["aoecfg", "-c", "test", "-s", long, "-t", "2"],
        vec!["aoecfg", "-c", "test", "-s", "0123", "-t", "2"],
        vec!["aoecfg", "-c", "prefix", "-s", "0123", "-t", "2"],
        vec!["aoecfg", "-c", "prefix", "-s", "9", "-t", "2"],
        vec!["aoeping", "-s", "2"],
        vec!["aoeping", "-S", "return_status", "-s", "2"],
    ];
    for args in &script {
        let (rc1, out1) = tool(1, args);
        let (rc2, out2) = tool(2, args);
        let norm = |s: &str| s.replace("e7.1", "e7.X").replace("e7.2", "e7.X");
        assert_eq!(
            (rc1, norm(&out1)),
            (rc2, norm(&out2)),
            "{args:?}: ours vs vblade"
        );
    }
    // IDENTIFY: both report a disk; ours names itself.
    let (rc, out) = tool(1, &["aoeping", "-I", "-s", "2"]);
    assert_eq!(rc, 0);
    assert!(
        out.contains("serial_number: 7.1:") && out.contains("model: aoe-target"),
        "{out}"
    );
    let (rc, out) = tool(2, &["aoeping", "-I", "-s", "2"]);
    assert_eq!(rc, 0, "{out}");
}
