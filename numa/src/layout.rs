//! The vNUMA layout: the parameters MicroVisor's seed §2.7.1 lists for a vNUMA topology (number
//! of vnodes, distance table, vnode memory sizes, vCPU→vnode map, vnode→pnode map), plus each
//! vnode's guest-physical ranges, and the planner that derives it from a request and the host.
//!
//! # Planner rules ([`plan_layout`])
//!
//! **Default layout** (`vnodes` empty): `N = numa_nodes` (1 when `None`; 0 is an error).
//! - vCPUs: `vcpus`, else `max(N, host.cpus.len())`. They are split into contiguous id blocks:
//!   vnode 0 gets `0..k`, vnode 1 the next block, and so on. Each vnode gets `vcpus / N`; the
//!   remainder `vcpus % N` goes one each to the first vnodes (7 vCPUs on 3 vnodes: 3, 2, 2).
//! - Memory: `memory_bytes`, else [`stream_memory_bytes`]`(host.llc_bytes, N)`. It is split in 2 MiB
//!   units: each vnode gets `units / N` units and the remainder units go one each to the first
//!   vnodes; a tail smaller than 2 MiB (the memory must still be a multiple of 4 KiB) goes to the
//!   last vnode. Memory below `N × 2 MiB` is an error.
//! - vnode `i` is mapped to the `i mod M`-th of the `M` host nodes that have both CPUs and memory,
//!   sorted by id (round-robin).
//!
//! **Explicit layout** (`vnodes` non-empty): vnode `i` is `vnodes[i]`; `numa_nodes`, `vcpus` and
//! `memory_bytes` must be `None` or agree with it. A spec whose `host_node` is [`ANY_HOST_NODE`]
//! gets the round-robin host node of its index, as in the default layout.
//!
//! **Distances**: `distances` when given (validated), else 10 on the diagonal, the host distance
//! between the mapped host nodes for vnodes on different host nodes, and 20 between distinct
//! vnodes on the same host node (the value a non-NUMA host reports between nodes).
//!
//! **Guest-physical ranges**: vnodes are laid out in id order from GPA 0, contiguous, skipping the
//! request's `mmio_hole`; a vnode that reaches the hole gets a second range starting at its end.
//! Sizes are multiples of 4 KiB, so every range is 4 KiB aligned.
//!
//! **Validation** (each a [`LayoutError`] variant): vCPU ids must be exactly `0..n` with none
//! twice, every vnode needs a vCPU (so no more vnodes than vCPUs), sizes must be non-zero multiples
//! of 4 KiB adding up to `memory_bytes`, host nodes must exist and have memory, the sum of the
//! vnodes mapped to a host node must fit in its `memory_bytes`, and the distance matrix must be
//! `n × n` with 10 on the diagonal and 11..=254 elsewhere.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::topology::{format_cpu_list, parse_cpu_list, HostTopology};

/// 4 KiB: the alignment of every size and range.
pub const PAGE_SIZE: u64 = 4 << 10;
/// 2 MiB: the unit the default planner splits memory in.
pub const SPLIT_UNIT: u64 = 2 << 20;
/// Guest memory [`stream_memory_bytes`] adds to STREAM's arrays: the built-in guest's 16 MiB
/// for its image, ACPI tables, page tables and stacks (`vmm_guest::abi::RESERVED_END`), plus
/// 2 MiB for rounding each vCPU's share down to whole pages.
pub const STREAM_RESERVE_BYTES: u64 = 18 << 20;
/// Most vCPUs a layout may have (Cloud Hypervisor's x86_64 limit).
pub const MAX_VCPUS: u32 = 8192;
/// `VnodeSpec::host_node` value meaning "no host node given": the planner picks round-robin.
pub const ANY_HOST_NODE: u32 = u32::MAX;
/// Distance of a node to itself (ACPI SLIT).
pub const LOCAL_DISTANCE: u8 = 10;
/// Distance between two vnodes placed on the same host node.
pub const SAME_HOST_NODE_DISTANCE: u8 = 20;

