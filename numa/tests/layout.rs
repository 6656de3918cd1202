//! The layout planner over every fixture: defaults for N = 1..4, explicit layouts, and every
//! validation error with its message.

mod common;

use common::{check_invariants, explicit, fixture, nodes, FIXTURES, GIB, HOLE, MIB};
use numa::{
    plan_layout, stream_memory_bytes, GuestRange, HostNode, HostTopology, LayoutError,
    LayoutRequest, VnodeSpec, ANY_HOST_NODE,
};

/// Default layouts: (fixture, N, vCPUs per vnode, host node per vnode, distances).
#[test]
fn defaults_over_every_fixture() {
    type Row = (
        &'static str,
        u32,
        &'static [u32],
        &'static [u32],
        &'static [&'static [u8]],
    );
    let table: &[Row] = &[
        ("one-node-2cpu", 1, &[2], &[0], &[&[10]]),
        (
            "one-node-2cpu",
            2,
            &[1, 1],
            &[0, 0],
            &[&[10, 20], &[20, 10]],
        ),
        (
            "one-node-2cpu",
            3,
            &[1, 1, 1],
            &[0, 0, 0],
            &[&[10, 20, 20], &[20, 10, 20], &[20, 20, 10]],
        ),
        (
            "one-node-2cpu",
            4,
            &[1, 1, 1, 1],
            &[0, 0, 0, 0],
            &[
                &[10, 20, 20, 20],
                &[20, 10, 20, 20],
                &[20, 20, 10, 20],
                &[20, 20, 20, 10],
            ],
        ),
        ("two-socket-smt", 1, &[16], &[0], &[&[10]]),
        (
            "two-socket-smt",
            2,
            &[8, 8],
            &[0, 1],
            &[&[10, 21], &[21, 10]],
        ),
        (
            "two-socket-smt",
            3,
            &[6, 5, 5],
            &[0, 1, 0],
            &[&[10, 21, 20], &[21, 10, 21], &[20, 21, 10]],
        ),
        (
            "two-socket-smt",
            4,
            &[4, 4, 4, 4],
            &[0, 1, 0, 1],
            &[
                &[10, 21, 20, 21],
                &[21, 10, 21, 20],
                &[20, 21, 10, 21],
                &[21, 20, 21, 10],
            ],
        ),
        ("four-node-asymmetric", 1, &[8], &[0], &[&[10]]),
        (
            "four-node-asymmetric",
            2,
            &[4, 4],
            &[0, 1],
            &[&[10, 16], &[16, 10]],
        ),
        (
            "four-node-asymmetric",
            3,
            &[3, 3, 2],
            &[0, 1, 2],
            &[&[10, 16, 22], &[16, 10, 28], &[20, 26, 10]],
        ),
        (
            "four-node-asymmetric",
            4,
            &[2, 2, 2, 2],
            &[0, 1, 2, 3],
            &[
                &[10, 16, 22, 28],
                &[16, 10, 28, 22],
                &[20, 26, 10, 16],
                &[26, 20, 16, 10],
            ],
        ),
        // Node 1 has no CPUs: default vnodes go round-robin over nodes 0 and 2 only.
        ("memory-only-node", 1, &[8], &[0], &[&[10]]),
        (
            "memory-only-node",
            2,
            &[4, 4],
            &[0, 2],
            &[&[10, 20], &[20, 10]],
        ),
        (
            "memory-only-node",
            3,
            &[3, 3, 2],
            &[0, 2, 0],
            &[&[10, 20, 20], &[20, 10, 20], &[20, 20, 10]],
        ),
        (
            "memory-only-node",
            4,
            &[2, 2, 2, 2],
            &[0, 2, 0, 2],
            &[
                &[10, 20, 20, 20],
                &[20, 10, 20, 20],
                &[20, 20, 10, 20],
                &[20, 20, 20, 10],
            ],
        ),
        ("offline-cpu", 1, &[3], &[0], &[&[10]]),
        ("offline-cpu", 2, &[2, 1], &[0, 0], &[&[10, 20], &[20, 10]]),
        (
            "offline-cpu",
            3,
            &[1, 1, 1],
            &[0, 0, 0],
            &[&[10, 20, 20], &[20, 10, 20], &[20, 20, 10]],
        ),
        (
            "offline-cpu",
            4,
            &[1, 1, 1, 1],
            &[0, 0, 0, 0],
            &[
                &[10, 20, 20, 20],
                &[20, 10, 20, 20],
                &[20, 20, 10, 20],
                &[20, 20, 20, 10],
            ],
        ),
        ("no-numa", 1, &[2], &[0], &[&[10]]),
        ("no-numa", 2, &[1, 1], &[0, 0], &[&[10, 20], &[20, 10]]),
    ];
    for name in FIXTURES {
        assert!(table.iter().any(|r| r.0 == name), "{name} has no row");
    }
    for &(name, n, vcpus, host_nodes, distances) in table {
        let host = fixture(name);
        let layout = plan_layout(&host, &nodes(n)).unwrap_or_else(|e| panic!("{name} N={n}: {e}"));
        check_invariants(&layout, HOLE);
        let ctx = format!("{name} N={n}");
        let counts: Vec<u32> = layout.vnodes.iter().map(|v| v.vcpus.len() as u32).collect();
        assert_eq!(counts, vcpus, "{ctx}");
        let mapped: Vec<u32> = layout.vnodes.iter().map(|v| v.host_node).collect();
        assert_eq!(mapped, host_nodes, "{ctx}");
        assert_eq!(layout.distances, distances, "{ctx}");
        // vCPU ids are contiguous per vnode.
        let flat: Vec<u32> = layout.vnodes.iter().flat_map(|v| v.vcpus.clone()).collect();
        assert_eq!(flat, (0..layout.vcpu_count()).collect::<Vec<_>>(), "{ctx}");
        // Memory: STREAM's rule, equal 2 MiB multiples per vnode.
        assert_eq!(
            layout.memory_bytes(),
            stream_memory_bytes(host.llc_bytes, n),
            "{ctx}"
        );
        for v in &layout.vnodes {
            assert_eq!(
                v.memory_bytes,
                layout.memory_bytes() / u64::from(n),
                "{ctx}"
            );
            assert_eq!(v.memory_bytes % (2 * MIB), 0, "{ctx}");
        }
    }
}

