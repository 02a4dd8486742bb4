//! `kiln serve`: an OpenAI-compatible HTTP server over one loaded model. `GET /v1/models`,
//! `POST /v1/completions` (a text prompt or token ids) and `POST /v1/chat/completions` (the
//! conversation rendered by the model's chat template), whole answers or streams of server-sent
//! events. Concurrent requests are batched through the model by one worker thread.
//!
//! - `api.rs`: request bodies read and checked into typed requests; OpenAI's JSON shapes.
//! - `http.rs`: routing, checks against the model (ids, lengths), answers and streams.
//! - `worker.rs`: the thread that owns the model and runs the queue's requests as batches.
//! - `stops.rs`: stop strings.
//! - `wire.rs`: HTTP/1.1 framing (requests, responses, event streams) on a TCP connection.
//!
//! The model is named by its spec's name (`GET /v1/models`); a request for another model is
//! refused with 404 `model_not_found`, as OpenAI does, so a client pointed at the wrong server
//! learns it at once. Text (string prompts, chat, stop strings, the answers' text) needs the
//! tokenizer folder (`--tokenizer`, or the weights folder); without one only token-id prompts are
//! served and answers carry token ids alone (each choice's `token_ids`, kiln's addition).

mod api;
mod http;
mod stops;
mod wire;
mod worker;

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::model::{Source, Text};
use crate::tokenize::TOKENIZER_FILE;

pub struct Request<'a> {
    pub source: Source,
    pub tokenizer: Option<&'a Path>,
    pub host: String,
    pub port: u16,
    /// Requests per batch (default: the artifact's `--max-batch`).
    pub max_batch: Option<u64>,
    /// How long a batch's first request waits for others.
    pub batch_window: Duration,
    /// Decode with the MTP module's drafts (an artifact from `kiln compile --speculative`).
    pub speculative: bool,
}

/// Loads the model, then serves until the process is stopped; the first line on `out` says where.
pub fn run(req: &Request, out: &mut dyn Write) -> Result<()> {
    let text = match req.source.text_folder(req.tokenizer) {
        Some(folder) if folder.join(TOKENIZER_FILE).is_file() => Some(Arc::new(Text::load(folder)?)),
        Some(folder) if req.tokenizer.is_some() => {
            bail!(
                "{} has no {TOKENIZER_FILE}: --tokenizer names the folder of the model's tokenizer",
                folder.display()
            )
        }
        _ => None,
    };
    if req.max_batch == Some(0) {
        bail!("--max-batch must be at least 1");
    }
    // The worker loads the model on its own thread (the CPU backend's memory stays there) and
    // reports what it loaded, or why it could not.
    let (jobs, queue) = mpsc::channel();
    let (ready, loaded) = mpsc::channel();
    let (source, worker_text, max_batch, window, speculative) =
        (req.source.clone(), text.clone(), req.max_batch, req.batch_window, req.speculative);
    std::thread::spawn(move || {
        let model = match source.load("serve") {
            Ok(m) => m,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        if speculative {
            if let Err(e) = kiln_runtime::generate::check_speculative(model.engine.as_ref()) {
                let _ = ready.send(Err(anyhow::anyhow!("--speculative: {e}")));
                return;
            }
        }
        let most = model.info.max_batch;
        let batch = match max_batch {
            Some(n) if n > most => {
                let _ = ready.send(Err(anyhow::anyhow!(
                    "--max-batch {n} is more than the model runs at once ({most}; kiln compile --max-batch)"
                )));
                return;
            }
            Some(n) => n,
            None => most,
        };
        let _ = ready.send(Ok((model.info, batch)));
        worker::run(model.engine, worker_text, queue, batch as usize, window, speculative);
    });
    let (info, batch) = loaded.recv().context("the model's thread ended while loading")??;
    let listener = TcpListener::bind((req.host.as_str(), req.port))
        .with_context(|| format!("cannot listen on {}:{}", req.host, req.port))?;
    let addr = listener.local_addr()?;
    writeln!(
        out,
        "kiln serve: {} ({}) at http://{addr}/v1, batches of up to {batch} request{}{}{}",
        info.name,
        info.what,
        if batch == 1 { "" } else { "s" },
        if req.speculative { ", speculative decoding with the MTP module's drafts" } else { "" },
        if text.is_some() { "" } else { "; no tokenizer: token-id prompts only" }
    )?;
    out.flush()?;
    let started =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let state = Arc::new(http::State { info, text, jobs, next: AtomicU64::new(0), started });
    for stream in listener.incoming() {
        // A connection that failed before it was accepted is the client's loss alone.
        let Ok(stream) = stream else { continue };
        let state = Arc::clone(&state);
        std::thread::spawn(move || http::connection(stream, &state));
    }
    Ok(())
}
