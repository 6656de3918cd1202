//! Small wrappers over the Linux calls std does not offer: AF_PACKET sockets, interface
//! queries, fallocate, O_DIRECT alignment, signal flags. All `unsafe` of the crate lives here
//! and in [`crate::uring`], [`crate::mapped`] and [`crate::pring`].

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::mapped::MappedRange;
use crate::wire::{Mac, ETHERTYPE_AOE};

/// Errors of the system wrappers.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// The interface does not exist.
    #[error("network interface {0:?} does not exist")]
    NoInterface(String),
    /// A system call failed.
    #[error("{what}")]
    Call {
        /// What was attempted.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn call(what: impl Into<String>) -> impl FnOnce(io::Error) -> SysError {
    let what = what.into();
    move |source| SysError::Call { what, source }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A raw AF_PACKET socket bound to one interface and the AoE EtherType.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    iface: String,
    mac: Mac,
    mtu: u32,
}

fn ifreq(name: &str) -> Result<libc::ifreq, SysError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return Err(SysError::NoInterface(name.into()));
    }
    // SAFETY: ifreq is a plain C struct for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

impl PacketSocket {
    /// Opens a socket on `iface` receiving only EtherType 0x88A2, with `rcvbuf` bytes of
    /// receive buffer (forced past rmem_max when running as root).
    pub fn open(iface: &str, rcvbuf: usize) -> Result<PacketSocket, SysError> {
        let cname = CString::new(iface).map_err(|_| SysError::NoInterface(iface.into()))?;
        // SAFETY: cname is a valid NUL-terminated string that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(SysError::NoInterface(iface.into()));
        }
        let proto = ETHERTYPE_AOE.to_be();
        // SAFETY: plain socket(2) call with constant arguments; the result is checked.
        let raw = cvt(unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::c_int::from(proto),
            )
        })
        .map_err(call("socket(AF_PACKET)"))?;
        // SAFETY: raw is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let ifindex = i32::try_from(ifindex).map_err(|_| SysError::NoInterface(iface.into()))?;
        // SAFETY: sockaddr_ll is a plain C struct for which all-zero bytes are valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex;
        // SAFETY: sll is a valid sockaddr_ll and the length passed is its size.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })
        .map_err(call(format!("bind to {iface}")))?;
        let mut req = ifreq(iface)?;
        // SAFETY: SIOCGIFHWADDR fills the ifreq we own; the fd is a valid socket.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) })
            .map_err(call(format!("SIOCGIFHWADDR {iface}")))?;
        // SAFETY: after SIOCGIFHWADDR the union holds ifru_hwaddr.
        let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
        let mut mac = [0u8; 6];
        for (d, s) in mac.iter_mut().zip(sa.sa_data.iter()) {
            *d = *s as u8;
        }
        let mut s = PacketSocket {
            fd,
            iface: iface.to_string(),
            mac: Mac(mac),
            mtu: 0,
        };
        s.refresh_mtu()?;
        let size = libc::c_int::try_from(rcvbuf).unwrap_or(libc::c_int::MAX);
        if s.setsockopt(libc::SO_RCVBUFFORCE, size).is_err() {
            let _ = s.setsockopt(libc::SO_RCVBUF, size);
        }
        if s.setsockopt(libc::SO_SNDBUFFORCE, size).is_err() {
            let _ = s.setsockopt(libc::SO_SNDBUF, size);
        }
        Ok(s)
    }

    /// How long a waiting [`PacketSocket::recv_many`] blocks at most (SO_RCVTIMEO).
    pub fn set_recv_timeout(&self, timeout: Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros().min(999_999) as i32),
        };
        setsockopt(
            self.fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv,
        )
    }

    fn setsockopt(&self, opt: libc::c_int, v: libc::c_int) -> io::Result<()> {
        setsockopt(self.fd.as_raw_fd(), libc::SOL_SOCKET, opt, &v)
    }

    /// The interface's MAC address.
    pub fn mac(&self) -> Mac {
        self.mac
    }

    /// The interface's MTU when last read (at open, or by [`PacketSocket::refresh_mtu`]).
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// Reads the interface's MTU again (it may have changed since the socket was opened);
    /// returns it.
    pub fn refresh_mtu(&mut self) -> Result<u32, SysError> {
        let mut req = ifreq(&self.iface)?;
        // SAFETY: SIOCGIFMTU fills the ifreq we own; the fd is a valid socket.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::SIOCGIFMTU, &mut req) })
            .map_err(call(format!("SIOCGIFMTU {}", self.iface)))?;
        // SAFETY: after SIOCGIFMTU the union holds ifru_mtu.
        self.mtu = u32::try_from(unsafe { req.ifr_ifru.ifru_mtu }).unwrap_or(1500);
        Ok(self.mtu)
    }

    /// Sends one frame.
    pub fn send(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: frame is a valid slice for the duration of the call.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n.unsigned_abs())
        }
    }

    /// Sends `frames` with as few calls as possible (sendmmsg); returns how many the kernel
    /// took in this call (at least one unless it failed). A frame is its bytes followed, when
    /// given, by a range of a mapped file (gathered by the kernel: the data is copied once,
    /// from the page cache into the packet).
    pub fn send_many(&self, frames: &[(&[u8], Option<MappedRange<'_>>)]) -> io::Result<usize> {
        // Two iovecs per frame, laid out before any header points at them.
        let mut iovs: Vec<libc::iovec> = Vec::with_capacity(frames.len() * 2);
        for (head, tail) in frames {
            iovs.push(libc::iovec {
                iov_base: head.as_ptr().cast_mut().cast(),
                iov_len: head.len(),
            });
            iovs.push(tail.map_or(
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                },
                |t| t.iovec(),
            ));
        }
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .chunks_exact_mut(2)
            .zip(frames)
            .map(|(pair, (_, tail))| {
                let mut m = zeroed_mmsghdr();
                m.msg_hdr.msg_iov = pair.as_mut_ptr();
                m.msg_hdr.msg_iovlen = if tail.is_some() { 2 } else { 1 };
                m
            })
            .collect();
        let n = libc::c_uint::try_from(msgs.len()).unwrap_or(libc::c_uint::MAX);
        // SAFETY: every mmsghdr points at one or two iovecs of `iovs`: a frame of `frames`
        // and a range checked to lie inside a live mapping (borrowed by `frames`); all outlive
        // the call, and the kernel only reads them.
        let r = unsafe { libc::sendmmsg(self.fd.as_raw_fd(), msgs.as_mut_ptr(), n, 0) };
        usize::try_from(r).map_err(|_| io::Error::last_os_error())
    }

    /// Receives the frames queued on the socket, up to one per buffer, with one call
    /// (recvmmsg); frame `i` is `bufs[i][..lens[i]]`. Returns how many came: 0 when none was
    /// queued or, with `wait`, none came within the receive timeout (see
    /// [`PacketSocket::set_recv_timeout`]) or a signal arrived. With `wait` it blocks until
    /// the first frame only, then takes what else is queued.
    pub fn recv_many(
        &self,
        bufs: &mut [&mut [u8]],
        lens: &mut Vec<usize>,
        wait: bool,
    ) -> io::Result<usize> {
        lens.clear();
        let mut iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let mut msgs = mmsghdrs(&mut iovs);
        let n = libc::c_uint::try_from(msgs.len()).unwrap_or(libc::c_uint::MAX);
        // SAFETY: every mmsghdr points at one iovec of `iovs`, each describing a writable
        // buffer of `bufs`; all outlive the call. No timeout pointer.
        let r = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                n,
                if wait {
                    libc::MSG_WAITFORONE
                } else {
                    libc::MSG_DONTWAIT
                },
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        let r = r.unsigned_abs() as usize;
        // A frame longer than its buffer comes back truncated to the buffer, as with recv.
        lens.extend(
            msgs[..r]
                .iter()
                .zip(bufs.iter())
                .map(|(m, b)| usize::try_from(m.msg_len).map_or(b.len(), |l| l.min(b.len()))),
        );
        Ok(r)
    }

    /// Receives one frame if one is queued (`Ok(None)` otherwise).
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: buf is a valid writable slice for the duration of the call.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(n.unsigned_abs()))
    }

    /// Receives one frame, waiting at most `timeout` (`Ok(None)` on timeout).
    pub fn recv_timeout(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        if !self.wait_readable(timeout)? {
            return Ok(None);
        }
        self.try_recv(buf)
    }

    /// Waits at most `timeout` for the socket to be readable (a frame queued, or with a
    /// receive ring, a slot handed over); false on timeout or a signal.
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: pfd is a valid pollfd array of length 1.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        Ok(r > 0)
    }
}

