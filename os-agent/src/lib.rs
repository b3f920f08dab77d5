//! os-agent: the Ballast host agent. The binaries (`os-agent`, `osctl`) are
//! thin; everything they do is here, behind the [`host::Host`] trait.

pub mod boot;
pub mod cmdline;
pub mod config;
pub mod containers;
pub mod daemon;
pub mod disk;
pub mod fleet;
pub mod health;
pub mod host;
pub mod logging;
pub mod mountinfo;
pub mod provision;
pub mod status;
pub mod update;

/// Prints an error and every cause under it, one per line, to stderr.
pub fn print_error_chain(e: &anyhow::Error) {
    eprintln!("error: {e}");
    for cause in e.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
}
