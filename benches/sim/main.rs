//! `p2plive-sim`: the media data plane at up to 10^5 viewers on a modelled network, one
//! process, virtual time (the engine is `gstp2plive::sim`; the model is in
//! `docs/SIMULATOR.md`).
//!
//! ```text
//! cargo bench --bench sim -- --viewers 1000,10000 --mode p2plive,flood --json docs/bench/sim.json
//! cargo bench --bench sim -- --viewers 100000 --mode p2plive --json docs/bench/sim-100k.json
//! cargo bench --bench sim -- --compare-mesh docs/bench/trees.json
//! ```
//!
//! The same seed and flags give byte-identical JSON. Wall time and peak memory are printed
//! and written to the markdown table beside the JSON (they are not in the JSON).
//!
//! Under `cargo test --all-targets` (no arguments) the binary only says how to run it.

#[path = "../common/duration.rs"]
mod duration;
mod plots;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use duration::parse_duration;
use gstp2plive::core::dataplane::DataPlaneConfig;
use gstp2plive::sim::network::{NetworkModel, parse_mix};
use gstp2plive::sim::{self, Mode, SimConfig, SimReport};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    /// The project's data plane (core::dataplane).
    P2plive,
    /// The gossipsub-like flood baseline on the same network.
    Flood,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum NetworkArg {
    /// Regions, residential lines, 1 % bursty loss (docs/SIMULATOR.md).
    Residential,
    /// As the mesh benchmark's 127.0.0.1: no loss, 0.05 ms, 10 Gbit/s, no churn.
    Loopback,
}

#[derive(Debug, Clone, Parser, Serialize)]
#[command(
    name = "p2plive-sim",
    about = "p2plive-sim: the real data plane (core::dataplane) of one publisher and N viewers \
             over a modelled network, deterministic from --seed"
)]
struct Args {
    /// Viewers (present at once); a comma-separated list runs each size in turn.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    viewers: Vec<usize>,
    /// Data planes to run at each size, comma separated: p2plive (the project's), flood
    /// (gossipsub-like baseline).
    #[arg(long, value_delimiter = ',', default_value = "p2plive")]
    #[serde(skip)]
    mode: Vec<ModeArg>,
    /// The flood baseline runs only up to this many viewers (it sends ~6× the stream per
    /// viewer: 10^5 viewers would take hours).
    #[arg(long, default_value_t = 10_000)]
    flood_max_viewers: usize,
    /// Stream bitrate (bit/s; k/M suffixes).
    #[arg(long, default_value = "2M", value_parser = sim::parse_rate)]
    bitrate: u64,
    /// Frames per second.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=120))]
    fps: u32,
    /// Keyframe interval.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    gop: Duration,
    /// Keyframe size over a delta frame's.
    #[arg(long, default_value_t = 6.0)]
    keyframe_ratio: f64,
    /// Length of the measured window (virtual time; durations are like 30s, 500ms, 2m).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// The initial viewers join at uniform random times over this.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    ramp: Duration,
    /// Settling time between the ramp and the window.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    warmup: Duration,
    /// A frame counts as delivered if all of it reached the viewer this long after it was
    /// published.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    deadline: Duration,
    /// Seed of every random choice (the model's and the data planes').
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Network preset.
    #[arg(long, value_enum, default_value = "residential")]
    network: NetworkArg,
    /// Line classes instead of the preset's: `share:up:down[:access]` per class, comma
    /// separated; up and down in Mbit/s, access one-way in ms, each `x` or `lo-hi`
    /// (log-uniform rates, uniform delay). Up 0 is receive only. The default mix is
    /// `0.15:0:10-50:15-40,0.80:2-20:25-300:2-15,0.05:100:500:1-5`.
    #[arg(long)]
    mix: Option<String>,
    /// The publisher's upload (bit/s, k/M/G suffixes); 20M by default.
    #[arg(long, value_parser = sim::parse_rate)]
    publisher_upload: Option<u64>,
    /// Mean message loss per line (0..1); the preset's by default (residential 0.01).
    #[arg(long)]
    loss: Option<f64>,
    /// Mean loss burst (messages): 1 is independent loss, more is Gilbert-Elliott; the
    /// preset's by default (residential 2).
    #[arg(long)]
    loss_burst: Option<f64>,
    /// Share of the audience leaving (abruptly) per minute, each replaced by a new viewer
    /// (Poisson); residential 0.1 by default, loopback 0.
    #[arg(long)]
    churn: Option<f64>,
    /// How long neighbours take to notice a departed peer (transport idle timeout).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    leave_detect: Duration,
    /// Peers a joining viewer connects to.
    #[arg(long, default_value_t = 4)]
    bootstrap: usize,
    /// Viewers do not set `upload-capacity` (the data plane assumes unlimited upload).
    #[arg(long)]
    capacity_unknown: bool,
    /// Real SHA-256 digests and ed25519 signatures instead of the simulator's stand-in
    /// (DataPlaneConfig::insecure_simulated_auth): the same results, far slower at scale.
    #[arg(long)]
    real_crypto: bool,
    /// Data-plane stripes.
    #[arg(long, default_value_t = DataPlaneConfig::default().stripes)]
    stripes: u8,
    /// Where to write the JSON; the markdown table and the SVG plots go beside it.
    #[arg(long)]
    #[serde(skip)]
    json: Option<PathBuf>,
    /// Print the validation: this simulator on the loopback network at the mesh
    /// benchmark's sizes and bitrates, next to that benchmark's JSON (download and upload
    /// amplification of its p2plive runs).
    #[arg(long)]
    #[serde(skip)]
    compare_mesh: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    #[serde(skip)]
    quiet: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    #[serde(skip)]
    bench: bool,
}

