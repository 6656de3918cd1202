//! A safe front to io_uring for the target: every submitted operation owns its buffer in a slot
//! of this struct until its completion is reaped, which is the buffer-lifetime contract of
//! `io_uring::SubmissionQueue::push` (aoe-anchors style §3.7).

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{opcode, types, IoUring};

use crate::buf::FrameBuf;

/// user_data of cancel requests (their completions are swallowed).
const CANCEL: u64 = u64::MAX;

/// One operation.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// Wait until the descriptor is readable (one-shot POLLIN).
    Poll(RawFd),
    /// Read `len` bytes at `offset` into the buffer's data area.
    Read {
        /// File.
        fd: RawFd,
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: usize,
    },
    /// Write `len` bytes of the data area at `offset`, with RWF_DSYNC if `dsync`.
    Write {
        /// File.
        fd: RawFd,
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: usize,
        /// Durable on completion.
        dsync: bool,
    },
    /// fdatasync.
    Sync(RawFd),
    /// Read at `offset` into the data areas of the parts, one after the other (READV, one
    /// iovec a part).
    Readv {
        /// File.
        fd: RawFd,
        /// Byte offset.
        offset: u64,
    },
    /// Write the data areas of the parts at `offset`, one after the other (WRITEV), with
    /// RWF_DSYNC if `dsync`.
    Writev {
        /// File.
        fd: RawFd,
        /// Byte offset.
        offset: u64,
        /// Durable on completion.
        dsync: bool,
    },
}

/// One buffer of an operation: its token, the buffer, and the bytes of its data area the
/// operation covers.
#[derive(Debug)]
pub struct Part {
    /// The token given at submission.
    pub token: u64,
    /// The buffer.
    pub buf: FrameBuf,
    /// Bytes of the data area.
    pub len: usize,
}

/// A finished operation.
#[derive(Debug)]
pub struct Completion {
    /// The operation.
    pub op: Op,
    /// Bytes transferred (over all parts), or the error.
    pub result: io::Result<usize>,
    /// The buffers, handed back in submission order (one for every operation but
    /// [`Op::Readv`] and [`Op::Writev`]).
    pub parts: Vec<Part>,
}

/// An operation in flight: what it is, its buffers, and the iovec array of a vectored one
/// (the kernel may read it until the operation completes).
struct Slot {
    op: Op,
    parts: Vec<Part>,
    _iov: Vec<libc::iovec>,
}

