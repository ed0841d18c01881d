//! The EC2 API calls of the agent, over aws-sdk-ec2: moving the secondary private IP, the
//! Elastic IP and the route-table overlay IP to this node's ENI, fencing an old primary, and
//! checking with DryRun calls that the instance role allows all of it.
//!
//! Policy: the default credential chain (the instance role through IMDS on EC2), the standard
//! retry mode (5 attempts, exponential backoff with full jitter from 200 ms up to 5 s, which
//! retries throttling codes such as `RequestLimitExceeded` and 5xx answers), 10 s per attempt.
//! Nothing here polls in the steady state: `DescribeInstances` is only called while a fence
//! waits for the instance to stop.
//!
//! Every SDK operation called in this file must be listed in [`EC2_ACTIONS`] and granted by
//! `deploy/aws/iam-policy.json`; `agent/tests/iam_policy.rs` scans this file to check it.

use std::fmt;
use std::time::{Duration, Instant};

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::InstanceStateName;
use pgwarden_core::config::{AwsSection, Fencing};
use serde::{Deserialize, Serialize};

use super::imds::Identity;

/// Every EC2 API action this module calls.
pub const EC2_ACTIONS: &[&str] = &[
    "AssignPrivateIpAddresses",
    "UnassignPrivateIpAddresses",
    "AssociateAddress",
    "ReplaceRoute",
    "CreateRoute",
    "StopInstances",
    "StartInstances",
    "DescribeInstances",
];

const DEFAULT_METADATA_ENDPOINT: &str = "http://169.254.169.254";
const MAX_ATTEMPTS: u32 = 5;
const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a fence looks at the instance while it waits for `stopped`.
const FENCE_POLL: Duration = Duration::from_millis(500);

/// Error codes that mean the caller lacks a permission.
const PERMISSION_CODES: &[&str] = &["UnauthorizedOperation", "AccessDenied", "AuthFailure"];
/// Error codes that mean "slow down" (the SDK retried them; these are what is left).
const THROTTLE_CODES: &[&str] = &["RequestLimitExceeded", "Throttling", "ThrottlingException"];

/// A failed EC2 call, with the IAM action it was.
#[derive(Clone, Debug, PartialEq)]
pub enum AwsError {
    /// The role lacks the action. `message` is `<code>: <AWS's message>`.
    Permission {
        action: String,
        message: String,
    },
    /// Throttled (or 5xx) after the SDK's retries were exhausted.
    Throttled {
        action: String,
        message: String,
    },
    Other {
        action: String,
        message: String,
    },
}

impl AwsError {
    pub fn action(&self) -> &str {
        match self {
            AwsError::Permission { action, .. }
            | AwsError::Throttled { action, .. }
            | AwsError::Other { action, .. } => action,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            AwsError::Permission { message, .. }
            | AwsError::Throttled { message, .. }
            | AwsError::Other { message, .. } => message,
        }
    }

    /// The AWS error code, when the service answered with one.
    pub fn code(&self) -> Option<&str> {
        self.message()
            .split_once(": ")
            .map(|(c, _)| c)
            .filter(|c| !c.is_empty() && !c.contains(' '))
    }

    fn other(action: &str, message: impl Into<String>) -> AwsError {
        AwsError::Other {
            action: action.into(),
            message: message.into(),
        }
    }

    /// Classifies an SDK error of the call `action`.
    fn from_sdk<E>(action: &str, err: SdkError<E, HttpResponse>) -> AwsError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let code = err.code().map(str::to_string);
        let status = err.raw_response().map(|r| r.status().as_u16());
        let message = match &code {
            Some(c) => format!("{c}: {}", err.message().unwrap_or("(no message)")),
            None => DisplayErrorContext(&err).to_string(),
        };
        let action = action.to_string();
        match code.as_deref() {
            Some(c) if PERMISSION_CODES.contains(&c) => AwsError::Permission { action, message },
            Some(c) if THROTTLE_CODES.contains(&c) => AwsError::Throttled { action, message },
            _ if status.is_some_and(|s| s >= 500) => AwsError::Throttled { action, message },
            _ => AwsError::Other { action, message },
        }
    }
}

