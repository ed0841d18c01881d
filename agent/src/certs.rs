//! The installation's certificate authority and the certificates it signs, for mutual TLS
//! between agents (and, later, the server and operators): `pgwarden-agent certs init` creates the
//! CA, `pgwarden-agent certs issue` signs a certificate for a node or an operator.

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};
use std::path::Path;

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// The SHA-256 fingerprint of a PEM certificate, as `AB:CD:…`, for out-of-band checking.
pub fn fingerprint(cert_pem: &str) -> Result<String> {
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
        .map(|c: rustls_pki_types::CertificateDer<'static>| c)
        .context("parse certificate PEM")?;
    let digest = Sha256::digest(der.as_ref());
    Ok(digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":"))
}

fn ca_params(name: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "pgwarden");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    p
}

/// Creates `ca.pem` and `ca.key` in `dir`; refuses to overwrite an existing CA.
pub fn init(dir: &Path) -> Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    if cert_path.exists() || key_path.exists() {
        anyhow::bail!(
            "{} already holds a CA: refusing to replace it (certificates it signed would stop working)",
            dir.display()
        );
    }
    let key = KeyPair::generate().context("generate the CA key")?;
    let cert = ca_params("pgwarden CA")
        .self_signed(&key)
        .context("sign the CA certificate")?;
    write_private(&key_path, &key.serialize_pem())?;
    std::fs::write(&cert_path, cert.pem()).context("write ca.pem")?;
    fingerprint(&cert.pem())
}

/// Signs a certificate for `name` (node or operator) valid for `hosts` (IP addresses or DNS
/// names), for both TLS server and client use. Writes `<out>/<name>.pem` and `<name>.key`.
pub fn issue(ca_dir: &Path, name: &str, hosts: &[String], out: &Path) -> Result<()> {
    let ca_key_pem = std::fs::read_to_string(ca_dir.join("ca.key"))
        .with_context(|| format!("read {}", ca_dir.join("ca.key").display()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).context("parse ca.key")?;
    // Re-create the issuer from its parameters and key: rcgen signs with those.
    let issuer = ca_params("pgwarden CA")
        .self_signed(&ca_key)
        .context("load the CA")?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "pgwarden");
    p.distinguished_name = dn;
    let mut sans = vec![SanType::DnsName(
        name.try_into().context("name as a DNS name")?,
    )];
    for h in hosts {
        sans.push(match h.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                h.as_str()
                    .try_into()
                    .with_context(|| format!("host {h:?}"))?,
            ),
        });
    }
    p.subject_alt_names = sans;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let key = KeyPair::generate().context("generate the key")?;
    let cert = p
        .signed_by(&key, &issuer, &ca_key)
        .context("sign the certificate")?;
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    write_private(&out.join(format!("{name}.key")), &key.serialize_pem())?;
    std::fs::write(out.join(format!("{name}.pem")), cert.pem())
        .with_context(|| format!("write {name}.pem"))?;
    Ok(())
}
