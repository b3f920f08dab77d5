//! What the bootstrap installs that nothing on a running host uses, purged
//! from the root: a few named packages, then the libraries only they needed.

use crate::stage::Stage;
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

/// Packages purged by name, in this order:
/// - apt and gpgv, its signature checker: no package manager changes the root;
/// - libcurl4: only `systemd-pull` (machined's image downloads) links it, and
///   the image leaves importd out (`rootfs::DPKG_EXCLUDES`): containers come
///   through the agent's own OCI client;
/// - perl-base, last: Essential in Debian for maintainer scripts (debconf,
///   adduser, update-rc.d) that never run on a host, and what the earlier
///   purges' scripts still use.
///
/// A package the spec lists stays, and perl-base stays when `perl` is
/// installed (what runs perl programs depends on it).
pub const UNUSED_PACKAGES: &[&str] = &["apt", "gpgv", "libcurl4", "perl-base"];

/// Packages only the build uses, purged once the initrd is built: dracut
/// runs in the image's root so that the initrd matches its kernel and
/// systemd, and a host never builds another.
pub const BUILD_PACKAGES: &[&str] = &["dracut", "dracut-core", "cpio"];

/// The installed packages as the purge sees them: what each one depends on.
#[derive(Debug, Default)]
pub struct Installed {
    /// Package → every package named in its Depends and Pre-Depends,
    /// alternatives included (a package that may use X counts as using it).
    depends: BTreeMap<String, BTreeSet<String>>,
    essential: BTreeSet<String>,
}

/// The dpkg-query format `Installed::parse` reads.
pub const QUERY_FORMAT: &str = "${Package}\t${Essential}\t${Depends}\t${Pre-Depends}\n";

impl Installed {
    /// Parses `dpkg-query -W -f=QUERY_FORMAT` output.
    pub fn parse(text: &str) -> Result<Installed> {
        let mut out = Installed::default();
        for (n, line) in text.lines().enumerate() {
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split('\t').collect();
            let [name, essential, depends, pre] = fields[..] else {
                bail!(
                    "dpkg-query line {}: expected 4 tab-separated fields, got {}: {line:?}",
                    n + 1,
                    fields.len()
                );
            };
            if name.is_empty() || name.contains(char::is_whitespace) {
                bail!("dpkg-query line {}: bad package name {name:?}", n + 1);
            }
            let names = [depends, pre]
                .into_iter()
                .flat_map(|f| f.split([',', '|']))
                .filter_map(|d| d.split_whitespace().next())
                .map(|d| d.split(':').next().unwrap_or(d).to_string())
                .collect();
            if essential == "yes" {
                out.essential.insert(name.to_string());
            }
            out.depends.insert(name.to_string(), names);
        }
        Ok(out)
    }

    pub fn has(&self, pkg: &str) -> bool {
        self.depends.contains_key(pkg)
    }

    /// What purging `roots` leaves without a user: installed libraries
    /// (`lib*`, not Essential, not in `keep`) that only packages already
    /// being purged depend on, found until nothing more is. Sorted.
    pub fn orphaned_libraries(&self, roots: &[&str], keep: &[String]) -> Vec<String> {
        let mut gone: BTreeSet<&str> = roots.iter().copied().filter(|r| self.has(r)).collect();
        let mut found = Vec::new();
        loop {
            let next = self.depends.keys().map(String::as_str).find(|lib| {
                lib.starts_with("lib")
                    && !gone.contains(lib)
                    && !self.essential.contains(*lib)
                    && !keep.iter().any(|k| k == lib)
                    && self
                        .depends
                        .iter()
                        .filter(|(user, _)| user.as_str() != *lib)
                        .all(|(user, deps)| !deps.contains(*lib) || gone.contains(user.as_str()))
                    && self
                        .depends
                        .iter()
                        .any(|(user, deps)| deps.contains(*lib) && gone.contains(user.as_str()))
            });
            match next {
                Some(lib) => {
                    gone.insert(lib);
                    found.push(lib.to_string());
                }
                None => break,
            }
        }
        found.sort();
        found
    }
}

/// `purge` after customizing, which moved the root's /var (and dpkg's
/// database in it) to `var_seed`: puts it back for the purge, then aside
/// again.
pub fn purge_with_var(
    stage: &Stage,
    root: &Path,
    var_seed: &Path,
    packages: &[&str],
    listed: &[String],
) -> Result<Vec<String>> {
    let var = root.join("var");
    std::fs::remove_dir(&var)
        .with_context(|| format!("{} should be an empty directory", var.display()))?;
    std::fs::rename(var_seed, &var).with_context(|| {
        format!(
            "cannot move {} back to {}",
            var_seed.display(),
            var.display()
        )
    })?;
    let purged = purge(stage, root, packages, listed);
    std::fs::rename(&var, var_seed)
        .with_context(|| format!("cannot move {} aside again", var.display()))?;
    std::fs::create_dir(&var)?;
    purged
}

