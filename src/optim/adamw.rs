//! AdamW with decoupled weight decay, f32 arithmetic whatever the parameter dtype, exactly the
//! update `torch.optim.AdamW(foreach=False)` makes on CPU. The moments live in plain memory, in a
//! paged store under a resident budget (QLoRA's paged optimizers), or in 8-bit blockwise codes
//! (bitsandbytes' 8-bit Adam); the update itself is plain Rust over f32 slices (`update`).

use std::collections::HashMap;

use candle_core::{bail, DType, Device, Result, Tensor, Var};

use super::blockwise8::Blockwise8;
use super::page_store::PageStats;
use super::state::{MomentValues, OptimState, StateStorage, UpdateEngine};
use super::update::StepScalars;

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

/// One trainable parameter.
#[derive(Debug)]
pub struct ParamState {
    /// Name (PEFT key).
    pub name: String,
    /// The trainable variable.
    pub var: Var,
    /// Multiplier on the learning rate for this parameter (LoRA+ uses it for B).
    pub lr_scale: f64,
}

/// AdamW over a list of variables.
#[derive(Debug)]
pub struct AdamW {
    /// Hyperparameters.
    pub cfg: AdamWConfig,
    /// Parameters, in the order `step` expects their gradients.
    pub params: Vec<ParamState>,
    /// Steps taken.
    pub step: u64,
    storage: StateStorage,
    engine: UpdateEngine,
    state: OptimState,
}

impl AdamW {
    /// Zero plain f32 state for `vars`; `lr_scale(name)` gives per-parameter LR multipliers.
    pub fn new(
        vars: Vec<(String, Var)>,
        cfg: AdamWConfig,
        lr_scale: impl Fn(&str) -> f64,
    ) -> Result<Self> {
        Self::with_storage(vars, cfg, lr_scale, StateStorage::Plain)
    }

    /// Zero state for `vars`, kept as `storage` says, updated where the parameters live (the
    /// host update for CPU parameters, tensor ops on the device otherwise).
    pub fn with_storage(
        vars: Vec<(String, Var)>,
        cfg: AdamWConfig,
        lr_scale: impl Fn(&str) -> f64,
        storage: StateStorage,
    ) -> Result<Self> {
        let engine = vars.first().map_or(UpdateEngine::Host, |(_, v)| {
            UpdateEngine::for_device(v.device())
        });
        Self::with_engine(vars, cfg, lr_scale, storage, engine)
    }

    /// Zero state for `vars`, kept as `storage` says and updated by `engine` (tests run the
    /// tensor engine on CPU parameters to compare it with the host one).
    pub fn with_engine(
        vars: Vec<(String, Var)>,
        cfg: AdamWConfig,
        lr_scale: impl Fn(&str) -> f64,
        storage: StateStorage,
        engine: UpdateEngine,
    ) -> Result<Self> {
        let device = vars
            .first()
            .map_or(Device::Cpu, |(_, v)| v.device().clone());
        if let Some((name, _)) = vars.iter().find(|(_, v)| !v.device().same_device(&device)) {
            bail!("AdamW: parameter `{name}` is on another device than the first parameter");
        }
        let sizes: Vec<usize> = vars.iter().map(|(_, v)| v.elem_count()).collect();
        let state = OptimState::new(&storage, &sizes, engine, &device)?;
        let params = vars
            .into_iter()
            .map(|(name, var)| ParamState {
                lr_scale: lr_scale(&name),
                name,
                var,
            })
            .collect();
        Ok(Self {
            cfg,
            params,
            step: 0,
            storage,
            engine,
            state,
        })
    }

