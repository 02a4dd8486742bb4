//! The OpenAI API as `kiln serve` speaks it: request bodies read into typed requests, each field
//! checked with an error that names it (OpenAI's `param`) and says what would be right, and the
//! JSON shapes of responses, stream chunks and errors.
//!
//! What is refused rather than ignored: anything that would change what is generated or returned
//! and that kiln does not do (`n` or `best_of` other than 1, `echo`, `logprobs`, `suffix`,
//! penalties, `logit_bias`, tools, a `response_format` other than text), so a client never gets an
//! answer to a question it did not ask. Fields OpenAI has and that change nothing here (`user`,
//! `metadata`, ...) and unknown fields are ignored.

use serde_json::{json, Map, Value};

use crate::chat::template::Message;

/// An error answer: the status and OpenAI's `{"error": {...}}` body.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about `param` (none for the body as a whole).
    pub fn bad(param: Option<&str>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn with_code(self, code: &'static str) -> ApiError {
        ApiError { code: Some(code), ..self }
    }

    pub fn with_status(self, status: u16) -> ApiError {
        ApiError { status, ..self }
    }

    pub fn body(&self) -> Value {
        json!({ "error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// What a completion continues: text for the tokenizer, or token ids.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<i64>),
}

/// The options completions and chat completions share.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    pub model: String,
    pub max_tokens: Option<u64>,
    /// In `[0, 2]`; 0 is greedy.
    pub temperature: f32,
    /// In `[0, 1]`; 0 is greedy (the limit of nucleus sampling: the most likely token alone).
    pub top_p: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage.
    pub include_usage: bool,
}

/// A `POST /v1/completions` body.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub prompt: Prompt,
    pub params: Params,
}

/// A `POST /v1/chat/completions` body.
#[derive(Clone, Debug, PartialEq)]
pub struct Chat {
    pub messages: Vec<Message>,
    pub params: Params,
}

type Fields = Map<String, Value>;

/// The body as a JSON object.
pub fn object(body: &[u8]) -> Result<Fields, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad(None, format!("the request body is not valid JSON ({e}); send a JSON object"))
    })?;
    match value {
        Value::Object(fields) => Ok(fields),
        other => {
            Err(ApiError::bad(None, format!("the request body must be a JSON object, not {}", kind(&other))))
        }
    }
}

/// How a JSON value is described in messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A present, non-null field.
fn get<'a>(fields: &'a Fields, name: &str) -> Option<&'a Value> {
    fields.get(name).filter(|v| !v.is_null())
}

fn required<'a>(fields: &'a Fields, name: &str, what: &str) -> Result<&'a Value, ApiError> {
    get(fields, name).ok_or_else(|| ApiError::bad(Some(name), format!("`{name}` is required: {what}")))
}

fn boolean(fields: &Fields, name: &str) -> Result<bool, ApiError> {
    match get(fields, name) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ApiError::bad(Some(name), format!("`{name}` must be true or false, not {}", kind(v)))),
    }
}

fn integer(fields: &Fields, name: &str, min: u64) -> Result<Option<u64>, ApiError> {
    match get(fields, name) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n >= min => Ok(Some(n)),
            _ => Err(ApiError::bad(
                Some(name),
                format!("`{name}` must be an integer of at least {min}, not {v}"),
            )),
        },
    }
}

fn number(fields: &Fields, name: &str, default: f64, range: (f64, f64)) -> Result<f32, ApiError> {
    match get(fields, name) {
        None => Ok(default as f32),
        Some(v) => match v.as_f64() {
            Some(x) if x >= range.0 && x <= range.1 => Ok(x as f32),
            _ => Err(ApiError::bad(
                Some(name),
                format!("`{name}` must be a number from {} to {}, not {v}", range.0, range.1),
            )),
        },
    }
}

/// Refuses a field kiln does not do unless it has the value that asks for nothing (`ok`).
fn unsupported(fields: &Fields, name: &str, ok: impl Fn(&Value) -> bool, what: &str) -> Result<(), ApiError> {
    match get(fields, name) {
        Some(v) if !ok(v) => Err(ApiError::bad(Some(name), format!("`{name}` is not supported: {what}"))),
        _ => Ok(()),
    }
}

