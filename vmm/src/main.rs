//! `vmm`: runs a guest with a vNUMA shape on KVM. See `vmm --help`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use vmm::{Backing, ConsoleTarget, VmConfig};

/// Run a VM with a virtual NUMA shape on KVM, its vCPUs pinned to the host's cores.
///
/// Without --kernel, runs the built-in guest: it reads the ACPI tables (SRAT, SLIT, MADT) it is
/// given, reports the topology it sees, runs the four STREAM kernels on every vCPU over arrays in
/// its own vnode's memory, and exits. The VMM checks the guest's view against the layout and exits
/// 0 only when they agree and STREAM validates.
///
/// With --kernel, boots Linux instead; the guest sees the same vNUMA layout through ACPI and the
/// VMM exits when it powers off (0), resets (0) or panics (1).
///
/// Examples:
///   vmm --numa-nodes 2 --pin
///   vmm --numa-nodes 4 --pin --overcommit --json
///   vmm --vnode vcpus=0-2,memory=1G,host-node=0 --vnode vcpus=3,memory=512M --distances '10,21;21,10'
///   vmm --kernel bzImage --initramfs initrd.cpio --numa-nodes 2 --pin --memory 1G
///
/// Exit status: 0 success; 1 runtime failure or a failed check; 2 bad usage or impossible layout.
#[derive(Debug, Parser)]
#[command(name = "vmm", version, verbatim_doc_comment)]
struct Cli {
    /// Number of vnodes; vCPUs and memory are split across them (remainders to the first vnodes),
    /// vnodes mapped round-robin onto host nodes with CPUs and memory [default: 1].
    #[arg(long, value_name = "N")]
    numa_nodes: Option<u32>,
    /// vCPUs [default: the host CPUs this process may use, at least N].
    #[arg(long, value_name = "N")]
    vcpus: Option<u32>,
    /// Guest memory, e.g. 2G or 512M [default: enough for STREAM arrays of 4x the host's
    /// last-level cache each, plus 16 MiB].
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    /// An explicit vnode (repeat once per vnode, in id order): vcpus=LIST,memory=SIZE[,host-node=N].
    /// LIST is an id, a range (0-3) or a bracketed list (vcpus=[0-1,4]).
    #[arg(long, value_name = "SPEC")]
    vnode: Vec<String>,
    /// Distance matrix, rows split by ';' and entries by ',': 10 on the diagonal, 11..=254
    /// elsewhere [default: the host's distances between the mapped nodes; 20 within one node].
    #[arg(long, value_name = "MATRIX")]
    distances: Option<String>,
    /// Pin each vCPU thread to its own host CPU in its vnode's host node (distinct cores before
    /// SMT siblings); the VMM's other threads keep off those CPUs where the node allows.
    #[arg(long)]
    pin: bool,
    /// With --pin, let vCPUs share a node's CPUs round-robin when it has too few.
    #[arg(long)]
    overcommit: bool,
    /// Back guest RAM with hugetlbfs 2 MiB pages (reserve them in /proc/sys/vm/nr_hugepages)
    /// instead of transparent huge pages.
    #[arg(long)]
    hugepages: bool,
    /// Fault all guest RAM in on each vnode's host node before the guest starts ("on"), or let
    /// the guest's first touch fault each page in, on its bound node all the same ("off", what
    /// QEMU without -mem-prealloc, Cloud Hypervisor and Firecracker do). "on" finds a short node
    /// at start and keeps page faults out of the guest's measurements; "off" boots sooner and
    /// leaves RAM the guest never touches free.
    #[arg(long, value_name = "on|off", value_parser = ["on", "off"], default_value = "on")]
    prefault: String,
    /// STREAM passes of the built-in guest (STREAM's NTIMES; the first is a warm-up and not
    /// counted) [default: 10].
    #[arg(long, value_name = "N")]
    passes: Option<u32>,
    /// Boot this Linux kernel (bzImage) instead of the built-in guest. The vNUMA layout reaches
    /// it through ACPI (SRAT, SLIT); the VM ends when the guest powers off or resets.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (cpio archive) for --kernel.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initramfs: Option<PathBuf>,
    /// Kernel command line for --kernel.
    #[arg(long, value_name = "TEXT", requires = "kernel", default_value = vmm::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Also run the same kernels on host threads placed as the vCPUs, over the same memory, and
    /// report guest/host ratios.
    #[arg(long)]
    compare_host: bool,
    /// Write each ACPI table to DIR/<signature>.dat (for `iasl -d`).
    #[arg(long, value_name = "DIR")]
    dump_acpi: Option<PathBuf>,
    /// Print one JSON object on stdout (the guest console goes to stderr).
    #[arg(long)]
    json: bool,
    /// Stop the guest after this many seconds (0: no limit).
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    timeout: f64,
}

