//! Deterministic simulation of endpoints on a lossy, reordering, duplicating, delaying link,
//! with a simulated clock (tests only).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use crate::auth::{KeyFile, Keyring, Sealer};
use crate::control::{ExactlyOnce, Message, Request, Verb};
use crate::endpoint::{Config, Endpoint, Event};
use crate::frame::AeadAlg;
use crate::payload::Role;

/// xorshift64*: a tiny deterministic generator, enough for impairments in tests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// True with probability `pct` percent.
    fn chance(&mut self, pct: f64) -> bool {
        (self.next() % 1_000_000) as f64 / 10_000.0 < pct
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Impair {
    loss_pct: f64,
    dup_pct: f64,
    delay_us: u64,
    jitter_us: u64,
    cut: bool,
}

/// A frame on the simulated wire: arrival time, tie-break order, destination node, bytes.
type InFlight = (u64, u64, usize, Vec<u8>);

struct Net {
    nodes: Vec<Endpoint>,
    wire: BinaryHeap<Reverse<InFlight>>,
    impair: Impair,
    rng: Rng,
    now: u64,
    order: u64,
    sent: u64,
    capture: Option<Vec<Vec<u8>>>,
}

const T_START: u64 = 1_000_000;

fn endpoint(name: &str, role: Role, keys: &KeyFile, id: u32, t_us: u64) -> Endpoint {
    let mut cfg = Config::new(name, role);
    cfg.link_tolerance_us = t_us;
    let mac = [2, 0, 0, 0, 0, id as u8];
    let alg = if id % 2 == 0 {
        AeadAlg::Aes256Gcm
    } else {
        AeadAlg::ChaCha20Poly1305
    };
    Endpoint::new(
        cfg,
        mac,
        Keyring::new(keys),
        Sealer::new(id, 1, alg),
        T_START,
    )
}

impl Net {
    fn new(impair: Impair, t_us: u64, seed: u64) -> Net {
        Net::with_keys(impair, t_us, seed, &KeyFile::generate().unwrap())
    }

    fn with_keys(impair: Impair, t_us: u64, seed: u64, keys: &KeyFile) -> Net {
        let keys = keys.clone();
        Net {
            capture: None,
            nodes: vec![
                endpoint("ctl", Role::Controller, &keys, 1, t_us),
                endpoint("host", Role::Host, &keys, 2, t_us),
            ],
            wire: BinaryHeap::new(),
            impair,
            rng: Rng(seed | 1),
            now: T_START,
            order: 0,
            sent: 0,
        }
    }

    fn put(&mut self, to: usize, f: Vec<u8>) {
        self.sent += 1;
        if let Some(c) = self.capture.as_mut().filter(|_| to == 1) {
            c.push(f.clone());
        }
        if self.impair.cut || self.rng.chance(self.impair.loss_pct) {
            return;
        }
        let copies = if self.rng.chance(self.impair.dup_pct) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let jitter = if self.impair.jitter_us > 0 {
                self.rng.next() % self.impair.jitter_us
            } else {
                0
            };
            // Without jitter the link keeps order; 20 µs is the veth RTT's order of magnitude.
            let at = self.now + 10 + self.impair.delay_us + jitter;
            self.order += 1;
            self.wire.push(Reverse((at, self.order, to, f.clone())));
        }
    }

    /// Runs until `end`, handing events to `app` (which may send).
    fn run(&mut self, end: u64, app: &mut dyn FnMut(&mut Net, usize, Event)) {
        loop {
            let mut next = self
                .nodes
                .iter()
                .map(|n| n.next_timeout())
                .min()
                .unwrap_or(end);
            if let Some(Reverse((t, ..))) = self.wire.peek() {
                next = next.min(*t);
            }
            if next > end {
                self.now = end;
                return;
            }
            self.now = self.now.max(next);
            while self
                .wire
                .peek()
                .is_some_and(|Reverse((t, ..))| *t <= self.now)
            {
                let Some(Reverse((_, _, to, mut f))) = self.wire.pop() else {
                    break;
                };
                self.nodes[to].handle_frame(self.now, &mut f);
            }
            for i in 0..self.nodes.len() {
                self.nodes[i].poll(self.now);
                while let Some(f) = self.nodes[i].poll_transmit() {
                    self.put(1 - i, f);
                }
                while let Some(e) = self.nodes[i].poll_event() {
                    app(self, i, e);
                }
                // Events may have queued messages.
                self.nodes[i].poll(self.now);
                while let Some(f) = self.nodes[i].poll_transmit() {
                    self.put(1 - i, f);
                }
            }
        }
    }
}

