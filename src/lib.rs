//! llm-gateway: a multi-tenant LLM inference gateway on Cloudflare Pingora.
//!
//! The library is split by concern; `main.rs` only parses the command line.

pub mod accounting;
pub mod admin;
pub mod alerts;
pub mod audit;
pub mod auth;
pub mod breaker;
pub mod cache;
pub mod config;
pub mod demo;
pub mod error;
pub mod inflight;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod mock;
pub mod providers;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod tls;
