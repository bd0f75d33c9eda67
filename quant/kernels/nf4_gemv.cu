// Small-m products (decode, m <= QLORA_GEMV_MAX_ROWS): W is decoded in registers and never
// written, so the kernels stream 4.1 bits per weight and are bound by memory bandwidth.
//
//   nf4_gemv_*   y[m, n]  = x[m, k] · deq(W)ᵀ   one warp per output feature o; lane l takes
//                runs of 8 consecutive columns c = 8l + 256t (coalesced bytes of row o),
//                accumulates m partial sums with fmaf, then a __shfl_down tree adds the lanes.
//   nf4_gemv_t_* dx[m, k] = dy[m, n] · deq(W)   (backward) one thread per column c, looping
//                over all n rows; neighbouring threads read neighbouring nibbles.
//
// Geometry and summation order are mirrored by quant/src/cuda/emulate.rs, which is tested on
// CPU; a GPU test compares these kernels with that emulation.
#include "nf4_decode.cuh"

#define QLORA_GEMV_MAX_ROWS 8
#define QLORA_GEMV_WARPS 4
#define QLORA_GEMV_RUN 8
#define QLORA_GEMV_T_THREADS 256

template <typename T>
__device__ void gemv(const T* x, unsigned int m, const uint8_t* packed, const float* code,
                     QuantScales scales, unsigned int n, unsigned int k, unsigned int blocksize,
                     T* y) {
    __shared__ float s_code[16];
    load_code(code, s_code);
    const unsigned int warp = threadIdx.x / 32;
    const unsigned int lane = threadIdx.x % 32;
    const unsigned int o = blockIdx.x * QLORA_GEMV_WARPS + warp;
    if (o >= n) {
        return;  // whole warp: the shuffles below stay warp-uniform
    }
    float acc[QLORA_GEMV_MAX_ROWS];
#pragma unroll
    for (int r = 0; r < QLORA_GEMV_MAX_ROWS; ++r) {
        acc[r] = 0.0f;
    }
    const unsigned long long row = (unsigned long long)o * k;
    // Blocksizes are powers of two; a run of 8 columns spans at most two blocks, so the scale
    // is rebuilt only when the block changes (same value as per element, fewer loads).
    const unsigned int shift = __ffs(blocksize) - 1;
    unsigned long long cur_block = ~0ull;
    float scale = 0.0f;
    for (unsigned int c0 = lane * QLORA_GEMV_RUN; c0 < k; c0 += 32 * QLORA_GEMV_RUN) {
#pragma unroll
        for (int j = 0; j < QLORA_GEMV_RUN; ++j) {
            const unsigned int c = c0 + j;
            if (c < k) {
                const unsigned long long i = row + c;
                if ((i >> shift) != cur_block) {
                    cur_block = i >> shift;
                    scale = block_scale(scales, cur_block);
                }
                const float w = __fmul_rn(s_code[nibble_at(packed, i)], scale);
#pragma unroll
                for (int r = 0; r < QLORA_GEMV_MAX_ROWS; ++r) {
                    if (r < m) {
                        acc[r] = fmaf(to_f32(x[(unsigned long long)r * k + c]), w, acc[r]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < QLORA_GEMV_MAX_ROWS; ++r) {
#pragma unroll
        for (int off = 16; off > 0; off /= 2) {
            acc[r] += __shfl_down_sync(0xffffffffu, acc[r], off);
        }
    }
    if (lane == 0) {
        // Unrolled with a guard (not `r < m` as the bound) so acc stays in registers.
#pragma unroll
        for (int r = 0; r < QLORA_GEMV_MAX_ROWS; ++r) {
            if (r < m) {
                y[(unsigned long long)r * n + o] = from_f32<T>(acc[r]);
            }
        }
    }
}

template <typename T>
__device__ void gemv_t(const T* dy, unsigned int m, const uint8_t* packed, const float* code,
                       QuantScales scales, unsigned int n, unsigned int k, unsigned int blocksize,
                       T* dx) {
    __shared__ float s_code[16];
    load_code(code, s_code);
    const unsigned int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= k) {
        return;
    }
    float acc[QLORA_GEMV_MAX_ROWS];
#pragma unroll
    for (int r = 0; r < QLORA_GEMV_MAX_ROWS; ++r) {
        acc[r] = 0.0f;
    }
    const unsigned int shift = __ffs(blocksize) - 1;  // blocksizes are powers of two
    for (unsigned int o = 0; o < n; ++o) {
        const unsigned long long i = (unsigned long long)o * k + c;
        const float w = __fmul_rn(s_code[nibble_at(packed, i)], block_scale(scales, i >> shift));
#pragma unroll
        for (int r = 0; r < QLORA_GEMV_MAX_ROWS; ++r) {
            if (r < m) {
                acc[r] = fmaf(to_f32(dy[(unsigned long long)r * n + o]), w, acc[r]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < QLORA_GEMV_MAX_ROWS; ++r) {
        if (r < m) {
            dx[(unsigned long long)r * k + c] = from_f32<T>(acc[r]);
        }
    }
}

#define QLORA_GEMV(NAME, IMPL, T)                                                             \
    extern "C" __global__ void NAME(const T* x, unsigned int m, const uint8_t* packed,        \
                                    const float* code, const float* absmax,                   \
                                    const uint8_t* qabsmax, const float* nested,              \
                                    const float* dynamic, float offset, int double_quant,     \
                                    unsigned int n, unsigned int k, unsigned int blocksize,   \
                                    T* y) {                                                   \
        const QuantScales scales = {absmax, qabsmax, nested, dynamic, offset, double_quant};  \
        IMPL<T>(x, m, packed, code, scales, n, k, blocksize, y);                              \
    }

QLORA_GEMV(nf4_gemv_f32, gemv, float)
QLORA_GEMV(nf4_gemv_bf16, gemv, __nv_bfloat16)
QLORA_GEMV(nf4_gemv_f16, gemv, __half)
QLORA_GEMV(nf4_gemv_t_f32, gemv_t, float)
QLORA_GEMV(nf4_gemv_t_bf16, gemv_t, __nv_bfloat16)
QLORA_GEMV(nf4_gemv_t_f16, gemv_t, __half)
