//! CPU [`PageStore`]: resident pages in heap frames, evicted pages (least recently used first)
//! in a memory-mapped, already-unlinked temporary file.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{bail, Result};
use memmap2::MmapMut;

use super::page_store::{self, ChunkFn, ChunkFnMut, PageStats, PageStore, Region};

/// A page store on the CPU, bounded in resident bytes, spilling to a temporary file.
#[derive(Debug)]
pub struct MmapPageStore {
    page_elems: usize,
    budget_pages: usize,
    dir: Option<PathBuf>,
    pages: Vec<Page>,
    /// Recency order of the resident pages: tick of last use -> page.
    lru: BTreeMap<u64, usize>,
    tick: u64,
    resident: usize,
    backing: Option<Backing>,
    stats: PageStats,
}

#[derive(Debug, Default)]
struct Page {
    frame: Option<Box<[f32]>>,
    last_use: u64,
    /// The frame differs from what the backing file holds (or would read as: zeros).
    dirty: bool,
    /// The backing file holds this page; otherwise it reads as zeros.
    on_disk: bool,
}

#[derive(Debug)]
struct Backing {
    file: File,
    map: MmapMut,
}

impl MmapPageStore {
    /// A store of `page_bytes` pages (a positive multiple of 4) keeping at most `resident_bytes`
    /// in memory; the backing file goes in `dir` (the system temp dir if `None`) and is created
    /// on the first eviction only.
    pub fn new(resident_bytes: usize, page_bytes: usize, dir: Option<&Path>) -> Result<Self> {
        if page_bytes == 0 || !page_bytes.is_multiple_of(4) {
            bail!("optimizer page size must be a positive multiple of 4 bytes, got {page_bytes}");
        }
        let budget_pages = resident_bytes / page_bytes;
        if budget_pages == 0 {
            bail!(
                "optimizer resident budget of {resident_bytes} bytes holds no {page_bytes}-byte \
                 page: raise the budget (--optim-resident-mb) or lower the page size"
            );
        }
        Ok(Self {
            page_elems: page_bytes / 4,
            budget_pages,
            dir: dir.map(Path::to_path_buf),
            pages: Vec::new(),
            lru: BTreeMap::new(),
            tick: 0,
            resident: 0,
            backing: None,
            stats: PageStats {
                page_bytes,
                budget_bytes: budget_pages * page_bytes,
                ..PageStats::default()
            },
        })
    }

    fn page_bytes(&self) -> usize {
        self.page_elems * 4
    }

    /// Number of page windows of `regions`, after checking they can be visited together.
    fn check_regions(&self, regions: &[Region]) -> Result<usize> {
        page_store::check_regions(
            regions,
            self.page_elems,
            self.pages.len(),
            self.budget_pages,
            "resident",
        )
    }

    fn touch(&mut self, page: usize) {
        let old = self.pages[page].last_use;
        self.lru.remove(&old);
        self.tick += 1;
        self.pages[page].last_use = self.tick;
        self.lru.insert(self.tick, page);
    }

    /// Make `page` resident, evicting the least recently used page outside `pinned` if the
    /// budget is full.
    fn page_in(&mut self, page: usize, pinned: &[usize]) -> Result<()> {
        if self.pages[page].frame.is_some() {
            self.touch(page);
            return Ok(());
        }
        let mut frame = if self.resident == self.budget_pages {
            let victim = self
                .lru
                .values()
                .copied()
                .find(|p| !pinned.contains(p))
                .expect("budget holds more pages than are pinned");
            self.evict(victim)?
        } else {
            self.resident += 1;
            self.stats.peak_resident_bytes = self
                .stats
                .peak_resident_bytes
                .max(self.resident * self.page_bytes());
            vec![0f32; self.page_elems].into_boxed_slice()
        };
        if self.pages[page].on_disk {
            let (off, len) = (page * self.page_bytes(), self.page_bytes());
            let backing = self
                .backing
                .as_ref()
                .expect("a page on disk has a backing file");
            let bytes = &backing.map[off..off + len];
            for (x, b) in frame.iter_mut().zip(bytes.chunks_exact(4)) {
                *x = f32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
            }
            release(&backing.map, off, len);
            self.stats.bytes_paged_in += len as u64;
            self.stats.page_ins += 1;
        } else {
            frame.fill(0.0);
        }
        let p = &mut self.pages[page];
        p.frame = Some(frame);
        p.dirty = false;
        self.touch(page);
        Ok(())
    }

