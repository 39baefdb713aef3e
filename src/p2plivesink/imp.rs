use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use libp2p::Multiaddr;
use tokio::sync::Notify;

use super::{LayerLadder, VideoCodec};
use crate::RUNTIME;
use crate::common::{self, NetworkSettings};
use crate::core::feedback::FeedbackConfig;
use crate::core::wire::{Channel, Layer, LayerKind, Message, TrackKind};
use crate::core::{EncodedFrame, Publisher, PublisherConfig};
use crate::node::{Event, Node};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "p2plivesink",
        gst::DebugColorFlags::empty(),
        Some("p2plive publisher"),
    )
});

const DEFAULT_VIDEO_CODEC: VideoCodec = VideoCodec::Vp8;
const DEFAULT_VIDEO_BITRATE_KBPS: u32 = 2000;
const DEFAULT_AUDIO_BITRATE_KBPS: u32 = 64;
const DEFAULT_KEYFRAME_INTERVAL_MS: u32 = 2000;
const DEFAULT_MAX_FRAGMENT_SIZE: u32 = 16_000;
const DEFAULT_KEYFRAME_REQUEST_INTERVAL_MS: u32 = 1000;
/// Tracks are announced together once every requested pad has its caps, so a viewer's first
/// catalog lists them all; a pad still without caps this long after the first frame is not
/// waited for.
const ANNOUNCE_WAIT: Duration = Duration::from_secs(1);
/// Room for the envelope, gossipsub framing and signature around a fragment's payload.
const TRANSMIT_OVERHEAD: usize = 4096;
/// How long a stopping node keeps running so the last fragments and the end-of-stream go out.
const SHUTDOWN_LINGER: Duration = Duration::from_millis(500);
/// Frame rate assumed for keyframe spacing when the caps do not say.
const FALLBACK_FRAMERATE: gst::Fraction = gst::Fraction::from_integer(30);

#[derive(Debug, Clone)]
struct Settings {
    net: NetworkSettings,
    video_codec: VideoCodec,
    video_bitrate_kbps: u32,
    audio_bitrate_kbps: u32,
    keyframe_interval_ms: u32,
    max_fragment_size: u32,
    layers: LayerLadder,
    simulcast_inputs: bool,
    keyframe_request_interval_ms: u32,
    /// 0: chosen per encoder by [`encoder_threads`].
    encoder_threads: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            net: NetworkSettings::default(),
            video_codec: DEFAULT_VIDEO_CODEC,
            video_bitrate_kbps: DEFAULT_VIDEO_BITRATE_KBPS,
            audio_bitrate_kbps: DEFAULT_AUDIO_BITRATE_KBPS,
            keyframe_interval_ms: DEFAULT_KEYFRAME_INTERVAL_MS,
            max_fragment_size: DEFAULT_MAX_FRAGMENT_SIZE,
            layers: LayerLadder::Auto,
            simulcast_inputs: false,
            keyframe_request_interval_ms: DEFAULT_KEYFRAME_REQUEST_INTERVAL_MS,
            encoder_threads: 0,
        }
    }
}

/// One requested input pad and the chain behind it.
struct InputPad {
    ghost: gst::GhostPad,
    kind: TrackKind,
    /// Elements owned by this pad, in stream order (the input capsfilter first).
    elements: Vec<gst::Element>,
    /// The core's track id, assigned when the first encoded frame arrives.
    track: Option<u32>,
    /// Encoded caps announced in the catalog for this track.
    caps: Option<gst::Caps>,
    /// Outputs (one per spatial layer) that reached end of stream.
    ended_outputs: std::collections::BTreeSet<u32>,
    /// The layers raw video is encoded into; None for encoded input (one layer).
    ladder: Option<Ladder>,
    /// One encoder per spatial layer (rung), for keyframes forced on request.
    encoders: Vec<gst::Element>,
    /// The chain behind the pad is built (its input caps are known).
    negotiated: bool,
    /// With `simulcast-inputs`: this encoded pad's layer in the shared track.
    group_layer: Option<u32>,
}

impl InputPad {
    /// Encoded video that `simulcast-inputs` groups into one track.
    fn groupable(&self, simulcast_inputs: bool) -> bool {
        simulcast_inputs && self.kind == TrackKind::Video && self.ladder.is_none()
    }
}

/// What the streaming threads and the driver task share while the node runs.
struct Session {
    node: Node,
    topic: String,
    publisher: Mutex<Publisher>,
    /// Wakes the driver when the publisher has new timers (end of stream).
    wake: Notify,
    addrs: Mutex<Vec<Multiaddr>>,
    publish_failures: AtomicU64,
    rejected_frames: AtomicU64,
    /// Raw frames dropped before an encoder that could not keep up.
    encoder_overruns: AtomicU64,
    /// The audience merged up the data plane's feedback tree (trees mode), and when.
    tree_audience: Mutex<Option<(Instant, crate::core::dataplane::Summary)>>,
    /// Viewer reports merged into the summaries that reached us (trees mode): each summary
    /// stands for one report of every viewer it counts.
    tree_reports: AtomicU64,
}

impl Session {
    /// Hands every queued message to the node; never waits (the node's queue is bounded and
    /// a full queue counts as a failure rather than stalling the streaming thread).
    fn flush(&self, publisher: &mut Publisher) {
        while let Some(transmit) = publisher.poll_transmit() {
            if let Err(err) = self
                .node
                .publish(&self.topic, transmit.channel, transmit.payload)
            {
                let failures = self.publish_failures.fetch_add(1, Ordering::Relaxed) + 1;
                gst::debug!(CAT, "publish failed ({failures} so far): {err}");
            }
        }
    }
}