/// An empty message header (no address, no control data, no iovec yet).
fn zeroed_mmsghdr() -> libc::mmsghdr {
    // SAFETY: mmsghdr is a plain C struct for which all-zero bytes are a valid value.
    unsafe { std::mem::zeroed() }
}

/// One message header per iovec, for recvmmsg on a bound socket (no address).
fn mmsghdrs(iovs: &mut [libc::iovec]) -> Vec<libc::mmsghdr> {
    iovs.iter_mut()
        .map(|iov| {
            let mut m = zeroed_mmsghdr();
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect()
}

impl AsRawFd for PacketSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Allocates `len` bytes of `file` on disk (thick provisioning).
pub fn fallocate(file: &File, len: u64) -> io::Result<()> {
    let len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: plain fallocate(2) on a descriptor we own.
    cvt(unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) }).map(|_| ())
}

/// The file offset alignment O_DIRECT needs on `file` (STATX_DIOALIGN), if the kernel and
/// file system report it; `Some(0)` means O_DIRECT is not supported there.
pub fn direct_io_alignment(file: &File) -> Option<u32> {
    // SAFETY: statx is a plain C struct for which all-zero bytes are valid.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: empty is a valid C string, stx a valid statx buffer; AT_EMPTY_PATH with a
    // valid descriptor queries that file.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    Some(stx.stx_dio_offset_align)
}

