//! pcgate: a caching sidecar gateway for the Partner Center billing API.
#![forbid(unsafe_code)]

pub mod body;
pub mod error;
pub mod sandbox;
pub mod server;
