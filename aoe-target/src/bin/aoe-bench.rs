//! `aoe-bench`: an AoE load generator over the initiator core.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use aoe_target::config::parse_size;
use aoe_target::initiator::{Request, Session};
use clap::{Parser, ValueEnum};

/// Load an AoE target: random or sequential reads or writes of a block size at a queue depth
/// for a duration; prints IOPS, MB/s and latency percentiles (--json for machines).
///
///   aoe-bench --iface eth0 --shelf 7 --slot 1 --rw randread --bs 4K --qd 32 --duration 10
///
/// Each block I/O is split into frames of the target's sectors per frame; the window of
/// frames in flight follows the target's buffer count (slow start, collapse on loss).
#[derive(Parser, Debug)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// Interface towards the target.
    #[arg(long)]
    iface: String,
    /// Shelf.
    #[arg(long)]
    shelf: u16,
    /// Slot.
    #[arg(long)]
    slot: u8,
    /// Access pattern.
    #[arg(long, value_enum, default_value = "randread")]
    rw: Pattern,
    /// Block size of one I/O (multiple of 512).
    #[arg(long, default_value = "4K")]
    bs: String,
    /// Block I/Os in flight.
    #[arg(long, default_value_t = 1)]
    qd: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of warm-up not counted.
    #[arg(long, default_value_t = 1.0)]
    ramp: f64,
    /// Bytes of the disk to use from its start (default: all of it).
    #[arg(long)]
    span: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Pattern {
    Randread,
    Randwrite,
    Read,
    Write,
}

struct Io {
    started: Instant,
    frames_left: usize,
}

/// xorshift64: enough for picking offsets, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p / 100.0).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn run(a: &Args) -> anyhow::Result<serde_json::Value> {
    let bs = parse_size(&a.bs)?;
    anyhow::ensure!(a.qd >= 1, "--qd must be at least 1");
    let mut s = Session::open(&a.iface, a.shelf, a.slot, Duration::from_secs(3))?;
    s.set_op_timeout(Duration::from_secs(10));
    let sectors_per_io = bs / 512;
    let span_sectors = match &a.span {
        Some(sp) => (parse_size(sp)? / 512).min(s.sectors()),
        None => s.sectors(),
    };
    let slots = span_sectors / sectors_per_io;
    anyhow::ensure!(slots > 0, "block size larger than the disk");
    let max = u64::from(s.target().max_sectors);
    let write = matches!(a.rw, Pattern::Randwrite | Pattern::Write);
    let random = matches!(a.rw, Pattern::Randread | Pattern::Randwrite);
    let payload: Vec<u8> = (0..bs).map(|i| (i % 251) as u8).collect();
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut seq = 0u64;
    let mut ios: Vec<Option<Io>> = (0..a.qd).map(|_| None).collect();
    let mut lat_us: Vec<u32> = Vec::new();
    let mut done_ios = 0u64;
    let mut errors = 0u64;
    let start = Instant::now();
    let ramp_end = start + Duration::from_secs_f64(a.ramp);
    let end = ramp_end + Duration::from_secs_f64(a.duration);
    let mut measure_start = None;
    loop {
        let now = Instant::now();
        if now >= ramp_end && measure_start.is_none() {
            measure_start = Some(now);
            lat_us.clear();
            done_ios = 0;
        }
        let running = now < end;
        for (slot, io) in ios.iter_mut().enumerate() {
            if io.is_some() || !running {
                continue;
            }
            let block = if random {
                rng.next() % slots
            } else {
                seq % slots
            };
            seq += 1;
            let lba = block * sectors_per_io;
            let mut frames = 0;
            let mut off = 0u64;
            while off < sectors_per_io {
                let n = max.min(sectors_per_io - off);
                let user = slot as u64;
                let req = if write {
                    let from = (off * 512) as usize;
                    Request::Write {
                        lba: lba + off,
                        data: payload[from..from + (n * 512) as usize].to_vec(),
                    }
                } else {
                    Request::Read {
                        lba: lba + off,
                        count: n as u8,
                    }
                };
                s.submit(user, &req)?;
                frames += 1;
                off += n;
            }
            *io = Some(Io {
                started: now,
                frames_left: frames,
            });
        }
        if !running && s.pending() == 0 {
            break;
        }
        for (user, res) in s.poll(Duration::from_millis(5))? {
            if res.is_err() {
                errors += 1;
            }
            let Some(slot) = ios.get_mut(usize::try_from(user).unwrap_or(usize::MAX)) else {
                continue;
            };
            if let Some(io) = slot {
                io.frames_left -= 1;
                if io.frames_left == 0 {
                    let us = io.started.elapsed().as_micros();
                    if Instant::now() <= end {
                        lat_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                        done_ios += 1;
                    }
                    *slot = None;
                }
            }
        }
    }
    let secs = end
        .saturating_duration_since(measure_start.unwrap_or(start))
        .as_secs_f64();
    lat_us.sort_unstable();
    let iops = done_ios as f64 / secs;
    Ok(serde_json::json!({
        "target": format!("e{}.{}", a.shelf, a.slot),
        "rw": format!("{:?}", a.rw).to_lowercase(),
        "bs": bs,
        "qd": a.qd,
        "seconds": secs,
        "ios": done_ios,
        "iops": iops,
        "mb_s": iops * bs as f64 / 1e6,
        "lat_us": {
            "mean": if lat_us.is_empty() { 0.0 } else { lat_us.iter().map(|x| f64::from(*x)).sum::<f64>() / lat_us.len() as f64 },
            "p50": percentile(&lat_us, 50.0),
            "p90": percentile(&lat_us, 90.0),
            "p99": percentile(&lat_us, 99.0),
            "p99_9": percentile(&lat_us, 99.9),
            "max": lat_us.last().copied().unwrap_or(0),
        },
        "errors": errors,
        "sectors_per_frame": max,
        "window": s.window().size(),
        "session": s.stats(),
    }))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    match run(&args) {
        Ok(v) => {
            if args.json {
                println!("{v}");
            } else {
                let l = &v["lat_us"];
                println!(
                    "{} {} bs={} qd={}: {:.0} IOPS, {:.1} MB/s, latency us p50 {} p90 {} p99 {} p99.9 {} max {}, errors {}, retransmits {}",
                    v["target"].as_str().unwrap_or(""),
                    v["rw"].as_str().unwrap_or(""),
                    v["bs"],
                    v["qd"],
                    v["iops"].as_f64().unwrap_or(0.0),
                    v["mb_s"].as_f64().unwrap_or(0.0),
                    l["p50"], l["p90"], l["p99"], l["p99_9"], l["max"],
                    v["errors"],
                    v["session"]["retransmits"],
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("aoe-bench: {e:#}");
            ExitCode::from(1)
        }
    }
}
