//! `kiln compile` and `kiln bench gemm`, run as a user runs them, and the artifact they write: its
//! files and hashes, its manifest, and its program run by the runtime's CPU backend on `kernels.so`
//! alone, matching the reference interpreter; and a graph of every backward op of training packed
//! by `pack::compile` and run the same way.

use std::collections::HashMap;
use std::path::Path;

use kiln_ir::artifact::{
    self, Buffer, BufferKind, KernelIndex, Manifest, ManifestError, Step, Storage, ARENA_ALIGN,
    FORMAT_VERSION,
};
use kiln_ir::interp::Tensor;
use kiln_ir::{DType, SymBindings};
use kiln_runtime::cpu::{CpuModel, CpuOptions};
use kiln_runtime::weights::{HostData, HostTensor};
use sha2::{Digest, Sha256};

use crate::util::{kiln, kiln_env, root, Scratch};

const SMALL: &str = "tests/compile/small.kir";

fn files_of(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn read_manifest(dir: &Path) -> Manifest {
    let text = std::fs::read_to_string(dir.join(artifact::MANIFEST_FILE)).unwrap();
    let m: Manifest = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    m.validate().unwrap_or_else(|e| panic!("{e}"));
    m
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs the artifact in `dir` with the runtime's CPU backend on `inputs` and parameters given by
/// name as f32 values; returns every output as f32. Two threads, and every launch split between
/// them, so that the kernels' work ranges are exercised.
fn execute(
    dir: &Path,
    inputs: &[HostTensor],
    params: &HashMap<String, Vec<f32>>,
) -> HashMap<String, Vec<f32>> {
    let art = kiln_runtime::artifact::load(dir).unwrap_or_else(|e| panic!("{e}"));
    let decls = kiln_runtime::weights::manifest_params(art.manifest()).unwrap();
    let tensors = decls.into_iter().map(|d| {
        let data = HostData::F32(params[&d.name].clone());
        Ok(HostTensor { name: d.name, dtype: d.dtype, shape: d.shape, data })
    });
    let options = CpuOptions { threads: 2, parallel_min_bytes: 0, ..CpuOptions::default() };
    let mut model = CpuModel::load(&art, tensors, &options).unwrap_or_else(|e| panic!("{e}"));
    let program = &art.manifest().programs[0];
    model.run(&program.name, inputs).unwrap_or_else(|e| panic!("{e}"));
    program
        .outputs
        .iter()
        .map(|o| {
            let t = model.output(&o.name).unwrap();
            let HostData::F32(v) = t.data else { panic!("{} is not a float output", o.name) };
            (o.name.clone(), v)
        })
        .collect()
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

/// Checks the kernels' outputs against the interpreter's, as f32.
#[track_caller]
fn assert_matches(got: &HashMap<String, Vec<f32>>, want: &kiln_ir::interp::Outputs, tol: f32) {
    assert_eq!(got.len(), want.len());
    for (name, w) in want {
        let w = w.as_f32().unwrap();
        let g = &got[name];
        assert_eq!(g.len(), w.len(), "{name}");
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            assert!((a - b).abs() <= tol * b.abs().max(1.0), "{name}[{i}]: kernels {a}, interpreter {b}");
        }
    }
}

#[test]
fn compile_all_targets_writes_an_artifact_the_manifest_can_run() {
    let s = Scratch::new();
    let out = kiln(&[
        "compile",
        SMALL,
        "--target",
        "all",
        "-o",
        &s.str("art"),
        "--max-batch",
        "2",
        "--max-context",
        "8",
    ]);
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout.starts_with(&format!("wrote {}: 6 kernels; programs forward (10 launches", s.str("art"))),
        "{}",
        out.stdout
    );
    assert_eq!(out.stderr, "", "no progress output when stderr is not a terminal");
    let dir = s.path("art");
    assert_eq!(files_of(&dir), ["kernels.mlir", "kernels.ptx", "kernels.so", "manifest.json", "module.kir"]);
    assert_eq!(s.entries(), ["art"], "no temporary directory is left behind");

    let m = read_manifest(&dir);
    assert_eq!(m.format_version, FORMAT_VERSION);
    // One step, buffer or kernel per line.
    let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    assert!(
        text.starts_with(&format!("{{\n  \"format_version\": {FORMAT_VERSION},\n  \"kiln_version\": ")),
        "{text}"
    );
    // The program is one `forward`, written one element per line within its object.
    let p = &m.programs[0];
    assert_eq!((p.name.as_str(), p.kind), ("forward", kiln_ir::ProgramKind::Forward));
    assert_eq!(text.lines().filter(|l| l.starts_with("    {\"id\":")).count(), m.kernels.len());
    assert_eq!(m.name, "small");
    assert!(m.model.is_none());
    assert_eq!(m.gpu.as_ref().unwrap().arch, "sm_90a");
    assert_eq!(m.max_sizes(), SymBindings { b: 2, t: 8, s: 1 });
    let mut listed: Vec<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
    listed.sort();
    assert_eq!(listed, ["kernels.mlir", "kernels.ptx", "kernels.so", "module.kir"]);
    for f in &m.files {
        let bytes = std::fs::read(dir.join(&f.name)).unwrap();
        assert_eq!(f.bytes, bytes.len() as u64, "{}", f.name);
        assert_eq!(f.sha256, sha256_hex(&bytes), "{}", f.name);
    }

    // The files are what they claim to be.
    let kir = std::fs::read_to_string(dir.join("module.kir")).unwrap();
    let module = kiln_ir::parse_module(&kir).unwrap();
    assert_eq!(module.programs.len(), 1);
    let graph = module.programs[0].graph.clone();
    let source = kiln_ir::parse(&std::fs::read_to_string(root().join(SMALL)).unwrap()).unwrap();
    assert_eq!(graph, source, "without a spec the graph is compiled as written");
    let mlir = std::fs::read_to_string(dir.join("kernels.mlir")).unwrap();
    kiln_compiler::codegen::verify_mlir(&mlir).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(mlir.matches("func.func @").count(), 6);
    assert_eq!(mlir.matches("gpu.func @").count(), 6);
    let ptx = std::fs::read_to_string(dir.join("kernels.ptx")).unwrap();
    for k in &m.kernels {
        assert!(ptx.contains(&format!(".entry {}(", k.gpu.as_ref().unwrap().entry)), "{}", k.name);
    }
    // The library's way into a kernel is its packed entry (and the signature beside it); the
    // kernel's own function is internal to it, inlined into the entry.
    // SAFETY: the library is kiln's, with no initialisers; the symbols are only looked up.
    let lib = unsafe { libloading::Library::new(dir.join("kernels.so")) }.unwrap();
    for k in &m.kernels {
        for (suffix, exported) in [("_packed", true), ("_signature", true), ("", false)] {
            let symbol = format!("{}{suffix}", k.name);
            let found = unsafe { lib.get::<*const u8>(symbol.as_bytes()) }.is_ok();
            assert_eq!(found, exported, "{symbol}");
        }
    }
    // Arena buffers are aligned and the weights are marked as such.
    for b in &p.buffers {
        if let Storage::Arena { offset } = b.storage {
            assert_eq!(offset % ARENA_ALIGN, 0);
        }
    }
    let linear = m.kernels.iter().find(|k| k.name.starts_with("k_linear_")).unwrap();
    let roles: Vec<_> = linear.args.iter().map(|a| a.role).collect();
    use kiln_ir::artifact::ArgRole;
    assert_eq!(roles, [ArgRole::Input, ArgRole::Param, ArgRole::Output]);

    // Run the program from the manifest and kernels.so alone, against the interpreter.
    let sizes = SymBindings { b: 2, t: 3, s: 1 };
    let x = values(2 * 3 * 64, 1);
    let params: HashMap<String, Vec<f32>> = m
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let n = p.shape.iter().map(|d| d.as_known().unwrap()).product::<u64>();
            (p.name.clone(), values(n as usize, 7 + i as u32))
        })
        .collect();
    let x_host = HostTensor {
        name: "x".into(),
        dtype: DType::F32,
        shape: vec![2, 3, 64],
        data: HostData::F32(x.clone()),
    };
    let got = execute(&dir, &[x_host], &params);
    let tensor = |t: &kiln_ir::TensorType, v: &[f32]| {
        let shape: Vec<u64> = t.shape.iter().map(|d| d.eval(&sizes).unwrap()).collect();
        Tensor::from_f32(DType::F32, shape, v.to_vec()).unwrap()
    };
    let x_ty = graph.ty(graph.inputs()[0].1);
    let want = kiln_ir::interp::run(
        &graph,
        &[("x".to_string(), tensor(x_ty, &x))].into(),
        &graph.params().iter().map(|&(n, t)| (n.to_string(), tensor(t, &params[n]))).collect(),
    )
    .unwrap();
    assert_matches(&got, &want, 1e-4);
}

