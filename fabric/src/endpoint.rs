//! One node on the segment, as an I/O-free state machine: discovery, per-peer reliable channels,
//! link supervision, authentication. The caller feeds received frames and the time (µs on a
//! monotonic clock), and takes frames to transmit and events.
//!
//! - Discovery (TIPC `discover.c`): broadcast HELLO every 125 ms at first, doubling up to a
//!   ceiling; a HELLO with "reply wanted" is answered by a unicast HELLO.
//! - Link supervision (TIPC tolerance, knet ping): a peer silent for T/4 gets a PROBE, which it
//!   answers with an ACK; a peer silent for T is declared down. Any frame from it brings it back
//!   up, and everything unacknowledged is resent at once. T is configurable down to 50 ms.
//! - The sender id is random per process, so a restarted peer is a new peer; frames carry the
//!   receiver's id, and frames for another process (or an old incarnation) are ignored.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use thiserror::Error;

use crate::auth::{DropStats, Keyring, Reject, Sealer, Verifier};
use crate::channel::{self, ChannelConfig, ChannelStats, Rx, Tx};
use crate::frame::{self, Header, Kind, BROADCAST, FLAG_REPLY_WANTED};
use crate::payload::{self, Hello, Role};

/// Errors of [`Endpoint::send`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SendError {
    /// No such peer (never heard, or forgotten).
    #[error("unknown peer {0:08x}")]
    UnknownPeer(u32),
    /// The link to the peer is down.
    #[error("link to {0} is down")]
    LinkDown(String),
    /// The message does not fit in one frame.
    #[error("message of {0} bytes is larger than a frame")]
    TooLarge(usize),
    /// The peer's queue is full.
    #[error(transparent)]
    Channel(#[from] channel::ChannelError),
}

/// Configuration of an endpoint.
#[derive(Debug, Clone)]
pub struct Config {
    /// Our name (in HELLO).
    pub name: String,
    /// Our role.
    pub role: Role,
    /// Link tolerance T: probe after T/4 of silence, down after T.
    pub link_tolerance_us: u64,
    /// First HELLO interval.
    pub hello_min_us: u64,
    /// Ceiling of the HELLO back-off.
    pub hello_max_us: u64,
    /// Whether our HELLOs ask peers to answer (controllers do, to find hosts quickly).
    pub hello_reply_wanted: bool,
    /// A peer down for this long is forgotten.
    pub forget_after_us: u64,
    /// Reliable-channel tunables.
    pub channel: ChannelConfig,
}

impl Config {
    /// Defaults for a node called `name` with `role`.
    pub fn new(name: &str, role: Role) -> Config {
        Config {
            name: name.to_string(),
            role,
            link_tolerance_us: 1_000_000,
            hello_min_us: 125_000,
            hello_max_us: 2_000_000,
            hello_reply_wanted: role == Role::Controller,
            forget_after_us: 60_000_000,
            channel: ChannelConfig::default(),
        }
    }
}

/// What a peer is, as learned from its HELLO.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerInfo {
    /// Its sender id.
    pub id: u32,
    /// Its MAC address.
    #[serde(serialize_with = "ser_mac")]
    pub mac: [u8; 6],
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: Role,
}

fn ser_mac<S: serde::Serializer>(m: &[u8; 6], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&frame::mac_to_string(m))
}

/// Something the application should know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new peer, or a peer whose link came back.
    PeerUp(PeerInfo),
    /// The link to a peer is down (silent for T).
    PeerDown(PeerInfo),
    /// A peer was down too long and is forgotten; what it had not acknowledged is lost.
    PeerGone(PeerInfo),
    /// A message from a peer, in order, exactly once.
    Message {
        /// Sender id.
        from: u32,
        /// The message.
        payload: Vec<u8>,
    },
    /// A monitoring report (0x88B6), authenticated.
    Monitor {
        /// Sender id.
        from: u32,
        /// Sender MAC.
        mac: [u8; 6],
        /// The report.
        payload: Vec<u8>,
    },
}

