//! Command 3, Reserve/Release (aoe-anchors §1.5).

use super::{need, Mac, Result, WireError, ARG};

/// Offset of RCmd.
pub const RCMD: usize = ARG;
/// Offset of NMacs.
pub const NMACS: usize = ARG + 1;
/// Offset of the first MAC.
pub const MACS: usize = ARG + 2;
/// Length of the argument before the MACs.
pub const RESERVE_ARG_LEN: usize = 2;

/// Reserve/Release sub-commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReserveCmd {
    /// 0: read the list.
    Read,
    /// 1: set, if the list is empty or holds the requester.
    Set,
    /// 2: set unconditionally.
    ForceSet,
    /// Anything else: bad argument.
    Other(u8),
}

impl From<u8> for ReserveCmd {
    fn from(v: u8) -> ReserveCmd {
        match v {
            0 => ReserveCmd::Read,
            1 => ReserveCmd::Set,
            2 => ReserveCmd::ForceSet,
            o => ReserveCmd::Other(o),
        }
    }
}

impl From<ReserveCmd> for u8 {
    fn from(c: ReserveCmd) -> u8 {
        match c {
            ReserveCmd::Read => 0,
            ReserveCmd::Set => 1,
            ReserveCmd::ForceSet => 2,
            ReserveCmd::Other(o) => o,
        }
    }
}

/// A checked view of a Reserve/Release argument. `NMacs` is checked against the frame only
/// when the MACs are read, because a read request may carry a stale count (vblade ignores it).
#[derive(Debug, Clone, Copy)]
pub struct ReserveArg<'a> {
    frame: &'a [u8],
}

impl<'a> ReserveArg<'a> {
    /// Checks that the two-byte argument is present.
    pub fn parse(frame: &'a [u8]) -> Result<ReserveArg<'a>> {
        need(frame, MACS)?;
        Ok(ReserveArg { frame })
    }

    /// RCmd.
    pub fn rcmd(&self) -> ReserveCmd {
        ReserveCmd::from(self.frame[RCMD])
    }

    /// The MAC list; an error if `NMacs` MACs do not fit in the frame.
    pub fn macs(&self) -> Result<Vec<Mac>> {
        let n = usize::from(self.frame[NMACS]);
        need(self.frame, MACS + 6 * n)?;
        Ok(self.frame[MACS..MACS + 6 * n]
            .chunks_exact(6)
            .map(Mac::from_slice)
            .collect())
    }

    /// Writes an argument; returns the frame length so far.
    pub fn write(frame: &mut [u8], rcmd: ReserveCmd, macs: &[Mac]) -> Result<usize> {
        let n = u8::try_from(macs.len()).map_err(|_| WireError::TooLong {
            what: "reserve MAC count",
            len: macs.len(),
            max: 255,
        })?;
        let end = MACS + 6 * macs.len();
        need(frame, end)?;
        frame[RCMD] = u8::from(rcmd);
        frame[NMACS] = n;
        for (m, out) in macs.iter().zip(frame[MACS..end].chunks_exact_mut(6)) {
            out.copy_from_slice(&m.0);
        }
        Ok(end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let macs = [Mac([2, 0, 0, 0, 0, 1]), Mac([2, 0, 0, 0, 0, 7])];
        let mut f = vec![0u8; 60];
        let n = ReserveArg::write(&mut f, ReserveCmd::Set, &macs).unwrap();
        assert_eq!(n, 26 + 12);
        let r = ReserveArg::parse(&f).unwrap();
        assert_eq!(r.rcmd(), ReserveCmd::Set);
        assert_eq!(r.macs().unwrap(), macs);
    }

    #[test]
    fn truncated() {
        assert!(ReserveArg::parse(&[0u8; 25]).is_err());
        let mut f = vec![0u8; 32];
        f[NMACS] = 2;
        let r = ReserveArg::parse(&f).unwrap();
        assert!(r.macs().is_err());
        f[NMACS] = 1;
        assert_eq!(ReserveArg::parse(&f).unwrap().macs().unwrap().len(), 1);
        let many = vec![Mac::BROADCAST; 256];
        assert!(ReserveArg::write(&mut vec![0u8; 2000], ReserveCmd::Set, &many).is_err());
        assert!(ReserveArg::write(&mut [0u8; 30], ReserveCmd::Set, &many[..1]).is_err());
    }

    #[test]
    fn codes() {
        for v in 0..=255u8 {
            assert_eq!(u8::from(ReserveCmd::from(v)), v);
        }
    }
}
