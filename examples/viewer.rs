//! Watch a p2plive stream with `p2plivesrc`, the way an application embeds the plugin.
//!
//! ```text
//! cargo run --release --example viewer -- --topic demo --bootstrap /ip4/127.0.0.1/udp/4001/quic-v1/p2p/12D3Koo... --display
//! ```
//!
//! The plugin is linked into the program and registered with
//! `gstp2plive::plugin_register_static()`. The pipeline starts as a lone
//! `p2plivesrc topic=... bootstrap=... listen=... mdns=false`; its sometimes pads `video_%u` and
//! `audio_%u` (decoded raw media) appear once the stream's catalog arrived, and are linked then
//! to `videoconvert ! autovideosink|fakesink sync=true` and
//! `audioconvert ! autoaudiosink|fakesink sync=true`. A pad probe counts buffers and remembers
//! the video size.
//!
//! A second probe, on each sink's pad, measures the A/V offset of what is rendered. p2plivesrc
//! attaches to every output buffer a `gst::ReferenceTimestampMeta` with caps
//! `timestamp/x-p2plive-stream` holding the publisher's stream time of that frame; the decoders
//! (vp8dec, opusdec, ... in decodebin) and the converters copy it to the decoded buffer. A
//! buffer's delay is its running time (when the sink renders it) minus that stream time. The
//! offset is video delay minus audio delay, over the latest video and audio buffers when they
//! render at most 100 ms apart: positive when the video plays later than the audio it was
//! captured with.
//!
//! The viewer also relays to other viewers: it prints `LISTENING <multiaddr>` like the publisher,
//! so further viewers can bootstrap from it. It prints a progress line every second (ending in
//! the latest `av_offset_ms=X`) and, at EOS, Ctrl-C, SIGTERM or after `--duration` seconds, a
//! summary line `SUMMARY <name> video_frames=N audio_buffers=N size=WxH eos=true|false
//! av_offset_ms=X av_offset_min_ms=X av_offset_max_ms=X av_offset_samples=N` (the offset at the
//! end and its extremes over the run, in ms; `none` until both tracks played) and the element's
//! `stats`. It exits 0 even when nothing arrived (the caller decides), non-zero on errors.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use gst::prelude::*;

#[derive(Parser, Debug)]
#[command(about = "Watch a p2plive stream")]
struct Args {
    /// Stream name to subscribe to.
    #[arg(long, default_value = "demo")]
    topic: String,
    /// Comma-separated multiaddrs (ending in /p2p/<peer id>) of peers to dial first: the
    /// publisher or any viewer of the stream.
    #[arg(long)]
    bootstrap: Option<String>,
    /// Comma-separated multiaddrs to listen on (for other viewers to fetch from this one).
    #[arg(
        long,
        default_value = "/ip4/127.0.0.1/udp/0/quic-v1,/ip4/127.0.0.1/tcp/0"
    )]
    listen: String,
    /// Only accept the stream of this publisher (peer id).
    #[arg(long)]
    publisher: Option<String>,
    /// Stop after this many seconds (0 = run until EOS or Ctrl-C).
    #[arg(long, default_value_t = 0)]
    duration: u64,
    /// Label for the output lines.
    #[arg(long, default_value = "viewer")]
    name: String,
    /// Show the video in a window and play the audio (autovideosink / autoaudiosink)
    /// instead of discarding them in fakesinks.
    #[arg(long)]
    display: bool,
    /// Discover peers on the local network with mDNS.
    #[arg(long)]
    mdns: bool,
}

/// Buffers of the two kinds are compared for the A/V offset only if they render at most this
/// far apart (so a clock rebase, which moves both tracks, shows at most briefly).
const AV_PAIR_WINDOW: gst::ClockTime = gst::ClockTime::from_mseconds(100);

/// What the pad probes saw, shared with the streaming threads.
#[derive(Default)]
struct Counters {
    video_frames: AtomicU64,
    audio_buffers: AtomicU64,
    size: Mutex<Option<(i32, i32)>>,
    av_offset: Mutex<AvOffset>,
}

