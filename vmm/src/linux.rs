//! Boots a Linux kernel: bzImage through the 64-bit boot protocol (Documentation/x86/boot.rst)
//! or an ELF vmlinux through its PVH entry point,
//! with an initramfs, a command line, an e820 map of one or two RAM ranges per vnode and the holes
//! Linux expects, and the ACPI tables of [`crate::acpi`] (RSDP in the BIOS area and in the zero
//! page). Only the boot vCPU gets registers; the others wait for INIT/SIPI in the in-kernel LAPIC.

use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use numa::Layout;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_guest::abi::ACPI_GPA;

/// The command line used when none is given.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// I/O port of the ACPI sleep control register (FADT, hardware-reduced ACPI): the guest writes
/// `SLP_TYP << 2 | SLP_EN` here to power off.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// I/O port of the ACPI sleep status register.
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// I/O port of the ACPI reset register.
pub const RESET_PORT: u16 = 0x604;
/// Value the guest writes to [`RESET_PORT`].
pub const RESET_VALUE: u8 = 0x1;
/// `SLP_TYP` of S5 (soft off) in the DSDT's `_S5_` package.
pub const S5_SLP_TYP: u8 = 5;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;

const ZERO_PAGE: u64 = 0x7000;
const BOOT_STACK: u64 = 0x8ff0;
const GDT: u64 = 0x500;
const IDT: u64 = 0x520;
const PML4: u64 = 0x9000;
const PDPT: u64 = 0xa000;
const PD: u64 = 0xb000;
const CMDLINE: u64 = 0x2_0000;
const HIMEM: u64 = 0x10_0000;
const EBDA: u64 = 0x9_fc00;
const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const E820_MAX: usize = 128;

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxSpec {
    /// bzImage.
    pub kernel: PathBuf,
    /// Initial ramdisk (cpio), if any.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
}

/// Errors loading Linux.
#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    /// A file cannot be opened or read.
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    /// The kernel is not a bzImage we can boot.
    #[error("{0} is not a bootable bzImage ({1})")]
    Kernel(String, linux_loader::loader::Error),
    /// An ELF kernel without a PVH entry point.
    #[error("{0} is an ELF kernel without a PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY); use its bzImage")]
    NoPvhEntry(String),
    /// The kernel is too old for the 64-bit boot protocol.
    #[error("{0}: boot protocol {1}.{2:02} is older than 2.12, which 64-bit boot needs")]
    OldProtocol(String, u16, u16),
    /// The command line is too long.
    #[error("the kernel command line is {0} bytes, over the kernel's limit of {1}")]
    CmdlineTooLong(usize, usize),
    /// The command line has characters the kernel does not take.
    #[error("the kernel command line is invalid: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// The initramfs does not fit.
    #[error("the initramfs ({0} MiB) does not fit in guest RAM below 4 GiB above the kernel ({1} MiB free there)")]
    InitramfsTooLarge(u64, u64),
    /// Too many memory ranges for the zero page.
    #[error("the layout needs {0} e820 entries, more than the {E820_MAX} the zero page holds")]
    TooManyRanges(usize),
    /// Guest memory could not be written.
    #[error("cannot write the kernel's boot data into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    /// vnode 0 does not start at 0 or is too small for the low boot area.
    #[error("Linux needs vnode 0 to start at guest address 0 with at least 64 MiB")]
    LowMemory,
}

/// The zero page, as plain bytes for vm-memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);

// SAFETY: boot_params is a bindgen repr(C, packed) struct of integers and arrays of integers:
// every bit pattern is valid and it has no padding or pointers.
unsafe impl ByteValued for ZeroPage {}

/// A loaded kernel: where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy)]
pub struct LinuxBoot {
    entry: u64,
    protocol: Protocol,
}

/// GDT: null, 32-bit code (0x08, PVH), 64-bit code (`__BOOT_CS` 0x10), data (`__BOOT_DS` 0x18),
/// TSS (0x20).
const GDT_ENTRIES: [u64; 5] = [
    0,
    0x00cf_9b00_0000_ffff,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
];

fn read_error(path: &Path) -> impl FnOnce(std::io::Error) -> LinuxError + '_ {
    move |e| LinuxError::Read(path.display().to_string(), e)
}

