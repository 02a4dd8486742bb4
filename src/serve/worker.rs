//! The one thread that owns the model: it takes the requests waiting in the queue (up to
//! `--max-batch`), runs them as one batch through `generate_each` (each with its own new tokens,
//! sampling and stops), and sends each request's tokens to its channel as they come.
//!
//! Batching is static: requests that arrive while a batch runs wait for the next one (no continuous
//! batching). With `--batch-window MS` the worker waits up to that long after a batch's first
//! request for more to arrive (starting as soon as the batch is full), trading the first request's
//! latency for fuller batches.
//!
//! A request whose client has gone (its channel closed) is ended at its next token; the rest of the
//! batch goes on.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_runtime::generate::{generate_each, generate_speculative_each, Engine, Flow, GenerateOptions};

use super::stops;
use crate::model::Text;
use crate::tokenize::TextStream;

/// A request, checked and tokenised, waiting for the model.
pub struct Job {
    pub prompt: Vec<i64>,
    pub opts: GenerateOptions,
    /// Stop strings (only with a tokenizer).
    pub stops: Vec<String>,
    pub events: Sender<Event>,
}

/// What a request hears from the worker, in this order: `Started`, `Token`s, then `Done` or
/// `Failed`.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// Its batch started, with this many requests in it.
    Started {
        batch: usize,
    },
    /// New text (possibly empty: held back, or no tokenizer) and the token that made it (`None` for
    /// the text released at the end).
    Token {
        text: String,
        token: Option<i64>,
    },
    /// It ended: at a stop (token or string) or at its `max_tokens`, having generated this many
    /// tokens.
    Done {
        stopped: bool,
        tokens: usize,
    },
    Failed(String),
}

/// A job's text as it is generated: the decoded stream, cut at its stop strings.
struct Track<'t> {
    stream: Option<TextStream<'t>>,
    stops: &'t [String],
    text: String,
    shown: usize,
    hit: bool,
}

impl Track<'_> {
    /// Adds decoded text; returns what may be shown now.
    fn add(&mut self, piece: &str) -> String {
        if self.hit {
            return String::new();
        }
        self.text.push_str(piece);
        let (visible, hit) = stops::scan(&self.text, self.stops);
        self.hit = hit;
        let new = self.text[self.shown..visible.max(self.shown)].to_string();
        self.shown = self.shown.max(visible);
        new
    }
}

/// Serves batches from `jobs` until every sender is gone.
pub fn run(
    mut engine: Box<dyn Engine>,
    text: Option<Arc<Text>>,
    jobs: Receiver<Job>,
    max_batch: usize,
    window: Duration,
    speculative: bool,
) {
    while let Some(batch) = next_batch(&jobs, max_batch, window) {
        eprintln!(
            "batch of {} request{}: {} prompt tokens",
            batch.len(),
            if batch.len() == 1 { "" } else { "s" },
            batch.iter().map(|j| j.prompt.len()).sum::<usize>()
        );
        serve_batch(engine.as_mut(), text.as_deref(), batch, speculative);
    }
}

/// The next batch: the first job to come, then what waits (or arrives within `window`), up to
/// `max_batch`. `None` when the queue is closed.
fn next_batch(jobs: &Receiver<Job>, max_batch: usize, window: Duration) -> Option<Vec<Job>> {
    let first = jobs.recv().ok()?;
    let deadline = Instant::now() + window;
    let mut batch = vec![first];
    while batch.len() < max_batch {
        match jobs.try_recv() {
            Ok(job) => batch.push(job),
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match jobs.recv_timeout(left) {
                    Ok(job) => batch.push(job),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
        }
    }
    Some(batch)
}

fn serve_batch(engine: &mut dyn Engine, text: Option<&Text>, batch: Vec<Job>, speculative: bool) {
    for job in &batch {
        // A client already gone is noticed at its first token.
        let _ = job.events.send(Event::Started { batch: batch.len() });
    }
    let prompts: Vec<Vec<i64>> = batch.iter().map(|j| j.prompt.clone()).collect();
    let opts: Vec<GenerateOptions> = batch.iter().map(|j| j.opts.clone()).collect();
    let mut tracks = Vec::with_capacity(batch.len());
    for job in &batch {
        let stream = match text.map(|t| t.tokenizer.stream(&job.prompt)).transpose() {
            Ok(s) => s,
            Err(e) => {
                fail(&batch, &format!("cannot decode the prompt: {e:#}"));
                return;
            }
        };
        tracks.push(Track { stream, stops: &job.stops, text: String::new(), shown: 0, hit: false });
    }
    let generate = if speculative { generate_speculative_each } else { generate_each };
    let result = generate(engine, &prompts, &opts, &mut |e| {
        let track = &mut tracks[e.sequence];
        let piece = match &mut track.stream {
            Some(s) => s.push(e.token).unwrap_or_default(),
            None => String::new(),
        };
        let new = track.add(&piece);
        let gone = batch[e.sequence].events.send(Event::Token { text: new, token: Some(e.token) }).is_err();
        if gone || track.hit {
            Flow::Stop
        } else {
            Flow::Continue
        }
    });
    let g = match result {
        Ok(g) => g,
        Err(e) => {
            fail(&batch, &format!("generation failed: {e}"));
            return;
        }
    };
    for (s, (job, track)) in batch.iter().zip(&mut tracks).enumerate() {
        // What the stream held back as an incomplete character, and any possible stop start.
        let tail = track.stream.as_mut().map(|s| s.finish()).unwrap_or_default();
        let mut rest = track.add(&tail);
        if !track.hit {
            rest += &track.text[track.shown..];
            track.shown = track.text.len();
        }
        if !rest.is_empty() {
            let _ = job.events.send(Event::Token { text: rest, token: None });
        }
        let _ =
            job.events.send(Event::Done { stopped: g.stopped[s] || track.hit, tokens: g.tokens[s].len() });
    }
}

fn fail(batch: &[Job], message: &str) {
    eprintln!("error: {message}");
    for job in batch {
        let _ = job.events.send(Event::Failed(message.to_string()));
    }
}
