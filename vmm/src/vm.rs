//! One VM from plan to report: [`plan`] turns a [`VmConfig`] into the layout and pin plan,
//! [`Vmm::new`] builds the VM from them, [`Vmm::run`] runs it and returns the [`RunReport`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use numa::{plan_layout, plan_pinning, HostTopology, Layout, PinPlan};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vm_superio::Serial;
use vmm_guest::abi::{GuestConfig, StreamSummary, Topology, VcpuStream};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::acpi::{AcpiError, AcpiTables};
use crate::builtin::{self, BuiltinBoot, BuiltinError};
use crate::cmos::Cmos;
use crate::config::{ConsoleTarget, VmConfig};
use crate::cpuid::{CpuTopology, CpuidError};
use crate::host_stream;
use crate::linux::{self, LinuxBoot, LinuxError, COM1_IRQ};
use crate::memory::{GuestRam, MemoryError};
use crate::report::{
    self, GuestTopology, LayoutOut, MemoryOut, RunReport, StreamFigures, TimingOut, VcpuThread,
};
use crate::vcpu::{
    self, ConsoleOut, ConsoleWatch, Event, GuestKind, Report, SerialIrq, VcpuContext, VcpuEnd,
};

/// Errors of a run, each one clear line.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Reading the host topology failed.
    #[error("host topology: {0}")]
    Topology(#[from] numa::TopologyError),
    /// The layout asked for is impossible.
    #[error("{0}")]
    Layout(#[from] numa::LayoutError),
    /// Pinning as asked is impossible.
    #[error("{0}")]
    Pin(#[from] numa::PinError),
    /// The built-in guest cannot run this layout, or did not load.
    #[error("{0}")]
    Builtin(#[from] BuiltinError),
    /// The Linux kernel, initramfs or command line cannot be booted.
    #[error("{0}")]
    Linux(#[from] LinuxError),
    /// An option that only the built-in guest takes was given with --kernel.
    #[error("{0} only applies to the built-in guest, not with --kernel")]
    BuiltinOnly(&'static str),
    /// No KVM on this host.
    #[error("/dev/kvm does not exist: this host has no KVM (load kvm_intel or kvm_amd, or enable nested virtualisation)")]
    NoKvm,
    /// Not allowed to use KVM.
    #[error(
        "no permission to open /dev/kvm: run as root or as a member of its group (usually kvm)"
    )]
    KvmPermission,
    /// A KVM call failed.
    #[error("KVM {0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// Guest RAM could not be set up.
    #[error("{0}")]
    Memory(#[from] MemoryError),
    /// ACPI tables could not be built or written.
    #[error("{0}")]
    Acpi(#[from] AcpiError),
    /// CPUID could not be set up.
    #[error("{0}")]
    Cpuid(#[from] CpuidError),
    /// A thread could not be started.
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
}

impl VmmError {
    /// True for errors in what the user asked (exit status 2), false for runtime ones (1).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Self::Layout(_)
                | Self::Pin(_)
                | Self::Builtin(BuiltinError::Unsupported(_))
                | Self::BuiltinOnly(_)
                | Self::Linux(LinuxError::CmdlineTooLong(..) | LinuxError::Cmdline(_))
        )
    }
}

/// The run's plan: everything derived from the host and the request, nothing applied yet.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The host as the process may use it.
    pub host: HostTopology,
    /// The vNUMA layout.
    pub layout: Layout,
    /// Where vCPU threads go (with `--pin`).
    pub pins: Option<PinPlan>,
    /// APIC ids and packages.
    pub cpus: CpuTopology,
}

/// Plans a run on this host.
pub fn plan(config: &VmConfig) -> Result<Plan, VmmError> {
    plan_on(HostTopology::current()?, config)
}

/// Plans a run on a given host topology (tests use sysfs fixtures).
pub fn plan_on(host: HostTopology, config: &VmConfig) -> Result<Plan, VmmError> {
    let layout = plan_layout(&host, &config.layout)?;
    if config.kernel.is_none() {
        builtin::check_layout(&layout, config.passes)?;
    } else if config.compare_host {
        return Err(VmmError::BuiltinOnly("--compare-host"));
    }
    let pins = if config.pin {
        Some(plan_pinning(&host, &layout, config.overcommit)?)
    } else {
        None
    };
    let cpus = CpuTopology::new(&layout);
    Ok(Plan {
        host,
        layout,
        pins,
        cpus,
    })
}

/// How the vCPUs start.
enum Start {
    Builtin(BuiltinBoot),
    Linux(LinuxBoot),
}

/// A built VM, ready to run. Fields drop in order: vCPUs and the VM before guest RAM.
pub struct Vmm {
    vcpus: Vec<VcpuFd>,
    _vm: VmFd,
    _kvm: Kvm,
    ram: GuestRam,
    plan: Plan,
    config: VmConfig,
    /// APIC id in each vCPU's CPUID table as KVM holds it.
    kvm_apic_ids: Vec<u32>,
    tsc_khz: u32,
    serial_irq: SerialIrq,
    started: Instant,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

fn open_kvm() -> Result<Kvm, VmmError> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => VmmError::NoKvm,
        libc::EACCES | libc::EPERM => VmmError::KvmPermission,
        _ => VmmError::Kvm("open /dev/kvm", e),
    })
}

/// Measures the TSC rate against the monotonic clock, for hosts whose KVM cannot say it.
fn calibrate_tsc_khz() -> u32 {
    let (t0, c0) = (Instant::now(), vmm_guest::stream::rdtsc());
    std::thread::sleep(Duration::from_millis(20));
    let (ticks, ns) = (
        vmm_guest::stream::rdtsc() - c0,
        t0.elapsed().as_nanos() as u64,
    );
    (ticks as u128 * 1_000_000 / u128::from(ns.max(1))) as u32
}

impl Vmm {
    /// Builds the VM: guest RAM bound and prefaulted per vnode, KVM memory slots, ACPI tables,
    /// the built-in guest and its vCPUs (CPUID, registers). `started` is when the process began.
    pub fn new(plan: Plan, config: VmConfig, started: Instant) -> Result<Self, VmmError> {
        let kvm = open_kvm()?;
        let layout = &plan.layout;
        let prefault_cpus: Vec<Vec<u32>> = layout
            .vnodes
            .iter()
            .map(|v| {
                plan.host
                    .node(v.host_node)
                    .map(|n| n.cpus.clone())
                    .unwrap_or_default()
            })
            .collect();
        let ram = GuestRam::new(
            layout,
            config.backing,
            config.prefault.then_some(&prefault_cpus[..]),
        )?;
        let vm = kvm.create_vm().map_err(|e| VmmError::Kvm("create VM", e))?;
        if config.kernel.is_some() {
            // Linux wants the PC's interrupt controllers and timer; the built-in guest has no
            // interrupts at all (and on kvm_pvm, CPL-0 interrupt handling would be emulated).
            vm.create_irq_chip()
                .map_err(|e| VmmError::Kvm("create irqchip", e))?;
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            vm.create_pit2(pit)
                .map_err(|e| VmmError::Kvm("create PIT", e))?;
            vm.set_gsi_routing(&linux::pc_irq_routing())
                .map_err(|e| VmmError::Kvm("set interrupt routing", e))?;
        }
        // Intel VMX needs a 3-page TSS area in guest-physical space; put it in the MMIO hole.
        // Other hosts either ignore it or do not implement it, which is harmless here.
        let _ = vm.set_tss_address(0xfffb_d000);
        for (slot, region) in ram.memory().iter().enumerate() {
            let host = ram
                .memory()
                .get_host_address(region.start_addr())
                .map_err(|_| {
                    VmmError::Kvm("map guest RAM", kvm_ioctls::Error::new(libc::EFAULT))
                })?;
            let mr = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range is guest RAM owned by `ram`, which outlives the VM fd (see
            // the field order of `Vmm` and the explicit drop in `run`).
            unsafe { vm.set_user_memory_region(mr) }
                .map_err(|e| VmmError::Kvm("set memory region", e))?;
        }
        let tables = AcpiTables::new(layout, &plan.cpus)?;
        tables.write_to(ram.memory())?;
        if let Some(dir) = &config.dump_acpi {
            tables.dump(dir)?;
        }
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmmError::Kvm("get supported CPUID", e))?;
        let mut vcpus = Vec::with_capacity(plan.cpus.apic_ids.len());
        for &apic in &plan.cpus.apic_ids {
            // The vCPU id is the APIC id, as an in-kernel local APIC expects.
            vcpus.push(
                vm.create_vcpu(u64::from(apic))
                    .map_err(|e| VmmError::Kvm("create vCPU", e))?,
            );
        }
        let mut kvm_apic_ids = Vec::with_capacity(vcpus.len());
        let tsc_khz = vcpus[0]
            .get_tsc_khz()
            .unwrap_or_else(|_| calibrate_tsc_khz());
        let start = match &config.kernel {
            None => Start::Builtin(BuiltinBoot::load(
                ram.memory(),
                layout,
                GuestConfig {
                    passes: config.passes,
                    tsc_khz,
                },
            )?),
            Some(spec) => Start::Linux(LinuxBoot::load(ram.memory(), layout, spec)?),
        };
        for (i, fd) in vcpus.iter().enumerate() {
            let i = i as u32;
            fd.set_cpuid2(&plan.cpus.cpuid(&supported, i, tsc_khz)?)
                .map_err(|e| VmmError::Kvm("set CPUID", e))?;
            // What KVM will answer the guest's CPUID with (checked against the plan later).
            let back = fd
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(|e| VmmError::Kvm("get CPUID", e))?;
            kvm_apic_ids.push(crate::cpuid::apic_id_of(&back).unwrap_or(u32::MAX));
            match &start {
                Start::Builtin(boot) => {
                    let sregs = fd.get_sregs().map_err(|e| VmmError::Kvm("get sregs", e))?;
                    fd.set_sregs(&boot.sregs(i, sregs))
                        .map_err(|e| VmmError::Kvm("set sregs", e))?;
                    fd.set_regs(&boot.regs(i))
                        .map_err(|e| VmmError::Kvm("set regs", e))?;
                    fd.set_fpu(&BuiltinBoot::fpu())
                        .map_err(|e| VmmError::Kvm("set FPU", e))?;
                }
                Start::Linux(boot) => {
                    let msrs = LinuxBoot::msrs();
                    let n = fd
                        .set_msrs(&msrs)
                        .map_err(|e| VmmError::Kvm("set MSRs", e))?;
                    if n != msrs.as_slice().len() {
                        log::warn!(
                            "vCPU {i}: KVM took {n} of {} boot MSRs",
                            msrs.as_slice().len()
                        );
                    }
                    let mut lapic = fd.get_lapic().map_err(|e| VmmError::Kvm("get LAPIC", e))?;
                    linux::set_lint(&mut lapic);
                    fd.set_lapic(&lapic)
                        .map_err(|e| VmmError::Kvm("set LAPIC", e))?;
                    // Only the boot vCPU starts; the others wait for INIT/SIPI from it.
                    if i == 0 {
                        let sregs = fd.get_sregs().map_err(|e| VmmError::Kvm("get sregs", e))?;
                        fd.set_sregs(&boot.sregs(sregs))
                            .map_err(|e| VmmError::Kvm("set sregs", e))?;
                        fd.set_regs(&boot.regs())
                            .map_err(|e| VmmError::Kvm("set regs", e))?;
                        fd.set_fpu(&LinuxBoot::fpu())
                            .map_err(|e| VmmError::Kvm("set FPU", e))?;
                    }
                }
            }
        }
        let serial_irq = match start {
            Start::Builtin(_) => SerialIrq::None,
            Start::Linux(_) => {
                let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| {
                    VmmError::Kvm(
                        "create serial eventfd",
                        kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
                    )
                })?;
                vm.register_irqfd(&evt, COM1_IRQ)
                    .map_err(|e| VmmError::Kvm("register serial irqfd", e))?;
                SerialIrq::Irqfd(evt)
            }
        };
        Ok(Self {
            plan,
            config,
            ram,
            _kvm: kvm,
            _vm: vm,
            vcpus,
            kvm_apic_ids,
            tsc_khz,
            serial_irq,
            started,
        })
    }

    /// Runs the guest to the end (or until a signal or the timeout) and reports.
    pub fn run(self) -> Result<RunReport, VmmError> {
        let Self {
            plan,
            config,
            ram,
            _kvm,
            _vm,
            vcpus,
            kvm_apic_ids,
            tsc_khz,
            serial_irq,
            started,
        } = self;
        let kind = if config.kernel.is_some() {
            GuestKind::Linux
        } else {
            GuestKind::Builtin
        };
        let layout = &plan.layout;
        if let Some(p) = &plan.pins {
            // The VMM's own threads keep off the vCPUs' CPUs where the host allows.
            let _ = numa::set_thread_affinity(&p.vmm_cpus);
        }
        kick_signal_handler();
        let first_output = Arc::new(OnceLock::new());
        let first_report = Arc::new(OnceLock::new());
        let out: Box<dyn std::io::Write + Send> = match config.console {
            ConsoleTarget::Stdout => Box::new(std::io::stdout()),
            ConsoleTarget::Stderr => Box::new(std::io::stderr()),
            ConsoleTarget::Sink => Box::new(std::io::sink()),
        };
        let watch = Arc::new(ConsoleWatch::default());
        let console = Arc::new(Mutex::new(Serial::new(
            serial_irq,
            ConsoleOut::new(out, first_output.clone(), watch.clone()),
        )));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = channel();
        let signals = crate::signals::SignalWatch::start(tx.clone());
        let run_start = Instant::now();
        let mut handles: Vec<JoinHandle<()>> = Vec::new();
        let n = vcpus.len();
        let cmos = Arc::new(Mutex::new(Cmos::default()));
        for (i, fd) in vcpus.into_iter().enumerate() {
            let ctx = VcpuContext {
                index: i as u32,
                kind,
                pin: plan.pins.as_ref().map(|p| p.vcpu_cpus[i]),
                mem: ram.memory().clone(),
                console: console.clone(),
                cmos: cmos.clone(),
                stop: stop.clone(),
                events: tx.clone(),
                first_report: first_report.clone(),
            };
            let h = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu::run(fd, ctx))
                .map_err(VmmError::Thread)?;
            handles.push(h);
        }
        drop(tx);

        let mut threads = Vec::new();
        let mut topology: Option<Box<Topology>> = None;
        let mut per_vcpu: Vec<VcpuStream> = Vec::new();
        let mut summary: Option<Box<StreamSummary>> = None;
        let mut errors = Vec::new();
        let mut stopped_by = None;
        let mut guest_exit: Option<VcpuEnd> = None;
        let mut exited = 0;
        let deadline = config.timeout.map(|t| run_start + t);
        while exited < n {
            let wait = deadline.map_or(Duration::from_millis(200), |d| {
                d.saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(200))
            });
            let event = match rx.recv_timeout(wait) {
                Ok(e) => e,
                Err(RecvTimeoutError::Timeout) => {
                    // A panicked kernel may never reset (panic=0, or a reboot method this
                    // machine lacks): once its console has been quiet for a second, it is over.
                    if watch.panicked()
                        && watch.quiet_for() >= Duration::from_secs(1)
                        && !stop.load(Ordering::Acquire)
                    {
                        guest_exit.get_or_insert(VcpuEnd::Reset);
                        stop.store(true, Ordering::Release);
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) && stopped_by.is_none() {
                        stopped_by = Some(format!(
                            "the {} s timeout",
                            config.timeout.unwrap_or_default().as_secs_f64()
                        ));
                        stop.store(true, Ordering::Release);
                    }
                    if stop.load(Ordering::Acquire) {
                        kick(&handles);
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            match event {
                Event::Started { vcpu, tid, cpus } => threads.push(VcpuThread {
                    vcpu,
                    tid,
                    cpus_allowed: cpus,
                }),
                Event::Report(_, Report::Topology(t)) => topology = Some(t),
                Event::Report(_, Report::VcpuStream(s)) => per_vcpu.push(s),
                Event::Report(_, Report::Summary(s)) => summary = Some(s),
                Event::Report(v, Report::Fatal(text)) => {
                    errors.push(format!("guest vCPU {v}: {text}"));
                    stop.store(true, Ordering::Release);
                }
                Event::Exited(v, Ok(VcpuEnd::Done(status))) if status != 0 => {
                    exited += 1;
                    errors.push(format!("guest vCPU {v} finished with status {status}"));
                    // The others may be waiting for it at a barrier: stop them.
                    stop.store(true, Ordering::Release);
                    kick(&handles);
                }
                Event::Exited(_, Ok(end @ (VcpuEnd::PowerOff | VcpuEnd::Reset))) => {
                    exited += 1;
                    guest_exit.get_or_insert(end);
                    // The machine is off: every other vCPU stops too.
                    stop.store(true, Ordering::Release);
                    kick(&handles);
                }
                Event::Exited(_, Ok(_)) => exited += 1,
                Event::Exited(_, Err(e)) => {
                    exited += 1;
                    errors.push(e.to_string());
                    // One vCPU failing leaves the others waiting at a barrier: stop them.
                    stop.store(true, Ordering::Release);
                    kick(&handles);
                }
                Event::Signal(sig) => {
                    stopped_by = Some(crate::signals::name(sig).to_string());
                    stop.store(true, Ordering::Release);
                    kick(&handles);
                }
            }
        }
        for h in handles {
            let _ = h.join();
        }
        // The VM is done: close it before anything else uses (or frees) guest RAM.
        drop(_vm);
        signals.finish();
        let run_ms = ms(run_start.elapsed());
        // At the end, so pages the guest faulted in itself are counted too.
        let placement = ram.placement(layout)?;
        let resident_bytes = ram.resident_bytes().ok();
        let vmm_overhead_bytes = resident_bytes.and_then(crate::rss::overhead_bytes);

        let guest_topology = topology.as_deref().map(GuestTopology::new);
        // A Linux guest's view is checked from inside it (numactl, sysfs); the built-in guest
        // reports its own.
        let mut mismatches = match (&guest_topology, kind) {
            (Some(g), _) => g.mismatches(layout, &plan.cpus),
            (None, GuestKind::Builtin) => vec!["the guest reported no topology".to_string()],
            (None, GuestKind::Linux) => Vec::new(),
        };
        for (v, (&planned, &kvm)) in plan.cpus.apic_ids.iter().zip(&kvm_apic_ids).enumerate() {
            if planned != kvm {
                mismatches.push(format!(
                    "vCPU {v}: KVM's CPUID table gives APIC id {kvm}, planned {planned}"
                ));
            }
        }
        let cpuid_seen_by_guest =
            !per_vcpu.is_empty() && per_vcpu.iter().all(|s| s.cpuid_virtualized == 1);
        for s in &per_vcpu {
            let planned = layout.vnode_of_vcpu(s.vcpu);
            if planned != Some(s.node)
                || plan.cpus.apic_ids.get(s.vcpu as usize) != Some(&s.apic_id)
            {
                mismatches.push(format!(
                    "vCPU {} runs as APIC id {} in node {}, planned APIC id {:?} in vnode {:?}",
                    s.vcpu,
                    s.apic_id,
                    s.node,
                    plan.cpus.apic_ids.get(s.vcpu as usize),
                    planned
                ));
            }
        }
        let guest_exit = guest_exit.map(|end| match end {
            _ if watch.panicked() => "panic",
            VcpuEnd::Reset => "reset",
            VcpuEnd::PowerOff => "poweroff",
            VcpuEnd::Done(_) | VcpuEnd::Stopped => "done",
        });
        if guest_exit == Some("panic") {
            errors.push("the guest kernel panicked (see its console)".to_string());
        }
        let apic_ids_checked_by = if cpuid_seen_by_guest {
            "guest CPUID and KVM's CPUID table"
        } else {
            "KVM's CPUID table (this host runs CPUID natively at CPL 3, e.g. kvm_pvm)"
        };
        let stream = summary.as_deref().map(|s| StreamFigures::new(s, &per_vcpu));
        let host_stream =
            (config.compare_host && stream.is_some() && stopped_by.is_none()).then(|| {
                host_stream::run(
                    ram.memory(),
                    &per_vcpu,
                    plan.pins.as_ref(),
                    config.passes,
                    tsc_khz,
                )
            });
        let ratio = match (&stream, &host_stream) {
            (Some(g), Some(h)) => Some(report::ratio(g, h)),
            _ => None,
        };
        let prefault_ms = ram.prefault_time.map_or(0.0, ms);
        let first = [first_output.get(), first_report.get()]
            .into_iter()
            .flatten()
            .min()
            .map(|t| ms(t.duration_since(started)));
        threads.sort_by_key(|t| t.vcpu);
        let node_cpus = |node: u32| {
            plan.host
                .node(node)
                .map(|n| n.cpus.clone())
                .unwrap_or_default()
        };
        Ok(RunReport {
            layout: LayoutOut::new(layout, plan.pins.as_ref(), &node_cpus, &plan.cpus),
            pinning: plan.pins.clone(),
            memory: MemoryOut {
                backing: ram.backing,
                huge_pages: ram.huge_pages,
                prefault: ram.prefault_time.is_some(),
                prefault_ms,
                resident_bytes,
                all_local: placement.iter().all(|p| p.all_local()),
                placement,
            },
            guest: match kind {
                GuestKind::Builtin => "built-in",
                GuestKind::Linux => "linux",
            }
            .to_string(),
            guest_exit: guest_exit.map(str::to_string),
            vcpu_threads: threads,
            apic_ids_checked_by: apic_ids_checked_by.to_string(),
            guest_view_matches: mismatches.is_empty(),
            guest_topology,
            mismatches,
            stream,
            host_stream,
            ratio,
            timing: TimingOut {
                setup_ms: ms(run_start.duration_since(started)),
                first_output_ms: first,
                first_output_less_prefault_ms: first.map(|f| (f - prefault_ms).max(0.0)),
                prefault_ms,
                run_ms,
                total_ms: ms(started.elapsed()),
            },
            vmm_overhead_bytes,
            host_llc_bytes: plan.host.llc_bytes,
            errors,
            stopped_by,
        })
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// A no-op handler for the signal that interrupts `KVM_RUN`, so the vCPU loop sees the stop flag.
fn kick_signal_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Failure leaves the default action (terminate), which only matters when stopping.
        let _ = register_signal_handler(SIGRTMIN(), on_kick);
    });
}

/// Interrupts every vCPU thread still in `KVM_RUN`.
fn kick(handles: &[JoinHandle<()>]) {
    for h in handles {
        if !h.is_finished() {
            let _ = h.kill(SIGRTMIN());
        }
    }
}

/// Plans, builds and runs one VM.
pub fn run(config: VmConfig, started: Instant) -> Result<(Plan, RunReport), VmmError> {
    let plan = plan(&config)?;
    let vmm = Vmm::new(plan.clone(), config, started)?;
    Ok((plan, vmm.run()?))
}
