//! The four STREAM kernels (McCalpin's Copy, Scale, Add, Triad over doubles), the per-thread
//! driver with STREAM's timing and byte counting, and STREAM's validation.
//!
//! The same compiled code runs inside the built-in guest (one thread per vCPU) and on host threads
//! for `--compare-host`, so a guest/host ratio compares identical instructions. The kernels use
//! SSE2 explicitly: written as plain loops, the compiler turns Copy into a `memcpy` call, which
//! would be glibc's on the host and ours in the guest.

use core::arch::x86_64::{__m128d, _mm_add_pd, _mm_load_pd, _mm_mul_pd, _mm_set1_pd, _mm_store_pd};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::abi::{GroupStream, KernelResult, VcpuStream, MAX_PASSES, MAX_VCPUS, TOTAL_GROUP};

/// STREAM's scalar.
pub const SCALAR: f64 = 3.0;
/// Elements per array are a multiple of this (8 doubles = one 64-byte line per array).
pub const ELEMENT_QUANTUM: usize = 8;
/// Bytes per element each kernel counts (STREAM's `bytes[]`): 2 arrays for Copy/Scale, 3 for Add/Triad.
pub const BYTES_PER_ELEMENT: [u64; 4] = [16, 16, 24, 24];

/// Applies `op` to 8-element blocks. Callers guarantee equal lengths that are a multiple of 8 and
/// 16-byte aligned arrays (see [`Arrays::split`]).
#[inline(always)]
fn blocks3(dst: &mut [f64], x: &[f64], y: &[f64], op: impl Fn(__m128d, __m128d) -> __m128d) {
    assert!(dst.len() == x.len() && dst.len() == y.len() && dst.len() % ELEMENT_QUANTUM == 0);
    assert!((dst.as_ptr() as usize | x.as_ptr() as usize | y.as_ptr() as usize) % 16 == 0);
    let (d, x, y) = (dst.as_mut_ptr(), x.as_ptr(), y.as_ptr());
    let mut i = 0;
    while i < dst.len() {
        for j in (0..ELEMENT_QUANTUM).step_by(2) {
            // SAFETY: i + j + 1 < len for all three slices (checked above: equal lengths, multiple
            // of 8), and every pointer is 16-byte aligned with an even offset, as the aligned
            // load/store need. SSE2 is part of the x86_64 baseline.
            unsafe {
                let v = op(_mm_load_pd(x.add(i + j)), _mm_load_pd(y.add(i + j)));
                _mm_store_pd(d.add(i + j), v);
            }
        }
        i += ELEMENT_QUANTUM;
        // An empty asm statement (no instructions) keeps the compiler from replacing the loop
        // with a call to `memcpy`, which it does for Copy: that would be glibc's on the host and
        // ours in the guest, not the same code.
        // SAFETY: emits nothing; touches no memory, stack or flags.
        unsafe { core::arch::asm!("", options(nomem, nostack, preserves_flags)) };
    }
}

/// `c[j] = a[j]`
///
/// Never inlined (nor are the other kernels), so the guest image and the host build run the
/// same machine code whatever their callers' inlining decisions.
#[inline(never)]
pub fn copy(c: &mut [f64], a: &[f64]) {
    blocks3(c, a, a, |x, _| x);
}

/// `b[j] = scalar * c[j]`
#[inline(never)]
pub fn scale(b: &mut [f64], c: &[f64]) {
    // SAFETY: SSE2 is part of the x86_64 baseline.
    let s = unsafe { _mm_set1_pd(SCALAR) };
    // SAFETY: as above.
    blocks3(b, c, c, |x, _| unsafe { _mm_mul_pd(x, s) });
}

/// `c[j] = a[j] + b[j]`
#[inline(never)]
pub fn add(c: &mut [f64], a: &[f64], b: &[f64]) {
    // SAFETY: SSE2 is part of the x86_64 baseline.
    blocks3(c, a, b, |x, y| unsafe { _mm_add_pd(x, y) });
}

