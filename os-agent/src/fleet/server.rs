//! A throwaway etcd (Debian's /usr/bin/etcd) on 127.0.0.1 for the fleet
//! tests and the fleet bench: ports picked at run time, its own data
//! directory, killed when dropped. It can be stopped and started again on
//! the same ports and data, to test what hosts do while etcd is away.

use anyhow::{bail, Context, Result};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
}

/// A port that was free a moment ago (the listener is closed again).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("cannot bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl LocalEtcd {
    /// Starts etcd with its data and log under `dir`, and waits until it
    /// accepts connections.
    pub fn start(dir: &Path, tls: Option<ServerTls>) -> Result<LocalEtcd> {
        let mut e = LocalEtcd {
            client_port: free_port()?,
            peer_port: free_port()?,
            dir: dir.to_path_buf(),
            tls,
            child: None,
        };
        e.spawn()?;
        Ok(e)
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
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .with_context(|| format!("cannot open {}", self.log_path().display()))?;
        let mut cmd = Command::new("etcd");
        cmd.arg("--name=test")
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
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
        self.wait_ready()
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

    /// Kills etcd (the data stays).
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().context("cannot kill etcd")?;
            c.wait().context("cannot reap etcd")?;
        }
        Ok(())
    }

    /// Starts etcd again on the same ports and data.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        // Count readiness from the new process's own log lines.
        let old = self.log_path().with_extension("log.old");
        std::fs::rename(self.log_path(), &old)
            .with_context(|| format!("cannot move {}", self.log_path().display()))?;
        self.spawn()
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("cannot stop the test etcd: {e:#}");
        }
    }
}
