//! Guest RAM: one host mapping per vnode, bound to that vnode's host node with
//! `mbind(MPOL_BIND, MPOL_MF_STRICT | MPOL_MF_MOVE)`, backed by transparent huge pages (default) or
//! hugetlbfs 2 MiB pages, prefaulted by a thread running on the node itself (nodes in parallel),
//! then checked: where did the pages really land?
//!
//! Each vnode's guest-physical ranges (more than one when it crosses the MMIO hole) are views into
//! its one mapping, so a vnode is one binding, one prefault, one placement check.

use std::time::{Duration, Instant};

use numa::Layout;
use serde::Serialize;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

const MIB2: usize = 2 << 20;
const PAGE: usize = 4096;
/// Pages sampled per vnode by the placement check.
const PLACEMENT_SAMPLES: usize = 4096;

/// How guest RAM is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backing {
    /// Anonymous memory with `MADV_HUGEPAGE` (falls back to 4 KiB pages where THP is off).
    Thp,
    /// `MAP_HUGETLB` 2 MiB pages from the host's hugetlbfs pool.
    Hugetlb,
}

/// Errors setting up guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap failed.
    #[error("cannot map {size} MiB for vnode {vnode}{hint}")]
    Map {
        /// The vnode.
        vnode: u32,
        /// Size in MiB.
        size: usize,
        /// What to do about it.
        hint: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// mbind failed.
    #[error("cannot bind vnode {0}'s memory to host node {1}")]
    Bind(u32, u32, #[source] numa::MemPolicyError),
    /// Prefaulting failed (the host ran out of memory on that node).
    #[error(
        "cannot prefault vnode {0}'s memory on host node {1}: the node has too little free memory"
    )]
    Prefault(u32, u32, #[source] std::io::Error),
    /// vm-memory refused the regions.
    #[error("cannot describe guest memory")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    /// vm-memory refused a mapping.
    #[error("cannot describe guest memory")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
    /// Reading page placement failed.
    #[error("cannot read page placement")]
    Placement(#[source] numa::MemPolicyError),
    /// Reading which pages are resident failed.
    #[error("cannot read which guest pages are resident")]
    Resident(#[source] std::io::Error),
}

/// One vnode's host mapping; unmapped on drop.
#[derive(Debug)]
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this struct; guest access goes through KVM and
// vm-memory, which synchronise at their level, and the pointer is never used after drop.
unsafe impl Send for Mapping {}
// SAFETY: as above; `Mapping` itself only hands out the address.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned (after trimming), unmapped once here.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Where one vnode's pages are, from a sample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Placement {
    /// The vnode.
    pub vnode: u32,
    /// The host node it is bound to.
    pub host_node: u32,
    /// Resident pages sampled (pages the guest never touched are not resident without the
    /// prefault, and have no node yet).
    pub sampled: u64,
    /// Sampled pages not resident.
    pub not_resident: u64,
    /// Sampled pages found on `host_node`.
    pub on_node: u64,
}

impl Placement {
    /// True when every resident sampled page is on the bound node.
    pub fn all_local(&self) -> bool {
        self.on_node == self.sampled
    }
}

/// Guest RAM for a layout.
#[derive(Debug)]
pub struct GuestRam {
    // Declared before `mappings`: the views must go before the memory they view.
    mem: GuestMemoryMmap,
    mappings: Vec<Mapping>,
    /// Time spent prefaulting (all vnodes in parallel); `None` when not prefaulted.
    pub prefault_time: Option<Duration>,
    /// Backing in effect.
    pub backing: Backing,
    /// Whether THP was available when asked for.
    pub huge_pages: bool,
}

fn thp_enabled() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .map(|s| !s.contains("[never]"))
        .unwrap_or(false)
}

/// Maps `len` bytes 2 MiB-aligned.
fn map(vnode: u32, len: usize, backing: Backing) -> Result<Mapping, MemoryError> {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let err = |hint, source| MemoryError::Map {
        vnode,
        size: len >> 20,
        hint,
        source,
    };
    if backing == Backing::Hugetlb {
        let len = len.div_ceil(MIB2) * MIB2;
        // No MAP_NORESERVE: the pool must hold every page now, so a short pool fails here with
        // a clear message rather than at the first touch.
        let flags =
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, -1, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(err(
                " from hugetlbfs: reserve 2 MiB pages in /proc/sys/vm/nr_hugepages",
                std::io::Error::last_os_error(),
            ));
        }
        return Ok(Mapping {
            ptr: ptr.cast(),
            len,
        });
    }
    // Over-map by 2 MiB and trim, so the start is 2 MiB aligned and THP can back every page.
    let total = len + MIB2;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: a fresh anonymous mapping; no existing memory is affected.
    let raw = unsafe { libc::mmap(std::ptr::null_mut(), total, prot, flags, -1, 0) };
    if raw == libc::MAP_FAILED {
        return Err(err("", std::io::Error::last_os_error()));
    }
    let raw = raw as usize;
    let start = raw.div_ceil(MIB2) * MIB2;
    let (head, tail) = (start - raw, raw + total - (start + len));
    // SAFETY: both trims are inside the mapping just created and outside [start, start + len).
    unsafe {
        if head > 0 {
            libc::munmap(raw as *mut libc::c_void, head);
        }
        if tail > 0 {
            libc::munmap((start + len) as *mut libc::c_void, tail);
        }
    }
    // SAFETY: advice on our own mapping; failure only means no huge pages, which is reported.
    unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
    Ok(Mapping {
        ptr: start as *mut u8,
        len,
    })
}

