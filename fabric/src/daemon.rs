//! `fabricd`: the host daemon. Answers control verbs (seed §2.4 "Orchestration API") executed
//! exactly once per request id, starts and stops `vmm` processes, and (see [`crate::monitor`])
//! sends monitoring reports and aggregates them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::json;

use crate::control::{ExactlyOnce, Verb};
use crate::endpoint::Event;
use crate::hostinfo;
use crate::monitor::{Agent, Aggregator};
use crate::node::{Node, NodeError};
use crate::vm::VmManager;

fn to_json<T: serde::Serialize>(
    v: Result<T, crate::vm::VmError>,
) -> Result<serde_json::Value, String> {
    v.map(|s| serde_json::to_value(s).unwrap_or_default())
        .map_err(|e| e.to_string())
}

const NOT_AGGREGATOR: &str = "this host is not a monitoring aggregator";

/// The daemon's state.
#[derive(Debug)]
pub struct Daemon {
    node: Node,
    name: String,
    vms: VmManager,
    exec: ExactlyOnce,
    /// `exec`'s counters as of the request being executed (it is moved out meanwhile).
    exec_stats: crate::control::ExecStats,
    agent: Option<Agent>,
    aggregator: Option<Aggregator>,
}

impl Daemon {
    /// A daemon called `name` on `node`.
    pub fn new(node: Node, name: &str, vms: VmManager) -> Daemon {
        Daemon {
            node,
            name: name.to_string(),
            vms,
            exec: ExactlyOnce::default(),
            exec_stats: Default::default(),
            agent: None,
            aggregator: None,
        }
    }

    /// Sends monitoring reports with `agent`.
    pub fn with_agent(mut self, agent: Agent) -> Daemon {
        self.agent = Some(agent);
        self
    }

    /// Aggregates monitoring reports with `aggregator`.
    pub fn with_aggregator(mut self, aggregator: Aggregator) -> Daemon {
        self.aggregator = Some(aggregator);
        self
    }

    fn execute(&mut self, verb: &Verb) -> Result<serde_json::Value, String> {
        match verb {
            Verb::Info => hostinfo::read_host_info(&self.name)
                .map(|h| serde_json::to_value(h).unwrap_or_default())
                .map_err(|e| e.to_string()),
            Verb::Echo { n } => Ok(json!(n)),
            Verb::Stats => Ok(json!({
                "name": self.name,
                "fabric": self.node.ep().stats(),
                "links": self.node.ep().links(),
                "clock_origin_unix_us": self.node.clock_origin_unix_us(),
                "requests": self.exec_stats,
                "vms": self.vms.len(),
                "monitor": self.aggregator.as_ref().map(|a| a.stats()),
            })),
            Verb::VmCreate(spec) => to_json(self.vms.create(spec.clone())),
            Verb::VmDestroy { name } => to_json(self.vms.destroy(name)),
            Verb::VmStatus { name } => to_json(self.vms.status(name)),
            Verb::VmPin { name, cpus } => to_json(self.vms.pin(name, cpus)),
            Verb::VmUnpin { name } => to_json(self.vms.unpin(name)),
            Verb::VmList => Ok(serde_json::to_value(self.vms.list()).unwrap_or_default()),
            Verb::MetricList => match self.aggregator.as_ref() {
                Some(a) => Ok(serde_json::to_value(a.series()).unwrap_or_default()),
                None => Err(NOT_AGGREGATOR.into()),
            },
            Verb::MetricQuery {
                host,
                object,
                cf,
                start,
                end,
            } => match self.aggregator.as_mut() {
                Some(a) => a
                    .query(host, object, cf, *start, *end)
                    .map(|f| serde_json::to_value(f).unwrap_or_default())
                    .map_err(|e| e.to_string()),
                None => Err(NOT_AGGREGATOR.into()),
            },
        }
    }

    fn on_event(&mut self, e: Event) {
        match e {
            Event::Message { from, payload } => {
                let mut exec = std::mem::take(&mut self.exec);
                self.exec_stats = exec.stats();
                let resp = exec.serve(from, &payload, |v| self.execute(v));
                self.exec = exec;
                if let Some(resp) = resp {
                    if let Err(e) = self.node.endpoint().send(from, resp) {
                        log::warn!("response to {from:08x} not sent: {e}");
                    }
                }
            }
            Event::PeerUp(p) => log::info!(
                "peer up: {} {} ({:?})",
                p.name,
                crate::frame::mac_to_string(&p.mac),
                p.role
            ),
            Event::PeerDown(p) => log::info!("peer down: {}", p.name),
            Event::PeerGone(p) => {
                self.exec.forget(p.id);
                log::info!("peer forgotten: {}", p.name);
            }
            Event::Monitor { from, mac, payload } => {
                if let Some(a) = self.aggregator.as_mut() {
                    a.receive(from, mac, &payload);
                }
            }
        }
    }

    /// Runs until `stop` is set.
    pub fn run(&mut self, stop: Arc<AtomicBool>) -> Result<(), NodeError> {
        while !stop.load(Ordering::Relaxed) {
            let now = self.node.now();
            let mut deadline = now + 100_000;
            if let Some(a) = self.agent.as_mut() {
                let vms = self.vms.list();
                a.tick(&mut self.node, &vms);
                deadline = deadline.min(a.next_due());
            }
            if let Some(a) = self.aggregator.as_mut() {
                a.tick();
            }
            self.node.step(deadline)?;
            while let Some(e) = self.node.poll_event() {
                self.on_event(e);
            }
        }
        Ok(())
    }
}
