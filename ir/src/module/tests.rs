//! Tests of modules: one test per invariant of [`verify_module`] with its exact message, the
//! declaration helper, and which states a program reads and writes. Modules are written as text, as
//! a user would write them, except where the parser itself refuses the mistake (a duplicate name).

use super::*;
use crate::text::parse_module;
use crate::types::DType;

/// A valid module: one program that reads and updates a KV cache, reads a parameter and takes two
/// caller inputs.
const BASE: &str = r#"module @m {
  param "w" : f32[4, 8]
  state "cache" : f32[B, S, 8] {role = kv_cache}
  program "decode" {kind = decode} graph @g {
    %0 = input {name = "x"} : f32[B, T, 8]
    %1 = input {name = "positions"} : i32[B, T]
    %2 = input {name = "cache"} : f32[B, S, 8]
    %3 = cache_update %2, %0, %1 : f32[B, S, 8]
    %4 = param {name = "w"} : f32[4, 8]
    %5 = linear %0, %4 : f32[B, T, 4]
    output "y" = %5
    output "cache" = %3
  }
}
"#;

/// `BASE` with `from` replaced by `to` (which must be there), parsed.
fn edited(from: &str, to: &str) -> Module {
    assert!(BASE.contains(from), "`{from}` is not in the base module");
    let src = BASE.replacen(from, to, 1);
    parse_module(&src).unwrap_or_else(|e| panic!("{e}\n{src}"))
}

fn base() -> Module {
    parse_module(BASE).unwrap_or_else(|e| panic!("{e}"))
}

/// The message of the error `verify_module` reports.
fn error(m: &Module) -> String {
    verify_module(m).expect_err("the module must not verify").to_string()
}

#[test]
fn the_base_module_verifies() {
    // `x` and `positions` are caller inputs and `y` a caller output: no state is named like them.
    assert_eq!(verify_module(&base()), Ok(()));
    let example = parse_module(include_str!("../text/testdata/tiny.module.kir")).unwrap();
    assert_eq!(verify_module(&example), Ok(()));
}

#[test]
fn every_program_graph_verifies() {
    let m = edited("    output \"y\" = %5\n    output \"cache\" = %3\n", "");
    assert_eq!(
        error(&m),
        "program `decode` does not verify: graph @g is invalid (1 problem):\n  the graph has no outputs"
    );
}

#[test]
fn program_names_are_not_empty() {
    let m = edited("program \"decode\"", "program \"\"");
    assert_eq!(
        error(&m),
        "the program at index 0 has an empty name: name it after what it computes, such as `decode`"
    );
}

#[test]
fn program_names_are_unique() {
    let mut m = base();
    let mut again = m.programs[0].clone();
    again.kind = ProgramKind::Prefill;
    m.programs.push(again);
    assert_eq!(error(&m), "program `decode` is declared twice: program names must be unique");
}

#[test]
fn param_names_are_unique() {
    let mut m = base();
    m.params.push(m.params[0].clone());
    assert_eq!(error(&m), "parameter `w` is declared twice: parameter names must be unique");
}

#[test]
fn state_names_are_unique() {
    let mut m = base();
    m.states.push(StateDecl { role: StateRole::Counter, ..m.states[0].clone() });
    assert_eq!(error(&m), "state `cache` is declared twice: state names must be unique");
}

#[test]
fn no_name_is_both_a_param_and_a_state() {
    let m = edited("  state", "  state \"w\" : f32[4, 8] {role = trainable}\n  state");
    assert_eq!(
        error(&m),
        "`w` is declared both as a parameter and as a state: a name is one or the other \
         (a weight that a program updates is a `trainable` state)"
    );
}

#[test]
fn declared_params_have_constant_dimensions() {
    let m = edited("  state", "  param \"v\" : f32[B, 8]\n  state");
    assert_eq!(
        error(&m),
        "parameter `v` has type f32[B, 8]: a parameter is bound from a checkpoint, so its dimensions are \
         constants"
    );
}

#[test]
fn states_do_not_depend_on_new_tokens() {
    let m = edited("  state", "  state \"c\" : f32[B, 2*T] {role = counter}\n  state");
    assert_eq!(
        error(&m),
        "state `c` has type f32[B, 2*T], which uses T: a state outlives the new tokens of a run, so its \
         dimensions are constants, B and S"
    );
    // Constants, B and S are fine, in any product.
    let m = edited("  state", "  state \"c\" : f32[2*B*S, 3] {role = counter}\n  state");
    assert_eq!(verify_module(&m), Ok(()));
}

