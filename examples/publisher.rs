//! Publish a live test stream with `p2plivesink`, the way an application embeds the plugin.
//!
//! ```text
//! cargo run --release --example publisher -- --topic demo --audio
//! ```
//!
//! The plugin is linked into the program and registered with
//! `gstp2plive::plugin_register_static()`, so no `GST_PLUGIN_PATH` is needed. The pipeline is
//!
//! ```text
//! videotestsrc is-live=true pattern=ball ! video/x-raw,width=640,height=360,framerate=30/1
//!     ! p2plivesink topic=... listen=... mdns=false
//! audiotestsrc is-live=true wave=ticks ! p2plivesink.audio_%u          (with --audio)
//! ```
//!
//! When the sink's node is listening it prints `LISTENING <multiaddr>` (one dialable address
//! ending in `/p2p/<peer id>`) on stdout, for viewers to bootstrap from. On Ctrl-C, SIGTERM or
//! after `--duration` seconds it sends EOS, waits at most 3 s for it to drain so viewers learn
//! the stream ended, and exits.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use gst::glib;
use gst::prelude::*;

/// How long to wait for EOS to reach the sink once it was sent.
const EOS_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Parser, Debug)]
#[command(about = "Publish a live test stream over p2plive")]
struct Args {
    /// Stream name viewers subscribe to.
    #[arg(long, default_value = "demo")]
    topic: String,
    /// Comma-separated multiaddrs to listen on.
    #[arg(
        long,
        default_value = "/ip4/127.0.0.1/udp/0/quic-v1,/ip4/127.0.0.1/tcp/0"
    )]
    listen: String,
    /// Comma-separated multiaddrs (ending in /p2p/<peer id>) of peers to dial first.
    #[arg(long)]
    bootstrap: Option<String>,
    /// Stop after this many seconds (0 = run until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    duration: u64,
    /// Also publish an audio track (audiotestsrc).
    #[arg(long)]
    audio: bool,
    /// Discover peers on the local network with mDNS.
    #[arg(long)]
    mdns: bool,
    /// Run the pipeline on a clock this many times as fast as the system clock (0.995: 0.5 %
    /// slow), as a cheap audio device's or another machine's clock would: for trying how
    /// viewers follow a drifting publisher (their `clock-drift-ppm` and `rebases` stats).
    #[arg(long, default_value_t = 1.0)]
    clock_rate: f64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("publisher: error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    gst::init()?;
    gstp2plive::plugin_register_static()?;

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))?;
    }

    let pipeline = build_pipeline(args)?;
    if args.clock_rate != 1.0 {
        if !(0.5..=2.0).contains(&args.clock_rate) {
            return Err(format!("--clock-rate {} is outside 0.5..=2", args.clock_rate).into());
        }
        // A clock of its own: calibrating the shared system clock would skew everything.
        let clock = glib::Object::new::<gst::SystemClock>();
        let now = clock.internal_time();
        let denom = 1_000_000u64;
        let num = (args.clock_rate * denom as f64).round() as u64;
        clock.set_calibration(now, now, num, denom);
        pipeline.use_clock(Some(&clock));
        println!(
            "publisher: pipeline clock runs at {} of the system clock",
            args.clock_rate
        );
    }
    let bus = pipeline.bus().expect("a pipeline has a bus");
    pipeline.set_state(gst::State::Playing)?;
    println!("publisher: publishing topic '{}'", args.topic);

    let deadline = (args.duration > 0).then(|| Instant::now() + Duration::from_secs(args.duration));
    let mut listening_printed = false;
    let mut eos_deadline: Option<Instant> = None;
    let mut code = ExitCode::SUCCESS;

    loop {
        let now = Instant::now();
        match eos_deadline {
            None if stop.load(Ordering::SeqCst) || deadline.is_some_and(|d| now >= d) => {
                println!("publisher: stopping, sending EOS");
                pipeline.send_event(gst::event::Eos::new());
                eos_deadline = Some(now + EOS_TIMEOUT);
            }
            Some(limit) if now >= limit => {
                eprintln!(
                    "publisher: EOS did not drain within {} s, stopping anyway",
                    EOS_TIMEOUT.as_secs()
                );
                break;
            }
            _ => {}
        }

        let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else {
            continue;
        };
        match msg.view() {
            gst::MessageView::Eos(_) => {
                if eos_deadline.is_some() {
                    println!("publisher: EOS drained");
                } else {
                    println!("publisher: end of stream");
                }
                break;
            }
            gst::MessageView::Error(err) => {
                eprintln!(
                    "publisher: error from {}: {} ({})",
                    err.src().map(|s| s.path_string()).unwrap_or_default(),
                    err.error(),
                    err.debug().unwrap_or_default()
                );
                code = ExitCode::FAILURE;
                break;
            }
            gst::MessageView::Warning(warn) => {
                eprintln!(
                    "publisher: warning from {}: {} ({})",
                    warn.src().map(|s| s.path_string()).unwrap_or_default(),
                    warn.error(),
                    warn.debug().unwrap_or_default()
                );
            }
            gst::MessageView::Element(elem) => {
                if let Some(s) = elem.structure()
                    && s.name() == "p2plive-listening"
                {
                    print_listening("publisher", s, &mut listening_printed);
                }
            }
            _ => {}
        }
    }

    pipeline.set_state(gst::State::Null)?;
    println!("publisher: stopped");
    Ok(code)
}

