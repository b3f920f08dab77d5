//! The `[update]` section: where updates come from, how often to look, and
//! when the host may reboot into one.

use crate::update::window::{self, Window};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::time::Duration;

pub const DEFAULT_CHANNEL: &str = "stable";
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(3600);
pub const MIN_INTERVAL_SECS: u64 = 60;
/// Longest wait between checks, and most jitter (30 days): the daemon adds
/// them to the clock, where u64::MAX seconds (user data may say so) overflow.
pub const MAX_WAIT_SECS: u64 = 30 * 86_400;
pub const DEFAULT_JITTER: Duration = Duration::from_secs(300);

/// When a staged update may reboot the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Strategy {
    /// Reboot as soon as the update is staged.
    Immediate,
    /// Reboot only inside a maintenance window.
    Window(Window),
    /// Reboot once the fleet's reboot lock is held (docs/etcd.md), and
    /// inside the maintenance window if one is set.
    FleetLock(Option<Window>),
}

impl Strategy {
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Immediate => "immediate",
            Strategy::Window(_) => "window",
            Strategy::FleetLock(_) => "fleet-lock",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateSettings {
    /// Base URL of the channel directory; `None` turns updates off.
    pub channel_url: Option<String>,
    pub channel: String,
    pub interval: Duration,
    /// Up to this much is added to each wait, so a fleet does not poll in step.
    pub jitter: Duration,
    pub strategy: Strategy,
    /// The `[http]` section (proxy), for the channel's client: a copy of
    /// [`super::Settings::http`], so the update code needs no other part of
    /// the settings.
    pub http: super::http::HttpSettings,
}

impl Default for UpdateSettings {
    fn default() -> Self {
        UpdateSettings {
            channel_url: None,
            channel: DEFAULT_CHANNEL.into(),
            interval: DEFAULT_INTERVAL,
            jitter: DEFAULT_JITTER,
            strategy: Strategy::Immediate,
            http: super::http::HttpSettings::default(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct PartialUpdate {
    channel_url: Option<String>,
    channel: Option<String>,
    interval_secs: Option<u64>,
    jitter_secs: Option<u64>,
    strategy: Option<String>,
    #[serde(default)]
    window: PartialWindow,
}

#[derive(Debug, Default, Deserialize)]
struct PartialWindow {
    days: Option<Vec<String>>,
    start: Option<String>,
    length_minutes: Option<u32>,
    timezone: Option<String>,
}

pub(super) const KNOWN_KEYS: &[&str] = &[
    "update",
    "update.channel_url",
    "update.channel",
    "update.interval_secs",
    "update.jitter_secs",
    "update.strategy",
    "update.window",
    "update.window.days",
    "update.window.start",
    "update.window.length_minutes",
    "update.window.timezone",
];

fn set<T>(into: &mut Option<T>, from: Option<T>) {
    if from.is_some() {
        *into = from;
    }
}

pub(super) fn merge(into: &mut PartialUpdate, from: PartialUpdate) {
    set(&mut into.channel_url, from.channel_url);
    set(&mut into.channel, from.channel);
    set(&mut into.interval_secs, from.interval_secs);
    set(&mut into.jitter_secs, from.jitter_secs);
    set(&mut into.strategy, from.strategy);
    set(&mut into.window.days, from.window.days);
    set(&mut into.window.start, from.window.start);
    set(&mut into.window.length_minutes, from.window.length_minutes);
    set(&mut into.window.timezone, from.window.timezone);
}

fn validate_window(w: PartialWindow) -> Result<Window> {
    // Without days the window opens every day.
    let days = w
        .days
        .unwrap_or_else(|| window::DAY_NAMES.iter().map(|d| d.to_string()).collect());
    if days.is_empty() {
        bail!("update.window.days is empty: the window would never open");
    }
    let days = days
        .iter()
        .map(|d| window::parse_day(d))
        .collect::<Result<Vec<u8>>>()
        .context("update.window.days")?;
    let start = w
        .start
        .context("update.window.start is required with strategy = \"window\"")?;
    let start_minute = window::parse_hhmm(&start).context("update.window.start")?;
    let length_minutes = w
        .length_minutes
        .context("update.window.length_minutes is required with strategy = \"window\"")?;
    if length_minutes == 0 || length_minutes > 7 * 24 * 60 {
        bail!("update.window.length_minutes: {length_minutes} is not between 1 and 10080");
    }
    let zone = window::parse_timezone(w.timezone.as_deref().unwrap_or("UTC"))
        .context("update.window.timezone")?;
    Ok(Window {
        days,
        start_minute,
        length_minutes,
        zone,
    })
}

pub(super) fn validate(p: PartialUpdate) -> Result<UpdateSettings> {
    let mut s = UpdateSettings::default();
    if let Some(url) = p.channel_url {
        let url = url.trim_end_matches('/').to_string();
        if url.is_empty() {
            // An empty URL is the way a drop-in turns updates off again.
        } else if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("update.channel_url: {url:?} is not an http:// or https:// URL");
        } else {
            s.channel_url = Some(url);
        }
    }
    if let Some(c) = p.channel {
        if c.is_empty()
            || c.starts_with('.')
            || !c
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
        {
            bail!("update.channel: {c:?} is not a channel name (letters, digits, '-', '_', '.')");
        }
        s.channel = c;
    }
    if let Some(secs) = p.interval_secs {
        if secs < MIN_INTERVAL_SECS {
            bail!("update.interval_secs: {secs} is less than {MIN_INTERVAL_SECS}");
        }
        if secs > MAX_WAIT_SECS {
            bail!("update.interval_secs: {secs} is more than {MAX_WAIT_SECS} (30 days)");
        }
        s.interval = Duration::from_secs(secs);
    }
    if let Some(secs) = p.jitter_secs {
        if secs > MAX_WAIT_SECS {
            bail!("update.jitter_secs: {secs} is more than {MAX_WAIT_SECS} (30 days)");
        }
        s.jitter = Duration::from_secs(secs);
    }
    let w = &p.window;
    let window_set =
        w.days.is_some() || w.start.is_some() || w.length_minutes.is_some() || w.timezone.is_some();
    let strategy = p.strategy.as_deref().unwrap_or("immediate");
    // A window is checked whenever one is written, also where the strategy
    // ignores it, so a mistake shows before the strategy changes.
    let window = if window_set || strategy == "window" {
        Some(validate_window(p.window)?)
    } else {
        None
    };
    s.strategy = match (strategy, window) {
        ("immediate", _) => Strategy::Immediate,
        ("window", Some(w)) => Strategy::Window(w),
        ("fleet-lock", w) => Strategy::FleetLock(w),
        (other, _) => bail!(
            "update.strategy: {other:?} is not one of \"immediate\", \"window\", \"fleet-lock\""
        ),
    };
    if window_set && matches!(s.strategy, Strategy::Immediate) {
        tracing::warn!(
            "update.window is set but update.strategy is {:?}: the window is ignored",
            s.strategy.name()
        );
    }
    Ok(s)
}
