//! The `impmesh` binary's library half: configuration, node wiring and the CLI's
//! account commands, kept here so tests can start whole nodes in-process.

#![forbid(unsafe_code)]

pub mod config;
pub mod control;
pub mod node;
pub mod remote;
pub mod users;