struct State {
    session: Arc<Session>,
    driver: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
pub struct P2pLiveSink {
    settings: Mutex<Settings>,
    state: Mutex<Option<State>>,
    /// Input pads by name; lock order: a session's publisher, then pads.
    pads: Mutex<BTreeMap<String, InputPad>>,
    /// When the first frame of this epoch arrived (see `ANNOUNCE_WAIT`).
    first_frame_at: Mutex<Option<Instant>>,
}

#[glib::object_subclass]
impl ObjectSubclass for P2pLiveSink {
    const NAME: &'static str = "GstP2pLiveSink";
    type Type = super::P2pLiveSink;
    type ParentType = gst::Bin;
}

static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
    let mut properties = NetworkSettings::properties();
    properties.extend([
        glib::ParamSpecEnum::builder_with_default("video-codec", DEFAULT_VIDEO_CODEC)
            .nick("Video codec")
            .blurb("Encoder for raw video input (encoded input is published as it is)")
            .mutable_ready()
            .build(),
        glib::ParamSpecUInt::builder("video-bitrate")
            .nick("Video bitrate")
            .blurb("Target bitrate of encoded raw video, in kbit/s")
            .minimum(50)
            .maximum(100_000)
            .default_value(DEFAULT_VIDEO_BITRATE_KBPS)
            .mutable_ready()
            .build(),
        glib::ParamSpecUInt::builder("audio-bitrate")
            .nick("Audio bitrate")
            .blurb("Target bitrate of Opus-encoded raw audio, in kbit/s")
            .minimum(6)
            .maximum(510)
            .default_value(DEFAULT_AUDIO_BITRATE_KBPS)
            .mutable_ready()
            .build(),
        glib::ParamSpecUInt::builder("keyframe-interval")
            .nick("Keyframe interval")
            .blurb("Milliseconds between keyframes of encoded raw video: how long a late joiner waits at most")
            .minimum(100)
            .maximum(60_000)
            .default_value(DEFAULT_KEYFRAME_INTERVAL_MS)
            .mutable_ready()
            .build(),
        glib::ParamSpecEnum::builder_with_default("layers", LayerLadder::Auto)
            .nick("Layers")
            .blurb(
                "Layers raw video is encoded into; viewers play the layers their network carries",
            )
            .mutable_ready()
            .build(),
        glib::ParamSpecBoolean::builder("simulcast-inputs")
            .nick("Simulcast inputs")
            .blurb(
                "Already-encoded video pads are the resolutions (layers) of one track, lightest \
                 first by size, instead of separate tracks",
            )
            .default_value(false)
            .mutable_ready()
            .build(),
        glib::ParamSpecUInt::builder("encoder-threads")
            .nick("Encoder threads")
            .blurb(
                "Threads of each video encoder (0: automatic, from the frame size and the \
                 machine's cores: 1 up to 640x480 or on fewer than 3 cores, as WebRTC's VP8 \
                 encoder chooses)",
            )
            .maximum(64)
            .default_value(0)
            .mutable_ready()
            .build(),
        glib::ParamSpecUInt::builder("keyframe-request-interval")
            .nick("Keyframe request interval")
            .blurb(
                "Milliseconds: viewers' keyframe requests force at most one keyframe per layer \
                 in this interval, on that layer's encoder only",
            )
            .minimum(100)
            .maximum(60_000)
            .default_value(DEFAULT_KEYFRAME_REQUEST_INTERVAL_MS)
            .mutable_ready()
            .build(),
        glib::ParamSpecUInt::builder("max-fragment-size")
            .nick("Maximum fragment size")
            .blurb("Largest payload, in bytes, of one network message; frames are split to fit")
            .minimum(512)
            .maximum(200_000)
            .default_value(DEFAULT_MAX_FRAGMENT_SIZE)
            .mutable_ready()
            .build(),
    ]);
    properties
});

impl ObjectImpl for P2pLiveSink {
    fn properties() -> &'static [glib::ParamSpec] {
        &PROPERTIES
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut settings = self.settings.lock().unwrap();
        if settings.net.set_property(pspec.name(), value) {
            return;
        }
        match pspec.name() {
            "video-codec" => settings.video_codec = value.get().expect("type checked upstream"),
            "video-bitrate" => {
                settings.video_bitrate_kbps = value.get().expect("type checked upstream")
            }
            "audio-bitrate" => {
                settings.audio_bitrate_kbps = value.get().expect("type checked upstream")
            }
            "keyframe-interval" => {
                settings.keyframe_interval_ms = value.get().expect("type checked upstream")
            }
            "max-fragment-size" => {
                settings.max_fragment_size = value.get().expect("type checked upstream")
            }
            "layers" => settings.layers = value.get().expect("type checked upstream"),
            "simulcast-inputs" => {
                settings.simulcast_inputs = value.get().expect("type checked upstream")
            }
            "keyframe-request-interval" => {
                settings.keyframe_request_interval_ms = value.get().expect("type checked upstream")
            }
            "encoder-threads" => {
                settings.encoder_threads = value.get().expect("type checked upstream")
            }
            other => unreachable!("unknown property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        match pspec.name() {
            "peer-id" => self
                .session()
                .map(|s| s.node.peer_id().to_string())
                .to_value(),
            "multiaddrs" => self
                .session()
                .map(|s| common::join_addrs(&s.addrs.lock().unwrap()))
                .to_value(),
            "stats" => self.stats().to_value(),
            name => {
                let settings = self.settings.lock().unwrap();
                if let Some(value) = settings.net.property(name) {
                    return value;
                }
                match name {
                    "video-codec" => settings.video_codec.to_value(),
                    "video-bitrate" => settings.video_bitrate_kbps.to_value(),
                    "audio-bitrate" => settings.audio_bitrate_kbps.to_value(),
                    "keyframe-interval" => settings.keyframe_interval_ms.to_value(),
                    "max-fragment-size" => settings.max_fragment_size.to_value(),
                    "layers" => settings.layers.to_value(),
                    "simulcast-inputs" => settings.simulcast_inputs.to_value(),
                    "keyframe-request-interval" => settings.keyframe_request_interval_ms.to_value(),
                    "encoder-threads" => settings.encoder_threads.to_value(),
                    other => unreachable!("unknown property {other}"),
                }
            }
        }
    }
}

impl GstObjectImpl for P2pLiveSink {}

