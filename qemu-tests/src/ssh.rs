//! SSH to the guest with the test fixture key: as root (the test image
//! trusts the key), or as a user provisioning gave the key to.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

/// The fixture key checked into the repository; the test image trusts its
/// public half (`qemu-tests/test-image.yaml`).
const FIXTURE_KEY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/id_ed25519");

#[derive(Debug, Clone)]
pub(crate) struct Ssh {
    key: PathBuf,
    pub(crate) port: u16,
}

impl Ssh {
    /// Copies the fixture key into `dir` with mode 0600 (git does not keep
    /// modes, and ssh refuses a key others can read).
    pub(crate) fn new(dir: &Path, port: u16) -> Result<Ssh> {
        let key = dir.join("id_ed25519");
        std::fs::copy(FIXTURE_KEY, &key)
            .with_context(|| format!("copying {FIXTURE_KEY} to {}", key.display()))?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 0600 {}", key.display()))?;
        Ok(Ssh { key, port })
    }

    /// `ssh ... root@127.0.0.1 -- <remote>`; the remote shell runs `remote`.
    pub(crate) fn command(&self, remote: &str) -> Command {
        self.command_as("root", remote)
    }

    /// `ssh ... <user>@127.0.0.1 -- <remote>`.
    pub(crate) fn command_as(&self, user: &str, remote: &str) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.arg("-F")
            .arg("/dev/null")
            .arg("-i")
            .arg(&self.key)
            .arg("-p")
            .arg(self.port.to_string());
        for opt in [
            "IdentitiesOnly=yes",
            "BatchMode=yes",
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "GlobalKnownHostsFile=/dev/null",
            "LogLevel=ERROR",
            "ConnectTimeout=5",
            // Notice a guest that went away (reboot, power cut) instead of
            // waiting on a dead TCP connection.
            "ServerAliveInterval=5",
            "ServerAliveCountMax=3",
        ] {
            cmd.arg("-o").arg(opt);
        }
        cmd.arg(format!("{user}@127.0.0.1")).arg("--").arg(remote);
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_copy_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let ssh = Ssh::new(dir.path(), 2222).unwrap();
        let mode = std::fs::metadata(&ssh.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let args: Vec<_> = ssh
            .command("true")
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args.windows(2).any(|w| w == ["-p", "2222"]), "{args:?}");
        assert_eq!(args.last().map(String::as_str), Some("true"));
        assert!(args.iter().any(|a| a == "root@127.0.0.1"), "{args:?}");
        let args: Vec<_> = ssh
            .command_as("alice", "id")
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args.iter().any(|a| a == "alice@127.0.0.1"), "{args:?}");
    }
}
