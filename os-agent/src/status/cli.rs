//! `osctl status`: the daemon's view when it runs, the host's facts otherwise.

use crate::host::Host;
use crate::status::{self, HostStatus};
use anyhow::Result;
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentState {
    /// status.json is there and its writer is alive.
    Running,
    /// status.json is there but the process that wrote it is gone.
    Stale,
    /// No status.json: the daemon is not running (or has not started yet).
    NotRunning,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatusView {
    #[serde(flatten)]
    pub status: HostStatus,
    pub agent_state: AgentState,
    /// Why status.json could not be used, when it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_error: Option<String>,
    /// The update engine's state.json (see `osctl update status`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update: Option<crate::update::store::UpdateState>,
}

fn process_is_agent(host: &dyn Host, pid: u32) -> Result<bool> {
    match host.read_to_string(&Path::new("/proc").join(pid.to_string()).join("comm")) {
        Ok(comm) => Ok(comm.trim() == "os-agent"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot read /proc/{pid}/comm"))),
    }
}

/// Builds the view: from status.json if usable, else gathered here.
pub fn view(host: &dyn Host) -> Result<StatusView> {
    let mut v = view_status(host)?;
    v.update = Some(crate::update::store::load(host)?);
    Ok(v)
}

fn view_status(host: &dyn Host) -> Result<StatusView> {
    match status::read_published(host) {
        Ok(Some(s)) => {
            let alive = match s.agent_pid {
                Some(pid) => process_is_agent(host, pid)?,
                None => false,
            };
            Ok(StatusView {
                status: s,
                agent_state: if alive {
                    AgentState::Running
                } else {
                    AgentState::Stale
                },
                agent_error: None,
                update: None,
            })
        }
        Ok(None) => Ok(StatusView {
            status: status::gather(host)?,
            agent_state: AgentState::NotRunning,
            agent_error: None,
            update: None,
        }),
        Err(e) => Ok(StatusView {
            status: status::gather(host)?,
            agent_state: AgentState::NotRunning,
            agent_error: Some(format!("{e:#}")),
            update: None,
        }),
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

/// `osctl status [--json]`.
pub fn run(host: &dyn Host, json: bool) -> Result<()> {
    crate::print_view(json, "the status", &view(host)?, render)
}

/// The human-readable form.
pub fn render(v: &StatusView) -> String {
    let s = &v.status;
    let agent = match (&v.agent_state, s.agent_pid) {
        (AgentState::Running, Some(pid)) => format!("running (pid {pid})"),
        (AgentState::Running, None) => "running".to_string(),
        (AgentState::Stale, Some(pid)) => format!("not running (stale status from pid {pid})"),
        (AgentState::Stale, None) => "not running (stale status)".to_string(),
        (AgentState::NotRunning, _) => "not running".to_string(),
    };
    let mut out = String::new();
    let mut line = |k: &str, val: &str| out.push_str(&format!("{k:>12}: {val}\n"));
    line("Slot", &s.slot.to_string());
    line("Image", &s.image_name);
    line("Version", &s.image_version);
    line("Root hash", &s.root_hash);
    line("Kernel", &s.kernel_release);
    line("Boot entry", s.boot_entry.as_deref().unwrap_or("unknown"));
    line(
        "Secure Boot",
        if s.secure_boot { "enforcing" } else { "off" },
    );
    if let Some(p) = &s.uki_path {
        line("UKI", p);
    }
    line(
        "Data",
        &format!(
            "{} ({})",
            s.data_partition,
            gib(s.data_partition_size_bytes)
        ),
    );
    line("Agent", &agent);
    if let Some(e) = &v.agent_error {
        line("Agent error", e);
    }
    if let Some(u) = &v.update {
        out.push_str(&crate::update::cli::render_status(u));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::fixture::{write, HASH_A};
    use crate::status::tests::booted_host;

    #[test]
    fn without_the_daemon_it_gathers_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let host = booted_host(dir.path(), &HASH_A);
        let v = view(&host).unwrap();
        assert_eq!(v.agent_state, AgentState::NotRunning);
        let text = render(&v);
        assert!(text.contains("        Slot: A\n"), "{text}");
        assert!(text.contains("     Version: 1.2.3\n"), "{text}");
        assert!(text.contains("       Agent: not running\n"), "{text}");
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["agent_state"], "not-running");
        assert_eq!(json["slot"], "a");
        assert!(json.get("agent_error").is_none());
    }

    #[test]
    fn with_the_daemon_it_reads_its_status() {
        let dir = tempfile::tempdir().unwrap();
        let host = booted_host(dir.path(), &HASH_A);
        let mut s = status::gather(&host).unwrap();
        s.agent_pid = Some(4242);
        s.image_version = "from-daemon".into();
        status::publish(&host, &s).unwrap();

        let v = view(&host).unwrap();
        assert_eq!(
            (v.agent_state.clone(), v.status.image_version.as_str()),
            (AgentState::Stale, "from-daemon")
        );
        assert!(render(&v).contains("not running (stale status from pid 4242)"));

        write(dir.path(), "proc/4242/comm", "os-agent\n");
        let v = view(&host).unwrap();
        assert_eq!(v.agent_state, AgentState::Running);
        assert!(render(&v).contains("Agent: running (pid 4242)"));

        write(dir.path(), "run/ballast/status.json", "not json");
        let v = view(&host).unwrap();
        assert_eq!(v.agent_state, AgentState::NotRunning);
        assert_eq!(v.status.image_version, "1.2.3");
        assert!(render(&v).contains("Agent error: /run/ballast/status.json is not a valid status"));
    }
}