/// Why a layout request or a layout string was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
pub enum LayoutError {
    /// `--numa-nodes 0`.
    #[error("--numa-nodes is 0: at least one vnode is needed")]
    ZeroVnodes,
    /// More vCPUs than [`MAX_VCPUS`].
    #[error("{vcpus} vcpus is more than the limit of {MAX_VCPUS}")]
    TooManyVcpus {
        /// vCPUs asked for.
        vcpus: u64,
    },
    /// Fewer vCPUs than vnodes.
    #[error("{vnodes} vnodes but only {vcpus} vcpus: every vnode needs at least one vcpu")]
    MoreVnodesThanVcpus {
        /// vnodes asked for.
        vnodes: u32,
        /// vCPUs asked for.
        vcpus: u32,
    },
    /// An explicit vnode with an empty vCPU list.
    #[error("vnode {vnode} has no vcpus")]
    VnodeWithoutVcpus {
        /// The vnode.
        vnode: u32,
    },
    /// A vCPU listed twice.
    #[error("vcpu {vcpu} is assigned twice: to vnode {first} and to vnode {second}")]
    VcpuTwice {
        /// The vCPU.
        vcpu: u32,
        /// First vnode naming it.
        first: u32,
        /// Second vnode naming it.
        second: u32,
    },
    /// A vCPU id in `0..n` no vnode lists.
    #[error("vcpu {vcpu} is in no vnode: vcpu ids must be exactly 0-{last}")]
    VcpuMissing {
        /// The missing vCPU.
        vcpu: u32,
        /// The last valid id (`n - 1`).
        last: u32,
    },
    /// The vnodes list a different number of vCPUs than `--vcpus`.
    #[error("the vnodes list {listed} vcpus but --vcpus is {requested}")]
    VcpuCountMismatch {
        /// vCPUs listed.
        listed: u32,
        /// `--vcpus`.
        requested: u32,
    },
    /// A different number of explicit vnodes than `--numa-nodes`.
    #[error("{listed} vnodes are given but --numa-nodes is {requested}")]
    VnodeCountMismatch {
        /// vnodes listed.
        listed: u32,
        /// `--numa-nodes`.
        requested: u32,
    },
    /// `--memory 0`.
    #[error("memory size is 0")]
    ZeroMemory,
    /// `--memory` not a multiple of 4 KiB.
    #[error("memory size {bytes} bytes is not a multiple of 4 KiB")]
    MemoryNotAligned {
        /// The size.
        bytes: u64,
    },
    /// An explicit vnode of size 0.
    #[error("vnode {vnode} memory size is 0")]
    VnodeZeroMemory {
        /// The vnode.
        vnode: u32,
    },
    /// An explicit vnode size not a multiple of 4 KiB.
    #[error("vnode {vnode} memory size {bytes} bytes is not a multiple of 4 KiB")]
    VnodeMemoryNotAligned {
        /// The vnode.
        vnode: u32,
        /// Its size.
        bytes: u64,
    },
    /// Explicit sizes that do not add up to `--memory`.
    #[error("vnode memory sizes add up to {} but --memory is {}", format_size(*sum), format_size(*requested))]
    MemorySumMismatch {
        /// Sum of the vnode sizes (saturating).
        sum: u64,
        /// `--memory`.
        requested: u64,
    },
    /// Less memory than 2 MiB per vnode.
    #[error("memory {} is too small for {vnodes} vnodes: each needs at least 2M", format_size(*bytes))]
    MemoryTooSmall {
        /// The size.
        bytes: u64,
        /// vnodes.
        vnodes: u32,
    },
    /// A host node that does not exist (or that the process may not use).
    #[error(
        "vnode {vnode}: host node {node} does not exist or is not allowed (host nodes: {known})"
    )]
    UnknownHostNode {
        /// The vnode.
        vnode: u32,
        /// The host node asked for.
        node: u32,
        /// The usable host nodes, formatted.
        known: String,
    },
    /// A host node without usable memory.
    #[error("vnode {vnode}: host node {node} has no memory this process may use")]
    HostNodeWithoutMemory {
        /// The vnode.
        vnode: u32,
        /// The host node.
        node: u32,
    },
    /// No host node has both CPUs and memory: nothing to map default vnodes to.
    #[error("no host node has both CPUs and memory this process may use")]
    NoUsableHostNode,
    /// More memory on a host node than it has.
    #[error("host node {node}: {} of guest memory requested but the node has {} in total", format_size(*requested), format_size(*available))]
    NotEnoughHostMemory {
        /// The host node.
        node: u32,
        /// Bytes of the vnodes mapped to it.
        requested: u64,
        /// Its `memory_bytes`.
        available: u64,
    },
    /// A distance matrix with the wrong number of rows.
    #[error("distance matrix has {rows} rows for {vnodes} vnodes")]
    DistanceRows {
        /// Rows given.
        rows: usize,
        /// vnodes.
        vnodes: u32,
    },
    /// A distance row with the wrong number of entries.
    #[error("distance row {row} has {len} entries for {vnodes} vnodes")]
    DistanceColumns {
        /// The row (vnode).
        row: u32,
        /// Entries in it.
        len: usize,
        /// vnodes.
        vnodes: u32,
    },
    /// A diagonal entry other than 10.
    #[error("distance from vnode {vnode} to itself is {value}, must be 10")]
    DistanceDiagonal {
        /// The vnode.
        vnode: u32,
        /// The value.
        value: u8,
    },
    /// An off-diagonal entry outside 11..=254.
    #[error("distance from vnode {from} to vnode {to} is {value}, must be in 11..=254")]
    DistanceRange {
        /// Row.
        from: u32,
        /// Column.
        to: u32,
        /// The value.
        value: u8,
    },
    /// An MMIO hole that is reversed or not 4 KiB aligned.
    #[error("MMIO hole {start:#x}-{end:#x} is not a 4 KiB aligned range")]
    InvalidHole {
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// The layout does not fit in the 64-bit guest-physical space.
    #[error("guest memory does not fit in the 64-bit guest-physical address space")]
    GpaOverflow,
    /// A malformed `--vnode` spec.
    #[error("bad vnode spec {spec:?}: {reason}")]
    BadSpec {
        /// The spec.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// A malformed size.
    #[error("bad size {value:?}: {reason}")]
    BadSize {
        /// The text.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// A malformed distance matrix.
    #[error("bad distance matrix {value:?}: {reason}")]
    BadDistances {
        /// The text.
        value: String,
        /// What is wrong.
        reason: String,
    },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, LayoutError>;

/// A guest-physical range `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GuestRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl GuestRange {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// True when the range holds no byte.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// True when the ranges share a byte.
    pub fn overlaps(&self, other: &GuestRange) -> bool {
        self.start < other.end && other.start < self.end
    }
}

/// One virtual NUMA node of a planned layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Vnode {
    /// vnode id (its index in [`Layout::vnodes`]).
    pub id: u32,
    /// Its vCPU ids, sorted.
    pub vcpus: Vec<u32>,
    /// Its memory size, a multiple of 4 KiB.
    pub memory_bytes: u64,
    /// The host node its memory is bound to (the seed's "pnode").
    pub host_node: u32,
    /// Its guest-physical ranges, sorted; their lengths add up to `memory_bytes`.
    pub ranges: Vec<GuestRange>,
}

/// A planned vNUMA layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Layout {
    /// The vnodes, by id.
    pub vnodes: Vec<Vnode>,
    /// The distance matrix (SLIT), indexed by vnode id.
    pub distances: Vec<Vec<u8>>,
}

