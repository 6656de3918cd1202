//! Authenticated but hostile input: a peer holding the key sends arbitrary sequences of
//! frames (any kind, flags, sequence/ack numbers, windows, payloads). The endpoint must never
//! panic and must keep its invariants; the input is sealed here so it passes authentication.
#![no_main]

use std::sync::OnceLock;

use fabric::auth::{KeyFile, Keyring, Sealer};
use fabric::endpoint::{Config, Endpoint};
use fabric::frame::{AeadAlg, Header, Kind};
use fabric::payload::Role;
use libfuzzer_sys::fuzz_target;

fn key_file() -> &'static KeyFile {
    static K: OnceLock<KeyFile> = OnceLock::new();
    K.get_or_init(|| KeyFile::parse(&format!("epoch 1 {}\n", "22".repeat(32))).unwrap())
}

fuzz_target!(|data: &[u8]| {
    let keys = Keyring::new(key_file());
    let mut ep = Endpoint::new(
        Config::new("target", Role::Host),
        [2, 0, 0, 0, 0, 1],
        Keyring::new(key_file()),
        Sealer::new(1, 1, AeadAlg::Aes256Gcm),
        0,
    );
    let mut peer = Sealer::new(2, 1, AeadAlg::ChaCha20Poly1305);
    let mut now = 0u64;
    // Records: kind, flags, seq(4), ack(4), window(2), time step(2), len, payload.
    let mut d = data;
    while d.len() >= 15 {
        let kind = match d[0] % 5 {
            0 => Kind::Hello,
            1 => Kind::Data,
            2 => Kind::Ack,
            3 => Kind::Probe,
            _ => Kind::Monitor,
        };
        let h = Header {
            kind,
            aead: AeadAlg::ChaCha20Poly1305,
            flags: d[1] & 1,
            sender: 0,
            receiver: if d[1] & 2 != 0 { 1 } else { 0 },
            epoch: 1,
            counter: 0,
            seq: u32::from_be_bytes([d[2], d[3], d[4], d[5]]),
            ack: u32::from_be_bytes([d[6], d[7], d[8], d[9]]),
            window: u16::from_be_bytes([d[10], d[11]]),
        };
        now += u64::from(u16::from_be_bytes([d[12], d[13]]));
        let len = usize::from(d[14]).min(d.len() - 15);
        let payload = &d[15..15 + len];
        d = &d[15 + len..];
        if let Ok(mut f) = peer.seal(&keys, 1, [2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], h, payload) {
            ep.handle_frame(now, &mut f);
        }
        ep.poll(now);
        while ep.poll_transmit().is_some() {}
        while ep.poll_event().is_some() {}
    }
});
