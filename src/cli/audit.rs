//! `taskd audit`: the audit trail (who changed what, how it went), as a table or `--json`.
//!
//! The newest `--limit` records, printed oldest first so that the newest is the last line,
//! next to the prompt (as `journalctl -n` and `tail` print); `--reverse` prints newest
//! first (as `journalctl -r` and `git log`).

use std::path::PathBuf;

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};

use super::submit::{Remote, RemoteArgs};
use super::visible::visible;
use super::{exit, fmt_time, load_config, open_broker, print_json, Failure};
use crate::audit::AuditFilter;
use crate::model::now_ms;
use crate::view::{AuditPage, AuditView};

#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    /// Only records taken since then: a duration back from now ("2h", "1d 12h") or a time
    /// (RFC 3339 such as 2026-12-01T03:00:00Z, or Unix seconds).
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    /// Show the newest N records (0: all the store keeps).
    #[arg(long, short = 'n', value_name = "N", default_value_t = 50)]
    pub limit: usize,
    /// Newest first, as `journalctl -r` and `git log` print (by default the newest is last).
    #[arg(long, short = 'r')]
    pub reverse: bool,
    /// Print the records as a JSON array, in the table's order (the records of `GET
    /// /api/v1/audit`).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

pub async fn run(flag: Option<PathBuf>, args: AuditArgs) -> anyhow::Result<u8> {
    let mut records = match Remote::new(&args.remote) {
        Some(remote) => fetch_remote(&remote, args.since.as_deref(), args.limit)?,
        None => {
            let since = args
                .since
                .as_deref()
                .map(|s| crate::audit::parse_since(s, now_ms()))
                .transpose()
                .map_err(|e| Failure::usage(format!("--since: {e}")))?;
            let config = load_config(flag)?;
            let broker = open_broker(&config).await?;
            broker
                .audit_log(&AuditFilter {
                    since,
                    before: None,
                    limit: args.limit,
                })
                .await?
                .into_iter()
                .map(AuditView::from)
                .collect()
        }
    };
    // Read newest first; shown oldest first unless --reverse.
    if !args.reverse {
        records.reverse();
    }
    if args.json {
        print_json(&records)?;
        return Ok(exit::OK);
    }
    if records.is_empty() {
        println!(
            "no audit records{}",
            match &args.since {
                Some(s) => format!(" since {s}"),
                None => String::new(),
            }
        );
        return Ok(exit::OK);
    }
    println!("{}", table(&records));
    Ok(exit::OK)
}

/// The records as people read them: one row each, the detail on one line (a refused
/// reload's diagnostic has its fix on a second) and cut at 80 characters.
fn table(records: &[AuditView]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_header(vec!["time", "who", "action", "target", "outcome", "detail"]);
    for r in records {
        let mut detail = r.detail.split_whitespace().collect::<Vec<_>>().join(" ");
        if detail.chars().count() > 80 {
            detail = format!("{}…", detail.chars().take(79).collect::<String>());
        }
        table.add_row(vec![
            fmt_time(r.at),
            visible(&r.who).into_owned(),
            r.action.to_string(),
            visible(&r.target).into_owned(),
            r.outcome.to_string(),
            visible(&detail).into_owned(),
        ]);
    }
    table
}

/// `taskd audit --server URL`: the newest `limit` records through the API, a page (at most
/// 1000) at a time, newest first.
fn fetch_remote(
    remote: &Remote,
    since: Option<&str>,
    limit: usize,
) -> anyhow::Result<Vec<AuditView>> {
    let mut out: Vec<AuditView> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let want = if limit == 0 {
            1000
        } else {
            (limit - out.len()).min(1000)
        };
        let mut path = format!("/api/v1/audit?limit={want}");
        if let Some(s) = since {
            path.push_str(&format!("&since={}", query_escape(s)));
        }
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={}", query_escape(c)));
        }
        let v = remote.call("GET", &path, None)?;
        let page: AuditPage = serde_json::from_value(v).map_err(|e| {
            Failure::new(
                exit::FAILURE,
                format!(
                    "{}{path}: not a page of the audit trail: {e}",
                    remote.base()
                ),
            )
        })?;
        out.extend(page.records);
        match page.next_cursor {
            Some(c) if limit == 0 || out.len() < limit => cursor = Some(c),
            _ => break,
        }
    }
    Ok(out)
}

/// `s` as a query-string value: everything but unreserved characters percent-encoded.
fn query_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_values_are_escaped() {
        assert_eq!(super::query_escape("1d 12h"), "1d%2012h");
        assert_eq!(
            super::query_escape("2026-12-01T03:00:00+01:00"),
            "2026-12-01T03%3A00%3A00%2B01%3A00"
        );
    }
}
