//! `tollgate usage`: billing from usage records (docs/usage-records.md).
//!
//! Reads records as JSON lines — Envoy's usage access log (each line a record), or lines that
//! carry one under `"record"` (as an object, or as a JSON string, as an access log's
//! `json_format` writes `%FILTER_STATE(...)%`) — one line at a time: memory grows with the
//! number of groups, never with the number of records. Prints totals per identity / tier / model /
//! day / month as a table, CSV or JSON; an invoice per identity for one month (the policy's cost,
//! a per-tier markup, a price per request); or each record as a CloudEvent, as OpenMeter ingests
//! them.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};

use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tollgate_core::record::{Decision, Record};

/// What totals are grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    Identity,
    Tier,
    Model,
    Day,
    Month,
}

impl Dim {
    /// Parses `identity`, `tier`, `model`, `day`, `month`.
    pub fn parse(s: &str) -> Result<Dim, String> {
        Ok(match s.trim() {
            "identity" => Dim::Identity,
            "tier" => Dim::Tier,
            "model" => Dim::Model,
            "day" => Dim::Day,
            "month" => Dim::Month,
            other => return Err(format!("unknown grouping {other:?}: use identity, tier, model, day or month")),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Dim::Identity => "identity",
            Dim::Tier => "tier",
            Dim::Model => "model",
            Dim::Day => "day",
            Dim::Month => "month",
        }
    }

    fn of(self, r: &Record) -> String {
        match self {
            Dim::Identity => r.identity.clone(),
            Dim::Tier => r.tier.clone(),
            // What served it, else what was asked for (a refused request).
            Dim::Model => r.served_model.clone().unwrap_or_else(|| r.model.clone()),
            Dim::Day => utc(r.time_ms, "%Y-%m-%d"),
            Dim::Month => utc(r.time_ms, "%Y-%m"),
        }
    }
}

fn utc(ms: u64, format: &str) -> String {
    match Timestamp::from_millisecond(ms as i64) {
        Ok(t) => t.to_zoned(TimeZone::UTC).strftime(format).to_string(),
        Err(_) => "invalid-time".to_owned(),
    }
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Csv,
    Json,
}

impl Format {
    /// Parses `table`, `csv`, `json`.
    pub fn parse(s: &str) -> Result<Format, String> {
        match s {
            "table" => Ok(Format::Table),
            "csv" => Ok(Format::Csv),
            "json" => Ok(Format::Json),
            other => Err(format!("unknown format {other:?}: use table, csv or json")),
        }
    }
}

/// Totals of a group. Token sums count only what providers reported; `unreported` counts the
/// served requests whose provider reported no usage (billed at nothing here; settlement charged
/// their reservation to the limits).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub requests: u64,
    pub served: u64,
    pub denied: u64,
    pub unreported: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub cost_micro_usd: u64,
}

impl Totals {
    fn add(&mut self, r: &Record) {
        self.requests += 1;
        if matches!(r.decision, Decision::Blocked | Decision::Refused) {
            self.denied += 1;
        }
        if r.ending.as_deref() == Some("served") {
            self.served += 1;
            if r.input_tokens.is_none() && r.output_tokens.is_none() {
                self.unreported += 1;
            }
        }
        let add = |sum: &mut u64, v: Option<u64>| *sum = sum.saturating_add(v.unwrap_or(0));
        add(&mut self.input_tokens, r.input_tokens);
        add(&mut self.cached_input_tokens, r.cached_input_tokens);
        add(&mut self.output_tokens, r.output_tokens);
        add(&mut self.reasoning_tokens, r.reasoning_tokens);
        add(&mut self.cost_micro_usd, r.cost_micro_usd);
    }
}

/// The record a line carries, if any.
pub fn record_of(line: &str) -> Option<Record> {
    let line = line.trim();
    if !line.starts_with('{') {
        return None;
    }
    let value: Value = serde_json::from_str(line).ok()?;
    let inner = match value.get("record") {
        Some(Value::String(s)) => serde_json::from_str(s).ok()?,
        Some(v @ Value::Object(_)) => v.clone(),
        _ => value,
    };
    let record: Record = serde_json::from_value(inner).ok()?;
    (record.v == tollgate_core::record::VERSION).then_some(record)
}

/// What reading saw besides records.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Read {
    pub records: u64,
    pub skipped: u64,
}

