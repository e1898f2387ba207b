//! The tier's limit messages, localized, and the three ways a warning reaches the client.
//!
//! ## Config (per tier)
//! ```json
//! "messages": {
//!   "default_locale": "en",
//!   "upgrade_url": "https://app.example.com/upgrade?plan=pro",
//!   "body_object": true,
//!   "block": { "en": "You have used {used} of your {limit} {metric} this {window}. It resets {reset}. Upgrade: {upgrade_url}",
//!              "ar": "لقد استخدمت {used} من أصل {limit} …" },
//!   "warn":  { "en": "You have used {percent}% of your {metric} for this {window}." }
//! }
//! ```
//! Every field is optional; unknown fields are errors. `Messages::validate` checks:
//! - locale tags (`default_locale` and every map key) are BCP 47-ish: a basic language range
//!   without the wildcard (RFC 4647 §2.1: `1*8ALPHA *("-" 1*8alphanum)`), e.g. `en`, `ar`,
//!   `pt-BR`. Tags compare case-insensitively; a map may not give one tag twice in two cases.
//! - `default_locale` (default `en`) has a template in every map that is given. A map that is
//!   not given uses the built-in English text (`BLOCK_EN`, `WARN_EN`).
//! - templates are non-empty and use only the placeholders below; `{{` and `}}` are literal
//!   braces, any other lone brace is an error. `{upgrade_url}` needs `upgrade_url` to be set.
//! - `upgrade_url` is an `http://` or `https://` URL with a host and no spaces or control
//!   characters.
//!
//! Every error names its path, e.g.
//! `tiers.free.messages.block.ar: unknown placeholder {usd} (expected one of: {limit}, …)`.
//!
//! ## Placeholders
//! | placeholder     | value                                                                   |
//! |-----------------|-------------------------------------------------------------------------|
//! | `{limit}`       | the quota, e.g. `10000`                                                 |
//! | `{used}`        | what was counted, e.g. `8123`                                           |
//! | `{remaining}`   | `limit - used`, never below 0                                           |
//! | `{percent}`     | `used * 100 / limit` rounded down (`100` when the limit is 0; can exceed 100) |
//! | `{metric}`      | what is counted, as the caller names it: `requests`, `total tokens`     |
//! | `{window}`      | the window, as the caller names it: `day`, `minute`, `rate`             |
//! | `{reset}`       | when the window resets, RFC 3339 UTC to the second: `2026-11-22T00:00:00Z` |
//! | `{reset_in}`    | the time until then in OpenAI's duration text: `6m0s` (see `crate::duration`) |
//! | `{upgrade_url}` | the tier's `upgrade_url`                                                |
//!
//! Numbers are ASCII digits without grouping in every locale; `{metric}` and `{window}` are
//! inserted as given (a translated template may prefer its own words to them).
//!
//! ## Choosing the locale
//! The locale is chosen from `Accept-Language` (RFC 9110 §12.5.4) by RFC 4647 §3.4
//! *lookup*: ranges are taken by weight, highest first (header order breaks ties); for each,
//! "the language range is progressively truncated from the end until a matching language tag is
//! located" (`ar-SA` finds `ar`; a range never finds a longer tag: `pt` does not find `pt-BR`),
//! a single-letter subtag left at the end is removed with it, and the wildcard `*` is ignored.
//! A range with `q=0` is "not acceptable" (RFC 9110 §12.4.2): a tag it names exactly is never
//! chosen by lookup. RFC 4647 leaves the last step to us ("Each application, protocol, or
//! specification that uses lookup MUST define the defaulting behavior when no tag matches"):
//! when nothing matches — no header, only garbage, only `*` — the answer is `default_locale`.
//! Malformed elements of the header are skipped; the rest still count.
//!
//! ## How a warning reaches the client
//! A warning must not break a client that knows nothing about Tollgate, so there are three
//! channels, all pure functions here; the adapter picks and applies them:
//! 1. `warning_header` — the `x-tollgate-warning` response header, always safe to add. ASCII
//!    only (a header cannot carry Arabic reliably), so it holds the facts, not the text: an
//!    RFC 8941 structured-field dictionary,
//!    `metric="total tokens", window="day", limit=10000, used=8123, remaining=1877, percent=81, threshold=80, reset=1795305600`.
//! 2. `body_object` + `inject_into_completion` — when the tier has `body_object: true`, a
//!    `"tollgate"` member added to a non-streamed chat-completion body, with the localized text.
//! 3. `body_object` + `sse_comment` — for a streamed response, the same object in an SSE
//!    comment line, which every conforming client ignores (WHATWG HTML, server-sent events:
//!    "If the line starts with a U+003A COLON character (:) — Ignore the line.").

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ConfigError;
use crate::duration::openai_duration;
use crate::sse::write_comment;

/// The warning a soft limit asks the response to carry.
#[derive(Debug, Clone, PartialEq)]
pub struct Warning {
    /// `x-tollgate-warning` (ASCII).
    pub header: String,
    /// The `tollgate` object for JSON bodies / the SSE comment, when the tier opts in.
    pub object: Option<Value>,
}

/// The member [`inject_into_completion`] adds to a completion body.
pub(crate) const BODY_MEMBER: &str = "tollgate";

/// The built-in block text (English), used when a tier gives no `block` templates.
pub(crate) const BLOCK_EN: &str =
    "Usage limit reached for {metric} ({window}): Limit {limit}, Used {used}. Please try again in {reset_in}.";

/// The built-in warning text (English), used when a tier gives no `warn` templates.
pub(crate) const WARN_EN: &str = "You have used {percent}% of your {metric} limit ({window}): Limit {limit}, Used {used}, \
                           Remaining {remaining}. It resets in {reset_in}.";

/// The `messages` object of a tier as written; [`Messages::validate`] checks it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMessages {
    default_locale: Option<String>,
    upgrade_url: Option<String>,
    #[serde(default)]
    body_object: bool,
    block: Option<BTreeMap<String, String>>,
    warn: Option<BTreeMap<String, String>>,
}

/// Which message: the one for a refused request, or the one for a warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MessageKind {
    Block,
    Warn,
}

/// What a message is about. `metric` and `window` are the caller's words, inserted as given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LimitFacts<'a> {
    /// What is counted, e.g. `requests`, `total tokens`, `cost (USD)`.
    pub metric: &'a str,
    /// The window, e.g. `day`, `minute`, `rate`.
    pub window: &'a str,
    pub limit: u64,
    pub used: u64,
    /// When the window resets, epoch milliseconds.
    pub reset_at_ms: u64,
    /// Now, epoch milliseconds (for `{reset_in}`).
    pub now_ms: u64,
}

impl LimitFacts<'_> {
    /// `limit - used`, never below 0.
    pub fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.used)
    }

    /// `used * 100 / limit` rounded down, so a warning never claims more than was used; 100 when
    /// the limit is 0. Above 100 when more than the limit was counted (tokens are counted after
    /// the fact).
    pub fn percent(&self) -> u64 {
        if self.limit == 0 {
            return 100;
        }
        u64::try_from(u128::from(self.used) * 100 / u128::from(self.limit)).unwrap_or(u64::MAX)
    }

    /// Milliseconds until the reset; 0 when it has passed.
    pub fn reset_in_ms(&self) -> u64 {
        self.reset_at_ms.saturating_sub(self.now_ms)
    }
}

/// A rendered message and the locale it is in (a configured tag, as the config spells it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The message, placeholders filled.
    pub text: String,
    /// The locale tag it is in, as the config spells it.
    pub locale: String,
}

/// A tier's validated messages. [`Messages::default`] is the built-in English texts, no upgrade
/// URL and no body object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Messages {
    block: Templates,
    warn: Templates,
    upgrade_url: Option<String>,
    body_object: bool,
}

impl Default for Messages {
    fn default() -> Self {
        Messages {
            block: Templates::builtin(BLOCK_EN),
            warn: Templates::builtin(WARN_EN),
            upgrade_url: None,
            body_object: false,
        }
    }
}

