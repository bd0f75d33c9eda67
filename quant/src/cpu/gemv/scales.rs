//! Block scales for the GEMV kernels.

use std::ops::Range;

use crate::codebook::DYNAMIC8;
use crate::double_quant::NESTED_BLOCKSIZE;
use crate::tensor::Absmax;

/// Block scales of a task's blocks as plain f32 reads: plain absmax as stored; double-quantized
/// scales through one 256-entry table per nested group (`DYNAMIC8[c] · nested + offset` for
/// every code `c`, the two roundings of `DoubleQuant::absmax`), so a block's scale is a byte
/// load and a float load, with no arithmetic per block.
pub(super) enum BlockScales<'a> {
    Plain(&'a [f32]),
    Double {
        codes: &'a [u8],
        tables: Vec<f32>,
        first_group: usize,
    },
}

impl<'a> BlockScales<'a> {
    /// For blocks `blocks` (non-empty) of `absmax`.
    pub(super) fn new(absmax: &'a Absmax, blocks: Range<usize>) -> Self {
        match absmax {
            Absmax::Plain(a) => BlockScales::Plain(a),
            Absmax::Double(d) => {
                let first_group = blocks.start / NESTED_BLOCKSIZE;
                let last_group = (blocks.end - 1) / NESTED_BLOCKSIZE;
                let mut tables = Vec::with_capacity((last_group - first_group + 1) * 256);
                for &nested in &d.nested_absmax[first_group..=last_group] {
                    tables.extend(DYNAMIC8.iter().map(|&v| v * nested + d.offset));
                }
                BlockScales::Double {
                    codes: &d.codes,
                    tables,
                    first_group,
                }
            }
        }
    }

    #[inline(always)]
    pub(super) fn get(&self, b: usize) -> f32 {
        match self {
            BlockScales::Plain(a) => a[b],
            BlockScales::Double {
                codes,
                tables,
                first_group,
            } => tables[(b / NESTED_BLOCKSIZE - first_group) * 256 + codes[b] as usize],
        }
    }
}
