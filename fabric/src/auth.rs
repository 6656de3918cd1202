//! Frame authentication: key files, AEAD sealing and opening, replay windows.
//!
//! Every frame is sealed with AES-256-GCM (`ring`), or ChaCha20-Poly1305 on CPUs without AES
//! instructions; receivers accept both. The associated data is the Ethernet header plus the
//! fabric header, the payload is encrypted. The nonce is `sender id ‖ counter`: the sender id is
//! random per process and the counter starts at the process start time in seconds shifted left by
//! 32 bits, then counts frames, so it never repeats for one key even across restarts.
//!
//! Keys come from a key file holding one 256-bit key per *epoch*. A frame names the epoch that
//! sealed it; receivers accept every epoch in their file. Rotation without dropping links, as
//! knet does with two crypto configs: add the new epoch to every host's file (the daemons reload
//! it), and each sender moves to the newest epoch its peer announces in HELLO.
//!
//! Replay: a 1024-frame sliding window per sender (as IPsec/MACsec), checked before and updated
//! after the tag is verified. The reliable channel's sequence number is separate from the nonce
//! counter, so a retransmission is a fresh frame and the channel de-duplicates it.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;
use std::path::Path;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use thiserror::Error;

use crate::frame::{self, AeadAlg, Frame, FrameError, Header};

/// Errors of this module.
#[derive(Debug, Error)]
pub enum AuthError {
    /// The key file could not be read.
    #[error("cannot read key file {path}")]
    Read {
        /// Path of the file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line of the key file is malformed.
    #[error("key file line {0}: expected `epoch N <64 hex digits>`")]
    Syntax(usize),
    /// The key file holds no key.
    #[error("key file holds no key")]
    Empty,
    /// No random numbers from the OS.
    #[error("no randomness from the OS")]
    Random,
    /// The frame could not be built (payload too large).
    #[error("payload of {0} bytes does not fit in a frame")]
    TooLarge(usize),
    /// Sealing needs a key epoch we do not have.
    #[error("no key for epoch {0}")]
    NoKey(u16),
}

/// Why a received frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Not a well-formed fabric frame (truncated, garbage, reserved bits).
    Malformed(FrameError),
    /// Another protocol version.
    Version(u8),
    /// Sealed with an epoch we have no key for.
    UnknownKey(u16),
    /// The tag did not verify.
    Forged,
    /// A frame already seen or older than the replay window.
    Replayed,
}

/// Counts of dropped frames, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DropStats {
    /// Truncated, garbage or otherwise malformed frames.
    pub malformed: u64,
    /// Frames of another protocol version.
    pub version: u64,
    /// Frames sealed with a key epoch we do not have.
    pub unknown_key: u64,
    /// Frames whose tag did not verify.
    pub forged: u64,
    /// Replayed frames.
    pub replayed: u64,
}

impl DropStats {
    /// Counts one rejection.
    pub fn count(&mut self, r: Reject) {
        match r {
            Reject::Malformed(_) => self.malformed += 1,
            Reject::Version(_) => self.version += 1,
            Reject::UnknownKey(_) => self.unknown_key += 1,
            Reject::Forged => self.forged += 1,
            Reject::Replayed => self.replayed += 1,
        }
    }

    /// All drops together.
    pub fn total(&self) -> u64 {
        self.malformed + self.version + self.unknown_key + self.forged + self.replayed
    }
}

/// The long-term keys of a host, one per epoch, as read from a key file.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyFile {
    keys: BTreeMap<u16, [u8; 32]>,
}