/// `a[j] = b[j] + scalar * c[j]`
#[inline(never)]
pub fn triad(a: &mut [f64], b: &[f64], c: &[f64]) {
    // SAFETY: SSE2 is part of the x86_64 baseline.
    let s = unsafe { _mm_set1_pd(SCALAR) };
    // SAFETY: as above.
    blocks3(a, b, c, |x, y| unsafe { _mm_add_pd(x, _mm_mul_pd(y, s)) });
}

/// One thread's three arrays.
#[derive(Debug)]
pub struct Arrays<'a> {
    /// STREAM's `a`.
    pub a: &'a mut [f64],
    /// STREAM's `b`.
    pub b: &'a mut [f64],
    /// STREAM's `c`.
    pub c: &'a mut [f64],
}

impl<'a> Arrays<'a> {
    /// Elements per array that fit `bytes` (three arrays, whole 64-byte lines).
    pub fn elements_for(bytes: u64) -> usize {
        let per_array = bytes / 3 / 8;
        (per_array as usize) / ELEMENT_QUANTUM * ELEMENT_QUANTUM
    }

    /// Splits `mem` (16-byte aligned) into three arrays of `n` elements; `None` if it does not fit
    /// or is misaligned.
    pub fn split(mem: &'a mut [f64], n: usize) -> Option<Self> {
        if n % ELEMENT_QUANTUM != 0 || mem.len() < 3 * n || mem.as_ptr() as usize % 16 != 0 {
            return None;
        }
        let (a, rest) = mem.split_at_mut(n);
        let (b, rest) = rest.split_at_mut(n);
        let (c, _) = rest.split_at_mut(n);
        Some(Self { a, b, c })
    }

    /// Elements per array.
    pub fn len(&self) -> usize {
        self.a.len()
    }

    /// True for empty arrays.
    pub fn is_empty(&self) -> bool {
        self.a.is_empty()
    }

    /// STREAM's initialisation: a = 1, b = 2, c = 0, then `a = 2 * a` (its timer-granularity test).
    pub fn init(&mut self) {
        for ((a, b), c) in self
            .a
            .iter_mut()
            .zip(self.b.iter_mut())
            .zip(self.c.iter_mut())
        {
            *a = 2.0;
            *b = 2.0;
            *c = 0.0;
        }
    }

    /// STREAM's `checkSTREAMresults`: replays the scalar recurrence for `passes` passes and
    /// compares the mean absolute error of each array with the expected value (epsilon 1e-13).
    pub fn validate(&self, passes: u32) -> bool {
        let (mut aj, mut bj, mut cj) = (2.0f64, 2.0f64, 0.0f64);
        for _ in 0..passes {
            cj = aj;
            bj = SCALAR * cj;
            cj = aj + bj;
            aj = bj + SCALAR * cj;
        }
        let n = self.a.len() as f64;
        let err = |arr: &[f64], want: f64| {
            let sum: f64 = arr.iter().map(|&x| abs(x - want)).sum();
            // Relative error as STREAM computes it; absolute where the expected value is 0.
            if want == 0.0 {
                sum / n
            } else {
                abs(sum / n / want)
            }
        };
        let epsilon = 1e-13;
        !self.is_empty()
            && err(self.a, aj) <= epsilon
            && err(self.b, bj) <= epsilon
            && err(self.c, cj) <= epsilon
    }
}

fn abs(x: f64) -> f64 {
    if x < 0.0 {
        -x
    } else {
        x
    }
}

/// A barrier for a fixed number of threads that spins (vCPUs have no scheduler to sleep in).
#[derive(Debug, Default)]
pub struct SpinBarrier {
    parties: AtomicU32,
    arrived: AtomicU32,
    generation: AtomicU32,
}

impl SpinBarrier {
    /// An unconfigured barrier (for statics); call [`Self::set_parties`] before use.
    pub const fn new() -> Self {
        Self {
            parties: AtomicU32::new(0),
            arrived: AtomicU32::new(0),
            generation: AtomicU32::new(0),
        }
    }
    /// Sets how many threads meet here.
    pub fn set_parties(&self, n: u32) {
        self.parties.store(n, Ordering::Release);
    }
    /// Waits until every party has arrived; `relax` runs while spinning.
    pub fn wait(&self, relax: &dyn Fn()) {
        let gen = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.parties.load(Ordering::Acquire) {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
        } else {
            while self.generation.load(Ordering::Acquire) == gen {
                relax();
            }
        }
    }
}

