//! The `.kir` parser: a recursive-descent reader over the tokens of [`super::lex`], one statement per
//! line, building the graph as it goes.
//!
//! It checks what a reader of the text needs to trust: every operand is defined above its use, no value
//! is defined twice, attributes make a valid op ([`Op::from_parts`]), and every written result type is
//! the one shape inference gives (ops that declare their type are taken at their word). Each error
//! points at the token that is wrong. It does not check graph-wide invariants (unused values, a
//! constant's rank, the model's conventions): that is the verifier's job.

use crate::graph::{Graph, GraphError, ValueId};
use crate::infer;
use crate::module::Module;
use crate::op::{Attr, Op};
use crate::types::{DType, Dim, TensorType};

use super::lex::{Lexer, Tok, Token};
use super::SpanError;

mod module;

pub(crate) fn parse_graph(src: &str) -> Result<Graph, SpanError> {
    parse_graph_with_spans(src).map(|(g, _)| g)
}

pub(crate) fn parse_module(src: &str) -> Result<Module, SpanError> {
    parse_module_with_spans(src).map(|(m, _)| m)
}

/// A graph and where its parts are written.
pub(crate) fn parse_graph_with_spans(src: &str) -> Result<(Graph, Spans), SpanError> {
    let mut p = Parser::new(src)?;
    let g = p.graph()?;
    Ok((g, p.spans))
}

/// A module and where its parts are written (one [`GraphSpans`] per program, in order).
pub(crate) fn parse_module_with_spans(src: &str) -> Result<(Module, Spans), SpanError> {
    let mut p = Parser::new(src)?;
    let m = p.module()?;
    Ok((m, p.spans))
}

/// A byte range of the source.
pub(crate) type Span = (usize, usize);

/// Where a top-level graph is written: its `graph @name {` header and the line defining each of its
/// values (from the results to the op name). Fused bodies are not recorded: a finding inside one is
/// reported at the fused node.
#[derive(Default)]
pub(crate) struct GraphSpans {
    pub(crate) header: Span,
    pub(crate) values: std::collections::HashMap<ValueId, Span>,
}

/// Where the parts of a file are written, for locating what the verifiers find after parsing.
#[derive(Default)]
pub(crate) struct Spans {
    /// The `module @name {` header; empty for a graph file.
    pub(crate) module: Span,
    /// Each top-level graph, in order.
    pub(crate) graphs: Vec<GraphSpans>,
    /// The name of each `param` and `state` declaration.
    pub(crate) decls: std::collections::HashMap<String, Span>,
}

fn err(span: Span, msg: impl Into<String>) -> SpanError {
    SpanError::new(span.0, span.1, msg)
}

/// One written attribute: key, value, the span from the key to the end of the value, and the span of
/// the value alone.
struct WrittenAttr {
    key: String,
    value: Attr,
    span: Span,
    value_span: Span,
}

struct Parser<'a> {
    lex: Lexer<'a>,
    /// The current token (one token of lookahead is all the grammar needs).
    tok: Token<'a>,
    /// The end of the previous token: where "found the end of the line" points.
    prev_end: usize,
    /// How many `fused` bodies enclose the current line.
    depth: usize,
    spans: Spans,
}

/// Limits on nesting, so that a hostile file cannot overflow the parser's stack.
const MAX_BODY_DEPTH: usize = 16;
const MAX_LIST_DEPTH: usize = 16;

impl<'a> Parser<'a> {
    fn new(src: &'a str) -> Result<Parser<'a>, SpanError> {
        let mut lex = Lexer::new(src);
        let tok = lex.next_token()?;
        Ok(Parser { lex, tok, prev_end: 0, depth: 0, spans: Spans::default() })
    }

    /// Moves to the next token and returns the current one.
    fn bump(&mut self) -> Result<Token<'a>, SpanError> {
        let next = self.lex.next_token()?;
        let tok = std::mem::replace(&mut self.tok, next);
        self.prev_end = tok.end;
        Ok(tok)
    }

    fn here(&self) -> Span {
        (self.tok.start, self.tok.end)
    }

