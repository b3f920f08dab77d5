//! Image references: `[registry[:port]/]repository[:tag][@sha256:<hex>]`, as
//! docker and skopeo write them.

use std::fmt;

/// Where Docker Hub's API lives; `docker.io` is only its name.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed image reference.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Reference {
    /// Host and optional port of the registry API (`registry-1.docker.io` for
    /// Docker Hub).
    pub registry: String,
    pub repository: String,
    /// A tag; `latest` when neither tag nor digest was given.
    pub tag: Option<String>,
    /// A pinned manifest digest (`sha256:<hex>`); wins over the tag.
    pub digest: Option<Digest>,
}

/// A content digest, `sha256:<64 hex>` (the only algorithm accepted).
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Result<Digest, String> {
        let Some(hex) = s.strip_prefix("sha256:") else {
            return Err(format!(
                "{s:?} is not a sha256 digest (sha256:<64 hex digits>)"
            ));
        };
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(format!(
                "{s:?} is not a sha256 digest (sha256:<64 lowercase hex digits>)"
            ));
        }
        Ok(Digest(s.to_string()))
    }

    /// From a lowercase hex sha256 as `HashingReader` gives it.
    pub fn from_sha256_hex(hex: &str) -> Result<Digest, String> {
        Digest::parse(&format!("sha256:{hex}"))
    }

    /// The hex part: safe as a file name (checked at parse time).
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Digest {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Digest::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn valid_repo_component(c: &str) -> bool {
    // distribution's grammar: lowercase alphanumerics joined by . _ __ or dashes.
    !c.is_empty()
        && c.bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
        && c.as_bytes()[0].is_ascii_alphanumeric()
        && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
}

fn valid_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && t.as_bytes()[0] != b'.'
        && t.as_bytes()[0] != b'-'
}

/// A registry host with an optional port (`registry.example.com:5000`).
pub(crate) fn valid_registry(r: &str) -> bool {
    let (host, port) = match r.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (r, None),
    };
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'))
        && port.is_none_or(|p| p.parse::<u16>().is_ok())
}

impl Reference {
    pub fn parse(s: &str) -> Result<Reference, String> {
        if s.is_empty() || s.len() > 512 || s.chars().any(|c| c.is_whitespace()) {
            return Err(format!("{s:?} is not an image reference"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(Digest::parse(d)?)),
            None => (s, None),
        };
        // A tag is after the last ':' that follows the last '/'.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag {
            if !valid_tag(t) {
                return Err(format!("{s:?}: {t:?} is not a tag"));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), path.to_string())
            }
            _ => ("docker.io".to_string(), name.to_string()),
        };
        if !valid_registry(&registry) {
            return Err(format!("{s:?}: {registry:?} is not a registry host[:port]"));
        }
        if !repository.split('/').all(valid_repo_component) {
            return Err(format!(
                "{s:?}: {repository:?} is not a repository (lowercase letters, digits, . _ -, separated by /)"
            ));
        }
        let (registry, repository) = if registry == "docker.io" {
            let repo = if repository.contains('/') {
                repository
            } else {
                format!("library/{repository}")
            };
            (DOCKER_HUB_API.to_string(), repo)
        } else {
            (registry, repository)
        };
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some("latest".to_string()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// What to ask the registry's manifest endpoint for: the digest if pinned.
    pub fn manifest_ref(&self) -> &str {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.as_str(),
            (None, Some(t)) => t,
            (None, None) => "latest",
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parse_table() {
        let d = Some(Digest(D.to_string()));
        type Want<'a> = Result<(&'a str, &'a str, Option<&'a str>, Option<Digest>), &'a str>;
        let cases: Vec<(String, Want)> = vec![
            (
                "nginx".into(),
                Ok((
                    "registry-1.docker.io",
                    "library/nginx",
                    Some("latest"),
                    None,
                )),
            ),
            (
                "nginx:1.25".into(),
                Ok(("registry-1.docker.io", "library/nginx", Some("1.25"), None)),
            ),
            (
                "me/app:v1".into(),
                Ok(("registry-1.docker.io", "me/app", Some("v1"), None)),
            ),
            (
                "127.0.0.1:5000/a/b:t".into(),
                Ok(("127.0.0.1:5000", "a/b", Some("t"), None)),
            ),
            (
                "localhost/x".into(),
                Ok(("localhost", "x", Some("latest"), None)),
            ),
            (
                format!("r.example/x@{D}"),
                Ok(("r.example", "x", None, d.clone())),
            ),
            (
                format!("r.example/x:t@{D}"),
                Ok(("r.example", "x", Some("t"), d)),
            ),
            ("".into(), Err("not an image reference")),
            ("a b".into(), Err("not an image reference")),
            ("r.example/X".into(), Err("is not a repository")),
            ("r.example/x:".into(), Err("is not a tag")),
            ("r.example/x:-t".into(), Err("is not a tag")),
            ("r.example:99999/x".into(), Err("is not a registry")),
            (
                "r.example/x@sha256:abc".into(),
                Err("is not a sha256 digest"),
            ),
            ("r.example/x@md5:abc".into(), Err("is not a sha256 digest")),
            ("r.example//x".into(), Err("is not a repository")),
        ];
        for (input, want) in cases {
            let got = Reference::parse(&input);
            match (got, want) {
                (Ok(r), Ok((reg, repo, tag, digest))) => {
                    assert_eq!(
                        (
                            r.registry.as_str(),
                            r.repository.as_str(),
                            r.tag.as_deref(),
                            r.digest
                        ),
                        (reg, repo, tag, digest),
                        "{input}"
                    );
                }
                (Err(e), Err(want)) => assert!(e.contains(want), "{input}: {e}"),
                (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
            }
        }
    }
}
