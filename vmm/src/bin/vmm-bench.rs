//! `vmm-bench`: the performance figures of the vmm + numa issue, in one run.
//!
//! Runs the `vmm` binary next to it REPS times pinned and REPS times unpinned, alternating, each
//! with `--compare-host --json`, and prints medians and ranges of: guest STREAM, host STREAM with
//! the same placement over the same memory, their ratio, pinned/unpinned, the time from `vmm`
//! start to the guest's first output with the prefault time on its own, and the VMM's resident
//! memory beyond guest RAM. Extra arguments go to every `vmm` run (e.g. `--numa-nodes 2`).

use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use serde_json::Value;

const KERNELS: [&str; 4] = ["copy", "scale", "add", "triad"];

fn run(vmm: &std::path::Path, args: &[String], pin: bool) -> Result<Value> {
    let mut cmd = Command::new(vmm);
    cmd.args(args).args(["--compare-host", "--json"]);
    if pin {
        cmd.arg("--pin");
    }
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", vmm.display()))?;
    let j: Value = serde_json::from_slice(&out.stdout).context("vmm printed no JSON")?;
    if !out.status.success() {
        bail!(
            "vmm {args:?} (pin {pin}) failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(j)
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let med = if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    };
    (
        med,
        *v.first().unwrap_or(&f64::NAN),
        *v.last().unwrap_or(&f64::NAN),
    )
}

fn field(runs: &[Value], f: impl Fn(&Value) -> Option<f64>) -> Vec<f64> {
    runs.iter().filter_map(f).collect()
}

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm-bench: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn bench() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: vmm-bench [--reps N] [VMM ARGS...]   (default: --reps 5 --numa-nodes 2)");
        return Ok(());
    }
    let mut reps = 5usize;
    if let Some(i) = args.iter().position(|a| a == "--reps") {
        reps = args
            .get(i + 1)
            .context("--reps needs a number")?
            .parse()
            .context("--reps")?;
        args.drain(i..i + 2);
    }
    if !args.iter().any(|a| a == "--numa-nodes" || a == "--vnode") {
        args.extend(["--numa-nodes".into(), "2".into()]);
    }
    let vmm = std::env::current_exe()?.with_file_name("vmm");
    let (mut pinned, mut unpinned) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        eprintln!("vmm-bench: repetition {}/{reps}", rep + 1);
        pinned.push(run(&vmm, &args, true)?);
        unpinned.push(run(&vmm, &args, false)?);
    }
    let first = &pinned[0];
    println!(
        "vmm-bench: {reps} repetitions of `vmm {} [--pin] --compare-host`",
        args.join(" ")
    );
    println!(
        "layout: {} vnodes, {} vCPUs; arrays 3 x {:.1} MiB (host LLC {:.0} MiB)",
        first["layout"]["vnodes"].as_array().map_or(0, Vec::len),
        first["vcpu_threads"].as_array().map_or(0, Vec::len),
        first["stream"]["array_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        first["host_llc_bytes"].as_f64().unwrap_or(0.0) / 1048576.0
    );
    println!(
        "{:<7} {:>24} {:>24} {:>22} {:>22}",
        "kernel", "guest pinned MB/s", "host pinned MB/s", "guest/host pinned", "pinned/unpinned"
    );
    for k in KERNELS {
        let g = stats(field(&pinned, |j| j["stream"][k]["mb_s"].as_f64()));
        let h = stats(field(&pinned, |j| j["host_stream"][k]["mb_s"].as_f64()));
        let r = stats(field(&pinned, |j| j["ratio"][k].as_f64()));
        let pu: Vec<f64> = pinned
            .iter()
            .zip(&unpinned)
            .filter_map(|(p, u)| {
                Some(p["stream"][k]["mb_s"].as_f64()? / u["stream"][k]["mb_s"].as_f64()?)
            })
            .collect();
        let pu = stats(pu);
        println!(
            "{k:<7} {:>10.0} [{:.0}-{:.0}] {:>10.0} [{:.0}-{:.0}] {:>8.3} [{:.3}-{:.3}] {:>8.3} [{:.3}-{:.3}]",
            g.0, g.1, g.2, h.0, h.1, h.2, r.0, r.1, r.2, pu.0, pu.1, pu.2
        );
    }
    let all: Vec<Value> = pinned.iter().chain(&unpinned).cloned().collect();
    let fo = stats(field(&all, |j| j["timing"]["first_output_ms"].as_f64()));
    let fl = stats(field(&all, |j| {
        j["timing"]["first_output_less_prefault_ms"].as_f64()
    }));
    let pf = stats(field(&all, |j| j["timing"]["prefault_ms"].as_f64()));
    let rss = stats(field(&all, |j| {
        j["vmm_overhead_bytes"].as_f64().map(|b| b / 1048576.0)
    }));
    println!(
        "first guest output: {:.1} ms after vmm start [{:.1}-{:.1}]",
        fo.0, fo.1, fo.2
    );
    println!(
        "  of which prefault: {:.1} ms [{:.1}-{:.1}]; without it: {:.1} ms [{:.1}-{:.1}]",
        pf.0, pf.1, pf.2, fl.0, fl.1, fl.2
    );
    println!(
        "VMM RSS beyond guest RAM: {:.2} MiB [{:.2}-{:.2}]",
        rss.0, rss.1, rss.2
    );
    Ok(())
}
