//! Registry settings from the agent configuration (docs/containers.md):
//!
//! ```toml
//! [registries."registry.lan:5000"]
//! insecure = true          # plain HTTP (loopback registries always are)
//! username = "puller"      # for Basic auth, or to get a Bearer token
//! password = "secret"
//! ```
//!
//! Each registry's entry comes whole from the last config file that has it;
//! `config::load` reads the files and calls [`parse`] on each, so a bad entry
//! is an error of the agent's configuration like any other.

use super::registry::{Credentials, Puller};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySettings {
    #[serde(default)]
    pub insecure: bool,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// Parses and checks the `registries` table of one file.
pub fn parse(value: toml::Value, origin: &str) -> Result<BTreeMap<String, RegistrySettings>> {
    let table: BTreeMap<String, RegistrySettings> = value
        .try_into()
        .with_context(|| format!("{origin}: registries"))?;
    for (name, r) in &table {
        if !super::reference::valid_registry(name) {
            bail!("{origin}: registries.{name:?}: not a registry host[:port]");
        }
        if r.username.is_some() != r.password.is_some() {
            bail!("{origin}: registries.{name:?}: username and password go together");
        }
    }
    Ok(table)
}

/// Applies the settings to a puller.
pub fn configure<'a>(
    mut p: Puller<'a>,
    settings: &BTreeMap<String, RegistrySettings>,
) -> Puller<'a> {
    let insecure: Vec<String> = settings
        .iter()
        .filter(|(_, s)| s.insecure)
        .map(|(n, _)| n.clone())
        .collect();
    p = p.insecure(insecure);
    for (name, s) in settings {
        if let (Some(u), Some(pw)) = (&s.username, &s.password) {
            p = p.credentials(
                name,
                Credentials {
                    username: u.clone(),
                    password: pw.clone(),
                },
            );
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{DirHost, Host};
    use std::path::Path;

    #[test]
    fn parse_table() {
        let cases: Vec<(&str, Result<usize, &str>)> = vec![
            ("", Ok(0)),
            ("[\"reg.lan:5000\"]\ninsecure = true", Ok(1)),
            (
                "[\"r.example\"]\nusername = \"u\"\npassword = \"p\"\n[\"other\"]",
                Ok(2),
            ),
            (
                "[\"r.example\"]\nusername = \"u\"",
                Err("username and password go together"),
            ),
            ("[\"r.example\"]\ninsecur = true", Err("f: registries")),
            ("[\"bad host!\"]", Err("not a registry host[:port]")),
            ("[\"r:99999\"]", Err("not a registry host[:port]")),
            ("[\"r.example\"]\ninsecure = \"yes\"", Err("f: registries")),
        ];
        for (text, want) in cases {
            let v: toml::Value = toml::from_str(text).expect("toml");
            match (parse(v, "f"), want) {
                (Ok(t), Ok(n)) => assert_eq!(t.len(), n, "{text}"),
                (Err(e), Err(w)) => assert!(format!("{e:#}").contains(w), "{text}: {e:#}"),
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn later_files_win_per_registry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = DirHost::new(dir.path()).expect("host");
        let write = |p: &str, t: &str| {
            host.write_atomic(Path::new(p), t.as_bytes())
                .expect("write")
        };
        write(
            "/usr/lib/ballast/agent.toml",
            "[registries.\"a\"]\ninsecure = true\n[registries.\"b\"]\ninsecure = true\n",
        );
        write(
            "/etc/ballast/agent.d/60-reg.toml",
            "[registries.\"a\"]\nusername = \"u\"\npassword = \"p\"\n",
        );
        let loaded = crate::config::load(&host).expect("config");
        let got = &loaded.settings.registries;
        assert_eq!(
            got["a"],
            RegistrySettings {
                insecure: false,
                username: Some("u".into()),
                password: Some("p".into())
            }
        );
        assert!(got["b"].insecure);
        // No unknown-key warnings for registry names.
        assert!(loaded.unknown_keys.is_empty(), "{:?}", loaded.unknown_keys);
    }
}
