//! What the memory plan needs of a model, for every family: its dimensions, one layer's linear
//! layers (with the checkpoint paths PEFT's target rule matches), the dense tensors, and which
//! ops its layer graph records.

use serde_json::Value;

use crate::model::bert::BertConfig;
use crate::model::config::{projection_path, LlamaConfig, PROJECTIONS};
use crate::model::gpt2::Gpt2Config;

/// A model's config, as the plan reads it.
#[derive(Clone, Debug, PartialEq)]
pub enum PlanModel {
    /// Llama, Mistral, Qwen2, SmolLM.
    Llama(LlamaConfig),
    /// GPT-2.
    Gpt2(Gpt2Config),
    /// A BERT encoder (with its pooler and a classification head).
    Bert(BertConfig),
}

/// One linear layer of a layer.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanLinear {
    /// Checkpoint path in layer 0 (`model.layers.0.self_attn.q_proj`), for PEFT's target rule.
    pub path: String,
    /// Output features.
    pub out: usize,
    /// Input features.
    pub inp: usize,
    /// Has a bias.
    pub bias: bool,
}

impl From<LlamaConfig> for PlanModel {
    fn from(cfg: LlamaConfig) -> Self {
        PlanModel::Llama(cfg)
    }
}

impl PlanModel {
    /// The family `config.json` names (`model_type`), parsed by that family's config reader.
    pub fn from_json(v: &Value) -> Result<Self, String> {
        Ok(match v.get("model_type").and_then(Value::as_str) {
            Some("gpt2") => PlanModel::Gpt2(Gpt2Config::from_json(v)?),
            Some("bert") => PlanModel::Bert(BertConfig::from_json(v)?),
            _ => PlanModel::Llama(LlamaConfig::from_json(v)?),
        })
    }

    /// The Llama-family config, if this is one.
    pub fn as_llama(&self) -> Option<&LlamaConfig> {
        match self {
            PlanModel::Llama(c) => Some(c),
            _ => None,
        }
    }

    /// `model_type`.
    pub fn model_type(&self) -> &str {
        match self {
            PlanModel::Llama(c) => &c.model_type,
            PlanModel::Gpt2(_) => "gpt2",
            PlanModel::Bert(_) => "bert",
        }
    }

    /// Transformer layers.
    pub fn layers(&self) -> usize {
        match self {
            PlanModel::Llama(c) => c.num_hidden_layers,
            PlanModel::Gpt2(c) => c.n_layer,
            PlanModel::Bert(c) => c.num_hidden_layers,
        }
    }

    /// Width of the residual stream.
    pub fn hidden(&self) -> usize {
        match self {
            PlanModel::Llama(c) => c.hidden_size,
            PlanModel::Gpt2(c) => c.n_embd,
            PlanModel::Bert(c) => c.hidden_size,
        }
    }

    /// Width of the MLP.
    pub fn intermediate(&self) -> usize {
        match self {
            PlanModel::Llama(c) => c.intermediate_size,
            PlanModel::Gpt2(c) => c.n_inner,
            PlanModel::Bert(c) => c.intermediate_size,
        }
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        match self {
            PlanModel::Llama(c) => c.vocab_size,
            PlanModel::Gpt2(c) => c.vocab_size,
            PlanModel::Bert(c) => c.vocab_size,
        }
    }

    /// Query heads.
    pub fn heads(&self) -> usize {
        match self {
            PlanModel::Llama(c) => c.num_attention_heads,
            PlanModel::Gpt2(c) => c.n_head,
            PlanModel::Bert(c) => c.num_attention_heads,
        }
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        match self {
            PlanModel::Llama(c) => c.head_dim,
            PlanModel::Gpt2(c) => c.head_dim(),
            PlanModel::Bert(c) => c.head_dim(),
        }
    }

    /// The loss is over the vocabulary (a causal LM); false for an encoder, whose loss is a
    /// classification head's.
    pub fn vocab_loss(&self) -> bool {
        !matches!(self, PlanModel::Bert(_))
    }

    /// One layer's linear layers, in checkpoint order (paths of layer 0).
    pub fn linears(&self) -> Vec<PlanLinear> {
        self.linears_in(0)
    }

    /// Layer `layer`'s linear layers, in checkpoint order.
    pub fn linears_in(&self, layer: usize) -> Vec<PlanLinear> {
        let lin = |path: String, out: usize, inp: usize, bias: bool| PlanLinear {
            path,
            out,
            inp,
            bias,
        };
        match self {
            PlanModel::Llama(c) => PROJECTIONS
                .iter()
                .filter_map(|&p| {
                    let (out, inp) = c.projection_shape(p)?;
                    let bias = match p {
                        "q_proj" | "k_proj" | "v_proj" => c.attention_bias,
                        "o_proj" => c.o_proj_bias,
                        _ => c.mlp_bias,
                    };
                    Some(lin(projection_path(layer, p), out, inp, bias))
                })
                .collect(),
            PlanModel::Gpt2(c) => {
                let (h, i) = (c.n_embd, c.n_inner);
                let p = |name: &str| format!("transformer.h.{layer}.{name}");
                vec![
                    lin(p("attn.c_attn"), 3 * h, h, true),
                    lin(p("attn.c_proj"), h, h, true),
                    lin(p("mlp.c_fc"), i, h, true),
                    lin(p("mlp.c_proj"), h, i, true),
                ]
            }
            PlanModel::Bert(c) => {
                let (h, i) = (c.hidden_size, c.intermediate_size);
                let p = |name: &str| format!("bert.encoder.layer.{layer}.{name}");
                vec![
                    lin(p("attention.self.query"), h, h, true),
                    lin(p("attention.self.key"), h, h, true),
                    lin(p("attention.self.value"), h, h, true),
                    lin(p("attention.output.dense"), h, h, true),
                    lin(p("intermediate.dense"), i, h, true),
                    lin(p("output.dense"), h, i, true),
                ]
            }
        }
    }