impl ElementImpl for P2pLiveSink {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "P2P live sink",
                "Sink/Network/Audio/Video",
                "Publishes live audio and video to viewers over a libp2p peer-to-peer mesh",
                "p2plive developers",
            )
        });
        Some(&*METADATA)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            let video: gst::Caps =
                "video/x-raw; video/x-h264; video/x-vp8; video/x-vp9; video/x-av1"
                    .parse()
                    .expect("valid caps");
            let audio: gst::Caps = "audio/x-raw; audio/x-opus".parse().expect("valid caps");
            vec![
                gst::PadTemplate::new(
                    "video_%u",
                    gst::PadDirection::Sink,
                    gst::PadPresence::Request,
                    &video,
                )
                .expect("valid template"),
                gst::PadTemplate::new(
                    "audio_%u",
                    gst::PadDirection::Sink,
                    gst::PadPresence::Request,
                    &audio,
                )
                .expect("valid template"),
            ]
        });
        &TEMPLATES
    }

    fn request_new_pad(
        &self,
        templ: &gst::PadTemplate,
        name: Option<&str>,
        _caps: Option<&gst::Caps>,
    ) -> Option<gst::Pad> {
        let (prefix, kind) = match templ.name_template() {
            "video_%u" => ("video_", TrackKind::Video),
            "audio_%u" => ("audio_", TrackKind::Audio),
            other => {
                gst::error!(CAT, imp = self, "no pad template {other}");
                return None;
            }
        };
        let mut pads = self.pads.lock().unwrap();
        let name = match name {
            Some(name) if pads.contains_key(name) => {
                gst::error!(CAT, imp = self, "pad {name} already exists");
                return None;
            }
            Some(name) => name.to_string(),
            None => (0..)
                .map(|i| format!("{prefix}{i}"))
                .find(|n| !pads.contains_key(n))
                .expect("an unused pad name"),
        };

        // The capsfilter restricts negotiation to what the element handles; the encode or
        // parse chain behind it is built once the caps are known.
        let input = gst::ElementFactory::make("capsfilter")
            .name(format!("{name}-input"))
            .property("caps", templ.caps())
            .build()
            .ok()?;
        let obj = self.obj();
        obj.add(&input).ok()?;
        let target = input.static_pad("sink").expect("capsfilter has a sink pad");
        // Data before any caps (a `fakesrc` sets none) would reach the capsfilter, which
        // asserts (a GLib CRITICAL) before failing; refuse it here with a clear error.
        let weak = self.obj().downgrade();
        let pad_name = name.clone();
        target.add_probe(
            gst::PadProbeType::BUFFER | gst::PadProbeType::BUFFER_LIST,
            move |pad, info| {
                if pad.has_current_caps() {
                    return gst::PadProbeReturn::Remove;
                }
                if let Some(element) = weak.upgrade() {
                    gst::element_error!(
                        element,
                        gst::StreamError::Format,
                        ("Input {pad_name} got data without caps"),
                        [
                            "p2plivesink needs caps on its input (raw or encoded video, audio); \
                             a source that sets none, such as fakesrc, needs a capsfilter after it"
                        ]
                    );
                }
                info.flow_res = Err(gst::FlowError::NotNegotiated);
                gst::PadProbeReturn::Handled
            },
        );
        let ghost = gst::GhostPad::builder_from_template_with_target(templ, &target)
            .ok()?
            .name(name.as_str())
            .build();

        let weak = obj.downgrade();
        let pad_name = name.clone();
        input
            .static_pad("src")
            .expect("capsfilter has a src pad")
            .add_probe(gst::PadProbeType::EVENT_DOWNSTREAM, move |_pad, info| {
                let Some(gst::EventView::Caps(caps)) = info.event().map(|e| e.view()) else {
                    return gst::PadProbeReturn::Ok;
                };
                let Some(element) = weak.upgrade() else {
                    return gst::PadProbeReturn::Remove;
                };
                match element.imp().build_chain(&pad_name, caps.caps()) {
                    Ok(()) => gst::PadProbeReturn::Remove,
                    Err(err) => {
                        gst::element_error!(
                            element,
                            gst::StreamError::Format,
                            ["Cannot publish {} input: {err}", pad_name]
                        );
                        gst::PadProbeReturn::Drop
                    }
                }
            });

        if obj.current_state() > gst::State::Null {
            let _ = ghost.set_active(true);
        }
        obj.add_pad(&ghost).ok()?;
        let _ = input.sync_state_with_parent();
        pads.insert(
            name,
            InputPad {
                ghost: ghost.clone(),
                kind,
                elements: vec![input],
                track: None,
                caps: None,
                ended_outputs: Default::default(),
                ladder: None,
                encoders: Vec::new(),
                negotiated: false,
                group_layer: None,
            },
        );
        Some(ghost.upcast())
    }

    fn release_pad(&self, pad: &gst::Pad) {
        let Some(input) = self.pads.lock().unwrap().remove(pad.name().as_str()) else {
            return;
        };
        let obj = self.obj();
        // When the sink is disposed, the bin has removed its children before its request
        // pads are released: removing them again logged two errors per element.
        for element in input.elements.iter().rev() {
            let _ = element.set_state(gst::State::Null);
            if element.has_as_parent(&*obj) {
                let _ = obj.remove(element);
            }
        }
        let _ = input.ghost.set_active(false);
        if input.ghost.has_as_parent(&*obj) {
            let _ = obj.remove_pad(&input.ghost);
        }
    }

    fn change_state(
        &self,
        transition: gst::StateChange,
    ) -> Result<gst::StateChangeSuccess, gst::StateChangeError> {
        match transition {
            gst::StateChange::NullToReady => {
                if let Err(err) = self.start() {
                    self.post_error_message(err);
                    return Err(gst::StateChangeError);
                }
            }
            gst::StateChange::ReadyToPaused => self.begin_epoch(),
            _ => {}
        }
        let result = self.parent_change_state(transition);
        match transition {
            gst::StateChange::ReadyToNull => self.stop(),
            gst::StateChange::NullToReady if result.is_err() => self.stop(),
            _ => {}
        }
        result
    }
}

impl BinImpl for P2pLiveSink {}

impl P2pLiveSink {
    fn session(&self) -> Option<Arc<Session>> {
        self.state
            .lock()
            .unwrap()
            .as_ref()
            .map(|s| s.session.clone())
    }

    fn start(&self) -> Result<(), gst::ErrorMessage> {
        let settings = self.settings.lock().unwrap().clone();
        settings
            .net
            .validate_topic()
            .map_err(|err| gst::error_msg!(gst::LibraryError::Settings, ("{err}")))?;
        let max_fragment_size = settings.max_fragment_size as usize;
        let config = settings
            .net
            .node_config(max_fragment_size + TRANSMIT_OVERHEAD)
            .map_err(|err| gst::error_msg!(gst::ResourceError::Settings, ("{err}")))?;
        let (node, events) = Node::spawn(config, RUNTIME.handle()).map_err(|err| {
            gst::error_msg!(
                gst::ResourceError::OpenReadWrite,
                ("Failed to start the libp2p node: {err}")
            )
        })?;
        node.announce_stream(&settings.net.topic)
            .and_then(|()| node.subscribe(&settings.net.topic, Channel::Feedback))
            .map_err(|err| {
                gst::error_msg!(
                    gst::ResourceError::OpenReadWrite,
                    ("Failed to announce the stream: {err}")
                )
            })?;
        gst::info!(
            CAT,
            imp = self,
            "peer {} publishing topic '{}'",
            node.peer_id(),
            settings.net.topic
        );
        let session = Arc::new(Session {
            node,
            topic: settings.net.topic.clone(),
            publisher: Mutex::new(new_publisher(&settings)),
            wake: Notify::new(),
            addrs: Mutex::new(Vec::new()),
            publish_failures: AtomicU64::new(0),
            rejected_frames: AtomicU64::new(0),
            encoder_overruns: AtomicU64::new(0),
            tree_audience: Mutex::new(None),
            tree_reports: AtomicU64::new(0),
        });
        let driver = RUNTIME.spawn(drive(
            session.clone(),
            events,
            self.obj().downgrade(),
            settings.net.stats_interval_ms,
        ));
        *self.state.lock().unwrap() = Some(State { session, driver });
        Ok(())
    }

    fn stop(&self) {
        let Some(state) = self.state.lock().unwrap().take() else {
            return;
        };
        common::abort_and_wait(state.driver);
        common::stop_node(&state.session.node, SHUTDOWN_LINGER);
        gst::debug!(CAT, imp = self, "node stopped");
    }

    /// Every start of streaming is a new publisher epoch, so viewers recognise a restart and
    /// tracks are announced afresh.
    fn begin_epoch(&self) {
        let Some(session) = self.session() else {
            return;
        };
        let settings = self.settings.lock().unwrap().clone();
        let mut publisher = session.publisher.lock().unwrap();
        *publisher = new_publisher(&settings);
        *self.first_frame_at.lock().unwrap() = None;
        for input in self.pads.lock().unwrap().values_mut() {
            input.track = None;
            input.caps = None;
            input.ended_outputs.clear();
            input.group_layer = None;
        }
    }

