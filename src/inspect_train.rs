//! `kiln inspect --train`: the memory of one training run, per device and in total, for a baseline
//! and for kiln's recipe, counted from the compiled train-step programs' buffers
//! (`kiln_compiler::train_memory`).
//!
//! Two columns, each a compiled train step at `--micro-batch` rows of `--seq-len` tokens:
//!
//! - **baseline**: the spec's dtype, f32 AdamW moments, f32 master weights of narrower weights,
//!   no recomputation, no FP8: the usual mixed-precision AdamW step;
//! - **recipe**: DeepSeek-V3's (§3.3): BF16 moments, recomputation of RMSNorm and the MLA
//!   up-projections, and with `--fp8` (or a spec with `[quantization]`) FP8 GEMMs with f32 master
//!   weights and gradients, and the attention output and SwiGLU inputs kept for the backward pass
//!   in FP8 (`cache-activations`). Its activations are also counted without recomputation (a third
//!   compile), so the table shows what recomputation saves.
//!
//! A model with more decoder layers than it has kinds of layer is compiled with one layer of each
//! kind ([`Reduced`]): the first dense layers, the last dense layer, a MoE layer followed by
//! another, and the last layer; every other layer is a copy of one of these, so each of its
//! figures is that layer's. `--full` compiles every layer instead.
//!
//! Parallelism divides the counts the way the schedule places the model: `--pp` cuts it into the
//! partition's stages (`kiln_compiler::schedule`), a rank holding the parameters, master weights,
//! moments and gradients of its stages and the activations of the micro-batches its schedule
//! keeps in flight (counted per stage, from the schedule's instruction list); `--ep` divides the
//! routed experts' parts; `--dp` compiles the step as a data-parallel replica (its all-reduces
//! are in the arena) and with `--zero1` its AdamW states are split over the replicas (with `--ep`
//! as `kiln train --ep --zero1` splits them: a routed expert's over the `--dp` replicas holding it,
//! every other weight's over the `ep · dp` processes).
//! Communication buffers are not buffers of the compiled step (the runtime's pipeline messages and
//! all-to-all buffers are its own) and are counted from their sizes: the MoE dispatch and combine of
//! one layer per chunk in flight, each stage boundary's activation and gradient transfers, and the
//! MTP modules' looked-up rows and their gradient between the embedding's stage and the head's.

use std::path::Path;

use anyhow::{bail, Context, Result};

use kiln_compiler::pack::{self, Planned};
use kiln_compiler::schedule::cost::Piece;
use kiln_compiler::schedule::{self, Kind};
use kiln_compiler::spec;
use kiln_compiler::train_memory::{self, PieceBytes, Split, StepMemory};
use kiln_ir::schedule::Instr;
use kiln_ir::{DType, ModelSpec};

use crate::table::{self, Align};

/// What `kiln inspect --train` was asked.
pub struct Request<'a> {
    pub spec: &'a Path,
    /// `--fp8` / `--no-fp8`; `None`: as the spec's `[quantization]` says.
    pub fp8: Option<bool>,
    pub micro_batch: u64,
    /// `None`: 4096, or the model's context when shorter.
    pub seq_len: Option<u64>,
    pub dp: u64,
    pub pp: u32,
    pub ep: u64,
    pub zero1: bool,
    pub schedule: Option<String>,
    pub micro_batches: Option<u32>,
    pub mtp_lambda: f64,
    pub full: bool,
    pub json: bool,
}

/// One column's compiled step: its counts per piece of the full model.
struct Column {
    label: String,
    /// Per piece of the full model, in pipeline order.
    pieces: Vec<(Piece, PieceBytes)>,
    /// The compiled step's arena peak, less its saved activations and gradients: weight copies,
    /// activation gradients and temporaries, which one layer at a time holds.
    transient: u64,
    /// The busiest step of the compiled arena.
    peak: train_memory::Peak,
    /// The compiled step's gradients, all of them.
    gradients: u64,
    /// The arena as planned, when every layer was compiled.
    arena: Option<u64>,
    /// Saved activations with recomputation off (the recipe's third compile).
    activations_no_recompute: Option<Vec<(Piece, u64)>>,
}

