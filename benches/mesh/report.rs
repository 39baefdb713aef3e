//! Figures from a run's observations, and the outputs: JSON, a markdown table, SVG plots.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use plotters::prelude::*;
use serde::Serialize;

use crate::run::RunConfig;
use crate::{Args, Mode};

/// Points kept of each latency CDF (in the JSON and the plot).
const CDF_POINTS: usize = 200;

/// What one surviving viewer (present for the whole window) observed during the window.
#[derive(Debug)]
pub struct Survivor {
    pub frames_expected: u64,
    pub frames_on_time: u64,
    pub frames_late: u64,
    pub latencies_ms: Vec<f64>,
    pub hops: Vec<u32>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub played_bytes: u64,
}

/// Node counters summed over every node of the run (for spotting saturation).
#[derive(Debug, Default, Clone, Serialize)]
pub struct Health {
    pub events_dropped: u64,
    pub publish_failures: u64,
    pub publish_queue_full: u64,
    pub publisher_no_peers: u64,
    pub slow_peer_reports: u64,
    pub messages_dropped_by_hook: u64,
    pub publisher_connected: u64,
    pub viewers_connected_mean: f64,
}

pub struct Raw {
    pub window: Duration,
    pub cpu: Duration,
    pub stream_bytes: u64,
    pub frames_published: u64,
    pub publisher_bytes_out: u64,
    pub publisher_bytes_in: u64,
    pub survivors: Vec<Survivor>,
    /// Join → first decodable frame of every viewer instance (None: never got one).
    pub joins_ms: Vec<Option<f64>>,
    pub churned: usize,
    pub restarts: usize,
    pub lossy_viewers: usize,
    pub health: Health,
    pub elapsed: Duration,
}

/// min / median / p99 / max (and mean) of a sample.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Summary {
    pub count: usize,
    pub min: f64,
    pub median: f64,
    pub mean: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    fn of(values: impl IntoIterator<Item = f64>) -> Summary {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Summary::default();
        }
        v.sort_by(f64::total_cmp);
        Summary {
            count: v.len(),
            min: v[0],
            median: quantile(&v, 0.5),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p99: quantile(&v, 0.99),
            max: v[v.len() - 1],
        }
    }
}

/// Nearest-rank quantile of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub mode: Mode,
    pub viewers: usize,
    pub bitrate: u64,
    /// Sum of all layers' bitrates.
    pub stream_bitrate: u64,
    pub window_s: f64,
    pub elapsed_s: f64,
    pub frames_published: u64,
    pub survivors: usize,
    pub churned: usize,
    pub restarts: usize,
    pub lossy_viewers: usize,
    /// Per survivor: frames released by the playout before their deadline / frames published
    /// (of the layer it plays) during the window.
    pub delivery: Summary,
    /// Over all survivors' window frames.
    pub delivery_total: f64,
    /// Frames the survivors' playouts released after their deadline (not counted delivered).
    pub frames_late: u64,
    /// Publish → last fragment at the viewer, ms, over all survivors' window frames.
    pub latency_ms: Summary,
    /// (ms, share of frames completed within) — frames never completed are missing from 1.0.
    pub latency_cdf: Vec<(f64, f64)>,
    /// Hops of each frame's first fragment from the publisher to the viewer.
    pub hops: Summary,
    /// Per survivor: bytes received (all protocols) / payload bytes of the layer it plays.
    pub download_amplification: Summary,
    /// Publisher bytes sent / payload bytes of all layers.
    pub publisher_upload_factor: f64,
    /// Publisher bytes received / payload bytes of all layers.
    pub publisher_download_factor: f64,
    /// Per survivor: bytes sent / payload bytes of all layers.
    pub viewer_upload: Summary,
    /// Join → first decodable frame, ms, every viewer instance that got one.
    pub join_ms: Summary,
    pub joins_without_frame: usize,
    /// Process CPU seconds / viewers / window seconds (the publisher and the bench's own
    /// bookkeeping included).
    pub cpu_s_per_viewer_per_stream_s: f64,
    /// Process CPU seconds / window seconds (2.0 = both cores of a 2-core machine busy).
    pub cores_busy: f64,
    pub health: Health,
}

