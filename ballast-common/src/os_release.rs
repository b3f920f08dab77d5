//! os-release(5): the image's identity (IMAGE_ID, IMAGE_VERSION) as image-build
//! writes it and os-agent reads it.

use std::collections::BTreeMap;

/// Parses os-release text into its variables, unquoting values. Malformed
/// lines are skipped, as systemd does.
pub fn parse(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        out.insert(k.to_string(), unquote(v));
    }
    out
}

fn unquote(v: &str) -> String {
    let v = v.trim();
    let inner = if v.len() >= 2
        && ((v.starts_with('"') && v.ends_with('"')) || (v.starts_with('\'') && v.ends_with('\'')))
    {
        &v[1..v.len() - 1]
    } else {
        v
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Quotes a value for os-release.
pub fn quote(v: &str) -> String {
    let mut out = String::from("\"");
    for c in v.chars() {
        if matches!(c, '"' | '\\' | '$' | '`') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quoted_and_bare_values() {
        let m = parse(
            "ID=debian\nIMAGE_VERSION=\"1.2.3\"\n# c\nPRETTY_NAME='A \\\"b\\\"'\nbad line\n=x\n",
        );
        assert_eq!(m["ID"], "debian");
        assert_eq!(m["IMAGE_VERSION"], "1.2.3");
        assert_eq!(m["PRETTY_NAME"], "A \"b\"");
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn quote_round_trips() {
        let v = "x \"y\" $z";
        let m = parse(&format!("K={}", quote(v)));
        assert_eq!(m["K"], v);
    }
}
