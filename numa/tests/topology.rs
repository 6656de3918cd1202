//! Host topology read from every sysfs fixture, restriction to allowed CPUs/mems, and errors.

mod common;

use std::fs;
use std::path::Path;

use common::{fixture, fixture_root, FIXTURES, GIB, MIB};
use numa::{HostCpu, HostTopology, TopologyError};

struct Expect {
    name: &'static str,
    /// (node id, cpus, memory_bytes, free_bytes)
    nodes: Vec<(u32, Vec<u32>, u64, u64)>,
    cpus: Vec<u32>,
    distances: Vec<Vec<u8>>,
    llc_bytes: u64,
}

fn expectations() -> Vec<Expect> {
    vec![
        Expect {
            name: "one-node-2cpu",
            // The values of the copied meminfo (this host's node 0 MemTotal grows as it runs).
            nodes: vec![(0, vec![0, 1], 5_466_316 << 10, 3_317_752 << 10)],
            cpus: vec![0, 1],
            distances: vec![vec![10]],
            llc_bytes: 32 * MIB,
        },
        Expect {
            name: "two-socket-smt",
            nodes: vec![
                (0, vec![0, 1, 2, 3, 8, 9, 10, 11], 32 * GIB, 30 * GIB),
                (1, vec![4, 5, 6, 7, 12, 13, 14, 15], 32 * GIB, 31 * GIB),
            ],
            cpus: (0..16).collect(),
            distances: vec![vec![10, 21], vec![21, 10]],
            llc_bytes: 30 * MIB,
        },
        Expect {
            name: "four-node-asymmetric",
            nodes: vec![
                (0, vec![0, 1], 8 * GIB, 7 * GIB),
                (1, vec![2, 3], 8 * GIB, 7 * GIB),
                (2, vec![4, 5], 4 * GIB, 3 * GIB),
                (3, vec![6, 7], 2 * GIB, GIB),
            ],
            cpus: (0..8).collect(),
            distances: vec![
                vec![10, 16, 22, 28],
                vec![16, 10, 28, 22],
                vec![20, 26, 10, 16],
                vec![26, 20, 16, 10],
            ],
            llc_bytes: 16 * MIB,
        },
        Expect {
            name: "memory-only-node",
            nodes: vec![
                (0, vec![0, 1, 2, 3], 8 * GIB, 7 * GIB),
                (1, vec![], 16 * GIB, 16 * GIB),
                (2, vec![4, 5, 6, 7], 8 * GIB, 7 * GIB),
            ],
            cpus: (0..8).collect(),
            distances: vec![vec![10, 30, 20], vec![30, 10, 15], vec![20, 15, 10]],
            llc_bytes: 8 * MIB,
        },
        Expect {
            name: "offline-cpu",
            nodes: vec![(0, vec![0, 1, 2], 4 * GIB, 3 * GIB)],
            cpus: vec![0, 1, 2],
            distances: vec![vec![10]],
            llc_bytes: 8 * MIB,
        },
        Expect {
            name: "no-numa",
            nodes: vec![(0, vec![0, 1], 2 * GIB, GIB)],
            cpus: vec![0, 1],
            distances: vec![vec![10]],
            // Only level-1 caches are listed: the larger of the two.
            llc_bytes: 48 << 10,
        },
    ]
}

#[test]
fn every_fixture_reads_as_expected() {
    let table = expectations();
    assert_eq!(table.len(), FIXTURES.len());
    for e in table {
        let t = fixture(e.name);
        let nodes: Vec<_> = t
            .nodes
            .iter()
            .map(|n| (n.id, n.cpus.clone(), n.memory_bytes, n.free_bytes))
            .collect();
        assert_eq!(nodes, e.nodes, "{}", e.name);
        assert_eq!(
            t.cpus.iter().map(|c| c.id).collect::<Vec<_>>(),
            e.cpus,
            "{}",
            e.name
        );
        assert_eq!(t.distances, e.distances, "{}", e.name);
        assert_eq!(t.llc_bytes, e.llc_bytes, "{}", e.name);
        // Every CPU's node lists it, and node lookups agree with positions.
        for c in &t.cpus {
            assert!(t.node(c.node).unwrap().cpus.contains(&c.id), "{}", e.name);
            assert!(c.thread_siblings.contains(&c.id), "{}", e.name);
        }
        for (i, a) in t.nodes.iter().enumerate() {
            for (j, b) in t.nodes.iter().enumerate() {
                assert_eq!(t.distance(a.id, b.id), Some(e.distances[i][j]));
            }
        }
        // The topology serializes (the VMM's --json output embeds parts of it).
        serde_json::to_string(&t).unwrap();
    }
}

#[test]
fn cpu_details() {
    let t = fixture("two-socket-smt");
    assert_eq!(
        t.cpu(9),
        Some(&HostCpu {
            id: 9,
            node: 0,
            package: 0,
            core: 1,
            thread_siblings: vec![1, 9]
        })
    );
    assert_eq!(
        t.cpu(6),
        Some(&HostCpu {
            id: 6,
            node: 1,
            package: 1,
            core: 2,
            thread_siblings: vec![6, 14]
        })
    );
    let t = fixture("memory-only-node");
    assert_eq!(t.cpu(1).unwrap().thread_siblings, [0, 1]);
    assert_eq!(t.cpu(1).unwrap().core, 0);
    assert_eq!(t.node(1).unwrap().cpus, Vec::<u32>::new());
    assert_eq!(t.node(7), None);
    assert_eq!(t.distance(1, 7), None);
    assert_eq!(fixture("offline-cpu").cpu(3), None);
}

