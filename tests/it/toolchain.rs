//! The code-generation toolchain works end to end on this machine: MLIR parses and verifies a module
//! in every dialect codegen uses, LLVM emits PTX for sm_90a, and ptxas (installed by
//! `scripts/setup.sh`) assembles it.

use kiln_compiler::toolchain;

#[test]
fn mlir_loads_the_dialects_codegen_needs() {
    let dialects = toolchain::probe_mlir().expect("MLIR probe");
    // func, arith, scf, memref, math, linalg, gpu and their dependencies at least.
    assert!(dialects >= 7, "only {dialects} dialects loaded");
}

#[test]
fn llvm_emits_ptx_that_ptxas_accepts() {
    let ptx = toolchain::probe_nvptx().expect("NVPTX probe");
    assert!(ptx.contains(".target sm_90a"), "{ptx}");
    assert!(ptx.contains(".entry kiln_probe"), "{ptx}");
    let ptxas = toolchain::find_ptxas()
        .expect("ptxas is missing: run scripts/setup.sh, which installs it into tools/local/bin");
    let report = toolchain::ptxas_check(&ptxas, &ptx, "sm_90a").expect("ptxas accepts the PTX");
    assert!(report.contains("Compiling entry function 'kiln_probe' for 'sm_90a'"), "{report}");
    assert!(report.contains("registers"), "{report}");
    // And it rejects broken PTX with its own error.
    let broken = ptx.replacen("ret;", "frobnicate.u32 %r1;\n\tret;", 1);
    assert_ne!(broken, ptx);
    let err = toolchain::ptxas_check(&ptxas, &broken, "sm_90a").unwrap_err();
    assert!(err.to_string().contains("frobnicate"), "{err}");
}

#[test]
fn host_target_machine_is_available() {
    let (triple, cpu) = toolchain::probe_host().expect("host target");
    assert!(triple.starts_with("x86_64") || triple.starts_with("aarch64"), "{triple}");
    assert!(!cpu.is_empty());
}
