//! Version comparison as in the UAPI Version Format Specification (systemd's
//! `strverscmp_improved`, which systemd-boot uses to order entries), so the
//! agent and the boot loader agree on which version is newer.

use std::cmp::Ordering;

/// Compares two version strings: runs of digits numerically, runs of letters
/// lexically, `~` sorts before everything (pre-releases), `-` and `^` and `.`
/// separate; a version with more components is newer.
pub fn compare(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        // Skip characters that are neither alphanumeric nor special.
        let skip = |s: &[u8]| -> usize {
            s.iter()
                .take_while(|c| !c.is_ascii_alphanumeric() && !b"~-^.".contains(c))
                .count()
        };
        a = &a[skip(a)..];
        b = &b[skip(b)..];
        if a.is_empty() && b.is_empty() {
            return Ordering::Equal;
        }
        // '~' sorts before anything, even the end.
        for (c, ord) in [
            (b'~', Ordering::Less),
            (b'-', Ordering::Less),
            (b'^', Ordering::Less),
            (b'.', Ordering::Less),
        ] {
            let (ca, cb) = (a.first() == Some(&c), b.first() == Some(&c));
            if ca || cb {
                if ca && cb {
                    a = &a[1..];
                    b = &b[1..];
                    break;
                }
                if c == b'~' {
                    return if ca { ord } else { ord.reverse() };
                }
                // The side with the separator has more components: newer,
                // unless the other side has ended... which is older.
                if a.is_empty() {
                    return Ordering::Less;
                }
                if b.is_empty() {
                    return Ordering::Greater;
                }
                return if ca { ord } else { ord.reverse() };
            }
        }
        if a.is_empty() || b.is_empty() {
            if a.is_empty() && b.is_empty() {
                return Ordering::Equal;
            }
            return if a.is_empty() {
                Ordering::Less
            } else {
                Ordering::Greater
            };
        }
        if a[0].is_ascii_digit() || b[0].is_ascii_digit() {
            let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
            let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
            if na == 0 || nb == 0 {
                // Digits sort after letters.
                return if na == 0 {
                    Ordering::Less
                } else {
                    Ordering::Greater
                };
            }
            let ta = trim_zeros(&a[..na]);
            let tb = trim_zeros(&b[..nb]);
            let o = ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb));
            if o != Ordering::Equal {
                return o;
            }
            a = &a[na..];
            b = &b[nb..];
        } else if a[0].is_ascii_alphabetic() || b[0].is_ascii_alphabetic() {
            let na = a.iter().take_while(|c| c.is_ascii_alphabetic()).count();
            let nb = b.iter().take_while(|c| c.is_ascii_alphabetic()).count();
            let o = a[..na].cmp(&b[..nb]);
            if o != Ordering::Equal {
                return o;
            }
            a = &a[na..];
            b = &b[nb..];
        }
    }
}

fn trim_zeros(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&c| c == b'0').count();
    &s[n..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use Ordering::*;

    #[test]
    fn table() {
        for (a, b, want) in [
            ("1", "1", Equal),
            ("0.1.0", "0.2.0", Less),
            ("0.10.0", "0.9.0", Greater),
            ("1.0", "1.0.1", Less),
            ("1.0~rc1", "1.0", Less),
            ("1.0~rc1", "1.0~rc2", Less),
            ("1.0-2", "1.0-10", Less),
            ("1.01", "1.1", Equal),
            ("1.0a", "1.0b", Less),
            ("2", "10", Less),
            ("1.0", "1.0^git1", Less),
        ] {
            assert_eq!(compare(a, b), want, "{a} vs {b}");
            assert_eq!(compare(b, a), want.reverse(), "{b} vs {a}");
        }
    }
}
