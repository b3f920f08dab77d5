//! `osctl provision status|validate`.

use super::record;
use crate::host::Host;
use anyhow::{Context, Result};
use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum ProvisionCommand {
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

pub fn run(host: &dyn Host, cmd: ProvisionCommand) -> Result<ExitCode> {
    match cmd {
        ProvisionCommand::Status { json } => {
            let s = record::status(host)?;
            crate::print_view(json, "the provisioning status", &s, record::render)?;
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
            match super::validate_offline(host, &user_data, net.as_deref()) {
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
