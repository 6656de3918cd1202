//! Reads the vNUMA shape from ACPI tables the way an OS does: find the RSDP in the BIOS area,
//! follow the XSDT to the MADT (processors), SRAT (processor and memory affinity) and SLIT
//! (distances), checking signatures, lengths and checksums on the way (ACPI 6.5 §5.2).
//!
//! Memory is read through [`PhysMem`] so the same reader runs in the guest (identity-mapped
//! physical memory) and in host tests over a byte buffer.

use crate::abi::{SeenCpu, SeenRange, Topology, MAX_LOCALITIES};

/// Physical memory as the reader sees it.
pub trait PhysMem {
    /// Copies `buf.len()` bytes at `addr`; false when any of it is outside memory.
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool;
}

/// A byte buffer that stands for physical memory from address `base`.
#[derive(Debug)]
pub struct SliceMem<'a> {
    /// Physical address of `bytes[0]`.
    pub base: u64,
    /// The memory.
    pub bytes: &'a [u8],
}

impl PhysMem for SliceMem<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        let Some(off) = addr.checked_sub(self.base) else {
            return false;
        };
        let Ok(off) = usize::try_from(off) else {
            return false;
        };
        match self.bytes.get(off..off.saturating_add(buf.len())) {
            Some(src) if off.checked_add(buf.len()).is_some() => {
                buf.copy_from_slice(src);
                true
            }
            _ => false,
        }
    }
}

/// What is wrong with the tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcpiError {
    /// No RSDP in 0xE0000–0xFFFFF.
    NoRsdp,
    /// A table could not be read at this address.
    Unreadable(u64),
    /// A table's checksum is wrong.
    Checksum([u8; 4]),
    /// A table's length is implausible.
    Length([u8; 4]),
    /// A required table is missing.
    Missing([u8; 4]),
    /// More entries than the guest can hold.
    TooMany([u8; 4]),
}

impl core::fmt::Display for AcpiError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        fn sig(s: &[u8; 4]) -> &str {
            core::str::from_utf8(s).unwrap_or("????")
        }
        match self {
            Self::NoRsdp => write!(f, "no RSDP in the BIOS area"),
            Self::Unreadable(a) => write!(f, "table at {a:#x} is outside memory"),
            Self::Checksum(s) => write!(f, "{} checksum is wrong", sig(s)),
            Self::Length(s) => write!(f, "{} length is implausible", sig(s)),
            Self::Missing(s) => write!(f, "no {} table", sig(s)),
            Self::TooMany(s) => write!(f, "{} has more entries than the guest supports", sig(s)),
        }
    }
}

const RSDP_SIG: &[u8; 8] = b"RSD PTR ";
const HEADER_LEN: usize = 36;
/// Largest table we accept; ours are far smaller, and a guest must not loop over garbage.
const MAX_TABLE_LEN: u32 = 1 << 20;

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from(u32_at(b, off)) | (u64::from(u32_at(b, off + 4)) << 32)
}

/// Finds the RSDP and returns the XSDT address (ACPI 2.0+ RSDP, both checksums verified).
pub fn find_xsdt(mem: &dyn PhysMem) -> Result<u64, AcpiError> {
    let mut rsdp = [0u8; 36];
    let mut addr = 0xE_0000u64;
    while addr < 0x10_0000 {
        if mem.read(addr, &mut rsdp[..8])
            && &rsdp[..8] == RSDP_SIG
            && mem.read(addr, &mut rsdp)
            && sum(&rsdp[..20]) == 0
            && rsdp[15] >= 2
            && u32_at(&rsdp, 20) == 36
            && sum(&rsdp) == 0
        {
            return Ok(u64_at(&rsdp, 24));
        }
        addr += 16;
    }
    Err(AcpiError::NoRsdp)
}

/// A table read into a caller's buffer, checksum verified.
struct Table<'b> {
    bytes: &'b [u8],
}

