//! The HTTP side of `kiln serve`: routing, request checks against the loaded model, and answers,
//! whole or streamed as server-sent events. Each connection is served on a thread of its own; the
//! model is only ever touched by the worker (`worker.rs`), which a handler reaches through the
//! queue.
//!
//! A stream sends each event as one HTTP chunk, flushed at once, and closes the connection after
//! the last. A client that goes away mid-stream makes the next write fail, which ends this handler;
//! its request is ended by the worker at its next token.

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_runtime::generate::{GenerateOptions, Sampling};
use serde_json::json;

use super::api::{self, ApiError, Head, Params, Prompt};
use super::wire::{self, EventStream, ReadError};
use super::worker::{Event, Job};
use crate::model::{Info, Text};

/// How long an idle connection is kept open for its next request.
const IDLE: Duration = Duration::from_secs(120);

/// The response header that says how many requests shared the request's batch.
pub const BATCH_HEADER: &str = "X-Kiln-Batch-Size";

/// What every handler shares.
pub struct State {
    pub info: Info,
    pub text: Option<Arc<Text>>,
    pub jobs: Sender<Job>,
    /// Request ids and default seeds.
    pub next: AtomicU64,
    pub started: u64,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Serves the requests of one connection until it closes (or a stream or an error closes it).
pub fn connection(stream: TcpStream, state: &State) {
    let _ = stream.set_read_timeout(Some(IDLE));
    // Each event and each answer's head and body go out at once, not after Nagle's delay.
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    let mut w = stream;
    loop {
        let request = match wire::read_request(&mut reader, &mut w) {
            Ok(r) => r,
            Err(ReadError::Closed) => return,
            Err(ReadError::Bad { status, message }) => {
                let e = ApiError::bad(None, message).with_status(status);
                let _ = wire::respond(&mut w, status, &[], e.body().to_string().as_bytes(), false);
                return;
            }
        };
        if !handle(&request, state, &mut w) {
            return;
        }
    }
}

fn error(w: &mut dyn Write, e: &ApiError, headers: &[(&str, String)], keep_alive: bool) -> bool {
    wire::respond(w, e.status, headers, e.body().to_string().as_bytes(), keep_alive).is_ok() && keep_alive
}

/// Answers one request; returns whether the connection stays open.
fn handle(request: &wire::Request, state: &State, w: &mut dyn Write) -> bool {
    let (path, method, keep) = (request.path.as_str(), request.method.as_str(), request.keep_alive);
    let route = match path {
        "/v1/models" => Some("GET"),
        "/v1/completions" | "/v1/chat/completions" => Some("POST"),
        _ => None,
    };
    match route {
        None => {
            let e = ApiError::bad(
                None,
                format!(
                    "no such path: {path}; kiln serves GET /v1/models, POST /v1/completions and POST \
                     /v1/chat/completions"
                ),
            )
            .with_status(404)
            .with_code("not_found");
            error(w, &e, &[], keep)
        }
        Some(allowed) if allowed != method => {
            let e = ApiError::bad(None, format!("{path} takes {allowed}, not {method}"))
                .with_status(405)
                .with_code("method_not_allowed");
            error(w, &e, &[("Allow", allowed.to_string())], keep)
        }
        Some(_) if path == "/v1/models" => {
            let body = json!({
                "object": "list",
                "data": [{ "id": state.info.name, "object": "model", "created": state.started, "owned_by": "kiln" }],
            });
            wire::respond(w, 200, &[], body.to_string().as_bytes(), keep).is_ok() && keep
        }
        Some(_) => match start(&request.body, path == "/v1/chat/completions", state) {
            Ok(started) => finish(w, started, keep),
            Err(e) => error(w, &e, &[], keep),
        },
    }
}

/// A request in the queue: how to answer it, and the worker's events for it.
struct Started {
    head: Head,
    params: Params,
    prompt_tokens: usize,
    events: Receiver<Event>,
}

/// Checks a completion or chat body against the model, queues it, and returns its events.
fn start(body: &[u8], chat: bool, state: &State) -> Result<Started, ApiError> {
    let fields = api::object(body)?;
    let info = &state.info;
    let (prompt, params) = if chat {
        let c = api::chat(&fields)?;
        check_model(&c.params, info)?;
        let text = text_of(state, "chat completions need")?;
        let template = text.template.as_ref().map_err(|why| {
            ApiError::bad(Some("messages"), format!("this model cannot chat: {why}"))
                .with_code("no_chat_template")
        })?;
        let rendered =
            template.render(&c.messages, true).map_err(|e| ApiError::bad(Some("messages"), e.to_string()))?;
        let ids = text
            .tokenizer
            .encode_plain(&rendered)
            .map_err(|e| ApiError::bad(Some("messages"), format!("{e:#}")))?;
        (ids, c.params)
    } else {
        let c = api::completion(&fields)?;
        check_model(&c.params, info)?;
        let ids = match c.prompt {
            Prompt::Ids(ids) => ids,
            Prompt::Text(t) => {
                let text = text_of(state, "a text prompt needs")?;
                text.tokenizer.encode(&t).map_err(|e| ApiError::bad(Some("prompt"), format!("{e:#}")))?
            }
        };
        (ids, c.params)
    };
    let param = if chat { "messages" } else { "prompt" };
    let opts = options(&prompt, &params, chat, param, state)?;
    if !params.stop.is_empty() && state.text.is_none() {
        return Err(ApiError::bad(
            Some("stop"),
            "`stop` strings need the model's tokenizer, and this server has none",
        ));
    }
    let n = state.next.fetch_add(1, Ordering::Relaxed);
    let head = Head {
        id: format!("{}-{:x}{n:04x}", if chat { "chatcmpl" } else { "cmpl" }, state.started),
        created: now(),
        model: info.name.clone(),
        chat,
    };
    let (tx, events) = mpsc::channel();
    let prompt_tokens = prompt.len();
    let job = Job { prompt, opts, stops: params.stop.clone(), events: tx };
    state.jobs.send(job).map_err(|_| server_error("the model's worker has stopped").with_status(503))?;
    Ok(Started { head, params, prompt_tokens, events })
}

fn server_error(message: &str) -> ApiError {
    ApiError { status: 500, message: message.to_string(), kind: "server_error", param: None, code: None }
}

fn check_model(params: &Params, info: &Info) -> Result<(), ApiError> {
    if params.model != info.name {
        return Err(ApiError::bad(
            Some("model"),
            format!(
                "the model `{}` does not exist: this server serves `{}` (GET /v1/models)",
                params.model, info.name
            ),
        )
        .with_status(404)
        .with_code("model_not_found"));
    }
    Ok(())
}

fn text_of<'s>(state: &'s State, what: &str) -> Result<&'s Text, ApiError> {
    state.text.as_deref().ok_or_else(|| {
        ApiError::bad(
            None,
            format!(
                "{what} the model's tokenizer, and this server has none (no tokenizer.json in the weights \
                 folder; start it with --tokenizer DIR); give the prompt as token ids"
            ),
        )
    })
}

