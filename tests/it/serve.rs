//! `kiln serve` and `kiln chat` on a compiled tiny model (models/tiny.toml, `--max-batch 8`, random
//! weights seed 3 exported as a Hugging Face folder with the fixture tokenizer and DeepSeek-V3's chat
//! template): answers over raw HTTP against `kiln run`'s greedy tokens, streams against whole
//! answers, bad requests, 8 concurrent clients in one batch, and OpenAI's Python client
//! (tests/serve/openai_client.py) when a Python with `openai` is at hand.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Value};

use crate::util::{kiln, kiln_command, root};

/// The artifact and the weights folder, made once for every test here.
struct Fixture {
    artifact: String,
    /// The same model with the MTP module's draft program (`kiln compile --speculative`).
    speculative: String,
    weights: String,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        // The fixtures of earlier runs whose process is gone (a static is never dropped).
        for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.strip_prefix("serve-").and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let dir = tmp.join(format!("serve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let weights = dir.join("hf").to_string_lossy().into_owned();
        // The plain artifact, and one with the MTP module's draft program.
        let compiled = |name: &str, extra: &[&str]| {
            let out = dir.join(name).to_string_lossy().into_owned();
            let mut args = vec!["compile", "models/tiny.toml", "--target", "cpu", "--max-batch", "8"];
            args.extend(["--max-context", "256", "--no-score", "-o", &out]);
            args.extend(extra);
            let compile = kiln(&args);
            assert!(compile.ok, "{}", compile.stderr);
            out
        };
        let (artifact, speculative) = (compiled("tiny.kiln", &[]), compiled("spec.kiln", &["--speculative"]));
        let export = kiln(&["export-hf", "models/tiny.toml", "--random-weights", "3", "-o", &weights]);
        assert!(export.ok, "{}", export.stderr);
        let hf = Path::new(&weights);
        std::fs::copy(root().join("tests/fixtures/tokenizer/tokenizer.json"), hf.join("tokenizer.json"))
            .unwrap();
        // DeepSeek-V3's template, with the fixture tokenizer's special tokens.
        let v3 = root().join("tests/fixtures/chat/deepseek_v3/tokenizer_config.json");
        let mut config: Value = serde_json::from_str(&std::fs::read_to_string(v3).unwrap()).unwrap();
        config["bos_token"] = json!("<bos>");
        config["eos_token"] = json!({ "content": "<eos>" });
        std::fs::write(hf.join("tokenizer_config.json"), config.to_string()).unwrap();
        Fixture { artifact, speculative, weights }
    })
}

/// A running `kiln serve`, stopped when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        Server::start_with(&fixture().artifact, extra)
    }

    fn start_with(artifact: &str, extra: &[&str]) -> Server {
        let f = fixture();
        let mut child = kiln_command()
            .args(["serve", artifact, "--weights", &f.weights, "--port", "0", "--threads", "1"])
            .args(extra)
            .current_dir(root())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
        let addr = first.split("http://").nth(1).and_then(|s| s.split('/').next()).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("no address in {first:?}")
        });
        Server { addr: addr.to_string(), child }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }

    /// The `data:` payloads of an event stream.
    fn events(&self) -> Vec<String> {
        self.body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_string).collect()
    }
}

/// Sends `raw` (a whole request) and reads the answer to the end (the request says `Connection:
/// close`), de-chunking a chunked body.
fn send(addr: &str, raw: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    s.write_all(raw).unwrap();
    let mut bytes = Vec::new();
    s.read_to_end(&mut bytes).unwrap();
    let text = String::from_utf8(bytes).unwrap();
    let (head, mut body) = text.split_once("\r\n\r\n").map(|(h, b)| (h.to_string(), b.to_string())).unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let (mut plain, mut rest) = (String::new(), body.as_str());
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size, 16).unwrap();
            if n == 0 {
                break;
            }
            plain += &after[..n];
            rest = &after[n + 2..];
        }
        body = plain;
    }
    Reply { status, head, body }
}

fn request(addr: &str, method: &str, path: &str, body: &str) -> Reply {
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    send(addr, raw.as_bytes())
}

