//! A small SVG line-chart renderer for `kiln train`'s loss curve (`loss.svg`): axes with labelled
//! ticks, the loss as a polyline on the left axis and, when the run logged it, the busiest
//! expert's load over the mean as a second polyline on a right axis. No dependencies: the chart is
//! a handful of SVG elements written as text.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The chart's size in SVG user units.
const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 400.0;
/// The plot area's margins: left, right, top, bottom.
const MARGIN: (f64, f64, f64, f64) = (70.0, 70.0, 30.0, 50.0);
const LOSS_COLOR: &str = "#1f77b4";
const LOAD_COLOR: &str = "#d62728";

/// One step of `metrics.jsonl`, as the chart needs it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub step: u64,
    pub loss: f64,
    /// The busiest expert's load over the mean, when the model has MoE layers.
    pub max_load: Option<f64>,
}

/// The points of a `metrics.jsonl` text, one per step in step order. A resumed run appends to the
/// log, so a step logged twice (a run killed after the step, resumed from an earlier checkpoint)
/// keeps its last line. Lines that do not parse (one cut short by a kill) and non-finite losses
/// are skipped.
pub fn points(metrics: &str) -> Vec<Point> {
    let mut by_step = BTreeMap::new();
    for line in metrics.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let (Some(step), Some(loss)) = (v["step"].as_u64(), v["loss"].as_f64()) else { continue };
        if loss.is_finite() {
            let max_load = v["max_load"].as_f64().filter(|m| m.is_finite());
            by_step.insert(step, Point { step, loss, max_load });
        }
    }
    by_step.into_values().collect()
}

/// Tick values for an axis over `[lo, hi]`: about `target` round numbers (1, 2 or 5 times a
/// power of ten apart), the first at or below `lo` and the last at or above `hi`, so the ticks
/// cover the range. An empty or degenerate range gets a unit-wide one around it.
pub fn ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let (mut lo, mut hi) =
        if lo.is_finite() && hi.is_finite() { (lo.min(hi), lo.max(hi)) } else { (0.0, 1.0) };
    if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
        lo -= 0.5;
        hi += 0.5;
    }
    let rough = (hi - lo) / target.max(1) as f64;
    let magnitude = 10f64.powf(rough.log10().floor());
    let step =
        [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|s| *s >= rough).unwrap_or(10.0 * magnitude);
    let first = (lo / step).floor() as i64;
    let last = (hi / step).ceil() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

/// A tick label: as few decimals as the tick spacing needs.
fn label(v: f64, spacing: f64) -> String {
    let decimals = if spacing >= 1.0 { 0 } else { (-spacing.log10().floor()) as usize };
    let s = format!("{v:.decimals$}");
    if s.starts_with('-') && s.trim_start_matches(['-', '0', '.']).is_empty() {
        s[1..].to_string()
    } else {
        s
    }
}

/// A linear map from `[lo, hi]` onto `[a, b]`.
fn scale(lo: f64, hi: f64, a: f64, b: f64) -> impl Fn(f64) -> f64 {
    let span = if hi > lo { hi - lo } else { 1.0 };
    move |v| a + (v - lo) / span * (b - a)
}

