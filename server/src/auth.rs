//! Who is calling: API tokens (stored as SHA-256 hashes; the token is shown once), users with
//! a role (viewer < operator < admin, passwords hashed with Argon2), and agents identified by
//! their CA-signed certificate.

use anyhow::{anyhow, Result};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// An authenticated API caller.
#[derive(Clone, Debug)]
pub struct Actor {
    pub user: String,
    pub role: Role,
    pub token_id: String,
}

/// Random bytes as lowercase hex, from the kernel.
pub fn random_hex(bytes: usize) -> Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| anyhow!("read /dev/urandom: {e}"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// The stored form of a token: SHA-256, hex. Tokens are 160 random bits, so a fast hash is
/// enough; passwords use Argon2.
pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new API token: `pgw_` and 40 hex digits.
pub fn new_api_token() -> Result<String> {
    Ok(format!("pgw_{}", random_hex(20)?))
}

/// A new join token: `pgwj_` and 40 hex digits.
pub fn new_join_token() -> Result<String> {
    Ok(format!("pgwj_{}", random_hex(20)?))
}

pub fn hash_password(password: &str) -> Result<String> {
    let salt = SaltString::encode_b64(random_hex(16)?.as_bytes())
        .map_err(|e| anyhow!("password salt: {e}"))?;
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow!("hash the password: {e}"))?
        .to_string())
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A user name: 1–64 of `[A-Za-z0-9._@-]`.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
        assert_eq!(Role::parse("operator"), Some(Role::Operator));
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn passwords_verify_only_with_the_right_password() {
        let h = hash_password("correct horse").expect("hash");
        assert!(h.starts_with("$argon2"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong", &h));
        assert!(!verify_password("x", "not a hash"));
    }

    #[test]
    fn tokens_are_random_and_stored_hashed() {
        let a = new_api_token().expect("token");
        let b = new_api_token().expect("token");
        assert_ne!(a, b);
        assert!(a.starts_with("pgw_") && a.len() == 44);
        assert_eq!(token_hash(&a).len(), 64);
        assert_ne!(token_hash(&a), a);
        assert!(valid_name("alice@example.com") && !valid_name("a b") && !valid_name(""));
    }
}