/// Purges `packages` (`UNUSED_PACKAGES` or `BUILD_PACKAGES`) and the
/// libraries only they used from `root`, keeping what the spec lists
/// (`listed`). Returns what was purged.
pub fn purge(
    stage: &Stage,
    root: &Path,
    packages: &[&str],
    listed: &[String],
) -> Result<Vec<String>> {
    let text = stage.output(Command::new("chroot").arg(root).args([
        "dpkg-query",
        "-W",
        &format!("-f={QUERY_FORMAT}"),
    ]))?;
    let installed = Installed::parse(&text)?;
    if installed.depends.is_empty() {
        bail!(
            "dpkg-query in {} lists no installed package",
            root.display()
        );
    }
    let mut roots: Vec<&str> = Vec::new();
    for p in packages.iter().copied().filter(|p| installed.has(p)) {
        if listed.iter().any(|l| l == p) || (p == "perl-base" && installed.has("perl")) {
            stage.log(&format!("{p} stays: the spec needs it"))?;
        } else {
            roots.push(p);
        }
    }
    let libraries = installed.orphaned_libraries(&roots, listed);
    // One package at a time, perl-base last: apt's postrm runs
    // deb-systemd-helper, a perl script.
    let (perl, named): (Vec<&str>, Vec<&str>) = roots.iter().partition(|p| **p == "perl-base");
    let mut batches: Vec<Vec<&str>> = named.iter().map(|p| vec![*p]).collect();
    if !libraries.is_empty() {
        batches.push(libraries.iter().map(String::as_str).collect());
    }
    if !perl.is_empty() {
        batches.push(perl);
    }
    for batch in &batches {
        stage.cmd(
            Command::new("chroot")
                .arg(root)
                .args([
                    "dpkg",
                    "--purge",
                    "--force-remove-essential",
                    "--force-depends",
                ])
                .args(batch),
        )?;
    }
    Ok(batches.concat().iter().map(|p| p.to_string()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "\
apt\t\tlibapt-pkg6.0 (>= 2.6.1), gpgv | gpgv2, libstdc++6 (>= 11)\t
libapt-pkg6.0\t\tlibzstd1 (>= 1.5.2), libxxhash0 (>= 0.8.0)\t
libxxhash0\t\tlibc6 (>= 2.14)\t
libstdc++6\t\tlibgcc-s1 (>= 4.2)\t
libgcc-s1\t\tlibc6 (>= 2.35)\t
libzstd1\t\tlibc6 (>= 2.14)\t
systemd\t\tlibzstd1 (>= 1.5.2), libp11-kit0\tlibc6
systemd-container\t\tsystemd, libcurl4 (>= 7.16.2)\t
libcurl4\t\tlibgnutls30:amd64 (>= 3.7), libnghttp2-14\t
libgnutls30\t\tlibp11-kit0 (>= 0.23.18.1), libnettle8\t
libnettle8\t\tlibc6\t
libnghttp2-14\t\tlibc6\t
libp11-kit0\t\tlibc6\t
libc6\tyes\tlibgcc-s1\t
gpgv\t\tlibc6\t
";

    #[test]
    fn a_purged_package_takes_the_libraries_only_it_used() {
        let i = Installed::parse(STATUS).unwrap();
        assert_eq!(
            i.orphaned_libraries(&["apt", "gpgv", "libcurl4"], &[]),
            [
                "libapt-pkg6.0",
                "libgnutls30",
                "libnettle8",
                "libnghttp2-14",
                "libstdc++6",
                "libxxhash0"
            ]
        );
    }

    #[test]
    fn a_library_another_package_uses_stays() {
        let i = Installed::parse(STATUS).unwrap();
        // systemd uses libzstd1 and libp11-kit0; libgcc-s1 is libc6's.
        let gone = i.orphaned_libraries(&["apt", "libcurl4"], &[]);
        for kept in ["libzstd1", "libp11-kit0", "libgcc-s1", "libc6"] {
            assert!(!gone.contains(&kept.to_string()), "{kept} purged: {gone:?}");
        }
    }

    #[test]
    fn a_library_the_spec_lists_stays_and_so_do_its_dependencies() {
        let i = Installed::parse(STATUS).unwrap();
        let gone = i.orphaned_libraries(&["libcurl4"], &["libgnutls30".to_string()]);
        assert_eq!(gone, ["libnghttp2-14"]);
    }

    #[test]
    fn nothing_is_purged_for_a_root_that_is_not_installed() {
        let i = Installed::parse(STATUS).unwrap();
        assert!(i.orphaned_libraries(&["perl-base"], &[]).is_empty());
    }

    #[test]
    fn malformed_dpkg_query_lines_are_errors_that_say_where() {
        let e = Installed::parse("apt\t\tlibc6\t\nbroken line\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        let e = Installed::parse("two words\t\t\t\n").unwrap_err();
        assert!(e.to_string().contains("bad package name"), "{e}");
    }
}