/// One of a [`Device`]'s figures.
type Field = fn(&Device) -> u64;

/// One device's (rank's) bytes.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
struct Device {
    params: u64,
    master: u64,
    moments: u64,
    gradients: u64,
    /// The gradients' other copies at the peak (as the backward pass made them, the data-parallel
    /// sums), in proportion to the gradients the device holds.
    gradient_copies: u64,
    activations: u64,
    activations_no_recompute: Option<u64>,
    transient: u64,
    other_states: u64,
    communication: u64,
}

impl Device {
    fn total(&self) -> u64 {
        self.params
            + self.master
            + self.moments
            + self.gradients
            + self.gradient_copies
            + self.activations
            + self.transient
            + self.other_states
            + self.communication
    }
}

/// The reduced model a long model is compiled as: which full layer each reduced layer stands for.
struct Reduced {
    spec: ModelSpec,
    /// For each layer of the full model, the reduced layer whose counts it takes.
    of_layer: Vec<u64>,
}

impl Request<'_> {
    /// Tokens per sequence ([`run`] settles the default first).
    fn t(&self) -> u64 {
        self.seq_len.unwrap_or(4096)
    }
}

/// One layer of each kind (see the module documentation), or `None` when every layer must be
/// compiled: the model is short already, or its dense and MoE layers interleave.
fn reduce(spec: &ModelSpec) -> Option<Reduced> {
    let layers = spec.model.num_hidden_layers;
    let dense = match &spec.moe {
        Some(m) if m.moe_layer_freq == 1 => m.first_k_dense_replace,
        Some(_) => return None,
        None => layers,
    };
    let moe = layers - dense;
    let (d, m) = (dense.min(2), moe.min(2));
    if d + m >= layers {
        return None;
    }
    let of_layer = (0..layers)
        .map(|i| match (i < dense, i + 1 < dense, i + 1 < layers) {
            (true, true, _) => 0,
            (true, false, _) => d - 1,
            (false, _, true) => d,
            (false, _, false) => d + m - 1,
        })
        .collect();
    let mut reduced = spec.clone();
    reduced.model.num_hidden_layers = d + m;
    if let Some(moe) = &mut reduced.moe {
        moe.first_k_dense_replace = d;
    }
    Some(Reduced { spec: reduced, of_layer })
}

/// Compiles a train step of `spec` to its memory plan and counts it.
fn measure(spec: &ModelSpec, req: &Request, moments: DType, recompute: bool) -> Result<StepMemory> {
    let options = pack::Options {
        train: Some(pack::TrainOptions {
            losses: kiln_compiler::build::TrainLosses { mtp_lambda: req.mtp_lambda, ..Default::default() },
            optimizer: kiln_compiler::train::Optimizer {
                moments,
                shards: if req.zero1 { req.dp as u32 } else { 1 },
                ..Default::default()
            },
            accumulate: false,
            data_parallel: req.dp > 1,
            expert_parallel: None,
        }),
        kv_cache: false,
        score: false,
        ..pack::Options::new(kiln_compiler::target::Targets::Cpu, req.micro_batch, req.t())
    };
    let mut passes = crate::train::Passes { skip: if recompute { vec![] } else { vec!["rematerialize"] } };
    let Planned { module, programs, .. } =
        pack::plan(pack::Source::Spec(spec.clone()), &options, &mut passes)?;
    let i = (module.programs.iter())
        .position(|p| p.kind == kiln_ir::module::ProgramKind::TrainStep)
        .context("internal error: the training module has no train_step program")?;
    Ok(train_memory::measure(
        &module,
        i,
        &programs[i].plan,
        &programs[i].memory,
        spec.model.num_hidden_layers,
    ))
}

/// A compiled step's counts spread over the full model's pieces.
fn expand(step: &StepMemory, full_layers: u64, reduced: Option<&Reduced>) -> Vec<(Piece, PieceBytes)> {
    let mut out = vec![(Piece::Embedding, step.piece(Piece::Embedding))];
    for i in 0..full_layers {
        let r = reduced.map_or(i, |r| r.of_layer[i as usize]);
        out.push((Piece::Layer(i), step.piece(Piece::Layer(r))));
    }
    out.push((Piece::Head, step.piece(Piece::Head)));
    out
}

