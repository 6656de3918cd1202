//! Fabric frames on the wire: an I/O-free, checked view over `&[u8]` and a writer.
//!
//! Control frames use EtherType 0x88B5 and monitoring frames 0x88B6 (the IEEE 802 local
//! experimental EtherTypes; seed §2.4 "Ethernet packet handler", §2.6.1 "a different Ethernet
//! type"). Those values are shared with other experiments, so every frame starts with a magic
//! and a version. Layout after the 14-byte Ethernet header (all integers big endian):
//!
//! ```text
//! off len field
//!   0   4 magic "FBRC"
//!   4   1 version (2: the binary control envelope of `control.rs`; 1 carried JSON)
//!   5   1 kind (HELLO, DATA, ACK, PROBE, MONITOR)
//!   6   1 AEAD algorithm (1 AES-256-GCM, 2 ChaCha20-Poly1305)
//!   7   1 flags
//!   8   4 sender id (random per process, never 0)
//!  12   4 receiver id (0: any receiver)
//!  16   2 key epoch
//!  18   2 payload length
//!  20   8 counter (the AEAD nonce: sender id ‖ counter; never repeats per sender)
//!  28   4 sequence number (reliable channel; 0 when unused)
//!  32   4 cumulative ack (next sequence number expected from the receiver)
//!  36   2 receive window (frames the sender can still buffer)
//!  38   2 reserved (0)
//!  40   n payload (encrypted)
//! 40+n 16 AEAD tag over Ethernet header + fabric header (associated data) and payload
//! ```

use thiserror::Error;

/// EtherType of control frames.
pub const ETHERTYPE_CONTROL: u16 = 0x88B5;
/// EtherType of monitoring frames.
pub const ETHERTYPE_MONITOR: u16 = 0x88B6;
/// Ethernet broadcast address.
pub const BROADCAST: [u8; 6] = [0xff; 6];

/// Length of the Ethernet header (no VLAN tag: the kernel strips it on receive).
pub const ETH_HEADER_LEN: usize = 14;
/// Length of the fabric header that follows the Ethernet header.
pub const HEADER_LEN: usize = 40;
/// Length of the AEAD tag that follows the payload.
pub const TAG_LEN: usize = 16;
/// Bytes of a frame that are not payload.
pub const OVERHEAD: usize = ETH_HEADER_LEN + HEADER_LEN + TAG_LEN;
/// Largest frame we send or accept (standard 1500-byte MTU plus the Ethernet header).
pub const MAX_FRAME_LEN: usize = 1514;
/// Largest payload that fits in one frame.
pub const MAX_PAYLOAD: usize = MAX_FRAME_LEN - OVERHEAD;

/// Magic at the start of the fabric header.
pub const MAGIC: [u8; 4] = *b"FBRC";
/// Protocol version this code speaks.
pub const VERSION: u8 = 2;

// Offsets inside the whole frame (Ethernet header included).
const OFF_DST: usize = 0;
const OFF_SRC: usize = 6;
const OFF_ETHERTYPE: usize = 12;
const H: usize = ETH_HEADER_LEN;
const OFF_MAGIC: usize = H;
const OFF_VERSION: usize = H + 4;
const OFF_KIND: usize = H + 5;
const OFF_AEAD: usize = H + 6;
const OFF_FLAGS: usize = H + 7;
const OFF_SENDER: usize = H + 8;
const OFF_RECEIVER: usize = H + 12;
const OFF_EPOCH: usize = H + 16;
const OFF_LEN: usize = H + 18;
const OFF_COUNTER: usize = H + 20;
const OFF_SEQ: usize = H + 28;
const OFF_ACK: usize = H + 32;
const OFF_WINDOW: usize = H + 36;
const OFF_RESERVED: usize = H + 38;
/// Offset of the payload inside the frame.
pub const OFF_PAYLOAD: usize = H + HEADER_LEN;

/// Flag: the receiver should answer at once (a HELLO reply, or an ACK to a PROBE).
pub const FLAG_REPLY_WANTED: u8 = 0x01;
/// Flags this version defines; others make a frame invalid.
const FLAGS_KNOWN: u8 = FLAG_REPLY_WANTED;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Discovery: who is on the segment (name, role, key epochs).
    Hello = 1,
    /// A reliable-channel message.
    Data = 2,
    /// A standalone acknowledgement with selective-ack blocks.
    Ack = 3,
    /// Link supervision probe; answered by an ACK.
    Probe = 4,
    /// A monitoring report (EtherType 0x88B6 only).
    Monitor = 5,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Data,
            3 => Kind::Ack,
            4 => Kind::Probe,
            5 => Kind::Monitor,
            _ => return None,
        })
    }

    /// The EtherType a frame of this kind travels on.
    pub fn ethertype(self) -> u16 {
        match self {
            Kind::Monitor => ETHERTYPE_MONITOR,
            _ => ETHERTYPE_CONTROL,
        }
    }
}

