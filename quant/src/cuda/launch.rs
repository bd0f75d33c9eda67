//! Launching the NF4 kernels on a CUDA device from `Nf4MatMul::cuda_fwd`.
//!
//! A weight's codes and scales are uploaded once per device and cached (keyed by the weight's
//! `Arc`, dropped with it); the training-size path reuses one workspace per device and dtype.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorageSlice, DeviceId, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape};
use half::{bf16, f16};

use super::geometry::{
    dequantize_launch, gemv_launch, gemv_t_launch, workspace_rhs, Launch, GEMV_MAX_ROWS,
};
use super::ptx;
use crate::codebook::DYNAMIC8;
use crate::tensor::{Absmax, Nf4Tensor};

/// A weight's codes and scales in device memory, in the form the kernels read them.
struct DeviceWeight {
    packed: CudaSlice<u8>,
    code: CudaSlice<f32>,
    /// Plain f32 scales, or a 1-element placeholder when double-quantized.
    absmax: CudaSlice<f32>,
    /// 8-bit scale codes, or a 1-element placeholder when plain.
    qabsmax: CudaSlice<u8>,
    nested: CudaSlice<f32>,
    dynamic: CudaSlice<f32>,
    offset: f32,
    double_quant: i32,
}

impl DeviceWeight {
    /// Push the codes and quant state, in the order every kernel takes them (`packed, code,
    /// absmax, qabsmax, nested, dynamic, offset, double_quant`).
    fn push_state<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        b.arg(&self.packed);
        b.arg(&self.code);
        b.arg(&self.absmax);
        b.arg(&self.qabsmax);
        b.arg(&self.nested);
        b.arg(&self.dynamic);
        b.arg(&self.offset);
        b.arg(&self.double_quant);
    }

    fn upload(w: &Nf4Tensor, dev: &CudaDevice) -> Result<Self> {
        let stream = dev.cuda_stream();
        let (absmax, qabsmax, nested, offset, double_quant) = match w.absmax() {
            Absmax::Plain(a) => (a.clone(), vec![0u8], vec![0f32], 0f32, 0),
            Absmax::Double(d) => (
                vec![0f32],
                d.codes.clone(),
                d.nested_absmax.clone(),
                d.offset,
                1,
            ),
        };
        Ok(Self {
            packed: stream.clone_htod(w.packed()).w()?,
            code: stream.clone_htod(w.qtype().values().as_slice()).w()?,
            absmax: stream.clone_htod(absmax.as_slice()).w()?,
            qabsmax: stream.clone_htod(qabsmax.as_slice()).w()?,
            nested: stream.clone_htod(nested.as_slice()).w()?,
            dynamic: stream.clone_htod(DYNAMIC8.as_slice()).w()?,
            offset,
            double_quant,
        })
    }
}

type WeightKey = (usize, DeviceId);

/// Uploaded weights by host weight and device, each with a weak handle to its host weight.
type WeightCache = Mutex<HashMap<WeightKey, (Weak<Nf4Tensor>, Arc<DeviceWeight>)>>;

/// Uploaded weights, each with a weak handle so a dropped weight's entry is recognised.
fn weight_cache() -> &'static WeightCache {
    static CACHE: OnceLock<WeightCache> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

fn device_weight(w: &Arc<Nf4Tensor>, dev: &CudaDevice) -> Result<Arc<DeviceWeight>> {
    let key = (Arc::as_ptr(w) as usize, dev.id());
    let mut cache = weight_cache().lock().unwrap_or_else(|e| e.into_inner());
    if let Some((weak, dw)) = cache.get(&key) {
        // The address alone could be a new weight at a freed one's address.
        if weak.upgrade().is_some_and(|live| Arc::ptr_eq(&live, w)) {
            return Ok(dw.clone());
        }
    }
    cache.retain(|_, (weak, _)| weak.strong_count() > 0);
    let dw = Arc::new(DeviceWeight::upload(w, dev)?);
    cache.insert(key, (Arc::downgrade(w), dw.clone()));
    Ok(dw)
}

fn config(l: Launch) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (l.grid, 1, 1),
        block_dim: (l.block, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn to_u32(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| {
        candle_core::Error::Msg(format!(
            "nf4 cuda: {what} = {v} exceeds the kernels' 32-bit index"
        ))
    })
}

/// A float type the kernels are instantiated for, and its name suffix.
trait KernelDType: candle_core::cuda_backend::CudaDType + candle_core::WithDType + DeviceRepr {
    const SUFFIX: &'static str;
}
impl KernelDType for f32 {
    const SUFFIX: &'static str = "f32";
}
impl KernelDType for bf16 {
    const SUFFIX: &'static str = "bf16";
}
impl KernelDType for f16 {
    const SUFFIX: &'static str = "f16";
}

