//! A PACKET_MMAP receive ring (TPACKET_V2) on the target's AF_PACKET socket.
//!
//! With the ring, the kernel writes each AoE frame into a slot of memory shared with the
//! target, in the softirq that delivers it (on a veth pair, the sender's), and marks the slot
//! `TP_STATUS_USER`; the target walks the slots in order, copies each frame into its frame
//! buffer and hands the slot back (`TP_STATUS_KERNEL`). So a busy target makes no
//! `recvmmsg` at all, and no socket-queue skb is queued, dequeued and copied to user space
//! per frame; it waits (`poll`) only when the slot at the head is still the kernel's.
//!
//! TPACKET_V2 rather than V3: V3 hands frames over a block at a time, once a block is full or
//! its retire timer (milliseconds) fires, which would hold a lone request (queue depth one)
//! for up to that long; V2 hands over every slot as soon as its frame is in.
//!
//! Memory model: the status word of a slot is the hand-over point. The kernel fills a slot
//! and then publishes `TP_STATUS_USER` (with a write barrier); we read it with Acquire
//! ordering, and only then read the slot's header and frame; we hand it back by storing
//! `TP_STATUS_KERNEL` with Release ordering once the frame is copied. No reference to a slot
//! outlives the [`RxFrame`] that holds it, and an `RxFrame` borrows the ring mutably, so a
//! slot is never handed back while its bytes are borrowed.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::sys::setsockopt;

/// Offsets in a `tpacket2_hdr` (linux/if_packet.h).
const TP_STATUS: usize = 0;
const TP_SNAPLEN: usize = 8;
const TP_MAC: usize = 12;
/// Bytes a slot spends before the frame: the `tpacket2_hdr`, the `sockaddr_ll`, and the
/// alignment the kernel adds (the MAC header starts at `tp_mac`, 66 bytes in on Linux 6.x
/// for a raw socket); a conservative bound, for sizing.
pub const SLOT_HEADROOM: usize = 128;
/// Smallest block the kernel accepts is a page; blocks of this size hold several slots.
const BLOCK_SIZE: usize = 64 << 10;

/// Errors setting up the ring.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// A socket option or the mapping was refused.
    #[error("{what}")]
    Setup {
        /// What was refused.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// The shape of a ring: `frame_nr` slots of `frame_size` bytes, in blocks of `block_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per slot (a power of two, at least 2 KiB).
    pub frame_size: usize,
    /// Slots.
    pub frame_nr: usize,
    /// Bytes per block (a multiple of the slot size and of the page size).
    pub block_size: usize,
}

impl Geometry {
    /// Slots that hold a frame of up to `max_frame` bytes whole, at least `frames` of them
    /// (rounded up to fill whole blocks).
    pub fn new(max_frame: usize, frames: usize) -> Geometry {
        let frame_size = (max_frame + SLOT_HEADROOM).next_power_of_two().max(2048);
        let block_size = frame_size.max(BLOCK_SIZE);
        let per_block = block_size / frame_size;
        let frame_nr = frames.max(1).div_ceil(per_block) * per_block;
        Geometry {
            frame_size,
            frame_nr,
            block_size,
        }
    }

    /// The longest frame a slot carries whole (longer ones arrive cut to this, as a
    /// `recvmmsg` into a buffer of this size would cut them).
    pub fn max_frame(&self) -> usize {
        self.frame_size - SLOT_HEADROOM
    }

    fn per_block(&self) -> usize {
        self.block_size / self.frame_size
    }

    /// Bytes of the whole ring.
    fn len(&self) -> usize {
        self.frame_nr / self.per_block() * self.block_size
    }

    /// Byte offset of slot `i` (slots do not cross blocks).
    fn slot_offset(&self, i: usize) -> usize {
        i / self.per_block() * self.block_size + i % self.per_block() * self.frame_size
    }
}

/// The slots of a ring in memory, and the next slot to look at.
#[derive(Debug)]
struct Slots {
    /// Address of the ring's first byte (kept as an integer, as [`crate::mapped::FileMap`]
    /// does, so the ring is `Send`).
    base: usize,
    geo: Geometry,
    head: usize,
}

