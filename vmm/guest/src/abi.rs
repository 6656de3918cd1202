//! The contract between the VMM and the built-in guest: where things sit in guest-physical memory,
//! how each vCPU starts, and the binary messages the guest reports through.
//!
//! # Start state (set by the VMM)
//! Every vCPU starts in 64-bit mode at CPL 3 (`kvm_pvm` runs only CPL-3 code natively, see
//! `shared/reference/kvm-pvm.md`), paging on, all RAM identity-mapped with 2 MiB pages, at the ELF
//! entry point with `rdi` = vCPU index and `rsp` = top of that vCPU's stack − 8. Its TSS carries an
//! I/O permission bitmap that opens ports below 0x400 to CPL 3. The ACPI tables (RSDP in the BIOS
//! area, as on a PC) describe the vNUMA layout; [`GuestConfig`] at [`CONFIG_GPA`] carries the run's
//! parameters.
//!
//! # Reporting
//! A vCPU writes one message ([`MessageHeader`] + payload) into its own mailbox slot
//! (`MAILBOX_GPA + vcpu * MAILBOX_STRIDE`) and then writes its vCPU index as a 32-bit value to
//! [`PORT_REPORT`]. The VMM reads the slot during that exit, so the slot is free again when the `out`
//! instruction retires. A value with [`EXCEPTION_FLAG`] set is an exception report from the CPL-0
//! stubs instead (low byte: vector). All integers are little-endian.

/// Port the guest writes to after filling its mailbox.
pub const PORT_REPORT: u16 = 0xf4;
/// COM1, for the guest's human-readable console lines.
pub const PORT_COM1: u16 = 0x3f8;
/// Set in the value written to [`PORT_REPORT`] by the exception stubs.
pub const EXCEPTION_FLAG: u32 = 0x8000_0000;

/// Interrupt descriptor table (256 gates).
pub const IDT_GPA: u64 = 0x1000;
/// Exception stubs (CPL 0), one per vector, [`STUB_STRIDE`] bytes apart.
pub const STUBS_GPA: u64 = 0x2000;
/// Distance between two exception stubs.
pub const STUB_STRIDE: u64 = 16;
/// Global descriptor table: five fixed descriptors, then one 16-byte TSS descriptor per vCPU.
pub const GDT_GPA: u64 = 0x3000;
/// [`GuestConfig`].
pub const CONFIG_GPA: u64 = 0x8000;
/// Task state segments, [`TSS_STRIDE`] bytes per vCPU.
pub const TSS_GPA: u64 = 0x1_0000;
/// Distance between two TSSs (104-byte TSS + 128-byte I/O bitmap + terminator).
pub const TSS_STRIDE: u64 = 0x100;
/// CPL-0 stacks used only by the exception stubs, [`KSTACK_STRIDE`] bytes per vCPU.
pub const KSTACK_GPA: u64 = 0x2_0000;
/// Size of one exception stack.
pub const KSTACK_STRIDE: u64 = 0x100;
/// ACPI tables; the RSDP is the first thing here, inside the 0xE0000–0xFFFFF area guests scan.
pub const ACPI_GPA: u64 = 0xE_0000;
/// End of the ACPI area.
pub const ACPI_END: u64 = 0x10_0000;
/// Page tables (PML4, PDPT, page directories).
pub const PAGE_TABLES_GPA: u64 = 0x10_0000;
/// End of the page-table area.
pub const PAGE_TABLES_END: u64 = 0x40_0000;
/// The guest image is linked to run here.
pub const IMAGE_GPA: u64 = 0x40_0000;
/// End of the image area.
pub const IMAGE_END: u64 = 0x80_0000;
/// Mailboxes, one per vCPU.
pub const MAILBOX_GPA: u64 = 0x80_0000;
/// Size of one mailbox.
pub const MAILBOX_STRIDE: u64 = 0x2000;
/// CPL-3 stacks, one per vCPU.
pub const STACKS_GPA: u64 = 0xC0_0000;
/// Size of one CPL-3 stack.
pub const STACK_SIZE: u64 = 0x4000;
/// Everything below this belongs to the VMM's tables and the image; the guest's data lives above it.
pub const RESERVED_END: u64 = 0x100_0000;
/// Most vCPUs the built-in guest supports (mailboxes, stacks and TSSs are sized for it).
pub const MAX_VCPUS: u32 = 256;

