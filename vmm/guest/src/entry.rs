//! The guest program proper: compiled only into the guest image (`--cfg guest_bin`).
//!
//! Every vCPU enters [`_start`] at CPL 3 with its index in `rdi` (see [`crate::abi`]). vCPU 0 reads
//! the ACPI tables and publishes the topology; every vCPU then finds its APIC id (CPUID) in the MADT
//! and its vnode in the SRAT, takes an equal share of its vnode's memory for STREAM's three arrays,
//! runs the kernels in lockstep with the others, and reports.

use core::cell::UnsafeCell;
use core::fmt::Write as _;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::abi::{
    GuestConfig, MessageHeader, MessageKind, StreamSummary, Topology, Writer, CONFIG_GPA,
    CPUID_MARK, CPUID_TIMING_LEAF, MAILBOX_GPA, MAILBOX_STRIDE, MAX_LOCALITIES, MAX_PASSES,
    MAX_VCPUS, PORT_COM1, PORT_REPORT, RESERVED_END, STACKS_GPA, STACK_SIZE,
};
use crate::acpi::{self, PhysMem};
use crate::stream::{rdtsc, Arrays, Run, SpinBarrier, TimingTable, GUEST_TIMING_SLOTS};

const MIB2: u64 = 2 << 20;
const PAGE: u64 = 4096;

/// Guest-physical memory, identity-mapped by the VMM's page tables.
struct IdentityMem;

impl PhysMem for IdentityMem {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        // The tables the guest walks live below RESERVED_END or in RAM the SRAT names; refuse
        // anything that would wrap.
        if addr == 0 || addr.checked_add(buf.len() as u64).is_none() {
            return false;
        }
        // SAFETY: all guest RAM is identity-mapped and readable at CPL 3; an address outside RAM
        // faults into the exception stubs, which report it, rather than returning garbage.
        unsafe { core::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) };
        true
    }
}

/// A value written once by vCPU 0 before it sets [`READY`], then only read.
struct Published<T>(UnsafeCell<T>);
// SAFETY: written only by vCPU 0 before the Release store to READY; read by the others only after
// an Acquire load of READY sees it set.
unsafe impl<T> Sync for Published<T> {}

static TOPOLOGY: Published<Topology> = Published(UnsafeCell::new(Topology {
    cpus: [crate::abi::SeenCpu {
        apic_id: 0,
        node: 0,
    }; MAX_VCPUS as usize],
    cpu_count: 0,
    ranges: [crate::abi::SeenRange {
        node: 0,
        base: 0,
        len: 0,
    }; crate::abi::MAX_SEEN_RANGES],
    range_count: 0,
    distances: [0; MAX_LOCALITIES * MAX_LOCALITIES],
    localities: 0,
}));
static SCRATCH: Published<[u8; 1 << 16]> = Published(UnsafeCell::new([0; 1 << 16]));
/// 0 while vCPU 0 reads the tables, 1 when [`TOPOLOGY`] is valid, 2 when reading failed.
static READY: AtomicU32 = AtomicU32::new(0);
static BARRIER: SpinBarrier = SpinBarrier::new();
static TIMINGS: TimingTable<GUEST_TIMING_SLOTS> = TimingTable::new();
#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
/// Elements per array of each vCPU, for the aggregate.
static ELEMENTS: [AtomicU64; MAX_VCPUS as usize] = [ZERO; MAX_VCPUS as usize];
static VALIDATED: AtomicU32 = AtomicU32::new(0);

fn out32(port: u16, value: u32) {
    // SAFETY: the TSS I/O bitmap opens this port to CPL 3; the VMM handles the exit. No `nomem`:
    // the mailbox stores before it must not be moved past the exit.
    unsafe { core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack)) };
}

fn out8(port: u16, value: u8) {
    // SAFETY: as in `out32`.
    unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nostack)) };
}

fn pause() {
    core::hint::spin_loop();
}

fn console(text: &str) {
    for b in text.bytes() {
        out8(PORT_COM1, b);
    }
}

fn mailbox(vcpu: u32) -> &'static mut [u8] {
    let vcpu = vcpu.min(MAX_VCPUS - 1);
    // SAFETY: each vCPU's mailbox is its own MAILBOX_STRIDE bytes inside the reserved area, which
    // nothing else in the guest touches; the VMM only reads it during this vCPU's exit.
    unsafe {
        core::slice::from_raw_parts_mut(
            (MAILBOX_GPA + u64::from(vcpu) * MAILBOX_STRIDE) as *mut u8,
            MAILBOX_STRIDE as usize,
        )
    }
}

