//! `fused` kernels, file-driven: each `tests/codegen/fused/*.kir` holds a graph with one `fused` node
//! and headers saying how it must be computed and how close to the interpreter it must come:
//!
//! ```text
//! // fusion: rms_norm + elementwise       the plan (`codegen::fusion`), as `Plan` displays it
//! // range: -2 2                          floats of the inputs, uniform (rounded to their dtype)
//! // ints: 0 1000                         integer inputs, uniform (positions)
//! // tolerance: 0.0078125 0.01            |got - want| <= tol * max(|want|, floor); absent: bit for bit
//! // offsets: 2                           argument 2 is a `grouped_linear`'s offsets: sorted, from 0
//!                                         to the rows of argument 0
//! ```
//!
//! f8e4m3 arguments get random codes (never NaN).
//!
//! Every kernel runs on the CPU against the interpreter (which runs the fused body op by op), with
//! its scratch buffers filled with garbage first; the PTX of all of them passes `ptxas` (registers
//! printed). Then MLIR snapshots of a fused elementwise chain and of add + RMS norm, and PTX
//! snapshots of the tiny model's RMS norm, linear, router and attention kernels. Last, a phased
//! kernel packed by `kiln compile`'s pipeline (its scratch gets arena buffers of its own), and the
//! typed error of a kernel that lacks the scratch its plan needs.

use std::path::{Path, PathBuf};

use kiln_compiler::codegen::{form_kernels, fusion_plan, gpu, lower_module, Kernel, Step, Target};
use kiln_compiler::pack::{self, parse_report};
use kiln_ir::artifact::{ArgRole, BufferKind, Storage};
use kiln_ir::{DType, Op};

use super::harness::{interpret, numel, to_bf16, values, Buf, CpuLib, Rng, BIND};
use super::{mlir_of, model_graph, ptxas_accepts};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/codegen/fused")
}

fn header<'a>(src: &'a str, key: &str) -> Option<&'a str> {
    src.lines().filter_map(|l| l.strip_prefix("// ")).find_map(|l| l.strip_prefix(key)?.strip_prefix(": "))
}

fn pair(text: &str) -> (f64, f64) {
    let v: Vec<f64> = text.split_whitespace().map(|x| x.parse().unwrap()).collect();
    (v[0], v[1])
}

/// One test file: its fused kernel and headers.
struct Case {
    file: String,
    kernel: Kernel,
    fusion: String,
    range: (f64, f64),
    ints: (f64, f64),
    tolerance: Option<(f64, f64)>,
    /// The argument holding `grouped_linear` offsets, if any.
    offsets: Option<usize>,
}

fn cases() -> Vec<Case> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "kir"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "{files:?}");
    files
        .into_iter()
        .map(|path| {
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            let src = std::fs::read_to_string(&path).unwrap();
            let g = kiln_ir::parse(&src).unwrap_or_else(|e| panic!("{file}: {e}"));
            let plan = form_kernels(&g).unwrap();
            let mut fused: Vec<Kernel> = plan
                .steps
                .iter()
                .filter_map(|s| match s {
                    Step::Launch { kernel, node, .. } if matches!(g.node(*node).op, Op::Fused { .. }) => {
                        Some(plan.kernel(*kernel).clone())
                    }
                    _ => None,
                })
                .collect();
            assert_eq!(fused.len(), 1, "{file}: one fused kernel");
            let get = |key| header(&src, key).unwrap_or_else(|| panic!("{file}: no `// {key}:` header"));
            Case {
                fusion: get("fusion").to_string(),
                range: pair(get("range")),
                ints: header(&src, "ints").map_or((0.0, 100.0), pair),
                tolerance: header(&src, "tolerance").map(pair),
                offsets: header(&src, "offsets").map(|v| v.trim().parse().unwrap()),
                kernel: fused.remove(0),
                file,
            }
        })
        .collect()
}

/// Random arguments of the kernel's types.
fn inputs(c: &Case, rng: &mut Rng) -> Vec<Buf> {
    let (lo, hi) = (c.range.0 as f32, c.range.1 as f32);
    let last = c.kernel.args[0].shape.last().and_then(|d| d.eval(&BIND)).map_or(1, |d| d as usize);
    let rows = numel(&c.kernel.args[0], &BIND) / last.max(1);
    c.kernel
        .args
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let n = numel(t, &BIND);
            if c.offsets == Some(i) {
                // 0, sorted cut points, the row count.
                let mut cuts: Vec<i32> =
                    (1..n - 1).map(|_| rng.uniform(0.0, rows as f32 + 1.0) as i32).collect();
                cuts.sort();
                return Buf::I32([0].into_iter().chain(cuts).chain([rows as i32]).collect());
            }
            let ints = |rng: &mut Rng| -> Vec<i64> {
                (0..n).map(|_| rng.uniform(c.ints.0 as f32, c.ints.1 as f32) as i64).collect()
            };
            match t.dtype {
                DType::F32 => Buf::F32(rng.vec(n, lo, hi)),
                DType::BF16 => Buf::Bf16(rng.vec(n, lo, hi).into_iter().map(to_bf16).collect()),
                DType::I32 => Buf::I32(ints(rng).into_iter().map(|x| x as i32).collect()),
                DType::I64 => Buf::I64(ints(rng)),
                // Any code but the two NaNs (0x7F, 0xFF).
                DType::F8E4M3 => Buf::F8(
                    (0..n)
                        .map(|_| rng.uniform(0.0, 255.0) as u8)
                        .map(|b| if b & 0x7F == 0x7F { b ^ 1 } else { b })
                        .collect(),
                ),
                d => panic!("{}: no random {d} arguments", c.file),
            }
        })
        .collect()
}

/// A buffer of `t` full of garbage: NaN for floats, so a kernel that reads scratch before writing it
/// shows.
fn garbage(t: &kiln_ir::TensorType) -> Buf {
    let n = numel(t, &BIND);
    match t.dtype {
        DType::F32 => Buf::F32(vec![f32::NAN; n]),
        DType::BF16 => Buf::Bf16(vec![0x7FC1; n]),
        DType::I32 => Buf::I32(vec![-12345; n]),
        DType::I64 => Buf::I64(vec![-12345; n]),
        DType::Bool => Buf::Bool(vec![7; n]),
        DType::F8E4M3 => Buf::F8(vec![0x7F; n]),
        d => panic!("no {d} buffers"),
    }
}

