//! Boots the built-in guest: loads its ELF image and writes the CPU structures it needs to start
//! every vCPU directly at CPL 3 in 64-bit mode (see `vmm_guest::abi` for the memory map and
//! `shared/reference/kvm-pvm.md` for why CPL 3: on `kvm_pvm` only CPL-3 code runs natively).

use std::io::Cursor;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::{elf::Elf, KernelLoader};
use numa::Layout;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_guest::abi::{
    GuestConfig, CONFIG_GPA, EXCEPTION_FLAG, GDT_GPA, IDT_GPA, IMAGE_END, IMAGE_GPA, KSTACK_GPA,
    KSTACK_STRIDE, MAX_PASSES, MAX_VCPUS, PAGE_TABLES_END, PAGE_TABLES_GPA, PORT_REPORT,
    RESERVED_END, STACKS_GPA, STACK_SIZE, STUBS_GPA, STUB_STRIDE, TSS_GPA, TSS_STRIDE,
};

/// The guest image, built from `guest/src` by `build.rs`.
pub static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vmm-guest.elf"));

const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;
/// Selectors: kernel code/data, user data/code, then one TSS per vCPU (GDT_GPA).
const USER_DS: u16 = 0x18 | 3;
const USER_CS: u16 = 0x20 | 3;
const KERNEL_CS: u16 = 0x08;
const TSS_SELECTOR_BASE: u16 = 0x28;
/// 104-byte TSS followed by an I/O bitmap for ports 0..0x400, then the 0xff terminator.
const IO_BITMAP_OFFSET: u64 = 0x68;
const IO_BITMAP_BYTES: u64 = 0x400 / 8;
const TSS_LIMIT: u32 = (IO_BITMAP_OFFSET + IO_BITMAP_BYTES) as u32;
/// Present, writable, user pages at every level; PS for 2 MiB leaves.
const PTE_TABLE: u64 = 0x7;
const PTE_2M: u64 = 0x87;

