//! The skopeo image proxy (`skopeo experimental-image-proxy`): read-only access to images
//! in any transport, used to inspect sources and to see what a store already holds.
//!
//! Nodes run whatever skopeo their OS ships. Debian 12's 1.9.3 speaks protocol 0.2.3,
//! which lacks `OpenImageOptional` (0.2.4); there an absent image is recognised from the
//! error `OpenImage` returns instead. See skopeo's cmd/skopeo/proxy.go for the protocol
//! versions and the calls each one added.

use std::process::Command;

use anyhow::{Context, Result};
use containers_image_proxy::{ImageProxy, ImageProxyConfig, OpenedImage};
use tokio::io::AsyncReadExt;

use crate::bundle::format::Manifest;
use crate::oci::digest::{Digest, Hasher, HASH_BUFFER};

/// A running image proxy.
pub struct Proxy {
    inner: ImageProxy,
    optional_open: bool,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Proxy(protocol {})", self.inner.protocol_version())
    }
}

/// An image opened through the proxy, with its manifest.
pub struct ProxyImage {
    handle: OpenedImage,
    /// Digest of the image's own manifest (not of the OCI conversion the proxy returns).
    pub digest: Digest,
    /// The manifest, as the proxy returns it (converted to OCI form when it was not).
    pub manifest: Manifest,
    /// The bytes of that manifest.
    pub manifest_bytes: Vec<u8>,
}

impl Proxy {
    /// Starts `skopeo experimental-image-proxy` with the program `skopeo`.
    pub async fn start(skopeo: &str) -> Result<Proxy> {
        Self::start_with(skopeo, true).await
    }

    /// Starts the proxy; `tls_verify` false allows registries that speak plain HTTP or
    /// have certificates that do not verify (`skopeo --tls-verify=false`).
    pub async fn start_with(skopeo: &str, tls_verify: bool) -> Result<Proxy> {
        let mut config = ImageProxyConfig::default();
        if !tls_verify {
            config.insecure_skip_tls_verification = Some(true);
        }
        // Tie the proxy's life to ours, as the crate's default does, but with the
        // configured program.
        let cmd = if std::path::Path::new("/usr/bin/setpriv").exists() {
            let mut c = Command::new("/usr/bin/setpriv");
            c.args(["--pdeathsig", "SIGTERM", "--", skopeo]);
            c
        } else {
            Command::new(skopeo)
        };
        config.skopeo_cmd = Some(cmd);
        let inner = ImageProxy::new_with_config(config).await.with_context(|| {
            format!("starting the image proxy ({skopeo} experimental-image-proxy)")
        })?;
        let v = inner.protocol_version().clone();
        let optional_open = (v.major, v.minor, v.patch) >= (0, 2, 4);
        tracing::debug!(protocol = %v, optional_open, "image proxy started");
        Ok(Proxy {
            inner,
            optional_open,
        })
    }

    /// The protocol version the proxy speaks.
    pub fn protocol(&self) -> String {
        self.inner.protocol_version().to_string()
    }

    /// Opens `reference` (any transport), failing if it does not exist.
    pub async fn open(&self, reference: &str) -> Result<ProxyImage> {
        let handle = self
            .inner
            .open_image(reference)
            .await
            .with_context(|| format!("opening {reference}"))?;
        self.describe(reference, handle).await
    }

    /// Opens `reference` if it exists; `None` when it does not.
    pub async fn open_optional(&self, reference: &str) -> Result<Option<ProxyImage>> {
        let handle = if self.optional_open {
            self.inner
                .open_image_optional(reference)
                .await
                .with_context(|| format!("opening {reference}"))?
        } else {
            match self.inner.open_image(reference).await {
                Ok(h) => Some(h),
                Err(e) => {
                    let msg = e.to_string();
                    if !is_not_found(&msg) {
                        // Not knowing is treated as absent: the image is then copied
                        // again, which is safe, and the copy reports a real fault.
                        tracing::debug!(%reference, error = %msg, "cannot open; taking the image as absent");
                    }
                    None
                }
            }
        };
        match handle {
            Some(h) => Ok(Some(self.describe(reference, h).await?)),
            None => Ok(None),
        }
    }

    async fn describe(&self, reference: &str, handle: OpenedImage) -> Result<ProxyImage> {
        let (digest, raw) = self
            .inner
            .fetch_manifest_raw_oci(&handle)
            .await
            .with_context(|| format!("reading the manifest of {reference}"))?;
        let digest: Digest = digest
            .parse()
            .with_context(|| format!("manifest digest of {reference}"))?;
        let manifest: Manifest = serde_json::from_slice(&raw)
            .with_context(|| format!("parsing the manifest of {reference}"))?;
        Ok(ProxyImage {
            handle,
            digest,
            manifest,
            manifest_bytes: raw,
        })
    }

    /// Closes an image opened with [`Proxy::open`].
    pub async fn close(&self, img: ProxyImage) -> Result<()> {
        self.inner
            .close_image(&img.handle)
            .await
            .context("closing image in the image proxy")
    }

    /// Reads blob `digest` of `img` to the end, passing each chunk to `sink`, and checks
    /// its digest and size here as well as in the proxy.
    pub async fn read_blob(
        &self,
        img: &ProxyImage,
        digest: &Digest,
        size: u64,
        sink: &mut (dyn FnMut(&[u8]) -> Result<()> + Send),
    ) -> Result<()> {
        let oci_digest: containers_image_proxy::oci_spec::image::Digest = digest
            .to_string()
            .parse()
            .with_context(|| format!("digest {digest}"))?;
        let (mut reader, driver) = self
            .inner
            .get_blob(&img.handle, &oci_digest, size)
            .await
            .with_context(|| format!("fetching blob {digest}"))?;
        let read = async {
            let mut h = Hasher::new();
            let mut buf = vec![0u8; HASH_BUFFER];
            loop {
                let n = reader.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                sink(&buf[..n])?;
            }
            anyhow::Ok(h.finish())
        };
        let (read, driven) = tokio::join!(read, driver);
        driven.with_context(|| format!("fetching blob {digest}"))?;
        let (got, len) = read.with_context(|| format!("reading blob {digest}"))?;
        anyhow::ensure!(
            got == *digest && len == size,
            "blob {digest} arrived with digest {got} and {len} bytes (expected {size})"
        );
        Ok(())
    }

    /// Shuts the proxy down.
    pub async fn finish(self) -> Result<()> {
        self.inner
            .finalize()
            .await
            .context("stopping the image proxy")
    }
}

/// Whether an `OpenImage` error says the image does not exist. The texts are those of
/// containers/image's storage, oci, docker and archive transports.
fn is_not_found(msg: &str) -> bool {
    const MARKERS: [&str; 8] = [
        "does not resolve to an image ID",
        "identifier is not an image",
        "image not known",
        "no such image",
        "manifest unknown",
        "no descriptor found for reference",
        "not found",
        "no such file or directory",
    ];
    let lower = msg.to_ascii_lowercase();
    MARKERS
        .iter()
        .any(|m| lower.contains(&m.to_ascii_lowercase()))
}
