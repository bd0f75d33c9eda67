//! Data-parallel training over an existing collective engine: MPI between CPU hosts, NCCL
//! between GPUs. The trainer sees only [`Collective`]: sum the adapter gradients of all ranks,
//! broadcast rank 0's adapters so every rank starts from the same values, and let rank 0 alone
//! write. [`connect`] picks the engine from the launcher's environment (`mpirun -np N`, or one
//! process per GPU with `RANK` / `WORLD_SIZE` / `LOCAL_RANK` set as torchrun does).

use std::fmt;
use std::rc::Rc;

use candle_core::Tensor;

use crate::device::DeviceSpec;

#[cfg(feature = "mpi")]
mod mpi_engine;
#[cfg(feature = "nccl")]
mod nccl_engine;

/// Why a distributed run could not start or a collective failed.
#[derive(Debug, thiserror::Error)]
pub enum DistributedError {
    /// The engine the run needs is not in this binary.
    #[error(
        "--distributed on {device}: this qlora binary was built without {feature}; rebuild with \
         `cargo build --release --features {feature}` ({needs})"
    )]
    NotCompiled {
        /// The run's device.
        device: DeviceSpec,
        /// The cargo feature.
        feature: &'static str,
        /// What building with it needs.
        needs: &'static str,
    },
    /// The launcher's environment is missing or malformed.
    #[error("--distributed: {0}")]
    Launch(String),
    /// A collective operation failed.
    #[error("{engine} {op}: {what}")]
    Op {
        /// `MPI` or `NCCL`.
        engine: &'static str,
        /// The operation.
        op: &'static str,
        /// What went wrong.
        what: String,
    },
    /// A tensor could not be moved to or from the engine's buffers.
    #[error("{0}")]
    Tensor(#[from] candle_core::Error),
}

/// The collective operations data-parallel training needs, over all ranks of one job.
///
/// Every rank calls the same operations in the same order; results are identical on all ranks
/// (the engines reduce once and distribute the result), so the ranks' adapters stay equal bit
/// for bit without being compared.
pub trait Collective: fmt::Debug {
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// The engine's name for messages (`single`, `MPI`, `NCCL`).
    fn engine(&self) -> &'static str;
    /// Element-wise sum of `t` over all ranks (same shape, device and dtype on every rank),
    /// summed in f32 whatever `t`'s dtype.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor, DistributedError>;
    /// Rank 0's `t` on every rank (same shape and dtype on every rank).
    fn broadcast(&self, t: &Tensor) -> Result<Tensor, DistributedError>;
    /// Sum of host scalars over all ranks, in place.
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<(), DistributedError>;

    /// Whether this rank writes files (checkpoints, adapter, metrics, curves).
    fn writes(&self) -> bool {
        self.rank() == 0
    }
}

/// One process, no communication: what every run without `--distributed` uses.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn engine(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor, DistributedError> {
        Ok(t.clone())
    }
    fn broadcast(&self, t: &Tensor) -> Result<Tensor, DistributedError> {
        Ok(t.clone())
    }
    fn all_reduce_sum_f64(&self, _values: &mut [f64]) -> Result<(), DistributedError> {
        Ok(())
    }
}

/// Rank and world size as a launcher set them: Open MPI's `OMPI_COMM_WORLD_*`, MPICH / Slurm
/// (`PMI_RANK` / `PMI_SIZE`), or torchrun's `RANK` / `WORLD_SIZE` / `LOCAL_RANK`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchEnv {
    /// Global rank.
    pub rank: usize,
    /// Number of processes.
    pub world_size: usize,
    /// Rank among the processes on this host (picks the GPU).
    pub local_rank: usize,
}