/// The e820 map: RAM per guest range, with the EBDA and the BIOS area (where the ACPI tables
/// are) reserved below 1 MiB.
pub fn e820(layout: &Layout) -> Result<Vec<boot_e820_entry>, LinuxError> {
    let mut ranges: Vec<(u64, u64)> = layout
        .vnodes
        .iter()
        .flat_map(|v| v.ranges.iter().map(|r| (r.start, r.end)))
        .collect();
    ranges.sort_unstable();
    let entry = |addr, end: u64, r#type| boot_e820_entry {
        addr,
        size: end - addr,
        r#type,
    };
    let mut out = Vec::new();
    for (start, end) in ranges {
        if start < HIMEM {
            out.push(entry(start, end.min(EBDA), E820_RAM));
            out.push(entry(EBDA, HIMEM, E820_RESERVED));
            if end > HIMEM {
                out.push(entry(HIMEM, end, E820_RAM));
            }
        } else {
            out.push(entry(start, end, E820_RAM));
        }
    }
    if out.len() > E820_MAX {
        return Err(LinuxError::TooManyRanges(out.len()));
    }
    Ok(out)
}

/// Identity map of the first 4 GiB with 2 MiB pages, as the 64-bit boot protocol requires for
/// the kernel, zero page, command line and initramfs.
fn page_tables(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_obj(PDPT | 0x3, GuestAddress(PML4))?;
    for g in 0..4u64 {
        mem.write_obj((PD + g * 0x1000) | 0x3, GuestAddress(PDPT + g * 8))?;
        for i in 0..512u64 {
            let addr = g * GIB + i * MIB2;
            mem.write_obj(addr | 0x83, GuestAddress(PD + g * 0x1000 + i * 8))?;
        }
    }
    Ok(())
}

/// Writes the command line at [`CMDLINE`], refusing one the kernel would truncate.
fn write_cmdline(mem: &GuestMemoryMmap, text: &str, limit: usize) -> Result<(), LinuxError> {
    if text.len() >= limit {
        return Err(LinuxError::CmdlineTooLong(text.len(), limit - 1));
    }
    let mut cmdline = Cmdline::new(limit).map_err(LinuxError::Cmdline)?;
    cmdline.insert_str(text).map_err(LinuxError::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE), &cmdline).map_err(|_| {
        LinuxError::GuestMemory(vm_memory::GuestMemoryError::InvalidGuestAddress(
            GuestAddress(CMDLINE),
        ))
    })
}

/// Puts the initramfs as high as possible in one RAM range, below `ceiling` and above `floor`
/// (everything the kernel uses while it unpacks itself); returns its address and size.
fn place_initramfs(
    mem: &GuestMemoryMmap,
    layout: &Layout,
    path: &Path,
    floor: u64,
    ceiling: u64,
) -> Result<(u64, u64), LinuxError> {
    let data = std::fs::read(path).map_err(read_error(path))?;
    let size = data.len() as u64;
    let ranges = || layout.vnodes.iter().flat_map(|v| &v.ranges);
    let best = ranges()
        .filter_map(|r| {
            let top = r.end.min(ceiling);
            let start = top.checked_sub(size)? / 4096 * 4096;
            (start >= r.start.max(floor)).then_some(start)
        })
        .max();
    let Some(at) = best else {
        let free = ranges()
            .map(|r| r.end.min(ceiling).saturating_sub(r.start.max(floor)))
            .max()
            .unwrap_or(0);
        return Err(LinuxError::InitramfsTooLarge(
            size.div_ceil(1 << 20),
            free >> 20,
        ));
    };
    mem.write_slice(&data, GuestAddress(at))
        .map_err(LinuxError::GuestMemory)?;
    Ok((at, size))
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// bzImage: 64-bit mode, zero page in `rsi`.
    Linux64,
    /// ELF vmlinux with a PVH note: 32-bit protected mode, paging off, start info in `ebx`.
    Pvh,
}

