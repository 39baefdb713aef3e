//! The mesh benchmark: one publisher and N viewers as real p2plive nodes in this process,
//! connected over 127.0.0.1, carrying a synthetic live stream; three data planes compared in
//! one run.
//!
//! ```text
//! cargo bench --bench mesh -- --viewers 10,30 --bitrate 3M --duration 30s --json out.json
//! cargo bench --bench mesh -- --viewers 50 --mode p2plive --churn 0.2 --loss 0.05
//! ```
//!
//! Modes:
//! - `p2plive`: the media data plane (`DataPlaneMode::Trees`: striped push trees, erasure
//!   coding, pull repair, signed manifests; `core::dataplane`), gossipsub for the control
//!   channel only; each viewer subscribes to the layer it plays.
//! - `p2plive-gossipsub`: the node's default data plane, media over media-tuned gossipsub.
//! - `gossipsub-default`: the same nodes with rust-libp2p's gossipsub defaults (mesh 6, flood
//!   publish) and every viewer receiving every layer, as with all layers on one topic.
//! - `unicast`: every viewer connects to the publisher only and the publisher flood-publishes,
//!   so it sends each viewer its own copy and no viewer forwards anything.
//!
//! Viewers run the real `core::Viewer` (reassembly, playout, keyframe requests and reports, as
//! in `p2plivesrc`, on a fixed layer) on the real clock; the publisher honours keyframe
//! requests as `p2plivesink` does. Every run
//! stops by itself: each phase has a deadline and a watchdog ends the process past
//! `--max-wall`. Outputs (with `--json`): the JSON, a markdown table and SVG plots beside it.
//!
//! Under `cargo test --all-targets` (no arguments) the binary only says how to run it.

#[path = "../common/duration.rs"]
mod duration;
mod report;
mod run;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use duration::parse_duration;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The project's media data plane (the trees).
    P2plive,
    /// Media over media-tuned gossipsub (the node's default data plane).
    P2pliveGossipsub,
    /// rust-libp2p gossipsub defaults (mesh 6, flood publish), every layer to every viewer.
    GossipsubDefault,
    /// The publisher sends every viewer its own copy.
    Unicast,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::P2plive => "p2plive",
            Mode::P2pliveGossipsub => "p2plive-gossipsub",
            Mode::GossipsubDefault => "gossipsub-default",
            Mode::Unicast => "unicast",
        }
    }
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "mesh",
    about = "p2plive mesh benchmark: one publisher, N viewers on 127.0.0.1"
)]
pub struct Args {
    /// Number of viewers; a comma-separated list runs each size in turn.
    #[arg(long, value_delimiter = ',', default_value = "10")]
    viewers: Vec<usize>,
    /// Bitrate of the top layer (k/M suffixes); one value, or one per `--viewers` entry.
    #[arg(long, value_delimiter = ',', default_value = "3M", value_parser = parse_bitrate)]
    bitrate: Vec<u64>,
    /// Length of the measurement window.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// Time between the last viewer's start and the measurement window.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    warmup: Duration,
    /// Modes to run (all by default), in this order.
    #[arg(long, value_delimiter = ',')]
    mode: Vec<Mode>,
    /// Simulcast layers; layer k carries 1/4^k of the top bitrate; viewer i plays layer i % n.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4))]
    layers: u32,
    /// Frames per second.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=120))]
    fps: u32,
    /// Keyframe interval.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    gop: Duration,
    /// Keyframe size / mean delta-frame size.
    #[arg(long, default_value_t = 8.0)]
    keyframe_ratio: f64,
    /// Peers each viewer bootstraps from, picked at random among the publisher and the viewers
    /// already started.
    #[arg(long, default_value_t = 3)]
    bootstrap_peers: usize,
    /// Share of the viewers killed (and restarted with a new identity) per minute.
    #[arg(long, default_value_t = 0.0)]
    churn: f64,
    /// Share of received pubsub messages dropped at the lossy viewers (node test hook).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Share of the viewers that drop messages with `--loss`.
    #[arg(long, default_value_t = 1.0)]
    loss_nodes: f64,
    /// Seed of every random choice (frame sizes, bootstrap peers, churn, loss).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the JSON; the markdown table and SVG plots go beside it.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Hard wall-clock cap of the whole invocation (default: from the planned runs).
    #[arg(long, value_parser = parse_duration)]
    max_wall: Option<Duration>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn parse_bitrate(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, factor) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 1_000.0),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 1_000_000.0),
        _ => (s, 1.0),
    };
    let value: f64 = digits
        .parse()
        .map_err(|_| format!("bad bitrate {s:?}: expected e.g. 3M, 800k, 250000"))?;
    let bits = (value * factor).round();
    if !(10_000.0..=100_000_000.0).contains(&bits) {
        return Err(format!("bitrate {s} outside 10k..100M"));
    }
    Ok(bits as u64)
}