#[test]
/// A next-token loss (norm, LM head, bf16 logits, `cross_entropy` over 300 classes with ignored
/// targets) compiles for both targets and runs from its artifact like the interpreter.
fn a_next_token_loss_compiles_and_runs_like_the_interpreter() {
    const LOSS: &str = "tests/compile/next_token_loss.kir";
    let s = Scratch::new();
    let out = kiln(&["compile", LOSS, "--target", "all", "-o", &s.str("art"), "--max-batch", "2"]);
    assert!(out.ok, "{}", out.stderr);
    let dir = s.path("art");
    let m = read_manifest(&dir);
    assert!(m.kernels.iter().any(|k| k.name.starts_with("k_cross_entropy_")), "{:?}", m.kernels);
    let graph =
        kiln_ir::parse_module(&std::fs::read_to_string(dir.join("module.kir")).unwrap()).unwrap().programs[0]
            .graph
            .clone();
    let hidden = values(2 * 3 * 32, 3);
    let targets: Vec<i64> = vec![5, -100, 299, 0, 17, 123];
    let params: HashMap<String, Vec<f32>> = m
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let n = p.shape.iter().map(|d| d.as_known().unwrap()).product::<u64>();
            (p.name.clone(), values(n as usize, 11 + i as u32))
        })
        .collect();
    let inputs = [
        HostTensor {
            name: "hidden".into(),
            dtype: DType::F32,
            shape: vec![2, 3, 32],
            data: HostData::F32(hidden.clone()),
        },
        HostTensor {
            name: "targets".into(),
            dtype: DType::I64,
            shape: vec![2, 3],
            data: HostData::I64(targets.clone()),
        },
    ];
    let got = execute(&dir, &inputs, &params);
    assert_eq!(got["loss"][1], 0.0, "the ignored target");
    let want = kiln_ir::interp::run(
        &graph,
        &[
            ("hidden".to_string(), Tensor::from_f32(DType::F32, [2, 3, 32], hidden).unwrap()),
            ("targets".to_string(), Tensor::from_i64(DType::I64, [2, 3], targets).unwrap()),
        ]
        .into(),
        &graph
            .params()
            .iter()
            .map(|&(n, t)| {
                let shape: Vec<u64> = t.shape.iter().map(|d| d.as_known().unwrap()).collect();
                (n.to_string(), Tensor::from_f32(t.dtype, shape, params[n].clone()).unwrap())
            })
            .collect(),
    )
    .unwrap();
    assert_matches(&got, &want, 1e-4);
}