#[test]
fn param_nodes_name_declared_params() {
    let m = edited("  param \"w\" : f32[4, 8]\n", "");
    assert_eq!(
        error(&m),
        "program `decode` reads parameter `w`, which the module does not declare: declare it as \
         `param \"w\" : f32[4, 8]`"
    );
}

#[test]
fn param_nodes_have_the_declared_type() {
    let m = edited("param \"w\" : f32[4, 8]", "param \"w\" : bf16[4, 8]");
    assert_eq!(
        error(&m),
        "program `decode` reads parameter `w` as f32[4, 8], but the module declares it as bf16[4, 8]: a \
         `param` node has exactly its parameter's type"
    );
}

#[test]
fn state_inputs_have_the_state_type() {
    let m = edited("state \"cache\" : f32[B, S, 8]", "state \"cache\" : f32[B, 64, 8]");
    assert_eq!(
        error(&m),
        "program `decode` reads state `cache` as f32[B, S, 8], but the state is f32[B, 64, 8]: an input \
         named like a state has exactly the state's type"
    );
}

#[test]
fn state_outputs_have_the_state_type() {
    // The program writes the state without reading it, from a value of another type.
    let m = edited("output \"cache\" = %3", "output \"cache\" = %5");
    assert_eq!(
        error(&m),
        "program `decode` writes state `cache` as f32[B, T, 4], but the state is f32[B, S, 8]: an output \
         named like a state updates it in place, so it has exactly the state's type"
    );
}

#[test]
fn declare_params_from_programs_declares_what_programs_read() {
    let example = parse_module(include_str!("../text/testdata/tiny.module.kir")).unwrap();
    let mut m = example.clone();
    m.params.clear();
    m.declare_params_from_programs().unwrap();
    // First-seen order over the programs is the order of the example's declarations.
    assert_eq!(m, example);
    m.declare_params_from_programs().unwrap();
    assert_eq!(m, example, "declaring again changes nothing");

    // A declared type that a program contradicts is an error, and the module is left as it was.
    let mut m = base();
    m.params[0].ty = TensorType::known(DType::F32, &[8, 4]);
    m.params.push(ParamDecl { name: "v".into(), ty: TensorType::scalar(DType::F32) });
    let before = m.clone();
    assert_eq!(
        m.declare_params_from_programs().unwrap_err().to_string(),
        "program `decode` reads parameter `w` as f32[4, 8], but the module declares it as f32[8, 4]: a \
         `param` node has exactly its parameter's type"
    );
    assert_eq!(m, before);

    let mut m = edited("  param \"w\" : f32[4, 8]\n", "  state \"w\" : f32[4, 8] {role = trainable}\n");
    assert_eq!(m.declare_params_from_programs(), Err(ModuleError::ParamIsState("w".into())));
}

#[test]
fn reads_and_writes_are_the_states_named_by_inputs_and_outputs() {
    let m = parse_module(include_str!("../text/testdata/tiny.module.kir")).unwrap();
    let names = |states: Vec<&StateDecl>| states.into_iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    let prefill = m.program("prefill").unwrap();
    assert_eq!(names(m.reads(prefill)), ["kv_cache.0", "kv_cache.1", "model.norm.weight"]);
    assert_eq!(names(m.writes(prefill)), ["kv_cache.0", "kv_cache.1"]);
    // Declaration order, not the order of the graph's inputs and outputs.
    let train = m.program("train_step").unwrap();
    assert_eq!(
        names(m.reads(train)),
        ["model.norm.weight.exp_avg", "model.norm.weight.master", "model.norm.weight.grad", "step"]
    );
    assert_eq!(
        names(m.writes(train)),
        ["model.norm.weight", "model.norm.weight.exp_avg", "model.norm.weight.master", "step"]
    );
    assert!(m.program("score").is_none() && m.state("lr").is_none());
}

#[test]
fn role_and_kind_names_round_trip() {
    for r in StateRole::ALL {
        assert_eq!(StateRole::from_name(r.name()), Some(r));
        assert_eq!(r.to_string(), r.name());
    }
    for k in ProgramKind::ALL {
        assert_eq!(ProgramKind::from_name(k.name()), Some(k));
        assert_eq!(k.to_string(), k.name());
    }
    assert_eq!(StateRole::from_name("KvCache"), None);
    assert_eq!(ProgramKind::from_name("train-step"), None);
}
