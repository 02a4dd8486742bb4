//! The `.kir` lexer: turns source text into tokens with byte spans, one token at a time.
//!
//! Whitespace and `//` comments are skipped; newlines are not tokens, but every token records whether
//! it is the first on its line, because the grammar is line-based (one statement per line) and the
//! parser uses that flag to tell the end of a statement from a missing operand.
//!
//! A *word* is a run of `[A-Za-z0-9_.*+-]`: op names, attribute keys and identifiers, numbers
//! (`8`, `-0.5`, `1e-6`), element types (`bf16`) and dimensions (`8*B*T`). The lexer does not decide
//! which of these a word is; the parser does, from where the word stands.

use std::borrow::Cow;

use super::SpanError;

/// The largest value number a file may use. Values index a dense table in [`crate::Graph`], so a
/// stray `%4000000000` would otherwise make the parser allocate gigabytes.
pub(crate) const MAX_VALUE: u32 = (1 << 24) - 1;

/// What a token is.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Tok<'a> {
    /// A run of word characters, see the module documentation.
    Word(&'a str),
    /// `%12`.
    Value(u32),
    /// A quoted string with its escapes resolved.
    Str(Cow<'a, str>),
    /// One of `= , : [ ] { } @`.
    Punct(char),
    Eof,
}

impl Tok<'_> {
    /// How the token is named in "expected X, found Y" messages.
    pub(crate) fn describe(&self) -> String {
        match self {
            Tok::Word(w) => format!("`{w}`"),
            Tok::Value(v) => format!("`%{v}`"),
            Tok::Str(s) => format!("the string {s:?}"),
            Tok::Punct(c) => format!("`{c}`"),
            Tok::Eof => "the end of the file".to_string(),
        }
    }
}

/// A token and where it is: bytes `start..end` of the source.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Token<'a> {
    pub(crate) tok: Tok<'a>,
    pub(crate) start: usize,
    pub(crate) end: usize,
    /// The token is the first on its line (or the first of the file).
    pub(crate) line_start: bool,
}

pub(crate) struct Lexer<'a> {
    src: &'a str,
    pos: usize,
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'*' | b'+' | b'-')
}

/// Whether `s` lexes as exactly one word, so that it can be printed without quotes.
pub(crate) fn is_word(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_word_byte)
}

impl<'a> Lexer<'a> {
    pub(crate) fn new(src: &'a str) -> Lexer<'a> {
        Lexer { src, pos: 0 }
    }

    /// Skips whitespace and comments; returns whether a newline (or the start of the file) was passed.
    fn skip_trivia(&mut self) -> bool {
        let bytes = self.src.as_bytes();
        let mut newline = self.pos == 0;
        while let Some(&b) = bytes.get(self.pos) {
            match b {
                b'\n' => {
                    newline = true;
                    self.pos += 1;
                }
                b' ' | b'\t' | b'\r' => self.pos += 1,
                b'/' if bytes.get(self.pos + 1) == Some(&b'/') => {
                    self.pos = self.src[self.pos..].find('\n').map_or(self.src.len(), |i| self.pos + i);
                }
                _ => break,
            }
        }
        newline
    }

    /// The next token; after the end of the source, `Eof` forever.
    pub(crate) fn next_token(&mut self) -> Result<Token<'a>, SpanError> {
        let line_start = self.skip_trivia();
        let bytes = self.src.as_bytes();
        let start = self.pos;
        let Some(&b) = bytes.get(start) else {
            return Ok(Token { tok: Tok::Eof, start, end: start, line_start });
        };
        let tok = match b {
            b'"' => self.string()?,
            b'%' => {
                let digits = bytes[start + 1..].iter().take_while(|b| b.is_ascii_digit()).count();
                // Numbers and names glued to the digits (`%1x`) are not a value either.
                let word = bytes[start + 1..].iter().take_while(|&&b| is_word_byte(b)).count();
                self.pos = start + 1 + word;
                if digits == 0 || digits != word {
                    return Err(SpanError::new(
                        start,
                        self.pos.max(start + 1),
                        "expected a value number after `%`, as in `%12`",
                    ));
                }
                match self.src[start + 1..self.pos].parse::<u32>() {
                    Ok(n) if n <= MAX_VALUE => Tok::Value(n),
                    _ => {
                        let msg = format!("value number is too large: the largest is %{MAX_VALUE}");
                        return Err(SpanError::new(start, self.pos, msg));
                    }
                }
            }
            b'=' | b',' | b':' | b'[' | b']' | b'{' | b'}' | b'@' => {
                self.pos += 1;
                Tok::Punct(b as char)
            }
            _ if is_word_byte(b) => {
                let len = bytes[start..].iter().take_while(|&&b| is_word_byte(b)).count();
                self.pos = start + len;
                Tok::Word(&self.src[start..self.pos])
            }
            _ => {
                let c = self.src[start..].chars().next().expect("not at the end");
                return Err(SpanError::new(
                    start,
                    start + c.len_utf8(),
                    format!("unexpected character `{}`", c.escape_debug()),
                ));
            }
        };
        Ok(Token { tok, start, end: self.pos, line_start })
    }

