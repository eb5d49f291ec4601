//! `log`: the JSON log lines (`--log-format json`), one object a line, in the shape of
//! tracing-subscriber's `json().flatten_event(true)` format: `timestamp`, `level`, the event's
//! fields, `target`, then the current span as `span` and the spans from the root as `spans`, each
//! with its fields and `name`.
//!
//! Each line is built in a per-thread `String` with plain pushes (not a dynamic `fmt::Write` call
//! for every quote and comma) and handed to the formatter's buffer in one piece, without the stock
//! formatter's per-call work: it keeps a span's fields as a `serde_json::Value` map
//! while formatting them and parses them back from text for `span` and again for `spans` on every
//! line logged inside the span. Here a span's fields are stored once as ready JSON text
//! (`"name":value` pairs) and copied into each line as they are; values are escaped as
//! `serde_json` escapes them, so the text is the same JSON.
//!
//! Where the lines go is [`batch`]: stderr, in batches when it is not a terminal.

pub mod batch;

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::{LookupSpan, SpanRef};

/// The JSON line format: use it as both the event format and the span fields' format
/// (`.fmt_fields(JsonLines).event_format(JsonLines)`).
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLines;

/// Lets `serde_json` write into a line.
struct Text<'a>(&'a mut String);

impl std::io::Write for Text<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // serde_json writes whole UTF-8 sequences: text between escapes, escapes, numbers.
        let text = std::str::from_utf8(buf).map_err(std::io::Error::other)?;
        self.0.push_str(text);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes one JSON value (numbers; strings that need escaping).
fn value<T: serde::Serialize + ?Sized>(out: &mut String, value: &T) -> fmt::Result {
    value
        .serialize(&mut serde_json::Serializer::new(Text(out)))
        .map_err(|_| fmt::Error)
}

/// Writes a JSON string: as it is when nothing in it needs escaping (ids, routes, paths, most
/// messages), else escaped by `serde_json`.
fn string(out: &mut String, text: &str) -> fmt::Result {
    // Every byte looked at, without stopping at the first to escape: the compiler turns this
    // into vector compares, and nearly every string has none.
    let plain = !text.bytes().fold(false, |escape, b| {
        escape | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if plain {
        out.push('"');
        out.push_str(text);
        out.push('"');
        Ok(())
    } else {
        value(out, text)
    }
}

thread_local! {
    /// Where a `Debug` value is formatted before it is written as a string; kept per thread, so
    /// it allocates only when a value is longer than any before.
    static SCRATCH: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Runs `work` on one of this thread's scratch strings, emptied; on a string of its own when
/// that one is in use already (a `Debug` impl that logs, or opens a span, while it is written).
fn with_scratch<T>(
    scratch: &'static std::thread::LocalKey<std::cell::RefCell<String>>,
    work: impl FnOnce(&mut String) -> T,
) -> T {
    scratch.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut scratch) => {
            scratch.clear();
            work(&mut scratch)
        }
        Err(_) => work(&mut String::new()),
    })
}

/// Writes a `Debug` value as a JSON string.
fn debug_string(out: &mut String, debug: &dyn fmt::Debug) -> fmt::Result {
    use fmt::Write as _;
    with_scratch(&SCRATCH, |scratch| {
        write!(scratch, "{debug:?}")?;
        string(out, scratch)
    })
}

/// Writes fields as `"name":value` pairs, each after a comma unless it is the first.
struct Pairs<'a> {
    out: &'a mut String,
    /// No pair written yet and none before them.
    first: bool,
    /// Span fields drop a raw identifier's `r#`, as the stock span formatter does.
    span: bool,
    result: fmt::Result,
}

impl Pairs<'_> {
    fn pair(&mut self, field: &Field, write: impl FnOnce(&mut String) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        self.name(field.name());
        self.result = write(self.out);
    }

    /// Writes `"name":`, after a comma unless it is the first pair.
    fn name(&mut self, name: &str) {
        if !std::mem::take(&mut self.first) {
            self.out.push(',');
        }
        // A field name is an identifier: written as it is.
        let _ = string(self.out, name);
        self.out.push(':');
    }
}

