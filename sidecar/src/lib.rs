//! Vigie: a policy-decision sidecar. Cedar policies decide; every answer
//! carries its diagnostics. See `ARCHITECTURE.md` for the map.

pub mod app;
pub mod audit;
pub mod authzen;
pub mod cache;
pub mod canon;
pub mod cli;
pub mod config;
pub mod engine;
pub mod extauthz;
pub mod ledger;
pub mod metrics;
pub mod note;
pub mod plugin;
pub mod policy;
pub mod policytest;
pub mod reload;
pub mod server;
pub mod shape;
pub mod state;
pub mod telemetry;
pub mod verify;
