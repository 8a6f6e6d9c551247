//! Plain data and pure state machines: no I/O, no clock, no actors.
//!
//! Everything here takes the current time as an argument, so it can be tested exhaustively
//! without a runtime.

pub mod alert;
pub mod broadcast;
pub mod command;
pub mod downsample;
pub mod event;
pub mod ids;
pub mod orb;
pub mod query;
pub mod rate;
pub mod rule;
pub mod state_report;
pub mod telemetry;
pub mod tenant;
pub mod topics;

pub use ids::{IdError, OrbId, OrbKey, TenantId};
pub use telemetry::{PayloadError, TelemetryPoint};
