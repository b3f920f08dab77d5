//! The filesystem layout a Ballast host must have: a verified read-only root,
//! a writable /var on the data partition, an overlay on /etc.

use crate::mountinfo::{Mount, MountTable};

fn at<'a>(t: &'a MountTable, point: &str) -> Result<&'a Mount, String> {
    t.at(point)
        .ok_or_else(|| format!("nothing is mounted on {point}"))
}

fn describe(m: &Mount) -> String {
    format!(
        "{} ({}, {})",
        m.source,
        m.fs_type,
        if m.read_only() { "ro" } else { "rw" }
    )
}

/// The source of a dm-verity root: /dev/mapper/root, or a dm-N node.
fn is_dm_device(source: &str) -> bool {
    source == "/dev/mapper/root"
        || source
            .strip_prefix("/dev/dm-")
            .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}

/// / is the read-only erofs on the dm-verity device.
pub fn root(t: &MountTable) -> Result<String, String> {
    let m = at(t, "/")?;
    let mut problems = Vec::new();
    if !m.read_only() {
        problems.push("is mounted read-write".to_string());
    }
    if m.fs_type != "erofs" {
        problems.push(format!("is {}, not erofs", m.fs_type));
    }
    if !is_dm_device(&m.source) {
        problems.push(format!(
            "comes from {}, not the dm-verity device /dev/mapper/root",
            m.source
        ));
    }
    if problems.is_empty() {
        Ok(describe(m))
    } else {
        Err(format!("/ {}", problems.join(", ")))
    }
}

/// /var is the writable ext4 data partition.
pub fn var(t: &MountTable) -> Result<String, String> {
    let m = at(t, "/var")?;
    let mut problems = Vec::new();
    if m.read_only() {
        problems.push("is mounted read-only".to_string());
    }
    if m.fs_type != "ext4" {
        problems.push(format!("is {} from {}, not ext4", m.fs_type, m.source));
    }
    if problems.is_empty() {
        Ok(describe(m))
    } else {
        Err(format!("/var {}", problems.join(", ")))
    }
}

/// /etc is the overlay whose upper layer persists on /var.
pub fn etc(t: &MountTable) -> Result<String, String> {
    let m = at(t, "/etc")?;
    if m.fs_type != "overlay" {
        return Err(format!(
            "/etc is {} from {}, not an overlay",
            m.fs_type, m.source
        ));
    }
    if m.read_only() {
        return Err("/etc overlay is mounted read-only".to_string());
    }
    Ok(describe(m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mountinfo::{parse, tests::HEALTHY};

    type Check = fn(&MountTable) -> Result<String, String>;
    /// Mount point to replace, check, replacement line, expected error prefix.
    type Case = (
        &'static str,
        Check,
        Option<&'static str>,
        Result<(), &'static str>,
    );

    /// HEALTHY with the mount on `point` replaced by `line`.
    fn with(point: &str, line: Option<&str>) -> MountTable {
        let mut t = parse(HEALTHY).unwrap();
        t.0.retain(|m| m.mount_point != point);
        if let Some(l) = line {
            t.0.extend(parse(l).unwrap().0);
        }
        t
    }

    #[test]
    fn table() {
        let cases: Vec<Case> = vec![
            ("/", root, None, Err("nothing is mounted on /")),
            (
                "/",
                root,
                Some("1 0 253:0 / / ro - erofs /dev/dm-0 ro"),
                Ok(()),
            ),
            (
                "/",
                root,
                Some("1 0 253:0 / / rw - erofs /dev/mapper/root rw"),
                Err("/ is mounted read-write"),
            ),
            (
                "/",
                root,
                Some("1 0 8:2 / / ro - erofs /dev/vda2 ro"),
                Err("/ comes from /dev/vda2, not the dm-verity device"),
            ),
            (
                "/",
                root,
                Some("1 0 8:2 / / ro - erofs /dev/dm-x ro"),
                Err("/ comes from /dev/dm-x"),
            ),
            (
                "/",
                root,
                Some("1 0 8:2 / / rw - ext4 /dev/vda2 rw"),
                Err("/ is mounted read-write, is ext4, not erofs, comes from /dev/vda2"),
            ),
            ("/var", var, None, Err("nothing is mounted on /var")),
            (
                "/var",
                var,
                Some("2 1 8:6 / /var ro - ext4 /dev/vda6 ro"),
                Err("/var is mounted read-only"),
            ),
            (
                "/var",
                var,
                Some("2 1 0:6 / /var rw - tmpfs tmpfs rw"),
                Err("/var is tmpfs from tmpfs, not ext4"),
            ),
            ("/etc", etc, None, Err("nothing is mounted on /etc")),
            (
                "/etc",
                etc,
                Some("3 1 0:7 / /etc rw - tmpfs tmpfs rw"),
                Err("/etc is tmpfs from tmpfs, not an overlay"),
            ),
            (
                "/etc",
                etc,
                Some("3 1 0:7 / /etc ro - overlay overlay ro"),
                Err("/etc overlay is mounted read-only"),
            ),
        ];
        for (point, check, line, want) in cases {
            let got = check(&with(point, line));
            match (got, want) {
                (Ok(_), Ok(())) => {}
                (Err(e), Err(w)) => assert!(e.starts_with(w), "{line:?}: {e:?} vs {w:?}"),
                (got, want) => panic!("{line:?}: got {got:?}, want {want:?}"),
            }
        }
        let healthy = parse(HEALTHY).unwrap();
        assert_eq!(
            root(&healthy),
            Ok("/dev/mapper/root (erofs, ro)".to_string())
        );
        assert_eq!(var(&healthy), Ok("/dev/vda6 (ext4, rw)".to_string()));
        assert_eq!(etc(&healthy), Ok("overlay (overlay, rw)".to_string()));
    }
}
