//! `kiln report RUN_DIR [-o FILE]`: one self-contained HTML page of a `kiln train` run, from its
//! `metrics.jsonl` (the monitor's step lines and events; see `crate::monitor`).
//!
//! The page holds, as inline SVG drawn by `crate::plot`: the loss (for a `kiln grpo` run also the
//! rewards, the KL to the reference model and the clipped fraction), the global gradient norm, each
//! layer's gradient norm (log scale), the learning rate, tokens/s, one expert-load heatmap per MoE
//! layer (experts × steps, colour = the expert's load over the layer's mean), and each router's
//! selection-bias trajectory (min, mean, max); every alert of the run is a dashed vertical line
//! marked with its kind on each chart, and listed in a table. Styles are inline; there is no script
//! and no reference to anything outside the page, so it opens offline, anywhere. A step logged
//! twice (replayed after a rollback, or by a resumed run) counts once, with its last line.
//!
//! The page is written atomically (a hidden temporary renamed into place), by default to
//! `RUN_DIR/report.html`. `--compare OTHER_RUN` (repeatable) draws other runs' losses on the loss
//! chart, named by their folders (an FP8 run against its BF16 twin, say), and the command prints
//! each run's mean loss over its last 20 steps against the first run's; `--loss-svg FILE` also
//! writes the loss chart alone as a standalone SVG file.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::plot::{self, Marker, Scale, Series};

/// What the page is drawn from.
#[derive(Debug, Default)]
pub struct Run {
    /// The step lines, by step (the last line of a step wins).
    pub steps: BTreeMap<u64, Value>,
    /// The alert events, in log order.
    pub alerts: Vec<Value>,
    /// Every other event (skips, rollbacks, non-finite findings), in log order.
    pub events: Vec<Value>,
    /// The lines (numbered from 1) that are not JSON, which the page leaves out.
    pub unparsed: Vec<usize>,
}

/// Reads a run's `metrics.jsonl` text. A line that does not parse (cut short by a kill) is left
/// out, as the loss chart does, and its number kept in [`Run::unparsed`] for the CLI to say.
pub fn read(metrics: &str) -> Run {
    let mut run = Run::default();
    for (i, line) in metrics.lines().enumerate() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            if !line.trim().is_empty() {
                run.unparsed.push(i + 1);
            }
            continue;
        };
        match (v.get("event").and_then(Value::as_str), v["step"].as_u64()) {
            (Some("alert"), _) => run.alerts.push(v),
            (Some(_), _) => run.events.push(v),
            (None, Some(step)) => drop(run.steps.insert(step, v)),
            (None, None) => {}
        }
    }
    run
}

/// Reads the run in `dir` (its `metrics.jsonl`).
fn load(dir: &Path) -> Result<Run> {
    let log = dir.join("metrics.jsonl");
    if !log.is_file() {
        bail!(
            "{}: no metrics.jsonl; give the --out folder of a `kiln train`, `kiln sft` or `kiln grpo` run",
            dir.display()
        );
    }
    let text = std::fs::read_to_string(&log).with_context(|| format!("cannot read {}", log.display()))?;
    Ok(read(&text))
}

/// What `kiln report` was asked.
#[derive(Debug)]
pub struct Request<'a> {
    pub dir: &'a Path,
    /// The page (default `dir/report.html`).
    pub out: Option<&'a Path>,
    /// Other runs whose losses the loss chart draws too.
    pub compare: &'a [PathBuf],
    /// Where to write the loss chart alone, as an SVG file.
    pub loss_svg: Option<&'a Path>,
}

impl<'a> Request<'a> {
    /// The page of `dir` alone, at its default place.
    pub fn of(dir: &'a Path) -> Request<'a> {
        Request { dir, out: None, compare: &[], loss_svg: None }
    }
}

/// The steps a run's final loss is averaged over.
pub const FINAL_STEPS: usize = 20;

/// The mean loss of the last [`FINAL_STEPS`] steps of a run (fewer if it has fewer).
pub fn final_loss(run: &Run) -> Option<f64> {
    let losses: Vec<f64> = run.steps.values().filter_map(|v| v["loss"].as_f64()).collect();
    let last = &losses[losses.len().saturating_sub(FINAL_STEPS)..];
    (!last.is_empty()).then(|| last.iter().sum::<f64>() / last.len() as f64)
}

/// The name a compared run goes by: its folder's.
fn run_name(dir: &Path) -> String {
    dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned())
}

