//! CUDA [`PageStore`]: every page lives in pinned (page-locked) host memory; at most a budget of
//! them are resident in device frames at once, least recently used evicted first.
//!
//! Two ways in, one store:
//! - the [`PageStore`] visitors see the pinned host pages directly (same interface as the CPU
//!   mmap store, so the optimizer's host-side update runs on it unchanged);
//! - [`CudaPageStore::for_each_chunk_on_device`] copies each window's pages into device frames
//!   for a device-side update, writing evicted dirty frames back. Copies run on their own stream
//!   from pinned memory, so they are truly asynchronous: while the caller's kernels work on
//!   window w, the pages of window w + 1 are already being copied into free frames. cudarc's
//!   per-buffer events order the copy stream against the compute stream.
//!
//! Which page sits in which frame is [`Residency`]'s job, tested on CPU; this file only moves
//! bytes, and is compiled (not run) on machines without a GPU.

use std::fmt;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, CudaViewMut, PinnedHostSlice,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaDevice, Result};

use super::page_store::{self, ChunkFn, ChunkFnMut, PageStats, PageStore, Region};
use super::residency::Residency;

/// Visitor of one window of several regions in device memory: `(offset in elements, views)`.
pub type DeviceChunkFnMut<'a> = dyn FnMut(usize, &mut [CudaViewMut<'_, f32>]) -> Result<()> + 'a;

/// Pinned host pages behind a device-resident budget.
pub struct CudaPageStore {
    device: CudaDevice,
    copies: Arc<CudaStream>,
    page_elems: usize,
    /// `None` only while a visitor borrows the page.
    pages: Vec<Option<PinnedHostSlice<f32>>>,
    /// Device frames, allocated on first use up to the budget.
    frames: Vec<Option<CudaSlice<f32>>>,
    residency: Residency,
    stats: PageStats,
}

