//! `kiln compile --pp`'s views of the parallel plan: `--emit plan` (the plan alone, from the spec,
//! without compiling) and the summary printed after a compile or beside the plan's file. The plan
//! itself is `kiln_compiler::schedule::plan`'s.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use kiln_compiler::pack;
use kiln_ir::artifact::ParallelPlan;

use super::{load_source, Args};

/// `--emit plan`: the parallel plan alone, from the spec, without compiling (milliseconds, where
/// DeepSeek-V3's compile takes seconds).
pub(super) fn emit(req: &Args, options: &pack::Options, out: &mut dyn Write) -> Result<()> {
    if options.parallel.is_none() {
        bail!("--emit plan prints the parallel plan of --pp: give --pp P (and --ep, --schedule, --micro-batches as needed)");
    }
    if req.report || req.timings || req.print_after.is_some() || !req.disable_pass.is_empty() {
        bail!(
            "--emit plan stops before compiling, so --report, --timings, --print-after and --disable-pass \
             have nothing to show; leave them out, or compile with --pp and without --emit plan"
        );
    }
    let inputs: Vec<&Path> = [Some(req.input.as_path()), req.spec.as_deref()].into_iter().flatten().collect();
    crate::check_output_file(req.output.as_deref(), &inputs)?;
    let source = load_source(&req.input, req.spec.as_deref())?;
    let plan = pack::parallel_plan(source.spec(), options)?.context("internal error: no plan was made")?;
    let json = pack::plan_json(&plan)?;
    match &req.output {
        Some(path) => {
            kiln_ir::output::write_file(path, json.as_bytes())?;
            out.write_all(summary(&plan, mtp_depth(source.spec())).as_bytes())?;
            writeln!(out, "wrote {}", path.display())?;
        }
        None => out.write_all(json.as_bytes())?,
    }
    Ok(())
}

/// The MTP depth of a spec (0 without one).
pub(super) fn mtp_depth(spec: Option<&kiln_ir::ModelSpec>) -> u64 {
    spec.and_then(|s| s.mtp.as_ref()).map_or(0, |m| m.num_layers)
}

/// `x` with an SI prefix and three significant digits: `5.37 G`, `912 k`, `12`.
fn si(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    let (v, prefix) = [(1e12, " T"), (1e9, " G"), (1e6, " M"), (1e3, " k")]
        .into_iter()
        .find(|(scale, _)| x >= *scale)
        .map_or((x, " "), |(scale, p)| (x / scale, p));
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    format!("{v:.digits$}{prefix}").trim_end().to_string()
}

