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

use std::path::{Path, PathBuf};

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

/// The folder a run's tokenizer.json is looked for in: `tokenizer` (the file or its folder), else
/// the model's folder (a Hugging Face folder), else the folder of the weights it starts from.
pub fn text_folder(tokenizer: Option<&Path>, model: &Path, weights: Option<&Path>) -> Option<PathBuf> {
    if let Some(t) = tokenizer {
        return Some(if t.is_dir() { t.to_path_buf() } else { weights_folder(t).to_path_buf() });
    }
    if model.is_dir() {
        return Some(model.to_path_buf());
    }
    weights.map(|w| weights_folder(w).to_path_buf())
}

/// A token's byte range in the text it was encoded from: `(start, end)`.
pub type Span = (usize, usize);

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

    /// The ids of `text` as it is, no special tokens added: for a text that already holds them, such
    /// as a rendered chat template (transformers' `apply_chat_template` encodes it so too).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<i64>> {
        let enc =
            self.inner.encode(text, false).map_err(|e| anyhow::anyhow!("cannot encode the prompt: {e}"))?;
        Ok(enc.get_ids().iter().map(|&id| i64::from(id)).collect())
    }

    /// [`TextTokenizer::encode_plain`] with each token's byte range in `text`.
    pub fn encode_plain_offsets(&self, text: &str) -> Result<(Vec<i64>, Vec<Span>)> {
        let enc =
            self.inner.encode(text, false).map_err(|e| anyhow::anyhow!("cannot encode the text: {e}"))?;
        Ok((enc.get_ids().iter().map(|&id| i64::from(id)).collect(), enc.get_offsets().to_vec()))
    }

    /// The id of a token of the vocabulary (`<eos>`), if it has it.
    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
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

/// Whether `path` is text data for `kiln train` (`.txt`, `.md`: one document; `.jsonl`: one
/// document per line) rather than token ids.
pub fn is_text_data(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    matches!(ext.as_str(), "txt" | "md" | "jsonl")
}

/// Text data as token rows of `seq_len + 1` (see [`kiln_runtime::data::rows_from_ids`]): a `.txt`
/// or `.md` file is one document, a `.jsonl` file one document per line, each line an object whose
/// `"text"` field is a string (blank lines are skipped; any other line is an error that names it).
/// Each document is encoded with the tokenizer's special tokens (DeepSeek-V3's prepends
/// `<bos>`), followed by `eos` when the model has one, and the documents are packed one after
/// another, as DeepSeek-V3 packs its pre-training documents (reference §5.1).
pub fn load_text_rows(
    path: &Path,
    tok: &TextTokenizer,
    eos: Option<u64>,
    seq_len: Option<u64>,
) -> Result<kiln_runtime::data::TokenRows> {
    let Some(seq_len) = seq_len else {
        bail!("{}: text data needs --seq-len N, the tokens per row", path.display());
    };
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let text = match std::str::from_utf8(&bytes) {
        Ok(t) => t,
        Err(e) => bail!(
            "{}: not UTF-8 text: invalid byte at offset {} (line {})",
            path.display(),
            e.valid_up_to(),
            bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1
        ),
    };
    let docs: Vec<String> = if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("jsonl")) {
        let mut docs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = || format!("{}:{}", path.display(), i + 1);
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("{}: not a JSON object", at()))?;
            match v.get("text") {
                Some(serde_json::Value::String(t)) => docs.push(t.clone()),
                Some(other) => bail!("{}: field \"text\" must be a string, found {other}", at()),
                None => bail!("{}: no \"text\" field (each line is {{\"text\": \"...\"}})", at()),
            }
        }
        docs
    } else {
        vec![text.to_string()]
    };
    let mut ids = Vec::new();
    for d in &docs {
        ids.extend(tok.encode(d)?);
        if let Some(e) = eos {
            ids.push(e as i64);
        }
    }
    Ok(kiln_runtime::data::rows_from_ids(path, &ids, seq_len)?)
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

    #[test]
    fn text_data_is_tokenised_per_document_and_cut_into_rows() {
        let tok = fixture();
        let dir = std::env::temp_dir().join(format!("kiln-text-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let docs = ["hello world", "the clay becomes a pot", "caf\u{e9} \"quoted\""];
        let jsonl = dir.join("d.jsonl");
        let lines: Vec<String> = docs.iter().map(|d| serde_json::json!({ "text": d }).to_string()).collect();
        std::fs::write(&jsonl, lines.join("\n\n") + "\n").unwrap();
        // Each document with <bos> (the tokenizer's) and <eos> (id 1, the model's), packed.
        let mut ids = Vec::new();
        for d in docs {
            ids.extend(tok.encode(d).unwrap());
            ids.push(1);
        }
        let rows = load_text_rows(&jsonl, &tok, Some(1), Some(4)).unwrap();
        assert_eq!(rows.width(), 5);
        assert_eq!(rows.rows(), (ids.len() - 1) / 4);
        for r in 0..rows.rows() {
            assert_eq!(rows.row(r), &ids[r * 4..r * 4 + 5], "row {r}");
        }
        assert_eq!(rows.dropped() as usize, ids.len() - (rows.rows() * 4 + 1));
        // A .txt file is one document.
        let txt = dir.join("d.txt");
        std::fs::write(&txt, docs[1]).unwrap();
        let rows = load_text_rows(&txt, &tok, None, Some(2)).unwrap();
        assert_eq!(rows.row(0), &tok.encode(docs[1]).unwrap()[..3]);

        let err = |name: &str, body: &[u8], seq: Option<u64>| {
            let p = dir.join(name);
            std::fs::write(&p, body).unwrap();
            format!("{:#}", load_text_rows(&p, &tok, None, seq).unwrap_err())
        };
        let e = err("a.jsonl", b"{\"text\": \"ok\"}\n{\"txt\": \"x\"}\n", Some(2));
        assert!(e.contains("a.jsonl:2: no \"text\" field"), "{e}");
        let e = err("b.jsonl", b"{\"text\": [1]}\n", Some(2));
        assert!(e.contains("b.jsonl:1: field \"text\" must be a string, found [1]"), "{e}");
        let e = err("c.jsonl", b"\n\nnot json\n", Some(2));
        assert!(e.contains("c.jsonl:3: not a JSON object"), "{e}");
        let e = err("d.txt", b"ab\ncd\xff", Some(2));
        assert!(e.contains("invalid byte at offset 5 (line 2)"), "{e}");
        let e = err("e.txt", b"hello", None);
        assert!(e.contains("needs --seq-len"), "{e}");
        let e = err("f.txt", b"hi", Some(64));
        assert!(e.contains("too short for one row of --seq-len 64"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
