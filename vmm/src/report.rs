//! What a run reports: the layout, what the guest saw (and whether it matches), STREAM figures,
//! placement and timing; as one JSON object (`--json`) or as text for people.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use numa::{format_cpu_list, format_distances, format_size, GuestRange, Layout, PinPlan};
use serde::Serialize;
use vmm_guest::abi::{GroupStream, KernelResult, StreamSummary, Topology, VcpuStream, TOTAL_GROUP};

use crate::cpuid::CpuTopology;
use crate::memory::{Backing, Placement};

/// The four kernels, named as in STREAM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Kernels<T> {
    /// Copy: `c = a`.
    pub copy: T,
    /// Scale: `b = s * c`.
    pub scale: T,
    /// Add: `c = a + b`.
    pub add: T,
    /// Triad: `a = b + s * c`.
    pub triad: T,
}

impl<T: Copy> Kernels<T> {
    fn from_array(a: [T; 4]) -> Self {
        Self {
            copy: a[0],
            scale: a[1],
            add: a[2],
            triad: a[3],
        }
    }
    /// In STREAM's order.
    pub fn to_array(&self) -> [T; 4] {
        [self.copy, self.scale, self.add, self.triad]
    }
}

/// One kernel's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct KernelFigures {
    /// Best rate, MB/s (10^6 bytes/s), STREAM's definition.
    pub mb_s: f64,
    /// Bytes counted per pass.
    pub bytes: u64,
    /// Best, mean and worst pass (first pass excluded), ns.
    pub min_ns: u64,
    /// Mean pass time, ns.
    pub avg_ns: u64,
    /// Worst pass time, ns.
    pub max_ns: u64,
}

fn figures(k: [KernelResult; 4]) -> Kernels<KernelFigures> {
    Kernels::from_array(k.map(|r| KernelFigures {
        mb_s: r.mb_s(),
        bytes: r.bytes,
        min_ns: r.min_ns,
        avg_ns: r.avg_ns,
        max_ns: r.max_ns,
    }))
}

/// STREAM over a group of threads.
#[derive(Debug, Clone, Serialize)]
pub struct GroupFigures {
    /// vnode id.
    pub node: u32,
    /// Threads in the group.
    pub vcpus: u32,
    /// Figures per kernel.
    #[serde(flatten)]
    pub kernels: Kernels<KernelFigures>,
}

/// STREAM on one thread.
#[derive(Debug, Clone, Serialize)]
pub struct ThreadFigures {
    /// vCPU index (or the host thread placed as it).
    pub vcpu: u32,
    /// Its vnode.
    pub node: u32,
    /// Elements per array.
    pub elements: u64,
    /// Whether its arrays validated.
    pub validated: bool,
    /// Figures per kernel.
    #[serde(flatten)]
    pub kernels: Kernels<KernelFigures>,
}

/// A whole STREAM run: totals, per vnode, per thread.
#[derive(Debug, Clone, Serialize)]
pub struct StreamFigures {
    /// Passes (STREAM's NTIMES; the first is not counted).
    pub passes: u32,
    /// Every thread validated.
    pub validated: bool,
    /// Size of one STREAM array summed over the threads (STREAM's N × 8 bytes).
    pub array_bytes: u64,
    /// Totals over all threads.
    #[serde(flatten)]
    pub total: Kernels<KernelFigures>,
    /// Per vnode.
    pub per_node: Vec<GroupFigures>,
    /// Per thread.
    pub per_vcpu: Vec<ThreadFigures>,
}

impl StreamFigures {
    /// From the guest's summary and per-vCPU reports (or the host run's equivalents).
    pub fn new(summary: &StreamSummary, threads: &[VcpuStream]) -> Self {
        let mut per_node = Vec::new();
        let mut total = Kernels::default();
        for g in summary.groups() {
            if g.node == TOTAL_GROUP {
                total = figures(g.kernels);
            } else {
                per_node.push(group(g));
            }
        }
        per_node.sort_by_key(|g| g.node);
        let mut per_vcpu: Vec<_> = threads
            .iter()
            .map(|t| ThreadFigures {
                vcpu: t.vcpu,
                node: t.node,
                elements: t.elements,
                validated: t.validated == 1,
                kernels: figures(t.kernels),
            })
            .collect();
        per_vcpu.sort_by_key(|t| t.vcpu);
        Self {
            passes: summary.passes,
            validated: summary.validated == 1 && threads.iter().all(|t| t.validated == 1),
            array_bytes: threads.iter().map(|t| t.elements * 8).sum(),
            total,
            per_node,
            per_vcpu,
        }
    }
}

