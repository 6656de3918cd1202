//! Helpers shared by the integration tests.
#![allow(dead_code)] // Each test crate uses a different subset.

use std::path::PathBuf;

use numa::{GuestRange, HostTopology, LayoutRequest};

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
