//! The vCPU threads: each pins itself as planned, runs `KVM_RUN` in a loop, serves the serial port
//! and the built-in guest's report port, and tells the main thread what happened over a channel.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vm_superio::{Serial, Trigger};
use vmm_guest::abi::{
    MessageHeader, MessageKind, StreamSummary, Topology, VcpuStream, EXCEPTION_FLAG, MAILBOX_GPA,
    MAILBOX_STRIDE, PORT_COM1, PORT_REPORT,
};

use crate::builtin::{exception_name, pushes_error_code};
use crate::cmos::{self, Cmos};
use crate::linux::{RESET_PORT, RESET_VALUE, S5_SLP_TYP, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT};
use crate::ratelimit::RateLimit;

/// Errors that end a vCPU.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VcpuError {
    /// KVM_RUN failed.
    #[error("vCPU {0}: KVM_RUN failed: {1}")]
    Run(u32, String),
    /// The guest took an exception it cannot handle.
    #[error("vCPU {vcpu}: guest exception {vector} ({name}) at rip {rip:#x}, error code {error_code:#x}, cr2 {cr2:#x}")]
    GuestException {
        /// The vCPU.
        vcpu: u32,
        /// Exception vector.
        vector: u32,
        /// Its name.
        name: &'static str,
        /// Faulting instruction.
        rip: u64,
        /// Error code (0 when the vector has none).
        error_code: u64,
        /// Faulting address for page faults.
        cr2: u64,
    },
    /// An exit the VMM does not expect from this guest.
    #[error("vCPU {0}: unexpected exit: {1}")]
    UnexpectedExit(u32, String),
    /// A report the VMM cannot decode.
    #[error("vCPU {0}: bad report: {1}")]
    BadReport(u32, String),
    /// Pinning the thread failed.
    #[error("vCPU {0}: cannot pin to host CPU {1}: {2}")]
    Pin(u32, u32, String),
}

/// A decoded report from the built-in guest.
#[derive(Debug, Clone)]
pub enum Report {
    /// What the guest read from ACPI.
    Topology(Box<Topology>),
    /// One vCPU's STREAM result.
    VcpuStream(VcpuStream),
    /// Per-vnode and total results.
    Summary(Box<StreamSummary>),
    /// The guest gave up.
    Fatal(String),
}

/// What a vCPU thread tells the main thread.
#[derive(Debug)]
pub enum Event {
    /// The thread is running (after pinning): its kernel thread id and allowed CPUs.
    Started {
        /// The vCPU.
        vcpu: u32,
        /// Kernel thread id.
        tid: i32,
        /// CPUs the thread may run on, read back after pinning.
        cpus: Vec<u32>,
    },
    /// A report from the guest.
    Report(u32, Report),
    /// The vCPU stopped.
    Exited(u32, Result<VcpuEnd, VcpuError>),
    /// SIGINT or SIGTERM arrived.
    Signal(i32),
}

/// How a vCPU's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuEnd {
    /// Stopped from outside (a signal, the timeout, another vCPU's failure).
    Stopped,
    /// The built-in guest said it was done, with this status (0: all checks passed).
    Done(u32),
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (keyboard controller, ACPI reset register, triple fault).
    Reset,
}

/// Which guest runs: it decides which ports mean what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestKind {
    /// The built-in guest (report port, no interrupts, no MMIO).
    Builtin,
    /// A Linux kernel (in-kernel irqchip, legacy ports, ACPI power registers).
    Linux,
}

/// COM1's interrupt: none for the built-in guest (no irqchip), an irqfd for Linux.
#[derive(Debug)]
pub enum SerialIrq {
    /// No interrupt line.
    None,
    /// Raises GSI 4 through KVM.
    Irqfd(vmm_sys_util::eventfd::EventFd),
}

impl Trigger for SerialIrq {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        match self {
            Self::None => Ok(()),
            Self::Irqfd(e) => e.write(1),
        }
    }
}

/// What Linux prints when it panics; a reset after it is reported as a panic.
const PANIC_MARK: &[u8] = b"Kernel panic - not syncing";

/// What the console has seen: whether the kernel panicked, and when it last wrote.
#[derive(Debug)]
pub struct ConsoleWatch {
    epoch: Instant,
    panicked: AtomicBool,
    last_write_ms: std::sync::atomic::AtomicU64,
}

impl Default for ConsoleWatch {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            panicked: AtomicBool::new(false),
            last_write_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl ConsoleWatch {
    /// True once a console line said `Kernel panic - not syncing`.
    pub fn panicked(&self) -> bool {
        self.panicked.load(Ordering::Acquire)
    }
    /// How long the console has been silent.
    pub fn quiet_for(&self) -> std::time::Duration {
        let last = std::time::Duration::from_millis(self.last_write_ms.load(Ordering::Acquire));
        self.epoch.elapsed().saturating_sub(last)
    }
    fn wrote(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_write_ms.store(ms, Ordering::Release);
    }
}

/// Console output that remembers when the guest first wrote to it and whether it panicked.
pub struct ConsoleOut {
    out: Box<dyn Write + Send>,
    first: Arc<OnceLock<Instant>>,
    watch: Arc<ConsoleWatch>,
    line: Vec<u8>,
}

impl ConsoleOut {
    /// Wraps `out`; `first` receives the time of the first byte, `watch` what it sees.
    pub fn new(
        out: Box<dyn Write + Send>,
        first: Arc<OnceLock<Instant>>,
        watch: Arc<ConsoleWatch>,
    ) -> Self {
        Self {
            out,
            first,
            watch,
            line: Vec::new(),
        }
    }

