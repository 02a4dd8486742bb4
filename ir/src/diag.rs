//! Source diagnostics shared by every parser in kiln (`.kir` files here, model specs in the
//! compiler): a message, a location and the offending source line with a caret under the span.
//!
//! ```text
//! error: unknown op `frobnicate`
//!  --> bad.kir:3:8
//!   |
//! 3 |   %2 = frobnicate %1 : f32[B]
//!   |        ^^^^^^^^^^
//! ```

use std::fmt;

/// A message about a span of a source file. Lines and columns are 1-based; columns count characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub col: usize,
    /// Width of the span in characters (at least 1 when rendered).
    pub len: usize,
    pub message: String,
    /// The source line the span is on, without its newline.
    pub source_line: String,
}

impl Diagnostic {
    /// Builds a diagnostic for the byte range `start..end` of `src`.
    pub fn at_bytes(
        file: &str,
        src: &str,
        start: usize,
        end: usize,
        message: impl Into<String>,
    ) -> Diagnostic {
        let start = floor_char_boundary(src, start.min(src.len()));
        let end = floor_char_boundary(src, end.clamp(start, src.len()));
        let line_start = src[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = src[start..].find('\n').map_or(src.len(), |i| start + i);
        let line = src[..start].matches('\n').count() + 1;
        let col = src[line_start..start].chars().count() + 1;
        let len = src[start..end.min(line_end)].chars().count();
        Diagnostic {
            file: file.to_string(),
            line,
            col,
            len,
            message: message.into(),
            source_line: src[line_start..line_end].trim_end_matches('\r').to_string(),
        }
    }

    /// Builds a diagnostic for a 1-based line and column of `src`.
    pub fn at_line_col(
        file: &str,
        src: &str,
        line: usize,
        col: usize,
        len: usize,
        message: impl Into<String>,
    ) -> Diagnostic {
        let source_line = src.lines().nth(line.saturating_sub(1)).unwrap_or("").to_string();
        Diagnostic { file: file.to_string(), line, col, len, message: message.into(), source_line }
    }
}

/// The text of the file `file`, or a diagnostic at its first byte that is not UTF-8: the line and
/// column (in characters before it), and its offset in bytes, which is what a hex editor shows.
pub fn utf8<'a>(file: &str, bytes: &'a [u8]) -> Result<&'a str, Diagnostic> {
    let e = match std::str::from_utf8(bytes) {
        Ok(text) => return Ok(text),
        Err(e) => e,
    };
    let at = e.valid_up_to();
    let before = std::str::from_utf8(&bytes[..at]).expect("valid up to here");
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_end = bytes[at..].iter().position(|&b| b == b'\n').map_or(bytes.len(), |i| at + i);
    let message = format!(
        "the file is not UTF-8 text: byte {at} (0x{:02x}) does not start a UTF-8 character; kiln reads \
         specs, configs and .kir files as UTF-8, so re-save it as UTF-8",
        bytes[at]
    );
    Err(Diagnostic {
        file: file.to_string(),
        line: before.matches('\n').count() + 1,
        col: before[line_start..].chars().count() + 1,
        len: 1,
        message,
        source_line: String::from_utf8_lossy(&bytes[line_start..line_end]).trim_end_matches('\r').to_string(),
    })
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let num = self.line.to_string();
        let pad = " ".repeat(num.len());
        writeln!(f, "error: {}", self.message)?;
        writeln!(f, "{pad}--> {}:{}:{}", self.file, self.line, self.col)?;
        writeln!(f, "{pad} |")?;
        writeln!(f, "{num} | {}", self.source_line)?;
        let indent: String = self
            .source_line
            .chars()
            .take(self.col.saturating_sub(1))
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        write!(f, "{pad} | {indent}{}", "^".repeat(self.len.max(1)))
    }
}

impl std::error::Error for Diagnostic {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_with_caret_under_span() {
        let src = "graph @g {\n  %2 = frobnicate %1 : f32[B]\n}\n";
        let start = src.find("frobnicate").unwrap();
        let d = Diagnostic::at_bytes("bad.kir", src, start, start + 10, "unknown op `frobnicate`");
        assert_eq!((d.line, d.col, d.len), (2, 8, 10));
        assert_eq!(
            d.to_string(),
            "error: unknown op `frobnicate`\n --> bad.kir:2:8\n  |\n2 |   %2 = frobnicate %1 : f32[B]\n  |        ^^^^^^^^^^"
        );
    }

    #[test]
    fn bytes_that_are_not_utf8_are_located_by_line_column_and_offset() {
        assert_eq!(utf8("f", "ok é\n".as_bytes()), Ok("ok é\n"));
        let d = utf8("spec.toml", b"[model]\nname = \"t\xffny\"\n").unwrap_err();
        assert_eq!((d.line, d.col, d.len), (2, 10, 1));
        assert_eq!(
            d.to_string(),
            "error: the file is not UTF-8 text: byte 17 (0xff) does not start a UTF-8 character; kiln reads \
             specs, configs and .kir files as UTF-8, so re-save it as UTF-8\n --> spec.toml:2:10\n  |\n2 | \
             name = \"t\u{fffd}ny\"\n  |          ^"
        );
        // A character cut short at the end of the file.
        let d = utf8("g.kir", "é".as_bytes().split_last().unwrap().1).unwrap_err();
        assert_eq!((d.line, d.col), (1, 1));
    }

    #[test]
    fn spans_past_the_end_are_clamped() {
        let d = Diagnostic::at_bytes("f", "abc", 10, 20, "eof");
        assert_eq!((d.line, d.col, d.len), (1, 4, 0));
        assert!(d.to_string().ends_with("|    ^"));
    }
}
