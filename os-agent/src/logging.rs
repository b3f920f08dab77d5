//! Logs go to the journal when systemd connected our output to it, and to
//! stderr otherwise (a shell, a test).

use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

/// Sets up the global subscriber. `default` is the level when RUST_LOG is unset.
pub fn init(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        match tracing_journald::layer() {
            Ok(journald) => {
                tracing_subscriber::registry()
                    .with(filter)
                    .with(journald)
                    .init();
                return;
            }
            Err(e) => {
                // Still log, just not with journal fields.
                eprintln!("cannot log to the journal ({e}); logging to stderr");
            }
        }
    }
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .without_time(),
        )
        .init();
}
