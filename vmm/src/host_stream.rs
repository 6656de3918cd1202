//! `--compare-host`: the guest's STREAM kernels, run again on host threads placed exactly as the
//! vCPUs were (same host CPUs, same arrays: the very pages the guest used, bound to the same
//! host nodes), so guest/host is a like-for-like ratio.

use numa::PinPlan;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_guest::abi::{StreamSummary, VcpuStream, MAX_LOCALITIES};
use vmm_guest::stream::{rdtsc, Arrays, Run, SpinBarrier, TimingTable, GUEST_TIMING_SLOTS};

use crate::report::StreamFigures;

/// Runs the kernels on one host thread per vCPU report and returns figures in the guest's shape.
pub fn run(
    mem: &GuestMemoryMmap,
    vcpus: &[VcpuStream],
    pins: Option<&PinPlan>,
    passes: u32,
    tsc_khz: u32,
) -> StreamFigures {
    let mut vcpus: Vec<VcpuStream> = vcpus.to_vec();
    vcpus.sort_by_key(|v| v.vcpu);
    let barrier = SpinBarrier::new();
    barrier.set_parties(vcpus.len() as u32);
    let timings: Box<TimingTable<GUEST_TIMING_SLOTS>> = Box::default();
    let shared = pins.is_none_or(|p| p.shared);
    let spin = || std::hint::spin_loop();
    let yield_now = || std::thread::yield_now();
    // Threads that share a CPU must yield at the barrier; pinned ones spin as the vCPUs do.
    let relax: &(dyn Fn() + Sync) = if shared { &yield_now } else { &spin };
    let elements: Vec<u64> = vcpus.iter().map(|v| v.elements).collect();
    let validated: Vec<bool> = std::thread::scope(|s| {
        let jobs: Vec<_> = vcpus
            .iter()
            .enumerate()
            .map(|(t, v)| {
                let (barrier, timings) = (&barrier, &*timings);
                let cpu = pins.and_then(|p| p.vcpu_cpus.get(v.vcpu as usize).copied());
                // As an address: raw pointers are not Send.
                let host = mem
                    .get_host_address(GuestAddress(v.array_gpa))
                    .ok()
                    .map(|p| p as usize);
                let n = v.elements as usize;
                s.spawn(move || {
                    if let Some(cpu) = cpu {
                        let _ = numa::set_thread_affinity(&[cpu]);
                    }
                    let run = Run {
                        passes,
                        barrier,
                        timings,
                        clock: rdtsc,
                        relax,
                    };
                    let Some(host) = host else {
                        run.barrier.wait(relax);
                        return false;
                    };
                    // SAFETY: the guest is stopped; [array_gpa, + 3n doubles) is the slice the
                    // guest itself used for this vCPU (inside one RAM region, as its report
                    // says), not shared with any other thread here.
                    let mem = unsafe { std::slice::from_raw_parts_mut(host as *mut f64, 3 * n) };
                    match Arrays::split(mem, n) {
                        Some(mut arrays) => run.run_thread(t as u32, &mut arrays),
                        None => false,
                    }
                })
            })
            .collect();
        jobs.into_iter()
            .map(|j| j.join().unwrap_or(false))
            .collect()
    });
    let run = Run {
        passes,
        barrier: &barrier,
        timings: &*timings,
        clock: rdtsc,
        relax,
    };
    let node_of: Vec<u32> = vcpus.iter().map(|v| v.node).collect();
    let mut summary = StreamSummary {
        passes,
        validated: u32::from(validated.iter().all(|&v| v)),
        ..StreamSummary::default()
    };
    summary.group_count = run.groups(
        &node_of,
        &elements,
        tsc_khz,
        &mut summary.groups[..=MAX_LOCALITIES],
    ) as u32;
    let threads: Vec<VcpuStream> = vcpus
        .iter()
        .enumerate()
        .map(|(t, v)| VcpuStream {
            vcpu: v.vcpu,
            node: v.node,
            apic_id: v.apic_id,
            array_gpa: v.array_gpa,
            validated: u32::from(validated[t]),
            ..run.thread_result(t as u32, &elements, tsc_khz)
        })
        .collect();
    StreamFigures::new(&summary, &threads)
}
