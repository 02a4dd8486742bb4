//! `kiln schedule`: the table, the SVG timeline, the Perfetto trace and the errors, as a user gets
//! them.

use crate::util::{kiln, Scratch};

#[test]
fn the_dualpipe_table_at_pp_8() {
    let out = kiln(&[
        "schedule",
        "--pp",
        "8",
        "--micro-batches",
        "20",
        "--schedule",
        "dualpipe",
        "--cost",
        "3,5,2,7",
    ]);
    assert!(out.ok, "{}", out.stderr);
    insta::assert_snapshot!("schedule_dualpipe_pp8", out.stdout);
    // (PP/2-1)(F&B+B-3W) = 3 * (7 + 5 - 6) = 18, on the middle ranks; PP+1 activations; 2 copies.
    assert!(
        out.stdout.contains("bubble 18 (the largest of a rank: r2-r5); peak activations 9"),
        "{}",
        out.stdout
    );
}

#[test]
fn the_svg_and_the_trace_have_every_step() {
    let dir = Scratch::new();
    let (svg, trace) = (dir.str("zb1p.svg"), dir.str("zb1p.json"));
    let out = kiln(&[
        "schedule",
        "--pp",
        "4",
        "--micro-batches",
        "6",
        "--schedule",
        "zb1p",
        "--cost",
        "3,5,2",
        "--comm",
        "0.5",
        "--svg",
        &svg,
        "--trace",
        &trace,
        "--json",
    ]);
    assert!(out.ok, "{}", out.stderr);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let lists: kiln_ir::schedule::Schedule = serde_json::from_value(report["lists"].clone()).unwrap();
    let steps: usize = lists.ranks.iter().map(Vec::len).sum();
    let computes: usize = lists.ranks.iter().flatten().filter(|i| i.is_compute()).count();
    // 4 stages × 6 micro-batches × (F, B, W).
    assert_eq!(computes, 72);

    let t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let events = t["traceEvents"].as_array().unwrap();
    let complete: Vec<&serde_json::Value> = events.iter().filter(|e| e["ph"] == "X").collect();
    assert_eq!(complete.len(), steps, "one complete event per step");
    for e in &complete {
        let pid = e["pid"].as_u64().unwrap();
        assert!(pid < 4 && e["tid"] == e["pid"], "{e}");
        assert!(e["ts"].as_f64().unwrap() >= 0.0 && e["dur"].as_f64().unwrap() >= 0.0, "{e}");
    }
    let end =
        complete.iter().map(|e| e["ts"].as_f64().unwrap() + e["dur"].as_f64().unwrap()).fold(0.0, f64::max);
    assert_eq!(end, report["makespan"].as_f64().unwrap());

    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\"") && svg.ends_with("</svg>\n"));
    // One box per compute step plus the legend's five; balanced tags.
    let boxes = svg.matches("<rect ").count() - 1 /* background */ - 5 /* legend */;
    assert_eq!(boxes, computes);
    assert_eq!(svg.matches("<title>").count(), svg.matches("</title>").count());
    for label in ["F forward", "B backward for inputs", "W backward for weights"] {
        assert!(svg.contains(label), "legend {label}");
    }
    // Only the two outputs: no temporaries left behind.
    assert_eq!(dir.entries(), ["zb1p.json", "zb1p.svg"]);
}

#[test]
fn bad_requests_say_what_would_be_right() {
    let cases: [(&[&str], &str); 7] = [
        (&["--pp", "5", "--micro-batches", "20", "--schedule", "dualpipe"], "error: --pp 5: dualpipe needs an even number of ranks (rank i pairs with rank pp-1-i); try --pp 6\n"),
        (&["--pp", "4", "--micro-batches", "6", "--schedule", "dualpipev"], "error: --micro-batches 6: dualpipev on 4 ranks needs at least 8 micro-batches (2 per rank: every rank must reach the steady overlapped phase, as in DeepSeek's reference)\n"),
        (&["--pp", "4", "--micro-batches", "8", "--schedule", "gpipe"], "error: --schedule: unknown schedule `gpipe`: the schedules are 1f1b, zb1p, dualpipe, dualpipev\n"),
        (&["--pp", "4", "--micro-batches", "8", "--schedule", "1f1b", "--cost", "3,-5,2"], "error: --cost 3,-5,2: the cost B = -5 must be a number from 0 to 1e15\n"),
        (&["--pp", "4", "--micro-batches", "8", "--schedule", "1f1b", "--comm", "-1"], "error: --comm -1: the cost comm = -1 must be a number from 0 to 1e15\n"),
        // A timeline adds up millions of costs: 1e308 made the makespan infinite and the bubbles NaN.
        (&["--pp", "2", "--micro-batches", "4", "--schedule", "1f1b", "--svg", "t.svg", "--trace", "./t.svg"], "error: --svg and --trace are both t.svg: give each its own file\n"),
        (&["--pp", "2", "--micro-batches", "4", "--schedule", "1f1b", "--comm", "1e308"], "error: --comm 1e308: the cost comm = 1e308 must be a number from 0 to 1e15\n"),
    ];
    for (args, expected) in cases {
        let out = kiln(&[&["schedule"], args].concat());
        assert!(!out.ok, "{args:?}");
        assert_eq!(out.stderr, expected, "{args:?}");
    }
}
