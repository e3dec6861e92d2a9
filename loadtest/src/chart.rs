//! A latency-percentile chart as a standalone SVG (no scripts, no fonts to
//! fetch): x runs in "nines" (p50, p90, p99, p99.9, ...) so the tail gets
//! as much room as the median, y is logarithmic in microseconds.

use std::fmt::Write as _;

use crate::stats::CurvePoint;

pub struct Series {
    pub label: String,
    pub curve: Vec<CurvePoint>,
    /// Fixed colour (e.g. one per broker); None takes the next of the palette.
    pub color: Option<&'static str>,
    pub dashed: bool,
}

const W: f64 = 860.0;
const H: f64 = 480.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 220.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
/// The curve reaches p99.999 (5 nines); the maximum is drawn half a step further.
const MAX_NINES: f64 = 5.5;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

fn nines(q: f64) -> f64 {
    if q >= 1.0 {
        MAX_NINES
    } else {
        (-(1.0 - q).log10()).clamp(0.0, 5.0)
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn us_label(us: f64) -> String {
    if us >= 1e6 {
        format!("{} s", us / 1e6)
    } else if us >= 1e3 {
        format!("{} ms", us / 1e3)
    } else {
        format!("{us} µs")
    }
}

/// Renders every series on one chart.
pub fn percentile_svg(title: &str, series: &[Series]) -> String {
    let values = series
        .iter()
        .flat_map(|s| s.curve.iter().map(|p| p.latency_us))
        .filter(|v| *v > 0.0 && v.is_finite());
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (y0, y1) = if lo <= hi {
        (
            lo.log10().floor(),
            hi.log10().ceil().max(lo.log10().floor() + 1.0),
        )
    } else {
        (0.0, 3.0)
    };
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let x = |n: f64| LEFT + n / MAX_NINES * pw;
    let y = |us: f64| {
        let l = us.max(10f64.powf(y0)).log10();
        TOP + ph - (l - y0) / (y1 - y0) * ph
    };

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="28" font-size="16" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        esc(title)
    );
    // Horizontal grid: each decade, lighter lines at 2x and 5x.
    let mut d = y0;
    while d <= y1 + 1e-9 {
        let base = 10f64.powf(d);
        let yy = y(base);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ccc"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            yy + 4.0,
            us_label(base)
        );
        if d < y1 {
            for m in [2.0, 5.0] {
                let yy = y(base * m);
                let _ = writeln!(
                    s,
                    r##"<line x1="{LEFT}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#eee"/>"##,
                    LEFT + pw
                );
            }
        }
        d += 1.0;
    }
    // Vertical grid at the usual percentiles.
    for (q, label) in [
        (0.0, "min"),
        (0.5, "p50"),
        (0.9, "p90"),
        (0.99, "p99"),
        (0.999, "p99.9"),
        (0.9999, "p99.99"),
        (0.99999, "p99.999"),
        (1.0, "max"),
    ] {
        let xx = x(nines(q));
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{TOP}" y2="{}" stroke="#ddd"/><text x="{xx:.1}" y="{}" text-anchor="middle">{label}</text>"##,
            TOP + ph,
            TOP + ph + 18.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">percentile</text>"#,
        LEFT + pw / 2.0,
        H - 14.0
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">latency (log scale)</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0
    );
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##
    );
    for (i, ser) in series.iter().enumerate() {
        let color = ser.color.unwrap_or(COLORS[i % COLORS.len()]);
        let dash = if ser.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let pts: Vec<String> = ser
            .curve
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(nines(p.quantile)), y(p.latency_us)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{}"/>"#,
            pts.join(" ")
        );
        let ly = TOP + 10.0 + i as f64 * 20.0;
        let lx = LEFT + pw + 16.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="3"{dash}/><text x="{}" y="{}">{}</text>"#,
            lx + 24.0,
            lx + 30.0,
            ly + 4.0,
            esc(&ser.label)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Latencies;

    #[test]
    fn svg_has_one_line_per_series_and_escapes_labels() {
        let mut h = Latencies::new();
        for i in 1..=10_000u64 {
            h.record_ns(i * 100);
        }
        let curve = h.summary().unwrap().curve;
        let svg = percentile_svg(
            "latency <50k/s>",
            &[
                Series {
                    label: "sockbus".into(),
                    curve: curve.clone(),
                    color: None,
                    dashed: false,
                },
                Series {
                    label: "NATS & co".into(),
                    curve,
                    color: Some("#d62728"),
                    dashed: true,
                },
            ],
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("latency &lt;50k/s&gt;"));
        assert!(svg.contains("NATS &amp; co"));
        assert!(!svg.contains("NaN"));
        assert_eq!(svg.matches("stroke-dasharray").count(), 2); // line + legend
    }

    #[test]
    fn empty_chart_is_still_valid() {
        let svg = percentile_svg("nothing", &[]);
        assert!(svg.contains("</svg>") && !svg.contains("NaN"));
    }
}
