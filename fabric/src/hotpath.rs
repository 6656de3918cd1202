//! The request/response hot path without sockets: a controller's and a host's [`Endpoint`]
//! joined through memory and driven the way [`crate::node::Node::step`], [`crate::client`] and
//! `fabricd` drive them, so the user-space work of one `fabric ping` round trip can be counted
//! (`fabric-bench hot-path` under `valgrind --tool=callgrind`: instruction counts that do not
//! depend on the machine's load) and profiled without the kernel in the figures.
//!
//! Per round trip, as in the real loop: the controller queues an echo request and flushes
//! (`poll`, `poll_transmit`), computes its next timeout; the host takes the frame, flushes,
//! answers the request exactly once ([`ExactlyOnce::serve`]), flushes again and computes its next
//! timeout; the controller takes the response, flushes and decodes it. Every frame is sealed and
//! opened; the channel acknowledges by piggy-backing as on the wire.

use std::time::Instant;

use thiserror::Error;

use crate::auth::{AuthError, KeyFile, Keyring, Sealer};
use crate::control::{ExactlyOnce, Message, Request, Verb};
use crate::endpoint::{Config, Endpoint, Event, SendError};
use crate::frame::AeadAlg;
use crate::payload::Role;

/// Errors of this module.
#[derive(Debug, Error)]
pub enum HotPathError {
    /// No keys.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The endpoints did not discover each other.
    #[error("the endpoints did not discover each other")]
    Discovery,
    /// A request could not be queued.
    #[error(transparent)]
    Send(#[from] SendError),
    /// The response did not come back in the same round trip.
    #[error("no response to request {0}")]
    NoResponse(u64),
}

/// Simulated time between the steps of a round trip, µs (well inside every timer, so no ack,
/// probe or retransmission is due: the round trip is the request and the response only).
const STEP_US: u64 = 5;

/// A controller and a host joined through memory.
#[derive(Debug)]
pub struct HotPath {
    ctl: Endpoint,
    host: Endpoint,
    server: ExactlyOnce,
    host_id: u32,
    next_id: u64,
    now: u64,
    to_host: Wire,
    to_ctl: Wire,
    frames: u64,
}

/// What [`HotPath::run`] measured.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct HotPathReport {
    /// Round trips completed.
    pub round_trips: u64,
    /// Frames sealed and opened per round trip.
    pub frames_per_round_trip: f64,
    /// Wall time per round trip, ns (both ends on this thread).
    pub ns_per_round_trip: f64,
}

/// Frames in transit one way, in buffers reused like the event loop's receive batch.
#[derive(Debug, Default)]
struct Wire {
    frames: Vec<Vec<u8>>,
    spare: Vec<Vec<u8>>,
}

/// `poll` and drain `poll_transmit_into` onto `wire`, as [`crate::node::Node::flush`] does.
fn flush(ep: &mut Endpoint, now: u64, wire: &mut Wire) {
    ep.poll(now);
    loop {
        let mut f = wire.spare.pop().unwrap_or_default();
        if !ep.poll_transmit_into(&mut f) {
            wire.spare.push(f);
            return;
        }
        wire.frames.push(f);
    }
}

/// Hands every frame on `wire` to `ep`.
fn deliver(ep: &mut Endpoint, now: u64, wire: &mut Wire) -> u64 {
    let n = wire.frames.len() as u64;
    for mut f in wire.frames.drain(..) {
        ep.handle_frame(now, &mut f);
        wire.spare.push(f);
    }
    n
}

impl HotPath {
    /// A controller and a host with a fresh key, up and known to each other.
    pub fn new(alg: AeadAlg) -> Result<HotPath, HotPathError> {
        let keys = KeyFile::generate()?;
        let endpoint = |name: &str, role, id: u32| {
            Endpoint::new(
                Config::new(name, role),
                [2, 0, 0, 0, 0, id as u8],
                Keyring::new(&keys),
                Sealer::new(id, 1, alg),
                0,
            )
        };
        let mut hp = HotPath {
            ctl: endpoint("ctl", Role::Controller, 1),
            host: endpoint("host", Role::Host, 2),
            server: ExactlyOnce::default(),
            host_id: 2,
            next_id: 0,
            now: 0,
            to_host: Wire::default(),
            to_ctl: Wire::default(),
            frames: 0,
        };
        // Discovery: HELLOs both ways (the controller's asks for a reply).
        for _ in 0..3 {
            hp.now += STEP_US;
            flush(&mut hp.ctl, hp.now, &mut hp.to_host);
            flush(&mut hp.host, hp.now, &mut hp.to_ctl);
            deliver(&mut hp.host, hp.now, &mut hp.to_host);
            deliver(&mut hp.ctl, hp.now, &mut hp.to_ctl);
        }
        while hp.ctl.poll_event().is_some() {}
        while hp.host.poll_event().is_some() {}
        if hp.ctl.find_peer("host").is_none() || hp.host.find_peer("ctl").is_none() {
            return Err(HotPathError::Discovery);
        }
        Ok(hp)
    }

