//! [`Collective`] over MPI (the `mpi` crate on the system's Open MPI or MPICH), for CPU hosts.
//!
//! Sums are reduced onto rank 0 and broadcast from there rather than all-reduced: an
//! all-reduce may add in a different order on different ranks, and the ranks' adapters must
//! stay identical to the bit. MPI aborts the job on a failed operation (its default error
//! handler), so the operations here do not return MPI errors.

use std::fmt;

use candle_core::{DType, Tensor};
use mpi::collective::SystemOperation;
use mpi::datatype::Equivalence;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::{Collective, DistributedError};

/// The MPI world of this job; finalizes MPI when dropped.
pub struct MpiCollective {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    // Dropped last: finalizes MPI.
    _universe: Universe,
}

impl fmt::Debug for MpiCollective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MpiCollective")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish()
    }
}

impl MpiCollective {
    /// Initialize MPI (once per process) and join the job's world.
    pub fn init() -> Result<Self, DistributedError> {
        let universe = mpi::initialize().ok_or_else(|| DistributedError::Op {
            engine: "MPI",
            op: "init",
            what: "MPI was already initialized in this process".into(),
        })?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(Self {
            world,
            rank,
            size,
            _universe: universe,
        })
    }

    /// Sum `values` over all ranks: reduced onto rank 0, then broadcast from there.
    fn sum<T: Equivalence + Copy + Default>(&self, values: &mut [T]) {
        let root = self.world.process_at_rank(0);
        if self.rank == 0 {
            let mut out = vec![T::default(); values.len()];
            root.reduce_into_root(&*values, &mut out[..], SystemOperation::sum());
            values.copy_from_slice(&out);
        } else {
            root.reduce_into(&*values, SystemOperation::sum());
        }
        root.broadcast_into(values);
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn engine(&self) -> &'static str {
        "MPI"
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor, DistributedError> {
        let mut v = host_f32(t)?;
        self.sum(&mut v);
        like(v, t)
    }
    fn broadcast(&self, t: &Tensor) -> Result<Tensor, DistributedError> {
        let mut v = host_f32(t)?;
        self.world.process_at_rank(0).broadcast_into(&mut v[..]);
        like(v, t)
    }
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<(), DistributedError> {
        self.sum(values);
        Ok(())
    }
}

/// `t` as a flat f32 host vector (what the host-side engines send).
fn host_f32(t: &Tensor) -> Result<Vec<f32>, DistributedError> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// A host f32 vector back in `like`'s shape, dtype and device.
fn like(values: Vec<f32>, like: &Tensor) -> Result<Tensor, DistributedError> {
    Ok(
        Tensor::from_vec(values, like.shape(), &candle_core::Device::Cpu)?
            .to_dtype(like.dtype())?
            .to_device(like.device())?,
    )
}