fn group(g: &GroupStream) -> GroupFigures {
    GroupFigures {
        node: g.node,
        vcpus: g.vcpus,
        kernels: figures(g.kernels),
    }
}

/// One vnode of the layout, with the host CPUs its vCPUs use.
#[derive(Debug, Clone, Serialize)]
pub struct VnodeOut {
    /// vnode id.
    pub id: u32,
    /// Its vCPUs.
    pub vcpus: Vec<u32>,
    /// Its memory.
    pub memory_bytes: u64,
    /// Host node its memory is bound to.
    pub host_node: u32,
    /// Host CPUs its vCPUs are pinned to (with `--pin`), else the host node's CPUs.
    pub host_cpus: Vec<u32>,
    /// Guest-physical ranges.
    pub ranges: Vec<GuestRange>,
    /// APIC ids of its vCPUs.
    pub apic_ids: Vec<u32>,
}

/// The layout as reported.
#[derive(Debug, Clone, Serialize)]
pub struct LayoutOut {
    /// The vnodes.
    pub vnodes: Vec<VnodeOut>,
    /// The distance matrix.
    pub distances: Vec<Vec<u8>>,
}

impl LayoutOut {
    /// Joins the layout with the pin plan (or the host nodes' CPUs) and the APIC ids.
    pub fn new(
        layout: &Layout,
        pins: Option<&PinPlan>,
        node_cpus: &dyn Fn(u32) -> Vec<u32>,
        cpus: &CpuTopology,
    ) -> Self {
        Self {
            vnodes: layout
                .vnodes
                .iter()
                .map(|v| VnodeOut {
                    id: v.id,
                    vcpus: v.vcpus.clone(),
                    memory_bytes: v.memory_bytes,
                    host_node: v.host_node,
                    host_cpus: pins.map_or_else(|| node_cpus(v.host_node), |p| p.vnode_cpus(v)),
                    ranges: v.ranges.clone(),
                    apic_ids: v.vcpus.iter().map(|&c| cpus.apic_ids[c as usize]).collect(),
                })
                .collect(),
            distances: layout.distances.clone(),
        }
    }
}

/// A node as the guest saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GuestNode {
    /// Proximity domain.
    pub id: u32,
    /// CPU numbers (MADT order).
    pub cpus: Vec<u32>,
    /// Sum of its SRAT memory ranges.
    pub memory_bytes: u64,
    /// The ranges.
    pub ranges: Vec<GuestRange>,
}

/// The topology the guest read from ACPI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GuestTopology {
    /// Nodes by id.
    pub nodes: Vec<GuestNode>,
    /// SLIT.
    pub distances: Vec<Vec<u8>>,
    /// APIC id of each CPU, in CPU order.
    pub apic_ids: Vec<u32>,
}

impl GuestTopology {
    /// Groups the guest's MADT/SRAT/SLIT view by node.
    pub fn new(t: &Topology) -> Self {
        let mut nodes: BTreeMap<u32, GuestNode> = BTreeMap::new();
        let empty = |id| GuestNode {
            id,
            cpus: Vec::new(),
            memory_bytes: 0,
            ranges: Vec::new(),
        };
        for (i, c) in t.cpus().iter().enumerate() {
            nodes
                .entry(c.node)
                .or_insert_with(|| empty(c.node))
                .cpus
                .push(i as u32);
        }
        for r in t.ranges() {
            let n = nodes.entry(r.node).or_insert_with(|| empty(r.node));
            n.memory_bytes += r.len;
            n.ranges.push(GuestRange {
                start: r.base,
                end: r.base + r.len,
            });
        }
        let n = t.localities;
        Self {
            nodes: nodes.into_values().collect(),
            distances: (0..n)
                .map(|i| (0..n).map(|j| t.distance(i, j).unwrap_or(0)).collect())
                .collect(),
            apic_ids: t.cpus().iter().map(|c| c.apic_id).collect(),
        }
    }