    /// The current token if it continues the current line; `None` at the end of a line or the file.
    fn inline(&self) -> Option<&Tok<'a>> {
        (!self.tok.line_start && self.tok.tok != Tok::Eof).then_some(&self.tok.tok)
    }

    fn inline_is(&self, c: char) -> bool {
        self.inline() == Some(&Tok::Punct(c))
    }

    /// "expected X, found Y" at the current token, or just after the previous one at the end of a line.
    fn expected(&self, what: &str) -> SpanError {
        match self.inline() {
            Some(t) => err(self.here(), format!("expected {what}, found {}", t.describe())),
            None => {
                let found =
                    if self.tok.tok == Tok::Eof { "the end of the file" } else { "the end of the line" };
                err((self.prev_end, self.prev_end), format!("expected {what}, found {found}"))
            }
        }
    }

    fn expect_punct(&mut self, c: char, what: &str) -> Result<Token<'a>, SpanError> {
        if self.inline_is(c) {
            self.bump()
        } else {
            Err(self.expected(what))
        }
    }

    /// A whole file holding one graph.
    fn graph(&mut self) -> Result<Graph, SpanError> {
        if self.tok.tok != Tok::Word("graph") {
            let msg = format!("expected `graph @<name> {{`, found {}", self.tok.tok.describe());
            return Err(err(self.here(), msg));
        }
        let g = self.graph_def()?;
        self.end_of_file("graph")?;
        Ok(g)
    }

    /// `graph @<name> {`, its statements and the closing `}`; the current token is `graph`.
    fn graph_def(&mut self) -> Result<Graph, SpanError> {
        let start = self.bump()?.start;
        self.expect_punct('@', "`@` and the graph's name")?;
        let name = self.at_name("the graph's name")?;
        let open = self.expect_punct('{', "`{`")?;
        self.spans.graphs.push(GraphSpans { header: (start, open.end), ..GraphSpans::default() });
        let mut g = Graph::new(name);
        self.body(&mut g, (open.start, open.end))?;
        Ok(g)
    }

    /// The name after `@`: a word, or a quoted string for a name that is not one.
    fn at_name(&mut self, what: &str) -> Result<String, SpanError> {
        let name = match self.inline() {
            Some(Tok::Word(w)) => w.to_string(),
            Some(Tok::Str(s)) => s.to_string(),
            _ => return Err(self.expected(what)),
        };
        self.bump()?;
        Ok(name)
    }

    /// Nothing may follow the closing `}` of the file's `graph` or `module`.
    fn end_of_file(&self, what: &str) -> Result<(), SpanError> {
        if self.tok.tok != Tok::Eof {
            let msg = format!("unexpected {} after the end of the {what}", self.tok.tok.describe());
            return Err(err(self.here(), msg));
        }
        Ok(())
    }

    /// Statements up to and including the `}` that closes the brace at `open`.
    fn body(&mut self, g: &mut Graph, open: Span) -> Result<(), SpanError> {
        let mut scope: Option<String> = None;
        loop {
            self.next_statement(open)?;
            match self.tok.tok {
                Tok::Punct('}') => {
                    self.bump()?;
                    return Ok(());
                }
                Tok::Word("scope") => {
                    self.bump()?;
                    scope = match self.inline() {
                        Some(Tok::Str(s)) => Some(s.to_string()),
                        Some(Tok::Word("none")) => None,
                        _ => return Err(self.expected("a quoted module path or `none`")),
                    };
                    self.bump()?;
                }
                Tok::Word("output") => self.output(g)?,
                Tok::Value(_) | Tok::Word(_) => self.node(g, scope.as_deref())?,
                _ => {
                    let msg = format!(
                        "expected a node, `scope`, `output` or `}}`, found {}",
                        self.tok.tok.describe()
                    );
                    return Err(err(self.here(), msg));
                }
            }
        }
    }

    /// Checks that the current token starts a statement of the block opened by the brace at `open`:
    /// it is the first on its line, and the file has not ended before the block's `}`.
    fn next_statement(&self, open: Span) -> Result<(), SpanError> {
        if self.tok.tok == Tok::Eof {
            return Err(err(open, "this `{` is never closed: expected `}` before the end of the file"));
        }
        if !self.tok.line_start {
            let msg = format!("expected the end of the line, found {}", self.tok.tok.describe());
            return Err(err(self.here(), msg));
        }
        Ok(())
    }

    /// `output "<name>" = %N`.
    fn output(&mut self, g: &mut Graph) -> Result<(), SpanError> {
        self.bump()?;
        let Some(Tok::Str(name)) = self.inline() else {
            return Err(self.expected("the output's name in quotes"));
        };
        let name = name.to_string();
        let name_span = self.here();
        self.bump()?;
        self.expect_punct('=', "`=`")?;
        let (v, _) = self.operand(g, "a value")?;
        g.add_output(name, v).map_err(|e| err(name_span, e.to_string()))
    }

    /// A value that must already be defined.
    fn operand(&mut self, g: &Graph, what: &str) -> Result<(ValueId, Span), SpanError> {
        let Some(&Tok::Value(n)) = self.inline() else {
            return Err(self.expected(what));
        };
        let span = self.here();
        self.bump()?;
        let v = ValueId::new(n);
        if !g.contains_value(v) {
            return Err(err(span, format!("value {v} is not defined")));
        }
        Ok((v, span))
    }

    /// The current token as a new result of the node whose earlier results are `earlier`.
    fn result(&mut self, g: &Graph, earlier: &[ValueId]) -> Result<ValueId, SpanError> {
        let Tok::Value(n) = self.tok.tok else {
            return Err(self.expected("a result value"));
        };
        let span = self.here();
        self.bump()?;
        let v = ValueId::new(n);
        if g.contains_value(v) || earlier.contains(&v) {
            return Err(err(span, format!("value {v} is already defined")));
        }
        Ok(v)
    }

    /// A node line: `<results> = <op> <operands> {<attrs>} : <types>`, or `<op> <operands> {<attrs>}`
    /// for an op without results, followed by a body for `fused`.
    fn node(&mut self, g: &mut Graph, scope: Option<&str>) -> Result<(), SpanError> {
        let mut results = Vec::new();
        let mut results_span = (self.tok.start, self.tok.start);
        if let Tok::Value(_) = self.tok.tok {
            loop {
                let v = self.result(g, &results)?;
                results.push(v);
                if !self.inline_is(',') {
                    break;
                }
                self.bump()?;
                if !matches!(self.inline(), Some(Tok::Value(_))) {
                    return Err(self.expected("a result value"));
                }
            }
            results_span.1 = self.prev_end;
            self.expect_punct('=', "`,` or `=`")?;
        }

        let name_tok = if results.is_empty() { Some(&self.tok.tok) } else { self.inline() };
        let Some(&Tok::Word(name)) = name_tok else {
            return Err(self.expected("an op name"));
        };
        let name_span = self.here();
        self.bump()?;

        let mut operands = Vec::new();
        let mut operands_span = name_span;
        if let Some(Tok::Value(_)) = self.inline() {
            operands_span.0 = self.tok.start;
            loop {
                operands.push(self.operand(g, "an operand")?.0);
                if !self.inline_is(',') {
                    break;
                }
                self.bump()?;
            }
            operands_span.1 = self.prev_end;
        }

        let mut attrs = Vec::new();
        let mut attrs_span = None;
        if self.inline_is('{') {
            let start = self.tok.start;
            attrs = self.attrs()?;
            attrs_span = Some((start, self.prev_end));
        }

        let mut types = Vec::new();
        if !results.is_empty() {
            self.expect_punct(':', "`:` and the result types")?;
            loop {
                types.push(self.tensor_type()?);
                if !self.inline_is(',') {
                    break;
                }
                self.bump()?;
            }
        }

        let op = if name == "fused" {
            let kernel =
                fused_name(&attrs).map_err(|m| err(attr_error_span(&m, &attrs, attrs_span, name_span), m))?;
            if !self.inline_is('{') {
                return Err(self.expected("`{` and the body of the fused kernel"));
            }
            if self.depth == MAX_BODY_DEPTH {
                return Err(err(name_span, format!("fused kernels nest more than {MAX_BODY_DEPTH} deep")));
            }
            let open = self.bump()?;
            let mut body = Graph::new(kernel.clone());
            self.depth += 1;
            self.body(&mut body, (open.start, open.end))?;
            self.depth -= 1;
            Op::Fused { name: kernel, body: std::sync::Arc::new(body) }
        } else {
            let parts = attrs.iter().map(|a| (a.key.clone(), a.value.clone())).collect();
            let op = Op::from_parts(name, parts)
                .map_err(|e| err(attr_error_span(&e.0, &attrs, attrs_span, name_span), e.0))?;
            if self.inline_is('{') {
                return Err(err(self.here(), format!("`{name}` has no body; only `fused` does")));
            }
            op
        };

        if types.len() != results.len() {
            let (first, last) = (types[0].1, types[types.len() - 1].1);
            let span = (first.0, last.1);
            let msg = format!("{} but {}", count(results.len(), "result"), count(types.len(), "result type"));
            return Err(err(span, msg));
        }
        let results_or_name = if results.is_empty() { name_span } else { results_span };
        if op.declares_type() {
            if !operands.is_empty() {
                return Err(err(operands_span, format!("`{name}` takes no operands")));
            }
            if results.len() != 1 {
                let msg = format!("`{name}` defines one value, found {}", results.len());
                return Err(err(results_or_name, msg));
            }
        } else {
            let inferred = infer::infer_node(g, &op, &operands).map_err(|e| err(name_span, e.0))?;
            if inferred.len() != results.len() {
                let msg = format!(
                    "`{name}` has {}, found {}",
                    count(inferred.len(), "result"),
                    count(results.len(), "result")
                );
                return Err(err(results_or_name, msg));
            }
            for ((written, span), want) in types.iter().zip(&inferred) {
                if written != want {
                    let msg = format!("result type {written} does not match the inferred {want}");
                    return Err(err(*span, msg));
                }
            }
        }

        let types = types.into_iter().map(|(t, _)| t).collect();
        g.add_node_with_ids(op, &operands, &results, types, scope)
            .map_err(|e: GraphError| err(name_span, e.to_string()))?;
        if self.depth == 0 {
            if let Some(spans) = self.spans.graphs.last_mut() {
                spans.values.extend(results.iter().map(|&v| (v, (results_or_name.0, name_span.1))));
            }
        }
        Ok(())
    }

    /// `{key = value, ...}`; the current token is the `{`.
    fn attrs(&mut self) -> Result<Vec<WrittenAttr>, SpanError> {
        self.bump()?;
        let mut attrs: Vec<WrittenAttr> = Vec::new();
        if self.inline_is('}') {
            self.bump()?;
            return Ok(attrs);
        }
        loop {
            let Some(&Tok::Word(key)) = self.inline() else {
                return Err(self.expected("an attribute name"));
            };
            let start = self.tok.start;
            if attrs.iter().any(|a| a.key == key) {
                return Err(err(self.here(), format!("attribute `{key}` is given twice")));
            }
            self.bump()?;
            self.expect_punct('=', "`=` and the attribute's value")?;
            let value_start = self.tok.start;
            let value = self.attr_value(0)?;
            let (span, value_span) = ((start, self.prev_end), (value_start, self.prev_end));
            attrs.push(WrittenAttr { key: key.to_string(), value, span, value_span });
            if self.inline_is('}') {
                self.bump()?;
                return Ok(attrs);
            }
            self.expect_punct(',', "`,` or `}`")?;
        }
    }

    /// An attribute value inside `depth` enclosing lists.
    fn attr_value(&mut self, depth: usize) -> Result<Attr, SpanError> {
        match self.inline() {
            Some(&Tok::Word(w)) => {
                let span = self.here();
                self.bump()?;
                word_attr(w).map_err(|m| err(span, m))
            }
            Some(Tok::Str(_)) => match self.bump()?.tok {
                Tok::Str(s) => Ok(Attr::Str(s.into_owned())),
                _ => unreachable!("the current token is a string"),
            },
            Some(Tok::Punct('[')) => {
                if depth == MAX_LIST_DEPTH {
                    return Err(err(self.here(), format!("lists nest more than {MAX_LIST_DEPTH} deep")));
                }
                self.bump()?;
                let mut items = Vec::new();
                if self.inline_is(']') {
                    self.bump()?;
                    return Ok(Attr::List(items));
                }
                loop {
                    items.push(self.attr_value(depth + 1)?);
                    if self.inline_is(']') {
                        self.bump()?;
                        return Ok(Attr::List(items));
                    }
                    self.expect_punct(',', "`,` or `]`")?;
                }
            }
            _ => Err(self.expected("an attribute value")),
        }
    }

    /// `bf16[B, T, 7168]`, with its span.
    fn tensor_type(&mut self) -> Result<(TensorType, Span), SpanError> {
        let Some(&Tok::Word(w)) = self.inline() else {
            return Err(self.expected("a type such as `f32[B, T]`"));
        };
        let start = self.tok.start;
        let Some(dtype) = DType::from_name(w) else {
            let names: Vec<&str> = DType::ALL.iter().map(|d| d.name()).collect();
            let msg = format!("unknown element type `{w}`: expected one of {}", names.join(", "));
            return Err(err(self.here(), msg));
        };
        self.bump()?;
        self.expect_punct('[', "`[` and the shape")?;
        let mut shape = Vec::new();
        if !self.inline_is(']') {
            loop {
                let Some(&Tok::Word(d)) = self.inline() else {
                    return Err(self.expected("a dimension"));
                };
                let Some(dim) = Dim::parse(d) else {
                    let msg = format!(
                        "invalid dimension `{d}`: expected a constant, `B`, `T`, `S` or a product such as `8*B*T`"
                    );
                    return Err(err(self.here(), msg));
                };
                shape.push(dim);
                self.bump()?;
                if !self.inline_is(',') {
                    break;
                }
                self.bump()?;
            }
        }
        let close = self.expect_punct(']', "`,` or `]`")?;
        Ok((TensorType { dtype, shape }, (start, close.end)))
    }
}

