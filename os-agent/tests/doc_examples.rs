//! Docs that cannot drift: every YAML, TOML and JSON block in README.md and
//! docs/*.md carries a `<!-- check: KIND -->` marker on the line before its
//! fence, and is checked here by the code that reads that kind of text on a
//! host (or in image-build). A block without a marker fails too, so a new
//! example cannot slip in unchecked.
//!
//! Each checker calls the same entry point as the real reader, against a
//! directory-backed host, so an example passes only if the agent (or
//! `osctl provision validate`, or `image-build validate`) would accept it.

use anyhow::{bail, ensure, Context, Result};
use os_agent::containers::desired::{AgentConfigSource, FilesSource, Source, FILES_DIR};
use os_agent::fleet::model::{FailureReport, HostRecord, Policy};
use os_agent::host::{DirHost, Host};
use os_agent::provision::record::Attempt;
use std::path::{Path, PathBuf};

/// The languages a marker is required for.
const CHECKED_LANGUAGES: &[&str] = &["yaml", "yml", "toml", "json"];

/// Where the agent-config checker puts an example: an operator's drop-in.
const DROPIN: &str = "/etc/ballast/agent.d/50-doc.toml";

/// A fenced block of a Markdown file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Block {
    /// `file:line` of the opening fence.
    at: String,
    language: String,
    /// The marker's kind, if the line before the fence has one.
    kind: Option<String>,
    /// The lines between the fences, without the fence's indentation.
    text: String,
}

/// `<!-- check: KIND -->` → `KIND`.
fn marker(line: &str) -> Option<String> {
    let inner = line
        .trim()
        .strip_prefix("<!--")?
        .strip_suffix("-->")?
        .trim()
        .strip_prefix("check:")?;
    Some(inner.trim().to_string())
}

/// Splits a Markdown file into its fenced blocks. `problems` gets a marker
/// with no fence after it, and a fence that is never closed.
fn extract(file: &str, text: &str, problems: &mut Vec<String>) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let body = line.trim_start();
        let indent = line.len() - body.len();
        let fence_len = body.chars().take_while(|c| *c == '`').count();
        if fence_len < 3 {
            if marker(line).is_some() {
                let next_is_fence = lines
                    .get(i + 1)
                    .is_some_and(|l| l.trim_start().starts_with("```"));
                if !next_is_fence {
                    problems.push(format!(
                        "{file}:{}: a check marker must be on the line right before a fence",
                        i + 1
                    ));
                }
            }
            i += 1;
            continue;
        }
        let fence = &body[..fence_len];
        let language = body[fence_len..]
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        let kind = i.checked_sub(1).and_then(|p| marker(lines[p]));
        let start = i;
        let mut content = Vec::new();
        i += 1;
        loop {
            let Some(l) = lines.get(i) else {
                problems.push(format!("{file}:{}: the fence is never closed", start + 1));
                break;
            };
            i += 1;
            if l.trim() == fence {
                break;
            }
            // A line of an indented block loses at most the fence's indentation.
            let strip = l.len() - l.trim_start_matches(' ').len();
            content.push(&l[strip.min(indent)..]);
        }
        let mut text = content.join("\n");
        text.push('\n');
        blocks.push(Block {
            at: format!("{file}:{}", start + 1),
            language,
            kind,
            text,
        });
    }
    blocks
}

/// A checker: the languages its blocks may be written in, and the check.
type Checker = (&'static [&'static str], fn(&str) -> Result<()>);

fn checker(kind: &str) -> Option<Checker> {
    let c: Checker = match kind {
        "agent-config" => (&["toml"], check_agent_config),
        "container" => (&["toml"], check_container),
        "registries" => (&["toml"], check_registries),
        "user-data" => (&["yaml", "yml"], check_user_data),
        "user-data-fragment" => (&["yaml", "yml"], check_user_data_fragment),
        "network-config" => (&["yaml", "yml"], check_network_config),
        "etcd-host-record" => (&["json"], check_host_record),
        "etcd-policy" => (&["json"], check_policy),
        "etcd-failure-report" => (&["json"], check_failure_report),
        "provision-attempt" => (&["json"], check_attempt),
        "channel-envelope" => (&["json"], check_envelope),
        "image-spec" => (&["yaml", "yml"], check_image_spec),
        _ => return None,
    };
    Some(c)
}

