//! The pin planner behind `--pin`: one host CPU per vCPU, inside the vCPU's vnode's host node.
//!
//! # Rules ([`plan_pinning`])
//!
//! - Each vCPU gets its own host CPU of the host node its vnode is mapped to. The vnodes mapped to
//!   one host node share that node's CPUs without overlap: their vCPUs take the node's CPUs in
//!   vnode order, then vCPU order.
//! - A node's CPUs are handed out distinct physical cores first: the first thread of every
//!   `(package, core)` in CPU id order, then the second threads, and so on. SMT siblings are used
//!   only after every core has one vCPU.
//! - A vnode whose host node has no CPUs (a memory-only node) takes its vCPUs from the nearest
//!   node that has CPUs, by the host distance table (lowest id on a tie); it shares that node's
//!   CPUs with the vnodes mapped there as above.
//! - More vCPUs than CPUs on a node is an error naming the node, the vCPUs needed and the CPUs
//!   available, unless `overcommit`: then the node's vCPUs wrap round-robin over its CPUs in the
//!   order above (vCPU `k` of the node gets CPU `k mod available`) and [`PinPlan::shared`] is set.
//! - [`PinPlan::vmm_cpus`], where the VMM's other threads may run, is every allowed CPU no vCPU
//!   uses; when the vCPUs use all of them it is every allowed CPU (the VMM threads then share with
//!   vCPUs: there is nowhere else to go).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::layout::{Layout, Vnode};
use crate::topology::{format_cpu_list, HostTopology};

/// Why no pin plan could be made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
pub enum PinError {
    /// A node has fewer CPUs than the vCPUs placed on it.
    #[error("host node {node} has {available} usable CPUs for {needed} vcpus (vnodes {vnodes}); use --overcommit to share")]
    TooFewCpus {
        /// The host node whose CPUs are short.
        node: u32,
        /// The vnodes placed there, formatted.
        vnodes: String,
        /// vCPUs placed there.
        needed: u32,
        /// Its usable CPUs.
        available: u32,
    },
    /// The layout names a host node the topology does not have.
    #[error("vnode {vnode}: host node {node} is not in the host topology")]
    UnknownHostNode {
        /// The vnode.
        vnode: u32,
        /// The host node.
        node: u32,
    },
    /// No host node has usable CPUs (only possible with a hand-made topology).
    #[error("no host node has usable CPUs")]
    NoCpus,
    /// The layout's vCPU ids are not exactly `0..n` once each.
    #[error("vcpu {vcpu} is out of range or listed twice in the layout")]
    BadVcpu {
        /// The vCPU.
        vcpu: u32,
    },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, PinError>;

/// Where each vCPU thread and the VMM's other threads run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PinPlan {
    /// Host CPU of each vCPU, indexed by vCPU id.
    pub vcpu_cpus: Vec<u32>,
    /// Where the VMM's other threads may run.
    pub vmm_cpus: Vec<u32>,
    /// True when overcommit made vCPUs share CPUs.
    pub shared: bool,
}

impl PinPlan {
    /// The host CPUs of a vnode's vCPUs, in vCPU order.
    pub fn vnode_cpus(&self, vnode: &Vnode) -> Vec<u32> {
        vnode
            .vcpus
            .iter()
            .filter_map(|&v| self.vcpu_cpus.get(v as usize).copied())
            .collect()
    }
}

/// Plans the vCPU pinning of `layout` on `host`; see the module documentation for the rules.
pub fn plan_pinning(host: &HostTopology, layout: &Layout, overcommit: bool) -> Result<PinPlan> {
    // vnodes grouped by the node whose CPUs they run on.
    let mut groups: BTreeMap<u32, Vec<&Vnode>> = BTreeMap::new();
    for v in &layout.vnodes {
        let node = host.node(v.host_node).ok_or(PinError::UnknownHostNode {
            vnode: v.id,
            node: v.host_node,
        })?;
        let cpu_node = if node.cpus.is_empty() {
            nearest_node_with_cpus(host, node.id)?
        } else {
            node.id
        };
        groups.entry(cpu_node).or_default().push(v);
    }

    let mut slots: Vec<Option<u32>> = vec![None; layout.vcpu_count() as usize];
    let mut shared = false;
    for (node, vnodes) in groups {
        let order = cpu_order(host, node);
        let needed: usize = vnodes.iter().map(|v| v.vcpus.len()).sum();
        if needed > order.len() {
            if !overcommit || order.is_empty() {
                let ids: Vec<u32> = vnodes.iter().map(|v| v.id).collect();
                return Err(PinError::TooFewCpus {
                    node,
                    vnodes: format_cpu_list(&ids),
                    needed: needed as u32,
                    available: order.len() as u32,
                });
            }
            shared = true;
        }
        for (k, &vcpu) in vnodes.iter().flat_map(|v| &v.vcpus).enumerate() {
            let slot = slots
                .get_mut(vcpu as usize)
                .filter(|s| s.is_none())
                .ok_or(PinError::BadVcpu { vcpu })?;
            *slot = Some(order[k % order.len()]);
        }
    }
    // `vcpu_count` ids were placed into as many slots, none twice: every slot is filled.
    let vcpu_cpus: Vec<u32> = slots.into_iter().flatten().collect();

    let used: BTreeSet<u32> = vcpu_cpus.iter().copied().collect();
    let mut vmm_cpus: Vec<u32> = host
        .cpus
        .iter()
        .map(|c| c.id)
        .filter(|c| !used.contains(c))
        .collect();
    if vmm_cpus.is_empty() {
        vmm_cpus = host.cpus.iter().map(|c| c.id).collect();
    }
    Ok(PinPlan {
        vcpu_cpus,
        vmm_cpus,
        shared,
    })
}

/// The CPUs of `node`: thread 0 of every physical core in id order, then thread 1, ...
fn cpu_order(host: &HostTopology, node: u32) -> Vec<u32> {
    let mut seen: BTreeMap<(u32, u32), u32> = BTreeMap::new();
    let mut ranked: Vec<(u32, u32)> = host
        .cpus
        .iter()
        .filter(|c| c.node == node)
        .map(|c| {
            let rank = seen.entry((c.package, c.core)).or_default();
            *rank += 1;
            (*rank, c.id)
        })
        .collect();
    ranked.sort_unstable();
    ranked.into_iter().map(|(_, id)| id).collect()
}

/// The node with CPUs closest to `node` by the host distance table (lowest id on a tie).
fn nearest_node_with_cpus(host: &HostTopology, node: u32) -> Result<u32> {
    host.nodes
        .iter()
        .filter(|n| !n.cpus.is_empty())
        .min_by_key(|n| (host.distance(node, n.id).unwrap_or(u8::MAX), n.id))
        .map(|n| n.id)
        .ok_or(PinError::NoCpus)
}
