//! Monitoring (seed §2.4 "Monitoring system"/"Monitoring API", §2.6.1): an agent in `fabricd`
//! collects the §2.6.1 statistics every interval (default 10 s) and sends them on EtherType
//! 0x88B6; an aggregator receives them, drops duplicates and late samples (RRD refuses
//! non-increasing timestamps), writes real RRD files through rrdcached, answers queries for a
//! metric between two times, and serves the latest values in Prometheus text format.
//!
//! One RRD file per (host, object): `<dir>/<host>/<object>.rrd`, one data source per field.
//! Counters are DERIVE with min 0 (a VM reboot resets them: fabric-anchors §3.3), the rest GAUGE.
//! §2.6.1 items and where they are:
//!
//! | §2.6.1 | object | fields |
//! |---|---|---|
//! | 1 MicroVisor: pCPUs, pools, NUMA nodes, guests, total/free memory, load | `host` | `pcpus cpu_pools numa_nodes guests mem_total mem_free load` |
//! | 2 per pCPU: id, CPU time | `pcpu-N` | `cpu_time` (USER_HZ ticks) |
//! | 3 per NUMA node: id, total/free memory | `numa-N` | `mem_total mem_free` |
//! | 4 per CPU pool: id, load, CPUs, guests | `pool-N` | `load cpus guests` |
//! | 5 per guest: UUID | `vm-NAME` | `vcpus` (UUID as a label) |
//! | 6 per vCPU: id, utilisation % | `vcpu-NAME-N` | `util` (vmm threads named `vcpu*`) |
//! | 7 guest memory: used, max | `mem-NAME` | `mem_used mem_max` |
//! | 8 per VIF: rx/tx bytes, packets, errors, drops | `vif-NAME-N` | `rx_bytes rx_packets rx_errs rx_drop tx_bytes tx_packets tx_errs tx_drop` |
//! | 9 per VBD: type, device, outstanding, read/write requests and sectors | `vbd-NAME-N` | `oo_req rd_req wr_req rd_sect wr_sect` (type and device as labels) |
//!
//! Timestamps (items 1.1, 2.3, 6.2, 7.1, 8.2, 9.2) are the report's time, the RRD update time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::frame::{self, BROADCAST};
use crate::hostinfo;
use crate::node::Node;
use crate::rrd::{Fetched, RrdCached, RrdError};
use crate::vm::VmStatus;