/// The chart of `points` as an SVG document: steps on the x axis, the loss on the left axis and
/// the max-load ratio on the right one (when any point has it). With no points, the axes alone.
pub fn render(title: &str, points: &[Point]) -> String {
    let (left, right, top, bottom) = (MARGIN.0, WIDTH - MARGIN.1, MARGIN.2, HEIGHT - MARGIN.3);
    let steps = || points.iter().map(|p| p.step as f64);
    let (first, last) = (steps().fold(f64::INFINITY, f64::min), steps().fold(f64::NEG_INFINITY, f64::max));
    // Whole steps: no more ticks than steps.
    let xs = ticks(first, last, if last > first { (last - first).min(8.0) as usize } else { 1 });
    let losses = || points.iter().map(|p| p.loss);
    let ys = ticks(losses().fold(f64::INFINITY, f64::min), losses().fold(f64::NEG_INFINITY, f64::max), 6);
    let loads: Vec<(u64, f64)> = points.iter().filter_map(|p| p.max_load.map(|m| (p.step, m))).collect();
    let x = scale(xs[0], xs[xs.len() - 1], left, right);
    let y = scale(ys[0], ys[ys.len() - 1], bottom, top);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="18" text-anchor="middle" font-size="14">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    // Grid, ticks and labels.
    let dx = xs.get(1).map_or(1.0, |b| b - xs[0]);
    for &v in &xs {
        let px = x(v);
        let _ = writeln!(s, r##"<line x1="{px:.2}" y1="{top}" x2="{px:.2}" y2="{bottom}" stroke="#eee"/>"##);
        let _ = writeln!(
            s,
            r#"<line x1="{px:.2}" y1="{bottom}" x2="{px:.2}" y2="{}" stroke="black"/>"#,
            bottom + 5.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{px:.2}" y="{}" text-anchor="middle">{}</text>"#,
            bottom + 18.0,
            label(v, dx)
        );
    }
    let dy = ys.get(1).map_or(1.0, |b| b - ys[0]);
    for &v in &ys {
        let py = y(v);
        let _ = writeln!(s, r##"<line x1="{left}" y1="{py:.2}" x2="{right}" y2="{py:.2}" stroke="#eee"/>"##);
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{py:.2}" x2="{left}" y2="{py:.2}" stroke="black"/>"#,
            left - 5.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{:.2}" text-anchor="end">{}</text>"#,
            left - 8.0,
            py + 4.0,
            label(v, dy)
        );
    }
    let _ = writeln!(s, r#"<path d="M{left},{top} V{bottom} H{right}" fill="none" stroke="black"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">step</text>"#,
        (left + right) / 2.0,
        HEIGHT - 12.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{0}" text-anchor="middle" fill="{LOSS_COLOR}" transform="rotate(-90 16 {0})">loss</text>"#,
        (top + bottom) / 2.0
    );
    if !points.is_empty() {
        let _ = writeln!(s, "{}", polyline(points.iter().map(|p| (x(p.step as f64), y(p.loss))), LOSS_COLOR));
    }
    if !loads.is_empty() {
        let rs = ticks(
            loads.iter().map(|l| l.1).fold(f64::INFINITY, f64::min),
            loads.iter().map(|l| l.1).fold(f64::NEG_INFINITY, f64::max),
            6,
        );
        let r = scale(rs[0], rs[rs.len() - 1], bottom, top);
        let dr = rs.get(1).map_or(1.0, |b| b - rs[0]);
        let _ = writeln!(s, r#"<path d="M{right},{top} V{bottom}" fill="none" stroke="black"/>"#);
        for &v in &rs {
            let py = r(v);
            let _ = writeln!(
                s,
                r#"<line x1="{right}" y1="{py:.2}" x2="{}" y2="{py:.2}" stroke="black"/>"#,
                right + 5.0
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{:.2}" fill="{LOAD_COLOR}">{}</text>"#,
                right + 8.0,
                py + 4.0,
                label(v, dr)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{0}" y="{1}" text-anchor="middle" fill="{LOAD_COLOR}" transform="rotate(90 {0} {1})">max load / mean</text>"#,
            WIDTH - 16.0,
            (top + bottom) / 2.0
        );
        let _ = writeln!(s, "{}", polyline(loads.iter().map(|&(st, m)| (x(st as f64), r(m))), LOAD_COLOR));
    }
    s.push_str("</svg>\n");
    s
}

fn polyline(points: impl Iterator<Item = (f64, f64)>, color: &str) -> String {
    let coords: Vec<String> = points.map(|(a, b)| format!("{a:.2},{b:.2}")).collect();
    format!(r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#, coords.join(" "))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The coordinates of the chart's polylines, in order.
    fn polylines(svg: &str) -> Vec<Vec<(f64, f64)>> {
        svg.lines()
            .filter(|l| l.starts_with("<polyline"))
            .map(|l| {
                let pts = l.split("points=\"").nth(1).unwrap().trim_end_matches("\"/>");
                pts.split(' ')
                    .map(|p| {
                        let (a, b) = p.split_once(',').unwrap();
                        (a.parse().unwrap(), b.parse().unwrap())
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 10.0, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(ticks(3.27, 6.91, 6), vec![3.0, 4.0, 5.0, 6.0, 7.0]);
        assert_eq!(ticks(3.27, 6.91, 12), vec![3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0]);
        let t = ticks(1.0, 200.0, 8);
        assert_eq!((t[0], t[t.len() - 1], t[1] - t[0]), (0.0, 200.0, 50.0));
        // One value: a unit range around it.
        let t = ticks(5.0, 5.0, 4);
        assert!(t[0] <= 4.5 && t[t.len() - 1] >= 5.5, "{t:?}");
        let t = ticks(f64::INFINITY, f64::NEG_INFINITY, 5);
        assert_eq!((t.len(), t[0], t[5]), (6, 0.0, 1.0), "no data: 0 to 1");
        assert_eq!(label(0.30000000000000004, 0.1), "0.3");
        assert_eq!(label(-0.0, 0.5), "0.0");
        assert_eq!(label(150.0, 50.0), "150");
    }

    #[test]
    fn the_chart_has_one_point_per_step_inside_the_plot_area() {
        let metrics = [
            r#"{"step":1,"loss":6.5,"max_load":2.5}"#,
            r#"{"step":2,"loss":6.0,"max_load":2.0}"#,
            r#"{"step":3,"loss":5.9,"max_load":1.5}"#,
            r#"{"step":3,"loss":5.5,"max_lo"#,          // cut short by a kill
            r#"{"step":3,"loss":5.0,"max_load":1.25}"#, // the same step again, after a resume
            r#"{"step":4,"loss":4.0,"max_load":null}"#,
        ]
        .join("\n");
        let pts = points(&metrics);
        assert_eq!(pts.iter().map(|p| p.step).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(pts[2].loss, 5.0, "the last line of a step wins");
        let svg = render("tiny", &pts);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        let lines = polylines(&svg);
        assert_eq!(lines.len(), 2, "loss and max load");
        assert_eq!(lines[0].len(), 4, "one loss point per step");
        assert_eq!(lines[1].len(), 3, "the steps that logged a max load");
        let (left, right, top, bottom) = (MARGIN.0, WIDTH - MARGIN.1, MARGIN.2, HEIGHT - MARGIN.3);
        for &(a, b) in lines.iter().flatten() {
            assert!(a.is_finite() && b.is_finite());
            assert!((left..=right).contains(&a) && (top..=bottom).contains(&b), "({a}, {b})");
        }
        // Steps run left to right, the falling loss goes up the page's y (down the chart).
        assert!(lines[0].windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1), "{:?}", lines[0]);
        assert_eq!(lines[0][0].0, left, "step 1 is the first x tick");
        assert!(svg.contains(">max load / mean<"));
        // The loss axis labels cover 4.0 to 6.5.
        assert!(svg.contains(">4.0<") && svg.contains(">6.5<"), "{svg}");
    }

    #[test]
    fn an_empty_log_draws_the_axes_alone() {
        let svg = render("a <b> & c", &points("not json\n"));
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(polylines(&svg).is_empty());
        assert!(svg.contains("a &lt;b&gt; &amp; c"));
    }
}