fn post(addr: &str, path: &str, body: &Value) -> Reply {
    request(addr, "POST", path, &body.to_string())
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

/// `kiln run`'s greedy tokens for `prompt` (stopping at the model's end-of-sequence token).
fn kiln_run(prompt: &[i64], new: usize) -> Vec<i64> {
    let f = fixture();
    let p: Vec<String> = prompt.iter().map(i64::to_string).collect();
    let out = kiln(&[
        "run",
        &f.artifact,
        "--weights",
        &f.weights,
        "--prompt-ids",
        &p.join(","),
        "--max-new-tokens",
        &new.to_string(),
    ]);
    assert!(out.ok, "{}", out.stderr);
    // The report (on standard error) lists the new ids.
    let line = out
        .stderr
        .lines()
        .find_map(|l| l.split_once("tokens: ").filter(|_| l.starts_with("generated")).map(|x| x.1));
    serde_json::from_str(line.unwrap()).unwrap()
}

/// The prompt "hello world" as the fixture tokenizer encodes it (tests/fixtures/tokenizer).
const HELLO: [i64; 7] = [0, 301, 222, 88, 80, 83, 313];

fn tokenizer() -> tokenizers::Tokenizer {
    tokenizers::Tokenizer::from_file(Path::new(&fixture().weights).join("tokenizer.json")).unwrap()
}

/// The text `new` adds to `prompt`, as the server decodes it.
fn text_after(prompt: &[i64], new: &[i64]) -> String {
    let t = tokenizer();
    let all: Vec<u32> = prompt.iter().chain(new).map(|&i| i as u32).collect();
    let p: Vec<u32> = prompt.iter().map(|&i| i as u32).collect();
    let whole = t.decode(&all, true).unwrap();
    whole[t.decode(&p, true).unwrap().len()..].to_string()
}

#[test]
fn completions_are_kiln_runs_greedy_tokens_whole_and_streamed() {
    let server = Server::start(&[]);
    let want = kiln_run(&HELLO, 10);
    let models = request(&server.addr, "GET", "/v1/models", "").json();
    assert_eq!(models["data"][0]["id"], "tiny");

    for prompt in [json!("hello world"), json!(HELLO)] {
        let r = post(
            &server.addr,
            "/v1/completions",
            &json!({"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 0}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("x-kiln-batch-size"), Some("1"));
        let v = r.json();
        assert_eq!(v["object"], "text_completion");
        let choice = &v["choices"][0];
        assert_eq!(ids(&choice["token_ids"]), want);
        assert_eq!(choice["text"], text_after(&HELLO, &want));
        assert_eq!(choice["finish_reason"], if want.len() == 10 { "length" } else { "stop" });
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 7, "completion_tokens": want.len(), "total_tokens": 7 + want.len()})
        );
    }

    let body = json!({"model": "tiny", "prompt": "hello world", "max_tokens": 10, "temperature": 0, "stream": true,
                      "stream_options": {"include_usage": true}});
    let r = post(&server.addr, "/v1/completions", &body);
    assert_eq!((r.status, r.header("content-type")), (200, Some("text/event-stream")));
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let choices: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"].get(0)).collect();
    let streamed: Vec<i64> = choices.iter().flat_map(|c| ids(&c["token_ids"])).collect();
    let text: String = choices.iter().map(|c| c["text"].as_str().unwrap()).collect();
    assert_eq!((streamed, text), (want.clone(), text_after(&HELLO, &want)));
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], want.len());
}

