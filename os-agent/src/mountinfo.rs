//! /proc/self/mountinfo (proc(5)): what is mounted where, from what, how.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("mountinfo line {line}: {reason}: {text:?}")]
pub struct MountinfoError {
    pub line: usize,
    pub reason: &'static str,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: String,
    /// Per-mount options (`ro`, `rw`, `nosuid`, ...).
    pub options: Vec<String>,
    pub fs_type: String,
    pub source: String,
    /// Per-superblock options.
    pub super_options: Vec<String>,
}

impl Mount {
    pub fn read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountTable(pub Vec<Mount>);

impl MountTable {
    /// The mount visible at `mount_point`: the last one mounted there.
    pub fn at(&self, mount_point: &str) -> Option<&Mount> {
        self.0.iter().rev().find(|m| m.mount_point == mount_point)
    }
}

/// Undoes the octal escapes (`\040` for a space) the kernel writes.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn options(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|o| !o.is_empty())
        .map(str::to_string)
        .collect()
}

/// Parses mountinfo text. A line that does not have the documented shape is
/// an error: the health check must not guess.
pub fn parse(text: &str) -> Result<MountTable, MountinfoError> {
    let mut mounts = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |reason| MountinfoError {
            line: n + 1,
            reason,
            text: line.to_string(),
        };
        let fields: Vec<&str> = line.split_whitespace().collect();
        // id parent major:minor root mount-point options [optional...] - type source super-options
        let sep = fields
            .iter()
            .position(|f| *f == "-")
            .ok_or_else(|| err("no \" - \" separator"))?;
        if sep < 6 {
            return Err(err("fewer than six fields before the separator"));
        }
        if fields.len() < sep + 3 {
            return Err(err("fewer than three fields after the separator"));
        }
        mounts.push(Mount {
            mount_point: unescape(fields[4]),
            options: options(fields[5]),
            fs_type: fields[sep + 1].to_string(),
            source: unescape(fields[sep + 2]),
            super_options: fields.get(sep + 3).map(|s| options(s)).unwrap_or_default(),
        });
    }
    Ok(MountTable(mounts))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// mountinfo of a healthy Ballast host (abridged).
    pub const HEALTHY: &str = "\
22 1 253:0 / / ro,relatime shared:1 - erofs /dev/mapper/root ro,user_xattr,acl,cache_strategy=readaround
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
24 22 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
25 22 0:5 / /dev rw,nosuid shared:8 - devtmpfs devtmpfs rw,size=4096k,nr_inodes=1048576,mode=755
26 22 0:24 / /run rw,nosuid,nodev shared:10 - tmpfs tmpfs rw,size=401300k,nr_inodes=819200,mode=755
27 22 254:6 / /var rw,noatime shared:3 - ext4 /dev/vda6 rw
28 22 0:27 / /etc rw,relatime shared:4 - overlay overlay rw,lowerdir=/sysroot/etc,upperdir=/sysroot/var/lib/ballast/etc/upper,workdir=/sysroot/var/lib/ballast/etc/work
40 22 254:1 / /efi rw,relatime shared:20 - vfat /dev/vda1 rw,fmask=0077,dmask=0077
41 26 0:30 / /run/with\\040space rw - tmpfs tmpfs rw
";

    #[test]
    fn parses_a_healthy_host() {
        let t = parse(HEALTHY).unwrap();
        assert_eq!(t.0.len(), 9);
        let root = t.at("/").unwrap();
        assert!(root.read_only());
        assert_eq!(root.fs_type, "erofs");
        assert_eq!(root.source, "/dev/mapper/root");
        let var = t.at("/var").unwrap();
        assert!(!var.read_only());
        assert_eq!(
            (var.fs_type.as_str(), var.source.as_str()),
            ("ext4", "/dev/vda6")
        );
        assert_eq!(t.at("/etc").unwrap().fs_type, "overlay");
        assert_eq!(t.at("/run/with space").unwrap().fs_type, "tmpfs");
        assert!(t.at("/nope").is_none());
    }

    #[test]
    fn the_last_mount_on_a_point_wins() {
        let t = parse(&format!("{HEALTHY}50 22 0:40 / /var rw - tmpfs tmpfs rw\n")).unwrap();
        assert_eq!(t.at("/var").unwrap().fs_type, "tmpfs");
    }

    #[test]
    fn malformed_lines_are_errors() {
        let cases = [
            (
                "22 1 253:0 / / ro erofs /dev/mapper/root ro",
                "no \" - \" separator",
            ),
            (
                "22 1 253:0 / - erofs /dev/mapper/root ro",
                "fewer than six fields before the separator",
            ),
            (
                "22 1 253:0 / / ro - erofs",
                "fewer than three fields after the separator",
            ),
        ];
        for (line, reason) in cases {
            let e = parse(&format!("{HEALTHY}{line}\n")).unwrap_err();
            assert_eq!(e.reason, reason, "{line}");
            assert_eq!(e.line, 10);
        }
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape("a\\040b\\011c\\\\d\\9"), "a b\tc\\\\d\\9");
    }
}
