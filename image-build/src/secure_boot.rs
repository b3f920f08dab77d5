//! Secure Boot: the key set `image-build keygen --secure-boot` makes, and
//! signing EFI binaries with its db key (sbsigntool), as docs/image.md
//! describes.
//!
//! A key directory holds three RSA keys and their certificates (PK, KEK and
//! db), and the three signed EFI variable updates systemd-boot enrolls from
//! the ESP's `loader/keys/auto/` on a machine in setup mode: `db.auth` signed
//! by KEK, `KEK.auth` and `PK.auth` signed by PK. Only the `.auth` files go
//! into an image; the keys stay with whoever builds and releases.

use crate::stage::Stage;
use crate::tools;
use anyhow::{bail, Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The files of a key directory, in the order they are made.
pub const KEY_FILES: &[&str] = &[
    "PK.key", "PK.crt", "KEK.key", "KEK.crt", "db.key", "db.crt", "PK.auth", "KEK.auth", "db.auth",
];

/// The variable updates systemd-boot enrolls, in the ESP's `loader/keys/auto/`.
pub const ENROLL_FILES: &[&str] = &["PK.auth", "KEK.auth", "db.auth"];

/// The host tools keygen and signing run, with their Debian packages.
pub const TOOLS: &[(&str, &str)] = &[
    ("openssl", "openssl"),
    ("sbsign", "sbsigntool"),
    ("sbverify", "sbsigntool"),
    ("sbsiglist", "sbsigntool"),
    ("sbvarsign", "sbsigntool"),
    ("faketime", "faketime"),
];

/// Variable attributes of the enrolled keys: what systemd-boot passes to
/// SetVariable, which the signature covers.
const VAR_ATTRS: &str =
    "NON_VOLATILE,BOOTSERVICE_ACCESS,RUNTIME_ACCESS,TIME_BASED_AUTHENTICATED_WRITE_ACCESS";

/// A key directory made by [`keygen`], checked complete.
#[derive(Debug, Clone)]
pub struct Keys {
    dir: PathBuf,
}

impl Keys {
    /// Opens a key directory; the error names each missing file.
    pub fn open(dir: &Path) -> Result<Keys> {
        let missing: Vec<_> = KEY_FILES
            .iter()
            .filter(|f| !dir.join(f).is_file())
            .copied()
            .collect();
        // The PK and KEK secret keys may live elsewhere (offline): signing
        // needs db.key, enrolling needs the .auth files.
        let needed: Vec<_> = missing
            .iter()
            .filter(|f| !matches!(**f, "PK.key" | "KEK.key"))
            .copied()
            .collect();
        if !needed.is_empty() {
            bail!(
                "Secure Boot key directory {} lacks {} (make one with: image-build keygen --secure-boot --out {})",
                dir.display(),
                needed.join(", "),
                dir.display()
            );
        }
        Ok(Keys {
            dir: dir.to_path_buf(),
        })
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The db certificate in DER, as the firmware's db lists it.
    pub fn db_cert_der(&self) -> Result<Vec<u8>> {
        pem_to_der(&std::fs::read_to_string(self.file("db.crt"))?)
            .with_context(|| format!("{}", self.file("db.crt").display()))
    }
}

/// Decodes the first certificate of a PEM file.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>> {
    let begin = "-----BEGIN CERTIFICATE-----";
    let end = "-----END CERTIFICATE-----";
    let start = pem.find(begin).context("no PEM certificate")? + begin.len();
    let stop = start
        + pem[start..]
            .find(end)
            .context("unterminated PEM certificate")?;
    let b64: String = pem[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .context("the PEM certificate is not valid base64")
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Makes a Secure Boot key set in `out` (a new or empty directory): PK, KEK
/// and db keys and certificates named after `name`, and the signed variable
/// updates that enroll them.
pub fn keygen(out: &Path, name: &str) -> Result<()> {
    tools::check_list(TOOLS)?;
    if name.is_empty() || name.chars().any(|c| c.is_control() || "/\\=,+".contains(c)) {
        bail!("--name {name:?}: a plain name goes into the certificates' common names");
    }
    if out.exists() && std::fs::read_dir(out)?.next().is_some() {
        bail!(
            "{} is not empty: refusing to overwrite Secure Boot keys",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o700))?;
    for role in ["PK", "KEK", "db"] {
        let key = out.join(format!("{role}.key"));
        // Made empty and private first: openssl would create it 0644.
        std::fs::write(&key, "")?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        run(Command::new("openssl")
            .args([
                "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
            ])
            .args(["-days", "7300", "-subj"])
            .arg(format!("/CN={name} Secure Boot {role}/"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(out.join(format!("{role}.crt"))))?;
    }
    // One owner GUID for the three lists, derived from the PK certificate.
    let pk_pem = std::fs::read_to_string(out.join("PK.crt"))?;
    let owner = ballast_common::derived_uuid(&format!("secure-boot-owner/{pk_pem}"));
    let work = tempfile_dir(out)?;
    let result = (|| -> Result<()> {
        for (role, signer) in [("db", "KEK"), ("KEK", "PK"), ("PK", "PK")] {
            let der = work.join(format!("{role}.der"));
            let esl = work.join(format!("{role}.esl"));
            run(Command::new("openssl")
                .args(["x509", "-outform", "DER", "-in"])
                .arg(out.join(format!("{role}.crt")))
                .arg("-out")
                .arg(&der))?;
            run(Command::new("sbsiglist")
                .arg("--owner")
                .arg(owner.to_string())
                .args(["--type", "x509", "--output"])
                .arg(&esl)
                .arg(&der))?;
            run(Command::new("sbvarsign")
                .arg("--key")
                .arg(out.join(format!("{signer}.key")))
                .arg("--cert")
                .arg(out.join(format!("{signer}.crt")))
                .args(["--attr", VAR_ATTRS, "--output"])
                .arg(out.join(format!("{role}.auth")))
                .arg(role)
                .arg(&esl))?;
        }
        Ok(())
    })();
    std::fs::remove_dir_all(&work)?;
    result
}

fn tempfile_dir(parent: &Path) -> Result<PathBuf> {
    let d = parent.join(".work");
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Signs the EFI binary `input` into `output` with the db key. The signing
/// time is the build's epoch (sbsign takes the clock's), so two builds
/// of one input sign byte-identically.
pub fn sign(stage: &Stage, keys: &Keys, input: &Path, output: &Path, epoch: u64) -> Result<()> {
    let tmp = output.with_extension("signing");
    stage.cmd(
        // An absolute FAKETIME is frozen: the whole run signs at that second.
        Command::new("faketime")
            .arg("-f")
            .arg(utc_datetime(epoch))
            .env("TZ", "UTC")
            .arg("sbsign")
            .arg("--key")
            .arg(keys.file("db.key"))
            .arg("--cert")
            .arg(keys.file("db.crt"))
            .arg("--output")
            .arg(&tmp)
            .arg(input),
    )?;
    verify(stage, keys, &tmp)?;
    std::fs::rename(&tmp, output)?;
    Ok(())
}

/// `YYYY-MM-DD hh:mm:ss` in UTC (libfaketime's absolute format).
fn utc_datetime(epoch: u64) -> String {
    let iso = ballast_common::rfc3339(epoch);
    format!("{} {}", &iso[..10], &iso[11..19])
}

/// Checks that `file` carries a signature of the db key.
pub fn verify(stage: &Stage, keys: &Keys, file: &Path) -> Result<()> {
    stage
        .cmd(
            Command::new("sbverify")
                .arg("--cert")
                .arg(keys.file("db.crt"))
                .arg(file),
        )
        .with_context(|| {
            format!(
                "{} is not signed by {}",
                file.display(),
                keys.file("db.crt").display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// keygen, then sign systemd's EFI stub twice: the two signed files are
    /// byte-identical (the signing time is the epoch), sbverify accepts them
    /// with the db certificate and refuses them with the PK's.
    #[test]
    fn keygen_then_sign_is_reproducible_and_verifies() {
        let stub = Path::new("/usr/lib/systemd/boot/efi/linuxx64.efi.stub");
        assert!(
            stub.exists(),
            "systemd-boot-efi missing (make test installs it)"
        );
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("sb");
        keygen(&dir, "Unit test").unwrap();
        for f in KEY_FILES {
            assert!(std::fs::metadata(dir.join(f)).unwrap().len() > 0, "{f}");
        }
        let mode = |f: &str| std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("db.key"), 0o600);
        assert_eq!(mode("PK.key"), 0o600);
        let e = format!("{:#}", keygen(&dir, "again").unwrap_err());
        assert!(e.contains("not empty"), "{e}");
        assert!(keygen(&t.path().join("x"), "a/b").is_err());

        let keys = Keys::open(&dir).unwrap();
        let der = keys.db_cert_der().unwrap();
        assert_eq!(der[0], 0x30, "DER starts with a SEQUENCE");
        let mut stages = crate::stage::Stages::new(&t.path().join("logs"), 1).unwrap();
        let (a, b) = (t.path().join("a.efi"), t.path().join("b.efi"));
        stages
            .run("sign", |s| sign(s, &keys, stub, &a, 1_700_000_000))
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        stages
            .run("sign", |s| sign(s, &keys, stub, &b, 1_700_000_000))
            .unwrap();
        let signed = std::fs::read(&a).unwrap();
        assert!(signed == std::fs::read(&b).unwrap(), "two signings differ");
        assert!(ballast_common::pe::signed_with(&signed, &der).unwrap());
        let pk = Keys { dir: dir.clone() };
        std::fs::copy(dir.join("PK.crt"), t.path().join("db.crt")).unwrap();
        let wrong = Keys {
            dir: t.path().to_path_buf(),
        };
        let e = stages.run("verify", |s| verify(s, &wrong, &a)).unwrap_err();
        assert!(format!("{e:#}").contains("is not signed by"), "{e:#}");
        stages.run("verify", |s| verify(s, &pk, &a)).unwrap();
        let e = stages.run("verify", |s| verify(s, &pk, stub)).unwrap_err();
        assert!(format!("{e:#}").contains("is not signed by"), "{e:#}");
    }

    #[test]
    fn utc_datetime_formats_the_epoch() {
        assert_eq!(utc_datetime(0), "1970-01-01 00:00:00");
        assert_eq!(utc_datetime(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(utc_datetime(951_782_400), "2000-02-29 00:00:00");
    }

    #[test]
    fn an_incomplete_key_directory_names_what_is_missing() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("db.key"), "x").unwrap();
        let e = format!("{:#}", Keys::open(d.path()).unwrap_err());
        assert!(e.contains("db.crt") && e.contains("PK.auth"), "{e}");
        assert!(!e.contains("db.key,"), "{e}");
        assert!(e.contains("keygen --secure-boot"), "{e}");
    }
}
