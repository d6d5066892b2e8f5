//! The record's GPT (algorithm.md §2–§4) on libtorch through tch.
//!
//! Pure compute: the model, its optimisers and training step, the FP16 export and the
//! sliding-window pass-1 scorer. The one exception is [`stages`], the worker side of the
//! `train` and `pass1 (model = "gpt")` stages, which reads and writes the stage's
//! directories (never the store) for the `cachemoney-gpt` worker binary.

pub mod export;
pub mod model;
pub mod optim;
pub mod score;
pub mod stages;
pub mod train;

/// The model's shape lives with the libtorch-free stage definitions, so the runner can
/// validate it without loading libtorch.
pub use gpt::config;

pub use config::{GptConfig, ShapeError};
pub use model::Gpt;
pub use train::{TokenStream, TrainConfig, Trainer};

#[cfg(test)]
mod testing;
