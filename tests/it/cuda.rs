//! The CUDA backend on the tiny artifact compiled for `--target all`.
//!
//! On every machine: the launch plan of every launch step is checked against the PTX the compiler
//! wrote (each `.entry` takes one 64-bit pointer per buffer, then one 64-bit size per symbol, in
//! the order `LaunchPlan::args` packs them; every grid covers its work at the sizes of a run);
//! `kiln run --dump-logits` writes the rows generation read, which gpu-check.sh compares across
//! devices, and they match the interpreter's.
//!
//! Without a CUDA driver (the CI machines), `--device cuda` and `GpuModel::load` give the typed
//! no-driver error, and the test says it skipped the device run. With a driver and a device, the
//! tiny model runs on the GPU and its logits are compared with the CPU backend's on the same
//! weights and tokens (tolerance 1e-3 of the logits' scale: the GPU kernels use the approximate
//! `ex2`/`lg2` instructions where the CPU uses libm), and greedy generation gives the same tokens.

use std::cell::RefCell;
use std::ops::Range;
use std::path::{Path, PathBuf};

use kiln_ir::artifact::{Step, Storage};
use kiln_ir::{DType, SymBindings};
use kiln_runtime::artifact::{self, Artifact};
use kiln_runtime::cpu::{CpuModel, CpuOptions};
use kiln_runtime::generate::{generate, Engine, GenerateOptions, KvCache, Limits, Sampling};
use kiln_runtime::gpu::plan;
use kiln_runtime::gpu::{GpuModel, GpuOptions};
use kiln_runtime::weights::{self, HostData, HostTensor, WeightError};
use kiln_runtime::RuntimeError;

use crate::util::{kiln, Scratch};

/// `kiln compile models/tiny.toml --target all --max-batch 2 --max-context 16 -o DIR/tiny`.
fn compile_tiny(dir: &Scratch) -> PathBuf {
    let out = dir.path("tiny");
    let o = out.to_string_lossy().into_owned();
    let r = kiln(&[
        "compile",
        "models/tiny.toml",
        "--target",
        "all",
        "--max-batch",
        "2",
        "--max-context",
        "16",
        "-o",
        &o,
    ]);
    assert!(r.ok, "{}", r.stderr);
    out
}

fn random(art: &Artifact, seed: u64) -> Vec<HostTensor> {
    let decls = weights::manifest_params(art.manifest()).unwrap();
    weights::random_tensors(decls, seed, 0.02).collect()
}

fn ok(ts: &[HostTensor]) -> impl Iterator<Item = Result<HostTensor, WeightError>> + '_ {
    ts.iter().cloned().map(Ok)
}

fn ids(name: &str, b: u64, t: u64, v: Vec<i64>) -> HostTensor {
    HostTensor { name: name.into(), dtype: DType::I32, shape: vec![b, t], data: HostData::I64(v) }
}

/// The model's inputs for two sequences of `t` tokens: the tokens, their positions, and (for a
/// model with MTP heads) the tokens shifted by one.
fn inputs(names: &[(String, DType)], t: u64) -> Vec<HostTensor> {
    let tokens: Vec<i64> = (0..2 * t as i64).map(|i| (i * 37 + 5) % 512).collect();
    let shifted: Vec<i64> =
        (0..2 * t as usize).map(|i| if (i + 1) % t as usize == 0 { 0 } else { tokens[i + 1] }).collect();
    names
        .iter()
        .map(|(name, _)| match name.as_str() {
            "tokens" => ids(name, 2, t, tokens.clone()),
            "positions" => ids(name, 2, t, (0..2).flat_map(|_| 0..t as i64).collect()),
            "mtp_tokens" => ids(name, 2, t, shifted.clone()),
            other => panic!("the tiny model takes an input `{other}` this test does not know"),
        })
        .collect()
}

fn str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn every_launch_plan_matches_its_ptx_entry_and_covers_its_work() {
    let d = Scratch::new();
    let art = artifact::load(&compile_tiny(&d)).unwrap();
    // Every program: the prefill, the decode program over the KV cache, and the score program.
    let m = art.manifest();
    assert_eq!(m.programs.len(), 3, "models/tiny.toml compiles to prefill, decode and score by default");
    for prog in &m.programs {
        check_program(&art, m, prog);
    }
}

