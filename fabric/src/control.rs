//! Control messages (seed §2.4 "Orchestration API") carried in reliable-channel messages, and
//! the server side's exactly-once execution by request id (AoE tags, fabric-anchors §1.4).
//!
//! A message is a small binary envelope (big endian; I/O-free, checked):
//!
//! ```text
//! off len field
//!   0   1 type: 1 request, 2 response
//!   1   8 request id
//!   9   1 request:  verb encoding: 1 echo (n: u64 follows), 0 any verb as JSON text
//!         response: result encoding: 1 Ok(unsigned integer: u64 follows), 2 Ok(JSON text),
//!                   3 Err(UTF-8 text)
//!  10   n the body the encoding names (nothing after it)
//! ```
//!
//! The envelope and the hot verb (`Echo`, what `fabric ping` sends, and its integer answer)
//! are fixed binary fields: parsing and printing them as JSON was a fifth of a round trip's
//! user-space instructions (`fabric-bench hot-path` under callgrind). Every other verb and
//! result stays JSON text, readable in a capture and extensible with the serde types.
//! Request ids from one client count up from 1. The server remembers the last
//! [`REPLAY_CACHE`] responses per client: a request id it already executed gets the cached
//! response again and is not executed twice.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::vm::VmSpec;

/// Errors of this module.
#[derive(Debug, Error)]
pub enum ControlError {
    /// A JSON body that is not a verb or a value.
    #[error("bad control message")]
    Decode(#[from] serde_json::Error),
    /// Shorter than its fields.
    #[error("truncated control message")]
    Truncated,
    /// Bytes after a fixed-size body.
    #[error("trailing bytes in control message")]
    Trailing,
    /// Unknown type or body encoding.
    #[error("unknown control message type {0}, encoding {1}")]
    Type(u8, u8),
    /// An error text that is not UTF-8.
    #[error("error text is not UTF-8")]
    Utf8,
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
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// From a controller.
    Request(Request),
    /// From a host.
    Response(Response),
}

const MSG_REQUEST: u8 = 1;
const MSG_RESPONSE: u8 = 2;
const VERB_JSON: u8 = 0;
const VERB_ECHO: u8 = 1;
const RESULT_UINT: u8 = 1;
const RESULT_JSON: u8 = 2;
const RESULT_ERR: u8 = 3;
const OFF_ID: usize = 1;
const OFF_ENCODING: usize = 9;
const OFF_BODY: usize = 10;

/// A body that is exactly one u64.
fn u64_body(b: &[u8]) -> Result<u64, ControlError> {
    let v: [u8; 8] = b
        .get(..8)
        .ok_or(ControlError::Truncated)?
        .try_into()
        .map_err(|_| ControlError::Truncated)?;
    if b.len() > 8 {
        return Err(ControlError::Trailing);
    }
    Ok(u64::from_be_bytes(v))
}

fn write_json<T: Serialize>(b: &mut Vec<u8>, v: &T) {
    // Serialising these plain data types into a Vec cannot fail.
    let _ = serde_json::to_writer(b, v);
}

impl Message {
    /// Encodes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(OFF_BODY + 8);
        let (ty, id) = match self {
            Message::Request(r) => (MSG_REQUEST, r.id),
            Message::Response(r) => (MSG_RESPONSE, r.id),
        };
        b.push(ty);
        b.extend_from_slice(&id.to_be_bytes());
        match self {
            Message::Request(r) => match &r.verb {
                Verb::Echo { n } => {
                    b.push(VERB_ECHO);
                    b.extend_from_slice(&n.to_be_bytes());
                }
                v => {
                    b.push(VERB_JSON);
                    write_json(&mut b, v);
                }
            },
            Message::Response(r) => match &r.result {
                Ok(serde_json::Value::Number(n)) if n.is_u64() => {
                    b.push(RESULT_UINT);
                    b.extend_from_slice(&n.as_u64().unwrap_or_default().to_be_bytes());
                }
                Ok(v) => {
                    b.push(RESULT_JSON);
                    write_json(&mut b, v);
                }
                Err(e) => {
                    b.push(RESULT_ERR);
                    b.extend_from_slice(e.as_bytes());
                }
            },
        }
        b
    }

