//! Replays the committed corpus of every fuzz target, and every past finding
//! (`fuzz/regressions/<target>/`), through the target's function on stable
//! Rust: a parser change that brings back a crash fails `make test` without
//! a fuzzing run.

use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = rd
        .map(|e| e.expect("read corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

#[test]
fn every_target_has_a_binary_and_a_seed_corpus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("fuzz/Cargo.toml");
    for (name, _) in ballast_fuzz::TARGETS {
        assert!(
            root.join("fuzz_targets")
                .join(format!("{name}.rs"))
                .is_file(),
            "fuzz target {name} has no fuzz_targets/{name}.rs"
        );
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "fuzz target {name} is not a [[bin]] in fuzz/Cargo.toml"
        );
        assert!(
            !files(&root.join("corpus").join(name)).is_empty(),
            "fuzz target {name} has no seed corpus in fuzz/corpus/{name}"
        );
    }
}

#[test]
fn the_corpus_and_past_findings_replay_cleanly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut replayed = 0;
    for (name, target) in ballast_fuzz::TARGETS {
        for dir in ["corpus", "regressions"] {
            for file in files(&root.join(dir).join(name)) {
                let data = std::fs::read(&file).expect("read corpus file");
                let result = std::panic::catch_unwind(|| target(&data));
                assert!(result.is_ok(), "{name} panicked on {}", file.display());
                replayed += 1;
            }
        }
    }
    eprintln!("replayed {replayed} inputs");
}
