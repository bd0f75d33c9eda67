//! `Nf4Tensor`: a frozen weight in 4-bit form, and its bitsandbytes checkpoint representation.

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::TensorView;
use safetensors::Dtype as StDtype;
use serde::Deserialize;

use crate::blockwise::{self, block_count, check_blocksize};
use crate::codebook::{QuantType, DYNAMIC8};
use crate::double_quant::{self, DoubleQuant, NESTED_BLOCKSIZE};
use crate::QuantError;

/// The dtype a weight had before quantization; dequantization returns it by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceDtype {
    /// `float32`
    F32,
    /// `bfloat16`
    BF16,
    /// `float16`
    F16,
}

impl SourceDtype {
    /// bitsandbytes' (torch's) name.
    pub fn name(self) -> &'static str {
        match self {
            SourceDtype::F32 => "float32",
            SourceDtype::BF16 => "bfloat16",
            SourceDtype::F16 => "float16",
        }
    }

    /// Parse torch's name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "float32" => Some(SourceDtype::F32),
            "bfloat16" => Some(SourceDtype::BF16),
            "float16" => Some(SourceDtype::F16),
            _ => None,
        }
    }

    /// The matching candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            SourceDtype::F32 => DType::F32,
            SourceDtype::BF16 => DType::BF16,
            SourceDtype::F16 => DType::F16,
        }
    }

    /// From a candle dtype, if it is one bitsandbytes quantizes.
    pub fn from_dtype(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F32 => Some(SourceDtype::F32),
            DType::BF16 => Some(SourceDtype::BF16),
            DType::F16 => Some(SourceDtype::F16),
            _ => None,
        }
    }
}

/// Per-block scales: plain f32, or double-quantized to 8 bits.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    Plain(Vec<f32>),
    /// 8-bit codes + nested f32 absmax + offset.
    Double(DoubleQuant),
}

impl Absmax {
    /// Number of blocks.
    pub fn len(&self) -> usize {
        match self {
            Absmax::Plain(a) => a.len(),
            Absmax::Double(d) => d.codes.len(),
        }
    }

    /// True when there are no blocks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The f32 scale of block `b`.
    #[inline(always)]
    pub fn get(&self, b: usize) -> f32 {
        match self {
            Absmax::Plain(a) => a[b],
            Absmax::Double(d) => d.absmax(b),
        }
    }

    /// All scales as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Absmax::Plain(a) => a.clone(),
            Absmax::Double(d) => d.dequantize(),
        }
    }

    /// Bytes this representation takes.
    pub fn storage_bytes(&self) -> usize {
        match self {
            Absmax::Plain(a) => 4 * a.len(),
            Absmax::Double(d) => d.codes.len() + 4 * d.nested_absmax.len() + 4,
        }
    }
}

/// A frozen weight stored as packed 4-bit codes plus its quant state.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Tensor {
    qtype: QuantType,
    blocksize: usize,
    shape: Vec<usize>,
    dtype: SourceDtype,
    packed: Vec<u8>,
    absmax: Absmax,
}

/// One tensor of a bitsandbytes checkpoint entry, ready to be serialized.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredTensor {
    /// Safetensors dtype.
    pub dtype: StDtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub data: Vec<u8>,
}

impl safetensors::View for &StoredTensor {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

impl Nf4Tensor {
    /// Quantize flat row-major `data` of the given shape.
    pub fn quantize(
        data: &[f32],
        shape: &[usize],
        dtype: SourceDtype,
        qtype: QuantType,
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Self, QuantError> {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(QuantError::invalid(
                "input",
                format!(
                    "shape {shape:?} has {numel} elements, data has {}",
                    data.len()
                ),
            ));
        }
        // A NaN would quantize to code 0 (a silent zero) and an infinity poison its whole block.
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            return Err(QuantError::invalid(
                "input",
                format!(
                    "element {i} is {}: a weight must be a finite number to quantize",
                    data[i]
                ),
            ));
        }
        let q = blockwise::quantize(data, blocksize, qtype)?;
        let absmax = if double_quant {
            Absmax::Double(double_quant::quantize(&q.absmax))
        } else {
            Absmax::Plain(q.absmax)
        };
        Ok(Self {
            qtype,
            blocksize,
            shape: shape.to_vec(),
            dtype,
            packed: q.packed,
            absmax,
        })
    }

