//! CPU affinity of a VM's threads, for the pin/unpin verbs (seed §2.4 "Resource scheduler":
//! "Pinning of resources"). The `sched_setaffinity` call is the only unsafe code here.

use std::io;

/// Threads of process `pid`: (thread id, name), sorted by name then id.
pub fn threads(pid: u32) -> io::Result<Vec<(i32, String)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let e = e?;
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        v.push((tid, comm.trim().to_string()));
    }
    v.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
    Ok(v)
}

/// Restricts thread `tid` to `cpus`.
pub fn set_affinity(tid: i32, cpus: &[u32]) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        let c = usize::try_from(c).unwrap_or(usize::MAX);
        if c >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: `c` is below CPU_SETSIZE (checked above), so the bit is inside `set`.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: `set` is a live cpu_set_t and the size passed is its size; the kernel only reads it.
    let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The CPUs thread `tid` may run on (from `/proc`).
pub fn affinity(tid: i32) -> io::Result<Vec<u32>> {
    let s = std::fs::read_to_string(format!("/proc/{tid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .and_then(crate::hostinfo::parse_cpulist)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_a_thread_and_back() {
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let pid = child.id();
        let t = threads(pid).unwrap();
        assert_eq!(t.len(), 1);
        let tid = t[0].0;
        let all = affinity(tid).unwrap();
        set_affinity(tid, &[all[0]]).unwrap();
        assert_eq!(affinity(tid).unwrap(), vec![all[0]]);
        set_affinity(tid, &all).unwrap();
        assert_eq!(affinity(tid).unwrap(), all);
        assert!(set_affinity(tid, &[100_000]).is_err());
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