    /// A string literal in the escapes of Rust's `{:?}`, which is how the printer writes strings.
    /// Strings end on their line: a newline inside one is written `\n`.
    fn string(&mut self) -> Result<Tok<'a>, SpanError> {
        let start = self.pos;
        let bytes = self.src.as_bytes();
        let line_end = self.src[start..].find('\n').map_or(self.src.len(), |i| start + i);
        let unterminated = || SpanError::new(start, line_end, "unterminated string: expected a closing `\"`");
        let mut i = start + 1;
        // Fast path: no escapes, borrow the text.
        while i < line_end && bytes[i] != b'"' && bytes[i] != b'\\' {
            i += 1;
        }
        if i >= line_end {
            return Err(unterminated());
        }
        if bytes[i] == b'"' {
            self.pos = i + 1;
            return Ok(Tok::Str(Cow::Borrowed(&self.src[start + 1..i])));
        }
        let mut out = String::from(&self.src[start + 1..i]);
        loop {
            if i >= line_end {
                return Err(unterminated());
            }
            match bytes[i] {
                b'"' => break,
                b'\\' => {
                    let (c, len) = self.escape(i, line_end)?;
                    out.push(c);
                    i += len;
                }
                _ => {
                    let c = self.src[i..].chars().next().expect("inside the line");
                    out.push(c);
                    i += c.len_utf8();
                }
            }
        }
        self.pos = i + 1;
        Ok(Tok::Str(Cow::Owned(out)))
    }

    /// The escape at byte `at` (a backslash): the character and the escape's length in bytes.
    fn escape(&self, at: usize, line_end: usize) -> Result<(char, usize), SpanError> {
        let bytes = self.src.as_bytes();
        let simple = match bytes.get(at + 1).filter(|_| at + 1 < line_end) {
            Some(b'n') => Some('\n'),
            Some(b'r') => Some('\r'),
            Some(b't') => Some('\t'),
            Some(b'0') => Some('\0'),
            Some(b'\\') => Some('\\'),
            Some(b'"') => Some('"'),
            Some(b'\'') => Some('\''),
            _ => None,
        };
        if let Some(c) = simple {
            return Ok((c, 2));
        }
        let rest = &self.src[at..line_end];
        if let Some(hex) = rest.strip_prefix("\\u{") {
            if let Some(close) = hex.find('}') {
                let c = u32::from_str_radix(&hex[..close], 16).ok().and_then(char::from_u32);
                if let Some(c) = c {
                    return Ok((c, 3 + close + 1));
                }
                return Err(SpanError::new(at, at + 3 + close + 1, "invalid unicode escape"));
            }
        }
        let len = rest.chars().nth(1).map_or(1, |c| 1 + c.len_utf8());
        Err(SpanError::new(
            at,
            at + len,
            "unknown escape in string: expected one of \\n \\r \\t \\0 \\\\ \\\" \\' \\u{...}",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(src: &str) -> Vec<(Tok<'_>, bool)> {
        let mut lx = Lexer::new(src);
        let mut out = Vec::new();
        loop {
            let t = lx.next_token().unwrap();
            if t.tok == Tok::Eof {
                return out;
            }
            out.push((t.tok, t.line_start));
        }
    }

    #[test]
    fn words_values_strings_and_lines() {
        let src = "%7, %8 = topk %6 {k = 8} // comment\n  : f32[8*B*T, -0.5, 1e-6]\n\"a\\\"b\\u{e9}\"";
        let got = toks(src);
        let want = vec![
            (Tok::Value(7), true),
            (Tok::Punct(','), false),
            (Tok::Value(8), false),
            (Tok::Punct('='), false),
            (Tok::Word("topk"), false),
            (Tok::Value(6), false),
            (Tok::Punct('{'), false),
            (Tok::Word("k"), false),
            (Tok::Punct('='), false),
            (Tok::Word("8"), false),
            (Tok::Punct('}'), false),
            (Tok::Punct(':'), true),
            (Tok::Word("f32"), false),
            (Tok::Punct('['), false),
            (Tok::Word("8*B*T"), false),
            (Tok::Punct(','), false),
            (Tok::Word("-0.5"), false),
            (Tok::Punct(','), false),
            (Tok::Word("1e-6"), false),
            (Tok::Punct(']'), false),
            (Tok::Str(Cow::Owned("a\"b\u{e9}".into())), true),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn strings_read_back_what_debug_writes() {
        for s in ["plain", "tab\tnew\nline", "quote\"back\\slash", "\u{1}ctl", "naïve ✓", ""] {
            let lit = format!("{s:?}");
            assert_eq!(toks(&lit), vec![(Tok::Str(Cow::Borrowed(s)), true)], "{lit}");
        }
    }

    #[test]
    fn errors_have_spans() {
        let e = Lexer::new("  \"abc\n\"").next_token().unwrap_err();
        assert_eq!((e.start, e.end), (2, 6));
        assert!(e.msg.starts_with("unterminated string"), "{}", e.msg);
        let e = Lexer::new("%x").next_token().unwrap_err();
        assert_eq!((e.start, e.end), (0, 2));
        assert_eq!(Lexer::new("%16777215").next_token().unwrap().tok, Tok::Value(MAX_VALUE));
        let e = Lexer::new("%16777216").next_token().unwrap_err();
        assert_eq!(e.msg, "value number is too large: the largest is %16777215");
        let e = Lexer::new("$").next_token().unwrap_err();
        assert_eq!(e.msg, "unexpected character `$`");
        let e = Lexer::new("\"a\\qb\"").next_token().unwrap_err();
        assert_eq!((e.start, e.end), (2, 4));
        let e = Lexer::new("\"\\u{d800}\"").next_token().unwrap_err();
        assert_eq!(e.msg, "invalid unicode escape");
    }
}
