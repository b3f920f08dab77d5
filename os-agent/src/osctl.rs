//! osctl: look at a Ballast host.
//!
//! Each capability's subcommands live in its own `cli.rs`; this file only
//! dispatches. There is one binary: /usr/bin/osctl is a link to os-agent,
//! which runs this when called by that name.

use crate::host::RealHost;
use crate::logging;
use anyhow::Result;
use clap::{Parser, Subcommand};
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
        command: crate::update::cli::UpdateCommand,
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
        etcd: crate::fleet::cli::EtcdArgs,
        #[command(subcommand)]
        command: crate::fleet::cli::FleetCommand,
    },
    /// The containers this host runs (docs/containers.md).
    Containers {
        #[command(subcommand)]
        command: crate::containers::cli::ContainersCommand,
    },
    /// User data (cloud-config) provisioning.
    Provision {
        #[command(subcommand)]
        command: crate::provision::cli::ProvisionCommand,
    },
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Provision { command } => return crate::provision::cli::run(&RealHost, command),
        Command::Containers { command } => return crate::containers::cli::run(&RealHost, command),
        Command::Update { command } => crate::update::cli::run(&RealHost, command)?,
        Command::Fleet { etcd, command } => crate::fleet::cli::run(&RealHost, &etcd, command)?,
        Command::Rollback => crate::update::cli::rollback(&RealHost)?,
        Command::Reboot => crate::update::cli::reboot(&RealHost)?,
        Command::Status { json } => crate::status::cli::run(&RealHost, json)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// osctl's `main`: parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init("warn");
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            crate::print_error_chain(&e);
            ExitCode::FAILURE
        }
    }
}