impl LinuxBoot {
    /// Loads kernel, initramfs and command line and writes the boot data, GDT and page tables.
    /// An ELF file boots through its PVH entry point, anything else as a bzImage.
    pub fn load(
        mem: &GuestMemoryMmap,
        layout: &Layout,
        spec: &LinuxSpec,
    ) -> Result<Self, LinuxError> {
        let low = layout.vnodes.first().and_then(|v| v.ranges.first());
        if low.is_none_or(|r| r.start != 0 || r.end < 64 << 20) {
            return Err(LinuxError::LowMemory);
        }
        let mut kernel = File::open(&spec.kernel).map_err(read_error(&spec.kernel))?;
        let mut magic = [0u8; 4];
        let is_elf = kernel.read_exact(&mut magic).is_ok() && &magic == b"\x7fELF";
        kernel.rewind().map_err(read_error(&spec.kernel))?;
        let boot = if is_elf {
            Self::load_pvh(mem, layout, spec, &mut kernel)?
        } else {
            Self::load_bzimage(mem, layout, spec, &mut kernel)?
        };
        let w = |r: Result<(), vm_memory::GuestMemoryError>| r.map_err(LinuxError::GuestMemory);
        for (i, d) in GDT_ENTRIES.iter().enumerate() {
            w(mem.write_obj(*d, GuestAddress(GDT + i as u64 * 8)))?;
        }
        w(mem.write_obj(0u64, GuestAddress(IDT)))?;
        w(page_tables(mem))?;
        Ok(boot)
    }

    fn load_bzimage(
        mem: &GuestMemoryMmap,
        layout: &Layout,
        spec: &LinuxSpec,
        kernel: &mut File,
    ) -> Result<Self, LinuxError> {
        let kpath = spec.kernel.display().to_string();
        let loaded = BzImage::load(mem, None, kernel, Some(GuestAddress(HIMEM)))
            .map_err(|e| LinuxError::Kernel(kpath.clone(), e))?;
        let mut hdr = loaded.setup_header.ok_or_else(|| {
            LinuxError::Kernel(
                kpath.clone(),
                linux_loader::loader::Error::InvalidKernelStartAddress,
            )
        })?;
        let version = hdr.version;
        if version < 0x020c {
            return Err(LinuxError::OldProtocol(kpath, version >> 8, version & 0xff));
        }
        let limit = match hdr.cmdline_size {
            0 => 2048,
            n => n as usize,
        };
        write_cmdline(mem, &spec.cmdline, limit)?;
        if let Some(path) = &spec.initramfs {
            let floor = loaded
                .kernel_end
                .max(hdr.pref_address + u64::from(hdr.init_size));
            let ceiling = u64::from(hdr.initrd_addr_max)
                .saturating_add(1)
                .min(4 * GIB);
            let (at, size) = place_initramfs(mem, layout, path, floor, ceiling)?;
            hdr.ramdisk_image = at as u32;
            hdr.ramdisk_size = size as u32;
        }
        hdr.type_of_loader = 0xff;
        hdr.boot_flag = 0xaa55;
        hdr.header = 0x5372_6448; // "HdrS"
        hdr.cmd_line_ptr = CMDLINE as u32;
        hdr.cmdline_size = spec.cmdline.len() as u32;
        hdr.loadflags |= 0x01 | 0x80; // LOADED_HIGH, CAN_USE_HEAP
        hdr.heap_end_ptr = 0xfe00;
        let mut params = boot_params {
            hdr,
            acpi_rsdp_addr: ACPI_GPA,
            ..Default::default()
        };
        let map = e820(layout)?;
        params.e820_entries = map.len() as u8;
        params.e820_table[..map.len()].copy_from_slice(&map);
        mem.write_obj(ZeroPage(params), GuestAddress(ZERO_PAGE))
            .map_err(LinuxError::GuestMemory)?;
        // The 64-bit entry point is 0x200 past the start of the protected-mode kernel.
        Ok(Self {
            entry: loaded.kernel_load.0 + 0x200,
            protocol: Protocol::Linux64,
        })
    }

