//! The training step layer by layer, with optional activation checkpointing.
//!
//! Llama-family models with f32 compute and plain LoRA on every projection take the
//! hand-written step of [`super::llama_step`]; every other model takes candle's graph, one
//! layer at a time. Forward keeps only each layer's input, or, for a layer not recomputed, its
//! whole graph (tape). Backward walks the layers in reverse: it rebuilds a layer's graph
//! (recomputing its forward when checkpointing, or reusing the one it kept), then
//! back-propagates `Σ out ⊙ g`, whose gradient is exactly the upstream gradient `g` pushed
//! through the layer, giving that layer's adapter gradients and the gradient of its input, and
//! frees it. Every mode runs the same arithmetic, so losses and gradients are bit-identical;
//! checkpointing only trades compute for memory. Between all and nothing, checkpointing can
//! keep the graphs of the top `keep_layers` layers (torchtune's and Megatron's selective
//! recompute, by layer count): each kept layer costs one layer graph of memory and saves its
//! recompute. The top layers are the ones kept because the backward reaches them first, so
//! their graphs are freed before any recompute starts.

use candle_core::{Result, Tensor, Var};

use super::step::{head_loss, Batch};
use crate::model::transformer::Model;

/// Which decoder layers a training step recomputes in the backward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Checkpointing {
    /// Recompute layers instead of keeping their graphs.
    pub enabled: bool,
    /// With `enabled`: keep the graphs of this many top layers anyway.
    pub keep_layers: usize,
}

impl Checkpointing {
    /// Every layer recomputed (`true`) or every layer's graph kept (`false`).
    pub fn all(enabled: bool) -> Self {
        Self {
            enabled,
            keep_layers: 0,
        }
    }

    /// Whether layer `i` of `n_layers` is recomputed.
    pub fn recomputes(&self, i: usize, n_layers: usize) -> bool {
        self.enabled && i + self.keep_layers < n_layers
    }

    /// How many of `n_layers` keep their whole graph through the forward.
    pub fn kept_graphs(&self, n_layers: usize) -> usize {
        if self.enabled {
            self.keep_layers.min(n_layers)
        } else {
            n_layers
        }
    }
}

/// The `--keep-layers` option: a count, or `auto` (as many as a memory limit allows, resolved
/// against the memory plan by the command that has both).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepLayers {
    /// Keep this many top layers' graphs.
    Count(usize),
    /// The most layers whose graphs fit the memory limit.
    Auto,
}

impl Default for KeepLayers {
    fn default() -> Self {
        Self::Count(0)
    }
}

impl KeepLayers {
    /// `auto` or a layer count.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            n => n
                .parse()
                .map(Self::Count)
                .map_err(|_| format!("`{s}`: expected a number of layers or `auto`")),
        }
    }

    /// The count, with `Auto` not yet resolved counting as 0 (every layer recomputed).
    pub fn count(self) -> usize {
        match self {
            Self::Count(n) => n,
            Self::Auto => 0,
        }
    }
}

impl<'de> serde::Deserialize<'de> for KeepLayers {
    /// A TOML integer or the string `"auto"`.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(usize),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(n) => Ok(Self::Count(n)),
            Raw::Text(t) => Self::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

impl std::fmt::Display for Checkpointing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.enabled, self.keep_layers) {
            (false, _) => write!(f, "off"),
            (true, 0) => write!(f, "on"),
            (true, 1) => write!(f, "on, top layer kept"),
            (true, n) => write!(f, "on, top {n} layers kept"),
        }
    }
}

impl From<bool> for Checkpointing {
    fn from(enabled: bool) -> Self {
        Self::all(enabled)
    }
}

/// Loss of `batch` and the gradient of each of `vars`; `checkpointing` says which layers are
/// recomputed in the backward instead of keeping their activations.
pub fn loss_and_grads_layerwise(
    model: &Model,
    batch: &Batch,
    vars: &[Var],
    checkpointing: Checkpointing,
) -> Result<(f64, Vec<Option<Tensor>>)> {
    let pos = batch.positions_for(model)?;
    let ctx = model.context(&batch.ids, &pos, &batch.span_for(model), 0)?;
    if let Some(layers) = super::llama_step::host_layers(model, &ctx, true)? {
        return host_step(model, batch, vars, checkpointing, &pos, &layers);
    }
    graph_step(model, batch, vars, checkpointing, &pos, &ctx)
}

