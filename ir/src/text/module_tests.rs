//! Tests of the module text form: the example module read and printed back exactly, random modules
//! round-tripping, diagnostics for bad module texts at their line and column, and truncated or
//! mangled texts failing cleanly.

use proptest::prelude::*;

use super::tests::{dim_pool, graph_strategy};
use super::{parse_module, print, print_module};
use crate::graph::Graph;
use crate::module::{Module, ParamDecl, Program, ProgramKind, StateDecl, StateRole};
use crate::types::{DType, TensorType};

/// A prefill and a decode program over two KV caches, and a training step; every state role appears.
/// The file is in canonical form: it is exactly what the printer writes.
const TINY: &str = include_str!("testdata/tiny.module.kir");

fn assert_round_trip(m: &Module) {
    let text = print_module(m);
    let back = parse_module(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(back == *m, "round trip changed the module:\n{text}\n{}", print_module(&back));
    assert_eq!(print_module(&back), text);
}

#[test]
fn the_example_module_round_trips() {
    let m = parse_module(TINY).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(print_module(&m), TINY);
    assert_eq!(m.to_string(), TINY);
    assert_round_trip(&m);

    // The parser read every field, not just something that prints the same.
    assert_eq!(m.name, "tiny");
    assert_eq!(m.params.len(), 6);
    assert_eq!(
        m.params[5],
        ParamDecl { name: "lm_head.weight".into(), ty: TensorType::known(DType::F32, &[512, 64]) }
    );
    let roles: Vec<StateRole> = m.states.iter().map(|s| s.role).collect();
    use StateRole::*;
    assert_eq!(
        roles,
        [KvCache, KvCache, Trainable, OptimizerMoment, MasterWeight, GradientAccumulator, Counter]
    );
    assert_eq!(
        m.states[6],
        StateDecl { name: "step".into(), ty: TensorType::scalar(DType::I64), role: Counter }
    );
    let programs: Vec<(&str, ProgramKind)> = m.programs.iter().map(|p| (p.name.as_str(), p.kind)).collect();
    assert_eq!(
        programs,
        [
            ("prefill", ProgramKind::Prefill),
            ("decode", ProgramKind::Decode),
            ("train_step", ProgramKind::TrainStep)
        ]
    );

    // A program's graph is written in the graph grammar, unchanged, one level deeper.
    let decode = &m.program("decode").unwrap().graph;
    let nested: String = print(decode).lines().map(|l| format!("  {l}\n")).collect();
    assert!(TINY.contains(&format!("  program \"decode\" {{kind = decode}} {}", nested.trim_start())));
}

/// Names that need quoting or escapes, and the empty name.
const NAMES: [&str; 6] = ["prefill", "decode", "score \"all\"", "train step \u{2713}", "a\\b\tc", ""];

/// Interprets random numbers as a module over the given graphs: programs with distinct names, params
/// of random types, and states named like the programs' inputs and outputs with their types (so that
/// programs read and write them). Names that repeat within their kind are skipped, since the parser
/// rejects them.
fn random_module(
    name: usize,
    programs: Vec<(usize, usize, Graph)>,
    params: &[(u8, usize, Vec<u8>)],
    states: &[(u16, usize)],
) -> Module {
    let mut m = Module::new(NAMES[name]);
    for (name, kind, graph) in programs {
        if m.program(NAMES[name]).is_none() {
            m.programs.push(Program { name: NAMES[name].into(), kind: ProgramKind::ALL[kind], graph });
        }
    }
    let dims = dim_pool();
    for (n, dtype, shape) in params {
        let name = format!("model.layers.{}.w", n % 4);
        let shape = shape.iter().map(|&d| dims[d as usize % dims.len()]);
        if m.param(&name).is_none() {
            m.params.push(ParamDecl { name, ty: TensorType::new(DType::ALL[*dtype], shape) });
        }
    }
    let named: Vec<(String, TensorType)> = m
        .programs
        .iter()
        .flat_map(|p| {
            let g = &p.graph;
            let ins = g.inputs().into_iter().map(|(n, v)| (n.to_string(), g.ty(v).clone()));
            ins.chain(g.outputs().iter().map(|(n, v)| (n.clone(), g.ty(*v).clone()))).collect::<Vec<_>>()
        })
        .collect();
    for &(pick, role) in states {
        let Some((name, ty)) = named.get(pick as usize % named.len().max(1)) else { break };
        if m.state(name).is_none() {
            m.states.push(StateDecl { name: name.clone(), ty: ty.clone(), role: StateRole::ALL[role] });
        }
    }
    m
}

fn module_strategy() -> impl Strategy<Value = Module> {
    (
        0..NAMES.len(),
        prop::collection::vec((0..NAMES.len(), 0..ProgramKind::ALL.len(), graph_strategy()), 0..4),
        prop::collection::vec((any::<u8>(), 0..DType::ALL.len(), prop::collection::vec(0u8..10, 0..3)), 0..4),
        prop::collection::vec((any::<u16>(), 0..StateRole::ALL.len()), 0..5),
    )
        .prop_map(|(name, programs, params, states)| random_module(name, programs, &params, &states))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    #[test]
    fn random_modules_round_trip(m in module_strategy()) {
        let text = print_module(&m);
        let back = parse_module(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert!(back == m, "round trip changed the module:\n{}\n{}", text, print_module(&back));
        prop_assert_eq!(print_module(&back), text);
    }
}

/// Parses `src` as a module and returns `(line, col, message)` of the error.
fn error_at(src: &str) -> (usize, usize, String) {
    let e = parse_module(src).expect_err("the source must not parse");
    let d = e.diagnostic();
    (d.line, d.col, d.message.clone())
}

#[test]
fn declaration_errors_point_at_the_offending_token() {
    let head = "module @m {\n  param \"w\" : f32[4]\n";
    let at = |line: &str| error_at(&format!("{head}{line}\n}}\n"));
    let roles =
        "kv_cache, trainable, optimizer_moment, master_weight, gradient_accumulator, counter, routing_bias";
    assert_eq!(
        at("  state \"s\" : f32[B, S] {role = cache}"),
        (3, 33, format!("unknown state role `cache`: expected one of {roles}"))
    );
    assert_eq!(
        at("  state \"s\" : f32[B, S]"),
        (3, 24, "expected `{role = ...}` with the state's role, found the end of the line".into())
    );
    assert_eq!(
        at("  state \"s\" : f32[B, S] {role = counter, init = zeros}"),
        (3, 42, "`state` has no attribute `init`".into())
    );
    assert_eq!(at("  state \"s\" : f32[B, S] {}"), (3, 25, "`state` needs the attribute `role`".into()));
    assert_eq!(
        at("  state \"s\" : f32[B, S] {role = \"counter\"}"),
        (
            3,
            33,
            "attribute `role` of `state` must be a bare word such as `kv_cache`, found `\"counter\"`".into()
        )
    );
    assert_eq!(
        at("  state \"s\" : f32[B, S] {role = counter, role = counter}"),
        (3, 42, "attribute `role` is given twice".into())
    );
    assert_eq!(at("  state s : f32[B, S]"), (3, 9, "expected the state's name in quotes, found `s`".into()));
    assert_eq!(
        at("  state \"s\" : f32[B, T] {role = counter}\n  state \"s\" : f32[] {role = counter}"),
        (4, 9, "state `s` is declared twice: state names must be unique".into())
    );
    assert_eq!(
        at("  param \"w\" : f32[8]"),
        (3, 9, "parameter `w` is declared twice: parameter names must be unique".into())
    );
    assert_eq!(
        at("  param \"v\""),
        (3, 12, "expected `:` and the parameter's type, found the end of the line".into())
    );
    assert_eq!(
        at("  param \"v\" : q8[4]"),
        (3, 15, "unknown element type `q8`: expected one of f32, f16, bf16, f8e4m3, i64, i32, bool".into())
    );
    assert_eq!(at("  param w : f32[4]"), (3, 9, "expected the parameter's name in quotes, found `w`".into()));
    assert_eq!(
        at("  param \"v\" : f32[4] {role = kv_cache}"),
        (3, 22, "expected the end of the line, found `{`".into())
    );
    assert_eq!(
        at("  %0 = input {name = \"x\"} : f32[4]"),
        (3, 3, "expected `param`, `state`, `program` or `}`, found `%0`".into())
    );
    assert_eq!(
        at("  params \"v\" : f32[4]"),
        (3, 3, "expected `param`, `state`, `program` or `}`, found `params`".into())
    );
}

#[test]
fn program_errors_point_at_the_offending_token() {
    let head = "module @m {\n  param \"w\" : f32[4]\n";
    let graph = "\n    %0 = input {name = \"x\"} : f32[4]\n    output \"y\" = %0\n  }";
    let at = |line: &str| error_at(&format!("{head}{line}\n}}\n"));
    let kinds = "forward, prefill, decode, score, train_step, accumulate, draft";
    assert_eq!(
        at(&format!("  program \"p\" {{kind = training}} graph @g {{{graph}")),
        (3, 23, format!("unknown program kind `training`: expected one of {kinds}"))
    );
    assert_eq!(
        at("  program \"p\" {kind = decode}"),
        (3, 30, "expected `graph @<name> {` and the program's graph, found the end of the line".into())
    );
    assert_eq!(
        at(&format!("  program \"p\" {{kind = decode}} {{{graph}")),
        (3, 31, "expected `graph @<name> {` and the program's graph, found `{`".into())
    );
    assert_eq!(
        at(&format!("  program \"p\" graph @g {{{graph}")),
        (3, 15, "expected `{kind = ...}` with the program's kind, found `graph`".into())
    );
    assert_eq!(
        at(&format!(
            "  program \"p\" {{kind = decode}} graph @g {{{graph}\n  \
             program \"p\" {{kind = score}} graph @g {{{graph}"
        )),
        (7, 11, "program `p` is declared twice: program names must be unique".into())
    );
    // Errors inside a program's graph are the graph grammar's, at their place in the module.
    assert_eq!(
        at(&format!(
            "  program \"p\" {{kind = decode}} graph @g {{\n    {}\n    %1 = exp %0 : f32[8]\n  }}",
            "%0 = input {name = \"x\"} : f32[4]"
        )),
        (5, 19, "result type f32[8] does not match the inferred f32[4]".into())
    );
    assert_eq!(
        at(&format!("  program \"p\" {{kind = decode}} graph @g {{{graph} junk")),
        (6, 5, "expected the end of the line, found `junk`".into())
    );
    // Braces match by count, not by indentation: the module's `}` closes a graph left open, and the
    // module's own `{` is the one reported.
    assert_eq!(
        at("  program \"p\" {kind = decode} graph @g {\n    %0 = input {name = \"x\"} : f32[4]"),
        (1, 11, "this `{` is never closed: expected `}` before the end of the file".into())
    );
}

#[test]
fn file_level_errors_point_at_the_offending_token() {
    assert_eq!(error_at(""), (1, 1, "expected `module @<name> {`, found the end of the file".into()));
    assert_eq!(error_at("graph @g {\n}\n"), (1, 1, "expected `module @<name> {`, found `graph`".into()));
    assert_eq!(error_at("module m {\n}\n"), (1, 8, "expected `@` and the module's name, found `m`".into()));
    assert_eq!(error_at("module @m\n}\n"), (1, 10, "expected `{`, found the end of the line".into()));
    assert_eq!(
        error_at("module @m {\n  param \"w\" : f32[4]\n"),
        (1, 11, "this `{` is never closed: expected `}` before the end of the file".into())
    );
    assert_eq!(error_at("module @m {\n}\nx\n"), (3, 1, "unexpected `x` after the end of the module".into()));
    assert_eq!(
        error_at("module @m { param \"w\" : f32[4]\n}\n"),
        (1, 13, "expected the end of the line, found `param`".into())
    );
    // The graph parser still reads graphs only.
    assert_eq!(
        super::parse("module @m {\n}\n").unwrap_err().diagnostic().message,
        "expected `graph @<name> {`, found `module`"
    );
}

/// Every prefix of a module's text is an error located inside the prefix, never a panic, up to the
/// closing `}`; from there on it is the module.
#[test]
fn truncated_modules_fail_cleanly() {
    let mut odd = parse_module(TINY).unwrap();
    odd.name = NAMES[3].into();
    odd.states[0].name = NAMES[4].into();
    odd.programs[1].name = NAMES[3].into();
    for text in [TINY.to_string(), print_module(&odd)] {
        let full = parse_module(&text).unwrap();
        let end = text.trim_end().len();
        for i in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
            let prefix = &text[..i];
            match parse_module(prefix) {
                Ok(m) => {
                    assert!(i >= end, "the prefix of {i} bytes parses:\n{prefix}");
                    assert!(m == full);
                }
                Err(e) => {
                    let d = e.diagnostic();
                    assert!(i < end, "the text up to its `}}` fails: {e}");
                    assert!(d.line <= prefix.lines().count().max(1), "{i}: {e}");
                    assert!(d.col <= d.source_line.chars().count() + 1, "{i}: {e}");
                }
            }
        }
    }
}

proptest! {
    /// Mangled module text is an error or a module, never a panic, and whatever parses round-trips.
    #[test]
    fn mangled_modules_parse_or_fail_cleanly(
        edits in prop::collection::vec(
            (any::<prop::sample::Index>(), 0u8..3, prop::sample::select(&[
                '%', '0', '1', 'B', 'T', 'x', '{', '}', '=', ',', ':', '"', ' ', '\n', '@', 'é',
                'p', 'r', 'o', 'g', 'a', 'm', 's', 't', 'e', 'k', 'i', 'n', 'd', 'l',
            ][..])),
            1..6,
        )
    ) {
        let mut text: Vec<char> = TINY.chars().collect();
        for (at, kind, c) in edits {
            let i = at.index(text.len() + 1);
            match kind {
                0 => text.insert(i, c),
                _ if i == text.len() => {}
                1 => {
                    text.remove(i);
                }
                _ => text[i] = c,
            }
        }
        let text: String = text.into_iter().collect();
        if let Ok(m) = parse_module(&text) {
            let printed = print_module(&m);
            let back = parse_module(&printed).map_err(|e| TestCaseError::fail(format!("{e}\n{printed}")))?;
            prop_assert!(back == m, "{}", printed);
        }
    }
}
