//! `fabric`: the controller CLI. Addresses any host on the segment by name or MAC.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::Value;

use fabric::auth::KeyFile;
use fabric::client::Client;
use fabric::config::FileConfig;
use fabric::control::Verb;
use fabric::endpoint::Config;
use fabric::node::Node;
use fabric::payload::Role;
use fabric::vm::VmSpec;

/// Controls and queries fabric hosts over raw Ethernet (EtherType 0x88B5): lists the hosts
/// on the segment, shows host information, creates and destroys VMs, queries monitoring
/// series from an aggregator. Exits 1 with the error on failure, 2 on bad usage.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Network interface on the fabric segment.
    #[arg(long, global = true)]
    iface: Option<String>,
    /// Key file shared with the hosts.
    #[arg(long, global = true)]
    key_file: Option<PathBuf>,
    /// JSON config file (keys "iface", "key_file", "link_tolerance_ms"); flags take precedence.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// How long to wait for a response, ms.
    #[arg(long, global = true, default_value_t = 5000)]
    timeout_ms: u64,
    /// How long to listen for hosts (discovery), ms.
    #[arg(long, global = true, default_value_t = 1000)]
    wait_ms: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Writes a new key file to stdout (`fabric keygen > key`); with --rotate FILE, prints FILE
    /// with a new epoch added (install it on every host; senders move to the new epoch).
    Keygen {
        /// Existing key file to extend with a new epoch.
        #[arg(long)]
        rotate: Option<PathBuf>,
    },
    /// Lists the hosts that answer on the segment.
    Hosts,
    /// Shows a host's CPUs, NUMA nodes, memory and load.
    Info {
        /// Host name or MAC.
        host: String,
    },
    /// Shows a host's fabric counters (frames, drops by reason, retransmissions, requests).
    Stats {
        /// Host name or MAC.
        host: String,
    },
    /// Sends echo requests and reports completion-time percentiles.
    Ping {
        /// Host name or MAC.
        host: String,
        /// Number of requests.
        #[arg(long, default_value_t = 100)]
        count: u64,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 1)]
        window: u64,
        /// Least time between two requests, ms (0: as fast as the window allows).
        #[arg(long, default_value_t = 0.0)]
        interval_ms: f64,
    },
    /// VM verbs.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Monitoring series held by an aggregator.
    #[command(subcommand)]
    Metrics(MetricsCmd),
}

#[derive(Subcommand, Debug)]
enum VmCmd {
    /// Starts a VM (the vmm's built-in guest unless --kernel is given).
    Create {
        /// Host name or MAC.
        host: String,
        /// VM name.
        #[arg(long)]
        name: String,
        /// Virtual CPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Memory, e.g. 512M.
        #[arg(long, default_value = "256M")]
        memory: String,
        /// Virtual NUMA nodes.
        #[arg(long, default_value_t = 1)]
        numa_nodes: u32,
        /// Pin vCPUs to host cores.
        #[arg(long)]
        pin: bool,
        /// Guest kernel.
        #[arg(long)]
        kernel: Option<String>,
        /// Initrd.
        #[arg(long)]
        initrd: Option<String>,
        /// Kernel command line.
        #[arg(long)]
        cmdline: Option<String>,
        /// STREAM passes of the built-in guest (the vmm's --passes: how long it runs).
        #[arg(long)]
        passes: Option<u32>,
        /// Disk (repeatable).
        #[arg(long)]
        disk: Vec<String>,
        /// Host-side network device of a guest interface, for monitoring (repeatable).
        #[arg(long)]
        vif: Vec<String>,
    },
    /// Stops a VM.
    Destroy {
        /// Host name or MAC.
        host: String,
        /// VM name.
        vm: String,
    },
    /// Pins a VM: its vCPU threads round-robin on CPUS, its other threads on all of CPUS.
    Pin {
        /// Host name or MAC.
        host: String,
        /// VM name.
        vm: String,
        /// Host CPUs, e.g. 0-3,8.
        #[arg(long)]
        cpus: String,
    },
    /// Lets a VM's threads run on every host CPU again.
    Unpin {
        /// Host name or MAC.
        host: String,
        /// VM name.
        vm: String,
    },
    /// Lists a host's VMs.
    List {
        /// Host name or MAC.
        host: String,
    },
    /// Shows one VM.
    Status {
        /// Host name or MAC.
        host: String,
        /// VM name.
        vm: String,
    },
}