/// Errors of this module.
#[derive(Debug, Error)]
pub enum MonitorError {
    /// No such series.
    #[error("no series {0}")]
    NoSeries(String),
    /// rrdcached failed.
    #[error(transparent)]
    Rrd(#[from] RrdError),
    /// The Prometheus port could not be opened.
    #[error("cannot listen on {0}")]
    Listen(SocketAddr, #[source] std::io::Error),
    /// The RRD directory could not be created.
    #[error("cannot create {0}")]
    Dir(String, #[source] std::io::Error),
}

/// What kind of object a sample describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjKind {
    /// The host (§2.6.1 item 1).
    Host,
    /// A physical CPU (item 2).
    Pcpu,
    /// A NUMA node (item 3).
    Numa,
    /// A CPU pool (item 4).
    Pool,
    /// A guest (item 5).
    Vm,
    /// A vCPU (item 6).
    Vcpu,
    /// Guest memory (item 7).
    Mem,
    /// A virtual interface (item 8).
    Vif,
    /// A virtual block device (item 9).
    Vbd,
}

/// One field of an object: its RRD data source and its Prometheus metric.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// Data-source name (≤ 19 characters).
    pub ds: &'static str,
    /// RRD type: GAUGE or DERIVE.
    pub rrd: &'static str,
    /// Prometheus metric name.
    pub prom: &'static str,
    /// Prometheus type.
    pub prom_type: &'static str,
    /// Factor from the stored value to the Prometheus unit.
    pub scale: f64,
    /// Help text.
    pub help: &'static str,
}

const fn g(ds: &'static str, prom: &'static str, help: &'static str) -> Field {
    Field {
        ds,
        rrd: "GAUGE",
        prom,
        prom_type: "gauge",
        scale: 1.0,
        help,
    }
}

const fn c(ds: &'static str, prom: &'static str, scale: f64, help: &'static str) -> Field {
    Field {
        ds,
        rrd: "DERIVE",
        prom,
        prom_type: "counter",
        scale,
        help,
    }
}

const HOST: &[Field] = &[
    g("pcpus", "fabric_host_pcpus", "Physical CPUs online."),
    g("cpu_pools", "fabric_host_cpu_pools", "CPU pools."),
    g("numa_nodes", "fabric_host_numa_nodes", "NUMA nodes."),
    g("guests", "fabric_host_guests", "Guests (VMs) running."),
    g(
        "mem_total",
        "fabric_host_memory_total_bytes",
        "Total memory.",
    ),
    g("mem_free", "fabric_host_memory_free_bytes", "Free memory."),
    g("load", "fabric_host_load1", "Load average over 1 minute."),
];
const PCPU: &[Field] = &[c(
    "cpu_time",
    "fabric_pcpu_busy_seconds_total",
    0.01,
    "Busy CPU time of a physical CPU.",
)];
const NUMA: &[Field] = &[
    g(
        "mem_total",
        "fabric_numa_memory_total_bytes",
        "Total memory of a NUMA node.",
    ),
    g(
        "mem_free",
        "fabric_numa_memory_free_bytes",
        "Free memory of a NUMA node.",
    ),
];
const POOL: &[Field] = &[
    g(
        "load",
        "fabric_pool_load1",
        "Load average of a CPU pool over 1 minute.",
    ),
    g("cpus", "fabric_pool_cpus", "CPUs in a CPU pool."),
    g("guests", "fabric_pool_guests", "Guests in a CPU pool."),
];
const VM: &[Field] = &[g("vcpus", "fabric_vm_vcpus", "Virtual CPUs of a guest.")];
const VCPU: &[Field] = &[g(
    "util",
    "fabric_vcpu_utilization_percent",
    "Utilisation of a virtual CPU over the last interval.",
)];
const MEM: &[Field] = &[
    g(
        "mem_used",
        "fabric_vm_memory_used_bytes",
        "Guest memory in use (resident).",
    ),
    g(
        "mem_max",
        "fabric_vm_memory_max_bytes",
        "Guest memory configured.",
    ),
];
const VIF: &[Field] = &[
    c(
        "rx_bytes",
        "fabric_vif_receive_bytes_total",
        1.0,
        "Bytes received.",
    ),
    c(
        "rx_packets",
        "fabric_vif_receive_packets_total",
        1.0,
        "Packets received.",
    ),
    c(
        "rx_errs",
        "fabric_vif_receive_errs_total",
        1.0,
        "Receive errors.",
    ),
    c(
        "rx_drop",
        "fabric_vif_receive_drop_total",
        1.0,
        "Receive drops.",
    ),
    c(
        "tx_bytes",
        "fabric_vif_transmit_bytes_total",
        1.0,
        "Bytes transmitted.",
    ),
    c(
        "tx_packets",
        "fabric_vif_transmit_packets_total",
        1.0,
        "Packets transmitted.",
    ),
    c(
        "tx_errs",
        "fabric_vif_transmit_errs_total",
        1.0,
        "Transmit errors.",
    ),
    c(
        "tx_drop",
        "fabric_vif_transmit_drop_total",
        1.0,
        "Transmit drops.",
    ),
];
const VBD: &[Field] = &[
    g(
        "oo_req",
        "fabric_vbd_outstanding_requests",
        "Requests in flight.",
    ),
    c(
        "rd_req",
        "fabric_vbd_read_requests_total",
        1.0,
        "Read requests.",
    ),
    c(
        "wr_req",
        "fabric_vbd_write_requests_total",
        1.0,
        "Write requests.",
    ),
    c(
        "rd_sect",
        "fabric_vbd_read_sectors_total",
        1.0,
        "Sectors read.",
    ),
    c(
        "wr_sect",
        "fabric_vbd_write_sectors_total",
        1.0,
        "Sectors written.",
    ),
];

impl ObjKind {
    /// The fields of this kind, in value order.
    pub fn fields(self) -> &'static [Field] {
        match self {
            ObjKind::Host => HOST,
            ObjKind::Pcpu => PCPU,
            ObjKind::Numa => NUMA,
            ObjKind::Pool => POOL,
            ObjKind::Vm => VM,
            ObjKind::Vcpu => VCPU,
            ObjKind::Mem => MEM,
            ObjKind::Vif => VIF,
            ObjKind::Vbd => VBD,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ObjKind::Host => "host",
            ObjKind::Pcpu => "pcpu",
            ObjKind::Numa => "numa",
            ObjKind::Pool => "pool",
            ObjKind::Vm => "vm",
            ObjKind::Vcpu => "vcpu",
            ObjKind::Mem => "mem",
            ObjKind::Vif => "vif",
            ObjKind::Vbd => "vbd",
        }
    }