impl fmt::Debug for CudaPageStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaPageStore")
            .field("device", &self.device)
            .field("page_elems", &self.page_elems)
            .field("pages", &self.pages.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl CudaPageStore {
    /// A store on `device` with `page_bytes` pages (a positive multiple of 4), keeping at most
    /// `device_bytes` of them in device memory.
    pub fn new(device: &CudaDevice, device_bytes: usize, page_bytes: usize) -> Result<Self> {
        if page_bytes == 0 || !page_bytes.is_multiple_of(4) {
            bail!("optimizer page size must be a positive multiple of 4 bytes, got {page_bytes}");
        }
        let budget_pages = device_bytes / page_bytes;
        if budget_pages == 0 {
            bail!(
                "optimizer device budget of {device_bytes} bytes holds no {page_bytes}-byte page: \
                 raise --optim-resident-mb or lower the page size"
            );
        }
        let copies = device.cuda_stream().context().new_stream().w()?;
        Ok(Self {
            device: device.clone(),
            copies,
            page_elems: page_bytes / 4,
            pages: Vec::new(),
            frames: (0..budget_pages).map(|_| None).collect(),
            residency: Residency::new(budget_pages),
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

    /// Windows of `regions`, after checking they can be visited together.
    fn check_regions(&self, regions: &[Region]) -> Result<usize> {
        page_store::check_regions(
            regions,
            self.page_elems,
            self.pages.len(),
            self.residency.frames(),
            "device",
        )
    }

    fn page(&mut self, p: usize) -> Result<&mut PinnedHostSlice<f32>> {
        match self.pages.get_mut(p).and_then(Option::as_mut) {
            Some(page) => Ok(page),
            None => bail!("cuda page store: page {p} is not available"),
        }
    }

    fn frame(&mut self, f: usize) -> Result<CudaSlice<f32>> {
        match self.frames[f].take() {
            Some(frame) => Ok(frame),
            // SAFETY: a frame is always filled from its page before it is read.
            None => unsafe { self.device.alloc::<f32>(self.page_elems) },
        }
    }

    /// Write a dirty frame back into its pinned page (asynchronously; the page's event makes
    /// host access wait for it).
    fn write_back(&mut self, page: usize, frame: usize) -> Result<()> {
        let src = self.frame(frame)?;
        let copies = self.copies.clone();
        copies.memcpy_dtoh(&src, self.page(page)?).w()?;
        self.frames[frame] = Some(src);
        self.stats.bytes_paged_out += self.page_bytes() as u64;
        Ok(())
    }

    /// Make `page` resident without evicting any of `keep`; copies are queued, not awaited.
    fn bring_in(&mut self, page: usize, keep: &[usize], prefetch: bool) -> Result<()> {
        let placement = if prefetch {
            self.residency.place_if_free(page)
        } else {
            self.residency.place(page, keep)
        };
        let Some(placement) = placement else {
            if prefetch {
                return Ok(());
            }
            bail!("cuda page store: no device frame free for page {page}");
        };
        if let Some((old, dirty)) = placement.evicted {
            self.stats.evictions += 1;
            if dirty {
                self.write_back(old, placement.frame)?;
            }
        }
        if placement.load {
            let mut dst = self.frame(placement.frame)?;
            let copies = self.copies.clone();
            copies.memcpy_htod(self.page(page)?, &mut dst).w()?;
            self.frames[placement.frame] = Some(dst);
            self.stats.page_ins += 1;
            self.stats.bytes_paged_in += self.page_bytes() as u64;
        }
        let resident = self.residency.resident() * self.page_bytes();
        self.stats.resident_bytes = resident;
        self.stats.peak_resident_bytes = self.stats.peak_resident_bytes.max(resident);
        Ok(())
    }

    /// Before the host touches `page`: fetch a newer device copy, and (when it will write) drop
    /// the device copy, which would be stale afterwards.
    fn sync_to_host(&mut self, page: usize, will_write: bool) -> Result<()> {
        let Some(frame) = self.residency.frame_of(page) else {
            return Ok(());
        };
        if self.residency.is_dirty(page) {
            self.write_back(page, frame)?;
            self.residency.set_dirty(page, false);
        }
        if will_write {
            self.residency.release(page);
            self.stats.resident_bytes = self.residency.resident() * self.page_bytes();
        }
        Ok(())
    }

    /// Visit equally long `regions` window by window with each window's pages resident in
    /// device memory and writable; the next window is prefetched into free frames meanwhile.
    pub fn for_each_chunk_on_device(
        &mut self,
        regions: &[Region],
        f: &mut DeviceChunkFnMut<'_>,
    ) -> Result<()> {
        let windows = self.check_regions(regions)?;
        for w in 0..windows {
            let pages: Vec<usize> = regions.iter().map(|r| r.first_page + w).collect();
            for &p in &pages {
                self.bring_in(p, &pages, false)?;
            }
            if w + 1 < windows {
                for r in regions {
                    self.bring_in(r.first_page + w + 1, &pages, true)?;
                }
            }
            let off = w * self.page_elems;
            let len = (regions[0].len - off).min(self.page_elems);
            let frame_ids: Vec<usize> = pages
                .iter()
                .map(|&p| self.residency.frame_of(p))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    candle_core::Error::Msg("cuda page store: page left its frame".into())
                })?;
            let mut taken = frame_ids
                .iter()
                .map(|&fi| self.frame(fi))
                .collect::<Result<Vec<_>>>()?;
            let result = {
                let mut views: Vec<CudaViewMut<'_, f32>> =
                    taken.iter_mut().map(|s| s.slice_mut(0..len)).collect();
                f(off, &mut views)
            };
            for (fi, frame) in frame_ids.iter().zip(taken) {
                self.frames[*fi] = Some(frame);
            }
            result?;
            for &p in &pages {
                self.residency.set_dirty(p, true);
            }
        }
        Ok(())
    }

    /// Take the pinned pages of window `w` of `regions` out for a host visitor.
    fn take_window(
        &mut self,
        regions: &[Region],
        w: usize,
        will_write: bool,
    ) -> Result<Vec<PinnedHostSlice<f32>>> {
        let mut out = Vec::with_capacity(regions.len());
        for r in regions {
            self.sync_to_host(r.first_page + w, will_write)?;
        }
        for r in regions {
            let p = r.first_page + w;
            match self.pages[p].take() {
                Some(page) => out.push(page),
                None => bail!("cuda page store: page {p} is not available"),
            }
        }
        Ok(out)
    }

    fn put_window(&mut self, regions: &[Region], w: usize, pages: Vec<PinnedHostSlice<f32>>) {
        for (r, page) in regions.iter().zip(pages) {
            self.pages[r.first_page + w] = Some(page);
        }
    }
}

impl PageStore for CudaPageStore {
    fn allocate(&mut self, len: usize) -> Result<Region> {
        let first_page = self.pages.len();
        let ctx = self.device.cuda_stream().context().clone();
        for _ in 0..len.div_ceil(self.page_elems) {
            // Plain pinned memory (not write-combined): the host reads these pages too.
            // SAFETY: filled with zeros right below, before any use.
            let mut page = unsafe { ctx.alloc_pinned_with_flags::<f32>(self.page_elems, 0) }.w()?;
            page.as_mut_slice().w()?.fill(0.0);
            self.pages.push(Some(page));
        }
        self.stats.allocated_bytes = self.pages.len() * self.page_bytes();
        Ok(Region { first_page, len })
    }

    fn page_elems(&self) -> usize {
        self.page_elems
    }

    fn for_each_chunk_mut(&mut self, regions: &[Region], f: &mut ChunkFnMut<'_>) -> Result<()> {
        let windows = self.check_regions(regions)?;
        for w in 0..windows {
            let off = w * self.page_elems;
            let len = (regions[0].len - off).min(self.page_elems);
            let mut pages = self.take_window(regions, w, true)?;
            let result = (|| {
                let mut slices = Vec::with_capacity(pages.len());
                for p in pages.iter_mut() {
                    slices.push(&mut p.as_mut_slice().w()?[..len]);
                }
                f(off, &mut slices)
            })();
            self.put_window(regions, w, pages);
            result?;
        }
        Ok(())
    }

    fn for_each_chunk(&mut self, regions: &[Region], f: &mut ChunkFn<'_>) -> Result<()> {
        let windows = self.check_regions(regions)?;
        for w in 0..windows {
            let off = w * self.page_elems;
            let len = (regions[0].len - off).min(self.page_elems);
            let pages = self.take_window(regions, w, false)?;
            let result = (|| {
                let mut slices = Vec::with_capacity(pages.len());
                for p in pages.iter() {
                    slices.push(&p.as_slice().w()?[..len]);
                }
                f(off, &slices)
            })();
            self.put_window(regions, w, pages);
            result?;
        }
        Ok(())
    }

    fn stats(&self) -> PageStats {
        self.stats
    }
}