/// Writes the report; returns the path written, the run it drew and one line per run giving its
/// final loss (see [`final_loss`]) against the first run's.
pub fn write(req: &Request) -> Result<(PathBuf, Run, Vec<String>)> {
    // The runs' logs are the inputs: `-o RUN/metrics.jsonl` would replace the log it reports.
    let logs: Vec<PathBuf> = std::iter::once(req.dir)
        .chain(req.compare.iter().map(|d| d.as_ref()))
        .map(|d| d.join("metrics.jsonl"))
        .collect();
    let logs: Vec<&Path> = logs.iter().map(PathBuf::as_path).collect();
    crate::check_output_file(req.out, &logs)?;
    crate::check_output_file(req.loss_svg, &logs)?;
    let run = load(req.dir)?;
    let others: Vec<(String, Run)> =
        req.compare.iter().map(|d| Ok((run_name(d), load(d)?))).collect::<Result<_>>()?;
    let title = format!("kiln report: {}", req.dir.display());
    let name = run_name(req.dir);
    let mut losses =
        vec![series(&run, if others.is_empty() { "loss" } else { &name }, |v| v["loss"].as_f64())];
    losses.extend(others.iter().map(|(n, r)| series(r, n, |v| v["loss"].as_f64())));
    let page = html_with(&title, &run, &losses);
    let path = req.out.map_or_else(|| req.dir.join("report.html"), Path::to_path_buf);
    kiln_ir::output::write_file(&path, page.as_bytes())?;
    if let Some(svg) = req.loss_svg {
        let chart = plot::line_chart("loss", "loss", Scale::Linear, &losses, &[]);
        let chart = chart.replacen("<svg ", r#"<svg xmlns="http://www.w3.org/2000/svg" "#, 1);
        kiln_ir::output::write_file(svg, chart.as_bytes())?;
    }
    let mut lines = Vec::new();
    if !others.is_empty() {
        let base = final_loss(&run);
        for (n, r) in std::iter::once((&name, &run)).chain(others.iter().map(|(n, r)| (n, r))) {
            let line = match (final_loss(r), base) {
                (Some(l), Some(b)) if !std::ptr::eq(r, &run) => {
                    format!(
                        "{n}: loss {l:.6} over its last {FINAL_STEPS} steps, {:+.3}% against {name}",
                        100.0 * (l - b) / b
                    )
                }
                (Some(l), _) => format!("{n}: loss {l:.6} over its last {FINAL_STEPS} steps"),
                (None, _) => format!("{n}: no loss logged"),
            };
            lines.push(line);
        }
    }
    Ok((path, run, lines))
}

/// The series `f` picks from each step line, over the steps.
fn series(run: &Run, name: &str, f: impl Fn(&Value) -> Option<f64>) -> Series {
    Series {
        name: name.into(),
        points: run.steps.iter().filter_map(|(&s, v)| Some((s as f64, f(v)?))).collect(),
    }
}

/// The names under object `key` of the step lines, in first-seen order.
fn keys(run: &Run, key: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for v in run.steps.values() {
        for k in v[key].as_object().into_iter().flat_map(|o| o.keys()) {
            if !out.contains(k) {
                out.push(k.clone());
            }
        }
    }
    out
}

/// Layers in model order: the embedding, the decoder layers by number, the head.
fn layer_order(layer: &str) -> (u8, u64) {
    match layer.strip_prefix("model.layers.").and_then(|n| n.parse().ok()) {
        Some(n) => (1, n),
        None if layer.starts_with("model.embed") => (0, 0),
        None => (2, 0),
    }
}

/// The HTML page of `run` alone.
#[cfg(test)]
fn html(title: &str, run: &Run) -> String {
    html_with(title, run, &[series(run, "loss", |v| v["loss"].as_f64())])
}

/// The HTML page of `run`, its loss chart drawing `losses`.
fn html_with(title: &str, run: &Run, losses: &[Series]) -> String {
    let markers: Vec<Marker> = (run.alerts.iter())
        .filter_map(|a| {
            Some(Marker { x: a["step"].as_u64()? as f64, label: a["kind"].as_str()?.to_string() })
        })
        .collect();
    let mut charts: Vec<(String, String)> = Vec::new();
    let mut chart = |id: &str, svg: String| charts.push((id.to_string(), svg));
    let f = |k: &'static str| move |v: &Value| v[k].as_f64();
    chart("loss", plot::line_chart("loss", "loss", Scale::Linear, losses, &markers));
    // A `kiln grpo` run: the mean reward (and each reward's), the KL to the reference model and the
    // fraction of tokens whose ratio was clipped.
    if run.steps.values().any(|v| v.get("reward").is_some()) {
        let mut rewards = vec![series(run, "total", f("reward"))];
        for name in keys(run, "rewards") {
            rewards.push(series(run, &name, |v| v["rewards"][name.as_str()].as_f64()));
        }
        chart(
            "reward",
            plot::line_chart(
                "reward (mean over the step's completions)",
                "reward",
                Scale::Linear,
                &rewards,
                &markers,
            ),
        );
        chart(
            "kl",
            plot::line_chart(
                "KL to the reference model",
                "kl",
                Scale::Linear,
                &[series(run, "kl", f("kl"))],
                &markers,
            ),
        );
        chart(
            "clipped",
            plot::line_chart(
                "tokens with a clipped ratio",
                "fraction",
                Scale::Linear,
                &[series(run, "clipped", f("clipped"))],
                &markers,
            ),
        );
    }
    chart(
        "grad-norm",
        plot::line_chart(
            "gradient norm (global, before clipping)",
            "norm",
            Scale::Linear,
            &[series(run, "global", f("grad_norm"))],
            &markers,
        ),
    );
    let mut layers = keys(run, "grad_norms");
    layers.sort_by_key(|l| layer_order(l));
    if !layers.is_empty() {
        let per_layer: Vec<Series> =
            layers.iter().map(|l| series(run, l, |v| v["grad_norms"][l.as_str()].as_f64())).collect();
        chart(
            "grad-norm-layers",
            plot::line_chart("gradient norm per layer (log scale)", "norm", Scale::Log, &per_layer, &markers),
        );
    }
    chart(
        "lr",
        plot::line_chart("learning rate", "lr", Scale::Linear, &[series(run, "lr", f("lr"))], &markers),
    );
    if run.steps.values().any(|v| v.get("tokens_per_s").is_some()) {
        chart(
            "tokens-per-s",
            plot::line_chart(
                "throughput",
                "tokens/s",
                Scale::Linear,
                &[series(run, "tokens/s", f("tokens_per_s"))],
                &markers,
            ),
        );
    }
    // Expert load per MoE layer: the `load` field, [[layer, [tokens per expert]], ...].
    let mut loads: BTreeMap<String, Vec<(u64, Vec<f64>)>> = BTreeMap::new();
    for (&step, v) in &run.steps {
        for entry in v["load"].as_array().into_iter().flatten() {
            let (Some(layer), Some(l)) = (entry[0].as_str(), entry[1].as_array()) else { continue };
            let l: Vec<f64> = l.iter().filter_map(Value::as_f64).collect();
            loads.entry(layer.to_string()).or_default().push((step, l));
        }
    }
    let mut heatmaps = Vec::new();
    for (layer, by_step) in &loads {
        let experts = by_step.iter().map(|(_, l)| l.len()).max().unwrap_or(0);
        let steps: Vec<u64> = by_step.iter().map(|(s, _)| *s).collect();
        let rows: Vec<(String, Vec<f64>)> = (0..experts)
            .map(|e| {
                let values = by_step
                    .iter()
                    .map(|(_, l)| {
                        let mean = l.iter().sum::<f64>() / l.len().max(1) as f64;
                        if mean > 0.0 {
                            l.get(e).copied().unwrap_or(0.0) / mean
                        } else {
                            0.0
                        }
                    })
                    .collect();
                (format!("expert {e}"), values)
            })
            .collect();
        heatmaps.push((
            layer.clone(),
            plot::heatmap(&format!("expert load of {layer} (load / mean)"), &steps, &rows, &markers),
        ));
    }
    let mut biases = Vec::new();
    for router in keys(run, "bias") {
        let stat = |k: &'static str| {
            let r = router.clone();
            series(run, k, move |v: &Value| v["bias"][r.as_str()][k].as_f64())
        };
        let svg = plot::line_chart(
            &format!("selection bias of {router}"),
            "bias",
            Scale::Linear,
            &[stat("max"), stat("mean"), stat("min")],
            &markers,
        );
        biases.push((router, svg));
    }

    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>\n{STYLE}</style>\n</head>\n<body>\n",
        escape(title)
    );
    let _ = writeln!(s, "<h1>{}</h1>", escape(title));
    let (first, last) =
        (run.steps.keys().next().copied().unwrap_or(0), run.steps.keys().next_back().copied().unwrap_or(0));
    let final_loss = run.steps.values().next_back().and_then(|v| v["loss"].as_f64());
    let _ = writeln!(
        s,
        "<p class=\"summary\">steps {first} to {last} ({} logged), final loss {}, {} alert(s), {} other event(s)</p>",
        run.steps.len(),
        final_loss.map_or("-".into(), |l| format!("{l:.6}")),
        run.alerts.len(),
        run.events.len()
    );
    let _ = writeln!(s, "<h2 id=\"alerts\">Alerts</h2>");
    if run.alerts.is_empty() {
        let _ = writeln!(s, "<p>None.</p>");
    } else {
        let _ = writeln!(
            s,
            "<table class=\"alerts\">\n<tr><th>step</th><th>kind</th><th>action</th><th>what</th></tr>"
        );
        for a in &run.alerts {
            let _ = writeln!(
                s,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                a["step"],
                escape(a["kind"].as_str().unwrap_or("")),
                escape(a["action"].as_str().unwrap_or("")),
                escape(a["message"].as_str().unwrap_or(""))
            );
        }
        let _ = writeln!(s, "</table>");
    }
    if !run.events.is_empty() {
        let _ = writeln!(s, "<h2 id=\"events\">Recovery and diagnostics</h2>\n<ul class=\"events\">");
        for e in &run.events {
            let _ = writeln!(s, "<li><code>{}</code></li>", escape(&e.to_string()));
        }
        let _ = writeln!(s, "</ul>");
    }
    let _ = writeln!(s, "<h2 id=\"training\">Training</h2>");
    for (id, svg) in &charts {
        let _ = writeln!(s, "<figure id=\"{id}\">\n{svg}</figure>");
    }
    let _ = writeln!(s, "<h2 id=\"expert-load\">Expert load</h2>");
    if heatmaps.is_empty() {
        // A model without MoE layers, or a run that does not log loads (`kiln grpo`).
        let _ = writeln!(s, "<p>No expert load was logged.</p>");
    }
    for (layer, svg) in &heatmaps {
        let _ = writeln!(s, "<figure class=\"load\" data-layer=\"{}\">\n{svg}</figure>", escape(layer));
    }
    let _ = writeln!(s, "<h2 id=\"bias\">Routers' selection bias</h2>");
    if biases.is_empty() {
        let _ = writeln!(s, "<p>No router bias was logged.</p>");
    }
    for (router, svg) in &biases {
        let _ = writeln!(s, "<figure class=\"bias\" data-router=\"{}\">\n{svg}</figure>", escape(router));
    }
    s.push_str("</body>\n</html>\n");
    s
}