pub fn reduce(config: &RunConfig, raw: Raw) -> RunResult {
    let window_s = raw.window.as_secs_f64();
    let stream = raw.stream_bytes.max(1) as f64;
    let (expected, on_time) = raw.survivors.iter().fold((0, 0), |(e, o), s| {
        (e + s.frames_expected, o + s.frames_on_time)
    });
    let mut latencies: Vec<f64> = raw
        .survivors
        .iter()
        .flat_map(|s| s.latencies_ms.iter().copied())
        .collect();
    latencies.sort_by(f64::total_cmp);
    let latency_cdf = (1..=CDF_POINTS.min(latencies.len()))
        .map(|i| {
            let index = (i * latencies.len()).div_ceil(CDF_POINTS.min(latencies.len())) - 1;
            (
                latencies[index],
                (index + 1) as f64 / expected.max(1) as f64,
            )
        })
        .collect();
    RunResult {
        mode: config.mode,
        viewers: config.viewers,
        bitrate: config.bitrate,
        stream_bitrate: (0..config.layers).map(|l| config.layer_bitrate(l)).sum(),
        window_s,
        elapsed_s: raw.elapsed.as_secs_f64(),
        frames_published: raw.frames_published,
        survivors: raw.survivors.len(),
        churned: raw.churned,
        restarts: raw.restarts,
        lossy_viewers: raw.lossy_viewers,
        delivery: Summary::of(
            raw.survivors
                .iter()
                .map(|s| s.frames_on_time as f64 / s.frames_expected.max(1) as f64),
        ),
        delivery_total: on_time as f64 / expected.max(1) as f64,
        frames_late: raw.survivors.iter().map(|s| s.frames_late).sum(),
        latency_ms: Summary::of(latencies.iter().copied()),
        latency_cdf,
        hops: Summary::of(
            raw.survivors
                .iter()
                .flat_map(|s| s.hops.iter().map(|&h| f64::from(h))),
        ),
        download_amplification: Summary::of(
            raw.survivors
                .iter()
                .map(|s| s.bytes_in as f64 / s.played_bytes.max(1) as f64),
        ),
        publisher_upload_factor: raw.publisher_bytes_out as f64 / stream,
        publisher_download_factor: raw.publisher_bytes_in as f64 / stream,
        viewer_upload: Summary::of(raw.survivors.iter().map(|s| s.bytes_out as f64 / stream)),
        join_ms: Summary::of(raw.joins_ms.iter().flatten().copied()),
        joins_without_frame: raw.joins_ms.iter().filter(|j| j.is_none()).count(),
        cpu_s_per_viewer_per_stream_s: raw.cpu.as_secs_f64()
            / config.viewers as f64
            / window_s.max(1e-9),
        cores_busy: raw.cpu.as_secs_f64() / window_s.max(1e-9),
        health: raw.health,
    }
}

pub fn one_line(r: &RunResult) -> String {
    format!(
        "  {:<17} N={:<3} delivery {:.3} latency p50 {:.0} ms p99 {:.0} ms hops {:.1} \
         down x{:.2} pub up x{:.1} viewer up x{:.2}/{:.2} join {:.0} ms cpu {:.3} ({:.2} cores)",
        r.mode.name(),
        r.viewers,
        r.delivery_total,
        r.latency_ms.median,
        r.latency_ms.p99,
        r.hops.mean,
        r.download_amplification.median,
        r.publisher_upload_factor,
        r.viewer_upload.mean,
        r.viewer_upload.max,
        r.join_ms.median,
        r.cpu_s_per_viewer_per_stream_s,
        r.cores_busy,
    )
}

#[derive(Debug, Serialize)]
pub struct Params {
    pub viewers: Vec<usize>,
    pub bitrate: Vec<u64>,
    pub modes: Vec<Mode>,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub layers: u32,
    pub fps: u32,
    pub gop_s: f64,
    pub keyframe_ratio: f64,
    pub bootstrap_peers: usize,
    pub churn_per_minute: f64,
    pub loss: f64,
    pub loss_nodes: f64,
    pub seed: u64,
    pub command: String,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub os: String,
    /// `optimized` (`cargo bench`) or `debug` (`cargo bench --profile dev`, the test suite's
    /// smoke run): a debug build's CPU and delay figures are not comparable.
    pub build: &'static str,
}

