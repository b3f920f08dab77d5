//! One reconcile pass, as the daemon runs it on start and then periodically:
//! load the desired state → pull or find each image → render units → compare
//! with the units on the host → act over D-Bus → keep the layers that were
//! applied → collect images no container uses.
//!
//! A container whose image cannot be pulled runs the image its reference last
//! resolved to (refs.json), so a registry outage does not stop anything; if
//! there is none, whatever runs is left alone and the problem is reported.

use super::desired::{self, AgentConfigSource, FilesSource, SavedLayers, Source};
use super::reconcile::{self, Action, Current, Want};
use super::reference::Digest;
use super::registry::{reference_key, Puller};
use super::store::{Image, Store};
use super::systemd::UnitManager;
use super::unit::{self, Rendered};
use crate::fleet::model::Containers;
use crate::host::Host;
use anyhow::{Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where things live; tests and the bench point these elsewhere.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The image store, a real directory (not through [`Host`]): layers are
    /// unpacked with their owners and modes.
    pub store: PathBuf,
    pub unit_dir: PathBuf,
    pub state_file: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            store: PathBuf::from(super::store::DEFAULT_ROOT),
            unit_dir: PathBuf::from(unit::UNIT_DIR),
            state_file: PathBuf::from(desired::STATE_FILE),
        }
    }
}

/// What a pass did and what went wrong on the way.
#[derive(Debug, Default)]
pub struct Report {
    pub actions: Vec<Action>,
    pub problems: Vec<String>,
    /// The containers' states after the pass, for the host's fleet record.
    pub summary: Containers,
}

/// Counts for the host's record: enabled containers, those whose unit is
/// up, and those whose unit failed or that have no unit and no image.
pub async fn summarize<S: UnitManager>(
    sd: &S,
    want: &BTreeMap<String, Want>,
    current: &BTreeMap<String, Option<String>>,
) -> Result<Containers> {
    let mut s = Containers::default();
    for (name, w) in want {
        if *w == Want::Disabled {
            continue;
        }
        s.desired += 1;
        let unit_exists = current.contains_key(name) || matches!(w, Want::Run { .. });
        let state = if unit_exists {
            sd.state(&unit::unit_name(name)).await?.0
        } else {
            String::new()
        };
        match state.as_str() {
            "active" | "activating" | "reloading" => s.running += 1,
            "failed" => s.failed += 1,
            _ if *w == Want::Unresolved => s.failed += 1,
            _ => {}
        }
    }
    Ok(s)
}

/// The blocking half of a pass: desired state, images, rendered units,
/// current units. Everything but the units' run states and the actions.
#[derive(Debug)]
pub struct Prepared {
    /// The layers used, if they differ from the saved ones.
    pub layers: Option<SavedLayers>,
    pub want: BTreeMap<String, Want>,
    pub rendered: BTreeMap<String, Rendered>,
    /// Our units on the host and the spec each records.
    pub current: BTreeMap<String, Option<String>>,
    /// Manifests in use: GC keeps these.
    pub keep: BTreeSet<Digest>,
    pub problems: Vec<String>,
}

impl Prepared {
    /// The actions, given which units are active.
    pub fn plan(&self, active: &BTreeMap<String, bool>) -> Vec<Action> {
        let current = self
            .current
            .iter()
            .map(|(name, spec)| {
                let c = Current {
                    spec: spec.clone(),
                    active: active.get(name).copied().unwrap_or(false),
                };
                (name.clone(), c)
            })
            .collect();
        reconcile::plan(&current, &self.want)
    }
}

/// How often a tag is asked of the registry again once pulled (the first
/// pass after the agent starts always asks): manifest requests count against
/// registries' rate limits.
pub const TAG_REFRESH_PASSES: u64 = 15;

/// Whether a pass asks the registry what tags point to now, or uses what they
/// last resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tags {
    Refresh,
    Cached,
}

