//! Control messages (seed §2.4 "Orchestration API") carried in reliable-channel messages, and
//! the server side's exactly-once execution by request id (AoE tags, fabric-anchors §1.4).
//!
//! A message is JSON: `{"Request":{"id":N,"verb":...}}` or `{"Response":{"id":N,"result":...}}`.
//! Request ids from one client count up from 1. The server remembers the last
//! [`REPLAY_CACHE`] responses per client: a request id it already executed gets the cached
//! response again and is not executed twice.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::vm::VmSpec;

/// Errors of this module.
#[derive(Debug, Error)]
pub enum ControlError {
    /// Not a control message.
    #[error("bad control message")]
    Decode(#[from] serde_json::Error),
}

/// A control verb.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verb {
    /// Host information: CPUs, NUMA nodes, memory, load.
    Info,
    /// Does nothing but count: used by `fabric ping` and the exactly-once tests.
    Echo {
        /// Echoed back.
        n: u64,
    },
    /// The daemon's counters (fabric, exactly-once, VMs).
    Stats,
    /// Starts a VM.
    VmCreate(VmSpec),
    /// Stops a VM.
    VmDestroy {
        /// VM name.
        name: String,
    },
    /// Lists VMs.
    VmList,
    /// One VM's status.
    VmStatus {
        /// VM name.
        name: String,
    },
    /// Pins a VM's threads to host CPUs.
    VmPin {
        /// VM name.
        name: String,
        /// Host CPUs.
        cpus: Vec<u32>,
    },
    /// Lets a VM's threads run on every CPU again.
    VmUnpin {
        /// VM name.
        name: String,
    },
    /// Monitoring series an aggregator holds.
    MetricList,
    /// One monitoring series between two times (an aggregator answers).
    MetricQuery {
        /// Reporting host.
        host: String,
        /// Object, e.g. `host`, `pcpu-0`, `vbd-vm1-0`.
        object: String,
        /// Consolidation function: AVERAGE, LAST, MAX.
        cf: String,
        /// Start, seconds since the epoch.
        start: u64,
        /// End, seconds since the epoch.
        end: u64,
    },
}

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Request id (per client, counting up from 1).
    pub id: u64,
    /// What to do.
    pub verb: Verb,
}

/// A response: a JSON value or a one-line error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The request it answers.
    pub id: u64,
    /// The outcome.
    pub result: Result<serde_json::Value, String>,
}

/// Either.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// From a controller.
    Request(Request),
    /// From a host.
    Response(Response),
}

impl Message {
    /// Encodes.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising these plain data types cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes.
    pub fn parse(b: &[u8]) -> Result<Message, ControlError> {
        Ok(serde_json::from_slice(b)?)
    }
}

/// Responses remembered per client.
pub const REPLAY_CACHE: usize = 1024;

/// Counters of [`ExactlyOnce`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStats {
    /// Requests executed.
    pub executed: u64,
    /// Requests seen again and answered from the cache (not executed).
    pub duplicates: u64,
    /// Requests that did not follow the previous id from the same client.
    pub out_of_order: u64,
    /// Requests older than the cache (refused).
    pub too_old: u64,
}

#[derive(Debug, Default)]
struct ClientLog {
    last_id: u64,
    cache: BTreeMap<u64, Response>,
}

/// Executes each (client, request id) at most once.
#[derive(Debug, Default)]
pub struct ExactlyOnce {
    clients: HashMap<u32, ClientLog>,
    stats: ExecStats,
}

impl ExactlyOnce {
    /// Runs `exec` for `req` from `client` unless it ran already; returns the response.
    pub fn handle(
        &mut self,
        client: u32,
        req: &Request,
        exec: impl FnOnce(&Verb) -> Result<serde_json::Value, String>,
    ) -> Response {
        let log = self.clients.entry(client).or_default();
        if let Some(r) = log.cache.get(&req.id) {
            self.stats.duplicates += 1;
            return r.clone();
        }
        if req.id <= log.last_id {
            self.stats.too_old += 1;
            return Response {
                id: req.id,
                result: Err(format!("request {} is too old to answer again", req.id)),
            };
        }
        if req.id != log.last_id + 1 {
            self.stats.out_of_order += 1;
        }
        log.last_id = req.id;
        self.stats.executed += 1;
        let resp = Response {
            id: req.id,
            result: exec(&req.verb),
        };
        log.cache.insert(req.id, resp.clone());
        while log.cache.len() > REPLAY_CACHE {
            log.cache.pop_first();
        }
        resp
    }

    /// Answers the control message `msg` from `client`: parses the request, runs it through
    /// [`ExactlyOnce::handle`] and encodes the response. `None` (logged) if `msg` is not a
    /// request.
    pub fn serve(
        &mut self,
        client: u32,
        msg: &[u8],
        exec: impl FnOnce(&Verb) -> Result<serde_json::Value, String>,
    ) -> Option<Vec<u8>> {
        let req = match Message::parse(msg) {
            Ok(Message::Request(r)) => r,
            _ => {
                log::debug!("ignored a message that is not a request");
                return None;
            }
        };
        Some(Message::Response(self.handle(client, &req, exec)).to_bytes())
    }

    /// Forgets a client (its peer is gone).
    pub fn forget(&mut self, client: u32) {
        self.clients.remove(&client);
    }

    /// Counters.
    pub fn stats(&self) -> ExecStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo(n: u64) -> Request {
        Request {
            id: n,
            verb: Verb::Echo { n },
        }
    }

    #[test]
    fn message_round_trip() {
        let m = Message::Request(echo(3));
        assert_eq!(Message::parse(&m.to_bytes()).unwrap(), m);
        let r = Message::Response(Response {
            id: 3,
            result: Err("no such VM".into()),
        });
        assert_eq!(Message::parse(&r.to_bytes()).unwrap(), r);
        assert!(Message::parse(b"{").is_err());
    }

    #[test]
    fn executes_once() {
        let mut x = ExactlyOnce::default();
        let mut runs = 0;
        for id in [1, 2, 2, 3, 1] {
            let r = x.handle(7, &echo(id), |_| {
                runs += 1;
                Ok(serde_json::json!(runs))
            });
            assert_eq!(r.id, id);
        }
        assert_eq!(runs, 3);
        let s = x.stats();
        assert_eq!((s.executed, s.duplicates, s.out_of_order), (3, 2, 0));
        // Another client has its own ids.
        x.handle(8, &echo(1), |_| Ok(serde_json::Value::Null));
        x.handle(8, &echo(3), |_| Ok(serde_json::Value::Null));
        assert_eq!(x.stats().out_of_order, 1);
    }

    #[test]
    fn too_old_is_refused_not_rerun() {
        let mut x = ExactlyOnce::default();
        for id in 1..=(REPLAY_CACHE as u64 + 5) {
            x.handle(1, &echo(id), |_| Ok(serde_json::Value::Null));
        }
        let r = x.handle(1, &echo(2), |_| panic!("must not run"));
        assert!(r.result.unwrap_err().contains("too old"));
        assert_eq!(x.stats().too_old, 1);
    }
}
