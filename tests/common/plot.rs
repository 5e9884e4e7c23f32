//! Plots of test runs, as SVG (and the numbers as CSV) under `target/test-artifacts/`,
//! beside the browser tests' screenshots.

use std::fmt::Write;
use std::time::Instant;

use weir_signaling::CongestionLevel;

use super::relay::{ShapedRelay, BUCKET};

/// Where artifacts go.
pub fn artifacts() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The congestion run: what the server sent into the shaped link and what came out
/// (kbit/s per 250 ms), the estimate Weir told the subscriber, whether its video was
/// paused, and the datagrams the link lost.
pub fn congestion_run(
    title: &str,
    relay: &ShapedRelay,
    events: &[(Instant, CongestionLevel, u64, Vec<String>)],
    capped: Instant,
    lifted: Instant,
) {
    let buckets = relay.buckets.lock().unwrap().clone();
    let secs = |at: Instant| at.saturating_duration_since(relay.started).as_secs_f64();
    let step = BUCKET.as_secs_f64();
    let kbps = |bytes: u64| bytes as f64 * 8.0 / step / 1000.0;
    let mut csv =
        String::from("t_s,offered_kbps,delivered_kbps,lost_datagrams,estimate_kbps,paused\n");
    let (mut est, mut paused) = (0.0, 0);
    let mut e = events.iter().peekable();
    for (i, b) in buckets.iter().enumerate() {
        let t = i as f64 * step;
        while let Some((at, _, estimate, p)) = e.peek() {
            if secs(*at) > t + step {
                break;
            }
            est = *estimate as f64 / 1000.0;
            paused = usize::from(!p.is_empty());
            e.next();
        }
        writeln!(
            csv,
            "{t:.2},{:.0},{:.0},{},{est:.0},{paused}",
            kbps(b.0),
            kbps(b.1),
            b.2
        )
        .unwrap();
    }
    let dir = artifacts();
    std::fs::write(dir.join("congestion-run.csv"), &csv).unwrap();

    let rows: Vec<Vec<f64>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect();
    let t_max = rows.last().map_or(1.0, |r| r[0] + step);
    let (w, left, right) = (900.0, 60.0, 20.0);
    let x = |t: f64| left + (t / t_max) * (w - left - right);
    let mut svg = String::new();
    writeln!(svg, r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="520" font-family="sans-serif" font-size="12">"##).unwrap();
    writeln!(svg, r##"<rect width="100%" height="100%" fill="white"/><text x="{left}" y="18" font-size="14">{title}</text>"##).unwrap();
    // Panels: (top, height, column indexes, max, label)
    let rate_max = rows
        .iter()
        .map(|r| r[1].max(r[2]).max(r[4]))
        .fold(400.0, f64::max)
        * 1.1;
    let lost_max = rows.iter().map(|r| r[3]).fold(5.0, f64::max);
    // (top, height, (CSV column, colour) of each line, y maximum, label)
    type Panel<'a> = (f64, f64, &'a [(usize, &'a str)], f64, &'a str);
    let panels: [Panel; 3] = [
        (
            30.0,
            260.0,
            &[(1, "#bbb"), (2, "#1f77b4"), (4, "#d62728")],
            rate_max,
            "kbit/s: sent into link (grey), delivered (blue), estimate as told to s3 (red)",
        ),
        (320.0, 70.0, &[(5, "#2ca02c")], 1.0, "video paused for s3"),
        (
            420.0,
            70.0,
            &[(3, "#ff7f0e")],
            lost_max,
            "datagrams lost per 250 ms",
        ),
    ];
    for (top, h, cols, max, label) in panels {
        let y = |v: f64| top + h - (v / max).min(1.0) * h;
        writeln!(
            svg,
            r##"<rect x="{left}" y="{top}" width="{}" height="{h}" fill="none" stroke="#888"/>"##,
            w - left - right
        )
        .unwrap();
        writeln!(
            svg,
            r##"<text x="{}" y="{}">{label}</text>"##,
            left + 4.0,
            top + 14.0
        )
        .unwrap();
        writeln!(
            svg,
            r##"<text x="4" y="{}">{max:.0}</text><text x="4" y="{}">0</text>"##,
            top + 10.0,
            top + h
        )
        .unwrap();
        for (t, name) in [
            (secs(capped), "cap 300 kbit/s"),
            (secs(lifted), "cap lifted"),
        ] {
            writeln!(svg, r##"<line x1="{0}" x2="{0}" y1="{top}" y2="{1}" stroke="#999" stroke-dasharray="4"/><text x="{2}" y="{3}" fill="#666">{name}</text>"##, x(t), top + h, x(t) + 3.0, top + h - 4.0).unwrap();
        }
        if max == rate_max {
            let (a, b) = (y(300.0), x(secs(capped)));
            writeln!(
                svg,
                r##"<line x1="{b}" x2="{}" y1="{a}" y2="{a}" stroke="#999"/>"##,
                x(secs(lifted))
            )
            .unwrap();
        }
        for (col, color) in cols {
            let pts: Vec<String> = rows
                .iter()
                .map(|r| format!("{:.1},{:.1}", x(r[0]), y(r[*col])))
                .collect();
            writeln!(
                svg,
                r##"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"##,
                pts.join(" ")
            )
            .unwrap();
        }
    }
    for s in (0..=t_max as u64).step_by(5) {
        writeln!(
            svg,
            r##"<text x="{}" y="510">{s} s</text>"##,
            x(s as f64) - 8.0
        )
        .unwrap();
    }
    svg.push_str("</svg>\n");
    std::fs::write(dir.join("congestion-run.svg"), svg).unwrap();
}

/// One line of a trace plot: a label, a colour and (t, value) points.
pub struct Line<'a> {
    pub label: &'a str,
    pub color: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// A trace over time as SVG: one panel, several lines, the y axis from 0 to the
/// largest value (or `y_max`), the x axis in seconds.
pub fn trace_svg(title: &str, y_label: &str, lines: &[Line], y_max: Option<f64>) -> String {
    let t_max = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let v_max = y_max.unwrap_or_else(|| {
        lines
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.1))
            .fold(10.0, f64::max)
            * 1.1
    });
    let v_min = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(0.0, f64::min);
    let v_min = if v_min < 0.0 {
        (v_min / 10.0).floor() * 10.0
    } else {
        0.0
    };
    let (w, h, left, right, top) = (900.0, 360.0, 60.0, 20.0, 40.0);
    let ph = h - top - 50.0;
    let x = |t: f64| left + (t / t_max) * (w - left - right);
    let y = |v: f64| top + ph - ((v - v_min) / (v_max - v_min)).clamp(0.0, 1.0) * ph;
    let mut svg = String::new();
    writeln!(svg, r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"##).unwrap();
    writeln!(svg, r##"<rect width="100%" height="100%" fill="white"/><text x="{left}" y="18" font-size="14">{title}</text>"##).unwrap();
    writeln!(
        svg,
        r##"<rect x="{left}" y="{top}" width="{}" height="{ph}" fill="none" stroke="#888"/>"##,
        w - left - right
    )
    .unwrap();
    let step = if v_max > 400.0 {
        100.0
    } else if v_max > 100.0 {
        50.0
    } else {
        10.0
    };
    let mut v = (v_min / step).ceil() * step;
    while v <= v_max {
        writeln!(svg, r##"<line x1="{left}" x2="{}" y1="{1}" y2="{1}" stroke="#eee"/><text x="{2}" y="{3}" text-anchor="end">{v:.0}</text>"##, w - right, y(v), left - 4.0, y(v) + 4.0).unwrap();
        v += step;
    }
    let t_step = if t_max > 120.0 { 30.0 } else { 10.0 };
    let mut t = 0.0;
    while t <= t_max {
        writeln!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="middle">{t:.0}</text>"##,
            x(t),
            top + ph + 16.0
        )
        .unwrap();
        t += t_step;
    }
    writeln!(
        svg,
        r##"<text x="{}" y="{}" text-anchor="middle">seconds · {y_label}</text>"##,
        left + (w - left - right) / 2.0,
        top + ph + 34.0
    )
    .unwrap();
    let slot = (w - left - right) / lines.len().max(1) as f64;
    for (i, l) in lines.iter().enumerate() {
        let pts: Vec<String> = l
            .points
            .iter()
            .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
            .collect();
        writeln!(
            svg,
            r##"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"##,
            l.color,
            pts.join(" ")
        )
        .unwrap();
        writeln!(svg, r##"<rect x="{0}" y="{1}" width="12" height="3" fill="{2}"/><text x="{3}" y="{4}">{5}</text>"##, left + 8.0 + slot * i as f64, h - 12.0, l.color, left + 24.0 + slot * i as f64, h - 8.0, l.label).unwrap();
    }
    svg.push_str("</svg>\n");
    svg
}