impl Visit for Pairs<'_> {
    fn record_f64(&mut self, field: &Field, v: f64) {
        self.pair(field, |out| value(out, &v));
    }

    fn record_i64(&mut self, field: &Field, v: i64) {
        self.pair(field, |out| {
            out.push_str(itoa::Buffer::new().format(v));
            Ok(())
        });
    }

    fn record_u64(&mut self, field: &Field, v: u64) {
        self.pair(field, |out| {
            out.push_str(itoa::Buffer::new().format(v));
            Ok(())
        });
    }

    fn record_bool(&mut self, field: &Field, v: bool) {
        self.pair(field, |out| {
            out.push_str(if v { "true" } else { "false" });
            Ok(())
        });
    }

    fn record_str(&mut self, field: &Field, v: &str) {
        self.pair(field, |out| string(out, v));
    }

    fn record_bytes(&mut self, field: &Field, v: &[u8]) {
        self.pair(field, |out| value(out, v));
    }

    fn record_debug(&mut self, field: &Field, v: &dyn fmt::Debug) {
        if self.span && field.name().starts_with("r#") {
            // Rare: written by name without the prefix.
            if self.result.is_ok() {
                self.name(&field.name()[2..]);
                self.result = debug_string(self.out, v);
            }
            return;
        }
        self.pair(field, |out| debug_string(out, v));
    }
}

thread_local! {
    /// Where a new span's fields are written before they are copied to the span in one piece: the
    /// span's own string starts empty and would otherwise grow five times for a call's fields.
    static SPAN_SCRATCH: std::cell::RefCell<String> =
        const { std::cell::RefCell::new(String::new()) };
}

/// Writes `fields` as pairs: `first`, no pair before them; `span`, as a span's fields.
fn pairs(out: &mut String, first: bool, span: bool, fields: impl RecordFields) -> fmt::Result {
    let mut pairs = Pairs {
        out,
        first,
        span,
        result: Ok(()),
    };
    fields.record(&mut pairs);
    pairs.result
}

impl<'w> FormatFields<'w> for JsonLines {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        with_scratch(&SPAN_SCRATCH, |scratch| {
            pairs(scratch, true, true, fields)?;
            writer.write_str(scratch)
        })
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        // Pairs appended after the ones already there: no parse, no rewrite.
        let first = current.fields.is_empty();
        pairs(&mut current.fields, first, true, fields)
    }
}

thread_local! {
    /// A timestamp's text up to its fraction (`2026-12-01T14:59:54.`), and the second since the
    /// epoch it is for: a line in the same second as the last one on its thread writes only the
    /// microseconds.
    static SECOND: std::cell::RefCell<(u64, String)> =
        const { std::cell::RefCell::new((u64::MAX, String::new())) };
}

/// The first second of the year 10000, which the stock format writes with a `+`.
const YEAR_10000: u64 = 253_402_300_800;

/// Writes the time now as the stock formatter does (`2026-12-01T14:59:54.002072Z`: UTC,
/// microseconds).
fn timestamp(out: &mut String) -> fmt::Result {
    let stock = |out: &mut String| SystemTime.format_time(&mut Writer::new(out));
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    let Some(since) = since.ok().filter(|since| since.as_secs() < YEAR_10000) else {
        return stock(out);
    };
    let written = SECOND.try_with(|second| {
        let Ok(mut second) = second.try_borrow_mut() else {
            return stock(out);
        };
        let secs = since.as_secs();
        if second.0 != secs {
            second.1.clear();
            date_and_time(&mut second.1, secs)?;
            second.0 = secs;
        }
        out.push_str(&second.1);
        let mut micros = since.subsec_micros();
        let mut digits = [b'0'; 6];
        for digit in digits.iter_mut().rev() {
            *digit = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        out.push_str(std::str::from_utf8(&digits).map_err(|_| fmt::Error)?);
        out.push('Z');
        Ok(())
    });
    // The thread is going: its cache is gone.
    written.unwrap_or_else(|_| stock(out))
}

/// Writes `secs` after the epoch (before the year 10000) as `YYYY-MM-DDTHH:MM:SS.`, in UTC.
fn date_and_time(out: &mut String, secs: u64) -> fmt::Result {
    use fmt::Write as _;
    let (days, time) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (the proleptic Gregorian calendar), from H. Hinnant's
    // "chrono-Compatible Low-Level Date Algorithms"; eras of 400 years start on 1 March.
    let z = days + 719_468;
    let (era, doe) = (z / 146_097, z % 146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.",
        time / 3_600,
        time % 3_600 / 60,
        time % 60
    )
}

/// Writes a span as `{fields…,"name":…}`.
fn span_object<S>(out: &mut String, span: &SpanRef<'_, S>) -> fmt::Result
where
    S: for<'a> LookupSpan<'a>,
{
    out.push('{');
    if let Some(fields) = span.extensions().get::<FormattedFields<JsonLines>>() {
        if !fields.fields.is_empty() {
            out.push_str(&fields.fields);
            out.push(',');
        }
    }
    out.push_str("\"name\":");
    string(out, span.metadata().name())?;
    out.push('}');
    Ok(())
}

impl<S> FormatEvent<S, JsonLines> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonLines>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        with_scratch(&LINE, |line| {
            event_line(line, ctx, event)?;
            writer.write_str(line)
        })
    }
}