/// CPUID leaf where the VMM publishes the TSC rate (EAX, kHz; the VMware/QEMU timing-leaf
/// convention), the APIC timer rate (EBX, kHz) and [`CPUID_MARK`] (ECX).
pub const CPUID_TIMING_LEAF: u32 = 0x4000_0010;
/// ECX of [`CPUID_TIMING_LEAF`]: present only when CPUID is really virtualised. On `kvm_pvm`,
/// CPUID at CPL 3 runs natively and returns the host's values (so the host CPU's APIC id).
pub const CPUID_MARK: u32 = 0x4d55_4e56; // "VNUM"

/// First bytes of every message.
pub const MESSAGE_MAGIC: u32 = 0x4d53_4756; // "VGSM"
/// First bytes of [`GuestConfig`].
pub const CONFIG_MAGIC: u32 = 0x4643_4756; // "VGCF"
/// Most passes of each STREAM kernel the guest keeps timings for.
pub const MAX_PASSES: u32 = 64;

/// Why a message could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbiError {
    /// The bytes end before the field at this offset.
    Truncated(usize),
    /// The magic number is wrong.
    BadMagic(u32),
    /// The message kind is unknown.
    UnknownKind(u32),
    /// A count field is larger than the message can hold.
    BadCount(u32),
}

impl core::fmt::Display for AbiError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Truncated(at) => write!(f, "message truncated at byte {at}"),
            Self::BadMagic(m) => write!(f, "bad message magic {m:#x}"),
            Self::UnknownKind(k) => write!(f, "unknown message kind {k}"),
            Self::BadCount(n) => write!(f, "count {n} too large for the message"),
        }
    }
}

/// Sequential little-endian writer over a byte buffer; writes past the end are dropped and
/// flagged, so a guest can never scribble outside its mailbox.
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
    overflow: bool,
}

impl<'a> Writer<'a> {
    /// Starts writing at the beginning of `buf`.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self {
            buf,
            pos: 0,
            overflow: false,
        }
    }
    fn put(&mut self, bytes: &[u8]) {
        match self.buf.get_mut(self.pos..self.pos + bytes.len()) {
            Some(dst) => dst.copy_from_slice(bytes),
            None => self.overflow = true,
        }
        self.pos += bytes.len();
    }
    /// Appends one byte.
    pub fn u8(&mut self, v: u8) {
        self.put(&[v]);
    }
    /// Appends a `u32`.
    pub fn u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }
    /// Appends a `u64`.
    pub fn u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }
    /// Appends an `f64`.
    pub fn f64(&mut self, v: f64) {
        self.put(&v.to_le_bytes());
    }
    /// Appends raw bytes.
    pub fn bytes(&mut self, v: &[u8]) {
        self.put(v);
    }
    /// Bytes written so far (also counting dropped ones).
    pub fn len(&self) -> usize {
        self.pos
    }
    /// True when nothing has been written.
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }
    /// True when some write did not fit.
    pub fn overflowed(&self) -> bool {
        self.overflow
    }
}