/// The controller side of the request workload.
#[derive(Default)]
struct Workload {
    total: u64,
    window: u64,
    next_id: u64,
    issued: BTreeMap<u64, u64>,
    latencies: Vec<u64>,
    host_id: Option<u32>,
    ctl_id: Option<u32>,
    executed: Vec<u64>,
    server: ExactlyOnce,
    downs: Vec<u64>,
    ups: Vec<u64>,
}

impl Workload {
    fn issue(&mut self, net: &mut Net) {
        let Some(host) = self.host_id else { return };
        while self.next_id < self.total && (self.issued.len() as u64) < self.window {
            self.next_id += 1;
            let id = self.next_id;
            let m = Message::Request(Request {
                id,
                verb: Verb::Echo { n: id },
            });
            if net.nodes[0].send(host, m.to_bytes()).is_err() {
                self.next_id -= 1;
                return;
            }
            self.issued.insert(id, net.now);
        }
    }

    fn on_event(&mut self, net: &mut Net, node: usize, e: Event) {
        match (node, e) {
            (0, Event::PeerUp(p)) => {
                self.host_id = Some(p.id);
                self.ups.push(net.now);
                self.issue(net);
            }
            (1, Event::PeerUp(p)) => self.ctl_id = Some(p.id),
            (0, Event::PeerDown(_)) => self.downs.push(net.now),
            (1, Event::Message { from, payload }) => {
                let Ok(Message::Request(req)) = Message::parse(&payload) else {
                    panic!("bad request")
                };
                let executed = &mut self.executed;
                let resp = self.server.handle(from, &req, |v| {
                    let Verb::Echo { n } = v else {
                        return Err("unexpected".into());
                    };
                    executed.push(*n);
                    Ok(serde_json::json!(n))
                });
                net.nodes[1]
                    .send(from, Message::Response(resp).to_bytes())
                    .unwrap();
            }
            (0, Event::Message { payload, .. }) => {
                let Ok(Message::Response(r)) = Message::parse(&payload) else {
                    panic!("bad response")
                };
                let t0 = self.issued.remove(&r.id).expect("one response per request");
                self.latencies.push(net.now - t0);
                self.issue(net);
            }
            _ => {}
        }
    }

    fn p(&self, q: f64) -> u64 {
        let mut v = self.latencies.clone();
        v.sort_unstable();
        v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
    }
}

fn run_workload(impair: Impair, total: u64, window: u64, seed: u64) -> (Net, Workload) {
    let mut net = Net::new(impair, 1_000_000, seed);
    let mut w = Workload {
        total,
        window,
        ..Workload::default()
    };
    net.run(T_START + 600_000_000, &mut |n, i, e| w.on_event(n, i, e));
    (net, w)
}

fn check_exactly_once(name: &str, net: &Net, w: &Workload) {
    assert_eq!(w.latencies.len() as u64, w.total, "{name}: all complete");
    assert_eq!(
        w.executed,
        (1..=w.total).collect::<Vec<_>>(),
        "{name}: each executed once, in order"
    );
    let s = w.server.stats();
    assert_eq!((s.duplicates, s.out_of_order), (0, 0), "{name}");
    println!(
        "{name}: {} requests, p50 {} µs, p99 {} µs, frames {} (host stats {:?})",
        w.total,
        w.p(0.5),
        w.p(0.99),
        net.sent,
        net.nodes[1].stats().channel
    );
}

