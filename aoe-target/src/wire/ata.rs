//! Command 0, Issue ATA Command: the 12-byte argument, the data that follows, and the
//! IDENTIFY DEVICE page (aoe-anchors §1.2).

use super::{need, Result, ARG, SECTOR};

/// Offset of AFlags.
pub const AFLAGS: usize = ARG;
/// Offset of Err/Feature.
pub const ERR_FEATURE: usize = ARG + 1;
/// Offset of Sector Count.
pub const SECTOR_COUNT: usize = ARG + 2;
/// Offset of Cmd/Status.
pub const CMD_STATUS: usize = ARG + 3;
/// Offset of LBA0 (six bytes, least significant first).
pub const LBA: usize = ARG + 4;
/// Offset of the two reserved bytes.
pub const RESERVED: usize = ARG + 10;
/// Length of the ATA argument.
pub const ATA_ARG_LEN: usize = 12;
/// Offset of the data that follows the argument.
pub const ATA_DATA: usize = ARG + ATA_ARG_LEN;

/// AFlags E: LBA48 "extended" command.
pub const AFLAG_EXTENDED: u8 = 0x40;
/// AFlags D: device/head register flag.
pub const AFLAG_DEVICE: u8 = 0x10;
/// AFlags A: asynchronous write.
pub const AFLAG_ASYNC: u8 = 0x02;
/// AFlags W: write, data follows.
pub const AFLAG_WRITE: u8 = 0x01;

/// ATA status DRDY.
pub const ATA_STATUS_DRDY: u8 = 0x40;
/// ATA status ERR.
pub const ATA_STATUS_ERR: u8 = 0x01;
/// Status bits any of which makes Linux fail the I/O (BSY|DF|DRQ|ERR).
pub const ATA_STATUS_FAILED: u8 = 0xA9;
/// ATA error ABRT: command aborted.
pub const ATA_ERR_ABRT: u8 = 0x04;
/// ATA error IDNF: address not found (out of range).
pub const ATA_ERR_IDNF: u8 = 0x10;
/// Bytes of the IDENTIFY DEVICE page.
pub const IDENTIFY_LEN: usize = 512;

/// ATA command opcodes.
pub mod ata_cmd {
    /// READ SECTORS (28-bit).
    pub const READ: u8 = 0x20;
    /// READ SECTORS EXT (48-bit).
    pub const READ_EXT: u8 = 0x24;
    /// WRITE SECTORS (28-bit).
    pub const WRITE: u8 = 0x30;
    /// WRITE SECTORS EXT (48-bit).
    pub const WRITE_EXT: u8 = 0x34;
    /// CHECK POWER MODE.
    pub const CHECK_POWER: u8 = 0xE5;
    /// FLUSH CACHE.
    pub const FLUSH: u8 = 0xE7;
    /// FLUSH CACHE EXT.
    pub const FLUSH_EXT: u8 = 0xEA;
    /// IDENTIFY DEVICE.
    pub const IDENTIFY: u8 = 0xEC;
    /// SMART (aoeping -S); not served.
    pub const SMART: u8 = 0xB0;
}

/// A checked view of an ATA request or reply.
#[derive(Debug, Clone, Copy)]
pub struct AtaArg<'a> {
    frame: &'a [u8],
}

impl<'a> AtaArg<'a> {
    /// Checks that `frame` holds the header and the ATA argument.
    pub fn parse(frame: &'a [u8]) -> Result<AtaArg<'a>> {
        need(frame, ATA_DATA)?;
        Ok(AtaArg { frame })
    }

    /// AFlags.
    pub fn aflags(&self) -> u8 {
        self.frame[AFLAGS]
    }

    /// True for a write (W flag).
    pub fn is_write(&self) -> bool {
        self.aflags() & AFLAG_WRITE != 0
    }

    /// True for an LBA48 command (E flag).
    pub fn is_extended(&self) -> bool {
        self.aflags() & AFLAG_EXTENDED != 0
    }

    /// Err/Feature register.
    pub fn err_feature(&self) -> u8 {
        self.frame[ERR_FEATURE]
    }

    /// Sector count.
    pub fn sector_count(&self) -> u8 {
        self.frame[SECTOR_COUNT]
    }

    /// Command (request) or status (reply).
    pub fn cmd_status(&self) -> u8 {
        self.frame[CMD_STATUS]
    }

    /// The raw 48-bit LBA field.
    pub fn raw_lba(&self) -> u64 {
        self.frame[LBA..LBA + 6]
            .iter()
            .rev()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
    }

    /// The LBA the command addresses: 48 bits for extended commands, otherwise masked to 28
    /// bits, because Linux ORs 0xE0 into byte 31 for 28-bit commands (aoe-anchors §1.2).
    pub fn lba(&self) -> u64 {
        if self.is_extended() {
            self.raw_lba()
        } else {
            self.raw_lba() & 0x0FFF_FFFF
        }
    }

    /// The data after the argument (write payload or read reply data, possibly padding).
    pub fn data(&self) -> &'a [u8] {
        &self.frame[ATA_DATA..]
    }
}

