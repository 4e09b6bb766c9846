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

/// `value` as compact JSON on one line, safe to print: JSON escapes the C0 controls itself;
/// DEL and the C1 controls, which it leaves as they are, are written as `\u007f`-style
/// escapes. Still valid JSON, the same value.
pub fn json_line(value: &serde_json::Value) -> String {
    let text = value.to_string();
    if !text.chars().any(hidden) {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if hidden(c) {
            // Only inside strings: JSON's own syntax is printable ASCII.
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
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

    #[test]
    fn json_lines_escape_every_control_and_stay_json() {
        let v = serde_json::json!({"t": "a\u{1b}[2J\u{7f}\u{9b}b\n", "n": [1, 2.5]});
        let line = json_line(&v);
        assert_eq!(line, r#"{"n":[1,2.5],"t":"a\u001b[2J\u007f\u009bb\n"}"#);
        assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&line).unwrap(), v);
    }
}
