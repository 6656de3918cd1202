//! A KVM virtual machine monitor that gives guests a vNUMA shape and pins them to host cores.
//!
//! One run: the CLI's [`VmConfig`] goes to `numa`, which reads the host topology and plans the
//! vNUMA [`numa::Layout`] and the pin plan ([`plan`]); [`Vmm`] builds the VM from that one layout
//! (guest RAM per vnode bound to its host node, ACPI tables and CPUID derived from it, vCPU
//! threads pinned as planned), runs the guest, and returns its [`RunReport`] for printing.

pub mod acpi;
pub mod builtin;
pub mod cmos;
pub mod config;
pub mod cpuid;
pub mod host_stream;
pub mod linux;
pub mod memory;
mod ratelimit;
pub mod report;
pub mod rss;
pub mod signals;
#[cfg(test)]
mod test_utils;
pub mod vcpu;
pub mod vm;

pub use acpi::{AcpiError, AcpiTables};
pub use builtin::BuiltinError;
pub use config::{ConsoleTarget, VmConfig, DEFAULT_PASSES, MMIO_HOLE};
pub use cpuid::{CpuTopology, CpuidError};
pub use linux::{LinuxError, LinuxSpec, DEFAULT_CMDLINE};
pub use memory::{Backing, GuestRam, MemoryError, Placement};
pub use report::RunReport;
pub use vm::{plan, plan_on, run, Plan, Vmm, VmmError};
