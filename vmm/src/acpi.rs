//! The ACPI tables the VMM gives every guest: RSDP, XSDT, FADT, DSDT, MADT, SRAT, SLIT, all
//! derived from the one [`Layout`] (seed §2.7.1: vnodes, distance table, vnode memory, vCPU to
//! vnode map). The built-in guest reads them with `vmm_guest::acpi`, a Linux guest with its own
//! ACPI code; both see the same bytes.
//!
//! `acpi_tables` builds the RSDP, XSDT and FADT. It has no x86 processor-affinity SRAT entries, no
//! x2APIC MADT entries and only symmetric SLITs, so MADT, SRAT and SLIT are written here over its
//! `Sdt`, the way Cloud Hypervisor does (ACPI 6.5 §5.2.12, §5.2.16, §5.2.17).

use std::path::Path;

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use numa::Layout;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_guest::abi::{ACPI_END, ACPI_GPA};

use crate::cmos;
use crate::cpuid::CpuTopology;
use crate::linux::{
    COM1_IRQ, RESET_PORT, RESET_VALUE, S5_SLP_TYP, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT,
};

/// OEM id in every table header.
pub const OEM_ID: [u8; 6] = *b"RKSCAL";
/// OEM table id in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"VNUMAVMM";
/// Where the local APICs are (the architectural default).
pub const LAPIC_ADDRESS: u32 = 0xfee0_0000;
/// Where the I/O APIC is (the PC default).
pub const IOAPIC_ADDRESS: u32 = 0xfec0_0000;
/// APIC ids up to this fit an xAPIC MADT/SRAT entry; beyond it every entry is x2APIC.
const XAPIC_MAX_ID: u32 = 254;

/// Errors building or storing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit the area reserved for them.
    #[error("ACPI tables need {0} bytes, more than the {1} reserved")]
    TooLarge(u64, u64),
    /// Writing into guest memory failed.
    #[error("cannot write ACPI tables into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    /// Writing a dump file failed.
    #[error("cannot write {0}")]
    Dump(String, #[source] std::io::Error),
}

/// One finished table and where it goes.
#[derive(Debug, Clone)]
pub struct Table {
    /// Signature (`RSDP` for the root pointer).
    pub name: String,
    /// Guest-physical address.
    pub gpa: u64,
    /// The bytes, checksummed.
    pub bytes: Vec<u8>,
}

/// The full set, laid out from [`ACPI_GPA`].
#[derive(Debug, Clone)]
pub struct AcpiTables {
    /// RSDP first, then the tables the XSDT lists, then the DSDT.
    pub tables: Vec<Table>,
}

fn aml_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn sdt(signature: [u8; 4], revision: u8) -> Sdt {
    Sdt::new(signature, 36, revision, OEM_ID, OEM_TABLE_ID, 1)
}

/// MADT (§5.2.12): local APIC address, PC-AT compatibility, one processor entry per vCPU in vCPU
/// order (so CPU n is vCPU n), and the I/O APIC.
fn madt(cpus: &CpuTopology) -> Vec<u8> {
    let mut t = sdt(*b"APIC", 5);
    t.append(LAPIC_ADDRESS);
    t.append(1u32); // PCAT_COMPAT: there are legacy 8259s, masked.
    let x2 = cpus.max_apic_id() > XAPIC_MAX_ID;
    for (uid, &apic) in cpus.apic_ids.iter().enumerate() {
        if x2 {
            // Processor Local x2APIC: type 9, length 16, reserved, id, flags (enabled), uid.
            t.append_slice(&[9, 16, 0, 0]);
            t.append(apic);
            t.append(1u32);
            t.append(uid as u32);
        } else {
            // Processor Local APIC: type 0, length 8, uid, id, flags (enabled).
            t.append_slice(&[0, 8, uid as u8, apic as u8]);
            t.append(1u32);
        }
    }
    // I/O APIC: type 1, length 12, id (after the CPUs'), reserved, address, GSI base.
    t.append_slice(&[1, 12, (cpus.max_apic_id() + 1).min(255) as u8, 0]);
    t.append(IOAPIC_ADDRESS);
    t.append(0u32);
    // Interrupt source override: ISA IRQ 0 (the PIT) is GSI 2, as on a PC (see
    // linux::pc_irq_routing). Type 2, length 10, bus 0 (ISA), source, GSI, flags (conforming).
    t.append_slice(&[2, 10, 0, 0]);
    t.append(2u32);
    t.append(0u16);
    t.update_checksum();
    t.as_slice().to_vec()
}