    /// PVH (xen/include/public/arch-x86/hvm/start_info.h): start info, memory map and the
    /// initramfs as module 0, where the zero page would be.
    fn load_pvh(
        mem: &GuestMemoryMmap,
        layout: &Layout,
        spec: &LinuxSpec,
        kernel: &mut File,
    ) -> Result<Self, LinuxError> {
        let kpath = spec.kernel.display().to_string();
        let loaded = Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM)))
            .map_err(|e| LinuxError::Kernel(kpath.clone(), e))?;
        let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
            return Err(LinuxError::NoPvhEntry(kpath));
        };
        // Linux's COMMAND_LINE_SIZE on x86.
        write_cmdline(mem, &spec.cmdline, 2048)?;
        let mut info = hvm_start_info {
            magic: XEN_HVM_START_MAGIC_VALUE,
            version: 1,
            cmdline_paddr: CMDLINE,
            rsdp_paddr: ACPI_GPA,
            ..Default::default()
        };
        let modlist = ZERO_PAGE + 0x80;
        let memmap = ZERO_PAGE + 0x100;
        let w = |r: Result<(), vm_memory::GuestMemoryError>| r.map_err(LinuxError::GuestMemory);
        if let Some(path) = &spec.initramfs {
            let (at, size) = place_initramfs(mem, layout, path, loaded.kernel_end, 4 * GIB)?;
            let module = hvm_modlist_entry {
                paddr: at,
                size,
                ..Default::default()
            };
            w(mem.write_obj(module, GuestAddress(modlist)))?;
            info.nr_modules = 1;
            info.modlist_paddr = modlist;
        }
        let map = e820(layout)?;
        for (i, e) in map.iter().enumerate() {
            let entry = hvm_memmap_table_entry {
                addr: e.addr,
                size: e.size,
                type_: e.r#type,
                reserved: 0,
            };
            w(mem.write_obj(entry, GuestAddress(memmap + i as u64 * 24)))?;
        }
        info.memmap_paddr = memmap;
        info.memmap_entries = map.len() as u32;
        w(mem.write_obj(info, GuestAddress(ZERO_PAGE)))?;
        Ok(Self {
            entry: entry.0,
            protocol: Protocol::Pvh,
        })
    }

    /// The boot vCPU's general registers: entry, boot stack, and the zero page in `rsi`
    /// (64-bit protocol) or the start info in `rbx` (PVH).
    pub fn regs(&self) -> kvm_regs {
        let (rsi, rbx) = match self.protocol {
            Protocol::Linux64 => (ZERO_PAGE, 0),
            Protocol::Pvh => (0, ZERO_PAGE),
        };
        kvm_regs {
            rip: self.entry,
            rsp: BOOT_STACK,
            rbp: BOOT_STACK,
            rsi,
            rbx,
            rflags: 0x2,
            ..Default::default()
        }
    }

    /// The boot vCPU's segments and control registers: 64-bit mode with paging (64-bit
    /// protocol) or flat 32-bit protected mode without paging (PVH); CPL 0 either way.
    pub fn sregs(&self, mut s: kvm_sregs) -> kvm_sregs {
        let seg = |selector: u16, type_: u8, l: u8, db: u8, s_: u8| kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl: 0,
            db,
            s: s_,
            l,
            g: 1,
            ..Default::default()
        };
        let data = seg(0x18, 0x3, 0, 1, 1);
        (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
        s.tr = seg(0x20, 0xb, 0, 0, 0);
        s.gdt.base = GDT;
        s.gdt.limit = (GDT_ENTRIES.len() * 8 - 1) as u16;
        s.idt.base = IDT;
        s.idt.limit = 7;
        match self.protocol {
            Protocol::Linux64 => {
                s.cs = seg(0x10, 0xb, 1, 0, 1);
                s.cr0 = 0x8000_0011; // PG | ET | PE
                s.cr3 = PML4;
                s.cr4 = 0x20; // PAE
                s.efer = 0x500; // LMA | LME
            }
            Protocol::Pvh => {
                s.cs = seg(0x08, 0xb, 0, 1, 1);
                s.cr0 = 0x11; // ET | PE
                s.cr3 = 0;
                s.cr4 = 0;
                s.efer = 0;
            }
        }
        s
    }

    /// x87/SSE defaults.
    pub fn fpu() -> kvm_fpu {
        kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        }
    }

    /// MSRs every vCPU starts with: syscall MSRs cleared, fast strings on, MTRRs enabled with
    /// write-back as the default type (without it all guest memory is uncached).
    pub fn msrs() -> Msrs {
        let e = |index: u32, data: u64| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        };
        Msrs::from_entries(&[
            e(0x174, 0),             // IA32_SYSENTER_CS
            e(0x175, 0),             // IA32_SYSENTER_ESP
            e(0x176, 0),             // IA32_SYSENTER_EIP
            e(0xc000_0081, 0),       // STAR
            e(0xc000_0082, 0),       // LSTAR
            e(0xc000_0083, 0),       // CSTAR
            e(0xc000_0084, 0),       // SYSCALL_MASK
            e(0xc000_0102, 0),       // KERNEL_GS_BASE
            e(0x1a0, 1),             // IA32_MISC_ENABLE: fast strings
            e(0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
        ])
        .expect("a fixed, small MSR list")
    }
}

