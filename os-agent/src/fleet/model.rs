//! The keys and values the fleet keeps in etcd (docs/etcd.md). Values are
//! JSON; operators write some of them with `etcdctl`, so every parser here
//! treats its input as untrusted and names the key it came from.

use serde::{Deserialize, Serialize};

/// A value in etcd that is not what the fleet expects.
#[derive(Debug, thiserror::Error)]
pub enum BadValue {
    #[error("{key}: the value is not UTF-8 JSON")]
    NotUtf8 { key: String },
    #[error("{key}: invalid {what}: {source}")]
    Json {
        key: String,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{key}: {why}")]
    Invalid { key: String, why: String },
}

fn parse<'a, T: Deserialize<'a>>(
    key: &str,
    what: &'static str,
    raw: &'a [u8],
) -> Result<T, BadValue> {
    let text = std::str::from_utf8(raw).map_err(|_| BadValue::NotUtf8 { key: key.into() })?;
    serde_json::from_str(text).map_err(|source| BadValue::Json {
        key: key.into(),
        what,
        source,
    })
}

/// Where everything lives, under the configured prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    /// Everything the fleet keeps.
    pub fn root(&self) -> String {
        format!("{}/", self.prefix)
    }

    pub fn hosts(&self) -> String {
        format!("{}/hosts/", self.prefix)
    }

    pub fn host(&self, machine_id: &str) -> String {
        format!("{}/hosts/{machine_id}", self.prefix)
    }

    pub fn groups(&self) -> String {
        format!("{}/groups/", self.prefix)
    }

    pub fn group(&self, group: &str) -> String {
        format!("{}/groups/{group}/", self.prefix)
    }

    pub fn policy(&self, group: &str) -> String {
        format!("{}/groups/{group}/policy", self.prefix)
    }

    pub fn holders(&self, group: &str) -> String {
        format!("{}/groups/{group}/lock/holders/", self.prefix)
    }

    pub fn holder(&self, group: &str, machine_id: &str) -> String {
        format!("{}{machine_id}", self.holders(group))
    }

    /// The numbered reboot slots `0..max_holders`; a host takes one by
    /// creating its key, so hosts that pick different free slots never
    /// conflict, and two that pick the same one are told apart by etcd.
    pub fn slots(&self, group: &str) -> String {
        format!("{}/groups/{group}/lock/slots/", self.prefix)
    }

    pub fn slot(&self, group: &str, index: u32) -> String {
        format!("{}{index}", self.slots(group))
    }

    /// Hosts waiting for a reboot slot, one key per host on its
    /// registration lease, served in the order the keys were created.
    pub fn queue(&self, group: &str) -> String {
        format!("{}/groups/{group}/queue/", self.prefix)
    }

    pub fn queued(&self, group: &str, machine_id: &str) -> String {
        format!("{}{machine_id}", self.queue(group))
    }

    pub fn failures(&self, group: &str) -> String {
        format!("{}/groups/{group}/failures/", self.prefix)
    }

    pub fn failures_of(&self, group: &str, version: &str) -> String {
        format!("{}{version}/", self.failures(group))
    }

    pub fn failure(&self, group: &str, version: &str, machine_id: &str) -> String {
        format!("{}{machine_id}", self.failures_of(group, version))
    }

    /// The group's desired containers, one key per container name.
    pub fn group_containers(&self, group: &str) -> String {
        format!("{}/containers/groups/{group}/", self.prefix)
    }

    /// One host's own desired containers, one key per container name.
    pub fn host_containers(&self, machine_id: &str) -> String {
        format!("{}/containers/hosts/{machine_id}/", self.prefix)
    }

    /// Set once a host of the group booted `version` and it was blessed;
    /// until then the group takes it one host at a time (safe mode).
    pub fn proven(&self, group: &str, version: &str) -> String {
        format!("{}/groups/{group}/proven/{version}", self.prefix)
    }
}

/// Versions become key segments.
pub fn check_version(v: &str) -> Result<(), String> {
    if v.is_empty()
        || v.len() > 128
        || v.starts_with('.')
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.+~".contains(c))
    {
        return Err(format!("{v:?} is not a version"));
    }
    Ok(())
}

pub const DEFAULT_MAX_HOLDERS: u32 = 1;
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;

fn default_max() -> u32 {
    DEFAULT_MAX_HOLDERS
}

fn default_threshold() -> u32 {
    DEFAULT_FAILURE_THRESHOLD
}

/// A group's policy. A missing key means every default; unknown fields are
/// refused, so an operator's typo does not silently do nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// No host of the group starts a reboot into an update.
    #[serde(default)]
    pub paused: bool,
    /// Why (set by the group itself when failures crossed the threshold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_reason: Option<String>,
    /// Hosts reboot only into this version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_version: Option<String>,
    /// At most this many hosts hold the reboot lock at once.
    #[serde(default = "default_max")]
    pub max_holders: u32,
    /// This many failure reports for one version pause the group.
    #[serde(default = "default_threshold")]
    pub failure_threshold: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            paused: false,
            paused_reason: None,
            pinned_version: None,
            max_holders: DEFAULT_MAX_HOLDERS,
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
        }
    }
}

