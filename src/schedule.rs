//! `kiln schedule`: generate a pipeline schedule (1F1B, ZB1P, DualPipe, DualPipeV), verify it,
//! simulate it with given costs, and print per rank the bubble, the peak activations and the
//! parameter copies; optionally draw the timeline as SVG and write a Chrome/Perfetto trace. The
//! schedules, the verifier and the simulator are `kiln_compiler::schedule`; this is the I/O.
//!
//! The SVG and the trace are written atomically (`kiln_ir::output::write_file`). The trace reads
//! one cost unit as one microsecond.

use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use kiln_compiler::schedule::simulate::{CostError, Event};
use kiln_compiler::schedule::{self, Costs, Kind, Simulation};
use kiln_ir::schedule::{Instr, Schedule, Work};
use serde_json::json;

use crate::table::{self, Align};

/// What `kiln schedule` was asked.
pub struct Request<'a> {
    pub pp: u32,
    pub micro_batches: u32,
    pub schedule: &'a str,
    /// `F,B,W` or `F,B,W,FB`, as typed.
    pub cost: &'a str,
    pub comm: f64,
    pub svg: Option<&'a Path>,
    pub trace: Option<&'a Path>,
    pub json: bool,
}

/// Parses `--cost F,B,W[,FB]` (B the full backward; FB defaults to F + B) with `--comm C`.
pub fn parse_costs(text: &str, comm: f64) -> Result<Costs> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    if !(3..=4).contains(&parts.len()) {
        bail!(
            "--cost {text}: give three or four comma-separated numbers F,B,W[,FB] (forward, full \
             backward, backward for weights, overlapped forward and backward), e.g. --cost 3,5,2,7"
        );
    }
    let mut v = Vec::new();
    for (name, p) in ["F", "B", "W", "FB"].iter().zip(&parts) {
        let x: f64 =
            p.parse().map_err(|_| anyhow::anyhow!("--cost {text}: {name} = `{p}` is not a number"))?;
        v.push(x);
    }
    Costs::new(v[0], v[1], v[2], v.get(3).copied(), comm).map_err(|e| {
        let flag = match e {
            CostError::Invalid { name: "comm", .. } => {
                format!("--comm {}", kiln_compiler::schedule::simulate::number_text(comm))
            }
            _ => format!("--cost {text}"),
        };
        anyhow::Error::new(e).context(flag)
    })
}

pub fn run(req: &Request, out: &mut impl Write) -> Result<()> {
    crate::check_output_file(req.svg, &[])?;
    crate::check_output_file(req.trace, &[])?;
    if let (Some(svg), Some(trace)) = (req.svg, req.trace) {
        // The same path twice: the trace would replace the timeline.
        let (a, b) = (std::path::absolute(svg)?, std::path::absolute(trace)?);
        if a == b || kiln_ir::output::check_not_input(trace, &[svg]).is_err() {
            bail!("--svg and --trace are both {}: give each its own file", svg.display());
        }
    }
    let costs = parse_costs(req.cost, req.comm)?;
    let kind = Kind::parse(req.schedule).context("--schedule")?;
    let s = schedule::generate(kind, req.pp, req.micro_batches)?;
    // A generated schedule that fails the verifier or deadlocks is a bug in kiln, not in the request.
    schedule::verify(&s).context("internal error: kiln generated an invalid schedule")?;
    let sim =
        schedule::simulate(&s, &costs).context("internal error: kiln generated a schedule that deadlocks")?;
    if let Some(path) = req.svg {
        kiln_ir::output::write_file(path, svg(&s, &sim, &costs).as_bytes())?;
    }
    if let Some(path) = req.trace {
        kiln_ir::output::write_file(path, trace(&s, &sim).to_string().as_bytes())?;
    }
    if req.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report_json(&s, &sim, &costs))?)?;
    } else {
        out.write_all(report_text(&s, &sim, &costs).as_bytes())?;
    }
    Ok(())
}

/// A number as short as it is exact to three decimals: `18`, `2.5`, `0.333`.
fn num(x: f64) -> String {
    let s = format!("{x:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.to_string()
    }
}

fn largest_bubble(sim: &Simulation) -> f64 {
    sim.ranks.iter().map(|r| r.bubble).fold(0.0, f64::max)
}

