//! TOML syntax errors: toml_edit's message turned into a diagnostic with the key it is about
//! (a queue or key defined twice) and a fix, such as quotes around an unquoted duration.

use super::{join_key, Cx, Span};

impl Cx<'_> {
    pub(in crate::config) fn syntax_error(&mut self, error: &toml_edit::TomlError) {
        // toml_edit's message may span several lines ("invalid table header\nduplicate key
        // ..."); the last line is the most specific.
        let lines: Vec<&str> = error
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let (mut key, mut message, mut fix) = (
            String::new(),
            format!("invalid TOML: {}", lines.join("; ")),
            Some(
                self.unquoted_hint(error.span())
                    .unwrap_or_else(|| "correct the TOML syntax at this position".to_string()),
            ),
        );
        if let Some((dup, table)) = lines.iter().find_map(|l| parse_duplicate(l)) {
            if table == "queues" {
                key = join_key("queues", &dup);
                message = format!("queue `{dup}` is defined twice");
                fix = Some(format!(
                    "keep one [queues.{dup}] table, or rename one of them"
                ));
            } else {
                key = join_key(&table, &dup);
                let place = if table.is_empty() {
                    "at the top level".to_string()
                } else {
                    format!("in [{table}]")
                };
                message = format!("`{dup}` is set twice {place}");
                fix = Some("remove one of them".into());
            }
        }
        self.error(error.span(), &key, message, fix);
    }

    /// `timeout = 5m` is the commonest syntax error in this file: a duration or size without
    /// quotes. Spot it on the error's line and say so.
    fn unquoted_hint(&self, span: Span) -> Option<String> {
        let start = span?.start.min(self.text.len());
        let line_start = self.text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line = self.text[line_start..].lines().next()?;
        let (key, value) = line.split_once('=')?;
        let value = value.split('#').next()?.trim();
        let looks_like_unit = value.starts_with(|c: char| c.is_ascii_digit())
            && value.contains(|c: char| c.is_ascii_alphabetic())
            && !value.contains(['"', '\'']);
        looks_like_unit.then(|| {
            format!(
                "durations and sizes are strings: write `{} = \"{value}\"`",
                key.trim()
            )
        })
    }
}

/// Pulls (key, table) out of toml_edit's "duplicate key `a` in table `queues`".
fn parse_duplicate(line: &str) -> Option<(String, String)> {
    let rest = line.strip_prefix("duplicate key `")?;
    let (key, rest) = rest.split_once('`')?;
    let key = unquote(key);
    let table = match rest.trim() {
        "in document root" | "" => String::new(),
        other => other
            .strip_prefix("in table `")?
            .strip_suffix('`')?
            .to_string(),
    };
    Some((key, table))
}

/// toml_edit shows a quoted key with its quotes; the name inside is what users call it.
fn unquote(key: &str) -> String {
    for q in ['"', '\''] {
        if key.len() >= 2 && key.starts_with(q) && key.ends_with(q) {
            return key[1..key.len() - 1].to_string();
        }
    }
    key.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_messages() {
        assert_eq!(
            parse_duplicate("duplicate key `a` in table `queues`"),
            Some(("a".into(), "queues".into()))
        );
        assert_eq!(
            parse_duplicate("duplicate key `\"a b\"` in table `queues`"),
            Some(("a b".into(), "queues".into()))
        );
        assert_eq!(
            parse_duplicate("duplicate key `x` in document root"),
            Some(("x".into(), String::new()))
        );
        assert_eq!(parse_duplicate("something else"), None);
    }
}