    /// Builds the encode or parse chain for `pad_name` once its input caps are known: raw
    /// video fans out to one encoder per spatial layer, anything else is one chain.
    fn build_chain(&self, pad_name: &str, caps: &gst::CapsRef) -> Result<(), String> {
        let settings = self.settings.lock().unwrap().clone();
        let structure = caps.structure(0).ok_or("empty caps")?;
        let input = {
            let pads = self.pads.lock().unwrap();
            let input = pads.get(pad_name).ok_or("pad was released")?;
            input.elements.last().expect("input capsfilter").clone()
        };
        let mut added = Vec::new();
        let mut encoders = Vec::new();
        let ladder = if structure.name() == "video/x-raw" {
            let ladder = Ladder::plan(structure, &settings)?;
            let convert = make("videoconvert", "gstreamer1.0-plugins-base")?;
            self.add_run(&input, std::slice::from_ref(&convert), &mut added)?;
            let fanout = if ladder.rungs.len() > 1 {
                let tee = make("tee", "gstreamer1.0-plugins-base")?;
                self.add_run(&convert, std::slice::from_ref(&tee), &mut added)?;
                tee
            } else {
                convert
            };
            for (spatial, rung) in ladder.rungs.iter().enumerate() {
                // Each encoder in its own thread behind a queue that drops the oldest raw
                // frame when the encoder falls behind: a slow encoder neither holds the other
                // rungs nor builds up latency (a live source that does not drop frames by
                // itself, such as videotestsrc, would otherwise be held back, ever later).
                let queue = make("queue", "gstreamer1.0-plugins-base")?;
                queue.set_property("max-size-buffers", 2u32);
                queue.set_property("max-size-bytes", 0u32);
                queue.set_property("max-size-time", 0u64);
                queue.set_property_from_str("leaky", "downstream");
                let element = self.obj().downgrade();
                queue.connect("overrun", false, move |_| {
                    if let Some(session) = element.upgrade().and_then(|e| e.imp().session()) {
                        session.encoder_overruns.fetch_add(1, Ordering::Relaxed);
                    }
                    None
                });
                let mut run = vec![queue];
                if ladder.rungs.len() > 1 {
                    run.push(make("videoscale", "gstreamer1.0-plugins-base")?);
                    run.push(capsfilter(&format!(
                        "video/x-raw,width={},height={}",
                        rung.width, rung.height
                    ))?);
                }
                let encoder = video_encoder(&settings, &ladder, rung)?;
                run.push(encoder.clone());
                if settings.video_codec == VideoCodec::H264 {
                    run.extend(h264_normalizer()?);
                }
                run.push(self.make_appsink(pad_name, spatial as u32));
                self.add_run(&fanout, &run, &mut added)?;
                encoders.push(encoder);
            }
            Some(ladder)
        } else {
            let mut run = passthrough_chain(structure, &settings)?;
            run.push(self.make_appsink(pad_name, 0));
            self.add_run(&input, &run, &mut added)?;
            None
        };
        gst::info!(
            CAT,
            imp = self,
            "{pad_name}: {} -> {}",
            structure.name(),
            added
                .iter()
                .map(|e| e
                    .factory()
                    .map(|f| f.name().to_string())
                    .unwrap_or_default())
                .collect::<Vec<_>>()
                .join(" ! ")
        );
        let mut pads = self.pads.lock().unwrap();
        let input = pads.get_mut(pad_name).ok_or("pad was released")?;
        input.elements.extend(added);
        input.encoders = encoders;
        input.ladder = ladder;
        input.negotiated = true;
        Ok(())
    }

    /// Adds `run` to the bin, links it in order after `upstream` and starts it.
    fn add_run(
        &self,
        upstream: &gst::Element,
        run: &[gst::Element],
        added: &mut Vec<gst::Element>,
    ) -> Result<(), String> {
        let obj = self.obj();
        for element in run {
            obj.add(element).map_err(|e| e.to_string())?;
            added.push(element.clone());
        }
        let mut previous = upstream.clone();
        for element in run {
            previous.link(element).map_err(|e| {
                format!("cannot link {} to {}: {e}", previous.name(), element.name())
            })?;
            previous = element.clone();
        }
        for element in run.iter().rev() {
            element
                .sync_state_with_parent()
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn make_appsink(&self, pad_name: &str, spatial: u32) -> gst::Element {
        let appsink = gst_app::AppSink::builder()
            .name(format!("{pad_name}-out{spatial}"))
            .sync(false)
            .async_(false)
            .build();
        let weak = self.obj().downgrade();
        let sample_pad = pad_name.to_string();
        let eos_weak = weak.clone();
        let eos_pad = pad_name.to_string();
        appsink.set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |appsink| {
                    let sample = appsink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    let element = weak.upgrade().ok_or(gst::FlowError::Flushing)?;
                    element.imp().handle_sample(&sample_pad, spatial, &sample)
                })
                .eos(move |_| {
                    if let Some(element) = eos_weak.upgrade() {
                        element.imp().handle_eos(&eos_pad, spatial);
                    }
                })
                .build(),
        );
        appsink.upcast()
    }

    fn handle_sample(
        &self,
        pad_name: &str,
        spatial: u32,
        sample: &gst::Sample,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        let session = self.session().ok_or(gst::FlowError::Flushing)?;
        let buffer = sample.buffer().ok_or(gst::FlowError::Error)?;
        let caps = sample.caps().ok_or(gst::FlowError::NotNegotiated)?;
        let segment = sample
            .segment()
            .and_then(|s| s.downcast_ref::<gst::ClockTime>().cloned());
        let running_time = |t: Option<gst::ClockTime>| match (&segment, t) {
            (Some(segment), Some(t)) => segment.to_running_time(t),
            _ => t,
        };
        let pts = running_time(buffer.pts());
        let dts = running_time(buffer.dts());
        let (temporal, temporal_sync) = vp8_temporal_layer(buffer);
        let map = buffer.map_readable().map_err(|_| gst::FlowError::Error)?;
        let (capture_unix_ns, publish_delay) = self.capture_time(pts.or(dts));
        let frame = EncodedFrame {
            pts: pts.map(Duration::from),
            dts: dts.map(Duration::from),
            duration: buffer.duration().map(Duration::from),
            keyframe: !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT),
            capture_unix_ns,
            publish_delay,
            data: bytes::Bytes::copy_from_slice(&map),
        };
        drop(map);

