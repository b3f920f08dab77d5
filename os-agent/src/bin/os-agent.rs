//! The Ballast host agent.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use os_agent::disk::grow::{self, Step};
use os_agent::host::RealHost;
use os_agent::provision::{self, Outcome};
use os_agent::{config, daemon, health, logging};
use std::process::ExitCode;
use std::time::SystemTime;

/// The Ballast host agent.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish the host's status to /run/ballast/status.json, notify systemd
    /// and run until SIGTERM.
    Daemon,
    /// Check that this boot is healthy; exits non-zero with a reason per failed check.
    HealthCheck,
    /// Grow the data partition and its filesystem to fill the disk.
    GrowData,
    /// Apply user data (cloud-config) from the kernel command line's
    /// ballast.config_url=, QEMU fw_cfg or a NoCloud seed, once per instance
    /// id; exits non-zero if the data could not be read, was invalid or failed.
    Provision,
    /// Give a running container on a private network its address and
    /// default route (its unit's ExecStartPost=).
    ContainerNetwork {
        /// The container (machine) name.
        name: String,
    },
    /// Make a container's volume directory on the host, refusing symbolic
    /// links and anything outside its data directory (its unit's
    /// ExecStartPre=).
    ContainerVolume {
        /// The container (machine) name.
        name: String,
        /// The volume's host path, under /var/lib/ballast-volumes/<name>/.
        path: String,
    },
}

fn health_check() -> Result<ExitCode> {
    let settings = config::load_and_warn(&RealHost)?;
    let report = health::run(&RealHost, &settings.health, health::POLL_INTERVAL);
    for c in &report.0 {
        match &c.outcome {
            Ok(seen) => println!("ok   {}: {seen}", c.name),
            Err(why) => eprintln!("FAIL {}: {why}", c.name),
        }
    }
    if report.healthy() {
        tracing::info!("health check passed ({} checks)", report.0.len());
        Ok(ExitCode::SUCCESS)
    } else {
        let failed: Vec<String> = report
            .failures()
            .map(|(n, why)| format!("{n}: {why}"))
            .collect();
        tracing::error!("health check failed: {}", failed.join("; "));
        match health::after_failure(&RealHost)? {
            health::OnFailure::Rebooting => tracing::error!(
                "this boot is on trial: rebooting so systemd-boot takes the next try"
            ),
            health::OnFailure::Stay(why) => tracing::warn!("not rebooting: {why}"),
        }
        Ok(ExitCode::FAILURE)
    }
}

fn grow_data() -> Result<ExitCode> {
    let r = grow::grow_data(&RealHost).context("cannot grow the data partition")?;
    let p = format!("/dev/{}", r.partition.name);
    if r.steps.is_empty() {
        tracing::info!(
            "{p} already fills /dev/{} ({} bytes): nothing to do",
            r.partition.disk,
            r.partition_after
        );
    } else {
        tracing::info!(
            "grew {p} from {} to {} bytes (filesystem was {} bytes; disk {} bytes); steps: {:?}",
            r.partition_before,
            r.partition_after,
            r.fs_before,
            r.disk_size,
            r.steps
        );
        if !r.steps.contains(&Step::ResizedFilesystem) {
            tracing::info!("the filesystem on {p} already filled it");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn provision() -> Result<ExitCode> {
    let outcome = provision::run(&RealHost, SystemTime::now())?;
    // Details are in the journal (logged as they happened) and in
    // `osctl provision status`; this is the one-line summary.
    match &outcome {
        Outcome::NoUserData => println!("no user data"),
        Outcome::SourceError(e) => eprintln!("user data source failed: {e}"),
        Outcome::Invalid { instance_id, error } => {
            eprintln!("user data for instance {instance_id} is invalid, nothing applied: {error}")
        }
        Outcome::Applied { instance_id } => println!("instance {instance_id} provisioned"),
        Outcome::Failed { instance_id, error } => {
            eprintln!("provisioning instance {instance_id} failed: {error}")
        }
        Outcome::AlreadyApplied { instance_id, error } => match error {
            None => println!("instance {instance_id} was provisioned before; ran bootcmd"),
            Some(e) => eprintln!("instance {instance_id}: bootcmd failed: {e}"),
        },
    }
    Ok(if outcome.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn main() -> ExitCode {
    // One binary in the image: /usr/bin/osctl links here.
    let called_as = std::env::args_os().next().map(std::path::PathBuf::from);
    if called_as.as_deref().and_then(|p| p.file_name()) == Some("osctl".as_ref()) {
        return os_agent::osctl::main();
    }
    let cli = Cli::parse();
    logging::init("info");
    let result = match cli.command {
        Command::Daemon => daemon::run(std::sync::Arc::new(RealHost)).map(|()| ExitCode::SUCCESS),
        Command::HealthCheck => health_check(),
        Command::GrowData => grow_data(),
        Command::Provision => provision(),
        Command::ContainerVolume { name, path } => {
            use os_agent::containers::volume;
            volume::create(std::path::Path::new(volume::VOLUMES_DIR), &name, &path)
                .map(|_| ExitCode::SUCCESS)
                .map_err(anyhow::Error::from)
        }
        Command::ContainerNetwork { name } => {
            os_agent::containers::network::setup(&RealHost, &name).map(|addr| {
                tracing::info!("container {name}: host0 is {addr}");
                ExitCode::SUCCESS
            })
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            os_agent::print_error_chain(&e);
            ExitCode::FAILURE
        }
    }
}