static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int) {
    TERMINATE.store(true, Ordering::SeqCst);
}

/// Installs SIGTERM and SIGINT handlers that set a flag (see [`terminate_requested`]).
pub fn install_terminate_handler() -> io::Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: sigaction is a plain C struct for which all-zero bytes are valid.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_terminate as *const () as libc::sighandler_t;
        // SAFETY: sa is a valid sigaction whose handler only stores to an atomic, which is
        // async-signal-safe.
        cvt(unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) })?;
    }
    Ok(())
}

/// True once SIGTERM or SIGINT arrived.
pub fn terminate_requested() -> bool {
    TERMINATE.load(Ordering::SeqCst)
}

/// Runs `f` with the calling thread inside the network namespace `/run/netns/<name>` (as made
/// by `ip netns add`), then moves the thread back. Sockets opened in `f` stay in that
/// namespace.
pub fn with_netns<T>(name: &str, f: impl FnOnce() -> T) -> io::Result<T> {
    let target = File::open(Path::new("/run/netns").join(name))?;
    let home = File::open("/proc/thread-self/ns/net")?;
    // SAFETY: setns on descriptors we own; CLONE_NEWNET only affects this thread.
    cvt(unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) })?;
    let out = f();
    // SAFETY: as above, returning the thread to the namespace it started in.
    cvt(unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) })?;
    Ok(out)
}