fn send(vcpu: u32, kind: MessageKind, fill: impl FnOnce(&mut Writer<'_>)) {
    if MessageHeader::write_message(mailbox(vcpu), kind, vcpu, fill).is_some() {
        out32(PORT_REPORT, vcpu);
    }
}

/// Writes formatted text into a fixed buffer, dropping what does not fit.
struct TextBuf<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl core::fmt::Write for TextBuf<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Reports why the guest gives up, says it is done (status 1) and stops.
fn fatal(vcpu: u32, args: core::fmt::Arguments<'_>) -> ! {
    let mut text = [0u8; 512];
    let mut t = TextBuf {
        buf: &mut text,
        len: 0,
    };
    let _ = t.write_fmt(args);
    let len = t.len;
    send(vcpu, MessageKind::Fatal, |w| w.bytes(&text[..len]));
    finish(vcpu, 1)
}

fn finish(vcpu: u32, status: u32) -> ! {
    send(vcpu, MessageKind::Done, |w| w.u32(status));
    // The VMM stops running this vCPU at Done; should it resume, stay put.
    loop {
        pause();
    }
}

/// This vCPU's APIC id from CPUID (leaf 0xB where present, else leaf 1), or `None` when CPUID is
/// not virtualised (no [`CPUID_MARK`] in [`CPUID_TIMING_LEAF`]).
fn cpuid_apic_id() -> Option<u32> {
    // SAFETY: CPUID is available at every privilege level on x86_64 and has no side effects.
    let hv = unsafe { core::arch::x86_64::__cpuid(0x4000_0000) }.eax;
    // SAFETY: as above; an out-of-range leaf returns data, never faults.
    let timing = unsafe { core::arch::x86_64::__cpuid(CPUID_TIMING_LEAF) };
    if hv < CPUID_TIMING_LEAF || timing.ecx != CPUID_MARK {
        return None;
    }
    Some(apic_id())
}

/// CPUID's APIC id: leaf 0xB (x2APIC id) where present, else leaf 1.
fn apic_id() -> u32 {
    // SAFETY: CPUID is available at every privilege level on x86_64 and has no side effects.
    let max = unsafe { core::arch::x86_64::__cpuid(0) }.eax;
    if max >= 0xB {
        // SAFETY: as above; leaf 0xB exists (max >= 0xB).
        let l = unsafe { core::arch::x86_64::__cpuid_count(0xB, 0) };
        if l.ebx != 0 {
            return l.edx;
        }
    }
    // SAFETY: as above.
    unsafe { core::arch::x86_64::__cpuid(1) }.ebx >> 24
}

/// `count` equal, page-aligned slices of `node`'s memory above the reserve (each range's start
/// 2 MiB aligned); the `rank`-th one.
fn my_slice(topo: &Topology, node: u32, rank: u32, count: u32) -> Option<(u64, u64)> {
    let usable = |r: &crate::abi::SeenRange| {
        let start = r.base.max(RESERVED_END).div_ceil(MIB2) * MIB2;
        let end = (r.base + r.len) / MIB2 * MIB2;
        (start < end).then_some((start, end - start))
    };
    let ranges = || {
        topo.ranges()
            .iter()
            .filter(|r| r.node == node)
            .filter_map(usable)
    };
    let total: u64 = ranges().map(|(_, len)| len).sum();
    let mut slice = total / u64::from(count.max(1)) / PAGE * PAGE;
    while slice >= MIB2 {
        let slots: u64 = ranges().map(|(_, len)| len / slice).sum();
        if slots >= u64::from(count) {
            let mut rank = u64::from(rank);
            for (start, len) in ranges() {
                let here = len / slice;
                if rank < here {
                    return Some((start + rank * slice, slice));
                }
                rank -= here;
            }
        }
        slice -= PAGE;
    }
    None
}

/// Entry point of every vCPU.
#[no_mangle]
pub extern "C" fn _start(vcpu: u64) -> ! {
    let me = vcpu as u32;
    // SAFETY: the VMM writes the config before starting any vCPU and never changes it.
    let cfg = GuestConfig::read(unsafe {
        core::slice::from_raw_parts(CONFIG_GPA as *const u8, GuestConfig::SIZE)
    });
    let Ok(cfg) = cfg else {
        fatal(me, format_args!("no guest config at {CONFIG_GPA:#x}"));
    };
    if cfg.passes < 2 || cfg.passes > MAX_PASSES {
        fatal(
            me,
            format_args!("passes {} outside 2..={MAX_PASSES}", cfg.passes),
        );
    }

    if me == 0 {
        console("vmm-guest: vCPU 0 up, reading ACPI tables\r\n");
        // SAFETY: only vCPU 0 runs this, before READY is set; nobody else touches these yet.
        let (topo, scratch) = unsafe { (&mut *TOPOLOGY.0.get(), &mut *SCRATCH.0.get()) };
        if let Err(e) = acpi::read_topology(&IdentityMem, scratch, topo) {
            READY.store(2, Ordering::Release);
            fatal(me, format_args!("ACPI: {e}"));
        }
        BARRIER.set_parties(topo.cpu_count);
        send(me, MessageKind::Topology, |w| topo.write(w));
        READY.store(1, Ordering::Release);
    } else {
        while READY.load(Ordering::Acquire) == 0 {
            pause();
        }
        if READY.load(Ordering::Acquire) != 1 {
            finish(me, 1);
        }
    }
    // SAFETY: READY == 1 was observed with Acquire; the topology is no longer written.
    let topo: &Topology = unsafe { &*TOPOLOGY.0.get() };

    let cpuid_apic = cpuid_apic_id();
    let (apic, index) = match cpuid_apic {
        Some(apic) => {
            let Some(index) = acpi::cpu_index(topo, apic) else {
                fatal(me, format_args!("my APIC id {apic} is not in the MADT"));
            };
            (apic, index)
        }
        None => match topo.cpus().get(me as usize) {
            Some(c) => (c.apic_id, me),
            None => fatal(me, format_args!("vCPU {me} has no MADT entry")),
        },
    };
    if index != me {
        fatal(
            me,
            format_args!("APIC id {apic} is CPU {index} in the MADT, but I am vCPU {me}"),
        );
    }
    let node = topo.cpus()[index as usize].node;
    let peers = topo.cpus().iter().filter(|c| c.node == node);
    let rank = topo.cpus()[..index as usize]
        .iter()
        .filter(|c| c.node == node)
        .count() as u32;
    let Some((base, len)) = my_slice(topo, node, rank, peers.count() as u32) else {
        fatal(
            me,
            format_args!("vnode {node} has too little memory for STREAM"),
        );
    };
    let elements = Arrays::elements_for(len);
    ELEMENTS[me as usize].store(elements as u64, Ordering::Relaxed);
    // SAFETY: [base, base + len) is this vCPU's own slice of RAM (disjoint from every other
    // vCPU's, above the reserve), identity-mapped and 2 MiB aligned.
    let mem = unsafe { core::slice::from_raw_parts_mut(base as *mut f64, len as usize / 8) };
    let Some(mut arrays) = Arrays::split(mem, elements) else {
        fatal(me, format_args!("cannot place STREAM arrays at {base:#x}"));
    };

    let relax = pause;
    let run = Run {
        passes: cfg.passes,
        barrier: &BARRIER,
        timings: &TIMINGS,
        clock: rdtsc,
        relax: &relax,
    };
    let ok = run.run_thread(me, &mut arrays);
    if ok {
        VALIDATED.fetch_add(1, Ordering::AcqRel);
    }
    let mut counts = [0u64; MAX_VCPUS as usize];
    for (c, e) in counts.iter_mut().zip(ELEMENTS.iter()) {
        *c = e.load(Ordering::Relaxed);
    }
    let counts = &counts[..topo.cpu_count as usize];
    let mut mine = run.thread_result(me, counts, cfg.tsc_khz);
    mine.apic_id = apic;
    mine.cpuid_virtualized = u32::from(cpuid_apic.is_some());
    mine.node = node;
    mine.validated = u32::from(ok);
    mine.array_gpa = base;
    send(me, MessageKind::VcpuStream, |w| mine.write(w));
    BARRIER.wait(&relax);

    if me == 0 {
        let mut node_of = [0u32; MAX_VCPUS as usize];
        for (n, c) in node_of.iter_mut().zip(topo.cpus()) {
            *n = c.node;
        }
        let mut summary = StreamSummary {
            passes: cfg.passes,
            validated: u32::from(VALIDATED.load(Ordering::Acquire) == topo.cpu_count),
            ..StreamSummary::default()
        };
        let n = topo.cpu_count as usize;
        summary.group_count =
            run.groups(&node_of[..n], counts, cfg.tsc_khz, &mut summary.groups) as u32;
        send(me, MessageKind::StreamSummary, |w| summary.write(w));
        console("vmm-guest: STREAM done\r\n");
    }
    finish(me, u32::from(!ok))
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    // The vCPU index is not at hand here, but every vCPU runs on its own stack (abi::STACKS_GPA).
    let rsp: u64;
    // SAFETY: reads the stack pointer only.
    unsafe { core::arch::asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack)) };
    let me = (rsp.saturating_sub(STACKS_GPA) / STACK_SIZE).min(u64::from(MAX_VCPUS) - 1) as u32;
    fatal(me, format_args!("panic: {info}"))
}

// The C memory functions core calls. The host target's compiler_builtins leaves them to libc,
// which the guest does not have; `rep movsb/stosb` is fast on every CPU with ERMS and correct on
// all of them.

/// # Safety
/// As C's `memcpy`.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees valid, non-overlapping ranges of n bytes.
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _,
            inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// As C's `memmove`.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: forward copy is correct when dst is below src or past its end.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: overlapping with dst above src: copy backwards with the direction flag set, then
    // clear it again as the ABI requires.
    unsafe {
        core::arch::asm!("std", "rep movsb", "cld", inout("rcx") n => _,
            inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
            options(nostack));
    }
    dst
}

/// # Safety
/// As C's `memset`.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees a valid range of n bytes.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _,
            in("al") c as u8, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// As C's `memcmp`.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller guarantees n readable bytes at a and b. Volatile keeps the compiler
        // from turning this loop back into a call to memcmp.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// As C's `bcmp`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
