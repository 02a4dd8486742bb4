//! The README's shell examples run, and print what the README shows, so that they cannot go stale.
//!
//! Every ```` ```sh ```` block of README.md that has a `$ ` line is a session: its commands run in
//! order, in one scratch directory (with `models/`, `tests/` and `tools/` linked from the checkout,
//! `kiln` on PATH and the cache in the scratch directory), each through `bash -o pipefail -c` with
//! standard error merged into standard output, as a terminal shows them. A command continues on
//! the lines that follow a `\`. The lines after a command, up to the next one, are its output
//! (a command followed at once by another shows none, and only has to succeed), matched line by
//! line:
//! - a line `...` matches any number of lines (none included);
//! - `[..]` inside a line matches any text (timings, speeds, paths that differ per machine);
//! - every other character must be there.
//!
//! A command must succeed, unless its shown output starts with `error:`. A block right after the
//! comment `<!-- readme: not run (REASON) -->` is skipped, and the test prints the reason (the
//! benchmarks, which take minutes and whose figures are this machine's; commands that build or
//! install kiln).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{kernel_cache, root, Scratch};

/// One command of a block and the output the README shows for it.
#[derive(Debug)]
struct Example {
    /// The README line of the `$ `.
    line: usize,
    command: String,
    shown: Vec<String>,
}

/// The `sh` blocks of `text`, as their examples, or the reason a block is not run.
fn blocks(text: &str) -> Vec<Result<Vec<Example>, (usize, String)>> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i] != "```sh" {
            i += 1;
            continue;
        }
        let start = i + 1;
        let skip = (i > 0)
            .then(|| lines[..i].iter().rev().find(|l| !l.trim().is_empty()))
            .flatten()
            .and_then(|l| l.trim().strip_prefix("<!-- readme: not run ("))
            .and_then(|l| l.strip_suffix(") -->"));
        let mut end = start;
        while end < lines.len() && lines[end] != "```" {
            end += 1;
        }
        let body = &lines[start..end];
        i = end + 1;
        if !body.iter().any(|l| l.starts_with("$ ")) {
            continue;
        }
        if let Some(reason) = skip {
            out.push(Err((start, reason.to_string())));
            continue;
        }
        let mut examples: Vec<Example> = Vec::new();
        let mut k = 0;
        while k < body.len() {
            let l = body[k];
            if let Some(cmd) = l.strip_prefix("$ ") {
                let mut command = cmd.to_string();
                let line = start + k + 1;
                while command.ends_with('\\') && k + 1 < body.len() {
                    command.pop();
                    k += 1;
                    command = format!("{} {}", command.trim_end(), body[k].trim_start());
                }
                examples.push(Example { line, command, shown: Vec::new() });
            } else if let Some(e) = examples.last_mut() {
                e.shown.push(l.to_string());
            }
            k += 1;
        }
        out.push(Ok(examples));
    }
    out
}

/// Whether `line` matches the shown `pattern` (`[..]` matches any text).
fn line_matches(pattern: &str, line: &str) -> bool {
    let parts: Vec<&str> = pattern.split("[..]").collect();
    if parts.len() == 1 {
        return pattern == line;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !line.starts_with(first) || line.len() < first.len() + last.len() || !line.ends_with(last) {
        return false;
    }
    let mut rest = &line[first.len()..line.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// Whether the output lines match the shown ones (see the module documentation).
fn matches(shown: &[String], got: &[&str]) -> bool {
    match shown.split_first() {
        None => got.is_empty(),
        Some((first, rest)) if first == "..." => (0..=got.len()).any(|skip| matches(rest, &got[skip..])),
        Some((first, rest)) => {
            got.first().is_some_and(|g| line_matches(first, g)) && matches(rest, &got[1..])
        }
    }
}

fn link(scratch: &Path, name: &str) {
    std::os::unix::fs::symlink(root().join(name), scratch.join(name)).unwrap();
}

#[test]
fn the_readme_examples_print_what_they_show() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let s = Scratch::new();
    for dir in ["models", "tests", "tools"] {
        link(&s.0, dir);
    }
    let bin: PathBuf = PathBuf::from(env!("CARGO_BIN_EXE_kiln")).parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let mut ran = 0;
    let mut failures = Vec::new();
    for block in blocks(&readme) {
        let examples = match block {
            Ok(e) => e,
            Err((line, reason)) => {
                eprintln!("README.md:{line}: not run: {reason}");
                continue;
            }
        };
        for e in examples {
            let out = Command::new("bash")
                .args(["-o", "pipefail", "-c", &format!("{{ {}\n}} 2>&1", e.command)])
                .current_dir(&s.0)
                .env("PATH", &path)
                .env("KILN_CACHE_DIR", s.path("cache"))
                .env("KILN_KERNEL_CACHE_DIR", kernel_cache())
                .env_remove("NO_COLOR")
                .output()
                .unwrap();
            ran += 1;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let got: Vec<&str> = text.lines().collect();
            let wants_error = e.shown.first().is_some_and(|l| l.starts_with("error:"));
            if out.status.success() == wants_error {
                failures.push(format!(
                    "README.md:{}: `{}` {} ({}):\n{text}",
                    e.line,
                    e.command,
                    if wants_error { "succeeded, but the README shows an error" } else { "failed" },
                    out.status
                ));
            } else if !e.shown.is_empty() && !matches(&e.shown, &got) {
                failures.push(format!(
                    "README.md:{}: `{}` printed\n{text}\nbut the README shows\n{}\n",
                    e.line,
                    e.command,
                    e.shown.join("\n")
                ));
            }
        }
    }
    assert!(ran > 20, "only {ran} commands found");
    assert!(failures.is_empty(), "{} of {ran} README commands:\n\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn the_matcher_takes_ellipses_and_wildcards() {
    let shown = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(matches(&shown(&["a", "...", "z"]), &["a", "b", "c", "z"]));
    assert!(matches(&shown(&["a", "...", "z"]), &["a", "z"]));
    assert!(!matches(&shown(&["a", "z"]), &["a", "b", "z"]));
    assert!(matches(&shown(&["took [..] ms; [..] tokens/s"]), &["took 1.5 ms; 30.2 tokens/s"]));
    assert!(!matches(&shown(&["took [..] ms"]), &["took 1.5 s"]));
    assert!(matches(&shown(&["..."]), &[]));
    let md = "x\n<!-- readme: not run (slow) -->\n```sh\n$ kiln bench\n```\n```sh\n$ a \\\n    b\nout\n```\n";
    let b = blocks(md);
    assert_eq!(b.len(), 2);
    assert_eq!(b[0].as_ref().unwrap_err().1, "slow");
    let e = b[1].as_ref().unwrap();
    assert_eq!((e[0].command.as_str(), e[0].shown.clone()), ("a b", vec!["out".to_string()]));
}