/// Errors preparing the built-in guest.
#[derive(Debug, thiserror::Error)]
pub enum BuiltinError {
    /// The layout does not suit the built-in guest.
    #[error("the built-in guest {0}")]
    Unsupported(String),
    /// The image did not load.
    #[error("cannot load the built-in guest image")]
    Load(#[source] linux_loader::loader::Error),
    /// Writing guest memory failed.
    #[error("cannot write the built-in guest's start-up structures")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// What each vCPU needs to start.
#[derive(Debug, Clone, Copy)]
pub struct BuiltinBoot {
    entry: u64,
    vcpus: u32,
}

/// Checks that the layout fits the guest's fixed memory map.
pub fn check_layout(layout: &Layout, passes: u32) -> Result<(), BuiltinError> {
    let vcpus = layout.vcpu_count();
    if vcpus > MAX_VCPUS {
        return Err(BuiltinError::Unsupported(format!(
            "supports at most {MAX_VCPUS} vCPUs, not {vcpus}"
        )));
    }
    if !(2..=MAX_PASSES).contains(&passes) {
        return Err(BuiltinError::Unsupported(format!(
            "runs 2..={MAX_PASSES} STREAM passes, not {passes}"
        )));
    }
    let first = layout.vnodes.first().and_then(|v| v.ranges.first());
    if first.is_none_or(|r| r.start != 0 || r.end < RESERVED_END + MIB2) {
        return Err(BuiltinError::Unsupported(format!(
            "needs vnode 0 to start at 0 with at least {} MiB",
            (RESERVED_END + MIB2) >> 20
        )));
    }
    let top = top_of_ram(layout);
    let max = (PAGE_TABLES_END - PAGE_TABLES_GPA) / 4096 - 2;
    if top.div_ceil(GIB) > max.min(512) {
        return Err(BuiltinError::Unsupported(format!(
            "maps at most {} GiB of guest-physical space",
            max.min(512)
        )));
    }
    Ok(())
}

fn top_of_ram(layout: &Layout) -> u64 {
    layout
        .vnodes
        .iter()
        .flat_map(|v| v.ranges.iter().map(|r| r.end))
        .max()
        .unwrap_or(0)
}

impl BuiltinBoot {
    /// Loads the image and writes page tables, GDT, IDT, TSSs, exception stubs and the config.
    pub fn load(
        mem: &GuestMemoryMmap,
        layout: &Layout,
        config: GuestConfig,
    ) -> Result<Self, BuiltinError> {
        check_layout(layout, config.passes)?;
        let loaded = Elf::load(
            mem,
            None,
            &mut Cursor::new(IMAGE),
            Some(GuestAddress(IMAGE_GPA)),
        )
        .map_err(BuiltinError::Load)?;
        if loaded.kernel_end > IMAGE_END {
            return Err(BuiltinError::Unsupported(format!(
                "image ends at {:#x}, past {IMAGE_END:#x}",
                loaded.kernel_end
            )));
        }
        let vcpus = layout.vcpu_count();
        let w = |bytes: &[u8], gpa: u64| {
            mem.write_slice(bytes, GuestAddress(gpa))
                .map_err(BuiltinError::GuestMemory)
        };
        w(&page_tables(layout), PAGE_TABLES_GPA)?;
        w(&gdt(vcpus), GDT_GPA)?;
        w(&idt(), IDT_GPA)?;
        w(&stubs(), STUBS_GPA)?;
        for vcpu in 0..u64::from(vcpus) {
            w(&tss(vcpu), TSS_GPA + vcpu * TSS_STRIDE)?;
        }
        let mut cfg = [0u8; GuestConfig::SIZE];
        config.write(&mut cfg);
        w(&cfg, CONFIG_GPA)?;
        Ok(Self {
            entry: loaded.kernel_load.0,
            vcpus,
        })
    }

    /// General registers of vCPU `vcpu` at start: entry point, own stack, index in `rdi`.
    pub fn regs(&self, vcpu: u32) -> kvm_regs {
        kvm_regs {
            rip: self.entry,
            rsp: STACKS_GPA + (u64::from(vcpu) + 1) * STACK_SIZE - 8,
            rdi: u64::from(vcpu),
            rflags: 0x2,
            ..Default::default()
        }
    }

    /// Segment and control registers: 64-bit, CPL 3, paging on, own TSS (for its I/O bitmap).
    pub fn sregs(&self, vcpu: u32, mut sregs: kvm_sregs) -> kvm_sregs {
        let seg = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl: 3,
            db,
            s: 1,
            l,
            g: 1,
            ..Default::default()
        };
        sregs.cs = seg(USER_CS, 11, 1, 0);
        let data = seg(USER_DS, 3, 0, 1);
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.tr = kvm_segment {
            base: TSS_GPA + u64::from(vcpu) * TSS_STRIDE,
            limit: TSS_LIMIT,
            selector: TSS_SELECTOR_BASE + 16 * vcpu as u16,
            type_: tr_type(),
            present: 1,
            ..Default::default()
        };
        sregs.ldt = kvm_segment {
            unusable: 1,
            type_: 2,
            present: 1,
            ..Default::default()
        };
        sregs.gdt.base = GDT_GPA;
        sregs.gdt.limit = (u32::from(TSS_SELECTOR_BASE) + 16 * self.vcpus - 1) as u16;
        sregs.idt.base = IDT_GPA;
        sregs.idt.limit = 256 * 16 - 1;
        sregs.cr0 = 0x8001_0033; // PG | WP | NE | ET | MP | PE
        sregs.cr3 = PAGE_TABLES_GPA;
        sregs.cr4 = 0x620; // OSXMMEXCPT | OSFXSR | PAE
        sregs.efer = 0x501; // LMA | LME | SCE
        sregs
    }

    /// x87/SSE state: default control words, so SSE works from the first instruction.
    pub fn fpu() -> kvm_fpu {
        kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        }
    }
}