/// An io_uring plus the buffers of the operations in flight.
pub struct Uring {
    // Declared first so it is dropped (and the kernel's use of buffers and iovecs ended)
    // before `slots`.
    ring: IoUring,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    in_flight: usize,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl Uring {
    /// A ring with `entries` submission entries (a power of two).
    ///
    /// Only the thread that creates the ring submits to it, and only its calls to
    /// [`Uring::wait`] reap completions, so the ring is set up for that (SINGLE_ISSUER,
    /// DEFER_TASKRUN: the kernel runs the completion work when the loop asks for
    /// completions, instead of interrupting it as each I/O ends); a kernel without these
    /// flags (before 6.1) gets a plain ring.
    pub fn new(entries: u32) -> io::Result<Uring> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries)
            .or_else(|e| match e.raw_os_error() {
                Some(libc::EINVAL) => IoUring::new(entries),
                _ => Err(e),
            })?;
        Ok(Uring {
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
        })
    }

    /// Operations submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues `op` on `buf`; `token` comes back in its [`Completion`].
    pub fn push(&mut self, op: Op, token: u64, buf: FrameBuf) -> io::Result<()> {
        let len = match op {
            Op::Read { len, .. } | Op::Write { len, .. } => len,
            _ => 0,
        };
        self.push_parts(op, vec![Part { token, buf, len }])
    }

    /// Queues `op` on `parts`: one part for the single-buffer operations, any number (at
    /// least one) for [`Op::Readv`] and [`Op::Writev`]; each part's token comes back with it.
    pub fn push_parts(&mut self, op: Op, mut parts: Vec<Part>) -> io::Result<()> {
        let mut iov = Vec::new();
        let sqe = match op {
            Op::Poll(fd) => opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build(),
            Op::Read { fd, offset, len } => {
                let b = first(&mut parts)?.buf.data_mut(len);
                opcode::Read::new(types::Fd(fd), b.as_mut_ptr(), len32(b.len()))
                    .offset(offset)
                    .build()
            }
            Op::Write {
                fd,
                offset,
                len,
                dsync,
            } => {
                let b = first(&mut parts)?.buf.data(len);
                opcode::Write::new(types::Fd(fd), b.as_ptr(), len32(b.len()))
                    .offset(offset)
                    .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                    .build()
            }
            Op::Sync(fd) => opcode::Fsync::new(types::Fd(fd))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Readv { fd, offset } => {
                first(&mut parts)?;
                iov = parts
                    .iter_mut()
                    .map(|p| {
                        let b = p.buf.data_mut(p.len);
                        libc::iovec {
                            iov_base: b.as_mut_ptr().cast(),
                            iov_len: b.len(),
                        }
                    })
                    .collect();
                opcode::Readv::new(types::Fd(fd), iov.as_ptr(), len32(iov.len()))
                    .offset(offset)
                    .build()
            }
            Op::Writev { fd, offset, dsync } => {
                first(&mut parts)?;
                iov = parts
                    .iter()
                    .map(|p| {
                        let b = p.buf.data(p.len);
                        libc::iovec {
                            iov_base: b.as_ptr().cast_mut().cast(),
                            iov_len: b.len(),
                        }
                    })
                    .collect();
                opcode::Writev::new(types::Fd(fd), iov.as_ptr(), len32(iov.len()))
                    .offset(offset)
                    .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                    .build()
            }
        };
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let sqe = sqe.user_data(slot as u64);
        // The buffers and the iovec array move into the slot; their heap memory (Vecs that
        // are never resized) stays where the pointers above point.
        self.slots[slot] = Some(Slot {
            op,
            parts,
            _iov: iov,
        });
        self.push_sqe(&sqe)?;
        self.in_flight += 1;
        Ok(())
    }

    fn push_sqe(&mut self, sqe: &io_uring::squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every pointer in the entry (and in the iovec array of a vectored one)
            // points into a buffer or iovec array owned by `self.slots` until the completion for this user_data is reaped in `wait`, and the ring is
            // dropped before the slots; cancel entries carry no pointers.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    /// Asks the kernel to cancel every poll in flight (their completions come back with
    /// ECANCELED).
    pub fn cancel_polls(&mut self) -> io::Result<()> {
        let polls: Vec<u64> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                matches!(
                    s,
                    Some(Slot {
                        op: Op::Poll(_),
                        ..
                    })
                )
            })
            .map(|(i, _)| i as u64)
            .collect();
        for ud in polls {
            let sqe = opcode::AsyncCancel::new(ud).build().user_data(CANCEL);
            self.push_sqe(&sqe)?;
        }
        self.ring.submit()?;
        Ok(())
    }

    /// Submits what is queued, waits up to `timeout` for at least one completion, and returns
    /// all completions available.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<Vec<Completion>> {
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e)
                if e.raw_os_error() == Some(libc::ETIME)
                    || e.kind() == io::ErrorKind::Interrupted
                    || e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(e),
        }
        let mut out = Vec::new();
        for cqe in self.ring.completion() {
            let ud = cqe.user_data();
            if ud == CANCEL {
                continue;
            }
            let Ok(slot) = usize::try_from(ud) else {
                continue;
            };
            let Some(Slot { op, parts, .. }) = self.slots.get_mut(slot).and_then(Option::take)
            else {
                continue;
            };
            self.free.push(slot);
            self.in_flight -= 1;
            let r = cqe.result();
            let result = if r < 0 {
                Err(io::Error::from_raw_os_error(-r))
            } else {
                Ok(r.unsigned_abs() as usize)
            };
            out.push(Completion { op, result, parts });
        }
        Ok(out)
    }
}

/// The first part: every operation has one.
fn first(parts: &mut [Part]) -> io::Result<&mut Part> {
    parts
        .first_mut()
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))
}

fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn write_read_sync_round_trip() {
        let f = tempfile::tempfile().unwrap();
        let fd = f.as_raw_fd();
        let mut u = Uring::new(8).unwrap();
        let mut b = FrameBuf::page(8192);
        b.data_mut(8192).fill(0x5a);
        u.push(
            Op::Write {
                fd,
                offset: 4096,
                len: 8192,
                dsync: true,
            },
            7,
            b,
        )
        .unwrap();
        let c = u.wait(Duration::from_secs(5)).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].parts[0].token, c[0].result.as_ref().unwrap()),
            (7, &8192)
        );
        u.push(Op::Sync(fd), 8, FrameBuf::empty()).unwrap();
        u.push(
            Op::Read {
                fd,
                offset: 4096,
                len: 4096,
            },
            9,
            FrameBuf::page(4096),
        )
        .unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            got.extend(u.wait(Duration::from_secs(5)).unwrap());
        }
        let read = got.iter().find(|c| c.parts[0].token == 9).unwrap();
        assert_eq!(*read.result.as_ref().unwrap(), 4096);
        assert!(read.parts[0].buf.data(4096).iter().all(|b| *b == 0x5a));
        assert_eq!(u.in_flight(), 0);
    }

    #[test]
    fn poll_fires_and_cancels() {
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let mut u = Uring::new(8).unwrap();
        u.push(Op::Poll(a.as_raw_fd()), 1, FrameBuf::empty())
            .unwrap();
        assert!(u.wait(Duration::from_millis(50)).unwrap().is_empty());
        b.send(b"x").unwrap();
        let c = u.wait(Duration::from_secs(5)).unwrap();
        assert_eq!(c.len(), 1);
        assert!(c[0].result.is_ok());
        u.push(Op::Poll(b.as_raw_fd()), 2, FrameBuf::empty())
            .unwrap();
        u.cancel_polls().unwrap();
        let mut got = Vec::new();
        while got.is_empty() {
            got = u.wait(Duration::from_secs(5)).unwrap();
        }
        assert_eq!(got[0].parts[0].token, 2);
        assert!(got[0].result.is_err());
        assert_eq!(u.in_flight(), 0);
    }

    fn parts(fill: &[u8], len: usize) -> Vec<Part> {
        fill.iter()
            .enumerate()
            .map(|(i, &v)| {
                let mut buf = FrameBuf::frame(36 + len);
                buf.data_mut(len).fill(v);
                Part {
                    token: i as u64,
                    buf,
                    len,
                }
            })
            .collect()
    }

    #[test]
    fn vectored_write_and_read_cover_every_part() {
        let f = tempfile::tempfile().unwrap();
        let fd = f.as_raw_fd();
        let mut u = Uring::new(8).unwrap();
        let w = Op::Writev {
            fd,
            offset: 512,
            dsync: true,
        };
        u.push_parts(w, parts(&[1, 2, 3], 1024)).unwrap();
        let c = u.wait(Duration::from_secs(5)).unwrap();
        assert_eq!(*c[0].result.as_ref().unwrap(), 3072);
        assert_eq!(c[0].parts.len(), 3);
        let mut back = vec![0u8; 512 + 3072];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, 0).unwrap();
        for (i, v) in [1u8, 2, 3].iter().enumerate() {
            let from = 512 + i * 1024;
            assert!(back[from..from + 1024].iter().all(|b| b == v));
        }
        // Read back past the end of the file: the count is short, the parts come back in order.
        u.push_parts(Op::Readv { fd, offset: 1536 }, parts(&[0, 0, 0], 1024))
            .unwrap();
        let c = u.wait(Duration::from_secs(5)).unwrap();
        assert_eq!(*c[0].result.as_ref().unwrap(), 2048);
        let tokens: Vec<u64> = c[0].parts.iter().map(|p| p.token).collect();
        assert_eq!(tokens, [0, 1, 2]);
        assert!(c[0].parts[0].buf.data(1024).iter().all(|b| *b == 2));
        assert!(c[0].parts[1].buf.data(1024).iter().all(|b| *b == 3));
        assert!(matches!(c[0].op, Op::Readv { offset: 1536, .. }));
        assert!(u
            .push_parts(Op::Readv { fd, offset: 0 }, Vec::new())
            .is_err());
        assert_eq!(u.in_flight(), 0);
    }
}