    /// Every way this view differs from the layout (empty when it matches).
    pub fn mismatches(&self, layout: &Layout, cpus: &CpuTopology) -> Vec<String> {
        let mut out = Vec::new();
        if self.nodes.len() != layout.vnodes.len() {
            out.push(format!(
                "guest sees {} nodes, layout has {}",
                self.nodes.len(),
                layout.vnodes.len()
            ));
        }
        for v in &layout.vnodes {
            let Some(g) = self.nodes.iter().find(|g| g.id == v.id) else {
                out.push(format!("guest does not see vnode {}", v.id));
                continue;
            };
            if g.cpus != v.vcpus {
                out.push(format!(
                    "vnode {}: guest sees CPUs {:?}, layout has {:?}",
                    v.id, g.cpus, v.vcpus
                ));
            }
            if g.ranges != v.ranges {
                out.push(format!(
                    "vnode {}: guest sees memory {:x?}, layout has {:x?}",
                    v.id, g.ranges, v.ranges
                ));
            }
        }
        if self.distances != layout.distances {
            out.push(format!(
                "guest sees distances {}, layout has {}",
                format_distances(&self.distances),
                format_distances(&layout.distances)
            ));
        }
        if self.apic_ids != cpus.apic_ids {
            out.push(format!(
                "guest sees APIC ids {:?}, planned {:?}",
                self.apic_ids, cpus.apic_ids
            ));
        }
        out
    }
}

/// A vCPU thread as the host sees it.
#[derive(Debug, Clone, Serialize)]
pub struct VcpuThread {
    /// The vCPU.
    pub vcpu: u32,
    /// Kernel thread id.
    pub tid: i32,
    /// CPUs it may run on (read back after pinning).
    pub cpus_allowed: Vec<u32>,
}

/// Guest memory as set up.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryOut {
    /// Backing.
    pub backing: Backing,
    /// Whether huge pages were available.
    pub huge_pages: bool,
    /// Whether guest RAM was faulted in before the guest started.
    pub prefault: bool,
    /// Prefault time, all vnodes in parallel, ms (0 without the prefault).
    pub prefault_ms: f64,
    /// Guest RAM resident at the end of the run, bytes (all of it after the prefault).
    pub resident_bytes: Option<u64>,
    /// Sampled placement per vnode, at the end of the run.
    pub placement: Vec<Placement>,
    /// Every sampled page is on its vnode's host node.
    pub all_local: bool,
}

/// Timing of the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TimingOut {
    /// From `vmm` start to the first vCPU starting (planning, guest RAM, prefault, tables,
    /// loading the guest), ms.
    pub setup_ms: f64,
    /// From `vmm` start to the guest's first console byte or report, ms.
    pub first_output_ms: Option<f64>,
    /// The same, less the prefault time (what a VMM adds on its own), ms.
    pub first_output_less_prefault_ms: Option<f64>,
    /// Prefault, ms.
    pub prefault_ms: f64,
    /// From the first vCPU start to the last vCPU exit, ms.
    pub run_ms: f64,
    /// From `vmm` start to the end of the run, ms.
    pub total_ms: f64,
}

/// Everything one run found out.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// The planned layout.
    pub layout: LayoutOut,
    /// The pin plan (with `--pin`).
    pub pinning: Option<PinPlan>,
    /// Guest memory.
    pub memory: MemoryOut,
    /// vCPU threads.
    pub vcpu_threads: Vec<VcpuThread>,
    /// `built-in` or `linux`.
    pub guest: String,
    /// How a Linux guest ended: `poweroff`, `reset` or `panic` (none if stopped from outside).
    pub guest_exit: Option<String>,
    /// Where the vCPUs' APIC ids (CPUID) were checked against the plan.
    pub apic_ids_checked_by: String,
    /// What the guest saw.
    pub guest_topology: Option<GuestTopology>,
    /// The guest's view equals the layout.
    pub guest_view_matches: bool,
    /// How it differs, if it does.
    pub mismatches: Vec<String>,
    /// STREAM in the guest.
    pub stream: Option<StreamFigures>,
    /// The same kernels on host threads placed as the vCPUs (`--compare-host`).
    pub host_stream: Option<StreamFigures>,
    /// Guest over host, per kernel (`--compare-host`).
    pub ratio: Option<Kernels<f64>>,
    /// Last-level cache of the host, bytes (STREAM wants each array at least 4× this).
    pub host_llc_bytes: u64,
    /// Timing.
    pub timing: TimingOut,
    /// VMM resident memory beyond guest RAM, bytes.
    pub vmm_overhead_bytes: Option<u64>,
    /// Errors from the guest or the vCPUs.
    pub errors: Vec<String>,
    /// Set when the run was cut short (a signal or the timeout).
    pub stopped_by: Option<String>,
}

impl RunReport {
    /// True when the guest saw the layout, STREAM validated and nothing went wrong.
    pub fn success(&self) -> bool {
        let finished = match self.guest.as_str() {
            "linux" => matches!(self.guest_exit.as_deref(), Some("poweroff" | "reset")),
            _ => self.stream.as_ref().is_some_and(|s| s.validated),
        };
        finished && self.guest_view_matches && self.errors.is_empty() && self.stopped_by.is_none()
    }

