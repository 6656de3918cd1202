//! Host information from sysfs and procfs (seed §2.3: the hypervisor answers for its own
//! resources; §2.6.1 items 1–3): CPUs, NUMA nodes with their CPUs and memory, free memory, load,
//! per-CPU time. Parsers take text so they are tested on fixtures.

use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors of this module.
#[derive(Debug, Error)]
pub enum HostInfoError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file did not have the expected format.
    #[error("cannot parse {0}")]
    Parse(String),
}

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumaNode {
    /// Node id.
    pub id: u32,
    /// Its CPUs.
    pub cpus: Vec<u32>,
    /// Total memory, bytes.
    pub mem_total: u64,
    /// Free memory, bytes.
    pub mem_free: u64,
}

/// What `info` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    /// Host name (the fabric name).
    pub name: String,
    /// Kernel release.
    pub kernel: String,
    /// Online CPUs.
    pub cpus: Vec<u32>,
    /// NUMA nodes.
    pub numa_nodes: Vec<NumaNode>,
    /// Total memory, bytes.
    pub mem_total: u64,
    /// Free memory, bytes.
    pub mem_free: u64,
    /// Available memory, bytes.
    pub mem_available: u64,
    /// Load averages over 1, 5 and 15 minutes.
    pub load: [f64; 3],
    /// Seconds since boot.
    pub uptime: f64,
}

fn read(path: &Path) -> Result<String, HostInfoError> {
    std::fs::read_to_string(path).map_err(|source| HostInfoError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Parses a kernel CPU list such as `0-3,8,10-11`.
pub fn parse_cpulist(s: &str) -> Option<Vec<u32>> {
    let mut v = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if b < a || b - a > 65_536 {
                    return None;
                }
                v.extend(a..=b);
            }
            None => v.push(part.parse().ok()?),
        }
    }
    Some(v)
}

/// Reads a `kB` field from meminfo text (`/proc/meminfo` or a node's `meminfo`), in bytes.
pub fn meminfo_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        // Node files prefix lines with "Node N ".
        let l = l.strip_prefix("Node ").map_or(l, |r| {
            r.split_once(' ').map_or(r, |(_, rest)| rest.trim_start())
        });
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        let kb: u64 = rest.split_whitespace().next()?.parse().ok()?;
        Some(kb * 1024)
    })
}

/// Parses `/proc/loadavg`.
pub fn parse_loadavg(s: &str) -> Option<[f64; 3]> {
    let mut w = s.split_whitespace().map(|x| x.parse::<f64>().ok());
    Some([w.next()??, w.next()??, w.next()??])
}

/// CPU time of one CPU from `/proc/stat`, in clock ticks (USER_HZ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuTime {
    /// CPU id.
    pub cpu: u32,
    /// Busy ticks (user + nice + system + irq + softirq + steal).
    pub busy: u64,
    /// Idle ticks (idle + iowait).
    pub idle: u64,
}

/// Parses the per-CPU lines of `/proc/stat`.
pub fn parse_proc_stat(s: &str) -> Vec<CpuTime> {
    s.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let cpu: u32 = w.next()?.strip_prefix("cpu")?.parse().ok()?;
            let f: Vec<u64> = w.take(8).filter_map(|x| x.parse().ok()).collect();
            if f.len() < 8 {
                return None;
            }
            Some(CpuTime {
                cpu,
                busy: f[0] + f[1] + f[2] + f[5] + f[6] + f[7],
                idle: f[3] + f[4],
            })
        })
        .collect()
}