/// The A/V offset of the rendered buffers (see the module documentation).
#[derive(Default)]
struct AvOffset {
    /// (running time, publisher stream time) in ns of the latest buffer of each kind.
    video: Option<(u64, u64)>,
    audio: Option<(u64, u64)>,
    /// Offsets in ns: the latest one and the extremes over the run.
    last: Option<i64>,
    min: i64,
    max: i64,
    samples: u64,
}

impl AvOffset {
    /// Records a rendered buffer and, when a buffer of the other kind rendered close to it,
    /// the offset between their delays.
    fn update(&mut self, kind: Kind, running_time: u64, stream_time: u64) {
        match kind {
            Kind::Video => self.video = Some((running_time, stream_time)),
            Kind::Audio => self.audio = Some((running_time, stream_time)),
        }
        let (Some((video_rt, video_st)), Some((audio_rt, audio_st))) = (self.video, self.audio)
        else {
            return;
        };
        if video_rt.abs_diff(audio_rt) > AV_PAIR_WINDOW.nseconds() {
            return;
        }
        let delay = |rt: u64, st: u64| rt as i64 - st as i64;
        let offset = delay(video_rt, video_st) - delay(audio_rt, audio_st);
        if self.samples == 0 {
            (self.min, self.max) = (offset, offset);
        } else {
            self.min = self.min.min(offset);
            self.max = self.max.max(offset);
        }
        self.last = Some(offset);
        self.samples += 1;
    }

    /// `av_offset_ms=X`, the latest offset.
    fn progress_string(&self) -> String {
        format!("av_offset_ms={}", ms_string(self.last))
    }

    /// The latest offset, its extremes and the number of samples.
    fn summary_string(&self) -> String {
        let extreme = |v: i64| ms_string((self.samples > 0).then_some(v));
        format!(
            "av_offset_ms={} av_offset_min_ms={} av_offset_max_ms={} av_offset_samples={}",
            ms_string(self.last),
            extreme(self.min),
            extreme(self.max),
            self.samples
        )
    }
}

/// Nanoseconds as milliseconds with two decimals (never `-0.00`), or `none`.
fn ms_string(ns: Option<i64>) -> String {
    ns.map_or_else(
        || "none".to_owned(),
        |ns| format!("{:.2}", (ns as f64 / 1e4).round() / 100.0 + 0.0),
    )
}

