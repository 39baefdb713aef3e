use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use libp2p::{Multiaddr, PeerId};

use crate::RUNTIME;
use crate::common::{self, NetworkSettings};
use crate::core::wire::{Catalog, Channel, Track, TrackKind};
use crate::core::{OutputFrame, Subscriber, SubscriberConfig, SubscriberEvent, SubscriberStats};
use crate::node::{Event, Node};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "p2plivesrc",
        gst::DebugColorFlags::empty(),
        Some("p2plive viewer"),
    )
});

const DEFAULT_DECODE: bool = true;
const DEFAULT_LATENCY_MS: u32 = 300;
const DEFAULT_BUFFER_SIZE: u32 = 256;
const DEFAULT_JITTER_TOLERANCE_MS: u32 = 60;
const DEFAULT_FRAGMENT_TIMEOUT_MS: u32 = 1000;
/// Largest message the node accepts; generous next to any sane `max-fragment-size`.
const MAX_TRANSMIT_SIZE: usize = 256 * 1024;
/// Frames queued in an output appsrc at most; the oldest go first when it is full.
const OUTPUT_QUEUE_FRAMES: u64 = 300;
/// Reference timestamp meta carrying the publisher's stream time (its running time) of a frame.
static STREAM_TIME_CAPS: LazyLock<gst::Caps> =
    LazyLock::new(|| gst::Caps::new_empty_simple("timestamp/x-p2plive-stream"));
/// Reference timestamp meta carrying the publisher's wall clock at capture (Unix epoch).
static UNIX_TIME_CAPS: LazyLock<gst::Caps> =
    LazyLock::new(|| gst::Caps::new_empty_simple("timestamp/x-unix"));
/// Weight of the newest sample in the moving average of the end-to-end latency.
const LATENCY_AVERAGE_WEIGHT: f64 = 0.05;

#[derive(Debug, Clone)]
struct Settings {
    net: NetworkSettings,
    publisher: Option<String>,
    decode: bool,
    latency_ms: u32,
    buffer_size: u32,
    jitter_tolerance_ms: u32,
    fragment_timeout_ms: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            net: NetworkSettings::default(),
            publisher: None,
            decode: DEFAULT_DECODE,
            latency_ms: DEFAULT_LATENCY_MS,
            buffer_size: DEFAULT_BUFFER_SIZE,
            jitter_tolerance_ms: DEFAULT_JITTER_TOLERANCE_MS,
            fragment_timeout_ms: DEFAULT_FRAGMENT_TIMEOUT_MS,
        }
    }
}

/// Counters of what the element did with the frames the core released.
#[derive(Debug, Default)]
struct OutputCounters {
    pushed: AtomicU64,
    /// Released before the pipeline had a clock (not PLAYING) or for a track without output.
    discarded: AtomicU64,
    /// Refused by the output queue (flushing, or already ended).
    refused: AtomicU64,
}

/// What the element and its driver task share.
#[derive(Default)]
struct Shared {
    addrs: Mutex<Vec<Multiaddr>>,
    publisher: Mutex<Option<PeerId>>,
    subscriber: Mutex<SubscriberStats>,
    counters: OutputCounters,
    /// Moving average of capture (publisher wall clock) to render (viewer wall clock), ms.
    latency_ms: Mutex<Option<f64>>,
    /// Moving average of capture to release by the playout buffer (network and reassembly), ms.
    transit_ms: Mutex<Option<f64>>,
    ended: Mutex<bool>,
}

struct State {
    node: Node,
    shared: Arc<Shared>,
    driver: tokio::task::JoinHandle<()>,
}

/// The output of one track: an appsrc, optionally a decodebin, and a ghost pad.
struct TrackOutput {
    appsrc: gst_app::AppSrc,
    kind: TrackKind,
    caps: String,
}

/// Tracks when every output of the first catalog has its pad, to signal `no-more-pads` only
/// then (decodebin exposes its pad only once data flows, which gst-launch linking waits for).
#[derive(Default)]
struct PadAccounting {
    expected: Option<usize>,
    exposed: usize,
    signalled: bool,
}

#[derive(Default)]
pub struct P2pLiveSrc {
    settings: Mutex<Settings>,
    state: Mutex<Option<State>>,
    pads: Mutex<PadAccounting>,
}