        // Read once per frame; the rest of the settings are not needed here.
        let simulcast_inputs = self.settings.lock().unwrap().simulcast_inputs;
        let now = Instant::now();
        let mut publisher = session.publisher.lock().unwrap();
        let (track, layer) = {
            let mut pads = self.pads.lock().unwrap();
            let input = pads.get(pad_name).ok_or(gst::FlowError::Flushing)?;
            if input.groupable(simulcast_inputs) {
                match self.grouped_layer(&mut pads, pad_name, caps, &mut publisher, now) {
                    Some(track_layer) => track_layer,
                    None => {
                        // The track is announced once every grouped pad has its caps.
                        gst::debug!(CAT, imp = self, "{pad_name}: waiting for the other layers");
                        return Ok(gst::FlowSuccess::Ok);
                    }
                }
            } else {
                if input.track.is_none() {
                    if let Some(input) = pads.get_mut(pad_name) {
                        input.caps.get_or_insert_with(|| caps.to_owned());
                    }
                    if !self.all_pads_announceable(&pads, now) {
                        gst::debug!(CAT, imp = self, "{pad_name}: waiting for the other pads");
                        return Ok(gst::FlowSuccess::Ok);
                    }
                    self.announce_tracks(&mut pads, &mut publisher, now, simulcast_inputs);
                }
                let input = pads.get_mut(pad_name).ok_or(gst::FlowError::Flushing)?;
                let layer = input
                    .ladder
                    .as_ref()
                    .map_or(0, |ladder| ladder.layer_id(spatial, temporal));
                let track = input.track.ok_or(gst::FlowError::Flushing)?;
                // Spatial layers differ in size by design; the catalog describes each.
                if spatial == 0 && input.caps.as_deref() != Some(caps) {
                    gst::info!(CAT, imp = self, "track {track} caps changed: {caps}");
                    if let Err(err) = publisher.update_track_caps(now, track, caps.to_string()) {
                        gst::warning!(CAT, imp = self, "cannot update caps: {err}");
                    }
                    input.caps = Some(caps.to_owned());
                }
                (track, layer)
            }
        };
        if let Err(err) = publisher.push_layer_frame(now, track, layer, frame, temporal_sync) {
            session.rejected_frames.fetch_add(1, Ordering::Relaxed);
            gst::warning!(
                CAT,
                imp = self,
                "frame of track {track} layer {layer} not published: {err}"
            );
        }
        session.flush(&mut publisher);
        Ok(gst::FlowSuccess::Ok)
    }

    /// Whether tracks may be announced: every pad has had a frame (so its encoded caps are
    /// known), or `ANNOUNCE_WAIT` has passed since the first frame.
    fn all_pads_announceable(&self, pads: &BTreeMap<String, InputPad>, now: Instant) -> bool {
        let first = *self.first_frame_at.lock().unwrap().get_or_insert(now);
        pads.values().all(|pad| pad.caps.is_some()) || now.duration_since(first) >= ANNOUNCE_WAIT
    }

    /// Adds a track for every pad with caps that has none yet, all before the publisher's
    /// next transmit, so viewers get them in one catalog.
    fn announce_tracks(
        &self,
        pads: &mut BTreeMap<String, InputPad>,
        publisher: &mut Publisher,
        now: Instant,
        simulcast_inputs: bool,
    ) {
        for (name, input) in pads.iter_mut() {
            if input.track.is_some() || input.groupable(simulcast_inputs) {
                continue;
            }
            let Some(caps) = input.caps.clone() else {
                continue;
            };
            let layers = match &input.ladder {
                Some(ladder) => ladder.catalog_layers(),
                None => single_layer(&caps, input.kind),
            };
            let id = publisher.add_track(now, input.kind, caps.to_string(), layers);
            gst::info!(CAT, imp = self, "{name} is track {id}: {caps}");
            input.track = Some(id);
        }
    }

    /// The track and layer of a frame of grouped (`simulcast-inputs`) pad `pad_name`.
    /// The first time every grouped pad has caps, announces their track with one layer per
    /// pad, lightest first by size; until then None (the frame is not published).
    fn grouped_layer(
        &self,
        pads: &mut BTreeMap<String, InputPad>,
        pad_name: &str,
        caps: &gst::CapsRef,
        publisher: &mut Publisher,
        now: Instant,
    ) -> Option<(u32, u32)> {
        let input = pads.get_mut(pad_name)?;
        if input.caps.is_none() {
            input.caps = Some(caps.to_owned());
        }
        if let (Some(track), Some(layer)) = (input.track, input.group_layer) {
            return Some((track, layer));
        }
        let mut members: Vec<(String, gst::Caps)> = Vec::new();
        for (name, pad) in pads.iter() {
            if pad.kind != TrackKind::Video {
                continue;
            }
            if !pad.negotiated {
                return None;
            }
            // Only grouped pads reach this function, so `simulcast-inputs` is on.
            if pad.groupable(true) {
                members.push((name.clone(), pad.caps.clone()?));
            }
        }
        let pixels = |caps: &gst::Caps| {
            caps.structure(0).map_or(0, |s| {
                i64::from(s.get::<i32>("width").unwrap_or(0))
                    * i64::from(s.get::<i32>("height").unwrap_or(0))
            })
        };
        members.sort_by_key(|(_, caps)| pixels(caps));
        let layers: Vec<Layer> = members
            .iter()
            .enumerate()
            .map(|(index, (_, caps))| Layer {
                id: index as u32,
                kind: if index == 0 {
                    LayerKind::Base
                } else {
                    LayerKind::Spatial
                } as i32,
                spatial_id: index as u32,
                ..single_layer(caps, TrackKind::Video)
                    .pop()
                    .unwrap_or_default()
            })
            .collect();
        let track_caps = members.first()?.1.to_string();
        let track = publisher.add_track(now, TrackKind::Video, track_caps, layers);
        gst::info!(
            CAT,
            imp = self,
            "track {track}: simulcast of {}",
            members
                .iter()
                .map(|(name, _)| name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (index, (name, _)) in members.iter().enumerate() {
            if let Some(pad) = pads.get_mut(name) {
                pad.track = Some(track);
                pad.group_layer = Some(index as u32);
            }
        }
        let input = pads.get(pad_name)?;
        Some((track, input.group_layer?))
    }

    /// Wall-clock time the frame was captured (Unix epoch ns) and its age now (encoding and
    /// queueing since capture): now, less how long ago its running time was.
    fn capture_time(&self, running_time: Option<gst::ClockTime>) -> (u64, Duration) {
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let age = match (self.obj().current_running_time(), running_time) {
            (Some(current), Some(frame)) => current.saturating_sub(frame).nseconds(),
            _ => 0,
        };
        (now_unix.saturating_sub(age), Duration::from_nanos(age))
    }

    fn handle_eos(&self, pad_name: &str, spatial: u32) {
        let Some(session) = self.session() else {
            return;
        };
        let mut publisher = session.publisher.lock().unwrap();
        let all_ended = {
            let mut pads = self.pads.lock().unwrap();
            if let Some(input) = pads.get_mut(pad_name) {
                input.ended_outputs.insert(spatial);
            }
            pads.values().all(|input| {
                let outputs = input.ladder.as_ref().map_or(1, |l| l.rungs.len());
                input.ended_outputs.len() >= outputs
            })
        };
        if all_ended {
            gst::info!(
                CAT,
                imp = self,
                "all inputs ended: announcing end of stream"
            );
            publisher.end_of_stream(Instant::now());
            session.flush(&mut publisher);
            session.wake.notify_one();
        }
    }

    /// Forces a keyframe on the encoder of `layer` of `track` only, as viewers asked.
    fn force_keyframe(&self, track: u32, layer: u32) {
        let pads = self.pads.lock().unwrap();
        let Some(input) = pads.values().find(|input| {
            input.track == Some(track) && input.group_layer.is_none_or(|l| l == layer)
        }) else {
            return;
        };
        let event = gst_video::UpstreamForceKeyUnitEvent::builder()
            .all_headers(true)
            .build();
        let sent = match &input.ladder {
            // Encoded here: the encoder of that layer's resolution.
            Some(ladder) => input
                .encoders
                .get(ladder.spatial_of(layer) as usize)
                .and_then(|encoder| encoder.static_pad("src"))
                .is_some_and(|pad| pad.send_event(event)),
            // Encoded upstream: ask whatever encodes this pad's input.
            None => input.ghost.push_event(event),
        };
        gst::debug!(
            CAT,
            imp = self,
            "keyframe forced on track {track} layer {layer}: {sent}"
        );
    }

    fn on_listening(&self, addrs: &[Multiaddr]) {
        if let Some(session) = self.session() {
            let peer_id = session.node.peer_id().to_string();
            common::announce_listening(
                self.obj().upcast_ref(),
                *CAT,
                &session.topic,
                &peer_id,
                addrs,
            );
        }
    }

    fn stats(&self) -> gst::Structure {
        let mut builder = gst::Structure::builder("p2plive-stats");
        if let Some(session) = self.session() {
            let publisher = session.publisher.lock().unwrap().stats();
            builder = builder
                .field("peer-id", session.node.peer_id().to_string())
                .field("frames", publisher.frames)
                .field("keyframes", publisher.keyframes)
                .field("fragments", publisher.fragments)
                .field("payload-bytes", publisher.payload_bytes)
                .field("message-bytes", publisher.message_bytes)
                .field("catalogs", publisher.catalogs)
                .field(
                    "publish-failures",
                    session.publish_failures.load(Ordering::Relaxed),
                )
                .field(
                    "rejected-frames",
                    session.rejected_frames.load(Ordering::Relaxed),
                )
                .field(
                    "encoder-overruns",
                    session.encoder_overruns.load(Ordering::Relaxed),
                );
            let mut audience = session
                .publisher
                .lock()
                .unwrap()
                .audience_stats(Instant::now());
            // With the trees, reports arrive merged: the summary is the audience.
            if let Some((at, summary)) = session.tree_audience.lock().unwrap().as_ref()
                && at.elapsed() < std::time::Duration::from_secs(3)
            {
                audience.viewers = u64::from(summary.viewers);
                audience.layer_histogram.clear();
                for (&(_, layer), &viewers) in &summary.layers {
                    *audience.layer_histogram.entry(layer).or_default() += u64::from(viewers);
                }
                let expected = summary.received + summary.lost;
                audience.loss_ratio = if expected == 0 {
                    0.0
                } else {
                    (summary.late + summary.lost) as f64 / expected as f64
                };
                audience.latency_p50_ms = summary.latency_quantile_ms(0.5);
                audience.latency_p95_ms = summary.latency_quantile_ms(0.95);
            }
            audience.reports += session.tree_reports.load(Ordering::Relaxed);
            let histogram = |layers: &std::collections::BTreeMap<u32, u64>| {
                let mut histogram = gst::Structure::builder("layers");
                for (layer, viewers) in layers {
                    histogram = histogram.field(format!("layer-{layer}"), *viewers);
                }
                histogram.build()
            };
            builder = builder
                .field("viewers", audience.viewers)
                .field("viewer-layers", histogram(&audience.layer_histogram))
                .field("requested-layers", histogram(&audience.requested_histogram))
                .field("viewer-loss", audience.loss_ratio)
                .field("viewer-reports", audience.reports)
                .field("keyframe-requests", audience.keyframe_requests)
                .field("forced-keyframes", audience.forced_keyframes);
            if let Some(p50) = audience.latency_p50_ms {
                builder = builder.field("viewer-latency-p50-ms", p50);
            }
            if let Some(p95) = audience.latency_p95_ms {
                builder = builder.field("viewer-latency-p95-ms", p95);
            }
            builder = common::node_stats_fields(builder, &session.node);
        }
        builder.build()
    }
}

fn new_publisher(settings: &Settings) -> Publisher {
    Publisher::new(
        &settings.net.topic,
        rand::random(),
        PublisherConfig {
            max_fragment_size: settings.max_fragment_size as usize,
            feedback: FeedbackConfig {
                keyframe_request_interval: Duration::from_millis(
                    settings.keyframe_request_interval_ms.into(),
                ),
                ..FeedbackConfig::default()
            },
            ..PublisherConfig::default()
        },
    )
}

/// The driver: node events, the publisher's timers (catalog republish, end-of-stream
/// repeats) and periodic statistics, all off the streaming threads.
async fn drive(
    session: Arc<Session>,
    mut events: tokio::sync::mpsc::Receiver<Event>,
    element: glib::WeakRef<super::P2pLiveSink>,
    stats_interval_ms: u32,
) {
    let mut stats_tick = common::stats_ticker(stats_interval_ms);
    loop {
        let deadline = session.publisher.lock().unwrap().poll_timeout();
        tokio::select! {
            event = events.recv() => match event {
                None => break,
                Some(Event::Listening { addrs }) => {
                    *session.addrs.lock().unwrap() = addrs.clone();
                    if let Some(element) = element.upgrade() {
                        element.imp().on_listening(&addrs);
                    }
                }
                Some(Event::BootstrapUnreachable { peer, reason }) => {
                    if let Some(element) = element.upgrade() {
                        common::warn_bootstrap_unreachable(
                            element.upcast_ref(),
                            *CAT,
                            &peer,
                            &reason,
                        );
                    }
                }
                Some(Event::Audience { summary, .. }) => {
                    session
                        .tree_reports
                        .fetch_add(u64::from(summary.viewers), Ordering::Relaxed);
                    *session.tree_audience.lock().unwrap() = Some((Instant::now(), summary));
                }
                Some(Event::Message { message, source, .. }) => {
                    let mut publisher = session.publisher.lock().unwrap();
                    match message {
                        Message::Feedback(report) => {
                            publisher.handle_feedback(Instant::now(), &source.to_bytes(), report)
                        }
                        Message::KeyframeRequest(request) => {
                            publisher.handle_keyframe_request(Instant::now(), request);
                        }
                        _ => {}
                    }
                }
                Some(_) => {}
            },
            _ = session.wake.notified() => {}
            _ = common::sleep_until(deadline) => {}
            _ = common::next_tick(&mut stats_tick) => {
                if let Some(element) = element.upgrade() {
                    common::post_stats(element.upcast_ref(), element.imp().stats());
                }
            }
        }
        let keyframes: Vec<(u32, u32)> = {
            let mut publisher = session.publisher.lock().unwrap();
            publisher.handle_timeout(Instant::now());
            session.flush(&mut publisher);
            std::iter::from_fn(|| publisher.poll_keyframe_request()).collect()
        };
        if let Some(element) = element.upgrade() {
            for (track, layer) in keyframes {
                element.imp().force_keyframe(track, layer);
            }
        }
    }
}

/// The chain behind the input capsfilter for anything but raw video.
fn passthrough_chain(
    structure: &gst::StructureRef,
    settings: &Settings,
) -> Result<Vec<gst::Element>, String> {
    Ok(match structure.name().as_str() {
        // Already-encoded video in the form viewers take is published untouched (bit-exact);
        // other H.264 and AV1 forms are converted to it, with parameter sets at every
        // keyframe so a late joiner can decode.
        "video/x-h264" if has_fields(structure, "byte-stream", "au") => vec![],
        "video/x-h264" => h264_normalizer()?,
        "video/x-av1" if has_fields(structure, "obu-stream", "tu") => vec![],
        "video/x-av1" => {
            let parse = make("av1parse", "gstreamer1.0-plugins-bad")?;
            let filter = capsfilter("video/x-av1,stream-format=obu-stream,alignment=tu")?;
            vec![parse, filter]
        }
        "video/x-vp8" | "video/x-vp9" | "audio/x-opus" => vec![],
        "audio/x-raw" => {
            let convert = make("audioconvert", "gstreamer1.0-plugins-base")?;
            let resample = make("audioresample", "gstreamer1.0-plugins-base")?;
            let encoder = make("opusenc", "gstreamer1.0-plugins-base")?;
            encoder.set_property("bitrate", (settings.audio_bitrate_kbps * 1000) as i32);
            vec![convert, resample, encoder]
        }
        other => return Err(format!("unsupported input caps {other}")),
    })
}

/// Number of VP8 temporal layers in the `temporal` ladders, and their pattern: the layer of
/// each frame in a period of four, what it may reference and update (base frames reference
/// only base frames, so dropping the upper layers leaves a decodable stream), and which are
/// sync points (reference only lower layers).
const TEMPORAL_LAYERS: u32 = 3;
const TEMPORAL_LAYER_IDS: [i32; 4] = [0, 2, 1, 2];
const TEMPORAL_RATE_DECIMATORS: [i32; 3] = [4, 2, 1];
/// Cumulative share of the rung's bitrate up to each temporal layer, in percent.
const TEMPORAL_BITRATE_PERCENT: [u32; 3] = [40, 60, 100];
const TEMPORAL_LAYER_FLAGS: &str = "<no-ref-golden+no-ref-alt+no-upd-golden+no-upd-alt,\
no-ref-golden+no-ref-alt+no-upd-last+no-upd-golden+no-upd-alt+no-upd-entropy,\
no-ref-golden+no-ref-alt+no-upd-last+no-upd-alt+no-upd-entropy,\
no-ref-alt+no-upd-last+no-upd-golden+no-upd-alt+no-upd-entropy>";
const TEMPORAL_SYNC_FLAGS: &str = "<true,true,true,false>";
/// Heights of the lower simulcast rungs; the input size is always the top one.
const SIMULCAST_HEIGHTS: [u32; 2] = [360, 720];
/// No rung is encoded below this bitrate.
const MIN_RUNG_BITRATE_KBPS: u32 = 150;

/// One spatial layer: an encode at one size.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rung {
    width: u32,
    height: u32,
    bitrate_kbps: u32,
}