#[test]
fn default_memory_follows_the_llc() {
    // This host: 32 MiB L3, so 3 arrays x 4 x 32 MiB + 18 MiB.
    let layout = plan_layout(&fixture("one-node-2cpu"), &nodes(1)).unwrap();
    assert_eq!(layout.memory_bytes(), 402 * MIB);
    // 30 MiB L3 on 2 vnodes: 378 MiB, 189 MiB each, rounded up to 190 MiB (2 MiB units).
    let layout = plan_layout(&fixture("two-socket-smt"), &nodes(2)).unwrap();
    assert_eq!(layout.vnodes[0].memory_bytes, 190 * MIB);
    assert_eq!(
        layout.vnodes[1].ranges,
        [GuestRange {
            start: 190 * MIB,
            end: 380 * MIB
        }]
    );
}

#[test]
fn numa_nodes_defaults_to_one() {
    let mut req = nodes(1);
    req.numa_nodes = None;
    let layout = plan_layout(&fixture("two-socket-smt"), &req).unwrap();
    assert_eq!(layout.vnodes.len(), 1);
    assert_eq!(layout.vcpu_count(), 16);
}

#[test]
fn overrides_and_remainders() {
    // 7 vCPUs on 3 vnodes: 3, 2, 2. 14 MiB + 4 KiB: 7 units of 2 MiB -> 3, 2, 2 units, and the
    // 4 KiB tail goes to the last vnode.
    let mut req = nodes(3);
    req.vcpus = Some(7);
    req.memory_bytes = Some(14 * MIB + 4096);
    let layout = plan_layout(&fixture("four-node-asymmetric"), &req).unwrap();
    check_invariants(&layout, HOLE);
    let vcpus: Vec<_> = layout.vnodes.iter().map(|v| v.vcpus.clone()).collect();
    assert_eq!(vcpus, [vec![0, 1, 2], vec![3, 4], vec![5, 6]]);
    let sizes: Vec<_> = layout.vnodes.iter().map(|v| v.memory_bytes).collect();
    assert_eq!(sizes, [6 * MIB, 4 * MIB, 4 * MIB + 4096]);
    // Fewer host CPUs than vnodes: vCPUs default to N.
    let layout = plan_layout(&fixture("no-numa"), &nodes(3)).unwrap();
    assert_eq!(layout.vcpu_count(), 3);
}

