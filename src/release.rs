//! OpenShift releases named by their image alone: a set file's `release =` is the release
//! image plus every payload image it lists.
//!
//! A release image's config carries the label `io.openshift.release` (its version), and
//! its last layer holds `release-manifests/image-references`: an ImageStream
//! (`apiVersion: image.openshift.io/v1`, `kind: ImageStream`) whose `spec.tags[].from`
//! (`kind: DockerImage`) name the payload images by digest (see ../shared DESIGN.md, and
//! `oc adm release extract`). The release image itself is not in that list.
//!
//! The payload is read once, from the release image the cache holds whole (fetched like
//! any other image, checked by digest), and recorded in
//! `/var/lib/longshore/releases/<sha256 of the release reference>.json`, which set files
//! are then read with. Everything in the layer is hostile until checked: it is read
//! with limits, only the one file is looked at, and every name must be a full reference
//! by digest.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::cache::Cache;
use crate::oci::digest::Digest;
use crate::oci::reference::{self, Tail};
use crate::paths::HostPaths;

/// Where the payload list is in the release image's last layer.
pub const IMAGE_REFERENCES: &str = "release-manifests/image-references";
/// The config label that marks a release image.
pub const RELEASE_LABEL: &str = "io.openshift.release";
/// Largest `image-references` read (a release lists about 200 images in 100 KiB).
const MAX_REFERENCES: u64 = 8 << 20;
/// Most bytes of the last layer unpacked while looking for it.
const MAX_LAYER_UNPACKED: u64 = 1 << 30;
/// Most payload images taken.
const MAX_PAYLOAD: usize = 10_000;

/// What a release image names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Payload {
    /// The release reference as the set names it.
    pub release: String,
    /// The release image's manifest digest.
    pub digest: Digest,
    /// Its version (the label's value).
    pub version: String,
    /// The payload images, by digest, each once, in the order listed.
    pub images: Vec<String>,
}

fn record_path(paths: &HostPaths, release: &str) -> PathBuf {
    paths
        .state_dir
        .join("releases")
        .join(format!("{}.json", Digest::of(release.as_bytes()).hex()))
}

/// The recorded payload of `release`, if it has been read.
pub fn recorded(paths: &HostPaths, release: &str) -> Option<Payload> {
    let bytes = crate::untrusted::read_admin_file(&record_path(paths, release), 16 << 20).ok()?;
    serde_json::from_slice::<Payload>(&bytes)
        .ok()
        .filter(|p| p.release == release)
}

/// Reads the payload of `release` from the cache (which must hold the image whole under
/// that name) and records it.
pub fn expand(paths: &HostPaths, cache: &Cache, release: &str) -> Result<Payload> {
    let payload = from_cache(cache, release)?;
    let p = record_path(paths, release);
    std::fs::create_dir_all(p.parent().expect("in a directory"))
        .with_context(|| format!("creating {}", p.display()))?;
    crate::state::write_atomic(&p, &serde_json::to_vec_pretty(&payload)?)?;
    tracing::info!(
        "release {release} ({}) names {} payload images",
        payload.version,
        payload.images.len()
    );
    Ok(payload)
}

/// The payload of `release`, which the cache holds whole under that name.
pub fn from_cache(cache: &Cache, release: &str) -> Result<Payload> {
    let img = cache
        .complete(release)
        .with_context(|| format!("the cache does not hold release image {release} whole"))?;
    let config_bytes = cache.read(&img.config.0, crate::bundle::format::MAX_DOCUMENT)?;
    let last = img
        .layers
        .last()
        .with_context(|| format!("release image {release} has no layers"))?;
    let file = std::fs::File::open(cache.blob(&last.0))
        .with_context(|| format!("opening {}", cache.blob(&last.0).display()))?;
    payload_of(release, img.entry.digest, &config_bytes, file)
}

/// The payload a release image names, from its config and its last layer (a tar,
/// compressed or not).
pub fn payload_of(
    release: &str,
    digest: Digest,
    config: &[u8],
    last_layer: impl Read,
) -> Result<Payload> {
    let version = release_label(config).with_context(|| {
        format!("{release} is not a release image: its config has no {RELEASE_LABEL} label")
    })?;
    let text = find_references(last_layer)
        .with_context(|| format!("release image {release}, its last layer"))?;
    let images = parse_references(&text)
        .with_context(|| format!("release image {release}: {IMAGE_REFERENCES}"))?;
    Ok(Payload {
        release: release.to_string(),
        digest,
        version,
        images,
    })
}

fn release_label(config: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(config).ok()?;
    v["config"]["Labels"][RELEASE_LABEL]
        .as_str()
        .map(str::to_string)
}

