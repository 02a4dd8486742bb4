//! `kiln sft`: supervised fine-tuning on conversations. It is `kiln train` with two differences:
//! the data is chat JSONL, and the loss counts the assistant's tokens alone.
//!
//! Each line of the data is `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."},
//! ...]}`. A conversation is rendered with the model's chat template (tokenizer_config.json, as
//! `kiln chat` renders it) and encoded without added special tokens, since the rendered text holds
//! them. Each conversation is one row, padded with the model's end-of-sequence token (or 0) to the
//! rows' length. A target counts when its token belongs to an assistant message as the template
//! renders it: the content and whatever the template closes the turn with (DeepSeek-V3's
//! `<｜end▁of▁sentence｜>`), which is how the model learns to stop. The system and user turns, the
//! template's turn headers and the padding carry no loss.
//!
//! The assistant spans are found by rendering prefixes of the conversation. For assistant message
//! `j`, the text up to message `j` with the assistant's turn opened (`add_generation_prompt`) ends
//! where the span starts. The text of messages `..=j` ends where the span ends. A template that
//! does not render a conversation prefix by prefix is refused, naming the line, because its spans
//! could not be told.
//!
//! The loss of a step is the mean cross-entropy over the assistant targets of its batch. The train
//! step weighs each target by the input `loss_weights` (see `kiln_compiler::build::TrainLosses`),
//! and [`normalise`] makes those weights `mask * B T / count` for each batch. The defaults are
//! DeepSeek-V3's SFT (DeepSeek-V3 report §5.1): two epochs, a cosine decay of the learning rate
//! from 5e-6 to 1e-6. The report packs several samples into one sequence and masks them from each
//! other. kiln gives each conversation a row of its own instead, which isolates samples without a
//! block-diagonal mask at the cost of the padding.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use kiln_runtime::data::TokenRows;

use crate::chat::template::{ChatTemplate, Message};
use crate::tokenize::TextTokenizer;

/// DeepSeek-V3's SFT learning rate (report §5.1): the cosine decay starts here...
pub const LR: f64 = 5e-6;
/// ...and ends here.
pub const MIN_LR: f64 = 1e-6;
/// DeepSeek-V3's SFT epochs (report §5.1).
pub const EPOCHS: u64 = 2;

/// What loading the conversations found, for the run's header.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub conversations: usize,
    /// Targets that count (assistant tokens), over all rows.
    pub assistant_targets: u64,
    /// Conversations longer than a row, cut at its end.
    pub truncated: usize,
    /// Assistant tokens lost to the cut.
    pub truncated_targets: u64,
}

/// One conversation, encoded: its tokens and, for each token, whether it is the assistant's.
struct Encoded {
    ids: Vec<i64>,
    assistant: Vec<bool>,
}

/// The conversations of the chat JSONL file at `path` as rows of `seq_len + 1` tokens (default:
/// the longest conversation's length), each target weighed 1 if it is an assistant token and 0
/// otherwise. `pad` fills the rows' ends; `max_len` (the model's context) bounds the rows.
pub fn load_rows(
    path: &Path,
    template: &ChatTemplate,
    tok: &TextTokenizer,
    seq_len: Option<u64>,
    pad: i64,
    max_len: u64,
) -> Result<(TokenRows, Summary)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut convs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let messages = parse_line(line).with_context(|| at.clone())?;
        convs.push(encode(&messages, template, tok).with_context(|| at.clone())?);
    }
    if convs.is_empty() {
        bail!("{}: no conversations (each line is {{\"messages\": [...]}})", path.display());
    }
    let longest = convs.iter().map(|c| c.ids.len()).max().unwrap_or(0) as u64;
    let width = match seq_len {
        Some(0) => bail!("--seq-len must be at least 1"),
        Some(t) => t + 1,
        None => longest,
    };
    if width < 2 {
        bail!("{}: the conversations are a single token long; nothing to predict", path.display());
    }
    if width - 1 > max_len {
        bail!(
            "{}: rows of {} targets are longer than the model's context of {max_len} tokens: give --seq-len \
             {max_len} or less (longer conversations are cut)",
            path.display(),
            width - 1
        );
    }
    let w = width as usize;
    let mut summary =
        Summary { conversations: convs.len(), assistant_targets: 0, truncated: 0, truncated_targets: 0 };
    let (mut tokens, mut weights) = (Vec::with_capacity(convs.len() * w), Vec::new());
    for c in &convs {
        let n = c.ids.len().min(w);
        if c.ids.len() > w {
            summary.truncated += 1;
            summary.truncated_targets += c.assistant[w..].iter().filter(|&&a| a).count() as u64;
        }
        tokens.extend_from_slice(&c.ids[..n]);
        tokens.extend(std::iter::repeat_n(pad, w - n));
        // Position i predicts token i + 1.
        for i in 0..w - 1 {
            let counts = i + 1 < n && c.assistant[i + 1];
            summary.assistant_targets += u64::from(counts);
            weights.push(if counts { 1.0 } else { 0.0 });
        }
    }
    if summary.assistant_targets == 0 {
        bail!(
            "{}: no assistant token falls within the rows of {} tokens: nothing to learn (a longer --seq-len \
             keeps more of each conversation)",
            path.display(),
            w
        );
    }
    let rows = TokenRows::from_rows(w, tokens)?.with_weights(weights)?;
    Ok((rows, summary))
}

