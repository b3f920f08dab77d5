//! `osctl containers list | logs <name> | restart <name>`.

use super::agent::{current_units, Paths};
use super::desired::{self, AgentConfigSource, FilesSource, SavedLayers, SavedSource, Source};
use super::systemd::{Systemd, UnitManager};
use super::unit;
use crate::host::Host;
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use std::collections::BTreeMap;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum ContainersCommand {
    /// List the desired containers and their units' states.
    List,
    /// Show a container's log from the journal.
    Logs {
        name: String,
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
        /// How many lines of the past to show.
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: u32,
    },
    /// Restart a container's unit.
    Restart { name: String },
}

/// One row of `osctl containers list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub name: String,
    pub image: String,
    pub layer: String,
    pub state: String,
}

/// The table `list` prints.
pub fn render(rows: &[Row], problems: &[String]) -> String {
    let mut out = String::new();
    let w = |f: fn(&Row) -> &str, title: &str| {
        rows.iter()
            .map(|r| f(r).len())
            .max()
            .unwrap_or(0)
            .max(title.len())
    };
    let (wn, ws, wl) = (
        w(|r| &r.name, "NAME"),
        w(|r| &r.state, "STATE"),
        w(|r| &r.layer, "FROM"),
    );
    out.push_str(&format!(
        "{:wn$}  {:ws$}  {:wl$}  IMAGE\n",
        "NAME", "STATE", "FROM"
    ));
    for r in rows {
        out.push_str(&format!(
            "{:wn$}  {:ws$}  {:wl$}  {}\n",
            r.name, r.state, r.layer, r.image
        ));
    }
    for p in problems {
        out.push_str(&format!("problem: {p}\n"));
    }
    out
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
}

fn check_name(name: &str) -> Result<()> {
    if !super::spec::valid_name(name) {
        bail!("{name:?} is not a container name");
    }
    Ok(())
}

pub fn run(host: &dyn Host, cmd: ContainersCommand) -> Result<ExitCode> {
    let paths = Paths::default();
    match cmd {
        ContainersCommand::List => {
            let saved = SavedLayers::load(host, &paths.state_file)?;
            let files = FilesSource { host };
            let agent = AgentConfigSource { host };
            let mut sources: Vec<&dyn Source> = vec![&agent, &files];
            // etcd's layers as the agent last applied them, if the host is
            // in a fleet (otherwise the agent dropped them).
            let etcd = crate::fleet::containers::LAYERS.map(|layer| SavedSource {
                layer,
                saved: &saved,
            });
            if crate::config::load(host)?.settings.fleet.is_some() {
                sources.extend(etcd.iter().map(|s| s as &dyn Source));
            }
            let loaded = desired::load_all(&sources, &saved);
            let units = current_units(host, &paths.unit_dir)?;
            let rt = runtime()?;
            let states: BTreeMap<String, String> = rt.block_on(async {
                let sd = Systemd::connect().await?;
                let mut out = BTreeMap::new();
                for name in units.keys() {
                    let (a, s) = sd.state(&unit::unit_name(name)).await?;
                    out.insert(name.clone(), format!("{a} ({s})"));
                }
                anyhow::Ok(out)
            })?;
            let mut rows = Vec::new();
            for (name, d) in &loaded.desired {
                let state = match (states.get(name), d.container.enabled) {
                    (Some(s), _) => s.clone(),
                    (None, false) => "disabled".into(),
                    (None, true) => "no unit yet".into(),
                };
                rows.push(Row {
                    name: name.clone(),
                    image: d.container.image.to_string(),
                    layer: d.layer.clone(),
                    state,
                });
            }
            for (name, s) in &states {
                if !loaded.desired.contains_key(name) {
                    rows.push(Row {
                        name: name.clone(),
                        image: "-".into(),
                        layer: "(not desired: removed on the next pass)".into(),
                        state: s.clone(),
                    });
                }
            }
            print!("{}", render(&rows, &loaded.problems));
            Ok(ExitCode::SUCCESS)
        }
        ContainersCommand::Logs {
            name,
            follow,
            lines,
        } => {
            check_name(&name)?;
            // Reading the journal is journalctl's job; osctl hands over to it.
            let mut cmd = std::process::Command::new("journalctl");
            cmd.args([
                "--no-pager",
                "-u",
                &unit::unit_name(&name),
                "-n",
                &lines.to_string(),
            ]);
            if follow {
                cmd.arg("-f");
            }
            let status = cmd.status().context("cannot run journalctl")?;
            Ok(if status.success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        ContainersCommand::Restart { name } => {
            check_name(&name)?;
            let u = unit::unit_name(&name);
            if !host
                .exists(&paths.unit_dir.join(&u))
                .with_context(|| format!("cannot check {u}"))?
            {
                bail!("no container {name} on this host (no {u})");
            }
            runtime()?.block_on(async { Systemd::connect().await?.restart(&u).await })?;
            println!("restarted {name}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_table() {
        let rows = vec![
            Row {
                name: "web".into(),
                image: "r.example/web:1".into(),
                layer: "files".into(),
                state: "active (running)".into(),
            },
            Row {
                name: "database".into(),
                image: "r.example/db:2".into(),
                layer: "user-data".into(),
                state: "disabled".into(),
            },
        ];
        let text = render(&rows, &["source files: broken".to_string()]);
        assert_eq!(
            text,
            "NAME      STATE             FROM       IMAGE\n\
             web       active (running)  files      r.example/web:1\n\
             database  disabled          user-data  r.example/db:2\n\
             problem: source files: broken\n"
        );
    }
}
