//! Text a task wrote (its output, an error its worker reported, a unique key), made safe to
//! print for a person: control characters are shown as escapes (`\x1b`, `\r`, `\u{9b}`), so
//! that a task cannot set the operator's terminal title, clear the screen, or hide a line
//! behind a carriage return. Newlines and tabs are kept. Human output only: `--json` carries
//! the text as it is (JSON escapes control characters itself).

use std::borrow::Cow;
use std::fmt::Write;

/// `text` with every control character but `\n` and `\t` written as an escape.
pub fn visible(text: &str) -> Cow<'_, str> {
    if !text.chars().any(hidden) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            c if !hidden(c) => out.push(c),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
        }
    }
    Cow::Owned(out)
}

/// C0 controls (ESC, BEL, CR, backspace, …), DEL and the C1 controls (U+0080–U+009F, which
/// some terminals obey like ESC sequences), but not newline and tab.
fn hidden(character: char) -> bool {
    character.is_control() && character != '\n' && character != '\t'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_become_escapes() {
        assert!(matches!(visible("plain\ttext\n"), Cow::Borrowed(_)));
        assert_eq!(
            visible("\u{1b}]0;pwned\u{7}\u{1b}[2J"),
            "\\x1b]0;pwned\\x07\\x1b[2J"
        );
        assert_eq!(visible("ok\rfake"), "ok\\rfake");
        assert_eq!(visible("a\u{7f}b\u{9b}c"), "a\\x7fb\\u{9b}c");
        assert_eq!(visible("é ✓"), "é ✓");
    }
}
