//! The kernel command line: which root the UKI that booted us trusts.

use uuid::Uuid;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("kernel command line has no {0}= (not booted from a Ballast UKI?)")]
    Missing(&'static str),
    #[error("{key}={value:?} is not a 64-digit hex SHA-256 root hash")]
    BadRootHash { key: &'static str, value: String },
    #[error("{key}={value:?} is not PARTUUID=<uuid>")]
    BadPartuuid { key: &'static str, value: String },
}

/// The dm-verity root the kernel command line names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityRoot {
    /// Lowercase hex, as on the command line.
    pub root_hash: String,
    /// PARTUUID of the root slot's data partition.
    pub data_partuuid: Uuid,
    /// PARTUUID of the root slot's hash partition.
    pub hash_partuuid: Uuid,
}

const ROOTHASH: &str = "roothash";
const DATA: &str = "systemd.verity_root_data";
const HASH: &str = "systemd.verity_root_hash";

/// Splits a command line into words, honouring double quotes as the kernel does.
pub fn words(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

/// The value of the last `key=` on the command line (the kernel and systemd
/// let a later one win).
pub fn value<'a>(words: &'a [String], key: &str) -> Option<&'a str> {
    words
        .iter()
        .rev()
        .find_map(|w| w.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
}

fn partuuid(words: &[String], key: &'static str) -> Result<Uuid, CmdlineError> {
    let v = value(words, key).ok_or(CmdlineError::Missing(key))?;
    let bad = || CmdlineError::BadPartuuid {
        key,
        value: v.to_string(),
    };
    let u = v.strip_prefix("PARTUUID=").ok_or_else(bad)?;
    Uuid::parse_str(u).map_err(|_| bad())
}

/// Parses the verity root out of /proc/cmdline text.
pub fn parse(cmdline: &str) -> Result<VerityRoot, CmdlineError> {
    let words = words(cmdline);
    let hash = value(&words, ROOTHASH).ok_or(CmdlineError::Missing(ROOTHASH))?;
    if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(CmdlineError::BadRootHash {
            key: ROOTHASH,
            value: hash.to_string(),
        });
    }
    Ok(VerityRoot {
        root_hash: hash.to_ascii_lowercase(),
        data_partuuid: partuuid(&words, DATA)?,
        hash_partuuid: partuuid(&words, HASH)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    const D: &str = "00112233-4455-6677-8899-aabbccddeeff";
    const V: &str = "00112233-4455-6677-8899-aabbccddeef0";

    fn line(hash: &str, data: &str, verity: &str) -> String {
        format!(
            "{hash} {data} {verity} systemd.verity_root_options=restart-on-corruption \
             rootfstype=erofs ro console=tty0 console=ttyS0,115200 rd.shell=0 panic=10\n"
        )
    }

    #[test]
    fn table() {
        let ok = || {
            Ok(VerityRoot {
                root_hash: H.to_string(),
                data_partuuid: Uuid::parse_str(D).unwrap(),
                hash_partuuid: Uuid::parse_str(V).unwrap(),
            })
        };
        let r = |s: &str| format!("roothash={s}");
        let d = |s: &str| format!("{DATA}={s}");
        let v = |s: &str| format!("{HASH}={s}");
        let p = |u: &str| format!("PARTUUID={u}");
        let cases: Vec<(String, Result<VerityRoot, CmdlineError>)> = vec![
            (line(&r(H), &d(&p(D)), &v(&p(V))), ok()),
            (line(&r(&H.to_uppercase()), &d(&p(D)), &v(&p(V))), ok()),
            // A later value wins; quotes are stripped.
            (
                format!("roothash=00 {} \"{}\" {}", r(H), d(&p(D)), v(&p(V))),
                ok(),
            ),
            (
                line("", &d(&p(D)), &v(&p(V))),
                Err(CmdlineError::Missing(ROOTHASH)),
            ),
            (
                line(&r("abc"), &d(&p(D)), &v(&p(V))),
                Err(CmdlineError::BadRootHash {
                    key: ROOTHASH,
                    value: "abc".into(),
                }),
            ),
            (
                line(&r(&H.replace('0', "g")), &d(&p(D)), &v(&p(V))),
                Err(CmdlineError::BadRootHash {
                    key: ROOTHASH,
                    value: H.replace('0', "g"),
                }),
            ),
            (line(&r(H), "", &v(&p(V))), Err(CmdlineError::Missing(DATA))),
            (
                line(&r(H), &d(D), &v(&p(V))),
                Err(CmdlineError::BadPartuuid {
                    key: DATA,
                    value: D.into(),
                }),
            ),
            (
                line(&r(H), &d(&p("nope")), &v(&p(V))),
                Err(CmdlineError::BadPartuuid {
                    key: DATA,
                    value: "PARTUUID=nope".into(),
                }),
            ),
            (line(&r(H), &d(&p(D)), ""), Err(CmdlineError::Missing(HASH))),
            // A key that only shares a prefix does not count.
            (
                line(&r(H), &d(&p(D)), &format!("{HASH}x={}", p(V))),
                Err(CmdlineError::Missing(HASH)),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(parse(&input), want, "input: {input}");
        }
    }

    #[test]
    fn errors_read_clearly() {
        let e = parse("roothash=zz").unwrap_err().to_string();
        assert!(e.contains("roothash=\"zz\""), "{e}");
        let e = parse("ro").unwrap_err().to_string();
        assert!(e.contains("no roothash="), "{e}");
    }
}
