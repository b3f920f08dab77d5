//! Everything the agent reads from or does to the machine goes through [`Host`],
//! so the same logic runs against the real host and against a directory tree
//! in tests.

mod dir;
mod real;

pub use dir::DirHost;
pub use real::RealHost;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// What a finished command left behind.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CmdOutput {
    /// The exit code; `None` when a signal ended the command.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// One line that says how the command ended, for error messages.
    pub fn describe(&self) -> String {
        let how = match self.code {
            Some(c) => format!("exit code {c}"),
            None => "killed by a signal".to_string(),
        };
        let err = self.stderr.trim();
        if err.is_empty() {
            how
        } else {
            format!("{how}: {err}")
        }
    }
}

/// Runs `program` on `host` and returns its stdout; unless it exits 0, an
/// error that names the command and says how it ended.
pub fn run_ok(host: &dyn Host, program: &str, args: &[&str]) -> anyhow::Result<String> {
    use anyhow::Context;
    let out = host
        .run(program, args)
        .with_context(|| format!("cannot run {program}"))?;
    if !out.success() {
        anyhow::bail!("{program} {} failed: {}", args.join(" "), out.describe());
    }
    Ok(out.stdout)
}

/// The narrow view of a machine the agent needs. Paths are absolute paths as
/// seen on the host (`/proc/cmdline`); implementations decide where they live.
pub trait Host {
    /// Reads a whole file as bytes (efivars are binary).
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;

    /// Reads a whole file as UTF-8 text.
    fn read_to_string(&self, path: &Path) -> io::Result<String> {
        let bytes = self.read(path)?;
        String::from_utf8(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Whether a path exists (following symlinks); errors other than "not
    /// found" are errors, not `false`.
    fn exists(&self, path: &Path) -> io::Result<bool>;

    /// Resolves every symlink in `path`, like realpath(3).
    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf>;

    /// Names of the entries of a directory, sorted; a missing directory is empty.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;

    /// Opens a file or block device for reading.
    fn open(&self, path: &Path) -> io::Result<File>;

    /// Opens a file or block device for reading and writing in place.
    fn open_rw(&self, path: &Path) -> io::Result<File>;

    /// Writes a file atomically: a temporary file beside it, fsync, rename.
    fn write_atomic(&self, path: &Path, contents: &[u8]) -> io::Result<()>;

    /// Removes a file; a missing file is not an error.
    fn remove_file(&self, path: &Path) -> io::Result<()>;

    /// Runs a program to completion and collects its output.
    fn run(&self, program: &str, args: &[&str]) -> io::Result<CmdOutput>;
}

/// Writes `contents` to `path` through a temporary file in the same directory,
/// so readers see either the old file or the whole new one, and both are on
/// the disk when it returns.
///
/// The file is synced a second time under its final name: on vfat (the ESP)
/// a rename writes a new directory entry whose size and first cluster reach
/// the disk only with the inode's next write-back, so after fsync, rename and
/// an fsync of the directory a power cut left the new name with size 0
/// (docs/update.md, "What is durable when"). The second fsync writes the inode
/// into its new entry; the directory's fsync then makes the old name's
/// removal durable too.
pub(crate) fn write_atomic_at(path: &Path, contents: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = path.parent().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no parent", path.display()),
        )
    })?;
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(contents)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    File::open(path)?.sync_all()?;
    File::open(dir)?.sync_all()
}

pub(crate) fn remove_file_at(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

pub(crate) fn list_dir_at(path: &Path) -> io::Result<Vec<String>> {
    let entries = match std::fs::read_dir(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        other => other?,
    };
    let mut names = Vec::new();
    for e in entries {
        names.push(e?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}
