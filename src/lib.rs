//! The `impmesh` binary's library half: configuration, node wiring and the CLI's
//! account commands, kept here so tests can start whole nodes in-process.

#![forbid(unsafe_code)]

/// mimalloc rather than the C library's allocator: a node's work is many small,
/// short-lived allocations spread over threads (stanzas, directory pages, query
/// arguments), where glibc's malloc spent ≈ 15 % of a mesh cold start's CPU in its own
/// bookkeeping (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod config;
pub mod control;
pub mod files;
pub mod media;
pub mod node;
pub mod remote;
pub mod users;
