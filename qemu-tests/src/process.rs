//! Running a child with a deadline, capturing its output.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Runs `cmd` with stdin closed; kills it once `timeout` has passed.
/// `Ok(None)` means it timed out.
pub(crate) fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Option<Output>> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    // Readers in threads so a chatty child never blocks on a full pipe.
    let stdout = reader(child.stdout.take());
    let stderr = reader(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = match wait_until(&mut child, deadline)? {
        Some(status) => status,
        None => {
            kill_and_reap(&mut child)?;
            return Ok(None);
        }
    };
    Ok(Some(Output {
        status,
        stdout: join(stdout)?,
        stderr: join(stderr)?,
    }))
}

/// Waits for `child` to exit until `deadline`; `None` if it is still running.
pub(crate) fn wait_until(child: &mut Child, deadline: Instant) -> Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait().context("waiting for child")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn kill_and_reap(child: &mut Child) -> Result<()> {
    if child.try_wait().context("waiting for child")?.is_none() {
        child.kill().context("killing child")?;
    }
    child.wait().context("reaping child")?;
    Ok(())
}

type Reader = thread::JoinHandle<std::io::Result<Vec<u8>>>;

fn reader(pipe: Option<impl Read + Send + 'static>) -> Option<Reader> {
    pipe.map(|mut pipe| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            pipe.read_to_end(&mut buf)?;
            Ok(buf)
        })
    })
}

fn join(handle: Option<Reader>) -> Result<Vec<u8>> {
    match handle {
        None => Ok(Vec::new()),
        Some(h) => {
            let read = h
                .join()
                .map_err(|_| anyhow::anyhow!("output reader thread panicked"))?;
            read.context("reading child output")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output() {
        let out = run_with_timeout(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(10),
        )
        .unwrap()
        .unwrap();
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.status.code(), Some(3));
    }

    #[test]
    fn times_out() {
        let started = Instant::now();
        let out = run_with_timeout(
            Command::new("sh").args(["-c", "exec sleep 30"]),
            Duration::from_millis(200),
        )
        .unwrap();
        assert!(out.is_none());
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