    /// Linear layers outside the layers: BERT's pooler (quantized like the encoder's).
    pub fn extra_linears(&self) -> Vec<PlanLinear> {
        match self {
            PlanModel::Bert(c) => vec![PlanLinear {
                path: "bert.pooler.dense".into(),
                out: c.hidden_size,
                inp: c.hidden_size,
                bias: true,
            }],
            _ => Vec::new(),
        }
    }

    /// The language-model head is its own tensor (a LoRA target then, PEFT's `lm_head`).
    pub fn untied_head(&self) -> bool {
        match self {
            PlanModel::Llama(c) => !c.tie_word_embeddings,
            PlanModel::Gpt2(c) => !c.tie_word_embeddings,
            PlanModel::Bert(_) => false,
        }
    }

    /// Checkpoint path of the token embedding (a LoRA target too).
    pub fn embedding_path(&self) -> &'static str {
        match self {
            PlanModel::Llama(_) => "model.embed_tokens",
            PlanModel::Gpt2(_) => "transformer.wte",
            PlanModel::Bert(_) => "bert.embeddings.word_embeddings",
        }
    }

    /// Elements of the dense tensors held in the weight dtype: embeddings, head, norms.
    pub fn dense_elems(&self) -> usize {
        let (v, h, l) = (self.vocab(), self.hidden(), self.layers());
        match self {
            PlanModel::Llama(c) => {
                let heads = if c.tie_word_embeddings { 1 } else { 2 };
                heads * v * h + (2 * l + 1) * h
            }
            PlanModel::Gpt2(c) => {
                let heads = if c.tie_word_embeddings { 1 } else { 2 };
                // Four LayerNorm vectors per block and two for ln_f.
                heads * v * h + c.n_positions * h + (4 * l + 2) * h
            }
            PlanModel::Bert(c) => {
                (v + c.max_position_embeddings + c.type_vocab_size) * h + (4 * l + 2) * h
            }
        }
    }

    /// Positions the model was trained for.
    pub fn max_positions(&self) -> usize {
        match self {
            PlanModel::Llama(c) => c.max_position_embeddings,
            PlanModel::Gpt2(c) => c.n_positions,
            PlanModel::Bert(c) => c.max_position_embeddings,
        }
    }

    /// Parameters of the base model (weights, biases, embeddings, norms).
    pub fn parameter_count(&self) -> usize {
        let count = |lins: Vec<PlanLinear>| -> usize {
            lins.iter()
                .map(|l| l.out * l.inp + if l.bias { l.out } else { 0 })
                .sum()
        };
        self.layers() * count(self.linears()) + count(self.extra_linears()) + self.dense_elems()
    }

    /// One line for people: family and dimensions.
    pub fn describe(&self) -> String {
        let heads = match self {
            PlanModel::Llama(c) => format!(
                "{} heads ({} kv)",
                c.num_attention_heads, c.num_key_value_heads
            ),
            _ => format!("{} heads", self.heads()),
        };
        format!(
            "{}, {} layers, hidden {}, ffn {}, {heads}, vocab {}, {:.2} B parameters",
            self.model_type(),
            self.layers(),
            self.hidden(),
            self.intermediate(),
            self.vocab(),
            self.parameter_count() as f64 / 1e9
        )
    }

    /// Rotary tables are built (Llama family); the others rotate nothing.
    pub fn rotary(&self) -> bool {
        matches!(self, PlanModel::Llama(_))
    }

    /// Training mode drops attention probabilities (GPT-2's `attn_pdrop`, BERT's
    /// `attention_probs_dropout_prob`), which takes the composite attention with its
    /// `[b, heads, t, t]` tensors.
    pub fn drops_attention_probs(&self) -> bool {
        match self {
            PlanModel::Llama(_) => false,
            PlanModel::Gpt2(c) => c.attn_pdrop > 0.0,
            PlanModel::Bert(c) => c.attention_probs_dropout_prob > 0.0,
        }
    }

    /// Training mode drops the two sublayer outputs of each layer (`resid_pdrop`,
    /// `hidden_dropout_prob`).
    pub fn drops_sublayer_outputs(&self) -> bool {
        match self {
            PlanModel::Llama(_) => false,
            PlanModel::Gpt2(c) => c.resid_pdrop > 0.0,
            PlanModel::Bert(c) => c.hidden_dropout_prob > 0.0,
        }
    }
}