/// A line's `messages`, each checked; the error names the field.
fn parse_line(line: &str) -> Result<Vec<Message>> {
    let v: Value = serde_json::from_str(line).map_err(|e| anyhow::anyhow!("not a JSON object: {e}"))?;
    let Some(obj) = v.as_object() else {
        bail!("not a JSON object (each line is {{\"messages\": [...]}})");
    };
    let list = match obj.get("messages") {
        Some(Value::Array(list)) => list,
        Some(other) => bail!("field \"messages\" must be a list of messages, found {}", kind(other)),
        None => bail!(
            "no \"messages\" field (each line is {{\"messages\": [{{\"role\": ..., \"content\": ...}}]}})"
        ),
    };
    let mut messages = Vec::with_capacity(list.len());
    for (j, m) in list.iter().enumerate() {
        let field = |name: &str| -> Result<String> {
            match m.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => bail!("messages[{j}].{name} must be a string, found {}", kind(other)),
                None if m.is_object() => bail!("messages[{j}] has no \"{name}\""),
                None => bail!("messages[{j}] must be an object {{\"role\", \"content\"}}, found {}", kind(m)),
            }
        };
        let role = field("role")?;
        if !matches!(role.as_str(), "system" | "user" | "assistant") {
            bail!("messages[{j}].role is \"{role}\": use \"system\", \"user\" or \"assistant\"");
        }
        messages.push(Message::new(&role, &field("content")?));
    }
    if !messages.iter().any(|m| m.role == "assistant") {
        bail!(
            "no assistant message: a conversation for SFT has at least one (its tokens are what is learned)"
        );
    }
    Ok(messages)
}

/// The JSON kind of `v`, for messages.
fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// Renders and encodes one conversation, marking the assistant's tokens.
fn encode(messages: &[Message], template: &ChatTemplate, tok: &TextTokenizer) -> Result<Encoded> {
    let full = template.render(messages, false)?;
    let mut spans = Vec::new();
    for (j, m) in messages.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
        let before = template.render(&messages[..j], true)?;
        let upto = template.render(&messages[..=j], false)?;
        if !upto.starts_with(&before) || !full.starts_with(&upto) {
            bail!(
                "the chat template does not render this conversation prefix by prefix (at messages[{j}], {}), \
                 so the assistant's tokens cannot be told apart",
                m.role
            );
        }
        spans.push(before.len()..upto.len());
    }
    let (ids, offsets) = tok.encode_plain_offsets(&full)?;
    // A token is the assistant's when it starts inside a span (a token that straddles the turn's
    // header and its content is counted with the content).
    let assistant = offsets
        .iter()
        .map(|&(s, e)| spans.iter().any(|r| r.contains(&s) || (s < r.start && e > r.start)))
        .collect();
    Ok(Encoded { ids, assistant })
}

/// `rows` with each target's weight made `mask * N T / count`, where `count` is the number of
/// targets the rows' mask keeps: the train step's `mean(ce * w)` is then the mean over those alone.
/// A batch that keeps none weighs everything 0 (no gradient; the optimizer still decays).
pub fn normalise(rows: TokenRows) -> Result<TokenRows> {
    let Some(mask) = rows.weights() else {
        return Ok(rows);
    };
    let count = mask.iter().filter(|&&w| w != 0.0).count();
    let scale = if count == 0 { 0.0 } else { mask.len() as f32 / count as f32 };
    let weights = mask.iter().map(|&w| if w != 0.0 { scale } else { 0.0 }).collect();
    Ok(rows.with_weights(weights)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_lines_name_the_field() {
        let cases = [
            ("[1]", "not a JSON object"),
            ("{\"text\": \"hi\"}", "no \"messages\" field"),
            ("{\"messages\": 3}", "field \"messages\" must be a list of messages, found the number 3"),
            ("{\"messages\": [{\"role\": \"user\"}]}", "messages[0] has no \"content\""),
            ("{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}", "messages[0].role is \"bot\""),
            ("{\"messages\": [\"hi\"]}", "messages[0] must be an object"),
            (
                "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": 5}]}",
                "messages[1].content must be a string, found the number 5",
            ),
            ("{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}", "no assistant message"),
        ];
        for (line, want) in cases {
            let e = parse_line(line).unwrap_err().to_string();
            assert!(e.contains(want), "{line}: {e}");
        }
        let ok = parse_line(
            "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}",
        )
        .unwrap();
        assert_eq!(ok, [Message::new("user", "q"), Message::new("assistant", "a")]);
    }

    #[test]
    fn weights_average_over_the_kept_targets() {
        let rows = TokenRows::from_rows(3, vec![1, 2, 3, 4, 5, 6])
            .unwrap()
            .with_weights(vec![1.0, 0.0, 1.0, 1.0])
            .unwrap();
        let n = normalise(rows).unwrap();
        // 4 targets, 3 kept: each kept one weighs 4/3, so mean(ce * w) = sum of kept ce / 3.
        assert_eq!(n.weights().unwrap(), [4.0 / 3.0, 0.0, 4.0 / 3.0, 4.0 / 3.0]);
        let none = TokenRows::from_rows(2, vec![1, 2]).unwrap().with_weights(vec![0.0]).unwrap();
        assert_eq!(normalise(none).unwrap().weights().unwrap(), [0.0]);
    }
}
