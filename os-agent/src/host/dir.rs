//! A host whose filesystem is a directory tree and whose commands are
//! recorded instead of run: for tests and simulations.

use super::{CmdOutput, Host};
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

/// A host rooted at a directory. Commands are recorded; each returns the
/// output registered for its program (exit 0 and no output if none was).
#[derive(Debug)]
pub struct DirHost {
    root: PathBuf,
    commands: Mutex<Vec<Vec<String>>>,
    outputs: Mutex<BTreeMap<String, CmdOutput>>,
}

impl DirHost {
    pub fn new(root: impl Into<PathBuf>) -> io::Result<DirHost> {
        Ok(DirHost {
            root: std::fs::canonicalize(root.into())?,
            commands: Mutex::new(Vec::new()),
            outputs: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a host path lives in the tree.
    pub fn path(&self, host_path: &Path) -> PathBuf {
        let mut p = self.root.clone();
        for c in host_path.components() {
            if let Component::Normal(n) = c {
                p.push(n);
            }
        }
        p
    }

    /// Makes every later run of `program` (matched with or without its
    /// arguments: "sh -c false" before "sh") return `out`.
    pub fn set_output(&self, command: &str, out: CmdOutput) {
        lock(&self.outputs).insert(command.to_string(), out);
    }

    /// The commands run so far, program first.
    pub fn commands(&self) -> Vec<Vec<String>> {
        lock(&self.commands).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A test that panicked while holding the lock has already failed.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Host for DirHost {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(self.path(path))
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        self.path(path).try_exists()
    }

    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        let real = std::fs::canonicalize(self.path(path))?;
        let inside = real.strip_prefix(&self.root).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} resolves outside the host root", path.display()),
            )
        })?;
        Ok(Path::new("/").join(inside))
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        super::list_dir_at(&self.path(path))
    }

    fn open(&self, path: &Path) -> io::Result<File> {
        File::open(self.path(path))
    }

    fn open_rw(&self, path: &Path) -> io::Result<File> {
        File::options().read(true).write(true).open(self.path(path))
    }

    fn write_atomic(&self, path: &Path, contents: &[u8]) -> io::Result<()> {
        super::write_atomic_at(&self.path(path), contents)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        super::remove_file_at(&self.path(path))
    }

    fn run(&self, program: &str, args: &[&str]) -> io::Result<CmdOutput> {
        let mut argv = vec![program.to_string()];
        argv.extend(args.iter().map(|a| a.to_string()));
        let full = argv.join(" ");
        lock(&self.commands).push(argv);
        let outputs = lock(&self.outputs);
        Ok(outputs
            .get(&full)
            .or_else(|| outputs.get(program))
            .cloned()
            .unwrap_or_else(|| CmdOutput {
                code: Some(0),
                ..CmdOutput::default()
            }))
    }
}
