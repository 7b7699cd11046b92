//! TLS to registries, set up as containers/image sets it up for CRI-O: the system's CA
//! bundle, and for each registry host the files of `/etc/containers/certs.d/HOST[:PORT]/`
//! and `/etc/docker/certs.d/HOST[:PORT]/` (containers/image `docker/docker_client.go`
//! `dockerCertDir`, and `pkg/tlsclientconfig/tlsclientconfig.go` `SetupCertificates`):
//! - `*.crt`: certificate authorities trusted for that host, besides the system's;
//! - `*.cert` with the `*.key` of the same name: a client certificate it is shown. A
//!   `.cert` without its `.key`, or the other way round, is an error.
//!
//! A location registries.conf marks `insecure` is reached without checking its
//! certificate (and over plain HTTP when it does not speak TLS), as containers/image
//! does for it. Every file is read with a limit, as files an administrator wrote.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::paths::HostPaths;

/// Largest certificate or key file read.
const MAX_PEM: u64 = 16 << 20;

/// Where the system's CA bundle is, in the order looked for (RHEL CoreOS first).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/ssl/ca-bundle.pem",
];

/// The certificate directories of `host` (`host[:port]`), in the order read.
pub fn cert_dirs(paths: &HostPaths, host: &str) -> Vec<PathBuf> {
    ["/etc/containers/certs.d", "/etc/docker/certs.d"]
        .iter()
        .map(|d| paths.host(&Path::new(d).join(host)))
        .collect()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS set-up that trusts nothing, for clients that only ever speak plain HTTP (the
/// requests between nodes): the HTTP client wants one all the same.
pub fn plain_only() -> Result<rustls::ClientConfig> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("setting up TLS")?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth())
}

fn read_pem_certs(file: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = crate::untrusted::read_admin_file(file, MAX_PEM)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{}: not PEM certificates: {e}", file.display()))?;
    if certs.is_empty() {
        bail!("{}: holds no PEM certificate", file.display());
    }
    Ok(certs)
}

/// The TLS set-up for `host`: verified against the system's CAs and the host's
/// `certs.d` CAs, with its client certificate if it has one; or, when `insecure`, not
/// verified at all.
pub fn client_config(
    paths: &HostPaths,
    host: &str,
    insecure: bool,
) -> Result<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("setting up TLS")?;
    let mut roots = rustls::RootCertStore::empty();
    for b in SYSTEM_BUNDLES {
        let p = paths.host(Path::new(b));
        if p.exists() {
            // A bundle holds hundreds; one that does not parse is skipped, not fatal.
            let (added, ignored) = roots.add_parsable_certificates(read_pem_certs(&p)?);
            tracing::debug!(
                "{}: {added} CA certificates ({ignored} ignored)",
                p.display()
            );
            break;
        }
    }
    let mut client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> = None;
    for dir in cert_dirs(paths, host) {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        let mut names: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        names.sort();
        for p in &names {
            match p.extension().and_then(|x| x.to_str()) {
                Some("crt") => {
                    for c in read_pem_certs(p)? {
                        roots
                            .add(c)
                            .with_context(|| format!("{}: not a CA certificate", p.display()))?;
                    }
                }
                Some("cert") => {
                    let key = p.with_extension("key");
                    if !key.exists() {
                        bail!(
                            "{}: client certificate without its key {}",
                            p.display(),
                            key.display()
                        );
                    }
                    let chain = read_pem_certs(p)?;
                    let bytes = crate::untrusted::read_admin_file(&key, MAX_PEM)?;
                    let k = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
                        anyhow::anyhow!("{}: not a PEM private key: {e}", key.display())
                    })?;
                    client.get_or_insert((chain, k));
                }
                Some("key") if !p.with_extension("cert").exists() => {
                    bail!(
                        "{}: key without its client certificate {}",
                        p.display(),
                        p.with_extension("cert").display()
                    );
                }
                _ => {}
            }
        }
    }
    let builder = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(provider())))
    } else {
        builder.with_root_certificates(roots)
    };
    let config = match client {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .with_context(|| format!("the client certificate for {host}"))?,
        None => builder.with_no_client_auth(),
    };
    Ok(config)
}

/// Accepts any certificate: for locations registries.conf marks `insecure` only.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
