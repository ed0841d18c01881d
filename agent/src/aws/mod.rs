//! EC2: how the agent finds its own instance (the instance metadata service, IMDSv2) and the
//! EC2 API calls that move client endpoints to the primary and fence an old primary.
//!
//! `imds` answers "who am I" (instance, region, ENI, subnet); `ec2` wraps aws-sdk-ec2 with
//! the agent's retry and timeout policy and turns its errors into [`AwsError`], which names
//! the IAM action a permission error is about. The decisions (which moves, in which order)
//! are made elsewhere (`core::endpoints`, `agent::endpoints`); this module only carries them
//! out. The IAM actions used here are listed in [`EC2_ACTIONS`] and granted by
//! `deploy/aws/iam-policy.json`; a test keeps the three in step.

pub mod ec2;
pub mod imds;

pub use ec2::{AwsError, Ec2, FenceOutcome, PermissionCheck, EC2_ACTIONS};
pub use imds::{Identity, Imds};