fn column(label: String, spec: &ModelSpec, req: &Request, recipe: bool) -> Result<Column> {
    let reduced = if req.full { None } else { reduce(spec) };
    let compiled = reduced.as_ref().map_or(spec, |r| &r.spec);
    let layers = spec.model.num_hidden_layers;
    let moments = if recipe { DType::BF16 } else { DType::F32 };
    let what = || format!("compiling the {label} train step");
    let plain = measure(compiled, req, moments, false).with_context(what)?;
    let own = if recipe { measure(compiled, req, moments, true).with_context(what)? } else { plain.clone() };
    let pieces = expand(&own, layers, reduced.as_ref());
    let transient =
        own.peak.live.saturating_sub(own.peak.activations + own.peak.gradients + own.peak.gradient_copies);
    let activations_no_recompute = recipe.then(|| {
        expand(&plain, layers, reduced.as_ref())
            .into_iter()
            .map(|(p, b)| (p, b.activations.total()))
            .collect()
    });
    Ok(Column {
        label,
        pieces,
        transient,
        peak: own.peak,
        gradients: own.total().gradients.total(),
        arena: reduced.is_none().then_some(own.arena),
        activations_no_recompute,
    })
}

/// The stages of each rank under `--pp`: the pieces it holds, by chunk; and each rank's
/// instruction list.
struct Pipeline {
    /// Per stage, its pieces.
    stages: Vec<Vec<Piece>>,
    /// Per rank, the stage of each chunk.
    placement: Vec<Vec<u32>>,
    schedule: kiln_ir::schedule::Schedule,
}

fn pipeline(spec: &ModelSpec, req: &Request) -> Result<Pipeline> {
    let kind = Kind::parse(req.schedule.as_deref().unwrap_or("dualpipe")).context("--schedule")?;
    let part = schedule::partition::partition(spec, kind, req.pp, req.t())?;
    let stages = (part.stages.iter())
        .map(|s| part.pieces[s.pieces.clone()].iter().map(|(p, _)| *p).collect())
        .collect();
    let mb = req.micro_batches.unwrap_or_else(|| schedule::plan::default_micro_batches(req.pp));
    let schedule = schedule::generate(kind, req.pp, mb)?;
    Ok(Pipeline { stages, placement: part.placement, schedule })
}

/// The bytes of `pieces` of `column` on one device: the routed experts' parts divided over `ep`
/// ranks, and with `split_other` (ZeRO-1 under expert parallelism, as `kiln train --ep --zero1`
/// splits them) the other weights' AdamW states over the `ep` ranks as well as the replicas the
/// column was compiled for.
fn share(column: &Column, pieces: &[Piece], ep: u64, split_other: bool) -> PieceBytes {
    let div = |s: Split| Split { experts: s.experts.div_ceil(ep), other: s.other };
    let states =
        |s: Split| Split { other: if split_other { s.other.div_ceil(ep) } else { s.other }, ..div(s) };
    let mut b = PieceBytes::default();
    for (p, bytes) in &column.pieces {
        if pieces.contains(p) {
            b = b.plus(PieceBytes {
                params: div(bytes.params),
                master: states(bytes.master),
                moments: states(bytes.moments),
                gradients: div(bytes.gradients),
                activations: bytes.activations,
                other: bytes.other,
            });
        }
    }
    b
}

/// The peak of a rank's saved activations: `per_chunk[c]` for each micro-batch live on chunk `c`
/// (a forward adds one, a backward, or the weight step of a split backward, ends it).
fn in_flight(instrs: &[Instr], per_chunk: &[u64]) -> u64 {
    let (mut live, mut peak) = (0u64, 0u64);
    let of = |c: kiln_ir::schedule::Chunk| per_chunk.get(c.0 as usize).copied().unwrap_or(0);
    for i in instrs {
        match i {
            Instr::Forward(w) => {
                live += of(w.chunk);
                peak = peak.max(live);
            }
            Instr::ForwardBackward { forward, backward } => {
                peak = peak.max(live + of(forward.chunk));
                live = live + of(forward.chunk) - of(backward.chunk);
            }
            Instr::Backward(w) | Instr::Weight(w) => live -= of(w.chunk),
            _ => {}
        }
    }
    peak
}