    /// One echo request and its response.
    pub fn round_trip(&mut self) -> Result<(), HotPathError> {
        let id = self.next_id + 1;
        self.now += STEP_US;
        // The controller: `Client::submit`, then a `Node::step` up to its wait.
        let req = Message::Request(Request {
            id,
            verb: Verb::Echo { n: id },
        });
        self.ctl.send(self.host_id, req.to_bytes())?;
        self.next_id = id;
        flush(&mut self.ctl, self.now, &mut self.to_host);
        let _ = self.ctl.next_timeout();
        // The host: a `Node::step` receiving the request, then `fabricd` answering it, then the
        // next step's flush and wait.
        self.now += STEP_US;
        self.frames += deliver(&mut self.host, self.now, &mut self.to_host);
        flush(&mut self.host, self.now, &mut self.to_ctl);
        while let Some(e) = self.host.poll_event() {
            if let Event::Message { from, payload } = e {
                let resp = self.server.serve(from, &payload, |v| match v {
                    Verb::Echo { n } => Ok(serde_json::json!(n)),
                    _ => Err("not an echo".into()),
                });
                if let Some(resp) = resp {
                    self.host.send(from, resp)?;
                }
            }
        }
        flush(&mut self.host, self.now, &mut self.to_ctl);
        let _ = self.host.next_timeout();
        // The controller: the step that receives the response, and `Client::pump`.
        self.now += STEP_US;
        self.frames += deliver(&mut self.ctl, self.now, &mut self.to_ctl);
        flush(&mut self.ctl, self.now, &mut self.to_host);
        let mut answered = false;
        while let Some(e) = self.ctl.poll_event() {
            if let Event::Message { payload, .. } = e {
                answered |= matches!(Message::parse(&payload),
                    Ok(Message::Response(r)) if r.id == id && r.result.is_ok());
            }
        }
        if !answered {
            return Err(HotPathError::NoResponse(id));
        }
        Ok(())
    }

    /// Runs `count` round trips and reports.
    pub fn run(&mut self, count: u64) -> Result<HotPathReport, HotPathError> {
        let frames0 = self.frames;
        let t0 = Instant::now();
        for _ in 0..count {
            self.round_trip()?;
        }
        let secs = t0.elapsed().as_secs_f64();
        let n = count.max(1) as f64;
        Ok(HotPathReport {
            round_trips: count,
            frames_per_round_trip: (self.frames - frames0) as f64 / n,
            ns_per_round_trip: secs * 1e9 / n,
        })
    }

    /// The host's exactly-once counters.
    pub fn server_stats(&self) -> crate::control::ExecStats {
        self.server.stats()
    }

    /// Reliable-channel counters of the controller and the host.
    pub fn channel_stats(&self) -> [crate::channel::ChannelStats; 2] {
        [self.ctl.stats().channel, self.host.stats().channel]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_are_two_frames_each_and_execute_once() {
        for alg in [AeadAlg::Aes256Gcm, AeadAlg::ChaCha20Poly1305] {
            let mut hp = HotPath::new(alg).unwrap();
            let r = hp.run(500).unwrap();
            assert_eq!(r.round_trips, 500);
            // One DATA frame each way, acks piggy-backed, nothing resent.
            assert_eq!(r.frames_per_round_trip, 2.0, "{alg:?}");
            let s = hp.server_stats();
            assert_eq!((s.executed, s.duplicates, s.out_of_order), (500, 0, 0));
            for c in hp.channel_stats() {
                assert_eq!((c.sent, c.delivered), (500, 500));
                assert_eq!(c.timeout_retransmits + c.fast_retransmits + c.duplicates, 0);
            }
        }
    }
}
