//! `guest-stream`: STREAM for Linux guests, with the very kernels the built-in guest runs
//! (`vmm_guest::stream`), one thread per CPU, each pinned to its CPU and with its arrays
//! allocated and first touched after pinning, so they sit in that CPU's node (the vNUMA check of
//! the MicroVisor seed, §2.7.1.1: STREAM per node inside the guest).
//!
//! Built statically into the Linux guest images by `ci/images/linux-guest.sh`:
//! `RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p vmm-guest --bin
//! guest-stream --target x86_64-unknown-linux-gnu`.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use numa::HostTopology;
use serde::Serialize;
use vmm_guest::abi::{GroupStream, KernelResult, StreamSummary, MAX_LOCALITIES, MAX_PASSES};
use vmm_guest::abi::{MAX_VCPUS, TOTAL_GROUP};
use vmm_guest::stream::{rdtsc, Arrays, Run, SpinBarrier, TimingTable, GUEST_TIMING_SLOTS};

/// STREAM (Copy, Scale, Add, Triad) on every CPU, pinned, arrays node-local, results per node.
///
/// Runs one thread per CPU this process may use (or per CPU of --cpus). Each thread pins itself
/// to its CPU, then allocates and initialises its own three arrays, so first touch places them in
/// the CPU's NUMA node. The nodes come from /sys/devices/system/node/node*/cpulist. The TSC rate
/// is calibrated against CLOCK_MONOTONIC.
///
/// Prints STREAM's table for all threads and for each node, "Solution Validates" when every
/// thread's arrays check out, and a last line `STREAM-JSON {...}` for machines.
///
/// Exit status: 0 validated; 1 failed validation or runtime error; 2 bad usage.
#[derive(Debug, Parser)]
#[command(name = "guest-stream", version, verbatim_doc_comment)]
struct Cli {
    /// STREAM passes (NTIMES; the first is a warm-up and not counted), 2..=64.
    #[arg(long, value_name = "N", default_value_t = 10)]
    passes: u32,
    /// Size of each of one thread's three arrays, e.g. 8M [default: STREAM's rule, every array
    /// summed over the threads at least 4x the last-level cache; at least 1M per thread].
    #[arg(long, value_name = "SIZE")]
    array_size: Option<String>,
    /// Run on these CPUs only (a list such as 0-3,6) [default: every CPU this process may use].
    #[arg(long, value_name = "LIST")]
    cpus: Option<String>,
}

/// Smallest array per thread the default picks.
const MIN_ARRAY_BYTES: u64 = 1 << 20;
/// How long the TSC is calibrated against CLOCK_MONOTONIC.
const CALIBRATION: Duration = Duration::from_millis(200);

/// One thread's place and outcome.
#[derive(Debug, Clone, Serialize)]
struct ThreadOut {
    cpu: u32,
    node: u32,
    elements: u64,
    validated: bool,
}

/// One kernel's figures, as STREAM prints them.
#[derive(Debug, Clone, Copy, Serialize)]
struct KernelOut {
    mb_s: f64,
    bytes: u64,
    min_ns: u64,
    avg_ns: u64,
    max_ns: u64,
}

/// A group (one node, or every thread) with its four kernels.
#[derive(Debug, Clone, Serialize)]
struct GroupOut {
    /// The node id; absent for the total.
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<u32>,
    cpus: Vec<u32>,
    kernels: BTreeMap<&'static str, KernelOut>,
}