    /// Quantize a candle tensor (f32, bf16 or f16, any shape and device).
    pub fn from_tensor(
        t: &Tensor,
        qtype: QuantType,
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Self, QuantError> {
        let dtype = SourceDtype::from_dtype(t.dtype()).ok_or_else(|| {
            QuantError::invalid(
                "input",
                format!("dtype {:?} cannot be quantized (f32, bf16, f16)", t.dtype()),
            )
        })?;
        let flat = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Self::quantize(&flat, t.dims(), dtype, qtype, blocksize, double_quant)
    }

    /// Assemble from parts, checking that they agree with each other.
    pub fn from_parts(
        qtype: QuantType,
        blocksize: usize,
        shape: Vec<usize>,
        dtype: SourceDtype,
        packed: Vec<u8>,
        absmax: Absmax,
    ) -> Result<Self, QuantError> {
        check_blocksize(blocksize)?;
        let numel: usize = shape.iter().product();
        if packed.len() != numel.div_ceil(2) {
            return Err(QuantError::invalid(
                "weight",
                format!(
                    "{} packed bytes, but shape {shape:?} needs {}",
                    packed.len(),
                    numel.div_ceil(2)
                ),
            ));
        }
        let nblocks = block_count(numel, blocksize);
        if absmax.len() != nblocks {
            return Err(QuantError::invalid(
                "weight.absmax",
                format!(
                    "{} blocks, but shape {shape:?} with blocksize {blocksize} needs {nblocks}",
                    absmax.len()
                ),
            ));
        }
        if let Absmax::Double(d) = &absmax {
            let want = nblocks.div_ceil(NESTED_BLOCKSIZE);
            if d.nested_absmax.len() != want {
                return Err(QuantError::invalid(
                    "weight.nested_absmax",
                    format!("{} values, expected {want}", d.nested_absmax.len()),
                ));
            }
        }
        Ok(Self {
            qtype,
            blocksize,
            shape,
            dtype,
            packed,
            absmax,
        })
    }

    /// The 4-bit code.
    pub fn qtype(&self) -> QuantType {
        self.qtype
    }
    /// Elements per absmax block.
    pub fn blocksize(&self) -> usize {
        self.blocksize
    }
    /// Logical shape (`[out, in]` for a linear weight).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Dtype before quantization.
    pub fn source_dtype(&self) -> SourceDtype {
        self.dtype
    }
    /// Packed codes, two per byte, high nibble first.
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }
    /// Per-block scales.
    pub fn absmax(&self) -> &Absmax {
        &self.absmax
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes held in memory (codes + scales).
    pub fn storage_bytes(&self) -> usize {
        self.packed.len() + self.absmax.storage_bytes()
    }

    /// `(rows, cols)` of a 2-D weight.
    pub fn dims2(&self) -> Result<(usize, usize), QuantError> {
        match self.shape[..] {
            [n, k] => Ok((n, k)),
            _ => Err(QuantError::invalid(
                "weight",
                format!("expected a 2-D weight, shape is {:?}", self.shape),
            )),
        }
    }

    /// Dequantize to f32 (flat, row-major), with the fast CPU kernel.
    pub fn dequantize_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        crate::cpu::dequantize_into(self, &mut out);
        out
    }

    /// Dequantize to a candle tensor of `dtype` (bf16 rounds to nearest even) on `device`.
    pub fn dequantize(&self, dtype: DType, device: &Device) -> Result<Tensor, QuantError> {
        let t = Tensor::from_vec(self.dequantize_f32(), self.shape.as_slice(), device)?;
        Ok(t.to_dtype(dtype)?)
    }