#[test]
fn the_backward_ops_compile_and_run_like_the_interpreter() {
    // Every backward op of training (and `take_along`), packed by `pack::compile` from a `.kir`
    // graph for both targets (the PTX checked by ptxas), run by the runtime's CPU backend.
    let src = std::fs::read_to_string(root().join("tests/compile/backward_ops.kir")).unwrap();
    let graph = kiln_ir::parse(&src).unwrap_or_else(|e| panic!("{e}"));
    let options = kiln_compiler::pack::Options {
        kv_cache: false,
        score: false,
        ..kiln_compiler::pack::Options::new(kiln_compiler::target::Targets::All, 2, 8)
    };
    let source = kiln_compiler::pack::Source::Graph { graph: Box::new(graph.clone()), spec: None };
    let artifact = kiln_compiler::pack::compile(source, &options, &mut ()).unwrap_or_else(|e| panic!("{e}"));
    let s = Scratch::new();
    let dir = s.path("art");
    kiln_compiler::pack::write(&artifact, &dir).unwrap();
    let m = read_manifest(&dir);
    for op in ["attention_grad", "cross_entropy_grad", "embedding_grad", "take_along", "scatter_add_along"] {
        assert!(m.kernels.iter().any(|k| k.name.starts_with(&format!("k_{op}_"))), "no {op} kernel");
    }
    // attention_grad's workspace is a scratch argument, given arena memory of its own.
    let k = m.kernels.iter().find(|k| k.name.starts_with("k_attention_grad_")).unwrap();
    assert_eq!(k.args.last().unwrap().role, kiln_ir::artifact::ArgRole::Scratch);
    // The inputs that index something, checked by the runtime before a run.
    let mut index: Vec<String> = m.programs[0]
        .index_inputs
        .iter()
        .map(|t| format!("{} {:?} < {} ignoring {:?}", t.input, t.indexes, t.limit, t.ignore))
        .collect();
    index.sort();
    assert_eq!(
        index,
        [
            "ids Vocabulary < 40 ignoring None",
            "picks Along < 40 ignoring None",
            "positions CacheSlots < S ignoring None",
            "targets Classes < 40 ignoring Some(-100)"
        ]
    );

    let bf16 = |v: Vec<f32>| v.into_iter().map(|x| f32::from_bits(x.to_bits() & 0xFFFF_0000)).collect();
    let float = |name: &str, dtype: DType, shape: &[u64], data: Vec<f32>| {
        (name.to_string(), dtype, shape.to_vec(), Ok(data))
    };
    let int = |name: &str, dtype: DType, shape: &[u64], data: Vec<i64>| {
        (name.to_string(), dtype, shape.to_vec(), Err(data))
    };
    let values4 = |n: usize, seed: u32| values(n, seed).into_iter().map(|x| 4.0 * x).collect::<Vec<f32>>();
    let inputs = [
        float("dy_rope", DType::F32, &[2, 3, 2, 8], values(96, 1)),
        int("positions", DType::I64, &[2, 3], vec![0, 1, 2, 2, 3, 4]),
        float("logits", DType::BF16, &[2, 3, 40], bf16(values4(240, 2))),
        int("targets", DType::I64, &[2, 3], vec![5, -100, 39, 0, 17, 23]),
        float("dloss", DType::F32, &[2, 3], values(6, 3)),
        int("ids", DType::I32, &[2, 3], vec![3, 3, 39, 0, 3, 17]),
        int("picks", DType::I32, &[2, 3, 3], (0..18).map(|i| i * 7 % 40).collect()),
        float("q", DType::F32, &[2, 3, 2, 8], values(96, 4)),
        float("k", DType::F32, &[2, 5, 1, 8], values(80, 5)),
        float("v", DType::F32, &[2, 5, 1, 6], values(60, 6)),
        float("d_attn", DType::F32, &[2, 3, 2, 6], values(72, 7)),
        float("x_sorted", DType::F32, &[3, 8], values(24, 8)),
        // Expert 1 has no rows.
        int("offsets", DType::I32, &[4], vec![0, 2, 2, 3]),
        float("d_experts", DType::F32, &[3, 5], values(15, 9)),
        float("d_combined", DType::F32, &[3, 8], values(24, 10)),
        float("y_sorted", DType::F32, &[6, 8], values(48, 11)),
        int("perm", DType::I32, &[6], vec![4, 0, 5, 2, 1, 3]),
        float("weights", DType::F32, &[3, 2], values(6, 12)),
    ];
    let host: Vec<HostTensor> = inputs
        .iter()
        .map(|(name, dtype, shape, data)| HostTensor {
            name: name.to_string(),
            dtype: *dtype,
            shape: shape.clone(),
            data: match data {
                Ok(v) => HostData::F32(v.clone()),
                Err(v) => HostData::I64(v.clone()),
            },
        })
        .collect();
    let got = execute(&dir, &host, &HashMap::new());
    let want = kiln_ir::interp::run(
        &graph,
        &inputs
            .iter()
            .map(|(name, dtype, shape, data)| {
                let t = match data {
                    Ok(v) => Tensor::from_f32(*dtype, shape.clone(), v.clone()),
                    Err(v) => Tensor::from_i64(*dtype, shape.clone(), v.clone()),
                };
                (name.to_string(), t.unwrap())
            })
            .collect(),
        &Default::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(&got["dlogits"][40..80], &[0.0; 40], "the ignored target");
    assert_matches(&got, &want, 1e-5);

    // An id outside the gradient table's rows is refused before anything runs.
    let art = kiln_runtime::artifact::load(&dir).unwrap();
    let none = std::iter::empty::<Result<HostTensor, kiln_runtime::weights::WeightError>>();
    let mut model = CpuModel::load(&art, none, &CpuOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let mut bad = host.clone();
    bad[5].data = HostData::I64(vec![3, 3, 40, 0, 3, 17]);
    let e = model.run(&m.programs[0].name, &bad).unwrap_err().to_string();
    assert!(e.contains("ids") && e.contains("40"), "{e}");
}

#[test]
fn an_existing_artifact_is_replaced_whole_and_other_directories_are_refused() {
    let s = Scratch::new();
    let dir = s.str("art");
    assert!(kiln(&["compile", SMALL, "--target", "all", "-o", &dir]).ok);
    assert_eq!(
        files_of(&s.path("art")),
        ["kernels.mlir", "kernels.ptx", "kernels.so", "manifest.json", "module.kir"]
    );
    // A file the artifact does not list would be deleted with it: refused, nothing touched.
    std::fs::write(s.path("art/notes.txt"), "mine").unwrap();
    let out = kiln(&["compile", SMALL, "--target", "cpu", "-o", &dir]);
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("is a kiln artifact, but it also holds a file its manifest does not list (notes.txt)"),
        "{}",
        out.stderr
    );
    assert_eq!(std::fs::read_to_string(s.path("art/notes.txt")).unwrap(), "mine");
    assert!(read_manifest(&s.path("art")).gpu.is_some(), "the old artifact is still there");
    std::fs::remove_file(s.path("art/notes.txt")).unwrap();
    let out = kiln(&["compile", SMALL, "--target", "cpu", "-o", &dir]);
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(files_of(&s.path("art")), ["kernels.mlir", "kernels.so", "manifest.json", "module.kir"]);
    assert!(read_manifest(&s.path("art")).gpu.is_none());
    assert_eq!(s.entries(), ["art"]);

    // A directory that is not an artifact is left alone.
    std::fs::create_dir(s.path("mine")).unwrap();
    std::fs::write(s.path("mine/notes.txt"), "keep me").unwrap();
    let out = kiln(&["compile", SMALL, "--target", "cpu", "-o", &s.str("mine")]);
    assert!(!out.ok);
    assert!(
        out.stderr.contains("exists and is not a kiln artifact (it has no manifest.json)"),
        "{}",
        out.stderr
    );
    assert_eq!(files_of(&s.path("mine")), ["notes.txt"]);
    assert_eq!(s.entries(), ["art", "mine"]);
}

#[test]
fn failed_compiles_leave_no_directory_and_keep_the_old_one() {
    let s = Scratch::new();
    // A spec with a bad value.
    let out = kiln(&[
        "compile",
        "tests/specs/bad/experts_not_divisible_by_groups.toml",
        "--target",
        "cpu",
        "-o",
        &s.str("a"),
    ]);
    assert!(!out.ok);
    assert!(out.stderr.starts_with("error"), "{}", out.stderr);
    // A graph whose buffers cannot be planned at the sizes asked for.
    let huge = s.path("huge.kir");
    std::fs::write(
        &huge,
        "graph @huge {\n  %0 = input {name = \"x\"} : f32[S, S, S, 65536]\n  %1 = exp %0 : f32[S, S, S, 65536]\n  output \"y\" = %1\n}\n",
    )
    .unwrap();
    let compile_huge = |out: &str| {
        kiln(&["compile", &huge.to_string_lossy(), "--target", "cpu", "--max-context", "1048576", "-o", out])
    };
    let out = compile_huge(&s.str("b"));
    assert!(!out.ok);
    assert!(out.stderr.contains("more than 2^64 bytes"), "{}", out.stderr);
    // ptxas missing for a GPU target: the error says how to get it, before any work.
    let out = kiln_env(
        &["compile", SMALL, "--target", "sm_90a", "-o", &s.str("c")],
        &[("KILN_PTXAS", "/nonexistent/ptxas")],
    );
    assert!(!out.ok);
    assert!(out.stderr.contains("ptxas") && out.stderr.contains("scripts/setup.sh"), "{}", out.stderr);
    assert_eq!(s.entries(), ["huge.kir"], "no output and no temporary directories");

    // A failure over an existing artifact leaves it as it was.
    assert!(kiln(&["compile", SMALL, "--target", "cpu", "-o", &s.str("d")]).ok);
    let before = std::fs::read(s.path("d/manifest.json")).unwrap();
    let out = compile_huge(&s.str("d"));
    assert!(!out.ok);
    assert_eq!(std::fs::read(s.path("d/manifest.json")).unwrap(), before);
    assert_eq!(s.entries(), ["d", "huge.kir"]);
}

#[test]
fn emit_prints_a_stage_and_writes_nothing_without_an_output() {
    let s = Scratch::new();
    let mlir = kiln(&["compile", SMALL, "--target", "all", "--emit", "mlir"]);
    assert!(mlir.ok, "{}", mlir.stderr);
    kiln_compiler::codegen::verify_mlir(&mlir.stdout).unwrap_or_else(|e| panic!("{e}"));
    assert!(mlir.stdout.contains("gpu.module @kiln_kernels") && mlir.stdout.contains("func.func @k_linear_"));
    // The same text as the artifact's file.
    let art = kiln(&["compile", SMALL, "--target", "all", "-o", &s.str("art"), "--emit", "mlir"]);
    assert!(art.ok, "{}", art.stderr);
    assert_eq!(art.stdout, mlir.stdout);
    assert_eq!(std::fs::read_to_string(s.path("art/kernels.mlir")).unwrap(), mlir.stdout);

    // A whole model's module after the passes, whether or not all its kernels lower yet: the
    // pipeline stops after the passes, and prints what `kiln ir --module --after LAST` prints.
    let last = kiln_compiler::passes::PASSES.last().unwrap().name;
    let model = kiln(&["compile", "models/tiny.toml", "--emit", "kir"]);
    assert!(model.ok, "{}", model.stderr);
    assert!(model.stdout.starts_with("module @tiny {"), "the module, every program");
    assert!(model.stdout == kiln(&["ir", "models/tiny.toml", "--module", "--after", last]).stdout);

    let kir = kiln(&["compile", SMALL, "--target", "cpu", "--emit", "kir"]);
    assert_eq!(kir.stdout, std::fs::read_to_string(s.path("art/module.kir")).unwrap());
    let llvm = kiln(&["compile", SMALL, "--target", "cpu", "--emit", "llvm"]);
    assert!(
        llvm.ok && llvm.stdout.contains("define void @k_linear_") && llvm.stdout.contains("_packed("),
        "{}",
        llvm.stderr
    );
    let ptx = kiln(&["compile", SMALL, "--target", "sm_90a", "--emit", "ptx"]);
    assert!(ptx.ok && ptx.stdout.contains(".target sm_90a"), "{}", ptx.stderr);
    let no_gpu = kiln(&["compile", SMALL, "--target", "cpu", "--emit", "ptx"]);
    assert!(!no_gpu.ok && no_gpu.stderr.contains("--emit ptx needs --target sm_90a"), "{}", no_gpu.stderr);
    assert_eq!(s.entries(), ["art"]);
}

/// `kiln compile --json`: one document that says what the manifest says (programs, launches, arenas,
/// files with their SHA-256) and the stages that ran; it needs `-o`.
#[test]
fn json_describes_the_artifact_written() {
    let s = Scratch::new();
    let out = kiln(&[
        "compile",
        "models/tiny.toml",
        "--target",
        "cpu",
        "--max-context",
        "16",
        "-o",
        &s.str("a"),
        "--json",
    ]);
    assert!(out.ok, "{}", out.stderr);
    let doc: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout));
    let m = read_manifest(&s.path("a"));
    assert_eq!(doc["name"], m.name.as_str());
    let programs = doc["programs"].as_array().unwrap();
    assert_eq!(programs.len(), m.programs.len());
    for (j, p) in programs.iter().zip(&m.programs) {
        assert_eq!(j["name"], p.name.as_str());
        assert_eq!(j["arena_bytes"], p.arena_bytes);
        let launches = p.steps.iter().filter(|s| matches!(s, kiln_ir::artifact::Step::Launch { .. })).count();
        assert_eq!(j["launches"], launches as u64);
        // Per kernel, the launches of each program add up to the program's.
        let per_kernel: u64 =
            doc["kernels"].as_array().unwrap().iter().map(|k| k["launches"][&p.name].as_u64().unwrap()).sum();
        assert_eq!(per_kernel, launches as u64, "{}", p.name);
    }
    assert_eq!(doc["kernels"].as_array().unwrap().len(), m.kernels.len());
    for f in doc["files"].as_array().unwrap() {
        let bytes = std::fs::read(s.path("a").join(f["name"].as_str().unwrap())).unwrap();
        assert_eq!(f["sha256"], sha256_hex(&bytes).as_str());
        assert_eq!(f["bytes"], bytes.len() as u64);
    }
    let stages: Vec<&str> =
        doc["stages"].as_array().unwrap().iter().map(|r| r["stage"].as_str().unwrap()).collect();
    assert!(stages.contains(&"fuse-kernels") && stages.contains(&"emit-cpu"), "{stages:?}");
    let no_output = kiln(&["compile", "models/tiny.toml", "--json"]);
    assert!(!no_output.ok && no_output.stderr.contains("--output"), "{}", no_output.stderr);
}

