//! The tables the CLI prints for people, read back cell by cell so that tests can compare
//! each cell with what `--json` says (a column shifted by one is invisible to `--json`).
#![allow(dead_code)]

/// One printed table: its header and its rows, each cell trimmed.
#[derive(Debug, Clone)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// The index of column `name`; panics with the header when there is none.
    pub fn col(&self, name: &str) -> usize {
        self.header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no column {name:?} in {:?}", self.header))
    }

    /// The cell of `row` under column `name`.
    pub fn cell<'a>(&'a self, row: &'a [String], name: &str) -> &'a str {
        &row[self.col(name)]
    }

    /// The row whose first cell is `key`; panics with the table when there is none.
    pub fn row(&self, key: &str) -> &[String] {
        self.rows
            .iter()
            .find(|r| r[0] == key)
            .unwrap_or_else(|| panic!("no row {key:?} in {self:#?}"))
    }
}

/// Every table in `text` (comfy-table's UTF8_FULL_CONDENSED preset: `┌…┐`, `│ a ┆ b │`
/// rows, `╞═…╡` under the header, `└…┘`). Panics on a row whose cell count differs from
/// its header's, which is itself a defect worth a failure.
pub fn parse(text: &str) -> Vec<Table> {
    let mut tables = Vec::new();
    let mut current: Option<Vec<Vec<String>>> = None;
    for line in text.lines() {
        let line = line.trim_end();
        if line.starts_with('┌') {
            current = Some(Vec::new());
        } else if line.starts_with('└') {
            let mut lines = current.take().expect("a table closes after it opened");
            assert!(!lines.is_empty(), "an empty table in:\n{text}");
            let header = lines.remove(0);
            for r in &lines {
                assert_eq!(
                    r.len(),
                    header.len(),
                    "a row with {} cells under {} headers {header:?}: {r:?}",
                    r.len(),
                    header.len()
                );
            }
            tables.push(Table {
                header,
                rows: lines,
            });
        } else if let (Some(lines), Some(inner)) = (
            current.as_mut(),
            line.strip_prefix('│').and_then(|l| l.strip_suffix('│')),
        ) {
            lines.push(inner.split('┆').map(|c| c.trim().to_string()).collect());
        }
    }
    assert!(current.is_none(), "a table that never closes in:\n{text}");
    tables
}

/// The one table in `text` whose first header cell is `first`.
pub fn find(text: &str, first: &str) -> Table {
    let mut found: Vec<Table> = parse(text)
        .into_iter()
        .filter(|t| t.header.first().map(String::as_str) == Some(first))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one table headed {first:?} in:\n{text}"
    );
    found.remove(0)
}

/// A duration as the CLI prints it ("850ms", "1.2s", "3m 5s", "1h 2m 3s") in milliseconds.
pub fn duration_ms(s: &str) -> i64 {
    if let Some(ms) = s.strip_suffix("ms") {
        return ms
            .parse()
            .unwrap_or_else(|_| panic!("not a duration: {s:?}"));
    }
    if !s.contains(' ') {
        if let Some(secs) = s.strip_suffix('s').and_then(|v| v.parse::<f64>().ok()) {
            return (secs * 1000.0).round() as i64;
        }
    }
    let mut total = 0i64;
    for part in s.split_whitespace() {
        let digits: String = part.chars().take_while(|c| c.is_ascii_digit()).collect();
        let unit = &part[digits.len()..];
        let n: i64 = digits
            .parse()
            .unwrap_or_else(|_| panic!("not a duration: {s:?}"));
        total += n * match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "days" | "day" | "d" => 86_400_000,
            _ => panic!("unknown unit {unit:?} in {s:?}"),
        };
    }
    total
}
