//! A KVM virtual machine monitor with vNUMA and pinning.
