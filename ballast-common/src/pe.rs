//! The PE32+ headers of EFI binaries, as far as Ballast reads them: the
//! sections image-build adds to a UKI, and the Authenticode signatures
//! Secure Boot checks (the certificate table, PE/COFF specification 4.7).

/// What is wrong with a PE file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeError {
    #[error("not a PE file (no MZ header)")]
    NoMz,
    #[error("not a PE file (no PE signature)")]
    NoPeSignature,
    #[error("not a PE32+ (64-bit) image")]
    NotPe32Plus,
    #[error("PE file truncated at byte {0}")]
    Truncated(usize),
    #[error("PE section alignment is 0")]
    ZeroAlignment,
    #[error("the certificate table ({offset}+{size}) lies outside the file of {len} bytes")]
    CertTableOutside { offset: u64, size: u64, len: usize },
    #[error("certificate table entry at byte {0} has a bad length")]
    BadCertEntry(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    pub virtual_size: u32,
    pub virtual_address: u32,
    pub raw_size: u32,
}

#[derive(Debug, Clone)]
pub struct PeInfo {
    pub image_base: u64,
    pub section_alignment: u32,
    pub size_of_image: u32,
    pub timestamp_offset: usize,
    pub checksum_offset: usize,
    pub sections: Vec<Section>,
    /// The certificate table's file offset and size (data directory 4), if any.
    pub cert_table: Option<(u32, u32)>,
}

fn bytes_at(b: &[u8], o: usize, n: usize) -> Result<&[u8], PeError> {
    o.checked_add(n)
        .and_then(|end| b.get(o..end))
        .ok_or(PeError::Truncated(o))
}
fn u16_at(b: &[u8], o: usize) -> Result<u16, PeError> {
    let s = bytes_at(b, o, 2)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}
fn u32_at(b: &[u8], o: usize) -> Result<u32, PeError> {
    let s = bytes_at(b, o, 4)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}
fn u64_at(b: &[u8], o: usize) -> Result<u64, PeError> {
    let mut a = [0u8; 8];
    a.copy_from_slice(bytes_at(b, o, 8)?);
    Ok(u64::from_le_bytes(a))
}

/// Data directory index of the certificate table.
const SECURITY_DIRECTORY: u32 = 4;

/// Reads the headers of a PE32+ file.
pub fn parse(b: &[u8]) -> Result<PeInfo, PeError> {
    if b.get(0..2) != Some(b"MZ") {
        return Err(PeError::NoMz);
    }
    let pe = u32_at(b, 0x3c)? as usize;
    if bytes_at(b, pe, 4).ok() != Some(b"PE\0\0") {
        return Err(PeError::NoPeSignature);
    }
    let coff = pe + 4;
    let nsections = u16_at(b, coff + 2)? as usize;
    let opt_size = u16_at(b, coff + 16)? as usize;
    let opt = coff + 20;
    if u16_at(b, opt)? != 0x20b {
        return Err(PeError::NotPe32Plus);
    }
    let image_base = u64_at(b, opt + 24)?;
    let section_alignment = u32_at(b, opt + 32)?;
    let size_of_image = u32_at(b, opt + 56)?;
    let directories = u32_at(b, opt + 108)?;
    let cert_table = if directories > SECURITY_DIRECTORY
        && 112 + 8 * (SECURITY_DIRECTORY as usize + 1) <= opt_size
    {
        let d = opt + 112 + 8 * SECURITY_DIRECTORY as usize;
        let (offset, size) = (u32_at(b, d)?, u32_at(b, d + 4)?);
        (size != 0).then_some((offset, size))
    } else {
        None
    };
    let mut sections = Vec::with_capacity(nsections.min(96));
    for i in 0..nsections {
        let s = opt + opt_size + 40 * i;
        let raw = bytes_at(b, s, 8)?;
        let name = String::from_utf8_lossy(raw)
            .trim_end_matches('\0')
            .to_string();
        sections.push(Section {
            name,
            virtual_size: u32_at(b, s + 8)?,
            virtual_address: u32_at(b, s + 12)?,
            raw_size: u32_at(b, s + 16)?,
        });
    }
    if section_alignment == 0 {
        return Err(PeError::ZeroAlignment);
    }
    Ok(PeInfo {
        image_base,
        section_alignment,
        size_of_image,
        timestamp_offset: coff + 4,
        checksum_offset: opt + 64,
        sections,
        cert_table,
    })
}

/// WIN_CERT_TYPE_PKCS_SIGNED_DATA: an Authenticode signature.
const WIN_CERT_TYPE_PKCS_SIGNED_DATA: u16 = 0x0002;

