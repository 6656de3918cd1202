//! Command 2, MAC Mask List (aoe-anchors §1.4).

use super::{need, Mac, Result, ARG};

/// Offset of MCmd.
pub const MCMD: usize = ARG + 1;
/// Offset of MError.
pub const MERROR: usize = ARG + 2;
/// Offset of the directive count.
pub const DIR_COUNT: usize = ARG + 3;
/// Offset of the first directive.
pub const DIRECTIVES: usize = ARG + 4;
/// Length of the argument before the directives.
pub const MASK_ARG_LEN: usize = 4;
/// Length of one directive: reserved, DCmd, MAC.
pub const DIRECTIVE_LEN: usize = 8;

/// Mask sub-commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskCmd {
    /// 0: read the list.
    Read,
    /// 1: apply the directives, then return the list.
    Edit,
    /// Anything else: bad argument.
    Other(u8),
}

impl From<u8> for MaskCmd {
    fn from(v: u8) -> MaskCmd {
        match v {
            0 => MaskCmd::Read,
            1 => MaskCmd::Edit,
            o => MaskCmd::Other(o),
        }
    }
}

impl From<MaskCmd> for u8 {
    fn from(c: MaskCmd) -> u8 {
        match c {
            MaskCmd::Read => 0,
            MaskCmd::Edit => 1,
            MaskCmd::Other(o) => o,
        }
    }
}

/// MError codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MaskError {
    /// 1: unspecified.
    Unspecified = 1,
    /// 2: bad directive.
    BadDirective = 2,
    /// 3: list full.
    ListFull = 3,
}

/// One directive: DCmd (0 none, 1 add, 2 delete) and a MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskDirective {
    /// DCmd.
    pub dcmd: u8,
    /// The MAC it applies to.
    pub mac: Mac,
}

impl MaskDirective {
    /// DCmd "no directive".
    pub const NONE: u8 = 0;
    /// DCmd "add".
    pub const ADD: u8 = 1;
    /// DCmd "delete".
    pub const DELETE: u8 = 2;
}

/// A checked view of a MAC Mask List argument.
#[derive(Debug, Clone, Copy)]
pub struct MaskArg<'a> {
    frame: &'a [u8],
}

impl<'a> MaskArg<'a> {
    /// Checks that the argument and all `DirCount` directives are present.
    pub fn parse(frame: &'a [u8]) -> Result<MaskArg<'a>> {
        need(frame, DIRECTIVES)?;
        need(
            frame,
            DIRECTIVES + usize::from(frame[DIR_COUNT]) * DIRECTIVE_LEN,
        )?;
        Ok(MaskArg { frame })
    }

    /// MCmd.
    pub fn mcmd(&self) -> MaskCmd {
        MaskCmd::from(self.frame[MCMD])
    }

    /// MError (replies).
    pub fn merror(&self) -> u8 {
        self.frame[MERROR]
    }

    /// The directives.
    pub fn directives(&self) -> impl Iterator<Item = MaskDirective> + 'a {
        let n = usize::from(self.frame[DIR_COUNT]);
        self.frame[DIRECTIVES..DIRECTIVES + n * DIRECTIVE_LEN]
            .chunks_exact(DIRECTIVE_LEN)
            .map(|d| MaskDirective {
                dcmd: d[1],
                mac: Mac::from_slice(&d[2..]),
            })
    }

    /// Writes an argument with `directives`; returns the frame length so far.
    pub fn write(
        frame: &mut [u8],
        mcmd: MaskCmd,
        merror: u8,
        directives: &[MaskDirective],
    ) -> Result<usize> {
        let count = u8::try_from(directives.len()).map_err(|_| super::WireError::TooLong {
            what: "mask directive count",
            len: directives.len(),
            max: 255,
        })?;
        let end = DIRECTIVES + directives.len() * DIRECTIVE_LEN;
        need(frame, end)?;
        frame[ARG] = 0;
        frame[MCMD] = u8::from(mcmd);
        frame[MERROR] = merror;
        frame[DIR_COUNT] = count;
        for (d, out) in directives
            .iter()
            .zip(frame[DIRECTIVES..end].chunks_exact_mut(DIRECTIVE_LEN))
        {
            out[0] = 0;
            out[1] = d.dcmd;
            out[2..].copy_from_slice(&d.mac.0);
        }
        Ok(end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dirs = [
            MaskDirective {
                dcmd: MaskDirective::ADD,
                mac: Mac([2, 0, 0, 0, 0, 1]),
            },
            MaskDirective {
                dcmd: MaskDirective::DELETE,
                mac: Mac([2, 0, 0, 0, 0, 2]),
            },
        ];
        let mut f = vec![0u8; 60];
        let n = MaskArg::write(&mut f, MaskCmd::Edit, 0, &dirs).unwrap();
        assert_eq!(n, 28 + 16);
        let m = MaskArg::parse(&f).unwrap();
        assert_eq!(m.mcmd(), MaskCmd::Edit);
        assert_eq!(m.merror(), 0);
        assert_eq!(m.directives().collect::<Vec<_>>(), dirs);
    }

    #[test]
    fn empty_read_reply_is_28_bytes() {
        let mut f = vec![0u8; 60];
        assert_eq!(MaskArg::write(&mut f, MaskCmd::Read, 0, &[]).unwrap(), 28);
        assert_eq!(MaskArg::parse(&f[..28]).unwrap().directives().count(), 0);
    }

    #[test]
    fn truncated_directives() {
        let mut f = vec![0u8; 36];
        f[DIR_COUNT] = 2;
        assert!(MaskArg::parse(&f).is_err());
        f[DIR_COUNT] = 1;
        assert!(MaskArg::parse(&f).is_ok());
        assert!(MaskArg::parse(&f[..27]).is_err());
        let many = vec![
            MaskDirective {
                dcmd: 1,
                mac: Mac::BROADCAST
            };
            256
        ];
        assert!(MaskArg::write(&mut vec![0u8; 4000], MaskCmd::Edit, 0, &many).is_err());
        assert!(MaskArg::write(&mut [0u8; 30], MaskCmd::Edit, 0, &many[..1]).is_err());
    }

    #[test]
    fn codes() {
        for v in 0..=255u8 {
            assert_eq!(u8::from(MaskCmd::from(v)), v);
        }
        assert_eq!(MaskError::ListFull as u8, 3);
        assert_eq!(MaskError::BadDirective as u8, 2);
        assert_eq!(MaskError::Unspecified as u8, 1);
    }
}