impl Slots {
    /// # Safety
    ///
    /// `base` must point to `geo.len()` bytes, readable and writable, 4-byte aligned at each
    /// slot, that stay valid as long as the `Slots`, and that only this `Slots` and the
    /// kernel's ring (following the status protocol of the module docs) touch.
    unsafe fn new(base: *mut u8, geo: Geometry) -> Slots {
        Slots {
            base: base as usize,
            geo,
            head: 0,
        }
    }

    fn slot_ptr(&self, i: usize) -> *mut u8 {
        (self.base + self.geo.slot_offset(i)) as *mut u8
    }

    fn status(&self, i: usize) -> &AtomicU32 {
        // SAFETY: the status word is the slot's first 4 bytes, inside the ring and aligned
        // (slots start at multiples of 2 KiB from a page-aligned base, see `Slots::new`);
        // the kernel and we only access it atomically.
        unsafe { AtomicU32::from_ptr(self.slot_ptr(i).add(TP_STATUS).cast()) }
    }

    /// True when the head slot holds a frame for us.
    fn ready(&self) -> bool {
        self.status(self.head).load(Ordering::Acquire) & libc::TP_STATUS_USER != 0
    }

    /// The frame in the head slot, if the kernel has handed it over.
    fn take(&mut self) -> Option<RxFrame<'_>> {
        if !self.ready() {
            return None;
        }
        let slot = self.slot_ptr(self.head);
        let fs = self.geo.frame_size;
        // SAFETY: the slot is ours (status USER, read with Acquire above) until we store
        // KERNEL in `RxFrame::drop`; it is `frame_size` bytes inside the ring; the reads of
        // the header's fields are unaligned-safe.
        let (snaplen, mac) = unsafe {
            (
                slot.add(TP_SNAPLEN).cast::<u32>().read_unaligned() as usize,
                usize::from(slot.add(TP_MAC).cast::<u16>().read_unaligned()),
            )
        };
        // A header pointing outside its slot (never from a correct kernel) gives no bytes.
        let from = mac.min(fs);
        let len = snaplen.min(fs - from);
        // SAFETY: `from + len <= frame_size`, inside the slot, which stays ours (and is not
        // written by anyone) for the lifetime of the `RxFrame`, which borrows `self`.
        let bytes = unsafe { std::slice::from_raw_parts(slot.add(from), len) };
        Some(RxFrame { slots: self, bytes })
    }
}

/// A frame in a slot of the ring; the slot goes back to the kernel when this is dropped.
#[derive(Debug)]
pub struct RxFrame<'a> {
    slots: &'a mut Slots,
    bytes: &'a [u8],
}

impl RxFrame<'_> {
    /// The frame, from its Ethernet header on.
    pub fn bytes(&self) -> &[u8] {
        self.bytes
    }
}

impl Drop for RxFrame<'_> {
    fn drop(&mut self) {
        let s = &mut *self.slots;
        s.status(s.head)
            .store(libc::TP_STATUS_KERNEL, Ordering::Release);
        s.head = (s.head + 1) % s.geo.frame_nr;
    }
}

/// A TPACKET_V2 receive ring mapped from a packet socket.
#[derive(Debug)]
pub struct RxRing {
    slots: Slots,
    len: usize,
}

