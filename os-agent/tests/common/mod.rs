//! Helpers shared by the fleet integration tests.

use os_agent::fleet::server::LocalEtcd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// `osctl` as the image has it: a link named osctl to the os-agent binary,
/// which runs osctl when called by that name.
pub fn osctl() -> PathBuf {
    static LINK: OnceLock<PathBuf> = OnceLock::new();
    LINK.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("osctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join("osctl");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_os-agent"), &link).unwrap();
        link
    })
    .clone()
}

/// Runs the built `osctl fleet ARGS` against `etcd`: whether it succeeded,
/// and its stdout and stderr together.
pub fn osctl_fleet(etcd: &LocalEtcd, args: &[&str]) -> (bool, String) {
    let out = Command::new(osctl())
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