/// The image to run. A reference pinned by digest that is in the store, or
/// a tag with [`Tags::Cached`] that was pulled before, needs no registry;
/// otherwise it is pulled, and if that fails the image its reference last
/// resolved to is used (the failed pull goes to `problems`).
fn resolve_image(
    store: &Store,
    puller: &Puller,
    c: &super::spec::Container,
    tags: Tags,
    problems: &mut Vec<String>,
) -> Result<Image> {
    let key = reference_key(&c.image);
    if c.image.digest.is_some() || tags == Tags::Cached {
        let known = store.refs()?.get(&key).cloned();
        if let Some(img) = known.map(|d| store.image(&d)).transpose()?.flatten() {
            return Ok(img);
        }
    }
    match puller.pull(&c.image) {
        Ok(p) => Ok(p.image),
        Err(pull_err) => {
            let known = store.refs()?.get(&key).cloned();
            match known.map(|d| store.image(&d)).transpose()?.flatten() {
                Some(img) => {
                    problems.push(format!(
                        "container {}: cannot pull {}: {pull_err}; running the last pulled {}",
                        c.name, c.image, img.info.manifest
                    ));
                    Ok(img)
                }
                None => Err(anyhow::Error::new(pull_err).context(format!(
                    "cannot pull {} and it was never pulled before",
                    c.image
                ))),
            }
        }
    }
}

/// Unit files of ours in `dir` and the spec each records.
pub fn current_units(host: &dyn Host, dir: &Path) -> Result<BTreeMap<String, Option<String>>> {
    let mut out = BTreeMap::new();
    for name in host
        .list_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
    {
        let Some(container) = unit::container_of(&name) else {
            continue;
        };
        let path = dir.join(&name);
        let text = host
            .read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        out.insert(container.to_string(), unit::recorded(&text).0);
    }
    Ok(out)
}

/// Loads the desired state from the local sources and `remote` (etcd's
/// layers, when the host is in a fleet), pulls (or finds) images and renders
/// units.
pub fn prepare(
    host: &dyn Host,
    paths: &Paths,
    tags: Tags,
    remote: &[Box<dyn Source + Send>],
) -> Result<Prepared> {
    let saved = SavedLayers::load(host, &paths.state_file)?;
    let files = FilesSource { host };
    let agent = AgentConfigSource { host };
    let mut sources: Vec<&dyn Source> = vec![&agent, &files];
    sources.extend(remote.iter().map(|s| &**s as &dyn Source));
    let loaded = desired::load_all(&sources, &saved);
    let mut problems = loaded.problems;
    let store = Store::open(&paths.store)?;
    let settings = crate::config::load(host)?.settings;
    let client = crate::http::Client::new(&settings.http.options(crate::http::Redirects::AnyHost))?;
    let puller =
        super::registries::configure(Puller::with_client(&store, client), &settings.registries);
    let mut want = BTreeMap::new();
    let mut rendered = BTreeMap::new();
    let mut keep = BTreeSet::new();
    for (name, d) in &loaded.desired {
        let c = &d.container;
        if !c.enabled {
            // Its image stays, so enabling it again needs no registry.
            if let Some(m) = store.refs()?.get(&reference_key(&c.image)) {
                keep.insert(m.clone());
            }
            want.insert(name.clone(), Want::Disabled);
            continue;
        }
        let image = match resolve_image(&store, &puller, c, tags, &mut problems) {
            Ok(i) => i,
            Err(e) => {
                problems.push(format!("container {name}: {e:#}"));
                want.insert(name.clone(), Want::Unresolved);
                continue;
            }
        };
        keep.insert(image.info.manifest.clone());
        match unit::render(c, &image) {
            Ok(r) => {
                want.insert(
                    name.clone(),
                    Want::Run {
                        spec: r.spec.clone(),
                    },
                );
                rendered.insert(name.clone(), r);
            }
            Err(e) => {
                problems.push(e.to_string());
                want.insert(name.clone(), Want::Unresolved);
            }
        }
    }
    let current = current_units(host, &paths.unit_dir)?;
    // Images of units left running (unresolved ones) are in use too.
    for (name, w) in &want {
        if *w == Want::Unresolved && current.contains_key(name) {
            let path = paths.unit_dir.join(unit::unit_name(name));
            let text = host
                .read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            match unit::recorded(&text).1.map(|d| Digest::parse(&d)) {
                Some(Ok(d)) => {
                    keep.insert(d);
                }
                Some(Err(e)) => problems.push(format!(
                    "{}: X-BallastImage: {e}; its image may be collected",
                    path.display()
                )),
                None => problems.push(format!(
                    "{}: no X-BallastImage; its image may be collected",
                    path.display()
                )),
            }
        }
    }
    Ok(Prepared {
        layers: (loaded.layers != saved).then_some(loaded.layers),
        want,
        rendered,
        current,
        keep,
        problems,
    })
}

