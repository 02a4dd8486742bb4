//! The module level of the `.kir` parser: `module @<name> { ... }` with its `param`, `state` and
//! `program` lines, each program's graph read by the graph grammar of the parent module.
//!
//! It checks what the text itself must make unambiguous: every state role and program kind is one
//! kiln knows, and no two programs, parameters or states share a name (names are how a runtime and
//! [`Module::program`] find them). Whether the declarations agree with the programs (types, a name
//! that is both a parameter and a state, undeclared parameters) is left to
//! [`verify_module`](crate::module::verify_module), as graph-wide invariants are left to the graph
//! verifier.

use std::collections::HashSet;

use crate::module::{Module, ParamDecl, Program, ProgramKind, StateDecl, StateRole};
use crate::op::Attr;
use crate::text::lex::Tok;
use crate::text::SpanError;

use super::{err, Parser, Span};

/// The names declared so far, one set per kind of declaration.
#[derive(Default)]
struct Declared {
    params: HashSet<String>,
    states: HashSet<String>,
    programs: HashSet<String>,
}

/// Records `name` in `seen`, or fails at `span` when it is already there.
fn declare(seen: &mut HashSet<String>, name: &str, span: Span, what: &str) -> Result<(), SpanError> {
    if seen.insert(name.to_string()) {
        Ok(())
    } else {
        Err(err(span, format!("{what} `{name}` is declared twice: {what} names must be unique")))
    }
}

impl Parser<'_> {
    /// A whole file holding one module.
    pub(super) fn module(&mut self) -> Result<Module, SpanError> {
        if self.tok.tok != Tok::Word("module") {
            let msg = format!("expected `module @<name> {{`, found {}", self.tok.tok.describe());
            return Err(err(self.here(), msg));
        }
        let start = self.bump()?.start;
        self.expect_punct('@', "`@` and the module's name")?;
        let mut m = Module::new(self.at_name("the module's name")?);
        let open = self.expect_punct('{', "`{`")?;
        let open = (open.start, open.end);
        self.spans.module = (start, open.1);
        let mut declared = Declared::default();
        loop {
            self.next_statement(open)?;
            match self.tok.tok {
                Tok::Punct('}') => {
                    self.bump()?;
                    break;
                }
                Tok::Word("param") => {
                    let (decl, span) = self.param_decl()?;
                    declare(&mut declared.params, &decl.name, span, "parameter")?;
                    self.spans.decls.insert(decl.name.clone(), span);
                    m.params.push(decl);
                }
                Tok::Word("state") => {
                    let (decl, span) = self.state_decl()?;
                    declare(&mut declared.states, &decl.name, span, "state")?;
                    self.spans.decls.insert(decl.name.clone(), span);
                    m.states.push(decl);
                }
                Tok::Word("program") => {
                    let program = self.program(&mut declared.programs)?;
                    m.programs.push(program);
                }
                _ => {
                    let msg = format!(
                        "expected `param`, `state`, `program` or `}}`, found {}",
                        self.tok.tok.describe()
                    );
                    return Err(err(self.here(), msg));
                }
            }
        }
        self.end_of_file("module")?;
        Ok(m)
    }

    /// A name in quotes, with its span.
    fn quoted(&mut self, what: &str) -> Result<(String, Span), SpanError> {
        let Some(Tok::Str(name)) = self.inline() else {
            return Err(self.expected(what));
        };
        let name = name.to_string();
        let span = self.here();
        self.bump()?;
        Ok((name, span))
    }

    /// `param "<name>" : <type>`; the current token is `param`.
    fn param_decl(&mut self) -> Result<(ParamDecl, Span), SpanError> {
        self.bump()?;
        let (name, span) = self.quoted("the parameter's name in quotes")?;
        self.expect_punct(':', "`:` and the parameter's type")?;
        let (ty, _) = self.tensor_type()?;
        Ok((ParamDecl { name, ty }, span))
    }

    /// `state "<name>" : <type> {role = <role>}`; the current token is `state`.
    fn state_decl(&mut self) -> Result<(StateDecl, Span), SpanError> {
        self.bump()?;
        let (name, span) = self.quoted("the state's name in quotes")?;
        self.expect_punct(':', "`:` and the state's type")?;
        let (ty, _) = self.tensor_type()?;
        let (word, word_span) = self.word_attr("state", "role", "kv_cache")?;
        let Some(role) = StateRole::from_name(&word) else {
            let names: Vec<&str> = StateRole::ALL.iter().map(|r| r.name()).collect();
            let msg = format!("unknown state role `{word}`: expected one of {}", names.join(", "));
            return Err(err(word_span, msg));
        };
        Ok((StateDecl { name, ty, role }, span))
    }

    /// `program "<name>" {kind = <kind>} graph @<name> {`, the graph's statements and its `}`; the
    /// current token is `program`. The name goes into `programs` before the graph is read, so that a
    /// duplicate is reported at its name rather than after its whole graph.
    fn program(&mut self, programs: &mut HashSet<String>) -> Result<Program, SpanError> {
        self.bump()?;
        let (name, span) = self.quoted("the program's name in quotes")?;
        declare(programs, &name, span, "program")?;
        let (word, word_span) = self.word_attr("program", "kind", "decode")?;
        let Some(kind) = ProgramKind::from_name(&word) else {
            let names: Vec<&str> = ProgramKind::ALL.iter().map(|k| k.name()).collect();
            let msg = format!("unknown program kind `{word}`: expected one of {}", names.join(", "));
            return Err(err(word_span, msg));
        };
        if self.inline() != Some(&Tok::Word("graph")) {
            return Err(self.expected("`graph @<name> {` and the program's graph"));
        }
        let graph = self.graph_def()?;
        Ok(Program { name, kind, graph })
    }

    /// The attribute block `{<key> = <word>}` that a `state` or `program` line must end with: the
    /// word and its span. It reads the block as any attribute block, so duplicate keys and malformed
    /// values get the same messages as on a node.
    fn word_attr(&mut self, item: &str, key: &str, example: &str) -> Result<(String, Span), SpanError> {
        if !self.inline_is('{') {
            return Err(self.expected(&format!("`{{{key} = ...}}` with the {item}'s {key}")));
        }
        let start = self.tok.start;
        let attrs = self.attrs()?;
        if let Some(a) = attrs.iter().find(|a| a.key != key) {
            return Err(err(a.span, format!("`{item}` has no attribute `{}`", a.key)));
        }
        match attrs.first() {
            None => Err(err((start, self.prev_end), format!("`{item}` needs the attribute `{key}`"))),
            Some(a) => match &a.value {
                Attr::Ident(word) => Ok((word.clone(), a.value_span)),
                other => {
                    let msg = format!(
                        "attribute `{key}` of `{item}` must be a bare word such as `{example}`, \
                         found `{other}`"
                    );
                    Err(err(a.value_span, msg))
                }
            },
        }
    }
}
