//! Helpers shared by the unit tests.

use numa::{GuestRange, Layout, Vnode};

/// A layout from `(vcpus, guest ranges)` per vnode, all on host node 0.
/// One vnode for [`layout`]: its vCPUs and its guest ranges as (start, end).
pub type VnodeShape<'a> = (Vec<u32>, &'a [(u64, u64)]);

pub fn layout(vnodes: &[VnodeShape<'_>], distances: Vec<Vec<u8>>) -> Layout {
    Layout {
        vnodes: vnodes
            .iter()
            .enumerate()
            .map(|(i, (vcpus, ranges))| Vnode {
                id: i as u32,
                vcpus: vcpus.clone(),
                memory_bytes: ranges.iter().map(|r| r.1 - r.0).sum(),
                host_node: 0,
                ranges: ranges
                    .iter()
                    .map(|&(start, end)| GuestRange { start, end })
                    .collect(),
            })
            .collect(),
        distances,
    }
}