/// Expand all of `w` into `out` (at least `numel` long) with `nf4_dequantize_<T>`.
fn dequantize_into<T: KernelDType>(
    w: &Nf4Tensor,
    dw: &DeviceWeight,
    dev: &CudaDevice,
    out: &mut CudaSlice<T>,
) -> Result<()> {
    let numel = w.numel();
    let launch = dequantize_launch(numel).ok_or_else(|| {
        candle_core::Error::Msg(format!("nf4 cuda: {numel} elements is too many"))
    })?;
    let name = format!("nf4_dequantize_{}", T::SUFFIX);
    let func = dev.get_or_load_custom_func(&name, "qlora_nf4_dequantize", ptx::NF4_DEQUANTIZE)?;
    let numel = numel as u64;
    let blocksize = to_u32(w.blocksize(), "blocksize")?;
    let mut b = func.builder();
    dw.push_state(&mut b);
    b.arg(&numel);
    b.arg(&blocksize);
    b.arg(out);
    // SAFETY: argument order and types match `QLORA_DEQUANTIZE` in nf4_dequantize.cu; `out`
    // holds at least `numel` elements and the grid covers exactly `numel`.
    unsafe { b.launch(config(launch)) }.w()?;
    Ok(())
}

/// Dequantize `w` on `dev` into a new flat storage of `dtype` (f32, bf16 or f16).
pub fn dequantize_on_device(
    w: &Arc<Nf4Tensor>,
    dev: &CudaDevice,
    dtype: DType,
) -> Result<CudaStorage> {
    let dw = device_weight(w, dev)?;
    let n = w.numel();
    fn run<T: KernelDType>(
        w: &Nf4Tensor,
        dw: &DeviceWeight,
        dev: &CudaDevice,
        n: usize,
    ) -> Result<CudaStorage> {
        // SAFETY: every element is written by the kernel before anyone reads it.
        let mut out = unsafe { dev.alloc::<T>(n.max(1)) }?;
        dequantize_into(w, dw, dev, &mut out)?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    match dtype {
        DType::F32 => run::<f32>(w, &dw, dev, n),
        DType::BF16 => run::<bf16>(w, &dw, dev, n),
        DType::F16 => run::<f16>(w, &dw, dev, n),
        other => candle_core::bail!("nf4 cuda: cannot dequantize to {other:?} (f32, bf16, f16)"),
    }
}

/// `deq(W)` as a tensor of `dtype` and W's shape on the CUDA device `device`, by the kernel.
pub fn dequantize_tensor(
    w: &Arc<Nf4Tensor>,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<candle_core::Tensor> {
    let candle_core::Device::Cuda(dev) = device else {
        candle_core::bail!("nf4 cuda: dequantize_tensor needs a CUDA device, got {device:?}")
    };
    let storage = dequantize_on_device(w, dev, dtype)?;
    Ok(candle_core::Tensor::from_storage(
        candle_core::Storage::Cuda(storage),
        w.shape(),
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

/// One workspace per device and dtype for the training-size path, grown to the largest weight
/// seen. Reuse is safe without synchronisation: every use is ordered on the device's stream.
#[derive(Default)]
struct Workspaces {
    f32: Option<CudaSlice<f32>>,
    bf16: Option<CudaSlice<bf16>>,
    f16: Option<CudaSlice<f16>>,
}

fn workspaces() -> &'static Mutex<HashMap<DeviceId, Workspaces>> {
    static WS: OnceLock<Mutex<HashMap<DeviceId, Workspaces>>> = OnceLock::new();
    WS.get_or_init(Default::default)
}

trait WorkspaceSlot: KernelDType {
    fn slot(ws: &mut Workspaces) -> &mut Option<CudaSlice<Self>>;
    fn wrap(s: CudaSlice<Self>) -> CudaStorageSlice;
    fn unwrap_slice(s: CudaStorageSlice) -> Option<CudaSlice<Self>>;
}

macro_rules! workspace_slot {
    ($t:ty, $field:ident, $variant:ident) => {
        impl WorkspaceSlot for $t {
            fn slot(ws: &mut Workspaces) -> &mut Option<CudaSlice<Self>> {
                &mut ws.$field
            }
            fn wrap(s: CudaSlice<Self>) -> CudaStorageSlice {
                CudaStorageSlice::$variant(s)
            }
            fn unwrap_slice(s: CudaStorageSlice) -> Option<CudaSlice<Self>> {
                match s {
                    CudaStorageSlice::$variant(s) => Some(s),
                    _ => None,
                }
            }
        }
    };
}
workspace_slot!(f32, f32, F32);
workspace_slot!(bf16, bf16, BF16);
workspace_slot!(f16, f16, F16);

/// `m > 8`: dequantize W into the device's workspace, then one cuBLAS product through candle.
#[allow(clippy::too_many_arguments)]
fn matmul_via_workspace<T: WorkspaceSlot>(
    w: &Nf4Tensor,
    dw: &DeviceWeight,
    dev: &CudaDevice,
    input: &CudaStorage,
    start: usize,
    m: usize,
    transposed: bool,
) -> Result<CudaStorage> {
    let (n, k) = w.dims2().map_err(candle_core::Error::wrap)?;
    let numel = w.numel();
    let taken = {
        let mut all = workspaces().lock().unwrap_or_else(|e| e.into_inner());
        T::slot(all.entry(dev.id()).or_default()).take()
    };
    let mut ws = match taken {
        Some(ws) if ws.len() >= numel => ws,
        // SAFETY: the dequantize kernel below writes every element the product reads.
        _ => unsafe { dev.alloc::<T>(numel.max(1)) }?,
    };
    dequantize_into(w, dw, dev, &mut ws)?;
    let ws = CudaStorage {
        slice: T::wrap(ws),
        device: dev.clone(),
    };
    let ([inner, outer], strides) = workspace_rhs(n, k, transposed);
    let lhs_layout = Layout::contiguous_with_offset((m, inner), start);
    let rhs_layout = Layout::new(Shape::from((inner, outer)), strides.to_vec(), 0);
    let out = input.matmul(&ws, (1, m, outer, inner), &lhs_layout, &rhs_layout);
    if let Some(ws) = T::unwrap_slice(ws.slice) {
        let mut all = workspaces().lock().unwrap_or_else(|e| e.into_inner());
        *T::slot(all.entry(dev.id()).or_default()) = Some(ws);
    }
    out
}

/// `m <= 8`: one launch of `nf4_gemv_<T>` (forward) or `nf4_gemv_t_<T>` (transposed).
#[allow(clippy::too_many_arguments)]
fn gemv<T: KernelDType>(
    w: &Nf4Tensor,
    dw: &DeviceWeight,
    dev: &CudaDevice,
    input: &CudaSlice<T>,
    start: usize,
    m: usize,
    transposed: bool,
) -> Result<CudaStorage> {
    let (n, k) = w.dims2().map_err(candle_core::Error::wrap)?;
    let (inner, outer) = if transposed { (n, k) } else { (k, n) };
    let (launch, name) = if transposed {
        (gemv_t_launch(k), format!("nf4_gemv_t_{}", T::SUFFIX))
    } else {
        (gemv_launch(n), format!("nf4_gemv_{}", T::SUFFIX))
    };
    let launch =
        launch.ok_or_else(|| candle_core::Error::Msg("nf4 cuda: weight too large".into()))?;
    let func = dev.get_or_load_custom_func(&name, "qlora_nf4_gemv", ptx::NF4_GEMV)?;
    let x = input.slice(start..start + m * inner);
    // SAFETY: the kernel writes every one of the m × outer outputs.
    let mut y = unsafe { dev.alloc::<T>((m * outer).max(1)) }?;
    let (m32, n32, k32) = (to_u32(m, "m")?, to_u32(n, "n")?, to_u32(k, "k")?);
    let blocksize = to_u32(w.blocksize(), "blocksize")?;
    let mut b = func.builder();
    b.arg(&x);
    b.arg(&m32);
    dw.push_state(&mut b);
    b.arg(&n32);
    b.arg(&k32);
    b.arg(&blocksize);
    b.arg(&mut y);
    // SAFETY: argument order and types match `QLORA_GEMV` in nf4_gemv.cu; x holds m × inner
    // elements, y m × outer, and m <= QLORA_GEMV_MAX_ROWS.
    unsafe { b.launch(config(launch)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

/// The CUDA side of `Nf4MatMul`: `x[m, k] · deq(W)ᵀ`, or `dy[m, n] · deq(W)` when `transposed`,
/// for a contiguous input starting at element `start`. Output dtype = input dtype.
pub fn forward(
    w: &Arc<Nf4Tensor>,
    transposed: bool,
    input: &CudaStorage,
    start: usize,
    m: usize,
) -> Result<CudaStorage> {
    let dev = &input.device;
    let dw = device_weight(w, dev)?;
    let small = m <= GEMV_MAX_ROWS;
    match &input.slice {
        CudaStorageSlice::F32(x) if small => gemv(w, &dw, dev, x, start, m, transposed),
        CudaStorageSlice::BF16(x) if small => gemv(w, &dw, dev, x, start, m, transposed),
        CudaStorageSlice::F16(x) if small => gemv(w, &dw, dev, x, start, m, transposed),
        CudaStorageSlice::F32(_) => {
            matmul_via_workspace::<f32>(w, &dw, dev, input, start, m, transposed)
        }
        CudaStorageSlice::BF16(_) => {
            matmul_via_workspace::<bf16>(w, &dw, dev, input, start, m, transposed)
        }
        CudaStorageSlice::F16(_) => {
            matmul_via_workspace::<f16>(w, &dw, dev, input, start, m, transposed)
        }
        _ => candle_core::bail!(
            "nf4-matmul: activations must be f32, bf16 or f16, got {:?}",
            input.dtype()
        ),
    }
}
