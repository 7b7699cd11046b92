//! The bundle format v1: `bundle.json` and the OCI documents it commits to.
//!
//! See docs/bundle-format.md for the specification; the types here are its schema.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::oci::digest::Digest;

/// The only schema version this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;
/// Name of the metadata file, the first entry of a tar bundle.
pub const BUNDLE_JSON: &str = "bundle.json";
/// Largest `bundle.json` accepted; a real one for hundreds of images is a few hundred KiB.
pub const MAX_BUNDLE_JSON: u64 = 16 << 20;
/// Largest manifest or index accepted (containers/image limits manifests to 4 MiB too).
/// Configs and layers are streamed, never held whole, and need no limit here.
pub const MAX_DOCUMENT: u64 = 4 << 20;
/// The annotation that names an image in an OCI index.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Media types of image manifests a bundle may hold.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker schema 2 manifests, kept byte for byte so their digests survive.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// The OCI index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// `bundle.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BundleMeta {
    /// Always [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// A short name people use for the bundle, such as `ocp-4.16.3`.
    pub name: String,
    /// The bundle's version, free-form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The OCI architecture of the images (`amd64`, `arm64`).
    pub architecture: String,
    /// RFC 3339 time the bundle was made.
    pub created: String,
    /// The digest and size of `index.json`.
    pub index: BlobRef,
    /// Every image, in the order of `index.json`.
    pub images: Vec<ImageMeta>,
    /// The image sets the bundle declares.
    #[serde(default)]
    pub sets: Vec<SetMeta>,
}

/// A digest and the size of the bytes it names.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BlobRef {
    /// sha256 of the bytes.
    pub digest: Digest,
    /// Length of the bytes.
    pub size: u64,
}

/// One image of a bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageMeta {
    /// The `org.opencontainers.image.ref.name` of its entry in `index.json`.
    pub reference: String,
    /// The repository the image is stored under, such as `quay.io/org/app`.
    pub repository: String,
    /// Tags it is stored under as well, such as `["4.16.3"]`.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The manifest's digest: the image's identity.
    pub digest: Digest,
    /// The manifest's media type.
    pub media_type: String,
    /// Bytes of manifest, config and layers as stored in the bundle.
    pub size: u64,
    /// Bytes of manifest, config and uncompressed layers: what the image takes in a store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncompressed_size: Option<u64>,
    /// The config blob.
    pub config: BlobRef,
    /// The layers, as listed in the manifest.
    pub layers: Vec<LayerMeta>,
}

/// A layer of an image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LayerMeta {
    /// Digest of the layer blob as stored.
    pub digest: Digest,
    /// Size of the layer blob as stored.
    pub size: u64,
    /// Size of the layer once decompressed, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncompressed_size: Option<u64>,
}

/// An image set declared by a bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SetMeta {
    /// The set's name, unique on a node.
    pub name: String,
    /// Digest references (`repository@sha256:…`) of its images.
    pub images: Vec<String>,
    /// Whether CRI-O should pin the set's images.
    #[serde(default = "yes")]
    pub pinned: bool,
    /// Whether the node needs the set before its container runtime starts: the daemon
    /// imports it from media present at boot before it reports ready.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub critical: bool,
}

fn yes() -> bool {
    true
}

impl ImageMeta {
    /// The name the image is stored under by digest: `repository@sha256:…`.
    pub fn digest_name(&self) -> String {
        format!("{}@{}", self.repository, self.digest)
    }

    /// Every name the image is stored under: by digest first, then by each tag.
    pub fn store_names(&self) -> Vec<String> {
        std::iter::once(self.digest_name())
            .chain(
                self.tags
                    .iter()
                    .map(|t| format!("{}:{}", self.repository, t)),
            )
            .collect()
    }
}

/// An OCI descriptor, as found in indexes and manifests.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the content.
    #[serde(default)]
    pub media_type: String,
    /// Digest of the content.
    pub digest: Digest,
    /// Size of the content.
    pub size: u64,
    /// Annotations, of which `org.opencontainers.image.ref.name` matters here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Platform, present in indexes of multi-platform images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<serde_json::Value>,
}

/// `index.json` of an OCI layout.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Always 2.
    pub schema_version: u32,
    /// The OCI index media type, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// One descriptor per image.
    pub manifests: Vec<Descriptor>,
}

/// An image manifest, OCI or Docker schema 2: the fields both share.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// Media type, when the manifest states it.
    #[serde(default)]
    pub media_type: Option<String>,
    /// The config blob.
    pub config: Descriptor,
    /// The layer blobs.
    pub layers: Vec<Descriptor>,
}

/// Splits a full image reference (`host/repo:tag` or `host/repo@sha256:…`) into the
/// repository and its tag or digest; `None` when it is not a full reference as
/// containers/image accepts it (see [`crate::oci::reference`]).
pub fn split_reference(reference: &str) -> Option<(String, RefTail)> {
    crate::oci::reference::parse(reference).ok()
}

/// What follows the repository in a reference.
pub use crate::oci::reference::Tail as RefTail;

/// Whether `t` is a valid tag: up to 128 of `[A-Za-z0-9_.-]`, not starting with `.` or `-`.
pub use crate::oci::reference::valid_tag;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        assert_eq!(
            split_reference("example.com/app/web:2"),
            Some(("example.com/app/web".into(), RefTail::Tag("2".into())))
        );
        assert_eq!(
            split_reference("localhost:5000/web:v1.2"),
            Some(("localhost:5000/web".into(), RefTail::Tag("v1.2".into())))
        );
        let d = Digest::of(b"x");
        assert_eq!(
            split_reference(&format!("quay.io/a/b@{d}")),
            Some(("quay.io/a/b".into(), RefTail::Digest(d)))
        );
        for not_full in [
            "latest",
            "web:2",
            "library/web:2",
            "example.com/Web:2",
            "example.com/web",
            "localhost:5000/web",
        ] {
            assert_eq!(split_reference(not_full), None, "{not_full}");
        }
    }
}
