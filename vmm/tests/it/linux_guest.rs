//! Real Linux guests (issue 5): Debian's kernel and a busybox initramfs (ci/images/linux-guest.sh)
//! booted by `vmm --kernel`, checked from inside the guest (`numactl -H`, sysfs, the kernel's
//! memory ranges per node, our STREAM program) and from the host (vCPU thread affinity in
//! /proc/PID/task, vnode memory in /proc/PID/numa_maps).
//!
//! One entry point picks the route and says which it used:
//! - **direct**: this machine's /dev/kvm is hardware virtualisation (kvm_intel or kvm_amd loaded,
//!   vmx or svm in /proc/cpuinfo): the checks run here, with this build's `vmm`;
//! - **nested TCG**: otherwise (our machines have kvm_pvm, which cannot run an unmodified
//!   kernel): ci/nested/run.sh boots a two-node L1 "host" in QEMU TCG with an SVM CPU, and the
//!   checks run inside it on kvm_amd's nested /dev/kvm with a static `vmm`.
//!
//! Either way ci/nested/linux-guest-checks.sh does every run once (one L1 boot for all of them)
//! and prints what it saw; the tests below share that output and each judges its part.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use numa::{plan_layout, plan_pinning, HostCpu, HostNode, HostTopology, Layout, PinPlan};

use crate::common::have;

/// The guest kernel command line: serial console, reboot at once on a panic (so the VMM sees the
/// guest go), the kernel image at its fixed address (with KASLR its ~33 MiB land in a random
/// node, and a small vnode's MemTotal would then depend on luck), small STREAM arrays (figures
/// under TCG are not performance), and a 1 s hold after STREAM so the host can read the VMM's
/// threads and memory while the guest still runs.
const CMDLINE: &str = "console=ttyS0 quiet panic=-1 nokaslr stream_passes=3 stream_size=1M hold=1";
/// The two-vnode run: the issue's `--numa-nodes 2 --pin`, sized to fit the L1 host.
const RUN_2NODE: &[&str] = &[
    "--numa-nodes",
    "2",
    "--vcpus",
    "2",
    "--memory",
    "512M",
    "--pin",
];
/// Four vnodes, uneven memory and an asymmetric distance matrix; --overcommit because L1 has one
/// CPU per node.
const RUN_4NODE: &[&str] = &[
    "--vnode",
    "vcpus=0,memory=224M",
    "--vnode",
    "vcpus=1,memory=96M",
    "--vnode",
    "vcpus=2,memory=160M",
    "--vnode",
    "vcpus=3,memory=64M",
    "--distances",
    "10,21,31,41;22,10,32,42;33,34,10,23;44,45,24,10",
    "--pin",
    "--overcommit",
];
/// The shape ci/nested/linux-guest-checks.sh gives the guest it boots with QEMU as the L2 VMM
/// (two nodes of 256 MiB, one CPU each, distance 20), as vmm arguments.
const QEMU_LAYOUT: &[&str] = &[
    "--numa-nodes",
    "2",
    "--vcpus",
    "2",
    "--memory",
    "512M",
    "--distances",
    "10,20;20,10",
];
/// Seconds each run inside the checks may take.
const RUN_LIMIT: u32 = 240;
/// The whole route: image builds (static `vmm` and guest-stream on a clean clone included), the
/// L1 boot and every run.
const ROUTE_LIMIT: Duration = Duration::from_secs(1200);
/// What the nested route keeps of its time for building L1's image before QEMU starts (static
/// builds of vmm and guest-stream on a clean clone).
const L1_BUILD_MARGIN: Duration = Duration::from_secs(300);
/// Runs of the nested route at most, when L1 goes down without a status (see `run_route`).
const ROUTE_ATTEMPTS: u32 = 3;
/// What the guest kernel may keep of a node's RAM out of its MemTotal and "Early memory node
/// ranges" (the real-mode area, the BIOS hole, firmware tables).
const RAM_SLACK: u64 = 4 << 20;
/// What a node's MemTotal (and numactl's size) may lack of its planned memory: the kernel image
/// in the first node (about 34 MiB of Debian's cloud kernel, seen under QEMU), each node's
/// struct pages and per-node data.
const RESERVED_SLACK: u64 = 48 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Direct,
    NestedTcg,
}