    /// One update with learning rate `lr` and gradients `grads[i]` for `params[i]` (`None` =
    /// no gradient this step, parameter and its moments untouched as in torch; the step count,
    /// and so the bias correction, is shared by all parameters).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        let _timed = crate::profile::part(crate::profile::Part::Optimizer);
        if grads.len() != self.params.len() {
            bail!(
                "AdamW::step got {} gradients for {} parameters",
                grads.len(),
                self.params.len()
            );
        }
        self.step += 1;
        for (i, (p, g)) in self.params.iter().zip(grads).enumerate() {
            let Some(g) = g else { continue };
            let s = StepScalars::new(&self.cfg, lr * p.lr_scale, self.step);
            if self.engine == UpdateEngine::Tensors {
                let g = g.to_dtype(DType::F32)?.flatten_all()?;
                let w = p.var.as_tensor().to_dtype(DType::F32)?.flatten_all()?;
                if g.elem_count() != w.elem_count() {
                    bail!(
                        "gradient of `{}` has {} values, the parameter {}",
                        p.name,
                        g.elem_count(),
                        w.elem_count()
                    );
                }
                let w = self
                    .state
                    .update_tensor(i, &w, &g.to_device(w.device())?, &s)?;
                p.var
                    .set(&w.reshape(p.var.shape())?.to_dtype(p.var.dtype())?)?;
                continue;
            }
            let g = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let mut w = p
                .var
                .as_tensor()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            if g.len() != w.len() {
                bail!(
                    "gradient of `{}` has {} values, the parameter {}",
                    p.name,
                    g.len(),
                    w.len()
                );
            }
            self.state.update(i, &mut w, &g, &s)?;
            let w = Tensor::from_vec(w, p.var.shape(), &Device::Cpu)?
                .to_device(p.var.device())?
                .to_dtype(p.var.dtype())?;
            p.var.set(&w)?;
        }
        Ok(())
    }

    /// How the moments are stored.
    pub fn storage(&self) -> &StateStorage {
        &self.storage
    }

    /// Where the update runs.
    pub fn engine(&self) -> UpdateEngine {
        self.engine
    }

    /// Bytes of optimizer state, wherever it is (for paged state most is on disk: see
    /// [`AdamW::page_stats`] for what is resident).
    pub fn state_bytes(&self) -> usize {
        self.state.bytes()
    }

    /// Paging counters, if the state is paged.
    pub fn page_stats(&self) -> Option<PageStats> {
        self.state.page_stats()
    }

    /// The full state as named CPU tensors, for checkpoints: `step` (i64 scalar), and per
    /// parameter `<name>.exp_avg` / `<name>.exp_avg_sq` (f32, the parameter's shape), or for
    /// 8-bit state bitsandbytes' `<name>.state1` / `.state2` (u8 codes, the parameter's shape)
    /// with `<name>.absmax1` / `.absmax2` (f32, one per 256 values).
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let cpu = Device::Cpu;
        let mut out = vec![("step".to_string(), Tensor::new(self.step as i64, &cpu)?)];
        for (i, p) in self.params.iter().enumerate() {
            let shape = p.var.shape();
            match self.state.values(i)? {
                MomentValues::F32 { m, v } => {
                    out.push((
                        format!("{}.exp_avg", p.name),
                        Tensor::from_vec(m, shape, &cpu)?,
                    ));
                    out.push((
                        format!("{}.exp_avg_sq", p.name),
                        Tensor::from_vec(v, shape, &cpu)?,
                    ));
                }
                MomentValues::EightBit { m, v } => {
                    for (k, q) in [(1, m), (2, v)] {
                        let blocks = q.absmax.len();
                        out.push((
                            format!("{}.state{k}", p.name),
                            Tensor::from_vec(q.codes, shape, &cpu)?,
                        ));
                        out.push((
                            format!("{}.absmax{k}", p.name),
                            Tensor::from_vec(q.absmax, blocks, &cpu)?,
                        ));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Restore what [`AdamW::state_tensors`] gave (extra names are ignored). f32 moments load
    /// into 8-bit state by quantizing and 8-bit moments into f32 state by dequantizing, so a
    /// run may change its storage on resume; same storage resumes bit-identically.
    pub fn load_state_tensors(
        &mut self,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
    ) -> Result<()> {
        let t: HashMap<String, Tensor> = tensors.into_iter().collect();
        let get = |key: &str| {
            t.get(key)
                .ok_or_else(|| candle_core::Error::Msg(format!("optimizer state has no `{key}`")))
        };
        let step = get("step")?
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1::<i64>()?;
        let &[step] = step.as_slice() else {
            bail!(
                "optimizer state `step` has {} values, expected 1",
                step.len()
            );
        };
        let mut loaded = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let f32s = |key: String| -> Result<Vec<f32>> {
                get(&key)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()
            };
            let values = if t.contains_key(&format!("{}.state1", p.name)) {
                let q = |k: u8, signed: bool| -> Result<Blockwise8> {
                    let codes = get(&format!("{}.state{k}", p.name))?
                        .flatten_all()?
                        .to_vec1::<u8>()?;
                    Blockwise8::from_parts(codes, f32s(format!("{}.absmax{k}", p.name))?, signed)
                };
                MomentValues::EightBit {
                    m: q(1, true)?,
                    v: q(2, false)?,
                }
            } else {
                MomentValues::F32 {
                    m: f32s(format!("{}.exp_avg", p.name))?,
                    v: f32s(format!("{}.exp_avg_sq", p.name))?,
                }
            };
            let lens = match &values {
                MomentValues::F32 { m, v } => (m.len(), v.len()),
                MomentValues::EightBit { m, v } => (m.len(), v.len()),
            };
            let n = p.var.elem_count();
            if lens != (n, n) {
                bail!(
                    "optimizer state of `{}` has moments of {} and {} values, the parameter {n}",
                    p.name,
                    lens.0,
                    lens.1
                );
            }
            loaded.push(values);
        }
        // Checked everything before changing anything.
        for (i, values) in loaded.into_iter().enumerate() {
            self.state
                .set_values(i, values)
                .map_err(|e| e.context(format!("optimizer state of `{}`", self.params[i].name)))?;
        }
        self.step = u64::try_from(step)
            .map_err(|_| candle_core::Error::Msg(format!("optimizer step {step} is negative")))?;
        Ok(())
    }
}