/// Every device of one column: rank by pipeline rank (each `ep · dp` times).
fn devices(
    column: &Column,
    spec: &ModelSpec,
    req: &Request,
    pipe: Option<&Pipeline>,
    fp8: bool,
) -> Vec<Device> {
    let all: Vec<Piece> = column.pieces.iter().map(|(p, _)| *p).collect();
    let acts = |pieces: &[Piece], which: Option<&Vec<(Piece, u64)>>| -> u64 {
        match which {
            Some(list) => list.iter().filter(|(p, _)| pieces.contains(p)).map(|(_, b)| b).sum(),
            None => share(column, pieces, 1, false).activations.total(),
        }
    };
    // The gradients' copies at the peak, in proportion to the device's gradients.
    let copies = |grads: u64| {
        (u128::from(column.peak.gradient_copies) * u128::from(grads) / u128::from(column.gradients.max(1)))
            as u64
    };
    // The routed experts' weight copies at the peak are of the rank's experts only.
    let e = column.peak.expert_copies;
    let transient = column.transient - e + e.div_ceil(req.ep);
    let h = spec.model.hidden_size;
    let tokens = req.micro_batch * req.t();
    let top_k = spec.moe.as_ref().map_or(0, |m| m.num_experts_per_tok);
    // The MTP modules train with their loss on (`--mtp-lambda`), and are not in the step without.
    let depth = if req.mtp_lambda > 0.0 { spec.mtp.as_ref().map_or(0, |m| m.num_layers) } else { 0 };
    // MoE dispatch (FP8 codes and a scale per 128 elements in the recipe, BF16 otherwise) and
    // combine (BF16), each a send and a receive buffer of every routed row of one layer.
    let row = if fp8 { h + 4 * h.div_ceil(128) } else { 2 * h };
    let all_to_all = |chunks: u64| {
        if req.ep > 1 && top_k > 0 {
            chunks * 2 * tokens * top_k * (row + 2 * h)
        } else {
            0
        }
    };
    match pipe {
        None => {
            let b = share(column, &all, req.ep, req.zero1);
            vec![Device {
                params: b.params.total(),
                master: b.master.total(),
                moments: b.moments.total(),
                gradients: b.gradients.total(),
                gradient_copies: copies(b.gradients.total()),
                activations: b.activations.total(),
                activations_no_recompute: column
                    .activations_no_recompute
                    .as_ref()
                    .map(|l| acts(&all, Some(l))),
                transient,
                other_states: b.other,
                communication: all_to_all(1),
            }]
        }
        Some(p) => (0..req.pp as usize)
            .map(|r| {
                let chunks = &p.placement[r];
                let held: Vec<Piece> = chunks.iter().flat_map(|&s| p.stages[s as usize].clone()).collect();
                let b = share(column, &held, req.ep, req.zero1);
                let per_chunk = |which: Option<&Vec<(Piece, u64)>>| -> Vec<u64> {
                    chunks.iter().map(|&s| acts(&p.stages[s as usize], which)).collect()
                };
                let instrs = &p.schedule.ranks[r];
                // Each chunk's boundary: an activation and a gradient, sent and received, in BF16.
                let boundary = 4 * tokens * h * 2 * chunks.len() as u64;
                // The MTP modules' looked-up rows, which the embedding's stage sends to the head's,
                // and their gradient, which comes back: a buffer of each per module, on each end.
                let ends = (chunks.iter())
                    .filter(|&&s| {
                        let pieces = &p.stages[s as usize];
                        pieces.contains(&Piece::Embedding) || pieces.contains(&Piece::Head)
                    })
                    .count() as u64;
                let mtp_rows = 2 * tokens * h * 2 * depth * ends;
                Device {
                    params: b.params.total(),
                    master: b.master.total(),
                    moments: b.moments.total(),
                    gradients: b.gradients.total(),
                    gradient_copies: copies(b.gradients.total()),
                    activations: in_flight(instrs, &per_chunk(None)),
                    activations_no_recompute: column
                        .activations_no_recompute
                        .as_ref()
                        .map(|l| in_flight(instrs, &per_chunk(Some(l)))),
                    transient,
                    other_states: b.other,
                    communication: boundary + mtp_rows + all_to_all(chunks.len().min(2) as u64),
                }
            })
            .collect(),
    }
}