/// Reads at `offset` into `bufs` one after the other, only if no waiting is needed (a
/// page-cache hit), with `preadv2(RWF_NOWAIT)`. `Ok(None)`: it would block, came back short,
/// or the file does not support it; the caller then queues the read on io_uring.
pub fn pread_nowait(fd: RawFd, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<Option<usize>> {
    let want = bufs.iter().map(|b| b.len()).sum();
    nowait_result(preadv2(fd, bufs, offset, libc::RWF_NOWAIT), want)
}

/// `preadv2` into `bufs` one after the other at `offset` with `flags`: the raw result (bytes
/// or -1 with errno set).
fn preadv2(fd: RawFd, bufs: &mut [&mut [u8]], offset: u64, flags: libc::c_int) -> isize {
    let iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let (Ok(off), Ok(cnt)) = (
        libc::off_t::try_from(offset),
        libc::c_int::try_from(iovs.len()),
    ) else {
        // SAFETY: setting errno of this thread is always allowed.
        unsafe { *libc::__errno_location() = libc::EINVAL };
        return -1;
    };
    // SAFETY: each iovec describes one buffer of `bufs`, valid and writable for the call.
    unsafe { libc::preadv2(fd, iovs.as_ptr(), cnt, off, flags) }
}

/// Reads into `bufs` one after the other at `offset`, waiting for the disk if need be.
/// Returns the bytes read.
pub fn preadv(fd: RawFd, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<usize> {
    let n = preadv2(fd, bufs, offset, 0);
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Writes `bufs` one after the other at `offset` with one `pwritev2` (std offers positional
/// writes of one buffer only), durable on return with `dsync` (RWF_DSYNC). Returns the bytes
/// written.
pub fn pwritev(fd: RawFd, bufs: &[&[u8]], offset: u64, dsync: bool) -> io::Result<usize> {
    let iovs: Vec<libc::iovec> = bufs
        .iter()
        .map(|b| libc::iovec {
            iov_base: b.as_ptr().cast_mut().cast(),
            iov_len: b.len(),
        })
        .collect();
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let cnt = libc::c_int::try_from(iovs.len())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let flags = if dsync { libc::RWF_DSYNC } else { 0 };
    // SAFETY: each iovec describes one buffer of `bufs`, valid for the call; the kernel only
    // reads them.
    let n = unsafe { libc::pwritev2(fd, iovs.as_ptr(), cnt, off, flags) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

fn nowait_result(n: isize, want: usize) -> io::Result<Option<usize>> {
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::EINTR) => Ok(None),
            _ => Err(e),
        };
    }
    let n = n.unsigned_abs();
    Ok((n == want).then_some(n))
}

/// `setsockopt(2)` with `v` as the option's value: `T` must be the option's C type (an int, a
/// `timeval`, a `tpacket_req`, ...).
pub(crate) fn setsockopt<T>(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: &T,
) -> io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<T>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `v` is a live value of the option's C type and its size is passed; the kernel
    // only reads it.
    cvt(unsafe { libc::setsockopt(fd, level, opt, (v as *const T).cast(), len) }).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn nowait_read_hits_the_page_cache() {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&[7u8; 8192], 0).unwrap();
        let mut buf = vec![0u8; 4096];
        assert_eq!(
            pread_nowait(f.as_raw_fd(), &mut [&mut buf[..]], 4096).unwrap(),
            Some(4096)
        );
        assert!(buf.iter().all(|b| *b == 7));
        // Past the end: short, so None (the caller falls back to io_uring).
        assert_eq!(
            pread_nowait(f.as_raw_fd(), &mut [&mut buf[..]], 8000).unwrap(),
            None
        );
    }

    #[test]
    fn vectored_write_and_read_span_buffers() {
        let f = tempfile::tempfile().unwrap();
        let (a, b) = ([1u8; 1024], [2u8; 512]);
        assert_eq!(pwritev(f.as_raw_fd(), &[&a, &b], 512, true).unwrap(), 1536);
        let mut got = vec![0u8; 2048];
        f.read_exact_at(&mut got, 0).unwrap();
        assert!(got[..512].iter().all(|x| *x == 0));
        assert!(got[512..1536].iter().all(|x| *x == 1));
        assert!(got[1536..].iter().all(|x| *x == 2));
        let (mut x, mut y) = ([0u8; 1000], [0u8; 536]);
        assert_eq!(
            pread_nowait(f.as_raw_fd(), &mut [&mut x[..], &mut y[..]], 512).unwrap(),
            Some(1536)
        );
        assert!(x[..1000].iter().all(|v| *v == 1));
        assert!(y[..24].iter().all(|v| *v == 1) && y[24..].iter().all(|v| *v == 2));
        let mut z = [0u8; 512];
        assert_eq!(preadv(f.as_raw_fd(), &mut [&mut z[..]], 1536).unwrap(), 512);
        assert!(z.iter().all(|v| *v == 2));
    }
}