#[test]
fn fused_kernels_match_the_interpreter() {
    let cases = cases();
    for c in &cases {
        assert_eq!(fusion_plan(&c.kernel.body).unwrap().to_string(), c.fusion, "{}", c.file);
        let one_pass = !c.fusion.starts_with("phases");
        assert_eq!(c.kernel.scratch.is_empty(), one_pass, "{}", c.file);
    }
    let lib = CpuLib::build(&cases.iter().map(|c| &c.kernel).collect::<Vec<_>>());
    let mut report = Vec::new();
    for c in &cases {
        let k = &c.kernel;
        // Each case's inputs from a seed of its own name, so that adding a case changes no other's.
        let seed = c.file.bytes().fold(53u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        let mut rng = Rng::new(seed);
        for _ in 0..2 {
            let args = inputs(c, &mut rng);
            let want = interpret(k, &args, &BIND);
            let mut bufs = args.clone();
            bufs.extend(k.results.iter().map(garbage));
            bufs.extend(k.scratch.iter().map(garbage));
            lib.run(k, &mut bufs, &BIND);
            let mut worst = Vec::new();
            for (i, want) in want.iter().enumerate() {
                let got = values(&bufs[k.args.len() + i]);
                let mut max_err = 0.0f64;
                for (j, (&g, &w)) in got.iter().zip(want).enumerate() {
                    if g == w || (g.is_nan() && w.is_nan()) {
                        continue;
                    }
                    let Some((tol, floor)) = c.tolerance else {
                        panic!("{}: result {i} element {j}: got {g:e}, want {w:e}, bit for bit", c.file);
                    };
                    let err = (g - w).abs() / w.abs().max(floor);
                    assert!(
                        err <= tol,
                        "{}: result {i} element {j}: got {g}, want {w} (error {err:e})",
                        c.file
                    );
                    max_err = max_err.max(err);
                }
                worst.push(max_err);
            }
            report.push(format!("{:<26} {:<50} max error {worst:?}", c.file, c.fusion));
        }
    }
    println!("{}", report.join("\n"));
}

/// The test files' bodies at DeepSeek-V3's sizes (7168 model dimension, 18432 dense intermediate),
/// for ptxas only: their weights are too big for the interpreter.
const V3_SIZED: &str = r#"graph @v3 {
  %0 = input {name = "x"} : bf16[B, T, 7168]
  %1 = input {name = "r"} : bf16[B, T, 7168]
  %2 = input {name = "w"} : bf16[7168]
  %3 = input {name = "gate"} : bf16[18432, 7168]
  %4 = input {name = "up"} : bf16[18432, 7168]
  %5 = input {name = "down"} : bf16[7168, 18432]
  %6, %7 = fused %0, %1, %2 {name = "add_rms_norm"} : bf16[B, T, 7168], bf16[B, T, 7168] {
    %0 = input {name = "x"} : bf16[B, T, 7168]
    %1 = input {name = "r"} : bf16[B, T, 7168]
    %2 = input {name = "w"} : bf16[7168]
    %3 = add %0, %1 : bf16[B, T, 7168]
    %4 = rms_norm %3, %2 {eps = 1e-6} : bf16[B, T, 7168]
    output "h" = %3
    output "y" = %4
  }
  %8 = fused %7, %3, %4 {name = "gate_up_swiglu"} : bf16[B, T, 18432] {
    %0 = input {name = "x"} : bf16[B, T, 7168]
    %1 = input {name = "gate"} : bf16[18432, 7168]
    %2 = input {name = "up"} : bf16[18432, 7168]
    %3 = linear %0, %1 : bf16[B, T, 18432]
    %4 = linear %0, %2 : bf16[B, T, 18432]
    %5 = silu %3 : bf16[B, T, 18432]
    %6 = mul %5, %4 : bf16[B, T, 18432]
    output "h" = %6
  }
  %9 = fused %8, %5, %6 {name = "down_residual"} : bf16[B, T, 7168] {
    %0 = input {name = "h"} : bf16[B, T, 18432]
    %1 = input {name = "down"} : bf16[7168, 18432]
    %2 = input {name = "r"} : bf16[B, T, 7168]
    %3 = linear %0, %1 : bf16[B, T, 7168]
    %4 = add %3, %2 : bf16[B, T, 7168]
    output "y" = %4
  }
  output "y" = %9
}"#;

#[test]
fn fused_kernels_pass_ptxas() {
    let cases = cases();
    let v3 = form_kernels(&kiln_ir::parse(V3_SIZED).unwrap()).unwrap().kernels;
    let mut all: Vec<(String, &Kernel)> = cases.iter().map(|c| (c.file.clone(), &c.kernel)).collect();
    all.extend(v3.iter().map(|k| (format!("v3: {}", k.name), k)));
    let module = lower_module(all.iter().map(|(_, k)| *k), Target::Gpu).unwrap_or_else(|e| panic!("{e}"));
    let report = ptxas_accepts(&module);
    let stats = parse_report(&report);
    let mut lines = Vec::new();
    for (name, k) in &all {
        let s = stats[&k.name];
        assert_eq!((s.spill_store_bytes, s.spill_load_bytes), (0, 0), "{name}: spills\n{report}");
        let plan = fusion_plan(&k.body).unwrap().to_string();
        lines.push(format!(
            "{name:<36} {plan:<50} {:>3} registers, {:>5} bytes smem",
            s.registers, s.shared_bytes
        ));
    }
    println!("ptxas -v, fused kernels:\n{}", lines.join("\n"));
}

fn case(name: &str) -> Kernel {
    cases().into_iter().find(|c| c.file == name).unwrap_or_else(|| panic!("no {name}")).kernel
}

/// Runs `f` with snapshots kept with the other codegen snapshots, in `tests/it/snapshots`.
fn in_snapshots(f: impl FnOnce()) {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path("../snapshots");
    settings.bind(f);
}

/// FP8 linears and routed experts in scale blocks of 128 columns take AMX's tiles exactly where
/// the host has them (and AVX512_BF16 and byte permutes, which every AMX host has), the codes
/// decoded to bf16. Elsewhere, and for blocks of 16 columns, the FP8 dot-product blocks.
#[test]
fn fp8_gemms_take_amx_tiles_where_the_host_has_them() {
    let host = kiln_compiler::codegen::cpu::host_features();
    for (file, amx) in [
        ("fp8_linear_amx.kir", host.amx),
        ("fp8_swiglu_amx_chunks.kir", host.amx),
        ("fp8_grouped_amx.kir", host.amx),
        ("fp8_grouped_swiglu_amx.kir", host.amx),
        ("fp8_linear_swiglu.kir", false),
        ("fp8_grouped_swiglu.kir", false),
    ] {
        let mlir = mlir_of(&case(file), Target::Cpu);
        assert_eq!(mlir.contains("llvm.x86.tdpbf16ps"), amx, "{file}: AMX tiles");
    }
}

/// The dot-product blocks of CPU GEMMs ask for each FP8 or bf16 weight row's bytes 4 KiB ahead of
/// their loads (`PREFETCH_BYTES` in lower/matmul.rs: 4096 FP8 codes, 2048 bf16 values), on every
/// host: the FP8 and bf16 blocks of AVX512_BF16 hosts, and the widening and FP8-decoding loops of
/// the others (on an AVX2 EPYC, a decode step's FP8 GEMVs read 12.5 GB/s of 32 without them and
/// 21 with them). f32 GEMMs and GPU kernels never prefetch.
#[test]
fn dot_product_blocks_prefetch_weight_rows_a_page_ahead() {
    for (file, ahead) in [
        ("fp8_linear_amx.kir", Some(4096)),
        ("fp8_grouped_amx.kir", Some(4096)),
        ("linear_residual_bf16.kir", Some(2048)),
        ("grouped_swiglu_bf16.kir", Some(2048)),
        ("linear_residual.kir", None),
    ] {
        let kernel = case(file);
        let cpu = mlir_of(&kernel, Target::Cpu);
        let prefetches: Vec<&str> = cpu.lines().filter(|l| l.contains("memref.prefetch")).collect();
        assert_eq!(!prefetches.is_empty(), ahead.is_some(), "{file}: prefetches on the CPU");
        if let Some(ahead) = ahead {
            let constant = format!("arith.constant {ahead} : index");
            assert!(cpu.contains(&constant), "{file}: no {constant}");
            assert!(prefetches.iter().all(|l| l.contains("read, locality<3>, data")), "{prefetches:?}");
        }
        assert!(!mlir_of(&kernel, Target::Gpu).contains("memref.prefetch"), "{file}: a prefetch on the GPU");
    }
}

