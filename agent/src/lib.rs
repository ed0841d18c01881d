//! The pgwarden agent as a library: the binary (`main.rs`) parses its command line and runs
//! these parts; tests can drive them directly.

pub mod agent;
pub mod aws;
pub mod commands;
pub mod endpoints;
pub mod events;
pub mod guard;
pub mod http;
pub mod join;
pub mod lease;
pub mod netaddr;
pub mod pg;
pub mod raft;
pub mod server_link;
pub mod sys;
pub mod witness;

pub use pgwarden_pki::{certs, tls};
