//! Helpers shared by the fleet integration tests.

use os_agent::fleet::server::LocalEtcd;
use std::process::Command;

/// Runs the built `osctl fleet ARGS` against `etcd`: whether it succeeded,
/// and its stdout and stderr together.
pub fn osctl_fleet(etcd: &LocalEtcd, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_osctl"))
        .arg("fleet")
        .arg("--endpoints")
        .arg(etcd.endpoint())
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}
