//! os-agent: the Ballast host agent. The binary is thin (`osctl` is a link
//! to it, see [`osctl`]); everything it does is here, behind the
//! [`host::Host`] trait.

pub mod boot;
pub mod cmdline;
pub mod config;
pub mod containers;
pub mod daemon;
pub mod disk;
pub mod fleet;
pub mod health;
pub mod host;
pub mod http;
pub mod logging;
pub mod mountinfo;
pub mod osctl;
pub mod provision;
pub mod status;
#[cfg(feature = "testing")]
pub mod test_certs;
pub mod update;

/// Prints an error and every cause under it, one per line, to stderr.
pub fn print_error_chain(e: &anyhow::Error) {
    eprintln!("error: {e}");
    for cause in e.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
}

/// What an `osctl ... status [--json]` prints: `value` as pretty JSON, or
/// `render`'s text; `what` names it in the error.
pub fn print_view<T: serde::Serialize>(
    json: bool,
    what: &str,
    value: &T,
    render: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    if json {
        let text = serde_json::to_string_pretty(value)
            .map_err(|e| anyhow::anyhow!("cannot serialize {what}: {e}"))?;
        println!("{text}");
    } else {
        print!("{}", render(value));
    }
    Ok(())
}
