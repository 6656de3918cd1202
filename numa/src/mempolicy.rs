//! Memory-policy and affinity system calls: `mbind`, `move_pages`, `sched_{set,get}affinity`.
//!
//! This is the only module of the crate with `unsafe` code. `libc` has no wrappers for `mbind` and
//! `move_pages` (they live in libnuma), so they go through `libc::syscall`, as Cloud Hypervisor
//! does (`vmm/src/memory_manager.rs`). The affinity calls use variable-size masks instead of the
//! fixed 1024-CPU `cpu_set_t`, so hosts with more CPUs work too.

use std::io;

/// Highest node id accepted by [`mbind_bind`]: the kernel refuses `maxnode` above
/// `PAGE_SIZE * 8` (`get_nodes` in mm/mempolicy.c).
pub const MAX_NODE_ID: u32 = 32_766;

/// Highest CPU id accepted by [`set_thread_affinity`]; [`crate::MAX_LIST_ID`] bounds lists too.
pub const MAX_CPU_ID: u32 = crate::topology::MAX_LIST_ID;

/// Errors from the memory-policy and affinity calls.
#[derive(Debug, thiserror::Error)]
pub enum MemPolicyError {
    /// `mbind` refused the binding.
    #[error("mbind of {len} bytes at {addr:#x} to host node {node} failed")]
    Mbind {
        /// Start of the range.
        addr: usize,
        /// Length of the range.
        len: usize,
        /// Target node.
        node: u32,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// A node id above [`MAX_NODE_ID`].
    #[error("host node {node} is above the largest node id {MAX_NODE_ID}")]
    NodeOutOfRange {
        /// The node id.
        node: u32,
    },
    /// `move_pages` failed as a whole.
    #[error("move_pages query of {pages} pages failed")]
    MovePages {
        /// Number of pages asked about.
        pages: usize,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// `sched_setaffinity` failed.
    #[error("cannot pin the thread to CPUs {cpus}")]
    SetAffinity {
        /// The CPU list, formatted.
        cpus: String,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// `sched_getaffinity` failed.
    #[error("cannot read the thread's CPU affinity")]
    GetAffinity(#[source] io::Error),
    /// An empty CPU set was asked for.
    #[error("cannot pin a thread to an empty CPU set")]
    EmptyCpuSet,
    /// A CPU id above [`MAX_CPU_ID`].
    #[error("CPU {cpu} is above the largest CPU id {MAX_CPU_ID}")]
    CpuOutOfRange {
        /// The CPU id.
        cpu: u32,
    },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, MemPolicyError>;

/// `MPOL_MF_STRICT` of `<linux/mempolicy.h>` (not in the `libc` crate): fail when pages do not
/// follow the policy.
const MPOL_MF_STRICT: u32 = 1 << 0;
/// `MPOL_MF_MOVE`: move pages of this process that are on other nodes.
const MPOL_MF_MOVE: u32 = 1 << 1;

const BITS: usize = u64::BITS as usize;

/// A bit mask of `bits` bits with the given bits set, in the kernel's `unsigned long` layout.
fn mask_with(bits: usize, set: impl IntoIterator<Item = usize>) -> Vec<u64> {
    let mut mask = vec![0u64; bits.div_ceil(BITS)];
    for b in set {
        mask[b / BITS] |= 1 << (b % BITS);
    }
    mask
}

/// Binds `[addr, addr + len)` to host node `node`: `mbind(MPOL_BIND, MPOL_MF_STRICT |
/// MPOL_MF_MOVE)`, so pages already faulted elsewhere are moved and later faults allocate on the
/// node only (issue 4 "Memory policy"). `addr` must be page aligned and the range mapped.
///
/// `maxnode` is `node + 2`: the kernel drops the last bit of the mask (`get_nodes` decrements
/// `maxnode`), the same off-by-one Cloud Hypervisor works around.
///
/// # Example
/// ```no_run
/// # let (addr, len) = (std::ptr::null_mut::<u8>(), 0usize);
/// numa::mbind_bind(addr, len, 0)?;
/// # Ok::<(), numa::MemPolicyError>(())
/// ```
// Not `unsafe`: the kernel never lets mbind touch memory outside this process's mappings (an
// unmapped range fails with EFAULT/ENOMEM) and page migration keeps the contents.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
pub fn mbind_bind(addr: *mut u8, len: usize, node: u32) -> Result<()> {
    if node > MAX_NODE_ID {
        return Err(MemPolicyError::NodeOutOfRange { node });
    }
    let maxnode = node as usize + 2;
    let mask = mask_with(maxnode, [node as usize]);
    let flags = MPOL_MF_STRICT | MPOL_MF_MOVE;
    // SAFETY: mbind only changes the policy of (and possibly migrates) pages of the calling
    // process in the given range; it does not write to memory we own. `mask` is a live buffer of
    // at least `maxnode` bits for the duration of the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr,
            len,
            libc::MPOL_BIND,
            mask.as_ptr(),
            maxnode,
            flags,
        )
    };
    if ret != 0 {
        return Err(MemPolicyError::Mbind {
            addr: addr as usize,
            len,
            node,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The node of the page holding each address: `move_pages(0, n, pages, NULL, status, 0)`.
/// An entry is negative (`-errno`, e.g. `-ENOENT` = -2) when the page is not present.
///
/// # Example
/// ```
/// let x = Box::new(7u64);
/// let nodes = numa::page_nodes(&[(&*x as *const u64).cast()])?;
/// assert!(nodes[0] >= 0);
/// # Ok::<(), numa::MemPolicyError>(())
/// ```
pub fn page_nodes(addrs: &[*const u8]) -> Result<Vec<i32>> {
    let mut status = vec![0i32; addrs.len()];
    if addrs.is_empty() {
        return Ok(status);
    }
    // SAFETY: with a NULL `nodes` array move_pages only queries: it reads `addrs.len()` pointers
    // from `addrs` (never dereferencing them in our address space) and writes `addrs.len()` ints
    // to `status`, both live buffers of that length.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0,
            addrs.len(),
            addrs.as_ptr(),
            std::ptr::null::<i32>(),
            status.as_mut_ptr(),
            0,
        )
    };
    if ret < 0 {
        return Err(MemPolicyError::MovePages {
            pages: addrs.len(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(status)
}

/// Pins the calling thread to `cpus` (`sched_setaffinity(0, ...)`).
///
/// # Example
/// ```
/// let cpus = numa::thread_affinity()?;
/// numa::set_thread_affinity(&cpus)?;
/// # Ok::<(), numa::MemPolicyError>(())
/// ```
pub fn set_thread_affinity(cpus: &[u32]) -> Result<()> {
    let max = *cpus.iter().max().ok_or(MemPolicyError::EmptyCpuSet)?;
    if max > MAX_CPU_ID {
        return Err(MemPolicyError::CpuOutOfRange { cpu: max });
    }
    let mask = mask_with(max as usize + 1, cpus.iter().map(|&c| c as usize));
    // SAFETY: the kernel reads `size_of_val(mask)` bytes from the live buffer `mask`; `cpu_set_t`
    // is only the declared pointer type, the size argument governs the read.
    let ret = unsafe {
        libc::sched_setaffinity(
            0,
            std::mem::size_of_val(mask.as_slice()),
            mask.as_ptr().cast::<libc::cpu_set_t>(),
        )
    };
    if ret != 0 {
        return Err(MemPolicyError::SetAffinity {
            cpus: crate::topology::format_cpu_list(cpus),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The CPUs the calling thread may run on (`sched_getaffinity(0)`), sorted.
pub fn thread_affinity() -> Result<Vec<u32>> {
    // Start at 1024 CPUs and double while the kernel says the mask is too small (EINVAL).
    let mut words = 1024 / BITS;
    loop {
        let mut mask = vec![0u64; words];
        // SAFETY: the raw syscall writes at most `size_of_val(mask)` bytes into the live buffer
        // `mask` and returns how many it wrote.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_sched_getaffinity,
                0,
                std::mem::size_of_val(mask.as_slice()),
                mask.as_mut_ptr(),
            )
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINVAL) && words * BITS <= MAX_CPU_ID as usize {
                words *= 2;
                continue;
            }
            return Err(MemPolicyError::GetAffinity(err));
        }
        let mut cpus = Vec::new();
        for (w, &word) in mask.iter().enumerate() {
            for b in 0..BITS {
                if word & (1 << b) != 0 {
                    // At most MAX_CPU_ID * 2 bits were asked for: the id fits in u32.
                    cpus.push((w * BITS + b) as u32);
                }
            }
        }
        return Ok(cpus);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An anonymous private mapping unmapped on drop.
    struct Mapping {
        addr: *mut u8,
        len: usize,
    }

    impl Mapping {
        fn new(len: usize) -> Mapping {
            // SAFETY: a fresh anonymous mapping; the kernel picks the address.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(addr, libc::MAP_FAILED, "{}", io::Error::last_os_error());
            Mapping {
                addr: addr.cast(),
                len,
            }
        }

        fn pages(&self) -> Vec<*const u8> {
            (0..self.len)
                .step_by(4096)
                .map(|off| self.addr.wrapping_add(off).cast_const())
                .collect()
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the mapping created in `new`, which nothing else references.
            unsafe { libc::munmap(self.addr.cast(), self.len) };
        }
    }

    /// The first node this process may allocate from (node 0 on our machines), and the first id
    /// from 5 up that is no node of the host (5 on our machines).
    fn memory_node_and_absent_node() -> (u32, u32) {
        let host = crate::HostTopology::current().unwrap();
        let node = host.nodes.iter().find(|n| n.memory_bytes > 0).unwrap().id;
        let absent = (5..).find(|&id| host.node(id).is_none()).unwrap();
        (node, absent)
    }

    #[test]
    fn mbind_places_pages_on_the_node() {
        let (node, _) = memory_node_and_absent_node();
        let map = Mapping::new(8 << 20);
        mbind_bind(map.addr, map.len, node).unwrap();
        // Before touching, no page is present.
        let before = page_nodes(&map.pages()).unwrap();
        assert!(before.iter().all(|&n| n == -libc::ENOENT), "{before:?}");
        for off in (0..map.len).step_by(4096) {
            let page = map.addr.wrapping_add(off);
            // SAFETY: `page` is inside the writable mapping of `map.len` bytes.
            unsafe { page.write_volatile(1) };
        }
        let after = page_nodes(&map.pages()).unwrap();
        assert_eq!(after.len(), 2048);
        let node = i32::try_from(node).unwrap();
        assert!(after.iter().all(|&n| n == node), "{after:?}");
    }

    #[test]
    fn mbind_to_absent_node_fails_clearly() {
        let (_, absent) = memory_node_and_absent_node();
        let map = Mapping::new(8 << 20);
        let err = mbind_bind(map.addr, map.len, absent).unwrap_err();
        assert!(
            matches!(err, MemPolicyError::Mbind { node, len: 8388608, .. } if node == absent),
            "{err:?}"
        );
        let text = err.to_string();
        let want = format!(
            "mbind of 8388608 bytes at {:#x} to host node {absent} failed",
            map.addr as usize
        );
        assert_eq!(text, want);
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert!(source.contains("Invalid argument"), "{source}");
        let err = mbind_bind(map.addr, map.len, 40_000).unwrap_err();
        assert_eq!(
            err.to_string(),
            "host node 40000 is above the largest node id 32766"
        );
    }

    #[test]
    fn affinity_round_trips() {
        let original = thread_affinity().unwrap();
        let first = original[0];
        // Run in a fresh thread so the test harness thread keeps its mask.
        std::thread::spawn(move || {
            set_thread_affinity(&[first]).unwrap();
            assert_eq!(thread_affinity().unwrap(), [first]);
            set_thread_affinity(&original).unwrap();
            assert_eq!(thread_affinity().unwrap(), original);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn affinity_errors() {
        assert!(matches!(
            set_thread_affinity(&[]),
            Err(MemPolicyError::EmptyCpuSet)
        ));
        assert!(matches!(
            set_thread_affinity(&[70_000]),
            Err(MemPolicyError::CpuOutOfRange { cpu: 70_000 })
        ));
        // A CPU that exists in no mask: the kernel refuses an empty intersection.
        let err = set_thread_affinity(&[4000]).unwrap_err();
        assert_eq!(err.to_string(), "cannot pin the thread to CPUs 4000");
    }

    #[test]
    fn page_nodes_of_nothing() {
        assert_eq!(page_nodes(&[]).unwrap(), Vec::<i32>::new());
    }
}
