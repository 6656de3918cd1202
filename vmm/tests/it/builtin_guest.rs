//! Tier 2: the built-in guest on this host's real /dev/kvm. For each layout, the guest's own view
//! of its ACPI tables must equal the layout, STREAM must validate, every vCPU thread must sit on
//! its planned CPU (read from /proc while the VM runs) and every vnode's memory on its host node
//! (read from /proc/PID/numa_maps while it runs, and by the VMM with move_pages).

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::{kvm_or_skip, thread_affinities, u32s, vmm, wait_bounded};
use numa::{plan_layout, plan_pinning, HostTopology, LayoutRequest};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(240);

/// What the test saw from outside while the VM ran.
struct Observed {
    /// (thread name, allowed CPUs) of every vcpu thread.
    vcpu_affinity: Vec<(String, Vec<u32>)>,
    /// numa_maps lines of mappings bound to a node.
    bound_maps: Vec<String>,
}

/// Runs vmm with `args` + `--json`, watching /proc while it runs.
fn run_watched(args: &[&str], vcpus: usize) -> (Option<i32>, Value, String, Observed) {
    let child = crate::common::spawn_json(args);
    let pid = child.id();
    let mut seen = Observed {
        vcpu_affinity: Vec::new(),
        bound_maps: Vec::new(),
    };
    let start = Instant::now();
    // The vCPU threads pin themselves right after they start; read their affinity once all of
    // them exist and every one has narrowed its mask (or the run ended).
    while start.elapsed() < LIMIT {
        let now = thread_affinities(pid, "vcpu");
        // Each pinned vCPU thread narrows its mask to one CPU right after it starts.
        if now.len() == vcpus && now.iter().all(|(_, cpus)| cpus.len() == 1) {
            seen.vcpu_affinity = now;
            seen.bound_maps = std::fs::read_to_string(format!("/proc/{pid}/numa_maps"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(" bind:"))
                .map(str::to_string)
                .collect();
            break;
        }
        if std::fs::metadata(format!("/proc/{pid}")).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let out = wait_bounded(child, LIMIT);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {stdout}\nstderr: {stderr}"));
    (out.status.code(), json, stderr, seen)
}

/// Checks one run against the layout the test plans itself with the `numa` crate.
fn check_run(args: &[&str], req: &LayoutRequest, overcommit: bool) {
    let host = HostTopology::current().expect("host topology");
    let layout = plan_layout(&host, req).expect("the test's own plan");
    let pins = plan_pinning(&host, &layout, overcommit).expect("the test's own pin plan");
    let n = layout.vcpu_count() as usize;
    // Passes enough that the vCPU threads live long enough to be seen from /proc.
    let mut all = args.to_vec();
    all.extend(["--pin", "--passes", "20", "--timeout", "200"]);
    let (code, j, stderr, seen) = run_watched(&all, n);
    assert_eq!(code, Some(0), "vmm {all:?} failed: {stderr}\n{j:#}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // The VMM's layout is the one the test planned.
    let vnodes = j["layout"]["vnodes"].as_array().unwrap();
    assert_eq!(vnodes.len(), layout.vnodes.len());
    for (v, out) in layout.vnodes.iter().zip(vnodes) {
        assert_eq!(u32s(&out["vcpus"]), v.vcpus);
        assert_eq!(out["memory_bytes"].as_u64(), Some(v.memory_bytes));
        assert_eq!(out["host_node"].as_u64(), Some(u64::from(v.host_node)));
        assert_eq!(u32s(&out["host_cpus"]), pins.vnode_cpus(v));
    }

    // The guest's view equals the layout.
    assert_eq!(j["guest_view_matches"], true, "{:#}", j["mismatches"]);
    let nodes = j["guest_topology"]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), layout.vnodes.len());
    for (v, g) in layout.vnodes.iter().zip(nodes) {
        assert_eq!(g["id"].as_u64(), Some(u64::from(v.id)));
        assert_eq!(u32s(&g["cpus"]), v.vcpus, "guest CPUs of vnode {}", v.id);
        assert_eq!(g["memory_bytes"].as_u64(), Some(v.memory_bytes));
    }
    let distances: Vec<Vec<u8>> =
        serde_json::from_value(j["guest_topology"]["distances"].clone()).unwrap();
    assert_eq!(distances, layout.distances);

    // STREAM validated, with figures for every kernel, vnode and vCPU.
    let s = &j["stream"];
    assert_eq!(s["validated"], true);
    for k in ["copy", "scale", "add", "triad"] {
        assert!(s[k]["mb_s"].as_f64().unwrap() > 100.0, "{k}: {}", s[k]);
    }
    assert_eq!(s["per_node"].as_array().unwrap().len(), layout.vnodes.len());
    assert_eq!(s["per_vcpu"].as_array().unwrap().len(), n);

    // Each vCPU thread runs on its planned CPU: as the VMM read it back, and as /proc shows it.
    for t in j["vcpu_threads"].as_array().unwrap() {
        let v = t["vcpu"].as_u64().unwrap() as usize;
        assert_eq!(
            u32s(&t["cpus_allowed"]),
            vec![pins.vcpu_cpus[v]],
            "vCPU {v}"
        );
    }
    assert_eq!(
        seen.vcpu_affinity.len(),
        n,
        "vcpu threads seen in /proc: {:?}",
        seen.vcpu_affinity
    );
    for (name, cpus) in &seen.vcpu_affinity {
        let v: usize = name.trim_start_matches("vcpu").parse().unwrap();
        assert_eq!(cpus, &vec![pins.vcpu_cpus[v]], "/proc affinity of {name}");
    }

    // Each vnode's memory is on its host node: the VMM's move_pages sample...
    assert_eq!(j["memory"]["all_local"], true, "{:#}", j["memory"]);
    // ...and numa_maps: one bound mapping per vnode, its pages only on that node.
    assert_eq!(
        seen.bound_maps.len(),
        layout.vnodes.len(),
        "{:?}",
        seen.bound_maps
    );
    for line in &seen.bound_maps {
        let node = line
            .split(" bind:")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap();
        let counts: Vec<&str> = line
            .split_whitespace()
            .filter(|f| f.starts_with('N') && f.contains('='))
            .collect();
        assert!(!counts.is_empty(), "no resident pages: {line}");
        assert!(
            counts.iter().all(|c| c.starts_with(&format!("N{node}="))),
            "{line}"
        );
    }
}

fn request(numa_nodes: u32) -> LayoutRequest {
    vmm::VmConfig::with_numa_nodes(numa_nodes).layout
}

#[test]
fn numa_nodes_1_to_4_pinned_match_the_layout() {
    if !kvm_or_skip("numa_nodes_1_to_4_pinned_match_the_layout") {
        return;
    }
    let host = HostTopology::current().unwrap();
    for n in 1..=4u32 {
        let req = request(n);
        let layout = plan_layout(&host, &req).unwrap();
        // Overcommit only where this host has fewer CPUs than the layout has vCPUs.
        let overcommit = plan_pinning(&host, &layout, false).is_err();
        let n_text = n.to_string();
        let mut args = vec!["--numa-nodes", n_text.as_str()];
        if overcommit {
            args.push("--overcommit");
        }
        check_run(&args, &req, overcommit);
    }
}

#[test]
fn an_uneven_explicit_layout_is_seen_exactly() {
    if !kvm_or_skip("an_uneven_explicit_layout_is_seen_exactly") {
        return;
    }
    let specs = ["vcpus=0-2,memory=160M", "vcpus=3,memory=96M"];
    let mut req = request(1);
    req.numa_nodes = None;
    req.vnodes = specs
        .iter()
        .map(|s| numa::parse_vnode_spec(s).unwrap())
        .collect();
    req.distances = Some(vec![vec![10, 21], vec![21, 10]]);
    let args = [
        "--vnode",
        specs[0],
        "--vnode",
        specs[1],
        "--distances",
        "10,21;21,10",
        "--overcommit",
    ];
    check_run(&args, &req, true);
}

#[test]
fn host_comparison_runs_the_same_kernels_on_the_same_memory() {
    if !kvm_or_skip("host_comparison_runs_the_same_kernels_on_the_same_memory") {
        return;
    }
    let (code, j, stderr) = crate::common::run_json(
        &[
            "--numa-nodes",
            "2",
            "--vcpus",
            "2",
            "--pin",
            "--overcommit",
            "--compare-host",
        ],
        LIMIT,
    );
    assert_eq!(code, Some(0), "{stderr}");
    let host = &j["host_stream"];
    assert_eq!(host["validated"], true);
    assert_eq!(host["array_bytes"], j["stream"]["array_bytes"]);
    for k in ["copy", "scale", "add", "triad"] {
        let (g, h, r) = (
            j["stream"][k]["mb_s"].as_f64().unwrap(),
            host[k]["mb_s"].as_f64().unwrap(),
            j["ratio"][k].as_f64().unwrap(),
        );
        assert!(h > 0.0 && (r - g / h).abs() < 1e-9, "{k}: {g} {h} {r}");
    }
}

#[test]
fn sigterm_ends_the_vm_cleanly() {
    if !kvm_or_skip("sigterm_ends_the_vm_cleanly") {
        return;
    }
    let mut child = vmm()
        .args([
            "--numa-nodes",
            "1",
            "--memory",
            "1G",
            "--passes",
            "64",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Wait until the guest runs (its vCPU threads exist), then stop it.
    let start = Instant::now();
    while thread_affinities(pid, "vcpu").is_empty() && start.elapsed() < LIMIT {
        if child.try_wait().unwrap().is_some() {
            panic!("vmm ended before it could be signalled");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: sends SIGTERM to our own child.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let sent = Instant::now();
    let out = wait_bounded(child, Duration::from_secs(20));
    let stopped = sent.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        out.status.code(),
        Some(1),
        "a stopped run is not a success: {stderr}"
    );
    let j: Value = serde_json::from_slice(&out.stdout).expect("a report even when stopped");
    assert_eq!(j["stopped_by"], "SIGTERM");
    assert!(stopped < Duration::from_secs(5), "took {stopped:?} to stop");
}

#[test]
fn hugetlbfs_backing_runs_and_a_short_pool_is_a_clear_error() {
    if !kvm_or_skip("hugetlbfs_backing_runs_and_a_short_pool_is_a_clear_error") {
        return;
    }
    let pool = "/proc/sys/vm/nr_hugepages";
    let Ok(before) = std::fs::read_to_string(pool) else {
        eprintln!("SKIP: no {pool}");
        return;
    };
    // 96 MiB of guest RAM in 2 MiB pages, plus slack; restored afterwards.
    if std::fs::write(pool, "64").is_err() {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root");
        eprintln!("SKIP: cannot reserve huge pages (not root)");
        return;
    }
    let (code, j, stderr) = crate::common::run_json(
        &[
            "--numa-nodes",
            "2",
            "--vcpus",
            "2",
            "--memory",
            "96M",
            "--hugepages",
        ],
        LIMIT,
    );
    std::fs::write(pool, "0").unwrap();
    let short = vmm()
        .args(["--numa-nodes", "1", "--memory", "64M", "--hugepages"])
        .output()
        .unwrap();
    std::fs::write(pool, before.trim()).unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(j["memory"]["backing"], "hugetlb");
    assert_eq!(j["memory"]["all_local"], true);
    assert_eq!(j["stream"]["validated"], true);
    let err = String::from_utf8_lossy(&short.stderr);
    assert_eq!(short.status.code(), Some(1), "{err}");
    assert!(
        err.contains("reserve 2 MiB pages in /proc/sys/vm/nr_hugepages"),
        "{err}"
    );
}

#[test]
fn without_the_prefault_the_guest_faults_its_pages_in_on_their_nodes() {
    if !kvm_or_skip("without_the_prefault_the_guest_faults_its_pages_in_on_their_nodes") {
        return;
    }
    let memory: u64 = 256 << 20;
    let run = |prefault: &str| {
        let (code, j, stderr) = crate::common::run_json(
            &[
                "--numa-nodes",
                "2",
                "--vcpus",
                "2",
                "--memory",
                "256M",
                "--passes",
                "2",
                "--prefault",
                prefault,
            ],
            LIMIT,
        );
        assert_eq!(code, Some(0), "--prefault {prefault}: {stderr}");
        assert_eq!(j["stream"]["validated"], true);
        j["memory"].clone()
    };
    let on = run("on");
    assert_eq!(on["prefault"], true);
    assert_eq!(on["resident_bytes"].as_u64(), Some(memory), "{on:#}");
    let off = run("off");
    assert_eq!(off["prefault"], false, "{off:#}");
    assert_eq!(off["prefault_ms"].as_f64(), Some(0.0));
    // The guest touched its STREAM arrays (most of its RAM), not all of it, and every resident
    // page it faulted in sits on its vnode's host node.
    let resident = off["resident_bytes"].as_u64().unwrap();
    assert!(resident > memory / 2 && resident < memory, "{off:#}");
    assert_eq!(off["all_local"], true, "{off:#}");
    for p in off["placement"].as_array().unwrap() {
        assert!(p["sampled"].as_u64().unwrap() > 0, "{p}");
    }
}