/// Bytes in decimal units (the article's GB are 10^9 bytes), three significant digits.
fn gb(bytes: u64) -> String {
    let units = [("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)];
    let b = bytes as f64;
    for (unit, size) in units {
        if b >= size {
            let v = b / size;
            let digits = if v >= 100.0 {
                0
            } else if v >= 10.0 {
                1
            } else {
                2
            };
            return format!("{v:.digits$} {unit}");
        }
    }
    format!("{bytes} B")
}

/// Runs `kiln inspect --train`.
pub fn run(req: &Request) -> Result<String> {
    let mut spec = spec::load(req.spec)?;
    let seq_len = req.seq_len.unwrap_or(4096.min(spec.model.max_position_embeddings));
    let req = &Request { seq_len: Some(seq_len), schedule: req.schedule.clone(), ..*req };
    if req.micro_batch == 0 || req.t() == 0 {
        bail!("--micro-batch and --seq-len must be at least 1");
    }
    if req.dp == 0 || req.pp == 0 || req.ep == 0 {
        bail!("--dp, --pp and --ep must be at least 1");
    }
    if req.pp == 1 && (req.schedule.is_some() || req.micro_batches.is_some()) {
        bail!("--schedule and --micro-batches place a pipeline: they need --pp 2 or more");
    }
    if req.zero1 && req.dp < 2 {
        bail!("--zero1 splits AdamW's states over the data-parallel replicas: it needs --dp 2 or more");
    }
    if req.t() > spec.model.max_position_embeddings {
        bail!(
            "--seq-len {} exceeds the model's max_position_embeddings {}",
            req.t(),
            spec.model.max_position_embeddings
        );
    }
    if req.ep > 1 {
        match &spec.moe {
            Some(m) if m.n_routed_experts % req.ep == 0 => {}
            Some(m) => bail!(
                "--ep {}: expert parallelism splits the {} routed experts evenly; use a divisor of {}",
                req.ep,
                m.n_routed_experts,
                m.n_routed_experts
            ),
            None => bail!("--ep {}: `{}` has no routed experts to split", req.ep, spec.model.name),
        }
    }
    let fp8 = req.fp8.unwrap_or(spec.quantization.is_some());
    let mut baseline = spec.clone();
    baseline.quantization = None;
    if fp8 && spec.quantization.is_none() {
        spec.quantization = Some(crate::train::deepseek_fp8());
    }
    if !fp8 {
        spec.quantization = None;
    }
    let dtype = spec.model.dtype;
    let pipe = if req.pp > 1 { Some(pipeline(&spec, req)?) } else { None };

    let base = column(format!("{} baseline", dtype.to_string().to_uppercase()), &baseline, req, false)?;
    let recipe_name = if fp8 { "kiln FP8 recipe" } else { "kiln recipe" };
    let recipe = column(recipe_name.to_string(), &spec, req, true)?;
    let dev_base = devices(&base, &spec, req, pipe.as_ref(), false);
    let dev_recipe = devices(&recipe, &spec, req, pipe.as_ref(), fp8);
    let replicas = req.ep * req.dp;
    let devices_count = u64::from(req.pp) * replicas;

    if req.json {
        let doc = serde_json::json!({
            "model": spec.model.name,
            "micro_batch": req.micro_batch,
            "seq_len": req.t(),
            "pp": req.pp, "ep": req.ep, "dp": req.dp, "zero1": req.zero1,
            "devices": devices_count,
            "compiled_layers": if req.full { None } else { reduce(&spec).map(|r| r.spec.model.num_hidden_layers) },
            "columns": [
                {"label": base.label, "per_rank": dev_base, "arena_planned": base.arena, "peak": base.peak,
                 "total": dev_base.iter().map(Device::total).sum::<u64>() * replicas},
                {"label": recipe.label, "per_rank": dev_recipe, "arena_planned": recipe.arena, "peak": recipe.peak,
                 "total": dev_recipe.iter().map(Device::total).sum::<u64>() * replicas},
            ],
        });
        return Ok(serde_json::to_string_pretty(&doc)? + "\n");
    }

    let mut out = String::new();
    let layers = spec.model.num_hidden_layers;
    let how = match (req.full, reduce(&spec)) {
        (false, Some(r)) => format!(
            "{} of its {layers} decoder layers compiled, one of each kind; the others are copies",
            r.spec.model.num_hidden_layers
        ),
        _ => format!("all {layers} decoder layers compiled"),
    };
    out.push_str(&format!(
        "{}: one training step, micro-batches of {} x {} tokens, on {} device{} (pp {} x ep {} x dp {}{}); {how}\n\n",
        spec.model.name,
        req.micro_batch,
        req.t(),
        devices_count,
        if devices_count == 1 { "" } else { "s" },
        req.pp,
        req.ep,
        req.dp,
        if req.zero1 { ", ZeRO-1" } else { "" },
    ));
    // The busiest rank of each column.
    let worst = |d: &[Device]| *d.iter().max_by_key(|d| d.total()).expect("at least one rank");
    let (wb, wr) = (worst(&dev_base), worst(&dev_recipe));
    let sum = |d: &[Device], f: fn(&Device) -> u64| d.iter().map(f).sum::<u64>() * replicas;
    let many = devices_count > 1;
    let (h1, h2) = (format!("{}, device", base.label), format!("{}, device", recipe.label));
    let (h3, h4) = (format!("{}, total", base.label), format!("{}, total", recipe.label));
    let mut columns =
        vec![("component", Align::Left), (h1.as_str(), Align::Right), (h2.as_str(), Align::Right)];
    if many {
        columns.extend([(h3.as_str(), Align::Right), (h4.as_str(), Align::Right)]);
    }
    let mut t = table::new(&columns);
    let rows: [(&str, Field); 10] = [
        ("parameters", |d| d.params),
        ("FP32 master weights", |d| d.master),
        ("gradients (FP32)", |d| d.gradients),
        ("gradient copies (before the FP32 cast; data-parallel sums)", |d| d.gradient_copies),
        ("optimizer moments", |d| d.moments),
        ("activations saved for backward", |d| d.activations),
        ("transient (weight copies, activation gradients, temporaries)", |d| d.transient),
        ("other state (counters, routing biases)", |d| d.other_states),
        ("communication buffers", |d| d.communication),
        ("total", Device::total),
    ];
    for (name, f) in rows {
        let mut row = vec![name.to_string(), gb(f(&wb)), gb(f(&wr))];
        if many {
            row.extend([gb(sum(&dev_base, f)), gb(sum(&dev_recipe, f))]);
        }
        t.add_row(row);
        if name.starts_with("activations") {
            if let Some(nr) = wr.activations_no_recompute {
                let total: u64 =
                    dev_recipe.iter().filter_map(|d| d.activations_no_recompute).sum::<u64>() * replicas;
                let mut row = vec!["  without recomputation".to_string(), String::new(), gb(nr)];
                if many {
                    row.extend([String::new(), gb(total)]);
                }
                t.add_row(row);
            }
        }
    }
    out.push_str(&table::render(&t));
    out.push('\n');
    if pipe.is_some() {
        out.push_str("per pipeline rank (each one of ep x dp identical devices):\n");
        let mut t = table::new(&[
            ("rank", Align::Right),
            (&base.label, Align::Right),
            (&recipe.label, Align::Right),
            ("activations in flight", Align::Right),
        ]);
        for (r, (b, c)) in dev_base.iter().zip(&dev_recipe).enumerate() {
            t.add_row(vec![r.to_string(), gb(b.total()), gb(c.total()), gb(c.activations)]);
        }
        out.push_str(&table::render(&t));
        out.push('\n');
    }
    for c in [&base, &recipe] {
        if let Some(a) = c.arena {
            out.push_str(&format!(
                "{}: the compiled step's arena is {} (the activations, gradients and transients share it)\n",
                c.label,
                gb(a)
            ));
        }
    }
    out.push_str(
        "counted from the compiled train steps' buffers; communication buffers from their sizes (no \
         communication program is compiled yet)\n",
    );
    Ok(out)
}