/// Sequential little-endian reader with bounds checks.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Starts reading at the beginning of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    fn take<const N: usize>(&mut self) -> Result<[u8; N], AbiError> {
        let bytes = self
            .buf
            .get(self.pos..self.pos + N)
            .ok_or(AbiError::Truncated(self.pos))?;
        self.pos += N;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }
    /// Reads one byte.
    pub fn u8(&mut self) -> Result<u8, AbiError> {
        Ok(self.take::<1>()?[0])
    }
    /// Reads a `u32`.
    pub fn u32(&mut self) -> Result<u32, AbiError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    /// Reads a `u64`.
    pub fn u64(&mut self) -> Result<u64, AbiError> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    /// Reads an `f64`.
    pub fn f64(&mut self) -> Result<f64, AbiError> {
        Ok(f64::from_le_bytes(self.take()?))
    }
    /// Reads `n` raw bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], AbiError> {
        let bytes = self
            .buf
            .get(self.pos..self.pos + n)
            .ok_or(AbiError::Truncated(self.pos))?;
        self.pos += n;
        Ok(bytes)
    }
    /// Reads a count and checks that `count * min_item_bytes` more bytes are present.
    pub fn count(&mut self, min_item_bytes: usize) -> Result<u32, AbiError> {
        let n = self.u32()?;
        let need = (n as usize).checked_mul(min_item_bytes.max(1));
        match need {
            Some(need) if need <= self.buf.len() - self.pos => Ok(n),
            _ => Err(AbiError::BadCount(n)),
        }
    }
}

/// Parameters the VMM gives the guest, at [`CONFIG_GPA`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestConfig {
    /// Passes of each STREAM kernel (STREAM's NTIMES); the first is a warm-up, as in STREAM.
    pub passes: u32,
    /// TSC frequency in kHz, for turning cycles into time.
    pub tsc_khz: u32,
}

impl GuestConfig {
    /// Encoded size.
    pub const SIZE: usize = 12;
    /// Encodes into `buf`.
    pub fn write(&self, buf: &mut [u8]) -> bool {
        let mut w = Writer::new(buf);
        w.u32(CONFIG_MAGIC);
        w.u32(self.passes);
        w.u32(self.tsc_khz);
        !w.overflowed()
    }
    /// Decodes from `buf`, checking the magic and clamping nothing: the caller validates.
    pub fn read(buf: &[u8]) -> Result<Self, AbiError> {
        let mut r = Reader::new(buf);
        let magic = r.u32()?;
        if magic != CONFIG_MAGIC {
            return Err(AbiError::BadMagic(magic));
        }
        Ok(Self {
            passes: r.u32()?,
            tsc_khz: r.u32()?,
        })
    }
}

/// What a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum MessageKind {
    /// [`Topology`]: the layout the guest read from its ACPI tables (vCPU 0 only).
    Topology = 1,
    /// [`VcpuStream`]: one vCPU's STREAM result.
    VcpuStream = 2,
    /// [`StreamSummary`]: per-vnode and total STREAM results (vCPU 0 only).
    StreamSummary = 3,
    /// The vCPU has finished; payload: `u32` status (0 = all checks passed).
    Done = 4,
    /// The guest gave up; payload: UTF-8 text saying why.
    Fatal = 5,
}

impl MessageKind {
    fn from_u32(v: u32) -> Result<Self, AbiError> {
        Ok(match v {
            1 => Self::Topology,
            2 => Self::VcpuStream,
            3 => Self::StreamSummary,
            4 => Self::Done,
            5 => Self::Fatal,
            other => return Err(AbiError::UnknownKind(other)),
        })
    }
}

/// The 16 bytes in front of every message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageHeader {
    /// What follows.
    pub kind: MessageKind,
    /// Payload length in bytes.
    pub len: u32,
    /// The sending vCPU.
    pub vcpu: u32,
}

impl MessageHeader {
    /// Encoded size.
    pub const SIZE: usize = 16;

