//! The training step layer by layer, with optional activation checkpointing.
//!
//! Forward keeps only each decoder layer's input. Backward walks the layers in reverse: it
//! rebuilds a layer's graph (recomputing its forward when checkpointing, or reusing the graph it
//! kept otherwise), then back-propagates `Σ out ⊙ g` — whose gradient is exactly the upstream
//! gradient `g` pushed through the layer — giving that layer's adapter gradients and the gradient
//! of its input. Both modes run the same arithmetic, so their losses and gradients are
//! bit-identical; checkpointing only trades compute for memory.

use candle_core::{Result, Tensor, Var};

use super::loss::{chunked_cross_entropy, DEFAULT_CHUNK_ROWS};
use super::step::{shifted_rows, Batch};
use crate::model::llama::{attention_mask_windowed, rms_norm, Llama};

/// Loss of `batch` and the gradient of each of `vars`; `checkpointing` recomputes each layer in
/// the backward instead of keeping its activations.
pub fn loss_and_grads_layerwise(
    model: &Llama,
    batch: &Batch,
    vars: &[Var],
    checkpointing: bool,
) -> Result<(f64, Vec<Option<Tensor>>)> {
    let (b, t) = batch.ids.dims2()?;
    let pos = batch.positions_for(model)?;
    let span = batch.span();
    let mask = attention_mask_windowed(b, t, 0, &span, model.cfg.sliding_window, model.device())?
        .to_dtype(model.compute_dtype)?;
    let run_layer =
        |i: usize, x: &Tensor| model.layers[i].forward(x, &model.rope, &pos, &mask, None, true);

    // Forward: layer inputs always; whole graphs only without checkpointing.
    let mut inputs: Vec<Tensor> = vec![model.embed(&batch.ids)?.detach()];
    let mut kept: Vec<(Var, Tensor)> = Vec::new();
    for i in 0..model.layers.len() {
        let x = inputs[i].clone();
        if checkpointing {
            inputs.push(run_layer(i, &x)?.detach());
        } else {
            let xv = Var::from_tensor(&x)?;
            let out = run_layer(i, xv.as_tensor())?;
            inputs.push(out.detach());
            kept.push((xv, out));
        }
    }

    // Head: final norm and chunked cross-entropy, differentiated at the last hidden state.
    let top = Var::from_tensor(&inputs[model.layers.len()])?;
    let h = rms_norm(top.as_tensor(), &model.norm, model.cfg.rms_norm_eps)?;
    let targets = batch.shifted_targets()?;
    let loss = chunked_cross_entropy(
        &shifted_rows(&h)?,
        model.head(),
        &targets,
        DEFAULT_CHUNK_ROWS,
    )?;
    let loss_value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    let mut g = loss.backward()?.remove(top.as_tensor()).ok_or_else(|| {
        candle_core::Error::Msg("loss does not depend on the hidden states".into())
    })?;

    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    for i in (0..model.layers.len()).rev() {
        let (xv, out) = if checkpointing {
            let xv = Var::from_tensor(&inputs[i])?;
            let out = run_layer(i, xv.as_tensor())?;
            (xv, out)
        } else {
            kept.pop()
                .ok_or_else(|| candle_core::Error::Msg("missing kept layer graph".into()))?
        };
        let surrogate = (out * g.detach())?.sum_all()?;
        let mut store = surrogate.backward()?;
        for (slot, v) in grads.iter_mut().zip(vars) {
            if let Some(gv) = store.remove(v.as_tensor()) {
                *slot = Some(gv);
            }
        }
        g = store
            .remove(xv.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg(format!("layer {i}: no input gradient")))?;
    }
    Ok((loss_value, grads))
}