const STYLE: &str = "body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 960px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
figure { margin: 0.8em 0; } svg { display: block; border: 1px solid #eee; }
table.alerts { border-collapse: collapse; font-size: 0.9em; }
table.alerts td, table.alerts th { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; }
table.alerts th { background: #f4f4f4; } ul.events { font-size: 0.8em; } .summary { color: #555; }
";

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run with two MoE layers of 4 experts, 6 steps (step 4 logged twice, after a rollback),
    /// and two alerts.
    fn metrics() -> String {
        let mut lines = Vec::new();
        for step in [1u64, 2, 3, 4, 4, 5, 6] {
            let line = serde_json::json!({
                "step": step, "loss": 6.0 - step as f64 * 0.5, "grad_norm": 2.0, "lr": 1e-3, "tokens_per_s": 100.0,
                "grad_norms": {"model.layers.0": 1.0, "lm_head": 0.5, "model.embed_tokens": 0.1},
                "load": [["model.layers.1.mlp", [4.0, 0.0, 2.0, 2.0]], ["model.layers.2.mlp", [2.0, 2.0, 2.0, 2.0]]],
                "bias": {"model.layers.1.mlp.gate.e_score_correction_bias": {"min": -0.1, "max": 0.1, "mean": 0.0, "std": 0.05}},
            });
            lines.push(line.to_string());
            if step == 3 {
                lines.push(r#"{"event":"alert","step":4,"kind":"loss_spike","message":"the loss <x>","action":"rollback"}"#.into());
                lines.push(r#"{"event":"rollback","step":4,"to":2,"rows":[6,7]}"#.into());
            }
        }
        lines.push(
            r#"{"event":"alert","step":6,"kind":"load_imbalance","message":"m","action":"warn"}"#.into(),
        );
        lines.push(r#"{"step":7,"loss":1.0,"#.into()); // cut short by a kill
        lines.join("\n")
    }

    /// A `kiln grpo` run's page charts its rewards (the total and each one), the KL term and the
    /// clipped fraction, and no throughput it did not log.
    #[test]
    fn a_grpo_run_charts_its_rewards_and_kl() {
        let lines: Vec<String> = (1..=4)
            .map(|step| {
                serde_json::json!({"step": step, "reward": 0.1 * step as f64, "rewards": {"exact": 0.1 * step as f64},
                    "loss": 0.0, "kl": 0.01, "clipped": 0.0, "grad_norm": 0.5, "lr": 1e-3, "completion_tokens": 2.0})
                .to_string()
            })
            .collect();
        let page = html("g", &read(&lines.join("\n")));
        for id in ["reward", "kl", "clipped", "loss", "lr"] {
            assert!(page.contains(&format!("<figure id=\"{id}\">\n<svg")), "{id}");
        }
        assert!(page.contains(">exact<") && page.contains(">total<"), "a series per reward");
        assert!(!page.contains("<figure id=\"tokens-per-s\">"));
    }

    #[test]
    fn the_page_has_every_chart_the_alerts_marked_and_nothing_outside_it() {
        let run = read(&metrics());
        assert_eq!((run.steps.len(), run.alerts.len(), run.events.len()), (6, 2, 1));
        assert_eq!(run.unparsed, [11], "the line cut short, by its number");
        let page = html("t", &run);
        assert!(page.starts_with("<!DOCTYPE html>") && page.ends_with("</html>\n"));
        for id in ["loss", "grad-norm", "grad-norm-layers", "lr", "tokens-per-s"] {
            assert!(page.contains(&format!("<figure id=\"{id}\">\n<svg")), "{id}");
        }
        assert_eq!(page.matches("<svg class=\"heatmap\"").count(), 2, "one heatmap per MoE layer");
        assert_eq!(page.matches("<figure class=\"bias\"").count(), 1);
        // 5 charts + 1 bias chart + 2 heatmaps, each with both alerts.
        assert_eq!(page.matches("<g class=\"alert\">").count(), 8 * 2);
        assert!(page.contains(">loss_spike @4</text>") && page.contains("load_imbalance @6"));
        assert!(!page.contains("<figure id=\"reward\">"), "no reward chart for a pre-training run");
        assert!(page.contains("the loss &lt;x&gt;"), "escaped");
        // Self-contained: no URL, no script, no external reference.
        for banned in ["http://", "https://", "<script", "src=", "href=", "url(", "@import"] {
            assert!(!page.contains(banned), "{banned}");
        }
        // Expert 0 of layer 1 has twice the mean load, expert 1 none: the heatmap's colours.
        assert!(
            page.contains(&format!("fill=\"{}\"><title>expert 0, step 1: 2.00x mean", plot::heat_color(2.0)))
        );
        assert!(
            page.contains(&format!("fill=\"{}\"><title>expert 1, step 1: 0.00x mean", plot::heat_color(0.0)))
        );
        assert_eq!(plot::heat_color(1.0), "#ffffff");
        // The per-layer norms in model order in the legend.
        let legend = |l: &str| page.find(&format!(">{l}</text>")).unwrap();
        assert!(
            legend("model.embed_tokens") < legend("model.layers.0")
                && legend("model.layers.0") < legend("lm_head")
        );
    }
}