/// The layers raw video of one pad is encoded into: spatial rungs (lightest first), each
/// with the same number of temporal layers. Layer ids count temporal layers within a rung
/// before the next rung: the order a viewer steps up in.
#[derive(Debug, Clone, PartialEq)]
struct Ladder {
    rungs: Vec<Rung>,
    temporal_layers: u32,
    framerate: gst::Fraction,
    keyframe_distance: u32,
}

impl Ladder {
    fn plan(structure: &gst::StructureRef, settings: &Settings) -> Result<Self, String> {
        let width = structure
            .get::<i32>("width")
            .map_err(|_| "raw video without width")?;
        let height = structure
            .get::<i32>("height")
            .map_err(|_| "raw video without height")?;
        let (width, height) = (width.max(2) as u32, height.max(2) as u32);
        let (spatial, temporal) = match settings.layers {
            LayerLadder::Auto => (false, settings.video_codec == VideoCodec::Vp8),
            LayerLadder::Single => (false, false),
            LayerLadder::Temporal => (false, true),
            LayerLadder::Simulcast => (true, false),
            LayerLadder::SimulcastTemporal => (true, true),
        };
        if temporal && settings.video_codec != VideoCodec::Vp8 {
            return Err("temporal layers need video-codec=vp8".into());
        }
        let top_pixels = u64::from(width) * u64::from(height);
        let rung = |rung_height: u32| {
            // Same aspect ratio, even dimensions (what encoders want).
            let rung_width =
                ((u64::from(width) * u64::from(rung_height) / u64::from(height)) as u32 / 2 * 2)
                    .max(2);
            let pixels = u64::from(rung_width) * u64::from(rung_height);
            let bitrate = (u64::from(settings.video_bitrate_kbps) * pixels / top_pixels) as u32;
            Rung {
                width: rung_width,
                height: rung_height,
                bitrate_kbps: bitrate
                    .max(MIN_RUNG_BITRATE_KBPS)
                    .min(settings.video_bitrate_kbps),
            }
        };
        let mut rungs: Vec<Rung> = if spatial {
            SIMULCAST_HEIGHTS
                .iter()
                .filter(|&&h| h < height)
                .map(|&h| rung(h))
                .collect()
        } else {
            Vec::new()
        };
        rungs.push(Rung {
            width,
            height,
            bitrate_kbps: settings.video_bitrate_kbps,
        });
        let framerate = structure
            .get::<gst::Fraction>("framerate")
            .ok()
            .filter(|f| f.numer() > 0 && f.denom() > 0)
            .unwrap_or(FALLBACK_FRAMERATE);
        let fps = f64::from(framerate.numer()) / f64::from(framerate.denom());
        let keyframe_distance =
            ((f64::from(settings.keyframe_interval_ms) * fps / 1000.0).round() as u32).max(1);
        Ok(Self {
            rungs,
            temporal_layers: if temporal { TEMPORAL_LAYERS } else { 1 },
            framerate,
            keyframe_distance,
        })
    }

