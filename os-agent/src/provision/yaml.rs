//! Field types cloud-config spells more than one way (a string or a list, a
//! YAML 1.1 `yes`), with visitors of their own so a wrong type is reported by
//! serde at its line and column instead of as "did not match any variant".

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Serialize;
use std::fmt;

/// A command: a string runs with `/bin/sh -c`, a list is an argv run as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Command {
    Shell(String),
    Argv(Vec<String>),
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Shell(s) => write!(f, "sh -c {s:?}"),
            Command::Argv(a) => write!(f, "{a:?}"),
        }
    }
}

impl<'de> de::Deserialize<'de> for Command {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Command;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a shell command string or a list of arguments")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Command, E> {
                Ok(Command::Shell(s.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Command, A::Error> {
                Ok(Command::Argv(strings(seq)?))
            }
        }
        d.deserialize_any(V)
    }
}

fn strings<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Vec<String>, A::Error> {
    let mut out = Vec::new();
    while let Some(s) = seq.next_element::<String>()? {
        out.push(s);
    }
    Ok(out)
}

/// A list of names given as a YAML list or as one comma-separated string
/// (`groups: [adm, users]` or `groups: adm, users`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameList(pub Vec<String>);

impl<'de> de::Deserialize<'de> for NameList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = NameList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of names or a comma-separated string")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<NameList, E> {
                Ok(NameList(
                    s.split(',')
                        .map(str::trim)
                        .filter(|n| !n.is_empty())
                        .map(String::from)
                        .collect(),
                ))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<NameList, A::Error> {
                Ok(NameList(strings(seq)?))
            }
            fn visit_unit<E: de::Error>(self) -> Result<NameList, E> {
                Ok(NameList::default())
            }
        }
        d.deserialize_any(V)
    }
}

/// `sudo:` of a user: one rule, a list of rules, or `false`/null for none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SudoRules(pub Vec<String>);

impl<'de> de::Deserialize<'de> for SudoRules {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SudoRules;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a sudo rule such as \"ALL=(ALL) NOPASSWD:ALL\", a list of rules, or false",
                )
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<SudoRules, E> {
                if b {
                    Err(E::invalid_value(de::Unexpected::Bool(true), &self))
                } else {
                    Ok(SudoRules::default())
                }
            }
            fn visit_unit<E: de::Error>(self) -> Result<SudoRules, E> {
                Ok(SudoRules::default())
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<SudoRules, E> {
                Ok(SudoRules(vec![s.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<SudoRules, A::Error> {
                Ok(SudoRules(strings(seq)?))
            }
        }
        d.deserialize_any(V)
    }
}

/// A boolean, also in the YAML 1.1 spellings cloud-init's PyYAML accepts
/// (`yes`, `no`, `on`, `off`), which YAML 1.2 reads as strings.
pub fn bool11<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = Option<bool>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a boolean (true/false)")
        }
        fn visit_bool<E: de::Error>(self, b: bool) -> Result<Option<bool>, E> {
            Ok(Some(b))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Option<bool>, E> {
            Ok(None)
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Option<bool>, E> {
            match s.to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "y" => Ok(Some(true)),
                "false" | "no" | "off" | "n" => Ok(Some(false)),
                _ => Err(E::invalid_value(de::Unexpected::Str(s), &self)),
            }
        }
    }
    d.deserialize_any(V)
}

/// A file mode, octal as in cloud-init: `'0644'`, or `0644` unquoted (which
/// serde_yaml_ng hands over as text because of the leading zero). A plain
/// number such as `644` is refused: decimal or octal, either guess would
/// surprise someone.
pub fn mode<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = Option<u32>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a quoted octal mode such as '0644'")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Option<u32>, E> {
            Ok(None)
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Option<u32>, E> {
            parse_mode(s).map(Some).map_err(E::custom)
        }
        fn visit_u64<E: de::Error>(self, n: u64) -> Result<Option<u32>, E> {
            Err(E::custom(format!(
                "unquoted number {n}: write the mode as a quoted octal string such as '0644'"
            )))
        }
        fn visit_i64<E: de::Error>(self, n: i64) -> Result<Option<u32>, E> {
            Err(E::custom(format!(
                "unquoted number {n}: write the mode as a quoted octal string such as '0644'"
            )))
        }
    }
    d.deserialize_any(V)
}

/// Parses an octal mode string (`0644`, `644`, `0o644`).
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.trim().trim_start_matches("0o");
    let m = u32::from_str_radix(digits, 8)
        .map_err(|_| format!("{s:?} is not an octal mode such as '0644'"))?;
    if digits.is_empty() || m > 0o7777 {
        return Err(format!("{s:?} is not an octal mode such as '0644'"));
    }
    Ok(m)
}

/// An `update.window.length`: minutes as a number, or `1h30m`, `90m`, `2h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Minutes(pub u32);

impl<'de> de::Deserialize<'de> for Minutes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Minutes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"1h30m\" or a number of minutes")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Minutes, E> {
                u32::try_from(n)
                    .map(Minutes)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(n), &self))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Minutes, E> {
                u32::try_from(n)
                    .map(Minutes)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(n), &self))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Minutes, E> {
                parse_duration_minutes(s)
                    .map(Minutes)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Str(s), &self))
            }
        }
        d.deserialize_any(V)
    }
}

/// `1h30m`, `90m`, `2h`, `45` (minutes).
pub fn parse_duration_minutes(s: &str) -> Option<u32> {
    let s = s.trim();
    if let Ok(n) = s.parse::<u32>() {
        return Some(n);
    }
    let mut total: u32 = 0;
    let mut num = String::new();
    let mut seen_unit = false;
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u32 = num.parse().ok()?;
        num.clear();
        let mul = match c {
            'h' => 60,
            'm' => 1,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(mul)?)?;
        seen_unit = true;
    }
    if !num.is_empty() || !seen_unit {
        return None;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_minutes("1h30m"), Some(90));
        assert_eq!(parse_duration_minutes("90m"), Some(90));
        assert_eq!(parse_duration_minutes("2h"), Some(120));
        assert_eq!(parse_duration_minutes("45"), Some(45));
        assert_eq!(parse_duration_minutes("1h30"), None);
        assert_eq!(parse_duration_minutes("h"), None);
        assert_eq!(parse_duration_minutes("1d"), None);
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0644"), Ok(0o644));
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert_eq!(parse_mode("0o755"), Ok(0o755));
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("").is_err());
        assert!(parse_mode("17777").is_err());
    }
}