/// The generation options of a request, its prompt checked against the model.
fn options(
    prompt: &[i64],
    params: &Params,
    chat: bool,
    param: &str,
    state: &State,
) -> Result<GenerateOptions, ApiError> {
    let info = &state.info;
    if prompt.is_empty() {
        return Err(ApiError::bad(Some(param), "the prompt is empty: it encodes to no tokens"));
    }
    if let Some((i, t)) = prompt.iter().enumerate().find(|&(_, &t)| t < 0 || t as u64 >= info.vocab) {
        return Err(ApiError::bad(
            Some(param),
            format!("prompt token {i} is {t}, outside the vocabulary: ids must be in 0..{}", info.vocab),
        ));
    }
    let len = prompt.len() as u64;
    let too_long = |message: String| ApiError::bad(Some(param), message).with_code("context_length_exceeded");
    if len > info.max_prompt {
        return Err(too_long(format!(
            "the prompt is {len} tokens, but this model takes at most {} (kiln compile --max-context)",
            info.max_prompt
        )));
    }
    // Prompt plus new tokens less one must fit the positions (the last token is never fed back).
    let room = info.max_positions + 1 - len;
    let max_new = match params.max_tokens {
        Some(n) if n > room => {
            return Err(ApiError::bad(
                Some("max_tokens"),
                format!(
                    "{len} prompt tokens + {n} new tokens need {} positions, but this model holds {} \
                     (kiln compile --max-context): ask for at most {room}",
                    u128::from(len) + u128::from(n) - 1,
                    info.max_positions
                ),
            )
            .with_code("context_length_exceeded"))
        }
        Some(n) => n,
        // OpenAI's defaults: 16 for completions, the rest of the context for chat.
        None if chat => room,
        None => room.min(16),
    };
    let mut stop_tokens: Vec<i64> = info.eos.into_iter().collect();
    if let Some(text) = &state.text {
        stop_tokens = text.stop_ids(info.eos);
    }
    let sampling = if params.temperature == 0.0 || params.top_p == 0.0 {
        Sampling::Greedy
    } else {
        let seed = params.seed.unwrap_or_else(|| {
            let t = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
            t ^ state.next.load(Ordering::Relaxed).rotate_left(32)
        });
        Sampling::Sample { temperature: params.temperature, top_p: params.top_p, seed }
    };
    Ok(GenerateOptions { max_new_tokens: max_new as usize, sampling, stop_tokens })
}

