//! AoE revision 11 wire format: checked, I/O-free views over `&[u8]` and writers into `&mut [u8]`.
//!
//! Offsets count from the first byte of the Ethernet frame, as in the AoEr11 diagram
//! (`shared/reference/aoe-anchors.md` §1). Every multi-byte field is big-endian except the
//! ATA LBA, which is least significant byte first (§1.2).

mod ata;
mod config;
mod header;
mod mask;
mod reserve;

pub use ata::{
    ata_cmd, identify_page, sectors_to_bytes, write_ata_request, AtaArg, AtaReply, AFLAG_ASYNC,
    AFLAG_DEVICE, AFLAG_EXTENDED, AFLAG_WRITE, ATA_ARG_LEN, ATA_DATA, ATA_ERR_ABRT, ATA_ERR_IDNF,
    ATA_STATUS_DRDY, ATA_STATUS_ERR, ATA_STATUS_FAILED, IDENTIFY_LEN,
};
pub use config::{
    query_config_frame, ConfigArg, ConfigCmd, CONFIG_ARG_LEN, CONFIG_STRING, MAX_CONFIG_STRING,
};
pub use header::{
    AoeError, Command, Header, ARG, BROADCAST_MAJOR, BROADCAST_MINOR, COMMAND, ERROR, HEADER_LEN,
    MAJOR, MINOR, TAG, VERFL,
};
pub use mask::{MaskArg, MaskCmd, MaskDirective, MaskError, DIRECTIVE_LEN, MASK_ARG_LEN};
pub use reserve::{ReserveArg, ReserveCmd, RESERVE_ARG_LEN};

use std::fmt;

/// EtherType assigned to AoE.
pub const ETHERTYPE_AOE: u16 = 0x88A2;
/// Protocol version carried in the high nibble of byte 14.
pub const AOE_VERSION: u8 = 1;
/// Length of the Ethernet header.
pub const ETH_HEADER_LEN: usize = 14;
/// Smallest Ethernet frame (without FCS). Every frame we send is padded to it: veth and tap
/// do not pad, and aoetools drop shorter replies (aoe-anchors §2.1, known bug 1 of vblade).
pub const MIN_FRAME_LEN: usize = 60;
/// Bytes of a sector.
pub const SECTOR: usize = 512;

/// Errors from parsing or writing a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The buffer is shorter than the structure needs.
    #[error("frame too short: {have} bytes, need {need}")]
    Truncated {
        /// Bytes the structure needs.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// The EtherType is not AoE.
    #[error("ethertype {0:#06x} is not AoE")]
    NotAoe(u16),
    /// A length field exceeds a protocol limit.
    #[error("{what} of {len} exceeds the limit {max}")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// Value found.
        len: usize,
        /// Limit.
        max: usize,
    },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, WireError>;

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: Mac = Mac([0xff; 6]);

    /// Reads a MAC from the first six bytes of `b` (callers check the length).
    fn from_slice(b: &[u8]) -> Mac {
        let mut m = [0u8; 6];
        m.copy_from_slice(&b[..6]);
        Mac(m)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Mac {
    type Err = String;

    /// Parses `aa:bb:cc:dd:ee:ff` (also with `-` separators or none, as vblade's `-m` does).
    fn from_str(s: &str) -> std::result::Result<Mac, String> {
        let hex: String = s.chars().filter(|c| *c != ':' && *c != '-').collect();
        if hex.len() != 12 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("bad MAC address {s:?}"));
        }
        let mut m = [0u8; 6];
        for (i, byte) in m.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| format!("bad MAC address {s:?}"))?;
        }
        Ok(Mac(m))
    }
}

/// Length a frame of `len` bytes has on the wire after padding to [`MIN_FRAME_LEN`].
pub fn padded_len(len: usize) -> usize {
    len.max(MIN_FRAME_LEN)
}

/// Sectors that fit in one frame at `mtu`: `(MTU - 36) / 512`, the formula vblade and Linux
/// use (aoe-anchors §1.7: 2 at MTU 1500, 17 at 9000). Clamped to the one-byte field and to at
/// least 1 so a tiny MTU still serves single-sector commands.
pub fn sectors_per_frame(mtu: u32) -> u8 {
    let usable = (mtu as usize).saturating_sub(ATA_DATA) / SECTOR;
    u8::try_from(usable.clamp(1, usize::from(u8::MAX))).unwrap_or(u8::MAX)
}

fn need(buf: &[u8], need: usize) -> Result<()> {
    if buf.len() < need {
        Err(WireError::Truncated {
            need,
            have: buf.len(),
        })
    } else {
        Ok(())
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put_be16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sectors_per_frame_matches_vblade_and_linux() {
        assert_eq!(sectors_per_frame(1500), 2);
        assert_eq!(sectors_per_frame(9000), 17);
        assert_eq!(sectors_per_frame(4132), 8);
        assert_eq!(sectors_per_frame(0), 1);
        assert_eq!(sectors_per_frame(u32::MAX), 255);
        assert_eq!(sectors_per_frame(65535), 127);
    }

    #[test]
    fn padding() {
        assert_eq!(padded_len(0), 60);
        assert_eq!(padded_len(32), 60);
        assert_eq!(padded_len(60), 60);
        assert_eq!(padded_len(1060), 1060);
    }

    proptest::proptest! {
        /// No parser panics on any byte string, and every accessor of a parsed view is in bounds.
        #[test]
        fn parsers_never_panic(frame in proptest::collection::vec(proptest::num::u8::ANY, 0..1200)) {
            let _ = Header::parse(&frame);
            if let Ok(a) = AtaArg::parse(&frame) {
                let _ = (a.lba(), a.data().len(), a.sector_count(), a.is_write());
            }
            if let Ok(c) = ConfigArg::parse(&frame) {
                proptest::prop_assert!(c.string.len() <= MAX_CONFIG_STRING);
            }
            if let Ok(m) = MaskArg::parse(&frame) {
                let _ = m.directives().count();
            }
            if let Ok(r) = ReserveArg::parse(&frame) {
                let _ = r.macs();
            }
        }
    }

    #[test]
    fn mac_parse_and_print() {
        let m: Mac = "0a:99:bc:a6:6d:4e".parse().unwrap();
        assert_eq!(m.0, [0x0a, 0x99, 0xbc, 0xa6, 0x6d, 0x4e]);
        assert_eq!(m.to_string(), "0a:99:bc:a6:6d:4e");
        assert_eq!("0a99bca66d4e".parse::<Mac>().unwrap(), m);
        assert!("0a:99:bc".parse::<Mac>().is_err());
        assert!("zz:99:bc:a6:6d:4e".parse::<Mac>().is_err());
    }
}