#[glib::object_subclass]
impl ObjectSubclass for P2pLiveSrc {
    const NAME: &'static str = "GstP2pLiveSrc";
    type Type = super::P2pLiveSrc;
    type ParentType = gst::Bin;
}

static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
    let mut properties = NetworkSettings::properties();
    properties.extend([
        glib::ParamSpecString::builder("publisher")
            .nick("Publisher")
            .blurb(
                "Peer id of the publisher to accept media from; empty: the first publisher \
                 whose catalog arrives on the topic (trust on first use)",
            )
            .mutable_ready()
            .build(),
        glib::ParamSpecBoolean::builder("decode")
            .nick("Decode")
            .blurb("Output decoded raw media; false outputs the encoded media as published")
            .default_value(DEFAULT_DECODE)
            .mutable_ready()
            .build(),
        glib::ParamSpecUInt::builder("latency")
            .nick("Latency")
            .blurb(
                "Playout delay in milliseconds: how late a frame may arrive and still play, \
                 reported in the latency query",
            )
            .minimum(20)
            .maximum(30_000)
            .default_value(DEFAULT_LATENCY_MS)
            .mutable_ready()
            .build(),
        glib::ParamSpecUInt::builder("buffer-size")
            .nick("Buffer size")
            .blurb("Most frames held per track while waiting for a missing one")
            .minimum(8)
            .maximum(4096)
            .default_value(DEFAULT_BUFFER_SIZE)
            .mutable_ready()
            .build(),
        glib::ParamSpecUInt::builder("jitter-tolerance")
            .nick("Jitter tolerance")
            .blurb(
                "Milliseconds a missing frame is waited for after a later one arrived, before \
                 playback skips to the next keyframe",
            )
            .maximum(10_000)
            .default_value(DEFAULT_JITTER_TOLERANCE_MS)
            .mutable_ready()
            .build(),
        glib::ParamSpecUInt::builder("fragment-timeout")
            .nick("Fragment timeout")
            .blurb("Milliseconds an incomplete frame is kept waiting for its missing fragments")
            .minimum(10)
            .maximum(60_000)
            .default_value(DEFAULT_FRAGMENT_TIMEOUT_MS)
            .mutable_ready()
            .build(),
    ]);
    properties
});

impl ObjectImpl for P2pLiveSrc {
    fn properties() -> &'static [glib::ParamSpec] {
        &PROPERTIES
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut settings = self.settings.lock().unwrap();
        if settings.net.set_property(pspec.name(), value) {
            return;
        }
        match pspec.name() {
            "publisher" => {
                settings.publisher = value
                    .get::<Option<String>>()
                    .expect("type checked upstream")
                    .filter(|s| !s.is_empty());
                if let Some(publisher) = &settings.publisher
                    && PeerId::from_str(publisher).is_err()
                {
                    gst::warning!(
                        CAT,
                        imp = self,
                        "publisher '{publisher}' is not a peer id; starting will fail"
                    );
                }
            }
            "decode" => settings.decode = value.get().expect("type checked upstream"),
            "latency" => settings.latency_ms = value.get().expect("type checked upstream"),
            "buffer-size" => settings.buffer_size = value.get().expect("type checked upstream"),
            "jitter-tolerance" => {
                settings.jitter_tolerance_ms = value.get().expect("type checked upstream")
            }
            "fragment-timeout" => {
                settings.fragment_timeout_ms = value.get().expect("type checked upstream")
            }
            other => unreachable!("unknown property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        match pspec.name() {
            "peer-id" => self
                .state
                .lock()
                .unwrap()
                .as_ref()
                .map(|s| s.node.peer_id().to_string())
                .to_value(),
            "multiaddrs" => self
                .state
                .lock()
                .unwrap()
                .as_ref()
                .map(|s| common::join_addrs(&s.shared.addrs.lock().unwrap()))
                .to_value(),
            "stats" => self.stats().to_value(),
            name => {
                let settings = self.settings.lock().unwrap();
                if let Some(value) = settings.net.property(name) {
                    return value;
                }
                match name {
                    "publisher" => settings.publisher.to_value(),
                    "decode" => settings.decode.to_value(),
                    "latency" => settings.latency_ms.to_value(),
                    "buffer-size" => settings.buffer_size.to_value(),
                    "jitter-tolerance" => settings.jitter_tolerance_ms.to_value(),
                    "fragment-timeout" => settings.fragment_timeout_ms.to_value(),
                    other => unreachable!("unknown property {other}"),
                }
            }
        }
    }
}

