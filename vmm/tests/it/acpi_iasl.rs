//! The ACPI tables a run dumps (`--dump-acpi`) disassemble with ACPICA's `iasl -d` without errors,
//! and the SRAT, SLIT and MADT fields iasl prints match the layout.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use crate::common::{have, kvm_or_skip, run_json};

/// `[offset len] Field name : value` lines of an iasl disassembly, in order.
fn fields(dsl: &str) -> Vec<(String, String)> {
    dsl.lines()
        .filter_map(|l| {
            let rest = l.trim_start().strip_prefix('[')?.split_once(']')?.1;
            let (k, v) = rest.split_once(" : ")?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

fn hex(v: &str) -> u64 {
    let word = v.split_whitespace().next().unwrap();
    u64::from_str_radix(word, 16).unwrap_or_else(|_| panic!("not hex: {v}"))
}

fn disassemble(dir: &Path, name: &str) -> String {
    let out = Command::new("iasl")
        .arg("-d")
        .arg(dir.join(format!("{name}.dat")))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "iasl -d {name}: {text}");
    assert!(!text.contains("Error"), "iasl -d {name}: {text}");
    std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap()
}

#[test]
fn dumped_tables_disassemble_and_match_the_layout() {
    if !kvm_or_skip("dumped_tables_disassemble_and_match_the_layout") {
        return;
    }
    if !have("iasl") {
        assert!(
            std::env::var_os("CI").is_none(),
            "ci/test installs acpica-tools"
        );
        eprintln!("SKIP dumped_tables_disassemble_and_match_the_layout: no iasl (acpica-tools)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    // Three uneven vnodes with an asymmetric distance matrix.
    let (code, j, stderr) = run_json(
        &[
            "--vnode",
            "vcpus=0,memory=64M",
            "--vnode",
            "vcpus=1-2,memory=96M",
            "--vnode",
            "vcpus=3,memory=32M",
            "--distances",
            "10,16,22;17,10,28;23,29,10",
            "--dump-acpi",
            d,
        ],
        std::time::Duration::from_secs(120),
    );
    assert_eq!(code, Some(0), "{stderr}");
    let vnodes = j["layout"]["vnodes"].as_array().unwrap();

    for name in ["xsdt", "facp"] {
        disassemble(dir.path(), name);
    }
    // The DSDT's devices: COM1 with its ports and IRQ 4, the CMOS clock with its two ports.
    let dsdt = disassemble(dir.path(), "dsdt");
    // Without iasl's comments and white space.
    let squeezed: String = dsdt
        .lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<String>()
        .replace(" /* 16550A-compatible COM Serial Port */", "")
        .replace(" /* AT Real-Time Clock */", "")
        .split_whitespace()
        .collect();
    for want in [
        "Device(COM1){Name(_HID,EisaId(\"PNP0501\"))",
        "IO(Decode16,0x03F8,0x03F8,0x00,0x08,)",
        "Device(RTC){Name(_HID,EisaId(\"PNP0B00\"))",
        "IO(Decode16,0x0070,0x0070,0x00,0x02,)}",
    ] {
        assert!(squeezed.contains(want), "DSDT lacks {want}:\n{dsdt}");
    }
    // iasl reads only tables with the common header; the RSDP has its own format: check it here
    // (ACPI 6.5 §5.2.5.3: both checksums, revision 2, length 36).
    let rsdp = std::fs::read(dir.path().join("rsdp.dat")).unwrap();
    let sum = |b: &[u8]| b.iter().fold(0u8, |a, &x| a.wrapping_add(x));
    assert_eq!(
        (&rsdp[..8], rsdp.len(), rsdp[15]),
        (&b"RSD PTR "[..], 36, 2)
    );
    assert_eq!((sum(&rsdp[..20]), sum(&rsdp)), (0, 0));

    // MADT: one enabled local APIC per vCPU, ids as planned, in vCPU order.
    let madt = fields(&disassemble(dir.path(), "apic"));
    let apic_ids: Vec<u64> = madt
        .iter()
        .filter(|(k, _)| k == "Local Apic ID")
        .map(|(_, v)| hex(v))
        .collect();
    let planned: Vec<u64> = (0..4)
        .map(|c| {
            vnodes
                .iter()
                .find_map(|v| {
                    let vc = crate::common::u32s(&v["vcpus"]);
                    vc.iter()
                        .position(|&x| x == c)
                        .map(|i| v["apic_ids"][i].as_u64().unwrap())
                })
                .unwrap()
        })
        .collect();
    assert_eq!(apic_ids, planned);

    // SRAT: processor affinity per vCPU and memory affinity per range, by proximity domain.
    let srat = fields(&disassemble(dir.path(), "srat"));
    let mut cpu_domain = BTreeMap::new();
    let mut mem: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    let mut i = 0;
    while i < srat.len() {
        let (k, v) = &srat[i];
        if k == "Subtable Type" && v.starts_with("00") {
            let get = |name: &str| {
                srat[i..]
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| hex(v))
                    .unwrap()
            };
            cpu_domain.insert(get("Apic ID"), get("Proximity Domain Low(8)"));
        }
        if k == "Subtable Type" && v.starts_with("01") {
            let get = |name: &str| {
                srat[i..]
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| hex(v))
                    .unwrap()
            };
            mem.entry(get("Proximity Domain"))
                .or_default()
                .push((get("Base Address"), get("Address Length")));
        }
        i += 1;
    }
    for v in vnodes {
        let id = v["id"].as_u64().unwrap();
        for a in crate::common::u32s(&v["apic_ids"]) {
            assert_eq!(cpu_domain.get(&u64::from(a)), Some(&id), "APIC {a}");
        }
        let ranges: Vec<(u64, u64)> = v["ranges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["start"].as_u64().unwrap(),
                    r["end"].as_u64().unwrap() - r["start"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(mem.get(&id), Some(&ranges), "vnode {id}");
    }

    // SLIT: the asymmetric matrix, row by row.
    let slit = fields(&disassemble(dir.path(), "slit"));
    assert_eq!(
        slit.iter()
            .find(|(k, _)| k == "Localities")
            .map(|(_, v)| hex(v)),
        Some(3)
    );
    let rows: Vec<Vec<u8>> = slit
        .iter()
        .filter(|(k, _)| k.starts_with("Locality "))
        .map(|(_, v)| {
            v.split_whitespace()
                .map(|b| u8::from_str_radix(b, 16).unwrap())
                .collect()
        })
        .collect();
    assert_eq!(
        rows,
        vec![vec![10, 16, 22], vec![17, 10, 28], vec![23, 29, 10]]
    );
}