#[test]
fn vnode_crossing_the_hole_gets_two_ranges() {
    let mut req = nodes(2);
    req.memory_bytes = Some(4 * GIB);
    let layout = plan_layout(&fixture("two-socket-smt"), &req).unwrap();
    check_invariants(&layout, HOLE);
    assert_eq!(
        layout.show(),
        "2 vnodes, 16 vcpus, guest physical layout:\n\
         \x20 0: pnode   0, vcpus 0-7\n\
         \x20   0000000000000000 - 000000007fffffff\n\
         \x20 1: pnode   1, vcpus 8-15\n\
         \x20   0000000080000000 - 00000000bfffffff\n\
         \x20   0000000100000000 - 000000013fffffff\n"
    );
    // An empty hole changes nothing but the addresses.
    req.mmio_hole = GuestRange { start: 0, end: 0 };
    let layout = plan_layout(&fixture("two-socket-smt"), &req).unwrap();
    assert_eq!(
        layout.vnodes[1].ranges,
        [GuestRange {
            start: 2 * GIB,
            end: 4 * GIB
        }]
    );
    // A hole at 0: memory starts above it.
    req.mmio_hole = GuestRange { start: 0, end: MIB };
    let layout = plan_layout(&fixture("two-socket-smt"), &req).unwrap();
    assert_eq!(layout.vnodes[0].ranges[0].start, MIB);
}

#[test]
fn explicit_uneven_layout() {
    let host = fixture("two-socket-smt");
    let req = explicit(&[
        "vcpus=[0-5],memory=3G,host-node=1",
        "vcpus=6-7,memory=1G,node=0",
    ]);
    let layout = plan_layout(&host, &req).unwrap();
    check_invariants(&layout, HOLE);
    assert_eq!(layout.distances, [[10, 21], [21, 10]]);
    assert_eq!(
        layout.show(),
        "2 vnodes, 8 vcpus, guest physical layout:\n\
         \x20 0: pnode   1, vcpus 0-5\n\
         \x20   0000000000000000 - 00000000bfffffff\n\
         \x20 1: pnode   0, vcpus 6-7\n\
         \x20   0000000100000000 - 000000013fffffff\n"
    );
    // The same with the agreeing --numa-nodes, --vcpus, --memory and explicit distances.
    let mut agreeing = req.clone();
    agreeing.numa_nodes = Some(2);
    agreeing.vcpus = Some(8);
    agreeing.memory_bytes = Some(4 * GIB);
    agreeing.distances = Some(vec![vec![10, 40], vec![40, 10]]);
    let with_distances = plan_layout(&host, &agreeing).unwrap();
    assert_eq!(with_distances.vnodes, layout.vnodes);
    assert_eq!(with_distances.distances, [[10, 40], [40, 10]]);
}

