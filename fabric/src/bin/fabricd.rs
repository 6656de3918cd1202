//! `fabricd`: the fabric host daemon (control verbs, VMs, monitoring agent, optional aggregator).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

use fabric::config::FileConfig;
use fabric::daemon::Daemon;
use fabric::endpoint::Config;
use fabric::monitor::{Agent, AggConfig, Aggregator};
use fabric::node::Node;
use fabric::payload::Role;
use fabric::vm::VmManager;

/// Runs on each host: answers control requests from the segment over EtherType 0x88B5
/// (host info, VM create/destroy/list/status, starting and stopping `vmm` processes),
/// sends monitoring reports on 0x88B6 and, with --aggregator, stores everyone's reports
/// in RRD files through rrdcached and serves them to Prometheus.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Network interface to use (e.g. eth1).
    #[arg(long)]
    iface: Option<String>,
    /// This host's name on the fabric (default: the hostname).
    #[arg(long)]
    name: Option<String>,
    /// Key file (make one with `fabric keygen`); reloaded when it changes.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// JSON config file; flags take precedence.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Link tolerance T in ms: probe a silent peer after T/4, declare it down after T (≥ 50).
    #[arg(long)]
    link_tolerance_ms: Option<u64>,
    /// The vmm binary started for `vm create`.
    #[arg(long)]
    vmm_bin: Option<PathBuf>,
    /// Directory for the VMs' vmm logs.
    #[arg(long)]
    vm_log_dir: Option<PathBuf>,
    /// Monitoring report interval in seconds (0: no agent). Default 10.
    #[arg(long)]
    monitor_interval_secs: Option<u64>,
    /// Send monitoring reports to this MAC only (default: broadcast).
    #[arg(long)]
    monitor_to: Option<String>,
    /// Also aggregate monitoring reports into RRD files.
    #[arg(long)]
    aggregator: bool,
    /// RRD directory (aggregator). Default /var/lib/fabric/rrd.
    #[arg(long)]
    rrd_dir: Option<PathBuf>,
    /// rrdcached UNIX socket (aggregator). Default /var/run/rrdcached.sock.
    #[arg(long)]
    rrdcached: Option<PathBuf>,
    /// RRD step in seconds (aggregator); match the agents' interval. Default 10.
    #[arg(long)]
    step_secs: Option<u64>,
    /// Prometheus endpoint address (aggregator). Default 127.0.0.1:9477.
    #[arg(long)]
    prometheus: Option<String>,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("fabricd: {e:#}");
        std::process::exit(1);
    }
}

fn run(a: Args) -> Result<()> {
    let f = FileConfig::load(a.config.as_deref())?;
    let Some(iface) = a.iface.or(f.iface) else {
        bail!("no interface: give --iface IFACE (or \"iface\" in the config file)");
    };
    let Some(key_file) = a.key_file.or(f.key_file) else {
        bail!("no key file: give --key-file FILE (make one with `fabric keygen > FILE`)");
    };
    let name = match a.name.or(f.name) {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("no --name and no hostname")?
            .trim()
            .to_string(),
    };
    let tol = a.link_tolerance_ms.or(f.link_tolerance_ms).unwrap_or(1000);
    if tol < 50 {
        bail!("--link-tolerance-ms must be at least 50");
    }
    let mut cfg = Config::new(&name, Role::Host);
    cfg.link_tolerance_us = tol * 1000;
    let node = Node::open(&iface, &key_file, cfg)?;
    let vmm = a
        .vmm_bin
        .or(f.vmm_bin)
        .unwrap_or_else(|| PathBuf::from("vmm"));
    let logs = a
        .vm_log_dir
        .or(f.vm_log_dir)
        .unwrap_or_else(|| PathBuf::from("/var/log/fabric"));
    let mut d = Daemon::new(node, &name, VmManager::new(&vmm, &logs));
    let interval = a
        .monitor_interval_secs
        .or(f.monitor_interval_secs)
        .unwrap_or(10);
    if interval > 0 {
        let to = match a.monitor_to.or(f.monitor_to) {
            Some(m) => Some(fabric::frame::parse_mac(&m).context("--monitor-to: not a MAC")?),
            None => None,
        };
        d = d.with_agent(Agent::new(&name, Duration::from_secs(interval), to));
    }
    if a.aggregator || f.aggregator == Some(true) {
        let prom: SocketAddr = a
            .prometheus
            .or(f.prometheus)
            .unwrap_or_else(|| "127.0.0.1:9477".into())
            .parse()
            .context("--prometheus: not an address")?;
        let agg = Aggregator::new(AggConfig {
            rrd_dir: a
                .rrd_dir
                .or(f.rrd_dir)
                .unwrap_or_else(|| PathBuf::from("/var/lib/fabric/rrd")),
            rrdcached: a
                .rrdcached
                .or(f.rrdcached)
                .unwrap_or_else(|| PathBuf::from("/var/run/rrdcached.sock")),
            step: a.step_secs.or(f.step_secs).unwrap_or(10).max(1),
            prometheus: Some(prom),
        })?;
        if let Some(addr) = agg.prometheus_addr() {
            log::info!("aggregator: Prometheus metrics on http://{addr}/metrics");
        }
        d = d.with_aggregator(agg);
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    log::info!("fabricd {name} running on {iface}");
    d.run(stop)?;
    log::info!("fabricd {name} stopping");
    Ok(())
}
