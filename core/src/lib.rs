//! pgwarden's pure core: domain types, API types and the decisions, with no I/O and no clock
//! of its own, so that it compiles to wasm and most tests can live here.

pub mod api;
pub mod candidate;
pub mod config;
pub mod control;
pub mod decide;
pub mod duration;
pub mod dynconfig;
pub mod elect;
pub mod endpoints;
pub mod event;
pub mod health;
pub mod lease;
pub mod lsn;
pub mod metrics;
pub mod pgtext;
pub mod record;
pub mod server_config;
pub mod status;
pub mod sync;
pub mod timefmt;

pub use lsn::Lsn;
