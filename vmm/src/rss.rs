//! How much memory the VMM itself uses: resident set size beyond guest RAM (the figure
//! Firecracker bounds at 5 MiB).

/// VmRSS of this process minus the guest RAM resident in it (`guest_resident_bytes`: all of it
/// after the prefault, what the guest touched without), or `None` when /proc cannot be read.
pub fn overhead_bytes(guest_resident_bytes: u64) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((kib * 1024).saturating_sub(guest_resident_bytes))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_a_plausible_figure() {
        let b = super::overhead_bytes(0).unwrap();
        assert!(b > 100 << 10 && b < 4 << 30, "{b}");
        assert_eq!(super::overhead_bytes(u64::MAX), Some(0));
    }
}
