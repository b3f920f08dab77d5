//! What a host downloads for a full update of a built image: the root
//! payload plus the UKI, from the build's `build.json`, against the 64 MB
//! target (issue 12). `release-size [BUILD_JSON]` (default out/build.json).

use anyhow::{Context, Result};

/// The target for root payload + UKI, in bytes.
const TARGET: u64 = 64_000_000;

fn size(info: &serde_json::Value, payload: &str) -> Result<u64> {
    info["payloads"][payload]["size"]
        .as_u64()
        .with_context(|| format!("build.json has no payloads.{payload}.size"))
}

fn main() -> Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "out/build.json".into());
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let info: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{path} is not JSON"))?;
    let (root, root_zst, uki) = (
        size(&info, "root")?,
        size(&info, "root_zst")?,
        size(&info, "uki")?,
    );
    let mb = |b: u64| b as f64 / 1e6;
    let total = root_zst + uki;
    println!(
        "release size of {} {} ({path}):",
        info["name"].as_str().unwrap_or("?"),
        info["version"].as_str().unwrap_or("?")
    );
    println!(
        "  root payload {:.1} MB (the root filesystem {:.1} MB, {:.2}x compressed) + UKI {:.1} MB = {:.1} MB",
        mb(root_zst),
        mb(root),
        root as f64 / root_zst as f64,
        mb(uki),
        mb(total)
    );
    println!(
        "  against the target of {:.0} MB: ratio {:.3} ({})",
        mb(TARGET),
        total as f64 / TARGET as f64,
        if total <= TARGET { "met" } else { "MISSED" }
    );
    Ok(())
}
