//! Aligned tables, as docker prints them: columns padded to the widest cell,
//! separated by three spaces.

/// Renders `header` and `rows` as aligned text (no trailing spaces).
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            out.push_str(cell);
            if i + 1 < cells.len() {
                out.push_str(&" ".repeat(widths[i] - cell.chars().count() + 3));
            }
        }
        out.trim_end().to_string()
    };
    let mut text = line(header.to_vec());
    for row in rows {
        text.push('\n');
        text.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    text.push('\n');
    text
}

/// Parses durations as operators write them: `500ms`, `5s`, `2m`, `1h`, `90d`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected a number and a unit, e.g. 500ms, 5s, 2m, 1h, 90d"))?;
    let ms = match unit {
        "ms" => n,
        "s" | "" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        "d" => n.saturating_mul(86_400_000),
        _ => {
            return Err(format!(
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
    fn aligns_columns() {
        let t = render(
            &["ID", "HOSTNAME", "STATUS"],
            &[
                vec!["a".into(), "long-name".into(), "Ready".into()],
                vec!["bbbb".into(), "x".into(), String::new()],
            ],
        );
        assert_eq!(t, "ID     HOSTNAME    STATUS\na      long-name   Ready\nbbbb   x\n");
    }

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