    fn layer_id(&self, spatial: u32, temporal: u32) -> u32 {
        spatial * self.temporal_layers + temporal.min(self.temporal_layers - 1)
    }

    fn spatial_of(&self, layer: u32) -> u32 {
        layer / self.temporal_layers
    }

    /// The catalog's description of every layer.
    fn catalog_layers(&self) -> Vec<Layer> {
        let mut layers = Vec::new();
        for (spatial, rung) in self.rungs.iter().enumerate() {
            for temporal in 0..self.temporal_layers {
                let id = self.layer_id(spatial as u32, temporal);
                let (kind, decimator) = if self.temporal_layers > 1 {
                    let decimator = TEMPORAL_RATE_DECIMATORS[temporal as usize] as u32;
                    match (spatial, temporal) {
                        (0, 0) => (LayerKind::Base, decimator),
                        (_, 0) => (LayerKind::Spatial, decimator),
                        _ => (LayerKind::Temporal, decimator),
                    }
                } else if spatial == 0 {
                    (LayerKind::Base, 1)
                } else {
                    (LayerKind::Spatial, 1)
                };
                let share = if self.temporal_layers > 1 {
                    TEMPORAL_BITRATE_PERCENT[temporal as usize]
                } else {
                    100
                };
                layers.push(Layer {
                    id,
                    kind: kind as i32,
                    width: rung.width,
                    height: rung.height,
                    framerate_num: self.framerate.numer().max(0) as u32,
                    framerate_den: (self.framerate.denom().max(1) as u32) * decimator,
                    bitrate: u64::from(rung.bitrate_kbps) * 10 * u64::from(share),
                    depends_on: if temporal > 0 { vec![id - 1] } else { vec![] },
                    spatial_id: spatial as u32,
                    temporal_id: temporal,
                });
            }
        }
        layers
    }
}

