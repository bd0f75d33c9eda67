//! Sequence classification heads, as transformers' `*ForSequenceClassification` models have
//! them: one feature vector per sequence (BERT's pooled `[CLS]`, or a decoder's last token that
//! is not padding), then `logits = W · feature + b`.
//!
//! The head is trained in full (PEFT's `modules_to_save`), so its weight and bias are `Var`s,
//! kept in f32 whatever the compute dtype.

use candle_core::{DType, Device, Result, Tensor, Var};
use serde_json::Value;

use crate::lora::DropoutSeed;

/// Dropout key of the classifier's input, clear of the adapters' and the layers' keys.
const CLASSIFIER_DROPOUT_KEY: u64 = 1 << 41;

/// What a checkpoint's config says about the task.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassifierConfig {
    /// Label names by index (`id2label`), `LABEL_i` when the config names none.
    pub labels: Vec<String>,
    /// `num_labels == 1`: MSE regression, as transformers does.
    pub regression: bool,
}

impl ClassifierConfig {
    /// `num_labels` classes named `LABEL_0..`.
    pub fn with_num_labels(n: usize) -> Self {
        Self {
            labels: (0..n).map(|i| format!("LABEL_{i}")).collect(),
            regression: n == 1,
        }
    }

    /// Read `id2label` / `num_labels` / `problem_type` from an HF config; `None` when the config
    /// names no classification task (`architectures` without `ForSequenceClassification`).
    pub fn from_json(v: &Value) -> std::result::Result<Option<Self>, String> {
        if !names_classifier(v) {
            return Ok(None);
        }
        let mut labels: Vec<(usize, String)> = match v.get("id2label").and_then(Value::as_object) {
            Some(m) => m
                .iter()
                .map(|(k, name)| {
                    let i = k
                        .parse::<usize>()
                        .map_err(|_| format!("`id2label` key `{k}` is not a class index"))?;
                    let name = name
                        .as_str()
                        .ok_or(format!("`id2label` entry `{k}` is not a string"))?;
                    Ok((i, name.to_string()))
                })
                .collect::<std::result::Result<_, String>>()?,
            None => Vec::new(),
        };
        labels.sort();
        let problem_type = crate::json_fields::optional(
            v,
            "problem_type",
            |x| x.as_str().map(str::to_string),
            "a string",
        )?;
        match problem_type.as_deref() {
            None | Some("single_label_classification") | Some("regression") => {}
            Some(other) => {
                return Err(format!(
                    "`problem_type` `{other}` is not supported (single_label_classification, regression)"
                ))
            }
        }
        let n = crate::json_fields::opt_usize(v, "num_labels")?.unwrap_or(labels.len().max(2));
        if labels.is_empty() {
            return Ok(Some(Self::with_num_labels(n)));
        }
        if labels.len() != n || labels.iter().enumerate().any(|(i, (k, _))| *k != i) {
            return Err(format!(
                "`id2label` must name classes 0..{n} (`num_labels` {n}), got {:?}",
                labels.iter().map(|(k, _)| k).collect::<Vec<_>>()
            ));
        }
        Ok(Some(Self {
            regression: labels.len() == 1,
            labels: labels.into_iter().map(|(_, s)| s).collect(),
        }))
    }

    /// Index of a label name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.labels.iter().position(|l| l == name)
    }
}

/// Whether an HF config's `architectures` name a `*ForSequenceClassification` model.
pub fn names_classifier(v: &Value) -> bool {
    v.get("architectures")
        .and_then(Value::as_array)
        .is_some_and(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .any(|s| s.ends_with("ForSequenceClassification"))
        })
}

/// The trainable output layer of a classifier.
#[derive(Clone, Debug)]
pub struct SequenceClassifier {
    /// Checkpoint (and PEFT `modules_to_save`) name: `classifier` (BERT) or `score` (decoders).
    pub module: String,
    /// `[num_labels, hidden]`, f32.
    pub weight: Var,
    /// `[num_labels]`, f32 (BERT has one; decoders' `score` has none).
    pub bias: Option<Var>,
    /// Labels and task.
    pub config: ClassifierConfig,
    /// Dropout on the pooled features in training mode (`classifier_dropout` or
    /// `hidden_dropout_prob`); 0 leaves them as they are.
    pub dropout: f32,
    /// Seed of that dropout's masks (the trainer's shared handle).
    pub dropout_seed: DropoutSeed,
}

