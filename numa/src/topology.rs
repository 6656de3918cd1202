//! Host NUMA topology read from sysfs.
//!
//! Files read, all relative to a configurable root (`/` on a real host, a fixture directory in
//! tests):
//!
//! - `sys/devices/system/cpu/online`: the online CPUs (list format);
//! - `sys/devices/system/cpu/cpuN/online` when present (`0` drops the CPU even if the global list
//!   still names it; `cpu0` usually has no such file);
//! - `sys/devices/system/cpu/cpuN/topology/{physical_package_id,core_id,thread_siblings_list}`;
//! - `sys/devices/system/cpu/cpuF/cache/index*/{level,size}` of the first online CPU `F` (cpu0 on
//!   nearly every host): the last-level cache is the highest level listed;
//! - `sys/devices/system/node/online` and `sys/devices/system/node/nodeN/{cpulist,meminfo,distance}`;
//! - `proc/meminfo` when `sys/devices/system/node` does not exist (kernel built without
//!   `CONFIG_NUMA`): the host is then one node 0 with every online CPU and `MemTotal`; and on a
//!   one-node host, whose node owns all memory, as a floor under the node's own `MemTotal`.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::mempolicy::{self, MemPolicyError};

/// Largest CPU (or node, or vCPU) id the list parser accepts. Linux's `NR_CPUS` tops out at 8192 on
/// x86_64 (`CONFIG_MAXSMP`); the bound keeps a hostile list such as `0-4294967295` from allocating
/// gigabytes.
pub const MAX_LIST_ID: u32 = 65_535;

/// Errors from reading or restricting the host topology.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// A sysfs or procfs file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// A file had content we do not understand.
    #[error("{path}: cannot parse {content:?}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Its (trimmed) content, or the offending line.
        content: String,
        /// Why it did not parse.
        reason: String,
    },
    /// A CPU list such as `0-3,8` is malformed.
    #[error("bad CPU list {list:?}: {reason}")]
    CpuList {
        /// The list as given.
        list: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An online CPU is not in any node's `cpulist`.
    #[error("online CPU {cpu} belongs to no NUMA node")]
    CpuWithoutNode {
        /// The CPU id.
        cpu: u32,
    },
    /// A node's distance row does not have one entry per online node.
    #[error("node {node} distance row has {found} entries for {expected} online nodes")]
    DistanceRow {
        /// The node id.
        node: u32,
        /// Entries found.
        found: usize,
        /// Online nodes.
        expected: usize,
    },
    /// None of the online CPUs is allowed for this process.
    #[error("none of the online CPUs is allowed (allowed: {allowed})")]
    NoAllowedCpus {
        /// The allowed list, formatted.
        allowed: String,
    },
    /// None of the allowed memory nodes is online with memory.
    #[error("no online node with memory is allowed (allowed mems: {allowed})")]
    NoAllowedMemory {
        /// The allowed list, formatted.
        allowed: String,
    },
    /// `/proc/self/status` has no `Mems_allowed_list` line.
    #[error("{path} has no Mems_allowed_list line")]
    NoMemsAllowed {
        /// The file.
        path: PathBuf,
    },
    /// The process's CPU affinity could not be read.
    #[error("cannot read the process CPU affinity")]
    Affinity(#[source] MemPolicyError),
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, TopologyError>;

/// One online, allowed host CPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostCpu {
    /// Logical CPU id (`cpuN`).
    pub id: u32,
    /// The NUMA node whose `cpulist` names it.
    pub node: u32,
    /// `topology/physical_package_id` (socket).
    pub package: u32,
    /// `topology/core_id` (unique within a package).
    pub core: u32,
    /// `topology/thread_siblings_list` (itself included), limited to the CPUs in the topology.
    pub thread_siblings: Vec<u32>,
}

/// One host NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostNode {
    /// Node id (`nodeN`).
    pub id: u32,
    /// Its online, allowed CPUs, sorted (empty for a memory-only node).
    pub cpus: Vec<u32>,
    /// `MemTotal` of the node; 0 when the process may not allocate from it.
    pub memory_bytes: u64,
    /// `MemFree` of the node; 0 when the process may not allocate from it.
    pub free_bytes: u64,
}

