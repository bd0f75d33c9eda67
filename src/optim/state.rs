//! Where AdamW's moments live: plain f32 vectors, pages under a resident budget, or 8-bit
//! blockwise codes, on the host or as tensors on the parameters' device; each parameter's update
//! runs over whichever it is.

use std::path::PathBuf;
use std::sync::Mutex;

use candle_core::{bail, Device, Result, Tensor};

use super::blockwise8::Blockwise8;
use super::mmap_page_store::MmapPageStore;
use super::page_store::{PageStats, PageStore, Region, DEFAULT_PAGE_BYTES};
use super::tensor_update::{update_tensors, update_tensors_8bit, TensorBlockwise8};
use super::update::{update, update_blockwise8, StepScalars};

/// Where AdamW's update runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UpdateEngine {
    /// Plain Rust over host f32 slices, bit-identical to `torch.optim.AdamW` on CPU (the
    /// parameters are copied to the host and back, free when they live there).
    #[default]
    Host,
    /// candle tensor ops on the parameters' device: moments, 8-bit codes and the arithmetic stay
    /// in device memory; paged state moves between device frames and pinned host pages on CUDA.
    Tensors,
}

impl UpdateEngine {
    /// The engine for parameters on `device`: the host update on CPU, tensor ops elsewhere.
    pub fn for_device(device: &Device) -> Self {
        if device.is_cpu() {
            UpdateEngine::Host
        } else {
            UpdateEngine::Tensors
        }
    }
}

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
    Plain {
        m: Vec<f32>,
        v: Vec<f32>,
    },
    Paged {
        m: Region,
        v: Region,
    },
    EightBit {
        m: Blockwise8,
        v: Blockwise8,
    },
    Tensors {
        m: Tensor,
        v: Tensor,
    },
    Tensors8 {
        m: TensorBlockwise8,
        v: TensorBlockwise8,
    },
}

/// One parameter's moments copied out, in the form they are stored in.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum MomentValues {
    F32 { m: Vec<f32>, v: Vec<f32> },
    EightBit { m: Blockwise8, v: Blockwise8 },
}

/// The page store behind paged moments: a memory-mapped file on the host, or on CUDA pinned
/// host pages behind a device-frame budget.
#[derive(Debug)]
enum Pager {
    Host(Box<dyn PageStore>),
    #[cfg(feature = "cuda")]
    Device(Box<super::cuda_page_store::CudaPageStore>),
}

impl Pager {
    fn store(&mut self) -> &mut dyn PageStore {
        match self {
            Pager::Host(s) => s.as_mut(),
            #[cfg(feature = "cuda")]
            Pager::Device(s) => s.as_mut(),
        }
    }
}

/// All parameters' moments and the page store behind the paged ones.
#[derive(Debug)]
pub(crate) struct OptimState {
    moments: Vec<Moments>,
    /// Behind a mutex so reading state out (which pages in) needs only `&self`.
    store: Option<Mutex<Pager>>,
    device: Device,
}

impl OptimState {
    /// Zero moments for parameters of `sizes` elements living on `device`, updated by `engine`.
    pub(crate) fn new(
        storage: &StateStorage,
        sizes: &[usize],
        engine: UpdateEngine,
        device: &Device,
    ) -> Result<Self> {
        let mut store: Option<Pager> = None;
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
            store = Some(match (engine, device) {
                #[cfg(feature = "cuda")]
                (UpdateEngine::Tensors, Device::Cuda(dev)) => Pager::Device(Box::new(
                    super::cuda_page_store::CudaPageStore::new(dev, *resident_bytes, *page_bytes)?,
                )),
                _ => Pager::Host(Box::new(MmapPageStore::new(
                    *resident_bytes,
                    *page_bytes,
                    dir.as_deref(),
                )?)),
            });
        }
        let tensors = engine == UpdateEngine::Tensors;
        let moments = sizes
            .iter()
            .map(|&n| {
                Ok(match (storage, store.as_mut()) {
                    (StateStorage::Paged { .. }, Some(s)) => Moments::Paged {
                        m: s.store().allocate(n)?,
                        v: s.store().allocate(n)?,
                    },
                    (StateStorage::EightBit { min_elems }, _) if n >= *min_elems && tensors => {
                        Moments::Tensors8 {
                            m: TensorBlockwise8::zeros(n, true, device)?,
                            v: TensorBlockwise8::zeros(n, false, device)?,
                        }
                    }
                    (StateStorage::EightBit { min_elems }, _) if n >= *min_elems => {
                        Moments::EightBit {
                            m: Blockwise8::zeros(n, true),
                            v: Blockwise8::zeros(n, false),
                        }
                    }
                    _ if tensors => Moments::Tensors {
                        m: Tensor::zeros(n, candle_core::DType::F32, device)?,
                        v: Tensor::zeros(n, candle_core::DType::F32, device)?,
                    },
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
            device: device.clone(),
        })
    }

    fn pager(&self) -> std::sync::MutexGuard<'_, Pager> {
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
        if matches!(
            self.moments[i],
            Moments::Tensors { .. } | Moments::Tensors8 { .. }
        ) {
            let dev = self.device.clone();
            let pt = Tensor::from_slice(p, p.len(), &dev)?;
            let gt = Tensor::from_slice(g, g.len(), &dev)?;
            let pn = self.update_tensor(i, &pt, &gt, s)?;
            p.copy_from_slice(&pn.to_vec1::<f32>()?);
            return Ok(());
        }
        match &mut self.moments[i] {
            Moments::Plain { m, v } => update(p, g, m, v, s),
            Moments::EightBit { m, v } => update_blockwise8(p, g, m, v, s),
            Moments::Paged { m, v } => {
                let (m, v) = (*m, *v);
                let mut pager = self.pager();
                pager.store().for_each_chunk_mut(&[m, v], &mut |off, w| {
                    let [mw, vw] = w else {
                        unreachable!("two regions")
                    };
                    let n = mw.len();
                    update(&mut p[off..off + n], &g[off..off + n], mw, vw, s);
                    Ok(())
                })?;
            }
            Moments::Tensors { .. } | Moments::Tensors8 { .. } => {
                unreachable!("tensor moments are updated before this match")
            }
        }
        Ok(())
    }

