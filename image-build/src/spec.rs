//! The image spec: one YAML file (docs/image.md) describing what goes into an
//! image. Parsing is separate from building so every error names its field.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Packages every Ballast image needs; the spec's list is added to these.
pub const BASE_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "systemd-boot",
    "systemd-container",
    "systemd-resolved",
    // Time from DHCP's servers, cloud-config `ntp:`, or Debian's pool.
    "systemd-timesyncd",
    "dbus",
    "udev",
    "kmod",
    "dracut",
    "e2fsprogs",
    "util-linux",
    "openssh-server",
    "ca-certificates",
    "iproute2",
];

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Image name: IMAGE_ID in os-release, the UKI's file name prefix.
    pub name: String,
    /// Image version: IMAGE_VERSION, compared by systemd-boot and the updater.
    pub version: String,
    #[serde(default = "default_arch")]
    pub architecture: String,
    pub debian: Debian,
    #[serde(default)]
    pub partitions: Partitions,
    /// Arguments appended to the kernel command line in the UKI.
    #[serde(default)]
    pub kernel_cmdline: Vec<String>,
    /// Extra files placed in the root filesystem.
    #[serde(default)]
    pub files: Vec<FileSpec>,
    #[serde(default)]
    pub update: UpdateSpec,
    /// zstd level of the root payload an update channel serves (1-22).
    #[serde(default = "default_zstd_level")]
    pub payload_zstd_level: i32,
    /// Sign systemd-boot and the UKI for Secure Boot, and carry the keys for
    /// enrolment (docs/image.md, "Secure Boot").
    #[serde(default)]
    pub secure_boot: Option<SecureBootSpec>,
    /// Which kernel modules stay in the root (docs/image.md, "Kernel modules").
    #[serde(default)]
    pub kernel_modules: KernelModules,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KernelModules {
    /// The set kept: `cloud` or `all`. Default: `cloud` for the cloud
    /// kernel, `all` for the generic one.
    #[serde(default)]
    pub set: Option<ModuleSet>,
    /// More paths to keep, relative to /usr/lib/modules/<kver>/kernel: a
    /// directory (`fs/btrfs`) or one module (`fs/binfmt_misc.ko`).
    #[serde(default)]
    pub keep: Vec<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModuleSet {
    /// What a container host in a VM needs (image-build/src/modules.rs).
    Cloud,
    /// Every module of the kernel package.
    All,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SecureBootSpec {
    /// A key directory made by `image-build keygen --secure-boot`, relative
    /// to the spec. Its db key signs; its `.auth` files go on the ESP.
    pub keys: PathBuf,
    /// What systemd-boot does on a machine in setup mode (no keys enrolled).
    #[serde(default)]
    pub enroll: Enroll,
}

/// systemd-boot's `secure-boot-enroll` (loader.conf(5)).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Enroll {
    /// Enroll the image's keys at once (in a VM without waiting; on bare
    /// metal after a 15 s countdown that a key press aborts).
    #[default]
    Force,
    /// Offer "Enroll Secure Boot keys: auto" in the boot menu.
    Manual,
    /// Leave the firmware's keys to the operator.
    Off,
}

impl Enroll {
    pub fn loader_value(self) -> &'static str {
        match self {
            Enroll::Force => "force",
            Enroll::Manual => "manual",
            Enroll::Off => "off",
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Debian {
    #[serde(default = "default_suite")]
    pub suite: String,
    #[serde(default = "default_mirror")]
    pub mirror: String,
    /// `cloud` (linux-image-cloud-amd64, for VMs) or `generic` (linux-image-amd64, bare metal).
    pub kernel: KernelFlavour,
    /// Packages in addition to the base set.
    #[serde(default)]
    pub packages: Vec<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KernelFlavour {
    Cloud,
    Generic,
}

impl KernelFlavour {
    pub fn package(self) -> &'static str {
        match self {
            KernelFlavour::Cloud => "linux-image-cloud-amd64",
            KernelFlavour::Generic => "linux-image-amd64",
        }
    }
}

/// Partition sizes in MiB. They are fixed for the life of a fleet: leave headroom.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Partitions {
    #[serde(default = "default_esp")]
    pub esp_mib: u64,
    #[serde(default = "default_slot")]
    pub slot_mib: u64,
    /// Initial size; grown to fill the disk on first boot.
    #[serde(default = "default_data")]
    pub data_mib: u64,
}

impl Default for Partitions {
    fn default() -> Self {
        Partitions {
            esp_mib: default_esp(),
            slot_mib: default_slot(),
            data_mib: default_data(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpdateSpec {
    /// Public keys (files made by `image-build keygen`, relative to the spec)
    /// whose signatures the host accepts on update channels. Several allowed,
    /// so keys can rotate.
    #[serde(default)]
    pub trusted_keys: Vec<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Absolute path in the image.
    pub path: String,
    /// Inline content.
    pub content: Option<String>,
    /// A file to copy, relative to the spec file.
    pub source: Option<PathBuf>,
    /// Octal mode, e.g. "0644".
    #[serde(default = "default_mode")]
    pub mode: String,
}

fn default_arch() -> String {
    "x86-64".into()
}
fn default_suite() -> String {
    "bookworm".into()
}
fn default_mirror() -> String {
    "http://deb.debian.org/debian".into()
}
fn default_esp() -> u64 {
    256
}
fn default_slot() -> u64 {
    1024
}
fn default_data() -> u64 {
    256
}
fn default_mode() -> String {
    "0644".into()
}
/// `payload_zstd_level` when a spec does not name one.
pub fn default_zstd_level() -> i32 {
    12
}

/// A spec loaded from a file, with file sources resolved against the spec's directory.
#[derive(Debug, Clone)]
pub struct LoadedSpec {
    pub spec: Spec,
    pub path: PathBuf,
}

impl LoadedSpec {
    /// A path the spec names, relative to the spec file's directory.
    pub fn resolve(&self, rel: &Path) -> PathBuf {
        self.path.parent().unwrap_or(Path::new(".")).join(rel)
    }

    /// The Secure Boot keys, opened and checked, when the spec signs.
    pub fn secure_boot_keys(&self) -> Result<Option<crate::secure_boot::Keys>> {
        let Some(sb) = &self.spec.secure_boot else {
            return Ok(None);
        };
        crate::secure_boot::Keys::open(&self.resolve(&sb.keys))
            .context("secure_boot.keys")
            .map(Some)
    }
}

impl Spec {
    /// Parses and validates a spec document. `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Spec> {
        // Syntax first, so a YAML error is reported as such, with its line.
        serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text)
            .with_context(|| format!("{origin}: not valid YAML"))?;
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let spec: Spec =
            serde_path_to_error::deserialize(de).map_err(|e| field_error(origin, e))?;
        spec.validate()
            .with_context(|| format!("{origin}: invalid spec"))?;
        Ok(spec)
    }

    fn from_value(value: serde_yaml_ng::Value, origin: &str) -> Result<Spec> {
        let spec: Spec =
            serde_path_to_error::deserialize(value).map_err(|e| field_error(origin, e))?;
        spec.validate()
            .with_context(|| format!("{origin}: invalid spec"))?;
        Ok(spec)
    }

    fn validate(&self) -> Result<()> {
        let ident_ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !ident_ok(&self.name) || self.name.contains('+') || self.name.starts_with('.') {
            bail!(
                "name: {:?} must be letters, digits, '-', '_' or '.'",
                self.name
            );
        }
        if !ident_ok(&self.version) || !self.version.starts_with(|c: char| c.is_ascii_digit()) {
            bail!(
                "version: {:?} must start with a digit and use only letters, digits, '-', '_' or '.'",
                self.version
            );
        }
        if self.architecture != "x86-64" {
            bail!(
                "architecture: {:?} is not supported (only x86-64)",
                self.architecture
            );
        }
        if !self.debian.mirror.starts_with("http://") && !self.debian.mirror.starts_with("https://")
        {
            bail!(
                "debian.mirror: {:?} must be an http(s) URL",
                self.debian.mirror
            );
        }
        if !ident_ok(&self.debian.suite) {
            bail!("debian.suite: {:?} is not a suite name", self.debian.suite);
        }
        for (i, p) in self.debian.packages.iter().enumerate() {
            let ok = !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
            if !ok {
                bail!("debian.packages[{i}]: {p:?} is not a Debian package name");
            }
        }
        let p = &self.partitions;
        if p.esp_mib < 64 {
            bail!("partitions.esp_mib: {} is too small (at least 64 MiB: the ESP holds up to three UKIs)", p.esp_mib);
        }
        if p.slot_mib < 256 {
            bail!(
                "partitions.slot_mib: {} is too small (at least 256 MiB)",
                p.slot_mib
            );
        }
        if p.data_mib < 64 {
            bail!(
                "partitions.data_mib: {} is too small (at least 64 MiB)",
                p.data_mib
            );
        }
        if p.esp_mib + 2 * p.slot_mib + p.data_mib > 1 << 22 {
            bail!("partitions: total size is over 4 TiB");
        }
        for (i, a) in self.kernel_cmdline.iter().enumerate() {
            if a.is_empty() || a.chars().any(|c| c.is_whitespace() || c.is_control()) {
                bail!("kernel_cmdline[{i}]: {a:?} must be one argument without spaces");
            }
            let key = a.split('=').next().unwrap_or_default();
            if matches!(
                key,
                "roothash" | "root" | "systemd.verity_root_data" | "systemd.verity_root_hash"
            ) {
                bail!("kernel_cmdline[{i}]: {key} is set by image-build and cannot be overridden");
            }
        }
        let mut seen = BTreeSet::new();
        for (i, f) in self.files.iter().enumerate() {
            let path = Path::new(&f.path);
            if !path.is_absolute()
                || path
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
                || f.path.ends_with('/')
            {
                bail!(
                    "files[{i}].path: {:?} must be an absolute file path without '..'",
                    f.path
                );
            }
            if f.path.starts_with("/var/") || f.path == "/var" {
                bail!("files[{i}].path: {:?} is under /var, which the data partition hides; put it in /etc or /usr", f.path);
            }
            if !seen.insert(f.path.clone()) {
                bail!("files[{i}].path: {:?} is listed twice", f.path);
            }
            match (&f.content, &f.source) {
                (Some(_), Some(_)) => bail!("files[{i}]: give either content or source, not both"),
                (None, None) => bail!("files[{i}]: needs content or source"),
                _ => {}
            }
            parse_mode(&f.mode).with_context(|| format!("files[{i}].mode"))?;
        }
        for (i, k) in self.kernel_modules.keep.iter().enumerate() {
            let ok = !k.is_empty()
                && !k.starts_with('/')
                && k.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
            if !ok {
                bail!(
                    "kernel_modules.keep[{i}]: {k:?} must be a path under the kernel's module tree, like fs/btrfs"
                );
            }
        }
        if !(1..=22).contains(&self.payload_zstd_level) {
            bail!(
                "payload_zstd_level: {} is not between 1 and 22",
                self.payload_zstd_level
            );
        }
        Ok(())
    }

    /// The full package list: base set, kernel, spec's extras; sorted, deduplicated.
    pub fn packages(&self) -> Vec<String> {
        let mut all: BTreeSet<String> = BASE_PACKAGES.iter().map(|s| s.to_string()).collect();
        all.insert(self.debian.kernel.package().to_string());
        all.extend(self.debian.packages.iter().cloned());
        all.into_iter().collect()
    }
}

fn field_error(origin: &str, e: serde_path_to_error::Error<serde_yaml_ng::Error>) -> anyhow::Error {
    let path = e.path().to_string();
    if path == "." {
        anyhow::anyhow!("{origin}: {}", e.inner())
    } else {
        anyhow::anyhow!("{origin}: {path}: {}", e.inner())
    }
}

pub fn parse_mode(mode: &str) -> Result<u32> {
    let m = u32::from_str_radix(mode, 8)
        .map_err(|_| anyhow::anyhow!("{mode:?} is not an octal mode"))?;
    if m > 0o7777 {
        bail!("{mode:?} is out of range");
    }
    Ok(m)
}

/// Loads a spec file. A spec may start from another with `extends: <path>`
/// (relative to itself): mappings are merged key by key, everything else —
/// lists included — is replaced by the extending file's value.
pub fn load(path: &Path) -> Result<LoadedSpec> {
    let value = load_value(path, 0)?;
    let origin = path.display().to_string();
    let extends = matches!(&value, serde_yaml_ng::Value::Mapping(_))
        && std::fs::read_to_string(path)?
            .lines()
            .any(|l| l.starts_with("extends:"));
    let spec = if extends {
        Spec::from_value(value, &origin)?
    } else {
        // Straight from the text, so errors carry their line and column.
        Spec::parse(&std::fs::read_to_string(path)?, &origin)?
    };
    let loaded = LoadedSpec {
        spec,
        path: path.to_path_buf(),
    };
    loaded
        .secure_boot_keys()
        .with_context(|| format!("{origin}: invalid spec"))?;
    Ok(loaded)
}

fn load_value(path: &Path, depth: usize) -> Result<serde_yaml_ng::Value> {
    use serde_yaml_ng::Value;
    if depth > 8 {
        bail!("{}: `extends` nests more than 8 deep", path.display());
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read spec {}", path.display()))?;
    let mut value: Value = serde_yaml_ng::from_str(&text)
        .with_context(|| format!("{}: not valid YAML", path.display()))?;
    let Value::Mapping(map) = &mut value else {
        bail!("{}: the spec must be a mapping of keys", path.display());
    };
    let Some(base) = map.remove("extends") else {
        return Ok(value);
    };
    let Value::String(base) = base else {
        bail!("{}: extends: must be a path", path.display());
    };
    let base_path = path.parent().unwrap_or(Path::new(".")).join(base);
    let mut merged = load_value(&base_path, depth + 1)
        .with_context(|| format!("{}: in extends", path.display()))?;
    merge(&mut merged, value);
    Ok(merged)
}

fn merge(base: &mut serde_yaml_ng::Value, over: serde_yaml_ng::Value) {
    use serde_yaml_ng::Value;
    match (base, over) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "name: ballast\nversion: 0.1.0\ndebian:\n  kernel: cloud\n";

    #[test]
    fn minimal_spec_gets_defaults() {
        let s = Spec::parse(GOOD, "t").unwrap();
        assert_eq!(s.debian.suite, "bookworm");
        assert_eq!(s.partitions, Partitions::default());
        assert!(s
            .packages()
            .contains(&"linux-image-cloud-amd64".to_string()));
        assert!(s.packages().contains(&"openssh-server".to_string()));
    }

    #[test]
    fn bad_specs_name_the_field() {
        let cases: &[(&str, &str)] = &[
            ("name: [x]\nversion: '1'\ndebian: {kernel: cloud}", "name"),
            ("version: '1'\ndebian: {kernel: cloud}", "missing field `name`"),
            ("name: a b\nversion: '1'\ndebian: {kernel: cloud}", "name:"),
            ("name: a\nversion: x1\ndebian: {kernel: cloud}", "version:"),
            ("name: a\nversion: '1'\ndebian: {kernel: tiny}", "unknown variant `tiny`"),
            ("name: a\nversion: '1'\ndebian: {kernel: cloud, packages: [Foo]}", "debian.packages[0]"),
            ("name: a\nversion: '1'\ndebian: {kernel: cloud, mirror: ftp://x}", "debian.mirror"),
            ("name: a\nversion: '1'\ndebian: {kernel: cloud}\nbogus: 1", "unknown field `bogus`"),
            ("name: a\nversion: '1'\ndebian: {kernel: cloud}\nsecure_boot: {}", "secure_boot: missing field `keys`"),
            ("name: a\nversion: '1'\ndebian: {kernel: cloud}\nsecure_boot: {keys: k, enroll: always}", "secure_boot.enroll: unknown variant `always`"),
            ("name: a\nversion: '1'\ndebian: {kernel: cloud}\npartitions: {slot_mib: 10}", "partitions.slot_mib"),
            ("name: a\nversion: '1'\ndebian: {kernel: cloud}\npartitions: {esp: 10}", "unknown field `esp`"),
            ("name: a\nversion: '1'\ndebian: {kernel: cloud}\nkernel_cmdline: ['a b']", "kernel_cmdline[0]"),
            ("name: a\nversion: '1'\ndebian: {kernel: cloud}\nkernel_cmdline: [roothash=1]", "roothash"),
            ("name: a\nversion: '1'\ndebian: {kernel: cloud}\nfiles: [{path: etc/x, content: y}]", "files[0].path"),
            ("name: a\nversion: '1'\ndebian: {kernel: cloud}\nfiles: [{path: /var/x, content: y}]", "under /var"),
            ("name: a\nversion: '1'\ndebian: {kernel: cloud}\nfiles: [{path: /x}]", "needs content or source"),
            ("name: a\nversion: '1'\ndebian: {kernel: cloud}\nfiles: [{path: /x, content: y, mode: '999'}]", "files[0].mode"),
            ("name: a\nversion: '1'\ndebian: {kernel: cloud}\nfiles: [{path: /x, content: y}, {path: /x, content: z}]", "listed twice"),
            ("name: a\nversion: '1'\ndebian: {kernel: cloud}\narchitecture: arm64", "architecture"),
            ("name: a\nversion: '1'\ndebian: {kernel: cloud}\npayload_zstd_level: 40", "payload_zstd_level"),
            ("name: a\nversion: '1'\ndebian: {kernel: cloud}\nkernel_modules: {set: tiny}", "kernel_modules.set: unknown variant `tiny`"),
            ("name: a\nversion: '1'\ndebian: {kernel: cloud}\nkernel_modules: {keep: [../../etc]}", "kernel_modules.keep[0]"),
            ("name: a\nversion: '1'\ndebian: {kernel: cloud}\nkernel_modules: {keep: [fs/btrfs, /fs]}", "kernel_modules.keep[1]"),
            ("name: a\nversion: '1'\ndebian: {kernel: cloud}\nkernel_modules: {drop: [fs]}", "unknown field `drop`"),
            ("name: a\n  version: '1'\n", "not valid YAML"),
        ];
        for (doc, want) in cases {
            let err = format!("{:#}", Spec::parse(doc, "spec.yaml").unwrap_err());
            assert!(err.contains(want), "{doc:?}: error {err:?} lacks {want:?}");
            assert!(err.starts_with("spec.yaml"), "{err}");
        }
    }

    #[test]
    fn yaml_errors_carry_line_and_column() {
        let err = format!(
            "{:#}",
            Spec::parse("name: a\nversion: '1'\ndebian:\n  kernel: [\n", "s").unwrap_err()
        );
        assert!(err.contains("line"), "{err}");
    }

    #[test]
    fn extends_merges_mappings_and_replaces_lists() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("base.yaml"),
            "name: base\nversion: '1.0'\ndebian:\n  kernel: cloud\n  packages: [curl]\nkernel_cmdline: [quiet]\n",
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(
            dir.path().join("sub/test.yaml"),
            "extends: ../base.yaml\ndebian:\n  kernel: generic\nkernel_cmdline: [debug]\n",
        )
        .unwrap();
        let s = load(&dir.path().join("sub/test.yaml")).unwrap().spec;
        assert_eq!(s.name, "base");
        assert_eq!(s.debian.kernel, KernelFlavour::Generic);
        assert_eq!(s.debian.packages, vec!["curl"]);
        assert_eq!(s.kernel_cmdline, vec!["debug"]);

        std::fs::write(dir.path().join("loop.yaml"), "extends: loop.yaml\n").unwrap();
        let err = format!("{:#}", load(&dir.path().join("loop.yaml")).unwrap_err());
        assert!(err.contains("nests"), "{err}");
        let err = format!("{:#}", load(&dir.path().join("missing.yaml")).unwrap_err());
        assert!(err.contains("cannot read spec"), "{err}");
    }

    #[test]
    fn shipped_specs_are_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for f in [
            "configs/image.yaml",
            "configs/image-metal.yaml",
            "qemu-tests/test-image.yaml",
        ] {
            load(&root.join(f)).unwrap_or_else(|e| panic!("{f}: {e:#}"));
        }
    }
}
