//! The PC's CMOS real-time clock (MC146818) at I/O ports 0x70 (index) and 0x71 (data), for Linux
//! guests.
//!
//! Linux's rtc-cmos driver probes these ports on every PC and waits for the clock's
//! update-in-progress bit to clear; with nothing there the ports float high (UIP always set) and
//! the probe spends seconds giving up (3.2 s of a 4 s nested boot, measured). A clock that answers
//! also gives the guest the wall-clock time at boot. vm-superio has no CMOS device (only the
//! PL031 of Arm machines), so it is written here; it keeps to what Linux reads and writes.
//!
//! The time registers follow the host's UTC clock: the guest's writes to them (`hwclock -w`) are
//! ignored, as the host's clock is the one kept right. Register B's data-mode bits are honoured
//! (BCD or binary, 12- or 24-hour). No interrupts: alarms and the periodic interrupt never fire.

/// The index port.
pub const PORT_INDEX: u16 = 0x70;
/// The data port.
pub const PORT_DATA: u16 = 0x71;
/// Both ports, for dispatching port I/O.
pub const PORTS: std::ops::RangeInclusive<u16> = PORT_INDEX..=PORT_DATA;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
/// The century byte where PCs keep it (ACPI FADT CENTURY points here on machines that say so).
const CENTURY: u8 = 0x32;

/// Register A: 32.768 kHz time base, 1024 Hz rate; update-in-progress (bit 7) never set, as the
/// registers are computed on each read and never change under the reader.
const REG_A_VALUE: u8 = 0x26;
/// Register A's update-in-progress bit.
const REG_A_UIP: u8 = 0x80;
/// Register B bits.
const REG_B_24H: u8 = 1 << 1;
const REG_B_BINARY: u8 = 1 << 2;
/// Register D: valid RAM and time.
const REG_D_VALID: u8 = 0x80;
/// Bit 7 of the index write masks NMIs on a PC; it is not part of the index.
const INDEX_MASK: u8 = 0x7f;

/// A UTC calendar time, as the clock registers hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WallTime {
    /// Full year, e.g. 2026.
    pub year: u32,
    /// 1..=12.
    pub month: u8,
    /// 1..=31.
    pub day: u8,
    /// 1 (Sunday) ..= 7, the RTC's convention.
    pub weekday: u8,
    /// 0..=23.
    pub hour: u8,
    /// 0..=59.
    pub minute: u8,
    /// 0..=59 (60 on a leap second).
    pub second: u8,
}

impl WallTime {
    /// The host's clock now, in UTC (`gmtime_r`).
    pub fn now() -> Self {
        // SAFETY: time(NULL) only returns the time.
        let t = unsafe { libc::time(std::ptr::null_mut()) };
        // SAFETY: tm is plain data; gmtime_r fills it from `t` and touches nothing else.
        let tm = unsafe {
            let mut tm: libc::tm = std::mem::zeroed();
            libc::gmtime_r(&t, &mut tm);
            tm
        };
        Self {
            year: (tm.tm_year + 1900) as u32,
            month: (tm.tm_mon + 1) as u8,
            day: tm.tm_mday as u8,
            weekday: (tm.tm_wday + 1) as u8,
            hour: tm.tm_hour as u8,
            minute: tm.tm_min as u8,
            second: tm.tm_sec as u8,
        }
    }
}

/// The CMOS clock and its 128 bytes of RAM.
#[derive(Debug, Clone)]
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    clock: fn() -> WallTime,
}

impl Default for Cmos {
    fn default() -> Self {
        Self::with_clock(WallTime::now)
    }
}

impl Cmos {
    /// A clock that reads the time from `clock` (the host's by default; tests pass a fixed one).
    pub fn with_clock(clock: fn() -> WallTime) -> Self {
        let mut ram = [0u8; 128];
        ram[REG_A as usize] = REG_A_VALUE;
        // BCD and 24-hour, as PC firmware leaves it.
        ram[REG_B as usize] = REG_B_24H;
        ram[REG_D as usize] = REG_D_VALID;
        Self {
            index: 0,
            ram,
            clock,
        }
    }

    /// An `out` to `port` (one of [`PORT_INDEX`], [`PORT_DATA`]).
    pub fn write(&mut self, port: u16, value: u8) {
        match port {
            PORT_INDEX => self.index = value & INDEX_MASK,
            PORT_DATA => match self.index {
                // The clock follows the host; status registers C and D are read-only.
                SECONDS..=YEAR | CENTURY | REG_C | REG_D => {}
                // Keep the rate bits; update-in-progress is never set.
                REG_A => self.ram[REG_A as usize] = value & !REG_A_UIP,
                i => self.ram[i as usize] = value,
            },
            _ => {}
        }
    }