impl HostNode {
    /// True when the node has both usable CPUs and usable memory.
    pub fn has_cpus_and_memory(&self) -> bool {
        !self.cpus.is_empty() && self.memory_bytes > 0
    }
}

/// The host topology the process may use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostTopology {
    /// Online nodes, sorted by id: memory-only nodes are included; after [`HostTopology::restrict`]
    /// only nodes with allowed memory or allowed CPUs remain, and `memory_bytes`/`free_bytes` are
    /// 0 for a node whose memory is not allowed.
    pub nodes: Vec<HostNode>,
    /// Online (and, after [`HostTopology::restrict`], allowed) CPUs, sorted by id.
    pub cpus: Vec<HostCpu>,
    /// Node distances, indexed by position in `nodes` (not by node id).
    pub distances: Vec<Vec<u8>>,
    /// Size of the highest-level cache of the first online CPU in bytes (0 when sysfs lists none).
    pub llc_bytes: u64,
}

impl HostTopology {
    /// Reads `<root>/sys/devices/system/{node,cpu}/...`. `root` is `/` on a real host and a
    /// fixture directory in tests. No restriction to allowed CPUs or mems is applied.
    pub fn from_sysfs(root: &Path) -> Result<Self> {
        let cpu_dir = root.join("sys/devices/system/cpu");
        let node_dir = root.join("sys/devices/system/node");

        let mut online = Vec::new();
        for id in read_list(&cpu_dir.join("online"))? {
            let flag = cpu_dir.join(format!("cpu{id}/online"));
            // cpu0 usually has no `online` file: it cannot be taken offline.
            if !flag.exists() || read_u64(&flag)? != 0 {
                online.push(id);
            }
        }

        let (node_ids, node_cpus, node_mem, distances) = if node_dir.exists() {
            let (ids, cpus, mut mem, distances) = read_nodes(&node_dir, &online)?;
            // On a one-node host all of the system's memory is that node's. A node's own
            // MemTotal can read far lower while the kernel initialises struct pages lazily
            // (CONFIG_DEFERRED_STRUCT_PAGE_INIT grows zones on demand; seen on our VMs: node 0
            // at 5-7 GiB of 23.5), so take the larger of the two.
            if let ([m], Ok(system)) = (
                mem.as_mut_slice(),
                read_meminfo(&root.join("proc/meminfo"), ""),
            ) {
                *m = (m.0.max(system.0), m.1.max(system.1));
            }
            (ids, cpus, mem, distances)
        } else {
            let (total, free) = read_meminfo(&root.join("proc/meminfo"), "")?;
            (
                vec![0],
                vec![online.clone()],
                vec![(total, free)],
                vec![vec![10]],
            )
        };

        let mut cpus = Vec::with_capacity(online.len());
        for &id in &online {
            let node = node_ids
                .iter()
                .zip(&node_cpus)
                .find(|(_, list)| list.contains(&id))
                .map(|(&n, _)| n)
                .ok_or(TopologyError::CpuWithoutNode { cpu: id })?;
            let topo = cpu_dir.join(format!("cpu{id}/topology"));
            let mut thread_siblings = read_list(&topo.join("thread_siblings_list"))?;
            thread_siblings.retain(|s| online.contains(s));
            cpus.push(HostCpu {
                id,
                node,
                package: read_u32(&topo.join("physical_package_id"))?,
                core: read_u32(&topo.join("core_id"))?,
                thread_siblings,
            });
        }

        let nodes = node_ids
            .iter()
            .zip(node_cpus)
            .zip(node_mem)
            .map(|((&id, cpus), (memory_bytes, free_bytes))| HostNode {
                id,
                cpus,
                memory_bytes,
                free_bytes,
            })
            .collect();
        let llc_bytes = match online.first() {
            Some(first) => read_llc(&cpu_dir.join(format!("cpu{first}/cache")))?,
            None => 0,
        };
        Ok(HostTopology {
            nodes,
            cpus,
            distances,
            llc_bytes,
        })
    }

