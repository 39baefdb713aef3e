//! The simulator's SVG plots: the delay CDF per audience size, and amplification and
//! publisher upload against the audience size.

use std::collections::BTreeMap;
use std::path::Path;

use gstp2plive::sim::SimReport;
use plotters::prelude::*;

type PlotResult = Result<(), Box<dyn std::error::Error>>;

fn color(mode: &str) -> RGBColor {
    match mode {
        "p2plive" => RGBColor(0x1f, 0x77, 0xb4),
        _ => RGBColor(0xff, 0x7f, 0x0e),
    }
}

/// Writes `<stem>-delay-cdf-n<N>.svg` per size, `<stem>-amplification.svg` and
/// `<stem>-publisher-upload.svg`.
pub fn all(stem: &Path, runs: &[SimReport]) -> PlotResult {
    let name = |suffix: &str| {
        let mut s = stem.as_os_str().to_owned();
        s.push(suffix);
        std::path::PathBuf::from(s)
    };
    let mut sizes: Vec<usize> = runs.iter().map(|r| r.viewers).collect();
    sizes.sort_unstable();
    sizes.dedup();
    for n in sizes {
        let at_n: Vec<&SimReport> = runs.iter().filter(|r| r.viewers == n).collect();
        delay_cdf(&name(&format!("-delay-cdf-n{n}.svg")), n, &at_n)?;
    }
    versus_n(
        &name("-amplification.svg"),
        "Download (thick) and mean upload (thin) per viewer",
        "× the stream",
        runs,
        &[
            |r: &SimReport| r.download_x.mean,
            |r: &SimReport| r.upload_x.mean,
        ],
    )?;
    versus_n(
        &name("-publisher-upload.svg"),
        "Publisher upload",
        "× the stream",
        runs,
        &[|r: &SimReport| r.publisher_upload_x],
    )?;
    Ok(())
}

fn delay_cdf(path: &Path, n: usize, runs: &[&SimReport]) -> PlotResult {
    let root = SVGBackend::new(path, (760, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let x_max = runs
        .iter()
        .flat_map(|r| r.delay_cdf.last().map(|p| p.0))
        .fold(10.0f64, f64::max)
        * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Delay publication → object delivered, N = {n} (simulated)"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..x_max, 0f64..1.0f64)?;
    chart
        .configure_mesh()
        .x_desc("delay (ms)")
        .y_desc("share of objects delivered")
        .draw()?;
    for r in runs {
        let c = color(&r.mode);
        chart
            .draw_series(LineSeries::new(
                std::iter::once((0.0, 0.0)).chain(r.delay_cdf.iter().copied()),
                c.stroke_width(2),
            ))?
            .label(r.mode.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn versus_n(
    path: &Path,
    title: &str,
    y_desc: &str,
    runs: &[SimReport],
    values: &[fn(&SimReport) -> f64],
) -> PlotResult {
    let root = SVGBackend::new(path, (760, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let x_max = runs.iter().map(|r| r.viewers).max().unwrap_or(10).max(10) as f64 * 2.0;
    let y_max = runs
        .iter()
        .flat_map(|r| values.iter().map(move |v| v(r)))
        .fold(1.0f64, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d((1f64..x_max).log_scale(), 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("viewers (N, log scale)")
        .y_desc(y_desc)
        .draw()?;
    for (i, value) in values.iter().enumerate() {
        let mut by_mode: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
        for r in runs {
            by_mode
                .entry(r.mode.as_str())
                .or_default()
                .push((r.viewers as f64, value(r)));
        }
        for (mode, mut points) in by_mode {
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            let c = color(mode);
            let style = if i == 0 {
                c.stroke_width(2)
            } else {
                c.mix(0.6).stroke_width(1)
            };
            let series = chart.draw_series(LineSeries::new(points.clone(), style))?;
            if i == 0 {
                series.label(mode.to_string()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
            }
            chart.draw_series(points.into_iter().map(|p| Circle::new(p, 4, c.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
