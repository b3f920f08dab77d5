//! The guest's serial console, which QEMU appends to a file.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub(crate) struct Console {
    path: PathBuf,
}

impl Console {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self { path }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The raw log; empty if QEMU has not created it yet.
    pub(crate) fn raw(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap_or_default()
    }

    /// Bytes written so far: a mark for [`Console::text_since`].
    pub(crate) fn len(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    /// Readable console text from byte offset `mark` on.
    pub(crate) fn text_since(&self, mark: u64) -> String {
        let raw = self.raw();
        let start = usize::try_from(mark).unwrap_or(usize::MAX).min(raw.len());
        clean(&String::from_utf8_lossy(&raw[start..]))
    }

    pub(crate) fn tail(&self, n: usize) -> String {
        tail_lines(&self.text_since(0), n)
    }
}

/// The last `n` lines of `text` (all of it if it is shorter).
pub fn tail_lines(text: &str, n: usize) -> String {
    let text = text.strip_suffix('\n').unwrap_or(text);
    if n == 0 || text.is_empty() {
        return String::new();
    }
    let mut newlines = text.rmatch_indices('\n');
    match newlines.nth(n - 1) {
        Some((at, _)) => text[at + 1..].to_string(),
        None => text.to_string(),
    }
}

/// Drops carriage returns and ANSI escape sequences (systemd's colours,
/// OVMF's cursor moves) so console text reads and matches plainly.
pub(crate) fn clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {}
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    // CSI: parameters and intermediates up to a final byte.
                    for c in chars.by_ref() {
                        if ('\u{40}'..='\u{7e}').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails() {
        let cases: [(&str, usize, &str); 7] = [
            ("a\nb\nc\n", 2, "b\nc"),
            ("a\nb\nc", 2, "b\nc"),
            ("a\nb\nc\n", 3, "a\nb\nc"),
            ("a\nb\nc\n", 10, "a\nb\nc"),
            ("a\nb\nc\n", 0, ""),
            ("", 5, ""),
            ("only", 1, "only"),
        ];
        for (text, n, want) in cases {
            assert_eq!(tail_lines(text, n), want, "tail_lines({text:?}, {n})");
        }
    }

    #[test]
    fn cleans_escapes() {
        let raw = "\u{1b}[0;32m  OK  \u{1b}[0m] Reached target \u{1b}[0;1;39mMulti-User\u{1b}[0m.\r\n\u{1b}c";
        assert_eq!(clean(raw), "  OK  ] Reached target Multi-User.\n");
    }

    #[test]
    fn reads_since_mark() {
        let dir = tempfile::tempdir().unwrap();
        let console = Console::new(dir.path().join("console.log"));
        assert_eq!(console.len(), 0);
        assert_eq!(console.tail(5), "");
        std::fs::write(console.path(), "boot 1\r\nlogin:\r\n").unwrap();
        let mark = console.len();
        std::fs::write(console.path(), "boot 1\r\nlogin:\r\nboot 2\r\n").unwrap();
        assert_eq!(console.text_since(mark), "boot 2\n");
        assert_eq!(console.tail(2), "login:\nboot 2");
    }
}
