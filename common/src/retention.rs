//! How long the splitter and the reducer keep a finished job (`BATCHQ_RETENTION`).

use std::fmt;
use std::time::Duration;

/// How long after a job ends its status, results and bookkeeping are kept; `None` keeps
/// them for ever (`0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention(Option<Duration>);

/// The default: a week, long enough to read a weekend's jobs on Monday.
pub const DEFAULT_RETENTION: &str = "7d";

impl Retention {
    /// Keeps finished jobs for ever.
    pub const FOREVER: Retention = Retention(None);
    /// [`DEFAULT_RETENTION`].
    pub const DEFAULT: Retention = Retention(Some(Duration::from_secs(7 * 86_400)));

    pub fn after(period: Duration) -> Self {
        Retention((!period.is_zero()).then_some(period))
    }

    /// The retention period, or `None` when jobs are kept for ever.
    pub fn period(self) -> Option<Duration> {
        self.0
    }

    /// Milliseconds, `None` when jobs are kept for ever.
    pub fn period_ms(self) -> Option<i64> {
        self.0
            .map(|p| i64::try_from(p.as_millis()).unwrap_or(i64::MAX))
    }

    /// Parses `90s`, `30m`, `12h`, `7d` (humantime's syntax, so `1h30m` too), or `0`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text == "0" {
            return Ok(Retention::FOREVER);
        }
        humantime::parse_duration(text)
            .map(Retention::after)
            .map_err(|e| {
                format!(
                    "BATCHQ_RETENTION/--retention {text:?} is not a duration ({e}): write a number \
                     with s, m, h or d (90s, 30m, 12h, 7d), or 0 to keep finished jobs for ever"
                )
            })
    }
}

impl fmt::Display for Retention {
    /// The period in its largest whole unit (`7d`, `90s`), or `0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => write!(f, "0"),
            Some(period) => write!(f, "{}", format_period_ms(period.as_millis())),
        }
    }
}

/// `ms` in its largest whole unit: `7d`, `12h`, `30m`, `90s`, `1500ms`.
pub fn format_period_ms(ms: u128) -> String {
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_units_and_zero() {
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(Retention::parse("90s").map(Retention::period), Ok(secs(90)));
        assert_eq!(
            Retention::parse("30m").map(Retention::period),
            Ok(secs(1800))
        );
        assert_eq!(
            Retention::parse("12h").map(Retention::period),
            Ok(secs(43_200))
        );
        assert_eq!(
            Retention::parse("7d").map(Retention::period),
            Ok(secs(604_800))
        );
        assert_eq!(Retention::parse("0"), Ok(Retention::FOREVER));
        assert_eq!(Retention::parse("0s"), Ok(Retention::FOREVER));
    }

    #[test]
    fn a_bad_value_names_the_setting() {
        for bad in ["", "7", "7x", "-1d", "soon"] {
            let error = Retention::parse(bad).expect_err(bad);
            assert!(error.starts_with("BATCHQ_RETENTION/--retention"), "{error}");
        }
    }

    #[test]
    fn shows_the_largest_whole_unit() {
        assert_eq!(
            Retention::parse("7d").map(|r| r.to_string()),
            Ok("7d".into())
        );
        assert_eq!(
            Retention::parse("90s").map(|r| r.to_string()),
            Ok("90s".into())
        );
        assert_eq!(
            Retention::parse("120m").map(|r| r.to_string()),
            Ok("2h".into())
        );
        assert_eq!(Retention::FOREVER.to_string(), "0");
        assert_eq!(Retention::parse(DEFAULT_RETENTION), Ok(Retention::DEFAULT));
    }
}
