//! The installation's certificate authority and mutual TLS, shared by the agent and the
//! server: `certs` creates the CA, signs certificates and certificate requests; `tls` builds
//! the acceptors and clients and tells a handler who the peer is.

pub mod certs;
pub mod tls;