impl fmt::Display for AwsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AwsError::Permission { action, message } => write!(
                f,
                "ec2:{action} is not permitted ({}): grant ec2:{action} to the agent's IAM role \
                 (see deploy/aws/iam-policy.json)",
                self.code().unwrap_or(message)
            ),
            AwsError::Throttled { action, message } => write!(
                f,
                "ec2:{action} was throttled by EC2 and still failed after {MAX_ATTEMPTS} \
                 attempts: {message}"
            ),
            AwsError::Other { action, message } => write!(f, "ec2:{action} failed: {message}"),
        }
    }
}

impl std::error::Error for AwsError {}

/// The result of a fence.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FenceOutcome {
    pub instance_id: String,
    /// `"stop"` or `"reboot"` (`"none"` when fencing is off and nothing was done).
    pub action: &'static str,
    /// The instance's state when the fence ended (`stopped`, `terminated`, or `pending`
    /// after the start of a reboot).
    pub final_state: String,
    pub elapsed_ms: u64,
}

/// Whether the role may call one action, found with a DryRun call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PermissionCheck {
    pub action: String,
    pub allowed: bool,
    pub error: Option<String>,
}

/// The EC2 client of the agent.
#[derive(Clone, Debug)]
pub struct Ec2 {
    client: aws_sdk_ec2::Client,
}

impl Ec2 {
    /// A client for `region`, at `cfg.endpoint_url` when set. Credentials come from the
    /// default chain (environment, profile, web identity, container, then the instance role
    /// through IMDS at `cfg.metadata_endpoint`).
    pub async fn new(cfg: &AwsSection, region: &str) -> Ec2 {
        let region = Region::new(region.to_string());
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let provider_config = aws_config::provider_config::ProviderConfig::default()
            .with_http_client(http.clone())
            .with_region(Some(region.clone()));
        let credentials =
            aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
                .region(region.clone())
                .imds_client(imds_client(cfg, &provider_config))
                .configure(provider_config)
                .build()
                .await;
        let retry = RetryConfig::standard()
            .with_max_attempts(MAX_ATTEMPTS)
            .with_initial_backoff(INITIAL_BACKOFF)
            .with_max_backoff(MAX_BACKOFF);
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .operation_attempt_timeout(ATTEMPT_TIMEOUT)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(region)
            .http_client(http)
            .credentials_provider(credentials)
            .retry_config(retry)
            .timeout_config(timeouts);
        if let Some(url) = &cfg.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let shared = loader.load().await;
        Ec2 {
            client: aws_sdk_ec2::Client::new(&shared),
        }
    }

    /// Moves `ip` to `eni_id` (from whichever ENI of the subnet holds it).
    pub async fn assign_secondary_ip(&self, eni_id: &str, ip: &str) -> Result<(), AwsError> {
        const ACTION: &str = "AssignPrivateIpAddresses";
        // The API has no DryRun parameter: see `check_permissions`.
        self.client
            .assign_private_ip_addresses()
            .network_interface_id(eni_id)
            .private_ip_addresses(ip)
            .allow_reassignment(true)
            .send()
            .await
            .map(drop)
            .map_err(|e| AwsError::from_sdk(ACTION, e))
    }

    /// Removes `ip` from `eni_id`; an address that is not there is fine.
    pub async fn unassign_secondary_ip(&self, eni_id: &str, ip: &str) -> Result<(), AwsError> {
        match self.unassign(eni_id, ip).await {
            Err(e) if is_not_assigned(&e) => {
                tracing::debug!(eni = eni_id, ip, "address already not on the interface");
                Ok(())
            }
            other => other,
        }
    }

    async fn unassign(&self, eni_id: &str, ip: &str) -> Result<(), AwsError> {
        const ACTION: &str = "UnassignPrivateIpAddresses";
        // The API has no DryRun parameter: see `check_permissions`.
        self.client
            .unassign_private_ip_addresses()
            .network_interface_id(eni_id)
            .private_ip_addresses(ip)
            .send()
            .await
            .map(drop)
            .map_err(|e| AwsError::from_sdk(ACTION, e))
    }

    /// Points the Elastic IP at `private_ip` on `eni_id`, taking it from wherever it was.
    pub async fn associate_elastic_ip(
        &self,
        allocation_id: &str,
        eni_id: &str,
        private_ip: &str,
    ) -> Result<(), AwsError> {
        self.associate(allocation_id, eni_id, private_ip, false)
            .await
    }

