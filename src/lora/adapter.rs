//! One LoRA adapter on one linear layer: `y += scale · (dropout(x) · Aᵀ) · Bᵀ`, optionally DoRA.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Result, Tensor, Var, D};

use super::dropout::HashDropout;
use super::fused::FusedLoraLinear;
use crate::frozen::BaseWeight;

/// The seed of the current dropout draw, shared by all adapters of a model.
///
/// Dropout masks are a pure function of (this seed, the adapter's key), not of a hidden RNG
/// stream, so activation checkpointing can recompute a layer with exactly the masks the first
/// forward used, and a resumed run draws the same masks as an uninterrupted one.
#[derive(Clone, Debug, Default)]
pub struct DropoutSeed(Arc<AtomicU64>);

impl DropoutSeed {
    /// Set the seed for the next forward passes.
    pub fn set(&self, seed: u64) {
        self.0.store(seed, Ordering::Relaxed);
    }
    /// The current seed.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Dropout with probability `p` at site `key` for the current seed: the same mask every
    /// time within one seed (so a recomputed forward drops what the first one dropped).
    pub fn dropout(&self, p: f32, key: u64) -> Result<HashDropout> {
        let seed = self.get().wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ key.wrapping_mul(0xD1B5_4A32_D192_ED03);
        HashDropout::new(p, seed)
    }
}

/// The trainable low-rank update of one projection.
///
/// A is `[r, in]`, B is `[out, r]` (PEFT's layout). They are stored in the adapter dtype (bf16 by
/// default) and cast to the compute dtype inside the forward, so gradients flow back to them.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    /// Down projection `[r, in]`.
    pub a: Var,
    /// Up projection `[out, r]`.
    pub b: Var,
    /// `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub scale: f64,
    /// Dropout probability on the adapter's input, applied in training only.
    pub dropout: f32,
    /// DoRA magnitude vector `[out]`; `None` for plain LoRA.
    pub magnitude: Option<Var>,
    /// AdaLoRA's singular values `[r, 1]` (`lora_E`): the update is `B · (A ⊙ E)`, A and B the
    /// singular vectors; `None` for LoRA.
    pub e: Option<Var>,
    /// Distinguishes this adapter's dropout masks from the others'.
    pub dropout_key: u64,
    /// Shared dropout seed (see [`DropoutSeed`]).
    pub dropout_seed: DropoutSeed,
}

impl LoraAdapter {
    /// Rank.
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// `(out, in)` of the layer this adapter fits.
    pub fn shape(&self) -> (usize, usize) {
        (self.b.dims()[0], self.a.dims()[1])
    }

    /// The down projection as the update uses it: A, or AdaLoRA's `A ⊙ E` (differentiable in
    /// both).
    pub fn effective_a(&self) -> Result<Tensor> {
        match &self.e {
            None => Ok(self.a.as_tensor().clone()),
            Some(e) => self
                .a
                .as_tensor()
                .broadcast_mul(&e.as_tensor().to_dtype(self.a.dtype())?),
        }
    }

    /// The low-rank term `scale · (dropout(x) · Aᵀ) · Bᵀ` in `x`'s dtype; `x` is `[m, in]`.
    pub fn delta(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let dt = x.dtype();
        let x = if train && self.dropout > 0.0 {
            self.apply_dropout(x)?
        } else {
            x.clone()
        };
        let a = self.effective_a()?.to_dtype(dt)?;
        let b = self.b.as_tensor().to_dtype(dt)?;
        // The scale goes on the rank-r intermediate ([m, r]), not on the [m, out] result.
        (x.matmul(&a.t()?)? * self.scale)?.matmul(&b.t()?)
    }

    /// Inverted dropout with a mask that is a function of (shared seed, this adapter's key,
    /// element index) only.
    fn apply_dropout(&self, x: &Tensor) -> Result<Tensor> {
        self.dropout_mask()?.forward(x)
    }

    /// The dropout of the current seed.
    pub(crate) fn dropout_mask(&self) -> Result<HashDropout> {
        self.dropout_seed.dropout(self.dropout, self.dropout_key)
    }