/// Answers a queued request from its events: one JSON answer, or a stream.
fn finish(w: &mut dyn Write, s: Started, keep: bool) -> bool {
    // The batch's start comes first; a worker that failed before it answers with `Failed`.
    let batch = match s.events.recv() {
        Ok(Event::Started { batch }) => batch,
        Ok(Event::Failed(m)) => return error(w, &server_error(&m), &[], keep),
        _ => return error(w, &server_error("the model's worker stopped"), &[], keep),
    };
    let headers = [(BATCH_HEADER, batch.to_string())];
    if s.params.stream {
        // Whatever happens, the stream's connection is closed after it; a client gone mid-stream
        // is its own business (the worker ends its sequence).
        let _ = stream(w, &s, &headers);
        return false;
    }
    let (mut text, mut ids) = (String::new(), Vec::new());
    for event in s.events.iter() {
        match event {
            Event::Token { text: t, token } => {
                text += &t;
                ids.extend(token);
            }
            Event::Done { stopped, tokens } => {
                let body = s.head.response(
                    &text,
                    &ids,
                    api::finish_reason(stopped),
                    api::usage(s.prompt_tokens, tokens),
                );
                return wire::respond(w, 200, &headers, body.to_string().as_bytes(), keep).is_ok() && keep;
            }
            Event::Failed(m) => return error(w, &server_error(&m), &headers, keep),
            Event::Started { .. } => {}
        }
    }
    error(w, &server_error("the model's worker stopped"), &headers, keep)
}

fn stream(w: &mut dyn Write, s: &Started, headers: &[(&str, String)]) -> std::io::Result<()> {
    let mut out = EventStream::start(w, headers)?;
    if s.head.chat {
        out.event(&s.head.role_chunk().to_string())?;
    }
    for e in s.events.iter() {
        match e {
            Event::Token { text, token } => {
                let ids: Vec<i64> = token.into_iter().collect();
                out.event(&s.head.chunk(Some(&text), &ids, None).to_string())?;
            }
            Event::Done { stopped, tokens } => {
                out.event(&s.head.chunk(None, &[], Some(api::finish_reason(stopped))).to_string())?;
                if s.params.include_usage {
                    out.event(&s.head.usage_chunk(api::usage(s.prompt_tokens, tokens)).to_string())?;
                }
                break;
            }
            Event::Failed(m) => {
                out.event(&server_error(&m).body().to_string())?;
                break;
            }
            Event::Started { .. } => {}
        }
    }
    out.event("[DONE]")?;
    out.end()
}
