//! `kiln bench train`: the compiled train step's tokens/s and peak memory against PyTorch eager
//! (transformers, `tools/bench/train_torch.py`) on the same model, weights and batch, in one run.
//!
//! Both sides train the spec's model from the same random weights (`--random-weights`) on one
//! fixed batch of `--batch` rows of `--seq-len` tokens: the mean next-token cross-entropy,
//! backward, clipping at 1.0 and AdamW (lr 1e-3, betas 0.9 / 0.95, weight decay 0.1) over every
//! parameter, one warm-up step and then `--steps` timed ones, with the same number of threads.
//! tokens/s = B * T / the median step time. Peak memory is the process's peak resident set from
//! after the model is loaded to the last step (`/proc/self/clear_refs` resets `VmHWM`), which
//! counts the weights, the optimizer's moments, the gradients and the activations on both sides
//! and leaves out the compile and the load. The two step-0 losses are printed side by side: the
//! same model and data give the same loss, so a mismatch means the comparison is not fair.
//!
//! PyTorch runs in a Python with torch and transformers: `--python`, else `$KILN_PYTHON`, else the
//! venv of tools/goldens (`~/.cache/kiln-venv/bin/python`) when it exists; without one the table
//! has kiln's row alone and says why.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use kiln_compiler::pack;
use kiln_compiler::{build, spec};
use kiln_ir::DType;
use kiln_runtime::cpu::CpuModel;
use kiln_runtime::data::TokenRows;
use kiln_runtime::train::CompiledTrainer;
use kiln_runtime::weights::{self, HostData, HostTensor, StoreFloats};

/// What `kiln bench train` was asked.
pub struct Request<'a> {
    pub spec: &'a Path,
    pub batch: usize,
    pub seq_len: usize,
    pub steps: usize,
    pub seed: u64,
    pub threads: Option<usize>,
    pub python: Option<&'a Path>,
    /// Print the time per kernel over the timed steps.
    pub profile: bool,
    /// kiln's AdamW moments in bf16 (PyTorch's stay f32).
    pub bf16_moments: bool,
    /// `--precision`: kiln's step in each of these (`f32`, `bf16`, `fp8`) instead of PyTorch.
    pub precisions: Vec<String>,
}

/// One engine's figures.
struct Figures {
    engine: String,
    loss0: f64,
    /// Seconds of each timed step.
    seconds: Vec<f64>,
    peak_kib: Option<u64>,
}

impl Figures {
    fn median(&self) -> f64 {
        let mut s = self.seconds.clone();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    }
}

/// A scratch folder removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `VmHWM` of this process in KiB.
fn peak_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line["VmHWM:".len()..].trim().trim_end_matches("kB").trim().parse().ok()
}

/// Resets `VmHWM` to the current resident set; false where the kernel does not allow it.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The fixed batch: row r, position i holds (i * 7919 + r * 104729 + 3) mod vocab.
fn batch(rows: usize, width: usize, vocab: u64) -> Result<TokenRows> {
    let ids =
        (0..rows).flat_map(|r| (0..width).map(move |i| ((i * 7919 + r * 104_729 + 3) as u64 % vocab) as i64));
    Ok(TokenRows::from_rows(width, ids.collect())?)
}

/// The Python that runs the baseline, and where it came from.
pub fn python(given: Option<&Path>) -> Option<(PathBuf, &'static str)> {
    if let Some(p) = given {
        return Some((p.to_path_buf(), "--python"));
    }
    if let Some(p) = std::env::var_os("KILN_PYTHON") {
        return Some((PathBuf::from(p), "$KILN_PYTHON"));
    }
    let venv = PathBuf::from(std::env::var_os("HOME")?).join(".cache/kiln-venv/bin/python");
    venv.is_file().then_some((venv, "the tools/goldens venv"))
}