#[derive(Subcommand, Debug)]
enum MetricsCmd {
    /// Lists the series an aggregator holds.
    List {
        /// Aggregator host name or MAC.
        aggregator: String,
    },
    /// Prints one series between two times.
    Query {
        /// Aggregator host name or MAC.
        aggregator: String,
        /// Reporting host.
        #[arg(long)]
        host: String,
        /// Object: host, pcpu-N, numa-N, pool-N, vm-NAME, mem-NAME, vcpu-NAME-N, vif-NAME-N, vbd-NAME-N.
        #[arg(long)]
        object: String,
        /// Consolidation function: AVERAGE, LAST or MAX.
        #[arg(long, default_value = "AVERAGE")]
        cf: String,
        /// Start: seconds since the epoch, or negative seconds from now.
        #[arg(long, allow_hyphen_values = true, default_value = "-300")]
        start: i64,
        /// End: seconds since the epoch, or 0/negative seconds from now.
        #[arg(long, allow_hyphen_values = true, default_value = "0")]
        end: i64,
    },
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("fabric: {e:#}");
        std::process::exit(1);
    }
}

fn abs_time(t: i64) -> u64 {
    if t <= 0 {
        fabric::monitor::unix_now().saturating_sub(t.unsigned_abs())
    } else {
        t.unsigned_abs()
    }
}

fn print(json: bool, v: &Value, table: impl FnOnce(&Value) -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        print!("{}", table(v));
    }
    Ok(())
}