/// One run of the checks script: its lines between CHECK-BEGIN and CHECK-END, and its status.
#[derive(Debug, Default)]
struct Section {
    lines: Vec<String>,
    rc: Option<i32>,
}

impl Section {
    /// Lines with this prefix, the prefix removed.
    fn tagged<'a>(&'a self, tag: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.lines
            .iter()
            .filter_map(move |l| l.strip_prefix(tag).map(str::trim_start))
    }
    /// The guest's console (the VMM's standard output).
    fn console(&self) -> Vec<&str> {
        self.tagged("CONSOLE").collect()
    }
    fn text(&self) -> String {
        self.lines.join("\n")
    }
}

/// Everything one route run produced.
#[derive(Debug)]
struct Checks {
    route: Route,
    sections: BTreeMap<String, Section>,
    /// The route's status and the end of its output, shown when a run is missing.
    status: Option<i32>,
    tail: String,
}

impl Checks {
    fn section(&self, name: &str) -> &Section {
        self.sections.get(name).unwrap_or_else(|| {
            panic!(
                "the checks printed no section {name:?} (route status {:?}); the end of \
                     their output:\n{}",
                self.status, self.tail
            )
        })
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("vmm/ has a parent")
        .to_path_buf()
}

/// The route this machine takes, and why.
fn pick_route() -> (Route, String) {
    let modules: Vec<&str> = ["kvm_intel", "kvm_amd"]
        .into_iter()
        .filter(|m| Path::new("/sys/module").join(m).exists())
        .collect();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flag = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| {
            l.split_whitespace()
                .find(|f| *f == "vmx" || *f == "svm")
                .map(str::to_string)
        });
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    match (modules.first(), flag, kvm) {
        (Some(m), Some(f), true) => (
            Route::Direct,
            format!("/dev/kvm is {m} and the CPU has {f}: running on this machine's KVM"),
        ),
        (m, f, kvm) => (
            Route::NestedTcg,
            format!(
                "no hardware KVM here (kvm_intel/kvm_amd: {}, vmx/svm: {}, /dev/kvm usable: \
                 {kvm}): running inside an L1 host in QEMU TCG with nested SVM",
                m.copied().unwrap_or("none"),
                f.as_deref().unwrap_or("none")
            ),
        ),
    }
}

/// Kills the child's whole process group when dropped (QEMU, vmm and the scripts' children),
/// whether or not the child itself has ended.
struct GroupGuard(Option<Child>);

impl GroupGuard {
    fn kill_group(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .stderr(Stdio::null())
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill_group();
    }
}