/// Runs `kiln bench train`, printing to `out`.
pub fn run(req: &Request, tables: &mut crate::bench::Tables) -> Result<serde_json::Value> {
    if req.batch == 0 || req.seq_len == 0 || req.steps == 0 {
        bail!("--batch, --seq-len and --steps must be at least 1");
    }
    let spec = spec::load(req.spec)?;
    if !req.precisions.is_empty() {
        return precisions(req, spec, tables);
    }
    if spec.quantization.is_some() {
        bail!(
            "{}: bench train uses random weights, which FP8 checkpoints' block scales do not model; \
             remove [quantization]",
            req.spec.display()
        );
    }
    if req.seq_len as u64 > spec.model.max_position_embeddings {
        bail!(
            "--seq-len {} exceeds the model's max_position_embeddings {}",
            req.seq_len,
            spec.model.max_position_embeddings
        );
    }
    let dir = std::env::temp_dir().join(format!("kiln-bench-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let scratch = Scratch(dir);
    let rows = batch(req.batch, req.seq_len + 1, spec.model.vocab_size)?;

    // The train step, compiled for these sizes.
    let t0 = Instant::now();
    let options = pack::Options {
        train: Some(kiln_compiler::pack::TrainOptions {
            optimizer: kiln_compiler::train::Optimizer {
                moments: if req.bf16_moments { kiln_ir::DType::BF16 } else { kiln_ir::DType::F32 },
                ..Default::default()
            },
            ..Default::default()
        }),
        kv_cache: false,
        score: false,
        ..pack::Options::new(kiln_compiler::target::Targets::Cpu, req.batch as u64, req.seq_len as u64)
    };
    let artifact = pack::compile(pack::Source::Spec(spec.clone()), &options, &mut ())?;
    let art_dir = scratch.0.join("train.kiln");
    pack::write(&artifact, &art_dir)?;
    drop(artifact);
    let compile_s = t0.elapsed().as_secs_f64();

    // The weights, written as a Hugging Face folder for PyTorch first.
    let tensors = weights::random_params(&build::build_graph(&spec)?, req.seed, crate::run::RANDOM_STD)?;
    let hf = scratch.0.join("hf");
    let py = python(req.python);
    if py.is_some() {
        std::fs::create_dir_all(&hf)?;
        let config = serde_json::to_string_pretty(&spec::to_hf_config(&spec))? + "\n";
        std::fs::write(hf.join("config.json"), config)?;
        weights::write_safetensors(&hf.join("model.safetensors"), &tensors, StoreFloats::AsDeclared)?;
        let ids: Vec<i64> = (0..rows.rows()).flat_map(|r| rows.row(r).to_vec()).collect();
        let t = HostTensor {
            name: "tokens".into(),
            dtype: DType::I64,
            shape: vec![rows.rows() as u64, rows.width() as u64],
            data: HostData::I64(ids),
        };
        weights::write_safetensors(&scratch.0.join("tokens.safetensors"), &[t], StoreFloats::AsDeclared)?;
    }

    // kiln.
    let art = kiln_runtime::artifact::load(&art_dir)?;
    let wanted: std::collections::HashSet<String> =
        weights::manifest_params(art.manifest())?.into_iter().map(|d| d.name).collect();
    let given = tensors.into_iter().filter(|t| wanted.contains(&t.name)).map(Ok);
    let model = CpuModel::load(&art, given, &crate::run::cpu_options(req.threads))?;
    let threads = model.threads();
    let mut trainer = CompiledTrainer::new(model)?;
    let measured = reset_peak();
    let mut kiln = Figures {
        engine: format!(
            "kiln, compiled ({threads} threads{})",
            if req.bf16_moments { ", bf16 moments" } else { "" }
        ),
        loss0: f64::NAN,
        seconds: Vec::new(),
        peak_kib: None,
    };
    time_steps(&mut trainer, &rows, req, &mut kiln)?;
    kiln.peak_kib = if measured { peak_kib() } else { None };
    let profile = trainer.executor().profile();
    drop(trainer);

    // PyTorch.
    let torch = match &py {
        None => Err("no Python with torch: pass --python or set KILN_PYTHON".to_string()),
        Some((python, _)) => torch(python, &scratch.0, req.steps, threads),
    };

    let tokens = (req.batch * req.seq_len) as f64;
    let out = tables.text();
    writeln!(
        out,
        "bench train {}: {} x {} tokens per step, {} timed steps after one warm-up; compiled in {compile_s:.1} s",
        spec.model.name, req.batch, req.seq_len, req.steps
    )?;
    use crate::table::Align::{Left, Right};
    let mut table = crate::table::new(&[
        ("engine", Left),
        ("tokens/s", Right),
        ("step (s)", Right),
        ("peak memory", Right),
        ("step-0 loss", Right),
    ]);
    let row = |f: &Figures| {
        let peak = f.peak_kib.map_or("n/a".to_string(), |k| format!("{:.2} GiB", k as f64 / 1048576.0));
        vec![
            f.engine.clone(),
            format!("{:.1}", tokens / f.median()),
            format!("{:.3}", f.median()),
            peak,
            format!("{:.6}", f.loss0),
        ]
    };
    table.add_row(row(&kiln));
    let figures = |f: &Figures| {
        serde_json::json!({
            "engine": f.engine,
            "tokens_per_s": tokens / f.median(),
            "step_s": f.median(),
            "peak_bytes": f.peak_kib.map(|k| k * 1024),
            "step0_loss": f.loss0,
        })
    };
    let mut doc = serde_json::json!({
        "bench": "train",
        "model": spec.model.name,
        "batch": req.batch,
        "seq_len": req.seq_len,
        "steps": req.steps,
        "compile_s": compile_s,
        "engines": [figures(&kiln)],
    });
    match torch {
        Ok(t) => {
            table.add_row(row(&t));
            write!(out, "{}", crate::table::render(&table))?;
            let speed = t.median() / kiln.median();
            let memory_ratio = match (kiln.peak_kib, t.peak_kib) {
                (Some(k), Some(p)) => Some(k as f64 / p as f64),
                _ => None,
            };
            let memory = memory_ratio.map_or("n/a".into(), |r| format!("{r:.2}"));
            writeln!(out, "kiln / PyTorch: tokens/s {speed:.2}x, peak memory {memory}x")?;
            doc["engines"].as_array_mut().expect("a list").push(figures(&t));
            doc["speed_ratio"] = speed.into();
            doc["memory_ratio"] = memory_ratio.into();
            let rel = (kiln.loss0 - t.loss0).abs() / t.loss0.abs();
            if rel > 1e-3 {
                writeln!(
                    out,
                    "warning: the step-0 losses differ by {rel:.1e} relative: not the same computation"
                )?;
            }
        }
        Err(why) => {
            write!(out, "{}", crate::table::render(&table))?;
            writeln!(out, "PyTorch eager: skipped ({why})")?;
            doc["baseline_skipped"] = why.into();
        }
    }
    if req.profile {
        crate::run::write_profile_of(&profile, &format!("kiln's {} timed steps", req.steps), &mut &mut *out)?;
        let kernels: Vec<serde_json::Value> = (profile.iter().filter(|t| t.nanos > 0))
            .map(
                |t| serde_json::json!({"kernel": t.name, "ms": t.nanos as f64 / 1e6, "launches": t.launches}),
            )
            .collect();
        doc["profile"] = kernels.into();
    }
    Ok(doc)
}

/// One warm-up step (its loss into `f`), then `--steps` timed ones (their seconds into `f`), with
/// `--profile`'s per-kernel times over the timed ones.
fn time_steps(
    trainer: &mut CompiledTrainer<kiln_runtime::cpu::CpuBackend>,
    rows: &TokenRows,
    req: &Request,
    f: &mut Figures,
) -> Result<()> {
    for step in 0..=req.steps {
        if step == 1 {
            trainer.executor_mut().set_profiling(req.profile);
        }
        let t = Instant::now();
        let s = trainer.step(rows, 1e-3)?;
        if step == 0 {
            f.loss0 = f64::from(s.loss);
        } else {
            f.seconds.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(())
}

/// Runs `tools/bench/SCRIPT` in `python` with `args`; the JSON object its last line of output
/// is, or why there is none.
pub fn python_json(
    python: &Path,
    script: &str,
    args: &[std::ffi::OsString],
) -> Result<serde_json::Value, String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/bench").join(script);
    if !path.is_file() {
        return Err(format!("{} is not here (kiln runs it from its source tree)", path.display()));
    }
    let r = std::process::Command::new(python)
        .arg(&path)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !r.status.success() {
        let err = String::from_utf8_lossy(&r.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        return Err(format!("{} failed: {last}", python.display()));
    }
    let text = String::from_utf8_lossy(&r.stdout);
    serde_json::from_str(text.lines().last().unwrap_or(""))
        .map_err(|e| format!("{script} printed no result: {e}"))
}

/// Runs tools/bench/train_torch.py on the folder's `hf/` and `tokens.safetensors`.
fn torch(python: &Path, dir: &Path, steps: usize, threads: usize) -> Result<Figures, String> {
    let mut args: Vec<std::ffi::OsString> = vec!["--model".into(), dir.join("hf").into(), "--tokens".into()];
    args.push(dir.join("tokens.safetensors").into());
    args.extend(["--steps".into(), steps.to_string().into(), "--threads".into(), threads.to_string().into()]);
    let json = python_json(python, "train_torch.py", &args)?;
    let seconds: Vec<f64> =
        serde_json::from_value(json["step_seconds"].clone()).map_err(|e| e.to_string())?;
    if seconds.is_empty() {
        return Err("train_torch.py timed no step".into());
    }
    let version = json["versions"]["torch"].as_str().unwrap_or("?");
    Ok(Figures {
        engine: format!("PyTorch {version} eager ({threads} threads)"),
        loss0: json["losses"][0].as_f64().unwrap_or(f64::NAN),
        seconds,
        peak_kib: json["peak_rss_kib"].as_u64(),
    })
}

/// `--precision`: kiln's train step on the same model, weights and batch in each precision, one
/// after the other, each against the first. The spec's `[quantization]` is replaced: `fp8` is
/// DeepSeek-V3's recipe (128x128 weight blocks, 1x128 and 128x1 activation tiles, online scales).
fn precisions(
    req: &Request,
    spec: kiln_ir::ModelSpec,
    tables: &mut crate::bench::Tables,
) -> Result<serde_json::Value> {
    if req.seq_len as u64 > spec.model.max_position_embeddings {
        bail!(
            "--seq-len {} exceeds the model's max_position_embeddings {}",
            req.seq_len,
            spec.model.max_position_embeddings
        );
    }
    let rows = batch(req.batch, req.seq_len + 1, spec.model.vocab_size)?;
    let dir = std::env::temp_dir().join(format!("kiln-bench-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let scratch = Scratch(dir);
    let tokens = (req.batch * req.seq_len) as f64;
    let mut measured: Vec<(String, Figures, f64, Vec<kiln_runtime::exec::KernelTime>)> = Vec::new();
    for p in &req.precisions {
        let mut s = spec.clone();
        s.quantization = None;
        s.model.dtype = if p == "f32" { DType::F32 } else { DType::BF16 };
        // The weights: the same seeded values, stored in the precision's dtype.
        let tensors = weights::random_params(&build::build_graph(&s)?, req.seed, crate::run::RANDOM_STD)?;
        if p == "fp8" {
            s.quantization = Some(crate::train::deepseek_fp8());
        }
        let moments = if p == "f32" { DType::F32 } else { DType::BF16 };
        let t0 = Instant::now();
        let options = pack::Options {
            train: Some(kiln_compiler::pack::TrainOptions {
                optimizer: kiln_compiler::train::Optimizer { moments, ..Default::default() },
                ..Default::default()
            }),
            kv_cache: false,
            score: false,
            ..pack::Options::new(kiln_compiler::target::Targets::Cpu, req.batch as u64, req.seq_len as u64)
        };
        let artifact = pack::compile(pack::Source::Spec(s), &options, &mut ())
            .with_context(|| format!("compiling the {p} train step"))?;
        let art_dir = scratch.0.join(format!("train-{p}.kiln"));
        pack::write(&artifact, &art_dir)?;
        drop(artifact);
        let compile_s = t0.elapsed().as_secs_f64();
        let art = kiln_runtime::artifact::load(&art_dir)?;
        let wanted: std::collections::HashSet<String> =
            weights::manifest_params(art.manifest())?.into_iter().map(|d| d.name).collect();
        let given = tensors.into_iter().filter(|t| wanted.contains(&t.name)).map(Ok);
        let model = CpuModel::load(&art, given, &crate::run::cpu_options(req.threads))?;
        let threads = model.threads();
        let mut trainer = CompiledTrainer::new(model)?;
        let reset = reset_peak();
        let mut f = Figures {
            engine: format!("kiln {p} ({threads} threads)"),
            loss0: f64::NAN,
            seconds: Vec::new(),
            peak_kib: None,
        };
        time_steps(&mut trainer, &rows, req, &mut f)?;
        f.peak_kib = if reset { peak_kib() } else { None };
        let profile = trainer.executor().profile();
        measured.push((p.clone(), f, compile_s, profile));
    }

    let out = tables.text();
    writeln!(
        out,
        "bench train {}: {} x {} tokens per step, {} timed steps after one warm-up, each precision against {}",
        spec.model.name, req.batch, req.seq_len, req.steps, req.precisions[0]
    )?;
    use crate::table::Align::{Left, Right};
    let mut table = crate::table::new(&[
        ("engine", Left),
        ("tokens/s", Right),
        ("speed", Right),
        ("peak memory", Right),
        ("step-0 loss", Right),
        ("compile (s)", Right),
    ]);
    let first = measured[0].1.median();
    let mut engines = Vec::new();
    for (p, f, compile_s, _) in &measured {
        let peak = f.peak_kib.map_or("n/a".to_string(), |k| format!("{:.2} GiB", k as f64 / 1048576.0));
        table.add_row(vec![
            f.engine.clone(),
            format!("{:.1}", tokens / f.median()),
            format!("{:.2}x", first / f.median()),
            peak,
            format!("{:.6}", f.loss0),
            format!("{compile_s:.1}"),
        ]);
        engines.push(serde_json::json!({
            "precision": p,
            "engine": f.engine,
            "tokens_per_s": tokens / f.median(),
            "speed_ratio": first / f.median(),
            "step_s": f.median(),
            "peak_bytes": f.peak_kib.map(|k| k * 1024),
            "step0_loss": f.loss0,
            "compile_s": compile_s,
        }));
    }
    write!(out, "{}", crate::table::render(&table))?;
    writeln!(
        out,
        "FP8 on this CPU is the recipe's numerics, not its speed: its GEMMs read dequantised f32 operands and sum each \
         128-block exactly; the speed of FP8 belongs to tensor cores"
    )?;
    if req.profile {
        for (p, _, _, profile) in &measured {
            crate::run::write_profile_of(
                profile,
                &format!("kiln {p}'s {} timed steps", req.steps),
                &mut &mut *out,
            )?;
        }
    }
    Ok(serde_json::json!({
        "bench": "train",
        "model": spec.model.name,
        "batch": req.batch,
        "seq_len": req.seq_len,
        "steps": req.steps,
        "engines": engines,
    }))
}