impl RxRing {
    /// Sets up a receive ring of shape `geo` on the AF_PACKET socket `fd` and maps it. From
    /// then on the socket's frames arrive in the ring only (not through `recv`).
    pub fn new(fd: RawFd, geo: Geometry) -> Result<RxRing, RingError> {
        let err = |what| move |source| RingError::Setup { what, source };
        let version = libc::tpacket_versions::TPACKET_V2 as libc::c_int;
        setsockopt(fd, libc::SOL_PACKET, libc::PACKET_VERSION, &version)
            .map_err(err("PACKET_VERSION"))?;
        let c = |n: usize| libc::c_uint::try_from(n).unwrap_or(libc::c_uint::MAX);
        let req = libc::tpacket_req {
            tp_block_size: c(geo.block_size),
            tp_block_nr: c(geo.len() / geo.block_size),
            tp_frame_size: c(geo.frame_size),
            tp_frame_nr: c(geo.frame_nr),
        };
        setsockopt(fd, libc::SOL_PACKET, libc::PACKET_RX_RING, &req)
            .map_err(err("PACKET_RX_RING"))?;
        // SAFETY: a new shared mapping chosen by the kernel of the ring just set up on a
        // valid socket, of exactly its size; the result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                geo.len(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let source = io::Error::last_os_error();
            // Without the mapping, take the ring down again so `recv` gets the frames.
            let none = libc::tpacket_req {
                tp_block_size: 0,
                tp_block_nr: 0,
                tp_frame_size: 0,
                tp_frame_nr: 0,
            };
            let _ = setsockopt(fd, libc::SOL_PACKET, libc::PACKET_RX_RING, &none);
            return Err(RingError::Setup {
                what: "mmap of the receive ring",
                source,
            });
        }
        // SAFETY: the mapping is `geo.len()` bytes, page-aligned, readable and writable,
        // lives until `drop` unmaps it, and only the kernel's ring and this `Slots` use it.
        let slots = unsafe { Slots::new(p.cast(), geo) };
        Ok(RxRing {
            slots,
            len: geo.len(),
        })
    }

    /// The ring's shape.
    pub fn geometry(&self) -> Geometry {
        self.slots.geo
    }

    /// True when a frame is waiting at the head of the ring.
    pub fn ready(&self) -> bool {
        self.slots.ready()
    }

    /// The next frame, if the kernel has handed one over; its slot goes back to the kernel
    /// when the [`RxFrame`] is dropped.
    pub fn take(&mut self) -> Option<RxFrame<'_>> {
        self.slots.take()
    }
}