#[test]
fn explicit_interleaved_vcpus_and_round_robin_nodes() {
    // vCPU ids need not be contiguous per vnode; host nodes left out go round-robin by index.
    let host = fixture("memory-only-node");
    let req = explicit(&[
        "vcpus=[0,2,4],memory=512M",
        "vcpus=[1,3],memory=256M",
        "vcpus=5,memory=256M,host-node=1",
    ]);
    let layout = plan_layout(&host, &req).unwrap();
    check_invariants(&layout, HOLE);
    let mapped: Vec<_> = layout.vnodes.iter().map(|v| v.host_node).collect();
    assert_eq!(mapped, [0, 2, 1]);
    assert_eq!(layout.vnode_of_vcpu(4), Some(0));
    assert_eq!(layout.vnode_of_vcpu(3), Some(1));
    assert_eq!(layout.distances, [[10, 20, 30], [20, 10, 15], [30, 15, 10]]);
    assert_eq!(
        layout.show().lines().nth(1),
        Some("  0: pnode   0, vcpus 0,2,4")
    );
}

#[test]
fn show_singular() {
    let mut req = nodes(1);
    req.vcpus = Some(1);
    req.memory_bytes = Some(2 * MIB);
    let layout = plan_layout(&fixture("one-node-2cpu"), &req).unwrap();
    assert_eq!(
        layout.show(),
        "1 vnode, 1 vcpu, guest physical layout:\n  0: pnode   0, vcpus 0\n    0000000000000000 - 00000000001fffff\n"
    );
}

fn spec(vcpus: &[u32], memory_bytes: u64, host_node: u32) -> VnodeSpec {
    VnodeSpec {
        vcpus: vcpus.to_vec(),
        memory_bytes,
        host_node,
    }
}

fn with_vnodes(vnodes: Vec<VnodeSpec>) -> LayoutRequest {
    let mut req = nodes(1);
    req.numa_nodes = None;
    req.vnodes = vnodes;
    req
}

/// A host whose only node has (almost) the whole 64-bit space as memory.
fn huge_host() -> HostTopology {
    let mut host = fixture("one-node-2cpu");
    host.nodes = vec![HostNode {
        id: 0,
        cpus: vec![0, 1],
        memory_bytes: u64::MAX,
        free_bytes: u64::MAX,
    }];
    host
}