/// Populates a mapping for writing, on the calling thread's node.
fn prefault(m: &Mapping) -> std::io::Result<()> {
    // SAFETY: populates our own mapping; no data changes (it is fresh zero memory).
    let rc = unsafe { libc::madvise(m.ptr.cast(), m.len, libc::MADV_POPULATE_WRITE) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return Err(e);
    }
    // Kernels before 5.14 lack MADV_POPULATE_WRITE: touch one byte per page instead.
    for off in (0..m.len).step_by(PAGE) {
        // SAFETY: off < len, inside our mapping; writing zero over zero memory changes nothing.
        unsafe { m.ptr.add(off).write_volatile(0) };
    }
    Ok(())
}

/// Prefaults every vnode on a thread of its own running on `prefault_cpus[i]`, all in
/// parallel; returns the time it took.
fn prefault_all(
    layout: &Layout,
    mappings: &[Mapping],
    prefault_cpus: &[Vec<u32>],
) -> Result<Duration, MemoryError> {
    let start = Instant::now();
    std::thread::scope(|s| {
        let jobs: Vec<_> = layout
            .vnodes
            .iter()
            .zip(mappings)
            .enumerate()
            .map(|(i, (v, m))| {
                let cpus = prefault_cpus.get(i).cloned().unwrap_or_default();
                s.spawn(move || {
                    if !cpus.is_empty() {
                        // Best effort: the binding already decides placement; running on the
                        // node only makes the zeroing local.
                        let _ = numa::set_thread_affinity(&cpus);
                    }
                    prefault(m).map_err(|e| MemoryError::Prefault(v.id, v.host_node, e))
                })
            })
            .collect();
        jobs.into_iter()
            .map(|j| j.join().expect("prefault thread does not panic"))
            .collect::<Result<Vec<()>, MemoryError>>()
    })?;
    Ok(start.elapsed())
}