impl Args {
    fn check(&self) -> Result<(), String> {
        if self.viewers.iter().any(|&n| n == 0 || n > 1_000_000) {
            return Err("--viewers: each between 1 and 1000000".into());
        }
        for (name, value) in [("--loss", self.loss), ("--churn", self.churn)] {
            if value.is_some_and(|v| !(0.0..=1.0).contains(&v)) {
                return Err(format!("{name}: a share between 0 and 1"));
            }
        }
        if self
            .loss_burst
            .is_some_and(|b| !(1.0..=1000.0).contains(&b))
        {
            return Err("--loss-burst: between 1 and 1000 messages".into());
        }
        if !(1.0..=100.0).contains(&self.keyframe_ratio) {
            return Err("--keyframe-ratio: between 1 and 100".into());
        }
        if !(10_000..=100_000_000).contains(&self.bitrate) {
            return Err("--bitrate: between 10k and 100M".into());
        }
        if self
            .publisher_upload
            .is_some_and(|up| !(100_000..=100_000_000_000).contains(&up))
        {
            return Err("--publisher-upload: between 100k and 100G".into());
        }
        if self.gop < Duration::from_secs_f64(1.0 / f64::from(self.fps)) {
            return Err("--gop: at least one frame".into());
        }
        if self.leave_detect < Duration::from_millis(100) {
            return Err("--leave-detect: at least 100ms".into());
        }
        if self.duration < Duration::from_secs(1) {
            return Err("--duration: at least 1s".into());
        }
        if self.deadline < Duration::from_millis(10) {
            return Err("--deadline: at least 10ms".into());
        }
        if self.bootstrap == 0 {
            return Err("--bootstrap: at least 1".into());
        }
        if !(2..=32).contains(&self.stripes) {
            return Err("--stripes: between 2 and 32".into());
        }
        Ok(())
    }

    fn config(&self, mode: Mode, viewers: usize) -> Result<SimConfig, String> {
        let (mut network, name, churn) = match self.network {
            NetworkArg::Residential => (NetworkModel::residential(), "residential", 0.1),
            NetworkArg::Loopback => (NetworkModel::loopback(), "loopback", 0.0),
        };
        let mut name = name.to_string();
        if let Some(mix) = &self.mix {
            network.classes = parse_mix(mix)?;
            name = format!("{name}, mix {mix}");
        }
        if let Some(up) = self.publisher_upload {
            network.publisher_upload_mbps = up as f64 / 1e6;
        }
        if let Some(loss) = self.loss {
            network.loss = loss;
        }
        if let Some(burst) = self.loss_burst {
            network.loss_burst = burst;
        }
        Ok(SimConfig {
            mode,
            viewers,
            bitrate_bps: self.bitrate,
            fps: self.fps,
            gop: self.gop,
            keyframe_ratio: self.keyframe_ratio,
            ramp: self.ramp,
            warmup: self.warmup,
            window: self.duration,
            deadline: self.deadline,
            seed: self.seed,
            network,
            network_name: name,
            churn_per_min: self.churn.unwrap_or(churn),
            bootstrap: self.bootstrap,
            leave_detect: self.leave_detect,
            capacity_known: !self.capacity_unknown,
            real_crypto: self.real_crypto,
            dataplane: DataPlaneConfig {
                stripes: self.stripes,
                ..DataPlaneConfig::default()
            },
            ..SimConfig::default()
        })
    }
}

/// What the JSON holds: the flags and the runs (no wall time: it is deterministic).
#[derive(Serialize)]
struct Output<'a> {
    simulator: &'static str,
    args: &'a Args,
    runs: &'a [SimReport],
}

