//! Making bundles: `longshore bundle create` reads images from any source the image proxy
//! reads and writes a bundle directory or a tar stream.
//!
//! Manifests are kept byte for byte, so every image keeps the digest it is known by.
//! Blobs shared by several images are written once.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::foreign;
use super::format::*;
use crate::oci::digest::Digest;
use crate::process;
use crate::store::proxy::Proxy;

/// A source named on the command line: `TRANSPORT:DETAILS` with an optional `=NAME`.
#[derive(Debug, Clone)]
pub struct SourceArg {
    /// The transport reference the proxy opens.
    pub source: String,
    /// The name to store the image under, when given.
    pub name: Option<String>,
}

impl std::str::FromStr for SourceArg {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Some((src, name)) = s.rsplit_once('=') {
            if split_reference(name).is_some() {
                return Ok(SourceArg {
                    source: src.to_string(),
                    name: Some(name.to_string()),
                });
            }
        }
        Ok(SourceArg {
            source: s.to_string(),
            name: None,
        })
    }
}

/// Turns every `cache:REF` source into a `dir:` view under `views` of the image the
/// node's cache holds whole as REF, named REF unless the source names it otherwise.
pub fn cache_sources(
    cache: &crate::cache::Cache,
    sources: &mut [SourceArg],
    views: &Path,
) -> Result<()> {
    for (i, src) in sources.iter_mut().enumerate() {
        let Some(r) = src.source.strip_prefix("cache:") else {
            continue;
        };
        let r = r.to_string();
        if split_reference(&r).is_none() {
            bail!("cache:{r}: not a full image reference (registry/repository:tag or @sha256:…)");
        }
        let view = views.join(i.to_string());
        cache.dir_view(&r, &view)?;
        src.source = format!("dir:{}", view.display());
        src.name.get_or_insert(r);
    }
    Ok(())
}

/// The payload of the OpenShift release image `release`, read from its registry: its
/// config's label and its last layer's `image-references`.
pub async fn release_payload(
    release: &str,
    skopeo: &str,
    tls_verify: bool,
) -> Result<crate::release::Payload> {
    /// Largest last layer of a release image read (it holds manifests, a few MiB).
    const MAX_RELEASE_LAYER: u64 = 512 << 20;
    let proxy = Proxy::start_with(skopeo, tls_verify).await?;
    let res = async {
        let img = proxy.open(&format!("docker://{release}")).await?;
        let (config, layers) = crate::oci::sized_blobs_of_manifest(&img.manifest_bytes)
            .with_context(|| format!("{release}: not an image manifest"))?;
        let last = *layers
            .last()
            .with_context(|| format!("{release}: an image without layers"))?;
        if config.1 > crate::bundle::format::MAX_DOCUMENT || last.1 > MAX_RELEASE_LAYER {
            bail!("{release}: its config or last layer is too large for a release image");
        }
        let mut config_bytes = Vec::new();
        proxy
            .read_blob(&img, &config.0, config.1, &mut |b| {
                config_bytes.extend_from_slice(b);
                Ok(())
            })
            .await?;
        let mut layer = Vec::new();
        proxy
            .read_blob(&img, &last.0, last.1, &mut |b| {
                layer.extend_from_slice(b);
                Ok(())
            })
            .await?;
        let digest = img.digest;
        proxy.close(img).await.ok();
        crate::release::payload_of(release, digest, &config_bytes, std::io::Cursor::new(layer))
    }
    .await;
    proxy.finish().await.ok();
    res
}

/// What to make.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Bundle name.
    pub name: String,
    /// Bundle version.
    pub version: Option<String>,
    /// Name of the image set holding every image.
    pub set: String,
    /// Whether that set is pinned.
    pub pinned: bool,
    /// Whether that set is needed before the container runtime starts.
    pub critical: bool,
    /// Whether registries must speak HTTPS with certificates that verify.
    pub tls_verify: bool,
}

/// The output form, chosen by the output path's ending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutForm {
    Dir,
    Tar,
    TarGz,
    TarZst,
}

fn out_form(out: &Path) -> OutForm {
    let n = out.to_string_lossy();
    if n.ends_with(".tar.zst") || n.ends_with(".tzst") {
        OutForm::TarZst
    } else if n.ends_with(".tar.gz") || n.ends_with(".tgz") {
        OutForm::TarGz
    } else if n.ends_with(".tar") {
        OutForm::Tar
    } else {
        OutForm::Dir
    }
}