/// `no results`, `1 result`, `2 result types`.
fn count(n: usize, what: &str) -> String {
    if n == 0 {
        format!("no {what}s")
    } else if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// An attribute value written as a bare word: a bool, a number, or an identifier (which includes
/// dimensions like `8*B*T`; [`Op::from_parts`] decides whether an identifier fits).
fn word_attr(w: &str) -> Result<Attr, String> {
    match w {
        "true" => return Ok(Attr::Bool(true)),
        "false" => return Ok(Attr::Bool(false)),
        _ => {}
    }
    let first = w.as_bytes()[0];
    if !(first.is_ascii_digit() || matches!(first, b'-' | b'+' | b'.')) {
        return Ok(Attr::Ident(w.to_string()));
    }
    // Floats always carry a `.` or an exponent, which is how the printer tells them from integers.
    if w.contains(['.', 'e', 'E']) {
        return w.parse().map(Attr::Float).map_err(|_| format!("invalid number `{w}`"));
    }
    if let Ok(v) = w.parse() {
        return Ok(Attr::Int(v));
    }
    if Dim::parse(w).is_some() {
        return Ok(Attr::Ident(w.to_string()));
    }
    let digits = w.strip_prefix(['-', '+']).unwrap_or(w);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("integer `{w}` is out of range"));
    }
    Err(format!("invalid number `{w}`"))
}

/// `fused` takes exactly one attribute, its kernel name; the messages follow [`Op::from_parts`].
fn fused_name(attrs: &[WrittenAttr]) -> Result<String, String> {
    if let Some(a) = attrs.iter().find(|a| a.key != "name") {
        return Err(format!("`fused` has no attribute `{}`", a.key));
    }
    match attrs.first().map(|a| &a.value) {
        Some(Attr::Str(s)) => Ok(s.clone()),
        Some(other) => Err(format!("attribute `name` of `fused` must be a quoted string, found `{other}`")),
        None => Err("`fused` needs the attribute `name`".to_string()),
    }
}

/// Where an attribute error points. [`crate::op::AttrError`] carries only a message, which names the
/// attribute in backticks: if exactly one written attribute is named, point at it; otherwise at the
/// whole block (several candidates) or the op name (a missing attribute, an unknown op).
fn attr_error_span(msg: &str, attrs: &[WrittenAttr], block: Option<Span>, name: Span) -> Span {
    let mut named = attrs.iter().filter(|a| msg.contains(&format!("`{}`", a.key)));
    match (named.next(), named.next()) {
        (Some(a), None) => a.span,
        (Some(_), Some(_)) => block.unwrap_or(name),
        (None, _) => name,
    }
}