/// The TR type to load. Intel VMX refuses to enter a guest whose TR is not busy (11). AMD SVM
/// checks nothing, but QEMU's TCG emulation of it (our nested test route) takes the I/O
/// permission bitmap only from an available TSS (9) and raises #GP on every port access from
/// CPL 3 otherwise; so busy on Intel, available on AMD.
fn tr_type() -> u8 {
    let v = core::arch::x86_64::__cpuid(0);
    let amd = (v.ebx, v.edx, v.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163); // "AuthenticAMD"
    if amd {
        9
    } else {
        11
    }
}

/// Identity map of every 2 MiB page that holds RAM; the MMIO hole stays unmapped so a stray
/// access faults instead of exiting as MMIO.
fn page_tables(layout: &Layout) -> Vec<u8> {
    let gib = top_of_ram(layout).div_ceil(GIB) as usize;
    let mut t = vec![0u64; 512 * (2 + gib)];
    let pdpt = PAGE_TABLES_GPA + 0x1000;
    t[0] = pdpt | PTE_TABLE;
    for g in 0..gib {
        let pd = PAGE_TABLES_GPA + 0x2000 + g as u64 * 0x1000;
        t[512 + g] = pd | PTE_TABLE;
    }
    for r in layout.vnodes.iter().flat_map(|v| &v.ranges) {
        let mut page = r.start / MIB2 * MIB2;
        while page < r.end {
            t[1024 + (page / MIB2) as usize] = page | PTE_2M;
            page += MIB2;
        }
    }
    t.iter().flat_map(|e| e.to_le_bytes()).collect()
}

fn gdt(vcpus: u32) -> Vec<u8> {
    let mut g: Vec<u8> = [
        0u64,
        0x00af_9a00_0000_ffff, // 0x08 kernel code, 64-bit
        0x00cf_9200_0000_ffff, // 0x10 kernel data
        0x00cf_f200_0000_ffff, // 0x18 user data
        0x00af_fa00_0000_ffff, // 0x20 user code, 64-bit
    ]
    .iter()
    .flat_map(|d| d.to_le_bytes())
    .collect();
    for vcpu in 0..u64::from(vcpus) {
        let base = TSS_GPA + vcpu * TSS_STRIDE;
        let limit = u64::from(TSS_LIMIT);
        // 16-byte system descriptor: available 64-bit TSS (type 9), present.
        let low = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        g.extend_from_slice(&low.to_le_bytes());
        g.extend_from_slice(&(base >> 32).to_le_bytes());
    }
    g
}

fn tss(vcpu: u64) -> Vec<u8> {
    let mut t = vec![0u8; (TSS_LIMIT + 1) as usize];
    let rsp0 = KSTACK_GPA + (vcpu + 1) * KSTACK_STRIDE;
    t[4..12].copy_from_slice(&rsp0.to_le_bytes());
    t[102..104].copy_from_slice(&(IO_BITMAP_OFFSET as u16).to_le_bytes());
    // Bitmap bytes stay zero (ports open to CPL 3); the terminator must be all ones.
    t[TSS_LIMIT as usize] = 0xff;
    t
}

/// Interrupt gates for the 32 exception vectors, each to its stub at CPL 0.
fn idt() -> Vec<u8> {
    let mut idt = vec![0u8; 256 * 16];
    for v in 0..32u64 {
        let off = STUBS_GPA + v * STUB_STRIDE;
        let gate = &mut idt[v as usize * 16..][..16];
        gate[0..2].copy_from_slice(&(off as u16).to_le_bytes());
        gate[2..4].copy_from_slice(&KERNEL_CS.to_le_bytes());
        gate[5] = 0x8e; // present, DPL 0, 64-bit interrupt gate
        gate[6..8].copy_from_slice(&((off >> 16) as u16).to_le_bytes());
        gate[8..12].copy_from_slice(&((off >> 32) as u32).to_le_bytes());
    }
    idt
}

