//! `osctl fleet`: the operator's view of the fleet in etcd, and the group
//! actions (docs/etcd.md). Talks to etcd directly, with the endpoints, TLS
//! and prefix of the agent config unless given on the command line.

use super::admin::{self, GroupView, Overview};
use super::model::Keys;
use crate::config::fleet::{FleetSettings, Tls, DEFAULT_PREFIX};
use crate::host::Host;
use anyhow::{bail, Context, Result};
use ballast_common::version;
use std::path::PathBuf;

/// Where etcd is; by default from the agent config's `[etcd]` section.
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdArgs {
    /// etcd endpoints (comma-separated URLs), instead of the agent config's.
    #[arg(long, value_delimiter = ',', global = true)]
    pub endpoints: Vec<String>,
    /// Key prefix (default: the agent config's, else /ballast).
    #[arg(long, global = true)]
    pub prefix: Option<String>,
    /// CA certificate of etcd's server certificate (with --endpoints).
    #[arg(long, global = true)]
    pub cacert: Option<PathBuf>,
    /// Client certificate (with --key and --endpoints).
    #[arg(long, global = true)]
    pub cert: Option<PathBuf>,
    /// Client key.
    #[arg(long, global = true)]
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum FleetCommand {
    /// Hosts, versions, update states, lock holders, failures and rollout
    /// progress per group.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// `status`, redrawn as it changes: a progress bar per group on a
    /// terminal, a line per group and change otherwise.
    Watch {
        /// Redraw at most this often, in seconds.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
    /// Stop a group's hosts from starting reboots into updates.
    Pause { group: String },
    /// Let a paused group go on.
    Resume { group: String },
    /// Let a group's hosts reboot only into this version.
    Pin {
        group: String,
        /// The version; leave out with --none to unpin.
        version: Option<String>,
        /// Remove the pin.
        #[arg(long, conflicts_with = "version")]
        none: bool,
    },
    /// Set how many hosts of a group may reboot at once.
    SetMax { group: String, max: u32 },
    /// Free the reboot slot of a stuck holder.
    Unlock { group: String, machine_id: String },
}

/// Settings from the command line, else from the agent config.
pub fn settings(host: &dyn Host, args: &EtcdArgs) -> Result<FleetSettings> {
    let mut s = if args.endpoints.is_empty() {
        crate::config::load_and_warn(host)?.fleet.context(
            "no etcd endpoints: set [etcd] endpoints in the agent config or pass --endpoints",
        )?
    } else {
        let mut s = FleetSettings::new(args.endpoints.clone());
        let https = args.endpoints.iter().any(|e| e.starts_with("https://"));
        let client = match (&args.cert, &args.key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => bail!("--cert and --key go together"),
        };
        if https {
            s.tls = Some(Tls {
                ca_file: args.cacert.clone(),
                client,
            });
        } else if args.cacert.is_some() || client.is_some() {
            bail!("--cacert, --cert and --key need https:// endpoints");
        }
        s
    };
    if let Some(p) = &args.prefix {
        if !p.starts_with('/') {
            bail!("--prefix {p:?} must start with /");
        }
        s.prefix = p.trim_end_matches('/').to_string();
    }
    if s.prefix.is_empty() {
        s.prefix = DEFAULT_PREFIX.into();
    }
    Ok(s)
}

/// Runs one command on a runtime of its own (osctl has no other).
pub fn run(host: &dyn Host, args: &EtcdArgs, cmd: FleetCommand) -> Result<()> {
    let s = settings(host, args)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(run_async(&s, cmd))
}

async fn run_async(s: &FleetSettings, cmd: FleetCommand) -> Result<()> {
    let client = super::connect(s).await?;
    let keys = Keys::new(&s.prefix);
    let show = |p: super::model::Policy| println!("{}", p.to_json());
    match cmd {
        FleetCommand::Status { json } => {
            let o = admin::overview(&client, &keys).await?;
            crate::print_view(json, "the fleet status", &o, render)?;
        }
        FleetCommand::Watch { interval } => {
            if !(interval.is_finite() && interval > 0.0) {
                bail!("--interval must be a positive number of seconds");
            }
            watch(&client, &keys, std::time::Duration::from_secs_f64(interval)).await?
        }
        FleetCommand::Pause { group } => show(admin::pause(&client, &keys, &group).await?),
        FleetCommand::Resume { group } => show(admin::resume(&client, &keys, &group).await?),
        FleetCommand::Pin {
            group,
            version,
            none,
        } => {
            if version.is_none() && !none {
                bail!("give a version to pin, or --none to unpin");
            }
            show(admin::pin(&client, &keys, &group, version.as_deref()).await?)
        }
        FleetCommand::SetMax { group, max } => {
            show(admin::set_max(&client, &keys, &group, max).await?)
        }
        FleetCommand::Unlock { group, machine_id } => {
            admin::unlock(&client, &keys, &group, &machine_id).await?;
            println!("freed the reboot slot of {machine_id} in group {group}");
        }
    }
    Ok(())
}

/// Redraws the fleet's state whenever etcd says it changed, at most every
/// `interval` (and every 10 s on a terminal, for the holders' ages). Runs
/// until interrupted; a broken watch is made again.
async fn watch(
    client: &etcd_client::Client,
    keys: &Keys,
    interval: std::time::Duration,
) -> Result<()> {
    use std::io::{IsTerminal, Write};
    use std::time::Duration;
    let tty = std::io::stdout().is_terminal();
    let mut c = client.clone();
    let mut stream = None;
    let mut last = String::new();
    loop {
        let o = admin::overview(client, keys).await?;
        let rev = o.revision;
        let text = if tty {
            render_bars(&o, 40)
        } else {
            render_lines(&o)
        };
        let mut out = std::io::stdout().lock();
        if tty {
            // Home, clear, draw.
            write!(out, "\x1b[H\x1b[2J{text}")?;
        } else if text != last {
            write!(out, "{text}")?;
        }
        out.flush()?;
        drop(out);
        last = text;
        if stream.is_none() {
            match super::watch_after(&mut c, &keys.root(), true, rev).await {
                Ok(s) => stream = Some(s),
                Err(e) => tracing::warn!("{e:#}; reading again in {interval:?}"),
            }
        }
        let changed = async {
            match stream.as_mut() {
                Some((_, s)) => s.message().await.map(|m| m.is_some()).unwrap_or(false),
                None => false,
            }
        };
        let quiet = if tty {
            Duration::from_secs(10)
        } else {
            Duration::from_secs(3600)
        };
        match tokio::time::timeout(quiet, changed).await {
            // A change, or a quiet terminal to refresh.
            Ok(true) | Err(_) => {}
            // The watch ended or failed: make it again after the next read.
            Ok(false) => stream = None,
        }
        tokio::time::sleep(interval).await;
    }
}

/// The version a group is rolling out (the newest it has), how many hosts
/// are on it, and of how many.
fn progress(g: &GroupView) -> Option<(String, usize)> {
    let v = newest(g)?;
    let on = g.versions.get(&v).copied().unwrap_or(0);
    Some((v, on))
}

fn failures_by_version(g: &GroupView) -> String {
    if g.failures.is_empty() {
        return "none".into();
    }
    g.failures
        .iter()
        .map(|(v, r)| format!("{v}: {}", r.len()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn state(g: &GroupView) -> String {
    let p = &g.policy;
    let mut state = if p.paused {
        format!(
            "paused ({})",
            p.paused_reason.as_deref().unwrap_or("by an operator")
        )
    } else {
        "active".to_string()
    };
    if let Some(v) = &p.pinned_version {
        state.push_str(&format!(", pinned to {v}"));
    }
    state
}

/// ", N waiting" when hosts wait in the group's queue.
fn waiting(g: &GroupView) -> String {
    match g.waiting {
        0 => String::new(),
        n => format!(", {n} waiting"),
    }
}

/// One line per group, for logs and pipes.
pub fn render_lines(o: &Overview) -> String {
    let mut out = String::new();
    for g in &o.groups {
        let (v, on) = progress(g).unwrap_or_default();
        out.push_str(&format!(
            "group {}: {on} of {} hosts on {v}; {} of max {} slots held{}; failures {}; {}\n",
            g.name,
            g.hosts,
            g.holders.len(),
            g.policy.max_holders,
            waiting(g),
            failures_by_version(g),
            state(g)
        ));
    }
    out
}

/// A progress bar per group, for a terminal.
pub fn render_bars(o: &Overview, width: usize) -> String {
    let mut out = String::new();
    for g in &o.groups {
        let (v, on) = progress(g).unwrap_or_default();
        let filled = (on * width).checked_div(g.hosts).unwrap_or(0).min(width);
        out.push_str(&format!(
            "{:<12} [{}{}] {on}/{} on {v}\n",
            g.name,
            "#".repeat(filled),
            "-".repeat(width - filled),
            g.hosts
        ));
        out.push_str(&format!(
            "             holders {}/{}{}, failures {}, {}\n",
            g.holders.len(),
            g.policy.max_holders,
            waiting(g),
            failures_by_version(g),
            state(g)
        ));
        for s in &g.slowest {
            out.push_str(&format!(
                "             slow: {} -> {} for {} s\n",
                s.machine_id, s.version, s.held_secs
            ));
        }
    }
    if o.groups.is_empty() {
        out.push_str("no groups in etcd\n");
    }
    out
}

/// The newest version the group's hosts are on or heading for.
fn newest(g: &GroupView) -> Option<String> {
    g.versions
        .keys()
        .chain(g.holders.iter().map(|h| &h.version))
        .max_by(|a, b| version::compare(a, b))
        .cloned()
}

fn render_group(g: &GroupView, out: &mut String) {
    let p = &g.policy;
    let state = state(g);
    out.push_str(&format!(
        "group {}: {state}; {} of max {} reboot slots held{}; failure threshold {}\n",
        g.name,
        g.holders.len(),
        p.max_holders,
        waiting(g),
        p.failure_threshold
    ));
    if let Some(v) = newest(g) {
        let on = g.versions.get(&v).copied().unwrap_or(0);
        let safe = if g.proven.contains(&v) {
            ""
        } else {
            " (not proven yet: safe mode, one host at a time)"
        };
        out.push_str(&format!(
            "  rollout of {v}: {on} of {} hosts{safe}\n",
            g.hosts
        ));
    }
    for (v, n) in &g.versions {
        out.push_str(&format!("  on {v}: {n}\n"));
    }
    for h in &g.holders {
        out.push_str(&format!(
            "  holder {} -> {} since {}\n",
            h.machine_id, h.version, h.since
        ));
    }
    for s in &g.slowest {
        out.push_str(&format!(
            "  slowest: {} -> {} held for {} s\n",
            s.machine_id, s.version, s.held_secs
        ));
    }
    for (v, reports) in &g.failures {
        out.push_str(&format!("  failures of {v}: {}\n", reports.len()));
        for r in reports {
            out.push_str(&format!("    {}: {}\n", r.machine_id, r.reason));
        }
    }
}

/// The human-readable form.
pub fn render(o: &Overview) -> String {
    let mut out = String::new();
    for g in &o.groups {
        render_group(g, &mut out);
    }
    if !o.hosts.is_empty() {
        out.push_str(&format!(
            "\n{:<32} {:<20} {:<10} {:<12} {:<10} {}\n",
            "MACHINE ID", "HOSTNAME", "GROUP", "VERSION", "STATE", "STAGED"
        ));
    }
    for h in &o.hosts {
        out.push_str(&format!(
            "{:<32} {:<20} {:<10} {:<12} {:<10} {}\n",
            h.machine_id,
            h.hostname,
            h.group,
            h.booted_version,
            h.update_state,
            h.staged_version.as_deref().unwrap_or("-")
        ));
        if let Some(e) = &h.last_error {
            out.push_str(&format!("  last error: {e}\n"));
        }
    }
    if o.groups.is_empty() && o.hosts.is_empty() {
        out.push_str("no hosts and no groups in etcd\n");
    }
    for p in &o.problems {
        out.push_str(&format!("problem: {p}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::model::{FailureReport, Holder, HostRecord, Policy};

    #[test]
    fn renders_groups_hosts_and_problems() {
        let mut g = GroupView {
            name: "web".into(),
            policy: Policy {
                paused: true,
                paused_reason: Some("2 hosts failed version 2.0 (threshold 2)".into()),
                max_holders: 3,
                ..Policy::default()
            },
            holders: vec![Holder {
                machine_id: "m2".into(),
                version: "2.0".into(),
                since: 5,
            }],
            hosts: 3,
            waiting: 1,
            ..GroupView::default()
        };
        g.versions.insert("1.0".into(), 2);
        g.versions.insert("2.0".into(), 1);
        g.failures.insert(
            "2.0".into(),
            vec![FailureReport {
                machine_id: "m3".into(),
                version: "2.0".into(),
                reason: "fell back".into(),
                at: 1,
            }],
        );
        let o = Overview {
            hosts: vec![HostRecord {
                machine_id: "m1".into(),
                hostname: "web-1".into(),
                group: "web".into(),
                booted_version: "1.0".into(),
                update_state: "staged".into(),
                staged_version: Some("2.0".into()),
                ..HostRecord::default()
            }],
            groups: vec![g],
            problems: vec!["/ballast/groups/web/policy: invalid group policy".into()],
            revision: 0,
        };
        let text = render(&o);
        for want in [
            "group web: paused (2 hosts failed version 2.0 (threshold 2)); 1 of max 3 reboot slots held, 1 waiting",
            "rollout of 2.0: 1 of 3 hosts (not proven yet",
            "holder m2 -> 2.0",
            "failures of 2.0: 1",
            "web-1",
            "problem: /ballast/groups/web/policy",
        ] {
            assert!(text.contains(want), "{want:?} not in\n{text}");
        }
    }

    #[test]
    fn command_line_settings() {
        let dir = tempfile::tempdir().unwrap();
        let host = crate::host::DirHost::new(dir.path()).unwrap();
        let none = EtcdArgs {
            endpoints: vec![],
            prefix: None,
            cacert: None,
            cert: None,
            key: None,
        };
        let e = format!("{:#}", settings(&host, &none).unwrap_err());
        assert!(e.contains("no etcd endpoints"), "{e}");
        let args = EtcdArgs {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: Some("/prod/".into()),
            ..none.clone()
        };
        let s = settings(&host, &args).unwrap();
        assert_eq!((s.prefix.as_str(), s.tls), ("/prod", None));
        let bad = EtcdArgs {
            cert: Some("/c".into()),
            ..args
        };
        assert!(settings(&host, &bad).is_err());
    }
}