/// Counters of an endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Frames handed to the caller for transmission.
    pub frames_out: u64,
    /// Authenticated frames accepted.
    pub frames_in: u64,
    /// Frames dropped, by reason.
    pub dropped: DropStats,
    /// Reliable-channel counters, summed over peers.
    pub channel: ChannelStats,
    /// Links declared down.
    pub links_down: u64,
    /// Probes sent.
    pub probes: u64,
}

/// The state of the link to one peer, times on the endpoint's clock (µs).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LinkStatus {
    /// The peer.
    pub peer: PeerInfo,
    /// Whether the link is up.
    pub up: bool,
    /// When the last authenticated frame from the peer arrived.
    pub last_heard_us: u64,
    /// The latest time the link was declared down, if ever.
    pub last_down: Option<LinkDown>,
}

/// One link-down detection (see [`LinkStatus`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LinkDown {
    /// When the last frame before the silence arrived.
    pub last_heard_us: u64,
    /// When the link was declared down.
    pub detected_us: u64,
    /// `detected_us - last_heard_us`: the silence it took (T plus how late the check ran).
    pub silence_us: u64,
}

#[derive(Debug)]
struct Peer {
    info: PeerInfo,
    newest_epoch: u16,
    up: bool,
    last_rx: u64,
    last_probe: u64,
    last_down: Option<LinkDown>,
    tx: Tx,
    rx: Rx,
    /// Fragments of a message being reassembled.
    partial: Vec<u8>,
}

/// What sealing and queueing a frame needs, apart from the peers (so that a peer's channel
/// can stay borrowed while its frames are sealed).
#[derive(Debug)]
struct Emitter {
    mac: [u8; 6],
    keys: Keyring,
    sealer: Sealer,
    out: VecDeque<Vec<u8>>,
    /// Buffers of frames already transmitted ([`Endpoint::poll_transmit_into`]), reused for
    /// the next ones: no allocation per frame.
    spare: Vec<Vec<u8>>,
    frames_out: u64,
}

/// Most spare frame buffers kept.
const SPARE_BUFFERS: usize = 64;

impl Emitter {
    fn header(&self, kind: Kind, receiver: u32) -> Header {
        Header {
            kind,
            aead: self.sealer.alg(),
            flags: 0,
            sender: 0,
            receiver,
            epoch: 0,
            counter: 0,
            seq: 0,
            ack: 0,
            window: 0,
        }
    }

    fn emit(&mut self, epoch: u16, dst: [u8; 6], h: Header, payload: &[u8]) -> Result<(), ()> {
        let mut f = self.spare.pop().unwrap_or_default();
        match self
            .sealer
            .seal_into(&mut f, &self.keys, epoch, (dst, self.mac), h, payload)
        {
            Ok(()) => {
                self.frames_out += 1;
                self.out.push_back(f);
                Ok(())
            }
            Err(e) => {
                self.spare.push(f);
                log::error!("cannot seal a frame: {e}");
                Err(())
            }
        }
    }

    /// Seals DATA frames `seqs` of `p`'s channel, with the cumulative ack piggy-backed.
    fn data(&mut self, id: u32, p: &mut Peer, seqs: &[u64]) {
        if seqs.is_empty() {
            return;
        }
        let (mac, epoch) = (p.info.mac, self.keys.epoch_for(p.newest_epoch));
        let (ack, window) = (p.rx.cum_ack(), p.rx.window());
        // DATA carries the cumulative ack; selective-ack blocks need a standalone ACK.
        if !p.rx.has_gaps() {
            p.rx.acked();
        }
        for &seq in seqs {
            let Some(payload) = p.tx.payload(seq) else {
                continue;
            };
            let mut h = self.header(Kind::Data, id);
            h.seq = channel::wire(seq);
            h.ack = ack;
            h.window = window;
            let _ = self.emit(epoch, mac, h, payload);
        }
    }
}