/// The Authenticode signatures (PKCS#7 SignedData, DER) in a PE file's
/// certificate table; empty for an unsigned file.
pub fn signatures(b: &[u8]) -> Result<Vec<&[u8]>, PeError> {
    let info = parse(b)?;
    let Some((offset, size)) = info.cert_table else {
        return Ok(Vec::new());
    };
    let (start, len) = (offset as usize, size as usize);
    let table = start
        .checked_add(len)
        .and_then(|end| b.get(start..end))
        .ok_or(PeError::CertTableOutside {
            offset: offset.into(),
            size: size.into(),
            len: b.len(),
        })?;
    let mut out = Vec::new();
    let mut at = 0usize;
    // Entries are 8-byte aligned: WIN_CERTIFICATE { dwLength, wRevision,
    // wCertificateType, bCertificate[] }, dwLength counting the header.
    while at + 8 <= table.len() {
        let length = u32_at(table, at)? as usize;
        let kind = u16_at(table, at + 6)?;
        if length < 8 || length > table.len() - at {
            return Err(PeError::BadCertEntry(start + at));
        }
        if kind == WIN_CERT_TYPE_PKCS_SIGNED_DATA {
            out.push(&table[at + 8..at + length]);
        }
        at += length.div_ceil(8) * 8;
    }
    Ok(out)
}

/// Whether one of the file's signatures carries the DER certificate `cert`
/// (sbsign and signtool embed the signer's certificate). This names the
/// signer the firmware would check against its db; the firmware does the
/// cryptography.
pub fn signed_with(b: &[u8], cert: &[u8]) -> Result<bool, PeError> {
    if cert.is_empty() {
        return Ok(false);
    }
    Ok(signatures(b)?
        .iter()
        .any(|sig| sig.windows(cert.len()).any(|w| w == cert)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal PE32+ header with `cert` as its certificate table.
    pub(crate) fn fake_pe(cert_table: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 0x200];
        b[0..2].copy_from_slice(b"MZ");
        b[0x3c] = 0x40;
        b[0x40..0x44].copy_from_slice(b"PE\0\0");
        let coff = 0x44;
        b[coff + 16..coff + 18].copy_from_slice(&240u16.to_le_bytes());
        let opt = coff + 20;
        b[opt..opt + 2].copy_from_slice(&0x20bu16.to_le_bytes());
        b[opt + 32..opt + 36].copy_from_slice(&0x1000u32.to_le_bytes());
        b[opt + 108..opt + 112].copy_from_slice(&16u32.to_le_bytes());
        let d = opt + 112 + 32;
        let off = b.len() as u32;
        b[d..d + 4].copy_from_slice(&off.to_le_bytes());
        b[d + 4..d + 8].copy_from_slice(&(cert_table.len() as u32).to_le_bytes());
        b.extend_from_slice(cert_table);
        b
    }

    fn entry(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&((8 + body.len()) as u32).to_le_bytes());
        e.extend_from_slice(&0x0200u16.to_le_bytes());
        e.extend_from_slice(&kind.to_le_bytes());
        e.extend_from_slice(body);
        while e.len() % 8 != 0 {
            e.push(0);
        }
        e
    }

    #[test]
    fn finds_the_signer_certificate() {
        let mut table = entry(0x0001, b"x509-ignored");
        table.extend(entry(2, b"..pkcs7..CERTIFICATE-DER..rest"));
        let pe = fake_pe(&table);
        assert_eq!(signatures(&pe).unwrap().len(), 1);
        assert!(signed_with(&pe, b"CERTIFICATE-DER").unwrap());
        assert!(!signed_with(&pe, b"OTHER-CERT").unwrap());
        assert!(!signed_with(&pe, b"x509-ignored").unwrap());
        assert!(!signed_with(&pe, b"").unwrap());
    }

    #[test]
    fn unsigned_has_no_signatures() {
        let mut pe = fake_pe(&[]);
        let d = 0x44 + 20 + 112 + 32;
        pe[d..d + 8].fill(0);
        assert!(parse(&pe).unwrap().cert_table.is_none());
        assert!(signatures(&pe).unwrap().is_empty());
    }

    #[test]
    fn hostile_tables_are_errors_not_panics() {
        // A table that points past the end of the file.
        let mut pe = fake_pe(&entry(2, b"sig"));
        let d = 0x44 + 20 + 112 + 32;
        pe[d + 4..d + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            signatures(&pe),
            Err(PeError::CertTableOutside { .. })
        ));
        pe[d..d + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(signatures(&pe).is_err());
        // An entry whose length runs past the table, or is below its header.
        for bad_len in [0u32, 7, 1000] {
            let mut e = entry(2, b"sig");
            e[0..4].copy_from_slice(&bad_len.to_le_bytes());
            assert_eq!(
                signatures(&fake_pe(&e)),
                Err(PeError::BadCertEntry(0x200)),
                "{bad_len}"
            );
        }
        // Truncated headers anywhere.
        let whole = fake_pe(&entry(2, b"sig"));
        for cut in [1, 0x3d, 0x42, 0x50, 0xa0] {
            assert!(parse(&whole[..cut]).is_err(), "{cut}");
        }
        // Headers whole, the table cut off.
        assert!(matches!(
            signatures(&whole[..0x100]),
            Err(PeError::CertTableOutside { .. })
        ));
        let mut pe = whole.clone();
        pe[0x3c..0x40].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse(&pe).unwrap_err(), PeError::NoPeSignature);
    }
}
