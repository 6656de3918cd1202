//! AF_PACKET raw sockets bound to one interface and one EtherType (the fd wrapper: all of the
//! crate's `unsafe` lives here).
//!
//! Plain `send`/`recv` (and `recvmmsg` for batches) with `ppoll` for waiting:
//! `fabric-anchors.md` §2.1 measured 12.6 µs RTT with blocking recv, and a TPACKET_V3 ring adds
//! 1–8 ms of block latency, so control traffic does not use one. Timers are a [`Timer`]
//! (timerfd, hrtimer-based; SO_RCVTIMEO is jiffy-based: 4 ms here) polled with the sockets, which
//! the 1 ms retransmission floor needs.

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
    ifindex: i32,
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

fn setsockopt_int(fd: RawFd, level: i32, name: i32, v: i32) -> io::Result<()> {
    // SAFETY: `v` is a live i32 and the length passed is its size; the kernel only reads it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl PacketSocket {
    /// Opens a non-blocking socket receiving `ethertype` frames on `iface`.
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
        if setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, big).is_err() {
            let _ = setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, big);
        }
        Ok(PacketSocket {
            fd,
            ifindex: idx,
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

    /// Sends one whole Ethernet frame.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        if frame.len() >= 6 {
            sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        }
        loop {
            // SAFETY: `frame` is a live buffer of the given length; `sll` is a valid address of
            // the given length. The kernel only reads both.
            let r = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
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
        // SAFETY: `tv` is a live timeval and the length passed is its size; the kernel only
        // reads it.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
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

/// Frames one [`PacketSocket::recv_batch`] call can return.
pub const BATCH: usize = 16;
/// Room for one frame in a batch (a full Ethernet frame plus a VLAN tag).
const BATCH_FRAME: usize = 1536;

/// Buffers for [`PacketSocket::recv_batch`], with the `recvmmsg` headers built once: each
/// call only resets the address lengths the previous one overwrote (no 1.3 KiB of headers
/// zeroed and rebuilt per call).
pub struct RecvBatch {
    bufs: Box<[[u8; BATCH_FRAME]; BATCH]>,
    /// Source addresses, written by the kernel (`sll_pkttype` tells outgoing frames apart).
    addrs: Box<[libc::sockaddr_ll; BATCH]>,
    iovs: Box<[libc::iovec; BATCH]>,
    /// Point into `bufs`, `addrs` and `iovs`: heap allocations owned here, which do not move
    /// when the batch does.
    msgs: Box<[libc::mmsghdr; BATCH]>,
    lens: [usize; BATCH],
    n: usize,
}

// SAFETY: the raw pointers in `iovs` and `msgs` point only into heap allocations owned by
// the same `RecvBatch` and are used only through `&mut self`; moving the batch to another
// thread moves those allocations with it.
unsafe impl Send for RecvBatch {}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch").field("n", &self.n).finish()
    }
}

const SLL_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;

impl Default for RecvBatch {
    fn default() -> RecvBatch {
        // SAFETY: sockaddr_ll, iovec and mmsghdr are plain data; all-zero is a valid value of
        // each (null pointers, zero lengths) until the pointers are filled in below.
        let (addrs, iovs, msgs) = unsafe {
            (
                Box::new(std::mem::zeroed::<[libc::sockaddr_ll; BATCH]>()),
                Box::new(std::mem::zeroed::<[libc::iovec; BATCH]>()),
                Box::new(std::mem::zeroed::<[libc::mmsghdr; BATCH]>()),
            )
        };
        let mut b = RecvBatch {
            bufs: Box::new([[0u8; BATCH_FRAME]; BATCH]),
            addrs,
            iovs,
            msgs,
            lens: [0; BATCH],
            n: 0,
        };
        for i in 0..BATCH {
            b.iovs[i] = libc::iovec {
                iov_base: b.bufs[i].as_mut_ptr().cast(),
                iov_len: BATCH_FRAME,
            };
            let m = &mut b.msgs[i].msg_hdr;
            m.msg_name = (&mut b.addrs[i] as *mut libc::sockaddr_ll).cast();
            m.msg_namelen = SLL_LEN;
            m.msg_iov = &mut b.iovs[i];
            m.msg_iovlen = 1;
        }
        b
    }
}

impl RecvBatch {
    /// The frames of the last [`PacketSocket::recv_batch`] (frames this host sent skipped).
    pub fn frames(&mut self) -> impl Iterator<Item = &mut [u8]> {
        self.bufs
            .iter_mut()
            .zip(self.lens)
            .take(self.n)
            .filter(|(_, len)| *len > 0)
            .map(|(b, len)| &mut b[..len])
    }
}

impl PacketSocket {
    /// Receives up to [`BATCH`] waiting frames in one `recvmmsg` call without blocking; returns
    /// how many were taken off the socket (0: none waiting). One call instead of one `recvfrom`
    /// per frame plus the one that finds the queue empty.
    pub fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        // The kernel wrote the address length of each message the last call returned.
        for m in &mut batch.msgs[..batch.n] {
            m.msg_hdr.msg_namelen = SLL_LEN;
        }
        batch.n = 0;
        let n = loop {
            // SAFETY: `batch.msgs` holds BATCH headers whose name and iovec pointers point into
            // `batch.addrs`, `batch.iovs` and `batch.bufs` (built by `RecvBatch::default`), all
            // live and writable for the call; a null timeout is allowed.
            let r = unsafe {
                libc::recvmmsg(
                    self.fd.as_raw_fd(),
                    batch.msgs.as_mut_ptr(),
                    BATCH as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if r >= 0 {
                break r.unsigned_abs() as usize;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => return Ok(0),
                io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        };
        for i in 0..n {
            let outgoing = batch.addrs[i].sll_pkttype == libc::PACKET_OUTGOING;
            batch.lens[i] = if outgoing {
                0
            } else {
                batch.msgs[i].msg_len as usize
            };
        }
        batch.n = n;
        Ok(n)
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
        let mut batch = RecvBatch::default();
        assert_eq!(s.recv_batch(&mut batch).unwrap(), 0);
        assert_eq!(batch.frames().count(), 0);
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
    fn batch_receives_frames_sent_on_loopback() {
        // Frames sent on `lo` come back as incoming on a socket of the same EtherType.
        let s = PacketSocket::open("lo", 0x88B4).unwrap();
        let mut f = [0u8; 60];
        f[12..14].copy_from_slice(&0x88B4u16.to_be_bytes());
        for i in 0..3u8 {
            f[14] = i;
            s.send(&f).unwrap();
        }
        let mut batch = RecvBatch::default();
        let n = s.recv_batch(&mut batch).unwrap();
        let got: Vec<u8> = batch.frames().map(|b| b[14]).collect();
        assert!(n >= 3, "{n}");
        assert!(
            got.starts_with(&[0, 1, 2]) || got.ends_with(&[0, 1, 2]),
            "{got:?}"
        );
    }
}