    /// The JSON bitsandbytes stores under `weight.quant_state.bitsandbytes__<qt>`, byte for byte.
    pub fn quant_state_json(&self) -> String {
        let shape = self
            .shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let mut s = format!(
            "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
            self.qtype.name(),
            self.blocksize,
            self.dtype.name(),
            shape
        );
        if let Absmax::Double(d) = &self.absmax {
            s.push_str(&format!(
                ", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                python_float_repr(d.offset as f64)
            ));
        }
        s.push('}');
        s
    }

    /// The checkpoint entries transformers + bitsandbytes write for this weight under `prefix`
    /// (e.g. `model.layers.0.self_attn.q_proj.weight`), in their key order.
    pub fn to_bnb_tensors(&self, prefix: &str) -> Vec<(String, StoredTensor)> {
        let u8t = |shape: Vec<usize>, data: Vec<u8>| StoredTensor {
            dtype: StDtype::U8,
            shape,
            data,
        };
        let f32t = |v: &[f32]| StoredTensor {
            dtype: StDtype::F32,
            shape: vec![v.len()],
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
        let mut out = vec![(
            prefix.to_string(),
            u8t(vec![self.packed.len(), 1], self.packed.clone()),
        )];
        match &self.absmax {
            Absmax::Plain(a) => out.push((format!("{prefix}.absmax"), f32t(a))),
            Absmax::Double(d) => {
                out.push((
                    format!("{prefix}.absmax"),
                    u8t(vec![d.codes.len()], d.codes.clone()),
                ));
                out.push((format!("{prefix}.nested_absmax"), f32t(&d.nested_absmax)));
                out.push((format!("{prefix}.nested_quant_map"), f32t(&DYNAMIC8)));
            }
        }
        out.push((format!("{prefix}.quant_map"), f32t(&self.qtype.quant_map())));
        let json = self.quant_state_json().into_bytes();
        out.push((
            format!("{prefix}.quant_state.bitsandbytes__{}", self.qtype.name()),
            u8t(vec![json.len()], json),
        ));
        out
    }

    /// Read a weight from bitsandbytes checkpoint entries under `prefix`, validating every field.
    pub fn from_bnb<'a>(
        prefix: &str,
        get: impl Fn(&str) -> Option<TensorView<'a>>,
    ) -> Result<Self, QuantError> {
        let fetch = |suffix: &str| {
            let name = format!("{prefix}{suffix}");
            get(&name).map(|v| (name.clone(), v))
        };
        let (state_name, state) = fetch(".quant_state.bitsandbytes__nf4")
            .or_else(|| fetch(".quant_state.bitsandbytes__fp4"))
            .ok_or_else(|| {
                QuantError::Missing(format!("{prefix}.quant_state.bitsandbytes__nf4 (or __fp4)"))
            })?;
        let json: QuantStateJson = serde_json::from_slice(state.data()).map_err(|e| {
            QuantError::invalid(&state_name, format!("quant state is not valid JSON: {e}"))
        })?;
        let qtype = QuantType::from_name(&json.quant_type).ok_or_else(|| {
            QuantError::invalid(
                &state_name,
                format!("unknown quant_type {:?} (nf4, fp4)", json.quant_type),
            )
        })?;
        if !state_name.ends_with(qtype.name()) {
            return Err(QuantError::invalid(
                &state_name,
                format!("key says one quant type, JSON says {}", qtype.name()),
            ));
        }
        check_blocksize(json.blocksize)?;
        let dtype = SourceDtype::from_name(&json.dtype).ok_or_else(|| {
            QuantError::invalid(
                &state_name,
                format!(
                    "unknown dtype {:?} (float32, bfloat16, float16)",
                    json.dtype
                ),
            )
        })?;
        let numel: usize = json.shape.iter().product();
        let nblocks = block_count(numel, json.blocksize);

        let (wname, w) = fetch("").ok_or_else(|| QuantError::Missing(prefix.to_string()))?;
        expect_dtype(&wname, &w, StDtype::U8)?;
        if w.data().len() != numel.div_ceil(2) {
            return Err(QuantError::invalid(
                &wname,
                format!(
                    "{} packed bytes, but the quant state's shape {:?} needs {}",
                    w.data().len(),
                    json.shape,
                    numel.div_ceil(2)
                ),
            ));
        }
        let (aname, a) =
            fetch(".absmax").ok_or_else(|| QuantError::Missing(format!("{prefix}.absmax")))?;
        let absmax = match json.nested_offset {
            None => {
                expect_dtype(&aname, &a, StDtype::F32)?;
                Absmax::Plain(read_f32(&aname, &a, nblocks)?)
            }
            Some(offset) => {
                if json.nested_blocksize != Some(NESTED_BLOCKSIZE) {
                    return Err(QuantError::invalid(
                        &state_name,
                        format!(
                            "nested_blocksize {:?}, expected {NESTED_BLOCKSIZE}",
                            json.nested_blocksize
                        ),
                    ));
                }
                expect_dtype(&aname, &a, StDtype::U8)?;
                if a.data().len() != nblocks {
                    return Err(QuantError::invalid(
                        &aname,
                        format!("{} codes, expected {nblocks}", a.data().len()),
                    ));
                }
                let (nname, nested) = fetch(".nested_absmax")
                    .ok_or_else(|| QuantError::Missing(format!("{prefix}.nested_absmax")))?;
                expect_dtype(&nname, &nested, StDtype::F32)?;
                let nested = read_f32(&nname, &nested, nblocks.div_ceil(NESTED_BLOCKSIZE))?;
                if let Some((mname, m)) = fetch(".nested_quant_map") {
                    let map = read_f32(&mname, &m, 256)?;
                    if map.iter().zip(DYNAMIC8.iter()).any(|(a, b)| a != b) {
                        return Err(QuantError::invalid(
                            &mname,
                            "not bitsandbytes' 8-bit dynamic code".to_string(),
                        ));
                    }
                }
                Absmax::Double(DoubleQuant {
                    codes: a.data().to_vec(),
                    nested_absmax: nested,
                    offset: offset as f32,
                })
            }
        };
        if let Some((mname, m)) = fetch(".quant_map") {
            let map = read_f32(&mname, &m, 16)?;
            if map != qtype.quant_map() {
                return Err(QuantError::invalid(
                    &mname,
                    format!("does not match the {} code", qtype.name()),
                ));
            }
        }
        Self::from_parts(
            qtype,
            json.blocksize,
            json.shape,
            dtype,
            w.data().to_vec(),
            absmax,
        )
    }
}