    /// Writes the header and the payload produced by `fill` into `buf`; returns the total length,
    /// or `None` when the payload did not fit.
    pub fn write_message(
        buf: &mut [u8],
        kind: MessageKind,
        vcpu: u32,
        fill: impl FnOnce(&mut Writer<'_>),
    ) -> Option<usize> {
        let (head, body) = buf.split_at_mut(Self::SIZE.min(buf.len()));
        let mut w = Writer::new(body);
        fill(&mut w);
        if w.overflowed() || head.len() < Self::SIZE {
            return None;
        }
        let len = w.len();
        let mut h = Writer::new(head);
        h.u32(MESSAGE_MAGIC);
        h.u32(kind as u32);
        h.u32(u32::try_from(len).ok()?);
        h.u32(vcpu);
        Some(Self::SIZE + len)
    }

    /// Splits a mailbox into its header and payload.
    pub fn read_message(buf: &[u8]) -> Result<(Self, &[u8]), AbiError> {
        let mut r = Reader::new(buf);
        let magic = r.u32()?;
        if magic != MESSAGE_MAGIC {
            return Err(AbiError::BadMagic(magic));
        }
        let kind = MessageKind::from_u32(r.u32()?)?;
        let len = r.u32()?;
        let vcpu = r.u32()?;
        let payload = r.bytes(len as usize)?;
        Ok((Self { kind, len, vcpu }, payload))
    }
}

/// One processor as the guest saw it: MADT order gives the CPU number, as Linux numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenCpu {
    /// Local APIC (or x2APIC) id from the MADT.
    pub apic_id: u32,
    /// Proximity domain from the SRAT.
    pub node: u32,
}

/// One SRAT memory affinity range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenRange {
    /// Proximity domain.
    pub node: u32,
    /// Guest-physical base.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Upper bound on what a [`Topology`] message can carry (fits a mailbox).
pub const MAX_SEEN_RANGES: usize = 64;
/// Upper bound on SLIT localities in a [`Topology`] message.
pub const MAX_LOCALITIES: usize = 64;

/// The topology the guest read from its ACPI tables. Fixed-capacity so the guest needs no heap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Processors in MADT order.
    pub cpus: [SeenCpu; MAX_VCPUS as usize],
    /// Number of valid entries in `cpus`.
    pub cpu_count: u32,
    /// SRAT memory ranges.
    pub ranges: [SeenRange; MAX_SEEN_RANGES],
    /// Number of valid entries in `ranges`.
    pub range_count: u32,
    /// SLIT matrix, row-major, `localities` × `localities`.
    pub distances: [u8; MAX_LOCALITIES * MAX_LOCALITIES],
    /// SLIT size (0 when there is no SLIT).
    pub localities: u32,
}

impl Default for Topology {
    fn default() -> Self {
        Self {
            cpus: [SeenCpu {
                apic_id: 0,
                node: 0,
            }; MAX_VCPUS as usize],
            cpu_count: 0,
            ranges: [SeenRange {
                node: 0,
                base: 0,
                len: 0,
            }; MAX_SEEN_RANGES],
            range_count: 0,
            distances: [0; MAX_LOCALITIES * MAX_LOCALITIES],
            localities: 0,
        }
    }
}

