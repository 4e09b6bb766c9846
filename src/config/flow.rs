//! Flow-control settings of a queue: the rate limit's value type, and the key values a task
//! is limited by, filled from its payload with the same placeholders as `command`.

use std::fmt;

use super::{ArgTemplate, QueueConfig};

/// `rate = "100/m"`: at most `starts` task starts per `period_ms`, spread evenly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub starts: u32,
    pub period_ms: i64,
}

impl Rate {
    /// Reads `N/s`, `N/m`, `N/h` or `N/d` (N from 1 to 1,000,000). The error says what is wrong.
    pub fn parse(text: &str) -> Result<Rate, String> {
        let (n, unit) = text.split_once('/').ok_or_else(|| {
            format!("{text:?} has no `/`: write starts per unit, such as \"100/m\"")
        })?;
        let starts: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("{text:?}: {:?} is not a whole number of starts", n.trim()))?;
        if starts == 0 || starts > 1_000_000 {
            return Err(format!(
                "{text:?}: the number of starts must be between 1 and 1000000"
            ));
        }
        let period_ms = match unit.trim() {
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            other => {
                return Err(format!(
                    "{text:?}: unknown unit {other:?}; the unit is s, m, h or d"
                ))
            }
        };
        Ok(Rate { starts, period_ms })
    }

    /// The time between two starts, in ms (GCRA's emission interval), never below 1 µs
    /// worth: kept as a float so that "1000000/d" stays exact enough.
    pub fn interval_ms(&self) -> f64 {
        self.period_ms as f64 / self.starts as f64
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.period_ms {
            1_000 => "s",
            60_000 => "m",
            3_600_000 => "h",
            _ => "d",
        };
        write!(f, "{}/{unit}", self.starts)
    }
}

/// The key values a task of `queue` is limited by: `(concurrency key, rate key)`, each
/// `None` when the queue sets no such key. `Err` when the payload cannot fill a key (a
/// missing or null field), in the words the submitter sees.
pub fn keys(
    queue: &QueueConfig,
    payload: &serde_json::Value,
) -> Result<(Option<String>, Option<String>), String> {
    let fill = |name: &str, t: &Option<ArgTemplate>| -> Result<Option<String>, String> {
        match t {
            None => Ok(None),
            Some(t) => t
                .render(payload)
                .map(Some)
                .map_err(|e| format!("queue `{}`: {name} \"{t}\": {}", queue.name, key_words(&e))),
        }
    };
    Ok((
        fill("concurrency_key", &queue.concurrency_key)?,
        fill("rate_key", &queue.rate_key)?,
    ))
}

/// The template's error speaks of "the command"; a key is not one.
fn key_words(error: &str) -> String {
    error
        .replace("the command needs", "the key needs")
        .replace("into the argument", "into the key")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read() {
        assert_eq!(
            Rate::parse("100/m").unwrap(),
            Rate {
                starts: 100,
                period_ms: 60_000
            }
        );
        assert_eq!(Rate::parse("5/s").unwrap().interval_ms(), 200.0);
        assert_eq!(Rate::parse("2/d").unwrap().to_string(), "2/d");
        assert!(Rate::parse("100").unwrap_err().contains("no `/`"));
        assert!(Rate::parse("0/s").unwrap_err().contains("between 1"));
        assert!(Rate::parse("x/s").unwrap_err().contains("whole number"));
        assert!(Rate::parse("3/w")
            .unwrap_err()
            .contains("unit is s, m, h or d"));
    }
}
