//! Hugging Face chat templates: the Jinja template in a model folder's `tokenizer_config.json`
//! (field `chat_template`) turns a conversation into the prompt text the model was trained on.
//!
//! Rendered as transformers renders it (`apply_chat_template`): a Jinja environment with
//! `trim_blocks` and `lstrip_blocks`, the variables `messages` (each `{"role", "content"}`),
//! `add_generation_prompt`, `bos_token` and `eos_token` (the config's strings, or the `content` of
//! its `{"content": ...}` token objects; empty when absent), the function `raise_exception(msg)`,
//! with which templates refuse a conversation, and Python's string methods (`.split`, `.strip`,
//! ...) through minijinja's `pycompat`. The rendered text holds the special tokens it needs (the
//! BOS among them), so it is encoded without adding any (`TextTokenizer::encode_plain`).
//!
//! Does not do: tools and tool calls (messages are text only), the `{% generation %}` tag of
//! assistant-mask templates, `strftime_now`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use minijinja::{Environment, ErrorKind};
use serde::Serialize;

/// The file a model folder holds its chat template in.
pub const CONFIG_FILE: &str = "tokenizer_config.json";

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }
}

/// A model's chat template with the special tokens it refers to.
#[derive(Debug)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
    /// The file it came from, for messages.
    path: PathBuf,
}

/// Why a conversation could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The template refused it (`raise_exception`): the message is the template's.
    #[error("the chat template refused the conversation: {0}")]
    Refused(String),
    #[error("the chat template of {path} failed: {message}")]
    Failed { path: String, message: String },
}

/// Loads the chat template of `folder/tokenizer_config.json`.
pub fn load(folder: &Path) -> Result<ChatTemplate> {
    let path = folder.join(CONFIG_FILE);
    if !path.is_file() {
        bail!(
            "{} has no {CONFIG_FILE}: chat needs the model's chat template (its field `chat_template`) \
             beside tokenizer.json",
            folder.display()
        );
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    ChatTemplate::from_config(&text, &path)
}

/// A special token in a tokenizer config: a string, an `{"content": ...}` object, or absent/null.
fn token(config: &serde_json::Value, field: &str, path: &Path) -> Result<String> {
    match config.get(field) {
        None | Some(serde_json::Value::Null) => Ok(String::new()),
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(serde_json::Value::Object(o)) => match o.get("content") {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            _ => bail!("{}: `{field}` is an object without a string `content`", path.display()),
        },
        Some(other) => {
            bail!("{}: `{field}` must be a string or an object with `content`, not {other}", path.display())
        }
    }
}

impl ChatTemplate {
    /// The template of a `tokenizer_config.json`'s text; `path` names it in messages. The field
    /// `chat_template` is a string, or a list of `{"name", "template"}` of which `default` is used.
    pub fn from_config(text: &str, path: &Path) -> Result<ChatTemplate> {
        let config: serde_json::Value =
            serde_json::from_str(text).with_context(|| format!("{} is not JSON", path.display()))?;
        let source = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str())
                .map(str::to_string)
                .with_context(|| {
                    format!(
                        "{}: `chat_template` is a list of named templates without one named `default`",
                        path.display()
                    )
                })?,
            None | Some(serde_json::Value::Null) => bail!(
                "{} has no field `chat_template`: this model has no chat template, so it cannot chat; \
                 give it prompts as text or token ids (`kiln run --prompt`, `/v1/completions`)",
                path.display()
            ),
            Some(other) => bail!("{}: `chat_template` must be a string, not {other}", path.display()),
        };
        let template = ChatTemplate {
            source,
            bos_token: token(&config, "bos_token", path)?,
            eos_token: token(&config, "eos_token", path)?,
            path: path.to_path_buf(),
        };
        // A template that does not parse is refused now, not at the first conversation.
        template.environment(Arc::default(), TEMPLATE_FUEL).template_from_str(&template.source).map_err(
            |e| anyhow::anyhow!("{}: `chat_template` is not a valid Jinja template: {e:#}", path.display()),
        )?;
        Ok(template)
    }

    /// The end-of-sequence token the template closes assistant turns with, if the config names one.
    pub fn eos_token(&self) -> Option<&str> {
        Some(self.eos_token.as_str()).filter(|t| !t.is_empty())
    }

    /// The Jinja environment of transformers' templates; `raised` receives the message of a
    /// `raise_exception` call.
    fn environment(&self, raised: Arc<Mutex<Option<String>>>, fuel: u64) -> Environment<'static> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .expect("the default delimiters are valid");
        env.set_syntax(syntax);
        // A template comes from whatever folder the user names: one that loops without end (two
        // nested `range(100000)`s) would hang the chat; minijinja stops a render after this many
        // instructions (under a second). DeepSeek-V3's template renders a 100-turn conversation
        // with 5406 (the test prints it).
        env.set_fuel(Some(fuel));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", move |message: String| -> Result<String, minijinja::Error> {
            *raised.lock().unwrap_or_else(|p| p.into_inner()) = Some(message.clone());
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        env
    }

    /// The prompt text of `messages`, ending with the assistant's turn opened when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, RenderError> {
        self.render_with(messages, add_generation_prompt, TEMPLATE_FUEL)
    }

    /// [`ChatTemplate::render`] stopped after `fuel` instructions.
    fn render_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        fuel: u64,
    ) -> Result<String, RenderError> {
        let raised = Arc::new(Mutex::new(None));
        let env = self.environment(Arc::clone(&raised), fuel);
        let failed = |e: minijinja::Error| match raised.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(message) => RenderError::Refused(message),
            None if e.kind() == ErrorKind::OutOfFuel => RenderError::Failed {
                path: self.path.display().to_string(),
                message: format!(
                    "{e:#}: kiln stops a template after {fuel} instructions, and this one may never end"
                ),
            },
            None => RenderError::Failed { path: self.path.display().to_string(), message: format!("{e:#}") },
        };
        let template = env.template_from_str(&self.source).map_err(failed)?;
        template
            .render(minijinja::context! {
                messages => minijinja::value::Serde(messages),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(failed)
    }
}

