//! LoRA on a token embedding (PEFT's `lora.Embedding`, loralib's `Embedding`):
//! `E[x] + scale · Aᵀ[x] · Bᵀ` with A `[r, vocab]` and B `[dim, r]`, no dropout (neither PEFT nor
//! loralib applies one to this path). New adapters start as PEFT's: A zeros, B `N(0, 1)`, so the
//! embedding is unchanged at step 0 and A is what learns first.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

/// The trainable low-rank update of a token embedding.
#[derive(Clone, Debug)]
pub struct EmbeddingAdapter {
    /// `[r, vocab]` (PEFT's `lora_embedding_A`).
    pub a: Var,
    /// `[dim, r]` (PEFT's `lora_embedding_B`).
    pub b: Var,
    /// `alpha / r` (or `alpha / √r` with rsLoRA).
    pub scale: f64,
}

/// PEFT's parameter names, in the order [`EmbeddingAdapter::parameters`] lists them.
pub const EMBEDDING_A: &str = "lora_embedding_A";
/// See [`EMBEDDING_A`].
pub const EMBEDDING_B: &str = "lora_embedding_B";

impl EmbeddingAdapter {
    /// A new adapter of rank `r` for a `[vocab, dim]` table, as PEFT initialises one.
    pub fn new(
        r: usize,
        (vocab, dim): (usize, usize),
        scale: f64,
        dtype: DType,
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<Self> {
        let b: Vec<f32> = (0..dim * r).map(|_| StandardNormal.sample(rng)).collect();
        Ok(Self {
            a: Var::from_tensor(&Tensor::zeros((r, vocab), dtype, device)?)?,
            b: Var::from_tensor(&Tensor::from_vec(b, (dim, r), device)?.to_dtype(dtype)?)?,
            scale,
        })
    }

    /// Rank.
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// The update of the rows `ids` (flat, u32): `[n, dim]` in `dtype`, differentiable in A and
    /// B.
    pub fn delta(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        let rows = self
            .a
            .as_tensor()
            .to_dtype(dtype)?
            .t()?
            .contiguous()?
            .index_select(ids, 0)?;
        rows.matmul(&self.b.as_tensor().to_dtype(dtype)?.t()?)? * self.scale
    }

    /// The whole update `scale · (B·A)ᵀ` `[vocab, dim]` in f32, for merging.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let a = self.a.as_tensor().to_dtype(DType::F32)?;
        let b = self.b.as_tensor().to_dtype(DType::F32)?;
        (b.matmul(&a)?.t()? * self.scale)?.contiguous()
    }

    /// The trainable tensors under PEFT's names.
    pub fn parameters(&self) -> [(&'static str, &Var); 2] {
        [(EMBEDDING_A, &self.a), (EMBEDDING_B, &self.b)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn delta_rows_are_rows_of_the_merged_update() {
        let dev = Device::Cpu;
        let mut rng = StdRng::seed_from_u64(1);
        let mut ad = EmbeddingAdapter::new(3, (10, 4), 2.0, DType::F32, &mut rng, &dev).unwrap();
        // PEFT's init leaves the embedding as it was.
        let ids = Tensor::new(&[7u32, 0, 7, 3], &dev).unwrap();
        let zero = ad.delta(&ids, DType::F32).unwrap();
        assert_eq!(
            zero.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        ad.a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 10), &dev).unwrap()).unwrap();
        let rows = ad.delta(&ids, DType::F32).unwrap();
        let full = ad.delta_weight().unwrap().index_select(&ids, 0).unwrap();
        let d = (rows - full).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