/// Wall time and memory of one run (beside the JSON, not in it).
struct Cost {
    wall_s: f64,
    peak_rss_mib: f64,
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn main() {
    if std::env::args_os().len() <= 1 {
        println!("p2plive-sim: a simulator; run it with `cargo bench --bench sim -- --help`");
        return;
    }
    let args = Args::parse();
    if let Err(err) = args.check() {
        eprintln!("p2plive-sim: {err}");
        std::process::exit(2);
    }
    if cfg!(debug_assertions) && !args.quiet {
        eprintln!("p2plive-sim: a debug build: correct figures, but many times slower");
    }
    if let Some(mesh) = &args.compare_mesh {
        if let Err(err) = compare_mesh(&args, mesh) {
            eprintln!("p2plive-sim: {err}");
            std::process::exit(1);
        }
        return;
    }
    let mut runs = Vec::new();
    let mut costs = Vec::new();
    for &viewers in &args.viewers {
        for &mode in &args.mode {
            let mode = match mode {
                ModeArg::P2plive => Mode::Trees,
                ModeArg::Flood => Mode::Flood,
            };
            if mode == Mode::Flood && viewers > args.flood_max_viewers {
                eprintln!(
                    "p2plive-sim: flood skipped at {viewers} viewers (--flood-max-viewers {})",
                    args.flood_max_viewers
                );
                continue;
            }
            let config = match args.config(mode, viewers) {
                Ok(config) => config,
                Err(err) => {
                    eprintln!("p2plive-sim: {err}");
                    std::process::exit(2);
                }
            };
            let (report, cost) = run_one(&config, args.quiet);
            print_summary(&report, &cost);
            runs.push(report);
            costs.push(cost);
        }
    }
    if let Some(path) = &args.json {
        if let Err(err) = write_outputs(path, &args, &runs, &costs) {
            eprintln!("p2plive-sim: writing {}: {err}", path.display());
            std::process::exit(1);
        }
        eprintln!("p2plive-sim: wrote {}", path.display());
    }
}

fn run_one(config: &SimConfig, quiet: bool) -> (SimReport, Cost) {
    let started = Instant::now();
    let name = config.mode.name();
    let viewers = config.viewers;
    let mut progress = |p: &sim::Progress| {
        if quiet {
            return;
        }
        let wall = started.elapsed().as_secs_f64();
        eprint!(
            "\rp2plive-sim: {name} N={viewers}: {:5.1}/{:.1} s simulated, {} present, \
             {:.1} M events, {:.0} s wall, {:.0} MiB peak   ",
            p.at_s,
            p.end_s,
            p.present,
            p.events as f64 / 1e6,
            wall,
            peak_rss_mib()
        );
    };
    let report = sim::run(config, &mut progress);
    if !quiet {
        eprintln!();
    }
    let cost = Cost {
        wall_s: started.elapsed().as_secs_f64(),
        peak_rss_mib: peak_rss_mib(),
    };
    (report, cost)
}

fn print_summary(r: &SimReport, cost: &Cost) {
    eprintln!(
        "p2plive-sim: {} N={}: delivery min {:.4} median {:.4} overall {:.4}; delay p50/p99 \
         {:.0}/{:.0} ms; download × mean {:.3} max {:.3}; upload × mean {:.3}; publisher {:.2}×; \
         p99/bound median {:.2}; join p99 {:.0} ms; {:.0} s wall, {:.0} MiB peak",
        r.mode,
        r.viewers,
        r.delivery.min,
        r.delivery.p50,
        r.delivery_overall,
        r.delay_ms.p50,
        r.delay_ms.p99,
        r.download_x.mean,
        r.download_x.max,
        r.upload_x.mean,
        r.publisher_upload_x,
        r.delay_over_bound.p50,
        r.join_ms.p99,
        cost.wall_s,
        cost.peak_rss_mib
    );
}

fn write_outputs(
    path: &Path,
    args: &Args,
    runs: &[SimReport],
    costs: &[Cost],
) -> std::io::Result<()> {
    let json = serde_json::to_string_pretty(&Output {
        simulator: "p2plive-sim",
        args,
        runs,
    })?;
    std::fs::write(path, json + "\n")?;
    let stem = path.with_extension("");
    std::fs::write(stem.with_extension("md"), markdown(args, runs, costs))?;
    if let Err(err) = plots::all(&stem, runs) {
        eprintln!("p2plive-sim: plots: {err}");
    }
    Ok(())
}

fn markdown(args: &Args, runs: &[SimReport], costs: &[Cost]) -> String {
    let mut out = String::new();
    let command: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let _ = writeln!(
        out,
        "`cargo bench --bench sim -- {}` (seed {})\n",
        command.join(" "),
        args.seed
    );
    let _ = writeln!(
        out,
        "| N | mode | delivery min / p1 / median | overall | delay p50 / p99 / max ms | hops p50 / max | \
         download × mean / max | upload × mean / max | publisher up × | control | join p50 / p99 ms | \
         recovery p50 / p99 ms | p99 / bound median / p99 | no frame | up / capacity max | \
         altered | wall s | peak MiB (process) |"
    );
    let _ = writeln!(out, "|{}", "---|".repeat(18));
    for (r, c) in runs.iter().zip(costs) {
        let _ = writeln!(
            out,
            "| {} | {} | {:.4} / {:.4} / {:.4} | {:.4} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} | \
             {:.3} / {:.3} | {:.3} / {:.3} | {:.2} | {:.1} % | {:.0} / {:.0} | {:.0} / {:.0} | \
             {:.2} / {:.2} | {} | {:.3} | {} | {:.0} | {:.0} |",
            r.viewers,
            r.mode,
            r.delivery.min,
            r.delivery.p1,
            r.delivery.p50,
            r.delivery_overall,
            r.delay_ms.p50,
            r.delay_ms.p99,
            r.delay_ms.max,
            r.hops.p50,
            r.hops.max,
            r.download_x.mean,
            r.download_x.max,
            r.upload_x.mean,
            r.upload_x.max,
            r.publisher_upload_x,
            r.control_share * 100.0,
            r.join_ms.p50,
            r.join_ms.p99,
            r.recovery_ms.p50,
            r.recovery_ms.p99,
            r.delay_over_bound.p50,
            r.delay_over_bound.p99,
            r.joins_without_frame,
            r.max_upload_over_capacity,
            r.delivered_altered,
            c.wall_s,
            c.peak_rss_mib
        );
    }
    out
}

/// The mesh benchmark's JSON: its runs' mode, size, bitrate and amplification figures.
#[derive(serde::Deserialize)]
struct MeshFile {
    params: MeshParams,
    runs: Vec<MeshRun>,
}

#[derive(serde::Deserialize)]
struct MeshParams {
    fps: u32,
    gop_s: f64,
    keyframe_ratio: f64,
    bootstrap_peers: usize,
    duration_s: f64,
}

#[derive(serde::Deserialize)]
struct MeshRun {
    mode: String,
    viewers: usize,
    stream_bitrate: u64,
    download_amplification: MeshSpread,
    viewer_upload: MeshSpread,
    publisher_upload_factor: f64,
}

#[derive(serde::Deserialize)]
struct MeshSpread {
    median: f64,
    mean: f64,
}

fn compare_mesh(args: &Args, path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mesh: MeshFile =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    println!(
        "Validation: p2plive-sim on the loopback network (no loss, 0.05 ms, 10 Gbit/s, no churn) \
         against the mesh benchmark's p2plive runs ({}).",
        path.display()
    );
    println!(
        "The mesh benchmark counts every byte its sockets carry (libp2p framing, gossipsub \
         control included); the simulator counts data-plane messages and their length prefixes.\n"
    );
    println!(
        "| N | bitrate | download × mesh / sim | diff | upload × mean mesh / sim | diff | publisher × mesh / sim | diff |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut worst: f64 = 0.0;
    for run in mesh
        .runs
        .iter()
        .filter(|r| r.mode == "p2plive" && r.viewers <= 100)
    {
        let mut validation = args.clone();
        validation.network = NetworkArg::Loopback;
        validation.bitrate = run.stream_bitrate;
        validation.duration = Duration::from_secs_f64(mesh.params.duration_s.max(1.0));
        validation.fps = mesh.params.fps;
        validation.gop = Duration::from_secs_f64(mesh.params.gop_s);
        validation.keyframe_ratio = mesh.params.keyframe_ratio;
        validation.bootstrap = mesh.params.bootstrap_peers.max(1);
        let config = validation.config(Mode::Trees, run.viewers)?;
        let (report, _) = run_one(&config, true);
        let diff = |mesh: f64, sim: f64| (sim - mesh) / mesh * 100.0;
        let d = diff(run.download_amplification.median, report.download_x.p50);
        let u = diff(run.viewer_upload.mean, report.upload_x.mean);
        let p = diff(run.publisher_upload_factor, report.publisher_upload_x);
        if run.download_amplification.median > 0.5 {
            worst = worst.max(d.abs()).max(u.abs());
        }
        println!(
            "| {} | {} kbit/s | {:.3} / {:.3} | {:+.1} % | {:.3} / {:.3} | {:+.1} % | {:.2} / {:.2} | {:+.1} % |",
            run.viewers,
            run.stream_bitrate / 1000,
            run.download_amplification.median,
            report.download_x.p50,
            d,
            run.viewer_upload.mean,
            report.upload_x.mean,
            u,
            run.publisher_upload_factor,
            report.publisher_upload_x,
            p
        );
    }
    println!("\nLargest difference in download or mean upload: {worst:.1} %.");
    Ok(())
}
