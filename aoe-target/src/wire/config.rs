//! Command 1, Query Config Information (aoe-anchors §1.3).

use super::{
    be16, need, put_be16, Command, Header, Mac, Result, WireError, AOE_VERSION, ARG, MIN_FRAME_LEN,
};

/// Offset of Buffer Count.
pub const BUFFER_COUNT: usize = ARG;
/// Offset of Firmware Version.
pub const FIRMWARE: usize = ARG + 2;
/// Offset of Sector Count (most sectors per ATA command).
pub const SECTOR_COUNT: usize = ARG + 4;
/// Offset of AoE Ver (high nibble) | CCmd (low nibble).
pub const VER_CCMD: usize = ARG + 5;
/// Offset of Config String Length.
pub const STRING_LEN: usize = ARG + 6;
/// Offset of the config string.
pub const CONFIG_STRING: usize = ARG + 8;
/// Length of the argument before the string.
pub const CONFIG_ARG_LEN: usize = 8;
/// Longest config string.
pub const MAX_CONFIG_STRING: usize = 1024;

/// Config sub-commands (CCmd).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigCmd {
    /// 0: read the string.
    Read,
    /// 1: reply only if the argument equals the string.
    Test,
    /// 2: reply only if the argument is a prefix of the string.
    TestPrefix,
    /// 3: set if empty (or identical), otherwise error 4.
    Set,
    /// 4: set unconditionally.
    ForceSet,
    /// 5..15: undefined.
    Other(u8),
}

impl From<u8> for ConfigCmd {
    fn from(v: u8) -> ConfigCmd {
        match v & 0x0f {
            0 => ConfigCmd::Read,
            1 => ConfigCmd::Test,
            2 => ConfigCmd::TestPrefix,
            3 => ConfigCmd::Set,
            4 => ConfigCmd::ForceSet,
            o => ConfigCmd::Other(o),
        }
    }
}

impl From<ConfigCmd> for u8 {
    fn from(c: ConfigCmd) -> u8 {
        match c {
            ConfigCmd::Read => 0,
            ConfigCmd::Test => 1,
            ConfigCmd::TestPrefix => 2,
            ConfigCmd::Set => 3,
            ConfigCmd::ForceSet => 4,
            ConfigCmd::Other(o) => o & 0x0f,
        }
    }
}

/// A Query Config argument, decoded (request or reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigArg<'a> {
    /// Most outstanding messages the server queues.
    pub buffer_count: u16,
    /// Firmware version.
    pub firmware: u16,
    /// Most sectors per ATA command (0 means 2).
    pub sector_count: u8,
    /// AoE version in the high nibble.
    pub version: u8,
    /// The sub-command.
    pub ccmd: ConfigCmd,
    /// The config string.
    pub string: &'a [u8],
}