fn read_table<'b>(mem: &dyn PhysMem, addr: u64, buf: &'b mut [u8]) -> Result<Table<'b>, AcpiError> {
    let mut head = [0u8; HEADER_LEN];
    if !mem.read(addr, &mut head) {
        return Err(AcpiError::Unreadable(addr));
    }
    let sig = [head[0], head[1], head[2], head[3]];
    let len = u32_at(&head, 4);
    if (len as usize) < HEADER_LEN || len > MAX_TABLE_LEN || len as usize > buf.len() {
        return Err(AcpiError::Length(sig));
    }
    let bytes = &mut buf[..len as usize];
    if !mem.read(addr, bytes) {
        return Err(AcpiError::Unreadable(addr));
    }
    if sum(bytes) != 0 {
        return Err(AcpiError::Checksum(sig));
    }
    Ok(Table { bytes })
}

/// Walks the entries of MADT/SRAT: `(type, entry bytes)` for each well-formed entry.
fn entries(
    body: &[u8],
    mut f: impl FnMut(u8, &[u8]) -> Result<(), AcpiError>,
) -> Result<(), AcpiError> {
    let mut off = 0;
    while off + 2 <= body.len() {
        let (kind, len) = (body[off], body[off + 1] as usize);
        if len < 2 || off + len > body.len() {
            break;
        }
        f(kind, &body[off..off + len])?;
        off += len;
    }
    Ok(())
}

/// Reads MADT, SRAT and SLIT into a [`Topology`]. `scratch` holds one table at a time.
/// Tables are processed MADT first, whatever their order in the XSDT, so that SRAT affinities
/// find their processors.
pub fn read_topology(
    mem: &dyn PhysMem,
    scratch: &mut [u8],
    out: &mut Topology,
) -> Result<(), AcpiError> {
    *out = Topology::default();
    let xsdt_addr = find_xsdt(mem)?;
    // Addresses of MADT, SRAT, SLIT.
    let mut found = [None::<u64>; 3];
    {
        let xsdt = read_table(mem, xsdt_addr, scratch)?;
        if &xsdt.bytes[..4] != b"XSDT" {
            return Err(AcpiError::Missing(*b"XSDT"));
        }
        for ptr in xsdt.bytes[HEADER_LEN..].chunks_exact(8) {
            let addr = u64_at(ptr, 0);
            let mut sig = [0u8; 4];
            if !mem.read(addr, &mut sig) {
                return Err(AcpiError::Unreadable(addr));
            }
            let slot = match &sig {
                b"APIC" => 0,
                b"SRAT" => 1,
                b"SLIT" => 2,
                _ => continue,
            };
            found[slot] = Some(addr);
        }
    }
    let madt = found[0].ok_or(AcpiError::Missing(*b"APIC"))?;
    let srat = found[1].ok_or(AcpiError::Missing(*b"SRAT"))?;
    let b = read_table(mem, madt, scratch)?.bytes;
    read_madt(
        b.get(HEADER_LEN + 8..).ok_or(AcpiError::Length(*b"APIC"))?,
        out,
    )?;
    let b = read_table(mem, srat, scratch)?.bytes;
    read_srat(
        b.get(HEADER_LEN + 12..)
            .ok_or(AcpiError::Length(*b"SRAT"))?,
        out,
    )?;
    if let Some(slit) = found[2] {
        let b = read_table(mem, slit, scratch)?.bytes;
        read_slit(b.get(HEADER_LEN..).ok_or(AcpiError::Length(*b"SLIT"))?, out)?;
    }
    Ok(())
}

fn read_madt(body: &[u8], out: &mut Topology) -> Result<(), AcpiError> {
    entries(body, |kind, e| {
        let (apic_id, enabled) = match kind {
            // Processor Local APIC: uid u8, APIC id u8, flags u32.
            0 if e.len() >= 8 => (u32::from(e[3]), u32_at(e, 4) & 1 != 0),
            // Processor Local x2APIC: reserved u16, x2APIC id u32, flags u32, uid u32.
            9 if e.len() >= 16 => (u32_at(e, 4), u32_at(e, 8) & 1 != 0),
            _ => return Ok(()),
        };
        if enabled {
            let slot = out
                .cpus
                .get_mut(out.cpu_count as usize)
                .ok_or(AcpiError::TooMany(*b"APIC"))?;
            // The node is filled in from the SRAT; u32::MAX marks "no affinity entry".
            *slot = SeenCpu {
                apic_id,
                node: u32::MAX,
            };
            out.cpu_count += 1;
        }
        Ok(())
    })
}