/// Runs `cmd` in its own process group, bounded by `limit`; returns (status, stdout, stderr).
fn run_bounded(mut cmd: Command, limit: Duration) -> Result<(Option<i32>, String, String), String> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let mut guard = GroupGuard(Some(child));
    let child = guard.0.as_mut().expect("just set");
    let pid = child.id();
    // Read both pipes on threads, so neither fills up while we wait.
    let mut out_pipe = child.stdout.take().expect("piped");
    let mut err_pipe = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let end = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            break st;
        }
        if Instant::now() > end {
            drop(guard);
            return Err(format!(
                "{cmd:?} (pid {pid}) did not finish within {limit:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Anything the child left behind would hold the pipes open.
    guard.kill_group();
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    Ok((status.code(), out, err))
}

/// The checks script's environment other than the paths of the binaries and images.
fn check_env() -> Vec<(&'static str, String)> {
    vec![
        ("CMDLINE", CMDLINE.to_string()),
        ("RUN_2NODE", RUN_2NODE.join(" ")),
        ("RUN_4NODE", RUN_4NODE.join(" ")),
        ("LIMIT", RUN_LIMIT.to_string()),
    ]
}

/// Builds an L2 image variant; returns its directory.
fn l2_image(variant: &str) -> Result<PathBuf, String> {
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("ci/images/linux-guest.sh"))
        .args(["--variant", variant]);
    match run_bounded(cmd, ROUTE_LIMIT)? {
        (Some(0), out, _) => Ok(PathBuf::from(out.trim())),
        (rc, _, err) => Err(format!("linux-guest.sh --variant {variant}: {rc:?}\n{err}")),
    }
}

/// Runs the checks on the route and splits the output into sections.
fn run_route(route: Route) -> Result<Checks, String> {
    let checks = repo().join("ci/nested/linux-guest-checks.sh");
    let (rc, out, err) = match route {
        Route::Direct => {
            let (stream, panic) = (l2_image("stream")?, l2_image("panic")?);
            let mut cmd = Command::new("sh");
            cmd.arg(&checks)
                .env("VMM", env!("CARGO_BIN_EXE_vmm"))
                .env("L2_KERNEL", stream.join("vmlinuz"))
                .env("L2_STREAM", stream.join("initramfs.cpio"))
                .env("L2_PANIC", panic.join("initramfs.cpio"))
                .envs(check_env());
            if have("qemu-system-x86_64") {
                cmd.env("QEMU", "qemu-system-x86_64");
            }
            run_bounded(cmd, ROUTE_LIMIT)?
        }
        Route::NestedTcg => {
            // The script L1 runs: our settings, then the checks (L1's /init sets the paths).
            let mut script = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
            let mut text = String::from("#!/bin/sh\n");
            for (k, v) in check_env() {
                text += &format!("export {k}='{v}'\n");
            }
            text += &std::fs::read_to_string(&checks).map_err(|e| e.to_string())?;
            script
                .write_all(text.as_bytes())
                .map_err(|e| e.to_string())?;
            // All attempts together stay within ROUTE_LIMIT (L1's image build included).
            let end = Instant::now() + ROUTE_LIMIT;
            let nested = || {
                let left = end.saturating_duration_since(Instant::now());
                let l1_limit = left.saturating_sub(L1_BUILD_MARGIN).as_secs().max(60);
                let mut cmd = Command::new("bash");
                cmd.arg(repo().join("ci/nested/run.sh"))
                    .arg("--script")
                    .arg(script.path())
                    .args(["--with-qemu", "--timeout", &l1_limit.to_string()]);
                run_bounded(cmd, left)
            };
            // run.sh: 125 when L1 ended without reporting the script's status (L1 itself,
            // QEMU's emulated host, went down). That is the route's machinery, not the VMM
            // under test: say so where CI shows it, with the end of what L1 printed, and run
            // the whole route again (up to ROUTE_ATTEMPTS in all, while time is left).
            let mut attempt = 1;
            loop {
                let (rc, out, err) = nested()?;
                let left = end.saturating_duration_since(Instant::now());
                if rc != Some(125) || attempt == ROUTE_ATTEMPTS || left < L1_BUILD_MARGIN {
                    break (rc, out, err);
                }
                // Kept whole: the tail below is often only the panic's stack.
                let log = repo().join(format!("target/linux-guest-route-attempt{attempt}.log"));
                let _ = std::fs::write(&log, format!("{out}\nstderr:\n{err}"));
                let _ = writeln!(
                    std::io::stderr(),
                    "linux_guest: L1 ended without a status (attempt {attempt}); running the \
                     route again. The end of its output (all of it in {}):\n{}\n{}",
                    log.display(),
                    last_lines(&out, 60),
                    last_lines(&err, 20)
                );
                attempt += 1;
            }
        }
    };
    // The whole output, for reading after a failure (cargo's target directory).
    let log = repo().join("target/linux-guest-route.log");
    let _ = std::fs::write(&log, format!("status {rc:?}\n{out}\nstderr:\n{err}"));
    let _ = writeln!(
        std::io::stderr(),
        "linux_guest: the route's output is in {}",
        log.display()
    );
    let sections = parse_sections(&out);
    if sections.is_empty() || rc.is_none() {
        return Err(format!(
            "the checks did not run (status {rc:?})\nstdout:\n{out}\nstderr:\n{err}"
        ));
    }
    Ok(Checks {
        route,
        sections,
        status: rc,
        tail: format!(
            "{}\nstderr:\n{}",
            last_lines(&out, 120),
            last_lines(&err, 40)
        ),
    })
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn parse_sections(out: &str) -> BTreeMap<String, Section> {
    let mut sections = BTreeMap::new();
    let mut current: Option<(String, Section)> = None;
    for line in out.lines() {
        if let Some(name) = line.split("CHECK-BEGIN ").nth(1) {
            current = Some((name.trim().to_string(), Section::default()));
        } else if let Some(end) = line.split("CHECK-END ").nth(1) {
            if let Some((name, mut s)) = current.take() {
                s.rc = end.split("rc=").nth(1).and_then(|r| r.trim().parse().ok());
                sections.insert(name, s);
            }
        } else if let Some((_, s)) = &mut current {
            s.lines.push(line.to_string());
        }
    }
    sections
}

/// The one route run all tests share (never panics, so a failure is reported to each test).
fn checks() -> &'static Checks {
    static RUN: OnceLock<Result<Checks, String>> = OnceLock::new();
    let run = RUN.get_or_init(|| {
        let (route, why) = pick_route();
        // Straight to stderr, past the test harness's capture: every run says its route.
        let _ = writeln!(std::io::stderr(), "linux_guest: route {route:?}: {why}");
        let started = Instant::now();
        let r = run_route(route);
        let _ = writeln!(
            std::io::stderr(),
            "linux_guest: route {route:?} finished in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        r
    });
    match run {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

/// The host the checks ran on: this machine (direct) or L1 as its `numactl -H` showed it.
fn host_topology(c: &Checks) -> HostTopology {
    if c.route == Route::Direct {
        return HostTopology::current().expect("host topology");
    }
    let numactl: Vec<&str> = c.section("host").tagged("NUMACTL").collect();
    let shape = NumactlShape::parse(&numactl).expect("L1's numactl -H");
    let mut nodes = Vec::new();
    let mut cpus = Vec::new();
    for (i, n) in shape.nodes.iter().enumerate() {
        nodes.push(HostNode {
            id: i as u32,
            cpus: n.cpus.clone(),
            memory_bytes: n.size_mb << 20,
            free_bytes: n.free_mb << 20,
        });
        for &id in &n.cpus {
            // L1's CPUs (qemu64, -smp 2) are one thread per core.
            cpus.push(HostCpu {
                id,
                node: i as u32,
                package: id,
                core: 0,
                thread_siblings: vec![id],
            });
        }
    }
    cpus.sort_by_key(|c| c.id);
    HostTopology {
        nodes,
        cpus,
        distances: shape.distances,
        llc_bytes: 0,
    }
}

/// What `numactl -H` says.
#[derive(Debug, Default)]
struct NumactlShape {
    nodes: Vec<NumactlNode>,
    distances: Vec<Vec<u8>>,
}

#[derive(Debug, Default, Clone)]
struct NumactlNode {
    cpus: Vec<u32>,
    size_mb: u64,
    free_mb: u64,
}

impl NumactlShape {
    fn parse(lines: &[&str]) -> Result<Self, String> {
        let mut s = Self::default();
        let mut count = None;
        let mut in_distances = false;
        for l in lines {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                ["available:", n, "nodes", ..] => {
                    let n: usize = n.parse().map_err(|_| format!("bad line {l:?}"))?;
                    s.nodes = vec![NumactlNode::default(); n];
                    count = Some(n);
                }
                ["node", id, "cpus:", rest @ ..] => {
                    let node = node_mut(&mut s.nodes, id)?;
                    node.cpus = rest.iter().filter_map(|c| c.parse().ok()).collect();
                }
                ["node", id, "size:", mb, "MB"] => {
                    node_mut(&mut s.nodes, id)?.size_mb = mb.parse().unwrap_or(0);
                }
                ["node", id, "free:", mb, "MB"] => {
                    node_mut(&mut s.nodes, id)?.free_mb = mb.parse().unwrap_or(0);
                }
                ["node", "distances:"] => in_distances = true,
                [row, rest @ ..] if in_distances && row.ends_with(':') => {
                    s.distances
                        .push(rest.iter().filter_map(|d| d.parse().ok()).collect());
                }
                _ => {}
            }
        }
        match count {
            Some(n) if s.distances.len() == n => Ok(s),
            _ => Err(format!("cannot read numactl -H: {lines:#?}")),
        }
    }
}

fn node_mut<'a>(nodes: &'a mut [NumactlNode], id: &str) -> Result<&'a mut NumactlNode, String> {
    id.parse::<usize>()
        .ok()
        .and_then(|i| nodes.get_mut(i))
        .ok_or_else(|| format!("numactl -H names node {id} it did not count"))
}

/// The test's own plan for `args`, made with the `numa` crate on the host the checks ran on.
fn plan(c: &Checks, args: &[&str]) -> (Layout, PinPlan) {
    let mut req = vmm::VmConfig::with_numa_nodes(1).layout;
    req.numa_nodes = None;
    let mut it = args.iter();
    let mut overcommit = false;
    while let Some(a) = it.next() {
        let mut value = || *it.next().expect("a value");
        match *a {
            "--numa-nodes" => req.numa_nodes = Some(value().parse().unwrap()),
            "--vcpus" => req.vcpus = Some(value().parse().unwrap()),
            "--memory" => req.memory_bytes = Some(numa::parse_size(value()).unwrap()),
            "--vnode" => req.vnodes.push(numa::parse_vnode_spec(value()).unwrap()),
            "--distances" => req.distances = Some(numa::parse_distances(value()).unwrap()),
            "--overcommit" => overcommit = true,
            "--pin" => {}
            other => panic!("plan: unexpected argument {other}"),
        }
    }
    let host = host_topology(c);
    let layout = plan_layout(&host, &req).expect("the test's own layout");
    let pins = plan_pinning(&host, &layout, overcommit).expect("the test's own pinning");
    (layout, pins)
}

/// Everything a vmm run with the stream image must show, against the test's plan: the guest's
/// view, then the placement seen from the host.
fn check_vnuma_run(name: &str, args: &[&str]) {
    let c = checks();
    let s = c.section(name);
    let (layout, pins) = plan(c, args);
    check_guest_view(name, s, &layout);
    check_placement(name, s, &layout, &pins);
}

/// The guest powered off (the VMM exited 0), and saw `layout` exactly: numactl -H, sysfs, its
/// RAM per node, STREAM per node.
fn check_guest_view(name: &str, s: &Section, layout: &Layout) {
    let text = s.text();
    let console = s.console();
    assert_eq!(s.rc, Some(0), "{name}: the VMM did not exit 0\n{text}");
    assert!(
        console.iter().any(|l| l.contains("L2-POWEROFF")),
        "{name}: the guest did not power off\n{text}"
    );
    check_rtc(name, &console);
    let n = layout.vnodes.len();

    // numactl -H in the guest: the planned nodes, CPUs, sizes and distances.
    let from = console
        .iter()
        .position(|l| l.contains("L2-NUMACTL-BEGIN"))
        .expect("numactl ran");
    let to = console
        .iter()
        .position(|l| l.contains("L2-NUMACTL-END rc=0"))
        .unwrap_or_else(|| panic!("{name}: numactl -H failed\n{text}"));
    let shape = NumactlShape::parse(&console[from + 1..to]).unwrap();
    assert_eq!(shape.nodes.len(), n, "{name}: guest nodes\n{text}");
    assert_eq!(shape.distances, layout.distances, "{name}: guest distances");
    for (v, g) in layout.vnodes.iter().zip(&shape.nodes) {
        assert_eq!(g.cpus, v.vcpus, "{name}: CPUs of guest node {}", v.id);
        let mib = v.memory_bytes >> 20;
        assert!(
            g.size_mb > 0 && g.size_mb <= mib && g.size_mb + (RESERVED_SLACK >> 20) >= mib,
            "{name}: guest node {} has {} MB of {} MiB planned",
            v.id,
            g.size_mb,
            mib
        );
    }

    // /sys/devices/system/node agrees.
    let sysfs: Vec<&str> = s
        .console()
        .into_iter()
        .filter_map(|l| l.split("L2-SYSFS-NODE ").nth(1))
        .collect();
    assert_eq!(sysfs.len(), n, "{name}: sysfs nodes\n{text}");
    for (v, line) in layout.vnodes.iter().zip(&sysfs) {
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(k))
                .unwrap_or_else(|| panic!("{name}: no {k} in {line}"))
                .to_string()
        };
        assert_eq!(numa::parse_cpu_list(&field("cpulist=")).unwrap(), v.vcpus);
        let row: Vec<u8> = field("distance=")
            .split(',')
            .map(|d| d.parse().unwrap())
            .collect();
        assert_eq!(row, layout.distances[v.id as usize], "{name}: sysfs {line}");
        let kb: u64 = field("memtotal_kb=").parse().unwrap();
        assert!(
            kb > 0 && kb * 1024 <= v.memory_bytes && kb * 1024 + RESERVED_SLACK >= v.memory_bytes,
            "{name}: {line}"
        );
    }

    // The kernel's RAM per node (e820 and SRAT): inside the vnode's guest-physical ranges, all
    // of it but the low holes.
    let mut ram = vec![0u64; n];
    for l in console
        .iter()
        .filter_map(|l| l.split("L2-MEMRANGE ").nth(1))
    {
        let f: Vec<&str> = l.split_whitespace().collect();
        let node: usize = f[0].parse().unwrap();
        let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
        let (start, end) = (hex(f[1]), hex(f[2]) + 1);
        let v = &layout.vnodes[node];
        assert!(
            v.ranges.iter().any(|r| r.start <= start && end <= r.end),
            "{name}: node {node} RAM {start:#x}-{end:#x} outside {:?}",
            v.ranges
        );
        ram[node] += end - start;
    }
    for v in &layout.vnodes {
        let got = ram[v.id as usize];
        assert!(
            got <= v.memory_bytes && got + RAM_SLACK >= v.memory_bytes,
            "{name}: node {} has {got:#x} bytes of RAM, planned {:#x}",
            v.id,
            v.memory_bytes
        );
    }

    // Our STREAM program ran on every guest CPU, per node, and validated.
    check_stream(name, &console, layout);
}