fn params(fields: &Fields) -> Result<Params, ApiError> {
    let model = match required(fields, "model", "the model's id (GET /v1/models lists it)")? {
        Value::String(s) => s.clone(),
        v => return Err(ApiError::bad(Some("model"), format!("`model` must be a string, not {}", kind(v)))),
    };
    let one = |v: &Value| v.as_u64() == Some(1);
    unsupported(fields, "n", one, "kiln makes one choice per request (n = 1); send n requests instead")?;
    unsupported(fields, "best_of", one, "kiln makes one choice per request (best_of = 1)")?;
    let zero = |v: &Value| v.as_f64() == Some(0.0);
    unsupported(fields, "presence_penalty", zero, "kiln applies no penalties (0 or absent)")?;
    unsupported(fields, "frequency_penalty", zero, "kiln applies no penalties (0 or absent)")?;
    let empty =
        |v: &Value| v.as_object().is_some_and(Map::is_empty) || v.as_array().is_some_and(Vec::is_empty);
    unsupported(fields, "logit_bias", empty, "kiln does not bias logits ({} or absent)")?;
    unsupported(fields, "logprobs", |v| v == &json!(false), "kiln does not return log probabilities")?;
    unsupported(fields, "top_logprobs", |v| v.as_u64() == Some(0), "kiln does not return log probabilities")?;
    let stream = boolean(fields, "stream")?;
    let include_usage = match get(fields, "stream_options") {
        None => false,
        Some(Value::Object(o)) if stream => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(ApiError::bad(
                    Some("stream_options"),
                    format!("`stream_options.include_usage` must be true or false, not {}", kind(v)),
                ))
            }
        },
        Some(_) if !stream => {
            return Err(ApiError::bad(Some("stream_options"), "`stream_options` goes with \"stream\": true"))
        }
        Some(v) => {
            return Err(ApiError::bad(
                Some("stream_options"),
                format!("`stream_options` must be an object, not {}", kind(v)),
            ))
        }
    };
    let stop = match get(fields, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(list)) if list.len() <= 4 && list.iter().all(Value::is_string) => {
            list.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()
        }
        Some(v) => {
            return Err(ApiError::bad(
                Some("stop"),
                format!("`stop` must be a string or a list of up to 4 strings, not {v}"),
            ))
        }
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::bad(Some("stop"), "`stop` strings must not be empty"));
    }
    // Chat's newer name for the same limit wins where both are given.
    let max_tokens = match integer(fields, "max_completion_tokens", 1)? {
        Some(n) => Some(n),
        None => integer(fields, "max_tokens", 1)?,
    };
    Ok(Params {
        model,
        max_tokens,
        temperature: number(fields, "temperature", 1.0, (0.0, 2.0))?,
        top_p: number(fields, "top_p", 1.0, (0.0, 1.0))?,
        seed: match get(fields, "seed") {
            None => None,
            // OpenAI's seeds are signed 64-bit integers; kiln's are their bits.
            Some(v) => {
                Some(v.as_i64().map(|s| s as u64).or(v.as_u64()).ok_or_else(|| {
                    ApiError::bad(Some("seed"), format!("`seed` must be an integer, not {v}"))
                })?)
            }
        },
        stop,
        stream,
        include_usage,
    })
}

/// Reads a `/v1/completions` body.
pub fn completion(fields: &Fields) -> Result<Completion, ApiError> {
    let params = params(fields)?;
    unsupported(fields, "echo", |v| v == &json!(false), "kiln does not echo the prompt")?;
    unsupported(fields, "suffix", |_| false, "kiln does not insert text (no suffix)")?;
    let what = "a string, a list of token ids, or a list of one of either";
    let ids = |list: &[Value]| -> Option<Vec<i64>> { list.iter().map(Value::as_i64).collect() };
    let prompt = match required(fields, "prompt", what)? {
        Value::String(s) => Prompt::Text(s.clone()),
        Value::Array(list) if list.is_empty() => {
            return Err(ApiError::bad(Some("prompt"), "`prompt` is an empty list: give the text or token ids to continue"))
        }
        Value::Array(list) if list.iter().all(Value::is_number) => Prompt::Ids(ids(list).ok_or_else(|| {
            ApiError::bad(Some("prompt"), "`prompt` token ids must be integers")
        })?),
        Value::Array(list) if list.len() == 1 => match &list[0] {
            Value::String(s) => Prompt::Text(s.clone()),
            Value::Array(inner) if !inner.is_empty() && inner.iter().all(Value::is_number) => {
                Prompt::Ids(ids(inner).ok_or_else(|| ApiError::bad(Some("prompt"), "`prompt` token ids must be integers"))?)
            }
            v => return Err(ApiError::bad(Some("prompt"), format!("`prompt` must be {what}; its item is {}", kind(v)))),
        },
        Value::Array(list) => {
            return Err(ApiError::bad(
                Some("prompt"),
                format!("`prompt` holds {} prompts; kiln takes one per request (send them as separate requests, which it batches)", list.len()),
            ))
        }
        v => return Err(ApiError::bad(Some("prompt"), format!("`prompt` must be {what}, not {}", kind(v)))),
    };
    Ok(Completion { prompt, params })
}