/// An elementwise chain whose values all have the kernel's elements (or one) computes 16 elements
/// at a time on the CPU; one that reads a value at broadcast indices (a row's gain) stays one
/// element at a time, as on the GPU. Both agree with the interpreter bit for bit
/// (`fused_kernels_match_the_interpreter`).
#[test]
fn elementwise_chains_of_whole_values_take_vectors_of_16() {
    for (file, vector) in [("chain_update_vector.kir", true), ("chain_bf16.kir", false)] {
        let kernel = case(file);
        let cpu = mlir_of(&kernel, Target::Cpu);
        assert_eq!(cpu.contains("vector<16xf32>"), vector, "{file}: on the CPU");
        if vector {
            assert!(cpu.contains("math.sqrt %") && cpu.contains(" : vector<16xf32>\n"), "{file}: {cpu}");
        }
        assert!(!mlir_of(&kernel, Target::Gpu).contains("vector<16xf32>"), "{file}: vectors on the GPU");
    }
}

#[test]
fn fused_mlir_snapshots() {
    let chain = case("chain_bf16.kir");
    let norm = case("add_rms_norm_bf16.kir");
    in_snapshots(|| {
        insta::assert_snapshot!("fused_chain_bf16_cpu", mlir_of(&chain, Target::Cpu));
        insta::assert_snapshot!("fused_chain_bf16_gpu", mlir_of(&chain, Target::Gpu));
        insta::assert_snapshot!("fused_add_rms_norm_cpu", mlir_of(&norm, Target::Cpu));
        insta::assert_snapshot!("fused_add_rms_norm_gpu", mlir_of(&norm, Target::Gpu));
    });
}

/// PTX without its header comments (the generator's name and version), which say nothing about
/// the kernel.
fn stable_ptx(k: &Kernel) -> String {
    let module = lower_module([k], Target::Gpu).unwrap_or_else(|e| panic!("{e}"));
    let ptx = gpu::ptx(&module).unwrap_or_else(|e| panic!("{e}"));
    ptx.lines().skip_while(|l| l.starts_with("//") || l.trim().is_empty()).collect::<Vec<_>>().join("\n")
}

#[test]
fn ptx_snapshots_of_the_tiny_model() {
    let kernels = form_kernels(&model_graph("tiny")).unwrap().kernels;
    let find = |name: &str| kernels.iter().find(|k| k.single_op().map(Op::name) == Some(name)).unwrap();
    in_snapshots(|| {
        for op in ["rms_norm", "linear", "moe_route", "attention"] {
            let ptx = stable_ptx(find(op));
            assert!(ptx.starts_with(".version"), "{ptx}");
            insta::assert_snapshot!(format!("ptx_tiny_{op}"), ptx);
        }
    });
}

#[test]
fn a_phased_kernel_gets_arena_scratch_when_packed() {
    let src = std::fs::read_to_string(root().join("add_rms_norm_quant.kir")).unwrap();
    let graph = kiln_ir::parse(&src).unwrap();
    let options =
        pack::Options { kv_cache: false, score: false, ..pack::Options::new(pack::Targets::Cpu, 2, 8) };
    let artifact =
        pack::compile(pack::Source::Graph { graph: Box::new(graph), spec: None }, &options, &mut ())
            .unwrap_or_else(|e| panic!("{e}"));
    let m = &artifact.manifest;
    let p = &m.programs[0];
    let k = m.kernels.iter().find(|k| k.name.starts_with("k_fused_")).unwrap();
    let roles: Vec<ArgRole> = k.args.iter().map(|a| a.role).collect();
    use ArgRole::{Input, Output, Scratch};
    assert_eq!(roles, [Input, Input, Input, Output, Output, Output, Scratch]);
    // Two phases, each split over the threads: the norm by rows, the quantisation by its tiles (two
    // per row of 64).
    let cpu = k.cpu.as_ref().unwrap();
    assert_eq!(cpu.phases.iter().map(|d| d.to_string()).collect::<Vec<_>>(), ["B*T", "2*B*T"]);
    assert_eq!(cpu.work, kiln_ir::Dim::known(0));
    let kiln_ir::artifact::Step::Launch { buffers, .. } = &p.steps[0] else { panic!("{:?}", p.steps) };
    let scratch = p.buffer(buffers[6]);
    assert_eq!((scratch.kind, scratch.value.as_str()), (BufferKind::Scratch, "%3#s0"));
    assert_eq!(scratch.shape, k.args[6].shape);
    // It lives for its launch only, like a result, so it shares no byte with the launch's buffers.
    let Storage::Arena { offset } = scratch.storage else { panic!("{scratch:?}") };
    for &b in &buffers[..6] {
        let other = p.buffer(b);
        if let Storage::Arena { offset: o } = other.storage {
            assert!(
                o + other.max_bytes <= offset || offset + scratch.max_bytes <= o,
                "{b} overlaps the scratch"
            );
        }
    }
    m.validate().unwrap();
    // A scratch argument bound to a graph value, or the reverse, does not hold together.
    let mut bad = m.clone();
    bad.programs[0].buffers[buffers[6].index()].kind = BufferKind::Activation;
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("of kind activation, for an argument of role scratch"), "{e}");
}

#[test]
fn a_kernel_without_the_scratch_its_plan_needs_is_malformed() {
    let mut k = case("quant_linear.kir");
    assert_eq!(k.scratch.len(), 3);
    k.scratch.pop();
    match kiln_compiler::codegen::lower_kernel(&k, Target::Cpu) {
        Err(kiln_compiler::codegen::LowerError::Malformed { message, .. }) => {
            assert_eq!(message, "it declares 2 scratch buffer(s) but its body needs 3")
        }
        other => panic!("expected Malformed, got {other:?}"),
    }
}

