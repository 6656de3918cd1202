//! AF_PACKET raw sockets bound to one interface and one EtherType (the fd wrapper: all of the
//! crate's `unsafe` lives here).
//!
//! Plain `send`/`recv`, and for the event loop a TPACKET_V2 receive ring ([`RxRing`]): the kernel
//! copies each frame into a slot of a memory map shared with us and flips the slot's status
//! word, so taking a frame costs no system call (the loop waits in `epoll_wait`, then reads the
//! ring; a `recvmmsg` per wake-up cost about 1 µs per side of a round trip, measured with
//! `perf record`). V2, not V3: `fabric-anchors.md` §2.1 measured 1–8 ms of block latency with a
//! TPACKET_V3 ring, whose blocks are handed over when full or on a timer; a V2 slot is handed
//! over as soon as its frame is in it (and the socket's waiters are woken at once).
//! Timers are a [`Timer`] (timerfd, hrtimer-based; SO_RCVTIMEO is jiffy-based: 4 ms here) polled
//! with the sockets, which the 1 ms retransmission floor needs.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use thiserror::Error;

/// Errors of this module.
#[derive(Debug, Error)]
pub enum PacketError {
    /// No such network interface.
    #[error("no network interface named {0}")]
    NoInterface(String),
    /// Interface name too long or with a NUL.
    #[error("bad interface name {0:?}")]
    BadName(String),
    /// The socket could not be created or bound.
    #[error("cannot open an AF_PACKET socket on {iface} (needs CAP_NET_RAW)")]
    Socket {
        /// The interface.
        iface: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The interface's MAC address could not be read.
    #[error("cannot read the MAC address of {0}")]
    Mac(String),
}

/// `ETH_P_ALL`: every EtherType (the impairment forwarder).
pub const ETH_P_ALL: u16 = 0x0003;

/// An AF_PACKET `SOCK_RAW` socket on one interface.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    mac: [u8; 6],
    iface: String,
}

fn ifindex(iface: &str) -> Result<i32, PacketError> {
    let c = std::ffi::CString::new(iface).map_err(|_| PacketError::BadName(iface.into()))?;
    if iface.len() >= libc::IFNAMSIZ {
        return Err(PacketError::BadName(iface.into()));
    }
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(PacketError::NoInterface(iface.into()));
    }
    i32::try_from(idx).map_err(|_| PacketError::NoInterface(iface.into()))
}

/// The MAC address of `iface` (from sysfs).
pub fn interface_mac(iface: &str) -> Result<[u8; 6], PacketError> {
    ifindex(iface)?;
    std::fs::read_to_string(format!("/sys/class/net/{iface}/address"))
        .ok()
        .and_then(|s| crate::frame::parse_mac(&s))
        .ok_or_else(|| PacketError::Mac(iface.into()))
}