/// SRAT (§5.2.16): one processor affinity per vCPU, one memory affinity per guest range of each
/// vnode. Proximity domain = vnode id.
fn srat(layout: &Layout, cpus: &CpuTopology) -> Vec<u8> {
    let mut t = sdt(*b"SRAT", 3);
    t.append(1u32); // reserved, 1 for compatibility
    t.append(0u64); // reserved
    let x2 = cpus.max_apic_id() > XAPIC_MAX_ID;
    for vnode in &layout.vnodes {
        for &vcpu in &vnode.vcpus {
            let apic = cpus.apic_ids[vcpu as usize];
            let d = vnode.id.to_le_bytes();
            if x2 {
                // x2APIC affinity: type 2, length 24, reserved, domain, id, flags, clock, reserved.
                t.append_slice(&[2, 24, 0, 0]);
                t.append(vnode.id);
                t.append(apic);
                t.append(1u32);
                t.append(0u32);
                t.append(0u32);
            } else {
                // Processor Local APIC affinity: type 0, length 16, domain[7:0], APIC id, flags,
                // SAPIC EID, domain[31:8], clock domain.
                t.append_slice(&[0, 16, d[0], apic as u8]);
                t.append(1u32);
                t.append_slice(&[0, d[1], d[2], d[3]]);
                t.append(0u32);
            }
        }
    }
    for vnode in &layout.vnodes {
        for r in &vnode.ranges {
            // Memory affinity: type 1, length 40, domain, reserved, base, length, reserved,
            // flags (enabled), reserved.
            t.append_slice(&[1, 40]);
            t.append(vnode.id);
            t.append(0u16);
            t.append(r.start);
            t.append(r.end - r.start);
            t.append(0u32);
            t.append(1u32);
            t.append(0u64);
        }
    }
    t.update_checksum();
    t.as_slice().to_vec()
}

/// SLIT (§5.2.17): the layout's distance matrix, indexed by vnode id, row by row. Written over
/// `Sdt` because `acpi_tables`' SLIT sets both directions at once, and a SLIT may be asymmetric.
fn slit(layout: &Layout) -> Vec<u8> {
    let mut t = sdt(*b"SLIT", 1);
    t.append(layout.vnodes.len() as u64);
    for row in &layout.distances {
        t.append_slice(row);
    }
    t.update_checksum();
    t.as_slice().to_vec()
}

/// DSDT: `\_S5_` (the SLP_TYP a guest writes to the sleep control register to power off),
/// COM1 as a PNP0501 device and the CMOS clock as PNP0B00. In hardware-reduced mode Linux has no
/// legacy PIC IRQs, so its 8250 driver gets IRQ 4 only through this `_CRS` (as with Cloud
/// Hypervisor's DSDT); the clock has no interrupt (crate::cmos raises none), so rtc-cmos
/// registers it without alarms.
fn dsdt() -> Vec<u8> {
    let mut t = sdt(*b"DSDT", 6);
    let s5 = S5_SLP_TYP;
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&s5, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut t);
    let hid = aml::EISAName::new("PNP0501");
    let uid = 0u8;
    let io = aml::IO::new(0x3f8, 0x3f8, 0, 8);
    let irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    let (n_hid, n_uid, n_crs) = (
        aml::Name::new("_HID".into(), &hid),
        aml::Name::new("_UID".into(), &uid),
        aml::Name::new("_CRS".into(), &crs),
    );
    let com1 = aml::Device::new("COM1".into(), vec![&n_hid, &n_uid, &n_crs]);
    let rtc_hid = aml::EISAName::new("PNP0B00");
    let rtc_io = aml::IO::new(cmos::PORT_INDEX, cmos::PORT_INDEX, 0, 2);
    let rtc_crs = aml::ResourceTemplate::new(vec![&rtc_io]);
    let (r_hid, r_crs) = (
        aml::Name::new("_HID".into(), &rtc_hid),
        aml::Name::new("_CRS".into(), &rtc_crs),
    );
    let rtc = aml::Device::new("RTC_".into(), vec![&r_hid, &r_crs]);
    aml::Scope::new("\\_SB_".into(), vec![&com1, &rtc]).to_aml_bytes(&mut t);
    t.update_checksum();
    t.as_slice().to_vec()
}