/// The fields a target writes into an ATA reply (the rest of the argument is echoed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtaReply {
    /// ATA Error register.
    pub error: u8,
    /// Sectors remaining (0 on success).
    pub sector_count: u8,
    /// ATA Status register.
    pub status: u8,
}

impl AtaReply {
    /// Success: status DRDY, nothing remaining.
    pub const OK: AtaReply = AtaReply {
        error: 0,
        sector_count: 0,
        status: ATA_STATUS_DRDY,
    };

    /// A failed command with ATA error `error`; the sector count is left as requested.
    pub fn failed(error: u8, sector_count: u8) -> AtaReply {
        AtaReply {
            error,
            sector_count,
            status: ATA_STATUS_DRDY | ATA_STATUS_ERR,
        }
    }

    /// Writes the reply registers into `frame`, which already holds the echoed argument.
    pub fn write(&self, frame: &mut [u8]) -> Result<()> {
        need(frame, ATA_DATA)?;
        frame[ERR_FEATURE] = self.error;
        frame[SECTOR_COUNT] = self.sector_count;
        frame[CMD_STATUS] = self.status;
        Ok(())
    }
}

/// Writes an ATA request argument (used by the initiator).
pub fn write_ata_request(frame: &mut [u8], aflags: u8, cmd: u8, lba: u64, count: u8) -> Result<()> {
    need(frame, ATA_DATA)?;
    frame[AFLAGS] = aflags;
    frame[ERR_FEATURE] = 0;
    frame[SECTOR_COUNT] = count;
    frame[CMD_STATUS] = cmd;
    frame[LBA..LBA + 6].copy_from_slice(&lba.to_le_bytes()[..6]);
    frame[RESERVED] = 0;
    frame[RESERVED + 1] = 0;
    Ok(())
}

/// Puts an ATA string: two characters per word, the first in the high byte, space padded.
fn put_ata_string(page: &mut [u8; IDENTIFY_LEN], word: usize, words: usize, s: &str) {
    let mut bytes = s.bytes().chain(std::iter::repeat(b' '));
    for w in word..word + words {
        let hi = bytes.next().unwrap_or(b' ');
        let lo = bytes.next().unwrap_or(b' ');
        page[2 * w] = lo;
        page[2 * w + 1] = hi;
    }
}

fn put_word(page: &mut [u8; IDENTIFY_LEN], word: usize, v: u16) {
    page[2 * word..2 * word + 2].copy_from_slice(&v.to_le_bytes());
}

/// Builds the IDENTIFY DEVICE page of a disk of `sectors` sectors: LBA supported (word 49 bit
/// 9), LBA48 with FLUSH CACHE and FLUSH CACHE EXT (words 83 and 86 bits 10, 12, 13; word 83
/// bit 14), the 28-bit capacity clamped to 0x0FFFFFFF in words 60-61 and the 48-bit one in
/// words 100-103; serial (w10, 20 chars), firmware (w23, 8), model (w27, 40).
pub fn identify_page(
    sectors: u64,
    serial: &str,
    firmware: &str,
    model: &str,
) -> [u8; IDENTIFY_LEN] {
    let mut p = [0u8; IDENTIFY_LEN];
    put_word(&mut p, 0, 0x0040); // fixed device
    put_word(&mut p, 1, 16383); // legacy CHS: cylinders
    put_word(&mut p, 3, 16); // heads
    put_word(&mut p, 6, 63); // sectors per track
    put_ata_string(&mut p, 10, 10, serial);
    put_ata_string(&mut p, 23, 4, firmware);
    put_ata_string(&mut p, 27, 20, model);
    put_word(&mut p, 47, 0x8001);
    put_word(&mut p, 49, 0x0200); // LBA
    put_word(&mut p, 50, 0x4000);
    let lba28 = u32::try_from(sectors.min(0x0FFF_FFFF)).unwrap_or(0x0FFF_FFFF);
    put_word(&mut p, 60, (lba28 & 0xFFFF) as u16);
    put_word(&mut p, 61, (lba28 >> 16) as u16);
    put_word(&mut p, 80, 0x00F0); // ATA-4 .. ATA-7
    put_word(&mut p, 82, 0x4000);
    put_word(&mut p, 83, 0x7400); // bit 14 one, FLUSH EXT, FLUSH, LBA48
    put_word(&mut p, 84, 0x4000);
    put_word(&mut p, 85, 0x4000);
    put_word(&mut p, 86, 0x3400); // enabled: FLUSH EXT, FLUSH, LBA48
    put_word(&mut p, 87, 0x4000);
    for i in 0..4 {
        put_word(&mut p, 100 + i, (sectors >> (16 * i)) as u16);
    }
    p
}

/// Sector count as bytes.
pub fn sectors_to_bytes(count: u8) -> usize {
    usize::from(count) * SECTOR
}

