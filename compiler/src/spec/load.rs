//! kiln's TOML model files into a validated [`ModelSpec`], with every error located in the file.
//!
//! The text is parsed twice by the same parser (`toml` 0.9): once into its span-carrying `DeTable`,
//! which gives syntax errors and the positions of keys, and once through serde into `ModelSpec`,
//! whose `deny_unknown_fields` catches misspelt keys. `toml_edit` would also give spans, but it
//! implements an older TOML version than the parser serde uses, so a file could parse in one and not
//! the other; one parser means one grammar.
//!
//! serde's messages are made specific here: which section a key is unknown or missing in, and which
//! key a wrongly typed value belongs to.

use std::ops::Range;

use kiln_ir::spec::ModelSpec;
use kiln_ir::Diagnostic;
use toml::de::{DeTable, DeValue};

use super::validate::validate;
use super::SpecError;

/// Parses and validates a kiln TOML model spec. `file` is the name diagnostics show.
pub fn parse_toml(file: &str, src: &str) -> Result<ModelSpec, SpecError> {
    let doc = DeTable::parse(src).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        SpecError::Syntax(Diagnostic::at_bytes(file, src, span.start, span.end, one_line(e.message())))
    })?;
    let doc = doc.get_ref();
    let spec: ModelSpec =
        toml::from_str(src).map_err(|e| SpecError::Schema(schema_diagnostic(file, src, doc, &e)))?;
    check_weight_block_length(file, src, doc)?;
    validate(&spec).map_err(|v| {
        let span = span_of(doc, v.path);
        SpecError::Invalid(Diagnostic::at_bytes(file, src, span.start, span.end, v.message))
    })?;
    Ok(spec)
}

fn one_line(message: &str) -> String {
    message.trim().replace('\n', "; ")
}

/// Rewrites serde's message so that it says where: the section of an unknown or missing key, the key
/// of a value of the wrong type.
fn schema_diagnostic(file: &str, src: &str, doc: &DeTable<'_>, e: &toml::de::Error) -> Diagnostic {
    let span = e.span().unwrap_or(0..0);
    let msg = one_line(e.message());
    let message = if let Some(rest) = msg.strip_prefix("unknown field `") {
        let (key, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let mut path = path_at(doc, span.start);
        path.pop();
        if path.is_empty() {
            format!("unknown section `[{key}]`{tail}")
        } else {
            format!("unknown key `{key}` in `[{}]`{tail}", path.join("."))
        }
    } else if let Some(rest) = msg.strip_prefix("missing field `") {
        let key = rest.trim_end_matches('`');
        // serde reports a missing key at the span of the table it is missing from (at the root the
        // span is empty). A table only named in a dotted header (`[rope]` of `[rope.yarn]`) has the
        // span of its name in that header, which the subtable's header also covers.
        let table = if span.is_empty() { None } else { table_with_span(doc, &span, &mut Vec::new()) };
        match table {
            None if span.is_empty() => format!("missing section `[{key}]`"),
            Some((path, true)) => {
                let name = path.join(".");
                format!(
                    "missing key `{key}` in `[{name}]`, which this file only names in a subsection's \
                     header: add a `[{name}]` section with `{key}` before it"
                )
            }
            Some((path, false)) => format!("missing key `{key}` in `[{}]`", path.join(".")),
            None => format!("missing key `{key}` in `[{}]`", path_at(doc, span.start).join(".")),
        }
    } else {
        let path = path_at(doc, span.start);
        if path.is_empty() {
            msg
        } else {
            format!("in `{}`: {msg}", path.join("."))
        }
    };
    Diagnostic::at_bytes(file, src, span.start, span.end, message)
}

/// serde fills a `[u64; 2]` from the first two elements of a longer array and ignores the rest; a
/// block of three dimensions is a mistake, not something to truncate silently.
fn check_weight_block_length(file: &str, src: &str, doc: &DeTable<'_>) -> Result<(), SpecError> {
    let Some(value) = lookup(doc, &["quantization", "weight_block"]) else { return Ok(()) };
    match value.get_ref() {
        DeValue::Array(a) if a.len() != 2 => {
            let span = span_of(doc, &["quantization", "weight_block"]);
            Err(SpecError::Schema(Diagnostic::at_bytes(
                file,
                src,
                span.start,
                span.end,
                format!("weight_block must have exactly 2 elements, [rows, cols], found {}", a.len()),
            )))
        }
        _ => Ok(()),
    }
}

fn lookup<'a, 'i>(doc: &'a DeTable<'i>, path: &[&str]) -> Option<&'a toml::Spanned<DeValue<'i>>> {
    let (last, parents) = path.split_last()?;
    let mut table = doc;
    for key in parents {
        match table.get(*key)?.get_ref() {
            DeValue::Table(t) => table = t,
            _ => return None,
        }
    }
    table.get(*last)
}

/// The span to underline for a key path: `key = value` for a value, the header for a `[table]`. A
/// key that is absent (its default was used) falls back to the closest enclosing table, and to the
/// start of the file.
pub(super) fn span_of(doc: &DeTable<'_>, path: &[&str]) -> Range<usize> {
    let mut table = doc;
    let mut best = 0..0;
    for key in path {
        let Some((k, v)) = table.get_key_value(*key) else { return best };
        let (ks, vs) = (k.span(), v.span());
        // A `[header]` starts before its key; a `key = value` or inline table starts at the key.
        best = if vs.start < ks.start { vs } else { ks.start..vs.end.max(ks.end) };
        match v.get_ref() {
            DeValue::Table(t) => table = t,
            _ => return best,
        }
    }
    best
}

/// The shallowest table whose value spans exactly `span`, and whether it is implicit (only named in
/// the dotted header of a subtable, so that its value's span is its key's).
fn table_with_span(
    doc: &DeTable<'_>,
    span: &Range<usize>,
    prefix: &mut Vec<String>,
) -> Option<(Vec<String>, bool)> {
    for (k, v) in doc.iter() {
        let DeValue::Table(t) = v.get_ref() else { continue };
        prefix.push(k.get_ref().to_string());
        if v.span() == *span {
            return Some((prefix.clone(), k.span() == v.span()));
        }
        if let Some(found) = table_with_span(t, span, prefix) {
            return Some(found);
        }
        prefix.pop();
    }
    None
}

/// The deepest key path whose key or value covers `offset`. Tables in TOML are not contiguous (a
/// `[section]` header is far from its keys), so every table is searched.
fn path_at(doc: &DeTable<'_>, offset: usize) -> Vec<String> {
    fn covers(span: Range<usize>, offset: usize) -> bool {
        span.contains(&offset) || (span.is_empty() && span.start == offset)
    }
    fn walk(table: &DeTable<'_>, offset: usize, prefix: &mut Vec<String>) -> Option<Vec<String>> {
        for (k, v) in table.iter() {
            prefix.push(k.get_ref().to_string());
            if let DeValue::Table(t) = v.get_ref() {
                if let Some(found) = walk(t, offset, prefix) {
                    return Some(found);
                }
            }
            if covers(k.span(), offset) || covers(v.span(), offset) {
                return Some(prefix.clone());
            }
            prefix.pop();
        }
        None
    }
    walk(doc, offset, &mut Vec::new()).unwrap_or_default()
}