/// Stub for vector v: `mov eax, EXCEPTION_FLAG | v; mov dx, PORT_REPORT; out dx, eax; hlt; jmp $-1`.
fn stubs() -> Vec<u8> {
    let mut code = vec![0u8; 32 * STUB_STRIDE as usize];
    for v in 0..32u32 {
        let s = &mut code[(v as u64 * STUB_STRIDE) as usize..][..13];
        s[0] = 0xb8;
        s[1..5].copy_from_slice(&(EXCEPTION_FLAG | v).to_le_bytes());
        s[5..7].copy_from_slice(&[0x66, 0xba]);
        s[7..9].copy_from_slice(&PORT_REPORT.to_le_bytes());
        s[9..13].copy_from_slice(&[0xef, 0xf4, 0xeb, 0xfd]);
    }
    code
}

/// Exception vectors that push an error code (so the faulting RIP is one slot further up).
pub fn pushes_error_code(vector: u32) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// Name of an exception vector, for error messages.
pub fn exception_name(vector: u32) -> &'static str {
    const NAMES: [&str; 21] = [
        "#DE divide error",
        "#DB debug",
        "NMI",
        "#BP breakpoint",
        "#OF overflow",
        "#BR bound range",
        "#UD invalid opcode",
        "#NM device not available",
        "#DF double fault",
        "coprocessor overrun",
        "#TS invalid TSS",
        "#NP segment not present",
        "#SS stack fault",
        "#GP general protection",
        "#PF page fault",
        "reserved",
        "#MF x87 error",
        "#AC alignment check",
        "#MC machine check",
        "#XM SIMD error",
        "#VE virtualization",
    ];
    NAMES.get(vector as usize).copied().unwrap_or("exception")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::layout;

    #[test]
    fn image_is_an_elf_linked_at_the_image_address() {
        assert_eq!(&IMAGE[..4], b"\x7fELF");
        let entry = u64::from_le_bytes(IMAGE[24..32].try_into().unwrap());
        assert!((IMAGE_GPA..IMAGE_END).contains(&entry));
    }

    #[test]
    fn page_tables_map_ram_and_skip_the_hole() {
        let l = layout(
            &[(vec![0], &[(0, 3 * GIB)]), (vec![1], &[(4 * GIB, 5 * GIB)])],
            vec![vec![10, 20], vec![20, 10]],
        );
        let bytes = page_tables(&l);
        let e = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(e(0), (PAGE_TABLES_GPA + 0x1000) | PTE_TABLE);
        assert_eq!(e(1024), PTE_2M, "GPA 0 is mapped");
        assert_eq!(e(1024 + 3 * 512 - 1), (3 * GIB - MIB2) | PTE_2M);
        assert_eq!(e(1024 + 3 * 512), 0, "the hole at 3 GiB is not mapped");
        assert_eq!(e(1024 + 4 * 512), (4 * GIB) | PTE_2M);
        assert_eq!(bytes.len(), (2 + 5) * 4096);
    }

    #[test]
    fn stubs_encode_the_vector() {
        let s = stubs();
        let v13 = &s[13 * STUB_STRIDE as usize..][..13];
        assert_eq!(v13[0], 0xb8);
        assert_eq!(
            u32::from_le_bytes(v13[1..5].try_into().unwrap()),
            EXCEPTION_FLAG | 13
        );
    }

    #[test]
    fn small_or_oversized_layouts_are_refused() {
        let tiny = layout(&[(vec![0], &[(0, RESERVED_END)])], vec![vec![10]]);
        assert!(check_layout(&tiny, 10).is_err());
        let ok = layout(&[(vec![0], &[(0, 64 << 20)])], vec![vec![10]]);
        assert!(check_layout(&ok, 10).is_ok());
        assert!(check_layout(&ok, 1).is_err());
        assert!(check_layout(&ok, MAX_PASSES + 1).is_err());
    }
}
