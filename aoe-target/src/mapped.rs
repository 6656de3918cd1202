//! A read-only shared mapping of a backing file, for sending page-cache data without copying
//! it into a frame buffer first (`--writeback` and `--buffered` reads).
//!
//! The mapping is never read from user space: its bytes only reach the kernel as the second
//! iovec of a `sendmmsg` (see [`crate::sys::PacketSocket::send_many`]), and its residency is
//! asked with `mincore`. So no Rust reference to memory another writer may change exists, and
//! a file that shrinks under the mapping cannot raise SIGBUS here: the kernel's copy from a
//! page past the end of the file fails with EFAULT inside `sendmmsg` (the frame is dropped
//! and the initiator retransmits), and `mincore` reports such pages as not resident, so the
//! retransmitted read goes to io_uring and gets the short read's error reply. Writes go
//! through the same file with `pwritev` or io_uring into the same page cache the mapping
//! shows, so a read sent after a write completed sees it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Pages asked per `mincore` call (the vector lives on the stack).
const MINCORE_CHUNK: usize = 64;

/// A `PROT_READ`, `MAP_SHARED` mapping of the first `len` bytes of a file.
#[derive(Debug)]
pub struct FileMap {
    addr: usize,
    len: usize,
    page: usize,
}

/// A range of a [`FileMap`], checked to lie inside it.
#[derive(Debug, Clone, Copy)]
pub struct MappedRange<'a> {
    map: &'a FileMap,
    offset: usize,
    len: usize,
}

impl FileMap {
    /// Maps the first `len` bytes of `file` read-only.
    pub fn new(file: &File, len: u64) -> io::Result<FileMap> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        if len == 0 {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        // SAFETY: a new mapping chosen by the kernel (no fixed address), of a file descriptor
        // that is valid for the call; the result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: sysconf has no memory effects.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        Ok(FileMap {
            addr: p as usize,
            len,
            page,
        })
    }

    /// The range `offset..offset + len`, if it lies inside the mapping.
    pub fn range(&self, offset: u64, len: usize) -> Option<MappedRange<'_>> {
        let offset = usize::try_from(offset).ok()?;
        (offset.checked_add(len)? <= self.len).then_some(MappedRange {
            map: self,
            offset,
            len,
        })
    }
}

impl MappedRange<'_> {
    /// True when every page of the range is in the page cache now (`mincore`), so sending it
    /// will not wait for the disk. Errors count as not resident.
    pub fn resident(&self) -> bool {
        let m = self.map;
        let first = self.offset / m.page;
        let end = (self.offset + self.len).div_ceil(m.page);
        let mut vec = [0u8; MINCORE_CHUNK];
        let mut p = first;
        while p < end {
            let n = (end - p).min(MINCORE_CHUNK);
            // SAFETY: the pages p..p + n lie inside the mapping (end is at most the mapping's
            // page count) and `vec` has room for one byte per page.
            let r = unsafe {
                libc::mincore(
                    (m.addr + p * m.page) as *mut libc::c_void,
                    n * m.page,
                    vec.as_mut_ptr(),
                )
            };
            if r != 0 || vec[..n].iter().any(|b| b & 1 == 0) {
                return false;
            }
            p += n;
        }
        true
    }

    /// The range as an iovec, for the kernel to read from.
    pub fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: (self.map.addr + self.offset) as *mut libc::c_void,
            iov_len: self.len,
        }
    }
}

/// Whether a read sent from the mapping needs a `mincore` first. `mincore` costs a fifth of a
/// busy target's CPU (a 4 KiB read at MTU 9000: mmap lock, VMA lookup, page-table walk), and
/// on a hot cache it only ever says yes. So after [`TRUST_AFTER`] runs in a row found
/// resident, only every [`CHECK_EVERY`]th run is checked; the others are sent from the
/// mapping unchecked. A page that left the cache meanwhile is then read in by the kernel's
/// copy in `sendmmsg` (the loop waits for that one disk read, as vblade's `pread` would); a
/// page past the end of a file that shrank fails that copy with EFAULT (the frame is dropped
/// and the initiator retransmits). Either a check that finds a page missing or a failed send
/// ([`ResidencyGuess::distrust`]) goes back to checking every run, where misses go to
/// io_uring and never stall the loop.
#[derive(Debug, Default, Clone)]
pub struct ResidencyGuess {
    /// Checked runs in a row found resident.
    streak: u32,
    /// Runs since the last check while trusting.
    unchecked: u32,
}

/// Resident runs in a row before checks become sparse.
pub const TRUST_AFTER: u32 = 256;
/// While trusting, one run in this many is still checked.
pub const CHECK_EVERY: u32 = 16;

impl ResidencyGuess {
    /// True when the next run must be checked with `mincore` (then report the answer with
    /// [`ResidencyGuess::record`]); false when it can be sent unchecked.
    pub fn should_check(&mut self) -> bool {
        if self.streak < TRUST_AFTER {
            return true;
        }
        self.unchecked += 1;
        if self.unchecked >= CHECK_EVERY {
            self.unchecked = 0;
            return true;
        }
        false
    }

    /// Records what a check found.
    pub fn record(&mut self, resident: bool) {
        if resident {
            self.streak = self.streak.saturating_add(1);
        } else {
            self.distrust();
        }
    }

    /// Back to checking every run (a check missed, or a send from the mapping failed).
    pub fn distrust(&mut self) {
        self.streak = 0;
        self.unchecked = 0;
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: addr/len are exactly the mapping made in `new`, unmapped once; nothing
        // borrows it any more (ranges borrow the FileMap).
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn ranges_are_bounded_and_residency_follows_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(1 << 20).unwrap();
        let m = FileMap::new(&f, 1 << 20).unwrap();
        assert!(m.range(0, 1 << 20).is_some());
        assert!(m.range((1 << 20) - 512, 512).is_some());
        assert!(m.range((1 << 20) - 512, 513).is_none());
        assert!(m.range(u64::MAX, 1).is_none());
        // A hole was never read: not in the page cache.
        assert!(!m.range(512 << 10, 4096).unwrap().resident());
        f.write_all_at(&[7u8; 8192], 4096).unwrap();
        let r = m.range(4096 + 1024, 4096).unwrap();
        assert!(r.resident(), "just written pages are cached");
        let iov = r.iovec();
        assert_eq!(iov.iov_len, 4096);
        // A range over 64+ pages takes several mincore calls; it includes the hole.
        assert!(!m.range(0, 1 << 20).unwrap().resident());
        assert!(FileMap::new(&f, 0).is_err());
    }

    #[test]
    fn residency_checks_thin_out_on_a_hot_cache_and_come_back_on_a_miss() {
        let mut g = ResidencyGuess::default();
        for _ in 0..TRUST_AFTER {
            assert!(g.should_check());
            g.record(true);
        }
        let checks = (0..CHECK_EVERY * 4).filter(|_| g.should_check()).count();
        assert_eq!(checks, 4, "one run in {CHECK_EVERY} is checked");
        g.record(false);
        assert!((0..10).all(|_| g.should_check()), "a miss: every run again");
        for _ in 0..TRUST_AFTER {
            g.record(true);
        }
        assert!(!g.should_check());
        g.distrust();
        assert!(g.should_check(), "a failed send: every run again");
    }
}
