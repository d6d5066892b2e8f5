//! A user's program as a pipeline step.
//!
//! [`process`] is how any program runs here (`pass1`'s scorers included): confined in a
//! private workspace with copies of its inputs, a timeout, a capped log. [`CommandStage`]
//! is the generic step built on it, `stage = "command"`, for the programs users of
//! make-like pipelines expect to run (DVC's `cmd`, Snakemake's `shell`): a `torchrun`
//! trainer, a tokenizer of their own, a report. Its outputs are declared in
//! `pipeline.toml`, so the pipeline checks wiring against them at load and holds what
//! the program wrote to them after the run, as it does a built-in stage's.

mod log;
mod outputs;
pub mod process;
mod stage;

pub use log::LOG_CAP;
pub use stage::{
    CommandParams, CommandReport, CommandStage, Declared, Network, Sandboxed, COMMAND_LOG, PROTOCOL,
};
