//! A small SVG chart renderer: `kiln train`'s loss curve (`loss.svg`: axes with labelled ticks,
//! the loss as a polyline on the left axis and, when the run logged it, the busiest expert's load
//! over the mean as a second polyline on a right axis), and for `kiln report` ([`line_chart`]) a
//! chart of several named series on a linear or logarithmic axis with vertical markers (the
//! monitor's alerts), and a heatmap ([`heatmap`]: rows over steps, colour by value around 1). No
//! dependencies: a chart is a handful of SVG elements written as text.

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
        // The monitor's event lines (`"event": "alert"`, ...) are not steps.
        if loss.is_finite() && v.get("event").is_none() {
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

/// How a chart's y axis maps values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    Linear,
    /// Base 10; values at or below zero are left out.
    Log,
}

/// One named line of a [`line_chart`].
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A vertical line at step `x`, labelled (an alert: its kind).
pub struct Marker {
    pub x: f64,
    pub label: String,
}

/// Line colours, in order (matplotlib's tab10); series past ten reuse them.
const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
    "#17becf",
];
const MARKER_COLOR: &str = "#c00000";
/// The report's charts: size, and margins left, right, top, bottom (the right one holds the legend).
const CHART: (f64, f64) = (900.0, 320.0);
const CHART_MARGIN: (f64, f64, f64, f64) = (70.0, 230.0, 30.0, 45.0);

