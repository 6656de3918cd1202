//! Property tests: the parsers never panic and round-trip; random valid requests give valid
//! layouts and pin plans.

mod common;

use common::{check_invariants, fixture, FIXTURES, MIB};
use numa::{
    format_distances, format_size, parse_cpu_list, parse_distances, parse_size, parse_vnode_spec,
    plan_layout, plan_pinning, GuestRange, LayoutRequest, VnodeSpec, ANY_HOST_NODE,
};
use proptest::prelude::*;

fn any_parser_input() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[-0-9a-zA-Z=,;\\[\\] ]{0,40}",
        "(vcpus|memory|host-node|node)=[-0-9kKmMgGtT\\[\\],]{0,20}(,(vcpus|memory|node)=[-0-9\\[\\],KMGT]{0,12}){0,3}",
    ]
}

/// A hole anywhere in the first 2 GiB, up to 1 GiB long, 4 KiB aligned (possibly empty).
fn any_hole() -> impl Strategy<Value = GuestRange> {
    (0u64..(1 << 19), 0u64..(1 << 18)).prop_map(|(start, len)| GuestRange {
        start: start * 4096,
        end: (start + len) * 4096,
    })
}

proptest! {
    #[test]
    fn parsers_never_panic(s in any_parser_input()) {
        let _ = parse_vnode_spec(&s);
        let _ = parse_distances(&s);
        let _ = parse_size(&s);
        let _ = parse_cpu_list(&s);
    }

    #[test]
    fn vnode_spec_round_trips(
        vcpus in prop::collection::btree_set(0u32..8192, 1..20),
        memory_bytes in any::<u64>(),
        host_node in prop_oneof![Just(ANY_HOST_NODE), 0u32..4096],
    ) {
        let spec = VnodeSpec { vcpus: vcpus.into_iter().collect(), memory_bytes, host_node };
        prop_assert_eq!(parse_vnode_spec(&spec.to_string()), Ok(spec));
    }

    #[test]
    fn size_round_trips(bytes in any::<u64>()) {
        prop_assert_eq!(parse_size(&format_size(bytes)), Ok(bytes));
    }

    #[test]
    fn distances_round_trip(d in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..6), 1..6)) {
        prop_assert_eq!(parse_distances(&format_distances(&d)), Ok(d));
    }

    #[test]
    fn default_layouts_are_valid(
        f in 0..FIXTURES.len(),
        n in 1u32..=4,
        extra_vcpus in prop::option::of(0u32..60),
        pages in prop::option::of(0u64..(1 << 18)),
        hole in any_hole(),
    ) {
        let host = fixture(FIXTURES[f]);
        // At most 1 GiB: fits even when every vnode lands on the smallest node (2 GiB).
        let memory_bytes = pages.map(|p| u64::from(n) * 2 * MIB + p * 4096);
        let req = LayoutRequest {
            numa_nodes: Some(n),
            vcpus: extra_vcpus.map(|e| n + e),
            memory_bytes: memory_bytes.map(|m| m.min(1 << 30)),
            vnodes: Vec::new(),
            distances: None,
            mmio_hole: hole,
        };
        let layout = plan_layout(&host, &req).unwrap();
        check_invariants(&layout, hole);
        prop_assert_eq!(layout.vnodes.len(), n as usize);
        if let Some(m) = req.memory_bytes {
            prop_assert_eq!(layout.memory_bytes(), m);
        }
        // With overcommit pinning always succeeds, inside each vnode's host node.
        let pins = plan_pinning(&host, &layout, true).unwrap();
        prop_assert_eq!(pins.vcpu_cpus.len(), layout.vcpu_count() as usize);
        for v in &layout.vnodes {
            for cpu in pins.vnode_cpus(v) {
                prop_assert_eq!(host.cpu(cpu).unwrap().node, v.host_node);
            }
        }
    }

    #[test]
    fn explicit_layouts_are_valid(
        (f, order, cuts) in (0..FIXTURES.len(), 1usize..=4).prop_flat_map(|(f, n)| {
            (n..=32usize).prop_flat_map(move |total| (
                Just(f),
                Just((0..total as u32).collect::<Vec<_>>()).prop_shuffle(),
                prop::sample::subsequence((1..total).collect::<Vec<_>>(), n - 1),
            ))
        }),
        sizes in prop::collection::vec(1u64..=32_768, 4),
        picks in prop::collection::vec(any::<u8>(), 4),
        hole in any_hole(),
    ) {
        let host = fixture(FIXTURES[f]);
        let with_memory: Vec<u32> =
            host.nodes.iter().filter(|n| n.memory_bytes > 0).map(|n| n.id).collect();
        let bounds: Vec<usize> =
            std::iter::once(0).chain(cuts).chain(std::iter::once(order.len())).collect();
        let vnodes: Vec<VnodeSpec> = bounds
            .windows(2)
            .enumerate()
            .map(|(i, w)| VnodeSpec {
                vcpus: order[w[0]..w[1]].to_vec(),
                memory_bytes: sizes[i] * 4096,
                host_node: match picks[i] % 5 {
                    0 => ANY_HOST_NODE,
                    p => with_memory[usize::from(p) % with_memory.len()],
                },
            })
            .collect();
        let req = LayoutRequest {
            numa_nodes: None,
            vcpus: Some(order.len() as u32),
            memory_bytes: None,
            vnodes: vnodes.clone(),
            distances: None,
            mmio_hole: hole,
        };
        let layout = plan_layout(&host, &req).unwrap();
        check_invariants(&layout, hole);
        for (v, spec) in layout.vnodes.iter().zip(&vnodes) {
            let mut want = spec.vcpus.clone();
            want.sort_unstable();
            prop_assert_eq!(&v.vcpus, &want);
            prop_assert_eq!(v.memory_bytes, spec.memory_bytes);
            if spec.host_node != ANY_HOST_NODE {
                prop_assert_eq!(v.host_node, spec.host_node);
            }
        }
        prop_assert!(plan_pinning(&host, &layout, true).is_ok());
    }
}
