//! Listeners: the only code that knows wire formats (MQTT packets, HTTP, gRPC).
//!
//! Each listener turns bytes into model types, asks `actors::Fleet` or `storage::Store` to act,
//! and turns the answer (or an `error::ErrorCode`) back into its wire's words.

pub mod grpc;
pub mod http;
pub mod ingest;
pub mod mqtt;
