//! Prints this host's topology and the default layout and pin plan for N = 1..4 vnodes, with the
//! time each step takes: `cargo run -p numa --release --example host_plan`.

use std::time::Instant;

use numa::{plan_layout, plan_pinning, GuestRange, HostTopology, LayoutRequest};

const RUNS: u32 = 1000;

fn main() -> anyhow::Result<()> {
    let start = Instant::now();
    for _ in 0..RUNS {
        HostTopology::current()?;
    }
    let read = start.elapsed() / RUNS;
    let host = HostTopology::current()?;
    println!(
        "host: {} nodes, {} CPUs, LLC {} bytes, distances {:?}",
        host.nodes.len(),
        host.cpus.len(),
        host.llc_bytes,
        host.distances
    );
    for n in 1..=4 {
        let req = LayoutRequest {
            numa_nodes: Some(n),
            vcpus: None,
            memory_bytes: None,
            vnodes: Vec::new(),
            distances: None,
            mmio_hole: GuestRange {
                start: 3 << 30,
                end: 4 << 30,
            },
        };
        let start = Instant::now();
        for _ in 0..RUNS {
            let layout = plan_layout(&host, &req)?;
            let _ = plan_pinning(&host, &layout, true)?;
        }
        let plan = start.elapsed() / RUNS;
        let layout = plan_layout(&host, &req)?;
        print!(
            "\n--numa-nodes {n} (planned in {plan:?}):\n{}",
            layout.show()
        );
        match plan_pinning(&host, &layout, false) {
            Ok(pins) => println!("pin: {pins:?}"),
            Err(e) => println!(
                "pin: {e}\npin with --overcommit: {:?}",
                plan_pinning(&host, &layout, true)?
            ),
        }
    }
    println!("\nHostTopology::current() takes {read:?} per call (mean of {RUNS})");
    Ok(())
}