/// `series` over steps as an inline `<svg>` element (no XML namespace: it is meant for an HTML
/// page), with a legend on the right and `markers` as dashed vertical lines labelled at the top.
/// Non-finite points (and, on a log axis, non-positive ones) are left out.
pub fn line_chart(title: &str, y_label: &str, axis: Scale, series: &[Series], markers: &[Marker]) -> String {
    let (w, h) = CHART;
    let (left, right, top, bottom) = (CHART_MARGIN.0, w - CHART_MARGIN.1, CHART_MARGIN.2, h - CHART_MARGIN.3);
    let shown = |&(_, y): &(f64, f64)| y.is_finite() && (axis == Scale::Linear || y > 0.0);
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.iter().copied().filter(shown)).collect();
    let fy = |y: f64| if axis == Scale::Log { y.log10() } else { y };
    let xs_all = all.iter().map(|p| p.0).chain(markers.iter().map(|m| m.x));
    let (x0, x1) = xs_all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    let xs = ticks(x0, x1, if x1 > x0 { (x1 - x0).min(10.0) as usize } else { 1 });
    let (y0, y1) =
        all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(fy(p.1)), b.max(fy(p.1))));
    let ys = match axis {
        // A constant series (a constant learning rate) gets a range of 10% around its value.
        Scale::Linear if y0.is_finite() && y1 - y0 <= f64::EPSILON * y0.abs().max(f64::MIN_POSITIVE) => {
            let pad = if y0 == 0.0 { 1.0 } else { 0.1 * y0.abs() };
            ticks(y0 - pad, y1 + pad, 4)
        }
        Scale::Linear => ticks(y0, y1, 5),
        // Whole powers of ten.
        Scale::Log => {
            let (lo, hi) =
                if y0.is_finite() { (y0.floor(), y1.ceil().max(y0.floor() + 1.0)) } else { (0.0, 1.0) };
            (lo as i64..=hi as i64).map(|e| e as f64).collect()
        }
    };
    let x = scale(xs[0], xs[xs.len() - 1], left, right);
    let y = scale(ys[0], ys[ys.len() - 1], bottom, top);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg class="chart" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12" role="img" aria-label="{}">"#,
        escape(title)
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="18" text-anchor="middle" font-size="14">{}</text>"#,
        (left + right) / 2.0,
        escape(title)
    );
    let dx = xs.get(1).map_or(1.0, |b| b - xs[0]);
    for &v in &xs {
        let px = x(v);
        let _ = writeln!(s, r##"<line x1="{px:.2}" y1="{top}" x2="{px:.2}" y2="{bottom}" stroke="#eee"/>"##);
        let _ = writeln!(
            s,
            r#"<text x="{px:.2}" y="{}" text-anchor="middle">{}</text>"#,
            bottom + 16.0,
            label(v, dx)
        );
    }
    let dy = ys.get(1).map_or(1.0, |b| b - ys[0]);
    for &v in &ys {
        let py = y(v);
        let text = match axis {
            Scale::Linear => label(v, dy),
            Scale::Log => format!("1e{v}"),
        };
        let _ = writeln!(s, r##"<line x1="{left}" y1="{py:.2}" x2="{right}" y2="{py:.2}" stroke="#eee"/>"##);
        let _ =
            writeln!(s, r#"<text x="{}" y="{:.2}" text-anchor="end">{text}</text>"#, left - 6.0, py + 4.0);
    }
    let _ = writeln!(s, r#"<path d="M{left},{top} V{bottom} H{right}" fill="none" stroke="black"/>"#);
    let _ =
        writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">step</text>"#, (left + right) / 2.0, h - 8.0);
    let _ = writeln!(
        s,
        r#"<text x="16" y="{0}" text-anchor="middle" transform="rotate(-90 16 {0})">{1}</text>"#,
        (top + bottom) / 2.0,
        escape(y_label)
    );
    for (i, m) in markers.iter().enumerate() {
        let px = x(m.x);
        let _ = writeln!(
            s,
            r#"<g class="alert"><line x1="{px:.2}" y1="{top}" x2="{px:.2}" y2="{bottom}" stroke="{MARKER_COLOR}" stroke-dasharray="4 3"/><text x="{:.2}" y="{:.2}" fill="{MARKER_COLOR}" font-size="10">{}</text></g>"#,
            px + 3.0,
            top + 12.0 + 11.0 * (i % 4) as f64,
            escape(&format!("{} @{}", m.label, m.x))
        );
    }
    for (i, se) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let pts: Vec<(f64, f64)> =
            se.points.iter().copied().filter(shown).map(|(a, b)| (x(a), y(fy(b)))).collect();
        if pts.len() == 1 {
            let _ =
                writeln!(s, r#"<circle cx="{:.2}" cy="{:.2}" r="2.5" fill="{color}"/>"#, pts[0].0, pts[0].1);
        } else if !pts.is_empty() {
            let _ = writeln!(s, "{}", polyline(pts.into_iter(), color));
        }
        let ly = top + 6.0 + 16.0 * i as f64;
        if ly < bottom {
            let _ = writeln!(
                s,
                r#"<line x1="{0}" y1="{ly}" x2="{1}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{2}" y="{3}">{4}</text>"#,
                right + 12.0,
                right + 30.0,
                right + 36.0,
                ly + 4.0,
                escape(&se.name)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

/// The colour of value `v` of a heatmap centred on 1 (the mean): white at 1, deeper blue down to 0
/// (an idle expert), deeper red up to 4 times and beyond, on a log2 scale.
pub fn heat_color(v: f64) -> String {
    let t = if v > 0.0 { (v.log2() / 2.0).clamp(-1.0, 1.0) } else { -1.0 };
    let mix = |a: f64, b: f64, f: f64| (a + (b - a) * f).round() as u8;
    let (r, g, b) = if t < 0.0 {
        (mix(255.0, 33.0, -t), mix(255.0, 102.0, -t), mix(255.0, 172.0, -t))
    } else {
        (mix(255.0, 178.0, t), mix(255.0, 24.0, t), mix(255.0, 43.0, t))
    };
    format!("#{r:02x}{g:02x}{b:02x}")
}

/// A heatmap as an inline `<svg>`: one row per entry of `rows` (its label and one value per step
/// of `steps`), coloured by [`heat_color`], with a colour key and `markers` over the steps. More
/// steps than 300 are averaged into 300 columns.
pub fn heatmap(title: &str, steps: &[u64], rows: &[(String, Vec<f64>)], markers: &[Marker]) -> String {
    let cols = steps.len().clamp(1, 300);
    let per = steps.len().div_ceil(cols).max(1);
    let cell_h = 14.0;
    let (left, top) = (110.0, 30.0);
    let plot_w = CHART.0 - left - 150.0;
    let h = top + cell_h * rows.len() as f64 + 45.0;
    let w = CHART.0;
    let bottom = top + cell_h * rows.len() as f64;
    let groups: Vec<&[u64]> = steps.chunks(per).collect();
    let cw = plot_w / groups.len().max(1) as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg class="heatmap" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11" role="img" aria-label="{}">"#,
        escape(title)
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="18" text-anchor="middle" font-size="14">{}</text>"#,
        left + plot_w / 2.0,
        escape(title)
    );
    for (r, (name, values)) in rows.iter().enumerate() {
        let py = top + cell_h * r as f64;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{:.2}" text-anchor="end">{}</text>"#,
            left - 6.0,
            py + cell_h - 3.0,
            escape(name)
        );
        for (c, _) in groups.iter().enumerate() {
            let chunk = &values[(c * per).min(values.len())..((c + 1) * per).min(values.len())];
            let v = chunk.iter().sum::<f64>() / chunk.len().max(1) as f64;
            let _ = writeln!(
                s,
                r#"<rect x="{:.2}" y="{py:.2}" width="{:.2}" height="{cell_h}" fill="{}"><title>{name}, step {}: {v:.2}x mean</title></rect>"#,
                left + cw * c as f64,
                cw + 0.05,
                heat_color(v),
                groups[c][0]
            );
        }
    }
    // Step labels under the first and last column and at most 8 between.
    let xs = ticks(steps.first().copied().unwrap_or(0) as f64, steps.last().copied().unwrap_or(1) as f64, 8);
    let x_of = |step: f64| {
        let i = steps.iter().position(|&s| s as f64 >= step).unwrap_or(steps.len());
        left + cw * (i / per) as f64 + cw / 2.0
    };
    for &v in xs.iter().filter(|&&v| {
        v >= steps.first().copied().unwrap_or(0) as f64 && v <= steps.last().copied().unwrap_or(0) as f64
    }) {
        let _ = writeln!(
            s,
            r#"<text x="{:.2}" y="{:.2}" text-anchor="middle">{}</text>"#,
            x_of(v),
            bottom + 14.0,
            label(v, 1.0)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.2}" y="{:.2}" text-anchor="middle">step</text>"#,
        left + plot_w / 2.0,
        bottom + 30.0
    );
    for m in markers {
        let px = x_of(m.x);
        let _ = writeln!(
            s,
            r#"<g class="alert"><line x1="{px:.2}" y1="{}" x2="{px:.2}" y2="{bottom}" stroke="{MARKER_COLOR}" stroke-width="1.5" stroke-dasharray="4 3"/><title>{}</title></g>"#,
            top - 4.0,
            escape(&format!("{} @{}", m.label, m.x))
        );
    }
    // The key: load over the mean.
    let kx = left + plot_w + 20.0;
    for (i, v) in [0.0, 0.5, 1.0, 2.0, 4.0].iter().enumerate() {
        let ky = top + 16.0 * i as f64;
        let _ = writeln!(
            s,
            r##"<rect x="{kx}" y="{ky}" width="14" height="14" fill="{}" stroke="#999"/><text x="{}" y="{}">{}</text>"##,
            heat_color(*v),
            kx + 20.0,
            ky + 11.0,
            if *v == 4.0 { "4x mean or more".to_string() } else { format!("{v}x mean") }
        );
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
