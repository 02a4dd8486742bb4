//! `kiln perplexity`: the mean next-token cross-entropy and perplexity of a model on a token data
//! set, from an artifact's `score` program (on the CPU or a CUDA device) or, with `--interp`, from
//! the reference interpreter on a spec's or an artifact's score graph. The loop is
//! [`kiln_runtime::score::score`]; the data formats are [`kiln_runtime::data`]'s.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};

use kiln_compiler::{build, spec};
use kiln_ir::ProgramKind;
use kiln_runtime::artifact;
use kiln_runtime::cpu::CpuModel;
use kiln_runtime::data::{self, StreamDType, TokenRows};
use kiln_runtime::generate::Engine;
use kiln_runtime::gpu::{GpuModel, GpuOptions};
use kiln_runtime::reference::Reference;
use kiln_runtime::score::{score, Score};
use kiln_runtime::weights;

use crate::run::{self, Device, Weights};

/// What `kiln perplexity` was asked.
pub struct Request<'a> {
    pub model: &'a Path,
    pub weights: Weights<'a>,
    pub data: &'a Path,
    pub dtype: Option<&'a str>,
    pub seq_len: Option<u64>,
    pub batch: usize,
    pub interp: bool,
    pub device: Device,
    pub threads: Option<usize>,
    pub json: bool,
}

/// Runs `kiln perplexity`, printing to `out`.
pub fn run(req: &Request, out: &mut impl Write) -> Result<()> {
    let dtype = match req.dtype {
        None => None,
        Some(d) => Some(StreamDType::parse(d).with_context(|| format!("--dtype {d}: use u16 or u32"))?),
    };
    if req.batch == 0 {
        bail!("--batch must be at least 1 row");
    }
    // The data first: a bad file should not wait for a model to load.
    let format = data::format_for(req.data, dtype, req.seq_len)?;
    let rows = data::load_tokens(req.data, &format)?;
    let (name, engine_name, result) = if !run::is_artifact(req.model) {
        if !req.interp {
            return Err(run::not_an_artifact(req.model, "perplexity"));
        }
        let spec = spec::load(req.model)?;
        // The forward graph declares every parameter a checkpoint holds (MTP included), so one
        // binds as it is; the score graph reads the main model's.
        let graph = build::build_graph(&spec)?;
        let decls = weights::graph_params(&graph)?;
        let mut ckpt = None;
        let tensors =
            run::params(decls, &req.weights, Some(&spec), &mut ckpt)?.collect::<Result<Vec<_>, _>>()?;
        let mut engine = Reference::new(graph, tensors, Some(spec.model.max_position_embeddings))?;
        engine.add_program("score", ProgramKind::Score, build::build_score(&spec)?);
        (spec.model.name.clone(), "reference interpreter".to_string(), measure(&mut engine, &rows, req)?)
    } else {
        let art = artifact::load(req.model)?;
        let m = art.manifest();
        let spec = m.model.as_ref();
        let name = spec.map_or(m.name.clone(), |s| s.model.name.clone());
        let Some(program) = m.program_of_kind(ProgramKind::Score) else {
            if m.program_of_kind(ProgramKind::TrainStep).is_some() {
                bail!(
                    "{} is a train step's artifact (kiln compile --train): perplexity scores with an \
                     inference artifact; compile the model without --train",
                    req.model.display()
                );
            }
            bail!(
                "{} has no `score` program (its programs: {}): recompile it without --no-score",
                req.model.display(),
                m.program_names()
            );
        };
        let decls = weights::manifest_params(m)?;
        let mut ckpt = None;
        if req.interp {
            let tensors =
                run::params(decls, &req.weights, spec, &mut ckpt)?.collect::<Result<Vec<_>, _>>()?;
            let graph = art.program_graph(&program.name)?;
            let mut engine =
                Reference::new(graph.clone(), tensors, spec.map(|s| s.model.max_position_embeddings))?;
            engine.add_program(&program.name, ProgramKind::Score, graph);
            (name, "reference interpreter on module.kir".to_string(), measure(&mut engine, &rows, req)?)
        } else if req.device == Device::Cuda {
            if req.threads.is_some() {
                bail!("--threads sets the CPU backend's threads; it does not apply to --device cuda");
            }
            let params = run::mapped_params(decls, &req.weights, spec, &mut ckpt)?;
            let mut model = GpuModel::load(&art, params, &GpuOptions::default())?;
            let what = format!("compiled artifact on CUDA device 0, {}", model.device_name());
            (name, what, measure(&mut model, &rows, req)?)
        } else {
            let params = run::mapped_params(decls, &req.weights, spec, &mut ckpt)?;
            let mut model = CpuModel::load(&art, params, &run::cpu_options(req.threads))?;
            let what = format!("compiled artifact on the CPU, {} threads", model.threads());
            (name, what, measure(&mut model, &rows, req)?)
        }
    };
    report(out, req, &name, &engine_name, &rows, &result)
}

fn measure(engine: &mut dyn Engine, rows: &TokenRows, req: &Request) -> Result<Score> {
    Ok(score(engine, rows, req.batch)?)
}

fn report(
    out: &mut impl Write,
    req: &Request,
    name: &str,
    engine: &str,
    rows: &TokenRows,
    s: &Score,
) -> Result<()> {
    let per_s = s.tokens as f64 / s.elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
    if req.json {
        let v = serde_json::json!({
            "model": name,
            "engine": engine,
            "data": req.data.display().to_string(),
            "sequences": rows.rows(),
            "seq_len": rows.width() - 1,
            "tokens": s.tokens,
            "dropped": rows.dropped(),
            "mean_loss": s.mean_loss,
            "perplexity": s.perplexity(),
            "row_loss": s.row_loss,
            "seconds": s.elapsed.as_secs_f64(),
            "tokens_per_s": per_s,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    let dropped = match rows.dropped() {
        0 => String::new(),
        n => format!(" ({n} trailing tokens did not fill a row)"),
    };
    writeln!(
        out,
        "perplexity {name} on {}: {} sequences x {} targets = {} tokens{dropped}, {engine}",
        req.data.display(),
        rows.rows(),
        rows.width() - 1,
        s.tokens
    )?;
    writeln!(out, "mean loss   {:.6} nats/token", s.mean_loss)?;
    writeln!(out, "perplexity  {:.4}", s.perplexity())?;
    writeln!(out, "speed       {per_s:.1} tokens/s ({:.3} s)", s.elapsed.as_secs_f64())?;
    Ok(())
}