    /// Prometheus label names for the parts of an object id.
    fn id_labels(self) -> &'static [&'static str] {
        match self {
            ObjKind::Host => &[],
            ObjKind::Pcpu => &["cpu"],
            ObjKind::Numa => &["node"],
            ObjKind::Pool => &["pool"],
            ObjKind::Vm | ObjKind::Mem => &["vm"],
            ObjKind::Vcpu => &["vm", "vcpu"],
            ObjKind::Vif => &["vm", "vif"],
            ObjKind::Vbd => &["vm", "vbd"],
        }
    }
}

/// One object's values at the report's time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Kind of object.
    pub kind: ObjKind,
    /// Object id parts (e.g. `["vm1", "0"]` for vCPU 0 of vm1; empty for the host).
    pub id: Vec<String>,
    /// Extra labels (UUID, device name, backing type).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Values, in the order of [`ObjKind::fields`].
    pub values: Vec<f64>,
}

fn safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Sample {
    /// The object's file name (without `.rrd`): kind and id parts joined by `-`.
    pub fn object(&self) -> String {
        let mut s = self.kind.name().to_string();
        for p in &self.id {
            s.push('-');
            s.push_str(&safe(p));
        }
        s
    }

    fn valid(&self) -> bool {
        self.values.len() == self.kind.fields().len()
            && self.id.len() == self.kind.id_labels().len()
    }
}

/// A monitoring report: what one frame on 0x88B6 carries (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Reporting host.
    pub host: String,
    /// Report number (per agent).
    pub seq: u64,
    /// Time of the samples, seconds since the Unix epoch.
    pub ts: u64,
    /// Samples.
    pub samples: Vec<Sample>,
}

impl Report {
    /// Parses one report frame's payload.
    pub fn parse(b: &[u8]) -> Result<Report, serde_json::Error> {
        serde_json::from_slice(b)
    }

    /// Splits into reports whose JSON fits in `max` bytes each (one frame).
    pub fn split(&self, max: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut cur = Report {
            samples: Vec::new(),
            ..self.clone()
        };
        for s in &self.samples {
            cur.samples.push(s.clone());
            if serde_json::to_vec(&cur).map_or(0, |v| v.len()) > max && cur.samples.len() > 1 {
                let last = cur.samples.pop();
                out.push(serde_json::to_vec(&cur).unwrap_or_default());
                cur.samples = last.into_iter().collect();
            }
        }
        if !cur.samples.is_empty() {
            out.push(serde_json::to_vec(&cur).unwrap_or_default());
        }
        out.retain(|b| b.len() <= max);
        out
    }
}

/// Parses a size such as `512M` into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// Thread CPU ticks of a process's threads named `vcpu*`, sorted by name.
fn vcpu_threads(pid: u32) -> Vec<(String, u64)> {
    let mut v = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return v;
    };
    for t in dir.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if !comm.starts_with("vcpu") {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        // Fields after the parenthesised comm: state is field 3; utime 14, stime 15.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        v.push((comm.to_string(), ticks));
    }
    v.sort();
    v
}

/// Resident memory of a process, bytes.
fn rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    hostinfo::meminfo_field(&s, "VmRSS")
}

/// Collects the §2.6.1 statistics of this host and its VMs.
#[derive(Debug, Default)]
pub struct Collector {
    /// Previous vCPU ticks per (vm, thread), and when.
    prev_vcpu: HashMap<(String, String), u64>,
    prev_at: Option<Instant>,
}