#[test]
fn restrict_keeps_allowed_cpus_and_mems() {
    let t = fixture("two-socket-smt");
    // Node 1 has neither allowed CPUs nor allowed memory: dropped with its distances.
    let r = t.clone().restrict(&[0, 1, 8], &[0]).unwrap();
    assert_eq!(r.nodes.len(), 1);
    assert_eq!(r.nodes[0].cpus, [0, 1, 8]);
    assert_eq!(r.nodes[0].memory_bytes, 32 * GIB);
    assert_eq!(r.distances, [[10]]);
    assert_eq!(r.cpu(0).unwrap().thread_siblings, [0, 8]);
    assert_eq!(r.cpu(1).unwrap().thread_siblings, [1]);
    assert_eq!(r.llc_bytes, t.llc_bytes);

    // CPUs only on node 1, memory only on node 0: both stay, node 1 without memory and node 0
    // without CPUs.
    let r = t.clone().restrict(&[4, 5], &[0]).unwrap();
    let nodes: Vec<_> = r
        .nodes
        .iter()
        .map(|n| (n.id, n.cpus.clone(), n.memory_bytes, n.free_bytes))
        .collect();
    assert_eq!(
        nodes,
        [(0, vec![], 32 * GIB, 30 * GIB), (1, vec![4, 5], 0, 0)]
    );
    assert_eq!(r.distances, t.distances);

    // Unknown ids are ignored.
    let r = t.clone().restrict(&[15, 99], &[1, 9]).unwrap();
    assert_eq!(r.nodes.iter().map(|n| n.id).collect::<Vec<_>>(), [1]);
    assert_eq!(r.cpus.iter().map(|c| c.id).collect::<Vec<_>>(), [15]);
}

#[test]
fn restrict_errors() {
    let t = fixture("two-socket-smt");
    let err = t.clone().restrict(&[99], &[0]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "none of the online CPUs is allowed (allowed: 99)"
    );
    let err = t.restrict(&[0], &[5, 6]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no online node with memory is allowed (allowed mems: 5-6)"
    );
    // A node without memory of its own does not count as allowed memory.
    let err = fixture("memory-only-node").restrict(&[0], &[]).unwrap_err();
    assert!(matches!(err, TopologyError::NoAllowedMemory { .. }));
}

#[test]
fn current_matches_this_host() {
    let current = HostTopology::current().unwrap();
    let all = HostTopology::from_sysfs(Path::new("/")).unwrap();
    let affinity = numa::thread_affinity().unwrap();
    assert_eq!(
        current.cpus.iter().map(|c| c.id).collect::<Vec<_>>(),
        all.cpus
            .iter()
            .map(|c| c.id)
            .filter(|c| affinity.contains(c))
            .collect::<Vec<_>>()
    );
    assert!(current.node(0).unwrap().memory_bytes > 0);
    assert!(current.llc_bytes > 0);
    // This host's fixture is a copy of its sysfs: same shape (memory figures change).
    let copy = fixture("one-node-2cpu");
    assert_eq!(all.cpus, copy.cpus);
    assert_eq!(all.distances, copy.distances);
    assert_eq!(all.llc_bytes, copy.llc_bytes);
}

/// Copies a fixture into a temporary directory so a test can break one file.
fn broken(name: &str, file: &str, content: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&fixture_root(name), dir.path());
    let path = dir.path().join(file);
    match content {
        Some(c) => fs::write(path, c).unwrap(),
        None => fs::remove_file(path).unwrap(),
    }
    dir
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn malformed_sysfs_gives_clear_errors() {
    let cases: [(&str, Option<&str>, &str); 6] = [
        (
            "sys/devices/system/node/node0/distance",
            Some("10 21 30\n"),
            "node 0 distance row has 3 entries for 2 online nodes",
        ),
        (
            "sys/devices/system/node/node0/distance",
            Some("10 x\n"),
            "distance: cannot parse \"10 x\": invalid digit found in string",
        ),
        (
            "sys/devices/system/node/node0/cpulist",
            Some("0-2\n"),
            "online CPU 3 belongs to no NUMA node",
        ),
        (
            "sys/devices/system/cpu/online",
            Some("0-\n"),
            "bad CPU list \"0-\\n\": \"\" is not a number",
        ),
        (
            "sys/devices/system/cpu/cpu3/topology/core_id",
            None,
            "cannot read ",
        ),
        (
            "sys/devices/system/node/node0/meminfo",
            Some("Node 0 MemFree: 5 kB\n"),
            "meminfo: cannot parse \"\": no MemTotal line",
        ),
    ];
    for (file, content, message) in cases {
        let dir = broken("two-socket-smt", file, content);
        let err = HostTopology::from_sysfs(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains(message), "{file}: {err}");
    }
    // The global list still names cpu3 but its own `online` flag says 0: it is left out.
    let dir = broken(
        "offline-cpu",
        "sys/devices/system/cpu/online",
        Some("0-3\n"),
    );
    let t = HostTopology::from_sysfs(dir.path()).unwrap();
    assert_eq!(t.cpus.iter().map(|c| c.id).collect::<Vec<_>>(), [0, 1, 2]);

    let err = HostTopology::from_sysfs(Path::new("/nonexistent")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot read /nonexistent/sys/devices/system/cpu/online"
    );
    assert!(std::error::Error::source(&err).is_some());
}