#[test]
fn requests_clean_link() {
    let (net, w) = run_workload(Impair::default(), 10_000, 64, 1);
    check_exactly_once("clean", &net, &w);
    assert_eq!(net.nodes[0].stats().channel.timeout_retransmits, 0);
}

#[test]
fn requests_under_one_percent_loss() {
    let (net, w) = run_workload(
        Impair {
            loss_pct: 1.0,
            ..Impair::default()
        },
        10_000,
        1,
        2,
    );
    check_exactly_once("1% loss, one at a time", &net, &w);
    // Loss recovery is bounded by the RTO floor (1 ms) plus a round trip, far below TCP's 200 ms.
    assert!(w.p(0.99) < 2_500, "p99 {}", w.p(0.99));
}

#[test]
fn requests_under_ten_percent_loss_reorder_dup_delay() {
    let (net, w) = run_workload(
        Impair {
            loss_pct: 10.0,
            dup_pct: 5.0,
            delay_us: 5_000,
            jitter_us: 2_000,
            cut: false,
        },
        10_000,
        64,
        3,
    );
    check_exactly_once("10% loss + 5% dup + 5 ms delay + 2 ms jitter", &net, &w);
    let st = net.nodes[1].stats().channel;
    assert!(st.duplicates > 0 && st.out_of_order > 0, "{st:?}");
}

#[test]
fn link_supervision_detects_cut_within_t_and_recovers() {
    let t = 50_000;
    let mut net = Net::new(Impair::default(), t, 4);
    let mut w = Workload {
        total: 2_000,
        window: 8,
        ..Workload::default()
    };
    let cut_at = T_START + 300_000;
    net.run(cut_at, &mut |n, i, e| w.on_event(n, i, e));
    assert!(!w.latencies.is_empty());
    net.impair.cut = true;
    net.run(cut_at + 3 * t, &mut |n, i, e| w.on_event(n, i, e));
    assert_eq!(w.downs.len(), 1, "one down event");
    let detect = w.downs[0] - cut_at;
    assert!(detect <= t, "detected after {detect} µs, T = {t} µs");
    // The timer is due at exactly last-frame-heard + T, and the record says so.
    let down = net.nodes[0]
        .links()
        .into_iter()
        .find_map(|l| l.last_down)
        .expect("a link-down record");
    assert_eq!(down.silence_us, t, "{down:?}");
    assert_eq!(down.detected_us, w.downs[0]);
    assert_eq!(down.detected_us - down.last_heard_us, t);
    // Requests issued during the outage fail with a clear error.
    let host = w.host_id.unwrap();
    let err = net.nodes[0].send(host, vec![1]).unwrap_err();
    assert_eq!(err.to_string(), "link to host is down");
    let back = net.now;
    net.impair.cut = false;
    net.run(back + 60_000_000, &mut |n, i, e| w.on_event(n, i, e));
    assert_eq!(w.ups.len(), 2, "link came back");
    assert!(
        w.ups[1] - back <= t / 4 + 1_000,
        "recovery took {} µs",
        w.ups[1] - back
    );
    check_exactly_once("cut and recovery", &net, &w);
}

#[test]
fn key_rotation_keeps_links_up() {
    let mut kf = KeyFile::generate().unwrap();
    let mut net = Net::with_keys(Impair::default(), 50_000, 5, &kf);
    let mut w = Workload {
        total: 3_000,
        window: 4,
        ..Workload::default()
    };
    net.run(T_START + 100_000, &mut |n, i, e| w.on_event(n, i, e));
    assert!(!w.latencies.is_empty());
    // Rotate as knet does: every host learns epoch 2 (host first, then controller), senders
    // move to it once the peer announces it, then epoch 1 is retired everywhere.
    kf.rotate().unwrap();
    let now = net.now;
    net.nodes[1].set_keys(Keyring::new(&kf), now);
    net.run(now + 100_000, &mut |n, i, e| w.on_event(n, i, e));
    net.nodes[0].set_keys(Keyring::new(&kf), net.now);
    net.run(net.now + 3_000_000, &mut |n, i, e| w.on_event(n, i, e));
    assert!(kf.retire(1));
    for i in 0..2 {
        net.nodes[i].set_keys(Keyring::new(&kf), net.now);
    }
    net.run(net.now + 60_000_000, &mut |n, i, e| w.on_event(n, i, e));
    assert!(w.downs.is_empty(), "no link went down");
    let d = net.nodes[1].stats().dropped;
    assert_eq!(d.total(), 0, "{d:?}");
    check_exactly_once("key rotation", &net, &w);
}