/// AEAD algorithm that sealed a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum AeadAlg {
    /// AES-256-GCM (CPUs with AES-NI).
    Aes256Gcm = 1,
    /// ChaCha20-Poly1305 (CPUs without AES instructions).
    ChaCha20Poly1305 = 2,
}

impl AeadAlg {
    fn from_u8(v: u8) -> Option<AeadAlg> {
        match v {
            1 => Some(AeadAlg::Aes256Gcm),
            2 => Some(AeadAlg::ChaCha20Poly1305),
            _ => None,
        }
    }
}

/// Errors of [`Frame::parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FrameError {
    /// Shorter than the headers and tag.
    #[error("truncated frame ({0} bytes)")]
    Truncated(usize),
    /// Not one of our EtherTypes.
    #[error("foreign EtherType {0:#06x}")]
    EtherType(u16),
    /// Magic does not match: other experimental traffic.
    #[error("bad magic")]
    Magic,
    /// A peer speaking another protocol version.
    #[error("protocol version {0} (we speak {VERSION})")]
    Version(u8),
    /// Unknown frame kind, or a kind on the wrong EtherType.
    #[error("bad frame kind {0}")]
    Kind(u8),
    /// Unknown AEAD algorithm.
    #[error("unknown AEAD algorithm {0}")]
    Aead(u8),
    /// Unknown flags or non-zero reserved field.
    #[error("reserved bits set")]
    Reserved,
    /// The payload length points past the end of the frame.
    #[error("payload length {0} exceeds the frame")]
    Length(usize),
    /// A sender id of 0.
    #[error("sender id 0")]
    Sender,
}

/// The fixed fields of a frame (everything but addresses, payload and tag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Frame kind.
    pub kind: Kind,
    /// AEAD algorithm.
    pub aead: AeadAlg,
    /// Flags (`FLAG_*`).
    pub flags: u8,
    /// Sender id.
    pub sender: u32,
    /// Receiver id, 0 for any.
    pub receiver: u32,
    /// Key epoch that sealed the frame.
    pub epoch: u16,
    /// AEAD nonce counter.
    pub counter: u64,
    /// Sequence number (DATA), else 0.
    pub seq: u32,
    /// Cumulative acknowledgement.
    pub ack: u32,
    /// Advertised receive window.
    pub window: u16,
}

/// A checked view of a received frame.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    buf: &'a [u8],
    payload_len: usize,
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