    async fn associate(
        &self,
        allocation_id: &str,
        eni_id: &str,
        private_ip: &str,
        dry_run: bool,
    ) -> Result<(), AwsError> {
        const ACTION: &str = "AssociateAddress";
        self.client
            .associate_address()
            .allocation_id(allocation_id)
            .network_interface_id(eni_id)
            .private_ip_address(private_ip)
            .allow_reassociation(true)
            .dry_run(dry_run)
            .send()
            .await
            .map(drop)
            .map_err(|e| AwsError::from_sdk(ACTION, e))
    }

    /// Points `destination_cidr` in `route_table_id` at `eni_id`, creating the route if the
    /// table has none for that destination.
    pub async fn point_route(
        &self,
        route_table_id: &str,
        destination_cidr: &str,
        eni_id: &str,
    ) -> Result<(), AwsError> {
        match self
            .replace_route(route_table_id, destination_cidr, eni_id, false)
            .await
        {
            Err(e) if is_missing_route(&e) => {
                tracing::info!(
                    route_table = route_table_id,
                    destination = destination_cidr,
                    "no route yet; creating it"
                );
                self.create_route(route_table_id, destination_cidr, eni_id, false)
                    .await
            }
            other => other,
        }
    }

    async fn replace_route(
        &self,
        route_table_id: &str,
        destination_cidr: &str,
        eni_id: &str,
        dry_run: bool,
    ) -> Result<(), AwsError> {
        const ACTION: &str = "ReplaceRoute";
        self.client
            .replace_route()
            .route_table_id(route_table_id)
            .destination_cidr_block(destination_cidr)
            .network_interface_id(eni_id)
            .dry_run(dry_run)
            .send()
            .await
            .map(drop)
            .map_err(|e| AwsError::from_sdk(ACTION, e))
    }

    async fn create_route(
        &self,
        route_table_id: &str,
        destination_cidr: &str,
        eni_id: &str,
        dry_run: bool,
    ) -> Result<(), AwsError> {
        const ACTION: &str = "CreateRoute";
        self.client
            .create_route()
            .route_table_id(route_table_id)
            .destination_cidr_block(destination_cidr)
            .network_interface_id(eni_id)
            .dry_run(dry_run)
            .send()
            .await
            .map(drop)
            .map_err(|e| AwsError::from_sdk(ACTION, e))
    }

