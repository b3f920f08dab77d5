//! Build stages: each prints its progress on the terminal, runs its commands
//! with their output going to a log file of its own, and on failure says which
//! stage failed and where the log is.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

pub struct Stages {
    log_dir: PathBuf,
    total: usize,
    done: usize,
}

pub struct Stage<'a> {
    name: &'a str,
    log: PathBuf,
}

impl Stages {
    pub fn new(log_dir: &Path, total: usize) -> Result<Stages> {
        std::fs::create_dir_all(log_dir)
            .with_context(|| format!("cannot create log directory {}", log_dir.display()))?;
        Ok(Stages {
            log_dir: log_dir.to_path_buf(),
            total,
            done: 0,
        })
    }

    /// Runs one stage. Errors come back wrapped with the stage name and log path.
    pub fn run<T>(&mut self, name: &str, f: impl FnOnce(&Stage) -> Result<T>) -> Result<T> {
        self.done += 1;
        let log = self.log_dir.join(format!("{:02}-{name}.log", self.done));
        File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        eprintln!("[{}/{}] {name} ...", self.done, self.total);
        let start = Instant::now();
        let stage = Stage {
            name,
            log: log.clone(),
        };
        match f(&stage) {
            Ok(v) => {
                eprintln!(
                    "[{}/{}] {name} done in {:.1}s",
                    self.done,
                    self.total,
                    start.elapsed().as_secs_f64()
                );
                Ok(v)
            }
            Err(e) => {
                let tail = tail(&log, 20).unwrap_or_default();
                if !tail.is_empty() {
                    eprintln!("--- last lines of {} ---\n{tail}---", log.display());
                }
                Err(e.context(format!("stage {name} failed (log: {})", log.display())))
            }
        }
    }

    pub fn skip(&mut self, name: &str, why: &str) {
        self.done += 1;
        eprintln!("[{}/{}] {name}: {why}", self.done, self.total);
    }
}

impl Stage<'_> {
    /// Runs a command with stdout and stderr appended to the stage log.
    pub fn cmd(&self, cmd: &mut Command) -> Result<()> {
        let desc = describe(cmd);
        let log = File::options().append(true).open(&self.log)?;
        use std::io::Write;
        writeln!(&log, "$ {desc}")?;
        let status = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .with_context(|| format!("{}: cannot run {desc}", self.name))?;
        if !status.success() {
            bail!("{desc} exited with {status}");
        }
        Ok(())
    }

    /// Runs a command and returns its stdout; stderr goes to the log.
    pub fn output(&self, cmd: &mut Command) -> Result<String> {
        let desc = describe(cmd);
        let log = File::options().append(true).open(&self.log)?;
        use std::io::Write;
        writeln!(&log, "$ {desc}")?;
        let out = cmd
            .stdin(Stdio::null())
            .stderr(log)
            .output()
            .with_context(|| format!("{}: cannot run {desc}", self.name))?;
        if !out.status.success() {
            bail!("{desc} exited with {}", out.status);
        }
        String::from_utf8(out.stdout).with_context(|| format!("{desc}: output is not UTF-8"))
    }

    pub fn log(&self, line: &str) -> Result<()> {
        use std::io::Write;
        let mut log = File::options().append(true).open(&self.log)?;
        writeln!(log, "{line}")?;
        Ok(())
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn tail(path: &Path, lines: usize) -> Result<String> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)))?;
    let mut raw = Vec::new();
    f.read_to_end(&mut raw)?;
    let buf = String::from_utf8_lossy(&raw);
    let all: Vec<&str> = buf.lines().collect();
    let start = all.len().saturating_sub(lines);
    Ok(all[start..].iter().map(|l| format!("{l}\n")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_command_names_the_stage_and_keeps_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut stages = Stages::new(dir.path(), 1).unwrap();
        let err = stages
            .run("demo", |s| {
                s.cmd(Command::new("sh").args(["-c", "echo boom >&2; exit 3"]))
            })
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("stage demo failed"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        let log = std::fs::read_to_string(dir.path().join("01-demo.log")).unwrap();
        assert!(log.contains("boom"), "{log}");
    }
}
