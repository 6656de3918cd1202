//! The pin planner per fixture: SMT order, vnodes sharing a node, memory-only nodes, overcommit
//! and too few CPUs.

mod common;

use common::{explicit, fixture, nodes, FIXTURES};
use numa::{plan_layout, plan_pinning, HostTopology, Layout, PinError, PinPlan};

fn plan(
    host: &HostTopology,
    req: numa::LayoutRequest,
    overcommit: bool,
) -> Result<PinPlan, PinError> {
    let layout = plan_layout(host, &req).unwrap();
    plan_pinning(host, &layout, overcommit)
}

fn with_vcpus(n: u32, vcpus: u32) -> numa::LayoutRequest {
    let mut req = nodes(n);
    req.vcpus = Some(vcpus);
    req
}

/// (fixture, N, vCPUs, vcpu_cpus, vmm_cpus)
#[test]
fn pinning_table() {
    type Row = (&'static str, u32, u32, &'static [u32], &'static [u32]);
    let table: &[Row] = &[
        // All CPUs used: the VMM threads may run anywhere.
        ("one-node-2cpu", 1, 2, &[0, 1], &[0, 1]),
        ("one-node-2cpu", 2, 2, &[0, 1], &[0, 1]),
        ("one-node-2cpu", 1, 1, &[0], &[1]),
        // Cores before SMT siblings: node 0's first threads are 0-3, their siblings 8-11.
        (
            "two-socket-smt",
            2,
            16,
            &[0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15],
            &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
        ),
        (
            "two-socket-smt",
            2,
            10,
            &[0, 1, 2, 3, 8, 4, 5, 6, 7, 12],
            &[9, 10, 11, 13, 14, 15],
        ),
        (
            "two-socket-smt",
            2,
            4,
            &[0, 1, 4, 5],
            &[2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
        ),
        // vnodes 0 and 2 share node 0 without overlap, 1 and 3 node 1.
        (
            "two-socket-smt",
            4,
            8,
            &[0, 1, 4, 5, 2, 3, 6, 7],
            &[8, 9, 10, 11, 12, 13, 14, 15],
        ),
        (
            "four-node-asymmetric",
            4,
            8,
            &[0, 1, 2, 3, 4, 5, 6, 7],
            &[0, 1, 2, 3, 4, 5, 6, 7],
        ),
        ("four-node-asymmetric", 3, 3, &[0, 2, 4], &[1, 3, 5, 6, 7]),
        // Node 0 numbers siblings next to each other: cores (0,1) and (2,3) -> 0, 2, then 1, 3.
        ("memory-only-node", 1, 3, &[0, 2, 1], &[3, 4, 5, 6, 7]),
        ("memory-only-node", 2, 4, &[0, 2, 4, 5], &[1, 3, 6, 7]),
        ("offline-cpu", 1, 3, &[0, 1, 2], &[0, 1, 2]),
        ("no-numa", 2, 2, &[0, 1], &[0, 1]),
    ];
    for name in FIXTURES {
        assert!(table.iter().any(|r| r.0 == name), "{name} has no row");
    }
    for &(name, n, vcpus, vcpu_cpus, vmm_cpus) in table {
        let got = plan(&fixture(name), with_vcpus(n, vcpus), false)
            .unwrap_or_else(|e| panic!("{name} N={n}: {e}"));
        assert_eq!(
            got,
            PinPlan {
                vcpu_cpus: vcpu_cpus.to_vec(),
                vmm_cpus: vmm_cpus.to_vec(),
                shared: false
            },
            "{name} N={n} vcpus={vcpus}"
        );
    }
}

#[test]
fn every_vcpu_stays_on_its_host_node() {
    for name in FIXTURES {
        let host = fixture(name);
        for n in 1..=4 {
            let layout = plan_layout(&host, &nodes(n)).unwrap();
            let pins = match plan_pinning(&host, &layout, false) {
                Ok(pins) => pins,
                Err(PinError::TooFewCpus { .. }) => continue,
                Err(e) => panic!("{name} N={n}: {e}"),
            };
            for v in &layout.vnodes {
                for (&vcpu, cpu) in v.vcpus.iter().zip(pins.vnode_cpus(v)) {
                    assert_eq!(pins.vcpu_cpus[vcpu as usize], cpu);
                    assert_eq!(host.cpu(cpu).unwrap().node, v.host_node, "{name} N={n}");
                }
            }
            let mut used = pins.vcpu_cpus.clone();
            used.sort_unstable();
            used.dedup();
            assert_eq!(
                used.len(),
                pins.vcpu_cpus.len(),
                "{name} N={n}: a CPU twice"
            );
        }
    }
}

#[test]
fn memory_only_node_uses_the_nearest_node_with_cpus() {
    // Node 1 has no CPUs; node 2 (distance 15) is nearer than node 0 (distance 30).
    let host = fixture("memory-only-node");
    let req = explicit(&[
        "vcpus=0-1,memory=1G,host-node=1",
        "vcpus=2-3,memory=1G,host-node=2",
        "vcpus=4,memory=1G,host-node=0",
    ]);
    let pins = plan(&host, req, false).unwrap();
    assert_eq!(pins.vcpu_cpus, [4, 5, 6, 7, 0]);
    assert_eq!(pins.vmm_cpus, [1, 2, 3]);
    // Node 2 is full with vnodes 0 and 1: one more vCPU there needs --overcommit.
    let req = explicit(&[
        "vcpus=0-2,memory=1G,host-node=1",
        "vcpus=3-4,memory=1G,host-node=2",
    ]);
    let err = plan(&host, req.clone(), false).unwrap_err();
    assert_eq!(
        err.to_string(),
        "host node 2 has 4 usable CPUs for 5 vcpus (vnodes 0-1); use --overcommit to share"
    );
    let pins = plan(&host, req, true).unwrap();
    assert_eq!(pins.vcpu_cpus, [4, 5, 6, 7, 4]);
    assert!(pins.shared);
}

#[test]
fn too_few_cpus_and_overcommit() {
    let one = fixture("one-node-2cpu");
    let err = plan(&one, nodes(3), false).unwrap_err();
    assert_eq!(
        err,
        PinError::TooFewCpus {
            node: 0,
            vnodes: "0-2".into(),
            needed: 3,
            available: 2
        }
    );
    assert_eq!(
        err.to_string(),
        "host node 0 has 2 usable CPUs for 3 vcpus (vnodes 0-2); use --overcommit to share"
    );
    let pins = plan(&one, nodes(4), true).unwrap();
    assert_eq!(pins.vcpu_cpus, [0, 1, 0, 1]);
    assert_eq!(pins.vmm_cpus, [0, 1]);
    assert!(pins.shared);
    // Overcommit without need shares nothing.
    assert!(!plan(&one, nodes(2), true).unwrap().shared);

    // On the SMT host, overcommit wraps in core-first order.
    let smt = fixture("two-socket-smt");
    let pins = plan(&smt, with_vcpus(1, 10), true).unwrap();
    assert_eq!(pins.vcpu_cpus, [0, 1, 2, 3, 8, 9, 10, 11, 0, 1]);
    assert_eq!(pins.vmm_cpus, (4..8).chain(12..16).collect::<Vec<_>>());

    let four = fixture("four-node-asymmetric");
    let err = plan(&four, with_vcpus(4, 12), false).unwrap_err();
    assert_eq!(
        err.to_string(),
        "host node 0 has 2 usable CPUs for 3 vcpus (vnodes 0); use --overcommit to share"
    );
}

#[test]
fn restricted_topology_pins_inside_the_allowed_cpus() {
    // The process may use CPUs 2, 3, 10 of node 0 and all memory.
    let host = fixture("two-socket-smt")
        .restrict(&[2, 3, 10], &[0, 1])
        .unwrap();
    let layout = plan_layout(&host, &nodes(1)).unwrap();
    assert_eq!(layout.vcpu_count(), 3);
    let pins = plan_pinning(&host, &layout, false).unwrap();
    assert_eq!(pins.vcpu_cpus, [2, 3, 10]);
    assert_eq!(pins.vmm_cpus, [2, 3, 10]);
}

#[test]
fn hand_made_layouts_are_refused_cleanly() {
    let host = fixture("two-socket-smt");
    let good = plan_layout(&host, &nodes(2)).unwrap();
    let mut bad: Layout = good.clone();
    bad.vnodes[1].host_node = 9;
    assert_eq!(
        plan_pinning(&host, &bad, false).unwrap_err().to_string(),
        "vnode 1: host node 9 is not in the host topology"
    );
    let mut bad = good.clone();
    bad.vnodes[1].vcpus[0] = 0;
    assert_eq!(
        plan_pinning(&host, &bad, false).unwrap_err(),
        PinError::BadVcpu { vcpu: 0 }
    );
    let mut bad = good.clone();
    bad.vnodes[1].vcpus[0] = 99;
    assert_eq!(
        plan_pinning(&host, &bad, false).unwrap_err().to_string(),
        "vcpu 99 is out of range or listed twice in the layout"
    );
    // A topology whose nodes have no CPUs at all.
    let mut cpuless = host;
    cpuless.cpus.clear();
    for node in &mut cpuless.nodes {
        node.cpus.clear();
    }
    assert_eq!(
        plan_pinning(&cpuless, &good, false)
            .unwrap_err()
            .to_string(),
        "no host node has usable CPUs"
    );
}
