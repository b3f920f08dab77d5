//! A container as a systemd service that execs systemd-nspawn on the image's
//! unpacked root. Rendering is pure: the same container and image always give
//! the same text, and the text's hash (`X-BallastSpec=`) is what reconcile
//! compares to tell a changed container from an unchanged one.
//!
//! Units go to /etc/systemd/system (on the /var-backed /etc overlay) and are
//! enabled there, so systemd starts them at boot by itself, before or without
//! the agent; they are the agent's and only the agent edits them.

use super::spec::{Container, Network};
use super::store::Image;
use std::collections::BTreeMap;

pub const UNIT_DIR: &str = "/etc/systemd/system";
pub const UNIT_PREFIX: &str = "ballast-container-";
pub const NSPAWN: &str = "/usr/bin/systemd-nspawn";
const SPEC_KEY: &str = "X-BallastSpec=";
const IMAGE_KEY: &str = "X-BallastImage=";

pub fn unit_name(container: &str) -> String {
    format!("{UNIT_PREFIX}{container}.service")
}

/// The container a unit file name belongs to, if it is one of ours.
pub fn container_of(unit: &str) -> Option<&str> {
    unit.strip_prefix(UNIT_PREFIX)?.strip_suffix(".service")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub unit: String,
    pub text: String,
    /// sha256 of everything in the unit but this line: the container's identity.
    pub spec: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("container {container}: {why}")]
pub struct RenderError {
    pub container: String,
    pub why: String,
}

