//! A hand-written SVG heatmap of per-GPU token load per layer, one panel per plan:
//! rows are MoE layers, columns GPUs, colour is load / layer mean (white at 1,
//! red at 1.5 or more, blue at 0.5 or less).

use crate::eval::PlanScore;
use std::fmt::Write;

/// Renders the panels side by side.
pub fn svg(rows: &[(String, PlanScore)]) -> String {
    let layers = rows.first().map_or(0, |r| r.1.layers.len());
    let gpus = rows.first().and_then(|r| r.1.layers.first()).map_or(0, |l| l.load.len());
    let cw = (360.0 / gpus.max(1) as f64).clamp(3.0, 40.0);
    let ch = (480.0 / layers.max(1) as f64).clamp(3.0, 24.0);
    let (pw, ph) = (cw * gpus as f64, ch * layers as f64);
    let (margin, top, gapx) = (40.0, 40.0, 30.0);
    let width = margin + rows.len() as f64 * (pw + gapx);
    let height = top + ph + 50.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (p, (name, score)) in rows.iter().enumerate() {
        let x0 = margin + p as f64 * (pw + gapx);
        let _ = writeln!(s, r#"<text x="{x0:.1}" y="{:.1}">{}</text>"#, top - 22.0, xml(name));
        let _ = writeln!(
            s,
            r#"<text x="{x0:.1}" y="{:.1}" fill="grey">max/mean {:.3}</text>"#,
            top - 8.0,
            score.mean_imbalance()
        );
        for (l, ls) in score.layers.iter().enumerate() {
            for (g, &v) in ls.load.iter().enumerate() {
                let ratio = v / ls.mean.max(1e-12);
                let _ = writeln!(
                    s,
                    r#"<rect x="{:.1}" y="{:.1}" width="{cw:.1}" height="{ch:.1}" fill="{}"><title>layer {l} GPU {g}: {v:.0} tokens ({ratio:.2} x mean)</title></rect>"#,
                    x0 + g as f64 * cw,
                    top + l as f64 * ch,
                    colour(ratio)
                );
            }
        }
        let _ = writeln!(
            s,
            r#"<text x="{x0:.1}" y="{:.1}" fill="grey">GPUs 0..{} (x), layers 0..{} (y)</text>"#,
            top + ph + 16.0,
            gpus.saturating_sub(1),
            layers.saturating_sub(1)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{margin}" y="{:.1}" fill="grey">colour: load / layer mean: white 1.0, red 1.5 or more, blue 0.5 or less</text>"#,
        top + ph + 34.0
    );
    s.push_str("</svg>\n");
    s
}

fn colour(ratio: f64) -> String {
    let d = ((ratio - 1.0) / 0.5).clamp(-1.0, 1.0);
    let (r, g, b) = if d >= 0.0 {
        (255.0, 255.0 * (1.0 - d), 255.0 * (1.0 - d))
    } else {
        (255.0 * (1.0 + d), 255.0 * (1.0 + d), 255.0)
    };
    format!("rgb({r:.0},{g:.0},{b:.0})")
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
