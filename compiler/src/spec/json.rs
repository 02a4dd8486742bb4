//! Positions of keys in JSON text, for diagnostics about Hugging Face configs.
//!
//! serde_json keeps no spans, so this is a small scanner over the source. It runs only on text that
//! serde_json has already accepted, so it does not validate; on anything unexpected it gives up
//! (returns `None`) rather than guess, and it never panics. Like serde_json's `Map`, when a key
//! appears twice in one object the last one counts.

use std::ops::Range;

/// The byte span of the key (including its quotes) at `path`, e.g. `["rope_scaling", "factor"]`.
pub(super) fn key_span(src: &str, path: &[&str]) -> Option<Range<usize>> {
    let mut scan = Scanner { b: src.as_bytes(), i: 0 };
    scan.ws();
    let mut object = scan.i;
    let mut found = None;
    for key in path {
        let (span, value) = scan.find_member(object, key)?;
        found = Some(span);
        object = value;
    }
    found
}

/// The byte offset of the opening `{` of the top-level object (0 if there is none).
pub(super) fn root_start(src: &str) -> usize {
    src.bytes().position(|c| !c.is_ascii_whitespace()).unwrap_or(0)
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        self.ws();
        (self.peek()? == c).then(|| self.i += 1)
    }

    /// A string starting at the cursor; returns its span including the quotes.
    fn string(&mut self) -> Option<Range<usize>> {
        let start = self.i;
        self.eat(b'"')?;
        loop {
            match self.peek()? {
                b'\\' => self.i += 2,
                b'"' => {
                    self.i += 1;
                    return Some(start..self.i);
                }
                _ => self.i += 1,
            }
        }
    }

    fn skip_value(&mut self) -> Option<()> {
        self.ws();
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.i += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
            }
            _ => {
                while self
                    .peek()
                    .is_some_and(|c| !matches!(c, b',' | b'}' | b']') && !c.is_ascii_whitespace())
                {
                    self.i += 1;
                }
                Some(())
            }
        }
    }

    /// In the object starting at `object`, the last member named `key`: its key span and the offset
    /// of its value.
    fn find_member(&mut self, object: usize, key: &str) -> Option<(Range<usize>, usize)> {
        self.i = object;
        self.eat(b'{')?;
        let mut found = None;
        self.ws();
        if self.peek()? == b'}' {
            return None;
        }
        loop {
            self.ws();
            let span = self.string()?;
            self.eat(b':')?;
            self.ws();
            if self.b.get(span.start + 1..span.end - 1) == Some(key.as_bytes()) {
                found = Some((span, self.i));
            }
            self.skip_value()?;
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                _ => return found,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_keys_and_skips_look_alikes() {
        let src =
            r#" {"a": {"factor": 1}, "s": "\"factor\": {", "rope": {"x": [1, {"factor": 2}], "factor": 40}}"#;
        let span = key_span(src, &["rope", "factor"]).unwrap();
        assert_eq!(&src[span.clone()], "\"factor\"");
        assert_eq!(src[span.end..].trim_start(), ": 40}}");
        assert_eq!(key_span(src, &["rope", "missing"]), None);
        assert_eq!(key_span(src, &["s", "factor"]), None);
        assert_eq!(root_start(src), 1);
    }

    #[test]
    fn last_duplicate_wins_and_garbage_gives_none() {
        let src = r#"{"k": 1, "k": 2}"#;
        assert_eq!(key_span(src, &["k"]), Some(9..12));
        for bad in ["", "{", "{\"k\"", "{\"k\": [", "[1]", "{\"k\": \"\\"] {
            assert_eq!(key_span(bad, &["k", "j"]), None, "{bad:?}");
        }
    }
}