/// A count of weights as models are named: `671B`, `11.6M`, `912K`, `64`.
fn weights(n: u64) -> String {
    let x = n as f64;
    let (v, suffix) = [(1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")]
        .into_iter()
        .find(|(scale, _)| x >= *scale)
        .map_or((x, ""), |(scale, p)| (x / scale, p));
    let digits = if suffix.is_empty() || v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    format!("{v:.digits$}{suffix}")
}

/// Bytes in binary units: `224 MiB`, `1.50 KiB`, `96 B`.
fn bytes(n: u64) -> String {
    let x = n as f64;
    let (v, unit) = [(1u64 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")]
        .into_iter()
        .find(|(scale, _)| n >= *scale)
        .map_or((x, "B"), |(scale, u)| (x / scale as f64, u));
    let digits = if unit == "B" || v >= 100.0 || v.fract() == 0.0 { 0 } else { 2 };
    format!("{v:.digits$} {unit}")
}

/// Consecutive numbers as ranges, each number after `prefix`: `3-60, 62`, `r1-r14`.
pub(crate) fn ranges(xs: &[u64], prefix: &str) -> String {
    let mut parts: Vec<(u64, u64)> = Vec::new();
    for &x in xs {
        match parts.last_mut() {
            Some(p) if p.1 + 1 == x => p.1 = x,
            _ => parts.push((x, x)),
        }
    }
    let show = |&(a, b): &(u64, u64)| {
        if a == b {
            format!("{prefix}{a}")
        } else {
            format!("{prefix}{a}-{prefix}{b}")
        }
    };
    parts.iter().map(show).collect::<Vec<_>>().join(", ")
}

/// The summary of a parallel plan: the stages with their layers and share of the cost, what each
/// rank holds and how it fared in the simulated step, the experts' placement and the dispatch of
/// a MoE layer. `mtp` is the model's MTP depth (the head holds the MTP modules).
pub(super) fn summary(plan: &ParallelPlan, mtp: u64) -> String {
    use crate::table::Align::{Left, Right};
    let n = plan.stages.len();
    let mut text = format!(
        "parallel plan: {} on {} ranks, {} micro-batches, {n} stages{}; costs per token of a {}-token sequence\n",
        plan.schedule,
        plan.pp,
        plan.micro_batches,
        if n > plan.pp as usize || plan.ranks.iter().any(|r| r.stages.len() > 1) {
            format!(" ({} per rank)", plan.ranks.first().map_or(0, |r| r.stages.len()))
        } else {
            String::new()
        },
        plan.seq_len
    );
    let total: f64 = plan.stages.iter().map(|s| s.forward_flops as f64).sum();
    let mut t = crate::table::new(&[
        ("stage", Left),
        ("holds", Left),
        ("forward FLOPs", Right),
        ("share", Right),
        ("weights", Right),
    ]);
    for s in &plan.stages {
        let mut holds = Vec::new();
        if s.embedding {
            holds.push("embedding".to_string());
        }
        match s.layers.end - s.layers.start {
            0 => {}
            1 => holds.push(format!("layer {}", s.layers.start)),
            _ => holds.push(format!("layers {}-{}", s.layers.start, s.layers.end - 1)),
        }
        if s.head {
            holds.push(match mtp {
                0 => "head".to_string(),
                1 => "head, MTP".to_string(),
                d => format!("head, {d} MTP modules"),
            });
        }
        let share = if total > 0.0 { 100.0 * s.forward_flops as f64 / total } else { 0.0 };
        t.add_row(vec![
            s.stage.to_string(),
            holds.join(", "),
            si(s.forward_flops as f64),
            format!("{share:.1}%"),
            weights(s.params),
        ]);
    }
    text.push_str(&crate::table::render(&t));
    let mut t = crate::table::new(&[
        ("rank", Left),
        ("stages", Left),
        ("weights", Right),
        ("busy", Right),
        ("bubble", Right),
        ("activations", Right),
    ]);
    for r in &plan.ranks {
        let stages: Vec<String> = r.stages.iter().map(u32::to_string).collect();
        t.add_row(vec![
            format!("r{}", r.rank),
            stages.join(", "),
            weights(r.params),
            si(r.busy),
            si(r.bubble),
            r.peak_activations.to_string(),
        ]);
    }
    text.push('\n');
    text.push_str(&crate::table::render(&t));
    let worst: Vec<u64> =
        plan.ranks.iter().filter(|r| r.bubble == plan.bubble).map(|r| u64::from(r.rank)).collect();
    let share = if plan.makespan > 0.0 { 100.0 * plan.bubble / plan.makespan } else { 0.0 };
    text.push_str(&format!(
        "simulated step: makespan {}, bubble {} ({share:.1}% of the step; the largest of a rank: {}), in forward \
         FLOPs per token with B = 2F and no transfer time\n",
        si(plan.makespan),
        si(plan.bubble),
        ranges(&worst, "r")
    ));
    let Some(x) = &plan.experts else {
        text.push_str("experts: none (the model has no MoE layers)\n");
        return text;
    };
    let per_rank = |r: usize| x.ranks.get(r).map(|e| format!("r{r} {}-{}", e.start, e.end.saturating_sub(1)));
    let shown: Vec<String> = match x.ranks.len() {
        0..=4 => (0..x.ranks.len()).filter_map(per_rank).collect(),
        k => [per_rank(0), per_rank(1), Some("...".into()), per_rank(k - 1)].into_iter().flatten().collect(),
    };
    text.push_str(&format!(
        "experts: {} per MoE layer over {} ranks, {} per rank ({})",
        x.experts,
        plan.ep,
        x.experts_per_rank,
        shown.join(", ")
    ));
    if x.groups > 1 {
        text.push_str(&format!(
            "; a token's {} experts come from at most {} of {} groups",
            x.top_k, x.topk_groups, x.groups
        ));
        if let Some(g) = x.ranks_per_group {
            text.push_str(&format!(" ({g} rank{} each)", if g == 1 { "" } else { "s" }));
        }
    }
    text.push('\n');
    let Some(first) = x.layers.first() else { return text };
    let d = &first.dispatch;
    // The main model's layers, then the MTP modules' (numbered on from them).
    let main = plan.stages.last().map_or(0, |s| s.layers.end);
    let (own, of_mtp): (Vec<u64>, Vec<u64>) = x.layers.iter().map(|l| l.layer).partition(|&l| l < main);
    let mut which = ranges(&own, "");
    if !of_mtp.is_empty() {
        which.push_str(&format!(" and MTP {}", ranges(&of_mtp, "")));
    }
    text.push_str(&format!(
        "dispatch of each of the {} MoE layers ({which}), {} tokens of {} x {}:\n",
        x.layers.len(),
        d.tokens,
        d.hidden,
        d.dtype.name()
    ));
    if d.all_to_all.is_empty() {
        text.push_str("  no all-to-all (ep 1: every expert is local)\n");
    }
    for a in &d.all_to_all {
        text.push_str(&format!(
            "  {:<8}  a rank receives worst {} rows ({}), expected {} rows ({})\n",
            a.name,
            a.worst_rows,
            bytes(a.worst_bytes),
            a.expected_rows,
            bytes(a.expected_bytes)
        ));
    }
    text
}