/// The `etcdctl put KEY 'VALUE'` commands of a shell block (a `\` at the
/// end of a line continues it), as (key, value).
fn etcdctl_puts(text: &str) -> Vec<(String, String)> {
    let joined = text.replace("\\\n", " ");
    joined
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("etcdctl put ")?;
            let (key, value) = rest.trim().split_once(char::is_whitespace)?;
            let value = value.trim();
            let value = value.strip_prefix('\'')?.strip_suffix('\'')?;
            Some((key.to_string(), value.to_string()))
        })
        .collect()
}

/// The etcd value an `etcdctl put` of a doc writes, checked by the parser of
/// its key's kind (docs/etcd.md's key table). Keys of other kinds (a proven
/// version's machine id) hold plain text and pass.
fn check_etcd_put(key: &str, value: &str) -> Result<()> {
    let segments: Vec<&str> = key.trim_start_matches('/').split('/').collect();
    match segments[..] {
        [_, "containers", "groups" | "hosts", _, _] => {
            let (prefix, _) = key.rsplit_once('/').context("a container key has a name")?;
            os_agent::fleet::containers::parse_layer(
                &format!("{prefix}/"),
                &[(key.to_string(), value.as_bytes().to_vec())],
            )
            .map_err(|es| {
                let es: Vec<String> = es.iter().map(ToString::to_string).collect();
                anyhow::anyhow!("{}", es.join("; "))
            })?;
        }
        [_, "groups", _, "policy"] => check_policy(value)?,
        _ => {}
    }
    Ok(())
}

/// Checks one block; `Ok(false)` for a block of a language that needs no marker.
fn check_block(b: &Block) -> Result<bool> {
    if b.language == "sh" {
        let puts = etcdctl_puts(&b.text);
        for (key, value) in &puts {
            check_etcd_put(key, value).with_context(|| format!("etcdctl put {key}"))?;
        }
        return Ok(!puts.is_empty());
    }
    let Some(kind) = &b.kind else {
        if CHECKED_LANGUAGES.contains(&b.language.as_str()) {
            bail!(
                "a {} block without a `<!-- check: KIND -->` marker on the line before it",
                b.language
            );
        }
        return Ok(false);
    };
    let Some((languages, check)) = checker(kind) else {
        bail!("unknown check kind {kind:?}");
    };
    ensure!(
        languages.contains(&b.language.as_str()),
        "{kind} examples are {} blocks, not {:?}",
        languages[0],
        b.language
    );
    check(&b.text).with_context(|| format!("{kind} example"))?;
    Ok(true)
}

