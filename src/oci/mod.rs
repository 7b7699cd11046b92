//! OCI and containers/image vocabulary: digests and hashing, image references and the
//! rules they follow, and what a manifest names.

pub mod digest;
pub mod reference;

use crate::oci::digest::Digest;

/// The blobs an image manifest names (its config and layers), whatever its media type
/// (OCI or Docker schema 2 share these members). Unreadable parts name nothing.
pub fn blobs_of_manifest(bytes: &[u8]) -> Vec<Digest> {
    #[derive(serde::Deserialize)]
    struct Desc {
        digest: String,
    }
    #[derive(serde::Deserialize)]
    struct Manifest {
        config: Option<Desc>,
        #[serde(default)]
        layers: Vec<Desc>,
    }
    let Ok(m) = serde_json::from_slice::<Manifest>(bytes) else {
        return vec![];
    };
    m.config
        .into_iter()
        .chain(m.layers)
        .filter_map(|d| {
            d.digest
                .strip_prefix("sha256:")
                .and_then(|h| Digest::from_hex(h).ok())
        })
        .collect()
}

/// A blob a manifest names, and its size.
pub type Sized = (Digest, u64);

/// An image manifest's config and layers with their sizes, whatever its media type;
/// `None` when it is not an image manifest with a sha256 config.
pub fn sized_blobs_of_manifest(bytes: &[u8]) -> Option<(Sized, Vec<Sized>)> {
    #[derive(serde::Deserialize)]
    struct Desc {
        digest: String,
        size: u64,
    }
    #[derive(serde::Deserialize)]
    struct Manifest {
        config: Desc,
        #[serde(default)]
        layers: Vec<Desc>,
    }
    let m = serde_json::from_slice::<Manifest>(bytes).ok()?;
    let d = |x: &Desc| {
        x.digest
            .strip_prefix("sha256:")
            .and_then(|h| Digest::from_hex(h).ok())
            .map(|d| (d, x.size))
    };
    let layers = m.layers.iter().map(d).collect::<Option<Vec<_>>>()?;
    Some((d(&m.config)?, layers))
}

/// One entry of a list of images.
#[derive(serde::Deserialize)]
struct ListEntry {
    digest: String,
    size: u64,
    platform: Option<Platform>,
}

#[derive(serde::Deserialize)]
struct Platform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
}

impl ListEntry {
    fn sized(&self) -> Option<Sized> {
        self.digest
            .strip_prefix("sha256:")
            .and_then(|h| Digest::from_hex(h).ok())
            .map(|d| (d, self.size))
    }
}

/// The entries of a list of images, `None` when `bytes` is not one. A document with a
/// `config` is an image manifest, never a list.
fn list_entries(bytes: &[u8]) -> Option<Vec<ListEntry>> {
    #[derive(serde::Deserialize)]
    struct List {
        config: Option<serde::de::IgnoredAny>,
        manifests: Option<Vec<ListEntry>>,
    }
    let l = serde_json::from_slice::<List>(bytes).ok()?;
    if l.config.is_some() {
        return None;
    }
    l.manifests
}

/// For a list of images (an OCI index or a Docker manifest list), the descriptor of the
/// image for `linux`/`arch`, as containers/image picks it for a node: `None` when `bytes`
/// is not a list, `Some(None)` when it is a list without that platform (or a descriptor
/// that is not sha256).
pub fn list_instance(bytes: &[u8], arch: &str) -> Option<Option<Sized>> {
    let found = list_entries(bytes)?.into_iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == arch)
    });
    Some(found.and_then(|d| d.sized()))
}

/// Every sha256 image manifest a list names (`None` when `bytes` is not a list).
pub fn list_instances(bytes: &[u8]) -> Option<Vec<Digest>> {
    Some(
        list_entries(bytes)?
            .iter()
            .filter_map(|d| d.sized().map(|s| s.0))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_names_its_config_and_layers() {
        let (c, l) = (Digest::of(b"c"), Digest::of(b"l"));
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{c}","size":1}},"layers":[{{"digest":"{l}","size":1}},{{"digest":"md5:x","size":1}}]}}"#
        );
        assert_eq!(blobs_of_manifest(m.as_bytes()), vec![c, l]);
        assert!(blobs_of_manifest(b"not json").is_empty());
    }

    #[test]
    fn a_list_names_the_image_of_this_platform() {
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let list = format!(
            r#"{{"schemaVersion":2,"manifests":[
              {{"digest":"{a}","size":10,"platform":{{"os":"linux","architecture":"arm64"}}}},
              {{"digest":"{b}","size":20,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
        );
        assert_eq!(list_instance(list.as_bytes(), "amd64"), Some(Some((b, 20))));
        assert_eq!(list_instance(list.as_bytes(), "arm64"), Some(Some((a, 10))));
        assert_eq!(list_instance(list.as_bytes(), "s390x"), Some(None));
        let image =
            format!(r#"{{"schemaVersion":2,"config":{{"digest":"{a}","size":1}},"layers":[]}}"#);
        assert_eq!(list_instance(image.as_bytes(), "amd64"), None);
        assert_eq!(list_instance(b"not json", "amd64"), None);
        assert_eq!(list_instances(list.as_bytes()), Some(vec![a, b]));
        assert_eq!(list_instances(image.as_bytes()), None);
    }
}
