//! The thin-provisioning map: a persistent record of which blocks of an export were written,
//! with a write generation per block (MicroVisor §2.5.1: "storage nodes maintain a bitmap of
//! the blocks that have been written along with a tag that records the time of the block
//! updates").
//!
//! On disk (a side file, by default `<backing>.aoemap`):
//! - bytes 0..4096: header — magic `AOEMAP01`, then little-endian u32 format version, u32
//!   block size, u64 advertised sectors, u64 block count, u16 config-string length at 32 and
//!   the config string at 64 (up to 1024 bytes).
//! - from 4096: one little-endian u64 per block, 512 per 4 KiB page. 0 means "never written"
//!   (the bitmap bit is `generation != 0`); otherwise the generation of the last write the
//!   target started on the block. Generations grow by one per write command.
//!
//! Ordering, which the engine enforces: a block's first generation is made durable *before*
//! its data is written, so after any crash a block with generation 0 holds zeros (as md's
//! write-intent bitmap is set before the write, aoe-anchors §3.4); later generations are
//! written alongside the data, and a write is acknowledged only once both are durable.

use std::fs::OpenOptions;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::wire::SECTOR;

/// Magic at the start of a map file.
pub const MAP_MAGIC: &[u8; 8] = b"AOEMAP01";
/// Format version.
pub const MAP_VERSION: u32 = 1;
/// Bytes of the header (and of every map page).
pub const MAP_PAGE: usize = 4096;
/// Generations per map page.
pub const ENTRIES_PER_PAGE: usize = MAP_PAGE / 8;
/// Offset of the config string in the header.
const HDR_CONFIG: usize = 64;
/// Longest config string kept in the header.
const HDR_CONFIG_MAX: usize = 1024;

/// Errors of the map.
#[derive(Debug, thiserror::Error)]
pub enum ThinError {
    /// Reading or writing the map file failed.
    #[error("map file {path}")]
    Io {
        /// The map file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a map or is damaged.
    #[error("{0}")]
    Format(String),
}

type Result<T> = std::result::Result<T, ThinError>;

#[derive(Debug, Clone, Copy, Default)]
struct PageState {
    /// Bumped on every in-memory change of the page.
    version: u64,
    /// Highest version known to be on disk.
    durable: u64,
    /// A write of this page is in flight.
    in_flight: bool,
}

/// The in-memory map plus the bookkeeping that orders its page writes.
#[derive(Debug)]
pub struct ThinMap {
    block_size: u64,
    sectors: u64,
    gens: Vec<u64>,
    next_gen: u64,
    used_blocks: u64,
    pages: Vec<PageState>,
    config: Vec<u8>,
}

impl ThinMap {
    /// An empty map for `sectors` advertised sectors in blocks of `block_size` bytes (a
    /// multiple of 4096).
    pub fn new(sectors: u64, block_size: u32) -> Result<ThinMap> {
        if block_size < 4096 || !block_size.is_power_of_two() {
            return Err(ThinError::Format(format!(
                "block size {block_size} is not a power of two >= 4096"
            )));
        }
        let bytes = sectors * SECTOR as u64;
        let nblocks = bytes.div_ceil(u64::from(block_size));
        let n = usize::try_from(nblocks)
            .map_err(|_| ThinError::Format(format!("{nblocks} blocks do not fit in memory")))?;
        Ok(ThinMap {
            block_size: u64::from(block_size),
            sectors,
            gens: vec![0; n],
            next_gen: 1,
            used_blocks: 0,
            pages: vec![PageState::default(); n.div_ceil(ENTRIES_PER_PAGE)],
            config: Vec::new(),
        })
    }

    /// Advertised sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Number of blocks.
    pub fn blocks(&self) -> u64 {
        self.gens.len() as u64
    }

    /// Bytes in written blocks.
    pub fn used_bytes(&self) -> u64 {
        self.used_blocks * self.block_size
    }

    /// Generation of block `b` (0: never written).
    pub fn generation(&self, b: u64) -> u64 {
        usize::try_from(b)
            .ok()
            .and_then(|i| self.gens.get(i).copied())
            .unwrap_or(0)
    }

    /// The persisted config string.
    pub fn config(&self) -> &[u8] {
        &self.config
    }

    /// Replaces the persisted config string (the caller rewrites the header).
    pub fn set_config(&mut self, s: &[u8]) {
        self.config = s[..s.len().min(HDR_CONFIG_MAX)].to_vec();
    }

    /// Blocks covered by the byte range `offset..offset+len` (empty for `len` 0).
    pub fn blocks_of(&self, offset: u64, len: u64) -> Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let end = (offset + len).div_ceil(self.block_size).min(self.blocks());
        (offset / self.block_size).min(end)..end
    }

    /// True if no block of `blocks` was ever written.
    pub fn all_unwritten(&self, blocks: Range<u64>) -> bool {
        blocks.into_iter().all(|b| self.generation(b) == 0)
    }