/// An explicit vnode as given on the command line (`--vnode`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VnodeSpec {
    /// Its vCPU ids.
    pub vcpus: Vec<u32>,
    /// Its memory size.
    pub memory_bytes: u64,
    /// Its host node, or [`ANY_HOST_NODE`] for the planner's round-robin choice.
    pub host_node: u32,
}

/// What the user asked for; [`plan_layout`] turns it into a [`Layout`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayoutRequest {
    /// `--numa-nodes N`.
    pub numa_nodes: Option<u32>,
    /// `--vcpus`.
    pub vcpus: Option<u32>,
    /// `--memory`.
    pub memory_bytes: Option<u64>,
    /// Explicit `--vnode` specs; when non-empty, `numa_nodes`, `vcpus` and `memory_bytes` must be
    /// `None` or agree with them.
    pub vnodes: Vec<VnodeSpec>,
    /// Explicit `--distances`.
    pub distances: Option<Vec<Vec<u8>>>,
    /// Guest-physical range no vnode may use (the VMM passes 3 GiB..4 GiB).
    pub mmio_hole: GuestRange,
}

impl Layout {
    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> u32 {
        self.vnodes.iter().map(|v| v.vcpus.len() as u32).sum()
    }

    /// Total guest memory.
    pub fn memory_bytes(&self) -> u64 {
        self.vnodes.iter().map(|v| v.memory_bytes).sum()
    }

    /// The vnode that holds `vcpu`.
    pub fn vnode_of_vcpu(&self, vcpu: u32) -> Option<u32> {
        self.vnodes
            .iter()
            .find(|v| v.vcpus.contains(&vcpu))
            .map(|v| v.id)
    }

    /// The vnode with this id.
    pub fn vnode(&self, id: u32) -> Option<&Vnode> {
        self.vnodes.get(id as usize)
    }

    /// Human text in the style of the seed's `show numa` output (§2.7.1):
    ///
    /// ```text
    /// 2 vnodes, 4 vcpus, guest physical layout:
    ///   0: pnode   0, vcpus 0-1
    ///     0000000000000000 - 000000003fffffff
    ///   1: pnode   0, vcpus 2-3
    ///     0000000040000000 - 000000007fffffff
    /// ```
    ///
    /// One line per guest-physical range, with inclusive ends as in the seed.
    pub fn show(&self) -> String {
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        let vcpus = self.vcpu_count() as usize;
        let mut out = format!(
            "{} vnode{}, {} vcpu{}, guest physical layout:\n",
            self.vnodes.len(),
            plural(self.vnodes.len()),
            vcpus,
            plural(vcpus),
        );
        for v in &self.vnodes {
            out += &format!(
                "  {}: pnode {:>3}, vcpus {}\n",
                v.id,
                v.host_node,
                format_cpu_list(&v.vcpus)
            );
            for r in &v.ranges {
                out += &format!("    {:016x} - {:016x}\n", r.start, r.end.saturating_sub(1));
            }
        }
        out
    }
}

