//! What one run is asked to do: the CLI fills a [`VmConfig`], tests build one directly.

use std::path::PathBuf;
use std::time::Duration;

use numa::{GuestRange, LayoutRequest};

use crate::linux::LinuxSpec;
use crate::memory::Backing;

/// The 32-bit MMIO hole (local APIC, I/O APIC, future PCI): no RAM between 3 GiB and 4 GiB.
pub const MMIO_HOLE: GuestRange = GuestRange {
    start: 3 << 30,
    end: 4 << 30,
};

/// STREAM's default NTIMES.
pub const DEFAULT_PASSES: u32 = 10;

/// Where the guest's serial console goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleTarget {
    /// The VMM's standard output (the default).
    Stdout,
    /// Standard error (with `--json`, so stdout holds only the JSON).
    Stderr,
    /// Nowhere.
    Sink,
}

/// One VM run.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The vNUMA shape asked for.
    pub layout: LayoutRequest,
    /// A Linux kernel to boot instead of the built-in guest.
    pub kernel: Option<LinuxSpec>,
    /// Pin each vCPU thread to its own host CPU in its vnode's host node.
    pub pin: bool,
    /// Let vCPUs share host CPUs when a node has too few.
    pub overcommit: bool,
    /// Guest RAM backing.
    pub backing: Backing,
    /// Fault all guest RAM in before the guest starts (otherwise on the guest's first touch).
    pub prefault: bool,
    /// STREAM passes in the built-in guest.
    pub passes: u32,
    /// Also run the kernels on host threads placed as the vCPUs.
    pub compare_host: bool,
    /// Write the ACPI tables here.
    pub dump_acpi: Option<PathBuf>,
    /// Serial console destination.
    pub console: ConsoleTarget,
    /// Stop the guest after this long.
    pub timeout: Option<Duration>,
}

impl VmConfig {
    /// The defaults for `--numa-nodes n`.
    pub fn with_numa_nodes(n: u32) -> Self {
        Self {
            layout: LayoutRequest {
                numa_nodes: Some(n),
                vcpus: None,
                memory_bytes: None,
                vnodes: Vec::new(),
                distances: None,
                mmio_hole: MMIO_HOLE,
            },
            kernel: None,
            pin: false,
            overcommit: false,
            backing: Backing::Thp,
            prefault: true,
            passes: DEFAULT_PASSES,
            compare_host: false,
            dump_acpi: None,
            console: ConsoleTarget::Stdout,
            timeout: None,
        }
    }
}
