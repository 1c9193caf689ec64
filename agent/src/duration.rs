//! Durations as Kubernetes objects and flags spell them (`500ms`, `2s`, `1m`): the
//! subset of Go's `time.ParseDuration` that xlb's settings need, integers only.
use std::time::Duration;

/// `<integer><unit>` with unit `ms`, `s` or `m`; `None` for anything else.
pub fn parse(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_go_style() {
        assert_eq!(parse("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse("0s"), Some(Duration::ZERO));
        assert_eq!(parse("1m"), Some(Duration::from_secs(60)));
        for bad in ["", "2", "s", "1.5s", "2h", "-1s", "2 s"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