#[test]
fn attacks_are_dropped_and_counted() {
    let mut net = Net::new(Impair::default(), 1_000_000, 6);
    net.capture = Some(Vec::new());
    let mut w = Workload {
        total: 500,
        window: 4,
        ..Workload::default()
    };
    net.run(T_START + 20_000, &mut |n, i, e| w.on_event(n, i, e));
    let captured = net.capture.take().unwrap();
    let genuine = captured
        .iter()
        .find(|f| crate::frame::Frame::parse(f).unwrap().header().kind == crate::frame::Kind::Data)
        .expect("a DATA frame went to the host")
        .clone();
    let other_keys = Keyring::new(&KeyFile::generate().unwrap());
    let mut stranger = Sealer::new(77, 1, AeadAlg::Aes256Gcm);
    let hdr = crate::frame::Frame::parse(&genuine).unwrap().header();
    let foreign = stranger
        .seal(&other_keys, 1, [2, 0, 0, 0, 0, 2], [6; 6], hdr, b"{}")
        .unwrap();
    let mut unknown_epoch = foreign.clone();
    unknown_epoch[crate::frame::ETH_HEADER_LEN + 17] = 42;
    // A bit flip in the counter: a fresh nonce, so it passes the replay check and fails the tag.
    let mut forged = genuine.clone();
    forged[crate::frame::ETH_HEADER_LEN + 23] ^= 0x80;
    let mut old_version = genuine.clone();
    old_version[crate::frame::ETH_HEADER_LEN + 4] = 0;
    let attacks: Vec<Vec<u8>> = vec![
        forged,
        genuine.clone(),
        foreign,
        unknown_epoch,
        genuine[..30].to_vec(),
        vec![0xAB; 200],
        old_version,
    ];
    let before = net.nodes[1].stats().dropped;
    for mut a in attacks {
        net.nodes[1].handle_frame(net.now, &mut a);
    }
    let d = net.nodes[1].stats().dropped;
    assert_eq!(d.forged - before.forged, 2, "bit flip and wrong key: {d:?}");
    assert_eq!(d.replayed - before.replayed, 1, "{d:?}");
    assert_eq!(d.unknown_key - before.unknown_key, 1, "{d:?}");
    assert_eq!(
        d.malformed - before.malformed,
        2,
        "truncated and garbage: {d:?}"
    );
    assert_eq!(d.version - before.version, 1, "{d:?}");
    // The daemon keeps working, and nothing was executed twice.
    net.run(net.now + 60_000_000, &mut |n, i, e| w.on_event(n, i, e));
    check_exactly_once("after attacks", &net, &w);
}

#[test]
fn large_messages_are_fragmented_and_reassembled() {
    let mut net = Net::new(
        Impair {
            loss_pct: 5.0,
            jitter_us: 500,
            ..Impair::default()
        },
        1_000_000,
        7,
    );
    let mut got = Vec::new();
    net.run(T_START + 10_000, &mut |_, _, _| {});
    let host = net.nodes[0].peers()[0].0.id;
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    net.nodes[0].send(host, big.clone()).unwrap();
    net.nodes[0].send(host, b"small".to_vec()).unwrap();
    net.nodes[0].send(host, Vec::new()).unwrap();
    net.run(net.now + 10_000_000, &mut |_, i, e| {
        if let (1, Event::Message { payload, .. }) = (i, e) {
            got.push(payload);
        }
    });
    assert_eq!(got, vec![big, b"small".to_vec(), Vec::new()]);
    assert!(net.nodes[0]
        .send(host, vec![0; crate::endpoint::MAX_MESSAGE + 1])
        .is_err());
}
