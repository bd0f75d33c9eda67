//! Where AdamW's moments live: plain f32 vectors, pages under a resident budget, or 8-bit
//! blockwise codes; each parameter's update runs over whichever it is.

use std::path::PathBuf;
use std::sync::Mutex;

use candle_core::{bail, Result};

use super::blockwise8::Blockwise8;
use super::mmap_page_store::MmapPageStore;
use super::page_store::{PageStats, PageStore, Region, DEFAULT_PAGE_BYTES};
use super::update::{update, update_blockwise8, StepScalars};

/// bitsandbytes' `min_8bit_size`: smaller parameters keep 32-bit state.
pub const DEFAULT_MIN_8BIT_ELEMS: usize = 4096;

/// How AdamW stores its first and second moments.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum StateStorage {
    /// f32 vectors in memory (8 bytes per parameter).
    #[default]
    Plain,
    /// f32 in pages, at most `resident_bytes` of them in memory, the rest in a memory-mapped
    /// temporary file in `dir` (the system temp dir if `None`). Bit-identical to `Plain`.
    Paged {
        /// Most bytes of state resident at once (at least two pages).
        resident_bytes: usize,
        /// Page size in bytes (a multiple of 4).
        page_bytes: usize,
        /// Folder of the backing file.
        dir: Option<PathBuf>,
    },
    /// 8-bit blockwise (256 values per absmax): the first moment in the signed dynamic code,
    /// the second in the unsigned one (~2 bytes per parameter). Parameters with fewer than
    /// `min_elems` values keep f32 state, as bitsandbytes does.
    EightBit {
        /// Smallest parameter stored in 8 bits.
        min_elems: usize,
    },
}

impl StateStorage {
    /// Paged with the default 1 MiB pages in the system temp dir.
    pub fn paged(resident_bytes: usize) -> Self {
        StateStorage::Paged {
            resident_bytes,
            page_bytes: DEFAULT_PAGE_BYTES,
            dir: None,
        }
    }

    /// 8-bit with bitsandbytes' default threshold (4096 values).
    pub fn eight_bit() -> Self {
        StateStorage::EightBit {
            min_elems: DEFAULT_MIN_8BIT_ELEMS,
        }
    }
}

/// One parameter's moments.
#[derive(Debug)]
pub(crate) enum Moments {
    Plain { m: Vec<f32>, v: Vec<f32> },
    Paged { m: Region, v: Region },
    EightBit { m: Blockwise8, v: Blockwise8 },
}

/// One parameter's moments copied out, in the form they are stored in.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum MomentValues {
    F32 { m: Vec<f32>, v: Vec<f32> },
    EightBit { m: Blockwise8, v: Blockwise8 },
}

/// All parameters' moments and the page store behind the paged ones.
#[derive(Debug)]
pub(crate) struct OptimState {
    moments: Vec<Moments>,
    /// Behind a mutex so reading state out (which pages in) needs only `&self`.
    store: Option<Mutex<Box<dyn PageStore>>>,
}