impl Policy {
    pub fn parse(key: &str, raw: &[u8]) -> Result<Policy, BadValue> {
        let p: Policy = parse(key, "group policy", raw)?;
        let invalid = |why: String| BadValue::Invalid {
            key: key.into(),
            why,
        };
        if p.max_holders == 0 {
            return Err(invalid(
                "max_holders is 0: no host could ever reboot (use \"paused\": true to stop reboots)"
                    .into(),
            ));
        }
        if p.failure_threshold == 0 {
            return Err(invalid("failure_threshold must be at least 1".into()));
        }
        if let Some(v) = &p.pinned_version {
            check_version(v).map_err(|e| invalid(format!("pinned_version: {e}")))?;
        }
        Ok(p)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| unreachable!("a policy serializes: {e}"))
    }
}

/// How many containers run (filled in by the container work).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Containers {
    pub desired: u32,
    pub running: u32,
    pub failed: u32,
}

/// A host's registration: `hosts/<machine-id>`, bound to its lease.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub machine_id: String,
    pub hostname: String,
    pub addresses: Vec<String>,
    pub group: String,
    pub booted_version: String,
    pub booted_slot: String,
    pub staged_version: Option<String>,
    pub update_state: String,
    pub last_error: Option<String>,
    pub containers: Containers,
    pub agent_version: String,
}

impl HostRecord {
    pub fn parse(key: &str, raw: &[u8]) -> Result<HostRecord, BadValue> {
        parse(key, "host record", raw)
    }
}

/// A reboot lock holder: `groups/<g>/lock/holders/<machine-id>`, on a lease
/// of the lock TTL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub machine_id: String,
    /// The version the holder reboots into.
    pub version: String,
    /// Unix seconds.
    pub since: u64,
}

impl Holder {
    pub fn parse(key: &str, raw: &[u8]) -> Result<Holder, BadValue> {
        parse(key, "lock holder", raw)
    }
}

/// A rollback: `groups/<g>/failures/<version>/<machine-id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureReport {
    pub machine_id: String,
    pub version: String,
    pub reason: String,
    /// Unix seconds.
    pub at: u64,
}

impl FailureReport {
    pub fn parse(key: &str, raw: &[u8]) -> Result<FailureReport, BadValue> {
        parse(key, "failure report", raw)
    }
}

pub fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| unreachable!("fleet values serialize: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_defaults_and_fields() {
        let k = "/ballast/groups/web/policy";
        assert_eq!(Policy::parse(k, b"{}").unwrap(), Policy::default());
        let p = Policy::parse(
            k,
            br#"{"paused":true,"pinned_version":"1.2.3","max_holders":3,"failure_threshold":2}"#,
        )
        .unwrap();
        assert!(p.paused);
        assert_eq!(p.pinned_version.as_deref(), Some("1.2.3"));
        assert_eq!((p.max_holders, p.failure_threshold), (3, 2));
        assert_eq!(Policy::parse(k, p.to_json().as_bytes()).unwrap(), p);
    }

    #[test]
    fn bad_policies_name_the_key_and_the_problem() {
        let k = "/ballast/groups/web/policy";
        let cases: &[(&[u8], &str)] = &[
            (b"", "invalid group policy"),
            (b"paused", "invalid group policy"),
            (b"{\"max\":3}", "unknown field `max`"),
            (b"{\"max_holders\":-1}", "invalid group policy"),
            (b"{\"max_holders\":\"3\"}", "invalid type"),
            (b"{\"max_holders\":0}", "max_holders is 0"),
            (b"{\"failure_threshold\":0}", "at least 1"),
            (b"{\"pinned_version\":\"../x\"}", "pinned_version"),
            (b"{\"paused\":\"yes\"}", "invalid type"),
            (b"\xff\xfe", "not UTF-8"),
        ];
        for (raw, want) in cases {
            let msg = Policy::parse(k, raw).unwrap_err().to_string();
            assert!(msg.starts_with(k), "{msg}");
            assert!(
                msg.contains(want),
                "{:?}: {msg}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn bad_records_name_the_key() {
        let k = "/ballast/hosts/abc";
        assert!(HostRecord::parse(k, b"{\"machine_id\":1}")
            .unwrap_err()
            .to_string()
            .starts_with(k));
        assert!(Holder::parse(k, b"{}")
            .unwrap_err()
            .to_string()
            .contains("missing field"));
        assert!(FailureReport::parse(k, b"[]").is_err());
        let r = HostRecord {
            machine_id: "abc".into(),
            booted_version: "1.0".into(),
            ..HostRecord::default()
        };
        assert_eq!(HostRecord::parse(k, to_json(&r).as_bytes()).unwrap(), r);
    }

    #[test]
    fn versions_are_key_segments() {
        for ok in ["1.2.3", "2024.1+build~1", "v2"] {
            assert!(check_version(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b", "..", ".x", "a b"] {
            assert!(check_version(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn layout() {
        let k = Keys::new("/ballast/");
        assert_eq!(k.host("m1"), "/ballast/hosts/m1");
        assert_eq!(k.holder("web", "m1"), "/ballast/groups/web/lock/holders/m1");
        assert_eq!(
            k.failure("web", "2.0", "m1"),
            "/ballast/groups/web/failures/2.0/m1"
        );
        assert_eq!(k.proven("web", "2.0"), "/ballast/groups/web/proven/2.0");
        assert_eq!(k.group_containers("web"), "/ballast/containers/groups/web/");
        assert_eq!(k.host_containers("m1"), "/ballast/containers/hosts/m1/");
    }
}
