//! `kiln chat`: a conversation with a model on the terminal. Each user turn (a line of standard
//! input, or each `--message`) is added to the history, the whole conversation is rendered with the
//! model's chat template (`template`, from the tokenizer folder's `tokenizer_config.json`) with the
//! assistant's turn opened, encoded, and generated from; the reply is printed as it comes and added
//! to the history. `/reset` clears the history (the `--system` message stays), `/exit` or the end of
//! the input ends the conversation.
//!
//! Each turn runs the whole conversation again (the KV cache is not kept between turns), so a turn
//! costs a prefill of everything said so far. A reply stops at the model's end-of-sequence token
//! (or the template's `eos_token`) or after `--max-new-tokens`, fewer when the conversation leaves
//! less room in the context; a conversation that leaves none is refused with a way out.

pub mod template;

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use anyhow::{bail, Result};

use kiln_runtime::generate::{generate, generate_speculative, Flow, GenerateOptions, Sampling};

use crate::model::{Info, Source, Text};
use template::Message;

pub struct Request<'a> {
    pub source: Source,
    /// The folder of `tokenizer.json` and `tokenizer_config.json` (default: the weights folder).
    pub tokenizer: Option<&'a Path>,
    pub system: Option<String>,
    /// User turns to send one after another instead of reading standard input.
    pub messages: Vec<String>,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Print each turn's prompt and reply ids to standard error.
    pub verbose: bool,
    /// Decode speculatively with the MTP module (an artifact from `kiln compile --speculative`).
    pub speculative: bool,
}

/// The tokenizer folder's text side, or an error that says what chat needs.
pub(crate) fn text_of(source: &Source, tokenizer: Option<&Path>, command: &str) -> Result<Text> {
    let Some(folder) = source.text_folder(tokenizer) else {
        bail!(
            "`kiln {command}` needs the model's tokenizer.json and tokenizer_config.json: give --weights DIR \
             (a Hugging Face folder that has them) or --tokenizer DIR"
        );
    };
    if !folder.join(crate::tokenize::TOKENIZER_FILE).is_file() {
        bail!(
            "{} has no {}: `kiln {command}` needs the model's tokenizer (and its chat template in {}); \
             give the folder that has them with --tokenizer DIR",
            folder.display(),
            crate::tokenize::TOKENIZER_FILE,
            template::CONFIG_FILE
        );
    }
    Text::load(folder)
}

/// Runs `kiln chat`, reading turns from `input` unless `--message` gave them; replies go to `out`,
/// prompts ("> ") and notes to standard error.
pub fn run(req: &Request, input: &mut dyn BufRead, out: &mut dyn Write) -> Result<()> {
    let text = text_of(&req.source, req.tokenizer, "chat")?;
    let template = match &text.template {
        Ok(t) => t,
        Err(why) => bail!("{why}"),
    };
    let loaded = req.source.load("chat")?;
    let mut engine = loaded.engine;
    let info = loaded.info;
    let stop_tokens = text.stop_ids(info.eos);
    let interactive = req.messages.is_empty() && std::io::stdin().is_terminal();
    eprintln!(
        "{}: {}; chat template from {}; /reset clears the conversation, /exit or end of input ends it",
        info.name,
        info.what,
        template::CONFIG_FILE
    );
    let start: Vec<Message> = req.system.iter().map(|s| Message::new("system", s)).collect();
    let mut history = start.clone();
    let mut scripted = req.messages.iter();
    loop {
        let line = if req.messages.is_empty() {
            if interactive {
                eprint!("> ");
            }
            let mut line = String::new();
            if input.read_line(&mut line)? == 0 {
                break;
            }
            line
        } else {
            match scripted.next() {
                Some(m) => m.clone(),
                None => break,
            }
        };
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/exit" => break,
            "/reset" => {
                history = start.clone();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", line));
        let prompt = template.render(&history, true)?;
        let ids = text.tokenizer.encode_plain(&prompt)?;
        let max_new_tokens = match room(&info, ids.len(), req.max_new_tokens, interactive) {
            Ok(n) => n,
            Err(e) if interactive => {
                eprintln!("error: {e}");
                history.pop();
                continue;
            }
            Err(e) => return Err(e),
        };
        if req.verbose {
            eprintln!("prompt ids: {ids:?}");
        }
        let opts =
            GenerateOptions { max_new_tokens, sampling: req.sampling, stop_tokens: stop_tokens.clone() };
        let mut stream = text.tokenizer.stream(&ids)?;
        let mut reply = String::new();
        let mut failed = None;
        let mut on_token = |e: &kiln_runtime::generate::TokenEvent| {
            let piece = stream.push(e.token).and_then(|p| {
                out.write_all(p.as_bytes())?;
                out.flush()?;
                Ok(p)
            });
            match piece {
                Ok(p) => reply += &p,
                Err(err) => {
                    failed.get_or_insert(err);
                }
            }
        };
        let prompts = std::slice::from_ref(&ids);
        let g = if req.speculative {
            generate_speculative(engine.as_mut(), prompts, &opts, &mut |e| {
                on_token(e);
                Flow::Continue
            })?
        } else {
            generate(engine.as_mut(), prompts, &opts, &mut on_token)?
        };
        if let Some(e) = failed {
            return Err(e);
        }
        let rest = stream.finish();
        reply += &rest;
        writeln!(out, "{rest}")?;
        out.flush()?;
        if req.verbose {
            eprintln!("reply ids: {:?}", g.tokens[0]);
            if let Some(a) = g.stats.acceptance() {
                eprintln!(
                    "speculative: {} of {} drafts accepted ({:.1}%)",
                    g.stats.accepted,
                    g.stats.drafted,
                    100.0 * a
                );
            }
        }
        history.push(Message::new("assistant", &reply));
    }
    Ok(())
}

/// The new tokens a turn may generate: `wanted`, fewer when the context leaves less room, or an
/// error when the conversation fills it. At a terminal the chat goes on after the error (the turn
/// dropped), so `/reset` is the way on; a scripted chat ends there.
fn room(info: &Info, prompt: usize, wanted: usize, interactive: bool) -> Result<usize> {
    let prompt = prompt as u64;
    if prompt > info.max_prompt || prompt > info.max_positions {
        let way_on = if interactive { "/reset to start over" } else { "shorten the conversation" };
        bail!(
            "the conversation is {prompt} tokens, more than the model takes ({} at once, {} positions in \
             all): {way_on} (or compile with a larger --max-context)",
            info.max_prompt,
            info.max_positions
        );
    }
    Ok((wanted as u64).min(info.max_positions + 1 - prompt) as usize)
}