impl<'a> Frame<'a> {
    /// Checks every header field; later accessors cannot fail. Trailing bytes after the tag
    /// (Ethernet padding) are allowed and ignored.
    pub fn parse(buf: &'a [u8]) -> Result<Frame<'a>, FrameError> {
        if buf.len() < OVERHEAD {
            return Err(FrameError::Truncated(buf.len()));
        }
        let ethertype = be16(buf, OFF_ETHERTYPE);
        if ethertype != ETHERTYPE_CONTROL && ethertype != ETHERTYPE_MONITOR {
            return Err(FrameError::EtherType(ethertype));
        }
        if buf[OFF_MAGIC..OFF_MAGIC + 4] != MAGIC {
            return Err(FrameError::Magic);
        }
        if buf[OFF_VERSION] != VERSION {
            return Err(FrameError::Version(buf[OFF_VERSION]));
        }
        let kind = Kind::from_u8(buf[OFF_KIND]).ok_or(FrameError::Kind(buf[OFF_KIND]))?;
        if kind.ethertype() != ethertype {
            return Err(FrameError::Kind(buf[OFF_KIND]));
        }
        AeadAlg::from_u8(buf[OFF_AEAD]).ok_or(FrameError::Aead(buf[OFF_AEAD]))?;
        if buf[OFF_FLAGS] & !FLAGS_KNOWN != 0 || be16(buf, OFF_RESERVED) != 0 {
            return Err(FrameError::Reserved);
        }
        if be32(buf, OFF_SENDER) == 0 {
            return Err(FrameError::Sender);
        }
        let payload_len = usize::from(be16(buf, OFF_LEN));
        if OVERHEAD + payload_len > buf.len() {
            return Err(FrameError::Length(payload_len));
        }
        Ok(Frame { buf, payload_len })
    }

    /// Destination MAC address.
    pub fn dst(&self) -> [u8; 6] {
        mac_at(self.buf, OFF_DST)
    }

    /// Source MAC address.
    pub fn src(&self) -> [u8; 6] {
        mac_at(self.buf, OFF_SRC)
    }

    /// The header fields.
    pub fn header(&self) -> Header {
        let b = self.buf;
        Header {
            // Both were checked in `parse`.
            kind: Kind::from_u8(b[OFF_KIND]).unwrap_or(Kind::Hello),
            aead: AeadAlg::from_u8(b[OFF_AEAD]).unwrap_or(AeadAlg::Aes256Gcm),
            flags: b[OFF_FLAGS],
            sender: be32(b, OFF_SENDER),
            receiver: be32(b, OFF_RECEIVER),
            epoch: be16(b, OFF_EPOCH),
            counter: be64(b, OFF_COUNTER),
            seq: be32(b, OFF_SEQ),
            ack: be32(b, OFF_ACK),
            window: be16(b, OFF_WINDOW),
        }
    }

    /// Length of the (encrypted) payload.
    pub fn payload_len(&self) -> usize {
        self.payload_len
    }

    /// Length of the frame up to the end of the tag (without Ethernet padding).
    pub fn len(&self) -> usize {
        OVERHEAD + self.payload_len
    }

    /// Always false: a parsed frame has at least its headers.
    pub fn is_empty(&self) -> bool {
        false
    }
}

fn mac_at(b: &[u8], off: usize) -> [u8; 6] {
    let mut m = [0u8; 6];
    m.copy_from_slice(&b[off..off + 6]);
    m
}

/// Associated data for the AEAD: the Ethernet header and the fabric header of `frame`.
pub fn aad(frame: &[u8]) -> &[u8] {
    &frame[..OFF_PAYLOAD]
}

/// Byte range of the payload and tag together (what AEAD open works on).
pub fn sealed_range(payload_len: usize) -> std::ops::Range<usize> {
    OFF_PAYLOAD..OFF_PAYLOAD + payload_len + TAG_LEN
}

/// Writes a frame with `payload` in clear and a zero tag; [`crate::auth::Sealer`] then
/// encrypts the payload and fills the tag. Returns `None` if the payload does not fit.
pub fn build(dst: [u8; 6], src: [u8; 6], h: &Header, payload: &[u8]) -> Option<Vec<u8>> {
    let mut b = Vec::new();
    write(&mut b, dst, src, h, payload)?;
    Some(b)
}

/// [`build`] into `b` (cleared first), reusing its allocation.
pub fn write(
    b: &mut Vec<u8>,
    dst: [u8; 6],
    src: [u8; 6],
    h: &Header,
    payload: &[u8],
) -> Option<()> {
    if payload.len() > MAX_PAYLOAD {
        return None;
    }
    let len = u16::try_from(payload.len()).ok()?;
    b.clear();
    b.resize(OVERHEAD + payload.len(), 0);
    b[OFF_DST..OFF_DST + 6].copy_from_slice(&dst);
    b[OFF_SRC..OFF_SRC + 6].copy_from_slice(&src);
    b[OFF_ETHERTYPE..OFF_ETHERTYPE + 2].copy_from_slice(&h.kind.ethertype().to_be_bytes());
    b[OFF_MAGIC..OFF_MAGIC + 4].copy_from_slice(&MAGIC);
    b[OFF_VERSION] = VERSION;
    b[OFF_KIND] = h.kind as u8;
    b[OFF_AEAD] = h.aead as u8;
    b[OFF_FLAGS] = h.flags & FLAGS_KNOWN;
    b[OFF_SENDER..OFF_SENDER + 4].copy_from_slice(&h.sender.to_be_bytes());
    b[OFF_RECEIVER..OFF_RECEIVER + 4].copy_from_slice(&h.receiver.to_be_bytes());
    b[OFF_EPOCH..OFF_EPOCH + 2].copy_from_slice(&h.epoch.to_be_bytes());
    b[OFF_LEN..OFF_LEN + 2].copy_from_slice(&len.to_be_bytes());
    b[OFF_COUNTER..OFF_COUNTER + 8].copy_from_slice(&h.counter.to_be_bytes());
    b[OFF_SEQ..OFF_SEQ + 4].copy_from_slice(&h.seq.to_be_bytes());
    b[OFF_ACK..OFF_ACK + 4].copy_from_slice(&h.ack.to_be_bytes());
    b[OFF_WINDOW..OFF_WINDOW + 2].copy_from_slice(&h.window.to_be_bytes());
    b[OFF_PAYLOAD..OFF_PAYLOAD + payload.len()].copy_from_slice(payload);
    Some(())
}

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn mac_to_string(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut parts = s.trim().split(':');
    for b in m.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> Header {
        Header {
            kind: Kind::Data,
            aead: AeadAlg::Aes256Gcm,
            flags: FLAG_REPLY_WANTED,
            sender: 0x0102_0304,
            receiver: 0x0a0b_0c0d,
            epoch: 7,
            counter: 0x1122_3344_5566_7788,
            seq: 42,
            ack: 41,
            window: 256,
        }
    }

    #[test]
    fn round_trip() {
        let f = build([1; 6], [2; 6], &header(), b"hello").unwrap();
        assert_eq!(f.len(), OVERHEAD + 5);
        assert_eq!(&f[12..14], &[0x88, 0xB5]);
        assert_eq!(&f[14..18], b"FBRC");
        let v = Frame::parse(&f).unwrap();
        assert_eq!(v.header(), header());
        assert_eq!(v.dst(), [1; 6]);
        assert_eq!(v.src(), [2; 6]);
        assert_eq!(v.payload_len(), 5);
        assert_eq!(&f[OFF_PAYLOAD..OFF_PAYLOAD + 5], b"hello");
    }

    #[test]
    fn monitor_kind_uses_0x88b6() {
        let mut h = header();
        h.kind = Kind::Monitor;
        let f = build(BROADCAST, [2; 6], &h, &[]).unwrap();
        assert_eq!(&f[12..14], &[0x88, 0xB6]);
        assert_eq!(Frame::parse(&f).unwrap().header().kind, Kind::Monitor);
    }

    #[test]
    fn padding_is_ignored() {
        let mut f = build([1; 6], [2; 6], &header(), b"x").unwrap();
        f.resize(f.len() + 20, 0);
        assert_eq!(Frame::parse(&f).unwrap().len(), OVERHEAD + 1);
    }

    #[test]
    fn rejects_bad_fields() {
        let good = build([1; 6], [2; 6], &header(), b"abc").unwrap();
        let bad = |off: usize, val: u8| {
            let mut f = good.clone();
            f[off] = val;
            Frame::parse(&f).unwrap_err()
        };
        assert_eq!(
            Frame::parse(&good[..OVERHEAD - 1]).unwrap_err(),
            FrameError::Truncated(OVERHEAD - 1)
        );
        assert_eq!(bad(OFF_ETHERTYPE + 1, 0x00), FrameError::EtherType(0x8800));
        assert_eq!(bad(OFF_MAGIC, b'X'), FrameError::Magic);
        assert_eq!(bad(OFF_VERSION, 1), FrameError::Version(1));
        assert_eq!(bad(OFF_KIND, 9), FrameError::Kind(9));
        assert_eq!(bad(OFF_KIND, Kind::Monitor as u8), FrameError::Kind(5));
        assert_eq!(bad(OFF_AEAD, 3), FrameError::Aead(3));
        assert_eq!(bad(OFF_FLAGS, 0x80), FrameError::Reserved);
        assert_eq!(bad(OFF_RESERVED + 1, 1), FrameError::Reserved);
        assert_eq!(bad(OFF_LEN + 1, 4), FrameError::Length(4));
        let mut f = good.clone();
        f[OFF_SENDER..OFF_SENDER + 4].fill(0);
        assert_eq!(Frame::parse(&f).unwrap_err(), FrameError::Sender);
    }

    #[test]
    fn payload_limit() {
        assert!(build([1; 6], [2; 6], &header(), &vec![0; MAX_PAYLOAD]).is_some());
        assert!(build([1; 6], [2; 6], &header(), &vec![0; MAX_PAYLOAD + 1]).is_none());
    }

    #[test]
    fn mac_text() {
        let m = [0x02, 0, 0xab, 0xcd, 0xef, 0x10];
        assert_eq!(mac_to_string(&m), "02:00:ab:cd:ef:10");
        assert_eq!(parse_mac("02:00:ab:cd:ef:10"), Some(m));
        assert_eq!(parse_mac("02:00:ab:cd:ef"), None);
        assert_eq!(parse_mac("02:00:ab:cd:ef:10:11"), None);
        assert_eq!(parse_mac("zz:00:ab:cd:ef:10"), None);
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(f) = Frame::parse(&bytes) {
                prop_assert!(f.len() <= bytes.len());
                let _ = f.header();
            }
        }

        #[test]
        fn header_round_trips(sender in 1u32.., receiver: u32, epoch: u16, counter: u64,
                              seq: u32, ack: u32, window: u16,
                              payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let h = Header { kind: Kind::Ack, aead: AeadAlg::ChaCha20Poly1305, flags: 0,
                             sender, receiver, epoch, counter, seq, ack, window };
            let f = build([3; 6], [4; 6], &h, &payload).unwrap();
            let v = Frame::parse(&f).unwrap();
            prop_assert_eq!(v.header(), h);
            prop_assert_eq!(v.payload_len(), payload.len());
        }
    }
}
