//! Stop strings (`stop` in a request): the generated text ends before the first occurrence of any
//! of them, which is not returned (OpenAI's rule). While streaming, text that could be the start of
//! a stop string is held back until the next tokens show whether it is one.

/// How much of `text` may be shown, and whether a stop string ends it there.
pub fn scan(text: &str, stops: &[String]) -> (usize, bool) {
    if let Some(at) = stops.iter().filter_map(|s| text.find(s.as_str())).min() {
        return (at, true);
    }
    // The longest end of `text` that begins some stop string (shorter than it, or it would have
    // been found above) is held back.
    let held = stops
        .iter()
        .flat_map(|s| (1..s.len()).filter(|&k| s.is_char_boundary(k)).map(move |k| &s[..k]))
        .filter(|prefix| text.ends_with(prefix))
        .map(str::len)
        .max()
        .unwrap_or(0);
    (text.len() - held, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn text_ends_before_the_first_stop_and_holds_back_a_possible_start() {
        let s = stops(&["END", "\n\n", "é!"]);
        assert_eq!(scan("hello", &s), (5, false));
        assert_eq!(scan("hello E", &s), (6, false));
        assert_eq!(scan("hello EN", &s), (6, false));
        assert_eq!(scan("hello ENX", &s), (9, false));
        assert_eq!(scan("hello END more", &s), (6, true));
        assert_eq!(scan("a\n\nb END", &s), (1, true));
        assert_eq!(scan("a\n", &s), (1, false));
        assert_eq!(scan("café", &s), (3, false), "held back on a character boundary");
        assert_eq!(scan("anything", &[]), (8, false));
    }
}
