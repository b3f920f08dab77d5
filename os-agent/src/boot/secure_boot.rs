//! Secure Boot as the host sees it: whether the firmware enforces it, which
//! certificates its db allows, and whether a release's UKI is signed by one
//! of them. A host with Secure Boot on never stages a UKI its firmware would
//! refuse: that entry would cost a try and hand the machine back to the
//! firmware's other boot options (docs/update.md).

use super::EFIVARS;
use crate::host::Host;
use anyhow::{bail, Context, Result};
use ballast_common::pe;
use std::io;
use std::path::PathBuf;

/// EFI_GLOBAL_VARIABLE: SecureBoot, SetupMode.
const GLOBAL_GUID: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";
/// EFI_IMAGE_SECURITY_DATABASE_GUID: db, dbx.
const SECURITY_DB_GUID: &str = "d719b2cb-3d3a-4596-a3bc-dad00e67656f";
/// EFI_CERT_X509_GUID, as it is laid out in memory (mixed endian).
const CERT_X509: [u8; 16] = [
    0xa1, 0x59, 0xc0, 0xa5, 0xe4, 0x94, 0xa7, 0x4a, 0x87, 0xb5, 0xab, 0x15, 0x5c, 0x2b, 0xf0, 0x72,
];

fn read_var(host: &dyn Host, name: &str, guid: &str) -> Result<Option<Vec<u8>>> {
    let path = PathBuf::from(format!("{EFIVARS}/{name}-{guid}"));
    match host.read(&path) {
        Ok(raw) => Ok(Some(raw)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Whether the firmware booted with Secure Boot enforcing.
pub fn enabled(host: &dyn Host) -> Result<bool> {
    // 4 bytes of attributes, then one byte: 1 when enforcing.
    Ok(read_var(host, "SecureBoot", GLOBAL_GUID)?.is_some_and(|raw| raw.len() == 5 && raw[4] == 1))
}

/// The X.509 certificates (DER) in a signature database: a run of
/// EFI_SIGNATURE_LISTs (UEFI 2.10, 32.4.1). Lists of other types (hashes)
/// are skipped.
pub fn x509_certs(esls: &[u8]) -> Result<Vec<Vec<u8>>> {
    let u32_at = |o: usize| -> Result<usize> {
        let b = esls
            .get(o..o + 4)
            .with_context(|| format!("signature list truncated at byte {o}"))?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let mut certs = Vec::new();
    let mut at = 0;
    while at < esls.len() {
        let list_size = u32_at(at + 16)?;
        let header_size = u32_at(at + 20)?;
        let sig_size = u32_at(at + 24)?;
        let body = 28usize.saturating_add(header_size);
        if list_size < body || list_size > esls.len() - at || sig_size < 16 {
            bail!("signature list at byte {at} has inconsistent sizes");
        }
        if esls[at..at + 16] == CERT_X509 {
            let mut s = at + body;
            while s + sig_size <= at + list_size {
                // EFI_SIGNATURE_DATA: owner GUID, then the certificate.
                certs.push(esls[s + 16..s + sig_size].to_vec());
                s += sig_size;
            }
        }
        at += list_size;
    }
    Ok(certs)
}

/// Checks, on a host with Secure Boot on, that `uki` is signed by a
/// certificate in the firmware's db. `what` names the UKI in errors.
pub fn check_uki(host: &dyn Host, uki: &[u8], what: &str) -> Result<()> {
    if !enabled(host)? {
        return Ok(());
    }
    let sigs = pe::signatures(uki).with_context(|| format!("{what} is not a valid EFI binary"))?;
    if sigs.is_empty() {
        bail!("{what} is not signed, and this host boots with Secure Boot on: its firmware would refuse it (sign releases with the db key, docs/image.md)");
    }
    // The variable: 4 bytes of attributes, then the lists.
    let db = read_var(host, "db", SECURITY_DB_GUID)?.unwrap_or_default();
    let certs =
        x509_certs(db.get(4..).unwrap_or_default()).context("cannot read the firmware's db")?;
    if certs.is_empty() {
        // A db of hashes only: the firmware decides by the image's hash,
        // which the agent cannot know in advance.
        tracing::warn!("the firmware's db holds no certificates; not checking who signed {what}");
        return Ok(());
    }
    for cert in &certs {
        if pe::signed_with(uki, cert)? {
            return Ok(());
        }
    }
    bail!("{what} is signed, but by no certificate in this host's Secure Boot db: its firmware would refuse it")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esl(kind: [u8; 16], entries: &[&[u8]]) -> Vec<u8> {
        let sig_size = 16 + entries.first().map_or(0, |e| e.len());
        let mut v = kind.to_vec();
        v.extend(((28 + sig_size * entries.len()) as u32).to_le_bytes());
        v.extend(0u32.to_le_bytes());
        v.extend((sig_size as u32).to_le_bytes());
        for e in entries {
            v.extend([0x11; 16]);
            v.extend_from_slice(e);
        }
        v
    }

    #[test]
    fn reads_certificates_and_skips_hash_lists() {
        let mut db = esl([7; 16], &[&[0xaa; 32], &[0xbb; 32]]);
        db.extend(esl(CERT_X509, &[b"CERT-ONE"]));
        db.extend(esl(CERT_X509, &[b"CERT-TWO", b"CERT-TRE"]));
        let certs = x509_certs(&db).unwrap();
        assert_eq!(
            certs,
            vec![
                b"CERT-ONE".to_vec(),
                b"CERT-TWO".to_vec(),
                b"CERT-TRE".to_vec()
            ]
        );
        assert!(x509_certs(&[]).unwrap().is_empty());
    }

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../qemu-tests/fixtures/secure-boot")
            .join(name)
    }

    fn run(cmd: &mut std::process::Command) -> Vec<u8> {
        let out = cmd
            .output()
            .expect("sbsigntool and openssl (make test installs them)");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    fn der(cert: &str) -> Vec<u8> {
        run(std::process::Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(fixture(cert)))
    }

    fn set_var(root: &std::path::Path, name: &str, guid: &str, value: &[u8]) {
        let p = root.join(format!("sys/firmware/efi/efivars/{name}-{guid}"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let mut v = vec![6, 0, 0, 0];
        v.extend_from_slice(value);
        std::fs::write(p, v).unwrap();
    }

    /// The real formats: systemd's EFI stub signed by sbsign with the test
    /// db key, checked against a db as the firmware holds it.
    #[test]
    fn a_uki_is_accepted_only_when_signed_by_a_db_certificate() {
        let stub = std::fs::read("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
            .expect("systemd-boot-efi (make test installs it)");
        let dir = tempfile::tempdir().unwrap();
        let signed_path = dir.path().join("signed.efi");
        run(std::process::Command::new("sbsign")
            .arg("--key")
            .arg(fixture("db.key"))
            .arg("--cert")
            .arg(fixture("db.crt"))
            .arg("--output")
            .arg(&signed_path)
            .arg("/usr/lib/systemd/boot/efi/linuxx64.efi.stub"));
        let signed = std::fs::read(&signed_path).unwrap();
        let db_der = der("db.crt");
        let other_der = der("PK.crt");
        // A signature by some other certificate: one byte of the embedded one changed.
        let mut altered = signed.clone();
        let at = altered
            .windows(db_der.len())
            .position(|w| w == db_der)
            .unwrap();
        altered[at + db_der.len() / 2] ^= 0xff;

        let root = tempfile::tempdir().unwrap();
        let host = crate::host::DirHost::new(root.path()).unwrap();
        // Secure Boot off (or no UEFI): nothing is checked.
        check_uki(&host, &stub, "the UKI").unwrap();
        set_var(root.path(), "SecureBoot", GLOBAL_GUID, &[0]);
        check_uki(&host, &stub, "the UKI").unwrap();

        set_var(root.path(), "SecureBoot", GLOBAL_GUID, &[1]);
        set_var(
            root.path(),
            "db",
            SECURITY_DB_GUID,
            &esl(CERT_X509, &[&db_der]),
        );
        check_uki(&host, &signed, "the UKI").unwrap();
        let e = format!(
            "{:#}",
            check_uki(&host, &stub, "the UKI of 0.2.0").unwrap_err()
        );
        assert!(e.contains("the UKI of 0.2.0 is not signed"), "{e}");
        let e = format!("{:#}", check_uki(&host, &altered, "the UKI").unwrap_err());
        assert!(
            e.contains("by no certificate in this host's Secure Boot db"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            check_uki(&host, b"MZ not really", "the UKI").unwrap_err()
        );
        assert!(e.contains("not a valid EFI binary"), "{e}");

        // The db lists the PK's certificate only: the db-signed UKI is refused.
        set_var(
            root.path(),
            "db",
            SECURITY_DB_GUID,
            &esl(CERT_X509, &[&other_der]),
        );
        assert!(check_uki(&host, &signed, "the UKI").is_err());
    }

    #[test]
    fn hostile_lists_are_errors_not_panics() {
        let good = esl(CERT_X509, &[b"CERT"]);
        for cut in 1..good.len() {
            let _ = x509_certs(&good[..cut]);
        }
        let mut bad = good.clone();
        bad[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(x509_certs(&bad).is_err());
        let mut bad = good.clone();
        bad[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(x509_certs(&bad).is_err());
        let mut bad = good;
        bad[24..28].copy_from_slice(&0u32.to_le_bytes());
        assert!(x509_certs(&bad).is_err());
    }
}