#[test]
fn chat_renders_the_template_and_answers_as_kiln_chat_does() {
    let server = Server::start(&[]);
    let f = fixture();
    let chat = kiln(&[
        "chat",
        &f.artifact,
        "--weights",
        &f.weights,
        "--system",
        "be brief",
        "--message",
        "hello world",
        "--message",
        "the clay",
        "--max-new-tokens",
        "6",
        "--verbose",
    ]);
    assert!(chat.ok, "{}", chat.stderr);
    let lists = |prefix: &str| -> Vec<Vec<i64>> {
        chat.stderr
            .lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (prompts, replies) = (lists("prompt ids: "), lists("reply ids: "));
    assert_eq!((prompts.len(), replies.len()), (2, 2), "{}", chat.stderr);
    // The first prompt is DeepSeek-V3's template around the conversation, encoded as it is.
    let t = tokenizer();
    let first: Vec<u32> = prompts[0].iter().map(|&i| i as u32).collect();
    assert_eq!(t.decode(&first, false).unwrap(), "<bos>be brief<｜User｜>hello world<｜Assistant｜>");
    // Each reply is kiln run's greedy continuation of its prompt; the second prompt holds the first
    // reply, closed by the template's end of turn.
    for (p, r) in prompts.iter().zip(&replies) {
        assert_eq!(&kiln_run(p, 6), r);
    }
    let reply_text = text_after(&prompts[0], &replies[0]);
    let second: Vec<u32> = prompts[1].iter().map(|&i| i as u32).collect();
    assert!(
        t.decode(&second, false)
            .unwrap()
            .ends_with(&format!("{reply_text}<｜end▁of▁sentence｜><｜User｜>the clay<｜Assistant｜>")),
        "{}",
        t.decode(&second, false).unwrap()
    );
    assert!(chat.stdout.starts_with(&format!("{reply_text}\n")), "{:?}", chat.stdout);

    let messages =
        json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]);
    let body = json!({"model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0});
    let r = post(&server.addr, "/v1/chat/completions", &body).json();
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(ids(&r["choices"][0]["token_ids"]), replies[0]);
    assert_eq!(r["choices"][0]["message"], json!({"role": "assistant", "content": reply_text}));
    assert_eq!(r["usage"]["prompt_tokens"], prompts[0].len());

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = post(&server.addr, "/v1/chat/completions", &streamed).events();
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    let content: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(content, reply_text);
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], r["choices"][0]["finish_reason"]);
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
}

#[test]
fn bad_requests_get_4xx_answers_that_say_why() {
    let server = Server::start(&[]);
    let a = server.addr.as_str();
    let refused = |r: Reply, status: u16, param: Value, message: &str| {
        assert_eq!(r.status, status, "{}", r.body);
        let e = &r.json()["error"];
        assert_eq!((&e["type"], &e["param"]), (&json!("invalid_request_error"), &param), "{}", r.body);
        assert!(e["message"].as_str().unwrap().contains(message), "{}", r.body);
    };
    let completion = |extra: Value| {
        let mut body = json!({"model": "tiny", "prompt": "hello"});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        post(a, "/v1/completions", &body)
    };
    refused(request(a, "POST", "/v1/completions", "{\"model\": "), 400, Value::Null, "not valid JSON");
    refused(request(a, "POST", "/v1/completions", "[]"), 400, Value::Null, "must be a JSON object");
    refused(
        post(a, "/v1/completions", &json!({"model": "tiny"})),
        400,
        json!("prompt"),
        "`prompt` is required",
    );
    refused(completion(json!({"max_tokens": "4"})), 400, json!("max_tokens"), "an integer of at least 1");
    refused(completion(json!({"n": 3})), 400, json!("n"), "one choice per request");
    refused(completion(json!({"temperature": -1})), 400, json!("temperature"), "from 0 to 2, not -1");
    refused(completion(json!({"max_tokens": 300})), 400, json!("max_tokens"), "but this model holds 256");
    // The largest count a request can name does not wrap the positions it needs around.
    refused(
        completion(json!({"max_tokens": u64::MAX})),
        400,
        json!("max_tokens"),
        &format!("new tokens need {} positions, but this model holds 256", u128::from(u64::MAX) + 1),
    );
    refused(completion(json!({"prompt": vec![3; 257]})), 400, json!("prompt"), "the prompt is 257 tokens");
    refused(
        completion(json!({"prompt": [3, 512]})),
        400,
        json!("prompt"),
        "prompt token 1 is 512, outside the vocabulary",
    );
    refused(completion(json!({"model": "gpt-7"})), 404, json!("model"), "this server serves `tiny`");
    let chat =
        |messages: Value| post(a, "/v1/chat/completions", &json!({"model": "tiny", "messages": messages}));
    refused(chat(json!([])), 400, json!("messages"), "`messages` is empty");
    refused(
        chat(json!([{"role": "user", "content": 5}])),
        400,
        json!("messages[0].content"),
        "a string or a list",
    );
    refused(request(a, "GET", "/v2/anything", ""), 404, Value::Null, "no such path: /v2/anything");
    let r = request(a, "GET", "/v1/completions", "");
    assert_eq!(r.header("allow"), Some("POST"));
    refused(r, 405, Value::Null, "/v1/completions takes POST, not GET");
    refused(send(a, b"NONSENSE\r\n\r\n"), 400, Value::Null, "not an HTTP request line");

    // A client that leaves mid-stream does not stop the server.
    let mut s = TcpStream::connect(a).unwrap();
    let body = json!({"model": "tiny", "prompt": "hello", "max_tokens": 200, "stream": true}).to_string();
    write!(s, "POST /v1/completions HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut first = [0u8; 64];
    s.read_exact(&mut first).unwrap();
    drop(s);
    let r = completion(json!({"max_tokens": 2, "temperature": 0}));
    assert_eq!((r.status, r.json()["usage"]["completion_tokens"].clone()), (200, json!(2)));
}

#[test]
fn eight_concurrent_clients_share_one_batch_and_get_what_they_would_alone() {
    // The batched server waits for a full batch (8) before it starts; the other answers alone.
    let batched = Server::start(&["--batch-window", "60000"]);
    let alone = Server::start(&[]);
    let body = |i: usize| {
        if i % 2 == 0 {
            json!({"model": "tiny", "prompt": HELLO, "max_tokens": 3 + i, "temperature": 0})
        } else {
            json!({"model": "tiny", "prompt": "the clay", "max_tokens": 2 + i, "temperature": 0.9, "top_p": 0.8,
                   "seed": i, "stop": ["zz"]})
        }
    };
    let answers: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let (addr, b) = (&batched.addr, body(i));
                s.spawn(move || post(addr, "/v1/completions", &b))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let greedy = kiln_run(&HELLO, 10);
    for (i, r) in answers.iter().enumerate() {
        assert_eq!((r.status, r.header("x-kiln-batch-size")), (200, Some("8")), "client {i}: {}", r.body);
        let got = ids(&r.json()["choices"][0]["token_ids"]);
        let solo = ids(&post(&alone.addr, "/v1/completions", &body(i)).json()["choices"][0]["token_ids"]);
        assert_eq!(got, solo, "client {i}");
        if i % 2 == 0 {
            assert_eq!(got, greedy[..(3 + i).min(greedy.len())], "client {i}");
        }
    }
}

/// A Python that imports `openai`: `KILN_OPENAI_PYTHON`, else the one scripts/setup.sh installs
/// into tools/local/openai-venv, else the goldens' venv.
fn openai_python() -> Result<PathBuf, String> {
    let mut candidates: Vec<PathBuf> =
        std::env::var_os("KILN_OPENAI_PYTHON").map(PathBuf::from).into_iter().collect();
    candidates.push(root().join("tools/local/openai-venv/bin/python"));
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cache/kiln-venv/bin/python"));
    }
    for c in &candidates {
        let ok = Command::new(c).args(["-c", "import openai"]).stderr(Stdio::null()).status();
        if ok.is_ok_and(|s| s.success()) {
            return Ok(c.clone());
        }
    }
    Err(format!("none of {candidates:?} imports openai (scripts/setup.sh installs it)"))
}