    fn watch(&mut self, buf: &[u8]) {
        self.watch.wrote();
        for &b in buf {
            if b == b'\n' {
                self.line.clear();
            } else if self.line.len() < 256 {
                self.line.push(b);
                if self.line.ends_with(PANIC_MARK) {
                    self.watch.panicked.store(true, Ordering::Release);
                }
            }
        }
    }
}

impl std::fmt::Debug for ConsoleOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleOut").finish_non_exhaustive()
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.first.get_or_init(Instant::now);
        self.watch(buf);
        let n = self.out.write(buf)?;
        // One byte per exit: flush at line ends so the console reads as it happens.
        if buf.contains(&b'\n') {
            self.out.flush()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// The shared COM1.
pub type Console = Arc<Mutex<Serial<SerialIrq, vm_superio::serial::NoEvents, ConsoleOut>>>;

/// Everything a vCPU thread needs besides its fd.
pub struct VcpuContext {
    /// The vCPU index.
    pub index: u32,
    /// Which guest runs.
    pub kind: GuestKind,
    /// Host CPU to pin to, if pinning.
    pub pin: Option<u32>,
    /// Guest memory (mailboxes, exception frames).
    pub mem: GuestMemoryMmap,
    /// COM1.
    pub console: Console,
    /// The CMOS clock (Linux guests).
    pub cmos: Arc<Mutex<Cmos>>,
    /// Set to stop every vCPU.
    pub stop: Arc<AtomicBool>,
    /// To the main thread.
    pub events: Sender<Event>,
    /// Set at the first guest report (time to first output, with the console's first byte).
    pub first_report: Arc<OnceLock<Instant>>,
}

impl std::fmt::Debug for VcpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuContext")
            .field("index", &self.index)
            .field("pin", &self.pin)
            .finish_non_exhaustive()
    }
}

fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// Body of a vCPU thread.
pub fn run(mut fd: VcpuFd, ctx: VcpuContext) {
    let me = ctx.index;
    if let Some(cpu) = ctx.pin {
        if let Err(e) = numa::set_thread_affinity(&[cpu]) {
            let _ = ctx.events.send(Event::Exited(
                me,
                Err(VcpuError::Pin(me, cpu, e.to_string())),
            ));
            return;
        }
    }
    let cpus = numa::thread_affinity().unwrap_or_default();
    let _ = ctx.events.send(Event::Started {
        vcpu: me,
        tid: gettid(),
        cpus,
    });
    let result = run_loop(&mut fd, &ctx);
    let _ = ctx.events.send(Event::Exited(me, result));
}