impl Topology {
    /// The valid processors.
    pub fn cpus(&self) -> &[SeenCpu] {
        &self.cpus[..self.cpu_count as usize]
    }
    /// The valid memory ranges.
    pub fn ranges(&self) -> &[SeenRange] {
        &self.ranges[..self.range_count as usize]
    }
    /// Distance between two localities, if the SLIT has them.
    pub fn distance(&self, from: u32, to: u32) -> Option<u8> {
        (from < self.localities && to < self.localities)
            .then(|| self.distances[(from * self.localities + to) as usize])
    }
    /// Encodes the payload.
    pub fn write(&self, w: &mut Writer<'_>) {
        w.u32(self.cpu_count);
        for c in self.cpus() {
            w.u32(c.apic_id);
            w.u32(c.node);
        }
        w.u32(self.range_count);
        for r in self.ranges() {
            w.u32(r.node);
            w.u64(r.base);
            w.u64(r.len);
        }
        w.u32(self.localities);
        let n = (self.localities * self.localities) as usize;
        w.bytes(&self.distances[..n]);
    }
    /// Decodes the payload.
    pub fn read(payload: &[u8]) -> Result<Self, AbiError> {
        let mut r = Reader::new(payload);
        let mut t = Self {
            cpu_count: r.count(8)?,
            ..Self::default()
        };
        if t.cpu_count > MAX_VCPUS {
            return Err(AbiError::BadCount(t.cpu_count));
        }
        for c in t.cpus.iter_mut().take(t.cpu_count as usize) {
            c.apic_id = r.u32()?;
            c.node = r.u32()?;
        }
        t.range_count = r.count(20)?;
        if t.range_count as usize > MAX_SEEN_RANGES {
            return Err(AbiError::BadCount(t.range_count));
        }
        for s in t.ranges.iter_mut().take(t.range_count as usize) {
            s.node = r.u32()?;
            s.base = r.u64()?;
            s.len = r.u64()?;
        }
        t.localities = r.u32()?;
        if t.localities as usize > MAX_LOCALITIES {
            return Err(AbiError::BadCount(t.localities));
        }
        let n = (t.localities * t.localities) as usize;
        t.distances[..n].copy_from_slice(r.bytes(n)?);
        Ok(t)
    }
}

/// The four STREAM kernels, in STREAM's order.
pub const KERNELS: [&str; 4] = ["copy", "scale", "add", "triad"];

/// Best/average/worst time of one kernel and the bytes it moves per pass (STREAM's counting).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KernelResult {
    /// Bytes counted per pass: 16 per element for Copy and Scale, 24 for Add and Triad.
    pub bytes: u64,
    /// Fastest pass (the first pass is not counted, as in STREAM), nanoseconds.
    pub min_ns: u64,
    /// Mean over the counted passes, nanoseconds.
    pub avg_ns: u64,
    /// Slowest counted pass, nanoseconds.
    pub max_ns: u64,
}

impl KernelResult {
    /// STREAM's rate: bytes over the best time, in MB/s (10^6 bytes per second).
    pub fn mb_s(&self) -> f64 {
        if self.min_ns == 0 {
            return 0.0;
        }
        self.bytes as f64 * 1e3 / self.min_ns as f64
    }
    fn write(&self, w: &mut Writer<'_>) {
        w.u64(self.bytes);
        w.u64(self.min_ns);
        w.u64(self.avg_ns);
        w.u64(self.max_ns);
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, AbiError> {
        Ok(Self {
            bytes: r.u64()?,
            min_ns: r.u64()?,
            avg_ns: r.u64()?,
            max_ns: r.u64()?,
        })
    }
}

/// One vCPU's STREAM run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct VcpuStream {
    /// vCPU index.
    pub vcpu: u32,
    /// APIC id the vCPU read from CPUID (leaf 0xB, or leaf 1 without it); when CPUID is not
    /// virtualised, the MADT's entry for this vCPU's index.
    pub apic_id: u32,
    /// 1 when CPUID carried [`CPUID_MARK`], so `apic_id` came from CPUID.
    pub cpuid_virtualized: u32,
    /// The vnode the guest placed this vCPU in (from SRAT).
    pub node: u32,
    /// 1 when STREAM's validation passed on this vCPU's arrays.
    pub validated: u32,
    /// Elements per array on this vCPU.
    pub elements: u64,
    /// Guest-physical address of this vCPU's first array.
    pub array_gpa: u64,
    /// Copy, Scale, Add, Triad.
    pub kernels: [KernelResult; 4],
}