fn s(v: &Value, k: &str) -> String {
    match &v[k] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn gib(v: &Value, k: &str) -> String {
    format!(
        "{:.1} GiB",
        v[k].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64
    )
}

fn run(a: Args) -> Result<()> {
    if let Cmd::Keygen { rotate } = &a.cmd {
        let kf = match rotate {
            Some(p) => {
                let mut kf = KeyFile::load(p)?;
                kf.rotate()?;
                kf
            }
            None => KeyFile::generate()?,
        };
        print!("{}", kf.to_text());
        return Ok(());
    }
    let f = FileConfig::load(a.config.as_deref())?;
    let Some(iface) = a.iface.or(f.iface) else {
        bail!("no interface: give --iface IFACE (or \"iface\" in the config file)");
    };
    let Some(key_file) = a.key_file.or(f.key_file) else {
        bail!("no key file: give --key-file FILE (make one with `fabric keygen > FILE`)");
    };
    let mut cfg = Config::new(&format!("ctl-{}", std::process::id()), Role::Controller);
    cfg.link_tolerance_us = f.link_tolerance_ms.unwrap_or(1000).max(50) * 1000;
    let mut c = Client::new(Node::open(&iface, &key_file, cfg)?);
    let wait = Duration::from_millis(a.wait_ms);
    let timeout = Duration::from_millis(a.timeout_ms);
    let json = a.json;
    let req = |c: &mut Client, host: &str, verb: Verb| -> Result<Value> {
        let p = c.resolve(host, wait.max(timeout))?;
        c.request(&p, verb, timeout)
            .with_context(|| host.to_string())
    };
    match a.cmd {
        Cmd::Keygen { .. } => unreachable!("handled above"),
        Cmd::Hosts => {
            let hosts = c.hosts(wait)?;
            let v = serde_json::to_value(&hosts)?;
            print(json, &v, |v| {
                let mut out = format!("{:<20} {:<18} {:>8}\n", "NAME", "MAC", "ID");
                for h in v.as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "{:<20} {:<18} {:>8x}\n",
                        s(h, "name"),
                        s(h, "mac"),
                        h["id"].as_u64().unwrap_or(0)
                    ));
                }
                out
            })?;
            if hosts.is_empty() {
                bail!("no host answered on {iface} within {} ms", a.wait_ms);
            }
        }
        Cmd::Info { host } => {
            let v = req(&mut c, &host, Verb::Info)?;
            print(json, &v, |v| {
                let mut out = format!(
                    "host {}  kernel {}\ncpus {}  memory {} total, {} free, {} available\nload {}  uptime {:.0} s\n",
                    s(v, "name"),
                    s(v, "kernel"),
                    v["cpus"].as_array().map_or(0, |a| a.len()),
                    gib(v, "mem_total"),
                    gib(v, "mem_free"),
                    gib(v, "mem_available"),
                    v["load"],
                    v["uptime"].as_f64().unwrap_or(0.0)
                );
                for n in v["numa_nodes"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "numa node {}: cpus {}  memory {} total, {} free\n",
                        n["id"],
                        n["cpus"],
                        gib(n, "mem_total"),
                        gib(n, "mem_free")
                    ));
                }
                out
            })?;
        }
        Cmd::Stats { host } => {
            let v = req(&mut c, &host, Verb::Stats)?;
            print(json, &v, |v| {
                format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default())
            })?;
        }
        Cmd::Ping {
            host,
            count,
            window,
            interval_ms,
        } => {
            let p = c.resolve(&host, wait.max(timeout))?;
            let interval = Duration::from_secs_f64(interval_ms.max(0.0) / 1000.0);
            let r = c.ping(&p, count, window, interval, timeout)?;
            let v = serde_json::to_value(&r)?;
            print(json, &v, |_| {
                format!(
                    "{} requests to {} ({} in flight): {} completed, {} failed in {:.2} s\np50 {} µs  p90 {} µs  p99 {} µs  max {} µs\n",
                    count, r.host, r.window, r.completed, r.failed, r.seconds, r.p50_us, r.p90_us, r.p99_us, r.max_us
                )
            })?;
            if r.failed > 0 {
                bail!("{} of {count} requests failed", r.failed);
            }
        }
        Cmd::Vm(vm) => match vm {
            VmCmd::Create {
                host,
                name,
                vcpus,
                memory,
                numa_nodes,
                pin,
                kernel,
                initrd,
                cmdline,
                passes,
                disk,
                vif,
            } => {
                let spec = VmSpec {
                    name,
                    vcpus,
                    memory,
                    numa_nodes,
                    pin,
                    kernel,
                    initrd,
                    cmdline,
                    passes,
                    disks: disk,
                    vifs: vif,
                };
                spec.validate()?;
                let v = req(&mut c, &host, Verb::VmCreate(spec))?;
                print(json, &v, vm_table)?;
            }
            VmCmd::Destroy { host, vm } => {
                let v = req(&mut c, &host, Verb::VmDestroy { name: vm })?;
                print(json, &v, vm_table)?;
            }
            VmCmd::Pin { host, vm, cpus } => {
                let cpus = fabric::hostinfo::parse_cpulist(&cpus)
                    .filter(|c| !c.is_empty())
                    .context("--cpus: expected a CPU list such as 0-3,8")?;
                let v = req(&mut c, &host, Verb::VmPin { name: vm, cpus })?;
                print(json, &v, pin_table)?;
            }
            VmCmd::Unpin { host, vm } => {
                let v = req(&mut c, &host, Verb::VmUnpin { name: vm })?;
                print(json, &v, pin_table)?;
            }
            VmCmd::List { host } => {
                let v = req(&mut c, &host, Verb::VmList)?;
                print(json, &v, vm_table)?;
            }
            VmCmd::Status { host, vm } => {
                let v = req(&mut c, &host, Verb::VmStatus { name: vm })?;
                print(json, &v, vm_table)?;
            }
        },
        Cmd::Metrics(m) => match m {
            MetricsCmd::List { aggregator } => {
                let v = req(&mut c, &aggregator, Verb::MetricList)?;
                print(json, &v, |v| {
                    let mut out = format!("{:<20} {:<24} {}\n", "HOST", "OBJECT", "LAST UPDATE");
                    for r in v.as_array().into_iter().flatten() {
                        out.push_str(&format!("{:<20} {:<24} {}\n", s(&r[0], ""), r[1], r[2]));
                    }
                    out
                })?;
            }
            MetricsCmd::Query {
                aggregator,
                host,
                object,
                cf,
                start,
                end,
            } => {
                let verb = Verb::MetricQuery {
                    host,
                    object,
                    cf,
                    start: abs_time(start),
                    end: abs_time(end),
                };
                let v = req(&mut c, &aggregator, verb)?;
                print(json, &v, |v| {
                    let mut out = format!("{:<12}", "TIME");
                    for d in v["ds"].as_array().into_iter().flatten() {
                        out.push_str(&format!(" {:>16}", d.as_str().unwrap_or("")));
                    }
                    out.push('\n');
                    for r in v["rows"].as_array().into_iter().flatten() {
                        out.push_str(&format!("{:<12}", r[0]));
                        for x in r[1].as_array().into_iter().flatten() {
                            out.push_str(&format!(" {:>16}", x));
                        }
                        out.push('\n');
                    }
                    out
                })?;
            }
        },
    }
    Ok(())
}

fn pin_table(v: &Value) -> String {
    let mut out = format!("{:<24} {}\n", "THREAD", "CPUS");
    for (k, cpus) in v.as_object().into_iter().flatten() {
        out.push_str(&format!("{k:<24} {cpus}\n"));
    }
    out
}

fn vm_table(v: &Value) -> String {
    let rows: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        other => vec![other],
    };
    let mut out = format!(
        "{:<16} {:<8} {:>8} {:>6} {:>8} {:>8}  {}\n",
        "NAME", "STATE", "PID", "VCPUS", "MEMORY", "UPTIME", "UUID"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<16} {:<8} {:>8} {:>6} {:>8} {:>7}s  {}\n",
            s(r, "name"),
            s(r, "state"),
            s(r, "pid"),
            s(&r["spec"], "vcpus"),
            s(&r["spec"], "memory"),
            s(r, "uptime_secs"),
            s(r, "uuid")
        ));
    }
    out
}