impl GstObjectImpl for P2pLiveSrc {}

impl ElementImpl for P2pLiveSrc {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "P2P live source",
                "Source/Network/Audio/Video",
                "Plays a live stream from a libp2p peer-to-peer mesh and relays it to other viewers",
                "p2plive developers",
            )
        });
        Some(&*METADATA)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            let video: gst::Caps =
                "video/x-raw(ANY); video/x-h264; video/x-vp8; video/x-vp9; video/x-av1"
                    .parse()
                    .expect("valid caps");
            let audio: gst::Caps = "audio/x-raw(ANY); audio/x-opus"
                .parse()
                .expect("valid caps");
            vec![
                gst::PadTemplate::new(
                    "video_%u",
                    gst::PadDirection::Src,
                    gst::PadPresence::Sometimes,
                    &video,
                )
                .expect("valid template"),
                gst::PadTemplate::new(
                    "audio_%u",
                    gst::PadDirection::Src,
                    gst::PadPresence::Sometimes,
                    &audio,
                )
                .expect("valid template"),
            ]
        });
        &TEMPLATES
    }

    fn change_state(
        &self,
        transition: gst::StateChange,
    ) -> Result<gst::StateChangeSuccess, gst::StateChangeError> {
        if transition == gst::StateChange::NullToReady
            && let Err(err) = self.start()
        {
            self.post_error_message(err);
            return Err(gst::StateChangeError);
        }
        let result = self.parent_change_state(transition);
        match transition {
            gst::StateChange::ReadyToNull => self.stop(),
            gst::StateChange::NullToReady if result.is_err() => self.stop(),
            _ => {}
        }
        // A live source produces no data in PAUSED: there is nothing to preroll.
        match (transition, result) {
            (gst::StateChange::ReadyToPaused | gst::StateChange::PlayingToPaused, Ok(_)) => {
                Ok(gst::StateChangeSuccess::NoPreroll)
            }
            (_, result) => result,
        }
    }
}

impl BinImpl for P2pLiveSrc {
    fn handle_message(&self, message: gst::Message) {
        match message.view() {
            // decodebin changes state asynchronously until data flows; passed up, that would
            // take this live source out of PLAYING, and data only flows in PLAYING. A live
            // source never prerolls, so its children's async state changes are not its own.
            gst::MessageView::AsyncStart(_) | gst::MessageView::AsyncDone(_) => {}
            _ => self.parent_handle_message(message),
        }
    }
}

impl P2pLiveSrc {
    fn start(&self) -> Result<(), gst::ErrorMessage> {
        let settings = self.settings.lock().unwrap().clone();
        settings
            .net
            .validate_topic()
            .map_err(|err| gst::error_msg!(gst::LibraryError::Settings, ["{err}"]))?;
        let publisher = settings
            .publisher
            .as_deref()
            .map(PeerId::from_str)
            .transpose()
            .map_err(|err| {
                gst::error_msg!(
                    gst::LibraryError::Settings,
                    ["publisher is not a valid peer id: {err}"]
                )
            })?;
        let config = settings
            .net
            .node_config(MAX_TRANSMIT_SIZE)
            .map_err(|err| gst::error_msg!(gst::ResourceError::Settings, ["{err}"]))?;
        let (node, events) = Node::spawn(config, RUNTIME.handle()).map_err(|err| {
            gst::error_msg!(
                gst::ResourceError::OpenReadWrite,
                ["Failed to start the libp2p node: {err}"]
            )
        })?;
        let topic = settings.net.topic.clone();
        node.join_stream(&topic, publisher, vec![Channel::Control])
            .map_err(|err| {
                gst::error_msg!(
                    gst::ResourceError::OpenReadWrite,
                    ["Failed to join the stream: {err}"]
                )
            })?;
        gst::info!(
            CAT,
            imp = self,
            "peer {} joining topic '{topic}'{}",
            node.peer_id(),
            publisher
                .map(|p| format!(" of publisher {p}"))
                .unwrap_or_default()
        );
        let subscriber = Subscriber::new(SubscriberConfig {
            latency: Duration::from_millis(settings.latency_ms.into()),
            buffer_size: settings.buffer_size as usize,
            jitter_tolerance: Duration::from_millis(settings.jitter_tolerance_ms.into()),
            fragment_timeout: Duration::from_millis(settings.fragment_timeout_ms.into()),
            ..SubscriberConfig::default()
        });
        let shared = Arc::new(Shared::default());
        *shared.publisher.lock().unwrap() = publisher;
        let driver = RUNTIME.spawn(drive(Driver {
            node: node.clone(),
            topic: topic.clone(),
            events,
            element: self.obj().downgrade(),
            shared: shared.clone(),
            subscriber,
            outputs: BTreeMap::new(),
            settings,
        }));
        *self.state.lock().unwrap() = Some(State {
            node,
            shared,
            driver,
        });
        Ok(())
    }