fn report_text(s: &Schedule, sim: &Simulation, c: &Costs) -> String {
    let mut text = format!(
        "{} on {} ranks, {} micro-batches, {} stages; F={} B={} W={} F&B={} comm={}\n\n",
        s.name,
        s.pp,
        s.micro_batches,
        s.stages(),
        num(c.forward),
        num(c.backward),
        num(c.weight),
        num(c.overlapped),
        num(c.comm)
    );
    let mut t = table::new(&[
        ("rank", Align::Left),
        ("busy", Align::Right),
        ("bubble", Align::Right),
        ("activations", Align::Right),
        ("parameters", Align::Right),
    ]);
    for r in &sim.ranks {
        t.add_row(vec![
            r.rank.to_string(),
            num(r.busy),
            num(r.bubble),
            r.peak_activations.to_string(),
            format!("×{}", num(r.parameter_copies)),
        ]);
    }
    let busy: f64 = sim.ranks.iter().map(|r| r.busy).sum();
    let bubble: f64 = sim.ranks.iter().map(|r| r.bubble).sum();
    let peak = sim.ranks.iter().map(|r| r.peak_activations).max().unwrap_or(0);
    let copies: f64 = sim.ranks.iter().map(|r| r.parameter_copies).sum::<f64>() / f64::from(s.pp.max(1));
    t.add_row(vec![
        "total".into(),
        num(busy),
        num(bubble),
        format!("max {peak}"),
        format!("×{}", num(copies)),
    ]);
    text.push_str(&table::render(&t));
    let worst = largest_bubble(sim);
    // Runs of ranks as ranges (`r0-r999` where every rank of a large 1F1B has it).
    let worst_ranks: Vec<u64> =
        sim.ranks.iter().filter(|r| r.bubble == worst).map(|r| u64::from(r.rank.0)).collect();
    let ranks = crate::compile::plan::ranges(&worst_ranks, "r");
    let _ = writeln!(
        text,
        "\nmakespan {}; bubble {} (the largest of a rank: {}); peak activations {} micro-batches of a stage",
        num(sim.makespan),
        num(worst),
        ranks,
        peak
    );
    text
}

fn report_json(s: &Schedule, sim: &Simulation, c: &Costs) -> serde_json::Value {
    json!({
        "schedule": s.name,
        "pp": s.pp,
        "micro_batches": s.micro_batches,
        "stages": s.stages(),
        "costs": { "F": c.forward, "B": c.backward, "W": c.weight, "FB": c.overlapped, "comm": c.comm },
        "makespan": sim.makespan,
        "bubble": largest_bubble(sim),
        "ranks": sim.ranks.iter().map(|r| json!({
            "rank": r.rank.0,
            "busy": r.busy,
            "bubble": r.bubble,
            "peak_activations": r.peak_activations,
            "parameter_copies": r.parameter_copies,
        })).collect::<Vec<_>>(),
        "lists": s,
    })
}

/// The Chrome/Perfetto trace: one complete event (`"ph":"X"`) per step of every rank, a process
/// and thread per rank (named by metadata events), times in microseconds.
pub fn trace(s: &Schedule, sim: &Simulation) -> serde_json::Value {
    let mut events: Vec<serde_json::Value> = (0..s.pp)
        .map(|r| json!({"name": "process_name", "ph": "M", "pid": r, "tid": r, "args": {"name": format!("rank {r}")}}))
        .collect();
    for e in &sim.events {
        events.push(json!({
            "name": e.instr.to_string(),
            "cat": if e.instr.is_compute() { "compute" } else { "comm" },
            "ph": "X",
            "ts": e.start,
            "dur": e.end - e.start,
            "pid": e.rank.0,
            "tid": e.rank.0,
            "args": { "step": e.index },
        }));
    }
    json!({ "traceEvents": events, "displayTimeUnit": "ms" })
}

/// Colours after the DualPipe README figure: forward orange, backward for inputs blue, backward
/// for weights green, a full backward a darker blue; an overlapped pair is its forward over its
/// backward inside one black border. The reverse direction of DualPipe is drawn a shade darker.
const FORWARD: [&str; 2] = ["#f8cbad", "#f4a460"];
const BACKWARD_INPUT: [&str; 2] = ["#bdd7ee", "#8fb4dc"];
const WEIGHT: [&str; 2] = ["#c5e0b4", "#9acd7e"];
const BACKWARD: [&str; 2] = ["#9dc3e6", "#6d9fd0"];

const ROW: f64 = 30.0;
const LEFT: f64 = 50.0;
const TOP: f64 = 40.0;
const PLOT_WIDTH: f64 = 1400.0;

/// The timeline: a row per rank, a box per compute step, its micro-batch number inside.
pub fn svg(s: &Schedule, sim: &Simulation, c: &Costs) -> String {
    let title = format!(
        "{} · {} ranks · {} micro-batches · F={} B={} W={} F&B={} comm={} · makespan {} · bubble {}",
        s.name,
        s.pp,
        s.micro_batches,
        num(c.forward),
        num(c.backward),
        num(c.weight),
        num(c.overlapped),
        num(c.comm),
        num(sim.makespan),
        num(largest_bubble(sim))
    );
    svg_titled(s, sim, &title)
}