/// `setsockopt(2)` with `v` as the option's value: `T` must be the option's C type (an int, a
/// `timeval`, a `tpacket_req`, ...).
fn setsockopt<T>(fd: RawFd, level: i32, name: i32, v: &T) -> io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<T>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `v` is a live value of the option's C type and its size is passed; the kernel
    // only reads it.
    let r = unsafe { libc::setsockopt(fd, level, name, (v as *const T).cast(), len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl PacketSocket {
    /// Opens a non-blocking socket receiving `ethertype` frames on `iface`; with `ethertype` 0,
    /// a socket that only sends (it is bound to no EtherType, so it receives nothing).
    pub fn open(iface: &str, ethertype: u16) -> Result<PacketSocket, PacketError> {
        let idx = ifindex(iface)?;
        let mac = interface_mac(iface)?;
        let sock_err = |source| PacketError::Socket {
            iface: iface.into(),
            source,
        };
        let proto = i32::from(ethertype.to_be());
        // SAFETY: plain socket(2) call with constant arguments; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                proto,
            )
        };
        if raw < 0 {
            return Err(sock_err(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor we own; OwnedFd closes it on drop.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ethertype.to_be();
        sll.sll_ifindex = idx;
        // SAFETY: `sll` is a valid sockaddr_ll and the length matches its type.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(sock_err(io::Error::last_os_error()));
        }
        // A large receive buffer: plain recv() dropped 3-14 % of frames on overrun (§2.3).
        // FORCE needs CAP_NET_ADMIN; the plain option is capped by rmem_max.
        let big = 8 << 20;
        if ethertype != 0
            && setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &big).is_err()
        {
            let _ = setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, &big);
        }
        Ok(PacketSocket {
            fd,
            mac,
            iface: iface.into(),
        })
    }

    /// The interface's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The interface name.
    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// Sends one whole Ethernet frame (its header names the destination): `send` on the bound
    /// socket, which uses the device cached at bind time, rather than `sendto` with an address
    /// the kernel copies in and looks the device up from on every frame.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: `frame` is a live buffer of the given length; the kernel only reads it.
            let r =
                unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if r >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                // The device queue is full: wait until writable and retry.
                io::ErrorKind::WouldBlock => {
                    wait_fd(
                        self.fd.as_raw_fd(),
                        libc::POLLOUT,
                        Some(Duration::from_millis(10)),
                    )?;
                }
                _ => return Err(e),
            }
        }
    }

    /// Takes the socket's pending error, if any (reading `SO_ERROR` clears it). A socket with a
    /// receive ring is never read with `recv`, which would otherwise report it; left pending,
    /// the error (ENETDOWN when the interface goes down) keeps the socket ready in `epoll_wait`.
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `v`/`len` are a live int and its length, written by the kernel.
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((v != 0).then(|| io::Error::from_raw_os_error(v)))
    }

    /// Receives one frame without blocking: `Ok(None)` when none is waiting. Frames this host
    /// sent (`PACKET_OUTGOING`, seen on `ETH_P_ALL` sockets) are skipped.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        self.recv_flags(buf, libc::MSG_DONTWAIT)
    }

    /// Makes the socket blocking (no O_NONBLOCK) with [`PacketSocket::recv_blocking`] waiting
    /// at most `timeout` (None: forever). SO_RCVTIMEO is a timer-wheel timeout: no hrtimer is
    /// armed per wait, and it has jiffy resolution (it rounds up to a tick).
    pub fn set_blocking(&self, timeout: Option<Duration>) -> io::Result<()> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: fcntl on our own live descriptor with integer arguments.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let t = timeout.unwrap_or_default();
        let tv = libc::timeval {
            tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_usec: libc::suseconds_t::from(t.subsec_micros() as i32),
        };
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)
    }

    /// Receives one frame, sleeping in `recvfrom` (after [`PacketSocket::set_blocking`]) until
    /// one arrives or the timeout passes (`Ok(None)`).
    pub fn recv_blocking(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        self.recv_flags(buf, 0)
    }

    fn recv_flags(&self, buf: &mut [u8], flags: i32) -> io::Result<Option<usize>> {
        loop {
            // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` is a live, writable buffer of the given length; `sll`/`len` are a
            // valid address buffer and its length, written by the kernel.
            let r = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    flags,
                    (&mut sll as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(None),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            if sll.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            return Ok(Some(r.unsigned_abs()));
        }
    }
}

/// Bytes per ring slot: the TPACKET_V2 header, the source address and a full Ethernet frame
/// with a VLAN tag fit (the kernel puts the frame at `tp_mac`, under 128 bytes in).
const RING_SLOT: usize = 2048;
/// Slots per ring block: blocks are 64 KiB, a multiple of the page size as the kernel requires.
const RING_SLOTS_PER_BLOCK: usize = 32;
/// Where the kernel writes the source `sockaddr_ll` in a slot (after the aligned header).
const RING_ADDR_OFF: usize = (std::mem::size_of::<libc::tpacket2_hdr>() + libc::TPACKET_ALIGNMENT
    - 1)
    & !(libc::TPACKET_ALIGNMENT - 1);

/// A TPACKET_V2 receive ring mapped from a [`PacketSocket`] (see the module docs). Once it is
/// attached, the socket's frames arrive here only; `recv` on the socket sees none.
pub struct RxRing {
    map: *mut u8,
    len: usize,
    slots: usize,
    /// The next slot the kernel fills (we take slots in the order it fills them).
    next: usize,
}

// SAFETY: the mapping is owned by the ring (unmapped on drop) and used only through `&mut self`;
// nothing ties it to the thread that created it.
unsafe impl Send for RxRing {}

impl std::fmt::Debug for RxRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RxRing")
            .field("slots", &self.slots)
            .field("next", &self.next)
            .finish()
    }
}

impl Drop for RxRing {
    fn drop(&mut self) {
        // SAFETY: `map`/`len` are the mapping made in `PacketSocket::rx_ring`, unmapped once.
        unsafe { libc::munmap(self.map.cast(), self.len) };
    }
}