    fn stop(&self) {
        let Some(state) = self.state.lock().unwrap().take() else {
            return;
        };
        common::abort_and_wait(state.driver);
        state.node.shutdown(Duration::ZERO);
        // Outputs belong to this run; a restart builds them from the next catalog.
        *self.pads.lock().unwrap() = PadAccounting::default();
        let obj = self.obj();
        for pad in obj.src_pads() {
            let _ = pad.set_active(false);
            let _ = obj.remove_pad(&pad);
        }
        for child in obj.children() {
            let _ = child.set_state(gst::State::Null);
            let _ = obj.remove(&child);
        }
        gst::debug!(CAT, imp = self, "stopped");
    }

    /// Builds the output of `track`: appsrc (live, timestamps in running time, latency
    /// reported) then decodebin unless `decode=false`, exposed as `pad_name`.
    fn add_output(
        &self,
        track: &Track,
        pad_name: &str,
        settings: &Settings,
    ) -> Result<TrackOutput, String> {
        let caps: gst::Caps = track
            .caps
            .parse()
            .map_err(|_| format!("track {} has unparsable caps '{}'", track.id, track.caps))?;
        let latency = gst::ClockTime::from_mseconds(settings.latency_ms.into());
        let appsrc = gst_app::AppSrc::builder()
            .name(format!("track{}", track.id))
            .caps(&caps)
            .format(gst::Format::Time)
            .is_live(true)
            .do_timestamp(false)
            .min_latency(latency.nseconds() as i64)
            .max_buffers(OUTPUT_QUEUE_FRAMES)
            .leaky_type(gst_app::AppLeakyType::Downstream)
            .build();
        let obj = self.obj();
        obj.add(&appsrc).map_err(|e| e.to_string())?;
        if settings.decode {
            let decodebin = gst::ElementFactory::make("decodebin")
                .name(format!("decode{}", track.id))
                .build()
                .map_err(|_| "decodebin is missing (install gstreamer1.0-plugins-base)")?;
            obj.add(&decodebin).map_err(|e| e.to_string())?;
            appsrc.link(&decodebin).map_err(|e| e.to_string())?;
            let weak = obj.downgrade();
            let name = pad_name.to_string();
            decodebin.connect_pad_added(move |_, pad| {
                if let Some(element) = weak.upgrade() {
                    element.imp().expose(pad, &name);
                }
            });
            decodebin
                .sync_state_with_parent()
                .map_err(|e| e.to_string())?;
        } else {
            self.expose(
                &appsrc.static_pad("src").expect("appsrc has a src pad"),
                pad_name,
            );
        }
        appsrc.sync_state_with_parent().map_err(|e| e.to_string())?;
        Ok(TrackOutput {
            appsrc,
            kind: TrackKind::try_from(track.kind).unwrap_or(TrackKind::Unspecified),
            caps: track.caps.clone(),
        })
    }

