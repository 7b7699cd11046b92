//! Image references, checked with the grammar containers/image uses
//! (github.com/containers/image `docker/reference/regexp.go`, from distribution's
//! `reference` package), so that a name longshore accepts is one `skopeo copy` and CRI-O
//! accept too, and a refused name is refused before anything is recorded or copied:
//!
//! ```text
//! name             := domain '/' path            (at most 255 characters in all)
//! domain           := host [':' port]
//! host             := domain-component ('.' domain-component)* | '[' ipv6 ']'
//! domain-component := [a-zA-Z0-9] | [a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]
//! port             := [0-9]+
//! path             := path-component ('/' path-component)*
//! path-component   := [a-z0-9]+ (separator [a-z0-9]+)*
//! separator        := [_.] | '__' | '-'+
//! tag              := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
//! ```
//!
//! longshore stores images under full names only: the first component must be a registry
//! host (it holds a `.` or a `:`, or is `localhost`), as containers/image's normalisation
//! decides (`docker/reference/normalize.go`, `splitDockerDomain`).

use crate::oci::digest::Digest;

/// Longest repository name containers/image accepts (`NameTotalLengthMax`).
pub const NAME_MAX: usize = 255;

/// What follows the repository in a reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// `:tag`
    Tag(String),
    /// `@sha256:…`
    Digest(Digest),
}

/// Splits a full reference `host/path:tag` or `host/path@sha256:…` into its repository
/// and tail, or says what is wrong with it.
pub fn parse(reference: &str) -> Result<(String, Tail), String> {
    let (repo, tail) = if let Some((repo, digest)) = reference.split_once('@') {
        let d = digest
            .parse::<Digest>()
            .map_err(|_| "its digest is not sha256: and 64 lowercase hex digits".to_string())?;
        (repo, Tail::Digest(d))
    } else {
        let slash = reference.rfind('/').ok_or("it names no registry host")?;
        let colon = reference[slash..]
            .rfind(':')
            .ok_or("it has neither a tag nor a digest")?
            + slash;
        let tag = &reference[colon + 1..];
        if !valid_tag(tag) {
            return Err(format!(
                "tag {:?} is not 1 to 128 of [A-Za-z0-9_.-], starting with a letter, digit or _",
                short(tag)
            ));
        }
        (&reference[..colon], Tail::Tag(tag.to_string()))
    };
    check_name(repo)?;
    Ok((repo.to_string(), tail))
}

/// Checks a repository name (`host[:port]/path`).
pub fn check_name(repo: &str) -> Result<(), String> {
    if repo.len() > NAME_MAX {
        return Err(format!(
            "its repository name has {} characters (at most {NAME_MAX})",
            repo.len()
        ));
    }
    let (domain, path) = repo.split_once('/').ok_or("it names no registry host")?;
    let is_domain = domain.contains(['.', ':'])
        || domain == "localhost"
        || domain.bytes().any(|b| b.is_ascii_uppercase());
    if !is_domain {
        return Err(format!(
            "{:?} is not a registry host (a full reference starts with one, such as quay.io)",
            short(domain)
        ));
    }
    check_domain(domain)?;
    for c in path.split('/') {
        if !valid_path_component(c) {
            return Err(format!(
                "path component {:?} is not lowercase letters and digits joined by '.', '_', '__' or '-'",
                short(c)
            ));
        }
    }
    Ok(())
}

fn check_domain(domain: &str) -> Result<(), String> {
    let bad = || {
        format!("registry host {:?} is not a host name, an IP address or [IPv6], with an optional :port", short(domain))
    };
    let (host, port) = if let Some(rest) = domain.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or_else(bad)?;
        if v6.is_empty() || !v6.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return Err(bad());
        }
        match after {
            "" => return Ok(()),
            p => ("", p.strip_prefix(':').ok_or_else(bad).map(Some)?),
        }
    } else {
        match domain.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (domain, None),
        }
    };
    if let Some(p) = port {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
    }
    if !host.is_empty() || port.is_none() {
        let ok = host.split('.').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !c.starts_with('-')
                && !c.ends_with('-')
        });
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

/// `[a-z0-9]+ (separator [a-z0-9]+)*` with separator `[_.]`, `__` or `-+`.
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// Whether `t` is a tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn valid_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && !t.starts_with(['.', '-'])
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn short(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted() {
        for r in [
            "example.com/app/web:2",
            "localhost:5000/web:v1.2",
            "quay.io/openshift-release-dev/ocp-v4.0-art-dev:x",
            "registry.example.com:5000/a__b/c-d/e.f:_tag",
            "[::1]:5000/app:1",
            "10.0.0.1/app:1",
            "a-b.example.com/x--y:1",
        ] {
            assert!(parse(r).is_ok(), "{r}: {:?}", parse(r));
        }
        let d = Digest::of(b"x");
        assert_eq!(
            parse(&format!("quay.io/a/b@{d}")),
            Ok(("quay.io/a/b".into(), Tail::Digest(d)))
        );
    }

    #[test]
    fn refused_as_containers_image_refuses() {
        let long = format!("example.com/{}:1", "a".repeat(250));
        for r in [
            "example.com/a..b:1",
            "-evil.com/x:1",
            "evil-.com/x:1",
            "host:notaport/x:1",
            "example.com/Web:2",
            "example.com/web",
            "example.com/-web:1",
            "example.com/web_:1",
            "example.com/a___b:1",
            "example.com//web:1",
            "example.com/web:-tag",
            "example.com/web:",
            "web:2",
            "library/web:2",
            "latest",
            "[zz]/x:1",
            long.as_str(),
        ] {
            assert!(parse(r).is_err(), "{r} should be refused");
        }
    }
}