impl GuestRam {
    /// Maps and binds every vnode, and prefaults them when `prefault_cpus` is given:
    /// `prefault_cpus[i]` are the host CPUs vnode i's prefault thread runs on (its host node's
    /// CPUs). Without the prefault the guest's first touch faults each page in, on the bound node
    /// all the same (the binding is strict), as QEMU, Cloud Hypervisor and Firecracker do by default.
    pub fn new(
        layout: &Layout,
        backing: Backing,
        prefault_cpus: Option<&[Vec<u32>]>,
    ) -> Result<Self, MemoryError> {
        let huge_pages = match backing {
            Backing::Thp => thp_enabled(),
            Backing::Hugetlb => true,
        };
        let mut mappings = Vec::with_capacity(layout.vnodes.len());
        for v in &layout.vnodes {
            let m = map(v.id, v.memory_bytes as usize, backing)?;
            numa::mbind_bind(m.ptr, m.len, v.host_node)
                .map_err(|e| MemoryError::Bind(v.id, v.host_node, e))?;
            mappings.push(m);
        }
        let prefault_time = match prefault_cpus {
            Some(cpus) => Some(prefault_all(layout, &mappings, cpus)?),
            None => None,
        };

        let mut regions = Vec::new();
        for (v, m) in layout.vnodes.iter().zip(&mappings) {
            let mut offset = 0usize;
            for r in &v.ranges {
                let len = (r.end - r.start) as usize;
                // SAFETY: [ptr + offset, + len) lies inside the vnode's mapping (ranges add up to
                // memory_bytes, the mapping's size), which outlives the regions (field order).
                let region = unsafe {
                    MmapRegion::build_raw(
                        m.ptr.add(offset),
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    )
                }
                .map_err(MemoryError::Mmap)?;
                regions.push(
                    GuestRegionMmap::new(region, GuestAddress(r.start))
                        .expect("guest ranges do not overflow"),
                );
                offset += len;
            }
        }
        regions.sort_by_key(|r| r.start_addr().0);
        let mem = GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Regions)?;
        Ok(Self {
            mem,
            mappings,
            prefault_time,
            backing,
            huge_pages,
        })
    }

    /// The guest memory, for loaders, devices and KVM slots.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Bytes of guest RAM resident in host memory (all of it after the prefault).
    pub fn resident_bytes(&self) -> Result<u64, MemoryError> {
        let mut total = 0u64;
        for m in &self.mappings {
            let mut pages = vec![0u8; m.len.div_ceil(PAGE)];
            // SAFETY: ptr/len are our page-aligned mapping; mincore writes one byte per page
            // into `pages`, which holds exactly that many.
            let rc = unsafe { libc::mincore(m.ptr.cast(), m.len, pages.as_mut_ptr()) };
            if rc != 0 {
                return Err(MemoryError::Resident(std::io::Error::last_os_error()));
            }
            total += pages.iter().filter(|&&p| p & 1 == 1).count() as u64 * PAGE as u64;
        }
        Ok(total)
    }

    /// Samples each vnode's pages and counts those on its bound node.
    pub fn placement(&self, layout: &Layout) -> Result<Vec<Placement>, MemoryError> {
        layout
            .vnodes
            .iter()
            .zip(&self.mappings)
            .map(|(v, m)| {
                let pages = m.len / PAGE;
                let step = (pages / PLACEMENT_SAMPLES).max(1);
                let addrs: Vec<*const u8> = (0..pages)
                    .step_by(step)
                    // SAFETY: the offset stays inside the mapping.
                    .map(|p| unsafe { m.ptr.add(p * PAGE) }.cast_const())
                    .collect();
                let nodes = numa::page_nodes(&addrs).map_err(MemoryError::Placement)?;
                // move_pages gives -ENOENT for a page that is not resident.
                let not_resident = nodes.iter().filter(|&&n| n == -libc::ENOENT).count() as u64;
                Ok(Placement {
                    vnode: v.id,
                    host_node: v.host_node,
                    sampled: nodes.len() as u64 - not_resident,
                    not_resident,
                    on_node: nodes.iter().filter(|&&n| n == v.host_node as i32).count() as u64,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::layout;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn vnodes_are_bound_prefaulted_and_on_their_node() {
        let l = layout(
            &[
                (vec![0], &[(0, 8 << 20)]),
                (vec![1], &[(8 << 20, 24 << 20)]),
            ],
            vec![vec![10, 20], vec![20, 10]],
        );
        let ram = GuestRam::new(&l, Backing::Thp, Some(&[vec![], vec![]])).unwrap();
        assert!(ram.prefault_time.is_some());
        assert_eq!(ram.resident_bytes().unwrap(), 24 << 20);
        let p = ram.placement(&l).unwrap();
        assert_eq!(p.len(), 2);
        assert!(p.iter().all(Placement::all_local), "{p:?}");
        assert_eq!(p[1].sampled, (16 << 20) / PAGE as u64);
        ram.memory()
            .write_obj(0x1234_5678u32, GuestAddress((8 << 20) + 4))
            .unwrap();
        let back: u32 = ram.memory().read_obj(GuestAddress((8 << 20) + 4)).unwrap();
        assert_eq!(back, 0x1234_5678);
    }

    #[test]
    fn without_the_prefault_pages_arrive_on_first_touch_on_their_node() {
        let l = layout(&[(vec![0], &[(0, 16 << 20)])], vec![vec![10]]);
        let ram = GuestRam::new(&l, Backing::Thp, None).unwrap();
        assert_eq!(ram.prefault_time, None);
        assert_eq!(ram.resident_bytes().unwrap(), 0);
        let p = ram.placement(&l).unwrap();
        assert_eq!((p[0].sampled, p[0].on_node), (0, 0), "{p:?}");
        assert_eq!(p[0].not_resident, (16 << 20) / PAGE as u64);
        ram.memory().write_obj(1u64, GuestAddress(0)).unwrap();
        let resident = ram.resident_bytes().unwrap();
        assert!((PAGE as u64..16 << 20).contains(&resident), "{resident}");
        let p = ram.placement(&l).unwrap();
        assert!(p[0].sampled >= 1 && p[0].all_local(), "{p:?}");
    }

    #[test]
    fn a_vnode_across_the_hole_is_one_mapping_with_two_views() {
        let l = layout(
            &[(vec![0], &[(0, 4 << 20), (16 << 20, 20 << 20)])],
            vec![vec![10]],
        );
        let ram = GuestRam::new(&l, Backing::Thp, Some(&[vec![]])).unwrap();
        assert_eq!(ram.mappings.len(), 1);
        assert_eq!(ram.memory().num_regions(), 2);
        // The second range is the second half of the same mapping.
        ram.memory().write_obj(7u8, GuestAddress(16 << 20)).unwrap();
        // SAFETY: offset 4 MiB is inside the 8 MiB mapping.
        assert_eq!(unsafe { *ram.mappings[0].ptr.add(4 << 20) }, 7);
    }

    #[test]
    fn binding_to_a_missing_node_fails_clearly() {
        let mut l = layout(&[(vec![0], &[(0, 4 << 20)])], vec![vec![10]]);
        l.vnodes[0].host_node = 63;
        let e = GuestRam::new(&l, Backing::Thp, Some(&[vec![]])).unwrap_err();
        assert!(e.to_string().contains("host node 63"), "{e}");
    }
}
