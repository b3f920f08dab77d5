//! The update state machine: named states, and the events that move between
//! them. `next` refuses any move not in the table, so a bug that would, say,
//! reboot into a slot that never verified is an error instead.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum State {
    /// Nothing under way.
    #[default]
    Idle,
    /// Fetching and weighing the channel's manifest.
    Checking,
    /// Streaming the root payload into the inactive slot.
    Downloading { bytes: u64, total: u64 },
    /// Comparing hashes, writing the verity tree, the partition table and the UKI.
    Verifying,
    /// The new slot verified and its UKI is on the ESP: the next boot takes it.
    Staged,
    /// A reboot into the staged update was requested.
    Rebooting,
    /// Booted the staged update; waiting for boot assessment to bless it.
    Assessing,
    /// The last attempt failed; the running slot is untouched.
    Failed { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Start a check (timer, or `osctl update check/apply`).
    Check,
    /// The channel has nothing for this host now.
    NothingToDo,
    /// The channel offers the update that is already staged.
    AlreadyStaged,
    /// A release to apply, with its compressed size.
    Found {
        total: u64,
    },
    Progress {
        bytes: u64,
        total: u64,
    },
    /// The whole payload was written.
    Downloaded,
    /// Every hash matched and the UKI is installed.
    Verified,
    /// The reboot strategy allows a reboot now.
    Reboot,
    /// The staged version booted and waits for its assessment.
    BootedNew,
    /// A reboot did not start the staged version (its entry was put back
    /// after a power cut, or the boot loader chose another): it waits for
    /// a reboot again.
    Restaged,
    /// The staged version was blessed, or the host fell back from it, or
    /// an operation was abandoned: back to rest.
    Settled,
    /// Something went wrong.
    Fail(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal update state transition: {event:?} in state {from:?}")]
pub struct IllegalTransition {
    pub from: State,
    pub event: Event,
}

impl State {
    /// The state after `event`, or an error if `event` cannot happen here.
    pub fn next(self, event: Event) -> Result<State, IllegalTransition> {
        use Event as E;
        use State as S;
        let next = match (&self, &event) {
            // A new check may start from rest, after a failure, or while a
            // staged update waits for its reboot (a newer release replaces it).
            (S::Idle | S::Failed { .. } | S::Staged, E::Check) => S::Checking,
            (S::Checking, E::NothingToDo) => S::Idle,
            (S::Checking, E::AlreadyStaged) => S::Staged,
            (S::Checking, E::Found { total }) => S::Downloading {
                bytes: 0,
                total: *total,
            },
            (S::Downloading { .. }, E::Progress { bytes, total }) => S::Downloading {
                bytes: *bytes,
                total: *total,
            },
            (S::Downloading { .. }, E::Downloaded) => S::Verifying,
            (S::Verifying, E::Verified) => S::Staged,
            (S::Staged, E::Reboot) => S::Rebooting,
            (S::Staged | S::Rebooting, E::BootedNew) => S::Assessing,
            // Also after a failure: a reboot request that failed, or a new
            // check cut short, leaves the earlier update staged.
            (S::Staged | S::Rebooting | S::Failed { .. }, E::Restaged) => S::Staged,
            (S::Staged | S::Rebooting | S::Assessing | S::Failed { .. }, E::Settled) => S::Idle,
            // A failed reboot request leaves the update staged.
            (S::Rebooting, E::Fail(reason)) => S::Failed {
                reason: reason.clone(),
            },
            (S::Checking | S::Downloading { .. } | S::Verifying, E::Fail(reason)) => S::Failed {
                reason: reason.clone(),
            },
            _ => return Err(IllegalTransition { from: self, event }),
        };
        Ok(next)
    }

    /// The state's name as status shows it.
    pub fn name(&self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Checking => "checking",
            State::Downloading { .. } => "downloading",
            State::Verifying => "verifying",
            State::Staged => "staged",
            State::Rebooting => "rebooting",
            State::Assessing => "assessing",
            State::Failed { .. } => "failed",
        }
    }

    /// Whether this state means an operation was under way: seen at start-up,
    /// the process doing it died (crash, power cut) and it starts over.
    pub fn in_flight(&self) -> bool {
        matches!(
            self,
            State::Checking | State::Downloading { .. } | State::Verifying
        )
    }

    /// One line for status output.
    pub fn describe(&self) -> String {
        match self {
            State::Downloading { bytes, total } if *total > 0 => format!(
                "downloading {:.1} of {:.1} MiB ({}%)",
                *bytes as f64 / 1048576.0,
                *total as f64 / 1048576.0,
                u128::from(*bytes) * 100 / u128::from(*total)
            ),
            State::Failed { reason } => format!("failed: {reason}"),
            other => other.name().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed() -> State {
        State::Failed { reason: "x".into() }
    }

    fn dl(bytes: u64) -> State {
        State::Downloading { bytes, total: 10 }
    }

    /// Every (state, event) pair: the state it leads to, or None if illegal.
    #[test]
    fn transition_table() {
        let states = [
            State::Idle,
            State::Checking,
            dl(0),
            State::Verifying,
            State::Staged,
            State::Rebooting,
            State::Assessing,
            failed(),
        ];
        let events = vec![
            Event::Check,
            Event::NothingToDo,
            Event::AlreadyStaged,
            Event::Found { total: 10 },
            Event::Progress {
                bytes: 5,
                total: 10,
            },
            Event::Downloaded,
            Event::Verified,
            Event::Reboot,
            Event::BootedNew,
            Event::Restaged,
            Event::Settled,
            Event::Fail("x".into()),
        ];
        // Rows: states in the order above; columns: events in the order above.
        let c = Some(State::Checking);
        let i = Some(State::Idle);
        let f = Some(failed());
        let n: Option<State> = None;
        #[rustfmt::skip]
        let table: Vec<Vec<Option<State>>> = vec![
            // Check, NothingToDo, AlreadyStaged, Found, Progress, Downloaded, Verified, Reboot, BootedNew, Restaged, Settled, Fail
            vec![c.clone(), n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), n.clone()], // Idle
            vec![n.clone(), i.clone(), Some(State::Staged), Some(dl(0)), n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), f.clone()], // Checking
            vec![n.clone(), n.clone(), n.clone(), n.clone(), Some(dl(5)), Some(State::Verifying), n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), f.clone()], // Downloading
            vec![n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), Some(State::Staged), n.clone(), n.clone(), n.clone(), n.clone(), f.clone()], // Verifying
            vec![c.clone(), n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), Some(State::Rebooting), Some(State::Assessing), Some(State::Staged), i.clone(), n.clone()], // Staged
            vec![n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), Some(State::Assessing), Some(State::Staged), i.clone(), f.clone()], // Rebooting
            vec![n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), i.clone(), n.clone()], // Assessing
            vec![c.clone(), n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), n.clone(), Some(State::Staged), i.clone(), n.clone()], // Failed
        ];
        for (s, row) in states.iter().zip(&table) {
            for (e, want) in events.iter().zip(row) {
                let got = s.clone().next(e.clone()).ok();
                assert_eq!(&got, want, "{s:?} + {e:?}");
            }
        }
    }

    #[test]
    fn serialises_with_its_name() {
        let v = serde_json::to_value(State::Downloading { bytes: 1, total: 2 }).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"name": "downloading", "bytes": 1, "total": 2})
        );
        let v = serde_json::to_value(failed()).unwrap();
        assert_eq!(v, serde_json::json!({"name": "failed", "reason": "x"}));
        assert_eq!(
            serde_json::from_value::<State>(serde_json::json!({"name": "idle"})).unwrap(),
            State::Idle
        );
        assert_eq!(dl(5).describe(), "downloading 0.0 of 0.0 MiB (50%)");
        assert!(State::Verifying.in_flight() && !State::Staged.in_flight());
        let e = State::Idle.next(Event::Reboot).unwrap_err().to_string();
        assert!(
            e.contains("illegal update state transition: Reboot in state Idle"),
            "{e}"
        );
    }
}
