//! The built-in guest of `vmm`: a small program of ours that starts at CPL 3 on every vCPU, reads
//! the vNUMA shape from the ACPI tables the VMM wrote (RSDP → XSDT → MADT/SRAT/SLIT), runs the four
//! STREAM kernels on each vCPU over arrays in that vCPU's own vnode, and reports through the ABI in
//! [`abi`].
//!
//! The library half (ABI, ACPI reader, STREAM kernels) is ordinary `no_std` Rust that the VMM also
//! links: it decodes the reports with [`abi`] and runs the very same kernels on host threads for
//! `--compare-host`. `vmm/build.rs` compiles this crate a second time with `--cfg guest_bin` into
//! the guest image, adding [`entry`](self) (the CPL-3 start, port I/O and panic handler).
#![cfg_attr(not(test), no_std)]
#![cfg_attr(guest_bin, no_main)]

pub mod abi;
pub mod acpi;
pub mod stream;

#[cfg(guest_bin)]
mod entry;