/// Makes a bundle at `out` from `sources`; returns its digest.
pub async fn create(
    out: &Path,
    sources: &[SourceArg],
    opts: &CreateOptions,
    skopeo: &str,
) -> Result<(Digest, BundleMeta)> {
    if sources.is_empty() {
        bail!("no image sources given");
    }
    if !super::read::valid_set_name(&opts.name) || !super::read::valid_set_name(&opts.set) {
        bail!("bundle and set names may hold only letters, digits, '.', '_' and '-'");
    }
    if out.exists() {
        bail!("{} already exists", out.display());
    }
    let form = out_form(out);
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let work = parent.join(format!(
        ".{}.partial{}",
        out.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let res = async {
        fs::create_dir_all(work.join("blobs/sha256"))
            .with_context(|| format!("creating {}", work.display()))?;
        let proxy = Proxy::start_with(skopeo, opts.tls_verify).await?;
        let built = build_layout(&proxy, &work, sources, opts, skopeo).await;
        proxy.finish().await.ok();
        let (digest, meta, order) = built?;
        match form {
            OutForm::Dir => fs::rename(&work, out)
                .with_context(|| format!("renaming {} to {}", work.display(), out.display()))?,
            _ => {
                write_tar(&work, out, form, &order)?;
                fs::remove_dir_all(&work)
                    .with_context(|| format!("removing {}", work.display()))?;
            }
        }
        Ok((digest, meta))
    }
    .await;
    if res.is_err() {
        let _ = fs::remove_dir_all(&work);
    }
    res
}

async fn build_layout(
    proxy: &Proxy,
    work: &Path,
    sources: &[SourceArg],
    opts: &CreateOptions,
    skopeo: &str,
) -> Result<(Digest, BundleMeta, Vec<Digest>)> {
    let mut images = Vec::new();
    let mut descriptors = Vec::new();
    let mut order: Vec<Digest> = Vec::new();
    let mut written: HashSet<Digest> = HashSet::new();
    let mut architecture = None;
    for src in sources {
        let (repository, tags) = image_name(src)?;
        let img = proxy.open(&src.source).await?;
        let raw = original_manifest(
            &src.source,
            &img.digest,
            &img.manifest_bytes,
            skopeo,
            opts.tls_verify,
        )?;
        let manifest: Manifest = serde_json::from_slice(&raw)
            .with_context(|| format!("{}: parsing its manifest", src.source))?;
        let media_type = manifest
            .media_type
            .clone()
            .unwrap_or_else(|| OCI_MANIFEST.to_string());
        if media_type != OCI_MANIFEST && media_type != DOCKER_MANIFEST {
            bail!(
                "{}: manifest type {media_type} is not supported in bundles",
                src.source
            );
        }
        put_blob(work, &img.digest, &raw, &mut written, &mut order)?;

        let config_bytes = fetch_blob(
            proxy,
            &img,
            &manifest.config,
            work,
            &mut written,
            &mut order,
            None,
        )
        .await?;
        if let Some(cfg) = config_bytes {
            #[derive(serde::Deserialize)]
            struct Cfg {
                architecture: Option<String>,
            }
            if let Ok(Cfg {
                architecture: Some(a),
            }) = serde_json::from_slice::<Cfg>(&cfg)
            {
                if architecture.get_or_insert_with(|| a.clone()) != &a {
                    bail!(
                        "{}: architecture {a} differs from the bundle's {}",
                        src.source,
                        architecture.as_deref().unwrap_or("")
                    );
                }
            }
        }
        let mut layers = Vec::new();
        for l in &manifest.layers {
            let mut unpacked = Some(0u64);
            fetch_blob(
                proxy,
                &img,
                l,
                work,
                &mut written,
                &mut order,
                Some((&l.media_type, &mut unpacked)),
            )
            .await?;
            let uncompressed_size = match unpacked {
                Some(n) => Some(n),
                None => layer_unpacked_size(work, l)?,
            };
            layers.push(LayerMeta {
                digest: l.digest,
                size: l.size,
                uncompressed_size,
            });
        }
        proxy.close(img).await?;
        let digest = Digest::of(&raw);
        let reference = match tags.first() {
            Some(t) => format!("{repository}:{t}"),
            None => format!("{repository}@{digest}"),
        };
        let layer_total: u64 = layers.iter().map(|l| l.size).sum();
        let unpacked_total = layers
            .iter()
            .map(|l| l.uncompressed_size)
            .sum::<Option<u64>>()
            .map(|u| u + raw.len() as u64 + manifest.config.size);
        if images.iter().any(|i: &ImageMeta| i.reference == reference) {
            bail!("{reference} is named by two sources");
        }
        descriptors.push(Descriptor {
            media_type: media_type.clone(),
            digest,
            size: raw.len() as u64,
            annotations: [(REF_NAME.to_string(), reference.clone())].into(),
            platform: None,
        });
        images.push(ImageMeta {
            reference,
            repository,
            tags,
            digest,
            media_type,
            size: raw.len() as u64 + manifest.config.size + layer_total,
            uncompressed_size: unpacked_total,
            config: BlobRef {
                digest: manifest.config.digest,
                size: manifest.config.size,
            },
            layers,
        });
        tracing::info!(
            "added {}",
            images
                .last()
                .map(|i: &ImageMeta| i.reference.as_str())
                .unwrap_or("")
        );
    }
    let index = Index {
        schema_version: 2,
        media_type: Some(OCI_INDEX.to_string()),
        manifests: descriptors,
    };
    let index_bytes = serde_json::to_vec(&index).context("serialising index.json")?;
    fs::write(work.join("index.json"), &index_bytes).context("writing index.json")?;
    fs::write(
        work.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .context("writing oci-layout")?;
    let set_images = images
        .iter()
        .map(ImageMeta::digest_name)
        .collect::<Vec<_>>();
    let meta = BundleMeta {
        schema_version: SCHEMA_VERSION,
        name: opts.name.clone(),
        version: opts.version.clone(),
        architecture: architecture.unwrap_or_else(|| "unknown".into()),
        created: created_now(),
        index: BlobRef {
            digest: Digest::of(&index_bytes),
            size: index_bytes.len() as u64,
        },
        images,
        sets: vec![SetMeta {
            name: opts.set.clone(),
            images: dedup(set_images),
            pinned: opts.pinned,
            critical: opts.critical,
        }],
    };
    let mut meta_bytes = serde_json::to_vec_pretty(&meta).context("serialising bundle.json")?;
    meta_bytes.push(b'\n');
    fs::write(work.join(BUNDLE_JSON), &meta_bytes).context("writing bundle.json")?;
    Ok((Digest::of(&meta_bytes), meta, order))
}

fn dedup(v: Vec<String>) -> Vec<String> {
    let mut seen = HashSet::new();
    v.into_iter().filter(|s| seen.insert(s.clone())).collect()
}

/// The repository and tags a source's image is stored under.
fn image_name(src: &SourceArg) -> Result<(String, Vec<String>)> {
    if let Some(name) = &src.name {
        return Ok(match split_reference(name) {
            Some((repo, RefTail::Tag(t))) => (repo, vec![t]),
            Some((repo, RefTail::Digest(_))) => (repo, vec![]),
            None => bail!("{name:?} is not a full image reference"),
        });
    }
    let (transport, rest) = src.source.split_once(':').with_context(|| {
        format!(
            "{}: expected TRANSPORT:DETAILS, such as oci:DIR:REF",
            src.source
        )
    })?;
    let own = match transport {
        "oci" | "oci-archive" => rest.split_once(':').map(|(_, r)| r.to_string()),
        "docker" => Some(normalize(rest.trim_start_matches("//"))),
        "containers-storage" => Some(match rest.strip_prefix('[') {
            Some(r) => r
                .split_once(']')
                .map(|(_, n)| n.to_string())
                .unwrap_or_default(),
            None => rest.to_string(),
        }),
        "docker-archive" => {
            let (file, r) = match rest.rsplit_once(':') {
                Some((f, r)) if !r.starts_with('@') && split_reference(&normalize(r)).is_some() => {
                    (f, Some(normalize(r)))
                }
                Some((f, _)) => (f, None),
                None => (rest, None),
            };
            match r {
                Some(r) => Some(r),
                None => {
                    let f = foreign::detect_archive(Path::new(file))?;
                    let first = f
                        .images
                        .first()
                        .filter(|i| !i.repository.starts_with("localhost/"));
                    first.map(|i| {
                        format!(
                            "{}:{}",
                            i.repository,
                            i.tags.first().map(String::as_str).unwrap_or("latest")
                        )
                    })
                }
            }
        }
        _ => None,
    };
    match own.as_deref().and_then(split_reference) {
        Some((repo, RefTail::Tag(t))) => Ok((repo, vec![t])),
        Some((repo, RefTail::Digest(_))) => Ok((repo, vec![])),
        None => bail!(
            "{}: cannot tell what to name this image; write {}=REGISTRY/REPOSITORY:TAG",
            src.source,
            src.source
        ),
    }
}

fn normalize(r: &str) -> String {
    let first = r.split('/').next().unwrap_or("");
    if r.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost") {
        r.to_string()
    } else if r.contains('/') {
        format!("docker.io/{r}")
    } else {
        format!("docker.io/library/{r}")
    }
}

/// The image's own manifest bytes. The proxy hands out an OCI conversion; when that is not
/// the original, `skopeo inspect --raw` gives the original, which must hash to the digest
/// the proxy reported.
fn original_manifest(
    source: &str,
    digest: &Digest,
    converted: &[u8],
    skopeo: &str,
    tls_verify: bool,
) -> Result<Vec<u8>> {
    if Digest::of(converted) == *digest {
        return Ok(converted.to_vec());
    }
    let mut candidates = vec![source.to_string()];
    if let Some(rest) = source.strip_prefix("docker://") {
        let repo = rest.split('@').next().unwrap_or(rest);
        let repo = match repo.rfind(':') {
            Some(c) if !repo[c..].contains('/') => &repo[..c],
            _ => repo,
        };
        candidates.push(format!("docker://{repo}@{digest}"));
    }
    for c in &candidates {
        let mut cmd = Command::new(skopeo);
        cmd.arg("inspect").arg("--raw");
        if !tls_verify && c.starts_with("docker://") {
            cmd.arg("--tls-verify=false");
        }
        let out = process::run(cmd.arg(c))?;
        if Digest::of(&out.stdout) == *digest {
            return Ok(out.stdout);
        }
    }
    bail!("{source}: cannot obtain the original manifest {digest} (it may be a multi-platform list; name the platform's image by digest)")
}

/// Writes `bytes` as blob `digest` unless it is there already.
fn put_blob(
    work: &Path,
    digest: &Digest,
    bytes: &[u8],
    written: &mut HashSet<Digest>,
    order: &mut Vec<Digest>,
) -> Result<()> {
    if written.insert(*digest) {
        let p = work.join("blobs/sha256").join(digest.hex());
        fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
        order.push(*digest);
    }
    Ok(())
}

/// Fetches a blob into the layout unless it is there already. Returns the bytes of a
/// small blob (the config), and counts the unpacked size of a layer as it streams by.
async fn fetch_blob(
    proxy: &Proxy,
    img: &crate::store::proxy::ProxyImage,
    desc: &Descriptor,
    work: &Path,
    written: &mut HashSet<Digest>,
    order: &mut Vec<Digest>,
    unpack: Option<(&str, &mut Option<u64>)>,
) -> Result<Option<Vec<u8>>> {
    let path = work.join("blobs/sha256").join(desc.digest.hex());
    if !written.insert(desc.digest) {
        return Ok(match unpack {
            Some((_, n)) => {
                *n = None; // measured from the file instead
                None
            }
            None => Some(fs::read(&path).with_context(|| format!("reading {}", path.display()))?),
        });
    }
    order.push(desc.digest);
    let tmp = path.with_extension("part");
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let keep_small = desc.size <= MAX_DOCUMENT && unpack.is_none();
    let mut small = Vec::new();
    let mut counter = unpack.as_ref().map(|(mt, _)| Unpacker::new(mt));
    let res = proxy
        .read_blob(img, &desc.digest, desc.size, &mut |chunk| {
            out.write_all(chunk)?;
            if keep_small {
                small.extend_from_slice(chunk);
            }
            if let Some(Some(u)) = counter.as_mut() {
                u.write_all(chunk)?;
            }
            Ok(())
        })
        .await;
    res.with_context(|| format!("{}: fetching blob {}", img_name(img), desc.digest))?;
    out.flush()
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(out);
    fs::rename(&tmp, &path).with_context(|| format!("renaming {}", tmp.display()))?;
    if let Some((_, n)) = unpack {
        *n = match counter {
            Some(Some(u)) => Some(u.finish()?),
            _ => Some(desc.size),
        };
    }
    Ok(keep_small.then_some(small))
}

fn img_name(img: &crate::store::proxy::ProxyImage) -> String {
    img.digest.to_string()
}

/// Counts the bytes a compressed layer unpacks to, fed as it streams by.
enum Unpacker {
    Gzip(flate2::write::MultiGzDecoder<Counter>),
    Zstd(zstd::stream::write::Decoder<'static, Counter>),
}

impl Unpacker {
    /// `None` for an uncompressed layer, whose size is its unpacked size.
    fn new(media_type: &str) -> Option<Unpacker> {
        if media_type.contains("gzip") {
            Some(Unpacker::Gzip(flate2::write::MultiGzDecoder::new(Counter(
                0,
            ))))
        } else if media_type.contains("zstd") {
            zstd::stream::write::Decoder::new(Counter(0))
                .ok()
                .map(Unpacker::Zstd)
        } else {
            None
        }
    }

    fn finish(self) -> Result<u64> {
        Ok(match self {
            Unpacker::Gzip(d) => d.finish().context("decompressing layer")?.0,
            Unpacker::Zstd(mut d) => {
                d.flush().context("decompressing layer")?;
                d.into_inner().0
            }
        })
    }
}

impl Write for Unpacker {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Unpacker::Gzip(d) => d.write(buf),
            Unpacker::Zstd(d) => d.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Unpacker::Gzip(d) => d.flush(),
            Unpacker::Zstd(d) => d.flush(),
        }
    }
}

/// A sink that only counts.
struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Unpacked size of a layer already in the layout (a layer two images share).
fn layer_unpacked_size(work: &Path, l: &Descriptor) -> Result<Option<u64>> {
    let p = work.join("blobs/sha256").join(l.digest.hex());
    let Some(mut u) = Unpacker::new(&l.media_type) else {
        return Ok(Some(l.size));
    };
    let mut f = File::open(&p).with_context(|| format!("reading {}", p.display()))?;
    io::copy(&mut f, &mut u).with_context(|| format!("decompressing {}", p.display()))?;
    u.finish().map(Some)
}

fn created_now() -> String {
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(crate::state::now);
    rfc3339(secs)
}

/// Formats seconds since the epoch as an RFC 3339 UTC time.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Writes the layout at `work` as a tar stream: `bundle.json` first, then `oci-layout`,
/// `index.json`, and the blobs in the order they were fetched (each manifest before its
/// config and layers).
fn write_tar(work: &Path, out: &Path, form: OutForm, order: &[Digest]) -> Result<()> {
    let tmp = out.with_file_name(format!(
        ".{}.part{}",
        out.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let sink: Box<dyn Write> = match form {
        OutForm::TarZst => Box::new(
            zstd::stream::write::Encoder::new(BufWriter::with_capacity(1 << 20, file), 3)
                .context("starting zstd")?
                .auto_finish(),
        ),
        OutForm::TarGz => Box::new(flate2::write::GzEncoder::new(
            BufWriter::with_capacity(1 << 20, file),
            flate2::Compression::fast(),
        )),
        _ => Box::new(BufWriter::with_capacity(1 << 20, file)),
    };
    let res = (|| -> Result<()> {
        let mut b = tar::Builder::new(sink);
        let mut names: Vec<PathBuf> =
            vec![BUNDLE_JSON.into(), "oci-layout".into(), "index.json".into()];
        names.extend(
            order
                .iter()
                .map(|d| PathBuf::from(format!("blobs/sha256/{}", d.hex()))),
        );
        for name in names {
            let p = work.join(&name);
            let mut f = File::open(&p).with_context(|| format!("reading {}", p.display()))?;
            let len = f
                .metadata()
                .with_context(|| format!("reading {}", p.display()))?
                .len();
            let mut h = tar::Header::new_gnu();
            h.set_size(len);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, &name, &mut f)
                .with_context(|| format!("writing {} into {}", name.display(), out.display()))?;
        }
        let mut sink = b
            .into_inner()
            .with_context(|| format!("finishing {}", out.display()))?;
        sink.flush()
            .with_context(|| format!("writing {}", out.display()))?;
        drop(sink);
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", tmp.display()))?;
        fs::rename(&tmp, out)
            .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// The OCI name of this machine's architecture (`amd64`, `arm64`, …).
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        "x86" => "386",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn source_args() {
        let a: SourceArg = "dir:/x=example.com/a:1".parse().unwrap();
        assert_eq!(a.source, "dir:/x");
        assert_eq!(a.name.as_deref(), Some("example.com/a:1"));
        let b: SourceArg = "oci:/l:example.com/a:1".parse().unwrap();
        assert_eq!(b.name, None);
        assert_eq!(
            image_name(&b).unwrap(),
            ("example.com/a".to_string(), vec!["1".to_string()])
        );
        let c: SourceArg = "docker://busybox:1.36".parse().unwrap();
        assert_eq!(
            image_name(&c).unwrap(),
            (
                "docker.io/library/busybox".to_string(),
                vec!["1.36".to_string()]
            )
        );
        let d: SourceArg = "dir:/x".parse().unwrap();
        assert!(format!("{:#}", image_name(&d).unwrap_err()).contains("dir:/x=REGISTRY"));
    }
}