impl SequenceClassifier {
    /// A head of `weight` (and `bias`) as a checkpoint holds it.
    pub fn new(
        module: &str,
        weight: &Tensor,
        bias: Option<&Tensor>,
        config: ClassifierConfig,
        dropout: f32,
    ) -> Result<Self> {
        let var = |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::F32)?);
        Ok(Self {
            module: module.to_string(),
            weight: var(weight)?,
            bias: bias.map(var).transpose()?,
            config,
            dropout,
            dropout_seed: DropoutSeed::default(),
        })
    }

    /// A fresh head initialised as transformers does (`normal(0, initializer_range)` weight,
    /// zero bias), deterministic for `seed`.
    pub fn init(
        module: &str,
        hidden: usize,
        bias: bool,
        config: ClassifierConfig,
        initializer_range: f64,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let n = config.labels.len();
        let normal = rand_distr::Normal::new(0.0f32, initializer_range as f32)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let w: Vec<f32> = (0..n * hidden).map(|_| normal.sample(&mut rng)).collect();
        let weight = Tensor::from_vec(w, (n, hidden), device)?;
        let b = bias
            .then(|| Tensor::zeros(n, DType::F32, device))
            .transpose()?;
        Self::new(module, &weight, b.as_ref(), config, 0.0)
    }

    /// Number of outputs.
    pub fn num_labels(&self) -> usize {
        self.config.labels.len()
    }

    /// `[b, num_labels]` logits (f32) of the pooled features `[b, hidden]`.
    pub fn logits(&self, pooled: &Tensor, train: bool) -> Result<Tensor> {
        let x = pooled.to_dtype(DType::F32)?;
        let x = if train && self.dropout > 0.0 {
            self.dropout_seed
                .dropout(self.dropout, CLASSIFIER_DROPOUT_KEY)?
                .forward(&x.contiguous()?)?
        } else {
            x
        };
        let y = x.matmul(&self.weight.as_tensor().t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b.as_tensor()),
            None => Ok(y),
        }
    }

    /// The trainable tensors under their checkpoint suffixes (`weight`, `bias`).
    pub fn parameters(&self) -> Vec<(&'static str, &Var)> {
        let mut out = vec![("weight", &self.weight)];
        if let Some(b) = &self.bias {
            out.push(("bias", b));
        }
        out
    }
}

/// Hidden states `[b, t, hidden]` at each row's last token whose id is not `pad_id`
/// (transformers' rule for decoders, which also covers left padding), `[b, hidden]`.
pub fn last_real_token(h: &Tensor, ids: &Tensor, pad_id: Option<u32>) -> Result<Tensor> {
    let (b, t, _) = h.dims3()?;
    let ids = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let idx: Vec<u32> = ids
        .iter()
        .map(|row| match pad_id {
            Some(p) => row.iter().rposition(|&x| x != p).unwrap_or(0) as u32,
            None => (t - 1) as u32,
        })
        .collect();
    let rows: Vec<Tensor> = idx
        .iter()
        .enumerate()
        .map(|(r, &i)| h.get(r)?.get(i as usize))
        .collect::<Result<_>>()?;
    Tensor::stack(&rows, 0)?.reshape((b, ()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config_reads_labels_and_refuses_what_it_cannot_do() {
        let v = json!({"architectures": ["BertForSequenceClassification"],
            "id2label": {"1": "pos", "0": "neg"}});
        let c = ClassifierConfig::from_json(&v).unwrap().unwrap();
        assert_eq!(c.labels, ["neg", "pos"]);
        assert!(!c.regression);
        assert_eq!(
            ClassifierConfig::from_json(&json!({"architectures": ["LlamaForCausalLM"]})).unwrap(),
            None
        );
        let bad = json!({"architectures": ["BertForSequenceClassification"],
            "id2label": {"0": "a", "2": "c"}});
        assert!(ClassifierConfig::from_json(&bad).is_err());
        let multi = json!({"architectures": ["BertForSequenceClassification"],
            "num_labels": 3, "problem_type": "multi_label_classification"});
        let e = ClassifierConfig::from_json(&multi).unwrap_err();
        assert!(e.contains("multi_label_classification"), "{e}");
    }

    #[test]
    fn last_real_token_is_the_rightmost_non_pad() {
        let h = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 4, 3))
            .unwrap();
        let ids = Tensor::new(&[[5u32, 6, 0, 0], [0, 7, 8, 9]], &Device::Cpu).unwrap();
        let got = last_real_token(&h, &ids, Some(0))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(got, [[3.0, 4.0, 5.0], [21.0, 22.0, 23.0]]);
    }
}
