//! Plain-text tables for the operator commands' human output, and the cleaning of text that
//! came from elsewhere (a receiver's answer, an error) before it reaches a terminal.

/// A table column: its header, and whether its cells are free text that may be cut.
pub struct Column {
    name: &'static str,
    cut: bool,
}

/// A column of identifiers (ids, names, statuses, times): shown whole, so that what is shown
/// can be pasted back into a command.
pub const fn id(name: &'static str) -> Column {
    Column { name, cut: false }
}

/// A column of free text (an error, a response excerpt, a URL): cut at [`MAX`] characters so
/// one long cell does not wreck the table.
pub const fn text(name: &'static str) -> Column {
    Column { name, cut: true }
}

/// Where free-text cells are cut.
pub const MAX: usize = 60;

/// `s` with every control character (C0, DEL, C1: ESC, TAB, CR, NUL…) written as a visible
/// escape such as `\u{1b}`, except line feeds when `keep_newlines`: text from a receiver or
/// another server cannot then move the cursor, rewrite the screen or break a table's columns.
pub fn clean(s: &str, keep_newlines: bool) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c == '\n' && keep_newlines {
            out.push(c);
        } else if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// One table cell: on one line (line breaks read as spaces), every other control character
/// escaped, and free text cut at [`MAX`] characters.
fn cell(s: &str, cut: bool) -> String {
    let one_line = clean(&s.replace("\r\n", " ").replace(['\n', '\r'], " "), false);
    if cut && one_line.chars().count() > MAX {
        format!("{}…", one_line.chars().take(MAX - 1).collect::<String>())
    } else {
        one_line
    }
}

/// Renders rows under headers, each column as wide as its widest cell.
pub fn render(columns: &[Column], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .map(|(i, c)| cell(c, columns.get(i).is_none_or(|col| col.cut)))
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = columns.iter().map(|c| c.name.chars().count()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| -> String {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(columns.iter().map(|c| c.name.to_string()).collect());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{id, text};

    #[test]
    fn aligns_columns() {
        let t = super::render(
            &[id("ID"), id("STATUS")],
            &[
                vec!["dlv_1".into(), "dead".into()],
                vec!["x".into(), "pending".into()],
            ],
        );
        assert_eq!(t, "ID     STATUS\ndlv_1  dead\nx      pending\n");
    }

    #[test]
    fn cuts_free_text_only() {
        let long = "n".repeat(100);
        let t = super::render(&[id("NAME"), text("ERROR")], &[vec![long.clone(), long]]);
        let row = t.lines().nth(1).unwrap();
        assert!(row.starts_with(&format!("{}  ", "n".repeat(100))), "{row}");
        assert!(row.ends_with(&format!("{}…", "n".repeat(59))), "{row}");
    }

    #[test]
    fn control_characters_are_shown_escaped() {
        let t = super::render(
            &[text("ERROR")],
            &[vec!["a\x1b[2J\tb\u{9b}c\x7f\nd".into()]],
        );
        assert_eq!(
            t.lines().nth(1).unwrap(),
            r"a\u{1b}[2J\u{9}b\u{9b}c\u{7f} d"
        );
        assert_eq!(super::clean("x\ny\rz", true), "x\ny\\u{d}z");
    }
}
