//! `{field}` placeholders in a queue's `command` argv, filled from a task's JSON payload.
//!
//! Each argv element is parsed once, when the config is validated, so a malformed placeholder
//! is a config error and never a surprise at run time. Rendering only ever produces a single
//! argv element: a payload value can never split into several arguments or reach a shell.

use std::fmt;

/// One argv element of a queue's `command`, with its placeholders parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArgTemplate {
    text: String,
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field(String),
}

impl ArgTemplate {
    /// Parses `{field}` placeholders; `{{` and `}}` stand for literal braces.
    pub fn parse(text: &str) -> Result<ArgTemplate, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().enumerate().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, c)| c) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for (_, c) in chars.by_ref() {
                        if c == '}' {
                            closed = true;
                            break;
                        }
                        name.push(c);
                    }
                    if !closed {
                        return Err(format!(
                            "unclosed `{{` at character {}: close the placeholder with `}}`, or write `{{{{` for a literal `{{`",
                            i + 1
                        ));
                    }
                    check_field_name(&name)?;
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Field(name));
                }
                '}' if chars.peek().map(|&(_, c)| c) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '}' => {
                    return Err(format!(
                        "unmatched `}}` at character {}: write `}}}}` for a literal `}}`",
                        i + 1
                    ));
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(ArgTemplate {
            text: text.to_string(),
            parts,
        })
    }

    /// The payload fields this element needs, in order of appearance (repeats included).
    pub(crate) fn fields(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(f) => Some(f.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// Fills the placeholders from the top-level fields of a JSON object payload.
    ///
    /// Strings go in as they are; numbers and booleans as their JSON text; arrays and objects
    /// as compact JSON. A missing or null field is an error (the task cannot run as asked),
    /// each with its own message.
    pub(crate) fn render(&self, payload: &serde_json::Value) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Field(f) => {
                    let value = match payload.as_object().and_then(|o| o.get(f)) {
                        None => {
                            return Err(format!(
                                "payload has no field `{f}` (the command needs {{{f}}})"
                            ))
                        }
                        Some(serde_json::Value::Null) => {
                            return Err(format!(
                                "payload field `{f}` is null; {{{f}}} needs a string, number, boolean, array or object"
                            ))
                        }
                        Some(v) => v,
                    };
                    match value {
                        serde_json::Value::String(s) => out.push_str(s),
                        other => out.push_str(&other.to_string()),
                    }
                }
            }
        }
        // An argv element is a C string: a NUL would cut it short (or fail the spawn).
        if out.contains('\0') {
            return Err(format!(
                "the payload puts a NUL byte into the argument `{}`, which a program cannot receive",
                self.text
            ));
        }
        Ok(out)
    }

    /// True when the element begins with a placeholder (`{src}`, `{a}.png`): a value can
    /// then decide how the element starts, e.g. with `-`.
    pub(crate) fn starts_with_field(&self) -> bool {
        matches!(self.parts.first(), Some(Part::Field(_)))
    }

    /// True when the element holds no placeholder (it renders to itself, braces unescaped).
    pub(crate) fn is_literal(&self) -> bool {
        self.fields().next().is_none()
    }
}

impl fmt::Display for ArgTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn check_field_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return Err(
            "empty placeholder `{}`: name a payload field inside it, such as `{size}`, or write `{{}}` for literal braces"
                .into(),
        );
    };
    let trimmed = name.trim();
    let hint = if trimmed != name && is_field_name(trimmed) {
        format!(" (did you mean `{{{trimmed}}}`?)")
    } else {
        String::new()
    };
    if !(first.is_ascii_alphabetic() || first == '_') {
        return Err(format!(
            "invalid placeholder `{{{name}}}`: a field name must start with a letter or `_`, not {first:?}{hint}"
        ));
    }
    if let Some(bad) = chars.find(|c| !(c.is_ascii_alphanumeric() || *c == '_')) {
        return Err(format!(
            "invalid placeholder `{{{name}}}`: a field name may hold only ASCII letters, digits and `_`, not {bad:?}{hint}"
        ));
    }
    Ok(())
}

fn is_field_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parse_and_render() {
        let t = ArgTemplate::parse("--size={size}x{size}").unwrap();
        assert_eq!(t.fields().collect::<Vec<_>>(), ["size", "size"]);
        assert_eq!(t.render(&json!({"size": 64})).unwrap(), "--size=64x64");
        assert_eq!(t.to_string(), "--size={size}x{size}");
        assert!(!t.is_literal());
    }

    #[test]
    fn value_kinds() {
        let t = ArgTemplate::parse("{v}").unwrap();
        assert_eq!(t.render(&json!({"v": "a b"})).unwrap(), "a b");
        assert_eq!(t.render(&json!({"v": 1.5})).unwrap(), "1.5");
        assert_eq!(t.render(&json!({"v": true})).unwrap(), "true");
        assert_eq!(t.render(&json!({"v": [1, "x"]})).unwrap(), "[1,\"x\"]");
        assert_eq!(t.render(&json!({"v": {"a": 1}})).unwrap(), "{\"a\":1}");
    }

    #[test]
    fn missing_fields() {
        let t = ArgTemplate::parse("{size}").unwrap();
        let want = "payload has no field `size` (the command needs {size})";
        assert_eq!(t.render(&json!({})).unwrap_err(), want);
        assert_eq!(
            t.render(&json!({"size": null})).unwrap_err(),
            "payload field `size` is null; {size} needs a string, number, boolean, array or object"
        );
        assert_eq!(t.render(&json!([1, 2])).unwrap_err(), want);
        assert_eq!(t.render(&json!("size")).unwrap_err(), want);
        assert!(t.render(&json!({"size": "a\u{0}b"})).is_err());
    }

    #[test]
    fn escapes() {
        let t = ArgTemplate::parse("{{literal}} and {{{x}}}").unwrap();
        assert_eq!(t.fields().collect::<Vec<_>>(), ["x"]);
        assert_eq!(t.render(&json!({"x": 1})).unwrap(), "{literal} and {1}");
        assert_eq!(t.to_string(), "{{literal}} and {{{x}}}");
        let lit = ArgTemplate::parse("plain").unwrap();
        assert!(lit.is_literal());
        assert_eq!(lit.render(&json!(null)).unwrap(), "plain");
        assert_eq!(
            ArgTemplate::parse("").unwrap().render(&json!({})).unwrap(),
            ""
        );
    }

    #[test]
    fn errors_say_why() {
        let e = ArgTemplate::parse("{}").unwrap_err();
        assert!(e.contains("empty placeholder"), "{e}");
        let e = ArgTemplate::parse("a{1x}").unwrap_err();
        assert!(
            e.contains("`{1x}`") && e.contains("start with a letter"),
            "{e}"
        );
        let e = ArgTemplate::parse("{a b}").unwrap_err();
        assert!(e.contains("`{a b}`") && e.contains("' '"), "{e}");
        let e = ArgTemplate::parse("x{size").unwrap_err();
        assert!(e.contains("unclosed `{` at character 2"), "{e}");
        let e = ArgTemplate::parse("a}b").unwrap_err();
        assert!(e.contains("unmatched `}` at character 2"), "{e}");
        let e = ArgTemplate::parse("{ size }").unwrap_err();
        assert!(e.contains("did you mean `{size}`?"), "{e}");
        let e = ArgTemplate::parse("{a{b}}").unwrap_err();
        assert!(e.contains("'{'"), "{e}");
        assert!(ArgTemplate::parse("{é}").is_err());
        assert!(ArgTemplate::parse("{_ok9}").is_ok());
    }
}
