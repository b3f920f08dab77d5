//! osctl: look at a Ballast host.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use os_agent::host::RealHost;
use os_agent::{logging, osctl};
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
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
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
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init("warn");
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            os_agent::print_error_chain(&e);
            ExitCode::FAILURE
        }
    }
}
