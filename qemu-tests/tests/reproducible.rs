//! Two builds of the same spec with the same SOURCE_DATE_EPOCH and the same
//! package versions give byte-identical root, verity and UKI payloads.
//!
//! The second build starts from an empty cache, so mmdebstrap, dracut,
//! mkfs.erofs and objcopy all run again; only the package versions are pinned
//! (to the first build's bill of materials, checked below).

use ballast_common::build_info::BuildInfo;
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn image_dir() -> PathBuf {
    std::env::var_os("BALLAST_TEST_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("out/test"))
}

#[test]
fn rebuild_from_scratch_is_byte_identical() {
    let first_dir = image_dir();
    let text = std::fs::read_to_string(first_dir.join("build.json")).unwrap_or_else(|e| {
        panic!(
            "no test image in {}: {e}; run `make test` (it builds the image first)",
            first_dir.display()
        )
    });
    let first: BuildInfo = serde_json::from_str(&text).unwrap();

    let scratch = tempfile::tempdir_in(workspace().join("out")).unwrap();
    let out = scratch.path().join("out");
    let cache = scratch.path().join("cache");
    let ws = workspace();
    let status = Command::new(ws.join("target/release/image-build"))
        .current_dir(&ws)
        .arg("build")
        .arg("--config")
        .arg("qemu-tests/test-image.yaml")
        .arg("--output")
        .arg(&out)
        .arg("--cache-dir")
        .arg(&cache)
        .env("SOURCE_DATE_EPOCH", first.source_date_epoch.to_string())
        .status()
        .expect("cannot run target/release/image-build (make build)");
    assert!(
        status.success(),
        "second build failed: {status} (logs in {})",
        out.join("logs").display()
    );
    let second: BuildInfo =
        serde_json::from_str(&std::fs::read_to_string(out.join("build.json")).unwrap()).unwrap();

    if first.packages != second.packages {
        // Not the property under test: the mirror moved between the builds.
        let changed: Vec<_> = first
            .packages
            .iter()
            .zip(&second.packages)
            .filter(|(a, b)| a != b)
            .map(|(a, b)| format!("{} {} -> {}", a.name, a.version, b.version))
            .collect();
        panic!("package versions changed between the builds, cannot compare: {changed:?}");
    }
    assert_eq!(
        first.payloads.root.sha256, second.payloads.root.sha256,
        "root payloads differ"
    );
    assert_eq!(
        first.payloads.verity.sha256, second.payloads.verity.sha256,
        "verity payloads differ"
    );
    assert_eq!(
        first.payloads.uki.sha256, second.payloads.uki.sha256,
        "UKIs differ"
    );
    assert_eq!(first.root_hash, second.root_hash);
    assert_eq!(first.partitions, second.partitions);

    // The root hash is the one cryptsetup computes over the built partitions.
    let v = Command::new("veritysetup")
        .arg("verify")
        .arg(out.join(&second.payloads.root.file))
        .arg(out.join(&second.payloads.verity.file))
        .arg(&second.root_hash)
        .output()
        .expect("veritysetup not found (apt-get install cryptsetup-bin)");
    assert!(
        v.status.success(),
        "veritysetup verify rejected the build: {}",
        String::from_utf8_lossy(&v.stderr)
    );
}