impl fmt::Display for VnodeSpec {
    /// The `--vnode` syntax [`parse_vnode_spec`] reads: `vcpus=[0-3],memory=2G,host-node=0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "vcpus=[{}],memory={}",
            format_cpu_list(&self.vcpus),
            format_size(self.memory_bytes)
        )?;
        if self.host_node != ANY_HOST_NODE {
            write!(f, ",host-node={}", self.host_node)?;
        }
        Ok(())
    }
}

/// Guest memory for the default layout, by STREAM's rule that each of its 3 arrays is at least
/// 4 × the last-level cache: `3 × 4 × llc_bytes + STREAM_RESERVE_BYTES`, rounded up so that each
/// of `numa_nodes` vnodes gets the same multiple of 2 MiB (STREAM splits its arrays evenly across
/// threads, and the vCPUs are spread evenly across vnodes). `numa_nodes` 0 counts as 1.
pub fn stream_memory_bytes(llc_bytes: u64, numa_nodes: u32) -> u64 {
    let n = u64::from(numa_nodes.max(1));
    let total = llc_bytes
        .saturating_mul(12)
        .saturating_add(STREAM_RESERVE_BYTES);
    let units = u128::from(total.div_ceil(n).div_ceil(SPLIT_UNIT)) * u128::from(n);
    // Absurd cache sizes saturate at the largest multiple of `n × 2 MiB` (the planner then reports
    // that the host lacks the memory).
    let max_units = u128::from(u64::MAX / SPLIT_UNIT / n * n);
    (units.min(max_units) as u64) * SPLIT_UNIT
}

/// Plans the layout for `req` on `host`; see the module documentation for the rules.
pub fn plan_layout(host: &HostTopology, req: &LayoutRequest) -> Result<Layout> {
    let hole = req.mmio_hole;
    if hole.start > hole.end || hole.start % PAGE_SIZE != 0 || hole.end % PAGE_SIZE != 0 {
        return Err(LayoutError::InvalidHole {
            start: hole.start,
            end: hole.end,
        });
    }
    let usable: Vec<u32> = host
        .nodes
        .iter()
        .filter(|n| n.has_cpus_and_memory())
        .map(|n| n.id)
        .collect();
    let round_robin = |i: usize| -> Result<u32> {
        if usable.is_empty() {
            return Err(LayoutError::NoUsableHostNode);
        }
        Ok(usable[i % usable.len()])
    };

    let specs = if req.vnodes.is_empty() {
        default_specs(host, req)?
    } else {
        check_explicit(req)?;
        req.vnodes.clone()
    };

    let mut vnodes = Vec::with_capacity(specs.len());
    for (i, spec) in specs.into_iter().enumerate() {
        let id = i as u32;
        let host_node = if spec.host_node == ANY_HOST_NODE {
            round_robin(i)?
        } else {
            spec.host_node
        };
        let node = host
            .node(host_node)
            .ok_or_else(|| LayoutError::UnknownHostNode {
                vnode: id,
                node: host_node,
                known: format_cpu_list(&host.nodes.iter().map(|n| n.id).collect::<Vec<_>>()),
            })?;
        if node.memory_bytes == 0 {
            return Err(LayoutError::HostNodeWithoutMemory {
                vnode: id,
                node: host_node,
            });
        }
        let mut vcpus = spec.vcpus;
        vcpus.sort_unstable();
        vnodes.push(Vnode {
            id,
            vcpus,
            memory_bytes: spec.memory_bytes,
            host_node,
            ranges: Vec::new(),
        });
    }

    check_host_memory(host, &vnodes)?;
    let distances = match &req.distances {
        Some(d) => d.clone(),
        None => derive_distances(host, &vnodes),
    };
    check_distances(&distances, vnodes.len() as u32)?;
    place_ranges(&mut vnodes, hole)?;
    Ok(Layout { vnodes, distances })
}