#[derive(Deserialize)]
struct QuantStateJson {
    quant_type: String,
    blocksize: usize,
    dtype: String,
    shape: Vec<usize>,
    nested_blocksize: Option<usize>,
    nested_offset: Option<f64>,
}

fn expect_dtype(name: &str, v: &TensorView<'_>, want: StDtype) -> Result<(), QuantError> {
    if v.dtype() == want {
        Ok(())
    } else {
        Err(QuantError::invalid(
            name,
            format!("dtype {:?}, expected {want:?}", v.dtype()),
        ))
    }
}

fn read_f32(name: &str, v: &TensorView<'_>, want: usize) -> Result<Vec<f32>, QuantError> {
    expect_dtype(name, v, StDtype::F32)?;
    let data = v.data();
    if data.len() != 4 * want {
        return Err(QuantError::invalid(
            name,
            format!("{} values, expected {want}", data.len() / 4),
        ));
    }
    Ok(data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Format a float the way Python's `repr` does (shortest round-trip digits; exponent form
/// outside [1e-4, 1e16), with a two-digit exponent).
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let a = x.abs();
    if a == 0.0 || (1e-4..1e16).contains(&a) {
        let s = format!("{x}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let s = format!("{x:e}");
        let (mant, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', exp),
        };
        format!("{mant}e{sign}{digits:0>2}")
    }
}