impl AcpiTables {
    /// Builds every table for `layout` and lays them out from [`ACPI_GPA`].
    pub fn new(layout: &Layout, cpus: &CpuTopology) -> Result<Self, AcpiError> {
        let align = |a: u64| a.div_ceil(16) * 16;
        let rsdp_gpa = ACPI_GPA;
        let mut next = align(rsdp_gpa + 36);
        let mut place = |len: usize| {
            let at = next;
            next = align(at + len as u64);
            at
        };
        let dsdt = dsdt();
        let dsdt_gpa = place(dsdt.len());
        let io = |port: u16| {
            GAS::new(
                AddressSpace::SystemIo,
                8,
                0,
                AccessSize::ByteAccess,
                port.into(),
            )
        };
        let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1)
            .dsdt_64(dsdt_gpa)
            .flag(Flags::HwReducedAcpi)
            .flag(Flags::PwrButton)
            .flag(Flags::SlpButton)
            .flag(Flags::ResetRegSup);
        // Hardware-reduced ACPI: power off and reset through these registers (see linux.rs).
        fadt.sleep_control_reg = io(SLEEP_CONTROL_PORT);
        fadt.sleep_status_reg = io(SLEEP_STATUS_PORT);
        fadt.reset_reg = io(RESET_PORT);
        fadt.reset_value = RESET_VALUE;
        let fadt = aml_bytes(&fadt.finalize());
        let fadt_gpa = place(fadt.len());
        let madt = madt(cpus);
        let madt_gpa = place(madt.len());
        let srat = srat(layout, cpus);
        let srat_gpa = place(srat.len());
        let slit = slit(layout);
        let slit_gpa = place(slit.len());
        let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
        for gpa in [fadt_gpa, madt_gpa, srat_gpa, slit_gpa] {
            xsdt.add_entry(gpa);
        }
        let xsdt = aml_bytes(&xsdt);
        let xsdt_gpa = place(xsdt.len());
        let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_gpa));
        if next > ACPI_END {
            return Err(AcpiError::TooLarge(next - ACPI_GPA, ACPI_END - ACPI_GPA));
        }
        let table = |name: &str, gpa, bytes| Table {
            name: name.to_string(),
            gpa,
            bytes,
        };
        Ok(Self {
            tables: vec![
                table("RSDP", rsdp_gpa, rsdp),
                table("XSDT", xsdt_gpa, xsdt),
                table("FACP", fadt_gpa, fadt),
                table("APIC", madt_gpa, madt),
                table("SRAT", srat_gpa, srat),
                table("SLIT", slit_gpa, slit),
                table("DSDT", dsdt_gpa, dsdt),
            ],
        })
    }

    /// Copies every table to its address in guest memory.
    pub fn write_to(&self, mem: &GuestMemoryMmap) -> Result<(), AcpiError> {
        for t in &self.tables {
            mem.write_slice(&t.bytes, GuestAddress(t.gpa))
                .map_err(AcpiError::GuestMemory)?;
        }
        Ok(())
    }

    /// Writes each table to `dir/<SIGNATURE>.dat` (the form `iasl -d` reads).
    pub fn dump(&self, dir: &Path) -> Result<(), AcpiError> {
        std::fs::create_dir_all(dir).map_err(|e| AcpiError::Dump(dir.display().to_string(), e))?;
        for t in &self.tables {
            let path = dir.join(format!("{}.dat", t.name.to_lowercase()));
            std::fs::write(&path, &t.bytes)
                .map_err(|e| AcpiError::Dump(path.display().to_string(), e))?;
        }
        Ok(())
    }

    /// The whole ACPI area as one buffer starting at [`ACPI_GPA`] (for tests and readers).
    pub fn image(&self) -> Vec<u8> {
        let mut img = vec![0u8; (ACPI_END - ACPI_GPA) as usize];
        for t in &self.tables {
            let at = (t.gpa - ACPI_GPA) as usize;
            img[at..at + t.bytes.len()].copy_from_slice(&t.bytes);
        }
        img
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::layout;
    use vmm_guest::abi::Topology;
    use vmm_guest::acpi::{read_topology, SliceMem};

    fn read_back(tables: &AcpiTables) -> Topology {
        let image = tables.image();
        let mem = SliceMem {
            base: ACPI_GPA,
            bytes: &image,
        };
        let mut topo = Topology::default();
        let mut scratch = vec![0u8; 1 << 16];
        read_topology(&mem, &mut scratch, &mut topo).expect("tables read back");
        topo
    }

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)) == 0
    }

    #[test]
    fn every_table_checksums_and_fits() {
        let l = layout(
            &[
                (vec![0, 1], &[(0, 1 << 30)]),
                (vec![2], &[(1 << 30, 3 << 30), (4 << 30, 5 << 30)]),
            ],
            vec![vec![10, 21], vec![21, 10]],
        );
        let t = AcpiTables::new(&l, &CpuTopology::new(&l)).unwrap();
        for table in &t.tables {
            if table.name == "RSDP" {
                assert!(checksum_ok(&table.bytes[..20]));
                assert!(checksum_ok(&table.bytes));
            } else {
                assert!(checksum_ok(&table.bytes), "{}", table.name);
                assert_eq!(&table.bytes[..4], table.name.as_bytes());
                let len = u32::from_le_bytes(table.bytes[4..8].try_into().unwrap());
                assert_eq!(len as usize, table.bytes.len(), "{}", table.name);
            }
            assert!(table.gpa >= ACPI_GPA && table.gpa + (table.bytes.len() as u64) <= ACPI_END);
        }
    }

    #[test]
    fn the_guest_reader_sees_the_layout() {
        let l = layout(
            &[
                (vec![0, 1, 2], &[(0, 1 << 30)]),
                (vec![3], &[(1 << 30, 3 << 30), (4 << 30, 5 << 30)]),
                (vec![4, 5], &[(5 << 30, 6 << 30)]),
            ],
            vec![vec![10, 16, 22], vec![17, 10, 28], vec![23, 29, 10]],
        );
        let cpus = CpuTopology::new(&l);
        let topo = read_back(&AcpiTables::new(&l, &cpus).unwrap());
        assert_eq!(topo.cpu_count, 6);
        for (i, c) in topo.cpus().iter().enumerate() {
            assert_eq!(c.apic_id, cpus.apic_ids[i]);
            assert_eq!(Some(c.node), l.vnode_of_vcpu(i as u32));
        }
        let ranges: Vec<_> = topo
            .ranges()
            .iter()
            .map(|r| (r.node, r.base, r.len))
            .collect();
        assert_eq!(
            ranges,
            vec![
                (0, 0, 1 << 30),
                (1, 1 << 30, 2 << 30),
                (1, 4 << 30, 1 << 30),
                (2, 5 << 30, 1 << 30)
            ]
        );
        assert_eq!(topo.localities, 3);
        for i in 0..3 {
            for j in 0..3 {
                assert_eq!(
                    topo.distance(i, j),
                    Some(l.distances[i as usize][j as usize])
                );
            }
        }
    }

    #[test]
    fn large_apic_ids_switch_to_x2apic_entries() {
        // 300 vCPUs on one vnode need APIC ids past 254.
        let l = layout(&[((0..300).collect(), &[(0, 1 << 30)])], vec![vec![10]]);
        let cpus = CpuTopology::new(&l);
        assert!(cpus.max_apic_id() > 254);
        let t = AcpiTables::new(&l, &cpus).unwrap();
        let madt = &t.tables.iter().find(|t| t.name == "APIC").unwrap().bytes;
        assert_eq!(madt[44], 9, "first MADT entry is an x2APIC entry");
        // The guest reader holds 256 CPUs; it must refuse, not overflow.
        let image = t.image();
        let mem = SliceMem {
            base: ACPI_GPA,
            bytes: &image,
        };
        let mut topo = Topology::default();
        assert!(read_topology(&mem, &mut vec![0u8; 1 << 16], &mut topo).is_err());
    }
}