impl Args {
    fn check(&mut self) -> Result<(), String> {
        if self.mode.is_empty() {
            self.mode = vec![Mode::P2plive, Mode::GossipsubDefault, Mode::Unicast];
        }
        if self.viewers.is_empty() || self.viewers.iter().any(|&n| n == 0 || n > 500) {
            return Err("--viewers: each between 1 and 500".into());
        }
        if self.bitrate.len() != 1 && self.bitrate.len() != self.viewers.len() {
            return Err("--bitrate: one value, or one per --viewers entry".into());
        }
        if self.duration < Duration::from_secs(1) {
            return Err("--duration: at least 1s".into());
        }
        for (name, share) in [
            ("--churn", self.churn),
            ("--loss", self.loss),
            ("--loss-nodes", self.loss_nodes),
        ] {
            if !(0.0..=1.0).contains(&share) {
                return Err(format!("{name}: a share between 0 and 1"));
            }
        }
        if !(1.0..=100.0).contains(&self.keyframe_ratio) {
            return Err("--keyframe-ratio: between 1 and 100".into());
        }
        if self.gop < Duration::from_secs_f64(1.0 / f64::from(self.fps)) {
            return Err("--gop: at least one frame".into());
        }
        if self.bootstrap_peers == 0 {
            return Err("--bootstrap-peers: at least 1".into());
        }
        Ok(())
    }

    fn bitrate_for(&self, index: usize) -> u64 {
        if self.bitrate.len() == 1 {
            self.bitrate[0]
        } else {
            self.bitrate[index]
        }
    }

    /// Upper bound of one run: setup, warmup, window, drain and teardown.
    fn run_budget(&self, viewers: usize) -> Duration {
        run::setup_budget(viewers) + self.warmup + self.duration + run::DRAIN + run::TEARDOWN
    }
}

fn main() {
    // `cargo test --all-targets` runs bench targets without arguments: nothing to measure.
    if std::env::args_os().len() <= 1 {
        println!("mesh: a benchmark; run it with `cargo bench --bench mesh -- --help`");
        return;
    }
    let mut args = Args::parse();
    if let Err(err) = args.check() {
        eprintln!("mesh: {err}");
        std::process::exit(2);
    }
    if cfg!(debug_assertions) {
        eprintln!("mesh: a debug build: its CPU and latency figures are not comparable");
    }
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }

    let planned: Duration = args
        .viewers
        .iter()
        .map(|&n| args.run_budget(n) * args.mode.len() as u32)
        .sum();
    let max_wall = args
        .max_wall
        .unwrap_or(planned + planned / 2 + Duration::from_secs(30));
    std::thread::spawn(move || {
        std::thread::sleep(max_wall);
        eprintln!("mesh: hard wall-clock cap of {max_wall:?} reached; exiting");
        std::process::exit(3);
    });
    eprintln!(
        "mesh: {} run(s), at most {:.0} s each phase-bounded, hard cap {:.0} s",
        args.viewers.len() * args.mode.len(),
        planned.as_secs_f64(),
        max_wall.as_secs_f64()
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");

    let mut results = Vec::new();
    let mut failures = Vec::new();
    for (index, &viewers) in args.viewers.iter().enumerate() {
        for &mode in &args.mode {
            let config = run::RunConfig::new(&args, mode, viewers, args.bitrate_for(index));
            eprintln!(
                "mesh: {} with {viewers} viewers at {} bit/s ...",
                mode.name(),
                config.bitrate
            );
            match runtime.block_on(run::run(config)) {
                Ok(result) => {
                    eprintln!("{}", report::one_line(&result));
                    results.push(result);
                }
                // Reported in the outputs; the other runs still go ahead.
                Err(err) => {
                    eprintln!("mesh: {} with {viewers} viewers failed: {err}", mode.name());
                    failures.push(report::Failure {
                        mode,
                        viewers,
                        error: err,
                    });
                }
            }
        }
    }
    // Nodes are shut down at the end of each run; give their tasks no further time.
    runtime.shutdown_timeout(Duration::from_secs(2));

    let failed = !failures.is_empty();
    let output = report::Output::new(&args, results, failures);
    let table = report::markdown(&output);
    println!("{table}");
    if let Some(json) = &args.json {
        if let Err(err) = report::write_all(json, &output, &table) {
            eprintln!("mesh: cannot write the outputs: {err}");
            std::process::exit(1);
        }
        eprintln!("mesh: wrote {} and its table and plots", json.display());
    }
    if failed {
        std::process::exit(1);
    }
}