    /// Keeps only the CPUs in `allowed_cpus` and the memory of the nodes in `allowed_mems`.
    ///
    /// A node with allowed CPUs but no allowed memory stays, with `memory_bytes` and `free_bytes`
    /// set to 0; a node with allowed memory and no allowed CPUs stays with an empty CPU list; a node
    /// with neither is dropped (and its row and column of `distances` with it). Ids in the allowed
    /// lists that the topology does not know are ignored. Fails when no CPU or no node with memory
    /// is left.
    pub fn restrict(self, allowed_cpus: &[u32], allowed_mems: &[u32]) -> Result<Self> {
        let cpu_set: BTreeSet<u32> = allowed_cpus.iter().copied().collect();
        let mem_set: BTreeSet<u32> = allowed_mems.iter().copied().collect();

        let mut cpus: Vec<HostCpu> = self
            .cpus
            .into_iter()
            .filter(|c| cpu_set.contains(&c.id))
            .collect();
        if cpus.is_empty() {
            return Err(TopologyError::NoAllowedCpus {
                allowed: format_cpu_list(allowed_cpus),
            });
        }
        for cpu in &mut cpus {
            cpu.thread_siblings.retain(|s| cpu_set.contains(s));
        }

        let mut keep = Vec::new();
        let mut nodes = Vec::new();
        for (pos, mut node) in self.nodes.into_iter().enumerate() {
            node.cpus.retain(|c| cpu_set.contains(c));
            if !mem_set.contains(&node.id) {
                node.memory_bytes = 0;
                node.free_bytes = 0;
            }
            if !node.cpus.is_empty() || mem_set.contains(&node.id) {
                keep.push(pos);
                nodes.push(node);
            }
        }
        if !nodes.iter().any(|n| n.memory_bytes > 0) {
            return Err(TopologyError::NoAllowedMemory {
                allowed: format_cpu_list(allowed_mems),
            });
        }
        // `get` rather than indexing: the fields are public, so a hand-made topology may carry a
        // short matrix; a missing entry reads as the local (10) or non-NUMA remote (20) value.
        let distance = |r: usize, c: usize| {
            let default = if r == c { 10 } else { 20 };
            self.distances
                .get(r)
                .and_then(|row| row.get(c))
                .copied()
                .unwrap_or(default)
        };
        let distances = keep
            .iter()
            .map(|&r| keep.iter().map(|&c| distance(r, c)).collect())
            .collect();
        Ok(HostTopology {
            nodes,
            cpus,
            distances,
            llc_bytes: self.llc_bytes,
        })
    }

    /// The topology this process may use: [`HostTopology::from_sysfs`] of `/`, restricted to
    /// `sched_getaffinity(0)` and the `Mems_allowed_list` of `/proc/self/status`.
    pub fn current() -> Result<Self> {
        let host = Self::from_sysfs(Path::new("/"))?;
        let cpus = mempolicy::thread_affinity().map_err(TopologyError::Affinity)?;
        let mems = read_mems_allowed(Path::new("/proc/self/status"))?;
        host.restrict(&cpus, &mems)
    }

    /// The node with this id.
    pub fn node(&self, id: u32) -> Option<&HostNode> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The distance between two nodes given by id.
    pub fn distance(&self, a: u32, b: u32) -> Option<u8> {
        let pa = self.nodes.iter().position(|n| n.id == a)?;
        let pb = self.nodes.iter().position(|n| n.id == b)?;
        self.distances.get(pa)?.get(pb).copied()
    }

    /// The CPU with this id.
    pub fn cpu(&self, id: u32) -> Option<&HostCpu> {
        self.cpus.iter().find(|c| c.id == id)
    }
}

