//! Small value parsers shared by the validator: durations, byte sizes, and the edit distance
//! behind "did you mean …?". Pure functions over strings; they know nothing about TOML.

use std::time::Duration;

/// The longest duration any setting accepts. Other modules add durations to `Instant`s and
/// multiply them; a cap keeps every such sum far from overflow.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 60 * 60);

/// Why a duration string was refused, so the caller can phrase the message per key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DurationError {
    Negative,
    Zero,
    TooLong,
    Unparsable(String),
}

/// Parses a humantime duration ("90s", "1h 30m") that must be greater than zero.
pub(crate) fn parse_positive_duration(text: &str) -> Result<Duration, DurationError> {
    let t = text.trim();
    if t.starts_with('-') {
        return Err(DurationError::Negative);
    }
    if t.is_empty() {
        return Err(DurationError::Unparsable("it is empty".into()));
    }
    let d = humantime::parse_duration(t).map_err(|e| DurationError::Unparsable(e.to_string()))?;
    if d.is_zero() {
        return Err(DurationError::Zero);
    }
    if d > MAX_DURATION {
        return Err(DurationError::TooLong);
    }
    Ok(d)
}

/// Formats a duration the way a user would write it in the config ("1h 30m").
pub(crate) fn show_duration(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

/// The units [`parse_size`] accepts, for error messages.
pub(crate) const SIZE_UNITS: &str = "B, KB, MB, GB (1000-based) or KiB, MiB, GiB (1024-based)";

/// Parses a byte size: "512KiB", "1MiB", "2 MB", "100B" or a bare number of bytes.
///
/// KiB/MiB/GiB are powers of 1024, KB/MB/GB powers of 1000. Units are matched without regard
/// to case, since "kb" and "KB" can only mean one thing here.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.starts_with('-') {
        return Err("a size cannot be negative".into());
    }
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, rest) = t.split_at(digits_end);
    if digits.is_empty() {
        return Err(format!(
            "`{text}` is not a size: it must start with a whole number"
        ));
    }
    if rest.starts_with('.') || rest.starts_with(',') {
        return Err(format!(
            "`{text}` is not a size: write a whole number (use a smaller unit instead of a fraction)"
        ));
    }
    let unit = rest.trim_start();
    let factor: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1000 * 1000,
        "gb" => 1000 * 1000 * 1000,
        "kib" => 1024,
        "mib" => 1024 * 1024,
        "gib" => 1024 * 1024 * 1024,
        _ => {
            return Err(format!(
                "`{text}` is not a size: unknown unit `{unit}` (use {SIZE_UNITS})"
            ))
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a size: the number is too large"))?;
    n.checked_mul(factor)
        .ok_or_else(|| format!("`{text}` is not a size: it is too large"))
}

/// Formats a byte count in the largest 1024-based unit that divides it exactly.
pub(crate) fn show_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (factor, unit) in UNITS {
        if bytes >= factor && bytes.is_multiple_of(factor) {
            return format!("{}{unit}", bytes / factor);
        }
    }
    format!("{bytes}B")
}

/// The candidate closest to `word`, if it is within edit distance 2 (Levenshtein, over
/// characters); the first of equally close ones.
pub(crate) fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::levenshtein(word, c), *c))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_positive_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(
            parse_positive_duration("1h 30m"),
            Ok(Duration::from_secs(5400))
        );
        assert_eq!(parse_positive_duration("-5s"), Err(DurationError::Negative));
        assert_eq!(parse_positive_duration("0s"), Err(DurationError::Zero));
        assert_eq!(parse_positive_duration("400d"), Err(DurationError::TooLong));
        assert!(matches!(
            parse_positive_duration("5 parsecs"),
            Err(DurationError::Unparsable(_))
        ));
        assert!(matches!(
            parse_positive_duration(""),
            Err(DurationError::Unparsable(_))
        ));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2 MB"), Ok(2_000_000));
        assert_eq!(parse_size("3kb"), Ok(3000));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("100B"), Ok(100));
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("1.5MiB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("5 parsecs")
            .unwrap_err()
            .contains("unknown unit `parsecs`"));
        assert!(parse_size("-1KiB").unwrap_err().contains("negative"));
        assert!(parse_size("99999999999999999999GiB").is_err());
        assert!(parse_size("99999999999GiB").is_err());
    }

    #[test]
    fn show() {
        assert_eq!(show_size(64 * 1024), "64KiB");
        assert_eq!(show_size(1 << 20), "1MiB");
        assert_eq!(show_size(1000), "1000B");
        assert_eq!(show_duration(Duration::from_secs(5400)), "1h 30m");
    }

    #[test]
    fn suggestions() {
        assert_eq!(closest("", &[""]), Some(""));
        assert_eq!(closest("abc", &[""]), None); // 3 away
        assert_eq!(closest("kitten", &["sitting"]), None); // 3 away
        assert_eq!(closest("tmeot", &["timeout"]), Some("timeout")); // 2 away
        assert_eq!(closest("concurency", &["concurrency"]), Some("concurrency"));
        assert_eq!(closest("ab", &["ax", "ab"]), Some("ab"));
        assert_eq!(closest("ab", &["ax", "ay"]), Some("ax"));
        assert_eq!(
            closest("timout", &["timeout", "kill_grace"]),
            Some("timeout")
        );
        assert_eq!(closest("zzzzzz", &["timeout", "kill_grace"]), None);
    }
}
