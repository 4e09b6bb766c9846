//! The value types every table shares: tables, strings, integers, booleans, ranges,
//! durations, byte sizes and paths. Each reports a wrong value with the key, what was found
//! and a fix, and returns `None`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use toml_edit::TableLike;

use super::super::units::{self, DurationError};
use super::{resolve, Cx, Entry};

impl Cx<'_> {
    pub(in crate::config) fn wrong_type(&mut self, entry: &Entry, expected: &str, fix: String) {
        let message = format!("{} must be {expected}, found {}", entry.name, entry.found());
        self.error(entry.value_span(), &entry.path, message, Some(fix));
    }

    pub(in crate::config) fn table<'a>(
        &mut self,
        entry: &Entry<'a>,
        example: &str,
    ) -> Option<&'a dyn TableLike> {
        if let Some(t) = entry.item.as_table_like() {
            return Some(t);
        }
        self.wrong_type(entry, "a table", format!("write it as {example}"));
        None
    }

    pub(in crate::config) fn string<'a>(
        &mut self,
        entry: &Entry<'a>,
        example: &str,
    ) -> Option<&'a str> {
        if let Some(s) = entry.item.as_str() {
            return Some(s);
        }
        self.wrong_type(
            entry,
            "a string",
            format!("write it in quotes, such as `{} = {example}`", entry.name),
        );
        None
    }

    pub(in crate::config) fn integer(&mut self, entry: &Entry, example: &str) -> Option<i64> {
        if let Some(n) = entry.item.as_integer() {
            return Some(n);
        }
        let fix = match entry.item.as_str().map(|s| s.trim().parse::<i64>()) {
            Some(Ok(n)) => format!("remove the quotes: `{} = {n}`", entry.name),
            _ => format!("write a whole number, such as `{} = {example}`", entry.name),
        };
        self.wrong_type(entry, "an integer", fix);
        None
    }

    pub(in crate::config) fn boolean(&mut self, entry: &Entry) -> Option<bool> {
        if let Some(b) = entry.item.as_bool() {
            return Some(b);
        }
        self.wrong_type(
            entry,
            "a boolean",
            format!("write `{} = true` or `{} = false`", entry.name, entry.name),
        );
        None
    }

    /// An integer in `lo..=hi`.
    pub(in crate::config) fn int_in_range(
        &mut self,
        entry: &Entry,
        lo: i64,
        hi: i64,
        example: &str,
    ) -> Option<i64> {
        let n = self.integer(entry, example)?;
        if n < lo {
            let message = if n < 0 {
                format!(
                    "{} cannot be negative (found {n}); it must be at least {lo}",
                    entry.name
                )
            } else {
                format!("{} must be at least {lo}, found {n}", entry.name)
            };
            let fix = format!("set `{} = {lo}` or more", entry.name);
            self.error(entry.value_span(), &entry.path, message, Some(fix));
            return None;
        }
        if n > hi {
            let message = format!("{} must be at most {hi}, found {n}", entry.name);
            let fix = format!("set `{} = {hi}` or less", entry.name);
            self.error(entry.value_span(), &entry.path, message, Some(fix));
            return None;
        }
        Some(n)
    }

    pub(in crate::config) fn duration(&mut self, entry: &Entry) -> Option<Duration> {
        let name = entry.name;
        let Some(s) = entry.item.as_str() else {
            let fix = match entry.item.as_integer() {
                Some(n) if n > 0 => format!("a duration needs a unit: write `{name} = \"{n}s\"`"),
                _ => format!("write a duration in quotes, such as `{name} = \"30s\"`"),
            };
            self.wrong_type(entry, "a duration string such as \"30s\"", fix);
            return None;
        };
        match units::parse_positive_duration(s) {
            Ok(d) => Some(d),
            Err(err) => {
                let (message, fix) = match err {
                    DurationError::Negative => (
                        format!("{name} cannot be negative (found \"{s}\")"),
                        format!("write a positive duration, such as `{name} = \"30s\"`"),
                    ),
                    DurationError::Zero => (
                        format!("{name} must be longer than zero"),
                        format!("write a positive duration, such as `{name} = \"30s\"`"),
                    ),
                    DurationError::TooLong => (
                        format!(
                            "{name} is too long (\"{s}\"); the longest accepted is {}",
                            units::show_duration(units::MAX_DURATION)
                        ),
                        format!("write a shorter duration, such as `{name} = \"1h\"`"),
                    ),
                    DurationError::Unparsable(why) => (
                        format!("\"{s}\" is not a duration: {why}"),
                        "write a number and a unit, such as \"90s\", \"2m\", \"1h 30m\" or \"1d\""
                            .to_string(),
                    ),
                };
                self.error(entry.value_span(), &entry.path, message, Some(fix));
                None
            }
        }
    }

    /// How long finished tasks are kept (`keep_*`): a duration, or `"forever"`.
    pub(in crate::config) fn keep(&mut self, entry: &Entry) -> Option<crate::model::Keep> {
        let name = entry.name;
        match entry.item.as_str().map(str::trim) {
            Some(s) if s.eq_ignore_ascii_case("forever") => Some(crate::model::Keep::Forever),
            Some(s)
                if matches!(
                    s.to_ascii_lowercase().as_str(),
                    "never" | "none" | "0" | "inf" | "infinite"
                ) =>
            {
                let message = format!("{name} = \"{s}\" is not a retention time");
                let fix = format!(
                    "write how long finished tasks are kept, such as `{name} = \"7d\"`, or `{name} = \"forever\"` to never delete them"
                );
                self.error(entry.value_span(), &entry.path, message, Some(fix));
                None
            }
            Some(_) => self.duration(entry).map(crate::model::Keep::For),
            None => {
                let fix = match entry.item.as_integer() {
                    Some(n) if n > 0 => format!("a duration needs a unit: write `{name} = \"{n}d\"`"),
                    _ => format!("write a duration in quotes, such as `{name} = \"7d\"`, or `{name} = \"forever\"`"),
                };
                self.wrong_type(
                    entry,
                    "a duration string such as \"7d\", or \"forever\"",
                    fix,
                );
                None
            }
        }
    }

    /// A byte size (integer bytes or a string like "512KiB") in `min..=max`.
    pub(in crate::config) fn size(
        &mut self,
        entry: &Entry,
        min: u64,
        max: u64,
        example: &str,
    ) -> Option<u64> {
        let name = entry.name;
        let parsed = if let Some(n) = entry.item.as_integer() {
            u64::try_from(n).map_err(|_| format!("{name} cannot be negative (found {n})"))
        } else if let Some(s) = entry.item.as_str() {
            units::parse_size(s).map_err(|why| format!("{name}: {why}"))
        } else {
            self.wrong_type(
                entry,
                "a size (bytes, or a string such as \"512KiB\")",
                format!("write `{name} = \"{example}\"`"),
            );
            return None;
        };
        let n = match parsed {
            Ok(n) => n,
            Err(message) => {
                let fix = format!(
                    "write a whole number of bytes or a size such as `{name} = \"{example}\"` (units: {})",
                    units::SIZE_UNITS
                );
                self.error(entry.value_span(), &entry.path, message, Some(fix));
                return None;
            }
        };
        if n < min {
            let message = if min == 1 {
                format!("{name} must be more than zero")
            } else {
                format!("{name} must be at least {}", units::show_size(min))
            };
            let fix = format!("write a size such as `{name} = \"{example}\"`");
            self.error(entry.value_span(), &entry.path, message, Some(fix));
            return None;
        }
        if n > max {
            let message = format!(
                "{name} is too large ({}); the most accepted is {}",
                units::show_size(n),
                units::show_size(max)
            );
            let fix = format!("write `{name} = \"{}\"` or less", units::show_size(max));
            self.error(entry.value_span(), &entry.path, message, Some(fix));
            return None;
        }
        Some(n)
    }

    /// A path relative to the config file's directory (or absolute), made absolute.
    pub(in crate::config) fn path(&mut self, entry: &Entry, example: &str) -> Option<PathBuf> {
        let s = self.string(entry, &format!("\"{example}\""))?;
        let name = entry.name;
        let problem = if s.trim().is_empty() {
            Some(format!("{name} cannot be empty"))
        } else if s.contains('\0') {
            Some(format!("{name} cannot contain a NUL byte"))
        } else if s.starts_with('~') {
            Some(format!(
                "{name} starts with `~`, which taskd does not expand"
            ))
        } else if s.starts_with('$') {
            Some(format!(
                "{name} starts with `$`, and taskd does not expand environment variables"
            ))
        } else {
            None
        };
        if let Some(message) = problem {
            let fix = format!(
                "write an absolute path such as `{name} = \"{example}\"`, or one relative to the config file's directory"
            );
            self.error(entry.value_span(), &entry.path, message, Some(fix));
            return None;
        }
        Some(resolve(&self.dir, Path::new(s)))
    }
}
