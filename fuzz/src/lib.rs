//! The bodies of Ballast's fuzz targets, one function per parser of
//! untrusted input. The libFuzzer binaries in `fuzz_targets/` call these
//! (`make fuzz`), and `tests/corpus.rs` replays the committed corpus and every
//! past finding through them on stable Rust as part of `make test`.
//!
//! A target may return any error for any input; what it must never do is
//! panic, abort (an allocation sized by the input), or hang.

use ballast_common::keys::SecretKey;
use ballast_common::manifest::{self, HostFacts, Manifest};
use os_agent::containers::{desired, oci, registry, spec, unpack};
use os_agent::fleet::model;
use os_agent::provision::source::SourceKind;
use os_agent::provision::{cloudconfig, network, record};
use std::path::Path;

/// Every target, by the name of its binary and corpus directory.
/// A target's body: any input, any outcome but a panic, abort or hang.
pub type Target = fn(&[u8]);

pub const TARGETS: &[(&str, Target)] = &[
    ("manifest_open", manifest_open),
    ("manifest_checks", manifest_checks),
    ("cloud_config", cloud_config),
    ("network_config", network_config),
    ("container_spec", container_spec),
    ("oci_documents", oci_documents),
    ("layer_unpack", layer_unpack),
    ("etcd_values", etcd_values),
    ("kernel_cmdline", kernel_cmdline),
    ("registry_headers", registry_headers),
    ("efi_signatures", efi_signatures),
];

/// The key the fuzzer signs its manifests with: fixed, so a finding replays.
fn fuzz_key() -> SecretKey {
    SecretKey::from_seed([7; 32])
}

/// A channel envelope as fetched, against a trusted key: the signature gate
/// and everything before it (JSON, base64, key ids, sizes).
pub fn manifest_open(data: &[u8]) {
    let trusted = [fuzz_key().public()];
    if let Ok(m) = manifest::open(data, &trusted) {
        after_signature(&m);
    }
}

/// A manifest body that passed the signature (the fuzzer cannot forge one,
/// so it is signed here): the checks a host makes after trusting a key, with
/// the signed numbers as hostile as the input makes them.
pub fn manifest_checks(data: &[u8]) {
    let Ok(m) = serde_json::from_slice::<Manifest>(data) else {
        return;
    };
    let key = fuzz_key();
    let Ok(envelope) = manifest::sign(&m, &[&key]) else {
        return;
    };
    let Ok(bytes) = serde_json::to_vec(&envelope) else {
        return;
    };
    if let Ok(opened) = manifest::open(&bytes, &[key.public()]) {
        after_signature(&opened);
    }
}

fn after_signature(m: &Manifest) {
    let failed = vec!["0.0.1".to_string()];
    for now in [0, 1_700_000_000, u64::MAX] {
        let facts = HostFacts {
            now,
            channel: &m.channel,
            name: &m.name,
            architecture: &m.architecture,
            booted_version: "0.1.0",
            last_sequence: Some(1),
            failed_versions: &failed,
            machine_id: "0123456789abcdef0123456789abcdef",
        };
        let _verdict = manifest::check(m, &facts);
    }
    let _due = manifest::due_at(m, "0123456789abcdef0123456789abcdef");
    let _hash_area = ballast_common::verity::hash_area_size(m.verity.data_blocks);
}

/// User data, optionally followed by a NUL and a network-config document;
/// the instance id is computed from the same bytes as meta-data.
pub fn cloud_config(data: &[u8]) {
    let (user_data, network_config) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let _parsed = cloudconfig::parse(user_data, network_config);
    let _id = record::instance_id(&SourceKind::FwCfg, user_data, network_config);
}

pub fn network_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _parsed = network::parse_document(text);
    }
}

/// A container definition as an operator file (TOML) and as an etcd value
/// (JSON), through the same validation the agent runs.
pub fn container_spec(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(raw) = desired::parse_toml(text, Path::new("fuzz.toml")) {
        let (mut out, mut errors) = (Vec::new(), Vec::new());
        desired::validate_list(&raw, "fuzz.toml", &mut out, &mut errors);
    }
    let kvs = vec![("/ballast/containers/fuzz".to_string(), data.to_vec())];
    let _layer = os_agent::fleet::containers::parse_layer("/ballast/containers/", &kvs);
    let _name = spec::valid_name(text);
}

/// A registry's manifest or index (with the Content-Type it came with) and
/// an image config: the first byte picks which, the rest is the document.
pub fn oci_documents(data: &[u8]) {
    let Some((&which, doc)) = data.split_first() else {
        return;
    };
    let content_types = [
        None,
        Some("application/vnd.oci.image.manifest.v1+json"),
        Some("application/vnd.oci.image.index.v1+json"),
        Some("application/vnd.docker.distribution.manifest.v2+json"),
        Some("application/vnd.docker.distribution.manifest.list.v2+json"),
    ];
    match which % 2 {
        0 => {
            let ct = content_types[usize::from(which / 2) % content_types.len()];
            let _doc = oci::parse_document(doc, ct, "fuzz");
        }
        _ => {
            let layers = usize::from(which / 2) % 8;
            let _config = oci::parse_config(doc, layers, &oci::Platform::host(), "fuzz");
        }
    }
}

/// A layer (gzip, zstd or plain tar) unpacked onto a fresh directory: the
/// unpacker must refuse, never write outside the root.
pub fn layer_unpack(data: &[u8]) {
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let root = dir.path().join("root");
    if std::fs::create_dir(&root).is_err() {
        return;
    }
    // A small limit: the fuzzer finds decompression bombs, and each one would
    // otherwise be written out in full before it is refused.
    let _result = unpack::unpack_layer(data, &root, unpack::Options { chown: false }, 8 << 20);
    // Anything outside `root` is an escape: the temp dir holds only it.
    let mut entries: Vec<_> = std::fs::read_dir(dir.path())
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    entries.sort();
    assert_eq!(
        entries,
        vec![std::ffi::OsString::from("root")],
        "layer wrote outside its root"
    );
}

/// The values a host reads from etcd, each through its own parser.
pub fn etcd_values(data: &[u8]) {
    let _policy = model::Policy::parse("/ballast/groups/fuzz/policy", data);
    let _host = model::HostRecord::parse("/ballast/hosts/fuzz", data);
    let _holder = model::Holder::parse("/ballast/groups/fuzz/holders/fuzz", data);
    let _failure = model::FailureReport::parse("/ballast/groups/fuzz/failures/fuzz", data);
}

/// The kernel command line (written by whoever writes the ESP entry).
pub fn kernel_cmdline(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let words = os_agent::cmdline::words(text);
        let _v = os_agent::cmdline::value(&words, "ballast.config_url");
        let _root = os_agent::cmdline::parse(text);
        let _url = os_agent::provision::source::config_url(text);
    }
}

/// A UKI's PE headers and Authenticode certificate table, and (the same
/// bytes) the firmware's db as a run of EFI signature lists.
pub fn efi_signatures(data: &[u8]) {
    let _info = ballast_common::pe::parse(data);
    let _signed = ballast_common::pe::signed_with(data, b"\x30\x82");
    let _certs = os_agent::boot::secure_boot::x509_certs(data);
}

/// A registry's `WWW-Authenticate` challenge and an image reference.
pub fn registry_headers(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _challenge = registry::parse_challenge(text);
        let _reference = os_agent::containers::reference::Reference::parse(text);
        let _digest = os_agent::containers::reference::Digest::parse(text);
    }
}