    /// Write `page` out if dirty and hand its frame over for reuse (resident count unchanged:
    /// the caller fills the frame with another page).
    fn evict(&mut self, page: usize) -> Result<Box<[f32]>> {
        let frame = self.pages[page]
            .frame
            .take()
            .expect("evicting a resident page");
        self.lru.remove(&self.pages[page].last_use);
        self.stats.evictions += 1;
        if self.pages[page].dirty {
            let (off, len) = (page * self.page_bytes(), self.page_bytes());
            let backing = self.backing_covering(page)?;
            let bytes = &mut backing.map[off..off + len];
            for (b, x) in bytes.chunks_exact_mut(4).zip(frame.iter()) {
                b.copy_from_slice(&x.to_ne_bytes());
            }
            release(&backing.map, off, len);
            self.stats.bytes_paged_out += len as u64;
            let p = &mut self.pages[page];
            p.on_disk = true;
            p.dirty = false;
        }
        Ok(frame)
    }

    /// The backing file, created or grown (and remapped) so that it holds `page`.
    fn backing_covering(&mut self, page: usize) -> Result<&mut Backing> {
        let need = (page + 1) * self.page_bytes();
        let covered = self.backing.as_ref().is_some_and(|b| b.map.len() >= need);
        if !covered {
            // Grow to every page allocated so far, so later evictions rarely remap.
            let size = (self.pages.len() * self.page_bytes()).max(need);
            let file = match self.backing.take() {
                Some(b) => b.file,
                None => match &self.dir {
                    Some(d) => tempfile::tempfile_in(d)?,
                    None => tempfile::tempfile()?,
                },
            };
            file.set_len(size as u64)?;
            // SAFETY: the file is unlinked and private to this store; nothing else maps or
            // truncates it while the map lives.
            let map = unsafe { MmapMut::map_mut(&file)? };
            self.backing = Some(Backing { file, map });
        }
        Ok(self.backing.as_mut().expect("backing was just ensured"))
    }

    /// Page in window `c` of each region and lend the frames out (taken out of their slots so
    /// several can be borrowed mutably at once; `put_back` returns them).
    fn take_window(&mut self, regions: &[Region], c: usize) -> Result<Vec<(usize, Box<[f32]>)>> {
        let pages: Vec<usize> = regions.iter().map(|r| r.first_page + c).collect();
        for &p in &pages {
            self.page_in(p, &pages)?;
        }
        Ok(pages
            .into_iter()
            .map(|p| (p, self.pages[p].frame.take().expect("just paged in")))
            .collect())
    }

    fn put_back(&mut self, frames: Vec<(usize, Box<[f32]>)>, dirty: bool) {
        for (p, frame) in frames {
            let page = &mut self.pages[p];
            page.frame = Some(frame);
            page.dirty |= dirty;
        }
    }
}

/// Drop a range of the mapping from this process's resident set: the data stays in the page
/// cache / file, and keeping it mapped would count it against the budget we promised.
fn release(map: &MmapMut, off: usize, len: usize) {
    #[cfg(unix)]
    {
        // SAFETY: the range is not borrowed (the copy into or out of it has ended), and on a
        // shared file mapping MADV_DONTNEED keeps the data: later reads fault it back in.
        // Failure (e.g. a range not aligned to the OS page) only leaves the pages resident.
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, off, len) };
    }
    #[cfg(not(unix))]
    let _ = (map, off, len);
}

impl PageStore for MmapPageStore {
    fn allocate(&mut self, len: usize) -> Result<Region> {
        let first_page = self.pages.len();
        let n = len.div_ceil(self.page_elems);
        self.pages.resize_with(first_page + n, Page::default);
        self.stats.allocated_bytes = self.pages.len() * self.page_bytes();
        Ok(Region { first_page, len })
    }

    fn page_elems(&self) -> usize {
        self.page_elems
    }

    fn for_each_chunk_mut(&mut self, regions: &[Region], f: &mut ChunkFnMut<'_>) -> Result<()> {
        let windows = self.check_regions(regions)?;
        let len = regions.first().map_or(0, |r| r.len);
        for c in 0..windows {
            let off = c * self.page_elems;
            let n = self.page_elems.min(len - off);
            let mut frames = self.take_window(regions, c)?;
            let r = {
                let mut slices: Vec<&mut [f32]> =
                    frames.iter_mut().map(|(_, fr)| &mut fr[..n]).collect();
                f(off, &mut slices)
            };
            self.put_back(frames, true);
            r?;
        }
        Ok(())
    }

    fn for_each_chunk(&mut self, regions: &[Region], f: &mut ChunkFn<'_>) -> Result<()> {
        let windows = self.check_regions(regions)?;
        let len = regions.first().map_or(0, |r| r.len);
        for c in 0..windows {
            let off = c * self.page_elems;
            let n = self.page_elems.min(len - off);
            let frames = self.take_window(regions, c)?;
            let r = {
                let slices: Vec<&[f32]> = frames.iter().map(|(_, fr)| &fr[..n]).collect();
                f(off, &slices)
            };
            self.put_back(frames, false);
            r?;
        }
        Ok(())
    }

