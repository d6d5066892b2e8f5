//! cachemoney's runner: the DAG of stages in `pipeline.toml`, the content-addressed
//! artifact store, and the commands that inspect both (status, explain, show, sql,
//! verify, gc).
//!
//! The runner knows stages only through the [`stage_api::Stage`] trait; what an n-gram
//! or a tokenizer is lives in the stage crates under `stages/`. Conversely, stages know
//! nothing of recipes, manifests or locks.

#[macro_use]
pub mod output;
pub mod audit;
pub mod chain;
pub mod commands;
pub mod durable;
pub mod filehash;
pub mod memory;
pub mod pipeline;
pub mod recipe;
pub mod registry;
pub mod remote;
pub mod report;
pub mod runner;
pub mod seeds;
pub mod sql;
pub mod store;
pub mod timestamps;