/// The PC's interrupt routing, as QEMU sets it up for its in-kernel irqchip: GSI i to I/O APIC
/// pin i, except the PIT's GSI 0, which goes to pin 2 (the MADT says so with an interrupt source
/// override); GSIs 0-15 also to the 8259s. KVM's default routes GSI 0 to pin 0, and Linux's
/// boot-time timer check then fails ("IO-APIC + timer doesn't work!").
pub fn pc_irq_routing() -> kvm_bindings::KvmIrqRouting {
    use kvm_bindings::{
        kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
        KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    };
    let route = |gsi: u32, irqchip: u32, pin: u32| kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip, pin },
        },
        ..Default::default()
    };
    let mut entries = Vec::new();
    for gsi in (0..24u32).filter(|&g| g != 2) {
        entries.push(route(
            gsi,
            KVM_IRQCHIP_IOAPIC,
            if gsi == 0 { 2 } else { gsi },
        ));
    }
    for gsi in (0..16u32).filter(|&g| g != 2) {
        let chip = if gsi < 8 {
            KVM_IRQCHIP_PIC_MASTER
        } else {
            KVM_IRQCHIP_PIC_SLAVE
        };
        entries.push(route(gsi, chip, gsi % 8));
    }
    kvm_bindings::KvmIrqRouting::from_entries(&entries).expect("a fixed, small routing table")
}