impl Collector {
    /// One round of samples.
    pub fn collect(&mut self, host: &str, vms: &[VmStatus]) -> Vec<Sample> {
        let mut out = Vec::new();
        let s = |kind, id: Vec<String>, values| Sample {
            kind,
            id,
            labels: BTreeMap::new(),
            values,
        };
        let running: Vec<&VmStatus> = vms.iter().filter(|v| v.state == "running").collect();
        let guests = running.len() as f64;
        match hostinfo::read_host_info(host) {
            Ok(h) => {
                let numa = h.numa_nodes.len().max(1) as f64;
                out.push(s(
                    ObjKind::Host,
                    vec![],
                    vec![
                        h.cpus.len() as f64,
                        1.0,
                        numa,
                        guests,
                        h.mem_total as f64,
                        h.mem_free as f64,
                        h.load[0],
                    ],
                ));
                for n in &h.numa_nodes {
                    out.push(s(
                        ObjKind::Numa,
                        vec![n.id.to_string()],
                        vec![n.mem_total as f64, n.mem_free as f64],
                    ));
                }
                // One CPU pool holds every CPU until resource groups define more.
                out.push(s(
                    ObjKind::Pool,
                    vec!["0".into()],
                    vec![h.load[0], h.cpus.len() as f64, guests],
                ));
            }
            Err(e) => log::warn!("host statistics: {e}"),
        }
        for t in hostinfo::read_cpu_times().unwrap_or_default() {
            out.push(s(
                ObjKind::Pcpu,
                vec![t.cpu.to_string()],
                vec![t.busy as f64],
            ));
        }
        let now = Instant::now();
        let elapsed = self.prev_at.map(|p| now.duration_since(p).as_secs_f64());
        let hz = 100.0; // USER_HZ
        let mut seen = HashMap::new();
        for vm in &running {
            let mut vs = s(
                ObjKind::Vm,
                vec![vm.name.clone()],
                vec![vm.spec.vcpus as f64],
            );
            vs.labels.insert("uuid".into(), vm.uuid.clone());
            out.push(vs);
            out.push(s(
                ObjKind::Mem,
                vec![vm.name.clone()],
                vec![
                    rss(vm.pid).unwrap_or(0) as f64,
                    parse_size(&vm.spec.memory).unwrap_or(0) as f64,
                ],
            ));
            for (i, (thread, ticks)) in vcpu_threads(vm.pid).into_iter().enumerate() {
                let key = (vm.name.clone(), thread);
                if let (Some(prev), Some(dt)) = (self.prev_vcpu.get(&key), elapsed) {
                    let util = (ticks.saturating_sub(*prev)) as f64 / hz / dt.max(1e-3) * 100.0;
                    out.push(s(
                        ObjKind::Vcpu,
                        vec![vm.name.clone(), i.to_string()],
                        vec![util.min(100.0)],
                    ));
                }
                seen.insert(key, ticks);
            }
            for (i, dev) in vm.spec.vifs.iter().enumerate() {
                let base = PathBuf::from(format!("/sys/class/net/{dev}/statistics"));
                let names = [
                    "rx_bytes",
                    "rx_packets",
                    "rx_errors",
                    "rx_dropped",
                    "tx_bytes",
                    "tx_packets",
                    "tx_errors",
                    "tx_dropped",
                ];
                let vals: Option<Vec<f64>> = names
                    .iter()
                    .map(|n| read_u64(&base.join(n)).map(|v| v as f64))
                    .collect();
                if let Some(vals) = vals {
                    let mut x = s(ObjKind::Vif, vec![vm.name.clone(), i.to_string()], vals);
                    x.labels.insert("device".into(), dev.clone());
                    out.push(x);
                }
            }
            for (i, disk) in vm.spec.disks.iter().enumerate() {
                let dev = Path::new(disk)
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("");
                let stat = std::fs::read_to_string(format!("/sys/class/block/{dev}/stat"));
                let Ok(stat) = stat else {
                    continue; // A file-backed disk: no block-layer statistics on the host.
                };
                let f: Vec<f64> = stat
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                if f.len() < 9 {
                    continue;
                }
                let mut x = s(
                    ObjKind::Vbd,
                    vec![vm.name.clone(), i.to_string()],
                    vec![f[8], f[0], f[4], f[2], f[6]],
                );
                x.labels.insert("device".into(), dev.to_string());
                x.labels.insert("type".into(), "block".into());
                out.push(x);
            }
        }
        self.prev_vcpu = seen;
        self.prev_at = Some(now);
        out
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The monitoring agent of a host.
#[derive(Debug)]
pub struct Agent {
    host: String,
    interval: Duration,
    dst: [u8; 6],
    next_due: u64,
    seq: u64,
    last_ts: u64,
    collector: Collector,
}

impl Agent {
    /// An agent reporting every `interval` (at least 1 s) to `dst` (broadcast if None).
    pub fn new(host: &str, interval: Duration, dst: Option<[u8; 6]>) -> Agent {
        Agent {
            host: host.into(),
            interval: interval.max(Duration::from_secs(1)),
            dst: dst.unwrap_or(BROADCAST),
            next_due: 0,
            seq: 0,
            last_ts: 0,
            collector: Collector::default(),
        }
    }

    /// When the next report is due (node clock, µs).
    pub fn next_due(&self) -> u64 {
        self.next_due
    }

    /// Sends a report if one is due.
    pub fn tick(&mut self, node: &mut Node, vms: &[VmStatus]) {
        let now = node.now();
        if now < self.next_due {
            return;
        }
        self.next_due = now + self.interval.as_micros() as u64;
        // RRD needs strictly increasing timestamps: never repeat one.
        let ts = unix_now().max(self.last_ts + 1);
        self.last_ts = ts;
        self.seq += 1;
        let report = Report {
            host: self.host.clone(),
            seq: self.seq,
            ts,
            samples: self.collector.collect(&self.host, vms),
        };
        for part in report.split(frame::MAX_PAYLOAD) {
            if let Err(e) = node.endpoint().send_monitor(self.dst, &part) {
                log::warn!("monitoring report not sent: {e}");
            }
        }
    }
}

/// Counters of the aggregator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AggStats {
    /// Report frames received.
    pub reports: u64,
    /// Samples accepted.
    pub samples: u64,
    /// Samples dropped as duplicates or late.
    pub duplicates: u64,
    /// Report frames that did not parse.
    pub bad: u64,
    /// Updates waiting for rrdcached.
    pub buffered: u64,
    /// Updates rrdcached refused.
    pub update_errors: u64,
}

/// Configuration of the aggregator.
#[derive(Debug, Clone)]
pub struct AggConfig {
    /// Directory of the RRD files.
    pub rrd_dir: PathBuf,
    /// rrdcached's UNIX socket.
    pub rrdcached: PathBuf,
    /// RRD step, seconds (the agents' interval).
    pub step: u64,
    /// Address of the Prometheus endpoint, if any.
    pub prometheus: Option<SocketAddr>,
}

/// The monitoring aggregator.
#[derive(Debug)]
pub struct Aggregator {
    cfg: AggConfig,
    rrd: RrdCached,
    last_ts: HashMap<(String, String), u64>,
    latest: BTreeMap<(String, String), (u64, Sample)>,
    created: HashSet<PathBuf>,
    listener: Option<TcpListener>,
    stats: AggStats,
    next_flush: Instant,
}

impl Aggregator {
    /// An aggregator writing under `cfg.rrd_dir`.
    pub fn new(cfg: AggConfig) -> Result<Aggregator, MonitorError> {
        std::fs::create_dir_all(&cfg.rrd_dir)
            .map_err(|e| MonitorError::Dir(cfg.rrd_dir.display().to_string(), e))?;
        let listener = match cfg.prometheus {
            Some(a) => {
                let l = TcpListener::bind(a).map_err(|e| MonitorError::Listen(a, e))?;
                l.set_nonblocking(true)
                    .map_err(|e| MonitorError::Listen(a, e))?;
                Some(l)
            }
            None => None,
        };
        Ok(Aggregator {
            rrd: RrdCached::new(&cfg.rrdcached),
            cfg,
            last_ts: HashMap::new(),
            latest: BTreeMap::new(),
            created: HashSet::new(),
            listener,
            stats: AggStats::default(),
            next_flush: Instant::now(),
        })
    }