impl PacketSocket {
    /// Attaches a TPACKET_V2 receive ring of at least `slots` frames (whole 64 KiB blocks).
    pub fn rx_ring(&self, slots: usize) -> io::Result<RxRing> {
        let fd = self.fd.as_raw_fd();
        let version = libc::tpacket_versions::TPACKET_V2 as i32;
        setsockopt(fd, libc::SOL_PACKET, libc::PACKET_VERSION, &version)?;
        let blocks = slots.div_ceil(RING_SLOTS_PER_BLOCK).max(1);
        let too_big = || io::Error::from(io::ErrorKind::InvalidInput);
        let req = libc::tpacket_req {
            tp_block_size: u32::try_from(RING_SLOT * RING_SLOTS_PER_BLOCK)
                .map_err(|_| too_big())?,
            tp_block_nr: u32::try_from(blocks).map_err(|_| too_big())?,
            tp_frame_size: RING_SLOT as u32,
            tp_frame_nr: u32::try_from(blocks * RING_SLOTS_PER_BLOCK).map_err(|_| too_big())?,
        };
        setsockopt(fd, libc::SOL_PACKET, libc::PACKET_RX_RING, &req)?;
        let len = blocks * RING_SLOTS_PER_BLOCK * RING_SLOT;
        // SAFETY: maps the ring just configured on our own socket, shared with the kernel; the
        // result is checked and unmapped by `RxRing::drop`.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(RxRing {
            map: map.cast(),
            len,
            slots: blocks * RING_SLOTS_PER_BLOCK,
            next: 0,
        })
    }
}

impl RxRing {
    /// Slots in the ring.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Hands the frames waiting in the ring, oldest first and at most `max`, to `f` (writable:
    /// the endpoint decrypts in place), skipping frames this host sent, and gives each slot
    /// back to the kernel after it. Returns how many slots were taken (0: none waiting).
    pub fn drain(&mut self, max: usize, mut f: impl FnMut(&mut [u8])) -> usize {
        let mut taken = 0;
        while taken < max {
            // SAFETY: `next < slots`, so the slot lies inside the mapping; its first field is
            // the u32 status word (4-aligned: slots are 2048-aligned in a page-aligned map),
            // which the kernel also updates, hence the atomic view.
            let slot = unsafe { self.map.add(self.next * RING_SLOT) };
            // SAFETY: as above.
            let status = unsafe { &*slot.cast::<std::sync::atomic::AtomicU32>() };
            if status.load(std::sync::atomic::Ordering::Acquire) & libc::TP_STATUS_USER == 0 {
                break;
            }
            // SAFETY: the kernel set TP_STATUS_USER (observed with Acquire above), so the slot
            // is ours and fully written until we store TP_STATUS_KERNEL below; the header and
            // the address are plain data inside the slot.
            let (hdr, addr) = unsafe {
                (
                    std::ptr::read(slot.cast::<libc::tpacket2_hdr>()),
                    std::ptr::read_unaligned(slot.add(RING_ADDR_OFF).cast::<libc::sockaddr_ll>()),
                )
            };
            let (off, len) = (usize::from(hdr.tp_mac), hdr.tp_snaplen as usize);
            if addr.sll_pkttype != libc::PACKET_OUTGOING && off + len <= RING_SLOT {
                // SAFETY: `off + len` lies inside the slot (checked), which is ours (see above)
                // and not otherwise referenced while `f` runs.
                f(unsafe { std::slice::from_raw_parts_mut(slot.add(off), len) });
            }
            status.store(libc::TP_STATUS_KERNEL, std::sync::atomic::Ordering::Release);
            self.next = (self.next + 1) % self.slots;
            taken += 1;
        }
        taken
    }
}

/// Microseconds on `CLOCK_MONOTONIC` (the clock `Instant` reads): one vDSO call, without
/// `Instant`'s checked `timespec` arithmetic, for an event loop that reads it twice per step.
pub fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live timespec the call writes; CLOCK_MONOTONIC always exists, so the
    // call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

/// A one-shot monotonic timer whose fd is polled with the sockets (timerfd).
///
/// Waiting with a `ppoll` timeout arms and cancels an hrtimer on every wait; on a virtual
/// machine each of those reprograms the TSC-deadline timer (a VM exit), which cost about 6 µs
/// per wait here. A timer that stays armed across waits and is moved only when an earlier
/// deadline appears does that once per deadline instead of once per frame.
#[derive(Debug)]
pub struct Timer {
    fd: vmm_sys_util::timerfd::TimerFd,
}

impl Timer {
    /// A disarmed timer.
    pub fn new() -> io::Result<Timer> {
        let fd = vmm_sys_util::timerfd::TimerFd::new().map_err(io::Error::from)?;
        Ok(Timer { fd })
    }

    /// Fires once after `after` (which must not be zero: zero disarms).
    pub fn arm(&mut self, after: Duration) -> io::Result<()> {
        self.fd.reset(after, None).map_err(io::Error::from)
    }

    /// Consumes an expiry; call only when the fd polled readable (it blocks otherwise).
    pub fn consume(&mut self) -> io::Result<()> {
        self.fd.wait().map(|_| ()).map_err(io::Error::from)
    }
}

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsRawFd for PacketSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn wait_fd(fd: RawFd, events: i16, timeout: Option<Duration>) -> io::Result<bool> {
    Ok(wait_readable(&[fd], events, timeout)?
        .into_iter()
        .any(|r| r))
}

