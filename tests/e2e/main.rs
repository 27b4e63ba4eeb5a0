#![allow(clippy::unwrap_used, clippy::expect_used)]
//! End-to-end tests: each starts the real `vigie` binary on 127.0.0.1 with a
//! free port (or runs one of its commands) and checks what a user would see.
//! One test binary, a module per topic.

mod api;
mod authzen;
mod cache;
mod cli;
mod deploy;
mod differential;
mod extauthz;
mod log;
mod plugins;
mod reload;
mod support;
mod telemetry;