/// The specs of the default layout (host nodes left to round-robin).
fn default_specs(host: &HostTopology, req: &LayoutRequest) -> Result<Vec<VnodeSpec>> {
    let n = req.numa_nodes.unwrap_or(1);
    if n == 0 {
        return Err(LayoutError::ZeroVnodes);
    }
    let host_cpus = u32::try_from(host.cpus.len()).unwrap_or(u32::MAX);
    let vcpus = req.vcpus.unwrap_or(host_cpus.max(n));
    if vcpus > MAX_VCPUS {
        return Err(LayoutError::TooManyVcpus {
            vcpus: vcpus.into(),
        });
    }
    if n > vcpus {
        return Err(LayoutError::MoreVnodesThanVcpus { vnodes: n, vcpus });
    }
    let memory = req
        .memory_bytes
        .unwrap_or_else(|| stream_memory_bytes(host.llc_bytes, n));
    if memory == 0 {
        return Err(LayoutError::ZeroMemory);
    }
    if memory % PAGE_SIZE != 0 {
        return Err(LayoutError::MemoryNotAligned { bytes: memory });
    }
    if memory < u64::from(n) * SPLIT_UNIT {
        return Err(LayoutError::MemoryTooSmall {
            bytes: memory,
            vnodes: n,
        });
    }
    let units = memory / SPLIT_UNIT;
    let tail = memory % SPLIT_UNIT;
    let mut next_vcpu = 0;
    Ok((0..n)
        .map(|i| {
            let count = vcpus / n + u32::from(i < vcpus % n);
            let first = next_vcpu;
            next_vcpu += count;
            let mut memory_bytes = (units / u64::from(n)
                + u64::from(u64::from(i) < units % u64::from(n)))
                * SPLIT_UNIT;
            if i == n - 1 {
                memory_bytes += tail;
            }
            VnodeSpec {
                vcpus: (first..first + count).collect(),
                memory_bytes,
                host_node: ANY_HOST_NODE,
            }
        })
        .collect())
}

/// Checks explicit vnode specs against each other and against the request's other fields.
fn check_explicit(req: &LayoutRequest) -> Result<()> {
    let specs = &req.vnodes;
    let n = specs.len() as u32;
    if let Some(requested) = req.numa_nodes {
        if requested != n {
            return Err(LayoutError::VnodeCountMismatch {
                listed: n,
                requested,
            });
        }
    }
    let listed: u64 = specs.iter().map(|s| s.vcpus.len() as u64).sum();
    if listed > u64::from(MAX_VCPUS) {
        return Err(LayoutError::TooManyVcpus { vcpus: listed });
    }
    let listed = listed as u32;
    if n > listed {
        return Err(LayoutError::MoreVnodesThanVcpus {
            vnodes: n,
            vcpus: listed,
        });
    }
    if let Some(requested) = req.vcpus {
        if requested != listed {
            return Err(LayoutError::VcpuCountMismatch { listed, requested });
        }
    }
    let mut owner: BTreeMap<u32, u32> = BTreeMap::new();
    for (i, spec) in specs.iter().enumerate() {
        let vnode = i as u32;
        if spec.vcpus.is_empty() {
            return Err(LayoutError::VnodeWithoutVcpus { vnode });
        }
        for &vcpu in &spec.vcpus {
            if let Some(&first) = owner.get(&vcpu) {
                return Err(LayoutError::VcpuTwice {
                    vcpu,
                    first,
                    second: vnode,
                });
            }
            owner.insert(vcpu, vnode);
        }
    }
    // `listed` distinct ids: they are exactly 0..listed unless one of those is missing.
    if let Some(vcpu) = (0..listed).find(|v| !owner.contains_key(v)) {
        return Err(LayoutError::VcpuMissing {
            vcpu,
            last: listed - 1,
        });
    }
    let mut sum = 0u64;
    for (i, spec) in specs.iter().enumerate() {
        let vnode = i as u32;
        if spec.memory_bytes == 0 {
            return Err(LayoutError::VnodeZeroMemory { vnode });
        }
        if spec.memory_bytes % PAGE_SIZE != 0 {
            return Err(LayoutError::VnodeMemoryNotAligned {
                vnode,
                bytes: spec.memory_bytes,
            });
        }
        sum = sum.saturating_add(spec.memory_bytes);
    }
    if let Some(requested) = req.memory_bytes {
        if requested != sum {
            return Err(LayoutError::MemorySumMismatch { sum, requested });
        }
    }
    Ok(())
}

/// Each host node must hold the vnodes mapped to it.
fn check_host_memory(host: &HostTopology, vnodes: &[Vnode]) -> Result<()> {
    let mut per_node: BTreeMap<u32, u64> = BTreeMap::new();
    for v in vnodes {
        let sum = per_node.entry(v.host_node).or_default();
        *sum = sum.saturating_add(v.memory_bytes);
    }
    for (node, requested) in per_node {
        let available = host.node(node).map_or(0, |n| n.memory_bytes);
        if requested > available {
            return Err(LayoutError::NotEnoughHostMemory {
                node,
                requested,
                available,
            });
        }
    }
    Ok(())
}