    /// The Prometheus endpoint's address (useful with port 0).
    pub fn prometheus_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Counters.
    pub fn stats(&self) -> AggStats {
        AggStats {
            buffered: self.rrd.buffered() as u64,
            update_errors: self.rrd.update_errors,
            ..self.stats
        }
    }

    /// The file of a series.
    pub fn file(&self, host: &str, object: &str) -> PathBuf {
        self.cfg
            .rrd_dir
            .join(safe(host))
            .join(format!("{}.rrd", safe(object)))
    }

    /// Takes one report frame.
    pub fn receive(&mut self, _from: u32, _mac: [u8; 6], payload: &[u8]) {
        let report = match Report::parse(payload) {
            Ok(r) => r,
            Err(_) => {
                self.stats.bad += 1;
                return;
            }
        };
        self.stats.reports += 1;
        for s in report.samples {
            if !s.valid() {
                self.stats.bad += 1;
                continue;
            }
            let key = (report.host.clone(), s.object());
            if self.last_ts.get(&key).is_some_and(|t| report.ts <= *t) {
                self.stats.duplicates += 1;
                continue;
            }
            self.last_ts.insert(key.clone(), report.ts);
            let file = self.file(&key.0, &key.1);
            if self.created.insert(file.clone()) {
                if let Some(dir) = file.parent() {
                    if let Err(e) = std::fs::create_dir_all(dir) {
                        log::error!("cannot create {}: {e}", dir.display());
                    }
                }
                let hb = self.cfg.step * 3;
                let ds: Vec<String> = s
                    .kind
                    .fields()
                    .iter()
                    .map(|f| {
                        let min = if f.rrd == "DERIVE" { "0" } else { "U" };
                        format!("DS:{}:{}:{hb}:{min}:U", f.ds, f.rrd)
                    })
                    .collect();
                let day = 86_400 / self.cfg.step;
                let rras = vec![
                    format!("RRA:AVERAGE:0.5:1:{day}"),
                    format!("RRA:LAST:0.5:1:{day}"),
                    format!("RRA:AVERAGE:0.5:6:{}", day * 7 / 6),
                    format!("RRA:MAX:0.5:6:{}", day * 7 / 6),
                    format!("RRA:AVERAGE:0.5:360:{}", day * 365 / 360),
                ];
                self.rrd
                    .create(&file, self.cfg.step, report.ts - 1, &ds, &rras);
            }
            let vals: Vec<String> = s
                .kind
                .fields()
                .iter()
                .zip(&s.values)
                .map(|(f, v)| {
                    if f.rrd == "DERIVE" {
                        format!("{}", v.max(0.0).round() as u64)
                    } else {
                        format!("{v}")
                    }
                })
                .collect();
            self.rrd.update(&file, report.ts, &vals);
            self.stats.samples += 1;
            self.latest.insert(key, (report.ts, s));
        }
    }