    /// Decodes.
    pub fn parse(b: &[u8]) -> Result<Message, ControlError> {
        if b.len() < OFF_BODY {
            return Err(ControlError::Truncated);
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&b[OFF_ID..OFF_ENCODING]);
        let id = u64::from_be_bytes(id);
        let body = &b[OFF_BODY..];
        Ok(match (b[0], b[OFF_ENCODING]) {
            (MSG_REQUEST, VERB_ECHO) => Message::Request(Request {
                id,
                verb: Verb::Echo { n: u64_body(body)? },
            }),
            (MSG_REQUEST, VERB_JSON) => Message::Request(Request {
                id,
                verb: serde_json::from_slice(body)?,
            }),
            (MSG_RESPONSE, RESULT_UINT) => Message::Response(Response {
                id,
                result: Ok(u64_body(body)?.into()),
            }),
            (MSG_RESPONSE, RESULT_JSON) => Message::Response(Response {
                id,
                result: Ok(serde_json::from_slice(body)?),
            }),
            (MSG_RESPONSE, RESULT_ERR) => Message::Response(Response {
                id,
                result: Err(std::str::from_utf8(body)
                    .map_err(|_| ControlError::Utf8)?
                    .to_string()),
            }),
            (t, e) => return Err(ControlError::Type(t, e)),
        })
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
    /// The last responses, by increasing id (ids are executed in increasing order only): a
    /// ring searched by bisection, no tree node allocated per request.
    cache: VecDeque<Response>,
}

/// Executes each (client, request id) at most once.
#[derive(Debug, Default)]
pub struct ExactlyOnce {
    /// By sender id (authenticated): FxHash, cheap on integers.
    clients: FxHashMap<u32, ClientLog>,
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
        if req.id <= log.last_id {
            // Executed before (ids run in increasing order only): answer from the cache.
            if let Ok(i) = log.cache.binary_search_by_key(&req.id, |r| r.id) {
                self.stats.duplicates += 1;
                return log.cache[i].clone();
            }
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
        log.cache.push_back(resp.clone());
        while log.cache.len() > REPLAY_CACHE {
            log.cache.pop_front();
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
        let resp = |result| Message::Response(Response { id: 3, result });
        for m in [
            Message::Request(echo(3)),
            Message::Request(Request {
                id: 4,
                verb: Verb::VmStatus { name: "vm1".into() },
            }),
            Message::Request(Request {
                id: 5,
                verb: Verb::Info,
            }),
            resp(Ok(serde_json::json!(u64::MAX))),
            resp(Ok(serde_json::json!(-1))),
            resp(Ok(serde_json::json!({"cpus": 2}))),
            resp(Ok(serde_json::Value::Null)),
            resp(Err("no such VM".into())),
        ] {
            assert_eq!(Message::parse(&m.to_bytes()).unwrap(), m);
        }
    }

    #[test]
    fn envelope_layout() {
        let b = Message::Request(echo(0x0102)).to_bytes();
        let mut want = vec![MSG_REQUEST, 0, 0, 0, 0, 0, 0, 1, 2, VERB_ECHO];
        want.extend_from_slice(&0x0102u64.to_be_bytes());
        assert_eq!(b, want);
        let r = Message::Response(Response {
            id: 7,
            result: Ok(serde_json::json!(9)),
        });
        assert_eq!(
            &r.to_bytes()[..],
            &[2, 0, 0, 0, 0, 0, 0, 0, 7, 1, 0, 0, 0, 0, 0, 0, 0, 9]
        );
        let mut j = vec![MSG_REQUEST, 0, 0, 0, 0, 0, 0, 0, 1, VERB_JSON];
        j.extend_from_slice(br#""vm_list""#);
        assert_eq!(
            Message::parse(&j).unwrap(),
            Message::Request(Request {
                id: 1,
                verb: Verb::VmList
            })
        );
    }

    #[test]
    fn bad_messages_are_errors() {
        let echo_bytes = Message::Request(echo(1)).to_bytes();
        for (b, want) in [
            (&b"{"[..], "truncated control message"),
            (
                &echo_bytes[..echo_bytes.len() - 1],
                "truncated control message",
            ),
            (
                &[1, 0, 0, 0, 0, 0, 0, 0, 1, 9][..],
                "unknown control message type 1, encoding 9",
            ),
            (
                &[3, 0, 0, 0, 0, 0, 0, 0, 1, 1][..],
                "unknown control message type 3, encoding 1",
            ),
            (
                &[2, 0, 0, 0, 0, 0, 0, 0, 1, 3, 0xff][..],
                "error text is not UTF-8",
            ),
            (
                &[1, 0, 0, 0, 0, 0, 0, 0, 1, 0, b'{'][..],
                "bad control message",
            ),
        ] {
            assert_eq!(Message::parse(b).unwrap_err().to_string(), want, "{b:?}");
        }
        let mut long = echo_bytes.clone();
        long.push(0);
        assert!(matches!(Message::parse(&long), Err(ControlError::Trailing)));
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