/// Reads a `/v1/chat/completions` body.
pub fn chat(fields: &Fields) -> Result<Chat, ApiError> {
    let params = params(fields)?;
    let none = |v: &Value| v.as_array().is_some_and(Vec::is_empty) || v == &json!("none");
    unsupported(fields, "tools", none, "kiln's chat has no tools")?;
    unsupported(fields, "tool_choice", none, "kiln's chat has no tools")?;
    unsupported(fields, "functions", none, "kiln's chat has no tools")?;
    let text_format = |v: &Value| v.get("type") == Some(&json!("text"));
    unsupported(fields, "response_format", text_format, "kiln answers in text ({\"type\": \"text\"})")?;
    let list = match required(fields, "messages", "the conversation, a list of {\"role\", \"content\"}")? {
        Value::Array(list) if !list.is_empty() => list,
        Value::Array(_) => {
            return Err(ApiError::bad(Some("messages"), "`messages` is empty: give at least one message"))
        }
        v => {
            return Err(ApiError::bad(
                Some("messages"),
                format!("`messages` must be a list, not {}", kind(v)),
            ))
        }
    };
    let mut messages = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let at = |field: &str| format!("messages[{i}].{field}");
        let Value::Object(m) = m else {
            return Err(ApiError::bad(
                Some(&format!("messages[{i}]")),
                format!("`messages[{i}]` must be an object, not {}", kind(m)),
            ));
        };
        let role = match get(m, "role") {
            Some(Value::String(r)) => match r.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::bad(
                        Some(&at("role")),
                        format!("`{}` is \"{other}\"; kiln's chat takes the roles system, developer, user and assistant", at("role")),
                    ))
                }
            },
            Some(v) => return Err(ApiError::bad(Some(&at("role")), format!("`{}` must be a string, not {}", at("role"), kind(v)))),
            None => return Err(ApiError::bad(Some(&at("role")), format!("`{}` is required", at("role")))),
        };
        let content = match get(m, "content") {
            Some(Value::String(s)) => s.clone(),
            // Content parts: the text ones, joined (OpenAI's clients send these too).
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::bad(
                                Some(&at("content")),
                                format!("`{}[{j}]` is not a text part ({{\"type\": \"text\", \"text\": ...}}); kiln's models read text only", at("content")),
                            ))
                        }
                    }
                }
                text
            }
            Some(v) => {
                return Err(ApiError::bad(
                    Some(&at("content")),
                    format!("`{}` must be a string or a list of text parts, not {}", at("content"), kind(v)),
                ))
            }
            None => {
                return Err(ApiError::bad(Some(&at("content")), format!("`{}` is required", at("content"))))
            }
        };
        messages.push(Message { role: role.to_string(), content });
    }
    Ok(Chat { messages, params })
}

/// Why a sequence ended, as OpenAI says it.
pub fn finish_reason(stopped: bool) -> &'static str {
    if stopped {
        "stop"
    } else {
        "length"
    }
}

pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({ "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion })
}

/// What a response is about: its id, creation time and model, which every chunk repeats.
pub struct Head {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub chat: bool,
}

impl Head {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.chat, chunk) {
            (true, false) => "chat.completion",
            (true, true) => "chat.completion.chunk",
            // Completions' chunks are `text_completion` objects too.
            (false, _) => "text_completion",
        }
    }

    fn wrap(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// The whole answer: `text` and its token ids (kiln's `token_ids`, beside OpenAI's fields).
    pub fn response(&self, text: &str, ids: &[i64], finish: &str, usage: Value) -> Value {
        let choice = if self.chat {
            json!({ "index": 0, "message": { "role": "assistant", "content": text }, "logprobs": null,
                    "finish_reason": finish, "token_ids": ids })
        } else {
            json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": finish, "token_ids": ids })
        };
        let mut v = self.wrap(false, json!([choice]));
        v["usage"] = usage;
        v
    }

    /// A stream chunk: new text (and the ids that made it), or the end with its reason.
    pub fn chunk(&self, text: Option<&str>, ids: &[i64], finish: Option<&str>) -> Value {
        let choice = if self.chat {
            let delta = match text {
                Some(t) => json!({ "content": t }),
                None => json!({}),
            };
            json!({ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish, "token_ids": ids })
        } else {
            json!({ "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish,
                    "token_ids": ids })
        };
        self.wrap(true, json!([choice]))
    }

    /// The first chunk of a chat stream, which says who speaks.
    pub fn role_chunk(&self) -> Value {
        self.wrap(
            true,
            json!([{ "index": 0, "delta": { "role": "assistant", "content": "" }, "logprobs": null,
                                 "finish_reason": null }]),
        )
    }

    /// The last chunk when the usage was asked for: no choices.
    pub fn usage_chunk(&self, usage: Value) -> Value {
        let mut v = self.wrap(true, json!([]));
        v["usage"] = usage;
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion_of(body: &str) -> Result<Completion, ApiError> {
        completion(&object(body.as_bytes())?)
    }

    fn chat_of(body: &str) -> Result<Chat, ApiError> {
        chat(&object(body.as_bytes())?)
    }

    fn refused(r: Result<impl std::fmt::Debug, ApiError>) -> (Option<String>, String) {
        let e = r.unwrap_err();
        assert_eq!((e.status, e.kind), (400, "invalid_request_error"));
        (e.param, e.message)
    }

    #[test]
    fn completions_read_every_field_with_openai_defaults() {
        let c = completion_of(r#"{"model": "tiny", "prompt": "hi"}"#).unwrap();
        assert_eq!(c.prompt, Prompt::Text("hi".into()));
        let p = &c.params;
        assert_eq!((p.max_tokens, p.temperature, p.top_p, p.seed, p.stream), (None, 1.0, 1.0, None, false));
        let c = completion_of(
            r#"{"model": "m", "prompt": [[1, 2, 3]], "max_tokens": 5, "temperature": 0, "top_p": 0.5,
                "seed": -1, "stop": ["a", "bc"], "stream": true, "stream_options": {"include_usage": true},
                "n": 1, "echo": false, "logprobs": null, "user": "x", "unknown": 3}"#,
        )
        .unwrap();
        assert_eq!(c.prompt, Prompt::Ids(vec![1, 2, 3]));
        let p = c.params;
        assert_eq!((p.max_tokens, p.temperature, p.top_p, p.seed), (Some(5), 0.0, 0.5, Some(u64::MAX)));
        assert_eq!(p.stop, ["a", "bc"]);
        assert!(p.stream && p.include_usage);
        assert_eq!(
            completion_of(r#"{"model": "m", "prompt": [5, 6]}"#).unwrap().prompt,
            Prompt::Ids(vec![5, 6])
        );
        assert_eq!(
            completion_of(r#"{"model": "m", "prompt": ["x"], "stop": "s"}"#).unwrap().params.stop,
            ["s"]
        );
    }

    #[test]
    fn bad_completions_name_the_field() {
        let cases = [
            ("[1]", None, "the request body must be a JSON object, not an array"),
            (r#"{"prompt": "x"}"#, Some("model"), "`model` is required"),
            (r#"{"model": "m"}"#, Some("prompt"), "`prompt` is required"),
            (r#"{"model": "m", "prompt": 3}"#, Some("prompt"), "`prompt` must be a string"),
            (r#"{"model": "m", "prompt": []}"#, Some("prompt"), "`prompt` is an empty list"),
            (r#"{"model": "m", "prompt": ["a", "b"]}"#, Some("prompt"), "`prompt` holds 2 prompts"),
            (r#"{"model": "m", "prompt": [1.5]}"#, Some("prompt"), "token ids must be integers"),
            (r#"{"model": "m", "prompt": "x", "n": 2}"#, Some("n"), "`n` is not supported"),
            (
                r#"{"model": "m", "prompt": "x", "temperature": 2.5}"#,
                Some("temperature"),
                "from 0 to 2, not 2.5",
            ),
            (r#"{"model": "m", "prompt": "x", "temperature": "hot"}"#, Some("temperature"), "not \"hot\""),
            (r#"{"model": "m", "prompt": "x", "top_p": -0.1}"#, Some("top_p"), "from 0 to 1"),
            (r#"{"model": "m", "prompt": "x", "max_tokens": 0}"#, Some("max_tokens"), "at least 1, not 0"),
            (r#"{"model": "m", "prompt": "x", "max_tokens": "8"}"#, Some("max_tokens"), "an integer"),
            (r#"{"model": "m", "prompt": "x", "stop": 1}"#, Some("stop"), "a list of up to 4 strings"),
            (r#"{"model": "m", "prompt": "x", "stop": [""]}"#, Some("stop"), "must not be empty"),
            (r#"{"model": "m", "prompt": "x", "stream": "yes"}"#, Some("stream"), "true or false"),
            (r#"{"model": "m", "prompt": "x", "stream_options": {}}"#, Some("stream_options"), "goes with"),
            (r#"{"model": "m", "prompt": "x", "echo": true}"#, Some("echo"), "does not echo"),
            (r#"{"model": "m", "prompt": "x", "logprobs": 2}"#, Some("logprobs"), "log probabilities"),
            (r#"{"model": 7, "prompt": "x"}"#, Some("model"), "`model` must be a string, not a number"),
        ];
        for (body, param, message) in cases {
            let (p, m) = refused(completion_of(body));
            assert_eq!(p.as_deref(), param, "{body}");
            assert!(m.contains(message), "{body}: {m}");
        }
        let (_, m) = refused(completion_of("{\"model\": "));
        assert!(
            m.starts_with(
                "the request body is not valid JSON (EOF while parsing a value at line 1 column 10)"
            ),
            "{m}"
        );
    }

    #[test]
    fn chat_messages_are_read_as_text_turns() {
        let c = chat_of(
            r#"{"model": "m", "max_completion_tokens": 4, "max_tokens": 9, "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": "c", "name": "x"}]}"#,
        )
        .unwrap();
        assert_eq!(
            c.messages,
            [Message::new("system", "be brief"), Message::new("user", "ab"), Message::new("assistant", "c")]
        );
        assert_eq!(c.params.max_tokens, Some(4));
        let cases = [
            (r#"{"model": "m"}"#, "messages", "`messages` is required"),
            (r#"{"model": "m", "messages": []}"#, "messages", "`messages` is empty"),
            (r#"{"model": "m", "messages": {}}"#, "messages", "must be a list, not an object"),
            (r#"{"model": "m", "messages": [3]}"#, "messages[0]", "must be an object, not a number"),
            (r#"{"model": "m", "messages": [{"content": "x"}]}"#, "messages[0].role", "is required"),
            (
                r#"{"model": "m", "messages": [{"role": "tool", "content": "x"}]}"#,
                "messages[0].role",
                "\"tool\"",
            ),
            (r#"{"model": "m", "messages": [{"role": "user"}]}"#, "messages[0].content", "is required"),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
                "messages[0].content",
                "not a text part",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}"#,
                "tools",
                "no tools",
            ),
        ];
        for (body, param, message) in cases {
            let (p, m) = refused(chat_of(body));
            assert_eq!(p.as_deref(), Some(param), "{body}");
            assert!(m.contains(message), "{body}: {m}");
        }
    }

    #[test]
    fn responses_and_chunks_have_openai_shapes() {
        let head = Head { id: "chatcmpl-1".into(), created: 5, model: "tiny".into(), chat: true };
        let r = head.response("hi", &[7, 8], "stop", usage(3, 2));
        assert_eq!(r["object"], "chat.completion");
        assert_eq!(r["choices"][0]["message"], json!({"role": "assistant", "content": "hi"}));
        assert_eq!(r["usage"], json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}));
        assert_eq!(head.chunk(Some("h"), &[7], None)["choices"][0]["delta"], json!({"content": "h"}));
        assert_eq!(head.chunk(None, &[], Some("length"))["choices"][0]["finish_reason"], "length");
        assert_eq!(head.role_chunk()["object"], "chat.completion.chunk");
        let head = Head { chat: false, id: "cmpl-1".into(), ..head };
        assert_eq!(head.response("x", &[], "length", usage(1, 0))["choices"][0]["text"], "x");
        assert_eq!(head.chunk(Some("y"), &[9], None)["object"], "text_completion");
        assert_eq!(head.usage_chunk(usage(1, 1))["choices"], json!([]));
        let e = ApiError::bad(Some("n"), "no").with_code("c").body();
        assert_eq!(
            e,
            json!({"error": {"message": "no", "type": "invalid_request_error", "param": "n", "code": "c"}})
        );
    }
}