fn run_loop(fd: &mut VcpuFd, ctx: &VcpuContext) -> Result<VcpuEnd, VcpuError> {
    let me = ctx.index;
    let linux = ctx.kind == GuestKind::Linux;
    let mut odd_ports = RateLimit::new(5, std::time::Duration::from_secs(1));
    loop {
        if ctx.stop.load(Ordering::Acquire) {
            return Ok(VcpuEnd::Stopped);
        }
        match fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => match port {
                PORT_REPORT if !linux => {
                    let mut v = [0u8; 4];
                    let n = data.len().min(4);
                    v[..n].copy_from_slice(&data[..n]);
                    let value = u32::from_le_bytes(v);
                    if value & EXCEPTION_FLAG != 0 {
                        return Err(exception(fd, me, &ctx.mem, value & 0xff));
                    }
                    if let Some(status) = report(ctx, value)? {
                        return Ok(VcpuEnd::Done(status));
                    }
                }
                p if (PORT_COM1..PORT_COM1 + 8).contains(&p) => {
                    let mut console = ctx.console.lock().expect("console lock");
                    // Output errors (a closed pipe) must not stop the guest.
                    let _ = console.write((p - PORT_COM1) as u8, data[0]);
                }
                p if linux && cmos::PORTS.contains(&p) => {
                    ctx.cmos.lock().expect("cmos lock").write(p, data[0]);
                }
                // i8042 "pulse reset line" (Linux's reboot=k).
                0x64 if linux && data[0] == 0xfe => return Ok(VcpuEnd::Reset),
                // SLP_EN with S5's SLP_TYP: soft off.
                SLEEP_CONTROL_PORT
                    if linux && data[0] & 0x20 != 0 && (data[0] >> 2) & 0x7 == S5_SLP_TYP =>
                {
                    return Ok(VcpuEnd::PowerOff)
                }
                RESET_PORT if linux && data[0] == RESET_VALUE => return Ok(VcpuEnd::Reset),
                // Linux probes legacy ports (POST codes, PIC, CMOS, PCI): nothing answers.
                p if linux => {
                    if odd_ports.allow() {
                        log::debug!("vCPU {me}: write {:#x?} to port {p:#x} ignored", data);
                    }
                }
                p => {
                    if odd_ports.allow() {
                        log::warn!("vCPU {me}: write to unhandled port {p:#x} ignored");
                    }
                }
            },
            Ok(VcpuExit::IoIn(port, data)) => {
                if (PORT_COM1..PORT_COM1 + 8).contains(&port) {
                    data[0] = ctx
                        .console
                        .lock()
                        .expect("console lock")
                        .read((port - PORT_COM1) as u8);
                } else if linux && cmos::PORTS.contains(&port) {
                    data[0] = ctx.cmos.lock().expect("cmos lock").read(port);
                } else if linux && matches!(port, 0x60 | 0x64 | SLEEP_STATUS_PORT) {
                    // Empty keyboard controller, no sleep in progress.
                    data.fill(0);
                } else {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::Hlt) if linux => {}
            Ok(VcpuExit::Hlt) => return Err(VcpuError::UnexpectedExit(me, "HLT".into())),
            // Linux falls back to a triple fault to reboot.
            Ok(VcpuExit::Shutdown) if linux => return Ok(VcpuEnd::Reset),
            Ok(VcpuExit::Shutdown) => {
                return Err(VcpuError::UnexpectedExit(
                    me,
                    "shutdown (triple fault)".into(),
                ))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) if linux => {
                return Ok(if kind == kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN {
                    VcpuEnd::PowerOff
                } else {
                    VcpuEnd::Reset
                });
            }
            // No MMIO devices: reads float high, writes go nowhere.
            Ok(VcpuExit::MmioRead(_, data)) if linux => data.fill(0xff),
            Ok(VcpuExit::MmioWrite(..)) if linux => {}
            Ok(VcpuExit::InternalError) => {
                let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
                return Err(VcpuError::UnexpectedExit(
                    me,
                    format!("KVM internal error at rip {rip:#x}"),
                ));
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Err(VcpuError::UnexpectedExit(
                    me,
                    format!("entry failed, reason {reason:#x} on host CPU {cpu}"),
                ))
            }
            Ok(VcpuExit::MmioRead(addr, _)) | Ok(VcpuExit::MmioWrite(addr, _)) => {
                return Err(VcpuError::UnexpectedExit(
                    me,
                    format!("access to {addr:#x}, outside guest RAM"),
                ))
            }
            Ok(VcpuExit::Intr) => {}
            Ok(other) => return Err(VcpuError::UnexpectedExit(me, format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(VcpuError::Run(me, e.to_string())),
        }
    }
}

/// Reads and forwards the message in mailbox `slot`; `Some(status)` when it says Done.
fn report(ctx: &VcpuContext, slot: u32) -> Result<Option<u32>, VcpuError> {
    let me = ctx.index;
    let bad = |what: String| VcpuError::BadReport(me, what);
    if slot != me {
        return Err(bad(format!("report for vCPU {slot} from vCPU {me}")));
    }
    ctx.first_report.get_or_init(Instant::now);
    let mut buf = vec![0u8; MAILBOX_STRIDE as usize];
    ctx.mem
        .read_slice(
            &mut buf,
            GuestAddress(MAILBOX_GPA + u64::from(slot) * MAILBOX_STRIDE),
        )
        .map_err(|e| bad(e.to_string()))?;
    let (head, payload) = MessageHeader::read_message(&buf).map_err(|e| bad(e.to_string()))?;
    let decoded = match head.kind {
        MessageKind::Topology => Report::Topology(Box::new(
            Topology::read(payload).map_err(|e| bad(e.to_string()))?,
        )),
        MessageKind::VcpuStream => {
            Report::VcpuStream(VcpuStream::read(payload).map_err(|e| bad(e.to_string()))?)
        }
        MessageKind::StreamSummary => Report::Summary(Box::new(
            StreamSummary::read(payload).map_err(|e| bad(e.to_string()))?,
        )),
        MessageKind::Fatal => Report::Fatal(String::from_utf8_lossy(payload).into_owned()),
        MessageKind::Done => {
            let status = payload
                .get(..4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| bad("short Done".into()))?;
            return Ok(Some(status));
        }
    };
    let _ = ctx.events.send(Event::Report(me, decoded));
    Ok(None)
}

/// Describes an exception the stubs reported, from the frame on the CPL-0 stack.
fn exception(fd: &VcpuFd, me: u32, mem: &GuestMemoryMmap, vector: u32) -> VcpuError {
    let rsp = fd.get_regs().map(|r| r.rsp).unwrap_or(0);
    let cr2 = fd.get_sregs().map(|s| s.cr2).unwrap_or(0);
    let word = |at: u64| mem.read_obj::<u64>(GuestAddress(at)).unwrap_or(0);
    let (error_code, rip) = if pushes_error_code(vector) {
        (word(rsp), word(rsp + 8))
    } else {
        (0, word(rsp))
    };
    VcpuError::GuestException {
        vcpu: me,
        vector,
        name: exception_name(vector),
        rip,
        error_code,
        cr2,
    }
}
