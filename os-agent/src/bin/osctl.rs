//! osctl: look at a Ballast host.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use os_agent::host::RealHost;
use os_agent::provision::{self, record};
use os_agent::{logging, osctl};
use std::path::PathBuf;
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
        command: ProvisionCommand,
    },
}

#[derive(Subcommand)]
enum ProvisionCommand {
    /// Show the last provisioning attempt and what was applied for this
    /// host's instance, step by step.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check a user-data file offline: print what would be applied and every
    /// warning; exit non-zero on an error.
    Validate {
        /// The #cloud-config file.
        file: PathBuf,
        /// A network-config (version 2) file, as on a NoCloud seed.
        #[arg(long)]
        network_config: Option<PathBuf>,
    },
}

fn provision(cmd: ProvisionCommand) -> Result<ExitCode> {
    match cmd {
        ProvisionCommand::Status { json } => {
            let s = record::status(&RealHost)?;
            if json {
                let text = serde_json::to_string_pretty(&s)
                    .context("cannot serialize the provisioning status")?;
                println!("{text}");
            } else {
                print!("{}", record::render(&s));
            }
            Ok(ExitCode::SUCCESS)
        }
        ProvisionCommand::Validate {
            file,
            network_config,
        } => {
            let read = |p: &PathBuf| {
                std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
            };
            let user_data = read(&file)?;
            let net = network_config.as_ref().map(read).transpose()?;
            match provision::validate_offline(&RealHost, &user_data, net.as_deref()) {
                Ok(plan) => {
                    print!("{}", plan.render());
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("error: {}: {e:#}", file.display());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Provision { command } => return provision(command),
        Command::Containers { command } => {
            return os_agent::containers::cli::run(&RealHost, command)
        }
        Command::Update { command } => os_agent::update::cli::run(&RealHost, command)?,
        Command::Fleet { etcd, command } => os_agent::fleet::cli::run(&RealHost, &etcd, command)?,
        Command::Rollback => os_agent::update::cli::rollback(&RealHost)?,
        Command::Reboot => os_agent::update::cli::reboot(&RealHost)?,
        Command::Status { json } => {
            let v = osctl::view(&RealHost)?;
            if json {
                let text =
                    serde_json::to_string_pretty(&v).context("cannot serialize the status")?;
                println!("{text}");
            } else {
                print!("{}", osctl::render(&v));
            }
        }
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
