//! Rule-based rewards (DeepSeek-V3 §5.2.1: answers checked by rules where the task allows it).
//! A reward sees a completion's text and the prompt's reference answer and returns a number; a run
//! sums the rewards it was given. New checkers implement [`Reward`] and are named in [`parse`].

use anyhow::{bail, Context, Result};

/// A rule that scores a completion.
pub trait Reward {
    /// The name the command line and the log use.
    fn name(&self) -> String;
    /// The score of `completion` (the generated text, the end-of-sequence token left out) against
    /// the reference `answer`; `finished` says whether the completion ended with that token rather
    /// than at the length limit.
    fn score(&self, completion: &str, answer: &str, finished: bool) -> f64;
}

/// 1 when the completion, with surrounding whitespace removed, is the answer (also trimmed).
pub struct ExactAnswer;

impl Reward for ExactAnswer {
    fn name(&self) -> String {
        "exact".into()
    }
    fn score(&self, completion: &str, answer: &str, _finished: bool) -> f64 {
        f64::from(u8::from(completion.trim() == answer.trim()))
    }
}

/// `weight` when the whole completion (trimmed) matches `pattern` (anchored at both ends): the shape of an answer, whatever
/// its value. Whether it ended on its own is not asked (a pattern can only see the text).
pub struct Format {
    pub pattern: regex::Regex,
    pub weight: f64,
}

impl Reward for Format {
    fn name(&self) -> String {
        "format".into()
    }
    fn score(&self, completion: &str, _answer: &str, _finished: bool) -> f64 {
        if self.pattern.is_match(completion.trim()) {
            self.weight
        } else {
            0.0
        }
    }
}

/// The rewards of `--reward` names: `exact`, and `format` (with `pattern`, scored 0.1 as a nudge
/// toward well-formed answers, below the exact answer's 1).
pub fn parse(names: &[String], pattern: &str) -> Result<Vec<Box<dyn Reward>>> {
    let mut out: Vec<Box<dyn Reward>> = Vec::new();
    for n in names {
        match n.as_str() {
            "exact" => out.push(Box::new(ExactAnswer)),
            "format" => {
                let pattern = regex::Regex::new(&format!("^(?:{pattern})$"))
                    .with_context(|| format!("--format-pattern {pattern:?} is not a regular expression"))?;
                out.push(Box::new(Format { pattern, weight: 0.1 }));
            }
            other => bail!("--reward {other}: unknown reward; use exact or format"),
        }
    }
    if out.is_empty() {
        bail!("give at least one --reward (exact, format)");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_format_check_what_they_say() {
        assert_eq!(ExactAnswer.score(" 12\n", "12", false), 1.0);
        assert_eq!(ExactAnswer.score("12 apples", "12", true), 0.0);
        let f = Format { pattern: regex::Regex::new(r"^(?:\d+)$").unwrap(), weight: 0.1 };
        assert_eq!(f.score("7", "12", true), 0.1);
        assert_eq!(f.score("7 apples", "12", true), 0.0, "the whole completion must match");
        let err = |names: &[&str], pattern: &str| {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            parse(&names, pattern).err().map(|e| format!("{e:#}")).unwrap_or_default()
        };
        assert!(err(&["nope"], "").contains("unknown reward"));
        assert!(err(&["format"], "(").contains("not a regular expression"));
        assert!(err(&[], "").contains("at least one --reward"));
        assert_eq!(parse(&["exact".into(), "format".into()], r"\d+").unwrap().len(), 2);
    }
}
