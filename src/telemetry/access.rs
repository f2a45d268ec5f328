//! The text log's formatter. Access-log events (one per gateway request)
//! are written by hand: the same line tracing-subscriber's default format
//! prints, without its general field machinery (22% of the gateway's
//! instructions in a callgrind profile under load; under 8% with this,
//! the line built in a string of its own and written in one piece).
//! Every other event, and
//! every event on a colour terminal, goes to the default format.
//!
//! With that format installed, the access line does not go through
//! tracing at all ([`Access::log`]): it is built from its typed fields and
//! written to stderr, byte for byte what the event would print, without
//! tracing's dispatch and field visitor (about 2,000 instructions a line).

use std::cell::Cell;
use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The target of the gateway's per-request events.
pub const ACCESS_TARGET: &str = "muster::access";

/// Whether access lines skip tracing (see the module docs): set by
/// `telemetry::init` when it installs [`TextFormat`] without colours and
/// with a filter that has no span or field directives (which only a
/// tracing event can be matched against).
static DIRECT: AtomicBool = AtomicBool::new(false);

pub(super) fn write_directly(direct: bool) {
    DIRECT.store(direct, Ordering::Relaxed);
}

/// One gateway request, as its access line records it.
pub struct Access<'a> {
    pub route: &'a str,
    pub service: &'a str,
    pub instance: &'a str,
    pub status: u16,
    pub method: &'a str,
    pub path: &'a str,
    pub bytes: u64,
    pub latency_ms: f64,
    pub request_id: &'a str,
}

impl Access<'_> {
    /// Logs the request at `info` on [`ACCESS_TARGET`], when the filter
    /// lets that through.
    pub fn log(&self) {
        if !DIRECT.load(Ordering::Relaxed) {
            // The event filters itself (field directives included).
            return self.event();
        }
        // Only target and level directives here, which this asks exactly.
        if tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO) {
            let line = self.line(SystemTime::now());
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }

    /// The request as a tracing event.
    fn event(&self) {
        // Plain `&str` fields: the access formatter writes them as they are.
        tracing::info!(
            target: ACCESS_TARGET,
            route = self.route,
            service = self.service,
            instance = self.instance,
            status = self.status,
            method = self.method,
            path = self.path,
            bytes = self.bytes,
            latency_ms = self.latency_ms,
            request_id = self.request_id,
            "request"
        );
    }

    /// The line [`TextFormat`] prints for [`Self::event`] at `now`.
    fn line(&self, now: SystemTime) -> String {
        let mut line = AccessLine::new();
        line.head(now, "INFO", ACCESS_TARGET);
        line.start("message");
        line.line.push_str("request");
        for (name, value) in [
            ("route", self.route),
            ("service", self.service),
            ("instance", self.instance),
        ] {
            line.start(name);
            write_escaped(&mut line.line, value);
        }
        line.start("status");
        line.line.push_str(itoa::Buffer::new().format(self.status));
        for (name, value) in [("method", self.method), ("path", self.path)] {
            line.start(name);
            write_escaped(&mut line.line, value);
        }
        line.start("bytes");
        line.line.push_str(itoa::Buffer::new().format(self.bytes));
        line.start("latency_ms");
        write_thousandths(&mut line.line, self.latency_ms);
        line.start("request_id");
        write_escaped(&mut line.line, self.request_id);
        line.line.push('\n');
        line.line
    }
}

/// The default format, with access events written by [`AccessLine`].
#[derive(Default)]
pub struct TextFormat {
    general: Format,
}

impl<S, N> FormatEvent<S, N> for TextFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        if metadata.target() != ACCESS_TARGET || writer.has_ansi_escapes() {
            return self.general.format_event(ctx, writer, event);
        }
        let mut line = AccessLine::new();
        line.head(
            SystemTime::now(),
            metadata.level().as_str(),
            metadata.target(),
        );
        event.record(&mut line);
        line.result?;
        line.line.push('\n');
        writer.write_str(&line.line)
    }
}

/// Room for a typical access line, so it is built without growing.
const LINE_CAPACITY: usize = 256;

/// Builds an event's line, `timestamp LEVEL target: message name=value
/// name=value`, in a string of its own, then hands it to the writer in one
/// piece (rather than a dynamic call per piece).
struct AccessLine {
    line: String,
    first: bool,
    /// A `Debug` value that failed to format.
    result: fmt::Result,
}

impl AccessLine {
    fn new() -> Self {
        Self {
            line: String::with_capacity(LINE_CAPACITY),
            first: true,
            result: Ok(()),
        }
    }

    fn head(&mut self, now: SystemTime, level: &str, target: &str) {
        let stamp = timestamp(now);
        // ASCII digits and punctuation: always UTF-8.
        if let Ok(stamp) = std::str::from_utf8(&stamp) {
            self.line.push_str(stamp);
        }
        self.line.push_str(&"      "[..6 - level.len()]);
        self.line.push_str(level);
        self.line.push(' ');
        self.line.push_str(target);
        self.line.push_str(": ");
    }