fn config(cli: &Cli) -> Result<VmConfig, String> {
    let mut c = VmConfig::with_numa_nodes(cli.numa_nodes.unwrap_or(1));
    c.layout.numa_nodes = cli.numa_nodes;
    if cli.numa_nodes.is_none() && cli.vnode.is_empty() {
        c.layout.numa_nodes = Some(1);
    }
    c.layout.vcpus = cli.vcpus;
    c.layout.memory_bytes = cli
        .memory
        .as_deref()
        .map(numa::parse_size)
        .transpose()
        .map_err(|e| e.to_string())?;
    c.layout.vnodes = cli
        .vnode
        .iter()
        .map(|s| numa::parse_vnode_spec(s))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    c.layout.distances = cli
        .distances
        .as_deref()
        .map(numa::parse_distances)
        .transpose()
        .map_err(|e| e.to_string())?;
    c.pin = cli.pin;
    c.overcommit = cli.overcommit;
    if cli.overcommit && !cli.pin {
        return Err("--overcommit only applies with --pin".into());
    }
    c.backing = if cli.hugepages {
        Backing::Hugetlb
    } else {
        Backing::Thp
    };
    c.passes = cli.passes.unwrap_or(vmm::DEFAULT_PASSES);
    c.kernel = cli.kernel.as_ref().map(|kernel| vmm::LinuxSpec {
        kernel: kernel.clone(),
        initramfs: cli.initramfs.clone(),
        cmdline: cli.cmdline.clone(),
    });
    c.prefault = cli.prefault == "on";
    if c.kernel.is_some() && cli.passes.is_some() {
        return Err("--passes only applies to the built-in guest, not with --kernel".into());
    }
    c.compare_host = cli.compare_host;
    c.dump_acpi = cli.dump_acpi.clone();
    c.console = if cli.json {
        ConsoleTarget::Stderr
    } else {
        ConsoleTarget::Stdout
    };
    if !(cli.timeout.is_finite() && cli.timeout >= 0.0) {
        return Err(format!(
            "--timeout {} is not a number of seconds",
            cli.timeout
        ));
    }
    c.timeout = (cli.timeout > 0.0).then(|| Duration::from_secs_f64(cli.timeout));
    Ok(c)
}

fn fail(json: bool, usage: bool, msg: &str) -> ExitCode {
    eprintln!("vmm: error: {msg}");
    if json {
        let kind = if usage { "usage" } else { "runtime" };
        println!("{}", serde_json::json!({ "error": msg, "kind": kind }));
    }
    ExitCode::from(if usage { 2 } else { 1 })
}

fn main() -> ExitCode {
    let started = Instant::now();
    // Before any thread exists, so every thread inherits the mask (see vmm::signals).
    vmm::signals::block_stop_signals();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let config = match config(&cli) {
        Ok(c) => c,
        Err(e) => return fail(cli.json, true, &e),
    };
    let (plan, report) = match vmm::run(config, started) {
        Ok(r) => r,
        Err(e) => return fail(cli.json, e.is_usage(), &e.to_string()),
    };
    if cli.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => return fail(true, false, &format!("cannot encode the report: {e}")),
        }
    } else {
        print!("{}", report.human(&plan.layout));
    }
    if report.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