    /// Adds a ghost pad for `target`. An output nobody linked drops its data instead of
    /// failing the whole source, so `p2plivesrc ! autovideosink` works with an audio track too.
    fn expose(&self, target: &gst::Pad, pad_name: &str) {
        let obj = self.obj();
        if obj.static_pad(pad_name).is_some() {
            gst::warning!(CAT, imp = self, "pad {pad_name} already exposed");
            return;
        }
        let template_name = if pad_name.starts_with("video_") {
            "video_%u"
        } else {
            "audio_%u"
        };
        let template = obj
            .pad_template(template_name)
            .expect("element has its templates");
        let ghost = match gst::GhostPad::builder_from_template_with_target(&template, target) {
            Ok(builder) => builder
                .name(pad_name)
                .proxy_pad_chain_function(|pad, parent, buffer| match gst::ProxyPad::chain_default(
                    pad, parent, buffer,
                ) {
                    Err(gst::FlowError::NotLinked) => Ok(gst::FlowSuccess::Ok),
                    other => other,
                })
                .build(),
            Err(err) => {
                gst::error!(CAT, imp = self, "cannot expose {pad_name}: {err}");
                return;
            }
        };
        let _ = ghost.set_active(true);
        if let Err(err) = obj.add_pad(&ghost) {
            gst::error!(CAT, imp = self, "cannot add {pad_name}: {err}");
        }
        gst::info!(
            CAT,
            imp = self,
            "exposed {pad_name}: {:?}",
            target.current_caps()
        );
        self.pads.lock().unwrap().exposed += 1;
        self.signal_no_more_pads_when_complete();
    }

    /// `expected`: how many outputs the first catalog created, once known.
    fn expect_pads(&self, expected: usize) {
        self.pads.lock().unwrap().expected.get_or_insert(expected);
        self.signal_no_more_pads_when_complete();
    }

    fn signal_no_more_pads_when_complete(&self) {
        let mut pads = self.pads.lock().unwrap();
        if pads.signalled || pads.expected.is_none_or(|expected| pads.exposed < expected) {
            return;
        }
        pads.signalled = true;
        drop(pads);
        self.obj().no_more_pads();
    }