    fn stats(&self) -> PageStats {
        PageStats {
            resident_bytes: self.resident * self.page_bytes(),
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    fn pattern(seed: u32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761) as f32 * 1e-9 + seed as f32)
            .collect()
    }

    #[test]
    fn data_survives_eviction_and_page_in() {
        // Three pages resident at most, three regions of five and a half pages each.
        let mut s = MmapPageStore::new(3 * PAGE, PAGE, None).unwrap();
        let n = PAGE / 4 * 5 + PAGE / 8;
        let regions: Vec<Region> = (0..3).map(|_| s.allocate(n).unwrap()).collect();
        for (k, &r) in regions.iter().enumerate() {
            assert!(s.read_region(r).unwrap().iter().all(|&x| x == 0.0));
            s.write_region(r, &pattern(k as u32, n)).unwrap();
        }
        for (k, &r) in regions.iter().enumerate().rev() {
            assert_eq!(
                s.read_region(r).unwrap(),
                pattern(k as u32, n),
                "region {k}"
            );
        }
        let st = s.stats();
        assert!(st.evictions > 0 && st.page_ins > 0, "{st:?}");
        assert_eq!(st.peak_resident_bytes, 3 * PAGE);
        assert!(st.resident_bytes <= 3 * PAGE);
        assert_eq!(st.allocated_bytes, 3 * 6 * PAGE);
        // Every page was written once while resident and written out at most once per eviction.
        assert!(
            st.bytes_paged_out >= (3 * 6 - 3) as u64 * PAGE as u64,
            "{st:?}"
        );
    }

    #[test]
    fn windows_of_several_regions_line_up() {
        let mut s = MmapPageStore::new(2 * PAGE, PAGE, None).unwrap();
        let n = PAGE / 4 * 7 + 3;
        let a = s.allocate(n).unwrap();
        let b = s.allocate(n).unwrap();
        s.write_region(a, &pattern(1, n)).unwrap();
        s.for_each_chunk_mut(&[a, b], &mut |off, w| {
            let (x, y) = w.split_at_mut(1);
            for (i, (xa, yb)) in x[0].iter_mut().zip(y[0].iter_mut()).enumerate() {
                *yb = *xa * 2.0 + (off + i) as f32;
                *xa = -*xa;
            }
            Ok(())
        })
        .unwrap();
        let want_a: Vec<f32> = pattern(1, n).iter().map(|x| -x).collect();
        let want_b: Vec<f32> = pattern(1, n)
            .iter()
            .enumerate()
            .map(|(i, x)| x * 2.0 + i as f32)
            .collect();
        assert_eq!(s.read_region(a).unwrap(), want_a);
        assert_eq!(s.read_region(b).unwrap(), want_b);
        assert!(s.stats().peak_resident_bytes <= 2 * PAGE);
    }

    #[test]
    fn clean_pages_are_not_written_again() {
        let mut s = MmapPageStore::new(PAGE, PAGE, None).unwrap();
        let r = s.allocate(PAGE / 4 * 4).unwrap();
        s.write_region(r, &pattern(7, r.len())).unwrap();
        // The first read evicts the last dirty page; after that every page is clean.
        assert_eq!(s.read_region(r).unwrap(), pattern(7, r.len()));
        let before = s.stats();
        for _ in 0..3 {
            assert_eq!(s.read_region(r).unwrap(), pattern(7, r.len()));
        }
        let after = s.stats();
        assert_eq!(after.bytes_paged_out, before.bytes_paged_out);
        assert_eq!(after.page_ins, before.page_ins + 12);
        assert_eq!(after.evictions, before.evictions + 12);
    }

    #[test]
    fn budget_too_small_for_a_window_is_an_error() {
        let mut s = MmapPageStore::new(PAGE, PAGE, None).unwrap();
        let a = s.allocate(10).unwrap();
        let b = s.allocate(10).unwrap();
        let e = s
            .for_each_chunk_mut(&[a, b], &mut |_, _| Ok(()))
            .unwrap_err();
        assert!(e.to_string().contains("--optim-resident-mb"), "{e}");
        assert!(MmapPageStore::new(PAGE - 1, PAGE, None).is_err());
        assert!(s.for_each_chunk_mut(&[a, a], &mut |_, _| Ok(())).is_err());
    }

    #[test]
    fn backing_file_grows_with_later_allocations() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = MmapPageStore::new(PAGE, PAGE, Some(dir.path())).unwrap();
        let a = s.allocate(PAGE / 4 * 2).unwrap();
        s.write_region(a, &pattern(3, a.len())).unwrap();
        let b = s.allocate(PAGE / 4 * 3).unwrap();
        s.write_region(b, &pattern(4, b.len())).unwrap();
        assert_eq!(s.read_region(a).unwrap(), pattern(3, a.len()));
        assert_eq!(s.read_region(b).unwrap(), pattern(4, b.len()));
    }
}