    /// Writes the separator and `name=` (nothing for the message).
    fn start(&mut self, name: &str) {
        if !std::mem::take(&mut self.first) {
            self.line.push(' ');
        }
        if name != "message" {
            self.line.push_str(name);
            self.line.push('=');
        }
    }
}

impl Visit for AccessLine {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.start(field.name());
        write_escaped(&mut self.line, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.start(field.name());
        self.line.push_str(itoa::Buffer::new().format(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.start(field.name());
        self.line.push_str(itoa::Buffer::new().format(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.start(field.name());
        write_thousandths(&mut self.line, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.start(field.name());
        self.line.push_str(if value { "true" } else { "false" });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.start(field.name());
        if self.result.is_ok() {
            self.result = write!(Escaping(&mut self.line), "{value:?}");
        }
    }
}

/// Appends `text`, with control characters escaped so that a value can
/// neither end the line nor drive a terminal.
fn write_escaped(line: &mut String, text: &str) {
    // Printable ASCII (almost every value), checked without an early exit
    // so that the check runs many bytes at a time.
    let printable = text
        .bytes()
        .fold(true, |all, b| all & (b.wrapping_sub(0x20) < 0x5f));
    // Control characters are below 0x20, 0x7f, or (C1) start with 0xc2.
    let plain = |b: &u8| (0x20..0x7f).contains(b) || (*b > 0x7f && *b != 0xc2);
    if printable || text.as_bytes().iter().all(plain) {
        return line.push_str(text);
    }
    for c in text.chars() {
        if c.is_control() {
            line.extend(c.escape_default());
        } else {
            line.push(c);
        }
    }
}

/// A writer that escapes what passes through it.
struct Escaping<'a>(&'a mut String);

impl fmt::Write for Escaping<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_escaped(self.0, s);
        Ok(())
    }
}

/// Appends a non-negative number to three decimals (`12.345`); anything
/// else as Rust prints it.
fn write_thousandths(line: &mut String, value: f64) {
    if !(0.0..1e15).contains(&value) {
        return line.push_str(&value.to_string());
    }
    let thousandths = (value * 1000.0).round() as u64;
    let mut digits = itoa::Buffer::new();
    line.push_str(digits.format(thousandths / 1000));
    line.push('.');
    let fraction = thousandths % 1000;
    if fraction < 100 {
        line.push('0');
    }
    if fraction < 10 {
        line.push('0');
    }
    line.push_str(digits.format(fraction));
}

/// `2026-11-26T15:50:23.399980Z`: RFC 3339 in UTC with microseconds, as
/// tracing-subscriber's default timer prints it. The date and time of day
/// are written once a second per thread; a line writes its microseconds.
fn timestamp(now: SystemTime) -> [u8; 27] {
    thread_local! {
        static SECOND: Cell<Option<(u64, [u8; 27])>> = const { Cell::new(None) };
    }
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since.as_secs();
    let mut text = SECOND.with(|cached| match cached.get() {
        Some((second, text)) if second == seconds => text,
        _ => {
            let text = second_stamp(seconds);
            cached.set(Some((seconds, text)));
            text
        }
    });
    put_digits(&mut text[20..26], u64::from(since.subsec_micros()));
    text
}

/// The timestamp of whole second `seconds` after the epoch.
fn second_stamp(seconds: u64) -> [u8; 27] {
    let (year, month, day) = civil_date(seconds / 86_400);
    let of_day = seconds % 86_400;
    let mut text = *b"0000-00-00T00:00:00.000000Z";
    put_digits(&mut text[0..4], year);
    put_digits(&mut text[5..7], month);
    put_digits(&mut text[8..10], day);
    put_digits(&mut text[11..13], of_day / 3600);
    put_digits(&mut text[14..16], of_day / 60 % 60);
    put_digits(&mut text[17..19], of_day % 60);
    text
}

/// Writes `value`'s last `digits.len()` decimal digits, zero-padded.
fn put_digits(digits: &mut [u8], mut value: u64) {
    for digit in digits.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// The proleptic Gregorian date `days` after 1970-01-01, by counting
/// 400-year eras (146,097 days each) from 0000-03-01, so that the leap
/// day falls at the end of each counted year.
fn civil_date(days: u64) -> (u64, u64, u64) {
    const DAYS_FROM_0000_03_01_TO_EPOCH: u64 = 719_468;
    let days = days + DAYS_FROM_0000_03_01_TO_EPOCH;
    let era = days / 146_097;
    let day_of_era = days % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing::info;

    use super::*;

    /// A log writer that keeps what it is given.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// What `log` prints through the default format and through ours.
    fn both_formats(log: impl Fn()) -> (String, String) {
        let general = Captured::default();
        let ours = Captured::default();
        let writer = general.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, &log);
        let writer = ours.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .event_format(TextFormat::default())
            .finish();
        tracing::subscriber::with_default(subscriber, &log);
        (general.text(), ours.text())
    }

    /// The line without its timestamp, after checking the timestamp's shape.
    fn after_timestamp(line: &str) -> &str {
        let (stamp, rest) = line.split_at(27);
        let bytes = stamp.as_bytes();
        assert!(
            bytes[4] == b'-' && bytes[10] == b'T' && bytes[19] == b'.' && bytes[26] == b'Z',
            "timestamp shape: {line}"
        );
        rest
    }

    /// With Display (`%`) fields, which the default prints unquoted. It
    /// quotes plain `&str` fields, which the proxy records; ours does not
    /// (see the escaping test).
    #[test]
    fn access_lines_read_as_the_default_format_prints_them() {
        let (general, ours) = both_formats(|| {
            info!(
                target: ACCESS_TARGET,
                route = %"bench",
                status = 200u16,
                bytes = 233u64,
                latency_ms = 12.345,
                "request"
            );
        });
        assert!(ours.ends_with('\n'), "{ours:?}");
        assert_eq!(after_timestamp(&ours), after_timestamp(&general));
        assert!(
            ours.contains(
                " INFO muster::access: request route=bench status=200 bytes=233 latency_ms=12.345"
            ),
            "{ours}"
        );
    }

    #[test]
    fn a_line_written_directly_reads_as_the_event_prints_it() {
        let access = Access {
            route: "bench",
            service: "backend",
            instance: "b-1",
            status: 503,
            method: "GET",
            path: "/a b\n\u{1b}[2J",
            bytes: 233,
            latency_ms: 12.3456,
            request_id: "0af7651916cd43dd8448eb211c80319c",
        };
        let (_, through_tracing) = both_formats(|| access.event());
        let direct = access.line(SystemTime::now());
        assert_eq!(after_timestamp(&direct), after_timestamp(&through_tracing));
        assert!(
            direct.ends_with(" latency_ms=12.346 request_id=0af7651916cd43dd8448eb211c80319c\n"),
            "{direct}"
        );
    }

    #[test]
    fn other_events_keep_the_default_format() {
        let (general, ours) = both_formats(|| info!(name = "x", count = 3, "something happened"));
        assert_eq!(after_timestamp(&ours), after_timestamp(&general));
    }

    #[test]
    fn access_values_are_written_plain_with_controls_escaped() {
        let (_, ours) = both_formats(|| {
            info!(
                target: ACCESS_TARGET,
                path = "/a b\n\u{1b}[2J",
                latency_ms = 0.0004,
                instance = ?"dbg\n",
                "request"
            );
        });
        assert_eq!(ours.lines().count(), 1, "{ours:?}");
        assert!(
            ours.contains(r#"request path=/a b\n\u{1b}[2J latency_ms=0.000 instance="dbg\n""#),
            "{ours}"
        );
    }

    #[test]
    fn every_ascii_control_is_escaped_and_nothing_else() {
        for byte in 0..=0x7fu8 {
            let c = char::from(byte);
            let mut written = String::new();
            write_escaped(&mut written, &format!("a{c}b"));
            let expected = match c.is_control() {
                true => format!("a{}b", c.escape_default()),
                false => format!("a{c}b"),
            };
            assert_eq!(written, expected, "byte {byte:#04x}");
        }
    }

    #[test]
    fn timestamps_are_rfc3339_with_microseconds() {
        let at = UNIX_EPOCH + std::time::Duration::new(1_795_708_223, 399_980_123);
        assert_eq!(&timestamp(at), b"2026-11-26T15:50:23.399980Z");
        // The same second again, from the thread's kept one.
        let later = at + std::time::Duration::from_micros(7);
        assert_eq!(&timestamp(later), b"2026-11-26T15:50:23.399987Z");
        let next = at + std::time::Duration::from_secs(1);
        assert_eq!(&timestamp(next), b"2026-11-26T15:50:24.399980Z");
        assert_eq!(&timestamp(UNIX_EPOCH), b"1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn civil_dates_match_known_days() {
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(59), (1970, 3, 1));
        assert_eq!(civil_date(11_016), (2000, 2, 29));
        assert_eq!(civil_date(11_017), (2000, 3, 1));
        assert_eq!(civil_date(20_783), (2026, 11, 26));
        assert_eq!(civil_date(47_541), (2100, 3, 1));
    }

    fn month_length(year: u64, month: u64) -> u64 {
        let leap =
            year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400));
        match month {
            2 if leap => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        }
    }

    #[test]
    fn every_day_follows_the_one_before() {
        let mut previous = civil_date(0);
        for day in 1..200_000 {
            let date = civil_date(day);
            let (y, m, d) = previous;
            let expected = if d < month_length(y, m) {
                (y, m, d + 1)
            } else if m < 12 {
                (y, m + 1, 1)
            } else {
                (y + 1, 1, 1)
            };
            assert_eq!(date, expected, "the day after {previous:?}");
            previous = date;
        }
    }
}
