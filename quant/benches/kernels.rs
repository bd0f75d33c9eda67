//! Kernel benchmarks against same-run baselines, printed as one table.
//!
//! `cargo bench -p qlora-quant --bench kernels`. Every figure is the minimum over repeats, with
//! ours and the baseline measured alternately so a busy machine penalizes both alike.
//! `QLORA_BENCH=matmul,gemv,gemv-cycles,dequantize` runs a subset (`gemv-cycles`: the one-thread
//! cycle rows and the instruction floors only).

use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use half::bf16;
use qlora_quant::{cpu, nf4_linear, Nf4Tensor, QuantType, SourceDtype};
use rayon::prelude::*;

/// bitsandbytes 0.50.2 CPU dequantization of a 4096² NF4 weight (ANCHORS.md), G elements/s.
const BNB_DEQUANT_F32: f64 = 0.96;
const BNB_DEQUANT_BF16: f64 = 1.67;

struct Row {
    case: String,
    baseline: String,
    base: Option<f64>,
    ours: f64,
    unit: &'static str,
    target: String,
}

fn seconds(f: &mut dyn FnMut()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

/// Minimum time of `a` and of `b` over `reps` alternating runs, after one warm-up each.
fn min_pair(reps: usize, a: &mut dyn FnMut(), b: &mut dyn FnMut()) -> (f64, f64) {
    a();
    b();
    let (mut ta, mut tb) = (f64::MAX, f64::MAX);
    for _ in 0..reps {
        ta = ta.min(seconds(a));
        tb = tb.min(seconds(b));
    }
    (ta, tb)
}

fn min_time(reps: usize, f: &mut dyn FnMut()) -> f64 {
    f();
    (0..reps).map(|_| seconds(f)).fold(f64::MAX, f64::min)
}

/// Deterministic values in [-1, 1) (a hash, so no RNG state crosses threads).
fn values(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .into_par_iter()
        .map(|i| {
            let h = (i as u32 ^ seed.wrapping_mul(0x9e37_79b9)).wrapping_mul(0x85eb_ca6b);
            let h = (h ^ (h >> 13)).wrapping_mul(0xc2b2_ae35);
            (h >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

fn nf4(n: usize, k: usize, seed: u32) -> Nf4Tensor {
    Nf4Tensor::quantize(
        &values(n * k, seed),
        &[n, k],
        SourceDtype::F32,
        QuantType::Nf4,
        64,
        true,
    )
    .expect("quantize")
}

fn tensor(v: Vec<f32>, shape: (usize, usize)) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

fn matmul_rows(rows: &mut Vec<Row>) -> candle_core::Result<()> {
    let (m, n, k) = (512, 4096, 4096);
    let gflop = 2.0 * (m * n * k) as f64 / 1e9;
    let w = Arc::new(nf4(n, k, 1));
    // candle multiplies by the dequantized weight, so both compute the same product.
    let wd = tensor(w.dequantize_f32(), (n, k));
    let wt = wd.t()?.contiguous()?;
    let x = values(m * k, 2);
    let xt = tensor(x.clone(), (m, k));
    let mut y = vec![0f32; m * n];
    let reps = 7;

    // Both layouts candle could be handed; the faster is the baseline.
    let (t_view, t_contig) = min_pair(
        reps,
        &mut || drop(xt.matmul(&wd.t().unwrap()).unwrap()),
        &mut || drop(xt.matmul(&wt).unwrap()),
    );
    let (t_dense, layout) = if t_view <= t_contig {
        (t_view, "x·Wᵀ (transposed view)")
    } else {
        (t_contig, "x·Wᵀ (Wᵀ contiguous)")
    };
    let (_, t_ours) = min_pair(reps, &mut || drop(xt.matmul(&wt).unwrap()), &mut || {
        cpu::matmul_into(&x, m, &w, &mut y).unwrap()
    });
    rows.push(Row {
        case: format!("fused NF4 matmul ({m}×{k})·({n}×{k})ᵀ f32, GFLOP/s"),
        baseline: format!("candle dense f32 {layout}"),
        base: Some(gflop / t_dense),
        ours: gflop / t_ours,
        unit: "GFLOP/s",
        target: "≥ 0.9×".into(),
    });

    let dy = values(m * n, 3);
    let dyt = tensor(dy.clone(), (m, n));
    let mut dx = vec![0f32; m * k];
    let (t_dense, t_ours) = min_pair(reps, &mut || drop(dyt.matmul(&wd).unwrap()), &mut || {
        cpu::matmul_t_into(&dy, m, &w, &mut dx).unwrap()
    });
    rows.push(Row {
        case: format!("fused NF4 dx = dy·W ({m}×{n})·({n}×{k}) f32, GFLOP/s"),
        baseline: "candle dense f32 dy·W".into(),
        base: Some(gflop / t_dense),
        ours: gflop / t_ours,
        unit: "GFLOP/s",
        target: "≥ 0.9×".into(),
    });

    let xb = xt.to_dtype(DType::BF16)?;
    let wdb = wd.to_dtype(DType::BF16)?;
    let (t_dense, t_ours) = min_pair(
        reps,
        &mut || drop(xb.matmul(&wdb.t().unwrap()).unwrap()),
        &mut || drop(nf4_linear(&xb, &w).unwrap()),
    );
    rows.push(Row {
        case: format!("NF4 linear op, bf16 x ({m}×{k}), GFLOP/s"),
        baseline: "candle dense bf16 x·Wᵀ".into(),
        base: Some(gflop / t_dense),
        ours: gflop / t_ours,
        unit: "GFLOP/s",
        target: "".into(),
    });
    Ok(())
}

/// Sum of a 1 GiB f32 buffer on the rayon pool: the machine's sequential read bandwidth.
fn read_sum(buf: &[f32]) {
    let s: f32 = buf
        .par_chunks(1 << 16)
        .map(|c| {
            let mut lanes = [0f32; 16];
            for v in c.chunks_exact(16) {
                for l in 0..16 {
                    lanes[l] += v[l];
                }
            }
            lanes.iter().sum::<f32>()
        })
        .sum();
    std::hint::black_box(s);
}

/// Time per product of a loop over `count` distinct weights (so none is cached), min over reps.
fn cycled(count: usize, reps: usize, f: &mut dyn FnMut(usize)) -> f64 {
    let mut all = || (0..count).for_each(&mut *f);
    min_time(reps, &mut all) / count as f64
}

fn gemv_rows(rows: &mut Vec<Row>) -> candle_core::Result<()> {
    let (n, k) = (11008, 4096);
    let x = values(k, 4);
    let x16: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut y = vec![0f32; n];
    let mut y16 = vec![0f32; n];

    let first = nf4(n, k, 5);
    let bytes = first.packed().len();
    let count = (640usize << 20).div_ceil(bytes) + 1;
    let weights: Vec<Nf4Tensor> = (0..count).map(|_| first.clone()).collect();
    // Round-robin at a fine grain (one 64 MiB slice of the sum, one product of each kind,
    // ~1 ms each), the minimum of each kind kept: all three see the same moments of this
    // shared host, whose memory bandwidth moves by 1.5x from minute to minute.
    let buf = values(1 << 28, 9);
    let slices: Vec<&[f32]> = buf.chunks(1 << 24).collect();
    let mut best = [f64::MAX; 3];
    for round in 0..7 * count {
        let i = round % count;
        best[0] = best[0].min(seconds(&mut || read_sum(slices[round % slices.len()])));
        best[1] = best[1].min(seconds(&mut || {
            cpu::matmul_into(&x, 1, &weights[i], &mut y).unwrap()
        }));
        best[2] = best[2].min(seconds(&mut || {
            cpu::matmul_bf16_into(&x16, 1, &weights[(i + count / 2) % count], &mut y16).unwrap()
        }));
    }
    drop(slices);
    drop(buf);
    let bw = (4usize << 24) as f64 / best[0] / 1e9;
    let times = [best[0], best[1] * count as f64, best[2] * count as f64];
    let total = count * bytes;
    drop(weights);
    for (what, t) in [
        ("f32 x", times[1] / count as f64),
        (
            "bf16 x (W as bf16, bnb's bf16 compute)",
            times[2] / count as f64,
        ),
    ] {
        rows.push(Row {
            case: format!(
                "NF4 GEMV {what}, (1×{k})·({n}×{k})ᵀ, {count} weights = {} MiB cycled, GB/s of packed codes",
                total >> 20
            ),
            baseline: "read bandwidth: sum of f32, rayon, 64 MiB slices of 1 GiB".into(),
            base: Some(bw),
            ours: bytes as f64 / t / 1e9,
            unit: "GB/s",
            target: "≥ 0.8×".into(),
        });
        rows.push(Row {
            case: "  same, matvecs/s (= tokens/s through this one layer)".into(),
            baseline: "".into(),
            base: None,
            ours: 1.0 / t,
            unit: "1/s",
            target: "".into(),
        });
    }

    let xt = tensor(x.clone(), (1, k));
    let wd = tensor(values(n * k, 6), (n, k));
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4K] {
        let q = QTensor::quantize(&wd, dtype)?;
        let raw = q.data()?.into_owned();
        let qbytes = raw.len();
        let count = (640usize << 20).div_ceil(qbytes) + 1;
        let mats = (0..count)
            .map(|_| {
                QMatMul::from_qtensor(qtensor_from_ggml(dtype, &raw, vec![n, k], &Device::Cpu)?)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let t = cycled(count, 5, &mut |i| drop(mats[i].forward(&xt).unwrap()));
        rows.push(Row {
            case: format!("  candle QMatMul {dtype:?}, same shape, {count} weights cycled, GB/s"),
            baseline: "".into(),
            base: None,
            ours: qbytes as f64 / t / 1e9,
            unit: "GB/s",
            target: format!("{:.0} matvecs/s", 1.0 / t),
        });
    }
    Ok(())
}

/// Nanoseconds this thread has spent on a CPU (`clock_gettime(CLOCK_THREAD_CPUTIME_ID)`):
/// unlike wall time, it does not grow while other jobs hold the core.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn thread_cpu_ns() -> Option<u64> {
    const CLOCK_GETTIME: usize = 228;
    const CLOCK_THREAD_CPUTIME_ID: usize = 3;
    let mut ts = [0i64; 2];
    let ret: isize;
    // SAFETY: the clock_gettime system call writes one `struct timespec` (two i64) to `ts`.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") CLOCK_GETTIME as isize => ret,
            in("rdi") CLOCK_THREAD_CPUTIME_ID,
            in("rsi") ts.as_mut_ptr(),
            lateout("rcx") _, lateout("r11") _,
            options(nostack),
        );
    }
    (ret == 0).then(|| ts[0] as u64 * 1_000_000_000 + ts[1] as u64)
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn thread_cpu_ns() -> Option<u64> {
    None
}

/// The core clock in GHz, from this thread's CPU time over a chain of dependent 64-bit
/// multiplies (3 cycles each on every x86-64 core in use: Zen 3/4, Intel since Skylake). A chain
/// of `add reg, imm` is no clock: newer Intel cores fold such adds at rename, several per cycle
/// (that gave 15.7 GHz on one VM). Outside 0.5..7 GHz the calibration is not trusted and the
/// cycle rows are left out, with a note.
#[cfg(target_arch = "x86_64")]
fn core_ghz() -> Option<f64> {
    let muls: u64 = 1 << 28;
    let t0 = thread_cpu_ns()?;
    let mut left = muls / 4;
    let mut acc = 3u64;
    // SAFETY: register-only arithmetic.
    unsafe {
        std::arch::asm!(
            "2:",
            "imul {a}, {a}", "imul {a}, {a}", "imul {a}, {a}", "imul {a}, {a}",
            "sub {n}, 1",
            "jnz 2b",
            a = inout(reg) acc, n = inout(reg) left,
            options(nomem, nostack),
        );
    }
    std::hint::black_box((acc, left));
    let ghz = 3.0 * muls as f64 / (thread_cpu_ns()? - t0) as f64;
    if (0.5..7.0).contains(&ghz) {
        Some(ghz)
    } else {
        eprintln!(
            "kernels bench: the clock calibration gave {ghz:.2} GHz, not a core clock; the \
             cycle rows are left out"
        );
        None
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn core_ghz() -> Option<f64> {
    None
}

/// Core cycles per 64 bytes of codes of a one-thread GEMV (x (1, k), W n×k), from this thread's
/// CPU time and the calibrated clock, so other jobs on the machine do not inflate it: once with
/// W cycled out of cache (`weights` copies), once with one W that fits in L2 (compute only).
fn gemv_cycles(rows: &mut Vec<Row>) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("one-thread pool");
    pool.install(|| {
        let Some(ghz) = core_ghz() else {
            return;
        };
        for (n, k, total, what, bf) in [
            (11008, 4096, 640usize << 20, "out of cache", false),
            (256, 4096, 0, "in L2", false),
            (11008, 4096, 640usize << 20, "out of cache", true),
            (256, 4096, 0, "in L2", true),
        ] {
            let x = values(k, 4);
            let x16: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let mut y = vec![0f32; n];
            let first = nf4(n, k, 5);
            let bytes = first.packed().len();
            let count = total.div_ceil(bytes) + 1;
            let weights: Vec<Nf4Tensor> = (0..count).map(|_| first.clone()).collect();
            // Many short repeats, the best kept: a repeat that another job's time slice
            // disturbed (caches refilled after it) is slower, never faster.
            let passes = (8usize << 20).div_ceil(count * bytes);
            let reps = if total > 0 { 8 } else { 400 };
            let mut run = || {
                for w in &weights {
                    if bf {
                        cpu::matmul_bf16_into(&x16, 1, w, &mut y).unwrap();
                    } else {
                        cpu::matmul_into(&x, 1, w, &mut y).unwrap();
                    }
                }
            };
            run();
            let mut best = f64::MAX;
            for _ in 0..reps {
                let t0 = thread_cpu_ns().unwrap_or(0);
                for _ in 0..passes {
                    run();
                }
                let ns = thread_cpu_ns().unwrap_or(0).saturating_sub(t0) as f64;
                best = best.min(ns * ghz / (passes * count * bytes / 64) as f64);
            }
            rows.push(Row {
                case: format!(
                    "  one-thread NF4 GEMV {} (1×{k})·({n}×{k})ᵀ {what}, core cycles per 64 B of codes (CPU time × {ghz:.2} GHz)",
                    if bf { "bf16 x" } else { "f32 x" }
                ),
                baseline: "".into(),
                base: None,
                ours: best,
                unit: "cycles",
                target: "".into(),
            });
        }
    });
}

/// The instruction mix of one 128-weight chunk of each GEMV kernel, alone in a loop with x
/// and the codes in L1 (no memory traffic, scales or loop overhead): the cycles a chunk costs
/// at best on this core, i.e. the highest GB/s of codes one core can decode. Inline assembly,
/// so the compiler cannot reorder or drop any of it.
#[cfg(target_arch = "x86_64")]
fn gemv_floor(rows: &mut Vec<Row>) {
    let avx512 = is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512bf16");
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    let Some(ghz) = core_ghz() else {
        return;
    };
    #[repr(align(64))]
    struct Buf([u8; 1024]);
    let x = Buf([0; 1024]);
    let w = Buf([0; 1024]);
    let iters: u64 = 20_000_000;
    // SAFETY (both): the loops read 512 bytes of `x` and 264 of `w`, write registers only.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn f32_mix(x: *const u8, w: *const u8, n: u64) {
        std::arch::asm!(
            "vpxord zmm0, zmm0, zmm0", "vpxord zmm1, zmm1, zmm1", "vpxord zmm2, zmm2, zmm2",
            "vpxord zmm3, zmm3, zmm3", "vpxord zmm17, zmm17, zmm17",
            "2:",
            "vmovdqu32 zmm16, [{w}]",
            "vpsrld zmm8, zmm16, 4", "vpsrld zmm9, zmm16, 8", "vpsrld zmm10, zmm16, 12",
            "vpsrld zmm11, zmm16, 16", "vpsrld zmm12, zmm16, 20", "vpsrld zmm13, zmm16, 24",
            "vpsrld zmm14, zmm16, 28",
            "vpermps zmm20, zmm16, zmm17", "vpermps zmm21, zmm8, zmm17",
            "vpermps zmm22, zmm9, zmm17", "vpermps zmm23, zmm10, zmm17",
            "vpermps zmm24, zmm11, zmm17", "vpermps zmm25, zmm12, zmm17",
            "vpermps zmm26, zmm13, zmm17", "vpermps zmm27, zmm14, zmm17",
            "vfmadd231ps zmm0, zmm20, [{x}]", "vfmadd231ps zmm1, zmm21, [{x}+64]",
            "vfmadd231ps zmm2, zmm22, [{x}+128]", "vfmadd231ps zmm3, zmm23, [{x}+192]",
            "vfmadd231ps zmm0, zmm24, [{x}+256]", "vfmadd231ps zmm1, zmm25, [{x}+320]",
            "vfmadd231ps zmm2, zmm26, [{x}+384]", "vfmadd231ps zmm3, zmm27, [{x}+448]",
            "dec {n}", "jnz 2b",
            x = in(reg) x, w = in(reg) w, n = inout(reg) n => _,
            out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm8") _,
            out("zmm9") _, out("zmm10") _, out("zmm11") _, out("zmm12") _, out("zmm13") _,
            out("zmm14") _, out("zmm16") _, out("zmm17") _, out("zmm20") _, out("zmm21") _,
            out("zmm22") _, out("zmm23") _, out("zmm24") _, out("zmm25") _, out("zmm26") _,
            out("zmm27") _, options(nostack, readonly),
        );
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn bf16_mix(x: *const u8, w: *const u8, n: u64) {
        std::arch::asm!(
            "vpxord zmm0, zmm0, zmm0", "vpxord zmm1, zmm1, zmm1", "vpxord zmm2, zmm2, zmm2",
            "vpxord zmm3, zmm3, zmm3", "vpxord zmm17, zmm17, zmm17",
            "vpxord zmm18, zmm18, zmm18", "vpxord zmm19, zmm19, zmm19",
            "2:",
            "vmovdqu16 zmm16, [{w}]",
            "vmulps zmm24, zmm17, dword ptr [{w}+256]{{1to16}}",
            "vmulps zmm25, zmm17, dword ptr [{w}+260]{{1to16}}",
            "vcvtne2ps2bf16 zmm26, zmm25, zmm24",
            "vpsrlw zmm9, zmm16, 4", "vpsrlw zmm10, zmm16, 8", "vpsrlw zmm11, zmm16, 12",
            "vpternlogd zmm16, zmm18, zmm19, 0xEA", "vpermw zmm20, zmm16, zmm26",
            "vpternlogd zmm9, zmm18, zmm19, 0xEA", "vpermw zmm21, zmm9, zmm26",
            "vpternlogd zmm10, zmm18, zmm19, 0xEA", "vpermw zmm22, zmm10, zmm26",
            "vpternlogd zmm11, zmm18, zmm19, 0xEA", "vpermw zmm23, zmm11, zmm26",
            "vdpbf16ps zmm0, zmm20, [{x}]", "vdpbf16ps zmm1, zmm21, [{x}+64]",
            "vdpbf16ps zmm2, zmm22, [{x}+128]", "vdpbf16ps zmm3, zmm23, [{x}+192]",
            "dec {n}", "jnz 2b",
            x = in(reg) x, w = in(reg) w, n = inout(reg) n => _,
            out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm9") _,
            out("zmm10") _, out("zmm11") _, out("zmm16") _, out("zmm17") _, out("zmm18") _,
            out("zmm19") _, out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
            out("zmm24") _, out("zmm25") _, out("zmm26") _, options(nostack, readonly),
        );
    }
    // Each AVX2 mix: one 64-weight unit's instructions, run twice per iteration (128 weights).
    // SAFETY (all expansions): the loops read 256 bytes of `x` and 32 of `w`, write registers
    // only.
    macro_rules! avx2_mix {
        ($name:ident, $($unit:literal),+ $(,)?) => {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn $name(x: *const u8, w: *const u8, n: u64) {
                std::arch::asm!(
                    "vpxor ymm0, ymm0, ymm0", "vpxor ymm1, ymm1, ymm1", "vpxor ymm2, ymm2, ymm2",
                    "vpxor ymm3, ymm3, ymm3", "vpxor ymm11, ymm11, ymm11",
                    "vpxor ymm12, ymm12, ymm12", "vpxor ymm13, ymm13, ymm13",
                    "vpxor ymm14, ymm14, ymm14", "vpxor ymm15, ymm15, ymm15",
                    "2:",
                    $($unit),+,
                    $($unit),+,
                    "dec {n}", "jnz 2b",
                    x = in(reg) x, w = in(reg) w, n = inout(reg) n => _,
                    out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _, out("ymm4") _,
                    out("ymm5") _, out("ymm6") _, out("ymm7") _, out("ymm8") _, out("ymm9") _,
                    out("ymm10") _, out("ymm11") _, out("ymm12") _, out("ymm13") _,
                    out("ymm14") _, out("ymm15") _, options(nostack, readonly),
                );
            }
        };
    }
    avx2_mix!(
        f32_avx2_mix,
        "vmovdqu ymm8, [{w}]",
        "vpand ymm9, ymm8, ymm13",
        "vpsrlw ymm10, ymm8, 4",
        "vpand ymm10, ymm10, ymm13",
        "vpshufb ymm4, ymm14, ymm9",
        "vpshufb ymm5, ymm15, ymm9",
        "vpshufb ymm6, ymm12, ymm9",
        "vpshufb ymm7, ymm11, ymm9",
        "vpunpcklbw ymm8, ymm4, ymm5",
        "vpunpckhbw ymm4, ymm4, ymm5",
        "vpunpcklbw ymm5, ymm6, ymm7",
        "vpunpckhbw ymm6, ymm6, ymm7",
        "vpunpcklwd ymm7, ymm8, ymm5",
        "vpunpckhwd ymm8, ymm8, ymm5",
        "vpunpcklwd ymm5, ymm4, ymm6",
        "vpunpckhwd ymm4, ymm4, ymm6",
        "vfmadd231ps ymm0, ymm7, [{x}+0]",
        "vfmadd231ps ymm1, ymm8, [{x}+32]",
        "vfmadd231ps ymm2, ymm5, [{x}+64]",
        "vfmadd231ps ymm3, ymm4, [{x}+96]",
        "vpshufb ymm4, ymm14, ymm10",
        "vpshufb ymm5, ymm15, ymm10",
        "vpshufb ymm6, ymm12, ymm10",
        "vpshufb ymm7, ymm11, ymm10",
        "vpunpcklbw ymm8, ymm4, ymm5",
        "vpunpckhbw ymm4, ymm4, ymm5",
        "vpunpcklbw ymm5, ymm6, ymm7",
        "vpunpckhbw ymm6, ymm6, ymm7",
        "vpunpcklwd ymm7, ymm8, ymm5",
        "vpunpckhwd ymm8, ymm8, ymm5",
        "vpunpcklwd ymm5, ymm4, ymm6",
        "vpunpckhwd ymm4, ymm4, ymm6",
        "vfmadd231ps ymm0, ymm7, [{x}+128]",
        "vfmadd231ps ymm1, ymm8, [{x}+160]",
        "vfmadd231ps ymm2, ymm5, [{x}+192]",
        "vfmadd231ps ymm3, ymm4, [{x}+224]",
    );
    avx2_mix!(
        f32_avx2_vpermps_mix,
        "vmovdqu ymm8, [{w}]",
        "vpslld ymm10, ymm8, 28",
        "vpermps ymm11, ymm8, ymm14",
        "vpermps ymm12, ymm8, ymm15",
        "vblendvps ymm11, ymm11, ymm12, ymm10",
        "vfmadd231ps ymm0, ymm11, [{x}+0]",
        "vpsrld ymm9, ymm8, 4",
        "vpslld ymm10, ymm8, 24",
        "vpermps ymm11, ymm9, ymm14",
        "vpermps ymm12, ymm9, ymm15",
        "vblendvps ymm11, ymm11, ymm12, ymm10",
        "vfmadd231ps ymm1, ymm11, [{x}+32]",
        "vpsrld ymm9, ymm8, 8",
        "vpslld ymm10, ymm8, 20",
        "vpermps ymm11, ymm9, ymm14",
        "vpermps ymm12, ymm9, ymm15",
        "vblendvps ymm11, ymm11, ymm12, ymm10",
        "vfmadd231ps ymm2, ymm11, [{x}+64]",
        "vpsrld ymm9, ymm8, 12",
        "vpslld ymm10, ymm8, 16",
        "vpermps ymm11, ymm9, ymm14",
        "vpermps ymm12, ymm9, ymm15",
        "vblendvps ymm11, ymm11, ymm12, ymm10",
        "vfmadd231ps ymm3, ymm11, [{x}+96]",
        "vpsrld ymm9, ymm8, 16",
        "vpslld ymm10, ymm8, 12",
        "vpermps ymm11, ymm9, ymm14",
        "vpermps ymm12, ymm9, ymm15",
        "vblendvps ymm11, ymm11, ymm12, ymm10",
        "vfmadd231ps ymm0, ymm11, [{x}+128]",
        "vpsrld ymm9, ymm8, 20",
        "vpslld ymm10, ymm8, 8",
        "vpermps ymm11, ymm9, ymm14",
        "vpermps ymm12, ymm9, ymm15",
        "vblendvps ymm11, ymm11, ymm12, ymm10",
        "vfmadd231ps ymm1, ymm11, [{x}+160]",
        "vpsrld ymm9, ymm8, 24",
        "vpslld ymm10, ymm8, 4",
        "vpermps ymm11, ymm9, ymm14",
        "vpermps ymm12, ymm9, ymm15",
        "vblendvps ymm11, ymm11, ymm12, ymm10",
        "vfmadd231ps ymm2, ymm11, [{x}+192]",
        "vpsrld ymm9, ymm8, 28",
        "vpermps ymm11, ymm9, ymm14",
        "vpermps ymm12, ymm9, ymm15",
        "vblendvps ymm11, ymm11, ymm12, ymm8",
        "vfmadd231ps ymm3, ymm11, [{x}+224]",
    );
    type Mix = unsafe fn(*const u8, *const u8, u64);
    let mut mixes: Vec<(&str, Mix)> = Vec::new();
    if avx512 {
        mixes.push((
            "AVX-512 f32 x: 7 shifts, 8 vpermps, 8 FMAs",
            |x, w, n| unsafe { f32_mix(x, w, n) },
        ));
        mixes.push((
            "AVX-512 bf16 x: 3 shifts, 4 ternlog, 4 vpermw, 2 mul + 1 cvt (table), 4 vdpbf16ps",
            |x, w, n| unsafe { bf16_mix(x, w, n) },
        ));
    }
    if avx2 {
        mixes.push((
            "AVX2 f32 x (kernel): 2 × (3 and/shift, 8 vpshufb, 16 unpacks, 8 FMAs)",
            |x, w, n| unsafe { f32_avx2_mix(x, w, n) },
        ));
        mixes.push((
            "AVX2 f32 x, not used: 14 shifts, 32 vpermps, 16 blends, 16 FMAs",
            |x, w, n| unsafe { f32_avx2_vpermps_mix(x, w, n) },
        ));
    }
    for (what, mix) in mixes {
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t0 = thread_cpu_ns().unwrap_or(0);
            // SAFETY: each mix was only chosen if the CPU has its features (checked above); see
            // the functions.
            unsafe { mix(x.0.as_ptr(), w.0.as_ptr(), iters) };
            let ns = thread_cpu_ns().unwrap_or(0).saturating_sub(t0) as f64;
            best = best.min(ns * ghz / iters as f64);
        }
        rows.push(Row {
            case: format!(
                "  instruction floor of one 128-weight chunk in L1, {what}, cycles (= {:.1} GB/s per core at {ghz:.2} GHz)",
                64.0 * ghz / best
            ),
            baseline: "".into(),
            base: None,
            ours: best,
            unit: "cycles",
            target: "".into(),
        });
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn gemv_floor(_rows: &mut Vec<Row>) {}

fn dequantize_rows(rows: &mut Vec<Row>) {
    let (n, k) = (4096, 4096);
    let w = nf4(n, k, 7);
    let mut out = vec![0f32; n * k];
    let t = min_time(15, &mut || cpu::dequantize_into(&w, &mut out));
    let g = (n * k) as f64 / t / 1e9;
    rows.push(Row {
        case: format!(
            "dequantize {n}×{k} NF4 → f32, G elements/s ({:.1} GB/s written)",
            g * 4.0
        ),
        baseline: "bitsandbytes 0.50.2 (ANCHORS.md)".into(),
        base: Some(BNB_DEQUANT_F32),
        ours: g,
        unit: "G/s",
        target: "≥ 5×".into(),
    });
    drop(out);
    let mut out = vec![bf16::ZERO; n * k];
    let t = min_time(15, &mut || cpu::dequantize_bf16_into(&w, &mut out));
    let g = (n * k) as f64 / t / 1e9;
    rows.push(Row {
        case: format!(
            "dequantize {n}×{k} NF4 → bf16, G elements/s ({:.1} GB/s written)",
            g * 2.0
        ),
        baseline: "bitsandbytes 0.50.2 (ANCHORS.md)".into(),
        base: Some(BNB_DEQUANT_BF16),
        ours: g,
        unit: "G/s",
        target: "≥ 5×".into(),
    });
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn main() -> candle_core::Result<()> {
    let only = std::env::var("QLORA_BENCH").unwrap_or_default();
    let run = |name: &str| only.is_empty() || only.split(',').any(|s| s == name);
    let load_before = load_average();
    let start = Instant::now();
    let mut rows = Vec::new();
    if run("matmul") {
        matmul_rows(&mut rows)?;
    }
    if run("gemv") {
        gemv_rows(&mut rows)?;
    }
    if run("gemv") || run("gemv-cycles") {
        gemv_cycles(&mut rows);
        gemv_floor(&mut rows);
    }
    if run("dequantize") {
        dequantize_rows(&mut rows);
    }
    println!(
        "\nqlora-quant kernels: {} rayon threads, min over repeats; load average {load_before} before, {} after; {:.0} s",
        rayon::current_num_threads(),
        load_average(),
        start.elapsed().as_secs_f64()
    );
    println!("| case | baseline | baseline | ours | ours / baseline | target |");
    println!("| --- | --- | ---: | ---: | ---: | --- |");
    for r in &rows {
        let (base, ratio) = match r.base {
            Some(b) => (format!("{b:.2} {}", r.unit), format!("{:.2}×", r.ours / b)),
            None => (String::new(), String::new()),
        };
        println!(
            "| {} | {} | {} | {:.2} {} | {} | {} |",
            r.case, r.baseline, base, r.ours, r.unit, ratio, r.target
        );
    }
    Ok(())
}