/// Quotes one argument for an `ExecStart=` line: always double quotes, with
/// `\` and `"` escaped and systemd's specifiers (`%`, `$`) doubled, so no
/// argument is split, expanded or substituted; a lone `;` is `\;`. Control
/// characters are C escapes (systemd ends a line at LF, CR and NUL), so no
/// argument can end the line and start a directive of its own; `\x00` makes
/// systemd refuse the line, and [`render`] refuses a NUL before that.
pub fn quote(arg: &str) -> String {
    // A lone `;` separates commands in ExecStart=, quoted or not.
    if arg == ";" {
        return "\\;".to_string();
    }
    let mut out = String::from("\"");
    for c in arg.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '%' => out.push_str("%%"),
            '$' => out.push_str("$$"),
            c if c.is_ascii_control() => out.push_str(&format!("\\x{:02x}", u32::from(c))),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The argv the container runs, as docker decides it: the configured command
/// or the image's entrypoint, then the configured args, or the image's cmd
/// unless a command was configured.
pub fn argv(c: &Container, image: &Image) -> Result<Vec<String>, RenderError> {
    let cfg = &image.info.config;
    let mut argv = c.command.clone().unwrap_or_else(|| cfg.entrypoint.clone());
    match (&c.args, &c.command) {
        (Some(a), _) => argv.extend(a.iter().cloned()),
        (None, None) => argv.extend(cfg.cmd.iter().cloned()),
        (None, Some(_)) => {}
    }
    if argv.is_empty() {
        return Err(RenderError {
            container: c.name.clone(),
            why: format!(
                "nothing to run: image {} has no entrypoint or cmd and the container sets no command",
                c.image
            ),
        });
    }
    Ok(argv)
}

/// The environment: the image's, then the container's on top.
pub fn env(c: &Container, image: &Image) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = image
        .info
        .config
        .env
        .iter()
        .filter_map(|e| {
            e.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    env.extend(c.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

pub fn render(c: &Container, image: &Image) -> Result<Rendered, RenderError> {
    let argv = argv(c, image)?;
    let rootfs = image.rootfs.display().to_string();
    if rootfs
        .chars()
        .any(|ch| ch.is_whitespace() || ch == '"' || ch == '\\')
    {
        return Err(RenderError {
            container: c.name.clone(),
            why: format!("image root {rootfs:?} has characters a unit cannot carry"),
        });
    }
    let mut args: Vec<String> = vec![
        NSPAWN.into(),
        "--quiet".into(),
        "--keep-unit".into(),
        "--register=yes".into(),
        "--as-pid2".into(),
        format!("--machine={}", c.name),
        format!("--directory={rootfs}"),
        // The image root is shared and must stay as pulled: writes go to a
        // tmpfs overlay and are gone on restart; state belongs in volumes.
        "--volatile=overlay".into(),
        // Container root is not host root: a user namespace with a range of
        // 65536 host uids of its own. nspawn 252 idmaps the root only after
        // the overlay is on it, and overlayfs cannot be idmapped, so `auto`
        // falls back to chown: through the overlay, onto its tmpfs, never
        // the shared image (`map` would fail; `chown` is refused with
        // --volatile). docs/containers.md, "User namespaces".
        "--private-users=pick".into(),
        "--private-users-ownership=auto".into(),
        "--console=pipe".into(),
        "--link-journal=no".into(),
    ];
    let cfg = &image.info.config;
    if let Some(w) = c.working_dir.as_ref().or(cfg.working_dir.as_ref()) {
        args.push(format!("--chdir={w}"));
    }
    // nspawn takes a user name or uid; an image's "uid:gid" keeps the uid.
    if let Some(u) = c.user.as_ref().or(cfg.user.as_ref()) {
        let user = u.split(':').next().unwrap_or(u);
        args.push(format!("--user={user}"));
    }
    for (k, v) in env(c, image) {
        args.push(format!("--setenv={k}={v}"));
    }
    for v in &c.volumes {
        // idmap: container uid N reads and writes as host uid N in the
        // volume, so its root can write there; without it everything in
        // the volume would be nobody's inside.
        let flag = if v.read_only { "--bind-ro" } else { "--bind" };
        args.push(format!("{flag}={}:{}:idmap", v.host, v.container));
    }
    if let Network::Private { ports } = &c.network {
        args.push("--network-veth".into());
        for p in ports {
            let proto = if p.udp { "udp" } else { "tcp" };
            args.push(format!("--port={proto}:{}:{}", p.host, p.container));
        }
    }
    args.push("--".into());
    args.extend(argv);
    if let Some(a) = args.iter().find(|a| a.contains('\0')) {
        return Err(RenderError {
            container: c.name.clone(),
            why: format!("{a:?} contains a NUL byte, which no program can be passed"),
        });
    }
    let exec: Vec<String> = args.iter().map(|a| quote(a)).collect();

    let mut service = vec![
        "Type=notify".to_string(),
        "NotifyAccess=main".into(),
        // nspawn's own exit code 133 asks for a restart (as in systemd-nspawn@.service).
        "RestartForceExitStatus=133".into(),
        "SuccessExitStatus=133".into(),
        "KillMode=mixed".into(),
        "Delegate=yes".into(),
        "Slice=machine.slice".into(),
        "StandardInput=null".into(),
        "StandardOutput=journal".into(),
        "StandardError=journal".into(),
        format!("Restart={}", c.restart.as_systemd()),
        "RestartSec=5s".into(),
        "TimeoutStopSec=30s".into(),
    ];
    if let Some(m) = c.memory_max {
        service.push(format!("MemoryMax={m}"));
    }
    if let Some(q) = c.cpu_quota_percent {
        service.push(format!("CPUQuota={q}%"));
    }
    for v in &c.volumes {
        // Make the host side, through real directories only (volume.rs).
        service.push(format!(
            "ExecStartPre=/usr/bin/os-agent container-volume {} {}",
            c.name,
            quote(&v.host)
        ));
    }
    service.push(format!("ExecStart={}", exec.join(" ")));
    if matches!(c.network, Network::Private { .. }) {
        // nspawn leaves the container's side of the veth down (network.rs).
        service.push(format!(
            "ExecStartPost=/usr/bin/os-agent container-network {}",
            c.name
        ));
    }

    let body = format!(
        "[Unit]\n\
         Description=Ballast container {name}\n\
         Documentation=man:systemd-nspawn(1)\n\
         Wants=network-online.target\n\
         After=network-online.target\n\
         {IMAGE_KEY}{digest}\n\
         \n\
         [Service]\n\
         {service}\n\
         \n\
         [Install]\n\
         WantedBy=machines.target\n",
        name = c.name,
        digest = image.info.manifest,
        service = service.join("\n"),
    );
    let spec = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body.as_bytes()));
    let text = format!(
        "# Written by os-agent from the container's desired state (docs/containers.md); edits are overwritten.\n{}",
        body.replacen("[Unit]\n", &format!("[Unit]\n{SPEC_KEY}{spec}\n"), 1)
    );
    Ok(Rendered {
        unit: unit_name(&c.name),
        text,
        spec,
    })
}

/// The spec hash and image digest recorded in a unit we wrote; `None` for a
/// unit without them (hand-edited or foreign: it will be rewritten).
pub fn recorded(text: &str) -> (Option<String>, Option<String>) {
    let find = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
    };
    (find(SPEC_KEY), find(IMAGE_KEY))
}

#[cfg(test)]
mod tests;
