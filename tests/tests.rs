//! The integration tests, one binary (as ripgrep's are): each module drives the built
//! `cachemoney` binary on the embedded sample corpus. One binary links once where twenty
//! linked the same dependencies twenty times; filter by module, e.g.
//! `cargo test --release --workspace --test integration remote::`.

mod common;

mod audit;
mod backtest;
mod bad_input;
mod cache_stages;
mod cheats;
mod checklist;
mod command;
mod crash;
mod docs;
mod hardening;
mod neural;
mod numerics;
mod pipeline;
mod ranks;
mod remote;
mod report;
mod sandbox;
mod scorers;
mod shards;
mod tilt;