impl Messages {
    /// Validates a tier's `messages`; `path` is where it sits (`tiers.free.messages`) and
    /// prefixes every error's path.
    pub(crate) fn validate(raw: RawMessages, path: &str) -> Result<Messages, ConfigError> {
        let default_locale = match raw.default_locale {
            Some(tag) if is_locale_tag(&tag) => tag,
            Some(tag) => return Err(invalid(format!("{path}.default_locale"), bad_tag(&tag))),
            None => "en".to_owned(),
        };
        if let Some(url) = &raw.upgrade_url {
            check_url(url).map_err(|message| invalid(format!("{path}.upgrade_url"), message))?;
        }
        let has_url = raw.upgrade_url.is_some();
        let templates = |map: Option<BTreeMap<String, String>>, kind: &str, builtin: &str| match map {
            Some(map) => Templates::validate(map, &default_locale, has_url, &format!("{path}.{kind}")),
            None => Ok(Templates::builtin(builtin)),
        };
        Ok(Messages {
            block: templates(raw.block, "block", BLOCK_EN)?,
            warn: templates(raw.warn, "warn", WARN_EN)?,
            upgrade_url: raw.upgrade_url,
            body_object: raw.body_object,
        })
    }

    /// The locale `kind`'s message is rendered in for a request with this `Accept-Language`
    /// (see the module docs). Never fails: anything unusable falls back to `default_locale`.
    #[cfg(test)]
    pub(crate) fn negotiate(&self, kind: MessageKind, accept_language: Option<&str>) -> &str {
        &self.templates(kind).lookup(accept_language).locale
    }

    /// `kind`'s message in the negotiated locale, placeholders filled from `facts`.
    pub(crate) fn render(&self, kind: MessageKind, accept_language: Option<&str>, facts: &LimitFacts) -> Rendered {
        let chosen = self.templates(kind).lookup(accept_language);
        Rendered { text: chosen.template.render(facts, self.upgrade_url()), locale: chosen.locale.clone() }
    }

    pub(crate) fn upgrade_url(&self) -> Option<&str> {
        self.upgrade_url.as_deref()
    }

    /// Whether the tier wants the `"tollgate"` object in bodies and streams (see
    /// `body_object`).
    pub fn body_object(&self) -> bool {
        self.body_object
    }

    fn templates(&self, kind: MessageKind) -> &Templates {
        match kind {
            MessageKind::Block => &self.block,
            MessageKind::Warn => &self.warn,
        }
    }
}

fn invalid(path: String, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { path, message: message.into() }
}

fn bad_tag(tag: &str) -> String {
    format!("invalid locale tag {tag:?} (expected a BCP 47 tag such as en, ar or pt-BR)")
}

/// RFC 4647 §2.1 basic language range without the wildcard: `1*8ALPHA *("-" 1*8alphanum)`.
fn is_locale_tag(tag: &str) -> bool {
    let mut subtags = tag.split('-');
    let first_ok =
        subtags.next().is_some_and(|s| (1..=8).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphabetic()));
    first_ok && subtags.all(|s| (1..=8).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric()))
}

fn check_url(url: &str) -> Result<(), String> {
    let rest = url.split_once("://").and_then(|(scheme, rest)| {
        (scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")).then_some(rest)
    });
    let Some(rest) = rest else {
        return Err(format!("must be an http:// or https:// URL, got {url:?}"));
    };
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("must not contain spaces or control characters (percent-encode them): {url:?}"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    if host.is_empty() || host.starts_with(':') {
        return Err(format!("has no host: {url:?}"));
    }
    Ok(())
}

/// One kind's templates: the default locale's, then the others in the config's (sorted) order.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Templates {
    default: Localized,
    others: Vec<Localized>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Localized {
    locale: String,
    template: Template,
}

impl Templates {
    fn builtin(text: &str) -> Templates {
        // The built-in texts are tested to parse; the fallback only keeps this path panic-free.
        let template = Template::parse(text).unwrap_or_else(|_| Template(vec![Piece::Text(text.to_owned())]));
        Templates { default: Localized { locale: "en".to_owned(), template }, others: vec![] }
    }

    fn validate(
        map: BTreeMap<String, String>,
        default_locale: &str,
        has_url: bool,
        path: &str,
    ) -> Result<Templates, ConfigError> {
        let mut all: Vec<Localized> = Vec::with_capacity(map.len());
        for (tag, text) in map {
            let path = format!("{path}.{tag}");
            if !is_locale_tag(&tag) {
                return Err(invalid(path, bad_tag(&tag)));
            }
            if let Some(other) = all.iter().find(|l| l.locale.eq_ignore_ascii_case(&tag)) {
                let message =
                    format!("locale {tag:?} is given twice (also as {:?}; tags are case-insensitive)", other.locale);
                return Err(invalid(path, message));
            }
            let template = Template::parse(&text).map_err(|message| invalid(path.clone(), message))?;
            if !has_url && template.uses(Placeholder::UpgradeUrl) {
                return Err(invalid(path, "uses {upgrade_url} but upgrade_url is not set"));
            }
            all.push(Localized { locale: tag, template });
        }
        let Some(at) = all.iter().position(|l| l.locale.eq_ignore_ascii_case(default_locale)) else {
            return Err(invalid(
                path.to_owned(),
                format!("no template for the default locale {default_locale:?} (every template map needs one)"),
            ));
        };
        let default = all.remove(at);
        Ok(Templates { default, others: all })
    }

    fn iter(&self) -> impl Iterator<Item = &Localized> {
        std::iter::once(&self.default).chain(&self.others)
    }

    /// RFC 4647 §3.4 lookup over the header's ranges (see the module docs).
    fn lookup(&self, accept_language: Option<&str>) -> &Localized {
        let Some(header) = accept_language else {
            return &self.default;
        };
        let ranges = language_ranges(header);
        // A tag named exactly by a q=0 range is not acceptable. Computed once per tag, so a
        // hostile header costs O(ranges × tags), not more.
        let candidates: Vec<(&Localized, bool)> = self
            .iter()
            .map(|l| (l, ranges.iter().any(|r| r.q == 0 && r.range.eq_ignore_ascii_case(&l.locale))))
            .collect();
        for r in ranges.iter().filter(|r| r.q > 0 && r.range != "*") {
            let mut range = r.range;
            loop {
                let found = candidates.iter().find(|(l, _)| l.locale.eq_ignore_ascii_case(range));
                if let Some((l, false)) = found {
                    return l;
                }
                let Some((head, _)) = range.rsplit_once('-') else { break };
                range = head;
                // "zh-Hant-CN-x-private1" is followed by "zh-Hant-CN": a trailing singleton
                // goes with the subtag after it.
                if let Some((head, last)) = range.rsplit_once('-') {
                    if last.len() == 1 {
                        range = head;
                    }
                }
            }
        }
        &self.default
    }
}

/// A language range of `Accept-Language` with its weight in thousandths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LanguageRange<'h> {
    range: &'h str,
    q: u16,
}

/// The usable elements of an `Accept-Language` value, highest weight first, header order kept
/// among equal weights. RFC 9110 §12.5.4:
///
/// ```text
/// Accept-Language = #( language-range [ weight ] )
/// weight = OWS ";" OWS "q=" qvalue
/// qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )
/// ```
/// and RFC 4647 §2.1 `language-range = (1*8ALPHA *("-" 1*8alphanum)) / "*"`. An element that
/// does not fit (a bad range, a bad weight, another parameter) is skipped; empty list elements
/// are allowed (RFC 9110 §5.6.1). The `q` is matched case-insensitively, as parameter names are.
fn language_ranges(header: &str) -> Vec<LanguageRange<'_>> {
    const OWS: [char; 2] = [' ', '\t'];
    let mut out = Vec::new();
    for element in header.split(',') {
        let mut parts = element.split(';');
        let range = parts.next().unwrap_or("").trim_matches(OWS);
        if range.is_empty() || !(range == "*" || is_locale_tag(range)) {
            continue;
        }
        let mut q = Some(1000);
        for param in parts {
            let param = param.trim_matches(OWS);
            let value = param.strip_prefix("q=").or_else(|| param.strip_prefix("Q="));
            q = q.and(value.and_then(qvalue));
        }
        if let Some(q) = q {
            out.push(LanguageRange { range, q });
        }
    }
    out.sort_by_key(|r| std::cmp::Reverse(r.q)); // stable: equal weights keep header order
    out
}

