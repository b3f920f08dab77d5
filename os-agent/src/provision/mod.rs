//! Provisioning: user data from the first source that has some
//! ([`source`]), parsed ([`cloudconfig`]) and validated ([`validate`]) into a
//! [`plan::Plan`] before anything changes, applied once per instance id
//! ([`apply`]), and recorded on /var ([`record`]).
//!
//! Bad input never blocks boot: it is logged and recorded, `run` returns an
//! [`Outcome`] that says so, and `os-agent provision` exits non-zero so the
//! unit shows in `systemctl --failed`; nothing requires that unit.

pub mod apply;
pub mod ballast;
pub mod cli;
pub mod cloudconfig;
pub mod network;
pub mod plan;
pub mod record;
pub mod source;
pub mod validate;
pub mod yaml;

#[cfg(test)]
mod tests;

use crate::host::Host;
use anyhow::{Context, Result};
use cloudconfig::DocError;
use plan::Plan;
use record::{Attempt, AttemptResult};
use source::{SourceError, UserDataDoc};
use std::time::{Duration, SystemTime};
use validate::Facts;

/// How long to keep trying a `ballast.config_url=` before giving up.
pub const URL_TIMEOUT: Duration = Duration::from_secs(60);

/// What a boot-time run came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    NoUserData,
    SourceError(String),
    Invalid {
        instance_id: String,
        error: String,
    },
    Applied {
        instance_id: String,
    },
    Failed {
        instance_id: String,
        error: String,
    },
    /// Provisioned before; `bootcmd` ran (and failed, if `error` is set).
    AlreadyApplied {
        instance_id: String,
        error: Option<String>,
    },
}

impl Outcome {
    /// Whether the host is as the user data asks (or there was none).
    pub fn success(&self) -> bool {
        matches!(
            self,
            Outcome::NoUserData
                | Outcome::Applied { .. }
                | Outcome::AlreadyApplied { error: None, .. }
        )
    }
}

/// Parses and validates documents against `facts`; `host` answers time
/// zone questions.
pub fn plan(
    user_data: &[u8],
    network_config: Option<&[u8]>,
    facts: &Facts,
    host: &dyn Host,
) -> Result<Plan, DocError> {
    let parsed = cloudconfig::parse(user_data, network_config)?;
    validate::validate(&parsed, facts, host)
}

/// Checks documents away from the host, as `cloud-init schema` does: groups
/// against Debian's base set and this machine's /etc/group, time zones
/// against this machine's /usr/share/zoneinfo.
pub fn validate_offline(
    host: &dyn Host,
    user_data: &[u8],
    network_config: Option<&[u8]>,
) -> Result<Plan> {
    let facts = Facts::offline(host).context("cannot read this machine's /etc/group")?;
    Ok(plan(user_data, network_config, &facts, host)?)
}

/// The boot-time entry point: discover, then [`run_with`].
pub fn run(host: &dyn Host, now: SystemTime) -> Result<Outcome> {
    run_with(host, now, source::discover(host, URL_TIMEOUT))
}

