// Blockwise NF4/FP4 dequantization to f32, bf16 or f16 (bit-exact with the CPU reference:
// out = round(code[nibble] * scale) with one f32 multiply).
//
// Used by the training-size product: W is expanded once into a reused workspace of the
// activations' dtype and handed to cuBLAS (see quant/src/cuda/mod.rs for why).
//
// Geometry (mirrored by quant/src/cuda/geometry.rs; a test checks these numbers): each thread
// expands QLORA_DEQ_ELEMS_PER_THREAD consecutive elements, which never straddle a quantization
// block because every bitsandbytes blocksize is a multiple of it.
#include "nf4_decode.cuh"

#define QLORA_DEQ_THREADS 256
#define QLORA_DEQ_ELEMS_PER_THREAD 8

template <typename T>
__device__ void dequantize(const uint8_t* packed, const float* code, QuantScales scales,
                           unsigned long long n, unsigned int blocksize, T* out) {
    __shared__ float s_code[16];
    load_code(code, s_code);
    const unsigned long long first =
        ((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x) * QLORA_DEQ_ELEMS_PER_THREAD;
    if (first >= n) {
        return;
    }
    const float scale = block_scale(scales, first / blocksize);
#pragma unroll
    for (int j = 0; j < QLORA_DEQ_ELEMS_PER_THREAD; ++j) {
        const unsigned long long i = first + j;
        if (i < n) {
            out[i] = from_f32<T>(__fmul_rn(s_code[nibble_at(packed, i)], scale));
        }
    }
}

#define QLORA_DEQUANTIZE(NAME, T)                                                             \
    extern "C" __global__ void NAME(const uint8_t* packed, const float* code,                 \
                                    const float* absmax, const uint8_t* qabsmax,              \
                                    const float* nested, const float* dynamic, float offset,  \
                                    int double_quant, unsigned long long n,                   \
                                    unsigned int blocksize, T* out) {                         \
        const QuantScales scales = {absmax, qabsmax, nested, dynamic, offset, double_quant};  \
        dequantize<T>(packed, code, scales, n, blocksize, out);                               \
    }

QLORA_DEQUANTIZE(nf4_dequantize_f32, float)
QLORA_DEQUANTIZE(nf4_dequantize_bf16, __nv_bfloat16)
QLORA_DEQUANTIZE(nf4_dequantize_f16, __half)