#[test]
fn report_lists_kernels_with_ptxas_numbers() {
    let out =
        kiln(&["compile", SMALL, "--target", "all", "--report", "--max-batch", "2", "--max-context", "8"]);
    assert!(out.ok, "{}", out.stderr);
    insta::assert_snapshot!("report_small", out.stdout);
}

#[test]
fn timings_have_a_row_per_stage_and_print_after_shows_a_stage() {
    let out = kiln(&["compile", SMALL, "--target", "all", "--timings", "--print-after", "plan-memory"]);
    assert!(out.ok, "{}", out.stderr);
    // The stages' table, then what the kernel cache held and what the kernels it did not cost.
    let stages: Vec<&str> = (out.stdout.lines().skip(1))
        .take_while(|l| !l.starts_with("kernel cache: "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(stages, ["build", "kernels", "plan-memory", "lower", "emit-gpu", "emit-cpu", "pack", "total"]);
    for line in out.stdout.lines().skip(1).take(7) {
        assert!(line.contains(" ms") && line.contains(" MiB"), "{line}");
    }
    assert!(out.stderr.starts_with("// ----- after plan-memory -----\narena: "), "{}", out.stderr);
    assert!(out.stderr.contains("param      param model.norm.weight"), "{}", out.stderr);

    // With a spec, every pass of the pipeline is a stage, and the manifest carries the model.
    let s = Scratch::new();
    let out = kiln(&[
        "compile",
        SMALL,
        "--spec",
        "models/tiny.toml",
        "--target",
        "cpu",
        "--timings",
        "-o",
        &s.str("a"),
    ]);
    assert!(out.ok, "{}", out.stderr);
    for p in kiln_compiler::passes::PASSES {
        assert!(
            out.stdout.lines().any(|l| l.starts_with(&format!("{} ", p.name))),
            "{}\n{}",
            p.name,
            out.stdout
        );
    }
    assert_eq!(read_manifest(&s.path("a")).model.unwrap().model.name, "tiny");

    let bad = kiln(&["compile", SMALL, "--print-after", "nonsense"]);
    assert!(
        !bad.ok && bad.stderr.contains("no such stage here; the stages are: build, kernels"),
        "{}",
        bad.stderr
    );
}

#[test]
fn a_manifest_that_does_not_hold_together_is_rejected() {
    let s = Scratch::new();
    assert!(kiln(&["compile", SMALL, "--target", "cpu", "-o", &s.str("a")]).ok);
    let good = read_manifest(&s.path("a"));
    let check = |change: &dyn Fn(&mut Manifest), want: &str| {
        let mut m = good.clone();
        change(&mut m);
        let e = m.validate().unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
    };
    check(&|m| m.format_version += 1, "format version");
    check(&|m| m.programs[0].arena_bytes -= 1, "does not lie inside the arena");
    check(
        &|m| {
            if let Some(Step::Launch { buffers, .. }) = m.programs[0].steps.first_mut() {
                buffers.pop();
            }
        },
        "buffers for",
    );
    check(
        &|m| {
            if let Some(Step::Launch { kernel, .. }) = m.programs[0].steps.first_mut() {
                *kernel = KernelIndex(99);
            }
        },
        "does not exist",
    );
    check(&|m| m.files[0].sha256 = "xyz".into(), "is not 64 lowercase hex digits");
    check(&|m| m.programs[0].symbols.clear(), "has no maximum");
    check(&|m| m.programs[0].buffers[1].max_bytes += 4, "max_bytes");
    let sizes = |b, t| SymBindings { b, t, s: 1 };
    assert!(good.programs[0].check_sizes(&sizes(1, 4096)).is_ok());
    assert_eq!(
        good.programs[0].check_sizes(&sizes(2, 1)),
        Err(ManifestError::SizeOutOfRange { sym: "B", value: 2, max: 1 })
    );
}

#[test]
fn bench_gemm_prints_a_table() {
    let out = kiln(&["bench", "gemm", "--sizes", "64", "--reps", "1", "--threads", "2", "--no-torch"]);
    assert!(out.ok, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{}", out.stdout);
    assert!(lines[0].starts_with("gemm, y = x @ w^T, 2 threads"), "{}", lines[0]);
    assert!(lines[0].ends_with("PyTorch skipped: --no-torch"), "{}", lines[0]);
    for (line, dtype) in lines[2..4].iter().zip(["f32", "bf16"]) {
        let row: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(row[..4], [dtype, "64", "64", "64"], "{line}");
        // Rates and their ratio: numbers (a loaded machine can print a rate or ratio that rounds
        // to 0); no PyTorch figures.
        for v in [row[4], row[5], row[6], row[8]] {
            assert!(v.parse::<f64>().is_ok_and(|x| x >= 0.0 && x.is_finite()), "{line}");
        }
        assert_eq!((row[7], row[9]), ("-", "-"), "{line}");
    }
    assert!(lines[4].starts_with("(bf16 and fp8 rows"), "{}", lines[4]);
    // --rows and --k: M rows of x against N x K, each result checked against matrixmultiply's (a
    // wrong one fails the command); rows on both sides of the packed path's thresholds, and FP8
    // (DeepSeek-V3's blocks, ragged at K = 200 and N = 64) beside bf16 and f32.
    for rows in ["1", "130"] {
        let args = ["bench", "gemm", "--sizes", "64", "--rows", rows, "--k", "200", "--reps", "1"];
        let out = kiln(&[&args[..], &["--dtype", "fp8,bf16,f32", "--no-torch"]].concat());
        assert!(out.ok, "{}", out.stderr);
        for (line, dtype) in out.stdout.lines().skip(2).zip(["fp8", "bf16", "f32"]) {
            let row: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(row[..4], [dtype, rows, "64", "200"], "{}", out.stdout);
        }
    }
    for (flag, what) in [("--rows", "--rows 0"), ("--k", "--k 0")] {
        let zero = kiln(&["bench", "gemm", "--sizes", "64", flag, "0", "--no-torch"]);
        assert!(!zero.ok && zero.stderr.contains(what), "{}", zero.stderr);
    }
    // --json: the same figures as one document, and nothing else; with PyTorch where this machine
    // has a Python with torch (the tools/goldens venv), its rates too, each checked against the
    // same reference before anything is printed.
    let json = kiln(&["bench", "gemm", "--sizes", "32,64", "--reps", "1", "--threads", "2", "--json"]);
    assert!(json.ok, "{}", json.stderr);
    let doc: serde_json::Value =
        serde_json::from_str(&json.stdout).unwrap_or_else(|e| panic!("{e}: {}", json.stdout));
    assert_eq!((doc["bench"].as_str(), doc["threads"].as_u64()), (Some("gemm"), Some(2)));
    let torch = doc["torch"]["version"].is_string();
    if !torch {
        let why = doc["torch"]["skipped"].as_str().unwrap();
        println!("PyTorch column not checked: {why}");
    }
    let sizes = doc["sizes"].as_array().unwrap();
    let cases: Vec<(&str, u64)> =
        sizes.iter().map(|r| (r["dtype"].as_str().unwrap(), r["n"].as_u64().unwrap())).collect();
    assert_eq!(cases, [("f32", 32), ("f32", 64), ("bf16", 32), ("bf16", 64)]);
    for r in sizes {
        let (k, m, ratio) = (
            r["kiln_gflops"].as_f64().unwrap(),
            r["matrixmultiply_gflops"].as_f64().unwrap(),
            r["ratio"].as_f64().unwrap(),
        );
        assert!(k > 0.0 && m > 0.0 && (ratio - k / m).abs() <= 1e-9 * ratio, "{r}");
        // The weight's bytes over the same time: N K bytes against 2 M N K flops.
        let bytes = if r["dtype"] == "f32" { 4.0 } else { 2.0 };
        let (gbs, rows) = (r["kiln_weight_gbs"].as_f64().unwrap(), r["m"].as_f64().unwrap());
        assert!((gbs - k * bytes / (2.0 * rows)).abs() <= 1e-9 * gbs, "{r}");
        match torch {
            true => {
                let (p, ratio) = (r["torch_gflops"].as_f64().unwrap(), r["torch_ratio"].as_f64().unwrap());
                assert!(p > 0.0 && (ratio - k / p).abs() <= 1e-9 * ratio, "{r}");
            }
            false => assert!(r["torch_gflops"].is_null(), "{r}"),
        }
    }
}

#[test]
/// The whole tiny model (embedding, MLA attention with YaRN rope, dispatched MoE, MTP) runs from
/// nothing but its artifact's manifest and `kernels.so`, and matches the reference interpreter on
/// the graph the artifact records.
fn the_whole_tiny_model_runs_from_its_artifact() {
    let s = Scratch::new();
    let out = kiln(&[
        "compile",
        "models/tiny.toml",
        "--target",
        "cpu",
        "-o",
        &s.str("t"),
        "--max-batch",
        "2",
        "--max-context",
        "16",
        "--no-kv-cache",
    ]);
    assert!(out.ok, "{}", out.stderr);
    let dir = s.path("t");
    let m = read_manifest(&dir);
    let graph =
        kiln_ir::parse_module(&std::fs::read_to_string(dir.join("module.kir")).unwrap()).unwrap().programs[0]
            .graph
            .clone();
    let toks: Vec<i32> = vec![1, 17, 42, 255, 3, 128, 77, 9, 200, 5];
    let pos: Vec<i32> = vec![0, 1, 2, 3, 4, 0, 1, 2, 3, 4];
    let mtp: Vec<i32> = vec![17, 42, 255, 3, 128, 77, 9, 200, 5, 6];
    let ib = |name: &str, v: &[i32]| HostTensor {
        name: name.into(),
        dtype: DType::I32,
        shape: vec![2, 5],
        data: HostData::I64(v.iter().map(|&x| i64::from(x)).collect()),
    };
    let inputs = [ib("tokens", &toks), ib("positions", &pos), ib("mtp_tokens", &mtp)];
    let params: HashMap<String, Vec<f32>> = m
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let n = p.shape.iter().map(|d| d.as_known().unwrap()).product::<u64>();
            (p.name.clone(), values(n as usize, 7 + i as u32).iter().map(|x| x * 0.1).collect())
        })
        .collect();
    for p in &m.params {
        assert_eq!(p.dtype, DType::F32, "{}", p.name);
    }
    let got = execute(&dir, &inputs, &params);
    let ti = |v: &[i32]| {
        Tensor::from_i64(DType::I32, vec![2u64, 5], v.iter().map(|&x| x as i64).collect()).unwrap()
    };
    let tensor = |t: &kiln_ir::TensorType, v: &[f32]| {
        Tensor::from_f32(
            t.dtype,
            t.shape.iter().map(|d| d.as_known().unwrap()).collect::<Vec<u64>>(),
            v.to_vec(),
        )
        .unwrap()
    };
    let want = kiln_ir::interp::run(
        &graph,
        &[
            ("tokens".to_string(), ti(&toks)),
            ("positions".to_string(), ti(&pos)),
            ("mtp_tokens".to_string(), ti(&mtp)),
        ]
        .into(),
        &graph.params().iter().map(|&(n, t)| (n.to_string(), tensor(t, &params[n]))).collect(),
    )
    .unwrap();
    assert_matches(&got, &want, 2e-3);
}

/// An artifact is the same, byte for byte, whatever the number of threads that compile it: kernels
/// are lowered, compiled to machine code and PTX and checked by ptxas in parallel, each on its own,
/// and put together in kernel order.
#[test]
fn artifacts_do_not_depend_on_the_number_of_threads() {
    use kiln_compiler::pack::{self, Options, Source, Targets};
    let spec = kiln_compiler::spec::load(&root().join("models/tiny.toml")).unwrap_or_else(|e| panic!("{e}"));
    let options = Options::new(Targets::All, 2, 16);
    let compile_on = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| pack::compile(Source::Spec(spec.clone()), &options, &mut ()))
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let (one, four) = (compile_on(1), compile_on(4));
    assert_eq!(one.manifest_json, four.manifest_json);
    let names = |a: &pack::Artifact| a.files.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&one), names(&four));
    for ((name, a), (_, b)) in one.files.iter().zip(&four.files) {
        assert!(a == b, "{name} differs between 1 and 4 threads");
    }
    assert_eq!(one.ptxas, four.ptxas);
}

