//! Integration tests of the `vmm` binary: the built-in guest on real KVM (tier 2), ACPI tables
//! checked with ACPICA's `iasl`, and bad input. One test binary, so the helpers are shared.

mod acpi_iasl;
mod builtin_guest;
mod common;
mod errors;
mod linux_guest;
