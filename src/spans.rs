//! Durations as people read them, the same in `check`, `list` and the status page: a configured
//! TTL (`90s`, `12h`, `7d`), a span (`42s`, `5m 10s`, `6d 23h`), and a moment relative to now
//! (`5m ago`, `in 6d 23h`).

use std::time::Duration;

/// `90s`, `12h`, `7d`: the largest unit that divides the duration.
pub(crate) fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_millis() != 0 || s == 0 {
        return format!("{}ms", d.as_millis());
    }
    for (unit, secs) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if s % secs == 0 {
            return format!("{}{unit}", s / secs);
        }
    }
    format!("{s}s")
}

/// Seconds in two units at most, enough to read at a glance: `42s`, `5m 10s`, `6d 23h`.
pub(crate) fn short_span(s: u64) -> String {
    let (d, h, m) = (s / 86_400, s % 86_400 / 3_600, s % 3_600 / 60);
    let parts: Vec<String> = [(d, "d"), (h, "h"), (m, "m"), (s % 60, "s")]
        .iter()
        .skip_while(|(n, _)| *n == 0)
        .take(2)
        .filter(|(n, _)| *n > 0)
        .map(|(n, u)| format!("{n}{u}"))
        .collect();
    if parts.is_empty() {
        "0s".to_string()
    } else {
        parts.join(" ")
    }
}

/// `in 6d 23h` for a moment `Ok(that far)` ahead, `12s ago` for one `Err(that far)` past (the
/// shape of [`std::time::SystemTime::duration_since`]).
pub(crate) fn ago_or_in(ahead: Result<Duration, Duration>) -> String {
    match ahead {
        Ok(d) => format!("in {}", short_span(d.as_secs())),
        Err(d) => format!("{} ago", short_span(d.as_secs())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_keep_two_units_at_most() {
        assert_eq!(short_span(0), "0s");
        assert_eq!(short_span(42), "42s");
        assert_eq!(short_span(3_600 + 5), "1h");
        assert_eq!(short_span(7 * 86_400 - 1), "6d 23h");
    }

    #[test]
    fn durations_take_the_largest_dividing_unit() {
        assert_eq!(short_duration(Duration::from_secs(90)), "90s");
        assert_eq!(short_duration(Duration::from_secs(12 * 3_600)), "12h");
        assert_eq!(short_duration(Duration::from_secs(7 * 86_400)), "7d");
        assert_eq!(short_duration(Duration::from_millis(250)), "250ms");
    }

    #[test]
    fn moments_read_ago_or_in() {
        assert_eq!(
            ago_or_in(Ok(Duration::from_secs(7 * 86_400 - 1))),
            "in 6d 23h"
        );
        assert_eq!(ago_or_in(Err(Duration::from_secs(12))), "12s ago");
    }
}
