// Shared by every NF4/FP4 kernel: how one weight is decoded from the packed bitsandbytes layout.
//
// Mirrored line by line by quant/src/cuda/emulate.rs (tested on CPU against the format's
// reference); change both together.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// Second-level blocksize of double quantization (fixed by bitsandbytes' quantize_4bit).
#define QLORA_NESTED_BLOCKSIZE 256

// Where a weight's per-block scales live. With double quantization the kernels read the 8-bit
// codes directly and rebuild the f32 scale on the fly, so the f32 absmax vector never exists.
struct QuantScales {
    const float* absmax;     // plain: one f32 per block (unused when double_quant)
    const uint8_t* qabsmax;  // double: one dynamic-code index per block
    const float* nested;     // double: f32 absmax per 256 blocks
    const float* dynamic;    // double: the 256-entry signed dynamic code
    float offset;            // double: the mean subtracted before quantizing
    int double_quant;
};

// Element i of a flat row-major weight: element 2j is the high nibble of byte j.
__device__ __forceinline__ unsigned nibble_at(const uint8_t* packed, unsigned long long i) {
    const uint8_t byte = packed[i >> 1];
    return (i & 1ull) ? (byte & 0x0fu) : (byte >> 4);
}

// Scale of block b: f32(dynamic[q] * nested) + offset, two roundings as bitsandbytes does, so
// __fmul_rn/__fadd_rn (no FMA contraction).
__device__ __forceinline__ float block_scale(const QuantScales& s, unsigned long long b) {
    if (!s.double_quant) {
        return s.absmax[b];
    }
    return __fadd_rn(__fmul_rn(s.dynamic[s.qabsmax[b]], s.nested[b / QLORA_NESTED_BLOCKSIZE]),
                     s.offset);
}

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float v) {
    return __float2half_rn(v);
}

// The 16-entry code book into shared memory (indexed per weight: too random for constant cache).
// Needs blockDim.x >= 16; every thread must reach it (it synchronizes).
__device__ __forceinline__ void load_code(const float* code, float* s_code) {
    if (threadIdx.x < 16) {
        s_code[threadIdx.x] = code[threadIdx.x];
    }
    __syncthreads();
}