/// Carries out `actions`: unit files first (removals stop and disable before
/// the file goes), one daemon-reload, then enable and start or restart. A
/// container whose file step failed is not started; every failure is
/// returned, naming the container.
pub async fn execute<S: UnitManager>(
    host: &(dyn Host + Send + Sync),
    sd: &S,
    unit_dir: &Path,
    actions: &[Action],
    rendered: &BTreeMap<String, Rendered>,
) -> Vec<String> {
    let mut problems = Vec::new();
    // A daemon-reload is not free: none when there is nothing to do.
    if actions.is_empty() {
        return problems;
    }
    let mut failed: BTreeSet<String> = BTreeSet::new();
    for a in actions {
        let name = a.container();
        let u = unit::unit_name(name);
        let r: Result<()> = async {
            match a {
                Action::Remove(_) => {
                    sd.stop(&u).await?;
                    sd.disable(&u).await?;
                    let p = unit_dir.join(&u);
                    host.remove_file(&p)
                        .with_context(|| format!("cannot remove {}", p.display()))
                }
                Action::Create(_) | Action::Replace(_) => {
                    let r = rendered
                        .get(name)
                        .with_context(|| format!("no rendered unit for {name}"))?;
                    let p = unit_dir.join(&u);
                    host.write_atomic(&p, r.text.as_bytes())
                        .with_context(|| format!("cannot write {}", p.display()))
                }
                Action::Start(_) => Ok(()),
            }
        }
        .await;
        if let Err(e) = r {
            problems.push(format!("container {name}: {e:#}"));
            failed.insert(name.to_string());
        }
    }
    if let Err(e) = sd.reload().await {
        problems.push(format!("{e:#}"));
        return problems;
    }
    for a in actions.iter().filter(|a| !failed.contains(a.container())) {
        let u = unit::unit_name(a.container());
        let r = match a {
            Action::Create(_) => match sd.enable(&u).await {
                Ok(()) => sd.start(&u).await,
                Err(e) => Err(e),
            },
            Action::Replace(_) => match sd.enable(&u).await {
                Ok(()) => sd.restart(&u).await,
                Err(e) => Err(e),
            },
            Action::Start(_) => sd.start(&u).await,
            Action::Remove(_) => Ok(()),
        };
        if let Err(e) = r {
            problems.push(format!("container {}: {e:#}", a.container()));
        }
    }
    problems
}

/// One reconcile pass against the real systemd, with `remote` as in
/// [`prepare`].
pub async fn reconcile_once<S: UnitManager>(
    host: Arc<dyn Host + Send + Sync>,
    sd: &S,
    paths: &Paths,
    tags: Tags,
    remote: Vec<Box<dyn Source + Send>>,
) -> Result<Report> {
    let (h, p) = (host.clone(), paths.clone());
    let prepared = tokio::task::spawn_blocking(move || prepare(&*h, &p, tags, &remote))
        .await
        .context("the container preparation task failed")??;
    let mut active = BTreeMap::new();
    for name in prepared.current.keys() {
        let (state, _) = sd.state(&unit::unit_name(name)).await?;
        let up = matches!(state.as_str(), "active" | "activating" | "reloading");
        active.insert(name.clone(), up);
    }
    let actions = prepared.plan(&active);
    for a in &actions {
        tracing::info!("containers: {a:?}");
    }
    let mut problems = prepared.problems;
    problems.extend(execute(&*host, sd, &paths.unit_dir, &actions, &prepared.rendered).await);
    let (h, p, layers, keep) = (host.clone(), paths.clone(), prepared.layers, prepared.keep);
    let gc = tokio::task::spawn_blocking(move || -> Result<()> {
        if let Some(layers) = layers {
            layers.save(&*h, &p.state_file)?;
        }
        let collected = Store::open(&p.store)?.gc(&keep)?;
        if !collected.images.is_empty() {
            tracing::info!("containers: removed unused images {:?}", collected.images);
        }
        Ok(())
    })
    .await
    .context("the container GC task failed")?;
    if let Err(e) = gc {
        problems.push(format!("{e:#}"));
    }
    for p in &problems {
        tracing::error!("containers: {p}");
    }
    let summary = summarize(sd, &prepared.want, &prepared.current).await?;
    Ok(Report {
        actions,
        problems,
        summary,
    })
}

#[cfg(test)]
mod tests;