impl<'a> ConfigArg<'a> {
    /// Parses the argument. The string length must fit both the frame and the 1024-byte limit.
    pub fn parse(frame: &'a [u8]) -> Result<ConfigArg<'a>> {
        need(frame, CONFIG_STRING)?;
        let len = usize::from(be16(frame, STRING_LEN));
        if len > MAX_CONFIG_STRING {
            return Err(WireError::TooLong {
                what: "config string",
                len,
                max: MAX_CONFIG_STRING,
            });
        }
        need(frame, CONFIG_STRING + len)?;
        Ok(ConfigArg {
            buffer_count: be16(frame, BUFFER_COUNT),
            firmware: be16(frame, FIRMWARE),
            sector_count: frame[SECTOR_COUNT],
            version: frame[VER_CCMD] >> 4,
            ccmd: ConfigCmd::from(frame[VER_CCMD]),
            string: &frame[CONFIG_STRING..CONFIG_STRING + len],
        })
    }

    /// A request argument carrying `ccmd` and `string` (other fields zero, as Linux sends).
    pub fn request(ccmd: ConfigCmd, string: &'a [u8]) -> ConfigArg<'a> {
        ConfigArg {
            buffer_count: 0,
            firmware: 0,
            sector_count: 0,
            version: AOE_VERSION,
            ccmd,
            string,
        }
    }

    /// Bytes the argument occupies after the header.
    pub fn len(&self) -> usize {
        CONFIG_ARG_LEN + self.string.len()
    }

    /// True if the string is empty.
    pub fn is_empty(&self) -> bool {
        self.string.is_empty()
    }

    /// Writes the argument; returns the frame length so far (header + argument + string).
    pub fn write(&self, frame: &mut [u8]) -> Result<usize> {
        if self.string.len() > MAX_CONFIG_STRING {
            return Err(WireError::TooLong {
                what: "config string",
                len: self.string.len(),
                max: MAX_CONFIG_STRING,
            });
        }
        let end = CONFIG_STRING + self.string.len();
        need(frame, end)?;
        put_be16(frame, BUFFER_COUNT, self.buffer_count);
        put_be16(frame, FIRMWARE, self.firmware);
        frame[SECTOR_COUNT] = self.sector_count;
        frame[VER_CCMD] = (self.version << 4) | u8::from(self.ccmd);
        // The length fits: it was checked against MAX_CONFIG_STRING above.
        put_be16(frame, STRING_LEN, self.string.len() as u16);
        frame[CONFIG_STRING..end].copy_from_slice(self.string);
        Ok(end)
    }
}

/// A broadcast Query Config "read" for `shelf.slot` (0xFFFF/0xFF for every target) from `src`,
/// padded to the minimum frame length: what discovery and the duplicate-address probe send.
pub fn query_config_frame(src: Mac, shelf: u16, slot: u8, tag: u32) -> Result<Vec<u8>> {
    let mut f = vec![0u8; MIN_FRAME_LEN];
    Header::request(Mac::BROADCAST, src, shelf, slot, Command::Config, tag).write(&mut f)?;
    ConfigArg::request(ConfigCmd::Read, &[]).write(&mut f)?;
    Ok(f)
}

#[cfg(test)]
mod tests {

    #[test]
    fn query_config_frame_is_a_broadcast_read() {
        let src = Mac([2, 0, 0, 0, 0, 1]);
        let f = query_config_frame(src, 7, 3, 0x8000_0042).unwrap();
        assert_eq!(f.len(), MIN_FRAME_LEN);
        let h = Header::parse(&f).unwrap();
        assert_eq!(
            (h.dst, h.src, h.major, h.minor),
            (Mac::BROADCAST, src, 7, 3)
        );
        assert_eq!(
            (h.command, h.tag, h.response),
            (Command::Config, 0x8000_0042, false)
        );
        let c = ConfigArg::parse(&f).unwrap();
        assert_eq!(c.ccmd, ConfigCmd::Read);
        assert!(c.string.is_empty());
    }

    use super::*;

    /// The argument of vblade's captured reply (aoe-anchors §2.4): bufcnt 16, fw 0x4019,
    /// scnt 2, ver 1, ccmd 0, empty string.
    const VBLADE_ARG: [u8; 8] = [0x00, 0x10, 0x40, 0x19, 0x02, 0x10, 0x00, 0x00];

    fn frame(arg: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; ARG];
        f.extend_from_slice(arg);
        f
    }

    #[test]
    fn parses_captured_reply() {
        let f = frame(&VBLADE_ARG);
        let c = ConfigArg::parse(&f).unwrap();
        assert_eq!(c.buffer_count, 16);
        assert_eq!(c.firmware, 0x4019);
        assert_eq!(c.sector_count, 2);
        assert_eq!(c.version, 1);
        assert_eq!(c.ccmd, ConfigCmd::Read);
        assert!(c.is_empty());
        let mut out = vec![0u8; 60];
        assert_eq!(c.write(&mut out).unwrap(), 32);
        assert_eq!(out[ARG..32], VBLADE_ARG);
    }

    #[test]
    fn string_round_trip() {
        let c = ConfigArg {
            buffer_count: 64,
            firmware: 1,
            sector_count: 17,
            version: 1,
            ccmd: ConfigCmd::Set,
            string: b"owner=host-a",
        };
        let mut out = vec![0u8; 100];
        let n = c.write(&mut out).unwrap();
        assert_eq!(n, 32 + 12);
        assert_eq!(c.len(), 20);
        assert_eq!(ConfigArg::parse(&out[..n]).unwrap(), c);
    }

    #[test]
    fn length_checks() {
        let mut f = frame(&VBLADE_ARG);
        f[STRING_LEN + 1] = 5; // string of 5 but none present
        assert_eq!(
            ConfigArg::parse(&f),
            Err(WireError::Truncated { need: 37, have: 32 })
        );
        put_be16(&mut f, STRING_LEN, 1025);
        f.resize(32 + 1025, 0);
        assert!(matches!(
            ConfigArg::parse(&f),
            Err(WireError::TooLong { len: 1025, .. })
        ));
        assert!(ConfigArg::parse(&f[..31]).is_err());
        let long = vec![b'x'; 1025];
        assert!(ConfigArg::request(ConfigCmd::ForceSet, &long)
            .write(&mut vec![0u8; 2000])
            .is_err());
        assert!(ConfigArg::request(ConfigCmd::ForceSet, b"abc")
            .write(&mut [0u8; 34])
            .is_err());
    }

    #[test]
    fn ccmd_codes() {
        for v in 0..16u8 {
            assert_eq!(u8::from(ConfigCmd::from(v)), v);
        }
        assert_eq!(ConfigCmd::from(0x13), ConfigCmd::Set);
    }
}