    /// True if some block of `blocks` was never written.
    pub fn any_unwritten(&self, blocks: Range<u64>) -> bool {
        blocks.into_iter().any(|b| self.generation(b) == 0)
    }

    /// Takes the next write generation.
    pub fn next_generation(&mut self) -> u64 {
        let g = self.next_gen;
        self.next_gen += 1;
        g
    }

    /// Records generation `gen` on `blocks` (never lowering one) and returns the pages to make
    /// durable with the version each must reach.
    pub fn mark(&mut self, blocks: Range<u64>, gen: u64) -> Vec<(usize, u64)> {
        let mut need: Vec<(usize, u64)> = Vec::new();
        for b in blocks {
            let Ok(i) = usize::try_from(b) else { continue };
            let Some(slot) = self.gens.get_mut(i) else {
                continue;
            };
            if *slot == 0 {
                self.used_blocks += 1;
            }
            *slot = (*slot).max(gen);
            let page = i / ENTRIES_PER_PAGE;
            let st = &mut self.pages[page];
            if need.last().map(|(p, _)| *p) != Some(page) {
                st.version += 1;
                need.push((page, st.version));
            }
        }
        need
    }

    /// True once `page` is on disk at `version` or later.
    pub fn is_durable(&self, page: usize, version: u64) -> bool {
        self.pages.get(page).is_none_or(|p| p.durable >= version)
    }

    /// If `page` has changes not on disk and no write in flight, marks it in flight and
    /// returns (file offset, version, bytes) to write.
    pub fn take_page_write(&mut self, page: usize) -> Option<(u64, u64, Vec<u8>)> {
        let st = self.pages.get_mut(page)?;
        if st.in_flight || st.durable >= st.version {
            return None;
        }
        st.in_flight = true;
        let version = st.version;
        let from = page * ENTRIES_PER_PAGE;
        let to = (from + ENTRIES_PER_PAGE).min(self.gens.len());
        let mut bytes = vec![0u8; MAP_PAGE];
        for (g, out) in self.gens[from..to].iter().zip(bytes.chunks_exact_mut(8)) {
            out.copy_from_slice(&g.to_le_bytes());
        }
        Some((page_offset(page), version, bytes))
    }

    /// Records that the write of `page` at `version` finished (`ok` false: it failed and the
    /// page stays dirty).
    pub fn page_written(&mut self, page: usize, version: u64, ok: bool) {
        if let Some(st) = self.pages.get_mut(page) {
            st.in_flight = false;
            if ok {
                st.durable = st.durable.max(version);
            }
        }
    }

    /// The 4 KiB header page.
    pub fn header_bytes(&self) -> Vec<u8> {
        let mut h = vec![0u8; MAP_PAGE];
        h[0..8].copy_from_slice(MAP_MAGIC);
        h[8..12].copy_from_slice(&MAP_VERSION.to_le_bytes());
        // block_size came in as a u32.
        h[12..16].copy_from_slice(&(self.block_size as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.sectors.to_le_bytes());
        h[24..32].copy_from_slice(&self.blocks().to_le_bytes());
        // The config string is at most HDR_CONFIG_MAX (1024) bytes.
        h[32..34].copy_from_slice(&(self.config.len() as u16).to_le_bytes());
        h[HDR_CONFIG..HDR_CONFIG + self.config.len()].copy_from_slice(&self.config);
        h
    }

    /// Decodes a header page and the generation pages that follow it.
    pub fn decode(bytes: &[u8]) -> Result<ThinMap> {
        if bytes.len() < MAP_PAGE || &bytes[0..8] != MAP_MAGIC {
            return Err(ThinError::Format(
                "not an aoe-target map (bad magic)".into(),
            ));
        }
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let version = u32_at(8);
        if version != MAP_VERSION {
            return Err(ThinError::Format(format!(
                "map format version {version} unknown"
            )));
        }
        let mut map = ThinMap::new(u64_at(16), u32_at(12))?;
        if u64_at(24) != map.blocks() {
            return Err(ThinError::Format(
                "block count does not match the size".into(),
            ));
        }
        let clen = usize::from(u16::from_le_bytes([bytes[32], bytes[33]]));
        if clen > HDR_CONFIG_MAX {
            return Err(ThinError::Format("config string too long".into()));
        }
        map.config = bytes[HDR_CONFIG..HDR_CONFIG + clen].to_vec();
        let need = MAP_PAGE + map.pages.len() * MAP_PAGE;
        if bytes.len() < need {
            return Err(ThinError::Format(format!(
                "map file is {} bytes, needs {need}",
                bytes.len()
            )));
        }
        for (i, g) in map.gens.iter_mut().enumerate() {
            *g = u64_at(MAP_PAGE + 8 * i);
        }
        map.used_blocks = map.gens.iter().filter(|g| **g != 0).count() as u64;
        map.next_gen = map.gens.iter().copied().max().unwrap_or(0) + 1;
        Ok(map)
    }

    /// Size of the map file.
    pub fn file_len(&self) -> u64 {
        page_offset(self.pages.len())
    }

    /// Creates (truncating) a map file for this map, written out in full and synced.
    pub fn create_file(&self, path: &Path) -> Result<()> {
        let io = |source| ThinError::Io {
            path: path.display().to_string(),
            source,
        };
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io)?;
        f.write_all_at(&self.header_bytes(), 0).map_err(io)?;
        // Write every page (zeros included) so later page writes never need space.
        let zero = vec![0u8; MAP_PAGE];
        for p in 0..self.pages.len() {
            f.write_all_at(&zero, page_offset(p)).map_err(io)?;
        }
        f.sync_all().map_err(io)
    }