/// One node: its peers, channels and keys.
#[derive(Debug)]
pub struct Endpoint {
    cfg: Config,
    em: Emitter,
    verifier: Verifier,
    /// By sender id. FxHash rather than SipHash: ids are small integers, hashed several times
    /// per frame, and only authenticated HELLOs insert (no flooding without the key).
    peers: FxHashMap<u32, Peer>,
    events: VecDeque<Event>,
    /// Scratch lists reused by `poll` and `handle_frame` (peer ids, sequence numbers).
    scratch_ids: Vec<u32>,
    scratch_seqs: Vec<u64>,
    stats: Stats,
    hello_next: u64,
    hello_interval: u64,
    last_unsolicited_hello: Option<u64>,
    reject_logs: u64,
}

/// Largest message [`Endpoint::send`] takes (sent in fragments of one frame each).
pub const MAX_MESSAGE: usize = 1 << 20;

/// Least time between HELLOs sent to unknown senders of DATA/ACK/PROBE frames.
const UNSOLICITED_HELLO_GAP_US: u64 = 10_000;

impl Endpoint {
    /// A node with MAC `mac`, keys `keys` and a sealer (which fixes our sender id).
    pub fn new(cfg: Config, mac: [u8; 6], keys: Keyring, sealer: Sealer, now: u64) -> Endpoint {
        Endpoint {
            hello_interval: cfg.hello_min_us,
            cfg,
            em: Emitter {
                mac,
                keys,
                sealer,
                out: VecDeque::new(),
                spare: Vec::new(),
                frames_out: 0,
            },
            verifier: Verifier::default(),
            peers: FxHashMap::default(),
            events: VecDeque::new(),
            scratch_ids: Vec::new(),
            scratch_seqs: Vec::new(),
            stats: Stats::default(),
            hello_next: now,
            last_unsolicited_hello: None,
            reject_logs: 0,
        }
    }

    /// Our sender id.
    pub fn id(&self) -> u32 {
        self.em.sealer.sender()
    }