impl std::fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("KeyFile")
            .field("epochs", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl KeyFile {
    /// A new file with one random key at epoch 1.
    pub fn generate() -> Result<KeyFile, AuthError> {
        let mut key = [0u8; 32];
        SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| AuthError::Random)?;
        Ok(KeyFile {
            keys: BTreeMap::from([(1, key)]),
        })
    }

    /// Adds a new random key at the next epoch (rotation).
    pub fn rotate(&mut self) -> Result<u16, AuthError> {
        let epoch = self.newest().wrapping_add(1).max(1);
        let mut key = [0u8; 32];
        SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| AuthError::Random)?;
        self.keys.insert(epoch, key);
        Ok(epoch)
    }

    /// Removes an epoch's key once every sender has moved on; the last key stays.
    pub fn retire(&mut self, epoch: u16) -> bool {
        self.keys.len() > 1 && self.keys.remove(&epoch).is_some()
    }

    /// Parses the text form: `#` comments and lines `epoch N HEX64`.
    pub fn parse(text: &str) -> Result<KeyFile, AuthError> {
        let mut keys = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut w = line.split_whitespace();
            let (Some("epoch"), Some(n), Some(hexkey), None) =
                (w.next(), w.next(), w.next(), w.next())
            else {
                return Err(AuthError::Syntax(i + 1));
            };
            let n: u16 = n.parse().map_err(|_| AuthError::Syntax(i + 1))?;
            let mut key = [0u8; 32];
            hex::decode_to_slice(hexkey, &mut key).map_err(|_| AuthError::Syntax(i + 1))?;
            keys.insert(n, key);
        }
        if keys.is_empty() {
            return Err(AuthError::Empty);
        }
        Ok(KeyFile { keys })
    }

    /// Reads and parses a key file.
    pub fn load(path: &Path) -> Result<KeyFile, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.display().to_string(),
            source,
        })?;
        KeyFile::parse(&text)
    }

    /// The text form.
    pub fn to_text(&self) -> String {
        let mut s = String::from("# fabric key file: one 256-bit key per epoch; keep it secret\n");
        for (e, k) in &self.keys {
            s.push_str(&format!("epoch {e} {}\n", hex::encode(k)));
        }
        s
    }

    /// The newest epoch.
    pub fn newest(&self) -> u16 {
        self.keys.keys().next_back().copied().unwrap_or(0)
    }
}

struct EpochKeys {
    aes: LessSafeKey,
    chacha: LessSafeKey,
}

impl EpochKeys {
    fn new(master: &[u8; 32]) -> EpochKeys {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"fabric frame keys v1").extract(master);
        let derive = |alg: &'static ring::aead::Algorithm, info: &[u8]| {
            let info = [info];
            // A 32-byte output is within HKDF-SHA256's limit, so expand and fill cannot fail.
            let okm = prk.expand(&info, alg).expect("HKDF length");
            LessSafeKey::new(UnboundKey::from(okm))
        };
        EpochKeys {
            aes: derive(&AES_256_GCM, b"aes-256-gcm"),
            chacha: derive(&CHACHA20_POLY1305, b"chacha20-poly1305"),
        }
    }

    fn get(&self, alg: AeadAlg) -> &LessSafeKey {
        match alg {
            AeadAlg::Aes256Gcm => &self.aes,
            AeadAlg::ChaCha20Poly1305 => &self.chacha,
        }
    }
}