impl LaunchEnv {
    /// Read the launcher's variables through `var` (`std::env::var` in a run).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, DistributedError> {
        let schemes: [[&str; 3]; 3] = [
            [
                "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK",
            ],
            ["PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"],
            ["RANK", "WORLD_SIZE", "LOCAL_RANK"],
        ];
        for [rank, size, local] in schemes {
            let Some(r) = var(rank) else { continue };
            let parse = |name: &str, v: Option<String>| -> Result<usize, DistributedError> {
                let v = v.ok_or_else(|| {
                    DistributedError::Launch(format!("{rank} is set but {name} is not"))
                })?;
                v.trim().parse().map_err(|_| {
                    DistributedError::Launch(format!("{name}={v:?} is not a whole number"))
                })
            };
            let env = LaunchEnv {
                rank: parse(rank, Some(r))?,
                world_size: parse(size, var(size))?,
                local_rank: match var(local) {
                    Some(l) => parse(local, Some(l))?,
                    None => 0,
                },
            };
            if env.world_size == 0 || env.rank >= env.world_size {
                return Err(DistributedError::Launch(format!(
                    "rank {} of a world of {} ({rank}, {size})",
                    env.rank, env.world_size
                )));
            }
            return Ok(env);
        }
        Err(DistributedError::Launch(
            "no launcher environment found: start the ranks with `mpirun -np N qlora train \
             --distributed ...` (CPU hosts, or one process per GPU), or set RANK, WORLD_SIZE and \
             LOCAL_RANK in each process as torchrun does"
                .into(),
        ))
    }
}

/// The collective for a `--distributed` run on `device`: MPI on the CPU, NCCL on CUDA (one
/// process per GPU; the device number is the launcher's local rank). Returns the engine and the
/// device this rank computes on.
pub fn connect(device: DeviceSpec) -> Result<(Rc<dyn Collective>, DeviceSpec), DistributedError> {
    match device {
        DeviceSpec::Cpu => connect_mpi(),
        DeviceSpec::Cuda(_) => connect_nccl(),
    }
}

#[cfg(feature = "mpi")]
fn connect_mpi() -> Result<(Rc<dyn Collective>, DeviceSpec), DistributedError> {
    let c = mpi_engine::MpiCollective::init()?;
    Ok((Rc::new(c), DeviceSpec::Cpu))
}

#[cfg(not(feature = "mpi"))]
fn connect_mpi() -> Result<(Rc<dyn Collective>, DeviceSpec), DistributedError> {
    Err(DistributedError::NotCompiled {
        device: DeviceSpec::Cpu,
        feature: "mpi",
        needs: "Open MPI's development files and libclang: scripts/mpi-check.sh installs them \
                from the distribution's packages",
    })
}

#[cfg(feature = "nccl")]
fn connect_nccl() -> Result<(Rc<dyn Collective>, DeviceSpec), DistributedError> {
    let env = LaunchEnv::from_vars(|k| std::env::var(k).ok())?;
    let device = DeviceSpec::Cuda(env.local_rank);
    let c = nccl_engine::NcclCollective::init(env)?;
    Ok((Rc::new(c), device))
}

#[cfg(not(feature = "nccl"))]
fn connect_nccl() -> Result<(Rc<dyn Collective>, DeviceSpec), DistributedError> {
    Err(DistributedError::NotCompiled {
        device: DeviceSpec::Cuda(0),
        feature: "nccl",
        needs: "the CUDA toolkit and NCCL: `source scripts/cuda-env.sh` with QLORA_CUDA_NCCL=1",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn launch_env_reads_open_mpi_then_torchrun_and_refuses_nonsense() {
        let ompi = [
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("RANK", "5"),
        ];
        let e = LaunchEnv::from_vars(vars(&ompi)).unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank), (1, 2, 1));
        let torchrun = [("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "3")];
        let e = LaunchEnv::from_vars(vars(&torchrun)).unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank), (3, 4, 3));
        let err = |p: &[(&str, &str)]| LaunchEnv::from_vars(vars(p)).unwrap_err().to_string();
        assert!(err(&[("RANK", "4"), ("WORLD_SIZE", "4")]).contains("rank 4 of a world of 4"));
        assert!(err(&[("RANK", "0")]).contains("WORLD_SIZE is not"));
        assert!(err(&[("RANK", "x"), ("WORLD_SIZE", "2")]).contains("RANK=\"x\""));
        assert!(err(&[]).contains("mpirun -np N"));
    }

    #[test]
    fn single_is_the_identity() {
        let t = Tensor::new(&[1f32, -2.5], &candle_core::Device::Cpu).unwrap();
        let s = Single;
        assert_eq!(
            s.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap(),
            [1.0, -2.5]
        );
        assert_eq!(
            s.broadcast(&t).unwrap().to_vec1::<f32>().unwrap(),
            [1.0, -2.5]
        );
        let mut v = [3.0];
        s.all_reduce_sum_f64(&mut v).unwrap();
        assert_eq!(v, [3.0]);
        assert!(s.writes() && s.world_size() == 1);
    }
}
