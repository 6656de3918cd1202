//! The common AoE header: Ethernet addresses, version/flags, error, shelf, slot, command, tag.

use super::{be16, need, put_be16, Mac, Result, WireError, AOE_VERSION, ETHERTYPE_AOE};

/// Offset of the destination MAC.
pub const DST: usize = 0;
/// Offset of the source MAC.
pub const SRC: usize = 6;
/// Offset of the EtherType.
pub const ETHERTYPE: usize = 12;
/// Offset of Ver (high nibble) | Flags (low nibble).
pub const VERFL: usize = 14;
/// Offset of the AoE error code.
pub const ERROR: usize = 15;
/// Offset of the major (shelf) address, big-endian.
pub const MAJOR: usize = 16;
/// Offset of the minor (slot) address.
pub const MINOR: usize = 18;
/// Offset of the command code.
pub const COMMAND: usize = 19;
/// Offset of the tag, big-endian, echoed by the target.
pub const TAG: usize = 20;
/// Offset of the command-specific argument.
pub const ARG: usize = 24;
/// Length of the common header, Ethernet header included.
pub const HEADER_LEN: usize = ARG;

/// Shelf address that matches every target.
pub const BROADCAST_MAJOR: u16 = 0xFFFF;
/// Slot address that matches every target.
pub const BROADCAST_MINOR: u8 = 0xFF;

const FLAG_RESPONSE: u8 = 0x08;
const FLAG_ERROR: u8 = 0x04;

/// AoE command codes (byte 19).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// 0: Issue ATA Command.
    Ata,
    /// 1: Query Config Information.
    Config,
    /// 2: MAC Mask List.
    Mask,
    /// 3: Reserve/Release.
    Reserve,
    /// Anything else (vendor commands are 0xF0 and above).
    Other(u8),
}

impl From<u8> for Command {
    fn from(v: u8) -> Command {
        match v {
            0 => Command::Ata,
            1 => Command::Config,
            2 => Command::Mask,
            3 => Command::Reserve,
            o => Command::Other(o),
        }
    }
}

impl From<Command> for u8 {
    fn from(c: Command) -> u8 {
        match c {
            Command::Ata => 0,
            Command::Config => 1,
            Command::Mask => 2,
            Command::Reserve => 3,
            Command::Other(o) => o,
        }
    }
}

/// AoE error codes (byte 15, valid when the E flag is set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AoeError {
    /// 1: unrecognized command code.
    BadCommand = 1,
    /// 2: bad argument parameter.
    BadArgument = 2,
    /// 3: device unavailable.
    Unavailable = 3,
    /// 4: config string present.
    ConfigPresent = 4,
    /// 5: unsupported version.
    BadVersion = 5,
    /// 6: target is reserved.
    Reserved = 6,
}

/// The common header, decoded. Used both to read requests and to write replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Destination MAC.
    pub dst: Mac,
    /// Source MAC.
    pub src: Mac,
    /// Protocol version (high nibble of byte 14).
    pub version: u8,
    /// R flag: this is a response.
    pub response: bool,
    /// E flag: `error` is valid.
    pub error_flag: bool,
    /// Error code.
    pub error: u8,
    /// Shelf.
    pub major: u16,
    /// Slot.
    pub minor: u8,
    /// Command.
    pub command: Command,
    /// Tag, opaque to the target.
    pub tag: u32,
}

impl Header {
    /// Parses the header of `frame`, checking the length and the EtherType only: the version is
    /// reported, not judged, so the caller can answer "unsupported version".
    pub fn parse(frame: &[u8]) -> Result<Header> {
        need(frame, HEADER_LEN)?;
        let ethertype = be16(frame, ETHERTYPE);
        if ethertype != ETHERTYPE_AOE {
            return Err(WireError::NotAoe(ethertype));
        }
        let verfl = frame[VERFL];
        Ok(Header {
            dst: Mac::from_slice(&frame[DST..]),
            src: Mac::from_slice(&frame[SRC..]),
            version: verfl >> 4,
            response: verfl & FLAG_RESPONSE != 0,
            error_flag: verfl & FLAG_ERROR != 0,
            error: frame[ERROR],
            major: be16(frame, MAJOR),
            minor: frame[MINOR],
            command: Command::from(frame[COMMAND]),
            tag: u32::from_be_bytes([frame[TAG], frame[TAG + 1], frame[TAG + 2], frame[TAG + 3]]),
        })
    }

    /// A request header (version 1, no flags).
    pub fn request(
        dst: Mac,
        src: Mac,
        major: u16,
        minor: u8,
        command: Command,
        tag: u32,
    ) -> Header {
        Header {
            dst,
            src,
            version: AOE_VERSION,
            response: false,
            error_flag: false,
            error: 0,
            major,
            minor,
            command,
            tag,
        }
    }

    /// The reply to this request from the target `(me, major, minor)`: addresses swapped, R set,
    /// the target's own shelf.slot even when the request was a broadcast, the tag echoed.
    pub fn reply(&self, me: Mac, major: u16, minor: u8) -> Header {
        Header {
            dst: self.src,
            src: me,
            version: AOE_VERSION,
            response: true,
            error_flag: false,
            error: 0,
            major,
            minor,
            command: self.command,
            tag: self.tag,
        }
    }