#[cfg(test)]
mod tests {
    use super::super::{Header, HEADER_LEN};
    use super::*;

    fn word(p: &[u8], w: usize) -> u16 {
        u16::from_le_bytes([p[2 * w], p[2 * w + 1]])
    }

    fn frame_with(aflags: u8, cmd: u8, lba: u64, count: u8) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        write_ata_request(&mut f, aflags, cmd, lba, count).unwrap();
        f
    }

    #[test]
    fn lba_is_little_endian_48_bits() {
        let f = frame_with(AFLAG_EXTENDED, ata_cmd::READ_EXT, 0x0000_1234_5678_9abc, 2);
        assert_eq!(&f[LBA..LBA + 6], &[0xbc, 0x9a, 0x78, 0x56, 0x34, 0x12]);
        let a = AtaArg::parse(&f).unwrap();
        assert_eq!(a.lba(), 0x1234_5678_9abc);
        assert!(a.is_extended());
        assert!(!a.is_write());
        assert_eq!(a.sector_count(), 2);
        assert_eq!(a.cmd_status(), 0x24);
    }

    #[test]
    fn lba28_masks_the_device_bits() {
        // Linux ORs 0xE0 into byte 31 (LBA3) for 28-bit commands.
        let mut f = frame_with(0, ata_cmd::READ, 0x0ABC_DEF1, 1);
        f[LBA + 3] |= 0xE0;
        f[LBA + 4] = 0x55; // ignored without E
        let a = AtaArg::parse(&f).unwrap();
        assert_eq!(a.lba(), 0x0ABC_DEF1);
        assert_ne!(a.raw_lba(), a.lba());
    }

    #[test]
    fn write_flag_and_data() {
        let mut f = frame_with(AFLAG_EXTENDED | AFLAG_WRITE, ata_cmd::WRITE_EXT, 9, 1);
        f.extend_from_slice(&[7u8; 512]);
        let a = AtaArg::parse(&f).unwrap();
        assert!(a.is_write());
        assert_eq!(a.data().len(), 60 - ATA_DATA + 512);
        assert_eq!(a.err_feature(), 0);
        assert_eq!(a.aflags(), 0x41);
    }

    #[test]
    fn truncated_argument_is_rejected() {
        assert!(AtaArg::parse(&[0u8; ATA_DATA - 1]).is_err());
        assert!(AtaArg::parse(&[0u8; ATA_DATA]).is_ok());
        assert!(AtaReply::OK.write(&mut [0u8; ATA_DATA - 1]).is_err());
        assert!(write_ata_request(&mut [0u8; 30], 0, 0, 0, 0).is_err());
    }

    #[test]
    fn reply_registers() {
        let mut f = frame_with(AFLAG_EXTENDED, 0x24, 5, 2);
        AtaReply::failed(ATA_ERR_IDNF, 2).write(&mut f).unwrap();
        let a = AtaArg::parse(&f).unwrap();
        assert_eq!(
            (a.err_feature(), a.sector_count(), a.cmd_status()),
            (0x10, 2, 0x41)
        );
        assert_ne!(a.cmd_status() & ATA_STATUS_FAILED, 0);
        AtaReply::OK.write(&mut f).unwrap();
        let a = AtaArg::parse(&f).unwrap();
        assert_eq!(
            (a.err_feature(), a.sector_count(), a.cmd_status()),
            (0, 0, 0x40)
        );
        assert_eq!(a.cmd_status() & ATA_STATUS_FAILED, 0);
        assert!(Header::parse(&f).is_err(), "no ethertype written");
        assert_eq!(HEADER_LEN, 24);
    }

    #[test]
    fn identify_words() {
        let p = identify_page(0x1_2345_6789, "7.1:host", "V1", "aoe-target");
        assert_eq!(word(&p, 49) & 0x0200, 0x0200);
        for w in [83, 86] {
            assert_eq!(word(&p, w) & 0x3400, 0x3400, "word {w}");
        }
        assert_eq!(word(&p, 83) & 0xC000, 0x4000);
        assert_eq!(word(&p, 60), 0xFFFF);
        assert_eq!(word(&p, 61), 0x0FFF);
        assert_eq!(word(&p, 100), 0x6789);
        assert_eq!(word(&p, 101), 0x2345);
        assert_eq!(word(&p, 102), 0x0001);
        assert_eq!(word(&p, 103), 0);
        // ATA strings: first character in the high byte of each word.
        assert_eq!(&p[20..28], b".7:1ohts");
        assert_eq!(&p[54..58], b"oa-e");
        assert_eq!(p[54 + 39], b' ');
        let small = identify_page(1000, "", "", "");
        assert_eq!(word(&small, 60), 1000);
        assert_eq!(word(&small, 61), 0);
        assert_eq!(word(&small, 100), 1000);
    }

    #[test]
    fn sector_bytes() {
        assert_eq!(sectors_to_bytes(17), 8704);
        assert_eq!(sectors_to_bytes(0), 0);
    }
}
