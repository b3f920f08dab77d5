//! What a host downloads for a full update of a built image: the root
//! payload plus the UKI, from the build's `build.json`, against the 64 MB
//! target (issue 12). `release-size [BUILD_JSON]` (default out/build.json).

use anyhow::{Context, Result};
use ballast_common::build_info::BuildInfo;

/// The target for root payload + UKI, in bytes.
const TARGET: u64 = 64_000_000;

fn main() -> Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "out/build.json".into());
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let info: BuildInfo =
        serde_json::from_str(&text).with_context(|| format!("{path} is not a build.json"))?;
    let p = &info.payloads;
    let (root, root_zst, uki) = (p.root.size, p.root_zst.size, p.uki.size);
    let mb = |b: u64| b as f64 / 1e6;
    let total = root_zst + uki;
    println!("release size of {} {} ({path}):", info.name, info.version);
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