impl Counters {
    fn size_string(&self) -> String {
        match *self.size.lock().unwrap() {
            Some((w, h)) => format!("{w}x{h}"),
            None => "none".to_owned(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Video,
    Audio,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("{}: error: {err}", args.name);
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

    let name = args.name.as_str();
    if args.bootstrap.is_none() && !args.mdns {
        eprintln!(
            "{name}: warning: no --bootstrap and no --mdns: only peers that dial in can be found"
        );
    }

    let counters = Arc::new(Counters::default());
    let pipeline = gst::Pipeline::with_name(name);
    let mut src = gst::ElementFactory::make("p2plivesrc")
        .name("p2plivesrc")
        .property("topic", &args.topic)
        .property("listen", &args.listen)
        .property("mdns", args.mdns);
    if let Some(bootstrap) = &args.bootstrap {
        src = src.property("bootstrap", bootstrap);
    }
    if let Some(publisher) = &args.publisher {
        src = src.property("publisher", publisher);
    }
    let src = src.build()?;
    pipeline.add(&src)?;

    {
        let pipeline_weak = pipeline.downgrade();
        let counters = counters.clone();
        let display = args.display;
        let name = args.name.clone();
        src.connect_pad_added(move |_, pad| {
            let Some(pipeline) = pipeline_weak.upgrade() else {
                return;
            };
            if let Err(err) = link_new_pad(&pipeline, pad, display, &counters) {
                eprintln!("{name}: cannot link pad {}: {err}", pad.name());
                let _ = pipeline.post_message(
                    gst::message::Error::builder(
                        gst::CoreError::Pad,
                        &format!("cannot link pad {}: {err}", pad.name()),
                    )
                    .src(&pipeline)
                    .build(),
                );
            }
        });
    }

    let bus = pipeline.bus().expect("a pipeline has a bus");
    pipeline.set_state(gst::State::Playing)?;
    println!("{name}: watching topic '{}'", args.topic);

    let start = Instant::now();
    let deadline = (args.duration > 0).then(|| start + Duration::from_secs(args.duration));
    let mut next_progress = start + Duration::from_secs(1);
    let mut last_frames = 0u64;
    let mut listening_printed = false;
    let mut eos = false;
    let mut code = ExitCode::SUCCESS;

    loop {
        let now = Instant::now();
        if stop.load(Ordering::SeqCst) {
            println!("{name}: interrupted");
            break;
        }
        if deadline.is_some_and(|d| now >= d) {
            println!("{name}: duration reached");
            break;
        }
        if now >= next_progress {
            let frames = counters.video_frames.load(Ordering::Relaxed);
            println!(
                "PROGRESS {name} t={}s video_frames={frames} (+{}) audio_buffers={} size={} {}",
                start.elapsed().as_secs(),
                frames - last_frames,
                counters.audio_buffers.load(Ordering::Relaxed),
                counters.size_string(),
                counters.av_offset.lock().unwrap().progress_string()
            );
            let _ = std::io::stdout().flush();
            last_frames = frames;
            next_progress += Duration::from_secs(1);
        }

        let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else {
            continue;
        };
        match msg.view() {
            gst::MessageView::Eos(_) => {
                println!("{name}: end of stream");
                eos = true;
                break;
            }
            gst::MessageView::Error(err) => {
                eprintln!(
                    "{name}: error from {}: {} ({})",
                    err.src().map(|s| s.path_string()).unwrap_or_default(),
                    err.error(),
                    err.debug().unwrap_or_default()
                );
                code = ExitCode::FAILURE;
                break;
            }
            gst::MessageView::Warning(warn) => {
                eprintln!(
                    "{name}: warning from {}: {} ({})",
                    warn.src().map(|s| s.path_string()).unwrap_or_default(),
                    warn.error(),
                    warn.debug().unwrap_or_default()
                );
            }
            gst::MessageView::Element(elem) => {
                if let Some(s) = elem.structure()
                    && s.name() == "p2plive-listening"
                {
                    print_listening(name, s, &mut listening_printed);
                }
            }
            _ => {}
        }
    }

    // Read the statistics while the element still runs.
    let stats = src
        .property_value("stats")
        .get::<Option<gst::Structure>>()
        .ok()
        .flatten();
    pipeline.set_state(gst::State::Null)?;

    println!(
        "SUMMARY {name} video_frames={} audio_buffers={} size={} eos={eos} {}",
        counters.video_frames.load(Ordering::Relaxed),
        counters.audio_buffers.load(Ordering::Relaxed),
        counters.size_string(),
        counters.av_offset.lock().unwrap().summary_string()
    );
    match stats {
        Some(stats) => println!("STATS {name} {stats}"),
        None => println!("STATS {name} none"),
    }
    let _ = std::io::stdout().flush();
    Ok(code)
}

/// Links a new `video_%u` / `audio_%u` pad of p2plivesrc to a converter and a sink, counts
/// the buffers that pass and measures the A/V offset at the sink.
fn link_new_pad(
    pipeline: &gst::Pipeline,
    pad: &gst::Pad,
    display: bool,
    counters: &Arc<Counters>,
) -> Result<(), Box<dyn std::error::Error>> {
    let pad_name = pad.name();
    let kind = if pad_name.starts_with("video_") {
        Kind::Video
    } else if pad_name.starts_with("audio_") {
        Kind::Audio
    } else {
        // Not one of the documented names: decide by the caps.
        let caps = pad.current_caps().unwrap_or_else(|| pad.query_caps(None));
        match caps.structure(0).map(|s| s.name().as_str()) {
            Some(n) if n.starts_with("video/") => Kind::Video,
            Some(n) if n.starts_with("audio/") => Kind::Audio,
            _ => return Err(format!("unexpected pad with caps {caps}").into()),
        }
    };

    let (convert, sink) = match kind {
        Kind::Video => (
            gst::ElementFactory::make("videoconvert").build()?,
            if display {
                gst::ElementFactory::make("autovideosink").build()?
            } else {
                gst::ElementFactory::make("fakesink")
                    .property("sync", true)
                    .build()?
            },
        ),
        Kind::Audio => (
            gst::ElementFactory::make("audioconvert").build()?,
            if display {
                gst::ElementFactory::make("autoaudiosink").build()?
            } else {
                gst::ElementFactory::make("fakesink")
                    .property("sync", true)
                    .build()?
            },
        ),
    };
    pipeline.add_many([&convert, &sink])?;
    convert.link(&sink)?;
    add_av_offset_probe(&sink, kind, counters);
    sink.sync_state_with_parent()?;
    convert.sync_state_with_parent()?;

    let counters = counters.clone();
    pad.add_probe(
        gst::PadProbeType::BUFFER
            | gst::PadProbeType::BUFFER_LIST
            | gst::PadProbeType::EVENT_DOWNSTREAM,
        move |_, info| {
            let n = match &info.data {
                Some(gst::PadProbeData::Buffer(_)) => 1,
                Some(gst::PadProbeData::BufferList(list)) => list.len() as u64,
                Some(gst::PadProbeData::Event(event)) => {
                    if let (Kind::Video, gst::EventView::Caps(caps)) = (kind, event.view())
                        && let Some(s) = caps.caps().structure(0)
                        && let (Ok(w), Ok(h)) = (s.get::<i32>("width"), s.get::<i32>("height"))
                    {
                        *counters.size.lock().unwrap() = Some((w, h));
                    }
                    0
                }
                _ => 0,
            };
            if n > 0 {
                let counter = match kind {
                    Kind::Video => &counters.video_frames,
                    Kind::Audio => &counters.audio_buffers,
                };
                counter.fetch_add(n, Ordering::Relaxed);
            }
            gst::PadProbeReturn::Ok
        },
    );

    pad.link(
        &convert
            .static_pad("sink")
            .expect("converters have a sink pad"),
    )?;
    println!("{}: linked {pad_name} ({kind:?})", pipeline.name());
    Ok(())
}

/// Feeds the running time and the publisher's stream time of each buffer reaching `sink` into
/// the A/V offset. Buffers without the stream time meta (or a time segment) are left out.
fn add_av_offset_probe(sink: &gst::Element, kind: Kind, counters: &Arc<Counters>) {
    let stream_time_caps = gst::Caps::new_empty_simple("timestamp/x-p2plive-stream");
    let counters = counters.clone();
    let pad = sink.static_pad("sink").expect("sinks have a sink pad");
    pad.add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
        let Some(gst::PadProbeData::Buffer(buffer)) = &info.data else {
            return gst::PadProbeReturn::Ok;
        };
        let stream_time = buffer
            .iter_meta::<gst::ReferenceTimestampMeta>()
            .find(|meta| meta.reference().is_subset(&stream_time_caps))
            .map(|meta| meta.timestamp());
        let running_time = pad
            .sticky_event::<gst::event::Segment>(0)
            .and_then(|event| {
                let segment = event.segment().downcast_ref::<gst::ClockTime>()?;
                segment.to_running_time(buffer.pts()?)
            });
        if let (Some(stream_time), Some(running_time)) = (stream_time, running_time) {
            counters.av_offset.lock().unwrap().update(
                kind,
                running_time.nseconds(),
                stream_time.nseconds(),
            );
        }
        gst::PadProbeReturn::Ok
    });
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