/// Reads every record of `input`, calling `each` with it; a progress line goes to `progress`
/// every `every` lines (0: none).
pub fn read_records(input: &mut dyn BufRead, mut each: impl FnMut(&Record, &str), progress: &mut dyn Write, every: u64) -> std::io::Result<Read> {
    let mut read = Read::default();
    let mut line = String::new();
    let mut n = 0u64;
    loop {
        line.clear();
        if input.read_line(&mut line)? == 0 {
            break;
        }
        n += 1;
        match record_of(&line) {
            Some(r) => {
                read.records += 1;
                each(&r, line.trim());
            }
            None if line.trim().is_empty() => {}
            None => read.skipped += 1,
        }
        if every > 0 && n.is_multiple_of(every) {
            let _ = write!(progress, "\r{n} lines, {} records", read.records);
            let _ = progress.flush();
        }
    }
    if every > 0 {
        let _ = writeln!(progress, "\r{n} lines, {} records", read.records);
    }
    Ok(read)
}

/// Totals grouped by `by` (in that order), for records `keep` accepts.
pub fn summarize(input: &mut dyn BufRead, by: &[Dim], keep: &dyn Fn(&Record) -> bool, progress: &mut dyn Write, every: u64) -> std::io::Result<(BTreeMap<Vec<String>, Totals>, Read)> {
    let mut groups: BTreeMap<Vec<String>, Totals> = BTreeMap::new();
    let read = read_records(
        input,
        |r, _| {
            if keep(r) {
                groups.entry(by.iter().map(|d| d.of(r)).collect()).or_default().add(r);
            }
        },
        progress,
        every,
    )?;
    Ok((groups, read))
}

const COLUMNS: [&str; 9] = ["requests", "served", "denied", "unreported", "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens", "cost_usd"];

fn values(t: &Totals) -> [String; 9] {
    [
        t.requests.to_string(),
        t.served.to_string(),
        t.denied.to_string(),
        t.unreported.to_string(),
        t.input_tokens.to_string(),
        t.cached_input_tokens.to_string(),
        t.output_tokens.to_string(),
        t.reasoning_tokens.to_string(),
        usd(t.cost_micro_usd),
    ]
}

/// Micro-USD as dollars with six decimals (exact).
pub fn usd(micro: u64) -> String {
    format!("{}.{:06}", micro / 1_000_000, micro % 1_000_000)
}