/// Seen from the host while the guest ran: vCPU threads and vnode memory where `pins` and
/// `layout` put them.
/// The guest has a CMOS clock (rtc-cmos registered rtc0) that reads the host's time, and its own
/// clock agrees with it.
fn check_rtc(name: &str, console: &[&str]) {
    let line = console
        .iter()
        .find_map(|l| l.split("L2-RTC ").nth(1))
        .unwrap_or_else(|| panic!("{name}: no L2-RTC line"));
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .unwrap_or("none")
    };
    assert!(field("name=").contains("rtc_cmos"), "{name}: {line}");
    let rtc: u64 = field("since_epoch=")
        .parse()
        .unwrap_or_else(|_| panic!("{name}: {line}"));
    let date: u64 = field("date=").parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // The guest ran at most the route's time ago.
    assert!(
        rtc <= now + 60 && rtc + ROUTE_LIMIT.as_secs() + 60 >= now,
        "{name}: RTC reads {rtc}, the host {now}: {line}"
    );
    assert!(rtc.abs_diff(date) <= 60, "{name}: {line}");
}

fn check_placement(name: &str, s: &Section, layout: &Layout, pins: &PinPlan) {
    let text = s.text();
    let n = layout.vnodes.len();
    // vCPU threads pinned as planned (seen in /proc/PID/task of the host, L1 or this machine).
    let vcpus: Vec<(u32, Vec<u32>)> = s
        .tagged("PROC-VCPU")
        .map(|l| {
            let (comm, cpus) = l.split_once(' ').expect("name and list");
            let v = comm.trim_start_matches("vcpu").parse().unwrap();
            (v, numa::parse_cpu_list(cpus.trim()).unwrap())
        })
        .collect();
    assert_eq!(
        vcpus.len(),
        layout.vcpu_count() as usize,
        "{name}: vcpu threads\n{text}"
    );
    for (v, cpus) in &vcpus {
        assert_eq!(cpus, &vec![pins.vcpu_cpus[*v as usize]], "{name}: vcpu{v}");
    }

    // Each vnode's memory on its host node (numa_maps of the VMM on the host).
    let maps: Vec<&str> = s.tagged("PROC-NUMA-MAPS").collect();
    assert_eq!(maps.len(), n, "{name}: bound mappings {maps:#?}");
    let mut bound: Vec<u32> = Vec::new();
    for line in &maps {
        let node = line
            .split(" bind:")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap();
        let counts: Vec<&str> = line
            .split_whitespace()
            .filter(|f| f.starts_with('N') && f.contains('='))
            .collect();
        assert!(!counts.is_empty(), "{name}: no resident pages: {line}");
        assert!(
            counts.iter().all(|c| c.starts_with(&format!("N{node}="))),
            "{name}: pages off node {node}: {line}"
        );
        bound.push(node.parse().unwrap());
    }
    let mut planned: Vec<u32> = layout.vnodes.iter().map(|v| v.host_node).collect();
    bound.sort_unstable();
    planned.sort_unstable();
    assert_eq!(bound, planned, "{name}: host nodes of the vnodes' memory");
}