/// Waits until one of `fds` has `events` (POLLIN/POLLOUT) or `timeout` passes (None: forever).
/// Returns which fds are ready. Uses `ppoll` (hrtimer resolution).
pub fn wait_readable(
    fds: &[RawFd],
    events: i16,
    timeout: Option<Duration>,
) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(t.subsec_nanos() as i32),
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `pfds` is a live array of `pfds.len()` pollfd structs the kernel writes revents
    // into; `ts_ptr` is null or points to a live timespec; a null sigmask keeps the mask.
    let r = unsafe {
        libc::ppoll(
            pfds.as_mut_ptr(),
            pfds.len() as libc::nfds_t,
            ts_ptr,
            std::ptr::null(),
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(pfds.iter().map(|p| p.revents != 0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_interface_is_a_clear_error() {
        let e = PacketSocket::open("nosuchif0", 0x88B5).unwrap_err();
        assert_eq!(e.to_string(), "no network interface named nosuchif0");
        assert!(matches!(
            PacketSocket::open("a\0b", 0x88B5),
            Err(PacketError::BadName(_))
        ));
        assert!(matches!(
            interface_mac("this-name-is-far-too-long"),
            Err(PacketError::BadName(_))
        ));
    }

    #[test]
    fn loopback_socket_opens_and_polls() {
        // `lo` exists everywhere; opening needs CAP_NET_RAW (tests run as root).
        let s = PacketSocket::open("lo", 0x88B5).unwrap();
        let mut buf = [0u8; 64];
        assert!(s.recv(&mut buf).unwrap().is_none());
        let ready = wait_readable(
            &[s.as_raw_fd()],
            libc::POLLIN,
            Some(Duration::from_millis(1)),
        )
        .unwrap();
        assert_eq!(ready, vec![false]);
    }

    #[test]
    fn monotonic_clock_counts_microseconds() {
        let (a, i) = (monotonic_us(), std::time::Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        let (d, e) = (monotonic_us() - a, i.elapsed().as_micros() as u64);
        assert!(
            d >= 20_000 && d.abs_diff(e) < 2_000,
            "{d} µs against Instant's {e} µs"
        );
    }

    #[test]
    fn timer_fires_once_when_armed() {
        let mut t = Timer::new().unwrap();
        let fd = [t.as_raw_fd()];
        let wait = |ms| wait_readable(&fd, libc::POLLIN, Some(Duration::from_millis(ms))).unwrap();
        assert_eq!(wait(5), vec![false], "a new timer is disarmed");
        t.arm(Duration::from_millis(2)).unwrap();
        assert_eq!(wait(1000), vec![true]);
        t.consume().unwrap();
        assert_eq!(wait(5), vec![false], "one-shot: consumed and not re-armed");
    }

    #[test]
    fn ring_receives_frames_sent_on_loopback() {
        // Frames sent on `lo` come back as incoming on a socket of the same EtherType.
        let s = PacketSocket::open("lo", 0x88B4).unwrap();
        let mut ring = s.rx_ring(40).unwrap();
        assert_eq!(ring.slots(), 64, "whole blocks");
        assert_eq!(ring.drain(usize::MAX, |_| panic!("empty")), 0);
        let mut f = [0u8; 60];
        f[12..14].copy_from_slice(&0x88B4u16.to_be_bytes());
        // More frames than slots in two rounds: the ring wraps around.
        let mut got = Vec::new();
        for round in 0..2u8 {
            for i in 0..40u8 {
                f[14] = i;
                f[15] = round;
                s.send(&f).unwrap();
            }
            let ready = wait_readable(&[s.as_raw_fd()], libc::POLLIN, Some(Duration::from_secs(1)))
                .unwrap();
            assert_eq!(ready, vec![true]);
            while got.len() < 40 * (usize::from(round) + 1) {
                let n = ring.drain(7, |b| {
                    assert_eq!(b.len(), 60);
                    b[16] = 1; // writable in place
                    got.push((b[15], b[14]));
                });
                assert!(n <= 7);
                if n == 0 {
                    break;
                }
            }
        }
        let want: Vec<(u8, u8)> = (0..2).flat_map(|r| (0..40).map(move |i| (r, i))).collect();
        assert_eq!(got, want);
        let ready = wait_readable(&[s.as_raw_fd()], libc::POLLIN, Some(Duration::ZERO)).unwrap();
        assert_eq!(ready, vec![false], "nothing left: not readable");
        let mut buf = [0u8; 64];
        assert!(
            s.recv(&mut buf).unwrap().is_none(),
            "frames go to the ring only"
        );
        assert!(s.take_error().unwrap().is_none());
    }
}
