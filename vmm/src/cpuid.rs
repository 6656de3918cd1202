//! APIC ids and the CPUID topology leaves, derived from the layout so that CPUID, the MADT and the
//! SRAT tell a guest the same story: each vnode is one package, its vCPUs are that package's cores
//! (one thread each), and an APIC id is `vnode << core_bits | core`.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use numa::Layout;

use vmm_guest::abi::{CPUID_MARK, CPUID_TIMING_LEAF as TIMING_LEAF};

/// Errors preparing CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// KVM rejected the entry list.
    #[error("cannot build the CPUID table")]
    Build(#[source] vmm_sys_util::fam::Error),
}

/// Which APIC id each vCPU gets, and the package shape behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuTopology {
    /// Indexed by vCPU id.
    pub apic_ids: Vec<u32>,
    /// Width of the core field in an APIC id.
    pub core_bits: u32,
    /// Package (vnode position in the layout) of each vCPU.
    pub package_of: Vec<u32>,
    /// Cores in each package.
    pub cores_in_package: Vec<u32>,
}

impl CpuTopology {
    /// Numbers the vCPUs of each vnode as the cores of one package.
    pub fn new(layout: &Layout) -> Self {
        let n = layout.vcpu_count() as usize;
        let widest = layout
            .vnodes
            .iter()
            .map(|v| v.vcpus.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let core_bits = (widest as u32).next_power_of_two().trailing_zeros();
        let mut apic_ids = vec![0; n];
        let mut package_of = vec![0; n];
        for (pkg, vnode) in layout.vnodes.iter().enumerate() {
            for (core, &vcpu) in vnode.vcpus.iter().enumerate() {
                apic_ids[vcpu as usize] = ((pkg as u32) << core_bits) | core as u32;
                package_of[vcpu as usize] = pkg as u32;
            }
        }
        let cores_in_package = layout.vnodes.iter().map(|v| v.vcpus.len() as u32).collect();
        Self {
            apic_ids,
            core_bits,
            package_of,
            cores_in_package,
        }
    }

    /// The largest APIC id in use.
    pub fn max_apic_id(&self) -> u32 {
        self.apic_ids.iter().copied().max().unwrap_or(0)
    }

    /// The CPUID table for one vCPU: KVM's supported set with the topology leaves rewritten.
    pub fn cpuid(&self, supported: &CpuId, vcpu: u32, tsc_khz: u32) -> Result<CpuId, CpuidError> {
        let v = vcpu as usize;
        let apic = self.apic_ids[v];
        let package = self.package_of[v];
        let cores = self.cores_in_package[package as usize].max(1);
        let per_package = 1u32 << self.core_bits;
        let mut entries: Vec<kvm_cpuid_entry2> = supported
            .as_slice()
            .iter()
            .filter(|e| !matches!(e.function, 0xb | 0x1f) && e.function != TIMING_LEAF)
            .copied()
            .collect();
        for e in &mut entries {
            match e.function {
                1 => {
                    e.ebx = (e.ebx & 0xffff) | ((apic & 0xff) << 24) | (per_package.min(255) << 16);
                    e.ecx |= 1 << 31; // hypervisor present
                    if per_package > 1 {
                        e.edx |= 1 << 28; // HTT: the package field above is valid
                    }
                }
                // Intel deterministic cache parameters: cores per package.
                4 => e.eax = (e.eax & 0x03ff_ffff) | ((per_package - 1) << 26),
                0x4000_0000 => e.eax = e.eax.max(TIMING_LEAF),
                // AMD: cores per package and the APIC id width.
                0x8000_0008 => e.ecx = (e.ecx & !0xf0ff) | (self.core_bits << 12) | (cores - 1),
                // AMD extended APIC id, core id, node id (one node per package).
                0x8000_001e => {
                    e.eax = apic;
                    e.ebx = apic & (per_package - 1);
                    e.ecx = package & 0xff;
                }
                _ => {}
            }
        }
        let leaf_b = |index: u32, eax: u32, ebx: u32, level_type: u32| kvm_cpuid_entry2 {
            function: 0xb,
            index,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax,
            ebx,
            ecx: (level_type << 8) | index,
            edx: apic,
            ..Default::default()
        };
        // x2APIC topology: SMT level (1 thread per core), core level, then the terminating level.
        entries.push(leaf_b(0, 0, 1, 1));
        entries.push(leaf_b(1, self.core_bits, cores, 2));
        entries.push(leaf_b(2, 0, 0, 0));
        entries.push(kvm_cpuid_entry2 {
            function: TIMING_LEAF,
            eax: tsc_khz,
            ebx: 1_000_000, // the local APIC timer runs at 1 GHz under KVM
            ecx: CPUID_MARK,
            ..Default::default()
        });
        CpuId::from_entries(&entries).map_err(CpuidError::Build)
    }
}

/// The APIC id a CPUID table gives (leaf 0xB EDX), e.g. read back from KVM.
pub fn apic_id_of(cpuid: &CpuId) -> Option<u32> {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0xb && e.index == 0)
        .map(|e| e.edx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::layout;

    #[test]
    fn apic_ids_pack_vnodes_as_packages() {
        let l = layout(
            &[
                (vec![0, 1, 2], &[(0, 1 << 30)]),
                (vec![3], &[(1 << 30, 2 << 30)]),
            ],
            vec![vec![10, 20], vec![20, 10]],
        );
        let t = CpuTopology::new(&l);
        assert_eq!(t.core_bits, 2);
        assert_eq!(t.apic_ids, vec![0, 1, 2, 4]);
        assert_eq!(t.package_of, vec![0, 0, 0, 1]);
        let single = CpuTopology::new(&layout(
            &[(vec![0], &[(0, 1 << 30)]), (vec![1], &[(1 << 30, 2 << 30)])],
            vec![vec![10, 20], vec![20, 10]],
        ));
        assert_eq!((single.core_bits, single.apic_ids.clone()), (0, vec![0, 1]));
    }

    #[test]
    fn cpuid_leaves_agree_with_the_apic_ids() {
        let l = layout(
            &[
                (vec![0, 1, 2], &[(0, 1 << 30)]),
                (vec![3], &[(1 << 30, 2 << 30)]),
            ],
            vec![vec![10, 20], vec![20, 10]],
        );
        let t = CpuTopology::new(&l);
        let base = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 0,
                eax: 0xd,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                edx: 77,
                ..Default::default()
            },
        ])
        .unwrap();
        let c = t.cpuid(&base, 3, 2_000_000).unwrap();
        let find = |f: u32, i: u32| {
            *c.as_slice()
                .iter()
                .find(|e| e.function == f && e.index == i)
                .unwrap()
        };
        assert_eq!(find(1, 0).ebx >> 24, 4);
        assert_eq!(find(1, 0).ebx & 0xffff, 0x0800, "brand/clflush bits kept");
        assert_eq!(find(0xb, 0).edx, 4);
        assert_eq!(find(0xb, 1).eax, 2);
        assert_eq!(find(0xb, 1).ebx, 1, "package 1 has one core");
        assert_eq!(c.as_slice().iter().filter(|e| e.function == 0xb).count(), 3);
        assert_eq!(find(TIMING_LEAF, 0).eax, 2_000_000);
        assert_eq!(find(TIMING_LEAF, 0).ecx, CPUID_MARK);
        assert_eq!(apic_id_of(&c), Some(4));
    }
}