/// The instructions a chat template may run per render ([`ChatTemplate::environment`]).
pub const TEMPLATE_FUEL: u64 = 50_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat").join(name)
    }

    fn config(template: &str) -> ChatTemplate {
        let json = serde_json::json!({ "chat_template": template, "bos_token": "<s>", "eos_token": null });
        ChatTemplate::from_config(&json.to_string(), Path::new("t/tokenizer_config.json")).unwrap()
    }

    // The expected texts are what transformers' Jinja environment renders from the same template
    // (jinja2's sandbox with trim_blocks and lstrip_blocks).
    #[test]
    fn deepseek_v3_conversations_render_as_transformers_renders_them() {
        let t = load(&fixture("deepseek_v3")).unwrap();
        assert_eq!(t.eos_token(), Some("<｜end▁of▁sentence｜>"));
        let messages = [
            Message::new("system", "You are terse."),
            Message::new("system", "Answer in English."),
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello!"),
            Message::new("user", "Bye"),
        ];
        assert_eq!(
            t.render(&messages, true).unwrap(),
            "<｜begin▁of▁sentence｜>You are terse.\n\nAnswer in English.<｜User｜>Hi<｜Assistant｜>Hello!\
             <｜end▁of▁sentence｜><｜User｜>Bye<｜Assistant｜>"
        );
        assert_eq!(
            t.render(&messages[2..4], false).unwrap(),
            "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜>"
        );
    }

    /// A template that would run for hours (two nested loops of 100 thousand) stops at the fuel
    /// limit with the template's error; DeepSeek-V3's renders a conversation of 100 turns well
    /// within it (the fuel it takes is printed).
    #[test]
    fn a_template_that_does_not_end_runs_out_of_fuel() {
        let endless =
            config("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x");
        let e = endless.render(&[Message::new("user", "x")], true).unwrap_err().to_string();
        assert!(
            e.starts_with("the chat template of t/tokenizer_config.json failed") && e.contains("fuel"),
            "{e}"
        );
        let t = load(&fixture("deepseek_v3")).unwrap();
        let turns: Vec<Message> = (0..100)
            .map(|i| Message::new(if i % 2 == 0 { "user" } else { "assistant" }, &format!("turn {i}")))
            .collect();
        // The least fuel that renders it, by bisection.
        let (mut lo, mut hi) = (0u64, TEMPLATE_FUEL);
        assert!(t.render_with(&turns, true, hi).is_ok());
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            match t.render_with(&turns, true, mid) {
                Ok(_) => hi = mid,
                Err(_) => lo = mid,
            }
        }
        println!("DeepSeek-V3's template renders 100 turns with {hi} instructions of fuel");
        assert!(hi * 100 < TEMPLATE_FUEL, "{hi}");
    }

    #[test]
    fn templates_can_refuse_and_use_python_string_methods() {
        let t = config(
            "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}\
             {{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}\
             {{ bos_token }}[{{ m.role | upper }}] {{ m.content.strip().split('|')[-1] }}\n{% endfor %}\
             {% if add_generation_prompt %}[ASSISTANT]{% endif %}",
        );
        let ok = t.render(&[Message::new("user", "  a|b  ")], true).unwrap();
        assert_eq!(ok, "<s>[USER] b\n[ASSISTANT]");
        let refused = t.render(&[Message::new("system", "x")], true).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "the chat template refused the conversation: Only user and assistant roles are supported!"
        );
        let failed = config("{{ messages[0].content + 1 }}").render(&[Message::new("user", "x")], true);
        assert!(failed
            .unwrap_err()
            .to_string()
            .starts_with("the chat template of t/tokenizer_config.json failed"));
    }

    #[test]
    fn block_tags_take_their_newline_and_indent_as_in_transformers() {
        let t = config(
            "{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}",
        );
        assert_eq!(
            t.render(&[Message::new("user", "a"), Message::new("user", "b")], false).unwrap(),
            "a\nb\n"
        );
    }

    #[test]
    fn configs_without_a_usable_template_are_refused_naming_the_file_and_field() {
        let err = |json: &str| {
            format!(
                "{:#}",
                ChatTemplate::from_config(json, Path::new("m/tokenizer_config.json")).unwrap_err()
            )
        };
        assert!(
            err("{}").starts_with("m/tokenizer_config.json has no field `chat_template`"),
            "{}",
            err("{}")
        );
        assert_eq!(
            err("{\"chat_template\": 3}"),
            "m/tokenizer_config.json: `chat_template` must be a string, not 3"
        );
        assert!(err("{\"chat_template\": \"{% if %}\"}")
            .starts_with("m/tokenizer_config.json: `chat_template` is not a valid Jinja template"));
        assert!(err("{\"chat_template\": \"x\", \"bos_token\": 1}").contains("`bos_token` must be a string"));
        assert!(err("[").starts_with("m/tokenizer_config.json is not JSON"));
        let named = r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#;
        let t = ChatTemplate::from_config(named, Path::new("x")).unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "D");
        let missing = format!("{:#}", load(Path::new("/nonexistent-kiln")).unwrap_err());
        assert!(missing.starts_with("/nonexistent-kiln has no tokenizer_config.json"), "{missing}");
    }
}