    /// Timestamps `frame` on this pipeline's running time and queues it on its output.
    fn push_frame(
        &self,
        shared: &Shared,
        output: &TrackOutput,
        frame: OutputFrame,
        latency: Duration,
    ) {
        let counters = &shared.counters;
        let Some(current) = self.obj().current_running_time() else {
            counters.discarded.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let now = Instant::now();
        let running_time = |t: Instant| -> gst::ClockTime {
            if t >= now {
                current + gst::ClockTime::from_nseconds((t - now).as_nanos() as u64)
            } else {
                current.saturating_sub(gst::ClockTime::from_nseconds((now - t).as_nanos() as u64))
            }
        };
        let render_at = frame.pts + latency;
        let render_unix_ns = unix_now_ns() as i128
            + if render_at >= now {
                (render_at - now).as_nanos() as i128
            } else {
                -((now - render_at).as_nanos() as i128)
            };
        if frame.capture_unix_ns > 0 {
            let capture = frame.capture_unix_ns as i128;
            update_average(&shared.latency_ms, (render_unix_ns - capture) as f64 / 1e6);
            update_average(
                &shared.transit_ms,
                (unix_now_ns() as i128 - capture) as f64 / 1e6,
            );
        }

        let mut buffer = gst::Buffer::from_slice(frame.data);
        {
            let buffer = buffer.get_mut().expect("new buffer is writable");
            buffer.set_pts(running_time(frame.pts));
            buffer.set_dts(frame.dts.map(running_time));
            buffer.set_duration(frame.duration.map(clock_time));
            let mut flags = gst::BufferFlags::empty();
            if !frame.keyframe {
                flags |= gst::BufferFlags::DELTA_UNIT;
            }
            // Audio decoders count samples from their last DISCONT, so a timeline jump must be
            // flagged for them; video decoders take each frame's timestamps as they come.
            if frame.discont || (frame.resync && output.kind == TrackKind::Audio) {
                flags |= gst::BufferFlags::DISCONT;
            }
            buffer.set_flags(flags);
            // Apps (and the A/V sync test) can see the publisher's own timing of each frame.
            if let Some(stream_pts) = frame.stream_pts {
                gst::ReferenceTimestampMeta::add(
                    buffer,
                    &STREAM_TIME_CAPS,
                    clock_time(stream_pts),
                    gst::ClockTime::NONE,
                );
            }
            if frame.capture_unix_ns > 0 {
                gst::ReferenceTimestampMeta::add(
                    buffer,
                    &UNIX_TIME_CAPS,
                    gst::ClockTime::from_nseconds(frame.capture_unix_ns),
                    gst::ClockTime::NONE,
                );
            }
        }
        match output.appsrc.push_buffer(buffer) {
            Ok(_) => counters.pushed.fetch_add(1, Ordering::Relaxed),
            Err(_) => counters.refused.fetch_add(1, Ordering::Relaxed),
        };
    }

    fn stats(&self) -> gst::Structure {
        let mut builder = gst::Structure::builder("p2plive-stats");
        let state = self.state.lock().unwrap();
        let Some(state) = state.as_ref() else {
            return builder.build();
        };
        let shared = &state.shared;
        let s = shared.subscriber.lock().unwrap().clone();
        builder = builder
            .field("peer-id", state.node.peer_id().to_string())
            .field(
                "publisher",
                shared
                    .publisher
                    .lock()
                    .unwrap()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
            )
            .field("messages", s.messages)
            .field("fragments", s.fragments)
            .field("fragment-bytes", s.fragment_bytes)
            .field("frames-completed", s.frames_completed)
            .field("frames-output", s.frames_output)
            .field("frames-lost", s.frames_lost)
            .field("frames-late", s.frames_late)
            .field("frames-skipped", s.frames_skipped)
            .field("duplicates", s.duplicates)
            .field("invalid", s.invalid)
            .field("expired", s.expired)
            .field("evicted", s.evicted)
            .field("before-catalog", s.before_catalog)
            .field("wrong-epoch", s.wrong_epoch)
            .field("restarts", s.restarts)
            .field("rebases", s.rebases)
            .field("buffered-frames", s.buffered_frames)
            .field("pending-bytes", s.pending_bytes)
            .field("pushed", shared.counters.pushed.load(Ordering::Relaxed))
            .field(
                "discarded",
                shared.counters.discarded.load(Ordering::Relaxed),
            )
            .field("refused", shared.counters.refused.load(Ordering::Relaxed))
            .field("ended", *shared.ended.lock().unwrap());
        if let Some(latency) = *shared.latency_ms.lock().unwrap() {
            builder = builder.field("latency-ms", latency);
        }
        if let Some(transit) = *shared.transit_ms.lock().unwrap() {
            builder = builder.field("transit-ms", transit);
        }
        common::node_stats_fields(builder, &state.node).build()
    }
}

fn update_average(average: &Mutex<Option<f64>>, sample: f64) {
    let mut average = average.lock().unwrap();
    *average = Some(match *average {
        Some(avg) => avg + LATENCY_AVERAGE_WEIGHT * (sample - avg),
        None => sample,
    });
}

fn clock_time(duration: Duration) -> gst::ClockTime {
    gst::ClockTime::from_nseconds(duration.as_nanos() as u64)
}

fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Everything the driver task owns: the node's events in, the core subscriber, the outputs.
struct Driver {
    node: Node,
    topic: String,
    events: tokio::sync::mpsc::Receiver<Event>,
    element: glib::WeakRef<super::P2pLiveSrc>,
    shared: Arc<Shared>,
    subscriber: Subscriber,
    outputs: BTreeMap<u32, TrackOutput>,
    settings: Settings,
}

async fn drive(mut driver: Driver) {
    let mut stats_tick = common::stats_ticker(driver.settings.net.stats_interval_ms);
    loop {
        let deadline = driver.subscriber.poll_timeout();
        tokio::select! {
            event = driver.events.recv() => match event {
                None => break,
                Some(event) => driver.handle_node_event(event),
            },
            _ = common::sleep_until(deadline) => {}
            _ = common::next_tick(&mut stats_tick) => {
                if let Some(element) = driver.element.upgrade() {
                    common::post_stats(element.upcast_ref(), element.imp().stats());
                }
            }
        }
        driver.subscriber.handle_timeout(Instant::now());
        if !driver.drain_subscriber() {
            break;
        }
    }
}

impl Driver {
    fn handle_node_event(&mut self, event: Event) {
        match event {
            Event::Message { message, .. } => {
                self.subscriber.handle_message(Instant::now(), message);
            }
            Event::Listening { addrs } => {
                *self.shared.addrs.lock().unwrap() = addrs.clone();
                if let Some(element) = self.element.upgrade() {
                    let peer_id = self.node.peer_id().to_string();
                    common::announce_listening(
                        element.upcast_ref(),
                        *CAT,
                        &self.topic,
                        &peer_id,
                        &addrs,
                    );
                }
            }
            Event::PublisherLocked { publisher, .. } => {
                gst::info!(CAT, "following publisher {publisher}");
                *self.shared.publisher.lock().unwrap() = Some(publisher);
            }
            Event::PeersChanged { connected } => {
                gst::debug!(CAT, "{connected} peers connected");
            }
        }
    }

