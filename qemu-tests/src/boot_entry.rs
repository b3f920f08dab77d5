//! systemd boot counting in UKI file names: `name+LEFT[-DONE].efi`.
//! systemd-bless-boot renames a good entry to `name.efi`.

/// The counter of a boot-counted entry name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootCounter {
    /// Tries left.
    pub left: u32,
    /// Tries done, absent before the first try.
    pub done: Option<u32>,
}

/// Splits `name+3.efi` / `name+2-1.efi` into (`name.efi`, counter); `None`
/// if the name carries no counter.
pub fn parse_boot_counter(file_name: &str) -> Option<(String, BootCounter)> {
    let (stem, ext) = match file_name.rfind('.') {
        Some(dot) => file_name.split_at(dot),
        None => (file_name, ""),
    };
    let plus = stem.rfind('+')?;
    let (base, counter) = (&stem[..plus], &stem[plus + 1..]);
    let (left, done) = match counter.split_once('-') {
        Some((l, d)) => (l, Some(d)),
        None => (counter, None),
    };
    let number = |s: &str| -> Option<u32> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let left = number(left)?;
    let done = match done {
        Some(d) => Some(number(d)?),
        None => None,
    };
    Some((format!("{base}{ext}"), BootCounter { left, done }))
}

/// The name an entry has once blessed: the counter removed. Names without a
/// counter come back unchanged.
pub fn strip_boot_counter(file_name: &str) -> String {
    parse_boot_counter(file_name)
        .map(|(name, _)| name)
        .unwrap_or_else(|| file_name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_counters() {
        let cases = [
            ("ballast-0.1.0+3.efi", "ballast-0.1.0.efi"),
            ("ballast-0.1.0+2-1.efi", "ballast-0.1.0.efi"),
            ("ballast-0.1.0+0-3.efi", "ballast-0.1.0.efi"),
            ("ballast-0.1.0.efi", "ballast-0.1.0.efi"),
            // Semver build metadata is not a counter, but one may follow it.
            ("ballast-0.1.0+git.efi", "ballast-0.1.0+git.efi"),
            ("ballast-0.1.0+git+3.efi", "ballast-0.1.0+git.efi"),
            ("ballast+3", "ballast"),
            ("ballast+.efi", "ballast+.efi"),
            ("ballast+3-.efi", "ballast+3-.efi"),
            ("ballast+-1.efi", "ballast+-1.efi"),
        ];
        for (input, want) in cases {
            assert_eq!(strip_boot_counter(input), want, "input {input}");
        }
    }

    #[test]
    fn parses_counters() {
        assert_eq!(
            parse_boot_counter("a-1+3.efi"),
            Some((
                "a-1.efi".into(),
                BootCounter {
                    left: 3,
                    done: None
                }
            ))
        );
        assert_eq!(
            parse_boot_counter("a-1+2-1.efi"),
            Some((
                "a-1.efi".into(),
                BootCounter {
                    left: 2,
                    done: Some(1)
                }
            ))
        );
        assert_eq!(parse_boot_counter("a-1.efi"), None);
    }
}