/// 10 on the diagonal, 20 between vnodes sharing a host node, else the host's distance.
fn derive_distances(host: &HostTopology, vnodes: &[Vnode]) -> Vec<Vec<u8>> {
    vnodes
        .iter()
        .map(|a| {
            vnodes
                .iter()
                .map(|b| {
                    if a.id == b.id {
                        LOCAL_DISTANCE
                    } else if a.host_node == b.host_node {
                        SAME_HOST_NODE_DISTANCE
                    } else {
                        // Both nodes were looked up in `host` by the planner.
                        host.distance(a.host_node, b.host_node)
                            .unwrap_or(SAME_HOST_NODE_DISTANCE)
                    }
                })
                .collect()
        })
        .collect()
}

/// `n × n`, 10 on the diagonal, 11..=254 elsewhere (ACPI SLIT rules; 255 means unreachable).
fn check_distances(d: &[Vec<u8>], n: u32) -> Result<()> {
    if d.len() != n as usize {
        return Err(LayoutError::DistanceRows {
            rows: d.len(),
            vnodes: n,
        });
    }
    for (i, row) in d.iter().enumerate() {
        let from = i as u32;
        if row.len() != n as usize {
            return Err(LayoutError::DistanceColumns {
                row: from,
                len: row.len(),
                vnodes: n,
            });
        }
        for (j, &value) in row.iter().enumerate() {
            let to = j as u32;
            if from == to && value != LOCAL_DISTANCE {
                return Err(LayoutError::DistanceDiagonal { vnode: from, value });
            }
            if from != to && !(11..=254).contains(&value) {
                return Err(LayoutError::DistanceRange { from, to, value });
            }
        }
    }
    Ok(())
}

/// Lays the vnodes out from GPA 0 in order, skipping `hole`.
fn place_ranges(vnodes: &mut [Vnode], hole: GuestRange) -> Result<()> {
    let mut cursor = 0u64;
    for v in vnodes {
        let mut left = v.memory_bytes;
        while left > 0 {
            if cursor >= hole.start && cursor < hole.end {
                cursor = hole.end;
            }
            let end = cursor.checked_add(left).ok_or(LayoutError::GpaOverflow)?;
            let end = if cursor < hole.start && end > hole.start {
                hole.start
            } else {
                end
            };
            v.ranges.push(GuestRange { start: cursor, end });
            left -= end - cursor;
            cursor = end;
        }
    }
    Ok(())
}

/// Parses a `--vnode` spec: `vcpus=0-3,memory=2G,host-node=0`.
///
/// - `vcpus=` (required): one id or range (`3`, `0-3`), or a list in brackets (`[0-1,4,6-7]`);
/// - `memory=` (required): a size as [`parse_size`] reads it;
/// - `host-node=` or its alias `node=` (optional): the host node; without it the planner maps the
///   vnode round-robin like the default layout ([`ANY_HOST_NODE`]).
///
/// [`VnodeSpec`]'s `Display` writes this syntax back.
pub fn parse_vnode_spec(s: &str) -> Result<VnodeSpec> {
    let bad = |reason: String| LayoutError::BadSpec {
        spec: s.to_string(),
        reason,
    };
    let (mut vcpus, mut memory, mut node) = (None, None, None);
    for field in split_top_level(s).map_err(bad)? {
        let (key, value) = field.split_once('=').ok_or_else(|| {
            bad(format!(
                "{field:?} is not key=value (a vcpu list goes in brackets: vcpus=[0-1,4])"
            ))
        })?;
        let (key, value) = (key.trim(), value.trim());
        let slot_taken = match key {
            "vcpus" => {
                let list = value
                    .strip_prefix('[')
                    .and_then(|v| v.strip_suffix(']'))
                    .unwrap_or(value);
                if list.trim().is_empty() {
                    return Err(bad("vcpus is empty".to_string()));
                }
                let ids = parse_cpu_list(list).map_err(|e| bad(format!("vcpus: {e}")))?;
                if let Some(&max) = ids.last().filter(|&&m| m >= MAX_VCPUS) {
                    return Err(bad(format!("vcpu {max} is above {}", MAX_VCPUS - 1)));
                }
                vcpus.replace(ids).is_some()
            }
            "memory" => memory
                .replace(parse_size(value).map_err(|e| bad(format!("memory: {e}")))?)
                .is_some(),
            "host-node" | "node" => {
                let id = value
                    .parse::<u32>()
                    .ok()
                    .filter(|&n| n != ANY_HOST_NODE)
                    .ok_or_else(|| bad(format!("host node {value:?} is not a node id")))?;
                node.replace(id).is_some()
            }
            _ => {
                return Err(bad(format!(
                    "unknown key {key:?} (vcpus, memory, host-node)"
                )))
            }
        };
        if slot_taken {
            return Err(bad(format!("{key} given twice")));
        }
    }
    Ok(VnodeSpec {
        vcpus: vcpus.ok_or_else(|| bad("vcpus= is missing".to_string()))?,
        memory_bytes: memory.ok_or_else(|| bad("memory= is missing".to_string()))?,
        host_node: node.unwrap_or(ANY_HOST_NODE),
    })
}