#[test]
fn every_error_has_its_message() {
    let smt = fixture("two-socket-smt");
    let one = fixture("one-node-2cpu");
    // Node 1's memory is not allowed; node 0 has memory but its CPUs are not allowed.
    let split = smt.clone().restrict(&[4, 5], &[0]).unwrap();
    let req = |f: &dyn Fn(&mut LayoutRequest)| {
        let mut r = nodes(2);
        f(&mut r);
        r
    };
    let cases: Vec<(&HostTopology, LayoutRequest, LayoutError, &str)> = vec![
        (
            &smt,
            nodes(0),
            LayoutError::ZeroVnodes,
            "--numa-nodes is 0: at least one vnode is needed",
        ),
        (
            &smt,
            req(&|r| r.vcpus = Some(9000)),
            LayoutError::TooManyVcpus { vcpus: 9000 },
            "9000 vcpus is more than the limit of 8192",
        ),
        (
            &smt,
            req(&|r| {
                r.numa_nodes = Some(4);
                r.vcpus = Some(2)
            }),
            LayoutError::MoreVnodesThanVcpus {
                vnodes: 4,
                vcpus: 2,
            },
            "4 vnodes but only 2 vcpus: every vnode needs at least one vcpu",
        ),
        (
            &smt,
            with_vnodes(vec![spec(&[0], GIB, 0), spec(&[], GIB, 1)]),
            LayoutError::MoreVnodesThanVcpus {
                vnodes: 2,
                vcpus: 1,
            },
            "2 vnodes but only 1 vcpus: every vnode needs at least one vcpu",
        ),
        (
            &smt,
            with_vnodes(vec![spec(&[0, 1], GIB, 0), spec(&[], GIB, 1)]),
            LayoutError::VnodeWithoutVcpus { vnode: 1 },
            "vnode 1 has no vcpus",
        ),
        (
            &smt,
            with_vnodes(vec![spec(&[0, 1], GIB, 0), spec(&[1, 2], GIB, 1)]),
            LayoutError::VcpuTwice {
                vcpu: 1,
                first: 0,
                second: 1,
            },
            "vcpu 1 is assigned twice: to vnode 0 and to vnode 1",
        ),
        (
            &smt,
            explicit(&["vcpus=0-1,memory=1G", "vcpus=3,memory=1G"]),
            LayoutError::VcpuMissing { vcpu: 2, last: 2 },
            "vcpu 2 is in no vnode: vcpu ids must be exactly 0-2",
        ),
        (
            &smt,
            {
                let mut r = explicit(&["vcpus=0-1,memory=1G", "vcpus=2,memory=1G"]);
                r.vcpus = Some(4);
                r
            },
            LayoutError::VcpuCountMismatch {
                listed: 3,
                requested: 4,
            },
            "the vnodes list 3 vcpus but --vcpus is 4",
        ),
        (
            &smt,
            {
                let mut r = explicit(&["vcpus=0,memory=1G", "vcpus=1,memory=1G"]);
                r.numa_nodes = Some(3);
                r
            },
            LayoutError::VnodeCountMismatch {
                listed: 2,
                requested: 3,
            },
            "2 vnodes are given but --numa-nodes is 3",
        ),
        (
            &smt,
            req(&|r| r.memory_bytes = Some(0)),
            LayoutError::ZeroMemory,
            "memory size is 0",
        ),
        (
            &smt,
            req(&|r| r.memory_bytes = Some(1_000_000)),
            LayoutError::MemoryNotAligned { bytes: 1_000_000 },
            "memory size 1000000 bytes is not a multiple of 4 KiB",
        ),
        (
            &smt,
            with_vnodes(vec![spec(&[0], GIB, 0), spec(&[1], 0, 1)]),
            LayoutError::VnodeZeroMemory { vnode: 1 },
            "vnode 1 memory size is 0",
        ),
        (
            &smt,
            with_vnodes(vec![spec(&[0], 5000, 0)]),
            LayoutError::VnodeMemoryNotAligned {
                vnode: 0,
                bytes: 5000,
            },
            "vnode 0 memory size 5000 bytes is not a multiple of 4 KiB",
        ),
        (
            &smt,
            {
                let mut r = explicit(&["vcpus=0,memory=1G", "vcpus=1,memory=1G"]);
                r.memory_bytes = Some(3 * GIB);
                r
            },
            LayoutError::MemorySumMismatch {
                sum: 2 * GIB,
                requested: 3 * GIB,
            },
            "vnode memory sizes add up to 2G but --memory is 3G",
        ),
        (
            &smt,
            req(&|r| r.memory_bytes = Some(2 * MIB)),
            LayoutError::MemoryTooSmall {
                bytes: 2 * MIB,
                vnodes: 2,
            },
            "memory 2M is too small for 2 vnodes: each needs at least 2M",
        ),
        (
            &smt,
            explicit(&["vcpus=0,memory=1G,host-node=5"]),
            LayoutError::UnknownHostNode {
                vnode: 0,
                node: 5,
                known: "0-1".into(),
            },
            "vnode 0: host node 5 does not exist or is not allowed (host nodes: 0-1)",
        ),
        (
            &split,
            explicit(&["vcpus=0,memory=1G,host-node=1"]),
            LayoutError::HostNodeWithoutMemory { vnode: 0, node: 1 },
            "vnode 0: host node 1 has no memory this process may use",
        ),
        (
            &split,
            nodes(1),
            LayoutError::NoUsableHostNode,
            "no host node has both CPUs and memory this process may use",
        ),
        (
            &one,
            req(&|r| r.memory_bytes = Some(64 * GIB)),
            LayoutError::NotEnoughHostMemory {
                node: 0,
                requested: 64 * GIB,
                available: 5_466_316 << 10,
            },
            "host node 0: 64G of guest memory requested but the node has 5466316K in total",
        ),
        (
            &smt,
            explicit(&["vcpus=0,memory=20G,node=0", "vcpus=1,memory=20G,node=0"]),
            LayoutError::NotEnoughHostMemory {
                node: 0,
                requested: 40 * GIB,
                available: 32 * GIB,
            },
            "host node 0: 40G of guest memory requested but the node has 32G in total",
        ),
        (
            &smt,
            req(&|r| r.distances = Some(vec![vec![10, 20]])),
            LayoutError::DistanceRows { rows: 1, vnodes: 2 },
            "distance matrix has 1 rows for 2 vnodes",
        ),
        (
            &smt,
            req(&|r| r.distances = Some(vec![vec![10, 20], vec![20, 10, 30]])),
            LayoutError::DistanceColumns {
                row: 1,
                len: 3,
                vnodes: 2,
            },
            "distance row 1 has 3 entries for 2 vnodes",
        ),
        (
            &smt,
            req(&|r| r.distances = Some(vec![vec![10, 20], vec![20, 12]])),
            LayoutError::DistanceDiagonal {
                vnode: 1,
                value: 12,
            },
            "distance from vnode 1 to itself is 12, must be 10",
        ),
        (
            &smt,
            req(&|r| r.distances = Some(vec![vec![10, 255], vec![20, 10]])),
            LayoutError::DistanceRange {
                from: 0,
                to: 1,
                value: 255,
            },
            "distance from vnode 0 to vnode 1 is 255, must be in 11..=254",
        ),
        (
            &smt,
            req(&|r| r.distances = Some(vec![vec![10, 20], vec![10, 10]])),
            LayoutError::DistanceRange {
                from: 1,
                to: 0,
                value: 10,
            },
            "distance from vnode 1 to vnode 0 is 10, must be in 11..=254",
        ),
        (
            &smt,
            req(&|r| {
                r.mmio_hole = GuestRange {
                    start: 3 * GIB + 1,
                    end: 4 * GIB,
                }
            }),
            LayoutError::InvalidHole {
                start: 3 * GIB + 1,
                end: 4 * GIB,
            },
            "MMIO hole 0xc0000001-0x100000000 is not a 4 KiB aligned range",
        ),
        (
            &smt,
            req(&|r| {
                r.mmio_hole = GuestRange {
                    start: 4 * GIB,
                    end: 3 * GIB,
                }
            }),
            LayoutError::InvalidHole {
                start: 4 * GIB,
                end: 3 * GIB,
            },
            "MMIO hole 0x100000000-0xc0000000 is not a 4 KiB aligned range",
        ),
    ];
    for (host, request, error, message) in cases {
        let got = plan_layout(host, &request).unwrap_err();
        assert_eq!(got, error, "{message}");
        assert_eq!(got.to_string(), message);
    }
    let mut req = nodes(1);
    req.memory_bytes = Some(u64::MAX - 4095);
    assert_eq!(
        plan_layout(&huge_host(), &req).unwrap_err().to_string(),
        "guest memory does not fit in the 64-bit guest-physical address space"
    );
    // The same size fits without a hole.
    req.mmio_hole = GuestRange { start: 0, end: 0 };
    let layout = plan_layout(&huge_host(), &req).unwrap();
    assert_eq!(layout.vnodes[0].ranges[0].end, u64::MAX - 4095);
}

#[test]
fn any_host_node_is_the_round_robin_marker() {
    let parsed = numa::parse_vnode_spec("vcpus=0,memory=1G").unwrap();
    assert_eq!(parsed.host_node, ANY_HOST_NODE);
    assert!(!parsed.to_string().contains("host-node"));
}

#[test]
fn layout_serializes() {
    let layout = plan_layout(&fixture("two-socket-smt"), &nodes(2)).unwrap();
    let json = serde_json::to_value(&layout).unwrap();
    assert_eq!(json["vnodes"][1]["host_node"], 1);
    assert_eq!(json["vnodes"][1]["vcpus"][0], 8);
    assert_eq!(json["distances"][0][1], 21);
    let err = serde_json::to_value(LayoutError::ZeroVnodes).unwrap();
    assert_eq!(err, "ZeroVnodes");
}