impl OptimState {
    /// Zero moments for parameters of `sizes` elements.
    pub(crate) fn new(storage: &StateStorage, sizes: &[usize]) -> Result<Self> {
        let mut store: Option<Box<dyn PageStore>> = None;
        if let StateStorage::Paged {
            resident_bytes,
            page_bytes,
            dir,
        } = storage
        {
            // m and v of one window are resident together.
            if *resident_bytes < 2 * page_bytes {
                bail!(
                    "optimizer resident budget {resident_bytes} bytes is below two pages of \
                     {page_bytes} bytes: raise --optim-resident-mb or use smaller pages"
                );
            }
            store = Some(Box::new(MmapPageStore::new(
                *resident_bytes,
                *page_bytes,
                dir.as_deref(),
            )?));
        }
        let moments = sizes
            .iter()
            .map(|&n| {
                Ok(match (storage, store.as_mut()) {
                    (StateStorage::Paged { .. }, Some(s)) => Moments::Paged {
                        m: s.allocate(n)?,
                        v: s.allocate(n)?,
                    },
                    (StateStorage::EightBit { min_elems }, _) if n >= *min_elems => {
                        Moments::EightBit {
                            m: Blockwise8::zeros(n, true),
                            v: Blockwise8::zeros(n, false),
                        }
                    }
                    _ => Moments::Plain {
                        m: vec![0.0; n],
                        v: vec![0.0; n],
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            moments,
            store: store.map(Mutex::new),
        })
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Box<dyn PageStore>> {
        self.store
            .as_ref()
            .expect("paged moments have a page store")
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Update parameter `i` (`p`, as f32) from its gradient `g`.
    pub(crate) fn update(
        &mut self,
        i: usize,
        p: &mut [f32],
        g: &[f32],
        s: &StepScalars,
    ) -> Result<()> {
        match &mut self.moments[i] {
            Moments::Plain { m, v } => update(p, g, m, v, s),
            Moments::EightBit { m, v } => update_blockwise8(p, g, m, v, s),
            Moments::Paged { m, v } => {
                let (m, v) = (*m, *v);
                let mut store = self.store();
                store.for_each_chunk_mut(&[m, v], &mut |off, w| {
                    let [mw, vw] = w else {
                        unreachable!("two regions")
                    };
                    let n = mw.len();
                    update(&mut p[off..off + n], &g[off..off + n], mw, vw, s);
                    Ok(())
                })?;
            }
        }
        Ok(())
    }

    /// Parameter `i`'s moments, copied out.
    pub(crate) fn values(&self, i: usize) -> Result<MomentValues> {
        Ok(match &self.moments[i] {
            Moments::Plain { m, v } => MomentValues::F32 {
                m: m.clone(),
                v: v.clone(),
            },
            Moments::EightBit { m, v } => MomentValues::EightBit {
                m: m.clone(),
                v: v.clone(),
            },
            Moments::Paged { m, v } => {
                let mut store = self.store();
                MomentValues::F32 {
                    m: store.read_region(*m)?,
                    v: store.read_region(*v)?,
                }
            }
        })
    }

    /// Replace parameter `i`'s moments, converting between f32 and 8-bit as needed.
    pub(crate) fn set_values(&mut self, i: usize, values: MomentValues) -> Result<()> {
        let n = self.len(i);
        let got = match &values {
            MomentValues::F32 { m, v } => (m.len(), v.len()),
            MomentValues::EightBit { m, v } => (m.len(), v.len()),
        };
        if got != (n, n) {
            bail!(
                "moments of {} and {} values for a parameter of {n}",
                got.0,
                got.1
            );
        }
        let f32_values = |values: MomentValues| match values {
            MomentValues::F32 { m, v } => (m, v),
            MomentValues::EightBit { m, v } => (m.dequantize(), v.dequantize()),
        };
        match &mut self.moments[i] {
            Moments::Plain { m, v } => (*m, *v) = f32_values(values),
            Moments::EightBit { m, v } => {
                (*m, *v) = match values {
                    MomentValues::EightBit { m, v } => (m, v),
                    MomentValues::F32 { m, v } => (
                        Blockwise8::quantize(&m, true),
                        Blockwise8::quantize(&v, false),
                    ),
                };
            }
            Moments::Paged { m, v } => {
                let (rm, rv) = (*m, *v);
                let (m, v) = f32_values(values);
                let mut store = self.store();
                store.write_region(rm, &m)?;
                store.write_region(rv, &v)?;
            }
        }
        Ok(())
    }

    /// Elements of parameter `i`.
    fn len(&self, i: usize) -> usize {
        match &self.moments[i] {
            Moments::Plain { m, .. } => m.len(),
            Moments::Paged { m, .. } => m.len(),
            Moments::EightBit { m, .. } => m.len(),
        }
    }

    /// Bytes of all moments wherever they are (resident or paged out).
    pub(crate) fn bytes(&self) -> usize {
        self.moments
            .iter()
            .map(|mo| match mo {
                Moments::Plain { m, v } => 4 * (m.len() + v.len()),
                Moments::Paged { m, v } => 4 * (m.len() + v.len()),
                Moments::EightBit { m, v } => m.bytes() + v.bytes(),
            })
            .sum()
    }

    /// Counters of the page store, if the state is paged.
    pub(crate) fn page_stats(&self) -> Option<PageStats> {
        self.store.as_ref().map(|_| self.store().stats())
    }
}