fn check_program(art: &Artifact, m: &kiln_ir::artifact::Manifest, prog: &kiln_ir::artifact::Program) {
    let plans = plan::plan(&m.kernels, &prog.steps, &prog.buffers).unwrap();
    let launch_steps: Vec<usize> = prog
        .steps
        .iter()
        .enumerate()
        .filter(|(_, s)| matches!(s, Step::Launch { .. }))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        plans.iter().map(|p| p.step).collect::<Vec<_>>(),
        launch_steps,
        "one plan per launch, in order"
    );
    assert!(!plans.is_empty());

    let ptx = String::from_utf8(art.read_file("kernels.ptx").unwrap()).unwrap();
    let entries = plan::entry_params(&ptx);
    assert_eq!(entries.len(), m.kernels.len(), "one .entry per kernel");
    const BASE: u64 = 0x7f00_0000_0000;
    let small = SymBindings { b: 1, t: 1, ..prog.max_sizes() };
    for sizes in [prog.max_sizes(), small] {
        for p in &plans {
            plan::check_entry(p, entries.get(&p.entry)).unwrap_or_else(|e| panic!("{e}"));
            let Step::Launch { buffers, .. } = &prog.steps[p.step] else { unreachable!() };
            assert_eq!(p.buffers.iter().map(|(b, _)| *b).collect::<Vec<_>>(), *buffers);
            let args = p.args(
                |b| match prog.buffer(b).storage {
                    Storage::Arena { offset } => BASE + offset,
                    _ => 1,
                },
                &sizes,
            );
            // One address per buffer, inside the arena at this run's size, then the sizes.
            assert_eq!(args.len(), buffers.len() + p.syms.len());
            for (&b, &a) in buffers.iter().zip(&args) {
                let buf = prog.buffer(b);
                if let Storage::Arena { offset } = buf.storage {
                    assert_eq!(a, BASE + offset);
                    assert!(offset + buf.bytes(&sizes).unwrap() <= prog.arena_bytes, "{b} leaves the arena");
                }
            }
            let tail: Vec<u64> = p.syms.iter().map(|&s| sizes.get(s)).collect();
            assert_eq!(args[buffers.len()..], tail[..]);
            // Every grid axis has just enough blocks for its work.
            let dims = p.dims(&sizes).unwrap();
            for (axis, g) in p.grid.iter().enumerate() {
                let (blocks, work) = (u64::from(dims.grid[axis]), g.work.eval(&sizes).unwrap());
                assert!(blocks * g.per_block >= work && (blocks - 1) * g.per_block < work, "{}", p.name);
            }
            assert_eq!(dims.block, m.kernel(p.kernel).gpu.as_ref().unwrap().block);
        }
    }

    // A PTX whose entry lost a parameter is refused before any launch, naming the kernel.
    let first = &plans[0];
    let broken =
        ptx.replacen(&format!(",\n\t.param .u64 {}_param_{}", first.entry, first.buffers.len()), "", 1);
    assert_ne!(broken, ptx);
    let e = plan::check_entry(first, plan::entry_params(&broken).get(&first.entry)).unwrap_err();
    assert!(
        e.to_string().starts_with(&format!("kernel k{} (`{}`) on the GPU", first.kernel.0, first.name)),
        "{e}"
    );
    let (nb, ns) = (first.buffers.len(), first.syms.len());
    let want =
        format!("declares {} parameters, but a launch passes {nb} buffers and {ns} sizes", nb + ns - 1);
    assert!(e.to_string().ends_with(&want), "{e}");
}

/// The engine, keeping every logits row generation reads, as `kiln run --dump-logits` does.
struct Recorder<'e> {
    engine: &'e mut CpuModel,
    rows: RefCell<Vec<Vec<f32>>>,
}

impl Engine for Recorder<'_> {
    fn programs(&self) -> Vec<(String, kiln_ir::ProgramKind)> {
        Engine::programs(self.engine)
    }
    fn inputs(&self, program: &str) -> Result<Vec<(String, DType)>, RuntimeError> {
        Engine::inputs(self.engine, program)
    }
    fn vocab_size(&self) -> Option<u64> {
        self.engine.vocab_size()
    }
    fn limits(&self, program: &str) -> Limits {
        self.engine.limits(program)
    }
    fn run(&mut self, program: &str, inputs: &[HostTensor]) -> Result<(), RuntimeError> {
        Engine::run(self.engine, program, inputs)
    }
    fn kv_cache(&self) -> Option<KvCache> {
        self.engine.kv_cache()
    }
    fn output_f32(&self, name: &str, range: Range<usize>) -> Result<Vec<f32>, RuntimeError> {
        let v = self.engine.output_f32(name, range)?;
        self.rows.borrow_mut().push(v.clone());
        Ok(v)
    }
}