    /// Acts on everything the core released; false once the element is gone.
    fn drain_subscriber(&mut self) -> bool {
        let Some(element) = self.element.upgrade() else {
            return false;
        };
        let imp = element.imp();
        let latency = Duration::from_millis(self.settings.latency_ms.into());
        while let Some(event) = self.subscriber.poll_event() {
            match event {
                SubscriberEvent::Catalog(catalog) => self.apply_catalog(imp, &catalog),
                SubscriberEvent::Restarted { epoch } => {
                    gst::info!(CAT, imp = imp, "publisher restarted (epoch {epoch:x})");
                }
                SubscriberEvent::Frame(frame) => match self.outputs.get(&frame.track) {
                    Some(output) => imp.push_frame(&self.shared, output, frame, latency),
                    None => {
                        self.shared
                            .counters
                            .discarded
                            .fetch_add(1, Ordering::Relaxed);
                    }
                },
                SubscriberEvent::EndOfStream => {
                    gst::info!(CAT, imp = imp, "publisher ended the stream");
                    *self.shared.ended.lock().unwrap() = true;
                    for output in self.outputs.values() {
                        let _ = output.appsrc.end_of_stream();
                    }
                }
            }
        }
        *self.shared.subscriber.lock().unwrap() = self.subscriber.stats();
        true
    }

    /// Creates outputs for new tracks, subscribes to their media, and follows caps changes.
    fn apply_catalog(&mut self, imp: &P2pLiveSrc, catalog: &Catalog) {
        let first = self.outputs.is_empty();
        for track in &catalog.tracks {
            if let Some(output) = self.outputs.get_mut(&track.id) {
                if output.caps != track.caps {
                    match track.caps.parse::<gst::Caps>() {
                        Ok(caps) => {
                            gst::info!(CAT, imp = imp, "track {} caps now {caps}", track.id);
                            output.appsrc.set_caps(Some(&caps));
                            output.caps = track.caps.clone();
                        }
                        Err(_) => gst::warning!(CAT, imp = imp, "bad caps for track {}", track.id),
                    }
                }
                continue;
            }
            let kind = TrackKind::try_from(track.kind).unwrap_or(TrackKind::Unspecified);
            let prefix = match kind {
                TrackKind::Video => "video_",
                TrackKind::Audio => "audio_",
                TrackKind::Unspecified => continue,
            };
            let index = catalog
                .tracks
                .iter()
                .filter(|t| t.kind == track.kind && t.id < track.id)
                .count();
            let pad_name = format!("{prefix}{index}");
            match imp.add_output(track, &pad_name, &self.settings) {
                Ok(output) => {
                    self.outputs.insert(track.id, output);
                    let layers: Vec<u32> = if track.layers.is_empty() {
                        vec![0]
                    } else {
                        track.layers.iter().map(|l| l.id).collect()
                    };
                    for layer in layers {
                        let channel = Channel::Media {
                            track: track.id,
                            layer,
                        };
                        if let Err(err) = self.node.subscribe(&self.topic, channel) {
                            gst::warning!(CAT, imp = imp, "cannot subscribe {channel:?}: {err}");
                        }
                    }
                }
                Err(err) => {
                    gst::element_imp_error!(
                        imp,
                        gst::StreamError::Format,
                        ["Cannot play track {}: {err}", track.id]
                    );
                }
            }
        }
        if first && !self.outputs.is_empty() {
            imp.expect_pads(self.outputs.len());
        }
    }
}
