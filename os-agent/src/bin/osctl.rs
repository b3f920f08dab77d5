//! osctl: look at a Ballast host.

//! Each capability's subcommands live in its own `cli.rs`; this file only
//! dispatches.

use anyhow::Result;
use clap::{Parser, Subcommand};
use os_agent::host::RealHost;
use os_agent::logging;
use std::process::ExitCode;

/// Look at a Ballast host.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the booted slot, image, version, root hash, kernel, boot entry and agent state.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check for, apply and inspect updates from the update channel.
    Update {
        #[command(subcommand)]
        command: os_agent::update::cli::UpdateCommand,
    },
    /// Make the other slot's boot entry the default (the booted version is
    /// marked failed and not installed again); takes effect on the next boot.
    Rollback,
    /// Reboot the host (into a staged update, if there is one).
    Reboot,
    /// The fleet in etcd: status of hosts and groups, and group actions
    /// (docs/etcd.md).
    Fleet {
        #[command(flatten)]
        etcd: os_agent::fleet::cli::EtcdArgs,
        #[command(subcommand)]
        command: os_agent::fleet::cli::FleetCommand,
    },
    /// The containers this host runs (docs/containers.md).
    Containers {
        #[command(subcommand)]
        command: os_agent::containers::cli::ContainersCommand,
    },
    /// User data (cloud-config) provisioning.
    Provision {
        #[command(subcommand)]
        command: os_agent::provision::cli::ProvisionCommand,
    },
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Provision { command } => return os_agent::provision::cli::run(&RealHost, command),
        Command::Containers { command } => {
            return os_agent::containers::cli::run(&RealHost, command)
        }
        Command::Update { command } => os_agent::update::cli::run(&RealHost, command)?,
        Command::Fleet { etcd, command } => os_agent::fleet::cli::run(&RealHost, &etcd, command)?,
        Command::Rollback => os_agent::update::cli::rollback(&RealHost)?,
        Command::Reboot => os_agent::update::cli::reboot(&RealHost)?,
        Command::Status { json } => os_agent::status::cli::run(&RealHost, json)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init("warn");
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            os_agent::print_error_chain(&e);
            ExitCode::FAILURE
        }
    }
}
