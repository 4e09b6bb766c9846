//! The flow-control keys' readers: a key template (`concurrency_key`, `rate_key`) and a
//! rate (`rate = "100/m"`).

use super::super::{ArgTemplate, Rate};
use super::{Cx, Entry};

impl Cx<'_> {
    /// A key made from the payload, as a `command` element: `"{customer}"`.
    pub(in crate::config) fn key_template(&mut self, entry: &Entry) -> Option<ArgTemplate> {
        let s = self.string(entry, "\"{customer}\"")?;
        if s.is_empty() {
            self.error(
                entry.value_span(),
                &entry.path,
                format!("{} is empty", entry.name),
                Some(format!(
                    "name the payload field the key is made of, such as `{} = \"{{customer}}\"`, or remove the key",
                    entry.name
                )),
            );
            return None;
        }
        match ArgTemplate::parse(s) {
            Ok(t) => Some(t),
            Err(why) => {
                self.error(
                    entry.value_span(),
                    &entry.path,
                    format!("{} {s:?}: {why}", entry.name),
                    Some(format!(
                        "write placeholders for payload fields, such as `{} = \"{{customer}}\"`",
                        entry.name
                    )),
                );
                None
            }
        }
    }

    /// `"100/m"`: starts per second, minute, hour or day.
    pub(in crate::config) fn rate(&mut self, entry: &Entry) -> Option<Rate> {
        let s = self.string(entry, "\"100/m\"")?;
        match Rate::parse(s) {
            Ok(r) => Some(r),
            Err(why) => {
                self.error(
                    entry.value_span(),
                    &entry.path,
                    format!("rate {why}"),
                    Some(
                        "write starts per unit, such as `rate = \"100/m\"` (units /s, /m, /h, /d)"
                            .into(),
                    ),
                );
                None
            }
        }
    }
}
