//! OrbManager: the fleet control plane library behind the `orbmanager` binary.
//!
//! The binary is a thin shell (`src/main.rs`); everything a test or a bench needs to start a
//! real server, open a store or drive a simulated fleet lives here. See ARCHITECTURE.md for the
//! map and the invariants.
#![forbid(unsafe_code)] // the library has none; the binary's one exception is in src/main.rs

pub mod actors;
pub mod api;
pub mod app;
pub mod auth;
pub mod broker;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod demo;
pub mod error;
pub mod events;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod net;
pub mod pki;
pub mod search;
pub mod sim;
pub mod storage;
pub mod stream;
pub mod webhooks;