#[test]
fn dump_logits_writes_exactly_the_rows_generation_read() {
    let d = Scratch::new();
    let dir = compile_tiny(&d);
    let dump = d.str("logits.txt");
    let args = ["run", &str(&dir), "--random-weights", "3", "--prompt-ids", "1,2,3", "--max-new-tokens", "4"];
    let r = kiln(&[&args[..], &["--ignore-eos", "--dump-logits", &dump]].concat());
    assert!(r.ok, "{}", r.stderr);
    let dumped: Vec<Vec<f32>> = std::fs::read_to_string(&dump)
        .unwrap()
        .lines()
        .map(|l| l.split(' ').map(|x| x.parse().unwrap()).collect())
        .collect();

    // The same generation in this process: `--random-weights 3` is `random_tensors(.., 3, 0.02)`.
    let art = artifact::load(&dir).unwrap();
    let params = random(&art, 3);
    let mut cpu = CpuModel::load(&art, ok(&params), &CpuOptions::default()).unwrap();
    let mut rec = Recorder { engine: &mut cpu, rows: RefCell::new(Vec::new()) };
    let greedy = GenerateOptions { max_new_tokens: 4, sampling: Sampling::Greedy, stop_tokens: vec![] };
    generate(&mut rec, &[vec![1, 2, 3]], &greedy, &mut |_| {}).unwrap();
    let rows = rec.rows.into_inner();
    assert_eq!(rows.len(), 4, "one row per generated token");
    assert!(rows.iter().all(|r| r.len() == 512 && r.iter().any(|&x| x != 0.0)), "a row is the vocabulary");
    assert_eq!(dumped, rows, "the dump reads back bit for bit");
}

#[test]
fn cuda_runs_the_tiny_model_like_the_cpu_or_says_why_not() {
    let d = Scratch::new();
    let dir = compile_tiny(&d);
    let art = artifact::load(&dir).unwrap();
    let params = random(&art, 5);
    let gpu = GpuModel::load(&art, ok(&params), &GpuOptions::default());
    let mut gpu = match gpu {
        Err(RuntimeError::NoCudaDriver) => {
            assert!(!kiln_runtime::cuda::driver_present());
            let args =
                ["run", &str(&dir), "--random-weights", "1", "--prompt-ids", "1,2", "--device", "cuda"];
            let r = kiln(&args);
            assert!(!r.ok);
            assert_eq!(
                r.stderr.trim(),
                "error: no CUDA driver: libcuda could not be loaded on this machine (is an NVIDIA driver \
                 installed?)"
            );
            let r = kiln(&[&args[..], &["--threads", "2"]].concat());
            assert!(r.stderr.contains("--threads sets the CPU backend's threads"), "{}", r.stderr);
            eprintln!("skipped the GPU run of the tiny model: no CUDA driver on this machine");
            return;
        }
        Err(RuntimeError::NoCudaDevice) => {
            eprintln!("skipped the GPU run of the tiny model: the CUDA driver sees no device");
            return;
        }
        Err(e) => panic!("a CUDA device is present but the tiny model does not load: {e}"),
        Ok(g) => g,
    };
    let mut cpu = CpuModel::load(&art, ok(&params), &CpuOptions::default()).unwrap();
    assert_eq!(gpu.arena_bytes(), cpu.arena_bytes());
    let names = Engine::inputs(&cpu, "prefill").unwrap();
    assert_eq!(Engine::inputs(&gpu, "prefill").unwrap(), names);
    let outputs: Vec<String> = vec!["logits".into()];
    for t in [16, 5] {
        let x = inputs(&names, t);
        assert_eq!(gpu.run("prefill", &x).unwrap(), cpu.run("prefill", &x).unwrap());
        for out in &outputs {
            let (g, c) = (gpu.output(out).unwrap(), cpu.output(out).unwrap());
            assert_eq!(g.shape, c.shape);
            let (HostData::F32(g), HostData::F32(c)) = (&g.data, &c.data) else {
                panic!("{out} is not float")
            };
            let scale = c.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = g.iter().zip(c).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            eprintln!("T = {t}: {out} GPU vs CPU max abs diff {diff:.3e} at scale {scale:.3e}");
            assert!(g.iter().all(|x| x.is_finite()) && scale > 0.0);
            assert!(diff <= 1e-3 * scale, "{out} at T = {t}: {diff} at scale {scale}");
        }
        // A range is copied alone, and is those elements of the whole.
        let HostData::F32(whole) = gpu.output("logits").unwrap().data else { unreachable!() };
        assert_eq!(gpu.output_f32("logits", 512..1024).unwrap(), whole[512..1024]);
    }
    assert_eq!(gpu.kv_cache(), cpu.kv_cache());
    let greedy = GenerateOptions { max_new_tokens: 6, sampling: Sampling::Greedy, stop_tokens: vec![] };
    let prompts = [vec![1, 2, 3], vec![400, 7]];
    let a = generate(&mut gpu, &prompts, &greedy, &mut |_| {}).unwrap();
    let b = generate(&mut cpu, &prompts, &greedy, &mut |_| {}).unwrap();
    assert_eq!(a.tokens, b.tokens, "greedy tokens on the GPU and the CPU");
    // The executor gives the CUDA backend what the CPU backend has: the per-expert load.
    assert_eq!(gpu.expert_load(), cpu.expert_load());
}