impl VcpuStream {
    /// Encodes the payload.
    pub fn write(&self, w: &mut Writer<'_>) {
        w.u32(self.vcpu);
        w.u32(self.apic_id);
        w.u32(self.cpuid_virtualized);
        w.u32(self.node);
        w.u32(self.validated);
        w.u64(self.elements);
        w.u64(self.array_gpa);
        for k in &self.kernels {
            k.write(w);
        }
    }
    /// Decodes the payload.
    pub fn read(payload: &[u8]) -> Result<Self, AbiError> {
        let mut r = Reader::new(payload);
        let mut s = Self {
            vcpu: r.u32()?,
            apic_id: r.u32()?,
            cpuid_virtualized: r.u32()?,
            node: r.u32()?,
            validated: r.u32()?,
            elements: r.u64()?,
            array_gpa: r.u64()?,
            ..Self::default()
        };
        for k in &mut s.kernels {
            *k = KernelResult::read(&mut r)?;
        }
        Ok(s)
    }
}

/// Aggregate STREAM results over a group of vCPUs (one vnode, or all of them): bytes of every
/// member over the time from the first member's start to the last member's end, best pass.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GroupStream {
    /// The vnode (or `u32::MAX` for the total).
    pub node: u32,
    /// vCPUs in the group.
    pub vcpus: u32,
    /// Copy, Scale, Add, Triad.
    pub kernels: [KernelResult; 4],
}

/// Node id used for the all-vCPU group.
pub const TOTAL_GROUP: u32 = u32::MAX;

/// Per-vnode and total results, sent by vCPU 0 after every vCPU has finished.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamSummary {
    /// Passes run (STREAM's NTIMES).
    pub passes: u32,
    /// 1 when every vCPU validated.
    pub validated: u32,
    /// The groups: one per vnode, then the total ([`TOTAL_GROUP`]).
    pub groups: [GroupStream; MAX_LOCALITIES + 1],
    /// Number of valid entries in `groups`.
    pub group_count: u32,
}

impl Default for StreamSummary {
    fn default() -> Self {
        Self {
            passes: 0,
            validated: 0,
            groups: [GroupStream::default(); MAX_LOCALITIES + 1],
            group_count: 0,
        }
    }
}