/// `qvalue` in thousandths.
fn qvalue(v: &str) -> Option<u16> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut thousandths: u16 = 0;
    for i in 0..3 {
        let digit = frac.as_bytes().get(i).map_or(0, |b| u16::from(b - b'0'));
        thousandths = thousandths * 10 + digit;
    }
    match int {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placeholder {
    Limit,
    Used,
    Remaining,
    Percent,
    Metric,
    Window,
    Reset,
    ResetIn,
    UpgradeUrl,
}

impl Placeholder {
    const ALL: [Placeholder; 9] = [
        Placeholder::Limit,
        Placeholder::Used,
        Placeholder::Remaining,
        Placeholder::Percent,
        Placeholder::Metric,
        Placeholder::Window,
        Placeholder::Reset,
        Placeholder::ResetIn,
        Placeholder::UpgradeUrl,
    ];

    fn name(self) -> &'static str {
        match self {
            Placeholder::Limit => "limit",
            Placeholder::Used => "used",
            Placeholder::Remaining => "remaining",
            Placeholder::Percent => "percent",
            Placeholder::Metric => "metric",
            Placeholder::Window => "window",
            Placeholder::Reset => "reset",
            Placeholder::ResetIn => "reset_in",
            Placeholder::UpgradeUrl => "upgrade_url",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Field(Placeholder),
}

/// A parsed template: literal text and placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Template(Vec<Piece>);

impl Template {
    /// Parses a template; the error is the message for the template's path. Positions count
    /// characters from 1 (an Arabic template's byte offsets would mean nothing to its author).
    fn parse(text: &str) -> Result<Template, String> {
        if text.is_empty() {
            return Err("must not be empty".to_owned());
        }
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut chars = text.char_indices().enumerate().peekable();
        while let Some((n, (at, c))) = chars.next() {
            match c {
                '{' | '}' if chars.peek().is_some_and(|&(_, (_, next))| next == c) => {
                    chars.next();
                    literal.push(c);
                }
                '}' => {
                    return Err(format!(
                        "unbalanced brace: \"}}\" at character {} was not opened (write \"}}}}\" for a literal \"}}\")",
                        n + 1
                    ));
                }
                '{' => {
                    let mut end = None;
                    while let Some(&(_, (i, d))) = chars.peek() {
                        if d == '{' {
                            break;
                        }
                        chars.next();
                        if d == '}' {
                            end = Some(i);
                            break;
                        }
                    }
                    let Some(end) = end else {
                        return Err(format!(
                            "unbalanced brace: \"{{\" at character {} is not closed (write \"{{{{\" for a literal \"{{\")",
                            n + 1
                        ));
                    };
                    let name = &text[at + 1..end];
                    let Some(field) = Placeholder::ALL.into_iter().find(|p| p.name() == name) else {
                        let known: Vec<String> = Placeholder::ALL.iter().map(|p| format!("{{{}}}", p.name())).collect();
                        return Err(format!("unknown placeholder {{{name}}} (expected one of: {})", known.join(", ")));
                    };
                    if !literal.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut literal)));
                    }
                    pieces.push(Piece::Field(field));
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            pieces.push(Piece::Text(literal));
        }
        Ok(Template(pieces))
    }

    fn uses(&self, field: Placeholder) -> bool {
        self.0.contains(&Piece::Field(field))
    }

    fn render(&self, facts: &LimitFacts, upgrade_url: Option<&str>) -> String {
        let mut out = String::new();
        for piece in &self.0 {
            // Writing to a String cannot fail.
            let _ = match piece {
                Piece::Text(text) => out.write_str(text),
                Piece::Field(Placeholder::Limit) => write!(out, "{}", facts.limit),
                Piece::Field(Placeholder::Used) => write!(out, "{}", facts.used),
                Piece::Field(Placeholder::Remaining) => write!(out, "{}", facts.remaining()),
                Piece::Field(Placeholder::Percent) => write!(out, "{}", facts.percent()),
                Piece::Field(Placeholder::Metric) => out.write_str(facts.metric),
                Piece::Field(Placeholder::Window) => out.write_str(facts.window),
                Piece::Field(Placeholder::Reset) => out.write_str(&rfc3339(facts.reset_at_ms)),
                Piece::Field(Placeholder::ResetIn) => out.write_str(&openai_duration(facts.reset_in_ms())),
                Piece::Field(Placeholder::UpgradeUrl) => out.write_str(upgrade_url.unwrap_or("")),
            };
        }
        out
    }
}

/// The latest instant RFC 3339 can write (a four-digit year): 9999-12-31T23:59:59Z.
const MAX_RFC3339_SECS: u64 = 253_402_300_799;

/// `epoch_ms` as an RFC 3339 UTC timestamp to the second, e.g. `2026-11-22T00:00:00Z`.
/// A fraction of a second rounds up (a client that waits until then is never early); instants
/// after 9999-12-31T23:59:59Z are written as that.
pub fn rfc3339(epoch_ms: u64) -> String {
    let secs = epoch_secs_ceil(epoch_ms).min(MAX_RFC3339_SECS);
    // humantime writes years up to 9999 only (its Display fails beyond): the cap keeps it there.
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)).to_string()
}

fn epoch_secs_ceil(epoch_ms: u64) -> u64 {
    epoch_ms.div_ceil(1000)
}

/// The largest RFC 8941 sf-integer.
const SF_INTEGER_MAX: u64 = 999_999_999_999_999;

/// The value of the [`crate::headers::WARNING_HEADER`]: an RFC 8941 structured-field dictionary (§3.2) of the
/// facts, members in this order:
///
/// ```text
/// metric="total tokens", window="day", limit=10000, used=8123, remaining=1877, percent=81, threshold=80, reset=1795305600
/// ```
/// - `metric`, `window`: sf-strings (§3.3.3). Only printable ASCII can be written; `"` and `\`
///   are escaped with `\`, any other character is replaced by `?`.
/// - `limit`, `used`, `remaining`, `percent` (as [`LimitFacts::percent`]), `threshold` (the
///   warning threshold that was crossed, in percent): sf-integers (§3.3.1), capped at
///   999999999999999, the largest the format allows.
/// - `reset`: the reset instant in epoch seconds, rounded up.
///
/// Always printable ASCII, so it is a valid header value on every host. Parsers that know
/// RFC 8941 read it as a dictionary; a client that does not can split on `, ` and `=`.
pub(crate) fn warning_header(facts: &LimitFacts, threshold_percent: u32) -> String {
    let mut out = String::with_capacity(160);
    out.push_str("metric=");
    push_sf_string(&mut out, facts.metric);
    out.push_str(", window=");
    push_sf_string(&mut out, facts.window);
    let integers = [
        ("limit", facts.limit),
        ("used", facts.used),
        ("remaining", facts.remaining()),
        ("percent", facts.percent()),
        ("threshold", u64::from(threshold_percent)),
        ("reset", epoch_secs_ceil(facts.reset_at_ms)),
    ];
    for (key, value) in integers {
        let _ = write!(out, ", {key}={}", value.min(SF_INTEGER_MAX));
    }
    out
}

/// RFC 8941 §3.3.3: `sf-string = DQUOTE *chr DQUOTE`, `unescaped = %x20-21 / %x23-5B / %x5D-7E`,
/// `escaped = "\" ( DQUOTE / "\" )`.
fn push_sf_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('?'),
        }
    }
    out.push('"');
}