/// The train step compiled for both targets: every launch of every program (the train step's
/// forward, backward, clipping and AdamW) is planned against its `.entry` in the PTX, as the
/// inference programs are. Without a driver, `kiln train --device cuda` gives the typed no-driver
/// error; `--interp` and `--threads` are refused with it. With a device, three steps on CUDA give
/// the CPU's losses within 1e-5 relative (on an H200 the f32 train step stayed within 2.4e-7 of
/// the CPU's over eight steps: the kernels differ only in the GPU's approximate `exp`).
#[test]
fn the_train_step_plans_for_cuda_and_trains_there_like_the_cpu() {
    let d = Scratch::new();
    let dir = d.path("train");
    let o = str(&dir);
    let r = kiln(&[
        "compile",
        "models/tiny.toml",
        "--train",
        "--target",
        "all",
        "--max-batch",
        "4",
        "--max-context",
        "32",
        "-o",
        &o,
    ]);
    assert!(r.ok, "{}", r.stderr);
    let art = artifact::load(&dir).unwrap();
    let m = art.manifest();
    assert!(m.programs.iter().any(|p| p.name == "train_step"), "{:?}", m.programs);
    for prog in &m.programs {
        check_program(&art, m, prog);
    }
    let train = |device: &str, extra: &[&str]| {
        let out = d.path(&format!("out-{device}"));
        let args = [
            "train",
            &o,
            "--random-weights",
            "7",
            "--data",
            "tests/goldens/train/tokens.safetensors",
            "--batch",
            "4",
            "--steps",
            "3",
            "--device",
            device,
            "--out",
            &str(&out),
        ];
        (kiln(&[&args[..], extra].concat()), out)
    };
    let refused = train("cuda", &["--interp"]).0;
    assert!(!refused.ok);
    assert!(refused.stderr.contains("--device cuda runs the compiled train step"), "{}", refused.stderr);
    let refused = train("cuda", &["--threads", "2"]).0;
    assert!(refused.stderr.contains("--threads sets the CPU backend's threads"), "{}", refused.stderr);
    // NCCL sums on GPUs, over the processes of a parallel run.
    let refused = train("cpu", &["--nccl"]).0;
    assert!(
        refused.stderr.contains("--nccl sums over NCCL on GPUs: add --device cuda"),
        "{}",
        refused.stderr
    );
    let refused = train("cuda", &["--nccl"]).0;
    assert!(
        refused.stderr.contains("--nccl sums over the processes of a --dp, --ep or --pp run under mpirun"),
        "{}",
        refused.stderr
    );
    let (cuda, cuda_out) = train("cuda", &[]);
    if !kiln_runtime::cuda::driver_present() {
        assert!(!cuda.ok);
        assert_eq!(
            cuda.stderr.trim(),
            "error: no CUDA driver: libcuda could not be loaded on this machine (is an NVIDIA driver installed?)"
        );
        assert!(!cuda_out.join("metrics.jsonl").exists(), "nothing is written before the device is found");
        eprintln!("skipped the GPU training run of the tiny model: no CUDA driver on this machine");
        return;
    }
    assert!(cuda.ok, "{}", cuda.stderr);
    assert!(cuda.stdout.contains("compiled for CUDA device 0"), "{}", cuda.stdout);
    let (cpu, cpu_out) = train("cpu", &[]);
    assert!(cpu.ok, "{}", cpu.stderr);
    let losses = |out: &Path| -> Vec<f64> {
        let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        (text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()))
            .filter_map(|v| v.get("loss").and_then(|l| l.as_f64()))
            .collect()
    };
    let (g, c) = (losses(&cuda_out), losses(&cpu_out));
    assert_eq!(g.len(), 3);
    assert_eq!(c.len(), 3);
    for (step, (g, c)) in g.iter().zip(&c).enumerate() {
        eprintln!("step {step}: loss CUDA {g}, CPU {c}");
        assert!((g - c).abs() <= 1e-5 * c.abs(), "step {step}: CUDA {g}, CPU {c}");
    }
}