fn check_stream(name: &str, console: &[&str], layout: &Layout) {
    assert!(
        console.iter().any(|l| l.contains("Solution Validates")),
        "{name}: STREAM did not validate\n{}",
        console.join("\n")
    );
    assert!(console.iter().any(|l| l.contains("L2-STREAM-END rc=0")));
    let json = console
        .iter()
        .find_map(|l| l.split("STREAM-JSON ").nth(1))
        .expect("STREAM-JSON line");
    let j: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(j["validated"], true);
    let per_node = j["per_node"].as_array().unwrap();
    assert_eq!(per_node.len(), layout.vnodes.len(), "{name}: {json}");
    for (v, g) in layout.vnodes.iter().zip(per_node) {
        assert_eq!(g["node"].as_u64(), Some(u64::from(v.id)));
        assert_eq!(crate::common::u32s(&g["cpus"]), v.vcpus);
        for k in vmm_guest::abi::KERNELS {
            assert!(g["kernels"][k]["mb_s"].as_f64().unwrap() > 0.0, "{g}");
        }
    }
}

#[test]
fn route_boots_linux_with_qemu_as_the_l2_vmm() {
    let c = checks();
    let host = c.section("host");
    if c.route == Route::NestedTcg {
        assert!(
            host.tagged("KVM-MODULES").any(|m| m.contains("kvm_amd")),
            "kvm_amd in L1\n{}",
            host.text()
        );
        let l1 = NumactlShape::parse(&host.tagged("NUMACTL").collect::<Vec<_>>()).unwrap();
        assert_eq!(l1.nodes.len(), 2, "L1 is a two-node host");
    }
    let Some(s) = c.sections.get("qemu-l2") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI installs qemu-system-x86 (ci/packages)"
        );
        eprintln!("SKIP route_boots_linux_with_qemu_as_the_l2_vmm: no qemu-system-x86_64");
        return;
    };
    assert!(
        s.console()
            .iter()
            .any(|l| l.contains("Hypervisor detected: KVM")),
        "the guest runs on KVM\n{}",
        s.text()
    );
    // The same checks of the guest's view as for vmm (QEMU's shape planned with our planner).
    let (layout, _) = plan(c, QEMU_LAYOUT);
    check_guest_view("qemu-l2", s, &layout);
}