/// A run that could not be completed (setup too slow, a task stuck).
#[derive(Debug, Serialize)]
pub struct Failure {
    pub mode: Mode,
    pub viewers: usize,
    pub error: String,
}

#[derive(Debug, Serialize)]
pub struct Output {
    pub params: Params,
    pub machine: Machine,
    pub runs: Vec<RunResult>,
    pub failed_runs: Vec<Failure>,
}

impl Output {
    pub fn new(args: &Args, runs: Vec<RunResult>, failed_runs: Vec<Failure>) -> Output {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, name)| name.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let os = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|r| format!("{} {}", std::env::consts::OS, r.trim()))
            .unwrap_or_else(|_| std::env::consts::OS.into());
        let command = std::env::args()
            .skip(1)
            .filter(|a| a != "--bench")
            .collect::<Vec<_>>()
            .join(" ");
        Output {
            params: Params {
                viewers: args.viewers.clone(),
                bitrate: args.bitrate.clone(),
                modes: args.mode.clone(),
                duration_s: args.duration.as_secs_f64(),
                warmup_s: args.warmup.as_secs_f64(),
                layers: args.layers,
                fps: args.fps,
                gop_s: args.gop.as_secs_f64(),
                keyframe_ratio: args.keyframe_ratio,
                bootstrap_peers: args.bootstrap_peers,
                churn_per_minute: args.churn,
                loss: args.loss,
                loss_nodes: args.loss_nodes,
                seed: args.seed,
                command: format!("cargo bench --bench mesh -- {command}"),
            },
            machine: Machine {
                cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
                cpu,
                os,
                build: build_kind(),
            },
            runs,
            failed_runs,
        }
    }
}

fn rate(bits: u64) -> String {
    if bits >= 1_000_000 {
        let text = format!("{:.3}", bits as f64 / 1e6);
        format!("{}M", text.trim_end_matches('0').trim_end_matches('.'))
    } else {
        format!("{}k", bits / 1000)
    }
}

pub fn markdown(output: &Output) -> String {
    let mut md = String::new();
    md.push_str(
        "| N | stream | mode | delivery min / median | latency p50 / p99 (ms) | hops mean / max \
         | download ×, median / max | publisher upload × | viewer upload ×, mean / max \
         | join → first frame, median / p99 (ms) | CPU s / viewer / stream-s | cores busy |\n",
    );
    md.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in &output.runs {
        md.push_str(&format!(
            "| {} | {}bit/s | {} | {:.3} / {:.3} | {:.0} / {:.0} | {:.2} / {:.0} | {:.2} / {:.2} \
             | {:.2} | {:.2} / {:.2} | {:.0} / {:.0} | {:.4} | {:.2} |\n",
            r.viewers,
            rate(r.stream_bitrate),
            r.mode.name(),
            r.delivery.min,
            r.delivery.median,
            r.latency_ms.median,
            r.latency_ms.p99,
            r.hops.mean,
            r.hops.max,
            r.download_amplification.median,
            r.download_amplification.max,
            r.publisher_upload_factor,
            r.viewer_upload.mean,
            r.viewer_upload.max,
            r.join_ms.median,
            r.join_ms.p99,
            r.cpu_s_per_viewer_per_stream_s,
            r.cores_busy,
        ));
    }
    for f in &output.failed_runs {
        md.push_str(&format!(
            "| {} | | {} | failed: {} | | | | | | | | |\n",
            f.viewers,
            f.mode.name(),
            f.error
        ));
    }
    let p = &output.params;
    md.push_str(&format!(
        "\n{} fps, keyframe every {} s ({}× a delta frame), {} layer(s), window {} s after {} s \
         warm-up, {} bootstrap peers per viewer, churn {}/min, loss {} at {} of the viewers, \
         seed {}. Machine: {} cores, {}; {} build.\n\nCommand: `{}`\n",
        p.fps,
        p.gop_s,
        p.keyframe_ratio,
        p.layers,
        p.duration_s,
        p.warmup_s,
        p.bootstrap_peers,
        p.churn_per_minute,
        p.loss,
        p.loss_nodes,
        p.seed,
        output.machine.cores,
        output.machine.cpu,
        output.machine.build,
        p.command,
    ));
    md
}

