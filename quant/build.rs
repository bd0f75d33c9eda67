//! With the `cuda` feature, compile `kernels/*.cu` to PTX (`$OUT_DIR/ptx.rs` holds one
//! `include_str!` constant per file). Without it, nothing: the CPU build needs no CUDA toolkit.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    ptx::build();
}

#[cfg(feature = "cuda")]
mod ptx {
    use std::path::PathBuf;

    /// nvcc for the arch in `CUDA_COMPUTE_CAP` (or nvidia-smi's), with the same flags candle
    /// uses for its own kernels. PTX is JIT-compiled by the driver for newer GPUs.
    pub fn build() {
        println!("cargo::rerun-if-changed=kernels");
        let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let result = cudaforge::KernelBuilder::new()
            .source_dir("kernels")
            .watch(["kernels/nf4_decode.cuh"])
            .arg("--expt-relaxed-constexpr")
            .arg("-std=c++17")
            .arg("-O3")
            .build_ptx()
            .and_then(|ptx| ptx.write(out_dir.join("ptx.rs")));
        if let Err(e) = result {
            panic!(
                "compiling quant/kernels/*.cu to PTX failed: {e}\n\
                 (is nvcc on PATH and CUDA_COMPUTE_CAP set? `source scripts/cuda-env.sh`)"
            );
        }
    }
}