/// The `STREAM-JSON` line.
#[derive(Debug, Serialize)]
struct Report {
    passes: u32,
    tsc_khz: u32,
    validated: bool,
    array_bytes_per_thread: u64,
    total: GroupOut,
    per_node: Vec<GroupOut>,
    threads: Vec<ThreadOut>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(report) => {
            print!("{}", table(&report));
            match serde_json::to_string(&report) {
                Ok(json) => println!("STREAM-JSON {json}"),
                Err(e) => {
                    eprintln!("guest-stream: error: cannot encode the report: {e}");
                    return ExitCode::from(1);
                }
            }
            if report.validated {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(Failure::Usage(e)) => {
            eprintln!("guest-stream: error: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("guest-stream: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Why a run did not happen.
#[derive(Debug)]
enum Failure {
    Usage(String),
    Runtime(String),
}

/// Plans the threads from the command line and the topology, then runs them.
fn run(cli: &Cli) -> Result<Report, Failure> {
    if !(2..=MAX_PASSES).contains(&cli.passes) {
        return Err(Failure::Usage(format!(
            "--passes {} is outside 2..={MAX_PASSES}",
            cli.passes
        )));
    }
    let topo = HostTopology::current().map_err(|e| Failure::Runtime(e.to_string()))?;
    let cpus: Vec<u32> = match &cli.cpus {
        None => topo.cpus.iter().map(|c| c.id).collect(),
        Some(list) => {
            let wanted = numa::parse_cpu_list(list).map_err(|e| Failure::Usage(e.to_string()))?;
            if let Some(bad) = wanted.iter().find(|&&c| topo.cpu(c).is_none()) {
                return Err(Failure::Usage(format!(
                    "CPU {bad} is not online or not allowed for this process"
                )));
            }
            wanted
        }
    };
    if cpus.is_empty() || cpus.len() > MAX_VCPUS as usize {
        return Err(Failure::Usage(format!(
            "{} CPUs: need 1..={MAX_VCPUS}",
            cpus.len()
        )));
    }
    let array_bytes = match &cli.array_size {
        Some(s) => numa::parse_size(s).map_err(|e| Failure::Usage(e.to_string()))?,
        None => (4 * topo.llc_bytes)
            .div_ceil(cpus.len() as u64)
            .max(MIN_ARRAY_BYTES),
    };
    let elements = Arrays::elements_for(3 * array_bytes);
    if elements == 0 {
        return Err(Failure::Usage(format!(
            "--array-size {array_bytes} holds no 64-byte line"
        )));
    }
    let placed: Vec<(u32, u32)> = cpus
        .iter()
        .map(|&c| (c, topo.cpu(c).map_or(0, |h| h.node)))
        .collect();
    let tsc_khz = calibrate_tsc_khz();
    Ok(stream(&placed, elements, cli.passes, tsc_khz))
}

/// TSC ticks per millisecond, measured over [`CALIBRATION`] of CLOCK_MONOTONIC (`Instant`).
/// Under TCG or nested virtualisation the rate in /proc/cpuinfo can be far from what `rdtsc`
/// really counts; measuring covers both.
fn calibrate_tsc_khz() -> u32 {
    let (t0, c0) = (Instant::now(), rdtsc());
    while t0.elapsed() < CALIBRATION {
        std::hint::spin_loop();
    }
    let (ns, ticks) = (t0.elapsed().as_nanos(), rdtsc().wrapping_sub(c0));
    u32::try_from(u128::from(ticks) * 1_000_000 / ns.max(1)).unwrap_or(u32::MAX)
}

/// Runs the kernels on one pinned thread per `(cpu, node)`, `elements` per array each.
fn stream(placed: &[(u32, u32)], elements: usize, passes: u32, tsc_khz: u32) -> Report {
    let barrier = SpinBarrier::new();
    barrier.set_parties(placed.len() as u32);
    let timings: Box<TimingTable<GUEST_TIMING_SLOTS>> = Box::default();
    let spin = std::hint::spin_loop;
    let outcomes: Vec<bool> = std::thread::scope(|s| {
        let jobs: Vec<_> = placed
            .iter()
            .enumerate()
            .map(|(t, &(cpu, _))| {
                let (barrier, timings) = (&barrier, &*timings);
                s.spawn(move || {
                    let run = Run {
                        passes,
                        barrier,
                        timings,
                        clock: rdtsc,
                        relax: &spin,
                    };
                    if numa::set_thread_affinity(&[cpu]).is_err() {
                        eprintln!("guest-stream: cannot pin a thread to CPU {cpu}");
                    }
                    // Allocated here, after pinning, and first written by `run_thread` (init):
                    // the pages come from this CPU's node. glibc's malloc aligns to 16 bytes on
                    // x86_64, as the kernels need; `split` checks it.
                    let mut mem = vec![0.0f64; 3 * elements];
                    match Arrays::split(&mut mem, elements) {
                        Some(mut arrays) => run.run_thread(t as u32, &mut arrays),
                        None => {
                            eprintln!("guest-stream: arrays of CPU {cpu} are misaligned");
                            // Keep the other threads' barrier count right.
                            run.barrier.wait(&spin);
                            false
                        }
                    }
                })
            })
            .collect();
        jobs.into_iter()
            .map(|j| j.join().unwrap_or(false))
            .collect()
    });
    let run = Run {
        passes,
        barrier: &barrier,
        timings: &*timings,
        clock: rdtsc,
        relax: &spin,
    };
    let node_of: Vec<u32> = placed.iter().map(|&(_, n)| n).collect();
    let per_thread = vec![elements as u64; placed.len()];
    let mut summary = StreamSummary::default();
    let count = run.groups(
        &node_of,
        &per_thread,
        tsc_khz,
        &mut summary.groups[..=MAX_LOCALITIES],
    );
    let cpus_of = |node: Option<u32>| -> Vec<u32> {
        placed
            .iter()
            .filter(|&&(_, n)| node.is_none_or(|want| want == n))
            .map(|&(c, _)| c)
            .collect()
    };
    let group = |g: &GroupStream| {
        let node = (g.node != TOTAL_GROUP).then_some(g.node);
        GroupOut {
            node,
            cpus: cpus_of(node),
            kernels: kernels(&g.kernels),
        }
    };
    let groups = &summary.groups[..count];
    let mut per_node: Vec<GroupOut> = groups
        .iter()
        .filter(|g| g.node != TOTAL_GROUP)
        .map(group)
        .collect();
    per_node.sort_by_key(|g| g.node);
    let total = groups
        .iter()
        .find(|g| g.node == TOTAL_GROUP)
        .map(group)
        .unwrap_or_else(|| group(&GroupStream::default()));
    Report {
        passes,
        tsc_khz,
        validated: outcomes.iter().all(|&v| v),
        array_bytes_per_thread: elements as u64 * 8,
        total,
        per_node,
        threads: placed
            .iter()
            .zip(&outcomes)
            .map(|(&(cpu, node), &validated)| ThreadOut {
                cpu,
                node,
                elements: elements as u64,
                validated,
            })
            .collect(),
    }
}

fn kernels(k: &[KernelResult; 4]) -> BTreeMap<&'static str, KernelOut> {
    vmm_guest::abi::KERNELS
        .iter()
        .zip(k)
        .map(|(&name, r)| {
            let out = KernelOut {
                mb_s: r.mb_s(),
                bytes: r.bytes,
                min_ns: r.min_ns,
                avg_ns: r.avg_ns,
                max_ns: r.max_ns,
            };
            (name, out)
        })
        .collect()
}

/// STREAM's text output: the header, a table for all threads and one per node, the verdict.
fn table(r: &Report) -> String {
    let line = "-------------------------------------------------------------\n";
    let mut out = String::from(line);
    out += "STREAM (vmm guest-stream: the built-in guest's kernels)\n";
    out += &format!(
        "Threads: {} (one per CPU, pinned), nodes: {}\n",
        r.threads.len(),
        r.per_node.len()
    );
    out += &format!(
        "Array size = {} elements per thread, {:.1} MiB per array\n",
        r.array_bytes_per_thread / 8,
        r.array_bytes_per_thread as f64 / f64::from(1 << 20)
    );
    out += &format!(
        "Each kernel was executed {} times; the best time excludes the first.\n",
        r.passes
    );
    out += &format!("TSC rate: {} kHz (calibrated)\n", r.tsc_khz);
    let mut section = |title: String, g: &GroupOut| {
        out += line;
        out += &title;
        out += "Function    Best Rate MB/s  Avg time     Min time     Max time\n";
        for name in vmm_guest::abi::KERNELS {
            let k = &g.kernels[name];
            let mut label = format!("{name}:");
            label[..1].make_ascii_uppercase();
            out += &format!(
                "{label:<12}{:>11.1}  {:>11.6}  {:>11.6}  {:>11.6}\n",
                k.mb_s,
                k.avg_ns as f64 * 1e-9,
                k.min_ns as f64 * 1e-9,
                k.max_ns as f64 * 1e-9
            );
        }
    };
    section(
        format!(
            "All threads (CPUs {})\n",
            numa::format_cpu_list(&r.total.cpus)
        ),
        &r.total,
    );
    for g in &r.per_node {
        section(
            format!(
                "Node {} (CPUs {})\n",
                g.node.unwrap_or(0),
                numa::format_cpu_list(&g.cpus)
            ),
            g,
        );
    }
    out += line;
    if r.validated {
        out += "Solution Validates: avg error less than 1.000000e-13 on all three arrays\n";
    } else {
        for t in r.threads.iter().filter(|t| !t.validated) {
            out += &format!("Failed Validation on CPU {} (node {})\n", t.cpu, t.node);
        }
    }
    out += line;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cpu_runs_validates_and_is_counted_per_node() {
        let topo = HostTopology::current().unwrap();
        // Pretend the CPUs alternate between two nodes, so the per-node grouping is exercised
        // on a one-node host too.
        let placed: Vec<(u32, u32)> = topo.cpus.iter().map(|c| (c.id, c.id % 2)).collect();
        let r = stream(&placed, 8 * 1024, 4, calibrate_tsc_khz());
        assert!(r.validated);
        assert!(r.tsc_khz > 0);
        assert_eq!(r.threads.len(), placed.len());
        assert_eq!(r.per_node.len(), if placed.len() > 1 { 2 } else { 1 });
        assert_eq!(r.total.cpus.len(), placed.len());
        for k in r.total.kernels.values() {
            assert!(
                k.mb_s > 0.0 && k.min_ns <= k.avg_ns && k.avg_ns <= k.max_ns,
                "{k:?}"
            );
        }
        let copy = r.total.kernels["copy"];
        assert_eq!(copy.bytes, 16 * 8 * 1024 * placed.len() as u64);
        let text = table(&r);
        assert!(text.contains("Solution Validates"), "{text}");
        assert!(text.contains("Node 0 (CPUs"), "{text}");
        assert!(text.contains("Triad:"), "{text}");
    }

    #[test]
    fn usage_errors_are_refused_before_running() {
        let cli = |passes, size: &str, cpus: &str| Cli {
            passes,
            array_size: Some(size.into()),
            cpus: Some(cpus.into()),
        };
        let usage = |c: &Cli| matches!(run(c), Err(Failure::Usage(_)));
        assert!(usage(&cli(1, "1M", "0")));
        assert!(usage(&cli(65, "1M", "0")));
        assert!(usage(&cli(3, "1M", "4000")));
        assert!(usage(&cli(3, "1M", "0-")));
        assert!(usage(&cli(3, "8", "0")));
        assert!(usage(&cli(3, "lots", "0")));
    }
}
