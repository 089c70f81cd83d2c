//! The `mfx` binary's integration tests, one module per command area, in
//! one test binary (as uv's `tests/it`): each `tests/*.rs` file is its own
//! crate, linked against the whole dependency graph, so eleven files were
//! eleven links of a release build; one binary is one.
//!
//! Test names keep their old stem as the module (`cli_run.rs`'s
//! `greedy_parity` is `run::greedy_parity`), so name filters such as
//! scripts/test.sh's `-- parity kernels` select the same tests.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns: a panic is the failure report

mod common;

mod bench;
mod budget;
mod eval;
mod families;
mod hub;
mod integrity;
mod kld;
mod merge;
mod output;
mod pack;
mod prep;
mod pressure;
mod run;
mod serve;
