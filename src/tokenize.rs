//! Text prompts for `kiln run --prompt "text"`: the model's `tokenizer.json` (Hugging Face's format,
//! read with the `tokenizers` crate) from the weights folder encodes the prompt, and generated tokens
//! are decoded as they come.
//!
//! Encoding adds the tokenizer's special tokens (its post-processor: DeepSeek-V3's prepends the
//! beginning-of-sentence token), as `transformers` does by default. Decoding skips special tokens.
//!
//! Streaming ([`TextStream`]): each step decodes the prompt and every token so far and prints what
//! the text gained. Decoding the whole sequence, not the new token alone, keeps what depends on the
//! neighbours right (a leading space that a decoder strips at the start of a text, a character whose
//! UTF-8 bytes span two byte-level tokens). A text ending in U+FFFD (an incomplete character) is held
//! back until the next token completes it or generation ends. Each step re-decodes the sequence,
//! which is negligible next to a forward pass at the lengths `kiln run` generates.

use std::path::Path;

use anyhow::{bail, Context, Result};
use tokenizers::Tokenizer;

/// The file a weights folder holds its tokenizer in.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// A loaded `tokenizer.json`.
pub struct TextTokenizer {
    inner: Tokenizer,
}

/// The folder of a `--weights` path: the path itself, or the folder of a `.safetensors` or index
/// file.
pub fn weights_folder(weights: &Path) -> &Path {
    if weights.is_dir() {
        weights
    } else {
        weights.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
    }
}

/// Loads `folder/tokenizer.json`; its absence is an error that names the folder and the way out.
pub fn load(folder: &Path) -> Result<TextTokenizer> {
    let path = folder.join(TOKENIZER_FILE);
    if !path.is_file() {
        bail!(
            "{} has no {TOKENIZER_FILE}: --prompt \"text\" needs the model's tokenizer in the weights \
             folder; give the prompt as token ids with --prompt-ids instead",
            folder.display()
        );
    }
    let inner = Tokenizer::from_file(&path)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot load the tokenizer {}", path.display()))?;
    Ok(TextTokenizer { inner })
}

impl TextTokenizer {
    /// The ids of `text`, special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc =
            self.inner.encode(text, true).map_err(|e| anyhow::anyhow!("cannot encode the prompt: {e}"))?;
        Ok(enc.get_ids().iter().map(|&id| i64::from(id)).collect())
    }

    /// The text of `ids`, special tokens skipped; ids the tokenizer does not know decode to nothing.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().filter_map(|&id| u32::try_from(id).ok()).collect();
        self.inner.decode(&ids, true).map_err(|e| anyhow::anyhow!("cannot decode tokens: {e}"))
    }

    /// A stream that continues `prompt`.
    pub fn stream(&self, prompt: &[i64]) -> Result<TextStream<'_>> {
        let text = self.decode(prompt)?;
        Ok(TextStream {
            tokenizer: self,
            ids: prompt.to_vec(),
            shown: text.clone(),
            prompt_text_len: text.len(),
            text,
        })
    }
}

/// Decoded text as tokens come; see the module documentation.
pub struct TextStream<'a> {
    tokenizer: &'a TextTokenizer,
    ids: Vec<i64>,
    /// The last decoding of `ids`.
    text: String,
    /// The text handed out so far, the prompt's included, and the prompt's part of it.
    shown: String,
    prompt_text_len: usize,
}

impl TextStream<'_> {
    /// The text of the prompt, which [`TextStream::push`] continues.
    pub fn prompt_text(&self) -> &str {
        &self.shown[..self.prompt_text_len]
    }

    /// Adds a token; returns the text it adds (possibly nothing yet).
    pub fn push(&mut self, id: i64) -> Result<String> {
        self.ids.push(id);
        self.text = self.tokenizer.decode(&self.ids)?;
        // A decoder may rewrite text it has already produced (rarely: a cleanup rule that looks
        // ahead); then nothing more is printed until the text extends what was printed again.
        if !self.text.starts_with(&self.shown) {
            return Ok(String::new());
        }
        let ready = self.text.trim_end_matches('\u{FFFD}').len().max(self.shown.len());
        let new = self.text[self.shown.len()..ready].to_string();
        self.shown.push_str(&new);
        Ok(new)
    }

    /// What is left when generation ends: characters held back as possibly incomplete.
    pub fn finish(&mut self) -> String {
        match self.text.strip_prefix(self.shown.as_str()) {
            Some(rest) if !rest.is_empty() => {
                let rest = rest.to_string();
                self.shown.push_str(&rest);
                rest
            }
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> TextTokenizer {
        load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")).unwrap()
    }

    #[test]
    fn a_character_split_over_tokens_is_held_back_until_complete() {
        let tok = fixture();
        // "café ☕ zebra": `<bos>`, then the three UTF-8 bytes of ☕ are tokens 160, 248 and 245
        // (tests/fixtures/tokenizer/expected.json).
        let ids = tok.encode("café ☕ zebra").unwrap();
        assert_eq!(ids, [0, 307, 289, 222, 160, 248, 245, 222, 91, 70, 67, 83, 66]);
        let mut s = tok.stream(&ids[..3]).unwrap();
        assert_eq!(s.prompt_text(), "café");
        let pieces: Vec<String> = ids[3..].iter().map(|&id| s.push(id).unwrap()).collect();
        assert_eq!(pieces, [" ", "", "", "☕", " ", "z", "e", "b", "r", "a"]);
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn an_unfinished_character_is_flushed_at_the_end_and_unknown_ids_print_nothing() {
        let tok = fixture();
        let mut s = tok.stream(&[0]).unwrap();
        assert_eq!(s.prompt_text(), "", "<bos> is special and skipped");
        // An id the tokenizer does not have (the model's vocabulary is larger) decodes to nothing.
        assert_eq!(s.push(400).unwrap(), "");
        assert_eq!(s.push(160).unwrap(), "");
        assert_eq!(s.finish(), "\u{FFFD}");
        assert_eq!(s.finish(), "");
    }
}