/// Checks every block of the given Markdown files; the failures, each naming
/// file and line, and how many blocks were checked.
fn check_files(files: &[(String, String)]) -> (Vec<String>, usize) {
    let mut failures = Vec::new();
    let mut checked = 0;
    for (name, text) in files {
        for b in extract(name, text, &mut failures) {
            match check_block(&b) {
                Ok(true) => checked += 1,
                Ok(false) => {}
                Err(e) => failures.push(format!("{}: {e:#}", b.at)),
            }
        }
    }
    (failures, checked)
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// README.md and docs/*.md, named relative to the workspace.
fn doc_files() -> Result<Vec<(String, String)>> {
    let root = repo_root();
    let mut names = vec!["README.md".to_string()];
    let docs = root.join("docs");
    let mut in_docs = Vec::new();
    for e in std::fs::read_dir(&docs).with_context(|| format!("cannot list {}", docs.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") {
            in_docs.push(format!("docs/{name}"));
        }
    }
    in_docs.sort();
    names.extend(in_docs);
    names
        .into_iter()
        .map(|n| {
            let path = root.join(&n);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            Ok((n, text))
        })
        .collect()
}

// ---- the checkers ----

/// A host with nothing on it: what an example says is all there is.
fn empty_host() -> Result<(tempfile::TempDir, DirHost)> {
    let dir = tempfile::tempdir().context("cannot create a temporary host")?;
    let host = DirHost::new(dir.path()).context("cannot open the temporary host")?;
    Ok((dir, host))
}

fn write(host: &DirHost, path: &str, text: &str) -> Result<()> {
    host.write_atomic(Path::new(path), text.as_bytes())
        .with_context(|| format!("cannot write {path}"))
}

/// The agent's own load over the example as its only drop-in: no error and
/// no unknown key (registries included); its `containers` list goes to the
/// containers code, which the config module leaves it to.
fn check_agent_config(text: &str) -> Result<()> {
    let (_dir, host) = empty_host()?;
    write(&host, DROPIN, text)?;
    check_agent_config_on(&host)?;
    Ok(())
}

/// As [`check_agent_config`]; how many registries the files set.
fn check_agent_config_on(host: &DirHost) -> Result<usize> {
    let loaded = os_agent::config::load(host)?;
    if !loaded.unknown_keys.is_empty() {
        let keys: Vec<String> = loaded.unknown_keys.iter().map(|u| u.key.clone()).collect();
        bail!("unknown keys: {}", keys.join(", "));
    }
    AgentConfigSource { host }.load()?;
    Ok(loaded.settings.registries.len())
}

/// `[[containers]]` tables: valid both as a file of
/// /etc/ballast/containers.d and in the agent configuration, the two places
/// docs/containers.md says they are written.
fn check_container(text: &str) -> Result<()> {
    let (_dir, host) = empty_host()?;
    write(&host, &format!("{FILES_DIR}/50-doc.toml"), text)?;
    let containers = FilesSource { host: &host }.load()?;
    ensure!(!containers.is_empty(), "no container in the example");
    check_agent_config(text).context("as agent configuration")
}

fn check_registries(text: &str) -> Result<()> {
    let (_dir, host) = empty_host()?;
    write(&host, DROPIN, text)?;
    ensure!(
        check_agent_config_on(&host)? > 0,
        "no registry in the example"
    );
    Ok(())
}

/// A host for `osctl provision validate`: no /etc/group (Debian's base
/// groups only) and this machine's time zones, as osctl checks them.
fn provision_host() -> Result<(tempfile::TempDir, DirHost)> {
    let (dir, host) = empty_host()?;
    let zoneinfo = Path::new("/usr/share/zoneinfo");
    if zoneinfo.is_dir() {
        let at = host.path(zoneinfo);
        let parent = at.parent().context("zoneinfo has a parent")?;
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        std::os::unix::fs::symlink(zoneinfo, &at)
            .with_context(|| format!("cannot link {}", at.display()))?;
    }
    Ok((dir, host))
}

/// The offline validation of `osctl provision validate`. A warning fails
/// too: an example must not show a key that is ignored.
fn validate_user_data(user_data: &str, network_config: Option<&str>) -> Result<()> {
    let (_dir, host) = provision_host()?;
    let plan = os_agent::provision::validate_offline(
        &host,
        user_data.as_bytes(),
        network_config.map(str::as_bytes),
    )?;
    ensure!(
        plan.warnings.is_empty(),
        "warnings: {}",
        plan.warnings.join("; ")
    );
    ensure!(!plan.steps.is_empty(), "the example does nothing");
    Ok(())
}

fn check_user_data(text: &str) -> Result<()> {
    validate_user_data(text, None)
}

fn check_user_data_fragment(text: &str) -> Result<()> {
    validate_user_data(&format!("#cloud-config\n{text}"), None)
}

fn check_network_config(text: &str) -> Result<()> {
    validate_user_data("#cloud-config\n", Some(text))
}

/// Every key of `doc` is one the type writes back: for the types that
/// accept unknown fields, so an example cannot show a field the code
/// ignores.
fn keys_known(doc: &serde_json::Value, back: &serde_json::Value, path: &str) -> Result<()> {
    use serde_json::Value;
    match (doc, back) {
        (Value::Object(d), Value::Object(b)) => {
            for (k, v) in d {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                let Some(bv) = b.get(k) else {
                    bail!("{p}: not a field of the type (it would be ignored)");
                };
                keys_known(v, bv, &p)?;
            }
        }
        (Value::Array(d), Value::Array(b)) => {
            for (i, (dv, bv)) in d.iter().zip(b).enumerate() {
                keys_known(dv, bv, &format!("{path}[{i}]"))?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn round_trip<T: serde::Serialize>(text: &str, parsed: &T) -> Result<()> {
    let doc: serde_json::Value = serde_json::from_str(text)?;
    keys_known(&doc, &serde_json::to_value(parsed)?, "")
}

fn check_host_record(text: &str) -> Result<()> {
    let r = HostRecord::parse("/ballast/hosts/<m>", text.as_bytes())?;
    round_trip(text, &r)
}

fn check_policy(text: &str) -> Result<()> {
    Policy::parse("/ballast/groups/<g>/policy", text.as_bytes())?;
    Ok(())
}

fn check_failure_report(text: &str) -> Result<()> {
    let r = FailureReport::parse("/ballast/groups/<g>/failures/<v>/<m>", text.as_bytes())?;
    round_trip(text, &r)
}

fn check_attempt(text: &str) -> Result<()> {
    let a: Attempt = serde_json::from_str(text)?;
    round_trip(text, &a)
}

/// The envelope as a host opens it. Its signature cannot verify (the
/// example has none), so with no trusted key the reader must get past the
/// envelope and its format and stop at the signatures.
fn check_envelope(text: &str) -> Result<()> {
    use ballast_common::manifest::{open, ManifestError};
    match open(text.as_bytes(), &[]) {
        Err(ManifestError::UnknownKey { signed_by, .. }) => {
            ensure!(!signed_by.is_empty(), "the example has no signature");
            Ok(())
        }
        Err(e) => Err(e.into()),
        Ok(_) => bail!("opened without a trusted key"),
    }
}

/// `image-build validate`'s loader, with the example beside a copy of
/// configs/image.yaml, as if it were a spec in configs/ (`extends` is
/// relative to the spec).
fn check_image_spec(text: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let base = repo_root().join("configs/image.yaml");
    std::fs::copy(&base, dir.path().join("image.yaml"))
        .with_context(|| format!("cannot copy {}", base.display()))?;
    if text.contains("secure_boot:") {
        // As the docs say to make them, where the example names them.
        image_build::secure_boot::keygen(&dir.path().join("keys/secure-boot"), "doc example")?;
    }
    let spec = dir.path().join("doc.yaml");
    std::fs::write(&spec, text)?;
    image_build::spec::load(&spec)?;
    Ok(())
}

// ---- the tests ----

#[test]
fn every_doc_example_is_checked_and_valid() -> Result<()> {
    let files = doc_files()?;
    let (failures, checked) = check_files(&files);
    assert!(
        failures.is_empty(),
        "{} doc example(s) fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked > 0, "no doc example found: is the docs path right?");
    Ok(())
}

fn failures_of(markdown: &str) -> Vec<String> {
    check_files(&[("x.md".to_string(), markdown.to_string())]).0
}

#[test]
fn indented_fences_lose_their_indentation() {
    let md = "- a list item\n\n  <!-- check: agent-config -->\n  ```toml\n  [health]\n    commands = [\"true\"]\n  ```\n";
    let mut problems = Vec::new();
    let blocks = extract("x.md", md, &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(
        blocks,
        vec![Block {
            at: "x.md:4".into(),
            language: "toml".into(),
            kind: Some("agent-config".into()),
            text: "[health]\n  commands = [\"true\"]\n".into(),
        }]
    );
    assert!(failures_of(md).is_empty());
}

#[test]
fn unmarked_misplaced_and_unknown_markers_are_reported() {
    let cases = [
        ("```yaml\na: 1\n```\n", "x.md:1: a yaml block without"),
        ("  ```json\n  {}\n  ```\n", "x.md:1: a json block without"),
        (
            "<!-- check: agent-confg -->\n```toml\n```\n",
            "x.md:2: unknown check kind \"agent-confg\"",
        ),
        (
            "<!-- check: agent-config -->\n\n```toml\n```\n",
            "x.md:1: a check marker must be",
        ),
        (
            "<!-- check: agent-config -->\n```yaml\na: 1\n```\n",
            "x.md:2: agent-config examples are toml blocks",
        ),
        ("<!-- check: user-data -->\n```yaml\n", "never closed"),
    ];
    for (md, want) in cases {
        let f = failures_of(md);
        assert!(f.iter().any(|m| m.contains(want)), "{md:?}: {f:?}");
    }
    // Other languages need no marker.
    assert!(failures_of("```sh\nosctl status\n```\n").is_empty());
}

#[test]
fn broken_examples_fail_their_checker() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "agent-config",
            "[update]\nstrategy = \"sometimes\"\n",
            "strategy",
        ),
        (
            "agent-config",
            "[helth]\ncommands = []\n",
            "unknown keys: helth",
        ),
        ("agent-config", "[health\n", "invalid TOML"),
        (
            "container",
            "[[containers]]\nname = \"web\"\nimage = \"nginx\"\nmemroy = \"1G\"\n",
            "memroy",
        ),
        (
            "registries",
            "[registries.\"registry.lan\"]\nusername = \"u\"\n",
            "username and password go together",
        ),
        ("user-data", "hostname: web1\n", "cloud-config"),
        ("user-data", "#cloud-config\nhostnme: web1\n", "unknown key"),
        (
            "user-data",
            "#cloud-config\ntimezone: Mars/Base\n",
            "timezone",
        ),
        (
            "user-data-fragment",
            "ballast:\n  update: {strategy: window}\n",
            "update.window.start is required with strategy = \"window\"",
        ),
        (
            "network-config",
            "version: 2\nethernets:\n  lan:\n    addresses: [10.0.0.1]\n",
            "prefix",
        ),
        ("etcd-policy", "{\"max_holders\": 0}", "max_holders"),
        (
            "etcd-host-record",
            "{\"machine_id\": \"m\"}",
            "missing field",
        ),
        (
            "etcd-failure-report",
            "{\"machine_id\": \"m\", \"version\": \"1\", \"reason\": \"r\", \"at\": 1, \"why\": 2}",
            "why: not a field",
        ),
        (
            "provision-attempt",
            "{\"time\": \"t\", \"time_unix\": 1, \"result\": \"finished\"}",
            "finished",
        ),
        (
            "channel-envelope",
            "{\"format\": \"ballast-manifest-v2\", \"manifest\": \"{}\", \"signatures\": []}",
            "unsupported manifest format",
        ),
        ("image-spec", "name: x\n", "missing field"),
    ];
    for (kind, text, want) in cases {
        let md = format!(
            "<!-- check: {kind} -->\n```{}\n{}\n```\n",
            lang(kind),
            text.trim_end()
        );
        let f = failures_of(&md);
        assert!(
            f.len() == 1 && f[0].starts_with("x.md:2: ") && f[0].contains(want),
            "{kind} {text:?}: want {want:?}, got {f:?}"
        );
    }
}

/// The etcd values written by `etcdctl put` in shell blocks are checked too.
#[test]
fn etcdctl_puts_in_shell_blocks_are_checked() {
    let cases = [
        (
            "etcdctl put /ballast/containers/groups/web/nginx \\\n  '{\"image\": \"r/x:1\", \"memroy\": \"1M\"}'",
            "memroy",
        ),
        (
            "etcdctl put /ballast/groups/web/policy '{\"max_holders\": 0}'",
            "max_holders",
        ),
    ];
    for (cmd, want) in cases {
        let f = failures_of(&format!("```sh\n{cmd}\n```\n"));
        assert!(
            f.len() == 1 && f[0].contains(want),
            "{cmd}: want {want:?}, got {f:?}"
        );
    }
    let ok = "```sh\netcdctl put /ballast/groups/web/policy '{\"paused\": true}'\netcdctl put /ballast/groups/web/proven/1.5.0 operator\n```\n";
    assert!(failures_of(ok).is_empty(), "{:?}", failures_of(ok));
}

fn lang(kind: &str) -> &'static str {
    checker(kind).map_or("", |(languages, _)| languages[0])
}
