//! Frame buffers laid out so that the ATA data of a frame starts on a 4 KiB boundary.
//!
//! O_DIRECT needs the memory of every read and write aligned to the device's logical block.
//! Placing the frame so that byte [`ATA_DATA`] (36) of it is page-aligned lets the backing
//! I/O read into, and write from, the frame itself: no copy between network and disk.
//! Written with safe code over an over-allocated `Vec` (its heap block never moves because it
//! is never resized), so no allocator call needs `unsafe`.

use crate::wire::ATA_DATA;

/// Alignment of the data area.
pub const DATA_ALIGN: usize = 4096;

/// A frame (or metadata page) buffer whose data area (`data_offset` bytes in) is aligned.
pub struct FrameBuf {
    mem: Vec<u8>,
    start: usize,
    cap: usize,
    len: usize,
    data_offset: usize,
    mapped: Option<MappedData>,
}

/// Where the data of a reply is sent from instead of the buffer's data area: a range of an
/// export's mapped backing file (see [`crate::mapped`]). The buffer then carries only the
/// header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedData {
    /// Index of the export.
    pub export: usize,
    /// Byte offset in the backing file.
    pub offset: u64,
    /// Bytes.
    pub len: usize,
}

impl std::fmt::Debug for FrameBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameBuf")
            .field("cap", &self.cap)
            .field("len", &self.len)
            .finish()
    }
}

impl FrameBuf {
    /// A frame buffer of `cap` bytes whose byte 36 (the ATA data) is 4 KiB aligned.
    pub fn frame(cap: usize) -> FrameBuf {
        FrameBuf::with_data_offset(cap, ATA_DATA)
    }

    /// A buffer of no bytes, for operations without memory (sync, poll).
    pub fn empty() -> FrameBuf {
        FrameBuf {
            mem: Vec::new(),
            start: 0,
            cap: 0,
            len: 0,
            data_offset: 0,
            mapped: None,
        }
    }

    /// A buffer of `cap` bytes that is aligned at its start (metadata pages).
    pub fn page(cap: usize) -> FrameBuf {
        FrameBuf::with_data_offset(cap, 0)
    }

    fn with_data_offset(cap: usize, data_offset: usize) -> FrameBuf {
        let mem = vec![0u8; cap + DATA_ALIGN];
        let addr = mem.as_ptr() as usize + data_offset;
        let start = (DATA_ALIGN - addr % DATA_ALIGN) % DATA_ALIGN;
        FrameBuf {
            mem,
            start,
            cap,
            len: 0,
            data_offset,
            mapped: None,
        }
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Bytes in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no byte is in use.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets the bytes in use (clamped to the capacity).
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.cap);
    }

    /// The bytes in use.
    pub fn as_slice(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.len]
    }

    /// The whole capacity, for writing.
    pub fn full_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + self.cap]
    }

    /// The whole capacity, for reading.
    pub fn full(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.cap]
    }

    /// The aligned data area: `len` bytes from the data offset (clamped to the capacity).
    pub fn data_mut(&mut self, len: usize) -> &mut [u8] {
        let from = self.start + self.data_offset;
        let to = (from + len).min(self.start + self.cap);
        &mut self.mem[from..to]
    }

    /// The aligned data area, read-only.
    pub fn data(&self, len: usize) -> &[u8] {
        let from = self.start + self.data_offset;
        let to = (from + len).min(self.start + self.cap);
        &self.mem[from..to]
    }

    /// Marks the data area as held in a mapped file instead (until [`FrameBuf::take_mapped`]
    /// or [`FrameBuf::clear`]).
    pub fn set_mapped(&mut self, m: MappedData) {
        self.mapped = Some(m);
    }

    /// Takes the mark of [`FrameBuf::set_mapped`].
    pub fn take_mapped(&mut self) -> Option<MappedData> {
        self.mapped.take()
    }

    /// Empties the buffer for reuse: no bytes in use, no mapped data.
    pub fn clear(&mut self) {
        self.len = 0;
        self.mapped = None;
    }

    /// Copies `bytes` in as the content (truncated to the capacity).
    pub fn fill_from(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.cap);
        self.full_mut()[..n].copy_from_slice(&bytes[..n]);
        self.len = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_area_is_aligned() {
        for cap in [60, 1514, 9216] {
            let mut f = FrameBuf::frame(cap);
            assert_eq!(f.data_mut(512).as_ptr() as usize % DATA_ALIGN, 0);
            assert_eq!(f.full().len(), cap);
            let p = FrameBuf::page(cap);
            assert_eq!(p.full().as_ptr() as usize % DATA_ALIGN, 0);
        }
    }

    #[test]
    fn empty_has_no_bytes() {
        let mut e = FrameBuf::empty();
        assert_eq!(e.capacity(), 0);
        assert!(e.full_mut().is_empty());
        assert!(e.data(10).is_empty());
    }

    #[test]
    fn lengths_clamp() {
        let mut f = FrameBuf::frame(100);
        assert!(f.is_empty());
        f.set_len(1000);
        assert_eq!(f.len(), 100);
        assert_eq!(f.data(1000).len(), 64);
        f.fill_from(&[1u8; 200]);
        assert_eq!(f.as_slice(), &[1u8; 100][..]);
        assert_eq!(f.capacity(), 100);
    }
}