    /// Text for people: layout (as the seed's `show numa`), guest view, STREAM table, timing.
    pub fn human(&self, layout: &Layout) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "{}", layout.show().trim_end());
        let _ = writeln!(o, "distances: {}", format_distances(&layout.distances));
        match &self.pinning {
            Some(p) => {
                let pins: Vec<String> = p
                    .vcpu_cpus
                    .iter()
                    .enumerate()
                    .map(|(v, c)| format!("{v}->{c}"))
                    .collect();
                let _ = writeln!(
                    o,
                    "pinning: vCPU->CPU {}; VMM threads on CPUs {}{}",
                    pins.join(" "),
                    format_cpu_list(&p.vmm_cpus),
                    if p.shared {
                        " (overcommitted: vCPUs share CPUs)"
                    } else {
                        ""
                    }
                );
            }
            None => {
                let _ = writeln!(o, "pinning: off");
            }
        }
        let m = &self.memory;
        let backing = match (m.backing, m.huge_pages) {
            (Backing::Thp, true) => "transparent huge pages (2 MiB)",
            (Backing::Thp, false) => "4 KiB pages (transparent huge pages are off on this host)",
            (Backing::Hugetlb, _) => "hugetlbfs 2 MiB pages",
        };
        let resident = m
            .resident_bytes
            .map(|b| format!(", {} MiB resident at the end", b >> 20))
            .unwrap_or_default();
        if m.prefault {
            let _ = writeln!(
                o,
                "memory: {backing}, prefault {:.0} ms{resident}",
                m.prefault_ms
            );
        } else {
            let _ = writeln!(o, "memory: {backing}, faulted in by the guest{resident}");
        }
        for p in &m.placement {
            let _ = writeln!(
                o,
                "  vnode {} on host node {}: {} of {} sampled resident pages there ({:.1}%)",
                p.vnode,
                p.host_node,
                p.on_node,
                p.sampled,
                100.0 * p.on_node as f64 / p.sampled.max(1) as f64
            );
        }
        if let Some(g) = &self.guest_topology {
            let _ = writeln!(
                o,
                "guest view: {} nodes, {}",
                g.nodes.len(),
                if self.guest_view_matches {
                    "matches the layout"
                } else {
                    "DIFFERS from the layout"
                }
            );
            for n in &g.nodes {
                let _ = writeln!(
                    o,
                    "  node {} cpus: {}  size: {}",
                    n.id,
                    format_cpu_list(&n.cpus),
                    format_size(n.memory_bytes)
                );
            }
            let _ = writeln!(o, "  distances: {}", format_distances(&g.distances));
        }
        for m in &self.mismatches {
            let _ = writeln!(o, "  mismatch: {m}");
        }
        if let Some(s) = &self.stream {
            let _ = writeln!(
                o,
                "STREAM in the guest ({} passes, best of {}): {}",
                s.passes,
                s.passes.saturating_sub(1),
                if s.validated {
                    "Solution Validates"
                } else {
                    "VALIDATION FAILED"
                }
            );
            let _ = writeln!(
                o,
                "arrays: 3 x {:.1} MiB ({:.2}x the host's {} last-level cache)",
                s.array_bytes as f64 / (1u64 << 20) as f64,
                s.array_bytes as f64 / self.host_llc_bytes.max(1) as f64,
                format_size(self.host_llc_bytes)
            );
            stream_table(&mut o, s, self.host_stream.as_ref(), self.ratio.as_ref());
        }
        let t = &self.timing;
        if let Some(first) = t.first_output_ms {
            let _ = writeln!(
                o,
                "timing: set-up {:.1} ms, first guest output {first:.1} ms after start ({:.1} ms without the {:.1} ms prefault), run {:.0} ms, total {:.0} ms",
                t.setup_ms,
                t.first_output_less_prefault_ms.unwrap_or(first),
                t.prefault_ms,
                t.run_ms,
                t.total_ms
            );
        }
        if let Some(b) = self.vmm_overhead_bytes {
            let _ = writeln!(
                o,
                "VMM memory beyond guest RAM: {:.1} MiB RSS",
                b as f64 / (1 << 20) as f64
            );
        }
        if let Some(x) = &self.guest_exit {
            let _ = writeln!(o, "guest: {x}");
        }
        for e in &self.errors {
            let _ = writeln!(o, "error: {e}");
        }
        if let Some(s) = &self.stopped_by {
            let _ = writeln!(o, "stopped by {s}");
        }
        o
    }
}

