//! PNG plots with plotters' bitmap backend. Text is drawn with DejaVu Sans embedded in
//! the binary (bench/assets, Bitstream Vera licence), so nothing depends on the fonts a
//! machine has installed.
use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};
use serde_json::Value;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Draws `node_added.png` and `endpoint_update.png` under `out`.
pub fn all(out: &Path, doc: &Value) -> Result<()> {
    register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow!("the embedded font does not load"))?;
    node_added(&out.join("node_added.png"), &doc["parts"]["e2e"])?;
    endpoint_update(
        &out.join("endpoint_update.png"),
        &doc["parts"]["control"]["programming"]["endpoint_update"],
    )?;
    println!(
        "written: {}/{{node_added,endpoint_update}}.png",
        out.display()
    );
    Ok(())
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e:?}")
}

/// Horizontal bars: node-added ns/packet per system, one panel per traffic shape.
fn node_added(path: &Path, e2e: &Value) -> Result<()> {
    let root = BitMapBackend::new(path, (1100, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let rows: Vec<&Value> = e2e["udp"]
        .as_array()
        .map(|a| a.iter().filter(|r| r["key"] != "direct").collect())
        .unwrap_or_default();
    if rows.is_empty() {
        root.draw(&Text::new(
            "end-to-end part not run",
            (40, 40),
            ("sans-serif", 24),
        ))
        .map_err(err)?;
        return root.present().map_err(err);
    }
    let panels = root.split_evenly((2, 1));
    for (panel, (shape, title)) in panels.iter().zip([
        ("established", "256 established flows"),
        ("new_flows", "a new flow every packet"),
    ]) {
        let vals: Vec<(String, f64)> = rows
            .iter()
            .map(|r| {
                (
                    r["label"].as_str().unwrap_or("?").to_string(),
                    r["shapes"][shape]["node_added_ns"]
                        .as_f64()
                        .unwrap_or(0.0)
                        .max(0.0),
                )
            })
            .collect();
        let max = vals.iter().map(|v| v.1).fold(1.0, f64::max) * 1.1;
        let n = vals.len();
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("node-added ns/packet, {title} (lower is better)"),
                ("sans-serif", 20),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(300)
            .build_cartesian_2d(0.0..max, (0..n).into_segmented())
            .map_err(err)?;
        let labels: Vec<String> = vals.iter().map(|v| v.0.clone()).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(vals.iter().enumerate().map(|(i, (label, v))| {
                let color = if label.starts_with("xlb") {
                    RGBColor(31, 119, 180)
                } else {
                    RGBColor(150, 150, 150)
                };
                let mut bar = Rectangle::new(
                    [
                        (0.0, SegmentValue::Exact(i)),
                        (*v, SegmentValue::Exact(i + 1)),
                    ],
                    color.filled(),
                );
                bar.set_margin(3, 3, 0, 0);
                bar
            }))
            .map_err(err)?;
    }
    root.present().map_err(err)
}

/// The distribution (sorted samples, a CDF) of EndpointSlice-change-to-map latencies.
/// Draws a placeholder when the measurement did not run.
fn endpoint_update(path: &Path, upd: &Value) -> Result<()> {
    let root = BitMapBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut ms: Vec<f64> = upd["samples_ms"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    if ms.is_empty() {
        root.draw(&Text::new(
            "EndpointSlice change → map latency: not measured in this run",
            (40, 40),
            ("sans-serif", 20),
        ))
        .map_err(err)?;
        return root.present().map_err(err);
    }
    ms.sort_by(f64::total_cmp);
    let max = ms.last().copied().unwrap_or(1.0).max(0.001) * 1.1;
    let n = ms.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "EndpointSlice change → xlb_services updated (CDF)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max, 0.0..1.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("ms")
        .y_desc("fraction of updates")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            ms.iter().enumerate().map(|(i, v)| (*v, (i + 1) as f64 / n)),
            RGBColor(31, 119, 180).stroke_width(2),
        ))
        .map_err(err)?;
    chart
        .draw_series(ms.iter().enumerate().map(|(i, v)| {
            Circle::new((*v, (i + 1) as f64 / n), 3, RGBColor(31, 119, 180).filled())
        }))
        .map_err(err)?;
    root.present().map_err(err)
}