/// The JSON at `json`; beside it `<stem>.md` and the plots `<stem>-*.svg`.
pub fn write_all(json: &Path, output: &Output, table: &str) -> Result<(), String> {
    if let Some(dir) = json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(output).map_err(|e| e.to_string())?;
    std::fs::write(json, text + "\n").map_err(|e| format!("{}: {e}", json.display()))?;
    let beside = |suffix: &str| -> PathBuf {
        let stem = json
            .file_stem()
            .map_or_else(|| "mesh".into(), |s| s.to_string_lossy().into_owned());
        json.with_file_name(format!("{stem}{suffix}"))
    };
    let md = beside(".md");
    std::fs::write(&md, table).map_err(|e| format!("{}: {e}", md.display()))?;

    let mut sizes: Vec<usize> = output.runs.iter().map(|r| r.viewers).collect();
    sizes.sort_unstable();
    sizes.dedup();
    for &n in &sizes {
        let runs: Vec<&RunResult> = output.runs.iter().filter(|r| r.viewers == n).collect();
        latency_cdf(&beside(&format!("-latency-cdf-n{n}.svg")), n, &runs)
            .map_err(|e| format!("latency plot: {e}"))?;
    }
    versus_n(
        &beside("-amplification.svg"),
        "Download amplification per viewer (median) vs N",
        "bytes received / bytes of the layer played",
        &output.runs,
        |r| r.download_amplification.median,
    )
    .map_err(|e| format!("amplification plot: {e}"))?;
    versus_n(
        &beside("-publisher-upload.svg"),
        "Publisher upload vs N",
        "publisher bytes sent / stream bytes",
        &output.runs,
        |r| r.publisher_upload_factor,
    )
    .map_err(|e| format!("publisher upload plot: {e}"))?;
    Ok(())
}

fn color(mode: Mode) -> RGBColor {
    match mode {
        Mode::P2plive => RGBColor(0x1f, 0x77, 0xb4),
        Mode::P2pliveGossipsub => RGBColor(0x94, 0x67, 0xbd),
        Mode::GossipsubDefault => RGBColor(0xff, 0x7f, 0x0e),
        Mode::Unicast => RGBColor(0x2c, 0xa0, 0x2c),
    }
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

fn latency_cdf(path: &Path, n: usize, runs: &[&RunResult]) -> PlotResult {
    let root = SVGBackend::new(path, (760, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let x_max = runs
        .iter()
        .flat_map(|r| r.latency_cdf.last().map(|p| p.0))
        .fold(10.0f64, f64::max)
        * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Latency publish → frame complete, N = {n}"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..x_max, 0f64..1.0f64)?;
    chart
        .configure_mesh()
        .x_desc("latency (ms)")
        .y_desc("share of frames published")
        .draw()?;
    for r in runs {
        let c = color(r.mode);
        chart
            .draw_series(LineSeries::new(
                std::iter::once((0.0, 0.0)).chain(r.latency_cdf.iter().copied()),
                c.stroke_width(2),
            ))?
            .label(format!(
                "{} ({}bit/s)",
                r.mode.name(),
                rate(r.stream_bitrate)
            ))
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
    runs: &[RunResult],
    value: impl Fn(&RunResult) -> f64,
) -> PlotResult {
    let mut by_mode: BTreeMap<Mode, Vec<(f64, f64)>> = BTreeMap::new();
    for r in runs {
        by_mode
            .entry(r.mode)
            .or_default()
            .push((r.viewers as f64, value(r)));
    }
    let x_max = runs.iter().map(|r| r.viewers).max().unwrap_or(1) as f64 * 1.1;
    let y_max = runs.iter().map(&value).fold(1.0f64, f64::max) * 1.15;
    let root = SVGBackend::new(path, (760, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("viewers (N)")
        .y_desc(y_desc)
        .draw()?;
    for (mode, mut points) in by_mode {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let c = color(mode);
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?
            .label(mode.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 4, c.filled())))?;
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

/// `debug` when built without optimisation (debug assertions on), else `optimized`.
pub fn build_kind() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "optimized"
    }
}