/// `videotestsrc ! capsfilter ! p2plivesink` (+ `audiotestsrc ! p2plivesink` with `--audio`).
fn build_pipeline(args: &Args) -> Result<gst::Pipeline, Box<dyn std::error::Error>> {
    let pipeline = gst::Pipeline::with_name("publisher");

    let mut sink = gst::ElementFactory::make("p2plivesink")
        .name("p2plivesink")
        .property("topic", &args.topic)
        .property("listen", &args.listen)
        .property("mdns", args.mdns);
    if let Some(bootstrap) = &args.bootstrap {
        sink = sink.property("bootstrap", bootstrap);
    }
    let sink = sink.build()?;

    let vsrc = gst::ElementFactory::make("videotestsrc")
        .property("is-live", true)
        .property_from_str("pattern", "ball")
        .build()?;
    let vcaps = gst::ElementFactory::make("capsfilter")
        .property(
            "caps",
            gst::Caps::builder("video/x-raw")
                .field("width", 640i32)
                .field("height", 360i32)
                .field("framerate", gst::Fraction::new(30, 1))
                .build(),
        )
        .build()?;
    pipeline.add_many([&vsrc, &vcaps, &sink])?;
    gst::Element::link_many([&vsrc, &vcaps])?;
    let video_pad = sink
        .request_pad_simple("video_%u")
        .ok_or("p2plivesink gave no video_%u pad")?;
    vcaps
        .static_pad("src")
        .expect("capsfilter has a src pad")
        .link(&video_pad)?;

    if args.audio {
        let asrc = gst::ElementFactory::make("audiotestsrc")
            .property("is-live", true)
            .property_from_str("wave", "ticks")
            .build()?;
        pipeline.add(&asrc)?;
        let audio_pad = sink
            .request_pad_simple("audio_%u")
            .ok_or("p2plivesink gave no audio_%u pad")?;
        asrc.static_pad("src")
            .expect("audiotestsrc has a src pad")
            .link(&audio_pad)?;
    }

    Ok(pipeline)
}

/// Prints `LISTENING <first address>` once, then every address the node listens on.
fn print_listening(who: &str, s: &gst::StructureRef, printed: &mut bool) {
    let peer_id = s.get::<&str>("peer-id").unwrap_or_default();
    let addrs: Vec<String> = s
        .get::<&str>("multiaddrs")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| {
            if a.contains("/p2p/") || peer_id.is_empty() {
                a.to_owned()
            } else {
                format!("{a}/p2p/{peer_id}")
            }
        })
        .collect();
    let mut out = std::io::stdout().lock();
    if !*printed && let Some(first) = addrs.first() {
        let _ = writeln!(out, "LISTENING {first}");
        *printed = true;
    }
    let _ = writeln!(out, "{who}: peer id {peer_id}");
    for addr in &addrs {
        let _ = writeln!(out, "{who}:   listening on {addr}");
    }
    let _ = out.flush();
}