    /// `x · W0ᵀ + delta(x)` as one fused op (see [`FusedLoraLinear`]), when it applies: plain
    /// LoRA, f32 `x` on the CPU. `None` means: compute `base + delta` from the pieces.
    pub fn fused_output(
        &self,
        base: &BaseWeight,
        x: &Tensor,
        train: bool,
    ) -> Result<Option<Tensor>> {
        if self.magnitude.is_some() {
            return Ok(None);
        }
        let dropout = if train && self.dropout > 0.0 {
            Some(self.dropout_mask()?)
        } else {
            None
        };
        match FusedLoraLinear::new(base, x, self.scale, dropout) {
            Some(op) => op
                .forward(x, &self.effective_a()?, self.b.as_tensor())
                .map(Some),
            None => Ok(None),
        }
    }

    /// `scale · B · A` as an `[out, in]` f32 tensor (for merging).
    pub fn delta_weight(&self) -> Result<Tensor> {
        let a = self.effective_a()?.to_dtype(DType::F32)?;
        let b = self.b.as_tensor().to_dtype(DType::F32)?;
        b.matmul(&a)? * self.scale
    }

    /// Every trainable tensor of this adapter, with its PEFT suffix (`lora_A.weight`, ...).
    pub fn parameters(&self) -> Vec<(&'static str, &Var)> {
        // AdaLoRA's are parameters of their own in PEFT, saved without `.weight`.
        if let Some(e) = &self.e {
            return vec![("lora_A", &self.a), ("lora_E", e), ("lora_B", &self.b)];
        }
        let mut p = vec![("lora_A.weight", &self.a), ("lora_B.weight", &self.b)];
        if let Some(m) = &self.magnitude {
            p.push(("lora_magnitude_vector", m));
        }
        p
    }

    /// DoRA output given the base product without bias, the row norms of `W0` squared, and a
    /// function computing `A · W0ᵀ` (`[r, out]`, through the fused 4-bit kernel for NF4 bases).
    ///
    /// `y = base + (m / ‖W0 + sBA‖ - 1) · base + (m / ‖W0 + sBA‖) · s (xAᵀ)Bᵀ`; the norm is
    /// detached as in the DoRA paper (§4.3) and PEFT. It is computed without materializing
    /// `W0 + sBA`: `‖w_i‖² = ‖W0_i‖² + 2s·B_i·(W0 Aᵀ)_i + s²·B_i (A Aᵀ) B_iᵀ`.
    pub fn dora_output(
        &self,
        x: &Tensor,
        base: &Tensor,
        w0_row_sq: &Tensor,
        a_w0t: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let Some(mag) = &self.magnitude else {
            candle_core::bail!("dora_output called on an adapter without a magnitude vector")
        };
        let dt = x.dtype();
        let norm = self.weight_row_norms(w0_row_sq, a_w0t)?.detach();
        let ratio = mag
            .as_tensor()
            .to_dtype(DType::F32)?
            .div(&norm)?
            .to_dtype(dt)?;
        let delta = self.delta(x, train)?;
        let scaled_base = base.broadcast_mul(&(ratio.clone() - 1.0)?)?;
        base + scaled_base + delta.broadcast_mul(&ratio)?
    }

    /// `‖W0 + sBA‖` per output row, in f32, from the pieces described in [`Self::dora_output`].
    pub fn weight_row_norms(&self, w0_row_sq: &Tensor, a_w0t: &Tensor) -> Result<Tensor> {
        let a = self.a.as_tensor().to_dtype(DType::F32)?;
        let b = self.b.as_tensor().to_dtype(DType::F32)?;
        let s = self.scale;
        // cross_i = Σ_r B[i, r] · (A W0ᵀ)[r, i]
        let cross = (b.clone() * a_w0t.to_dtype(DType::F32)?.t()?)?.sum(D::Minus1)?;
        let aat = a.matmul(&a.t()?)?;
        let ba_sq = (b.matmul(&aat)? * &b)?.sum(D::Minus1)?;
        let sq = ((w0_row_sq.to_dtype(DType::F32)? + (cross * (2.0 * s))?)? + (ba_sq * (s * s))?)?;
        sq.relu()?.sqrt()
    }
}