/// Provisions from what discovery found. Errors are only for what stops
/// recording itself (an unwritable /var); everything about the input is an
/// [`Outcome`].
pub fn run_with(
    host: &dyn Host,
    now: SystemTime,
    found: Result<Option<UserDataDoc>, SourceError>,
) -> Result<Outcome> {
    let doc = match found {
        Err(e) => {
            let error = e.to_string();
            tracing::error!("provision: user data source failed: {error}");
            record::save_last(
                host,
                &Attempt::new(
                    now,
                    AttemptResult::SourceError {
                        error: error.clone(),
                    },
                ),
            )?;
            return Ok(Outcome::SourceError(error));
        }
        Ok(None) => {
            tracing::info!("provision: no user data in any source; nothing to do");
            record::save_last(host, &Attempt::new(now, AttemptResult::NoUserData))?;
            return Ok(Outcome::NoUserData);
        }
        Ok(Some(doc)) => doc,
    };
    let source = doc.source.to_string();
    let with = |mut a: Attempt, id: &str| {
        a.source = Some(source.clone());
        a.instance_id = Some(id.to_string());
        a
    };

    let instance_id =
        match record::instance_id(&doc.source, &doc.user_data, doc.meta_data.as_deref()) {
            Ok(id) => id,
            Err(e) => {
                // No id to record it under but the one without meta-data.
                let id = record::instance_id(&doc.source, &doc.user_data, None)?;
                let error = e.to_string();
                tracing::error!("provision: user data from {source}: {error}");
                let a = with(
                    Attempt::new(
                        now,
                        AttemptResult::Invalid {
                            error: error.clone(),
                        },
                    ),
                    &id,
                );
                record::save_last(host, &a)?;
                return Ok(Outcome::Invalid {
                    instance_id: id,
                    error,
                });
            }
        };
    tracing::info!("provision: user data from {source}, instance {instance_id}");

    let facts = Facts::from_host(host).context("cannot read the host's users and groups")?;
    let planned = plan(&doc.user_data, doc.network_config.as_deref(), &facts, host);
    let previous = match record::load_instance(host, &instance_id)? {
        Some(rec) => Some(rec),
        None => provisioned_from_same_url(host, &doc)?,
    };
    let already = previous.as_ref().is_some_and(Attempt::provisioned);
    let mut warnings = doc.warnings.clone();

    let plan = match planned {
        Ok(p) => p,
        Err(e) => {
            let error = e.to_string();
            tracing::error!(
                "provision: user data from {source} is invalid, nothing applied: {error}"
            );
            let mut a = with(
                Attempt::new(
                    now,
                    AttemptResult::Invalid {
                        error: error.clone(),
                    },
                ),
                &instance_id,
            );
            a.warnings = warnings;
            // Keep the record of an instance that was provisioned.
            if !already {
                record::save_instance(host, &a)?;
            }
            record::save_last(host, &a)?;
            return Ok(Outcome::Invalid { instance_id, error });
        }
    };
    for w in &plan.warnings {
        tracing::warn!("provision: {w}");
    }
    warnings.extend(plan.warnings.iter().cloned());

    if already {
        let bootcmd: Vec<_> = plan
            .steps
            .iter()
            .filter(|s| s.every_boot())
            .cloned()
            .collect();
        tracing::info!(
            "provision: instance {instance_id} was provisioned before; running {} bootcmd command(s) only",
            bootcmd.len()
        );
        let (steps, error) = apply::apply(host, &bootcmd);
        let result = match &error {
            None => AttemptResult::AlreadyApplied,
            Some(e) => AttemptResult::Failed { error: e.clone() },
        };
        let mut a = with(Attempt::new(now, result), &instance_id);
        a.warnings = warnings.clone();
        a.steps = steps;
        record::save_last(host, &a)?;
        return Ok(Outcome::AlreadyApplied { instance_id, error });
    }

    // Recorded before applying, so a host that stops halfway does not apply
    // again, and the record says what was pending.
    let mut a = with(Attempt::new(now, AttemptResult::Applying), &instance_id);
    a.warnings = warnings.clone();
    a.steps = apply::pending(&plan.steps);
    record::save_instance(host, &a)?;
    record::set_current(host, &instance_id)?;

    let (steps, error) = apply::apply(host, &plan.steps);
    a.steps = steps;
    a.result = match &error {
        None => AttemptResult::Applied,
        Some(e) => AttemptResult::Failed { error: e.clone() },
    };
    record::save_instance(host, &a)?;
    record::save_last(host, &a)?;
    Ok(match error {
        None => {
            tracing::info!(
                "provision: instance {instance_id} applied ({} steps)",
                a.steps.len()
            );
            Outcome::Applied { instance_id }
        }
        Some(error) => {
            tracing::error!("provision: instance {instance_id} failed: {error}");
            Outcome::Failed { instance_id, error }
        }
    })
}

/// The record of the instance the host was provisioned as, if that came from
/// the same URL as `doc`: earlier versions named a URL's instance by the hash
/// of what it served, and such a host must not be provisioned again only
/// because the id is now the URL.
fn provisioned_from_same_url(host: &dyn Host, doc: &UserDataDoc) -> Result<Option<Attempt>> {
    if !matches!(doc.source, source::SourceKind::KernelCmdlineUrl(_)) {
        return Ok(None);
    }
    let source = doc.source.to_string();
    Ok(record::load_current(host)?.filter(|rec| {
        rec.source.as_deref() == Some(source.as_str())
            && rec
                .instance_id
                .as_deref()
                .is_some_and(|id| id.starts_with("sha256:"))
    }))
}