/// Sets LINT0 to ExtINT and LINT1 to NMI in a local APIC image, as a PC's BIOS leaves them.
pub fn set_lint(lapic: &mut kvm_bindings::kvm_lapic_state) {
    let mut set = |offset: usize, mode: u32| {
        let r = &mut lapic.regs[offset..offset + 4];
        let cur = u32::from_le_bytes([r[0] as u8, r[1] as u8, r[2] as u8, r[3] as u8]);
        let v = (cur & !0x700) | (mode << 8);
        for (d, b) in r.iter_mut().zip(v.to_le_bytes()) {
            *d = b as _;
        }
    };
    set(0x350, 0x7); // LVT LINT0: ExtINT
    set(0x360, 0x4); // LVT LINT1: NMI
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::layout;

    #[test]
    fn e820_reserves_the_bios_area_and_keeps_the_hole() {
        let l = layout(
            &[(vec![0], &[(0, 3 * GIB)]), (vec![1], &[(4 * GIB, 5 * GIB)])],
            vec![vec![10, 20], vec![20, 10]],
        );
        let m: Vec<(u64, u64, u32)> = e820(&l)
            .unwrap()
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect();
        assert_eq!(
            m,
            vec![
                (0, EBDA, E820_RAM),
                (EBDA, HIMEM - EBDA, E820_RESERVED),
                (HIMEM, 3 * GIB - HIMEM, E820_RAM),
                (4 * GIB, GIB, E820_RAM),
            ]
        );
    }

    #[test]
    fn missing_and_corrupt_kernels_are_clear_errors() {
        let l = layout(&[(vec![0], &[(0, 128 << 20)])], vec![vec![10]]);
        let ram = crate::memory::GuestRam::new(&l, crate::memory::Backing::Thp, None).unwrap();
        let spec = |kernel: &Path| LinuxSpec {
            kernel: kernel.to_path_buf(),
            initramfs: None,
            cmdline: DEFAULT_CMDLINE.into(),
        };
        let e = LinuxBoot::load(ram.memory(), &l, &spec(Path::new("/nonexistent/bzImage")))
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read /nonexistent/bzImage"),
            "{e}"
        );
        let junk = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(junk.path(), vec![0x5a; 8192]).unwrap();
        let e = LinuxBoot::load(ram.memory(), &l, &spec(junk.path())).unwrap_err();
        assert!(e.to_string().contains("is not a bootable bzImage"), "{e}");
    }

    /// A minimal bzImage: a setup header as boot.rst describes it and a payload of zeros.
    fn fake_bzimage() -> tempfile::NamedTempFile {
        let mut img = vec![0u8; 5 * 512 + 4096];
        img[0x1f1] = 4; // setup_sects
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 0x1; // LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&(HIMEM as u32).to_le_bytes());
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        img[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes());
        img[0x258..0x260].copy_from_slice(&(16u64 << 20).to_le_bytes());
        img[0x260..0x264].copy_from_slice(&(32u32 << 20).to_le_bytes());
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), img).unwrap();
        f
    }

    #[test]
    fn boot_data_lands_where_the_protocol_says() {
        let l = layout(&[(vec![0], &[(0, 128 << 20)])], vec![vec![10]]);
        let ram = crate::memory::GuestRam::new(&l, crate::memory::Backing::Thp, None).unwrap();
        let kernel = fake_bzimage();
        let initrd = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(initrd.path(), vec![7u8; 3 << 20]).unwrap();
        let spec = LinuxSpec {
            kernel: kernel.path().into(),
            initramfs: Some(initrd.path().into()),
            cmdline: "console=ttyS0 hello".into(),
        };
        let boot = LinuxBoot::load(ram.memory(), &l, &spec).unwrap();
        assert_eq!(boot.regs().rip, HIMEM + 0x200);
        let zp: ZeroPage = ram.memory().read_obj(GuestAddress(ZERO_PAGE)).unwrap();
        let p = zp.0;
        let (image, size, cmd, rsdp) = (
            p.hdr.ramdisk_image,
            p.hdr.ramdisk_size,
            p.hdr.cmd_line_ptr,
            p.acpi_rsdp_addr,
        );
        assert_eq!(size, 3 << 20);
        assert_eq!(
            u64::from(image) + u64::from(size),
            128 << 20,
            "initramfs at the top of RAM"
        );
        assert_eq!((cmd, rsdp, p.e820_entries), (CMDLINE as u32, ACPI_GPA, 3));
        let mut text = [0u8; 20];
        ram.memory()
            .read_slice(&mut text, GuestAddress(CMDLINE))
            .unwrap();
        assert_eq!(&text[..19], b"console=ttyS0 hello");
        assert_eq!(text[19], 0);
    }

    #[test]
    fn oversized_cmdline_and_initramfs_are_refused() {
        let l = layout(&[(vec![0], &[(0, 128 << 20)])], vec![vec![10]]);
        let ram = crate::memory::GuestRam::new(&l, crate::memory::Backing::Thp, None).unwrap();
        let kernel = fake_bzimage();
        let mut spec = LinuxSpec {
            kernel: kernel.path().into(),
            initramfs: None,
            cmdline: "x".repeat(3000),
        };
        let e = LinuxBoot::load(ram.memory(), &l, &spec).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the kernel command line is 3000 bytes, over the kernel's limit of 2047"
        );
        spec.cmdline = DEFAULT_CMDLINE.into();
        let big = tempfile::NamedTempFile::new().unwrap();
        big.as_file().set_len(200 << 20).unwrap();
        spec.initramfs = Some(big.path().into());
        let e = LinuxBoot::load(ram.memory(), &l, &spec).unwrap_err();
        // The kernel decompresses into [16 MiB, 48 MiB): 80 MiB are left below 128 MiB.
        assert!(e.to_string().contains("(200 MiB) does not fit"), "{e}");
        assert!(e.to_string().contains("(80 MiB free there)"), "{e}");
    }

    #[test]
    fn lint_modes_are_set() {
        let mut lapic = kvm_bindings::kvm_lapic_state::default();
        set_lint(&mut lapic);
        assert_eq!((lapic.regs[0x351] as u8) & 0x7, 0x7);
        assert_eq!((lapic.regs[0x361] as u8) & 0x7, 0x4);
    }
}