#[test]
fn the_openai_python_client_passes_its_tests() {
    let python = match openai_python() {
        Ok(p) => p,
        Err(why) => {
            println!("skipped: the OpenAI client test needs Python with `openai`: {why}");
            return;
        }
    };
    let (plain, batched) = (Server::start(&[]), Server::start(&["--batch-window", "60000"]));
    let want = kiln_run(&HELLO, 16);
    let expect =
        json!({"prompt": "hello world", "prompt_ids": HELLO, "ids": want, "text": text_after(&HELLO, &want)});
    let out = Command::new(python)
        .arg(root().join("tests/serve/openai_client.py"))
        .args([
            "--url",
            &format!("http://{}/v1", plain.addr),
            "--batched-url",
            &format!("http://{}/v1", batched.addr),
        ])
        .args(["--model", "tiny", "--expect", &expect.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.trim_end().ends_with(" passed, 0 failed"), "{stdout}");
}

/// `kiln chat --speculative` on an artifact with the MTP draft program: the greedy replies are
/// plain `kiln chat`'s, and `--verbose` reports the drafts accepted. Without the draft program it
/// is refused with the compile flag that adds it.
#[test]
fn speculative_chat_replies_as_plain_chat() {
    let f = fixture();
    let spec = f.speculative.clone();
    let chat = |artifact: &str, extra: &[&str]| {
        let mut args = vec!["chat", artifact, "--weights", &f.weights, "--message", "hello world"];
        args.extend(["--message", "the clay", "--max-new-tokens", "8", "--verbose"]);
        args.extend(extra);
        kiln(&args)
    };
    let (plain, fast) = (chat(&f.artifact, &[]), chat(&spec, &["--speculative"]));
    assert!(plain.ok, "{}", plain.stderr);
    assert!(fast.ok, "{}", fast.stderr);
    let replies = |err: &str| -> Vec<String> {
        err.lines().filter(|l| l.starts_with("reply ids: ")).map(str::to_string).collect()
    };
    assert_eq!(replies(&fast.stderr).len(), 2, "{}", fast.stderr);
    assert_eq!(replies(&fast.stderr), replies(&plain.stderr));
    assert_eq!(fast.stdout, plain.stdout);
    assert_eq!(fast.stderr.matches("drafts accepted").count(), 2, "{}", fast.stderr);
    let refused = chat(&f.artifact, &["--speculative"]);
    assert!(!refused.ok && refused.stderr.contains("--speculative"), "{}", refused.stderr);
}

/// `kiln serve --speculative`: greedy completions are `kiln run`'s plain greedy tokens, alone and
/// in a batch of requests with options of their own; a server over an artifact without the draft
/// program is refused before it listens.
#[test]
fn speculative_serving_answers_as_plain_decoding() {
    let f = fixture();
    let server = Server::start_with(&f.speculative, &["--speculative", "--batch-window", "2000"]);
    let ask = |prompt: &[i64], max: usize| {
        let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": max, "temperature": 0});
        let r = post(&server.addr, "/v1/completions", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        r
    };
    let want = kiln_run(&HELLO, 10);
    let r = ask(&HELLO, 10);
    assert_eq!(r.json()["choices"][0]["text"], text_after(&HELLO, &want));
    // Two requests at once (one batch, within the window), of different lengths and limits.
    let other = [5i64, 9, 2];
    let answers = std::thread::scope(|s| {
        let a = s.spawn(|| ask(&HELLO, 7));
        let b = s.spawn(|| ask(&other, 12));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(answers.0.header("x-kiln-batch-size"), Some("2"));
    assert_eq!(answers.0.json()["choices"][0]["text"], text_after(&HELLO, &kiln_run(&HELLO, 7)));
    assert_eq!(answers.1.json()["choices"][0]["text"], text_after(&other, &kiln_run(&other, 12)));
    let refused = kiln(&["serve", &f.artifact, "--weights", &f.weights, "--port", "0", "--speculative"]);
    assert!(!refused.ok, "{}", refused.stdout);
    assert!(
        refused.stderr.contains("--speculative: ") && refused.stderr.contains("draft"),
        "{}",
        refused.stderr
    );
}

/// A scripted turn longer than the model's context ends the chat, saying to shorten it (a chat at a
/// terminal goes on after the error, where `/reset` is the way on, and says so instead).
#[test]
fn a_scripted_turn_too_long_for_the_context_says_to_shorten_it() {
    let f = fixture();
    let long = "hello world ".repeat(300);
    let out = kiln(&["chat", &f.artifact, "--weights", &f.weights, "--message", &long]);
    assert!(!out.ok, "{}", out.stdout);
    assert!(
        out.stderr.contains("tokens, more than the model takes")
            && out.stderr.contains("shorten the conversation (or compile with a larger --max-context)"),
        "{}",
        out.stderr
    );
}

#[test]
fn chat_without_a_template_or_tokenizer_says_what_is_missing() {
    let f = fixture();
    // Random weights come without a tokenizer folder.
    let out = kiln(&["chat", &f.artifact, "--random-weights", "3", "--message", "hi"]);
    assert!(!out.ok);
    assert!(
        out.stderr.contains("`kiln chat` needs the model's tokenizer.json and tokenizer_config.json"),
        "{}",
        out.stderr
    );
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("serve-notemplate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(root().join("tests/fixtures/tokenizer/tokenizer.json"), dir.join("tokenizer.json"))
        .unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), "{\"bos_token\": \"<bos>\"}").unwrap();
    let d = dir.to_string_lossy();
    let out = kiln(&["chat", &f.artifact, "--random-weights", "3", "--tokenizer", &d, "--message", "hi"]);
    assert_eq!(
        out.stderr.trim(),
        format!(
            "error: {d}/tokenizer_config.json has no field `chat_template`: this model has no chat template, so \
             it cannot chat; give it prompts as text or token ids (`kiln run --prompt`, `/v1/completions`)"
        )
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
