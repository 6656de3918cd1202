//! `fabric-impair`: forwards frames between two interfaces with loss, duplication, delay and
//! jitter (reordering), for testing on kernels without `netem`.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Result;
use clap::Parser;

use fabric::impair::{self, AttackConfig, ImpairConfig};

/// Forwards every frame arriving on --a to --b and back, impaired. Put it in a namespace
/// between two veth pairs. Runs until SIGTERM/SIGINT, then prints what it did as JSON.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// First interface.
    #[arg(long)]
    a: String,
    /// Second interface.
    #[arg(long)]
    b: String,
    /// Percent of frames dropped (each direction).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Percent of frames duplicated.
    #[arg(long, default_value_t = 0.0)]
    dup: f64,
    /// One-way delay, ms.
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Random extra delay in [0, jitter), ms; reorders frames.
    #[arg(long, default_value_t = 0.0)]
    jitter_ms: f64,
    /// Percent of fabric frames also sent with one bit flipped (forged).
    #[arg(long, default_value_t = 0.0)]
    corrupt: f64,
    /// Percent of fabric frames also sent truncated.
    #[arg(long, default_value_t = 0.0)]
    truncate: f64,
    /// Percent of fabric frames followed by a frame of random bytes.
    #[arg(long, default_value_t = 0.0)]
    garbage: f64,
    /// Percent of fabric frames followed by a replay of an older frame.
    #[arg(long, default_value_t = 0.0)]
    replay: f64,
    /// Percent of fabric frames also sent claiming the next protocol version.
    #[arg(long, default_value_t = 0.0)]
    bad_version: f64,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("fabric-impair: {e:#}");
        std::process::exit(1);
    }
}

fn run(a: Args) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    let cfg = ImpairConfig {
        loss_pct: a.loss,
        dup_pct: a.dup,
        delay_us: (a.delay_ms * 1000.0) as u64,
        jitter_us: (a.jitter_ms * 1000.0) as u64,
        seed: a.seed,
        attack: AttackConfig {
            corrupt_pct: a.corrupt,
            truncate_pct: a.truncate,
            garbage_pct: a.garbage,
            replay_pct: a.replay,
            version_pct: a.bad_version,
        },
    };
    let st = impair::run(&a.a, &a.b, cfg, &stop)?;
    println!("{}", serde_json::to_string(&st)?);
    Ok(())
}
