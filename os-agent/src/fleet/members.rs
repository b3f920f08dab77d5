//! Failover between the members of an etcd cluster.
//!
//! etcd-client sends each request to one of its endpoints picked at random
//! (tonic's power-of-two-choices balancer, every endpoint with load 0) and
//! never takes an endpoint out. A killed member fails the requests sent to
//! it at once (connection refused), so a retry soon lands on another. A hung
//! member (stopped, overloaded, cut off from its peers) is worse: it accepts
//! connections and answers nothing, so every request sent to it waits its
//! whole timeout, a keep-alive or watch stream on it goes silent until the
//! HTTP/2 pings give up (up to 15 s), and a retry has the same chance of
//! landing on it again. A member without a leader (quorum lost) answers
//! only with errors and timeouts too.
//!
//! [`Members`] takes such members out of the client's balancer and puts
//! them back once they answer with a leader again. It asks each member for
//! its status (a request a member answers from memory) only when told that a
//! request failed ([`Members::suspect`]) and, while a member is out, again
//! with backoff: a healthy cluster costs no requests. If no member answers
//! with a leader (quorum lost), every member stays in: requests then fail as
//! they would anyway, and none is stranded on a member that was out.

use super::{lock, AbortOnDrop, Backoff, FleetSettings};
use anyhow::Result;
use etcd_client::{Client, ConnectOptions};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// How long a member has to answer a status request.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The running watch over a client's members; clones share it, and it
/// stops with the last one.
#[derive(Debug, Clone)]
pub struct Members {
    shared: Arc<Shared>,
    _task: Arc<AbortOnDrop>,
}

#[derive(Debug, Default)]
struct Shared {
    wake: Notify,
    /// The endpoints taken out of the client's balancer.
    out: Mutex<BTreeSet<String>>,
}

impl Members {
    /// Watches the members behind `client` (connected with `settings`);
    /// `None` for a single endpoint, which has nowhere to fail over to.
    /// Must be called inside a tokio runtime.
    pub async fn start(client: &Client, settings: &FleetSettings) -> Result<Option<Members>> {
        if settings.endpoints.len() < 2 {
            return Ok(None);
        }
        // A status request needs no credentials: no password per probe.
        let opts = super::connect_options(settings, false)
            .await?
            .with_timeout(PROBE_TIMEOUT)
            .with_connect_timeout(PROBE_TIMEOUT);
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(run(
            client.clone(),
            settings.endpoints.clone(),
            opts,
            shared.clone(),
        ));
        Ok(Some(Members {
            shared,
            _task: Arc::new(AbortOnDrop(task)),
        }))
    }

    /// A request failed or was not answered: check the members now.
    pub fn suspect(&self) {
        self.shared.wake.notify_one();
    }

    /// The endpoints taken out of the balancer now.
    pub fn out(&self) -> BTreeSet<String> {
        lock(&self.shared.out).clone()
    }
}

async fn run(client: Client, endpoints: Vec<String>, opts: ConnectOptions, shared: Arc<Shared>) {
    // While a member is out: 1 s, doubling to 10 s (a member that is back
    // is used again within about 15 s; a dead one costs each host a refused
    // connection per 10 s).
    let mut recheck = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
    loop {
        if lock(&shared.out).is_empty() {
            recheck.reset();
            shared.wake.notified().await;
        } else {
            tokio::select! {
                () = shared.wake.notified() => {}
                () = tokio::time::sleep(recheck.next_wait()) => {}
            }
        }
        let mut probes = tokio::task::JoinSet::new();
        for (i, ep) in endpoints.iter().enumerate() {
            let (ep, opts) = (ep.clone(), opts.clone());
            probes.spawn(async move { (i, healthy(&ep, opts).await) });
        }
        let mut up = vec![false; endpoints.len()];
        while let Some(done) = probes.join_next().await {
            match done {
                Ok((i, ok)) => up[i] = ok,
                Err(e) => tracing::warn!("an etcd member probe failed: {e}"),
            }
        }
        let none_up = !up.contains(&true);
        for (ep, ok) in endpoints.iter().zip(up) {
            let keep_in = ok || none_up;
            let is_out = lock(&shared.out).contains(ep);
            if keep_in && is_out {
                match client.add_endpoint(ep).await {
                    Ok(()) => {
                        lock(&shared.out).remove(ep);
                        tracing::info!("etcd member {ep} is back in use");
                    }
                    Err(e) => tracing::warn!("cannot use etcd member {ep} again: {e}"),
                }
            } else if !keep_in && !is_out {
                match client.remove_endpoint(ep).await {
                    Ok(()) => {
                        lock(&shared.out).insert(ep.clone());
                        tracing::warn!(
                            "etcd member {ep} does not answer with a leader; not using it until it does"
                        );
                    }
                    Err(e) => tracing::warn!("cannot stop using etcd member {ep}: {e}"),
                }
            }
        }
        if none_up {
            tracing::warn!("no etcd member answers with a leader (no quorum?)");
        }
    }
}

/// Whether the member at `endpoint` answers a status request in time and
/// knows a leader.
async fn healthy(endpoint: &str, opts: ConnectOptions) -> bool {
    let status = async {
        let mut c = Client::connect([endpoint], Some(opts)).await?;
        c.status().await
    };
    match tokio::time::timeout(PROBE_TIMEOUT, status).await {
        Ok(Ok(s)) => s.leader() != 0,
        Ok(Err(e)) => {
            tracing::debug!("etcd member {endpoint}: {e}");
            false
        }
        Err(_) => {
            tracing::debug!("etcd member {endpoint}: no status within {PROBE_TIMEOUT:?}");
            false
        }
    }
}