/// Derived AEAD keys for every epoch of a key file.
pub struct Keyring {
    epochs: BTreeMap<u16, EpochKeys>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("epochs", &self.epochs.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Keyring {
    /// Derives the keys of every epoch in `file`.
    pub fn new(file: &KeyFile) -> Keyring {
        Keyring {
            epochs: file
                .keys
                .iter()
                .map(|(e, k)| (*e, EpochKeys::new(k)))
                .collect(),
        }
    }

    /// The newest epoch we hold.
    pub fn newest(&self) -> u16 {
        self.epochs.keys().next_back().copied().unwrap_or(0)
    }

    /// The epoch to seal with for a peer that holds epochs up to `peer_newest`: the newest one
    /// both sides hold.
    pub fn epoch_for(&self, peer_newest: u16) -> u16 {
        self.epochs
            .range(..=peer_newest)
            .next_back()
            .map(|(e, _)| *e)
            .unwrap_or_else(|| self.newest())
    }
}

/// The algorithm this CPU runs fastest: AES-256-GCM with AES instructions, else ChaCha20-Poly1305.
pub fn preferred_alg() -> AeadAlg {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
        {
            return AeadAlg::Aes256Gcm;
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("aes") {
            return AeadAlg::Aes256Gcm;
        }
    }
    AeadAlg::ChaCha20Poly1305
}

fn nonce(sender: u32, counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&sender.to_be_bytes());
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// A random non-zero 32-bit id (sender ids).
pub fn random_id() -> Result<u32, AuthError> {
    let mut b = [0u8; 4];
    loop {
        SystemRandom::new()
            .fill(&mut b)
            .map_err(|_| AuthError::Random)?;
        let v = u32::from_be_bytes(b);
        if v != 0 {
            return Ok(v);
        }
    }
}

/// Seals outgoing frames for one sender.
#[derive(Debug)]
pub struct Sealer {
    sender: u32,
    counter: u64,
    alg: AeadAlg,
}

impl Sealer {
    /// A sealer for `sender`, whose counter starts at `start_secs << 32` (the process start time
    /// in seconds since the epoch) so counters never repeat across restarts.
    pub fn new(sender: u32, start_secs: u64, alg: AeadAlg) -> Sealer {
        Sealer {
            sender,
            counter: start_secs << 32,
            alg,
        }
    }

    /// The sender id.
    pub fn sender(&self) -> u32 {
        self.sender
    }

    /// The algorithm used to seal.
    pub fn alg(&self) -> AeadAlg {
        self.alg
    }

    /// Builds and seals a frame. `h.sender`, `h.aead`, `h.counter` and `h.epoch` are set here.
    pub fn seal(
        &mut self,
        keys: &Keyring,
        epoch: u16,
        dst: [u8; 6],
        src: [u8; 6],
        h: Header,
        payload: &[u8],
    ) -> Result<Vec<u8>, AuthError> {
        let mut f = Vec::new();
        self.seal_into(&mut f, keys, epoch, (dst, src), h, payload)?;
        Ok(f)
    }

    /// [`Sealer::seal`] into `f` (cleared first), reusing its allocation; `macs` is
    /// (destination, source).
    pub fn seal_into(
        &mut self,
        f: &mut Vec<u8>,
        keys: &Keyring,
        epoch: u16,
        (dst, src): ([u8; 6], [u8; 6]),
        mut h: Header,
        payload: &[u8],
    ) -> Result<(), AuthError> {
        let key = keys.epochs.get(&epoch).ok_or(AuthError::NoKey(epoch))?;
        self.counter += 1;
        h.sender = self.sender;
        h.aead = self.alg;
        h.counter = self.counter;
        h.epoch = epoch;
        frame::write(f, dst, src, &h, payload).ok_or(AuthError::TooLarge(payload.len()))?;
        let (head, rest) = f.split_at_mut(frame::OFF_PAYLOAD);
        let (body, tag_slot) = rest.split_at_mut(payload.len());
        let tag = key
            .get(self.alg)
            .seal_in_place_separate_tag(nonce(self.sender, self.counter), Aad::from(&*head), body)
            // Sealing only fails for inputs larger than the algorithm's limit (GiBs).
            .map_err(|_| AuthError::TooLarge(payload.len()))?;
        tag_slot.copy_from_slice(tag.as_ref());
        Ok(())
    }
}

/// A sliding window of the last 1024 counters seen from one sender: a ring of bitmap words
/// indexed by `counter / 64` (RFC 6479), so moving the window up clears the words it passes
/// instead of shifting the whole bitmap (one word for a steady stream).
#[derive(Debug, Clone, Default)]
pub struct ReplayWindow {
    top: u64,
    bits: [u64; ReplayWindow::WORDS],
}

impl ReplayWindow {
    /// Ring words: a power of two with at least [`ReplayWindow::SIZE`] / 64 + 1 words, so the
    /// word of the oldest counter in the window is never the one being reused.
    const WORDS: usize = 32;
    /// Width of the window in frames.
    pub const SIZE: u64 = 1024;

    fn slot(c: u64) -> (usize, u64) {
        ((c >> 6) as usize % Self::WORDS, 1 << (c & 63))
    }

    /// Whether `c` is new (not seen, not older than the window).
    pub fn check(&self, c: u64) -> bool {
        if c > self.top {
            return true;
        }
        let (w, b) = Self::slot(c);
        self.top - c < Self::SIZE && self.bits[w] & b == 0
    }

    /// Marks `c` seen (call only after `check` and tag verification).
    pub fn update(&mut self, c: u64) {
        if c > self.top {
            // Clear the words between the old top's and the new one's (at most the whole ring).
            let (old, new) = (self.top >> 6, c >> 6);
            for k in 1..=(new - old).min(Self::WORDS as u64) {
                self.bits[((old + k) as usize) % Self::WORDS] = 0;
            }
            self.top = c;
        }
        let (w, b) = Self::slot(c);
        self.bits[w] |= b;
    }
}

/// Verifies and decrypts received frames; keeps one replay window per sender.
#[derive(Debug, Default)]
pub struct Verifier {
    /// By sender id. FxHash (cheap on integers): entries are only added for frames whose tag
    /// verified, so nobody without the key can fill the table with colliding ids.
    windows: FxHashMap<u32, ReplayWindow>,
}

/// Most senders whose replay windows are kept.
const MAX_WINDOWS: usize = 4096;

impl Verifier {
    /// Checks `buf` (a whole received frame) and decrypts its payload in place. On success returns
    /// the header, the source MAC and the plaintext payload.
    pub fn open<'a>(
        &mut self,
        keys: &Keyring,
        buf: &'a mut [u8],
    ) -> Result<(Header, [u8; 6], &'a [u8]), Reject> {
        let (h, src, plen) = match Frame::parse(buf) {
            Ok(f) => (f.header(), f.src(), f.payload_len()),
            Err(FrameError::Version(v)) => return Err(Reject::Version(v)),
            Err(e) => return Err(Reject::Malformed(e)),
        };
        let key = keys
            .epochs
            .get(&h.epoch)
            .ok_or(Reject::UnknownKey(h.epoch))?;
        if !self
            .windows
            .get(&h.sender)
            .is_none_or(|w| w.check(h.counter))
        {
            return Err(Reject::Replayed);
        }
        let (head, rest) = buf.split_at_mut(frame::OFF_PAYLOAD);
        let sealed = &mut rest[..plen + frame::TAG_LEN];
        let plain = key
            .get(h.aead)
            .open_in_place(nonce(h.sender, h.counter), Aad::from(&*head), sealed)
            .map_err(|_| Reject::Forged)?;
        if !self.windows.contains_key(&h.sender) && self.windows.len() >= MAX_WINDOWS {
            // Forget the sender heard from longest ago (smallest counter top).
            if let Some(old) = self
                .windows
                .iter()
                .min_by_key(|(_, w)| w.top)
                .map(|(k, _)| *k)
            {
                self.windows.remove(&old);
            }
        }
        self.windows.entry(h.sender).or_default().update(h.counter);
        Ok((h, src, plain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Kind;

    fn hdr(kind: Kind) -> Header {
        Header {
            kind,
            aead: AeadAlg::Aes256Gcm,
            flags: 0,
            sender: 0,
            receiver: 9,
            epoch: 0,
            counter: 0,
            seq: 5,
            ack: 3,
            window: 64,
        }
    }

    fn keyring() -> (KeyFile, Keyring) {
        let kf = KeyFile::generate().unwrap();
        let kr = Keyring::new(&kf);
        (kf, kr)
    }

    #[test]
    fn key_file_round_trip_and_errors() {
        let mut kf = KeyFile::generate().unwrap();
        assert_eq!(kf.rotate().unwrap(), 2);
        let text = kf.to_text();
        assert_eq!(KeyFile::parse(&text).unwrap(), kf);
        assert_eq!(kf.newest(), 2);
        assert!(!format!("{kf:?}").contains(&text[70..90]));
        assert!(matches!(
            KeyFile::parse("# nothing\n"),
            Err(AuthError::Empty)
        ));
        assert!(matches!(
            KeyFile::parse("epoch 1 abcd\n"),
            Err(AuthError::Syntax(1))
        ));
        assert!(matches!(
            KeyFile::parse("\nkey 1 00\n"),
            Err(AuthError::Syntax(2))
        ));
        let err = KeyFile::load(Path::new("/nonexistent/fabric.key")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/fabric.key"));
    }

    #[test]
    fn seal_open_both_algorithms() {
        let (_, kr) = keyring();
        for alg in [AeadAlg::Aes256Gcm, AeadAlg::ChaCha20Poly1305] {
            let mut s = Sealer::new(77, 1_000, alg);
            let mut v = Verifier::default();
            let mut f = s
                .seal(&kr, 1, [1; 6], [2; 6], hdr(Kind::Data), b"secret")
                .unwrap();
            assert!(
                !f.windows(6).any(|w| w == b"secret"),
                "payload is encrypted"
            );
            let (h, src, p) = v.open(&kr, &mut f).unwrap();
            assert_eq!(
                (h.sender, h.aead, h.seq, src, p),
                (77, alg, 5, [2; 6], &b"secret"[..])
            );
            assert_eq!(h.counter, (1_000 << 32) + 1);
        }
    }

    #[test]
    fn rejects_forged_replayed_unknown_key_truncated() {
        let (_, kr) = keyring();
        let mut s = Sealer::new(5, 1, preferred_alg());
        let mut v = Verifier::default();
        let good = s
            .seal(&kr, 1, [1; 6], [2; 6], hdr(Kind::Data), b"abc")
            .unwrap();

        // Any flipped bit in header, payload or tag is a forgery.
        for i in [3, 20, 40, frame::OFF_PAYLOAD, good.len() - 1] {
            let mut f = good.clone();
            f[i] ^= 0x01;
            let r = v.open(&kr, &mut f).unwrap_err();
            assert!(
                matches!(r, Reject::Forged | Reject::Malformed(_)),
                "byte {i}: {r:?}"
            );
        }
        // Wrong key: same epoch, other key material.
        let (_, other) = keyring();
        assert_eq!(
            v.open(&other, &mut good.clone()).unwrap_err(),
            Reject::Forged
        );
        // Unknown epoch.
        let mut f = s
            .seal(&kr, 1, [1; 6], [2; 6], hdr(Kind::Data), b"x")
            .unwrap();
        f[frame::ETH_HEADER_LEN + 17] = 9;
        assert_eq!(v.open(&kr, &mut f).unwrap_err(), Reject::UnknownKey(9));
        // Truncated.
        let mut f = good[..good.len() - 1].to_vec();
        assert!(matches!(v.open(&kr, &mut f), Err(Reject::Malformed(_))));
        // Accepted once, then replayed.
        v.open(&kr, &mut good.clone()).unwrap();
        assert_eq!(
            v.open(&kr, &mut good.clone()).unwrap_err(),
            Reject::Replayed
        );
    }

    #[test]
    fn rotation_keeps_old_epochs_readable() {
        let mut kf = KeyFile::generate().unwrap();
        let old = Keyring::new(&kf);
        kf.rotate().unwrap();
        let new = Keyring::new(&kf);
        assert_eq!(new.epoch_for(1), 1);
        assert_eq!(new.epoch_for(2), 2);
        assert_eq!(new.epoch_for(7), 2);
        let mut s = Sealer::new(3, 0, AeadAlg::Aes256Gcm);
        let mut f = s
            .seal(&old, 1, [1; 6], [2; 6], hdr(Kind::Hello), b"")
            .unwrap();
        Verifier::default().open(&new, &mut f).unwrap();
        assert!(matches!(
            s.seal(&old, 2, [1; 6], [2; 6], hdr(Kind::Hello), b""),
            Err(AuthError::NoKey(2))
        ));
    }

    proptest::proptest! {
        #[test]
        fn replay_window_matches_a_set(steps in proptest::collection::vec((0u64..3000, proptest::bool::ANY), 1..400)) {
            // The model: every counter seen, and the highest; new = unseen and within SIZE.
            let mut w = ReplayWindow::default();
            let mut seen = std::collections::BTreeSet::new();
            let mut top = 0u64;
            let mut base = 0u64;
            for (step, jump) in steps {
                // Mostly near the top, sometimes far ahead.
                let c = if jump { base + step * 7 } else { top.saturating_sub(step % 1100) + step % 5 };
                base = base.max(c);
                let new = (c > top || top - c < ReplayWindow::SIZE) && !seen.contains(&c);
                proptest::prop_assert_eq!(w.check(c), new, "counter {}", c);
                if new {
                    w.update(c);
                    seen.insert(c);
                    top = top.max(c);
                }
            }
        }
    }

    #[test]
    fn replay_window() {
        let mut w = ReplayWindow::default();
        for c in [10, 12, 11, 2000, 1500, 1999] {
            assert!(w.check(c), "{c}");
            w.update(c);
            assert!(!w.check(c), "{c} again");
        }
        assert!(!w.check(12), "below the window");
        assert!(w.check(1998));
        assert!(w.check(2000 - 1023));
        assert!(!w.check(2000 - 1024));
        w.update(1998);
        w.update(1998 + 65);
        assert!(!w.check(1998) && !w.check(2000) && !w.check(1500));
        assert!(w.check(1997) && w.check(2001));
        w.update(1_000_000);
        assert!(w.check(999_999) && !w.check(1_000_000) && !w.check(1998));
    }
}