/// Start and end clock readings of every pass of every kernel on every thread, shared by the
/// threads of one run so that one of them can compute the aggregate afterwards.
#[derive(Debug)]
pub struct TimingTable<const SLOTS: usize> {
    ticks: [AtomicU64; SLOTS],
}

/// The table size the guest uses: every vCPU, every pass, four kernels, start and end.
pub const GUEST_TIMING_SLOTS: usize = MAX_VCPUS as usize * MAX_PASSES as usize * 8;

impl<const SLOTS: usize> TimingTable<SLOTS> {
    /// An all-zero table.
    #[allow(clippy::declare_interior_mutable_const)]
    pub const fn new() -> Self {
        const ZERO: AtomicU64 = AtomicU64::new(0);
        Self {
            ticks: [ZERO; SLOTS],
        }
    }
    fn slot(thread: u32, pass: u32, kernel: usize, end: bool) -> usize {
        ((thread as usize * MAX_PASSES as usize + pass as usize) * 4 + kernel) * 2 + end as usize
    }
    fn set(&self, thread: u32, pass: u32, kernel: usize, end: bool, v: u64) {
        if let Some(s) = self.ticks.get(Self::slot(thread, pass, kernel, end)) {
            s.store(v, Ordering::Relaxed);
        }
    }
    fn get(&self, thread: u32, pass: u32, kernel: usize, end: bool) -> u64 {
        self.ticks
            .get(Self::slot(thread, pass, kernel, end))
            .map_or(0, |s| s.load(Ordering::Relaxed))
    }
}

impl<const SLOTS: usize> Default for TimingTable<SLOTS> {
    fn default() -> Self {
        Self::new()
    }
}

/// What the threads of one run share.
pub struct Run<'a, const SLOTS: usize> {
    /// Passes (STREAM's NTIMES, at most [`MAX_PASSES`]).
    pub passes: u32,
    /// Meeting point before and after each kernel.
    pub barrier: &'a SpinBarrier,
    /// Clock readings.
    pub timings: &'a TimingTable<SLOTS>,
    /// Reads the clock (the TSC in the guest and on the host).
    pub clock: fn() -> u64,
    /// Runs while waiting at the barrier.
    pub relax: &'a dyn Fn(),
}