/// Splits at commas outside `[...]`.
fn split_top_level(s: &str) -> std::result::Result<Vec<&str>, String> {
    let mut fields = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| "unbalanced ']'".to_string())?
            }
            ',' if depth == 0 => {
                fields.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced '['".to_string());
    }
    fields.push(&s[start..]);
    Ok(fields)
}

/// Parses a distance matrix: rows split by `;`, entries by `,` (`"10,20;20,10"`). Only the syntax
/// is checked here; [`plan_layout`] checks the shape and values against the vnodes.
pub fn parse_distances(s: &str) -> Result<Vec<Vec<u8>>> {
    let bad = |reason: String| LayoutError::BadDistances {
        value: s.to_string(),
        reason,
    };
    if s.trim().is_empty() {
        return Err(bad("empty".to_string()));
    }
    s.split(';')
        .map(|row| {
            row.split(',')
                .map(|e| {
                    let e = e.trim();
                    e.parse::<u8>()
                        .map_err(|_| bad(format!("{e:?} is not a distance in 0..=255")))
                })
                .collect()
        })
        .collect()
}

/// Writes a distance matrix in the syntax [`parse_distances`] reads.
pub fn format_distances(d: &[Vec<u8>]) -> String {
    d.iter()
        .map(|row| row.iter().map(u8::to_string).collect::<Vec<_>>().join(","))
        .collect::<Vec<_>>()
        .join(";")
}

const SUFFIXES: [(char, u32); 4] = [('T', 40), ('G', 30), ('M', 20), ('K', 10)];

/// Parses a size: decimal digits with an optional binary suffix `K`, `M`, `G` or `T` (either
/// case): `"512M"`, `"2G"`, `"1073741824"`.
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = |reason: &str| LayoutError::BadSize {
        value: s.to_string(),
        reason: reason.to_string(),
    };
    let t = s.trim();
    let (digits, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some(c) if c.is_ascii_alphabetic() => {
            let shift = SUFFIXES
                .iter()
                .find(|(sfx, _)| *sfx == c)
                .map(|&(_, shift)| shift)
                .ok_or_else(|| bad("the suffix must be K, M, G or T"))?;
            (&t[..t.len() - 1], shift)
        }
        _ => (t, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("expected digits with an optional K, M, G or T suffix"));
    }
    let value: u64 = digits.parse().map_err(|_| bad("too large"))?;
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| bad("too large"))
}

