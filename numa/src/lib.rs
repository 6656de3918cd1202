//! Host NUMA topology, vNUMA layout planning, pinning plans and memory-policy wrappers.
//!
//! One run of the VMM flows through this crate in order:
//!
//! 1. [`HostTopology::current`] reads the host's nodes, CPUs, distances and last-level cache from
//!    sysfs, limited to the CPUs and memory nodes the process may use;
//! 2. [`plan_layout`] turns a [`LayoutRequest`] (`--numa-nodes`, `--vcpus`, `--memory`, explicit
//!    `--vnode` specs, `--distances`) into a [`Layout`]: vnodes with their vCPUs, memory sizes,
//!    host nodes and guest-physical ranges, plus the distance matrix (the vNUMA topology of the
//!    MicroVisor seed, §2.7.1);
//! 3. [`plan_pinning`] gives each vCPU its own host CPU inside its vnode's host node (`--pin`);
//! 4. [`mbind_bind`], [`page_nodes`] and [`set_thread_affinity`] apply and check the plan.
//!
//! Everything but step 4 is pure and tested on sysfs fixtures (`tests/fixtures/`).
#![deny(missing_docs)]

mod layout;
mod mempolicy;
mod pin;
mod topology;

pub use layout::{
    format_distances, format_size, parse_distances, parse_size, parse_vnode_spec, plan_layout,
    stream_memory_bytes, GuestRange, Layout, LayoutError, LayoutRequest, Vnode, VnodeSpec,
    ANY_HOST_NODE, LOCAL_DISTANCE, MAX_VCPUS, PAGE_SIZE, SAME_HOST_NODE_DISTANCE, SPLIT_UNIT,
    STREAM_RESERVE_BYTES,
};
pub use mempolicy::{
    mbind_bind, page_nodes, set_thread_affinity, thread_affinity, MemPolicyError, MAX_CPU_ID,
    MAX_NODE_ID,
};
pub use pin::{plan_pinning, PinError, PinPlan};
pub use topology::{
    format_cpu_list, parse_cpu_list, HostCpu, HostNode, HostTopology, TopologyError, MAX_LIST_ID,
};
