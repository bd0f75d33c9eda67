//! Training: loss, the step, and the trainer loop.

pub mod loss;
pub mod step;
