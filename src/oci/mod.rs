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
}