    /// The same header with the E flag and `err` set.
    pub fn with_error(mut self, err: AoeError) -> Header {
        self.error_flag = true;
        self.error = err as u8;
        self
    }

    /// True if this header addresses the target `major.minor` (directly or by broadcast).
    pub fn addresses(&self, major: u16, minor: u8) -> bool {
        (self.major == major || self.major == BROADCAST_MAJOR)
            && (self.minor == minor || self.minor == BROADCAST_MINOR)
    }

    /// Writes the header into the first [`HEADER_LEN`] bytes of `buf`.
    pub fn write(&self, buf: &mut [u8]) -> Result<()> {
        need(buf, HEADER_LEN)?;
        buf[DST..DST + 6].copy_from_slice(&self.dst.0);
        buf[SRC..SRC + 6].copy_from_slice(&self.src.0);
        put_be16(buf, ETHERTYPE, ETHERTYPE_AOE);
        let mut verfl = (self.version & 0x0f) << 4;
        if self.response {
            verfl |= FLAG_RESPONSE;
        }
        if self.error_flag {
            verfl |= FLAG_ERROR;
        }
        buf[VERFL] = verfl;
        buf[ERROR] = self.error;
        put_be16(buf, MAJOR, self.major);
        buf[MINOR] = self.minor;
        buf[COMMAND] = u8::from(self.command);
        buf[TAG..TAG + 4].copy_from_slice(&self.tag.to_be_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// vblade's reply to a broadcast Query Config, captured in aoe-anchors §2.4.
    const VBLADE_CONFIG_REPLY: [u8; 32] = [
        0x0a, 0x99, 0xbc, 0xa6, 0x6d, 0x4e, 0xc2, 0xc9, 0x20, 0x84, 0x49, 0xe7, 0x88, 0xa2, 0x18,
        0x00, 0x00, 0x07, 0x01, 0x01, 0x00, 0x00, 0x00, 0x11, 0x00, 0x10, 0x40, 0x19, 0x02, 0x10,
        0x00, 0x00,
    ];

    #[test]
    fn parses_captured_reply() {
        let h = Header::parse(&VBLADE_CONFIG_REPLY).unwrap();
        assert_eq!(h.dst.to_string(), "0a:99:bc:a6:6d:4e");
        assert_eq!(h.src.to_string(), "c2:c9:20:84:49:e7");
        assert_eq!(h.version, 1);
        assert!(h.response);
        assert!(!h.error_flag);
        assert_eq!((h.major, h.minor), (7, 1));
        assert_eq!(h.command, Command::Config);
        assert_eq!(h.tag, 0x11);
    }

    #[test]
    fn write_round_trips() {
        let h = Header::parse(&VBLADE_CONFIG_REPLY).unwrap();
        let mut buf = [0u8; HEADER_LEN];
        h.write(&mut buf).unwrap();
        assert_eq!(buf[..], VBLADE_CONFIG_REPLY[..HEADER_LEN]);
        let e = h.with_error(AoeError::Reserved);
        e.write(&mut buf).unwrap();
        assert_eq!(buf[VERFL], 0x1c);
        assert_eq!(buf[ERROR], 6);
    }

    #[test]
    fn reply_swaps_and_uses_own_address() {
        let req = Header::request(
            Mac::BROADCAST,
            Mac([2, 0, 0, 0, 0, 1]),
            BROADCAST_MAJOR,
            BROADCAST_MINOR,
            Command::Config,
            0x8000_0001,
        );
        let rep = req.reply(Mac([2, 0, 0, 0, 0, 9]), 7, 1);
        assert_eq!(rep.dst, Mac([2, 0, 0, 0, 0, 1]));
        assert_eq!(rep.src, Mac([2, 0, 0, 0, 0, 9]));
        assert_eq!((rep.major, rep.minor, rep.tag), (7, 1, 0x8000_0001));
        assert!(rep.response);
    }

    #[test]
    fn addressing() {
        let mut h = Header::parse(&VBLADE_CONFIG_REPLY).unwrap();
        assert!(h.addresses(7, 1));
        assert!(!h.addresses(7, 2));
        assert!(!h.addresses(8, 1));
        h.major = BROADCAST_MAJOR;
        assert!(h.addresses(8, 1));
        h.minor = BROADCAST_MINOR;
        assert!(h.addresses(0, 0));
        h.major = 7;
        assert!(h.addresses(7, 200));
        assert!(!h.addresses(6, 200));
    }

    #[test]
    fn rejects_short_and_foreign() {
        assert_eq!(
            Header::parse(&VBLADE_CONFIG_REPLY[..23]),
            Err(WireError::Truncated { need: 24, have: 23 })
        );
        let mut f = VBLADE_CONFIG_REPLY;
        f[12] = 0x08;
        f[13] = 0x00;
        assert_eq!(Header::parse(&f), Err(WireError::NotAoe(0x0800)));
        assert!(
            Header::request(Mac::BROADCAST, Mac::BROADCAST, 0, 0, Command::Ata, 0)
                .write(&mut [0u8; 23])
                .is_err()
        );
    }

    #[test]
    fn commands_round_trip() {
        for v in 0..=255u8 {
            assert_eq!(u8::from(Command::from(v)), v);
        }
    }
}
