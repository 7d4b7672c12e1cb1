//! Aligned tables, as docker prints them: columns padded to the widest cell,
//! separated by three spaces.

/// Renders `header` and `rows` as aligned text (no trailing spaces).
pub(crate) fn render(header: &[&str], rows: &[Vec<String>]) -> String {
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
}