/// Reads the host's information from `/sys` and `/proc`.
pub fn read_host_info(name: &str) -> Result<HostInfo, HostInfoError> {
    let sys = Path::new("/sys/devices/system");
    let online = read(&sys.join("cpu/online"))?;
    let cpus = parse_cpulist(&online).ok_or_else(|| HostInfoError::Parse("cpu/online".into()))?;
    let mut numa_nodes = Vec::new();
    if let Ok(dir) = std::fs::read_dir(sys.join("node")) {
        for e in dir.flatten() {
            let fname = e.file_name();
            let Some(id) = fname
                .to_str()
                .and_then(|n| n.strip_prefix("node"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let cpulist = read(&e.path().join("cpulist"))?;
            let mi = read(&e.path().join("meminfo"))?;
            numa_nodes.push(NumaNode {
                id,
                cpus: parse_cpulist(&cpulist)
                    .ok_or_else(|| HostInfoError::Parse(format!("node{id}/cpulist")))?,
                mem_total: meminfo_field(&mi, "MemTotal").unwrap_or(0),
                mem_free: meminfo_field(&mi, "MemFree").unwrap_or(0),
            });
        }
    }
    numa_nodes.sort_by_key(|n| n.id);
    let mi = read(Path::new("/proc/meminfo"))?;
    let field = |f: &str| {
        meminfo_field(&mi, f).ok_or_else(|| HostInfoError::Parse(format!("/proc/meminfo {f}")))
    };
    let load = parse_loadavg(&read(Path::new("/proc/loadavg"))?)
        .ok_or_else(|| HostInfoError::Parse("/proc/loadavg".into()))?;
    let uptime = read(Path::new("/proc/uptime"))?
        .split_whitespace()
        .next()
        .and_then(|x| x.parse().ok())
        .unwrap_or(0.0);
    Ok(HostInfo {
        name: name.to_string(),
        kernel: read(Path::new("/proc/sys/kernel/osrelease"))?
            .trim()
            .to_string(),
        cpus,
        numa_nodes,
        mem_total: field("MemTotal")?,
        mem_free: field("MemFree")?,
        mem_available: field("MemAvailable")?,
        load,
        uptime,
    })
}

/// Per-CPU times of this host.
pub fn read_cpu_times() -> Result<Vec<CpuTime>, HostInfoError> {
    Ok(parse_proc_stat(&read(Path::new("/proc/stat"))?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpulists() {
        assert_eq!(
            parse_cpulist("0-3,8,10-11\n"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpulist(""), Some(vec![]));
        assert_eq!(parse_cpulist("3-1"), None);
        assert_eq!(parse_cpulist("a"), None);
        assert_eq!(parse_cpulist("0-99999999"), None);
    }

    #[test]
    fn meminfo() {
        let proc = "MemTotal:       24684084 kB\nMemFree:        22857976 kB\n";
        assert_eq!(meminfo_field(proc, "MemFree"), Some(22_857_976 * 1024));
        let node = "Node 0 MemTotal:        6121676 kB\nNode 0 MemFree:         4296320 kB\n";
        assert_eq!(meminfo_field(node, "MemTotal"), Some(6_121_676 * 1024));
        assert_eq!(meminfo_field(node, "Mem"), None);
    }

    #[test]
    fn loadavg_and_stat() {
        assert_eq!(
            parse_loadavg("1.30 1.40 0.72 7/123 16294\n"),
            Some([1.30, 1.40, 0.72])
        );
        assert_eq!(parse_loadavg("1.0"), None);
        let stat = "cpu  35224 0 6332 118595 407 0 42 32 0 0\n\
                    cpu0 17197 0 3021 60032 56 0 8 16 0 0\n\
                    cpu1 18026 0 3311 58562 351 0 33 16 0 0\nintr 1 2\n";
        let t = parse_proc_stat(stat);
        assert_eq!(t.len(), 2);
        assert_eq!(
            t[1],
            CpuTime {
                cpu: 1,
                busy: 18026 + 3311 + 33 + 16,
                idle: 58562 + 351
            }
        );
    }

    #[test]
    fn reads_this_host() {
        let h = read_host_info("me").unwrap();
        assert!(!h.cpus.is_empty());
        assert!(h.mem_total >= h.mem_free && h.mem_free > 0);
        assert!(!read_cpu_times().unwrap().is_empty());
    }
}