/// Renders grouped totals.
pub fn render(groups: &BTreeMap<Vec<String>, Totals>, by: &[Dim], format: Format) -> String {
    let mut header: Vec<String> = by.iter().map(|d| d.name().to_owned()).collect();
    header.extend(COLUMNS.iter().map(|c| (*c).to_owned()));
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|(key, t)| {
            let mut row = key.clone();
            row.extend(values(t));
            row
        })
        .collect();
    match format {
        Format::Json => {
            let items: Vec<Value> = groups
                .iter()
                .map(|(key, t)| {
                    let mut o = serde_json::Map::new();
                    for (d, k) in by.iter().zip(key) {
                        o.insert(d.name().to_owned(), Value::from(k.as_str()));
                    }
                    if let Ok(Value::Object(totals)) = serde_json::to_value(t) {
                        o.extend(totals);
                    }
                    o.insert("cost_usd".to_owned(), Value::from(usd(t.cost_micro_usd)));
                    Value::Object(o)
                })
                .collect();
            format!("{}\n", Value::Array(items))
        }
        Format::Csv => table_csv(&header, &rows),
        Format::Table => table_text(&header, &rows),
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn table_csv(header: &[String], rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    for row in std::iter::once(header).chain(rows.iter().map(Vec::as_slice)) {
        out.push_str(&row.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(","));
        out.push('\n');
    }
    out
}

fn table_text(header: &[String], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, f) in widths.iter_mut().zip(row) {
            *w = (*w).max(f.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(header).chain(rows.iter().map(Vec::as_slice)) {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(f, w)| format!("{f:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// How usage becomes an invoice: the cost at the policy's prices, times the tier's markup
/// (default 1), plus a price per served request.
#[derive(Debug, Clone, Default)]
pub struct Pricing {
    /// tier → factor on cost.
    pub markup: BTreeMap<String, f64>,
    /// Micro-USD per served request.
    pub per_request_micro_usd: u64,
}

impl Pricing {
    fn charge(&self, tier: &str, t: &Totals) -> u64 {
        let factor = self.markup.get(tier).copied().unwrap_or(1.0);
        let cost = (t.cost_micro_usd as f64 * factor).round().min(u64::MAX as f64) as u64;
        cost.saturating_add(self.per_request_micro_usd.saturating_mul(t.served))
    }
}

/// One month's invoice lines: per identity, per tier and model, with the charge.
pub fn invoice(input: &mut dyn BufRead, month: &str, pricing: &Pricing, format: Format, progress: &mut dyn Write, every: u64) -> std::io::Result<(String, Read)> {
    let by = [Dim::Identity, Dim::Tier, Dim::Model];
    let (groups, read) = summarize(input, &by, &|r| utc(r.time_ms, "%Y-%m") == month, progress, every)?;
    let mut per_identity: BTreeMap<&str, u64> = BTreeMap::new();
    let mut lines = Vec::new();
    for (key, t) in &groups {
        let charge = pricing.charge(&key[1], t);
        *per_identity.entry(key[0].as_str()).or_default() += charge;
        lines.push((key, t, charge));
    }
    let out = match format {
        Format::Json => {
            let invoices: Vec<Value> = per_identity
                .iter()
                .map(|(identity, total)| {
                    let items: Vec<Value> = lines
                        .iter()
                        .filter(|(k, _, _)| k[0] == *identity)
                        .map(|(k, t, charge)| {
                            json!({ "tier": k[1], "model": k[2], "requests": t.served, "input_tokens": t.input_tokens,
                                    "cached_input_tokens": t.cached_input_tokens, "output_tokens": t.output_tokens,
                                    "cost_usd": usd(t.cost_micro_usd), "charge_usd": usd(*charge) })
                        })
                        .collect();
                    json!({ "identity": identity, "month": month, "lines": items, "total_usd": usd(*total) })
                })
                .collect();
            format!("{}\n", Value::Array(invoices))
        }
        Format::Csv | Format::Table => {
            let header: Vec<String> = ["identity", "month", "tier", "model", "requests", "input_tokens", "cached_input_tokens", "output_tokens", "cost_usd", "charge_usd"]
                .iter()
                .map(|s| (*s).to_owned())
                .collect();
            let mut rows: Vec<Vec<String>> = Vec::new();
            for (identity, total) in &per_identity {
                for (k, t, charge) in lines.iter().filter(|(k, _, _)| k[0] == *identity) {
                    rows.push(vec![
                        k[0].clone(),
                        month.to_owned(),
                        k[1].clone(),
                        k[2].clone(),
                        t.served.to_string(),
                        t.input_tokens.to_string(),
                        t.cached_input_tokens.to_string(),
                        t.output_tokens.to_string(),
                        usd(t.cost_micro_usd),
                        usd(*charge),
                    ]);
                }
                rows.push(vec![identity.to_string(), month.to_owned(), "total".into(), String::new(), String::new(), String::new(), String::new(), String::new(), String::new(), usd(*total)]);
            }
            if format == Format::Csv {
                table_csv(&header, &rows)
            } else {
                table_text(&header, &rows)
            }
        }
    };
    Ok((out, read))
}

/// A record as a CloudEvent (JSON format, specversion 1.0) as OpenMeter ingests usage: `subject`
/// the identity, `type` `tollgate.usage`, `id` the SHA-256 of the record's line (a record read
/// twice is the same event: consumers deduplicate on `source` + `id`), `data` the record's
/// fields without the ones the envelope carries.
pub fn cloud_event(record: &Record, line: &str, source: &str) -> Value {
    let id = Sha256::digest(line.as_bytes()).iter().map(|b| format!("{b:02x}")).collect::<String>();
    let time = Timestamp::from_millisecond(record.time_ms as i64).map(|t| t.to_string()).unwrap_or_default();
    let mut data = match serde_json::to_value(record) {
        Ok(Value::Object(o)) => o,
        _ => serde_json::Map::new(),
    };
    data.remove("identity");
    data.remove("time_ms");
    json!({
        "specversion": "1.0",
        "type": "tollgate.usage",
        "id": id,
        "source": source,
        "time": time,
        "subject": record.identity,
        "datacontenttype": "application/json",
        "data": data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINES: &str = r#"{"v":1,"time_ms":1796511540102,"identity":"tg1:q:aa","identity_source":"header","tier":"free","model":"gpt-4o-mini","served_model":"gpt-4o-mini","provider":"openai","upstream_model":"gpt-4o-mini","input_tokens":9,"output_tokens":8,"cost_micro_usd":7,"decision":"allowed","ending":"served","status":200,"stream":false,"ttfb_ms":4,"total_ms":4,"attempts":1}
{"v":1,"time_ms":1796511540109,"identity":"tg1:q:aa","identity_source":"header","tier":"free","model":"claude-sonnet","served_model":"claude-sonnet","provider":"anthropic","upstream_model":"claude-sonnet-4-5","input_tokens":9,"cached_input_tokens":4,"output_tokens":8,"cost_micro_usd":147,"decision":"allowed","ending":"served","status":200,"stream":false,"attempts":1}
not a record
{"v":1,"time_ms":1796511540125,"identity":"tg1:q:aa","identity_source":"header","tier":"free","model":"gpt-4o-mini","decision":"blocked","reason":"limit","limit":"requests/minute","status":429,"stream":false,"total_ms":0,"attempts":0}
{"start":"2026-12-05T23:00:00Z","record":"{\"v\":1,\"time_ms\":1796511540200,\"identity\":\"tg1:q:bb\",\"identity_source\":\"header\",\"tier\":\"pro\",\"model\":\"gpt-4o-mini\",\"served_model\":\"gpt-4o-mini\",\"decision\":\"allowed\",\"ending\":\"served\",\"status\":200,\"stream\":true,\"attempts\":1}"}
{"v":2,"time_ms":1,"identity":"x","identity_source":"header","tier":"t","model":"m","decision":"allowed","status":200,"stream":false,"attempts":0}
"#;

    #[test]
    fn totals_by_identity_and_model_count_what_providers_reported() {
        let mut sink = Vec::new();
        let (groups, read) = summarize(&mut LINES.as_bytes(), &[Dim::Identity, Dim::Model], &|_| true, &mut sink, 0).unwrap();
        assert_eq!(read, Read { records: 4, skipped: 2 }, "a line without a record and a v2 record are skipped");
        let gpt = &groups[&vec!["tg1:q:aa".to_owned(), "gpt-4o-mini".to_owned()]];
        assert_eq!((gpt.requests, gpt.served, gpt.denied, gpt.input_tokens, gpt.output_tokens, gpt.cost_micro_usd), (2, 1, 1, 9, 8, 7));
        let bb = &groups[&vec!["tg1:q:bb".to_owned(), "gpt-4o-mini".to_owned()]];
        assert_eq!((bb.served, bb.unreported, bb.input_tokens), (1, 1, 0), "unknown is not billed as zero tokens silently: it is counted");
        let table = render(&groups, &[Dim::Identity, Dim::Model], Format::Table);
        assert!(table.starts_with("identity  ") && table.contains("0.000147"), "{table}");
        let csv = render(&groups, &[Dim::Identity, Dim::Model], Format::Csv);
        assert_eq!(csv.lines().next(), Some("identity,model,requests,served,denied,unreported,input_tokens,cached_input_tokens,output_tokens,reasoning_tokens,cost_usd"));
        let json: Value = serde_json::from_str(&render(&groups, &[Dim::Day], Format::Json)).unwrap_or(Value::Null);
        assert!(json.is_array());
    }

    #[test]
    fn an_invoice_applies_the_tiers_markup_and_a_price_per_request() {
        let pricing = Pricing { markup: [("free".to_owned(), 2.0)].into(), per_request_micro_usd: 1000 };
        let mut sink = Vec::new();
        let (out, _) = invoice(&mut LINES.as_bytes(), "2026-12", &pricing, Format::Json, &mut sink, 0).unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        let aa = v.as_array().unwrap().iter().find(|i| i["identity"] == "tg1:q:aa").unwrap();
        // (7 + 147) × 2 + 2 served × 1000 = 2308 micro-USD
        assert_eq!(aa["total_usd"], "0.002308", "{aa}");
        let (other, _) = invoice(&mut LINES.as_bytes(), "2026-11", &pricing, Format::Csv, &mut sink, 0).unwrap();
        assert_eq!(other.lines().count(), 1, "another month: the header only");
    }

    #[test]
    fn usd_is_exact() {
        assert_eq!((usd(0), usd(7), usd(1_234_567)), ("0.000000".to_owned(), "0.000007".to_owned(), "1.234567".to_owned()));
    }
}
