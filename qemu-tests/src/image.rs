//! The image under test: `build.json` and the files beside it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use ballast_common::build_info::{BuildInfo, PartitionInfo};

use os_agent::boot::entries::strip_boot_counter;

const DIR_ENV: &str = "BALLAST_TEST_IMAGE_DIR";
const HOW_TO_BUILD: &str = "run `make test`, or build the test image first with \
     `image-build build --config qemu-tests/test-image.yaml --output out/test`";

/// The built test image, as described by its `build.json`.
#[derive(Debug)]
pub struct TestImage {
    /// The directory holding `build.json` and the images.
    pub dir: PathBuf,
    pub info: BuildInfo,
}

/// `dir/build.json`: what image-build made there. A build that is only
/// published (the update builds) has no disk image, so this asks for none;
/// [`TestImage::load`] does.
pub fn read_build_info(dir: &Path) -> Result<BuildInfo> {
    let path = dir.join("build.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

impl TestImage {
    /// The image of this test run, loaded once. Panics, saying how to build
    /// it, if it is missing.
    pub fn get() -> &'static TestImage {
        static IMAGE: OnceLock<Result<TestImage, String>> = OnceLock::new();
        let loaded = IMAGE.get_or_init(|| {
            TestImage::load(&default_dir()).map_err(|e| format!("{e:#}\n\nTo fix: {HOW_TO_BUILD}"))
        });
        match loaded {
            Ok(image) => image,
            Err(msg) => panic!("no test image: {msg}"),
        }
    }

    /// Loads `dir/build.json`.
    pub fn load(dir: &Path) -> Result<TestImage> {
        if !dir.is_dir() {
            bail!(
                "test image directory {} does not exist (set {DIR_ENV} to use another)",
                dir.display()
            );
        }
        let path = dir.join("build.json");
        let info = read_build_info(dir)?;
        let image = TestImage {
            dir: dir.to_path_buf(),
            info,
        };
        let qcow2 = image.qcow2_path();
        if !qcow2.is_file() {
            bail!(
                "{} names {}, which is missing",
                path.display(),
                qcow2.display()
            );
        }
        Ok(image)
    }

    /// The qcow2 image, absolute (QEMU resolves a relative backing file
    /// against the overlay's directory).
    pub fn qcow2_path(&self) -> PathBuf {
        let path = self.dir.join(&self.info.images.qcow2);
        std::fs::canonicalize(&path).unwrap_or(path)
    }

    /// The partition labelled `label`; panics if the image has none.
    pub fn partition(&self, label: &str) -> &PartitionInfo {
        self.info
            .partitions
            .iter()
            .find(|p| p.label == label)
            .unwrap_or_else(|| {
                let labels: Vec<_> = self.info.partitions.iter().map(|p| &p.label).collect();
                panic!("build.json has no partition {label:?}; it has {labels:?}")
            })
    }

    /// The UKI's file name once systemd-bless-boot has marked it good.
    pub fn blessed_uki_entry(&self) -> String {
        strip_boot_counter(&self.info.uki_entry)
    }
}

/// `$BALLAST_TEST_IMAGE_DIR`, else `<workspace>/out/test`. A relative path
/// is taken from the workspace root, as in the Makefile (cargo runs tests
/// in the crate's directory).
fn default_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = manifest.parent().unwrap_or(manifest);
    match std::env::var_os(DIR_ENV) {
        Some(dir) if !dir.is_empty() => workspace.join(dir),
        _ => workspace.join("out/test"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use ballast_common::build_info::{Disk, Images, Payload, Payloads};

    fn payload(file: &str) -> Payload {
        Payload {
            file: file.into(),
            size: 1,
            sha256: "00".into(),
        }
    }

    #[test]
    fn loads_build_json() {
        let dir = tempfile::tempdir().unwrap();
        let info = BuildInfo {
            format_version: ballast_common::build_info::FORMAT_VERSION,
            name: "ballast".into(),
            version: "0.1.0".into(),
            architecture: "x86_64".into(),
            kernel_version: "6.1.0-1-cloud-amd64".into(),
            source_date_epoch: 0,
            root_hash: "ab".repeat(32),
            cmdline: "ro".into(),
            uki_entry: "ballast-0.1.0+3.efi".into(),
            disk: Disk {
                size: 2 << 30,
                guid: "g".into(),
            },
            partitions: vec![PartitionInfo {
                number: 6,
                label: "data".into(),
                type_guid: "t".into(),
                partuuid: "p".into(),
                offset: 1 << 20,
                size: 256 << 20,
            }],
            payloads: Payloads {
                root: payload("root.erofs"),
                root_zst: payload("root.erofs.zst"),
                verity: payload("root.verity"),
                uki: payload("ballast.efi"),
            },
            images: Images {
                raw: "ballast.raw".into(),
                qcow2: "ballast.qcow2".into(),
            },
            packages: vec![],
            dropped_modules: vec![],
            purged_packages: vec![],
        };
        std::fs::write(
            dir.path().join("build.json"),
            serde_json::to_string(&info).unwrap(),
        )
        .unwrap();
        let err = TestImage::load(dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("ballast.qcow2"), "{err:#}");

        std::fs::write(dir.path().join("ballast.qcow2"), "").unwrap();
        let image = TestImage::load(dir.path()).unwrap();
        assert_eq!(image.partition("data").size, 256 << 20);
        assert_eq!(image.blessed_uki_entry(), "ballast-0.1.0.efi");
        assert!(image.qcow2_path().is_absolute());
    }

    #[test]
    fn missing_dir_says_how_to_build() {
        let dir = tempfile::tempdir().unwrap();
        let err = TestImage::load(&dir.path().join("nope")).unwrap_err();
        assert!(format!("{err:#}").contains("does not exist"), "{err:#}");
        let err = TestImage::load(dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("build.json"), "{err:#}");
    }
}
