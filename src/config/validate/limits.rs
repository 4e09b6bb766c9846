//! The `limits` sub-keys: resource limits as counts, sizes or CPU seconds, or `"unlimited"`.
//! Which sub-keys exist is `keys::LIMITS`.

use super::super::units;
use super::{entries, keys, Cx, Entry, Section};
use crate::config::{limits, LimitValue, Limits};

impl Cx<'_> {
    /// `limits = { nofile, nproc, as, cpu, fsize, core }`.
    pub(in crate::config) fn limits(&mut self, entry: &Entry) -> Option<Limits> {
        let t = self.table(
            entry,
            "a table such as `limits = { nofile = 4096, nproc = 100, as = \"4GiB\", cpu = \"10m\" }`",
        )?;
        let mut out = Limits::default();
        for sub in entries(t, &entry.path) {
            if let Some(key) = keys::find(keys::LIMITS, sub.name) {
                (key.read)(self, &sub, &mut out);
            } else if matches!(sub.name, "memory" | "mem" | "rss" | "vmem" | "memlock") {
                self.error(
                    sub.key_span(),
                    &sub.path,
                    format!("unknown key `{}` in {}", sub.name, entry.path),
                    Some("limit memory with `as` (address space), such as `as = \"4GiB\"`".into()),
                );
            } else {
                let label = format!("in {}", entry.path);
                let valid: Vec<&str> = keys::names(keys::LIMITS).collect();
                self.unknown_key(&sub, Section::Limits, &label, &valid)
            }
        }
        Some(out)
    }

    /// The string forms every limit shares: `"unlimited"`, and a refused `"soft:hard"` pair.
    /// `Err(())`: an error was reported. `Ok(None)`: not one of them; read the value itself.
    fn limit_word(&mut self, entry: &Entry, unlimited_ok: bool) -> Result<Option<LimitValue>, ()> {
        let Some(s) = entry.item.as_str() else {
            return Ok(None);
        };
        let name = entry.name;
        if s.contains(':') {
            let soft = s.split(':').next().unwrap_or("").trim();
            self.error(
                entry.value_span(),
                &entry.path,
                format!("\"{s}\" looks like a soft:hard pair, which taskd does not take: one value sets both the soft and the hard limit"),
                Some(format!("write one value, such as `{name} = {}`", quote_unless_number(soft))),
            );
            return Err(());
        }
        if s.trim().eq_ignore_ascii_case("unlimited") {
            if unlimited_ok {
                return Ok(Some(LimitValue::Unlimited));
            }
            self.error(
                entry.value_span(),
                &entry.path,
                format!(
                    "{name} cannot be unlimited: the kernel caps open files at fs.nr_open ({})",
                    nr_open()
                ),
                Some(format!("write a number, such as `{name} = 65536`")),
            );
            return Err(());
        }
        Ok(None)
    }

    /// A count limit (`nofile`, `nproc`): an integer from 1 to `max`, or `"unlimited"`.
    pub(in crate::config) fn limit_count(
        &mut self,
        entry: &Entry,
        max: u64,
        unlimited_ok: bool,
    ) -> Option<LimitValue> {
        match self.limit_word(entry, unlimited_ok) {
            Err(()) => return None,
            Ok(Some(v)) => return Some(v),
            Ok(None) => {}
        }
        let example = if entry.name == "nofile" {
            "4096"
        } else {
            "100"
        };
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        self.int_in_range(entry, 1, max, example)
            .map(|n| LimitValue::Finite(n as u64)) // 1..=max: positive
    }

    /// A byte-size limit (`as`, `fsize`, `core`): bytes, a size string, or `"unlimited"`.
    pub(in crate::config) fn limit_size(
        &mut self,
        entry: &Entry,
        min: u64,
        example: &str,
    ) -> Option<LimitValue> {
        match self.limit_word(entry, true) {
            Err(()) => return None,
            Ok(Some(v)) => return Some(v),
            Ok(None) => {}
        }
        // u64::MAX is RLIM_INFINITY: a finite limit stays below it.
        self.size(entry, min, u64::MAX - 1, example)
            .map(LimitValue::Finite)
    }

    /// `cpu`: whole seconds, as an integer or a duration string, or `"unlimited"`.
    pub(in crate::config) fn limit_cpu(&mut self, entry: &Entry) -> Option<LimitValue> {
        match self.limit_word(entry, true) {
            Err(()) => return None,
            Ok(Some(v)) => return Some(v),
            Ok(None) => {}
        }
        if entry.item.is_integer() {
            return self
                .int_in_range(entry, 1, i64::MAX, "60")
                .map(|n| LimitValue::Finite(n as u64)); // positive
        }
        if !entry.item.is_str() {
            self.wrong_type(
                entry,
                "seconds (an integer) or a duration string such as \"10m\"",
                "write `cpu = 600` or `cpu = \"10m\"`".into(),
            );
            return None;
        }
        let d = self.duration(entry)?;
        if d.subsec_nanos() != 0 {
            self.error(
                entry.value_span(),
                &entry.path,
                format!(
                    "cpu time is limited in whole seconds, and {} is not",
                    units::show_duration(d)
                ),
                Some(format!("write `cpu = \"{}s\"`", d.as_secs() + 1)),
            );
            return None;
        }
        Some(LimitValue::Finite(d.as_secs()))
    }
}

/// `fs.nr_open`, the most open files a process may be allowed.
pub(in crate::config) fn nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(limits::NR_OPEN)
}

/// `text` as a TOML value: bare if it is a whole number, else quoted.
fn quote_unless_number(text: &str) -> String {
    if !text.is_empty() && text.chars().all(|c| c.is_ascii_digit()) {
        text.to_string()
    } else {
        format!("\"{text}\"")
    }
}
