//! AdamW with decoupled weight decay, f32 state whatever the parameter dtype, exactly the update
//! `torch.optim.AdamW` makes (bias corrections applied as torch does).

use candle_core::{DType, Result, Tensor, Var};

/// AdamW hyperparameters.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate (a schedule may change it per step).
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// One parameter with its optimizer state.
#[derive(Debug)]
pub struct ParamState {
    /// Name (PEFT key).
    pub name: String,
    /// The trainable variable.
    pub var: Var,
    /// First moment (f32).
    pub m: Tensor,
    /// Second moment (f32).
    pub v: Tensor,
    /// Multiplier on the learning rate for this parameter (LoRA+ uses it for B).
    pub lr_scale: f64,
}

/// AdamW over a list of variables.
#[derive(Debug)]
pub struct AdamW {
    /// Hyperparameters.
    pub cfg: AdamWConfig,
    /// Parameters and their moments.
    pub params: Vec<ParamState>,
    /// Steps taken.
    pub step: u64,
}

impl AdamW {
    /// Zero state for `vars`; `lr_scale(name)` gives per-parameter LR multipliers.
    pub fn new(
        vars: Vec<(String, Var)>,
        cfg: AdamWConfig,
        lr_scale: impl Fn(&str) -> f64,
    ) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let z = Tensor::zeros(var.dims(), DType::F32, var.device())?;
                Ok(ParamState {
                    lr_scale: lr_scale(&name),
                    name,
                    var,
                    m: z.clone(),
                    v: z,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg,
            params,
            step: 0,
        })
    }

    /// One update with learning rate `lr` and gradients `grads[i]` for `params[i]` (`None` =
    /// no gradient this step, parameter untouched as in torch).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        for (p, g) in self.params.iter_mut().zip(grads) {
            let Some(g) = g else { continue };
            let g = g.to_dtype(DType::F32)?;
            let lr = lr * p.lr_scale;
            let mut w = p.var.as_tensor().to_dtype(DType::F32)?;
            if c.weight_decay != 0.0 {
                w = (w * (1.0 - lr * c.weight_decay))?;
            }
            p.m = ((&p.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            p.v = ((&p.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((p.v.sqrt()? / bc2_sqrt)? + c.eps)?;
            let update = (p.m.div(&denom)? * (lr / bc1))?;
            let w = (w - update)?;
            p.var.set(&w.to_dtype(p.var.dtype())?)?;
        }
        Ok(())
    }
}