    /// Our MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.em.mac
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        Stats {
            frames_out: self.em.frames_out,
            ..self.stats
        }
    }

    /// Peers currently known, with whether their link is up.
    pub fn peers(&self) -> Vec<(PeerInfo, bool)> {
        let mut v: Vec<_> = self
            .peers
            .values()
            .map(|p| (p.info.clone(), p.up))
            .collect();
        v.sort_by(|a, b| a.0.name.cmp(&b.0.name).then(a.0.id.cmp(&b.0.id)));
        v
    }

    /// The links to every known peer, by name.
    pub fn links(&self) -> Vec<LinkStatus> {
        let mut v: Vec<_> = self
            .peers
            .values()
            .map(|p| LinkStatus {
                peer: p.info.clone(),
                up: p.up,
                last_heard_us: p.last_rx,
                last_down: p.last_down,
            })
            .collect();
        v.sort_by(|a, b| {
            a.peer
                .name
                .cmp(&b.peer.name)
                .then(a.peer.id.cmp(&b.peer.id))
        });
        v
    }

    /// Smoothed RTT to a peer, if measured.
    pub fn srtt(&self, peer: u32) -> Option<u64> {
        self.peers.get(&peer).and_then(|p| p.tx.rtt().srtt())
    }

    /// Messages queued or in flight to a peer.
    pub fn outstanding(&self, peer: u32) -> usize {
        self.peers.get(&peer).map_or(0, |p| p.tx.outstanding())
    }

    /// Installs new keys (a reloaded key file). Receivers accept every epoch held; senders move
    /// to the newest epoch a peer announces, so links stay up through a rotation.
    pub fn set_keys(&mut self, keys: Keyring, now: u64) {
        self.em.keys = keys;
        self.rediscover(now);
    }

    /// Restarts the HELLO back-off (send one now).
    pub fn rediscover(&mut self, now: u64) {
        self.hello_interval = self.cfg.hello_min_us;
        self.hello_next = now;
    }

    /// Queues `payload` for reliable, in-order, exactly-once delivery to `peer`. Messages larger
    /// than a frame are sent as fragments: each channel message starts with one byte, 1 if more
    /// fragments follow, 0 on the last one.
    pub fn send(&mut self, peer: u32, payload: Vec<u8>) -> Result<(), SendError> {
        if payload.len() > MAX_MESSAGE {
            return Err(SendError::TooLarge(payload.len()));
        }
        let p = self
            .peers
            .get_mut(&peer)
            .ok_or(SendError::UnknownPeer(peer))?;
        if !p.up {
            return Err(SendError::LinkDown(p.info.name.clone()));
        }
        let chunk = frame::MAX_PAYLOAD - 1;
        let n = payload.len().div_ceil(chunk).max(1);
        for i in 0..n {
            let part =
                &payload[(i * chunk).min(payload.len())..((i + 1) * chunk).min(payload.len())];
            let mut m = Vec::with_capacity(part.len() + 1);
            m.push(u8::from(i + 1 < n));
            m.extend_from_slice(part);
            p.tx.push(m)?;
        }
        Ok(())
    }

    /// Broadcasts a monitoring report on 0x88B6 (unreliable; the aggregator de-duplicates).
    pub fn send_monitor(&mut self, dst: [u8; 6], payload: &[u8]) -> Result<(), SendError> {
        let epoch = self.broadcast_epoch();
        let h = self.em.header(Kind::Monitor, 0);
        self.em
            .emit(epoch, dst, h, payload)
            .map_err(|_| SendError::TooLarge(payload.len()))
    }

    /// The next frame to transmit.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.em.out.pop_front()
    }

    /// The next frame to transmit, swapped into `buf` (whose old allocation is kept for a later
    /// frame): the event loop's way, without an allocation per frame.
    pub fn poll_transmit_into(&mut self, buf: &mut Vec<u8>) -> bool {
        let Some(mut f) = self.em.out.pop_front() else {
            return false;
        };
        std::mem::swap(buf, &mut f);
        if self.em.spare.len() < SPARE_BUFFERS && f.capacity() > 0 {
            self.em.spare.push(f);
        }
        true
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn broadcast_epoch(&self) -> u16 {
        let oldest_peer = self.peers.values().map(|p| p.newest_epoch).min();
        self.em
            .keys
            .epoch_for(oldest_peer.unwrap_or_else(|| self.em.keys.newest()))
    }

    fn send_hello(&mut self, dst: [u8; 6], receiver: u32, reply_wanted: bool) {
        let hello = Hello {
            role: self.cfg.role,
            newest_epoch: self.em.keys.newest(),
            name: self.cfg.name.clone(),
        };
        let Some(body) = hello.to_bytes() else {
            log::error!("node name {:?} is not valid", self.cfg.name);
            return;
        };
        let mut h = self.em.header(Kind::Hello, receiver);
        if reply_wanted {
            h.flags |= FLAG_REPLY_WANTED;
        }
        let epoch = match self.peers.get(&receiver) {
            Some(p) => self.em.keys.epoch_for(p.newest_epoch),
            None => self.broadcast_epoch(),
        };
        let _ = self.em.emit(epoch, dst, h, &body);
    }

    fn log_reject(&mut self, r: Reject) {
        // Anything the network can trigger is rate-limited: the first 10, then every 1000th.
        self.reject_logs += 1;
        if self.reject_logs <= 10 || self.reject_logs % 1000 == 0 {
            match r {
                Reject::Version(v) => log::warn!(
                    "dropped a frame from a peer speaking protocol version {v} (we speak {}) [{} drops]",
                    frame::VERSION,
                    self.reject_logs
                ),
                other => log::warn!("dropped a frame: {other:?} [{} drops]", self.reject_logs),
            }
        }
    }

    /// Takes one received frame (whole, Ethernet header included; decrypted in place).
    pub fn handle_frame(&mut self, now: u64, buf: &mut [u8]) {
        let (h, src, plain) = match self.verifier.open(&self.em.keys, buf) {
            Ok(v) => v,
            Err(r) => {
                self.stats.dropped.count(r);
                self.log_reject(r);
                return;
            }
        };
        if h.sender == self.id() || (h.receiver != 0 && h.receiver != self.id()) {
            return;
        }
        self.stats.frames_in += 1;
        match h.kind {
            Kind::Hello => match Hello::parse(plain) {
                Ok(hello) => self.on_hello(now, &h, src, hello),
                Err(e) => {
                    self.stats.dropped.malformed += 1;
                    log::debug!("bad HELLO: {e}");
                }
            },
            Kind::Monitor => self.events.push_back(Event::Monitor {
                from: h.sender,
                mac: src,
                payload: plain.to_vec(),
            }),
            Kind::Data | Kind::Ack | Kind::Probe => {
                let sacks = if h.kind == Kind::Ack {
                    match payload::parse_sacks(plain) {
                        Ok(s) => s,
                        Err(_) => {
                            self.stats.dropped.malformed += 1;
                            return;
                        }
                    }
                } else {
                    Vec::new()
                };
                self.on_link_frame(now, &h, src, &sacks, plain);
            }
        }
    }

    fn on_hello(&mut self, now: u64, h: &Header, src: [u8; 6], hello: Hello) {
        let info = PeerInfo {
            id: h.sender,
            mac: src,
            name: hello.name,
            role: hello.role,
        };
        let cfg = self.cfg.channel;
        match self.peers.get_mut(&h.sender) {
            Some(p) => {
                p.info = info;
                p.newest_epoch = hello.newest_epoch;
                Self::touch(p, now, &mut self.events);
            }
            None => {
                self.peers.insert(
                    h.sender,
                    Peer {
                        info: info.clone(),
                        newest_epoch: hello.newest_epoch,
                        up: true,
                        last_rx: now,
                        last_probe: now,
                        last_down: None,
                        tx: Tx::new(cfg),
                        rx: Rx::new(cfg),
                        partial: Vec::new(),
                    },
                );
                self.events.push_back(Event::PeerUp(info));
            }
        }
        if h.flags & FLAG_REPLY_WANTED != 0 {
            self.send_hello(src, h.sender, false);
        }
    }

    fn touch(p: &mut Peer, now: u64, events: &mut VecDeque<Event>) {
        p.last_rx = now;
        if !p.up {
            p.up = true;
            p.tx.kick();
            events.push_back(Event::PeerUp(p.info.clone()));
        }
    }

    fn on_link_frame(
        &mut self,
        now: u64,
        h: &Header,
        src: [u8; 6],
        sacks: &[(u32, u32)],
        body: &[u8],
    ) {
        let Some(p) = self.peers.get_mut(&h.sender) else {
            // A peer we never heard a HELLO from (we restarted, or its HELLO was lost): introduce
            // ourselves so it learns our new id, asking for its HELLO in return.
            if self
                .last_unsolicited_hello
                .is_none_or(|t| now >= t + UNSOLICITED_HELLO_GAP_US)
            {
                self.last_unsolicited_hello = Some(now);
                self.send_hello(src, 0, true);
            }
            return;
        };
        p.info.mac = src;
        Self::touch(p, now, &mut self.events);
        let mut resend = std::mem::take(&mut self.scratch_seqs);
        resend.clear();
        p.tx.on_ack(
            now,
            h.ack,
            sacks,
            h.window,
            &mut self.stats.channel,
            &mut resend,
        );
        let from = h.sender;
        match h.kind {
            Kind::Data => {
                let (partial, events, malformed) = (
                    &mut p.partial,
                    &mut self.events,
                    &mut self.stats.dropped.malformed,
                );
                p.rx.on_data(now, h.seq, body, &mut self.stats.channel, |frag| match frag
                    .split_first()
                {
                    Some((&more, body))
                        if more <= 1 && partial.len() + body.len() <= MAX_MESSAGE =>
                    {
                        partial.extend_from_slice(body);
                        if more == 0 {
                            let payload = std::mem::take(partial);
                            events.push_back(Event::Message { from, payload });
                        }
                    }
                    _ => {
                        *malformed += 1;
                        partial.clear();
                    }
                })
            }
            Kind::Probe => p.rx.ack_now(now),
            _ => {}
        }
        self.em.data(from, p, &resend);
        self.scratch_seqs = resend;
    }

    /// Does everything due at `now`: HELLOs, (re)transmissions, acks, probes, link state.
    pub fn poll(&mut self, now: u64) {
        if now >= self.hello_next {
            self.send_hello(BROADCAST, 0, self.cfg.hello_reply_wanted);
            self.hello_next = now + self.hello_interval;
            self.hello_interval = (self.hello_interval * 2).min(self.cfg.hello_max_us);
        }
        let t = self.cfg.link_tolerance_us;
        let mut ids = std::mem::take(&mut self.scratch_ids);
        ids.clear();
        ids.extend(self.peers.keys().copied());
        let mut seqs = std::mem::take(&mut self.scratch_seqs);
        for &id in &ids {
            let Some(p) = self.peers.get_mut(&id) else {
                continue;
            };
            let silent = now.saturating_sub(p.last_rx);
            if p.up && silent >= t {
                p.up = false;
                p.last_down = Some(LinkDown {
                    last_heard_us: p.last_rx,
                    detected_us: now,
                    silence_us: silent,
                });
                self.stats.links_down += 1;
                log::warn!(
                    "link to {} ({}) down: silent for {} ms",
                    p.info.name,
                    frame::mac_to_string(&p.info.mac),
                    silent / 1000
                );
                self.events.push_back(Event::PeerDown(p.info.clone()));
            }
            if !p.up && silent >= self.cfg.forget_after_us {
                if let Some(p) = self.peers.remove(&id) {
                    self.events.push_back(Event::PeerGone(p.info));
                }
                continue;
            }
            seqs.clear();
            if p.up {
                p.tx.poll(now, &mut self.stats.channel, &mut seqs);
            }
            self.em.data(id, p, &seqs);
            let probe_due = now.saturating_sub(p.last_rx.max(p.last_probe)) >= t / 4;
            if p.rx.ack_due(now) || probe_due {
                let (mac, epoch) = (p.info.mac, self.em.keys.epoch_for(p.newest_epoch));
                let (ack, window) = (p.rx.cum_ack(), p.rx.window());
                let kind = if probe_due {
                    p.last_probe = now;
                    self.stats.probes += 1;
                    Kind::Probe
                } else {
                    Kind::Ack
                };
                let mut h = self.em.header(kind, id);
                h.ack = ack;
                h.window = window;
                let body = if kind == Kind::Ack {
                    payload::sacks_to_bytes(&p.rx.sack_blocks())
                } else {
                    Vec::new()
                };
                p.rx.acked();
                let _ = self.em.emit(epoch, mac, h, &body);
            }
        }
        self.scratch_ids = ids;
        self.scratch_seqs = seqs;
    }

    /// The time at which [`Endpoint::poll`] next has work, if any.
    pub fn next_timeout(&self) -> u64 {
        let t = self.cfg.link_tolerance_us;
        let mut next = self.hello_next;
        for p in self.peers.values() {
            next = next.min(p.last_rx.max(p.last_probe) + t / 4);
            if p.up {
                next = next.min(p.last_rx + t);
                next = next.min(p.tx.next_timeout().unwrap_or(u64::MAX));
            } else {
                next = next.min(p.last_rx + self.cfg.forget_after_us);
            }
            next = next.min(p.rx.next_timeout().unwrap_or(u64::MAX));
        }
        next
    }

    /// Finds an up peer by name or MAC text.
    pub fn find_peer(&self, who: &str) -> Option<PeerInfo> {
        let mac = frame::parse_mac(who);
        self.peers
            .values()
            .filter(|p| p.up && (p.info.name == who || Some(p.info.mac) == mac))
            .max_by_key(|p| p.last_rx)
            .map(|p| p.info.clone())
    }
}