fn stream_table(
    o: &mut String,
    s: &StreamFigures,
    host: Option<&StreamFigures>,
    ratio: Option<&Kernels<f64>>,
) {
    let names = ["Copy:", "Scale:", "Add:", "Triad:"];
    let _ = writeln!(
        o,
        "Function    Rate (MB/s)   Avg time     Min time     Max time{}",
        if host.is_some() {
            "    Host (MB/s)   Guest/Host"
        } else {
            ""
        }
    );
    let rows = s.total.to_array();
    for (i, k) in rows.iter().enumerate() {
        let _ = write!(
            o,
            "{:<10}{:>13.1}{:>13.6}{:>13.6}{:>13.6}",
            names[i],
            k.mb_s,
            k.avg_ns as f64 / 1e9,
            k.min_ns as f64 / 1e9,
            k.max_ns as f64 / 1e9
        );
        if let (Some(h), Some(r)) = (host, ratio) {
            let _ = write!(
                o,
                "{:>15.1}{:>13.3}",
                h.total.to_array()[i].mb_s,
                r.to_array()[i]
            );
        }
        let _ = writeln!(o);
    }
    let rates = |k: &Kernels<KernelFigures>| {
        let k = k.to_array();
        format!(
            "Copy {:.1}  Scale {:.1}  Add {:.1}  Triad {:.1} MB/s",
            k[0].mb_s, k[1].mb_s, k[2].mb_s, k[3].mb_s
        )
    };
    for g in &s.per_node {
        let plural = if g.vcpus == 1 { "" } else { "s" };
        let _ = writeln!(
            o,
            "  vnode {} ({} vCPU{plural}): {}",
            g.node,
            g.vcpus,
            rates(&g.kernels)
        );
    }
    for t in &s.per_vcpu {
        let mib = (t.elements * 8) >> 20;
        let _ = writeln!(
            o,
            "  vCPU {} (vnode {}, {mib} MiB arrays): {}",
            t.vcpu,
            t.node,
            rates(&t.kernels)
        );
    }
}

/// Guest over host rate per kernel.
pub fn ratio(guest: &StreamFigures, host: &StreamFigures) -> Kernels<f64> {
    let (g, h) = (guest.total.to_array(), host.total.to_array());
    Kernels::from_array([0, 1, 2, 3].map(|i| {
        if h[i].mb_s > 0.0 {
            g[i].mb_s / h[i].mb_s
        } else {
            0.0
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::layout;
    use vmm_guest::abi::{SeenCpu, SeenRange};

    fn seen(l: &Layout, cpus: &CpuTopology) -> Topology {
        let mut t = Topology::default();
        for v in &l.vnodes {
            for &c in &v.vcpus {
                t.cpus[c as usize] = SeenCpu {
                    apic_id: cpus.apic_ids[c as usize],
                    node: v.id,
                };
            }
            for r in &v.ranges {
                t.ranges[t.range_count as usize] = SeenRange {
                    node: v.id,
                    base: r.start,
                    len: r.end - r.start,
                };
                t.range_count += 1;
            }
        }
        t.cpu_count = l.vcpu_count();
        let n = l.vnodes.len();
        t.localities = n as u32;
        for i in 0..n {
            for j in 0..n {
                t.distances[i * n + j] = l.distances[i][j];
            }
        }
        t
    }

    #[test]
    fn an_exact_view_matches_and_each_difference_is_named() {
        let l = layout(
            &[
                (vec![0, 1], &[(0, 1 << 30)]),
                (vec![2], &[(1 << 30, 2 << 30)]),
            ],
            vec![vec![10, 20], vec![20, 10]],
        );
        let cpus = CpuTopology::new(&l);
        let mut t = seen(&l, &cpus);
        let g = GuestTopology::new(&t);
        assert_eq!(g.nodes[0].cpus, vec![0, 1]);
        assert_eq!(g.nodes[1].memory_bytes, 1 << 30);
        assert!(g.mismatches(&l, &cpus).is_empty());

        t.cpus[1].node = 1;
        t.distances[1] = 21;
        let m = GuestTopology::new(&t).mismatches(&l, &cpus);
        assert!(
            m.iter().any(|s| s.contains("vnode 0: guest sees CPUs [0]")),
            "{m:?}"
        );
        assert!(m.iter().any(|s| s.contains("distances")), "{m:?}");
    }
}