/// Parses the sysfs list format: `"0-3,8,10-11"`. Whitespace around the list and its items is
/// ignored, an empty list (a memory-only node's `cpulist`) gives an empty vector, and the result
/// is sorted without duplicates. Ids above [`MAX_LIST_ID`] are refused.
pub fn parse_cpu_list(s: &str) -> Result<Vec<u32>> {
    let bad = |reason: String| TopologyError::CpuList {
        list: s.to_string(),
        reason,
    };
    let parse_id = |t: &str| -> Result<u32> {
        let t = t.trim();
        let v: u32 = t
            .parse()
            .map_err(|_| bad(format!("{t:?} is not a number")))?;
        if v > MAX_LIST_ID {
            return Err(bad(format!("{v} is above {MAX_LIST_ID}")));
        }
        Ok(v)
    };
    let mut set = BTreeSet::new();
    let s_trim = s.trim();
    if s_trim.is_empty() {
        return Ok(Vec::new());
    }
    for item in s_trim.split(',') {
        match item.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (parse_id(a)?, parse_id(b)?);
                if a > b {
                    return Err(bad(format!("range {a}-{b} goes backwards")));
                }
                set.extend(a..=b);
            }
            None => {
                set.insert(parse_id(item)?);
            }
        }
    }
    Ok(set.into_iter().collect())
}

/// Formats ids in the sysfs list format (`[0, 1, 2, 3, 8]` → `"0-3,8"`); the inverse of
/// [`parse_cpu_list`] for sorted lists without duplicates.
pub fn format_cpu_list(ids: &[u32]) -> String {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

type NodeInfo = (Vec<u32>, Vec<Vec<u32>>, Vec<(u64, u64)>, Vec<Vec<u8>>);

/// Reads every online node: ids, online CPUs, (MemTotal, MemFree) and the distance matrix.
fn read_nodes(node_dir: &Path, online_cpus: &[u32]) -> Result<NodeInfo> {
    let ids = read_list(&node_dir.join("online"))?;
    let mut cpus = Vec::with_capacity(ids.len());
    let mut mem = Vec::with_capacity(ids.len());
    let mut distances = Vec::with_capacity(ids.len());
    for &id in &ids {
        let dir = node_dir.join(format!("node{id}"));
        let mut list = read_list(&dir.join("cpulist"))?;
        list.retain(|c| online_cpus.contains(c));
        cpus.push(list);
        mem.push(read_meminfo(&dir.join("meminfo"), &format!("Node {id} "))?);
        let path = dir.join("distance");
        let text = read(&path)?;
        let row = text
            .split_whitespace()
            .map(|t| t.parse::<u8>())
            .collect::<std::result::Result<Vec<u8>, _>>()
            .map_err(|e| parse_error(&path, &text, e.to_string()))?;
        if row.len() != ids.len() {
            return Err(TopologyError::DistanceRow {
                node: id,
                found: row.len(),
                expected: ids.len(),
            });
        }
        distances.push(row);
    }
    Ok((ids, cpus, mem, distances))
}

/// (MemTotal, MemFree) in bytes from a `meminfo` file whose lines start with `prefix`
/// (`"Node 0 "` for a node's file, `""` for `/proc/meminfo`).
fn read_meminfo(path: &Path, prefix: &str) -> Result<(u64, u64)> {
    let text = read(path)?;
    let field = |name: &str| -> Result<u64> {
        let key = format!("{prefix}{name}:");
        let line = text
            .lines()
            .find(|l| l.starts_with(&key))
            .ok_or_else(|| parse_error(path, "", format!("no {name} line")))?;
        let value = line[key.len()..].trim();
        let kb = value
            .strip_suffix("kB")
            .unwrap_or(value)
            .trim()
            .parse::<u64>()
            .map_err(|e| parse_error(path, line, e.to_string()))?;
        Ok(kb.saturating_mul(1024))
    };
    Ok((field("MemTotal")?, field("MemFree")?))
}

/// The size of the highest cache level listed under `cache_dir` (`index*/{level,size}`).
fn read_llc(cache_dir: &Path) -> Result<u64> {
    let entries = match fs::read_dir(cache_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(TopologyError::Read {
                path: cache_dir.to_path_buf(),
                source,
            })
        }
    };
    let mut best: Option<(u64, u64)> = None;
    for entry in entries {
        let entry = entry.map_err(|source| TopologyError::Read {
            path: cache_dir.to_path_buf(),
            source,
        })?;
        if !entry.file_name().to_string_lossy().starts_with("index") {
            continue;
        }
        let level = read_u64(&entry.path().join("level"))?;
        let size_path = entry.path().join("size");
        let text = read(&size_path)?;
        let size = parse_cache_size(&text).map_err(|r| parse_error(&size_path, &text, r))?;
        if best.is_none_or(|b| (level, size) > b) {
            best = Some((level, size));
        }
    }
    Ok(best.map_or(0, |(_, size)| size))
}

