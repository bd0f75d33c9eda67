//! Paged f32 storage with a resident-memory budget: the interface QLoRA's paged optimizers need.
//!
//! Optimizer state is touched once per step, in order, and never all at once, so it can live in
//! fixed-size pages of which only a budgeted few are resident; the others wait in slower memory
//! (a memory-mapped file on CPU; pinned host memory behind a device budget on CUDA). Callers never
//! see a whole region: they visit it page by page, which is what lets a region be larger than the
//! budget. [`MmapPageStore`](super::mmap_page_store::MmapPageStore) is the CPU implementation.

use std::fmt;

use candle_core::{bail, Result};

/// Number of page windows of `regions` (pages of `page_elems`), after checking they can be
/// visited together by a store of `allocated` pages of which `budget` can be `resident` at once
/// ("resident" on the host, "device" on a GPU): no more regions than that budget, all of one
/// length, all allocated by the store, none twice.
pub(crate) fn check_regions(
    regions: &[Region],
    page_elems: usize,
    allocated: usize,
    budget: usize,
    resident: &str,
) -> Result<usize> {
    let Some(first) = regions.first() else {
        return Ok(0);
    };
    if regions.len() > budget {
        bail!(
            "{} regions visited together need {} {resident} pages but the budget holds {budget}: \
             raise --optim-resident-mb",
            regions.len(),
            regions.len(),
        );
    }
    for (i, r) in regions.iter().enumerate() {
        if r.len != first.len {
            bail!(
                "regions visited together differ in length ({} vs {})",
                r.len,
                first.len
            );
        }
        if r.first_page + r.len.div_ceil(page_elems) > allocated {
            bail!("region {r:?} was not allocated by this page store");
        }
        if regions[..i]
            .iter()
            .any(|q| q.first_page == r.first_page && r.len > 0)
        {
            bail!("region {r:?} is visited twice at once");
        }
    }
    Ok(first.len.div_ceil(page_elems))
}

/// Default page size: 1 MiB (262 144 f32), large enough that paging is sequential I/O.
pub const DEFAULT_PAGE_BYTES: usize = 1 << 20;

/// A region of f32 handed out by [`PageStore::allocate`]; it starts on a page boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Region {
    pub(crate) first_page: usize,
    pub(crate) len: usize,
}

impl Region {
    /// Number of f32 in the region.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Counters of a page store, all in bytes except the event counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageStats {
    /// Size of one page.
    pub page_bytes: usize,
    /// Most bytes allowed resident at once.
    pub budget_bytes: usize,
    /// Bytes of all allocated pages, resident or not.
    pub allocated_bytes: usize,
    /// Bytes resident now.
    pub resident_bytes: usize,
    /// Most bytes ever resident at once.
    pub peak_resident_bytes: usize,
    /// Bytes written to the backing store by evictions.
    pub bytes_paged_out: u64,
    /// Bytes read back from the backing store.
    pub bytes_paged_in: u64,
    /// Pages evicted (clean or dirty).
    pub evictions: u64,
    /// Pages read back from the backing store.
    pub page_ins: u64,
}

impl fmt::Display for PageStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} in {} pages, resident {} (peak {}, budget {}), paged out {} / in {}, \
             {} evictions, {} page-ins",
            human_bytes(self.allocated_bytes as u64),
            human_bytes(self.page_bytes as u64),
            human_bytes(self.resident_bytes as u64),
            human_bytes(self.peak_resident_bytes as u64),
            human_bytes(self.budget_bytes as u64),
            human_bytes(self.bytes_paged_out),
            human_bytes(self.bytes_paged_in),
            self.evictions,
            self.page_ins,
        )
    }
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut x = b as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}

/// Visitor of one page-sized window of several regions: `(offset in elements, slices)`.
pub type ChunkFnMut<'a> = dyn FnMut(usize, &mut [&mut [f32]]) -> Result<()> + 'a;
/// Read-only visitor of one page-sized window of several regions.
pub type ChunkFn<'a> = dyn FnMut(usize, &[&[f32]]) -> Result<()> + 'a;

/// f32 regions held in pages, at most a budget of which are resident at once.
///
/// Object safe so the optimizer can hold `Box<dyn PageStore>` and a CUDA store (pinned host
/// pages, device-resident budget) can slot in without touching the optimizer.
pub trait PageStore: Send + fmt::Debug {
    /// Reserve a zero-filled region of `len` f32, starting on a fresh page.
    fn allocate(&mut self, len: usize) -> Result<Region>;

    /// Elements per page; visitors get windows of at most this many elements.
    fn page_elems(&self) -> usize;

    /// Visit equally long `regions` together, window by window in increasing offset, with the
    /// same window of each resident and writable at once (so at most `regions.len()` pages must
    /// fit in the budget, whatever the regions' size).
    fn for_each_chunk_mut(&mut self, regions: &[Region], f: &mut ChunkFnMut<'_>) -> Result<()>;

    /// As [`PageStore::for_each_chunk_mut`], read-only (pages stay clean, evicting them is free).
    fn for_each_chunk(&mut self, regions: &[Region], f: &mut ChunkFn<'_>) -> Result<()>;

    /// Current counters.
    fn stats(&self) -> PageStats;

    /// Copy a whole region out (for checkpoints and tests; it is as large as the region).
    fn read_region(&mut self, region: Region) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(region.len());
        self.for_each_chunk(&[region], &mut |_, s| {
            out.extend_from_slice(s[0]);
            Ok(())
        })?;
        Ok(out)
    }

    /// Overwrite a whole region with `data` (its length must be the region's).
    fn write_region(&mut self, region: Region, data: &[f32]) -> Result<()> {
        if data.len() != region.len() {
            candle_core::bail!(
                "write_region: {} values for a region of {}",
                data.len(),
                region.len()
            );
        }
        self.for_each_chunk_mut(&[region], &mut |off, s| {
            let n = s[0].len();
            s[0].copy_from_slice(&data[off..off + n]);
            Ok(())
        })
    }
}