/// The text of `image-references` in a (possibly gzip- or zstd-compressed) layer tar.
fn find_references(file: impl Read) -> Result<String> {
    let mut head = [0u8; 4];
    let mut f = std::io::BufReader::new(file);
    let n = {
        use std::io::BufRead;
        let buf = f.fill_buf()?;
        let n = buf.len().min(4);
        head[..n].copy_from_slice(&buf[..n]);
        n
    };
    let raw: Box<dyn Read> = match &head[..n] {
        [0x1f, 0x8b, ..] => Box::new(flate2::bufread::MultiGzDecoder::new(f)),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(zstd::stream::read::Decoder::with_buffer(f)?),
        _ => Box::new(f),
    };
    let mut ar = tar::Archive::new(raw.take(MAX_LAYER_UNPACKED));
    for e in ar.entries().context("reading the layer")? {
        let e = e.context("reading the layer")?;
        let path = e.path().context("a name in the layer")?.into_owned();
        let clean = path.strip_prefix("./").unwrap_or(&path);
        if clean != Path::new(IMAGE_REFERENCES) {
            continue;
        }
        if !e.header().entry_type().is_file() {
            bail!("{IMAGE_REFERENCES} is not a regular file");
        }
        if e.size() > MAX_REFERENCES {
            bail!(
                "{IMAGE_REFERENCES} has {} bytes; at most {MAX_REFERENCES} are read",
                e.size()
            );
        }
        let mut text = String::new();
        e.take(MAX_REFERENCES)
            .read_to_string(&mut text)
            .with_context(|| format!("{IMAGE_REFERENCES} is not UTF-8"))?;
        return Ok(text);
    }
    bail!("the last layer holds no {IMAGE_REFERENCES}")
}

/// The payload images an `image-references` ImageStream names: each `DockerImage` tag's
/// reference, which must be a full reference by digest; each once.
pub fn parse_references(text: &str) -> Result<Vec<String>> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Stream {
        kind: String,
        api_version: String,
        #[serde(default)]
        spec: Spec,
    }
    #[derive(Deserialize, Default)]
    struct Spec {
        #[serde(default)]
        tags: Vec<Tag>,
    }
    #[derive(Deserialize)]
    struct Tag {
        #[serde(default)]
        name: String,
        from: Option<From>,
    }
    #[derive(Deserialize)]
    struct From {
        kind: String,
        name: String,
    }
    let s: Stream = serde_json::from_str(text).context("not an ImageStream in JSON")?;
    if s.kind != "ImageStream" || !s.api_version.starts_with("image.openshift.io/") {
        bail!(
            "kind {:?}, apiVersion {:?}: not an image.openshift.io ImageStream",
            s.kind,
            s.api_version
        );
    }
    let mut out: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for t in s.spec.tags {
        let Some(from) = t.from else { continue };
        if from.kind != "DockerImage" {
            continue;
        }
        match reference::parse(&from.name) {
            Ok((_, Tail::Digest(_))) => {}
            Ok((_, Tail::Tag(_))) => bail!(
                "tag {:?} names {:?} by tag; a release names its payload by digest",
                t.name,
                from.name
            ),
            Err(why) => bail!(
                "tag {:?}: {} is not a full image reference: {why}",
                t.name,
                crate::untrusted::quote(from.name.as_bytes())
            ),
        }
        if seen.insert(from.name.clone()) {
            out.push(from.name);
        }
        if out.len() > MAX_PAYLOAD {
            bail!("more than {MAX_PAYLOAD} payload images");
        }
    }
    if out.is_empty() {
        bail!("it names no payload image");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn an_image_stream_names_its_payload_by_digest_each_once() {
        let text = format!(
            r#"{{"kind":"ImageStream","apiVersion":"image.openshift.io/v1","spec":{{"tags":[
              {{"name":"cli","from":{{"kind":"DockerImage","name":"quay.io/ocp/art@{D}"}}}},
              {{"name":"cli-again","from":{{"kind":"DockerImage","name":"quay.io/ocp/art@{D}"}}}},
              {{"name":"other","from":{{"kind":"ImageStreamTag","name":"x:y"}}}},
              {{"name":"none"}}]}}}}"#
        );
        assert_eq!(
            parse_references(&text).unwrap(),
            vec![format!("quay.io/ocp/art@{D}")]
        );
        let tagged = r#"{"kind":"ImageStream","apiVersion":"image.openshift.io/v1","spec":{"tags":[
              {"name":"cli","from":{"kind":"DockerImage","name":"quay.io/ocp/art:latest"}}]}}"#;
        assert!(format!("{:#}", parse_references(tagged).unwrap_err()).contains("by tag"));
        let bad = r#"{"kind":"ImageStream","apiVersion":"image.openshift.io/v1","spec":{"tags":[
              {"name":"cli","from":{"kind":"DockerImage","name":"../../etc/passwd@sha256:00"}}]}}"#;
        assert!(parse_references(bad).is_err());
        assert!(parse_references(r#"{"kind":"Pod","apiVersion":"v1"}"#).is_err());
        assert!(parse_references("not json").is_err());
    }
}
