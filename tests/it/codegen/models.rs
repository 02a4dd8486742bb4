//! Every kernel of the real models lowers for both targets. `models/tiny.toml`: each kernel runs on
//! the CPU against the interpreter on random inputs and its PTX passes `ptxas` without spills.
//! DeepSeek-V3: all of its distinct kernels lower for both targets, the CPU module verifies and
//! compiles to an object, the PTX of all of them passes `ptxas` (its register and spill report is
//! printed for the attention, router, experts and linear kernels), and the kernels whose operands
//! are small at `B = 1, T = 2` run on the CPU against the interpreter (the others hold gigabytes of
//! weights).

use kiln_compiler::codegen::{cpu, form_kernels, lower_kernel, verify_mlir, Kernel, LoweredModule, Target};
use kiln_ir::types::SymBindings;
use kiln_ir::Op;

use super::harness::{numel, CpuLib, Rng, BIND};
use super::oracle::{check, random_inputs};
use super::{model_graph, ptxas_accepts};

/// The kernels of a model, each lowered for `target`; panics with the kernel's name if one fails.
fn lowered(kernels: &[Kernel], target: Target) -> LoweredModule {
    let lowered = kernels
        .iter()
        .map(|k| lower_kernel(k, target).unwrap_or_else(|e| panic!("{}: {e}", k.name)))
        .collect();
    LoweredModule { target, kernels: lowered }
}

#[test]
fn every_tiny_kernel_runs_on_the_cpu_like_the_interpreter() {
    let kernels = form_kernels(&model_graph("tiny")).unwrap().kernels;
    let refs: Vec<&Kernel> = kernels.iter().collect();
    let lib = CpuLib::build(&refs);
    let mut rng = Rng::new(31);
    let mut report = Vec::new();
    for k in &kernels {
        let args = random_inputs(k, &mut rng, (-2.0, 2.0), &BIND);
        let worst = check(&lib, k, &args, &BIND);
        report.push(format!("{:<34} max error {:?}", k.name, worst));
    }
    println!("tiny: {} kernels checked against the interpreter\n{}", kernels.len(), report.join("\n"));
}

#[test]
fn every_tiny_kernel_passes_ptxas_without_spills() {
    let kernels = form_kernels(&model_graph("tiny")).unwrap().kernels;
    let module = lowered(&kernels, Target::Gpu);
    let report = ptxas_accepts(&module);
    assert_eq!(report.matches("Compiling entry function").count(), kernels.len(), "{report}");
    let spills = report
        .lines()
        .filter(|l| l.contains("spill") && !l.contains(" 0 bytes spill stores, 0 bytes spill loads"));
    assert_eq!(spills.count(), 0, "{report}");
}

/// The ptxas report lines of one kernel (from `Compiling entry function` to the next).
fn ptxas_lines<'r>(report: &'r str, name: &str) -> Vec<&'r str> {
    let mut lines = report.lines().skip_while(|l| !l.contains(&format!("'{name}'")));
    let mut out: Vec<&str> = lines.next().into_iter().collect();
    out.extend(lines.take_while(|l| !l.contains("Compiling entry function")));
    out
}

#[test]
fn every_deepseek_v3_kernel_lowers_for_both_targets_and_passes_ptxas() {
    let kernels = form_kernels(&model_graph("deepseek_v3")).unwrap().kernels;
    assert_eq!(kernels.len(), 35);
    let cpu = lowered(&kernels, Target::Cpu);
    verify_mlir(&cpu.text()).unwrap_or_else(|e| panic!("{e}"));
    // The whole CPU module compiles to an object, the 771-buffer `moe_experts` included.
    let object = cpu::object(&cpu).unwrap_or_else(|e| panic!("{e}"));
    assert!(!object.is_empty());
    let gpu = lowered(&kernels, Target::Gpu);
    let report = ptxas_accepts(&gpu);
    assert_eq!(report.matches("Compiling entry function").count(), kernels.len(), "{report}");
    let mut shown = Vec::new();
    for k in &kernels {
        if matches!(
            k.single_op(),
            Some(Op::Attention { .. } | Op::MoeRoute(_) | Op::MoeExperts { .. } | Op::Linear)
        ) {
            shown.push(format!("{} {}\n  {}", k.name, k.args[0], ptxas_lines(&report, &k.name).join("\n  ")));
        }
    }
    println!("ptxas -v, DeepSeek-V3:\n{}", shown.join("\n"));
}

#[test]
fn small_deepseek_v3_kernels_run_on_the_cpu_like_the_interpreter() {
    // B = 1, T = 2: the kernels whose operands stay small (no embedding table, expert or
    // projection weights).
    let bind = SymBindings { b: 1, t: 2, s: 2 };
    let small: Vec<Kernel> = form_kernels(&model_graph("deepseek_v3"))
        .unwrap()
        .kernels
        .into_iter()
        .filter(|k| k.args.iter().all(|t| numel(t, &bind) <= 1 << 20))
        .filter(|k| !matches!(k.single_op(), Some(Op::Linear | Op::RmsNorm { .. })))
        .collect();
    let ops: Vec<&str> = small.iter().filter_map(Kernel::single_op).map(Op::name).collect();
    for needed in ["rope", "attention", "moe_route", "split", "concat", "broadcast"] {
        assert!(ops.contains(&needed), "{needed} missing from {ops:?}");
    }
    let lib = CpuLib::build(&small.iter().collect::<Vec<_>>());
    let mut rng = Rng::new(37);
    for k in &small {
        let args = random_inputs(k, &mut rng, (-2.0, 2.0), &bind);
        let worst = check(&lib, k, &args, &bind);
        println!("{:<34} max error {worst:?}", k.name);
    }
}
