//! The controller side: find hosts, send requests, wait for responses (used by the `fabric` CLI).

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;
use std::time::Duration;

use serde::Serialize;
use thiserror::Error;

use crate::control::{Message, Request, Response, Verb};
use crate::endpoint::{Event, PeerInfo, SendError};
use crate::node::{Node, NodeError};
use crate::payload::Role;

/// Errors of this module.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The node failed.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// No host of that name or MAC answered.
    #[error("no host {0} answered within {1} ms")]
    NotFound(String, u64),
    /// The request could not be queued.
    #[error(transparent)]
    Send(#[from] SendError),
    /// No response in time.
    #[error("no response from {0} within {1} ms (link {2})")]
    Timeout(String, u64, &'static str),
    /// The host answered with an error.
    #[error("{0}")]
    Remote(String),
}

/// Latency summary of `ping`.
#[derive(Debug, Clone, Serialize)]
pub struct PingReport {
    /// The host.
    pub host: String,
    /// Requests completed.
    pub completed: u64,
    /// Requests that failed or timed out.
    pub failed: u64,
    /// Requests in flight at once.
    pub window: u64,
    /// Completion time percentiles, µs.
    pub p50_us: u64,
    /// 90th percentile, µs.
    pub p90_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// Worst, µs.
    pub max_us: u64,
    /// Wall time of the run, seconds.
    pub seconds: f64,
}

/// Percentile `q` (0..=1) of sorted `v`.
pub fn percentile(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i.min(v.len() - 1)]
}

/// A controller on the segment.
#[derive(Debug)]
pub struct Client {
    node: Node,
    next_id: u64,
    peers: BTreeMap<u32, (PeerInfo, bool)>,
    /// By request id: FxHash, cheap on integers.
    responses: FxHashMap<u64, Response>,
}

impl Client {
    /// A controller using `node`.
    pub fn new(node: Node) -> Client {
        Client {
            node,
            next_id: 0,
            peers: BTreeMap::new(),
            responses: FxHashMap::default(),
        }
    }

    /// The node.
    pub fn node(&mut self) -> &mut Node {
        &mut self.node
    }

    fn pump(&mut self, deadline: u64) -> Result<(), ClientError> {
        self.node.step(deadline)?;
        while let Some(e) = self.node.poll_event() {
            match e {
                Event::PeerUp(p) => {
                    self.peers.insert(p.id, (p, true));
                }
                Event::PeerDown(p) => {
                    self.peers.insert(p.id, (p, false));
                }
                Event::PeerGone(p) => {
                    self.peers.remove(&p.id);
                }
                Event::Message { payload, .. } => match Message::parse(&payload) {
                    Ok(Message::Response(r)) => {
                        self.responses.insert(r.id, r);
                    }
                    _ => log::debug!("ignored a message that is not a response"),
                },
                Event::Monitor { .. } => {}
            }
        }
        Ok(())
    }

    /// Listens for `wait`, then lists the hosts that answered.
    pub fn hosts(&mut self, wait: Duration) -> Result<Vec<PeerInfo>, ClientError> {
        let end = self.node.now() + wait.as_micros() as u64;
        while self.node.now() < end {
            self.pump(end)?;
        }
        Ok(self
            .peers
            .values()
            .filter(|(p, up)| *up && p.role == Role::Host)
            .map(|(p, _)| p.clone())
            .collect())
    }

    /// Finds a host by name or MAC, waiting at most `wait`.
    pub fn resolve(&mut self, who: &str, wait: Duration) -> Result<PeerInfo, ClientError> {
        let end = self.node.now() + wait.as_micros() as u64;
        loop {
            if let Some(p) = self.node.ep().find_peer(who) {
                return Ok(p);
            }
            if self.node.now() >= end {
                return Err(ClientError::NotFound(who.into(), wait.as_millis() as u64));
            }
            self.pump(end)?;
        }
    }

    /// Queues a request; returns its id.
    pub fn submit(&mut self, peer: u32, verb: Verb) -> Result<u64, ClientError> {
        let id = self.next_id + 1;
        let m = Message::Request(Request { id, verb });
        self.node.endpoint().send(peer, m.to_bytes())?;
        self.next_id = id;
        Ok(id)
    }

    /// Sends a request and waits for its response.
    pub fn request(
        &mut self,
        peer: &PeerInfo,
        verb: Verb,
        timeout: Duration,
    ) -> Result<serde_json::Value, ClientError> {
        let id = self.submit(peer.id, verb)?;
        let end = self.node.now() + timeout.as_micros() as u64;
        loop {
            if let Some(r) = self.responses.remove(&id) {
                return r.result.map_err(ClientError::Remote);
            }
            if self.node.now() >= end {
                let up = self.peers.get(&peer.id).is_none_or(|(_, up)| *up);
                return Err(ClientError::Timeout(
                    peer.name.clone(),
                    timeout.as_millis() as u64,
                    if up { "up" } else { "down" },
                ));
            }
            self.pump(end)?;
        }
    }

    /// Sends `count` echo requests, `window` at a time, and reports completion times.
    pub fn ping(
        &mut self,
        peer: &PeerInfo,
        count: u64,
        window: u64,
        interval: Duration,
        timeout: Duration,
    ) -> Result<PingReport, ClientError> {
        let interval = interval.as_micros() as u64;
        let mut next_issue = 0u64;
        let t0 = std::time::Instant::now();
        let mut issued: FxHashMap<u64, u64> = FxHashMap::default();
        let mut lat = Vec::with_capacity(count as usize);
        let (mut sent, mut failed) = (0u64, 0u64);
        let window = window.max(1);
        let timeout = timeout.as_micros() as u64;
        while (lat.len() as u64) + failed < count {
            // One clock read for issuing and expiring, one after the wait (the completions).
            let mut now = self.node.now();
            while sent < count && (issued.len() as u64) < window {
                if now < next_issue {
                    break;
                }
                next_issue = now + interval;
                match self.submit(peer.id, Verb::Echo { n: sent + 1 }) {
                    Ok(id) => {
                        issued.insert(id, now);
                    }
                    Err(ClientError::Send(SendError::LinkDown(_))) => {
                        // Fails at once with a clear error, never sent; wait a little before
                        // the next one so an outage does not fail the whole run in a burst.
                        failed += 1;
                        sent += 1;
                        self.pump(now + 10_000)?;
                        now = self.node.now();
                        continue;
                    }
                    Err(e) => return Err(e),
                }
                sent += 1;
            }
            issued.retain(|_, t| {
                let live = now - *t <= timeout;
                failed += u64::from(!live);
                live
            });
            let wake = if interval > 0 && sent < count {
                next_issue.max(now + 1)
            } else {
                now + 10_000
            };
            self.pump(wake.min(now + 10_000))?;
            let now = self.node.now();
            let responses = &mut self.responses;
            issued.retain(|id, t| match responses.remove(id) {
                Some(r) => {
                    match r.result {
                        Ok(_) => lat.push(now - *t),
                        Err(_) => failed += 1,
                    }
                    false
                }
                None => true,
            });
            // Late responses to requests that timed out are dropped.
            self.responses.clear();
        }
        lat.sort_unstable();
        Ok(PingReport {
            host: peer.name.clone(),
            completed: lat.len() as u64,
            failed,
            window,
            p50_us: percentile(&lat, 0.5),
            p90_us: percentile(&lat, 0.9),
            p99_us: percentile(&lat, 0.99),
            max_us: lat.last().copied().unwrap_or(0),
            seconds: t0.elapsed().as_secs_f64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 51);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 1.0), 100);
        assert_eq!(percentile(&[], 0.5), 0);
    }
}