    /// An `in` from `port`.
    pub fn read(&mut self, port: u16) -> u8 {
        match port {
            // The index register reads back on most chipsets; Linux never relies on it.
            PORT_INDEX => self.index,
            PORT_DATA => match self.index {
                SECONDS..=YEAR | CENTURY => self.clock_register(self.index),
                // Reading C clears the (never raised) interrupt flags.
                REG_C => 0,
                i => self.ram[i as usize],
            },
            _ => 0xff,
        }
    }

    fn clock_register(&self, index: u8) -> u8 {
        let t = (self.clock)();
        let b = self.ram[REG_B as usize];
        let encode = |v: u8| if b & REG_B_BINARY != 0 { v } else { bcd(v) };
        match index {
            SECONDS => encode(t.second),
            MINUTES => encode(t.minute),
            HOURS if b & REG_B_24H != 0 => encode(t.hour),
            HOURS => {
                // 12-hour mode: 12, 1..=11, with bit 7 for PM.
                let h12 = match t.hour % 12 {
                    0 => 12,
                    h => h,
                };
                encode(h12) | if t.hour >= 12 { 0x80 } else { 0 }
            }
            WEEKDAY => encode(t.weekday),
            DAY => encode(t.day),
            MONTH => encode(t.month),
            YEAR => encode((t.year % 100) as u8),
            CENTURY => encode((t.year / 100 % 100) as u8),
            // Alarm registers: no alarm set.
            _ => self.ram[index as usize],
        }
    }
}

fn bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed() -> WallTime {
        WallTime {
            year: 2026,
            month: 11,
            day: 25,
            weekday: 4,
            hour: 21,
            minute: 7,
            second: 59,
        }
    }

    fn reg(c: &mut Cmos, index: u8) -> u8 {
        c.write(PORT_INDEX, index);
        c.read(PORT_DATA)
    }

    #[test]
    fn reads_the_time_in_bcd_24_hour_by_default() {
        let mut c = Cmos::with_clock(fixed);
        let got: Vec<u8> = [SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY]
            .iter()
            .map(|&i| reg(&mut c, i))
            .collect();
        assert_eq!(got, [0x59, 0x07, 0x21, 0x04, 0x25, 0x11, 0x26, 0x20]);
    }

    #[test]
    fn honours_binary_and_12_hour_modes() {
        let mut c = Cmos::with_clock(fixed);
        c.write(PORT_INDEX, REG_B);
        c.write(PORT_DATA, REG_B_BINARY);
        assert_eq!(reg(&mut c, SECONDS), 59);
        // 21:00 is 9 PM.
        assert_eq!(reg(&mut c, HOURS), 0x80 | 9);
        c.write(PORT_INDEX, REG_B);
        c.write(PORT_DATA, 0);
        assert_eq!(reg(&mut c, HOURS), 0x80 | 0x09);
    }

    #[test]
    fn never_reports_an_update_in_progress_and_says_the_time_is_valid() {
        let mut c = Cmos::default();
        assert_eq!(reg(&mut c, REG_A), REG_A_VALUE);
        c.write(PORT_DATA, 0xff);
        assert_eq!(reg(&mut c, REG_A) & REG_A_UIP, 0);
        assert_eq!(reg(&mut c, REG_D), REG_D_VALID);
        assert_eq!(reg(&mut c, REG_C), 0);
    }

    #[test]
    fn the_nmi_mask_bit_is_not_part_of_the_index_and_ram_keeps_writes() {
        let mut c = Cmos::with_clock(fixed);
        assert_eq!(reg(&mut c, 0x80 | YEAR), 0x26);
        c.write(PORT_INDEX, 0x40);
        c.write(PORT_DATA, 0xa5);
        assert_eq!(reg(&mut c, 0xc0), 0xa5);
        // Writes to the clock are ignored: it follows the host.
        c.write(PORT_INDEX, MINUTES);
        c.write(PORT_DATA, 0x30);
        assert_eq!(reg(&mut c, MINUTES), 0x07);
    }

    #[test]
    fn the_host_clock_gives_a_plausible_date() {
        let t = WallTime::now();
        assert!(t.year >= 2024 && (1..=12).contains(&t.month) && (1..=7).contains(&t.weekday));
    }
}
