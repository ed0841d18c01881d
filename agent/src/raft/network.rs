//! Raft traffic between agents: JSON over the agent API port (`/v1/raft/*`), authenticated
//! with the cluster's bearer token until mutual TLS between agents replaces it.

use super::TypeConfig;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;

type NodeId = u64;

/// Creates one client per peer.
#[derive(Clone)]
pub struct Network {
    pub http: reqwest::Client,
    pub token: String,
    /// `https` with mutual TLS when `[tls]` is configured, else `http`.
    pub scheme: &'static str,
}

impl Network {
    pub fn new(
        token: String,
        tls: Option<&pgwarden_core::config::TlsSection>,
    ) -> anyhow::Result<Network> {
        let timeout = Duration::from_secs(2);
        let (http, scheme) = match tls {
            Some(t) => (
                crate::tls::client(&t.ca_file, Some((&t.cert_file, &t.key_file)), timeout)?,
                "https",
            ),
            None => (
                reqwest::Client::builder()
                    .timeout(timeout)
                    .connect_timeout(Duration::from_millis(500))
                    .build()?,
                "http",
            ),
        };
        Ok(Network {
            http,
            token,
            scheme,
        })
    }
}

pub struct Peer {
    target: NodeId,
    addr: String,
    net: Network,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;
    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            target,
            addr: node.addr.clone(),
            net: self.clone(),
        }
    }
}

impl Peer {
    async fn call<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let url = format!("{}://{}/v1/raft/{path}", self.net.scheme, self.addr);
        let resp = self
            .net
            .http
            .post(url)
            .bearer_auth(&self.net.token)
            .timeout(timeout)
            .json(req)
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() || e.is_timeout() {
                    RPCError::Unreachable(Unreachable::new(&e))
                } else {
                    RPCError::Network(NetworkError::new(&e))
                }
            })?;
        if !resp.status().is_success() {
            let e = std::io::Error::other(format!("{path}: HTTP {}", resp.status()));
            return Err(RPCError::Network(NetworkError::new(&e)));
        }
        let res: Result<Resp, RaftError<NodeId, E>> = resp
            .json()
            .await
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call("append", &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call("snapshot", &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call("vote", &rpc, option.hard_ttl()).await
    }
}
