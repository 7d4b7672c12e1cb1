//! The clock as the store records it (Unix seconds and milliseconds), and
//! durations as operators write them.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::api::error::Invalid;

/// Unix milliseconds now.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Parses durations as operators write them: `500ms`, `5s`, `2m`, `1h`, `90d`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, Invalid> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        crate::invalid!("invalid duration {text:?}: expected a number and a unit, e.g. 500ms, 5s, 2m, 1h, 90d")
    })?;
    let ms = match unit {
        "ms" => n,
        "s" | "" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        "d" => n.saturating_mul(86_400_000),
        _ => {
            return Err(crate::invalid!(
                "invalid duration unit {unit:?} in {text:?}: use ms, s, m, h or d"
            ))
        }
    };
    Ok(std::time::Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap().as_millis(), 500);
        assert_eq!(parse_duration("5s").unwrap().as_secs(), 5);
        assert_eq!(parse_duration("2160h").unwrap().as_secs(), 2160 * 3600);
        assert_eq!(parse_duration("90d").unwrap().as_secs(), 90 * 86400);
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("5y").unwrap_err().contains("unit"));
    }
}