fn read_srat(body: &[u8], out: &mut Topology) -> Result<(), AcpiError> {
    entries(body, |kind, e| {
        match kind {
            // Processor Local APIC/SAPIC Affinity: domain bits 7:0 at 2, APIC id at 3, flags at 4,
            // domain bits 31:8 at 9..12.
            0 if e.len() >= 16 && u32_at(e, 4) & 1 != 0 => {
                let node = u32::from(e[2])
                    | (u32::from(e[9]) << 8)
                    | (u32::from(e[10]) << 16)
                    | (u32::from(e[11]) << 24);
                set_cpu_node(out, u32::from(e[3]), node);
            }
            // Processor Local x2APIC Affinity: domain at 4, x2APIC id at 8, flags at 12.
            2 if e.len() >= 24 && u32_at(e, 12) & 1 != 0 => {
                set_cpu_node(out, u32_at(e, 8), u32_at(e, 4))
            }
            // Memory Affinity: domain at 2, base at 8, length at 16, flags at 28.
            1 if e.len() >= 40 && u32_at(e, 28) & 1 != 0 => {
                let slot = out
                    .ranges
                    .get_mut(out.range_count as usize)
                    .ok_or(AcpiError::TooMany(*b"SRAT"))?;
                *slot = SeenRange {
                    node: u32_at(e, 2),
                    base: u64_at(e, 8),
                    len: u64_at(e, 16),
                };
                out.range_count += 1;
            }
            _ => {}
        }
        Ok(())
    })
}

/// Records a processor's node; an affinity entry for an unknown APIC id is ignored.
fn set_cpu_node(out: &mut Topology, apic_id: u32, node: u32) {
    let n = out.cpu_count as usize;
    if let Some(c) = out.cpus[..n].iter_mut().find(|c| c.apic_id == apic_id) {
        c.node = node;
    }
}

fn read_slit(body: &[u8], out: &mut Topology) -> Result<(), AcpiError> {
    if body.len() < 8 {
        return Err(AcpiError::Length(*b"SLIT"));
    }
    let n = u64_at(body, 0);
    if n > MAX_LOCALITIES as u64 {
        return Err(AcpiError::TooMany(*b"SLIT"));
    }
    let n = n as usize;
    let matrix = body.get(8..8 + n * n).ok_or(AcpiError::Length(*b"SLIT"))?;
    out.distances[..n * n].copy_from_slice(matrix);
    out.localities = n as u32;
    Ok(())
}

/// Index (CPU number) of the processor with this APIC id.
pub fn cpu_index(topo: &Topology, apic_id: u32) -> Option<u32> {
    topo.cpus()
        .iter()
        .position(|c| c.apic_id == apic_id)
        .map(|i| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_memory_has_no_rsdp() {
        let mem = vec![0u8; 0x10_0000];
        let m = SliceMem {
            base: 0,
            bytes: &mem,
        };
        assert_eq!(find_xsdt(&m), Err(AcpiError::NoRsdp));
    }

    #[test]
    fn garbage_tables_are_rejected_without_panicking() {
        let mut mem = vec![0u8; 0x10_0000];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut scratch = vec![0u8; 1 << 16];
        let mut topo = Topology::default();
        for round in 0..200 {
            for b in mem[0xE_0000..].iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *b = seed as u8;
            }
            // A valid RSDP pointing into the garbage, so the table walk itself is exercised.
            let at = 0xE_0000 + (round % 16) * 16;
            let xsdt = 0xE_1000 + seed % 0x1_0000;
            mem[at..at + 8].copy_from_slice(RSDP_SIG);
            mem[at + 15] = 2;
            mem[at + 20..at + 24].copy_from_slice(&36u32.to_le_bytes());
            mem[at + 24..at + 32].copy_from_slice(&xsdt.to_le_bytes());
            mem[at + 8] = 0;
            mem[at + 32] = 0;
            mem[at + 8] = 0u8.wrapping_sub(sum(&mem[at..at + 20]));
            mem[at + 32] = 0u8.wrapping_sub(sum(&mem[at..at + 36]));
            let m = SliceMem {
                base: 0,
                bytes: &mem,
            };
            assert_eq!(find_xsdt(&m), Ok(xsdt));
            assert!(read_topology(&m, &mut scratch, &mut topo).is_err());
        }
    }
}