/// The vector loads of an FP8 grouped GEMM decode every E4M3 code as the interpreter does, bit for
/// bit: a 16 x 16 weight holding the 256 codes (scale 1) times the identity gives each code back.
/// Two experts hold it (rows 0-11 and 12-15), so with the harness's three work ranges both the
/// 4-row register block and the one-row loop run. A weight row holding a NaN code gives NaN in
/// every output of its column.
#[test]
fn fp8_grouped_gemm_vector_loads_decode_every_code() {
    let src = r#"graph @every_code {
  %0 = input {name = "x"} : f32[16, 16]
  %1 = input {name = "offsets"} : i32[3]
  %2 = input {name = "w0"} : f8e4m3[16, 16]
  %3 = input {name = "s0"} : f32[1, 1]
  %4 = input {name = "w1"} : f8e4m3[16, 16]
  %5 = input {name = "s1"} : f32[1, 1]
  %6 = fused %0, %1, %2, %3, %4, %5 {name = "fp8-gemm"} : f32[16, 16] {
    %0 = input {name = "x"} : f32[16, 16]
    %1 = input {name = "offsets"} : i32[3]
    %2 = input {name = "w0"} : f8e4m3[16, 16]
    %3 = input {name = "s0"} : f32[1, 1]
    %4 = input {name = "w1"} : f8e4m3[16, 16]
    %5 = input {name = "s1"} : f32[1, 1]
    %6 = dequantize %2, %3 {to = f32, block = [16, 16]} : f32[16, 16]
    %7 = dequantize %4, %5 {to = f32, block = [16, 16]} : f32[16, 16]
    %8 = grouped_linear %0, %1, %6, %7 {num_experts = 2} : f32[16, 16]
    output "y" = %8
  }
  output "y" = %6
}"#;
    let g = kiln_ir::parse(src).unwrap();
    let plan = form_kernels(&g).unwrap();
    let kernel = plan
        .steps
        .iter()
        .find_map(|s| match s {
            Step::Launch { kernel, node, .. } if matches!(g.node(*node).op, Op::Fused { .. }) => {
                Some(plan.kernel(*kernel).clone())
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(fusion_plan(&kernel.body).unwrap().to_string(), "fp8 grouped_linear");
    let lib = CpuLib::build(&[&kernel]);
    let identity: Vec<f32> = (0..256).map(|i| if i / 16 == i % 16 { 1.0 } else { 0.0 }).collect();
    let codes: Vec<u8> = (0..=255).collect();
    // Rows 0-11 to expert 0, 12-15 to expert 1; both hold the same codes.
    let mut bufs = vec![
        Buf::F32(identity),
        Buf::I32(vec![0, 12, 16]),
        Buf::F8(codes.clone()),
        Buf::F32(vec![1.0]),
        Buf::F8(codes.clone()),
        Buf::F32(vec![1.0]),
        garbage(&kernel.results[0]),
    ];
    lib.run(&kernel, &mut bufs, &BIND);
    let y = values(&bufs[6]);
    for m in 0..16 {
        for n in 0..16 {
            let got = y[m * 16 + n];
            let row = &codes[n * 16..n * 16 + 16];
            if row.iter().any(|c| c & 0x7F == 0x7F) {
                assert!(got.is_nan(), "y[{m}, {n}] = {got}: weight row {n} holds a NaN code");
                continue;
            }
            let want = kiln_ir::interp::numerics::f8e4m3_to_f32(codes[n * 16 + m]) as f64;
            assert_eq!(got, want, "code {:#04x} (y[{m}, {n}])", codes[n * 16 + m]);
        }
    }
}

/// A grouped GEMM over 20 experts (on the GPU more than one switch holds: a tree of switches, 16
/// then 4; on the CPU read from the table of buffer addresses, every second one a scale): each
/// expert's weight is the identity times its own scale `e + 1`, so every output row names
/// the expert that computed it. Experts hold 0 to 13 rows (the 4-row blocks and the one-row loop
/// both run, and the harness's work ranges start inside experts), and the last 7 rows belong to
/// none, so they are 0.
#[test]
fn a_grouped_gemm_over_20_experts_picks_each_rows_expert() {
    const E: usize = 20;
    let rows_of = [3, 0, 5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 7, 0, 4];
    let m: usize = 40;
    let mut src = String::from("graph @many_experts {\n");
    let mut body = String::new();
    let mut args = vec!["%0".to_string(), "%1".to_string()];
    let header = |s: &mut String, ind: &str| {
        s.push_str(&format!("{ind}%0 = input {{name = \"x\"}} : f32[{m}, 16]\n"));
        s.push_str(&format!("{ind}%1 = input {{name = \"offsets\"}} : i32[{}]\n", E + 1));
        for e in 0..E {
            s.push_str(&format!("{ind}%{} = input {{name = \"w{e}\"}} : f8e4m3[16, 16]\n", 2 + 2 * e));
            s.push_str(&format!("{ind}%{} = input {{name = \"s{e}\"}} : f32[1, 1]\n", 3 + 2 * e));
        }
    };
    header(&mut src, "  ");
    header(&mut body, "    ");
    for e in 0..E {
        args.push(format!("%{}", 2 + 2 * e));
        args.push(format!("%{}", 3 + 2 * e));
    }
    let first = 2 + 2 * E;
    let mut deq = Vec::new();
    for e in 0..E {
        let v = first + e;
        body.push_str(&format!(
            "    %{v} = dequantize %{}, %{} {{to = f32, block = [16, 16]}} : f32[16, 16]\n",
            2 + 2 * e,
            3 + 2 * e
        ));
        deq.push(format!("%{v}"));
    }
    let y = first + E;
    body.push_str(&format!(
        "    %{y} = grouped_linear %0, %1, {} {{num_experts = {E}}} : f32[{m}, 16]\n    output \"y\" = %{y}\n",
        deq.join(", ")
    ));
    src.push_str(&format!(
        "  %{first} = fused {} {{name = \"fp8-gemm\"}} : f32[{m}, 16] {{\n{body}  }}\n  output \"y\" = %{first}\n}}",
        args.join(", ")
    ));
    let g = kiln_ir::parse(&src).unwrap_or_else(|e| panic!("{e}\n{src}"));
    let plan = form_kernels(&g).unwrap();
    let kernel = plan
        .steps
        .iter()
        .find_map(|s| match s {
            Step::Launch { kernel, node, .. } if matches!(g.node(*node).op, Op::Fused { .. }) => {
                Some(plan.kernel(*kernel).clone())
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(fusion_plan(&kernel.body).unwrap().to_string(), "fp8 grouped_linear");
    // On the CPU the experts' codes and scales are read from the table of buffer addresses the
    // packed entry is given: the function takes `x`, the offsets, the output and the table, and
    // has no switch. A GPU kernel takes every buffer and picks by switches.
    let cpu = lower_module([&kernel], Target::Cpu).unwrap_or_else(|e| panic!("{e}"));
    let k = &cpu.kernels[0];
    assert!(k.table, "{}", k.func);
    assert_eq!(k.passed, [0, 1, 2 + 2 * E]);
    assert!(!k.func.contains("scf.index_switch"), "{}", k.func);
    let gpu = lower_module([&kernel], Target::Gpu).unwrap_or_else(|e| panic!("{e}"));
    let k = &gpu.kernels[0];
    assert!(!k.table && k.passed.len() == 3 + 2 * E && k.func.contains("scf.index_switch"));
    let lib = CpuLib::build(&[&kernel]);
    // The identity in E4M3 (1.0 is 0x38).
    let identity: Vec<u8> = (0..256).map(|i| if i / 16 == i % 16 { 0x38 } else { 0 }).collect();
    let mut offsets = vec![0i32];
    for r in rows_of {
        offsets.push(offsets.last().unwrap() + r);
    }
    let held = *offsets.last().unwrap() as usize;
    assert_eq!(held, 33);
    let x: Vec<f32> = (0..m * 16).map(|i| (i % 16) as f32 + 1.0).collect();
    let mut bufs = vec![Buf::F32(x), Buf::I32(offsets.clone())];
    for e in 0..E {
        bufs.push(Buf::F8(identity.clone()));
        bufs.push(Buf::F32(vec![(e + 1) as f32]));
    }
    bufs.push(garbage(&kernel.results[0]));
    lib.run(&kernel, &mut bufs, &BIND);
    let y = values(&bufs[2 + 2 * E]);
    for row in 0..m {
        let expert = (0..E).find(|&e| (offsets[e] as usize..offsets[e + 1] as usize).contains(&row));
        for n in 0..16 {
            let want = expert.map_or(0.0, |e| ((n + 1) * (e + 1)) as f64);
            assert_eq!(y[row * 16 + n], want, "y[{row}, {n}] (expert {expert:?})");
        }
    }
}

/// The FP8 GEMVs decode 64 codes at a time without testing each for NaN, and test the bytes once
/// per 64 instead (`fp8_block_sums`): so a NaN code must still give NaN wherever it sits in K. `x`
/// is the identity, so `y[m, n]` is weight row `n`'s code `m` decoded, exactly, and NaN in
/// every output of a row holding a NaN code. K = 185 in blocks of 128 columns: the first block
/// takes two 64-code steps, the second (48 codes, ragged) the tested 16-code steps, and the last 9
/// columns the scalar loop. Rows 0-3 and 8 hold every finite code between them; rows 4-7 and 9 are
/// copies of rows 0-3 and 8 with one NaN code at column 3, 100, 140, 180 and 64 (the first and
/// second 64-code step, the 16-code steps, the scalar loop, the start of a 64-code step). Ten rows:
/// the 4-column register block and the one-column loop both run. Once as a `linear`, once as a
/// `grouped_linear` of two experts holding the same weight (its one-row loop and its 4-row block).
#[test]
fn fp8_gemms_give_nan_for_a_nan_code_anywhere_in_k() {
    const K: usize = 185;
    const N: usize = 10;
    let codes = nan_test_codes(K, [3, 100, 140, 180, 64]);
    let identity: Vec<f32> = (0..K * K).map(|i| if i / K == i % K { 1.0 } else { 0.0 }).collect();
    let check = |y: &[f64], what: &str| check_identity_product(y, &codes, K, what);
    let kernel_of = fused_kernel_of;
    let (w, sc) = (format!("f8e4m3[{N}, {K}]"), "f32[1, 2]".to_string());
    let x = format!("f32[{K}, {K}]");
    let linear = kernel_of(
        &fused_graph(
            &[("x", &x), ("w", &w), ("s", &sc)],
            &[
                format!("dequantize %1, %2 {{to = f32, block = [128, 128]}} : f32[{N}, {K}]"),
                format!("linear %0, %3 : f32[{K}, {N}]"),
            ],
        ),
        "fp8 linear",
    );
    let y = run_on_cpu(
        &linear,
        vec![Buf::F32(identity.clone()), Buf::F8(codes.clone()), Buf::F32(vec![1.0, 1.0])],
    );
    check(&y, "linear");

    let grouped = kernel_of(
        &fused_graph(
            &[("x", &x), ("offsets", "i32[3]"), ("w0", &w), ("s0", &sc), ("w1", &w), ("s1", &sc)],
            &[
                format!("dequantize %2, %3 {{to = f32, block = [128, 128]}} : f32[{N}, {K}]"),
                format!("dequantize %4, %5 {{to = f32, block = [128, 128]}} : f32[{N}, {K}]"),
                format!("grouped_linear %0, %1, %6, %7 {{num_experts = 2}} : f32[{K}, {N}]"),
            ],
        ),
        "fp8 grouped_linear",
    );
    let y = run_on_cpu(
        &grouped,
        vec![
            Buf::F32(identity),
            Buf::I32(vec![0, 121, K as i32]),
            Buf::F8(codes.clone()),
            Buf::F32(vec![1.0, 1.0]),
            Buf::F8(codes.clone()),
            Buf::F32(vec![1.0, 1.0]),
        ],
    );
    check(&y, "grouped_linear");
}

/// A row of an FP8 `grouped_linear` gives the same bits whichever way the rows are split over
/// the threads: in a register block of 4 rows, or of the 1-3 rows an expert's range ends with.
/// Its FP8 input in 1 x 128 tiles and two experts' weights in 128 x 128 blocks (K = 320: two full
/// blocks and a ragged one; K = 333 adds a scalar tail; N = 11, an odd number of columns for the
/// blocks of several columns), run as one range, row by row, and cut at rows 3 and 9 (mid
/// expert: blocks of 3 and 2 rows), with the host's features and with AVX2's (no bf16 dot
/// products, no AVX-512).
#[test]
fn fp8_grouped_rows_do_not_depend_on_the_split() {
    use kiln_compiler::codegen::cpu::{self, CpuFeatures};
    const M: usize = 14;
    const N: usize = 11;
    for k in [320usize, 333] {
        let (x, xs) = (format!("f8e4m3[{M}, {k}]"), format!("f32[{M}, {}]", k.div_ceil(128)));
        let (w, ws) = (format!("f8e4m3[{N}, {k}]"), format!("f32[1, {}]", k.div_ceil(128)));
        let kernel = fused_kernel_of(
            &fused_graph(
                &[
                    ("x", &x),
                    ("xs", &xs),
                    ("offsets", "i32[3]"),
                    ("w0", &w),
                    ("s0", &ws),
                    ("w1", &w),
                    ("s1", &ws),
                ],
                &[
                    format!("dequantize %0, %1 {{to = f32, block = [1, 128]}} : f32[{M}, {k}]"),
                    format!("dequantize %3, %4 {{to = f32, block = [128, 128]}} : f32[{N}, {k}]"),
                    format!("dequantize %5, %6 {{to = f32, block = [128, 128]}} : f32[{N}, {k}]"),
                    format!("grouped_linear %7, %2, %8, %9 {{num_experts = 2}} : f32[{M}, {N}]"),
                ],
            ),
            "fp8 grouped_linear",
        );
        let mut rng = Rng::new(7);
        let mut code = |_| match rng.uniform(0.0, 256.0) as u8 {
            c if c & 0x7F == 0x7F => c - 1,
            c => c,
        };
        let (xq, w0, w1): (Vec<u8>, Vec<u8>, Vec<u8>) = (
            (0..M * k).map(&mut code).collect(),
            (0..N * k).map(&mut code).collect(),
            (0..N * k).map(&mut code).collect(),
        );
        let mut rng = Rng::new(8);
        let args = vec![
            Buf::F8(xq),
            Buf::F32(rng.vec(M * k.div_ceil(128), 0.01, 1.0)),
            Buf::I32(vec![0, 9, M as i32]),
            Buf::F8(w0),
            Buf::F32(rng.vec(k.div_ceil(128), 0.01, 1.0)),
            Buf::F8(w1),
            Buf::F32(rng.vec(k.div_ceil(128), 0.01, 1.0)),
        ];
        let avx2 = CpuFeatures {
            bf16_dot: false,
            byte_permute: false,
            packed_gemm: false,
            amx: false,
            avx512: false,
        };
        let want = interpret(&kernel, &args, &BIND);
        // The sums of the products' magnitudes, which bound the reassociation's error.
        let abs: Vec<Buf> = (args.iter())
            .map(|b| match b {
                Buf::F8(c) => Buf::F8(c.iter().map(|c| c & 0x7F).collect()),
                b => b.clone(),
            })
            .collect();
        let bound = interpret(&kernel, &abs, &BIND);
        for (features, host) in [(cpu::host_features(), "this host"), (avx2, "AVX2")] {
            let lib = cpu::with_features(features, || CpuLib::build(&[&kernel]));
            let run = |cuts: &[i64]| {
                let mut bufs = args.clone();
                bufs.push(garbage(&kernel.results[0]));
                for w in cuts.windows(2) {
                    lib.run_range(&kernel, &mut bufs, &BIND, w[0], w[1]);
                }
                values(&bufs[args.len()])
            };
            let whole = run(&[0, M as i64]);
            for (j, (g, w)) in whole.iter().zip(&want[0]).enumerate() {
                let tol = 3e-6 * bound[0][j];
                assert!((g - w).abs() <= tol, "{host}, K = {k}: y[{j}] = {g} against {w} (tolerance {tol})");
            }
            let by_row: Vec<i64> = (0..=M as i64).collect();
            for (cuts, how) in [(&by_row[..], "row by row"), (&[0, 3, 9, M as i64][..], "cut at 3 and 9")] {
                let got = run(cuts);
                for (j, (g, w)) in got.iter().zip(&whole).enumerate() {
                    assert_eq!(g.to_bits(), w.to_bits(), "{host}, K = {k}, {how}: y[{}, {}]", j / N, j % N);
                }
            }
        }
    }
}

/// A graph of one `fused` node named `fp8-gemm` over `inputs` (name, type), whose body is the
/// inputs then `ops` (numbered on from them, each `op args : type`); the last op's result is the
/// output.
fn fused_graph(inputs: &[(&str, &str)], ops: &[String]) -> String {
    let decls: Vec<String> = inputs
        .iter()
        .enumerate()
        .map(|(i, (n, t))| format!("%{i} = input {{name = \"{n}\"}} : {t}"))
        .collect();
    let args: Vec<String> = (0..inputs.len()).map(|i| format!("%{i}")).collect();
    let result = ops.last().and_then(|o| o.rsplit(" : ").next()).expect("a fused body has ops");
    let n = inputs.len();
    let mut src = String::from("graph @fused {\n");
    decls.iter().for_each(|d| src += &format!("  {d}\n"));
    src += &format!("  %{n} = fused {} {{name = \"fp8-gemm\"}} : {result} {{\n", args.join(", "));
    decls.iter().for_each(|d| src += &format!("    {d}\n"));
    for (i, op) in ops.iter().enumerate() {
        src += &format!("    %{} = {op}\n", n + i);
    }
    src += &format!("    output \"y\" = %{}\n  }}\n  output \"y\" = %{n}\n}}\n", n + ops.len() - 1);
    src
}

/// Weight codes for the NaN tests, 10 rows of `k`: rows 0-3 and 8 hold every finite code between
/// them (for `k` >= 185); rows 4-7 and 9 are copies of rows 0-3 and 8 with one NaN code at the
/// columns `nan_at`.
fn nan_test_codes(k: usize, nan_at: [usize; 5]) -> Vec<u8> {
    let mut codes = vec![0u8; 10 * k];
    for n in [0, 1, 2, 3, 8] {
        for c in 0..k {
            let v = ((n.min(4) * k + c) % 256) as u8;
            codes[n * k + c] = if v & 0x7F == 0x7F { 0 } else { v };
        }
    }
    for ((n, at), nan) in [4, 5, 6, 7, 9].into_iter().zip(nan_at).zip([0x7F, 0xFF, 0x7F, 0xFF, 0xFF]) {
        let from = if n == 9 { 8 } else { n - 4 };
        let row: Vec<u8> = codes[from * k..from * k + k].to_vec();
        codes[n * k..n * k + k].copy_from_slice(&row);
        codes[n * k + at] = nan;
    }
    codes
}

/// `y = identity @ w^T` for the weight `codes` (`[N, k]`, scale 1): `y[m, n]` is code `m` of row
/// `n` decoded, exactly, and NaN in every output of a row holding a NaN code.
fn check_identity_product(y: &[f64], codes: &[u8], k: usize, what: &str) {
    let n_rows = codes.len() / k;
    for m in 0..k {
        for n in 0..n_rows {
            let got = y[m * n_rows + n];
            if codes[n * k..n * k + k].iter().any(|c| c & 0x7F == 0x7F) {
                assert!(got.is_nan(), "{what}: y[{m}, {n}] = {got}: weight row {n} holds a NaN code");
                continue;
            }
            let want = kiln_ir::interp::numerics::f8e4m3_to_f32(codes[n * k + m]) as f64;
            // Equal values (the sum's other products are +0, so code 0x80 comes out as +0).
            assert_eq!(got, want, "{what}: code {:#04x} (y[{m}, {n}])", codes[n * k + m]);
        }
    }
}

/// FP8 GEMMs on a CPU without AVX-512 take the f32 micro-kernel on decoded values
/// (`Elem::Fp8Wide`): every weight code decoded and times its block's scale as it is packed, the
/// input rows likewise once per sweep. Built here with AVX-512 pinned off (and run on any host),
/// against the dot-product blocks (the packed path pinned off):
/// - an identity input (code 1.0, scale 1) times weights holding every code, in blocks ragged at
///   both edges (N = 200 over two block rows and a partial panel, K = 208 over a 128 and an 80),
///   gives each weight value, code times scale, exactly and bit for bit as the interpreter's
///   `dequantize` does, and NaN for the rows holding a NaN code;
/// - a gate/up pair with its SwiGLU epilogue and a bf16 result, and a `linear` whose K = 6160 takes
///   two chunks of the packed panels, on random codes and scales, match the interpreter within
///   f32's sums (3e-5 of the sum of the products' magnitudes, against about 1.6e-4 for one term).
#[test]
fn fp8_gemms_without_avx512_pack_decoded_values() {
    use kiln_compiler::codegen::cpu::{self, CpuFeatures};
    use kiln_ir::interp::numerics::f8e4m3_to_f32;
    let features = |packed_gemm| CpuFeatures {
        bf16_dot: false,
        byte_permute: false,
        packed_gemm,
        amx: false,
        avx512: false,
    };
    let blocks = |n: usize, k: usize| format!("f32[{}, {}]", n.div_ceil(128), k.div_ceil(128));
    // `linear`s of an FP8 input in 1 x 128 tiles and `gemms` FP8 weights in 128 x 128 blocks.
    let graph = |m: usize, n: usize, k: usize, swiglu: bool| {
        let (x, w) = (format!("f8e4m3[{m}, {k}]"), format!("f8e4m3[{n}, {k}]"));
        let (xs, ws) = (format!("f32[{m}, {}]", k.div_ceil(128)), blocks(n, k));
        let mut inputs = vec![("x", x.as_str()), ("xs", xs.as_str()), ("w", w.as_str()), ("ws", ws.as_str())];
        let mut ops = vec![
            format!("dequantize %0, %1 {{to = f32, block = [1, 128]}} : f32[{m}, {k}]"),
            format!("dequantize %2, %3 {{to = f32, block = [128, 128]}} : f32[{n}, {k}]"),
        ];
        if !swiglu {
            ops.push(format!("linear %4, %5 : f32[{m}, {n}]"));
            return fused_graph(&inputs, &ops);
        }
        inputs.extend([("u", w.as_str()), ("us", ws.as_str())]);
        ops = vec![
            format!("dequantize %0, %1 {{to = f32, block = [1, 128]}} : f32[{m}, {k}]"),
            format!("dequantize %2, %3 {{to = f32, block = [128, 128]}} : f32[{n}, {k}]"),
            format!("dequantize %4, %5 {{to = f32, block = [128, 128]}} : f32[{n}, {k}]"),
            format!("linear %6, %7 : f32[{m}, {n}]"),
            format!("linear %6, %8 : f32[{m}, {n}]"),
            format!("silu %9 : f32[{m}, {n}]"),
            format!("mul %11, %10 : f32[{m}, {n}]"),
            format!("cast %12 {{to = bf16}} : bf16[{m}, {n}]"),
        ];
        fused_graph(&inputs, &ops)
    };
    // Both builds of `k` on `args`: (packed, dot-product blocks), each output as f64.
    let run_both = |k: &Kernel, args: &[Buf]| -> [Vec<f64>; 2] {
        let packed = cpu::with_features(features(true), || mlir_of(k, Target::Cpu));
        let dots = cpu::with_features(features(false), || mlir_of(k, Target::Cpu));
        assert!(packed.contains("vector.shuffle") && packed != dots, "{}: the packed path", k.args[2]);
        [true, false].map(|p| {
            let lib = cpu::with_features(features(p), || CpuLib::build(&[k]));
            let mut bufs = args.to_vec();
            bufs.extend(k.results.iter().map(garbage));
            lib.run(k, &mut bufs, &BIND);
            values(&bufs[k.args.len()])
        })
    };
    let mut rng = Rng::new(43);

    // Identity input: y[m, n] is weight n's value at column m.
    let (n, k) = (200, 208);
    let kernel = fused_kernel_of(&graph(k, n, k, false), "fp8 linear");
    let mut codes: Vec<u8> = (0..n * k).map(|i| ((i * 7 + i / k) % 256) as u8).collect();
    codes.iter_mut().for_each(|c| *c = if *c & 0x7F == 0x7F { 0x3F } else { *c });
    codes[5 * k + 17] = 0x7F;
    codes[130 * k + 150] = 0xFF;
    let scales = rng.vec(2 * 2, 0.01, 2.0);
    let identity: Vec<u8> = (0..k * k).map(|i| if i / k == i % k { 0x38 } else { 0 }).collect();
    let args =
        vec![Buf::F8(identity), Buf::F32(vec![1.0; k * 2]), Buf::F8(codes.clone()), Buf::F32(scales.clone())];
    let want = interpret(&kernel, &args, &BIND);
    let [packed, dots] = run_both(&kernel, &args);
    for (got, what) in [(&packed, "packed"), (&dots, "dot-product blocks")] {
        for (j, (g, w)) in got.iter().zip(&want[0]).enumerate() {
            let (row, col) = (j / n, j % n);
            if col == 5 || col == 130 {
                assert!(g.is_nan() && w.is_nan(), "{what}: y[{row}, {col}] = {g}: a NaN code in its row");
                continue;
            }
            let value = f8e4m3_to_f32(codes[col * k + row]) * scales[(col / 128) * 2 + row / 128];
            assert_eq!((*g as f32).to_bits(), (*w as f32).to_bits(), "{what}: y[{row}, {col}]");
            assert_eq!(*g as f32, value, "{what}: y[{row}, {col}]");
        }
    }

    // Random codes (no NaN) and scales; the tolerance from the products' magnitudes, which the
    // interpreter gives for the codes with their signs cleared (for the SwiGLU, silu(G) U of the
    // gate's and up's magnitudes G and U, at least half of G U, which bounds its error by a few
    // times the sums').
    for (kernel, m, k) in [
        (fused_kernel_of(&graph(30, 70, 144, true), "fp8 linear x2 + elementwise"), 30, 144),
        (fused_kernel_of(&graph(30, 70, 6160, false), "fp8 linear"), 30, 6160),
    ] {
        let code = |rng: &mut Rng| match rng.uniform(0.0, 256.0) as u8 {
            c if c & 0x7F == 0x7F => c - 1,
            c => c,
        };
        let args: Vec<Buf> = (kernel.args.iter())
            .map(|t| match t.dtype {
                DType::F8E4M3 => Buf::F8((0..numel(t, &BIND)).map(|_| code(&mut rng)).collect()),
                _ => Buf::F32(rng.vec(numel(t, &BIND), 0.001, 0.01)),
            })
            .collect();
        let abs: Vec<Buf> = (args.iter())
            .map(|b| match b {
                Buf::F8(c) => Buf::F8(c.iter().map(|c| c & 0x7F).collect()),
                b => b.clone(),
            })
            .collect();
        let want = interpret(&kernel, &args, &BIND);
        let [packed, _] = run_both(&kernel, &args);
        let bound = interpret(&kernel, &abs, &BIND);
        let bf16 = kernel.results[0].dtype == DType::BF16;
        for (j, (g, w)) in packed.iter().zip(&want[0]).enumerate() {
            // bf16: one rounding of the result (2^-8 relative) beside the sums'.
            let tol = 3e-5 * bound[0][j].abs() + if bf16 { w.abs() / 128.0 } else { 0.0 };
            assert!((g - w).abs() <= tol, "m = {m}, K = {k}: element {j}: {g} against {w} (tolerance {tol})");
        }
    }
}

/// The one fused kernel of `src`, whose fusion plan must print as `plan_name`.
fn fused_kernel_of(src: &str, plan_name: &str) -> Kernel {
    let g = kiln_ir::parse(src).unwrap();
    let plan = form_kernels(&g).unwrap();
    let kernel = (plan.steps.iter())
        .find_map(|s| match s {
            Step::Launch { kernel, node, .. } if matches!(g.node(*node).op, Op::Fused { .. }) => {
                Some(plan.kernel(*kernel).clone())
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(fusion_plan(&kernel.body).unwrap().to_string(), plan_name);
    kernel
}

/// An FP8 input times FP8 weights in blocks of the same span (DeepSeek-V3's 1 x 128 and 128 x 128):
/// on a CPU with AVX512_BF16 and AVX512_VBMI both are decoded to bf16 by table and multiplied with
/// `vdpbf16ps`. The input is the identity in E4M3 (code 0x38 is 1.0), so each output is one weight
/// code decoded, exactly, and NaN for every output of a row holding a NaN code (K = 192: a full
/// block and a ragged one; NaN codes in both 64-code steps of the first block and in the second).
/// As a `linear` and as a `grouped_linear`.
#[test]
fn fp8_times_fp8_gemms_decode_every_code_exactly() {
    const K: usize = 192;
    let codes = nan_test_codes(K, [3, 100, 140, 191, 64]);
    let x: Vec<u8> = (0..K * K).map(|i| if i / K == i % K { 0x38 } else { 0 }).collect();
    let (xt, xs, w, ws) =
        (format!("f8e4m3[{K}, {K}]"), format!("f32[{K}, 2]"), format!("f8e4m3[10, {K}]"), "f32[1, 2]");
    let kernel = fused_kernel_of(
        &fused_graph(
            &[("x", &xt), ("xs", &xs), ("w", &w), ("ws", ws)],
            &[
                format!("dequantize %0, %1 {{to = f32, block = [1, 128]}} : f32[{K}, {K}]"),
                format!("dequantize %2, %3 {{to = f32, block = [128, 128]}} : f32[10, {K}]"),
                format!("linear %4, %5 : f32[{K}, 10]"),
            ],
        ),
        "fp8 linear",
    );
    let (ones, scale) = (Buf::F32(vec![1.0; K * 2]), Buf::F32(vec![1.0, 1.0]));
    let y =
        run_on_cpu(&kernel, vec![Buf::F8(x.clone()), ones.clone(), Buf::F8(codes.clone()), scale.clone()]);
    check_identity_product(&y, &codes, K, "fp8 x fp8 linear");

    // The same as a grouped GEMM of two experts holding the same weight: rows 0-120 and 121-191,
    // so each expert's last rows (1 and 3) take the one-row loop, which decodes by table too.
    let grouped = fused_kernel_of(
        &fused_graph(
            &[
                ("x", &xt),
                ("xs", &xs),
                ("offsets", "i32[3]"),
                ("w0", &w),
                ("ws0", ws),
                ("w1", &w),
                ("ws1", ws),
            ],
            &[
                format!("dequantize %0, %1 {{to = f32, block = [1, 128]}} : f32[{K}, {K}]"),
                format!("dequantize %3, %4 {{to = f32, block = [128, 128]}} : f32[10, {K}]"),
                format!("dequantize %5, %6 {{to = f32, block = [128, 128]}} : f32[10, {K}]"),
                format!("grouped_linear %7, %2, %8, %9 {{num_experts = 2}} : f32[{K}, 10]"),
            ],
        ),
        "fp8 grouped_linear",
    );
    let offsets = Buf::I32(vec![0, 121, K as i32]);
    let (w0, w1) = (Buf::F8(codes.clone()), Buf::F8(codes.clone()));
    let y = run_on_cpu(&grouped, vec![Buf::F8(x), ones, offsets, w0, scale.clone(), w1, scale]);
    check_identity_product(&y, &codes, K, "fp8 x fp8 grouped_linear");
}

/// A routed expert's rows take the same path whatever the other experts hold: the choice of AMX's
/// tiles is made on the expert's own rows (`packed::enough_expert_rows`), so an expert of one row
/// sums its products in the same order in a GEMM of 40 rows as in a GEMM of that row alone. When
/// the GEMM's rows chose, the 40-row GEMM packed the one-row expert into tiles and the lone row
/// took the dot-product blocks (a different order of sums, and on a speculative step's 8 rows,
/// 4.6 times the time).
#[test]
fn an_expert_of_one_row_sums_alike_in_any_gemm() {
    const K: usize = 256;
    let graph = |rows: usize| {
        fused_graph(
            &[
                ("xq", &format!("f8e4m3[{rows}, {K}]")),
                ("xs", &format!("f32[{rows}, 2]")),
                ("offsets", "i32[3]"),
                ("w0", "f8e4m3[96, 256]"),
                ("w0s", "f32[3, 2]"),
                ("w1", "f8e4m3[96, 256]"),
                ("w1s", "f32[3, 2]"),
            ],
            &[
                format!("dequantize %0, %1 {{to = f32, block = [1, 128]}} : f32[{rows}, {K}]"),
                "dequantize %3, %4 {to = f32, block = [32, 128]} : f32[96, 256]".to_string(),
                "dequantize %5, %6 {to = f32, block = [32, 128]} : f32[96, 256]".to_string(),
                format!("grouped_linear %7, %2, %8, %9 {{num_experts = 2}} : f32[{rows}, 96]"),
            ],
        )
    };
    let mut rng = Rng::new(41);
    let mut codes = |n: usize| -> Vec<u8> {
        (0..n).map(|_| (rng.uniform(0.0, 254.0) as u8) & 0x7E | (rng.uniform(0.0, 2.0) as u8) << 7).collect()
    };
    let (x, w0, w1) = (codes(40 * K), codes(96 * K), codes(96 * K));
    let scales = |n: usize, seed: u64| -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| r.uniform(0.001, 0.01)).collect()
    };
    let (xs, w0s, w1s) = (scales(40 * 2, 1), scales(6, 2), scales(6, 3));
    let weights =
        || vec![Buf::F8(w0.clone()), Buf::F32(w0s.clone()), Buf::F8(w1.clone()), Buf::F32(w1s.clone())];
    // Expert 0 holds row 0; expert 1 the other 39 rows (enough for AMX on a host that has it).
    let wide = fused_kernel_of(&graph(40), "fp8 grouped_linear");
    let mut args = vec![Buf::F8(x.clone()), Buf::F32(xs.clone()), Buf::I32(vec![0, 1, 40])];
    args.extend(weights());
    let all = run_on_cpu(&wide, args);
    // Row 0 alone.
    let alone = fused_kernel_of(&graph(1), "fp8 grouped_linear");
    let mut args = vec![Buf::F8(x[..K].to_vec()), Buf::F32(xs[..2].to_vec()), Buf::I32(vec![0, 1, 1])];
    args.extend(weights());
    let one = run_on_cpu(&alone, args);
    assert!(one.iter().all(|v| v.is_finite() && *v != 0.0), "{one:?}");
    let bits = |v: &[f64]| v.iter().map(|x| (*x as f32).to_bits()).collect::<Vec<u32>>();
    assert_eq!(bits(&all[..96]), bits(&one), "expert 0's row in a 40-row GEMM and alone");
}

/// Runs `kernel` on the CPU with arguments `args` and its result filled with garbage first; the
/// result's values.
fn run_on_cpu(kernel: &Kernel, mut args: Vec<Buf>) -> Vec<f64> {
    let lib = CpuLib::build(&[kernel]);
    args.push(garbage(&kernel.results[0]));
    lib.run(kernel, &mut args, &BIND);
    values(args.last().unwrap())
}

/// The packed path's f32 register blocks: AVX-512's (rows by all four 16-column vectors of a
/// panel) and AVX2's (rows by one vector at a time, four sweeps of the packed panel) sum every
/// output in the same order, so they give the same bits, and the interpreter's values. Both are
/// built and run here, whatever the host (AVX2 takes a 16-lane vector as two registers): a
/// `linear` of 150 rows (a full panel stored as vectors and a last one of 6 columns lane by lane),
/// one whose K takes two chunks with partial sums between them, and a gate/up pair (three rows a
/// block on both) with its SwiGLU epilogue; then bf16 operands on a CPU without AVX512_BF16
/// (`Elem::Bf16Wide`: widened to f32 as they are packed and broadcast), a `linear` of 150 rows,
/// one of 130 rows whose K takes two chunks (both at least the 128 rows AVX-512 packs from), and
/// a gate/up pair, each result rounded to bf16 once.
#[test]
fn packed_register_blocks_give_the_same_bits() {
    use kiln_compiler::codegen::cpu::{self, CpuFeatures};
    let linear = |t: &str, m: usize, n: usize, k: usize| {
        fused_kernel_of(
            &fused_graph(
                &[("x", &format!("{t}[{m}, {k}]")), ("w", &format!("{t}[{n}, {k}]"))],
                &[format!("linear %0, %1 : {t}[{m}, {n}]"), format!("add %2, %2 : {t}[{m}, {n}]")],
            ),
            "linear + elementwise",
        )
    };
    let swiglu = |t: &str| {
        let (x, w) = (format!("{t}[150, 64]"), format!("{t}[70, 64]"));
        fused_kernel_of(
            &fused_graph(
                &[("x", &x), ("gate", &w), ("up", &w)],
                &[
                    format!("linear %0, %1 : {t}[150, 70]"),
                    format!("linear %0, %2 : {t}[150, 70]"),
                    format!("silu %3 : {t}[150, 70]"),
                    format!("mul %5, %4 : {t}[150, 70]"),
                ],
            ),
            "linear x2 + elementwise",
        )
    };
    let kernels = [
        linear("f32", 150, 70, 64),
        linear("f32", 130, 70, 8208),
        swiglu("f32"),
        linear("bf16", 150, 70, 64),
        linear("bf16", 130, 70, 6160),
        swiglu("bf16"),
    ];
    let features =
        |avx512| CpuFeatures { bf16_dot: false, byte_permute: false, packed_gemm: true, amx: false, avx512 };
    let mut rng = Rng::new(41);
    for k in &kernels {
        let mlir = |avx512| cpu::with_features(features(avx512), || mlir_of(k, Target::Cpu));
        let libs = [false, true].map(|avx512| cpu::with_features(features(avx512), || CpuLib::build(&[k])));
        assert!(mlir(false).contains("vector.shuffle") && mlir(true).contains("vector.shuffle"), "packed");
        assert_ne!(mlir(false), mlir(true), "the two blockings differ");
        let bf16 = k.args[0].dtype == DType::BF16;
        let args: Vec<Buf> = (k.args.iter())
            .map(|t| {
                let v = rng.vec(numel(t, &BIND), -1.0, 1.0);
                if bf16 {
                    Buf::Bf16(v.into_iter().map(to_bf16).collect())
                } else {
                    Buf::F32(v)
                }
            })
            .collect();
        let want = interpret(k, &args, &BIND);
        let got: Vec<Vec<f64>> = (libs.iter())
            .map(|lib| {
                let mut bufs = args.clone();
                bufs.extend(k.results.iter().map(garbage));
                lib.run(k, &mut bufs, &BIND);
                values(&bufs[k.args.len()])
            })
            .collect();
        let bits = |v: &[f64]| v.iter().map(|x| (*x as f32).to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got[0]), bits(&got[1]), "{}: AVX2's blocks and AVX-512's", k.args[1]);
        let kk = numel(&k.args[1], &BIND) / 70;
        // bf16: one rounding of the result (2^-8 relative) beside f32's sums.
        let tol = 1e-4 * (kk as f64 / 1024.0).sqrt().max(1.0) + if bf16 { 1.0 / 128.0 } else { 0.0 };
        for (j, (g, w)) in got[0].iter().zip(&want[0]).enumerate() {
            assert!((g - w).abs() <= tol * w.abs().max(1.0), "{}: element {j}: {g} against {w}", k.args[1]);
        }
    }
}
