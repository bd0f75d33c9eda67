//! [`Collective`] over NCCL (through cudarc, as candle's multi-GPU examples do), one process
//! per GPU. Compiled with the `nccl` feature; it has not run on a GPU yet.
//!
//! The ranks agree on NCCL's unique id through a file: rank 0 creates the id and writes it
//! atomically, the others wait for it. The file is `QLORA_NCCL_ID_FILE`, or one named after the
//! launcher's job id in the temp folder (so ranks of one host find each other; ranks on several
//! hosts need `QLORA_NCCL_ID_FILE` on a shared file system).
//!
//! Each operation waits for the gradients' device to finish its queued work, runs on NCCL's
//! stream and waits for it: one synchronization per step, which next to a training step's
//! kernels costs little and keeps the ordering obvious.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::backend::BackendDevice;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Storage, Tensor};

use super::{Collective, DistributedError, LaunchEnv};

/// How long the other ranks wait for rank 0's id file.
const ID_WAIT: Duration = Duration::from_secs(300);

/// One rank of an NCCL communicator.
pub struct NcclCollective {
    comm: Comm,
    stream: Arc<CudaStream>,
    env: LaunchEnv,
}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("env", &self.env)
            .finish()
    }
}

fn op_err(op: &'static str, what: impl std::fmt::Debug) -> DistributedError {
    DistributedError::Op {
        engine: "NCCL",
        op,
        what: format!("{what:?}"),
    }
}

fn id_file() -> Result<PathBuf, DistributedError> {
    if let Ok(p) = std::env::var("QLORA_NCCL_ID_FILE") {
        return Ok(PathBuf::from(p));
    }
    let job = [
        "TORCHELASTIC_RUN_ID",
        "OMPI_MCA_ess_base_jobid",
        "SLURM_JOB_ID",
        "PMI_ID",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok())
    .ok_or_else(|| {
        DistributedError::Launch(
            "no job id in the environment to name the NCCL id file: set QLORA_NCCL_ID_FILE \
                 to a path all ranks can read (a fresh one per run)"
                .into(),
        )
    })?;
    let job: String = job
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    Ok(std::env::temp_dir().join(format!("qlora-nccl-{job}.id")))
}

fn exchange_id(rank: usize) -> Result<Id, DistributedError> {
    let path = id_file()?;
    if rank == 0 {
        let id = Id::new().map_err(|e| op_err("unique id", e))?;
        let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
        let write = || -> std::io::Result<()> {
            let dir = path.parent().unwrap_or(std::path::Path::new("."));
            let mut f = tempfile::NamedTempFile::new_in(dir)?;
            std::io::Write::write_all(&mut f, &bytes)?;
            f.persist(&path).map_err(|e| e.error)?;
            Ok(())
        };
        write()
            .map_err(|e| DistributedError::Launch(format!("writing {}: {e}", path.display())))?;
        return Ok(id);
    }
    let start = Instant::now();
    loop {
        if let Ok(bytes) = std::fs::read(&path) {
            if bytes.len() == 128 {
                let mut internal = [0 as std::ffi::c_char; 128];
                for (d, s) in internal.iter_mut().zip(&bytes) {
                    *d = *s as std::ffi::c_char;
                }
                return Ok(Id::uninit(internal));
            }
        }
        if start.elapsed() > ID_WAIT {
            return Err(DistributedError::Launch(format!(
                "rank {rank}: rank 0 wrote no NCCL id to {} within {} s",
                path.display(),
                ID_WAIT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl NcclCollective {
    /// Join the communicator of the job described by `env` on GPU `env.local_rank`.
    pub fn init(env: LaunchEnv) -> Result<Self, DistributedError> {
        let dev = CudaDevice::new_with_stream(env.local_rank)?;
        let stream = dev.cuda_stream();
        let id = exchange_id(env.rank)?;
        let comm = Comm::from_rank(stream.clone(), env.rank, env.world_size, id)
            .map_err(|e| op_err("init", e))?;
        Ok(Self { comm, stream, env })
    }

    /// `t` as a contiguous f32 device buffer, after the device's queued work is done.
    fn device_f32(&self, t: &Tensor) -> Result<(CudaSlice<f32>, CudaDevice), DistributedError> {
        let t = t.to_dtype(DType::F32)?.flatten_all()?.contiguous()?;
        let dev = t.device().as_cuda_device()?.clone();
        dev.synchronize()?;
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            return Err(DistributedError::Launch(
                "NCCL needs tensors on a CUDA device".into(),
            ));
        };
        let start = layout.start_offset();
        let src = cs
            .as_cuda_slice::<f32>()?
            .slice(start..start + t.elem_count());
        let copy = self
            .stream
            .clone_dtod(&src)
            .map_err(|e| op_err("copy", e))?;
        Ok((copy, dev))
    }

    fn finish(
        &self,
        out: CudaSlice<f32>,
        dev: CudaDevice,
        like: &Tensor,
    ) -> Result<Tensor, DistributedError> {
        self.stream.synchronize().map_err(|e| op_err("sync", e))?;
        let n = out.len();
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev));
        Ok(Tensor::from_storage(storage, n, BackpropOp::none(), false)
            .reshape(like.shape())?
            .to_dtype(like.dtype())?)
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.env.rank
    }
    fn world_size(&self) -> usize {
        self.env.world_size
    }
    fn engine(&self) -> &'static str {
        "NCCL"
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor, DistributedError> {
        let (mut buf, dev) = self.device_f32(t)?;
        self.comm
            .all_reduce_in_place(&mut buf, &ReduceOp::Sum)
            .map_err(|e| op_err("all-reduce", e))?;
        self.finish(buf, dev, t)
    }
    fn broadcast(&self, t: &Tensor) -> Result<Tensor, DistributedError> {
        let (mut buf, dev) = self.device_f32(t)?;
        self.comm
            .broadcast_in_place(&mut buf, 0)
            .map_err(|e| op_err("broadcast", e))?;
        self.finish(buf, dev, t)
    }
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<(), DistributedError> {
        let mut buf = self
            .stream
            .clone_htod(values)
            .map_err(|e| op_err("upload", e))?;
        self.comm
            .all_reduce_in_place(&mut buf, &ReduceOp::Sum)
            .map_err(|e| op_err("all-reduce", e))?;
        let out = self
            .stream
            .clone_dtoh(&buf)
            .map_err(|e| op_err("download", e))?;
        values.copy_from_slice(&out);
        Ok(())
    }
}