/// Threads for a real-time encoder of `width`×`height` on a machine with `cores` cores: the
/// rule of WebRTC's VP8 encoder (`LibvpxVp8Encoder::NumberOfThreads`,
/// modules/video_coding/codecs/vp8/libvpx_vp8_encoder.cc): 8 from 1080p on more than 8
/// cores, 3 above 1280×960 on 6 or more, 2 above VGA on 3 or more, otherwise 1. Extra
/// threads pay only when cores are idle; on a busy machine libvpx's worker threads spin
/// waiting for each other (two 320×240 encoders with 2 threads each on 2 cores: ~63 % CPU
/// each, ~6 % with 1 thread).
pub(crate) fn encoder_threads(width: u32, height: u32, cores: usize) -> u32 {
    let pixels = u64::from(width) * u64::from(height);
    if pixels >= 1920 * 1080 && cores > 8 {
        8
    } else if pixels > 1280 * 960 && cores >= 6 {
        3
    } else if pixels > 640 * 480 && cores >= 3 {
        2
    } else {
        1
    }
}

/// The encoder of one rung of `ladder`.
fn video_encoder(
    settings: &Settings,
    ladder: &Ladder,
    rung: &Rung,
) -> Result<gst::Element, String> {
    let threads = match settings.encoder_threads {
        0 => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            encoder_threads(rung.width, rung.height, cores)
        }
        fixed => fixed,
    };
    gst::debug!(
        CAT,
        "{}x{} encoder: {threads} thread(s)",
        rung.width,
        rung.height
    );
    match settings.video_codec {
        VideoCodec::Vp8 => {
            let encoder = make("vp8enc", "gstreamer1.0-plugins-good")?;
            encoder.set_property("deadline", 1i64);
            encoder.set_property("target-bitrate", (rung.bitrate_kbps * 1000) as i32);
            encoder.set_property_from_str("end-usage", "cbr");
            encoder.set_property("cpu-used", 8i32);
            encoder.set_property("lag-in-frames", 0i32);
            encoder.set_property("keyframe-max-dist", ladder.keyframe_distance as i32);
            encoder.set_property("threads", threads as i32);
            if ladder.temporal_layers > 1 {
                let cumulative_bps = TEMPORAL_BITRATE_PERCENT
                    .iter()
                    .map(|percent| (rung.bitrate_kbps * 10 * percent) as i32);
                encoder.set_property_from_str("error-resilient", "default");
                encoder.set_property("temporal-scalability-number-layers", TEMPORAL_LAYERS as i32);
                encoder.set_property(
                    "temporal-scalability-periodicity",
                    TEMPORAL_LAYER_IDS.len() as i32,
                );
                encoder.set_property(
                    "temporal-scalability-layer-id",
                    glib::ValueArray::new(TEMPORAL_LAYER_IDS),
                );
                encoder.set_property(
                    "temporal-scalability-rate-decimator",
                    glib::ValueArray::new(TEMPORAL_RATE_DECIMATORS),
                );
                encoder.set_property(
                    "temporal-scalability-target-bitrate",
                    glib::ValueArray::new(cumulative_bps),
                );
                encoder.set_property_from_str(
                    "temporal-scalability-layer-flags",
                    TEMPORAL_LAYER_FLAGS,
                );
                encoder.set_property_from_str(
                    "temporal-scalability-layer-sync-flags",
                    TEMPORAL_SYNC_FLAGS,
                );
            }
            Ok(encoder)
        }
        VideoCodec::H264 => {
            let encoder = make("x264enc", "gstreamer1.0-plugins-ugly")?;
            encoder.set_property_from_str("tune", "zerolatency");
            encoder.set_property_from_str("speed-preset", "ultrafast");
            encoder.set_property("bitrate", rung.bitrate_kbps);
            encoder.set_property("key-int-max", ladder.keyframe_distance);
            encoder.set_property("threads", threads);
            Ok(encoder)
        }
    }
}

/// The temporal layer of a VP8 frame and whether it is a sync point, from the `GstVP8Meta`
/// vp8enc attaches when it encodes temporal layers; (0, false) otherwise.
fn vp8_temporal_layer(buffer: &gst::BufferRef) -> (u32, bool) {
    let Ok(meta) = gst::meta::CustomMeta::from_buffer(buffer, "GstVP8Meta") else {
        return (0, false);
    };
    let structure = meta.structure();
    if !structure
        .get::<bool>("use-temporal-scaling")
        .unwrap_or(false)
    {
        return (0, false);
    }
    let layer = structure.get::<u32>("layer-id").unwrap_or(0);
    (layer, structure.get::<bool>("layer-sync").unwrap_or(false))
}

fn has_fields(structure: &gst::StructureRef, stream_format: &str, alignment: &str) -> bool {
    structure.get::<&str>("stream-format").ok() == Some(stream_format)
        && structure.get::<&str>("alignment").ok() == Some(alignment)
}

fn h264_normalizer() -> Result<Vec<gst::Element>, String> {
    let parse = make("h264parse", "gstreamer1.0-plugins-bad")?;
    parse.set_property("config-interval", -1i32);
    let filter = capsfilter("video/x-h264,stream-format=byte-stream,alignment=au")?;
    Ok(vec![parse, filter])
}

fn capsfilter(caps: &str) -> Result<gst::Element, String> {
    let caps: gst::Caps = caps.parse().map_err(|_| format!("bad caps {caps}"))?;
    gst::ElementFactory::make("capsfilter")
        .property("caps", caps)
        .build()
        .map_err(|e| e.to_string())
}

fn make(factory: &str, package: &str) -> Result<gst::Element, String> {
    gst::ElementFactory::make(factory)
        .build()
        .map_err(|_| format!("GStreamer element '{factory}' is missing (install {package})"))
}

/// The catalog's description of a track's single layer, from its encoded caps.
fn single_layer(caps: &gst::CapsRef, kind: TrackKind) -> Vec<Layer> {
    let Some(structure) = caps.structure(0) else {
        return vec![];
    };
    if kind != TrackKind::Video {
        return vec![];
    }
    let framerate = structure
        .get::<gst::Fraction>("framerate")
        .unwrap_or(gst::Fraction::new(0, 1));
    vec![Layer {
        id: 0,
        kind: LayerKind::Base as i32,
        width: structure.get::<i32>("width").unwrap_or(0).max(0) as u32,
        height: structure.get::<i32>("height").unwrap_or(0).max(0) as u32,
        framerate_num: framerate.numer().max(0) as u32,
        framerate_den: framerate.denom().max(0) as u32,
        bitrate: 0,
        depends_on: vec![],
        ..Layer::default()
    }]
}

#[cfg(test)]
mod tests {
    use super::encoder_threads;

    #[test]
    fn small_frames_get_one_encoder_thread_whatever_the_cores() {
        for cores in [1, 2, 4, 16, 64] {
            assert_eq!(encoder_threads(320, 240, cores), 1, "{cores} cores");
            assert_eq!(encoder_threads(640, 480, cores), 1, "{cores} cores");
        }
    }

    #[test]
    fn larger_frames_get_more_threads_only_with_spare_cores() {
        // A 2-core machine encodes everything with one thread.
        assert_eq!(encoder_threads(1920, 1080, 2), 1);
        assert_eq!(encoder_threads(1280, 720, 4), 2);
        assert_eq!(encoder_threads(1920, 1080, 6), 3);
        assert_eq!(encoder_threads(1920, 1080, 16), 8);
        assert_eq!(encoder_threads(1280, 720, 16), 2);
    }
}
