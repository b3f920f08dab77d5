//! A throwaway etcd (Debian's /usr/bin/etcd) on 127.0.0.1 for the fleet
//! tests and the fleet bench: ports picked at run time, its own data
//! directory, killed when dropped. It can be stopped and started again on
//! the same ports and data, to test what hosts do while etcd is away.
//!
//! [`LocalCluster`] is three of them as one etcd cluster (each a
//! [`LocalEtcd`] member), with the faults a real cluster meets: a member
//! killed, paused (SIGSTOP: its sockets stay open but nothing answers) and
//! continued, restarted on its data, and quorum lost and regained.

use anyhow::{bail, Context, Result};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

/// TLS material for an etcd that requires client certificates.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct LocalEtcd {
    pub client_port: u16,
    pub peer_port: u16,
    dir: PathBuf,
    tls: Option<ServerTls>,
    child: Option<Child>,
    /// The member's name and `--initial-cluster` (name=peer URL, ...).
    name: String,
    initial_cluster: String,
    /// Stopped with SIGSTOP and not yet continued.
    paused: bool,
}

/// A port that was free a moment ago (the listener is closed again).
pub fn free_port() -> Result<u16> {
    Ok(free_ports(1)?[0])
}

/// `n` distinct ports that were free a moment ago: all are bound at once,
/// so none is handed out twice.
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").context("cannot bind 127.0.0.1:0"))
        .collect::<Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

impl LocalEtcd {
    /// Starts etcd with its data and log under `dir`, and waits until it
    /// accepts connections.
    pub fn start(dir: &Path, tls: Option<ServerTls>) -> Result<LocalEtcd> {
        let ports = free_ports(2)?;
        let peer = format!("http://127.0.0.1:{}", ports[1]);
        let mut e = LocalEtcd::member(dir, "test", ports[0], ports[1], format!("test={peer}"));
        e.tls = tls;
        e.spawn()?;
        Ok(e)
    }

    /// A member named `name` of the cluster `initial_cluster`, not started.
    fn member(
        dir: &Path,
        name: &str,
        client_port: u16,
        peer_port: u16,
        initial_cluster: String,
    ) -> LocalEtcd {
        LocalEtcd {
            client_port,
            peer_port,
            dir: dir.to_path_buf(),
            tls: None,
            child: None,
            name: name.to_string(),
            initial_cluster,
            paused: false,
        }
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Runs Debian's `etcdctl` (v3 API) against this etcd (without TLS);
    /// its stdout.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("cannot run etcdctl (is etcd-client installed? `make deps`)")?;
        if !out.status.success() {
            bail!(
                "etcdctl {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// etcd's Prometheus metrics (served on the client port; plain HTTP
    /// only without TLS).
    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.client_port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    /// The end of etcd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        match std::fs::read_to_string(self.log_path()) {
            Ok(t) => {
                let lines: Vec<&str> = t.lines().collect();
                lines[lines.len().saturating_sub(20)..].join("\n")
            }
            Err(e) => format!("(cannot read {}: {e})", self.log_path().display()),
        }
    }

    fn spawn(&mut self) -> Result<()> {
        self.launch()?;
        self.wait_ready()
    }

    /// Starts the process without waiting: the members of a new cluster
    /// (or of one without quorum) serve only once enough of them run.
    fn launch(&mut self) -> Result<()> {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .with_context(|| format!("cannot open {}", self.log_path().display()))?;
        let mut cmd = Command::new("etcd");
        // Ignored by a member that has its data already (a restart).
        cmd.arg(format!("--name={}", self.name))
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={}", self.initial_cluster))
            .arg("--initial-cluster-state=new")
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cert-file={}", t.cert.display()))
                .arg(format!("--key-file={}", t.key.display()))
                .arg(format!("--trusted-ca-file={}", t.ca.display()))
                .arg("--client-cert-auth");
        }
        let child = cmd
            .spawn()
            .context("cannot start etcd (is the etcd-server package installed?)")?;
        self.child = Some(child);
        self.paused = false;
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = format!("127.0.0.1:{}", self.client_port);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("etcd exited with {status}:\n{}", self.log_tail());
                }
            }
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            if std::net::TcpStream::connect(&addr).is_ok()
                && log.contains("ready to serve client requests")
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("etcd did not come up within 20 s:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills etcd with SIGKILL (the data stays).
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().context("cannot kill etcd")?;
            c.wait().context("cannot reap etcd")?;
        }
        self.paused = false;
        Ok(())
    }

    /// Starts etcd again on the same ports and data.
    pub fn restart(&mut self) -> Result<()> {
        self.relaunch()?;
        self.wait_ready()
    }

    /// Kills etcd if it runs and starts it again, without waiting.
    fn relaunch(&mut self) -> Result<()> {
        self.stop()?;
        // Count readiness from the new process's own log lines.
        let old = self.log_path().with_extension("log.old");
        std::fs::rename(self.log_path(), &old)
            .with_context(|| format!("cannot move {}", self.log_path().display()))?;
        self.launch()
    }

    /// Whether the process runs (paused or not).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    fn signal(&mut self, sig: Signal) -> Result<()> {
        let child = self.child.as_ref().context("etcd is not running")?;
        kill_process(Pid::from_child(child), sig)
            .with_context(|| format!("cannot send {sig:?} to etcd {}", self.name))?;
        Ok(())
    }

    /// Stops the process with SIGSTOP: its sockets stay open and accept
    /// connections, but nothing is answered (a hung member, not a dead one).
    pub fn pause(&mut self) -> Result<()> {
        self.signal(Signal::STOP)?;
        self.paused = true;
        Ok(())
    }

    /// Continues a paused process (SIGCONT).
    pub fn resume(&mut self) -> Result<()> {
        self.signal(Signal::CONT)?;
        self.paused = false;
        Ok(())
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("cannot stop the test etcd: {e:#}");
        }
    }
}