#[test]
fn vmm_boots_linux_with_two_pinned_vnodes() {
    check_vnuma_run("vmm-2node", RUN_2NODE);
}

#[test]
fn vmm_linux_guest_sees_an_asymmetric_uneven_four_vnode_layout_exactly() {
    check_vnuma_run("vmm-4node", RUN_4NODE);
}

#[test]
fn vmm_exits_nonzero_on_a_guest_panic_with_the_panic_on_the_console() {
    let s = checks().section("vmm-panic");
    let text = s.text();
    let console = s.console();
    assert!(
        console.iter().any(|l| l.contains("L2-PANIC-NOW")),
        "the panic guest did not boot\n{text}"
    );
    assert!(
        console.iter().any(|l| l.contains("Kernel panic")),
        "no panic on the console\n{text}"
    );
    assert!(
        !text.contains("KILLED after"),
        "vmm had to be killed\n{text}"
    );
    assert!(
        matches!(s.rc, Some(rc) if rc != 0),
        "vmm exit status {:?} after a guest panic\n{text}",
        s.rc
    );
}

#[test]
fn vmm_refuses_bad_kernels_initramfs_and_cmdline_clearly() {
    let c = checks();
    for (name, words) in [
        ("bad-missing-kernel", &["no-such-bzImage"][..]),
        ("bad-random-kernel", &["kernel"][..]),
        ("bad-truncated-kernel", &["kernel"][..]),
        ("bad-huge-initramfs", &["initramfs"][..]),
        ("bad-long-cmdline", &["cmdline", "command line"][..]),
    ] {
        let s = c.section(name);
        let text = s.text();
        assert!(
            matches!(s.rc, Some(1 | 2)),
            "{name}: exit status {:?}\n{text}",
            s.rc
        );
        let stderr: Vec<&str> = s.tagged("STDERR").collect();
        let errors: Vec<&&str> = stderr
            .iter()
            .filter(|l| l.starts_with("vmm: error:"))
            .collect();
        assert_eq!(errors.len(), 1, "{name}: one error line\n{text}");
        assert!(
            words
                .iter()
                .any(|w| errors[0].to_lowercase().contains(&w.to_lowercase())),
            "{name}: {:?} should name {words:?}",
            errors[0]
        );
        assert!(!text.contains("panicked"), "{name}\n{text}");
    }
}

#[test]
fn numactl_output_parses() {
    let lines = [
        "available: 2 nodes (0-1)",
        "node 0 cpus: 0 2",
        "node 0 size: 250 MB",
        "node 0 free: 231 MB",
        "node 1 cpus: 1",
        "node 1 size: 219 MB",
        "node 1 free: 204 MB",
        "node distances:",
        "node   0   1 ",
        "  0:  10  21 ",
        "  1:  22  10 ",
    ];
    let s = NumactlShape::parse(&lines).unwrap();
    assert_eq!(s.nodes[0].cpus, vec![0, 2]);
    assert_eq!((s.nodes[1].size_mb, s.nodes[1].free_mb), (219, 204));
    assert_eq!(s.distances, vec![vec![10, 21], vec![22, 10]]);
    assert!(NumactlShape::parse(&lines[..8]).is_err());
}
