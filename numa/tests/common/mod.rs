//! Helpers shared by the integration tests.
#![allow(dead_code)] // Each test crate uses a different subset.

use std::path::PathBuf;

use numa::{GuestRange, HostTopology, Layout, LayoutRequest};

/// Every checked-in fixture.
pub const FIXTURES: [&str; 6] = [
    "one-node-2cpu",
    "two-socket-smt",
    "four-node-asymmetric",
    "memory-only-node",
    "offline-cpu",
    "no-numa",
];

pub const GIB: u64 = 1 << 30;
pub const MIB: u64 = 1 << 20;

/// The MMIO hole the VMM passes: 3 GiB..4 GiB.
pub const HOLE: GuestRange = GuestRange {
    start: 3 * GIB,
    end: 4 * GIB,
};

pub fn fixture_root(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn fixture(name: &str) -> HostTopology {
    HostTopology::from_sysfs(&fixture_root(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// A request with only `--numa-nodes N`.
pub fn nodes(n: u32) -> LayoutRequest {
    LayoutRequest {
        numa_nodes: Some(n),
        vcpus: None,
        memory_bytes: None,
        vnodes: Vec::new(),
        distances: None,
        mmio_hole: HOLE,
    }
}

/// A request with explicit `--vnode` specs in the command-line syntax.
pub fn explicit(specs: &[&str]) -> LayoutRequest {
    LayoutRequest {
        numa_nodes: None,
        vcpus: None,
        memory_bytes: None,
        vnodes: specs
            .iter()
            .map(|s| numa::parse_vnode_spec(s).unwrap_or_else(|e| panic!("{e}")))
            .collect(),
        distances: None,
        mmio_hole: HOLE,
    }
}

/// Checks what every layout must satisfy.
pub fn check_invariants(layout: &Layout, hole: GuestRange) {
    let n = layout.vcpu_count();
    let mut seen = vec![false; n as usize];
    for (i, v) in layout.vnodes.iter().enumerate() {
        assert_eq!(v.id as usize, i);
        assert!(!v.vcpus.is_empty());
        for &c in &v.vcpus {
            assert!(
                !std::mem::replace(&mut seen[c as usize], true),
                "vcpu {c} twice"
            );
            assert_eq!(layout.vnode_of_vcpu(c), Some(v.id));
        }
        assert_eq!(
            v.ranges.iter().map(|r| r.len()).sum::<u64>(),
            v.memory_bytes
        );
        for r in &v.ranges {
            assert!(!r.is_empty() && r.start % 4096 == 0 && r.end % 4096 == 0);
            assert!(!r.overlaps(&hole), "{r:?} overlaps the hole");
        }
    }
    assert!(seen.iter().all(|&s| s));
    assert_eq!(layout.vnode_of_vcpu(n), None);
    let ranges: Vec<_> = layout.vnodes.iter().flat_map(|v| &v.ranges).collect();
    // Contiguous from GPA 0, jumping only over the hole.
    let first = if hole.start == 0 { hole.end } else { 0 };
    assert_eq!(ranges.first().map(|r| r.start), Some(first));
    for w in ranges.windows(2) {
        let contiguous = w[0].end == w[1].start;
        let over_hole = w[0].end == hole.start && w[1].start == hole.end;
        assert!(contiguous || over_hole, "{:?} {:?}", w[0], w[1]);
    }
}
