//! The installation's certificate authority and the certificates it signs, for mutual TLS
//! between agents, the server and operators: `init` creates the CA (`pgwarden-agent certs init`,
//! `pgwarden-server init`), `issue` signs a certificate for a node or an operator, `Ca::sign_csr`
//! signs an enrolling agent's request (the private key stays on the node).

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use std::path::Path;

pub fn write_private(path: &Path, text: &str) -> Result<()> {
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
    Ok(fingerprint_der(der.as_ref()))
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
    p.distinguished_name = subject(name, None);
    p.subject_alt_names = sans(name, hosts)?;
    leaf_usage(&mut p);
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

/// The CA, loaded to sign enrollment requests.
pub struct Ca {
    key: KeyPair,
    cert: rcgen::Certificate,
    pem: String,
}

impl Ca {
    /// Loads `ca.pem` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Ca> {
        Ca::load_files(&dir.join("ca.pem"), &dir.join("ca.key"))
    }

    /// Loads the CA certificate and key from their files.
    pub fn load_files(cert: &Path, key: &Path) -> Result<Ca> {
        let key_pem =
            std::fs::read_to_string(key).with_context(|| format!("read {}", key.display()))?;
        let pem =
            std::fs::read_to_string(cert).with_context(|| format!("read {}", cert.display()))?;
        let key = KeyPair::from_pem(&key_pem).context("parse ca.key")?;
        let cert = ca_params("pgwarden CA")
            .self_signed(&key)
            .context("load the CA")?;
        Ok(Ca { key, cert, pem })
    }

    /// Whether `csr_pem` is a well-formed, self-signed certificate request.
    pub fn check_csr(csr_pem: &str) -> Result<()> {
        CertificateSigningRequestParams::from_pem(csr_pem)
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("not a PEM certificate request: {e}"))
    }

    /// The CA certificate as written at `init` (PEM).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Signs a certificate request for `node` of `cluster`: the subject is set here
    /// (`CN = node`, `OU = cluster`), the request's addresses are kept and the node name added;
    /// valid for TLS server and client use for `days`. Returns the certificate (PEM).
    pub fn sign_csr(&self, csr_pem: &str, cluster: &str, node: &str, days: u32) -> Result<String> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| anyhow::anyhow!("not a PEM certificate request: {e}"))?;
        let p = &mut csr.params;
        p.distinguished_name = subject(node, Some(cluster));
        let name = SanType::DnsName(node.try_into().context("node name as a DNS name")?);
        if !p.subject_alt_names.contains(&name) {
            p.subject_alt_names.insert(0, name);
        }
        leaf_usage(p);
        let now = std::time::SystemTime::now();
        p.not_before = (now - std::time::Duration::from_secs(3600)).into();
        p.not_after = (now + std::time::Duration::from_secs(u64::from(days) * 86_400)).into();
        p.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        let cert = csr
            .signed_by(&self.cert, &self.key)
            .context("sign the certificate request")?;
        Ok(cert.pem())
    }
}

fn subject(cn: &str, ou: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "pgwarden");
    if let Some(ou) = ou {
        dn.push(DnType::OrganizationalUnitName, ou);
    }
    dn
}

fn leaf_usage(p: &mut CertificateParams) {
    p.is_ca = IsCa::NoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
}

fn random_serial() -> [u8; 16] {
    let mut b = [0u8; 16];
    // /dev/urandom: the serial only has to be unique.
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    b[0] &= 0x7f; // positive
    b
}

/// A new private key and a certificate request for `name` valid for `hosts` (addresses or DNS
/// names). Returns `(key_pem, csr_pem)`.
pub fn new_request(name: &str, hosts: &[String]) -> Result<(String, String)> {
    let mut p = CertificateParams::default();
    p.distinguished_name = subject(name, None);
    p.subject_alt_names = sans(name, hosts)?;
    let key = KeyPair::generate().context("generate the key")?;
    let csr = p
        .serialize_request(&key)
        .context("make the certificate request")?;
    Ok((
        key.serialize_pem(),
        csr.pem().context("encode the request")?,
    ))
}

fn sans(name: &str, hosts: &[String]) -> Result<Vec<SanType>> {
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
    Ok(sans)
}

/// The common name of the control plane's certificate (`pgwarden-server init` issues it,
/// without an organizational unit). Enrolled agents always carry their cluster as OU, so no
/// enrollment can produce it.
pub const CONTROL_PLANE_CN: &str = "pgwarden-server";

/// Who a certificate names: its subject's common name and organizational unit (the node and
/// cluster of an enrolled agent), and its SHA-256 fingerprint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub cn: String,
    pub ou: Option<String>,
    pub fingerprint: String,
}

impl Identity {
    /// The control plane: it may use an agent's API without the bearer token.
    pub fn is_control_plane(&self) -> bool {
        self.cn == CONTROL_PLANE_CN && self.ou.is_none()
    }
}

/// Reads the identity of a DER certificate.
pub fn identity(der: &[u8]) -> Result<Identity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("parse the certificate: {e}"))?;
    let subject = cert.subject();
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .map(String::from);
    let ou = subject
        .iter_organizational_unit()
        .next()
        .and_then(|a| a.as_str().ok())
        .map(String::from);
    Ok(Identity {
        cn: cn.unwrap_or_default(),
        ou,
        fingerprint: fingerprint_der(der),
    })
}

/// The SHA-256 fingerprint of a DER certificate, as `AB:CD:…`.
pub fn fingerprint_der(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("pgwarden-pki-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_request_is_signed_with_the_node_and_cluster_in_the_subject() {
        let dir = tmp("csr");
        let fp = init(&dir).expect("init");
        let ca = Ca::load(&dir).expect("load");
        assert_eq!(fingerprint(ca.pem()).expect("fp"), fp);
        // The request asks for another name: the CA decides the subject.
        let (_key, csr) = new_request("impostor", &["10.77.0.11".into()]).expect("csr");
        let pem = ca.sign_csr(&csr, "main", "n1", 365).expect("sign");
        let der: rustls_pki_types::CertificateDer<'static> =
            rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).expect("pem");
        let id = identity(der.as_ref()).expect("identity");
        assert_eq!(id.cn, "n1");
        assert_eq!(id.ou.as_deref(), Some("main"));
        assert_eq!(id.fingerprint, fingerprint(&pem).expect("fp"));
        let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).expect("parse");
        let ca_der: rustls_pki_types::CertificateDer<'static> =
            rustls_pki_types::pem::PemObject::from_pem_slice(ca.pem().as_bytes()).expect("ca");
        let (_, ca_parsed) = x509_parser::parse_x509_certificate(ca_der.as_ref()).expect("ca");
        parsed
            .verify_signature(Some(ca_parsed.public_key()))
            .expect("signed by the CA");
        assert!(ca.sign_csr("not a request", "main", "n1", 1).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