    /// Periodic work: flush to rrdcached (at most every 500 ms), answer HTTP.
    pub fn tick(&mut self) {
        if Instant::now() >= self.next_flush && self.rrd.buffered() > 0 {
            self.next_flush = Instant::now() + Duration::from_millis(500);
            let _ = self.rrd.flush();
        }
        self.serve_http();
    }

    fn serve_http(&mut self) {
        let Some(l) = self.listener.as_ref() else {
            return;
        };
        while let Ok((mut conn, _)) = l.accept() {
            let _ = conn.set_nonblocking(false);
            let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while req.len() < 8192 && !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let line = String::from_utf8_lossy(&req);
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = if path == "/metrics" {
                ("200 OK", self.prometheus())
            } else {
                ("404 Not Found", "try /metrics\n".to_string())
            };
            let _ = conn.write_all(
                format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    }

    /// The latest values in Prometheus text format 0.0.4.
    pub fn prometheus(&self) -> String {
        let mut by_metric: BTreeMap<&str, (Field, Vec<String>)> = BTreeMap::new();
        for ((host, _), (_, s)) in &self.latest {
            let mut labels = vec![format!("host=\"{}\"", esc(host))];
            for (n, v) in s.kind.id_labels().iter().zip(&s.id) {
                labels.push(format!("{n}=\"{}\"", esc(v)));
            }
            for (k, v) in &s.labels {
                labels.push(format!("{}=\"{}\"", safe(k), esc(v)));
            }
            let labels = labels.join(",");
            for (f, v) in s.kind.fields().iter().zip(&s.values) {
                by_metric
                    .entry(f.prom)
                    .or_insert_with(|| (*f, Vec::new()))
                    .1
                    .push(format!("{}{{{labels}}} {}", f.prom, v * f.scale));
            }
        }
        let mut out = String::new();
        for (name, (f, lines)) in by_metric {
            out.push_str(&format!(
                "# HELP {name} {}\n# TYPE {name} {}\n",
                f.help, f.prom_type
            ));
            for l in lines {
                out.push_str(&l);
                out.push('\n');
            }
        }
        out
    }

    /// Series known (host, object), with their latest timestamps.
    pub fn series(&self) -> Vec<(String, String, u64)> {
        self.latest
            .iter()
            .map(|((h, o), (t, _))| (h.clone(), o.clone(), *t))
            .collect()
    }

    /// A series between two times.
    pub fn query(
        &mut self,
        host: &str,
        object: &str,
        cf: &str,
        start: u64,
        end: u64,
    ) -> Result<Fetched, MonitorError> {
        let file = self.file(host, object);
        if !self.created.contains(&file) && !file.exists() {
            return Err(MonitorError::NoSeries(format!("{host}/{object}")));
        }
        Ok(self.rrd.fetch(&file, cf, start, end)?)
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(ts: u64) -> Report {
        Report {
            host: "h1".into(),
            seq: 1,
            ts,
            samples: vec![
                Sample {
                    kind: ObjKind::Pcpu,
                    id: vec!["0".into()],
                    labels: BTreeMap::new(),
                    values: vec![1234.0],
                },
                Sample {
                    kind: ObjKind::Vbd,
                    id: vec!["vm1".into(), "0".into()],
                    labels: BTreeMap::from([("device".into(), "loop0".into())]),
                    values: vec![1.0, 2.0, 3.0, 4.0, 5.0],
                },
            ],
        }
    }

    #[test]
    fn schema_names_are_rrd_and_prometheus_safe() {
        for k in [
            ObjKind::Host,
            ObjKind::Pcpu,
            ObjKind::Numa,
            ObjKind::Pool,
            ObjKind::Vm,
            ObjKind::Vcpu,
            ObjKind::Mem,
            ObjKind::Vif,
            ObjKind::Vbd,
        ] {
            for f in k.fields() {
                assert!(f.ds.len() <= 19, "{}", f.ds);
                assert!(f.prom.starts_with("fabric_"));
                assert_eq!(
                    f.prom_type == "counter",
                    f.prom.ends_with("_total"),
                    "{}",
                    f.prom
                );
            }
        }
    }

    #[test]
    fn split_fits_frames() {
        let mut r = report(5);
        for i in 0..100 {
            r.samples.push(Sample {
                kind: ObjKind::Pcpu,
                id: vec![i.to_string()],
                labels: BTreeMap::new(),
                values: vec![i as f64],
            });
        }
        let parts = r.split(frame::MAX_PAYLOAD);
        assert!(parts.len() > 1);
        let mut n = 0;
        for p in &parts {
            assert!(p.len() <= frame::MAX_PAYLOAD);
            n += serde_json::from_slice::<Report>(p).unwrap().samples.len();
        }
        assert_eq!(n, r.samples.len());
    }

    #[test]
    fn aggregator_dedups_and_exports() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Aggregator::new(AggConfig {
            rrd_dir: dir.path().join("rrd"),
            rrdcached: dir.path().join("absent.sock"),
            step: 1,
            prometheus: None,
        })
        .unwrap();
        let r = serde_json::to_vec(&report(100)).unwrap();
        a.receive(1, [0; 6], &r);
        a.receive(1, [0; 6], &r);
        a.receive(1, [0; 6], b"not json");
        let st = a.stats();
        assert_eq!(
            (st.reports, st.samples, st.duplicates, st.bad),
            (2, 2, 2, 1)
        );
        assert_eq!(st.buffered, 4, "2 creates + 2 updates wait for rrdcached");
        let p = a.prometheus();
        assert!(p.contains("# TYPE fabric_pcpu_busy_seconds_total counter\n"));
        assert!(p.contains("fabric_pcpu_busy_seconds_total{host=\"h1\",cpu=\"0\"} 12.34\n"));
        assert!(p.contains(
            "fabric_vbd_write_sectors_total{host=\"h1\",vm=\"vm1\",vbd=\"0\",device=\"loop0\"} 5\n"
        ));
        assert!(a.file("h1", "vbd-vm1-0").ends_with("rrd/h1/vbd-vm1-0.rrd"));
    }

    #[test]
    fn collects_host_statistics() {
        let mut c = Collector::default();
        let s = c.collect("me", &[]);
        let kinds: HashSet<ObjKind> = s.iter().map(|x| x.kind).collect();
        for k in [ObjKind::Host, ObjKind::Pcpu, ObjKind::Pool, ObjKind::Numa] {
            assert!(kinds.contains(&k), "{k:?}");
        }
        assert!(s.iter().all(|x| x.valid()));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("x"), None);
    }
}
