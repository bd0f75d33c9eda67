//! Training: loss, the step, and the trainer loop.

pub mod checkpoint;
pub mod data_parallel;
pub mod device_loss;
pub mod layerwise;
pub mod llama_step;
pub mod loss;
pub mod plot;
pub mod recipe;
pub mod step;
pub mod trainer;