/// Parses a cache `size` file: `32768K`, `1M` or plain bytes.
fn parse_cache_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let (digits, mult) = match t.as_bytes().last() {
        Some(b'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some(b'M') => (&t[..t.len() - 1], 1 << 20),
        Some(b'G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    digits
        .parse::<u64>()
        .map_err(|e| e.to_string())?
        .checked_mul(mult)
        .ok_or_else(|| "size overflows".to_string())
}

/// The `Mems_allowed_list` of a `/proc/<pid>/status` file.
fn read_mems_allowed(path: &Path) -> Result<Vec<u32>> {
    let text = read(path)?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("Mems_allowed_list:"))
        .ok_or_else(|| TopologyError::NoMemsAllowed {
            path: path.to_path_buf(),
        })?;
    parse_cpu_list(line)
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| TopologyError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_list(path: &Path) -> Result<Vec<u32>> {
    parse_cpu_list(&read(path)?)
}

fn read_u64(path: &Path) -> Result<u64> {
    let text = read(path)?;
    text.trim()
        .parse()
        .map_err(|e: std::num::ParseIntError| parse_error(path, &text, e.to_string()))
}

fn read_u32(path: &Path) -> Result<u32> {
    let text = read(path)?;
    text.trim()
        .parse()
        .map_err(|e: std::num::ParseIntError| parse_error(path, &text, e.to_string()))
}

fn parse_error(path: &Path, content: &str, reason: String) -> TopologyError {
    TopologyError::Parse {
        path: path.to_path_buf(),
        content: content.trim().to_string(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_list_forms() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11\n").unwrap(),
            [0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_cpu_list("\n").unwrap(), Vec::<u32>::new());
        assert_eq!(parse_cpu_list("5").unwrap(), [5]);
        assert_eq!(parse_cpu_list("3,1,1-2").unwrap(), [1, 2, 3]);
        assert_eq!(parse_cpu_list(" 0 - 1 , 4 ").unwrap(), [0, 1, 4]);
    }

    #[test]
    fn cpu_list_errors() {
        for (input, reason) in [
            ("3-1", "range 3-1 goes backwards"),
            ("0-4294967296", "is not a number"),
            ("0-70000", "70000 is above 65535"),
            ("a", "\"a\" is not a number"),
            ("1,,2", "\"\" is not a number"),
            ("-1", "\"\" is not a number"),
        ] {
            let err = parse_cpu_list(input).unwrap_err().to_string();
            assert!(err.contains(reason), "{input}: {err}");
            assert!(err.starts_with("bad CPU list"), "{err}");
        }
    }

    #[test]
    fn cpu_list_format_round_trip() {
        for ids in [vec![], vec![0], vec![0, 1, 2, 3, 8, 10, 11], vec![1, 3, 5]] {
            let text = format_cpu_list(&ids);
            assert_eq!(parse_cpu_list(&text).unwrap(), ids, "{text}");
        }
        assert_eq!(format_cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
    }

    #[test]
    fn cache_sizes() {
        assert_eq!(parse_cache_size("32768K\n"), Ok(32 << 20));
        assert_eq!(parse_cache_size("1M"), Ok(1 << 20));
        assert_eq!(parse_cache_size("4096"), Ok(4096));
        assert!(parse_cache_size("K").is_err());
    }

    #[test]
    fn mems_allowed_of_this_process() {
        let mems = read_mems_allowed(Path::new("/proc/self/status")).unwrap();
        assert!(!mems.is_empty());
        assert!(mems.iter().all(|&m| m <= MAX_LIST_ID), "{mems:?}");
    }
}