/// The kernel cache: a second compile of the same kernels takes every object from it and writes
/// the same library; an entry changed by hand is compiled again; the PTX and ptxas's report are
/// found the same way; the lowering's options are part of the key; `KILN_NO_KERNEL_CACHE=1`
/// compiles everything; past its size limit the cache drops its entries.
#[test]
fn the_kernel_cache_gives_the_same_library_and_refuses_damaged_entries() {
    let s = Scratch::new();
    let cache = s.path("kernels");
    let cache_str = cache.display().to_string();
    let compile = |out: &str, batch: &str, env: &[(&str, &str)]| {
        let mut vars = vec![("KILN_KERNEL_CACHE_DIR", cache_str.as_str())];
        vars.extend_from_slice(env);
        let args =
            ["compile", "models/tiny.toml", "--target", "cpu", "--max-batch", batch, "--max-context", "16"];
        let r = kiln_env(&[&args[..], &["--timings", "-o", &s.str(out)]].concat(), &vars);
        assert!(r.ok, "{}", r.stderr);
        let line = r
            .stdout
            .lines()
            .find(|l| l.starts_with("kernel cache: "))
            .unwrap_or_else(|| panic!("{}", r.stdout));
        let numbers: Vec<u64> =
            line.split_whitespace().filter_map(|w| w.trim_end_matches(',').parse().ok()).collect();
        // What emitting cost: a line for the kernels compiled, none where the cache held them all.
        let emitted = r.stdout.lines().find(|l| l.starts_with("emitted: ")).map(str::to_string);
        (line.to_string(), numbers, emitted)
    };
    let library = |out: &str| std::fs::read(s.path(out).join("kernels.so")).unwrap();
    let entries =
        || std::fs::read_dir(&cache).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).collect::<Vec<_>>();

    let (line, first, emitted) = compile("first", "2", &[]);
    let n = first[1];
    assert!(n > 10, "{line}");
    let emitted = emitted.unwrap_or_else(|| panic!("no `emitted:` line after {line}"));
    assert!(emitted.starts_with(&format!("emitted: {n} CPU kernels in ")), "{emitted}");
    assert_eq!(first, [0, n, n], "{line}");
    assert!(line.contains(&cache_str) && line.contains(" CPU kernels "), "{line}");
    assert_eq!(entries().len() as u64, n);
    let (line, second, emitted) = compile("second", "2", &[]);
    assert_eq!(second, [n, n, 0], "{line}");
    assert_eq!(emitted, None, "nothing was compiled");
    assert!(library("first") == library("second"), "a library from the cache differs from a compiled one");
    let manifest = |out: &str| std::fs::read_to_string(s.path(out).join("manifest.json")).unwrap();
    assert_eq!(manifest("first"), manifest("second"));

    // One byte of one entry changed: that kernel is compiled again, the entry replaced.
    let victim = entries().into_iter().max_by_key(|p| std::fs::metadata(p).unwrap().len()).unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&victim, &bytes).unwrap();
    let (line, third, emitted) = compile("third", "2", &[]);
    assert_eq!(third, [n - 1, n, 1], "{line}");
    assert!(emitted.as_ref().is_some_and(|e| e.starts_with("emitted: 1 CPU kernel in ")), "{emitted:?}");
    assert!(library("third") == library("first"));
    let (line, fourth, _) = compile("fourth", "2", &[]);
    assert_eq!(fourth, [n, n, 0], "{line}");
    // The doctor says where the cache is and what it holds.
    let r = kiln_env(&["doctor"], &[("KILN_KERNEL_CACHE_DIR", cache_str.as_str())]);
    let line = r.stdout.lines().find(|l| l.starts_with("cache ")).unwrap_or_else(|| panic!("{}", r.stdout));
    assert!(
        line.contains(&format!("kernels in {cache_str}: {n} entries, "))
            && line.ends_with(" of 2048 MiB (KILN_NO_KERNEL_CACHE=1 turns it off)"),
        "{line}"
    );
    let r = kiln_env(&["doctor"], &[("KILN_NO_KERNEL_CACHE", "1")]);
    assert!(r.stdout.contains("cache       kernels: off"), "{}", r.stdout);

    // Other sizes: the kernels come from the cache (their sizes are symbolic).
    let (line, other, _) = compile("other", "4", &[]);
    assert_eq!(other, [n, n, 0], "{line}");

    // Off: every kernel compiled, the same library, nothing written.
    let before = entries().len();
    let (line, off, _) = compile("off", "2", &[("KILN_NO_KERNEL_CACHE", "1")]);
    assert!(line.starts_with("kernel cache: off"), "{line}");
    assert_eq!(off, [n], "{line}");
    assert!(library("off") == library("first"));
    assert_eq!(entries().len(), before);
    // `--json` gives every kernel compiled its emission's CPU time, and the cache's none.
    let emit_times = |out: &str, env: &[(&str, &str)]| {
        let mut vars = vec![("KILN_KERNEL_CACHE_DIR", cache_str.as_str())];
        vars.extend_from_slice(env);
        let args =
            ["compile", "models/tiny.toml", "--target", "cpu", "--max-batch", "2", "--max-context", "16"];
        let r = kiln_env(&[&args[..], &["--json", "-o", &s.str(out)]].concat(), &vars);
        assert!(r.ok, "{}", r.stderr);
        let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        let kernels = doc["kernels"].as_array().unwrap().clone();
        kernels.iter().map(|k| k["emit_cpu_ms"]["cpu"].as_f64()).collect::<Vec<_>>()
    };
    let times = emit_times("off-json", &[("KILN_NO_KERNEL_CACHE", "1")]);
    assert_eq!(times.len() as u64, n);
    assert!(times.iter().all(|t| t.is_some_and(|ms| ms > 0.0)), "{times:?}");
    assert!(emit_times("cached-json", &[]).iter().all(Option::is_none));

    // The PTX and ptxas's report on it: the second compile for both targets finds them too.
    let both = |out: &str| {
        let args =
            ["compile", "models/tiny.toml", "--max-batch", "2", "--max-context", "16", "--timings", "-o"];
        let r =
            kiln_env(&[&args[..], &[&s.str(out)]].concat(), &[("KILN_KERNEL_CACHE_DIR", cache_str.as_str())]);
        assert!(r.ok, "{}", r.stderr);
        let gpu =
            r.stdout.lines().find(|l| l.contains(" GPU kernels ")).unwrap_or_else(|| panic!("{}", r.stdout));
        (gpu.to_string(), std::fs::read(s.path(out).join("kernels.ptx")).unwrap())
    };
    let (line, ptx) = both("both");
    assert!(line.ends_with(" compiled; the ptxas check run") && !line.contains(" 0 compiled"), "{line}");
    let (line, again) = both("both-again");
    assert!(line.contains(" 0 compiled; the ptxas check found"), "{line}");
    assert!(ptx == again, "PTX from the cache differs from compiled PTX");
    assert!(library("both-again") == library("first"));

    // `kiln cache` says what the cache holds, `--clear` empties it and the compiled model folders.
    let root = s.path("root");
    let folder = root.join("artifacts").join("tiny-0123456789abcdef");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("manifest.json"), "{}").unwrap();
    // A link among the folders is not one of them: not counted, and `--clear` leaves its target.
    let elsewhere = s.path("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("keep.txt"), "kept").unwrap();
    std::os::unix::fs::symlink(&elsewhere, root.join("artifacts").join("linked")).unwrap();
    let root_str = root.display().to_string();
    let vars = [("KILN_KERNEL_CACHE_DIR", cache_str.as_str()), ("KILN_CACHE_DIR", root_str.as_str())];
    let held = entries().len();
    let r = kiln_env(&["cache"], &vars);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains(&format!("kernels    {cache_str}: {held} entries, ")), "{}", r.stdout);
    assert!(
        r.stdout.contains(": 1 compiled model folder, ") && r.stdout.contains("  tiny-0123456789abcdef  ")
    );
    let r = kiln_env(&["cache", "--clear", "--json"], &vars);
    assert!(r.ok, "{}", r.stderr);
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(doc["kernels"]["entries"], held as u64, "{doc}");
    assert_eq!(doc["artifacts"]["artifacts"][0]["name"], "tiny-0123456789abcdef");
    assert!(entries().is_empty() && !folder.exists(), "{:?}", entries());
    assert_eq!(doc["artifacts"]["artifacts"].as_array().map(Vec::len), Some(1), "{doc}");
    assert!(elsewhere.join("keep.txt").is_file());
    // A KILN_CACHE_DIR that is a file is refused, not reported as empty.
    let file = s.path("elsewhere").join("keep.txt").display().to_string();
    let r = kiln_env(&["cache"], &[("KILN_CACHE_DIR", file.as_str())]);
    assert!(!r.ok && r.stderr.contains(&format!("KILN_CACHE_DIR={file} is not a folder")), "{}", r.stderr);
    let (line, after, _) = compile("after-clear", "2", &[]);
    assert_eq!(after, [0, n, n], "{line}");

    // The lowering's choices are part of the key: without the packed GEMMs no kernel is found.
    // With a limit of 0 MiB the cache is emptied after the compile that stored them.
    let (line, other, _) =
        compile("unpacked", "2", &[("KILN_NO_PACKED_GEMM", "1"), ("KILN_KERNEL_CACHE_LIMIT_MB", "0")]);
    assert_eq!(other[0], 0, "{line}");
    assert!(entries().is_empty(), "{:?}", entries());
}