    /// Update parameter `i` from flat f32 tensors `p` and `g` on the state's device with tensor
    /// ops; returns the new `p`. Host-held moments run the host update on copies.
    pub(crate) fn update_tensor(
        &mut self,
        i: usize,
        p: &Tensor,
        g: &Tensor,
        s: &StepScalars,
    ) -> Result<Tensor> {
        match &mut self.moments[i] {
            Moments::Tensors { m, v } => {
                let (pn, mn, vn) = update_tensors(p, g, m, v, s)?;
                (*m, *v) = (mn, vn);
                Ok(pn)
            }
            Moments::Tensors8 { m, v } => update_tensors_8bit(p, g, m, v, s),
            Moments::Paged { m, v } => {
                let (m, v) = (*m, *v);
                let mut pager = self.pager();
                let mut pieces = Vec::new();
                match &mut *pager {
                    Pager::Host(store) => {
                        store.for_each_chunk_mut(&[m, v], &mut |off, w| {
                            let [mw, vw] = w else {
                                unreachable!("two regions")
                            };
                            let n = mw.len();
                            let dev = p.device();
                            let (pn, mn, vn) = update_tensors(
                                &p.narrow(0, off, n)?,
                                &g.narrow(0, off, n)?,
                                &Tensor::from_slice(mw, n, dev)?,
                                &Tensor::from_slice(vw, n, dev)?,
                                s,
                            )?;
                            mw.copy_from_slice(&mn.to_vec1::<f32>()?);
                            vw.copy_from_slice(&vn.to_vec1::<f32>()?);
                            pieces.push(pn);
                            Ok(())
                        })?;
                    }
                    #[cfg(feature = "cuda")]
                    Pager::Device(store) => {
                        store.for_each_chunk_on_device(&[m, v], &mut |off, w| {
                            pieces.push(super::device_window::update_window(p, g, off, w, s)?);
                            Ok(())
                        })?;
                    }
                }
                if pieces.is_empty() {
                    return Ok(p.clone());
                }
                Tensor::cat(&pieces, 0)
            }
            Moments::Plain { .. } | Moments::EightBit { .. } => {
                let mut w = p.to_vec1::<f32>()?;
                let gv = g.to_vec1::<f32>()?;
                self.update(i, &mut w, &gv, s)?;
                Tensor::from_vec(w, p.elem_count(), p.device())
            }
        }
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
                let mut pager = self.pager();
                let store = pager.store();
                MomentValues::F32 {
                    m: store.read_region(*m)?,
                    v: store.read_region(*v)?,
                }
            }
            Moments::Tensors { m, v } => MomentValues::F32 {
                m: m.to_vec1()?,
                v: v.to_vec1()?,
            },
            Moments::Tensors8 { m, v } => MomentValues::EightBit {
                m: m.to_host()?,
                v: v.to_host()?,
            },
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
                let mut pager = self.pager();
                let store = pager.store();
                store.write_region(rm, &m)?;
                store.write_region(rv, &v)?;
            }
            Moments::Tensors { m, v } => {
                let (hm, hv) = f32_values(values);
                *m = Tensor::from_vec(hm, n, &self.device)?;
                *v = Tensor::from_vec(hv, n, &self.device)?;
            }
            Moments::Tensors8 { m, v } => {
                let (hm, hv) = match values {
                    MomentValues::EightBit { m, v } => (m, v),
                    MomentValues::F32 { m, v } => (
                        Blockwise8::quantize(&m, true),
                        Blockwise8::quantize(&v, false),
                    ),
                };
                *m = TensorBlockwise8::from_host(&hm, &self.device)?;
                *v = TensorBlockwise8::from_host(&hv, &self.device)?;
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
            Moments::Tensors { m, .. } => m.elem_count(),
            Moments::Tensors8 { m, .. } => m.len(),
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
                Moments::Tensors { m, v } => 4 * (m.elem_count() + v.elem_count()),
                Moments::Tensors8 { m, v } => m.bytes() + v.bytes(),
            })
            .sum()
    }

    /// Counters of the page store, if the state is paged.
    pub(crate) fn page_stats(&self) -> Option<PageStats> {
        self.store.as_ref().map(|_| self.pager().store().stats())
    }
}