impl Drop for RxRing {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of this length; no `RxFrame` borrows it (they
        // borrow `self`).
        unsafe {
            libc::munmap(self.slots.base as *mut libc::c_void, self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ring in ordinary memory, filled by the test as the kernel would fill it.
    struct FakeRing {
        mem: Vec<u64>,
        geo: Geometry,
    }

    impl FakeRing {
        fn new(geo: Geometry) -> FakeRing {
            FakeRing {
                mem: vec![0u64; geo.len() / 8],
                geo,
            }
        }

        fn base(&mut self) -> *mut u8 {
            self.mem.as_mut_ptr().cast()
        }

        /// Puts `frame` in slot `i` at `mac`, status USER (as the kernel's `tpacket_rcv`).
        fn deliver(&mut self, i: usize, frame: &[u8], mac: u16) {
            let off = self.geo.slot_offset(i);
            let bytes: &mut [u8] = bytemuck_mut(&mut self.mem);
            let slot = &mut bytes[off..off + self.geo.frame_size];
            slot[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
            slot[TP_SNAPLEN..TP_SNAPLEN + 4].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
            slot[TP_MAC..TP_MAC + 2].copy_from_slice(&mac.to_ne_bytes());
            let m = usize::from(mac);
            let n = frame.len().min(slot.len().saturating_sub(m));
            if m < slot.len() {
                slot[m..m + n].copy_from_slice(&frame[..n]);
            }
            slot[..4].copy_from_slice(&libc::TP_STATUS_USER.to_ne_bytes());
        }

        fn status(&self, i: usize) -> u32 {
            let off = self.geo.slot_offset(i) / 8;
            (self.mem[off] & 0xffff_ffff) as u32
        }
    }

    fn bytemuck_mut(v: &mut [u64]) -> &mut [u8] {
        // SAFETY: a u64 slice viewed as bytes: same memory, every byte pattern valid, length
        // scaled by 8.
        unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len() * 8) }
    }

    fn small() -> Geometry {
        Geometry::new(1514, 64)
    }

    #[test]
    fn geometry_fits_frames_in_blocks() {
        let g = Geometry::new(1514, 100);
        assert_eq!(g.frame_size, 2048);
        assert_eq!(g.block_size, 64 << 10);
        assert_eq!(g.frame_nr, 128);
        assert!(g.max_frame() >= 1514);
        let j = Geometry::new(9014, 256);
        assert_eq!((j.frame_size, j.frame_nr), (16384, 256));
        assert!(j.max_frame() >= 9014);
        // Slot 4 of 16 KiB slots starts the second block.
        assert_eq!(j.slot_offset(4), 64 << 10);
        assert_eq!(j.len(), 256 * 16384);
        let huge = Geometry::new(100_000, 3);
        assert_eq!(huge.block_size, huge.frame_size);
        assert_eq!(huge.frame_nr, 3);
    }

    #[test]
    fn walks_handed_over_slots_in_order_and_hands_them_back() {
        let mut f = FakeRing::new(small());
        // SAFETY: the fake ring's memory outlives `s`, is 8-aligned, and only this test
        // (standing in for the kernel) and `s` touch it.
        let mut s = unsafe { Slots::new(f.base(), f.geo) };
        assert!(s.take().is_none());
        f.deliver(0, b"first frame", 66);
        f.deliver(1, b"second", 80);
        {
            let fr = s.take().unwrap();
            assert_eq!(fr.bytes(), b"first frame");
        }
        assert_eq!(f.status(0), libc::TP_STATUS_KERNEL);
        assert_eq!(s.take().unwrap().bytes(), b"second");
        assert!(s.take().is_none(), "slot 2 is still the kernel's");
        assert_eq!(s.head, 2);
    }

    #[test]
    fn wraps_around_the_last_slot() {
        let mut f = FakeRing::new(small());
        let n = f.geo.frame_nr;
        // SAFETY: as in the test above.
        let mut s = unsafe { Slots::new(f.base(), f.geo) };
        for round in 0..3u8 {
            for i in 0..n {
                f.deliver(i, &[round, i as u8, 0xAA], 66);
            }
            for i in 0..n {
                let fr = s.take().unwrap();
                assert_eq!(fr.bytes(), &[round, i as u8, 0xAA]);
            }
            assert!(s.take().is_none());
            assert_eq!(s.head, 0);
        }
    }

    #[test]
    fn a_header_pointing_out_of_its_slot_gives_no_more_than_the_slot() {
        let mut f = FakeRing::new(small());
        let fs = f.geo.frame_size;
        // SAFETY: as in the test above.
        let mut s = unsafe { Slots::new(f.base(), f.geo) };
        f.deliver(0, &vec![7u8; fs], 66);
        assert_eq!(s.take().unwrap().bytes().len(), fs - 66);
        f.deliver(1, b"x", u16::MAX);
        assert!(s.take().unwrap().bytes().is_empty());
        assert_eq!(f.status(1), libc::TP_STATUS_KERNEL);
    }

    #[test]
    fn maps_a_ring_on_a_packet_socket() {
        if !nix_is_root() {
            eprintln!("skipping maps_a_ring_on_a_packet_socket: needs root (AF_PACKET)");
            return;
        }
        let sock = crate::sys::PacketSocket::open("lo", 1 << 20).unwrap();
        let geo = Geometry::new(9014, 64);
        let mut r = RxRing::new(std::os::fd::AsRawFd::as_raw_fd(&sock), geo).unwrap();
        assert_eq!(r.geometry(), geo);
        assert!(!r.ready());
        // A frame of our EtherType sent on lo arrives in the ring.
        let mut frame = vec![0u8; 60];
        frame[12..14].copy_from_slice(&crate::wire::ETHERTYPE_AOE.to_be_bytes());
        frame[20] = 0x5a;
        sock.send(&frame).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !r.ready() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let got = r.take().unwrap();
        assert_eq!(got.bytes(), &frame[..]);
    }

    fn nix_is_root() -> bool {
        // SAFETY: geteuid has no memory effects.
        unsafe { libc::geteuid() == 0 }
    }
}
