//! The CLI's tables (`kiln compile --report` and `--timings`, `--profile`, `kiln bench`), drawn by
//! comfy-table in one style: no borders, a header row, two spaces between columns, numbers
//! right-aligned, no trailing spaces. Columns are as wide as their widest cell, so a long kernel
//! name widens its column instead of pushing the rest of its row out of line.

use comfy_table::{presets::NOTHING, CellAlignment, Table};

/// How a column's cells are aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    /// Text: names, labels.
    Left,
    /// Numbers.
    Right,
}

/// A table of `columns` (header and alignment); rows are added with [`Table::add_row`].
pub fn new(columns: &[(&str, Align)]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(columns.iter().map(|(h, _)| *h).collect::<Vec<_>>());
    let last = columns.len().saturating_sub(1);
    for (i, (_, align)) in columns.iter().enumerate() {
        let c = t.column_mut(i).expect("a column per header cell");
        c.set_padding((0, if i == last { 0 } else { 2 }));
        c.set_cell_alignment(match align {
            Align::Left => CellAlignment::Left,
            Align::Right => CellAlignment::Right,
        });
    }
    t
}

/// The table as lines ending in a newline, without trailing spaces.
pub fn render(t: &Table) -> String {
    let mut out = String::new();
    for line in t.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_fit_their_widest_cell_and_numbers_align_right() {
        let mut t = new(&[("kernel", Align::Left), ("ms", Align::Right), ("note", Align::Left)]);
        t.add_row(vec!["k_linear_0123456789ab", "1.50", "x"]);
        t.add_row(vec!["k_add", "12.25", ""]);
        assert_eq!(
            render(&t),
            "kernel                    ms  note\n\
             k_linear_0123456789ab   1.50  x\n\
             k_add                  12.25\n"
        );
    }
}