    /// Loads a map file.
    pub fn load_file(path: &Path) -> Result<ThinMap> {
        let bytes = std::fs::read(path).map_err(|source| ThinError::Io {
            path: path.display().to_string(),
            source,
        })?;
        ThinMap::decode(&bytes)
    }
}

/// File offset of map page `page`.
pub fn page_offset(page: usize) -> u64 {
    (MAP_PAGE + page * MAP_PAGE) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marking_tracks_pages_and_usage() {
        let mut m = ThinMap::new(1 << 21, 65536).unwrap(); // 1 GiB, 16384 blocks
        assert_eq!(m.blocks(), 16384);
        assert_eq!(m.blocks_of(0, 512), 0..1);
        assert_eq!(m.blocks_of(65535, 2), 0..2);
        assert_eq!(m.blocks_of(100, 0), 0..0);
        assert_eq!(m.blocks_of(1 << 40, 512), 16384..16384);
        assert!(m.all_unwritten(0..16384));
        let g = m.next_generation();
        let need = m.mark(511..513, g);
        assert_eq!(need, vec![(0, 1), (1, 1)]);
        assert_eq!(m.used_bytes(), 2 * 65536);
        assert!(!m.all_unwritten(500..600));
        assert!(m.any_unwritten(500..600));
        assert!(!m.is_durable(0, 1));
        let (off, v, bytes) = m.take_page_write(0).unwrap();
        assert_eq!((off, v), (4096, 1));
        assert_eq!(&bytes[511 * 8..512 * 8], &g.to_le_bytes());
        assert!(m.take_page_write(0).is_none(), "in flight");
        let g2 = m.next_generation();
        m.mark(511..512, g2);
        m.page_written(0, 1, true);
        assert!(m.is_durable(0, 1));
        assert!(!m.is_durable(0, 2));
        let (_, v, _) = m.take_page_write(0).unwrap();
        assert_eq!(v, 2);
        m.page_written(0, 2, false);
        assert!(!m.is_durable(0, 2));
        assert_eq!(m.generation(511), 2);
        assert_eq!(m.generation(1 << 40), 0);
        // Re-marking with an older generation never lowers it.
        m.mark(511..512, 1);
        assert_eq!(m.generation(511), 2);
        assert_eq!(m.used_bytes(), 2 * 65536);
    }

    #[test]
    fn file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let mut m = ThinMap::new(10_000, 4096).unwrap();
        m.set_config(b"owner=a");
        m.create_file(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), m.file_len());
        let g = m.next_generation();
        m.mark(3..5, g);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        let (off, v, bytes) = m.take_page_write(0).unwrap();
        f.write_all_at(&bytes, off).unwrap();
        m.page_written(0, v, true);
        let back = ThinMap::load_file(&path).unwrap();
        assert_eq!(back.generation(3), 1);
        assert_eq!(back.generation(4), 1);
        assert_eq!(back.generation(5), 0);
        assert_eq!(back.config(), b"owner=a");
        assert_eq!(back.used_bytes(), 2 * 4096);
        assert_eq!(back.sectors(), 10_000);
        assert_eq!(back.block_size(), 4096);
        let mut back = back;
        assert_eq!(back.next_generation(), 2);
    }

    #[test]
    fn rejects_bad_files() {
        assert!(ThinMap::new(100, 1000).is_err());
        assert!(ThinMap::decode(b"short").is_err());
        let m = ThinMap::new(10_000, 4096).unwrap();
        let mut h = m.header_bytes();
        assert!(ThinMap::decode(&h).is_err(), "pages missing");
        h[8] = 9;
        assert!(ThinMap::decode(&h).is_err());
        let mut h = m.header_bytes();
        h[24] = 1;
        h.resize(m.file_len() as usize, 0);
        assert!(ThinMap::decode(&h).is_err());
        assert!(ThinMap::load_file(Path::new("/nonexistent/map")).is_err());
    }
}