/// Writes a size with the largest exact suffix (`2G`, `1536M`, `4097`); [`parse_size`] reads it.
pub fn format_size(bytes: u64) -> String {
    for (sfx, shift) in SUFFIXES {
        if bytes != 0 && bytes % (1 << shift) == 0 {
            return format!("{}{sfx}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        for (text, bytes) in [
            ("512M", 512 << 20),
            ("2G", 2 << 30),
            ("2g", 2 << 30),
            ("1073741824", 1 << 30),
            ("4k", 4096),
            ("1T", 1 << 40),
            (" 7 ", 7),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        for text in [
            "",
            "G",
            "1.5G",
            "-1",
            "+1",
            "2X",
            "99999999999T",
            "18446744073709551616",
        ] {
            assert!(parse_size(text).is_err(), "{text}");
        }
        assert_eq!(
            parse_size("2X").unwrap_err().to_string(),
            "bad size \"2X\": the suffix must be K, M, G or T"
        );
        assert_eq!(format_size(2 << 30), "2G");
        assert_eq!(format_size(1536 << 20), "1536M");
        assert_eq!(format_size(4097), "4097");
        assert_eq!(format_size(0), "0");
    }

    #[test]
    fn vnode_specs() {
        assert_eq!(
            parse_vnode_spec("vcpus=0-3,memory=2G,host-node=1"),
            Ok(VnodeSpec {
                vcpus: vec![0, 1, 2, 3],
                memory_bytes: 2 << 30,
                host_node: 1
            })
        );
        assert_eq!(
            parse_vnode_spec("memory=512M, vcpus=[0-1,4] ,node=0"),
            Ok(VnodeSpec {
                vcpus: vec![0, 1, 4],
                memory_bytes: 512 << 20,
                host_node: 0
            })
        );
        assert_eq!(
            parse_vnode_spec("vcpus=5,memory=4096"),
            Ok(VnodeSpec {
                vcpus: vec![5],
                memory_bytes: 4096,
                host_node: ANY_HOST_NODE
            })
        );
        for (spec, reason) in [
            ("vcpus=0-1", "memory= is missing"),
            ("memory=1G", "vcpus= is missing"),
            ("vcpus=0,memory=1G,vcpus=1", "vcpus given twice"),
            ("vcpus=0,memory=1G,cpus=1", "unknown key \"cpus\""),
            (
                "vcpus=0,memory=1G,host-node=x",
                "host node \"x\" is not a node id",
            ),
            ("vcpus=0,memory=1G,host-node=4294967295", "is not a node id"),
            ("vcpus=[0,memory=1G", "unbalanced '['"),
            ("vcpus=0],memory=1G", "unbalanced ']'"),
            ("vcpus=[],memory=1G", "vcpus is empty"),
            ("vcpus=0-9000,memory=1G", "vcpu 9000 is above 8191"),
            ("vcpus=3-1,memory=1G", "vcpus: bad CPU list \"3-1\""),
            ("vcpus=0,memory=1Q", "memory: bad size"),
            ("vcpus", "\"vcpus\" is not key=value"),
        ] {
            let err = parse_vnode_spec(spec).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("bad vnode spec {spec:?}: ")),
                "{err}"
            );
            assert!(err.contains(reason), "{spec}: {err}");
        }
    }

    #[test]
    fn spec_display_round_trips() {
        let spec = VnodeSpec {
            vcpus: vec![0, 1, 4],
            memory_bytes: 3 << 20,
            host_node: 2,
        };
        assert_eq!(spec.to_string(), "vcpus=[0-1,4],memory=3M,host-node=2");
        assert_eq!(parse_vnode_spec(&spec.to_string()), Ok(spec));
    }

    #[test]
    fn distances() {
        assert_eq!(
            parse_distances("10,20;20,10"),
            Ok(vec![vec![10, 20], vec![20, 10]])
        );
        assert_eq!(parse_distances(" 10 "), Ok(vec![vec![10]]));
        assert_eq!(
            format_distances(&[vec![10, 21], vec![21, 10]]),
            "10,21;21,10"
        );
        for (text, reason) in [
            ("", "empty"),
            ("10,256", "\"256\" is not a distance"),
            ("10,;20,10", "\"\" is not a distance"),
            ("a", "\"a\" is not a distance"),
        ] {
            let err = parse_distances(text).unwrap_err().to_string();
            assert!(err.contains(reason), "{text}: {err}");
        }
    }

    #[test]
    fn stream_memory() {
        // 32 MiB LLC (this host): 384 MiB of arrays + 18 MiB.
        assert_eq!(stream_memory_bytes(32 << 20, 1), 402 << 20);
        // Rounded up so each of 3 vnodes gets a multiple of 2 MiB: 402/3 = 134 MiB.
        assert_eq!(stream_memory_bytes(32 << 20, 3), 3 * (134 << 20));
        // 480 MiB L3 (issue 4's machines): 5778/2 = 2889 -> 2890 MiB per vnode.
        assert_eq!(stream_memory_bytes(480 << 20, 2), 5780 << 20);
        assert_eq!(stream_memory_bytes(0, 0), 18 << 20);
        for n in [1, 3, 4, u32::MAX] {
            let max = stream_memory_bytes(u64::MAX, n);
            assert_eq!(max % (u64::from(n) * SPLIT_UNIT), 0, "{n}");
            assert!(max > u64::MAX / 2, "{n}: {max}");
        }
    }

    #[test]
    fn ranges_skip_the_hole() {
        let mut vnodes: Vec<Vnode> = [2u64 << 30, 2 << 30]
            .iter()
            .enumerate()
            .map(|(i, &m)| Vnode {
                id: i as u32,
                vcpus: vec![i as u32],
                memory_bytes: m,
                host_node: 0,
                ranges: vec![],
            })
            .collect();
        let hole = GuestRange {
            start: 3 << 30,
            end: 4 << 30,
        };
        place_ranges(&mut vnodes, hole).unwrap();
        assert_eq!(
            vnodes[0].ranges,
            [GuestRange {
                start: 0,
                end: 2 << 30
            }]
        );
        assert_eq!(
            vnodes[1].ranges,
            [
                GuestRange {
                    start: 2 << 30,
                    end: 3 << 30
                },
                GuestRange {
                    start: 4 << 30,
                    end: 5 << 30
                }
            ]
        );
    }
}