/// Three etcd members on 127.0.0.1 forming one cluster, each with its data
/// and log under its own directory (`<dir>/m<i>`); every member is killed
/// when this is dropped. Members are numbered 0, 1, 2.
pub struct LocalCluster {
    pub members: Vec<LocalEtcd>,
}

/// How long a member is given to answer a status request.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);

impl LocalCluster {
    /// Starts a new three-member cluster and waits until every member serves.
    pub fn start(dir: &Path) -> Result<LocalCluster> {
        const SIZE: usize = 3;
        let ports = free_ports(2 * SIZE)?;
        let name = |i: usize| format!("m{i}");
        let initial = (0..SIZE)
            .map(|i| format!("{}=http://127.0.0.1:{}", name(i), ports[SIZE + i]))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for i in 0..SIZE {
            let d = dir.join(name(i));
            std::fs::create_dir_all(&d)
                .with_context(|| format!("cannot create {}", d.display()))?;
            members.push(LocalEtcd::member(
                &d,
                &name(i),
                ports[i],
                ports[SIZE + i],
                initial.clone(),
            ));
        }
        let mut cluster = LocalCluster { members };
        for m in &mut cluster.members {
            m.launch()?;
        }
        for m in &mut cluster.members {
            m.wait_ready()?;
        }
        Ok(cluster)
    }

    /// Every member's client URL, for a client that fails over between them.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(LocalEtcd::endpoint).collect()
    }

    /// The member that is the leader now, as the running, unpaused members
    /// say (etcd's maintenance status: the member whose id is the leader's
    /// id); `None` if none of them is (an election, or no quorum).
    pub async fn leader(&self) -> Result<Option<usize>> {
        for (i, m) in self.members.iter().enumerate() {
            if !m.is_running() || m.is_paused() {
                continue;
            }
            let status = async {
                let opts = etcd_client::ConnectOptions::new().with_timeout(STATUS_TIMEOUT);
                let mut c = etcd_client::Client::connect([m.endpoint()], Some(opts)).await?;
                c.status().await
            };
            let Ok(Ok(s)) = tokio::time::timeout(STATUS_TIMEOUT, status).await else {
                continue;
            };
            let id = s.header().map(|h| h.member_id());
            if s.leader() != 0 && id == Some(s.leader()) {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    /// Waits until a member is the leader.
    pub async fn wait_leader(&self, within: Duration) -> Result<usize> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(i) = self.leader().await? {
                return Ok(i);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "no etcd member became the leader within {within:?}:\n{}",
                    self.log_tails()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills member `i` with SIGKILL (its data stays).
    pub fn kill(&mut self, i: usize) -> Result<()> {
        self.members[i].stop()
    }

    /// Stops member `i` with SIGSTOP.
    pub fn pause(&mut self, i: usize) -> Result<()> {
        self.members[i].pause()
    }

    /// Continues member `i` (SIGCONT).
    pub fn resume(&mut self, i: usize) -> Result<()> {
        self.members[i].resume()
    }

    /// Starts members `which` again on their ports and data (killing those
    /// that still run), all at once, and waits until each serves: members
    /// that bring back a lost quorum serve only once enough of them run.
    pub fn restart(&mut self, which: &[usize]) -> Result<()> {
        for &i in which {
            self.members[i].relaunch()?;
        }
        for &i in which {
            self.members[i].wait_ready()?;
        }
        Ok(())
    }

    /// The end of every member's log, for failure messages.
    pub fn log_tails(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("--- {}:\n{}", m.name, m.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
