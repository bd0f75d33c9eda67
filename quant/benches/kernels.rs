use half::bf16;
use qlora_quant::{cpu, Nf4Tensor, QuantType, SourceDtype};
use rayon::prelude::*;
use std::time::Instant;

fn best<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    f();
    let mut b = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        f();
        b = b.min(t.elapsed().as_secs_f64());
    }
    b
}

fn main() {
    let n = 4096usize;
    let k = 4096usize;
    let data: Vec<f32> = (0..n * k)
        .map(|i| ((i as u32).wrapping_mul(2654435761) >> 8) as f32 / (1u32 << 24) as f32 - 0.5)
        .collect();
    let w =
        Nf4Tensor::quantize(&data, &[n, k], SourceDtype::F32, QuantType::Nf4, 64, true).unwrap();
    let mut out = vec![0f32; n * k];
    let mut outb = vec![bf16::ZERO; n * k];
    for _ in 0..3 {
        let t = best(10, || cpu::dequantize_into(&w, &mut out));
        println!(
            "deq f32  {:.2} G/s  {:.1} GB/s",
            (n * k) as f64 / t / 1e9,
            (n * k * 4) as f64 / t / 1e9
        );
        let t = best(10, || cpu::dequantize_bf16_into(&w, &mut outb));
        println!(
            "deq bf16 {:.2} G/s  {:.1} GB/s",
            (n * k) as f64 / t / 1e9,
            (n * k * 2) as f64 / t / 1e9
        );
        let big = vec![1f32; 1 << 28];
        let t = best(5, || {
            let s: f32 = big.par_chunks(1 << 20).map(|c| c.iter().sum::<f32>()).sum();
            std::hint::black_box(s);
        });
        println!("read bw {:.1} GB/s", (big.len() * 4) as f64 / t / 1e9);
    }
}
