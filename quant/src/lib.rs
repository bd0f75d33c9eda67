//! `qlora-quant`: bitsandbytes-exact 4-bit (NF4/FP4) blockwise quantization with double
//! quantization, and fast fused CPU kernels that multiply by the 4-bit weights without ever
//! materializing them.
//!
//! The format logic (`codebook`, `blockwise`, `double_quant`, `tensor`) is plain code tested
//! bit-exactly against bitsandbytes' outputs; the kernels (`cpu`) are tested against it.

pub mod blockwise;
pub mod codebook;
pub mod cpu;
pub mod cuda;
pub mod double_quant;
pub mod op;
pub mod tensor;

pub use codebook::QuantType;
pub use double_quant::DoubleQuant;
pub use op::{nf4_linear, Nf4MatMul};
pub use tensor::{Absmax, Nf4Tensor, SourceDtype, StoredTensor};

/// Errors of the quantization crate. Each names the tensor or field it is about.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// bitsandbytes only accepts a fixed list of blocksizes.
    #[error(
        "unsupported blocksize {0}: bitsandbytes accepts 32, 64, 128, 256, 512, 1024, 2048 or 4096"
    )]
    UnsupportedBlocksize(usize),
    /// A tensor or field is present but wrong.
    #[error("tensor `{name}`: {what}")]
    Invalid {
        /// The tensor or field.
        name: String,
        /// What is wrong, and what was expected.
        what: String,
    },
    /// A required tensor is absent.
    #[error("tensor `{0}` is missing")]
    Missing(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl QuantError {
    /// Shorthand for [`QuantError::Invalid`].
    pub fn invalid(name: &str, what: String) -> Self {
        QuantError::Invalid {
            name: name.to_string(),
            what,
        }
    }
}