thread_local! {
    /// Where a line is built before it goes to the formatter's buffer in one piece; kept per
    /// thread, so it allocates only when a line is longer than any before.
    static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Writes one event's line, newline included.
fn event_line<S>(
    out: &mut String,
    ctx: &FmtContext<'_, S, JsonLines>,
    event: &Event<'_>,
) -> fmt::Result
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let meta = event.metadata();
    out.push_str("{\"timestamp\":\"");
    timestamp(out)?;
    out.push_str("\",\"level\":\"");
    out.push_str(meta.level().as_str());
    out.push('"');
    pairs(out, false, false, event)?;
    out.push_str(",\"target\":");
    string(out, meta.target())?;
    let current = event
        .parent()
        .and_then(|id| ctx.span(id))
        .or_else(|| ctx.lookup_current());
    if let Some(span) = current {
        out.push_str(",\"span\":");
        span_object(out, &span)?;
        out.push_str(",\"spans\":[");
        if let Some(leaf) = ctx.lookup_current() {
            for (i, span) in leaf.scope().from_root().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                span_object(out, &span)?;
            }
        }
        out.push(']');
    }
    out.push_str("}\n");
    Ok(())
}

/// Log lines written into memory, for the tests that read what was logged.
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
impl Lines {
    /// Everything logged so far.
    pub(crate) fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `date_and_time`, as `httpdate` (an independent formatter) writes the same second.
    fn as_httpdate(secs: u64) -> String {
        let text =
            httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs));
        // "Tue, 01 Dec 2026 14:43:15 GMT"
        let parts: Vec<&str> = text.split(' ').collect();
        let months = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let month = months.iter().position(|m| *m == parts[2]).unwrap() + 1;
        format!("{}-{month:02}-{}T{}.", parts[3], parts[1], parts[4])
    }

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        // Every ASCII character, alone and amid plain text of either side of a vector's width,
        // and some beyond ASCII.
        let mut texts: Vec<String> = (0u8..=127)
            .map(char::from)
            .flat_map(|c| {
                [
                    c.to_string(),
                    format!("{}{c}{}", "a".repeat(17), "b".repeat(40)),
                ]
            })
            .collect();
        texts.extend(["", "é", "ünïcode ✓", "\u{2028}", "\u{7f}"].map(String::from));
        for text in texts {
            let mut ours = String::new();
            string(&mut ours, &text).unwrap();
            assert_eq!(ours, serde_json::to_string(&text).unwrap(), "{text:?}");
        }
    }

    #[test]
    fn timestamps_are_the_stock_format_s_dates() {
        // The epoch, its first day's end, 2000-02-29 (a leap day: divisible by 400), 2024-02-29,
        // 2024-12-31T23:59:59 and the second after, 2100-02-28T23:59:59 and the second after
        // (2100-03-01: 2100 is no leap year).
        let mut samples = vec![
            0,
            59,
            86_399,
            86_400,
            951_782_400,
            1_709_164_800,
            1_735_689_599,
            1_735_689_600,
            4_107_542_399,
            4_107_542_400,
        ];
        // Every 7,919,999 s (about 92 days, so every month) to April 2100.
        samples.extend((0..520).map(|i| i * 7_919_999 + 12_345));
        for secs in samples {
            let mut text = String::new();
            date_and_time(&mut text, secs).unwrap();
            assert_eq!(text, as_httpdate(secs), "second {secs}");
        }
        // The time now, written twice (the second time from the thread's cache, unless the
        // second changed), as the stock formatter writes it just before and just after, to the
        // second.
        let format = |stock: bool| {
            let mut text = String::new();
            match stock {
                true => SystemTime.format_time(&mut Writer::new(&mut text)).unwrap(),
                false => timestamp(&mut text).unwrap(),
            }
            text
        };
        let before = format(true);
        let ours = [format(false), format(false)];
        let after = format(true);
        for ours in ours {
            assert_eq!(ours.len(), before.len());
            assert!(ours.ends_with('Z') && ours.as_bytes()[19] == b'.');
            assert!(ours[20..26].bytes().all(|b| b.is_ascii_digit()));
            assert!(
                [&before[..19], &after[..19]].contains(&&ours[..19]),
                "{ours} against {before} and {after}"
            );
        }
    }

    /// Logs the same events, in spans, with fields of every kind (and text that needs escaping).
    fn log_some_lines() {
        tracing::info!(target: "pcgate::access", method = %"GET", path = "/v1/\"quoted\"\n", status = 200u16, duration_ms = 0.25, negative = -3i64, cached = true, odd = "back\\slash \u{1} \u{7f} \r", "call");
        let outer = tracing::info_span!("call", request_id = ?"a45e6643", route = "summary", n = 7u64, r#type = ?"raw");
        let _outer = outer.enter();
        tracing::warn!(attempt = 2, reason = ?Some("timeout"), "retrying é ✓");
        let inner = tracing::info_span!("fetch", key = tracing::field::Empty);
        inner.record("key", "k\t1");
        inner.record("other", 1);
        let _inner = inner.enter();
        tracing::error!(error = %"connect: refused", "upstream failed");
        let empty = tracing::info_span!("bare");
        let _empty = empty.enter();
        tracing::debug!(ratio = f64::NAN, "no number");
        tracing::info!(parent: &outer, "with an explicit parent");
    }

    fn ours() -> String {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .fmt_fields(JsonLines)
            .event_format(JsonLines)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, log_some_lines);
        lines.text()
    }

    fn stock() -> String {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, log_some_lines);
        lines.text()
    }

    #[test]
    fn lines_are_the_stock_json_format_s_objects() {
        let (ours, stock) = (ours(), stock());
        assert_eq!(ours.lines().count(), 5, "{ours}");
        assert_eq!(ours.lines().count(), stock.lines().count(), "{stock}");
        for (mine, theirs) in ours.lines().zip(stock.lines()) {
            let mut mine: serde_json::Value = serde_json::from_str(mine).expect(mine);
            let mut theirs: serde_json::Value = serde_json::from_str(theirs).expect(theirs);
            let (a, b) = (
                mine["timestamp"].as_str().unwrap().to_owned(),
                theirs["timestamp"].as_str().unwrap().to_owned(),
            );
            // Same form: 2026-12-01T10:22:28.123456Z.
            assert_eq!(a.len(), b.len(), "{a} / {b}");
            assert!(a.ends_with('Z') && a.as_bytes()[10] == b'T', "{a}");
            mine.as_object_mut().unwrap().remove("timestamp");
            theirs.as_object_mut().unwrap().remove("timestamp");
            assert_eq!(mine, theirs);
        }
    }

    #[test]
    fn the_top_level_keys_come_in_the_stock_order_one_line_each() {
        let ours = ours();
        let first = ours.lines().next().unwrap();
        assert!(
            first.starts_with("{\"timestamp\":\"")
                && first.contains("\",\"level\":\"INFO\",\"message\":\"call\",\"method\":\"GET\","),
            "{first}"
        );
        assert!(
            first.ends_with(",\"target\":\"pcgate::access\"}"),
            "{first}"
        );
        let last = ours.lines().last().unwrap();
        assert!(last.contains("\"span\":{\"request_id\":"), "{last}");
        assert!(ours.ends_with("}\n"));
    }
}