impl<const SLOTS: usize> Run<'_, SLOTS> {
    /// Runs the kernels on one thread's arrays, in lockstep with the other threads, as STREAM's
    /// OpenMP loop does; returns whether the arrays validate afterwards.
    pub fn run_thread(&self, thread: u32, arrays: &mut Arrays<'_>) -> bool {
        arrays.init();
        self.barrier.wait(self.relax);
        for pass in 0..self.passes.min(MAX_PASSES) {
            for kernel in 0..4 {
                self.barrier.wait(self.relax);
                let start = (self.clock)();
                match kernel {
                    0 => copy(arrays.c, arrays.a),
                    1 => scale(arrays.b, arrays.c),
                    2 => add(arrays.c, arrays.a, arrays.b),
                    _ => triad(arrays.a, arrays.b, arrays.c),
                }
                let end = (self.clock)();
                self.timings.set(thread, pass, kernel, false, start);
                self.timings.set(thread, pass, kernel, true, end);
            }
        }
        self.barrier.wait(self.relax);
        arrays.validate(self.passes.min(MAX_PASSES))
    }

    /// Results of a group of threads: bytes of all members over first start to last end, per
    /// pass; min/avg/max over the passes after the first (STREAM skips pass 0).
    /// `elements[t]` is thread t's elements per array; `members` selects the threads.
    pub fn group(
        &self,
        members: &mut dyn Iterator<Item = u32>,
        elements: &[u64],
        tsc_khz: u32,
    ) -> [KernelResult; 4] {
        let mut out = [KernelResult::default(); 4];
        let passes = self.passes.min(MAX_PASSES);
        let mut first = true;
        let mut starts = [[u64::MAX; MAX_PASSES as usize]; 4];
        let mut ends = [[0u64; MAX_PASSES as usize]; 4];
        for t in members {
            let n = elements.get(t as usize).copied().unwrap_or(0);
            for (k, r) in out.iter_mut().enumerate() {
                r.bytes += BYTES_PER_ELEMENT[k] * n;
                for p in 0..passes {
                    let (s, e) = (
                        self.timings.get(t, p, k, false),
                        self.timings.get(t, p, k, true),
                    );
                    starts[k][p as usize] = starts[k][p as usize].min(s);
                    ends[k][p as usize] = ends[k][p as usize].max(e);
                }
            }
            first = false;
        }
        if first || passes < 2 {
            return out;
        }
        for (k, r) in out.iter_mut().enumerate() {
            let (mut min, mut max, mut sum) = (u64::MAX, 0u64, 0u64);
            for p in 1..passes as usize {
                let ns = ticks_to_ns(ends[k][p].saturating_sub(starts[k][p]), tsc_khz);
                min = min.min(ns);
                max = max.max(ns);
                sum += ns;
            }
            r.min_ns = min.max(1);
            r.max_ns = max;
            r.avg_ns = sum / (passes as u64 - 1);
        }
        out
    }

    /// One thread's own results.
    pub fn thread_result(&self, thread: u32, elements: &[u64], tsc_khz: u32) -> VcpuStream {
        VcpuStream {
            vcpu: thread,
            elements: elements.get(thread as usize).copied().unwrap_or(0),
            kernels: self.group(&mut core::iter::once(thread), elements, tsc_khz),
            ..VcpuStream::default()
        }
    }

    /// Per-node and total results; `node_of[t]` is thread t's node.
    pub fn groups(
        &self,
        node_of: &[u32],
        elements: &[u64],
        tsc_khz: u32,
        out: &mut [GroupStream],
    ) -> usize {
        let mut count = 0;
        let mut nodes_done = 0u64;
        for &node in node_of {
            let bit = 1u64 << (node % 64);
            if nodes_done & bit != 0 || count + 1 >= out.len() {
                continue;
            }
            nodes_done |= bit;
            let members =
                || (0..node_of.len() as u32).filter(move |&t| node_of[t as usize] == node);
            out[count] = GroupStream {
                node,
                vcpus: members().count() as u32,
                kernels: self.group(&mut members(), elements, tsc_khz),
            };
            count += 1;
        }
        out[count] = GroupStream {
            node: TOTAL_GROUP,
            vcpus: node_of.len() as u32,
            kernels: self.group(&mut (0..node_of.len() as u32), elements, tsc_khz),
        };
        count + 1
    }
}

impl<const SLOTS: usize> core::fmt::Debug for Run<'_, SLOTS> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Run")
            .field("passes", &self.passes)
            .finish_non_exhaustive()
    }
}

/// Converts clock ticks to nanoseconds.
pub fn ticks_to_ns(ticks: u64, tsc_khz: u32) -> u64 {
    if tsc_khz == 0 {
        return ticks;
    }
    (ticks as u128 * 1_000_000 / tsc_khz as u128) as u64
}