/// [`loss_and_grads_layerwise`] through candle's graph, whatever the model (the reference
/// of the hand-written Llama-family step, and the path of every other configuration).
pub fn loss_and_grads_graph(
    model: &Model,
    batch: &Batch,
    vars: &[Var],
    checkpointing: Checkpointing,
) -> Result<(f64, Vec<Option<Tensor>>)> {
    let pos = batch.positions_for(model)?;
    let ctx = model.context(&batch.ids, &pos, &batch.span_for(model), 0)?;
    graph_step(model, batch, vars, checkpointing, &pos, &ctx)
}

fn graph_step(
    model: &Model,
    batch: &Batch,
    vars: &[Var],
    checkpointing: Checkpointing,
    pos: &Tensor,
    ctx: &crate::model::transformer::LayerContext,
) -> Result<(f64, Vec<Option<Tensor>>)> {
    let run_layer = |i: usize, x: &Tensor| model.layer(i, x, ctx, None, true);

    // Forward: layer inputs always; whole graphs of the layers not recomputed, each from a
    // variable holding its input, so that a layer's graph is freed once its backward is done.
    let n_layers = model.num_layers();
    let mut inputs: Vec<Tensor> = vec![model.embed(&batch.ids, pos, None, true)?.detach()];
    let mut kept: Vec<Option<(Var, Tensor)>> = vec![None; n_layers];
    for (i, slot) in kept.iter_mut().enumerate() {
        let x = inputs[i].clone();
        if checkpointing.recomputes(i, n_layers) {
            inputs.push(run_layer(i, &x)?.detach());
        } else {
            let xv = Var::from_tensor(&x)?;
            let out = run_layer(i, xv.as_tensor())?;
            inputs.push(out.detach());
            *slot = Some((xv, out));
        }
    }

    let (loss_value, mut g, mut grads, _head_graph) = head(model, batch, vars, &inputs[n_layers])?;
    for i in (0..n_layers).rev() {
        let (xv, out) = match kept[i].take() {
            Some(graph) => graph,
            None => {
                let xv = Var::from_tensor(&inputs[i])?;
                let out = run_layer(i, xv.as_tensor())?;
                (xv, out)
            }
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
    embedding_grads(model, batch, vars, pos, &g, &mut grads)?;
    Ok((loss_value, grads))
}

/// The loss of the last hidden state `top` and its gradient, with the gradients the head's
/// own parameters (a classifier, an adapter on the head or BERT's pooler) got.
fn head(
    model: &Model,
    batch: &Batch,
    vars: &[Var],
    top: &Tensor,
) -> Result<(f64, Tensor, Vec<Option<Tensor>>, HeadGraph)> {
    let top = Var::from_tensor(top)?;
    let timed = crate::profile::part(crate::profile::Part::LossHead);
    let h = model.finish(top.as_tensor())?;
    let loss = head_loss(model, &h, batch, true)?;
    let loss_value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    let mut head_store = loss.backward()?;
    drop(timed);
    let g = head_store.remove(top.as_tensor()).ok_or_else(|| {
        candle_core::Error::Msg("loss does not depend on the hidden states".into())
    })?;
    let grads = vars
        .iter()
        .map(|v| head_store.remove(v.as_tensor()))
        .collect();
    Ok((loss_value, g, grads, HeadGraph(loss, head_store)))
}

/// The loss's graph and what its backward left: the graph path holds them until the step ends
/// (the plan's backward terms for GPT-2 and BERT were fitted with them alive); the hand-written
/// path drops them at once.
struct HeadGraph(
    #[allow(dead_code)] Tensor,
    #[allow(dead_code)] candle_core::backprop::GradStore,
);

/// An adapter on the token embedding: its update enters the first hidden state, whose
/// gradient is `g`.
fn embedding_grads(
    model: &Model,
    batch: &Batch,
    vars: &[Var],
    pos: &Tensor,
    g: &Tensor,
    grads: &mut [Option<Tensor>],
) -> Result<()> {
    if model.token_embedding().adapter.is_some() {
        let e = model.embed(&batch.ids, pos, None, true)?;
        let mut store = (e * g.detach())?.sum_all()?.backward()?;
        for (slot, v) in grads.iter_mut().zip(vars) {
            if let Some(gv) = store.remove(v.as_tensor()) {
                *slot = Some(gv);
            }
        }
    }
    Ok(())
}

/// [`loss_and_grads_layerwise`] through the hand-written layers of [`super::llama_step`]:
/// kept layers hold their tapes from the forward, recomputed layers their input only.
fn host_step(
    model: &Model,
    batch: &Batch,
    vars: &[Var],
    checkpointing: Checkpointing,
    pos: &Tensor,
    layers: &[super::llama_step::HostLayer],
) -> Result<(f64, Vec<Option<Tensor>>)> {
    let n = layers.len();
    let emb = model.embed(&batch.ids, pos, None, true)?.detach();
    let (dims, device) = (emb.dims().to_vec(), emb.device().clone());
    let mut x: Vec<f32> = emb.flatten_all()?.to_vec1()?;
    drop(emb);
    let mut inputs: Vec<Option<Vec<f32>>> = (0..n).map(|_| None).collect();
    let mut tapes: Vec<Option<super::llama_step::Tape>> = (0..n).map(|_| None).collect();
    for (i, layer) in layers.iter().enumerate() {
        let (out, tape) = layer.forward(x)?;
        if checkpointing.recomputes(i, n) {
            inputs[i] = Some(tape.x);
        } else {
            tapes[i] = Some(tape);
        }
        x = out;
    }
    let top = Tensor::from_vec(x, dims.as_slice(), &device)?;
    let (loss_value, g, mut grads, head_graph) = head(model, batch, vars, &top)?;
    drop((top, head_graph));
    let mut dy: Vec<f32> = g.flatten_all()?.to_vec1()?;
    let mut host_grads = super::llama_step::Grads::default();
    for i in (0..n).rev() {
        let tape = match (tapes[i].take(), inputs[i].take()) {
            (Some(t), _) => t,
            (None, Some(x)) => layers[i].forward(x)?.1,
            (None, None) => candle_core::bail!("layer {i}: neither a tape nor an input"),
        };
        dy = layers[i].backward(tape, dy, &mut host_grads)?;
    }
    for (slot, v) in grads.iter_mut().zip(vars) {
        if let Some(gv) = host_grads.take(v) {
            *slot = Some(gv);
        }
    }
    let g = Tensor::from_vec(dy, dims.as_slice(), &device)?;
    embedding_grads(model, batch, vars, pos, &g, &mut grads)?;
    Ok((loss_value, grads))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_layers_reads_a_count_or_auto_from_flags_and_toml() {
        assert_eq!(KeepLayers::parse("12"), Ok(KeepLayers::Count(12)));
        assert_eq!(KeepLayers::parse("auto"), Ok(KeepLayers::Auto));
        let err = KeepLayers::parse("lots").unwrap_err();
        assert!(
            err.contains("`lots`: expected a number of layers or `auto`"),
            "{err}"
        );
        #[derive(serde::Deserialize)]
        struct Opts {
            k: KeepLayers,
        }
        let read = |text: &str| toml::from_str::<Opts>(text).map(|o| o.k);
        assert_eq!(read("k = 3").unwrap(), KeepLayers::Count(3));
        assert_eq!(read("k = \"auto\"").unwrap(), KeepLayers::Auto);
        assert!(read("k = \"most\"").is_err());
        assert!(read("k = -1").is_err());
    }

    #[test]
    fn the_top_layers_are_the_kept_ones() {
        let c = Checkpointing {
            enabled: true,
            keep_layers: 2,
        };
        let recomputed: Vec<bool> = (0..5).map(|i| c.recomputes(i, 5)).collect();
        assert_eq!(recomputed, [true, true, true, false, false]);
        assert_eq!(c.kept_graphs(5), 2);
        assert_eq!(c.kept_graphs(1), 1);
        assert!(!(0..5).any(|i| Checkpointing::all(false).recomputes(i, 5)));
        assert_eq!(Checkpointing::all(false).kept_graphs(5), 5);
        assert_eq!(c.to_string(), "on, top 2 layers kept");
    }
}