impl StreamSummary {
    /// The valid groups.
    pub fn groups(&self) -> &[GroupStream] {
        &self.groups[..self.group_count as usize]
    }
    /// Encodes the payload.
    pub fn write(&self, w: &mut Writer<'_>) {
        w.u32(self.passes);
        w.u32(self.validated);
        w.u32(self.group_count);
        for g in self.groups() {
            w.u32(g.node);
            w.u32(g.vcpus);
            for k in &g.kernels {
                k.write(w);
            }
        }
    }
    /// Decodes the payload.
    pub fn read(payload: &[u8]) -> Result<Self, AbiError> {
        let mut r = Reader::new(payload);
        let mut s = Self {
            passes: r.u32()?,
            validated: r.u32()?,
            ..Self::default()
        };
        s.group_count = r.count(8 + 4 * 32)?;
        if s.group_count as usize > s.groups.len() {
            return Err(AbiError::BadCount(s.group_count));
        }
        for g in s.groups.iter_mut().take(s.group_count as usize) {
            g.node = r.u32()?;
            g.vcpus = r.u32()?;
            for k in &mut g.kernels {
                *k = KernelResult::read(&mut r)?;
            }
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_areas_do_not_overlap_and_fit_the_reserve() {
        let areas = [
            (IDT_GPA, IDT_GPA + 256 * 16),
            (STUBS_GPA, STUBS_GPA + 32 * STUB_STRIDE),
            (GDT_GPA, GDT_GPA + 0x28 + 16 * MAX_VCPUS as u64),
            (CONFIG_GPA, CONFIG_GPA + GuestConfig::SIZE as u64),
            (TSS_GPA, TSS_GPA + TSS_STRIDE * MAX_VCPUS as u64),
            (KSTACK_GPA, KSTACK_GPA + KSTACK_STRIDE * MAX_VCPUS as u64),
            (ACPI_GPA, ACPI_END),
            (PAGE_TABLES_GPA, PAGE_TABLES_END),
            (IMAGE_GPA, IMAGE_END),
            (MAILBOX_GPA, MAILBOX_GPA + MAILBOX_STRIDE * MAX_VCPUS as u64),
            (STACKS_GPA, STACKS_GPA + STACK_SIZE * MAX_VCPUS as u64),
        ];
        for (i, a) in areas.iter().enumerate() {
            assert!(a.1 <= RESERVED_END, "area {i} ends past the reserve");
            for b in &areas[i + 1..] {
                assert!(a.1 <= b.0 || b.1 <= a.0, "{a:x?} overlaps {b:x?}");
            }
        }
    }

    #[test]
    fn topology_round_trips_and_rejects_truncation() {
        let mut t = Topology {
            cpu_count: 3,
            range_count: 2,
            localities: 2,
            ..Topology::default()
        };
        t.cpus[1] = SeenCpu {
            apic_id: 1,
            node: 0,
        };
        t.cpus[2] = SeenCpu {
            apic_id: 4,
            node: 1,
        };
        t.ranges[1] = SeenRange {
            node: 1,
            base: 1 << 30,
            len: 1 << 30,
        };
        t.distances[..4].copy_from_slice(&[10, 21, 21, 10]);
        let mut buf = [0u8; 8192];
        let n = MessageHeader::write_message(&mut buf, MessageKind::Topology, 0, |w| t.write(w))
            .unwrap();
        let (h, payload) = MessageHeader::read_message(&buf[..n]).unwrap();
        assert_eq!(h.kind, MessageKind::Topology);
        assert_eq!(Topology::read(payload).unwrap(), t);
        assert_eq!(t.distance(0, 1), Some(21));
        assert_eq!(t.distance(2, 0), None);
        for cut in 0..payload.len() {
            assert!(Topology::read(&payload[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn stream_messages_round_trip() {
        let mut v = VcpuStream {
            vcpu: 3,
            apic_id: 5,
            node: 1,
            validated: 1,
            elements: 1000,
            array_gpa: 0x4000_0000,
            ..VcpuStream::default()
        };
        v.kernels[3] = KernelResult {
            bytes: 24_000,
            min_ns: 1000,
            avg_ns: 1100,
            max_ns: 1300,
        };
        let mut buf = [0u8; 512];
        let n = MessageHeader::write_message(&mut buf, MessageKind::VcpuStream, 3, |w| v.write(w))
            .unwrap();
        let (_, p) = MessageHeader::read_message(&buf[..n]).unwrap();
        let back = VcpuStream::read(p).unwrap();
        assert_eq!(back, v);
        assert!((back.kernels[3].mb_s() - 24_000.0).abs() < 1e-9);

        let mut s = StreamSummary {
            passes: 10,
            validated: 1,
            group_count: 2,
            ..StreamSummary::default()
        };
        s.groups[1].node = TOTAL_GROUP;
        let n =
            MessageHeader::write_message(&mut buf, MessageKind::StreamSummary, 0, |w| s.write(w))
                .unwrap();
        let (_, p) = MessageHeader::read_message(&buf[..n]).unwrap();
        assert_eq!(StreamSummary::read(p).unwrap(), s);
    }

    #[test]
    fn oversized_messages_are_refused_not_truncated() {
        let mut buf = [0u8; 20];
        assert!(
            MessageHeader::write_message(&mut buf, MessageKind::Fatal, 0, |w| w.bytes(&[1; 5]))
                .is_none()
        );
        assert!(
            MessageHeader::write_message(&mut buf, MessageKind::Fatal, 0, |w| w.bytes(&[1; 4]))
                .is_some()
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x1234_5678_u64;
        let mut buf = [0u8; 256];
        for _ in 0..20_000 {
            for b in &mut buf {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *b = seed as u8;
            }
            buf[..4].copy_from_slice(&MESSAGE_MAGIC.to_le_bytes());
            if let Ok((_, p)) = MessageHeader::read_message(&buf) {
                let _ = Topology::read(p);
                let _ = VcpuStream::read(p);
                let _ = StreamSummary::read(p);
            }
        }
    }
}