/// Reads the TSC, fenced so the kernels' loads are not reordered around it.
pub fn rdtsc() -> u64 {
    // SAFETY: lfence and rdtsc have no memory effects; both exist on every x86_64 CPU
    // (rdtsc is allowed at CPL 3 unless CR4.TSD is set, which our VMM never sets).
    unsafe {
        core::arch::x86_64::_mm_lfence();
        let t = core::arch::x86_64::_rdtsc();
        core::arch::x86_64::_mm_lfence();
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn aligned(n: usize) -> Vec<f64> {
        // Vec<f64> from the global allocator is 16-byte aligned on x86_64 glibc for these sizes.
        let v = vec![0.0f64; n];
        assert_eq!(v.as_ptr() as usize % 16, 0);
        v
    }

    #[test]
    fn kernels_compute_streams_recurrence() {
        let mut mem = aligned(3 * 64);
        let mut arr = Arrays::split(&mut mem, 64).unwrap();
        arr.init();
        copy(arr.c, arr.a);
        assert!(arr.c.iter().all(|&x| x == 2.0));
        scale(arr.b, arr.c);
        assert!(arr.b.iter().all(|&x| x == 6.0));
        add(arr.c, arr.a, arr.b);
        assert!(arr.c.iter().all(|&x| x == 8.0));
        triad(arr.a, arr.b, arr.c);
        assert!(arr.a.iter().all(|&x| x == 30.0));
        assert!(arr.validate(1));
        assert!(!arr.validate(2));
    }

    #[test]
    fn validation_catches_a_single_wrong_element() {
        let mut mem = aligned(3 * 1024);
        let mut arr = Arrays::split(&mut mem, 1024).unwrap();
        arr.init();
        assert!(arr.validate(0));
        arr.b[517] = 2.5;
        assert!(!arr.validate(0));
    }

    #[test]
    fn split_refuses_bad_shapes() {
        let mut mem = aligned(100);
        assert!(Arrays::split(&mut mem, 12).is_none()); // not a multiple of 8
        assert!(Arrays::split(&mut mem, 40).is_none()); // 3 * 40 > 100
        assert!(Arrays::split(&mut mem[1..], 8).is_none()); // misaligned
        assert_eq!(Arrays::elements_for(3 * 8 * 100), 96);
    }

    #[test]
    fn threads_run_in_lockstep_and_aggregate() {
        const SLOTS: usize = 4 * MAX_PASSES as usize * 8;
        let barrier = Arc::new(SpinBarrier::new());
        barrier.set_parties(3);
        let timings = Arc::new(TimingTable::<SLOTS>::new());
        let n = 4096usize;
        let handles: Vec<_> = (0..3u32)
            .map(|t| {
                let (barrier, timings) = (barrier.clone(), timings.clone());
                std::thread::spawn(move || {
                    let relax = std::thread::yield_now;
                    let run = Run {
                        passes: 5,
                        barrier: &barrier,
                        timings: &timings,
                        clock: rdtsc,
                        relax: &relax,
                    };
                    let mut mem = aligned(3 * n);
                    let mut arr = Arrays::split(&mut mem, n).unwrap();
                    run.run_thread(t, &mut arr)
                })
            })
            .collect();
        assert!(handles.into_iter().all(|h| h.join().unwrap()));
        let relax = || {};
        let run = Run {
            passes: 5,
            barrier: &barrier,
            timings: &timings,
            clock: rdtsc,
            relax: &relax,
        };
        let elements = [n as u64; 3];
        let mut groups = [GroupStream::default(); 4];
        let count = run.groups(&[0, 0, 1], &elements, 1_000_000, &mut groups);
        assert_eq!(count, 3);
        assert_eq!((groups[0].node, groups[0].vcpus), (0, 2));
        assert_eq!((groups[1].node, groups[1].vcpus), (1, 1));
        assert_eq!(groups[2].node, TOTAL_GROUP);
        let total = groups[2].kernels;
        assert_eq!(total[0].bytes, 3 * 16 * n as u64);
        assert_eq!(total[3].bytes, 3 * 24 * n as u64);
        for k in total {
            assert!(
                k.min_ns > 0 && k.min_ns <= k.avg_ns && k.avg_ns <= k.max_ns,
                "{k:?}"
            );
        }
        let one = run.thread_result(2, &elements, 1_000_000);
        assert_eq!(one.kernels[1].bytes, 16 * n as u64);
        // The group spans its members, so it can never be faster than its slowest member.
        assert!(groups[1].kernels[0].min_ns >= one.kernels[0].min_ns);
    }

    #[test]
    fn ticks_convert_at_the_given_rate() {
        assert_eq!(ticks_to_ns(3_000_000, 3_000_000), 1_000_000);
        assert_eq!(ticks_to_ns(5, 0), 5);
    }
}