/// [`svg`] of any timeline of `s`'s steps (a simulated one, or one measured on a real run), under
/// `title`.
pub fn svg_titled(s: &Schedule, sim: &Simulation, title: &str) -> String {
    let scale = if sim.makespan > 0.0 { PLOT_WIDTH / sim.makespan } else { 1.0 };
    let width = LEFT + PLOT_WIDTH + 20.0;
    let height = TOP + ROW * f64::from(s.pp) + 70.0;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(o, r#"<rect width="{width}" height="{height}" fill="white"/>"#);
    let _ = writeln!(o, r#"<text x="{LEFT}" y="22" font-size="14">{}</text>"#, title.replace('&', "&amp;"));
    for r in 0..s.pp {
        let y = TOP + ROW * f64::from(r);
        let _ = writeln!(o, r#"<text x="8" y="{:.1}">rank {r}</text>"#, y + ROW / 2.0 + 4.0);
    }
    let shade = |w: &Work| usize::from(s.lane_of[w.mb.0 as usize] == 1 && s.lanes.len() == 2);
    for e in sim.events.iter().filter(|e| e.instr.is_compute()) {
        let x = LEFT + e.start * scale;
        let w = (e.end - e.start) * scale;
        let y = TOP + ROW * f64::from(e.rank.0) + 2.0;
        let h = ROW - 4.0;
        match e.instr {
            Instr::ForwardBackward { forward, backward } => {
                cell(&mut o, x, y, w, h / 2.0, FORWARD[shade(&forward)], forward, e);
                cell(&mut o, x, y + h / 2.0, w, h / 2.0, BACKWARD[shade(&backward)], backward, e);
                let _ = writeln!(
                    o,
                    r#"<rect x="{x:.2}" y="{y:.2}" width="{w:.2}" height="{h:.2}" fill="none" stroke="black" stroke-width="1.5"/>"#
                );
            }
            Instr::Forward(wk) => cell(&mut o, x, y, w, h, FORWARD[shade(&wk)], wk, e),
            Instr::BackwardInput(wk) => cell(&mut o, x, y, w, h, BACKWARD_INPUT[shade(&wk)], wk, e),
            Instr::Weight(wk) => cell(&mut o, x, y, w, h, WEIGHT[shade(&wk)], wk, e),
            Instr::Backward(wk) => cell(&mut o, x, y, w, h, BACKWARD[shade(&wk)], wk, e),
            _ => {}
        }
    }
    // Legend.
    let ly = TOP + ROW * f64::from(s.pp) + 25.0;
    let items = [
        (FORWARD[0], "F forward"),
        (BACKWARD_INPUT[0], "B backward for inputs"),
        (WEIGHT[0], "W backward for weights"),
        (BACKWARD[0], "BW full backward"),
    ];
    let mut lx = LEFT;
    for (color, label) in items {
        let _ =
            writeln!(o, r##"<rect x="{lx}" y="{ly}" width="14" height="14" fill="{color}" stroke="#555"/>"##);
        let _ = writeln!(o, r#"<text x="{}" y="{}">{label}</text>"#, lx + 20.0, ly + 11.0);
        lx += 190.0;
    }
    let _ = writeln!(
        o,
        r#"<rect x="{lx}" y="{ly}" width="14" height="14" fill="{}" stroke="black" stroke-width="1.5"/>"#,
        FORWARD[0]
    );
    let _ = writeln!(
        o,
        r#"<text x="{}" y="{}">F&amp;B overlapped pair (forward above, backward below)</text>"#,
        lx + 20.0,
        ly + 11.0
    );
    if s.lanes.len() == 2 {
        let _ = writeln!(
            o,
            r#"<text x="{LEFT}" y="{}">darker: the reverse direction; the number in a box is its micro-batch</text>"#,
            ly + 32.0
        );
    } else {
        let _ = writeln!(
            o,
            r#"<text x="{LEFT}" y="{}">the number in a box is its micro-batch</text>"#,
            ly + 32.0
        );
    }
    o.push_str("</svg>\n");
    o
}

#[allow(clippy::too_many_arguments)]
fn cell(o: &mut String, x: f64, y: f64, w: f64, h: f64, color: &str, work: Work, e: &Event) {
    let _ = writeln!(
        o,
        r##"<rect x="{x:.2}" y="{y:.2}" width="{w:.2}" height="{h:.2}" fill="{color}" stroke="#555" stroke-width="0.5"><title>{} ({}–{})</title></rect>"##,
        e.instr.to_string().replace('&', "&amp;"),
        num(e.start),
        num(e.end)
    );
    let label = work.mb.0.to_string();
    // Only where the number fits.
    if w >= 6.5 * label.len() as f64 + 2.0 && h >= 9.0 {
        let size = if h < 20.0 { 9 } else { 11 };
        let _ = writeln!(
            o,
            r#"<text x="{:.2}" y="{:.2}" text-anchor="middle" font-size="{size}">{label}</text>"#,
            x + w / 2.0,
            y + h / 2.0 + f64::from(size) / 2.0 - 1.0
        );
    }
}
