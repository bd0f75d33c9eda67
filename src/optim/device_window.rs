//! One window of paged optimizer state in CUDA device frames, updated with the tensor rule.
//!
//! [`CudaPageStore`](super::cuda_page_store::CudaPageStore) hands out each window of the moments
//! as views of its device frames; the window is copied into tensors (device to device), updated
//! by [`update_tensors`], and the new moments copied back into the frames. Compiled with the
//! `cuda` feature; it has not run on a GPU yet.

use candle_core::cuda_backend::cudarc::driver::CudaViewMut;
use candle_core::cuda_backend::WrapErr;
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaStorage, Result, Storage, Tensor};

use super::tensor_update::update_tensors;
use super::update::StepScalars;

/// A tensor holding a copy of `view` on `p`'s device.
fn tensor_of(view: &CudaViewMut<'_, f32>, like: &Tensor) -> Result<Tensor> {
    let dev = like.device().as_cuda_device()?;
    let copy = dev.cuda_stream().clone_dtod(view).w()?;
    let n = copy.len();
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(copy, dev.clone()));
    Ok(Tensor::from_storage(storage, n, BackpropOp::none(), false))
}

/// Copy contiguous f32 tensor `t` into `view`.
fn copy_into(t: &Tensor, view: &mut CudaViewMut<'_, f32>) -> Result<()> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        bail!("paged optimizer window: expected a CUDA tensor");
    };
    let start = layout.start_offset();
    let src = cs.as_cuda_slice::<f32>()?;
    let src = src.slice(start..start + t.elem_count());
    cs.device.cuda_stream().memcpy_dtod(&src, view).w()?;
    Ok(())
}

/// Update the window at element `off` of flat `p` / `g` whose moments are `w = [m, v]`; writes
/// the new moments into the frames and returns the window's new parameters.
pub(super) fn update_window(
    p: &Tensor,
    g: &Tensor,
    off: usize,
    w: &mut [CudaViewMut<'_, f32>],
    s: &StepScalars,
) -> Result<Tensor> {
    let [mw, vw] = w else {
        bail!("paged optimizer window: expected two regions (m, v)");
    };
    let n = mw.len();
    let (pn, mn, vn) = update_tensors(
        &p.narrow(0, off, n)?.contiguous()?,
        &g.narrow(0, off, n)?.contiguous()?,
        &tensor_of(mw, p)?,
        &tensor_of(vw, p)?,
        s,
    )?;
    copy_into(&mn.contiguous()?, mw)?;
    copy_into(&vn.contiguous()?, vw)?;
    Ok(pn)
}