/// The `"tollgate"` object for bodies and streams:
///
/// ```json
/// {"limit":10000,"locale":"ar","message":"…","metric":"total tokens","percent":81,
///  "remaining":1877,"reset":"2026-11-22T00:00:00Z","upgrade_url":"https://…","used":8123,"window":"day"}
/// ```
/// `upgrade_url` is `null` when there is none; `reset` is [`rfc3339`]; `message` and `locale`
/// come from [`Messages::render`].
pub(crate) fn body_object(facts: &LimitFacts, message: &Rendered, upgrade_url: Option<&str>) -> Value {
    json!({
        "metric": facts.metric,
        "window": facts.window,
        "limit": facts.limit,
        "used": facts.used,
        "remaining": facts.remaining(),
        "percent": facts.percent(),
        "reset": rfc3339(facts.reset_at_ms),
        "message": message.text,
        "locale": message.locale,
        "upgrade_url": upgrade_url,
    })
}

/// `body` with `"tollgate": object` added as the last member of its top-level object, or
/// `None` when `body` is not exactly one JSON object (then the caller forwards it untouched) or
/// already has a `tollgate` member.
///
/// The body is not re-serialised: serde_json without `preserve_order` would sort its keys, and
/// any round trip may rewrite numbers and escapes. The member is written in just after the
/// object's last member (before the whitespace and the closing `}`), so every other byte is
/// unchanged. The caller must fix `content-length` (and must not call this on an encoded body:
/// such a body does not parse and yields `None`).
pub(crate) fn inject_into_completion(body: &[u8], object: &Value) -> Option<Vec<u8>> {
    // Checks the whole body without building it: members' values are skipped, not decoded.
    let members: BTreeMap<String, IgnoredAny> = serde_json::from_slice(body).ok()?;
    if members.contains_key(BODY_MEMBER) {
        return None;
    }
    // What follows a valid object is JSON whitespace only, so its last `}` closes it.
    let close = body.iter().rposition(|&b| b == b'}')?;
    let at = body[..close].iter().rposition(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r')).map_or(0, |i| i + 1);
    let value = serde_json::to_vec(object).ok()?;
    let mut out = Vec::with_capacity(body.len() + value.len() + BODY_MEMBER.len() + 4);
    out.extend_from_slice(&body[..at]);
    if !members.is_empty() {
        out.push(b',');
    }
    out.push(b'"');
    out.extend_from_slice(BODY_MEMBER.as_bytes());
    out.extend_from_slice(b"\":");
    out.extend_from_slice(&value);
    out.extend_from_slice(&body[at..]);
    Some(out)
}

/// `object` as one SSE comment line followed by a blank line: `: tollgate {json}\n\n`.
///
/// Compact JSON escapes line breaks inside strings, so the comment is one line (and were it
/// not, [`write_comment`] would make every line a comment). The blank line dispatches nothing
/// — "If the data buffer is an empty string, set the data buffer and the event type buffer to
/// the empty string and return" — but would end a half-sent event, so the caller inserts this
/// only between events (e.g. before `data: [DONE]`). Clients that see comments at all (as
/// OpenAI SDK users do OpenRouter's `: OPENROUTER PROCESSING`) skip them.
pub(crate) fn sse_comment(object: &Value) -> Vec<u8> {
    let json = serde_json::to_string(object).unwrap_or_default();
    let mut out = String::with_capacity(json.len() + 14);
    write_comment(&mut out, &format!("{BODY_MEMBER} {json}"));
    out.push('\n');
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::{SseDecoder, SseEvent, SseMessage};
    use proptest::prelude::*;

    const PATH: &str = "tiers.free.messages";

    /// Parses `json` as a tier's `messages` the way the policy does: through a tree, with
    /// serde's errors carrying their path.
    fn parse(json: &str) -> Result<Messages, ConfigError> {
        let value: Value = serde_json::from_str(json).unwrap();
        let raw: RawMessages = serde_path_to_error::deserialize(value)
            .map_err(|e| invalid(format!("{PATH}.{}", e.path()), e.into_inner().to_string()))?;
        Messages::validate(raw, PATH)
    }

    fn err(json: &str) -> String {
        parse(json).unwrap_err().to_string()
    }

    fn messages(json: &str) -> Messages {
        parse(json).unwrap()
    }

    const EXAMPLE: &str = r#"{
        "default_locale": "en",
        "upgrade_url": "https://app.example.com/upgrade?plan=pro",
        "body_object": true,
        "block": { "en": "You have used {used} of your {limit} {metric} this {window}. It resets {reset}. Upgrade: {upgrade_url}",
                   "ar": "لقد استخدمت {used} من أصل {limit} {metric} في هذا {window}. يُعاد التعيين {reset}. للترقية: {upgrade_url}" },
        "warn":  { "en": "You have used {percent}% of your {metric} for this {window}.",
                   "ar": "لقد استخدمت {percent}٪ من {metric} لهذا {window}." }
    }"#;

    fn facts() -> LimitFacts<'static> {
        LimitFacts {
            metric: "total tokens",
            window: "day",
            limit: 10_000,
            used: 8_123,
            reset_at_ms: 1_795_305_600_000, // 2026-11-22T00:00:00Z
            now_ms: 1_795_305_600_000 - 3_723_500,
        }
    }

    // ---- config ----

    #[test]
    fn parses_the_documented_example() {
        let m = messages(EXAMPLE);
        assert_eq!(m.upgrade_url(), Some("https://app.example.com/upgrade?plan=pro"));
        assert!(m.body_object());
        assert_eq!(m.negotiate(MessageKind::Block, Some("ar")), "ar");
        assert_eq!(m.negotiate(MessageKind::Warn, None), "en");
    }

    #[test]
    fn absent_messages_are_the_defaults() {
        assert_eq!(messages("{}"), Messages::default());
        assert_eq!(Messages::validate(RawMessages::default(), PATH).unwrap(), Messages::default());
        let m = Messages::default();
        assert_eq!(m.upgrade_url(), None);
        assert!(!m.body_object());
        assert_eq!(m.negotiate(MessageKind::Block, Some("ar")), "en");
    }

    #[test]
    fn built_in_texts_parse_and_use_no_upgrade_url() {
        for text in [BLOCK_EN, WARN_EN] {
            let t = Template::parse(text).unwrap();
            assert!(!t.uses(Placeholder::UpgradeUrl));
            assert!(t.0.iter().all(|p| !matches!(p, Piece::Text(s) if s.contains(['{', '}']))));
        }
    }

    #[test]
    fn a_kind_without_templates_keeps_the_built_in_text() {
        let m = messages(r#"{"default_locale": "ar", "warn": {"ar": "تحذير {percent}"}}"#);
        assert_eq!(m.render(MessageKind::Warn, None, &facts()).text, "تحذير 81");
        assert_eq!(m.render(MessageKind::Block, None, &facts()).locale, "en");
        assert_eq!(
            m.render(MessageKind::Block, None, &facts()).text,
            "Usage limit reached for total tokens (day): Limit 10000, Used 8123. Please try again in 1h2m3.5s."
        );
    }

    #[test]
    fn default_locale_is_case_insensitive() {
        let m = messages(r#"{"default_locale": "PT-br", "block": {"pt-BR": "x", "en": "y"}}"#);
        assert_eq!(m.negotiate(MessageKind::Block, None), "pt-BR");
    }

    #[test]
    fn unknown_field_names_its_path() {
        assert_eq!(
            err(r#"{"blok": {}}"#),
            "tiers.free.messages.blok: unknown field `blok`, expected one of `default_locale`, `upgrade_url`, `body_object`, `block`, `warn`"
        );
    }

    #[test]
    fn wrong_types_name_their_path() {
        assert_eq!(
            err(r#"{"body_object": "yes"}"#),
            r#"tiers.free.messages.body_object: invalid type: string "yes", expected a boolean"#
        );
        assert_eq!(
            err(r#"{"block": {"en": 5}}"#),
            "tiers.free.messages.block.en: invalid type: integer `5`, expected a string"
        );
        assert_eq!(err(r#"{"warn": ["en"]}"#), "tiers.free.messages.warn: invalid type: sequence, expected a map");
    }

    #[test]
    fn invalid_default_locale_is_refused() {
        for tag in ["en_US", "", "*", "englishlanguage", "en-", "-en", "e1", "ar-سعودي"] {
            assert_eq!(
                err(&format!(r#"{{"default_locale": {}}}"#, serde_json::to_string(tag).unwrap())),
                format!("tiers.free.messages.default_locale: invalid locale tag {tag:?} (expected a BCP 47 tag such as en, ar or pt-BR)")
            );
        }
    }

    #[test]
    fn invalid_template_locale_is_refused() {
        assert_eq!(
            err(r#"{"block": {"en": "x", "pt_BR": "y"}}"#),
            r#"tiers.free.messages.block.pt_BR: invalid locale tag "pt_BR" (expected a BCP 47 tag such as en, ar or pt-BR)"#
        );
    }

    #[test]
    fn locale_given_twice_in_two_cases_is_refused() {
        assert_eq!(
            err(r#"{"warn": {"en": "x", "EN": "y"}}"#),
            r#"tiers.free.messages.warn.en: locale "en" is given twice (also as "EN"; tags are case-insensitive)"#
        );
    }

    #[test]
    fn default_locale_must_have_a_template_in_every_given_map() {
        assert_eq!(
            err(r#"{"default_locale": "ar", "block": {"ar": "x"}, "warn": {"en": "y"}}"#),
            r#"tiers.free.messages.warn: no template for the default locale "ar" (every template map needs one)"#
        );
        assert_eq!(
            err(r#"{"block": {"ar": "x"}}"#),
            r#"tiers.free.messages.block: no template for the default locale "en" (every template map needs one)"#
        );
        assert_eq!(
            err(r#"{"block": {}}"#),
            r#"tiers.free.messages.block: no template for the default locale "en" (every template map needs one)"#
        );
    }

    #[test]
    fn unknown_placeholder_is_refused() {
        let expected = "(expected one of: {limit}, {used}, {remaining}, {percent}, {metric}, {window}, {reset}, {reset_in}, {upgrade_url})";
        assert_eq!(
            err(r#"{"block": {"en": "x", "ar": "تكلفة {usd}"}}"#),
            format!("tiers.free.messages.block.ar: unknown placeholder {{usd}} {expected}")
        );
        assert_eq!(
            err(r#"{"warn": {"en": "{Limit}"}}"#),
            format!("tiers.free.messages.warn.en: unknown placeholder {{Limit}} {expected}")
        );
        assert_eq!(
            err(r#"{"warn": {"en": "{ limit }"}}"#),
            format!("tiers.free.messages.warn.en: unknown placeholder {{ limit }} {expected}")
        );
        assert_eq!(
            err(r#"{"warn": {"en": "a {} b"}}"#),
            format!("tiers.free.messages.warn.en: unknown placeholder {{}} {expected}")
        );
    }

    #[test]
    fn unbalanced_braces_are_refused_with_their_character_position() {
        assert_eq!(
            err(r#"{"block": {"en": "Used {used of {limit}"}}"#),
            r#"tiers.free.messages.block.en: unbalanced brace: "{" at character 6 is not closed (write "{{" for a literal "{")"#
        );
        assert_eq!(
            err(r#"{"block": {"en": "Used {used"}}"#),
            r#"tiers.free.messages.block.en: unbalanced brace: "{" at character 6 is not closed (write "{{" for a literal "{")"#
        );
        assert_eq!(
            err(r#"{"warn": {"en": "{percent}}%"}}"#),
            r#"tiers.free.messages.warn.en: unbalanced brace: "}" at character 10 was not opened (write "}}" for a literal "}")"#
        );
        // Characters, not bytes: "لقد " is 4 characters and 7 bytes.
        assert_eq!(
            err(r#"{"warn": {"en": "x", "ar": "لقد {"}}"#),
            r#"tiers.free.messages.warn.ar: unbalanced brace: "{" at character 5 is not closed (write "{{" for a literal "{")"#
        );
    }

    #[test]
    fn doubled_braces_are_literal() {
        let m = messages(r#"{"warn": {"en": "{{used}} = {used}, }} {{"}}"#);
        assert_eq!(m.render(MessageKind::Warn, None, &facts()).text, "{used} = 8123, } {");
    }

    #[test]
    fn empty_template_is_refused() {
        assert_eq!(err(r#"{"block": {"en": ""}}"#), "tiers.free.messages.block.en: must not be empty");
    }

    #[test]
    fn upgrade_url_placeholder_needs_an_upgrade_url() {
        assert_eq!(
            err(r#"{"block": {"en": "Upgrade: {upgrade_url}"}}"#),
            "tiers.free.messages.block.en: uses {upgrade_url} but upgrade_url is not set"
        );
    }

    #[test]
    fn upgrade_url_must_be_http_or_https() {
        for url in ["ftp://example.com/upgrade", "javascript:alert(1)", "app.example.com/upgrade", "", "https:/x"] {
            assert_eq!(
                err(&url_config(url)),
                format!("tiers.free.messages.upgrade_url: must be an http:// or https:// URL, got {url:?}")
            );
        }
        for url in ["https://", "https:///upgrade", "http://user@/x", "https://:443/x"] {
            assert_eq!(err(&url_config(url)), format!("tiers.free.messages.upgrade_url: has no host: {url:?}"));
        }
        for url in ["https://example.com/up grade", "https://example.com/\n", "https://example.com/\u{85}"] {
            assert_eq!(
                err(&url_config(url)),
                format!(
                    "tiers.free.messages.upgrade_url: must not contain spaces or control characters (percent-encode them): {url:?}"
                )
            );
        }
        for url in ["HTTPS://example.com", "http://localhost:8080/up?x=1#y", "https://user@example.com"] {
            assert_eq!(messages(&url_config(url)).upgrade_url(), Some(url));
        }
    }

    fn url_config(url: &str) -> String {
        format!(r#"{{"upgrade_url": {}}}"#, serde_json::to_string(url).unwrap())
    }

    // ---- negotiation ----

    fn negotiator() -> Messages {
        messages(
            r#"{"block": {"en": "en", "ar": "ar", "pt-BR": "pt-BR", "zh-Hant": "zh-Hant", "de-CH-1996": "de-CH-1996"}}"#,
        )
    }

    fn pick(m: &Messages, header: &str) -> String {
        m.negotiate(MessageKind::Block, Some(header)).to_owned()
    }

    #[test]
    fn highest_weight_wins_and_ranges_are_truncated() {
        let m = negotiator();
        assert_eq!(pick(&m, "ar-SA,ar;q=0.9,en;q=0.8"), "ar");
        assert_eq!(pick(&m, "en;q=0.5, ar;q=0.8"), "ar");
        assert_eq!(pick(&m, "fr-CA, fr;q=0.9, ar;q=0.1"), "ar");
        assert_eq!(pick(&m, "zh-Hant-TW"), "zh-Hant");
        assert_eq!(pick(&m, "zh-Hant-CN-x-private1-private2"), "zh-Hant");
        assert_eq!(pick(&m, "de-CH-1996-x-a"), "de-CH-1996");
        assert_eq!(pick(&m, "de-CH"), "en"); // lookup never widens a range to a longer tag
    }

    #[test]
    fn equal_weights_keep_header_order() {
        let m = negotiator();
        assert_eq!(pick(&m, "ar;q=0.8, en;q=0.8"), "ar");
        assert_eq!(pick(&m, "en;q=0.8, ar;q=0.8"), "en");
        assert_eq!(pick(&m, "ar, en"), "ar");
    }

    #[test]
    fn unmatched_wildcard_or_absent_falls_back_to_the_default() {
        let m = negotiator();
        assert_eq!(m.negotiate(MessageKind::Block, None), "en");
        assert_eq!(pick(&m, "fr"), "en");
        assert_eq!(pick(&m, "*"), "en");
        assert_eq!(pick(&m, "*, ar;q=0.5"), "ar"); // the wildcard is ignored, not "anything"
        assert_eq!(pick(&m, "fr, *;q=0.9"), "en");
    }

    #[test]
    fn q_zero_excludes() {
        let m = negotiator();
        assert_eq!(pick(&m, "en;q=0, ar"), "ar");
        assert_eq!(pick(&m, "ar;q=0, ar-SA, pt-BR;q=0.5"), "pt-BR"); // ar-SA truncates to an excluded ar
        assert_eq!(pick(&m, "ar;q=0.000, pt-BR;q=0.001"), "pt-BR");
        // Only the default is left when everything else is excluded: it is returned anyway.
        assert_eq!(pick(&m, "ar;q=0"), "en");
        let ar_default = messages(r#"{"default_locale": "ar", "block": {"ar": "a", "en": "e"}}"#);
        assert_eq!(pick(&ar_default, "ar;q=0, fr"), "ar");
        assert_eq!(pick(&ar_default, "ar;q=0, en;q=0.1"), "en");
    }

    #[test]
    fn matching_is_case_insensitive_and_answers_the_configured_spelling() {
        let m = negotiator();
        assert_eq!(pick(&m, "AR-sa"), "ar");
        assert_eq!(pick(&m, "PT-br"), "pt-BR");
        assert_eq!(pick(&m, "ZH-HANT-hk"), "zh-Hant");
        assert_eq!(pick(&m, "en;Q=0, ar"), "ar");
    }

    #[test]
    fn pt_br_exact_versus_pt_prefix_lookup() {
        let both = messages(r#"{"block": {"en": "e", "pt": "p", "pt-BR": "b"}}"#);
        assert_eq!(pick(&both, "pt-BR"), "pt-BR");
        assert_eq!(pick(&both, "pt-br"), "pt-BR");
        assert_eq!(pick(&both, "pt-PT"), "pt");
        assert_eq!(pick(&both, "pt"), "pt");
        let brazil_only = messages(r#"{"block": {"en": "e", "pt-BR": "b"}}"#);
        assert_eq!(pick(&brazil_only, "pt"), "en");
        assert_eq!(pick(&brazil_only, "pt-PT"), "en");
        assert_eq!(pick(&brazil_only, "pt-BR-x-rio"), "pt-BR");
        let portuguese_only = messages(r#"{"block": {"en": "e", "pt": "p"}}"#);
        assert_eq!(pick(&portuguese_only, "pt-BR, en;q=0.9"), "pt");
    }

    #[test]
    fn kinds_negotiate_separately() {
        let m = messages(r#"{"block": {"en": "e", "ar": "a"}, "warn": {"en": "e", "fr": "f"}}"#);
        assert_eq!(m.negotiate(MessageKind::Block, Some("fr, ar;q=0.5")), "ar");
        assert_eq!(m.negotiate(MessageKind::Warn, Some("fr, ar;q=0.5")), "fr");
    }

    #[test]
    fn garbage_headers_fall_back_or_keep_their_good_elements() {
        let m = negotiator();
        for header in [
            "",
            ",,,",
            ";;;",
            " \t ",
            "ar;q=2",
            "ar;q=1.001",
            "ar;q=0.1234",
            "ar;q=.5",
            "ar;q=0.5x",
            "ar;q=",
            "ar;q",
            "ar;",
            "ar;level=1",
            "ar;q=0.5;q=x",
            "ar_SA",
            "ar-",
            "-ar",
            "a r",
            "arabicarabic",
            "عربي",
            "ar\u{0}",
            "q=1",
            "=",
            "*-ar",
        ] {
            assert_eq!(pick(&m, header), "en", "{header:?}");
        }
        for header in [
            "ar;q=1.000",
            "ar;q=1.",
            "ar ; q=0.5",
            "ar;\tq=0.5",
            ",ar,",
            "x;;, ar",
            "ar;q=0.5, fr;q=bad, en;q=zero",
            "عربي, ar",
        ] {
            assert_eq!(pick(&m, header), "ar", "{header:?}");
        }
    }

    #[test]
    fn qvalues_follow_the_grammar() {
        assert_eq!(qvalue("1"), Some(1000));
        assert_eq!(qvalue("1.000"), Some(1000));
        assert_eq!(qvalue("0"), Some(0));
        assert_eq!(qvalue("0."), Some(0));
        assert_eq!(qvalue("0.5"), Some(500));
        assert_eq!(qvalue("0.05"), Some(50));
        assert_eq!(qvalue("0.001"), Some(1));
        for bad in ["", ".", "1.5", "2", "00.5", "0.0001", "-0", "+1", "0.a", "0.٥"] {
            assert_eq!(qvalue(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn negotiation_never_panics_and_answers_a_configured_locale(header in ".{0,200}") {
            let m = negotiator();
            let locale = m.negotiate(MessageKind::Block, Some(&header));
            prop_assert!(["en", "ar", "pt-BR", "zh-Hant", "de-CH-1996"].contains(&locale));
        }

        #[test]
        fn negotiation_of_header_shaped_input(
            parts in prop::collection::vec(
                ("(en|ar|pt|pt-BR|PT-br|zh-Hant|zh|x|\\*|[a-z]{1,9}(-[a-zA-Z0-9]{1,9}){0,3})", "(|;q=[01](\\.[0-9]{0,4})?|; ?Q=0|;x)"),
                0..12,
            ),
            separator in "(,|, |,\t| ,)",
        ) {
            let header = parts.iter().map(|(r, w)| format!("{r}{w}")).collect::<Vec<_>>().join(&separator);
            let m = negotiator();
            let locale = m.negotiate(MessageKind::Block, Some(&header));
            prop_assert!(["en", "ar", "pt-BR", "zh-Hant", "de-CH-1996"].contains(&locale));
            // The first range that is acceptable and names a configured tag exactly, at the
            // highest weight, wins.
            let excluded = |range: &str| {
                parts.iter().any(|(r, w)| {
                    r.eq_ignore_ascii_case(range) && w.split_once('=').is_some_and(|(_, q)| qvalue(q) == Some(0))
                })
            };
            if let Some((range, weight)) = parts.first() {
                if weight.is_empty()
                    && ["en", "ar", "pt-BR", "zh-Hant"].iter().any(|t| t.eq_ignore_ascii_case(range))
                    && !excluded(range)
                {
                    prop_assert!(locale.eq_ignore_ascii_case(range), "{header:?} -> {locale}");
                }
            }
        }
    }

    // ---- rendering ----

    const ALL_EN: &str =
        "limit={limit} used={used} remaining={remaining} percent={percent}% metric={metric} window={window} reset={reset} reset_in={reset_in} url={upgrade_url}";
    const ALL_AR: &str =
        "الحد {limit}، المستخدم {used}، المتبقي {remaining}، النسبة {percent}٪، المقياس {metric}، النافذة {window}، إعادة التعيين {reset} (بعد {reset_in})، الترقية: {upgrade_url}";

    fn all_placeholders() -> Messages {
        messages(&format!(
            r#"{{"upgrade_url": "https://app.example.com/upgrade?plan=pro", "block": {{"en": {}, "ar": {}}}}}"#,
            serde_json::to_string(ALL_EN).unwrap(),
            serde_json::to_string(ALL_AR).unwrap()
        ))
    }

    #[test]
    fn every_placeholder_renders_in_english() {
        let r = all_placeholders().render(MessageKind::Block, Some("en-US"), &facts());
        assert_eq!(r.locale, "en");
        assert_eq!(
            r.text,
            "limit=10000 used=8123 remaining=1877 percent=81% metric=total tokens window=day reset=2026-11-22T00:00:00Z reset_in=1h2m3.5s url=https://app.example.com/upgrade?plan=pro"
        );
    }

    #[test]
    fn every_placeholder_renders_in_arabic_with_utf8_intact() {
        let r = all_placeholders().render(MessageKind::Block, Some("ar-EG,en;q=0.5"), &facts());
        assert_eq!(r.locale, "ar");
        assert_eq!(
            r.text,
            "الحد 10000، المستخدم 8123، المتبقي 1877، النسبة 81٪، المقياس total tokens، النافذة day، إعادة التعيين 2026-11-22T00:00:00Z (بعد 1h2m3.5s)، الترقية: https://app.example.com/upgrade?plan=pro"
        );
        let json = serde_json::to_vec(&body_object(&facts(), &r, None)).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&json).unwrap()["message"], r.text.as_str());
    }

    #[test]
    fn documented_example_renders() {
        let m = messages(EXAMPLE);
        let r = m.render(MessageKind::Block, Some("ar"), &facts());
        assert_eq!(
            r.text,
            "لقد استخدمت 8123 من أصل 10000 total tokens في هذا day. يُعاد التعيين 2026-11-22T00:00:00Z. للترقية: https://app.example.com/upgrade?plan=pro"
        );
        assert_eq!(
            m.render(MessageKind::Warn, Some("fr"), &facts()),
            Rendered {
                text: "You have used 81% of your total tokens for this day.".to_owned(),
                locale: "en".to_owned()
            }
        );
    }

    #[test]
    fn built_in_texts_render() {
        let m = Messages::default();
        let f = LimitFacts {
            metric: "requests",
            window: "minute",
            limit: 10,
            used: 10,
            reset_at_ms: 60_000,
            now_ms: 42_500,
        };
        assert_eq!(
            m.render(MessageKind::Block, Some("ar"), &f),
            Rendered {
                text: "Usage limit reached for requests (minute): Limit 10, Used 10. Please try again in 17.5s."
                    .to_owned(),
                locale: "en".to_owned()
            }
        );
        assert_eq!(
            m.render(MessageKind::Warn, None, &facts()).text,
            "You have used 81% of your total tokens limit (day): Limit 10000, Used 8123, Remaining 1877. It resets in 1h2m3.5s."
        );
    }

    #[test]
    fn percent_rounds_down_and_remaining_never_goes_negative() {
        let f = |limit, used| LimitFacts { limit, used, ..facts() };
        assert_eq!(f(10_000, 8_199).percent(), 81);
        assert_eq!(f(3, 2).percent(), 66);
        assert_eq!(f(10, 0).percent(), 0);
        assert_eq!(f(10, 12).percent(), 120);
        assert_eq!(f(10, 12).remaining(), 0);
        assert_eq!(f(0, 0).percent(), 100);
        assert_eq!(f(1, u64::MAX).percent(), u64::MAX);
        assert_eq!(f(u64::MAX, u64::MAX).percent(), 100);
    }

    #[test]
    fn reset_in_the_past_is_zero() {
        let f = LimitFacts { now_ms: 2_000_000_000_000, ..facts() };
        let m = messages(r#"{"warn": {"en": "{reset_in} {reset}"}}"#);
        assert_eq!(m.render(MessageKind::Warn, None, &f).text, "0s 2026-11-22T00:00:00Z");
    }

    // ---- RFC 3339 ----

    #[test]
    fn rfc3339_across_a_year_boundary() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_767_225_599_000), "2025-12-31T23:59:59Z");
        assert_eq!(rfc3339(1_767_225_600_000), "2026-01-01T00:00:00Z");
        // A fraction of a second rounds up, here into the new year.
        assert_eq!(rfc3339(1_767_225_599_001), "2026-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_305_600_000), "2026-11-22T00:00:00Z");
    }

    #[test]
    fn rfc3339_on_leap_days() {
        assert_eq!(rfc3339(1_709_210_096_000), "2024-02-29T12:34:56Z");
        assert_eq!(rfc3339(1_709_251_200_000), "2024-03-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z"); // divisible by 400: leap
        assert_eq!(rfc3339(4_107_542_399_000), "2100-02-28T23:59:59Z"); // divisible by 100: not
        assert_eq!(rfc3339(4_107_542_400_000), "2100-03-01T00:00:00Z");
    }

    #[test]
    fn rfc3339_stops_at_year_9999() {
        assert_eq!(rfc3339(253_402_300_799_000), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(253_402_300_800_000), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(u64::MAX), "9999-12-31T23:59:59Z");
    }

    // ---- the header ----

    /// A strict reader of the RFC 8941 dictionaries [`warning_header`] writes: members without
    /// parameters whose values are sf-strings or sf-integers.
    fn parse_sf_dictionary(input: &str) -> Result<Vec<(String, SfValue)>, String> {
        let b = input.as_bytes();
        let mut i = 0;
        let mut out = vec![];
        loop {
            let start = i;
            if !b.get(i).is_some_and(|c| c.is_ascii_lowercase() || *c == b'*') {
                return Err(format!("bad key at {i}"));
            }
            while b.get(i).is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-.*".contains(c)) {
                i += 1;
            }
            let key = input[start..i].to_owned();
            if b.get(i) != Some(&b'=') {
                return Err(format!("no = at {i}"));
            }
            i += 1;
            let value = match b.get(i) {
                Some(b'"') => {
                    i += 1;
                    let mut s = String::new();
                    loop {
                        match b.get(i) {
                            Some(b'\\') => match b.get(i + 1) {
                                Some(c @ (b'"' | b'\\')) => {
                                    s.push(char::from(*c));
                                    i += 2;
                                }
                                _ => return Err(format!("bad escape at {i}")),
                            },
                            Some(b'"') => {
                                i += 1;
                                break;
                            }
                            Some(c @ 0x20..=0x7e) => {
                                s.push(char::from(*c));
                                i += 1;
                            }
                            _ => return Err(format!("bad string byte at {i}")),
                        }
                    }
                    SfValue::String(s)
                }
                Some(c) if c.is_ascii_digit() => {
                    let start = i;
                    while b.get(i).is_some_and(u8::is_ascii_digit) {
                        i += 1;
                    }
                    if i - start > 15 {
                        return Err(format!("integer too long at {start}"));
                    }
                    SfValue::Integer(input[start..i].parse().map_err(|e| format!("{e}"))?)
                }
                _ => return Err(format!("bad value at {i}")),
            };
            if out.iter().any(|(k, _)| *k == key) {
                return Err(format!("duplicate key {key}"));
            }
            out.push((key, value));
            if i == b.len() {
                return Ok(out);
            }
            while b.get(i).is_some_and(|c| *c == b' ' || *c == b'\t') {
                i += 1;
            }
            if b.get(i) != Some(&b',') {
                return Err(format!("no comma at {i}"));
            }
            i += 1;
            while b.get(i).is_some_and(|c| *c == b' ' || *c == b'\t') {
                i += 1;
            }
            if i == b.len() {
                return Err("trailing comma".to_owned());
            }
        }
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum SfValue {
        String(String),
        Integer(u64),
    }

    fn s(v: &str) -> SfValue {
        SfValue::String(v.to_owned())
    }

    #[test]
    fn warning_header_is_an_rfc8941_dictionary() {
        let h = warning_header(&facts(), 80);
        assert_eq!(
            h,
            r#"metric="total tokens", window="day", limit=10000, used=8123, remaining=1877, percent=81, threshold=80, reset=1795305600"#
        );
        assert!(h.bytes().all(|b| (0x20..=0x7e).contains(&b)));
        assert_eq!(
            parse_sf_dictionary(&h).unwrap(),
            vec![
                ("metric".to_owned(), s("total tokens")),
                ("window".to_owned(), s("day")),
                ("limit".to_owned(), SfValue::Integer(10_000)),
                ("used".to_owned(), SfValue::Integer(8_123)),
                ("remaining".to_owned(), SfValue::Integer(1_877)),
                ("percent".to_owned(), SfValue::Integer(81)),
                ("threshold".to_owned(), SfValue::Integer(80)),
                ("reset".to_owned(), SfValue::Integer(1_795_305_600)),
            ]
        );
    }

    #[test]
    fn warning_header_escapes_quotes_and_replaces_non_ascii() {
        let f = LimitFacts { metric: r#"cost "USD" \ month"#, window: "يوم\n", ..facts() };
        let h = warning_header(&f, 90);
        assert!(h.starts_with(r#"metric="cost \"USD\" \\ month", window="????", "#), "{h}");
        let parsed = parse_sf_dictionary(&h).unwrap();
        assert_eq!(parsed[0].1, s(r#"cost "USD" \ month"#));
        assert_eq!(parsed[1].1, s("????"));
    }

    #[test]
    fn warning_header_caps_integers_at_the_sf_integer_range() {
        let f = LimitFacts { limit: u64::MAX, used: 1, reset_at_ms: u64::MAX, ..facts() };
        let parsed = parse_sf_dictionary(&warning_header(&f, u32::MAX)).unwrap();
        assert_eq!(parsed[2].1, SfValue::Integer(SF_INTEGER_MAX));
        assert_eq!(parsed[7].1, SfValue::Integer(SF_INTEGER_MAX));
        assert_eq!(parsed[6].1, SfValue::Integer(u64::from(u32::MAX)));
    }

    proptest! {
        #[test]
        fn warning_header_is_always_printable_ascii_and_parses_back(
            metric in "\\PC{0,40}", window in ".{0,20}",
            limit: u64, used: u64, reset_at_ms: u64, threshold: u32,
        ) {
            let f = LimitFacts { metric: &metric, window: &window, limit, used, reset_at_ms, now_ms: 0 };
            let h = warning_header(&f, threshold);
            prop_assert!(h.bytes().all(|b| (0x20..=0x7e).contains(&b)));
            let parsed = parse_sf_dictionary(&h).map_err(TestCaseError::fail)?;
            let ascii = |v: &str| v.chars().map(|c| if (' '..='~').contains(&c) { c } else { '?' }).collect::<String>();
            prop_assert_eq!(&parsed[0].1, &s(&ascii(&metric)));
            prop_assert_eq!(&parsed[1].1, &s(&ascii(&window)));
            prop_assert_eq!(&parsed[2].1, &SfValue::Integer(limit.min(SF_INTEGER_MAX)));
            prop_assert_eq!(&parsed[3].1, &SfValue::Integer(used.min(SF_INTEGER_MAX)));
        }
    }

    // ---- the body object ----

    fn rendered() -> Rendered {
        Rendered { text: "Line one\nلقد استخدمت \"81%\"".to_owned(), locale: "ar".to_owned() }
    }

    #[test]
    fn body_object_has_the_facts_and_the_message() {
        let o = body_object(&facts(), &rendered(), Some("https://app.example.com/upgrade?plan=pro"));
        assert_eq!(
            o,
            json!({
                "metric": "total tokens", "window": "day", "limit": 10000, "used": 8123, "remaining": 1877,
                "percent": 81, "reset": "2026-11-22T00:00:00Z", "message": "Line one\nلقد استخدمت \"81%\"",
                "locale": "ar", "upgrade_url": "https://app.example.com/upgrade?plan=pro"
            })
        );
        assert_eq!(body_object(&facts(), &rendered(), None)["upgrade_url"], Value::Null);
    }

    /// A recorded-style OpenAI body: keys not in alphabetical order, an escape, an exponent.
    const COMPLETION: &str = r#"{"id":"chatcmpl-abc","object":"chat.completion","created":1741569952,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"caf\u00e9 \"ok\"","refusal":null},"finish_reason":"stop"}],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29},"service_tier":"default","system_fingerprint":"fp_06737a9306","x":1.0e2}"#;

    #[test]
    fn re_serialising_would_change_the_body_so_injection_is_textual() {
        // Without serde_json's preserve_order the keys come back sorted (and 1.0e2 as 100.0,
        // \u00e9 as é): the reason for inserting the member as text.
        let round_trip = serde_json::to_string(&serde_json::from_str::<Value>(COMPLETION).unwrap()).unwrap();
        assert_ne!(round_trip, COMPLETION);
        assert!(round_trip.starts_with(r#"{"choices":"#), "{round_trip}");

        let object = body_object(&facts(), &rendered(), None);
        let out = inject_into_completion(COMPLETION.as_bytes(), &object).unwrap();
        let member = format!(r#","tollgate":{}}}"#, serde_json::to_string(&object).unwrap());
        let expected = [&COMPLETION.as_bytes()[..COMPLETION.len() - 1], member.as_bytes()].concat();
        assert_eq!(out, expected);
        // Everything before is byte-identical, and the result is the old body plus the member.
        assert_eq!(&out[..COMPLETION.len() - 1], &COMPLETION.as_bytes()[..COMPLETION.len() - 1]);
        let mut old: Value = serde_json::from_str(COMPLETION).unwrap();
        let new: Value = serde_json::from_slice(&out).unwrap();
        old.as_object_mut().unwrap().insert("tollgate".to_owned(), object);
        assert_eq!(new, old);
    }

    #[test]
    fn injection_keeps_pretty_printing_and_trailing_whitespace() {
        let body = b"{\n  \"id\": \"x\",\n  \"usage\": {\"total_tokens\": 3}\n}\n";
        let object = json!({"a": 1});
        let out = inject_into_completion(body, &object).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "{\n  \"id\": \"x\",\n  \"usage\": {\"total_tokens\": 3},\"tollgate\":{\"a\":1}\n}\n"
        );
    }

    #[test]
    fn injection_into_an_empty_object_has_no_comma() {
        let object = json!({"a": 1});
        assert_eq!(inject_into_completion(b"{}", &object).unwrap(), br#"{"tollgate":{"a":1}}"#);
        assert_eq!(inject_into_completion(b" { \r\n} ", &object).unwrap(), b" {\"tollgate\":{\"a\":1} \r\n} ");
    }

    #[test]
    fn injection_keeps_numbers_serde_json_could_not_hold() {
        let body = br#"{"big":1e400,"n":123456789012345678901234567890}"#;
        let out = inject_into_completion(body, &json!(true)).unwrap();
        assert_eq!(out, br#"{"big":1e400,"n":123456789012345678901234567890,"tollgate":true}"#);
    }

    #[test]
    fn injection_leaves_what_is_not_one_json_object_alone() {
        let object = json!({"a": 1});
        for body in [
            &b""[..],
            b"[]",
            b"[{}]",
            b"\"{}\"",
            b"null",
            b"42",
            b"{\"a\":1",
            b"{\"a\":1}}",
            b"{}{}",
            b"{} x",
            b"\xEF\xBB\xBF{}",
            b"\x1f\x8b\x08\x00",
            b"data: {}\n\n",
        ] {
            assert_eq!(inject_into_completion(body, &object), None, "{:?}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn injection_never_duplicates_the_member() {
        let object = json!({"a": 1});
        assert_eq!(inject_into_completion(br#"{"tollgate":null}"#, &object), None);
        assert_eq!(inject_into_completion(br#"{"x":1,"tollg\u0061te":2}"#, &object), None);
        // Nested members of that name are someone else's business.
        assert!(inject_into_completion(br#"{"x":{"tollgate":1}}"#, &object).is_some());
    }

    // ---- the SSE comment ----

    #[test]
    fn sse_comment_is_one_comment_line_and_a_blank_line() {
        assert_eq!(sse_comment(&json!({"a": 1})), b": tollgate {\"a\":1}\n\n");
        let object = body_object(&facts(), &rendered(), Some("https://app.example.com/upgrade"));
        let bytes = sse_comment(&object);
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.starts_with(": tollgate {"));
        assert!(text.ends_with("}\n\n"));
        // The message has a line break; the JSON escapes it, so no raw CR or LF inside.
        assert!(!text[..text.len() - 2].contains(['\n', '\r']), "{text:?}");
    }

    #[test]
    fn sse_comment_decodes_as_a_comment_between_events() {
        let object = body_object(&facts(), &rendered(), None);
        let stream = [&b"data: {\"n\":1}\n\n"[..], &sse_comment(&object), b"data: [DONE]\n\n"].concat();
        let mut decoder = SseDecoder::new();
        decoder.feed(&stream);
        let items: Vec<SseEvent> = decoder.by_ref().map(Result::unwrap).collect();
        assert_eq!(decoder.finish(), Ok(()));
        let data = |d: &str| SseEvent::Message(SseMessage { data: d.to_owned(), ..SseMessage::default() });
        assert_eq!(items.len(), 3);
        assert_eq!(items[0], data("{\"n\":1}"));
        assert_eq!(items[2], data("[DONE]"));
        let SseEvent::Comment(comment) = &items[1] else { panic!("{:?}", items[1]) };
        let json = comment.strip_prefix("tollgate ").unwrap();
        assert_eq!(serde_json::from_str::<Value>(json).unwrap(), object);
    }
}