    /// Stops `instance_id` (forced) and waits, at most `timeout`, until it is `stopped`; for
    /// [`Fencing::Reboot`] it is then started again (without waiting for `running`). An
    /// instance already stopped or terminated counts as fenced.
    pub async fn fence(
        &self,
        instance_id: &str,
        mode: Fencing,
        timeout: Duration,
    ) -> Result<FenceOutcome, AwsError> {
        let started = Instant::now();
        let action = match mode {
            Fencing::None => {
                return Ok(FenceOutcome {
                    instance_id: instance_id.into(),
                    action: "none",
                    final_state: "not fenced".into(),
                    elapsed_ms: 0,
                })
            }
            Fencing::Stop => "stop",
            Fencing::Reboot => "reboot",
        };
        let deadline = tokio::time::Instant::from_std(started + timeout);
        let stopped = self.stop_and_wait(instance_id, deadline, timeout).await?;
        let final_state = if mode == Fencing::Reboot && stopped == "stopped" {
            match self.start(instance_id, false).await {
                Ok(s) => s,
                Err(e) => {
                    // The old primary is stopped, which is what fencing is for; it stays down.
                    tracing::warn!(instance = instance_id, error = %e, "fenced, but could not start the instance again");
                    stopped
                }
            }
        } else {
            stopped
        };
        Ok(FenceOutcome {
            instance_id: instance_id.into(),
            action,
            final_state,
            elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// Force-stops the instance; returns the state EC2 reports after the call.
    async fn stop(&self, instance_id: &str, dry_run: bool) -> Result<String, AwsError> {
        const ACTION: &str = "StopInstances";
        let out = self
            .client
            .stop_instances()
            .instance_ids(instance_id)
            .force(true)
            .dry_run(dry_run)
            .send()
            .await;
        match out {
            Ok(out) => Ok(out
                .stopping_instances()
                .iter()
                .find(|c| c.instance_id() == Some(instance_id))
                .and_then(|c| c.current_state())
                .and_then(|s| s.name())
                .map(|n| n.as_str().to_string())
                .unwrap_or_else(|| "unknown".into())),
            Err(e) => {
                let err = AwsError::from_sdk(ACTION, e);
                if err.code() == Some("IncorrectInstanceState") {
                    // Terminated or shutting down: whether that counts is decided by its state.
                    return self.instance_state(instance_id).await;
                }
                Err(err)
            }
        }
    }

    async fn start(&self, instance_id: &str, dry_run: bool) -> Result<String, AwsError> {
        const ACTION: &str = "StartInstances";
        let out = self
            .client
            .start_instances()
            .instance_ids(instance_id)
            .dry_run(dry_run)
            .send()
            .await
            .map_err(|e| AwsError::from_sdk(ACTION, e))?;
        Ok(out
            .starting_instances()
            .iter()
            .find(|c| c.instance_id() == Some(instance_id))
            .and_then(|c| c.current_state())
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_string())
            .unwrap_or_else(|| "unknown".into()))
    }

    /// Force-stops the instance, then looks at it every 500 ms until it is stopped or gone
    /// (terminated), until `deadline`.
    async fn stop_and_wait(
        &self,
        instance_id: &str,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<String, AwsError> {
        let timed_out = |last: &str| {
            AwsError::other(
                "StopInstances",
                format!(
                    "instance {instance_id} was not stopped within the fencing timeout of \
                     {timeout:?} (last state: {last})"
                ),
            )
        };
        let mut state = match tokio::time::timeout_at(deadline, self.stop(instance_id, false)).await
        {
            Ok(res) => res?,
            Err(_) => return Err(timed_out("unknown")),
        };
        loop {
            if is_fenced_state(&state) {
                return Ok(state);
            }
            tracing::debug!(
                instance = instance_id,
                state,
                "waiting for the instance to stop"
            );
            tokio::time::sleep(FENCE_POLL).await;
            if tokio::time::Instant::now() >= deadline {
                return Err(timed_out(&state));
            }
            match tokio::time::timeout_at(deadline, self.instance_state(instance_id)).await {
                Ok(Ok(s)) => state = s,
                Ok(Err(e)) if is_fatal(&e) => return Err(e),
                // One failed look is not a failed fence: the deadline decides.
                Ok(Err(e)) => {
                    tracing::warn!(instance = instance_id, error = %e, "could not read the instance state")
                }
                Err(_) => return Err(timed_out(&state)),
            }
        }
    }

    /// The instance's state name (`running`, `stopping`, `stopped`, …).
    pub async fn instance_state(&self, instance_id: &str) -> Result<String, AwsError> {
        self.describe_state(instance_id, false).await
    }

    async fn describe_state(&self, instance_id: &str, dry_run: bool) -> Result<String, AwsError> {
        const ACTION: &str = "DescribeInstances";
        let out = self
            .client
            .describe_instances()
            .instance_ids(instance_id)
            .dry_run(dry_run)
            .send()
            .await
            .map_err(|e| AwsError::from_sdk(ACTION, e))?;
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(instance_id))
            .and_then(|i| i.state())
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_string())
            .ok_or_else(|| AwsError::other(ACTION, format!("instance {instance_id} not found")))
    }

    /// DryRun calls of exactly the actions `cfg` needs, one result per action. EC2 answers a
    /// DryRun with `DryRunOperation` when the call would be allowed and
    /// `UnauthorizedOperation` when not; every action used here supports DryRun, so none has
    /// to be assumed. The DryRun calls name the real resources (this ENI, the allocation, the
    /// route tables, the peers' instances) so that tag conditions in the policy are evaluated.
    pub async fn check_permissions(
        &self,
        cfg: &AwsSection,
        me: &Identity,
        fencing_targets: &[String],
    ) -> Vec<PermissionCheck> {
        let mut checks = Vec::new();
        if cfg.secondary_ip.is_some() {
            checks.extend(self.check_private_ip_permissions(me).await);
        }
        if let Some(allocation) = &cfg.elastic_ip_allocation_id {
            let private_ip = cfg.secondary_ip.as_deref().unwrap_or(&me.private_ip);
            checks.push(verdict(
                "AssociateAddress",
                vec![
                    self.associate(allocation, &me.eni_id, private_ip, true)
                        .await,
                ],
            ));
        }
        if let (Some(overlay), false) = (&cfg.overlay_ip, cfg.route_tables.is_empty()) {
            let destination = format!("{overlay}/32");
            let (mut replace, mut create) = (Vec::new(), Vec::new());
            for table in &cfg.route_tables {
                replace.push(
                    self.replace_route(table, &destination, &me.eni_id, true)
                        .await,
                );
                create.push(
                    self.create_route(table, &destination, &me.eni_id, true)
                        .await,
                );
            }
            checks.push(verdict("ReplaceRoute", replace));
            checks.push(verdict("CreateRoute", create));
        }
        if cfg.fencing != Fencing::None {
            // Before the peers have reported their instances, this instance stands in: the
            // policy's conditions are the same for every member, and a DryRun stops nothing.
            let own = [me.instance_id.clone()];
            let targets = if fencing_targets.is_empty() {
                &own[..]
            } else {
                fencing_targets
            };
            let mut stops = Vec::new();
            let mut starts = Vec::new();
            for t in targets {
                stops.push(self.stop(t, true).await.map(drop));
                if cfg.fencing == Fencing::Reboot {
                    starts.push(self.start(t, true).await.map(drop));
                }
            }
            checks.push(verdict("StopInstances", stops));
            if cfg.fencing == Fencing::Reboot {
                checks.push(verdict("StartInstances", starts));
            }
            let target = targets
                .first()
                .map(String::as_str)
                .unwrap_or(&me.instance_id);
            checks.push(verdict(
                "DescribeInstances",
                vec![self.describe_state(target, true).await.map(drop)],
            ));
        }
        checks
    }

    /// `AssignPrivateIpAddresses` and `UnassignPrivateIpAddresses` have no DryRun parameter.
    /// They are probed with an address that can never be on an ENI — the subnet's network
    /// address, which AWS reserves: EC2 authorizes a call before it validates it, so a role
    /// with the permission gets a validation error (`InvalidParameterValue`) and a role
    /// without it gets `UnauthorizedOperation`. Nothing changes either way.
    async fn check_private_ip_permissions(&self, me: &Identity) -> Vec<PermissionCheck> {
        let Some(probe) = subnet_network_address(&me.subnet_cidr) else {
            let error = Some(format!(
                "could not be checked: the subnet CIDR {:?} is not an IPv4 CIDR",
                me.subnet_cidr
            ));
            return ["AssignPrivateIpAddresses", "UnassignPrivateIpAddresses"]
                .into_iter()
                .map(|action| PermissionCheck {
                    action: action.into(),
                    allowed: false,
                    error: error.clone(),
                })
                .collect();
        };
        let assign = self.assign_secondary_ip(&me.eni_id, &probe).await;
        let unassign = self.unassign(&me.eni_id, &probe).await;
        vec![
            verdict(
                "AssignPrivateIpAddresses",
                vec![validation_is_allowed(assign)],
            ),
            verdict(
                "UnassignPrivateIpAddresses",
                vec![validation_is_allowed(unassign)],
            ),
        ]
    }
}

/// The IMDS client used by the credential chain, at the configured metadata endpoint.
fn imds_client(
    cfg: &AwsSection,
    provider_config: &aws_config::provider_config::ProviderConfig,
) -> aws_config::imds::Client {
    let endpoint = cfg
        .metadata_endpoint
        .as_deref()
        .unwrap_or(DEFAULT_METADATA_ENDPOINT);
    let builder = aws_config::imds::Client::builder()
        .configure(provider_config)
        .connect_timeout(Duration::from_secs(1))
        .read_timeout(Duration::from_secs(2))
        .max_attempts(3);
    match builder.clone().endpoint(endpoint) {
        Ok(b) => b.build(),
        Err(e) => {
            // validate() only admits http(s) URLs, so this is not expected.
            tracing::warn!(endpoint, error = %e, "invalid metadata endpoint; using the default");
            builder.build()
        }
    }
}

/// Errors a retry will not cure: a missing permission or an unknown instance.
fn is_fatal(e: &AwsError) -> bool {
    matches!(e, AwsError::Permission { .. })
        || e.code().is_some_and(|c| c.starts_with("InvalidInstanceID"))
}

fn is_fenced_state(state: &str) -> bool {
    state == InstanceStateName::Stopped.as_str() || state == InstanceStateName::Terminated.as_str()
}

/// `UnassignPrivateIpAddresses` of an address the ENI does not have.
fn is_not_assigned(e: &AwsError) -> bool {
    e.code() == Some("InvalidParameterValue") && e.message().contains("not assigned")
}

/// `ReplaceRoute` of a destination the table has no route for. AWS documents
/// `InvalidRoute.NotFound`; in practice it answers `InvalidParameterValue` ("There is no route
/// defined for … Use CreateRoute instead"), so both are recognised.
fn is_missing_route(e: &AwsError) -> bool {
    match e.code() {
        Some("InvalidRoute.NotFound") => true,
        Some("InvalidParameterValue") => {
            let m = e.message();
            m.contains("no route defined") || m.contains("CreateRoute")
        }
        _ => false,
    }
}

/// The network address of an IPv4 CIDR (`10.77.0.0/24` → `10.77.0.0`).
fn subnet_network_address(cidr: &str) -> Option<String> {
    let (addr, len) = pgwarden_core::config::parse_cidr(cidr).ok()?;
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    Some(std::net::Ipv4Addr::from(u32::from(addr) & mask).to_string())
}

/// For a probe without DryRun: a validation error means the call was authorized.
fn validation_is_allowed(answer: Result<(), AwsError>) -> Result<(), AwsError> {
    match answer {
        Err(e) if e.code() == Some("InvalidParameterValue") => Ok(()),
        other => other,
    }
}

/// The verdict of one action from its DryRun answers (one per resource).
fn verdict(action: &str, answers: Vec<Result<(), AwsError>>) -> PermissionCheck {
    let mut error = None;
    for answer in answers {
        match answer {
            // A server that ignored DryRun did the call: it was allowed.
            Ok(()) => {}
            Err(e) if e.code() == Some("DryRunOperation") => {}
            Err(e) => {
                error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    PermissionCheck {
        action: action.into(),
        allowed: error.is_none(),
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(code: &str, msg: &str) -> AwsError {
        AwsError::Other {
            action: "ReplaceRoute".into(),
            message: format!("{code}: {msg}"),
        }
    }

    #[test]
    fn permission_error_names_the_action() {
        let e = AwsError::Permission {
            action: "ReplaceRoute".into(),
            message: "UnauthorizedOperation: You are not authorized to perform this operation."
                .into(),
        };
        assert_eq!(
            e.to_string(),
            "ec2:ReplaceRoute is not permitted (UnauthorizedOperation): grant ec2:ReplaceRoute \
             to the agent's IAM role (see deploy/aws/iam-policy.json)"
        );
    }

    #[test]
    fn missing_route_is_recognised_both_ways() {
        assert!(is_missing_route(&err("InvalidRoute.NotFound", "no route")));
        assert!(is_missing_route(&err(
            "InvalidParameterValue",
            "There is no route defined for '10.9.9.9/32' in the route table. Use CreateRoute instead."
        )));
        assert!(!is_missing_route(&err("InvalidParameterValue", "bad eni")));
    }

    #[test]
    fn dry_run_verdicts() {
        let dry = || Err(err("DryRunOperation", "Request would have succeeded"));
        assert!(verdict("ReplaceRoute", vec![dry(), dry()]).allowed);
        let denied = AwsError::Permission {
            action: "ReplaceRoute".into(),
            message: "UnauthorizedOperation: no".into(),
        };
        let v = verdict("ReplaceRoute", vec![dry(), Err(denied)]);
        assert!(!v.allowed);
        assert!(v.error.unwrap_or_default().contains("ec2:ReplaceRoute"));
    }

    #[test]
    fn probe_address_is_the_network_address() {
        assert_eq!(
            subnet_network_address("10.77.0.0/24").as_deref(),
            Some("10.77.0.0")
        );
        assert_eq!(
            subnet_network_address("10.77.3.9/22").as_deref(),
            Some("10.77.0.0")
        );
        assert_eq!(subnet_network_address("nonsense"), None);
    }

    #[test]
    fn fenced_states() {
        assert!(is_fenced_state("stopped"));
        assert!(is_fenced_state("terminated"));
        assert!(!is_fenced_state("stopping"));
    }
}
