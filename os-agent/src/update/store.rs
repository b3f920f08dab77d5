//! What the update engine remembers across runs and reboots, in
//! /var/lib/ballast/update/state.json (written atomically), and the lock that
//! keeps two writers (the daemon, `osctl update apply`) off one slot.

use super::state::{Event, IllegalTransition, State};
use crate::disk::slot::Slot;
use crate::host::Host;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

pub const STATE_DIR: &str = "/var/lib/ballast/update";
pub const STATE_FILE: &str = "/var/lib/ballast/update/state.json";
/// A copy of the staged UKI on /var, verified before it was written: what
/// puts the entry back if a power cut takes it from the ESP.
pub const STAGED_UKI: &str = "/var/lib/ballast/update/staged.efi";

/// An update written to the inactive slot and made bootable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    pub version: String,
    pub root_hash: String,
    pub slot: Slot,
    /// The UKI's file name on the ESP (with its boot counter).
    pub uki_file: String,
    /// The staged UKI's SHA-256 (from the signed manifest): what the entry
    /// must hold for the install to count as done. Absent in state written
    /// before it was recorded.
    #[serde(default)]
    pub uki_sha256: Option<String>,
    /// Boots since staging in which systemd-boot chose another entry over
    /// this intact, untried one.
    #[serde(default)]
    pub untried_boots: u32,
    /// The boot it was staged in: a different boot id means the host rebooted since.
    pub boot_id: String,
    pub staged_at: u64,
}

/// A version the host fell back from (or the operator rolled back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollback {
    pub version: String,
    /// The version running after the rollback.
    pub to_version: String,
    pub at: u64,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct UpdateState {
    pub state: State,
    /// Highest manifest sequence accepted, per channel name: a host that
    /// moves to another channel starts that channel's count afresh and keeps
    /// this one's, so neither channel can roll the other back or freeze it.
    #[serde(default)]
    pub sequences: BTreeMap<String, u64>,
    /// The single sequence state written before sequences were kept per
    /// channel; read as the sequence of whichever channel is followed until
    /// that channel has its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sequence: Option<u64>,
    /// Versions that failed on this host: never tried again.
    #[serde(default)]
    pub failed_versions: Vec<String>,
    pub staged: Option<Staged>,
    /// Unix time of the last completed check of the channel.
    pub last_check: Option<u64>,
    /// What the last check concluded, in words.
    pub last_result: Option<String>,
    pub last_error: Option<String>,
    pub last_rollback: Option<Rollback>,
    /// Unix time this file was written.
    #[serde(default)]
    pub updated_at: u64,
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl UpdateState {
    /// Applies an event; an illegal one is an error and changes nothing.
    pub fn apply(&mut self, event: Event) -> Result<(), IllegalTransition> {
        let from = self.state.name();
        let next = self.state.clone().next(event)?;
        if next.name() != from {
            tracing::info!("update state: {from} -> {}", next.describe());
        }
        self.state = next;
        Ok(())
    }

    /// The highest sequence accepted from `channel`.
    pub fn sequence_of(&self, channel: &str) -> Option<u64> {
        self.sequences.get(channel).copied().or(self.last_sequence)
    }

    /// Records that `channel`'s manifest of `sequence` was accepted.
    pub fn accept_sequence(&mut self, channel: &str, sequence: u64) {
        let seq = self.sequence_of(channel).unwrap_or(0).max(sequence);
        self.sequences.insert(channel.to_string(), seq);
        self.last_sequence = None;
    }

    /// Adds a version to the never-again list (once).
    pub fn mark_failed(&mut self, version: &str) {
        if !self.failed_versions.iter().any(|v| v == version) {
            self.failed_versions.push(version.to_string());
        }
    }
}

/// Reads state.json; a missing file is the initial state.
pub fn load(host: &dyn Host) -> Result<UpdateState> {
    match host.read(Path::new(STATE_FILE)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{STATE_FILE} is not a valid update state")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(UpdateState::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read {STATE_FILE}")),
    }
}

/// Writes state.json atomically.
pub fn save(host: &dyn Host, state: &mut UpdateState) -> Result<()> {
    state.updated_at = now_unix();
    let mut json = serde_json::to_vec_pretty(state).context("cannot serialize the update state")?;
    json.push(b'\n');
    host.write_atomic(Path::new(STATE_FILE), &json)
        .with_context(|| format!("cannot write {STATE_FILE}"))
}

/// Saves progress at most every `every`, so a download does not turn into a
/// stream of small writes to /var.
pub struct Throttle {
    every: Duration,
    last: Option<Instant>,
}

impl Throttle {
    pub fn new(every: Duration) -> Throttle {
        Throttle { every, last: None }
    }

    pub fn due(&mut self) -> bool {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < self.every => false,
            _ => {
                self.last = Some(now);
                true
            }
        }
    }
}

/// Held while an update writes to a slot: an exclusive flock on the state
/// directory, dropped with the guard (and by the kernel if the process dies).
pub struct UpdateLock {
    _dir: File,
}

/// Takes the update lock, waiting for whoever holds it (the daemon in the
/// middle of an update) to finish.
pub fn lock_wait(host: &dyn Host) -> Result<UpdateLock> {
    match lock(host) {
        Ok(l) => Ok(l),
        Err(busy) => {
            tracing::warn!("{busy:#}; waiting for it to finish");
            let f = host
                .open(Path::new(STATE_DIR))
                .with_context(|| format!("cannot open {STATE_DIR}"))?;
            rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
                .map_err(std::io::Error::from)
                .with_context(|| format!("cannot lock {STATE_DIR}"))?;
            Ok(UpdateLock { _dir: f })
        }
    }
}

/// Takes the update lock, or says who has it.
pub fn lock(host: &dyn Host) -> Result<UpdateLock> {
    // The directory exists once anything was saved; make it if not.
    let dir = Path::new(STATE_DIR);
    if !host
        .exists(dir)
        .with_context(|| format!("cannot check {STATE_DIR}"))?
    {
        host.write_atomic(&dir.join(".lock"), b"")
            .with_context(|| format!("cannot create {STATE_DIR}"))?;
    }
    let f = host
        .open(dir)
        .with_context(|| format!("cannot open {STATE_DIR}"))?;
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(UpdateLock { _dir: f }),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => anyhow::bail!(
            "another update is in progress (the daemon or another osctl holds the lock on {STATE_DIR})"
        ),
        Err(e) => Err(std::io::Error::from(e)).with_context(|| format!("cannot lock {STATE_DIR}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::DirHost;

    #[test]
    fn saves_loads_and_locks() {
        let dir = tempfile::tempdir().unwrap();
        let host = DirHost::new(dir.path()).unwrap();
        assert_eq!(load(&host).unwrap(), UpdateState::default());
        let mut s = UpdateState::default();
        s.apply(Event::Check).unwrap();
        s.mark_failed("1.0");
        s.mark_failed("1.0");
        save(&host, &mut s).unwrap();
        let back = load(&host).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.failed_versions, vec!["1.0"]);
        assert!(s.apply(Event::Reboot).is_err());
        assert_eq!(s.state, State::Checking);

        let held = lock(&host).unwrap();
        let e = lock(&host).err().unwrap().to_string();
        assert!(e.contains("another update is in progress"), "{e}");
        drop(held);
        lock(&host).unwrap();

        std::fs::write(dir.path().join("var/lib/ballast/update/state.json"), "{").unwrap();
        let e = format!("{:#}", load(&host).unwrap_err());
        assert!(e.contains("is not a valid update state"), "{e}");
    }
}