/// A buffer stored in a parameter is written `{"id", "value", "param"}`, the parameter's index (and
/// `shape` for a view of another shape), and read back with the declaration's dtype, shape and
/// size: the manifest reads back equal to what was written. A whole buffer in a parameter, an
/// index past the parameters, a parameter's buffer with fields of its own, and programs before
/// the parameters are each refused, saying why.
#[test]
fn parameter_buffers_are_written_by_index() {
    let s = Scratch::new();
    let out =
        kiln(&["compile", "models/tiny.toml", "--target", "cpu", "--max-context", "16", "-o", &s.str("a")]);
    assert!(out.ok, "{}", out.stderr);
    let text = std::fs::read_to_string(s.path("a").join(artifact::MANIFEST_FILE)).unwrap();
    let m = read_manifest(&s.path("a"));
    let stored = |b: &&Buffer| matches!(b.storage, Storage::Param { .. });
    let in_params: usize = m.programs.iter().map(|p| p.buffers.iter().filter(stored).count()).sum();
    assert!(in_params > 50, "{in_params}");
    // Each of them one short line, and none written whole.
    let short = text.matches(",\"param\":").count();
    assert_eq!(short, in_params);
    assert!(!text.contains("\"in\":\"param\""), "a buffer in a parameter was written whole");
    for p in &m.programs {
        for b in p.buffers.iter().filter(stored) {
            let Storage::Param { name } = &b.storage else { unreachable!() };
            let e = m.params.iter().find(|e| &e.name == name).unwrap();
            assert_eq!((b.dtype, b.kind), (e.dtype, BufferKind::Param));
            let bytes = artifact::bytes_of(e.dtype, &e.shape, &SymBindings { b: 1, t: 1, s: 1 });
            assert_eq!(Some(b.max_bytes), bytes, "{}", b.value);
        }
    }
    let again: Manifest = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
    assert_eq!(again, m);

    let refused = |text: &str, want: &str| {
        let e = serde_json::from_str::<Manifest>(text).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    };
    // The first such buffer, written whole as format 3 wrote it.
    let b = m.programs.iter().find_map(|p| p.buffers.iter().find(stored)).unwrap().clone();
    let index = m.params.iter().position(|e| Storage::Param { name: e.name.clone() } == b.storage).unwrap();
    let short = format!("{{\"id\":{},\"value\":\"{}\",\"param\":{index}}}", b.id.0, b.value);
    assert!(text.contains(&short), "{short}");
    let whole = serde_json::json!({"id": b.id.0, "value": b.value, "dtype": b.dtype, "shape": ["1"],
        "kind": "param", "storage": {"in": "param", "name": "x"}, "max_bytes": b.max_bytes});
    refused(
        &text.replacen(&short, &whole.to_string(), 1),
        "such a buffer is written `{\"id\", \"value\", \"param\"}`",
    );
    let past = format!("{{\"id\":{},\"value\":\"{}\",\"param\":{}}}", b.id.0, b.value, m.params.len());
    refused(&text.replacen(&short, &past, 1), &format!("but the manifest declares {}", m.params.len()));
    // A view of another shape (the parameter flattened) keeps its shape, and is written with it
    // (the kernel that reads it would refuse it: this is the text form alone).
    let one = SymBindings { b: 1, t: 1, s: 1 };
    let numel: u64 = m.params[index].shape.iter().map(|d| d.eval(&one).unwrap()).product();
    let view =
        format!("{{\"id\":{},\"value\":\"{}\",\"param\":{index},\"shape\":[\"{numel}\"]}}", b.id.0, b.value);
    let viewed: Manifest = serde_json::from_str(&text.replacen(&short, &view, 1)).unwrap();
    let b2 = viewed.programs.iter().flat_map(|p| &p.buffers).find(|x| x.id == b.id && stored(x)).unwrap();
    assert_eq!((b2.shape.len(), b2.dtype, b2.max_bytes, &b2.storage), (1, b.dtype, b.max_bytes, &b.storage));
    assert!(serde_json::to_string(&viewed).unwrap().contains(&view));
    let extra =
        format!("{{\"id\":{},\"value\":\"{}\",\"param\":{index},\"kind\":\"param\"}}", b.id.0, b.value);
    refused(&text.replacen(&short, &extra, 1), "whose declaration gives its dtype, kind, storage and size");
    // The top-level fields with `programs` before `params`.
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let fields = doc.as_object().unwrap();
    let mut order: Vec<&String> = fields.keys().filter(|k| *k != "params").collect();
    let at = order.iter().position(|k| *k == "programs").unwrap();
    let params = "params".to_string();
    order.insert(at + 1, &params);
    let reordered = (order.iter())
        .map(|k| format!("{}: {}", serde_json::json!(k), fields[k.as_str()]))
        .collect::<Vec<_>>();
    refused(&format!("{{{}}}", reordered.join(",")), "`params` comes before `programs`");
}
