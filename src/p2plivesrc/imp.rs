use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use libp2p::{Multiaddr, PeerId};

use super::PublisherTimeoutAction;
use crate::RUNTIME;
use crate::common::{self, NetworkSettings};
use crate::core::abr::{AbrConfig, LayerChange};
use crate::core::subscriber::DEFAULT_PUBLISHER_TIMEOUT;
use crate::core::viewer::{ChannelChange, Viewer, ViewerConfig, ViewerStats};
use crate::core::wire::{Catalog, Channel, Track, TrackKind};
use crate::core::{OutputFrame, SubscriberConfig, SubscriberEvent, SubscriberStats};
use crate::node::{self, Event, Node};

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
const DEFAULT_AUTO_LAYER: bool = true;
const DEFAULT_DOWNGRADE_THRESHOLD: f64 = 0.1;
const DEFAULT_UPGRADE_COOLDOWN_MS: u32 = 10_000;
const DEFAULT_ACK_INTERVAL_MS: u32 = 1000;
const DEFAULT_PUBLISHER_TIMEOUT_MS: u32 = DEFAULT_PUBLISHER_TIMEOUT.as_millis() as u32;
/// Shortest effective `publisher-timeout`: the catalog is repeated every second, so a stream
/// with nothing else to send (audio in DTX, a paused or very slow video) would flap between
/// lost and back below twice that.
const MIN_PUBLISHER_TIMEOUT_MS: u32 = 2000;
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
    auto_layer: bool,
    /// Layer played when `auto_layer` is off; None: the highest allowed.
    layer: Option<u32>,
    min_layer: u32,
    max_layer: u32,
    downgrade_threshold: f64,
    upgrade_cooldown_ms: u32,
    ack_interval_ms: u32,
    simulated_loss: f64,
    /// 0: never.
    publisher_timeout_ms: u32,
    publisher_timeout_action: PublisherTimeoutAction,
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
            auto_layer: DEFAULT_AUTO_LAYER,
            layer: None,
            min_layer: 0,
            max_layer: u32::MAX,
            downgrade_threshold: DEFAULT_DOWNGRADE_THRESHOLD,
            upgrade_cooldown_ms: DEFAULT_UPGRADE_COOLDOWN_MS,
            ack_interval_ms: DEFAULT_ACK_INTERVAL_MS,
            simulated_loss: 0.0,
            publisher_timeout_ms: DEFAULT_PUBLISHER_TIMEOUT_MS,
            publisher_timeout_action: PublisherTimeoutAction::default(),
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
    /// QoS events from downstream reporting a buffer rendered late: this machine's decoding
    /// or rendering is too slow, whatever the network does.
    render_late: AtomicU64,
}

/// Whether the publisher is heard from, for `stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum PublisherState {
    /// Nothing valid has come yet.
    #[default]
    Waiting,
    Live,
    /// Silent for `publisher-timeout`.
    Lost,
    /// It ended the stream.
    Ended,
}

impl PublisherState {
    fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Live => "live",
            Self::Lost => "lost",
            Self::Ended => "ended",
        }
    }
}

/// What the element and its driver task share.
#[derive(Default)]
struct Shared {
    addrs: Mutex<Vec<Multiaddr>>,
    publisher: Mutex<Option<PeerId>>,
    subscriber: Mutex<SubscriberStats>,
    viewer: Mutex<ViewerStats>,
    /// Per layered track: the layer chosen (ABR or fixed) and the highest one decoded now
    /// (lower for a moment after a loss in an upper temporal layer).
    layers: Mutex<BTreeMap<u32, (u32, Option<u32>)>>,
    counters: OutputCounters,
    /// Moving average of capture (publisher wall clock) to render (viewer wall clock), ms.
    latency_ms: Mutex<Option<f64>>,
    /// Moving average of capture to release by the playout buffer (network and reassembly), ms.
    transit_ms: Mutex<Option<f64>>,
    ended: Mutex<bool>,
    publisher_state: Mutex<PublisherState>,
    /// The latest layer decision of the video track (as in `layer`), for `stats`.
    last_layer_change: Mutex<Option<LayerChange>>,
}

struct State {
    node: Node,
    shared: Arc<Shared>,
    driver: tokio::task::JoinHandle<()>,
    /// The `auto-layer` / `layer` choice, followed by the driver while running.
    layer_choice: tokio::sync::watch::Sender<LayerChoice>,
}

/// Whether the video layer adapts by itself, and the layer to play when it does not
/// (None: the highest allowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LayerChoice {
    auto: bool,
    layer: Option<u32>,
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
                 whose catalog arrives on the topic (trust on first use), replaced by the \
                 author of another catalog only once it has been silent for 5 s (a publisher \
                 restarted without its identity-file comes back under a new peer id)",
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
                 reported in the latency query. A missing frame is waited for until shortly \
                 before the next one is due, so a larger latency leaves more time to repair \
                 loss. A shard still missing a third of (latency + jitter-tolerance) after \
                 its frame began to arrive (120 ms by default; 20 to 400 ms) is pulled from a \
                 neighbour",
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
                "Milliseconds a frame may be late before the playout clock moves later. A \
                 missing frame is waited for until shortly before the next one is due (see \
                 latency) before playback skips to the next keyframe",
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
        glib::ParamSpecBoolean::builder("auto-layer")
            .nick("Automatic layer")
            .blurb(
                "Choose the video layer by itself: step down when frames come late or get lost, \
                 step up after a stable period and a successful probe",
            )
            .default_value(DEFAULT_AUTO_LAYER)
            .mutable_playing()
            .build(),
        glib::ParamSpecInt::builder("layer")
            .nick("Layer")
            .blurb(
                "Video layer played when auto-layer=false (0 is the lightest); -1: the highest \
                 allowed by max-layer",
            )
            .minimum(-1)
            .default_value(-1)
            .mutable_playing()
            .build(),
        glib::ParamSpecUInt::builder("min-layer")
            .nick("Minimum layer")
            .blurb("Lowest video layer auto-layer may choose (above max-layer: an error at start)")
            .default_value(0)
            .mutable_ready()
            .build(),
        glib::ParamSpecUInt::builder("max-layer")
            .nick("Maximum layer")
            .blurb("Highest video layer auto-layer may choose (default: the publisher's highest)")
            .default_value(u32::MAX)
            .mutable_ready()
            .build(),
        glib::ParamSpecDouble::builder("layer-downgrade-threshold")
            .nick("Layer downgrade threshold")
            .blurb(
                "Share of late or lost frames of the played layers, over two seconds, that \
                 makes auto-layer step down",
            )
            .minimum(0.0)
            .maximum(1.0)
            .default_value(DEFAULT_DOWNGRADE_THRESHOLD)
            .mutable_ready()
            .build(),
        glib::ParamSpecUInt::builder("layer-upgrade-cooldown")
            .nick("Layer upgrade cooldown")
            .blurb("Milliseconds without trouble before auto-layer probes the next layer up")
            .minimum(500)
            .maximum(600_000)
            .default_value(DEFAULT_UPGRADE_COOLDOWN_MS)
            .mutable_ready()
            .build(),
        glib::ParamSpecUInt::builder("ack-interval")
            .nick("Report interval")
            .blurb(
                "Milliseconds between the reports (latency, buffer, losses, layer) this viewer \
                 sends the publisher",
            )
            .minimum(100)
            .maximum(60_000)
            .default_value(DEFAULT_ACK_INTERVAL_MS)
            .mutable_ready()
            .build(),
        glib::ParamSpecUInt::builder("publisher-timeout")
            .nick("Publisher timeout")
            .blurb(
                "ms without anything valid from the publisher (media, its catalog repeated \
                 every second, end of stream) before it is declared lost: a \
                 p2plive-publisher-lost message and a WARNING, then publisher-timeout-action \
                 (0: never; values below 2000 count as 2000)",
            )
            .maximum(3_600_000)
            .default_value(DEFAULT_PUBLISHER_TIMEOUT_MS)
            .mutable_ready()
            .build(),
        glib::ParamSpecEnum::builder_with_default(
            "publisher-timeout-action",
            PublisherTimeoutAction::default(),
        )
        .nick("Publisher timeout action")
        .blurb(
            "What to do once the publisher is lost: wait (keep playing, resume and post \
             p2plive-publisher-back when it returns), eos (end the stream) or error",
        )
        .mutable_ready()
        .build(),
        glib::ParamSpecDouble::builder("simulated-loss")
            .nick("Simulated loss")
            .blurb(
                "Testing aid: share of received messages this viewer drops on purpose, as on \
                 a lossy link (0: none)",
            )
            .minimum(0.0)
            .maximum(1.0)
            .default_value(0.0)
            .mutable_playing()
            .build(),
    ]);
    properties
});

impl ObjectImpl for P2pLiveSrc {
    fn properties() -> &'static [glib::ParamSpec] {
        &PROPERTIES
    }

    fn constructed(&self) {
        self.parent_constructed();
        // A source even before its first pad: a pipeline sends downstream events such as
        // EOS (gst-launch-1.0 -e) only to its sources, and a bin is one only once it holds
        // one, which this bin does only after the catalog arrived.
        self.obj().set_element_flags(gst::ElementFlags::SOURCE);
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
            "auto-layer" => {
                settings.auto_layer = value.get().expect("type checked upstream");
                drop(settings);
                self.apply_layer_choice();
            }
            "layer" => {
                let layer: i32 = value.get().expect("type checked upstream");
                settings.layer = u32::try_from(layer).ok();
                drop(settings);
                self.apply_layer_choice();
            }
            "min-layer" => settings.min_layer = value.get().expect("type checked upstream"),
            "max-layer" => settings.max_layer = value.get().expect("type checked upstream"),
            "layer-downgrade-threshold" => {
                settings.downgrade_threshold = value.get().expect("type checked upstream")
            }
            "layer-upgrade-cooldown" => {
                settings.upgrade_cooldown_ms = value.get().expect("type checked upstream")
            }
            "ack-interval" => {
                settings.ack_interval_ms = value.get().expect("type checked upstream")
            }
            "simulated-loss" => {
                let share: f64 = value.get().expect("type checked upstream");
                settings.simulated_loss = share;
                drop(settings);
                let running = match self.state.lock().unwrap().as_ref() {
                    Some(state) => {
                        state.node.set_inbound_loss(share);
                        true
                    }
                    None => false,
                };
                // Posted with no lock held: a sync bus handler may read our properties.
                if running {
                    self.warn_if_total_loss(share);
                }
            }
            "publisher-timeout" => {
                settings.publisher_timeout_ms = value.get().expect("type checked upstream")
            }
            "publisher-timeout-action" => {
                settings.publisher_timeout_action = value.get().expect("type checked upstream")
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
                    "auto-layer" => settings.auto_layer.to_value(),
                    "layer" => settings
                        .layer
                        .map_or(-1, |l| i32::try_from(l).unwrap_or(i32::MAX))
                        .to_value(),
                    "min-layer" => settings.min_layer.to_value(),
                    "max-layer" => settings.max_layer.to_value(),
                    "layer-downgrade-threshold" => settings.downgrade_threshold.to_value(),
                    "layer-upgrade-cooldown" => settings.upgrade_cooldown_ms.to_value(),
                    "ack-interval" => settings.ack_interval_ms.to_value(),
                    "simulated-loss" => settings.simulated_loss.to_value(),
                    "publisher-timeout" => settings.publisher_timeout_ms.to_value(),
                    "publisher-timeout-action" => settings.publisher_timeout_action.to_value(),
                    other => unreachable!("unknown property {other}"),
                }
            }
        }
    }
}

impl GstObjectImpl for P2pLiveSrc {}

impl ElementImpl for P2pLiveSrc {
    fn send_event(&self, event: gst::Event) -> bool {
        if let gst::EventView::Eos(_) = event.view()
            && self.obj().src_pads().is_empty()
        {
            gst::info!(CAT, imp = self, "EOS before any pad: ending the stream");
            self.post_eos_without_pads(event.seqnum());
            return true;
        }
        self.parent_send_event(event)
    }

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
    /// Posts a WARNING when `simulated-loss` is 1: the viewer would play nothing, silently.
    /// (At start, and when the property is set while running.)
    fn warn_if_total_loss(&self, share: f64) {
        if share >= 1.0 {
            gst::element_imp_warning!(
                self,
                gst::ResourceError::Read,
                ("simulated-loss=1 drops every message this viewer receives: nothing will play")
            );
        }
    }

    fn start(&self) -> Result<(), gst::ErrorMessage> {
        let settings = self.settings.lock().unwrap().clone();
        settings
            .net
            .validate_topic()
            .map_err(|err| gst::error_msg!(gst::LibraryError::Settings, ("{err}")))?;
        if settings.min_layer > settings.max_layer {
            return Err(gst::error_msg!(
                gst::LibraryError::Settings,
                (
                    "min-layer {} is above max-layer {}: no layer is allowed",
                    settings.min_layer,
                    settings.max_layer
                )
            ));
        }
        let publisher = settings
            .publisher
            .as_deref()
            .map(PeerId::from_str)
            .transpose()
            .map_err(|err| {
                gst::error_msg!(
                    gst::LibraryError::Settings,
                    ("publisher is not a valid peer id: {err}")
                )
            })?;
        let subscriber = SubscriberConfig {
            latency: Duration::from_millis(settings.latency_ms.into()),
            buffer_size: settings.buffer_size as usize,
            jitter_tolerance: Duration::from_millis(settings.jitter_tolerance_ms.into()),
            fragment_timeout: Duration::from_millis(settings.fragment_timeout_ms.into()),
            publisher_timeout: (settings.publisher_timeout_ms > 0).then(|| {
                let ms = settings.publisher_timeout_ms.max(MIN_PUBLISHER_TIMEOUT_MS);
                Duration::from_millis(ms.into())
            }),
            ..SubscriberConfig::default()
        };
        let mut config = settings
            .net
            .node_config(MAX_TRANSMIT_SIZE)
            .map_err(|err| gst::error_msg!(gst::ResourceError::Settings, ("{err}")))?;
        // A missing shard is pulled early enough to arrive before the playout gives it up.
        config.repair_delay = Some(node::repair_delay_for_playout(
            subscriber.latency,
            subscriber.jitter_tolerance,
            subscriber.gap_wait,
        ));
        let (node, events) = Node::spawn(config, RUNTIME.handle()).map_err(|err| {
            gst::error_msg!(
                gst::ResourceError::OpenReadWrite,
                ("Failed to start the libp2p node: {err}")
            )
        })?;
        node.set_inbound_loss(settings.simulated_loss);
        self.warn_if_total_loss(settings.simulated_loss);
        let topic = settings.net.topic.clone();
        // Viewers also carry the feedback channel, so reports reach a publisher they are not
        // connected to.
        node.join_stream(&topic, publisher, vec![Channel::Control, Channel::Feedback])
            .map_err(|err| {
                gst::error_msg!(
                    gst::ResourceError::OpenReadWrite,
                    ("Failed to join the stream: {err}")
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
        let viewer = Viewer::new(ViewerConfig {
            subscriber,
            abr: AbrConfig {
                min_layer: settings.min_layer,
                max_layer: settings.max_layer,
                downgrade_loss_threshold: settings.downgrade_threshold,
                upgrade_cooldown: Duration::from_millis(settings.upgrade_cooldown_ms.into()),
                ..AbrConfig::default()
            },
            viewer_id: rand::random(),
            ack_interval: Duration::from_millis(settings.ack_interval_ms.into()),
            ..ViewerConfig::default()
        });
        let shared = Arc::new(Shared::default());
        *shared.publisher.lock().unwrap() = publisher;
        let (layer_choice, layer_choice_rx) = tokio::sync::watch::channel(LayerChoice {
            auto: settings.auto_layer,
            layer: settings.layer,
        });
        let driver = RUNTIME.spawn(drive(Driver {
            node: node.clone(),
            topic: topic.clone(),
            events,
            element: self.obj().downgrade(),
            shared: shared.clone(),
            viewer,
            outputs: BTreeMap::new(),
            settings,
            layer_choice: layer_choice_rx,
            fixed_layers: BTreeMap::new(),
        }));
        *self.state.lock().unwrap() = Some(State {
            node,
            shared,
            driver,
            layer_choice,
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

    /// Ends a stream that never got a pad. No sink can receive an EOS event then, so the
    /// pipeline would never post its EOS message (it waits for every sink): the message is
    /// posted on the pipeline's bus directly, for `gst-launch-1.0 -e` and applications
    /// waiting for EOS.
    fn post_eos_without_pads(&self, seqnum: gst::Seqnum) {
        let obj = self.obj();
        let mut top: gst::Object = obj.clone().upcast();
        while let Some(parent) = top.parent() {
            top = parent;
        }
        let message = gst::message::Eos::builder()
            .src(&*obj)
            .seqnum(seqnum)
            .build();
        match top.downcast_ref::<gst::Element>().and_then(|e| e.bus()) {
            Some(bus) => {
                let _ = bus.post(message);
            }
            None => {
                let _ = obj.post_message(message);
            }
        }
    }

    /// Hands a changed `auto-layer` / `layer` to the running driver.
    fn apply_layer_choice(&self) {
        let choice = {
            let settings = self.settings.lock().unwrap();
            LayerChoice {
                auto: settings.auto_layer,
                layer: settings.layer,
            }
        };
        if let Some(state) = self.state.lock().unwrap().as_ref() {
            state.layer_choice.send_replace(choice);
        }
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
        if let Some(shared) = self
            .state
            .lock()
            .unwrap()
            .as_ref()
            .map(|s| s.shared.clone())
        {
            // Sinks send QoS upstream for every buffer they render late (positive jitter).
            ghost.add_probe(gst::PadProbeType::EVENT_UPSTREAM, move |_, info| {
                if let Some(gst::EventView::Qos(qos)) = info.event().map(|e| e.view())
                    && qos.get().2 > 0
                {
                    shared.counters.render_late.fetch_add(1, Ordering::Relaxed);
                }
                gst::PadProbeReturn::Ok
            });
        }
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
            .field("clock-drift-ppm", s.clock_drift_ppm)
            .field("buffered-frames", s.buffered_frames)
            .field("pending-bytes", s.pending_bytes)
            .field("pushed", shared.counters.pushed.load(Ordering::Relaxed))
            .field(
                "discarded",
                shared.counters.discarded.load(Ordering::Relaxed),
            )
            .field("refused", shared.counters.refused.load(Ordering::Relaxed))
            .field("ended", *shared.ended.lock().unwrap())
            .field("switch-dropped", s.switch_dropped)
            .field(
                "publisher-state",
                shared.publisher_state.lock().unwrap().as_str(),
            )
            .field("publisher-lost", s.publisher_lost)
            .field("frames-late-network", s.late_network)
            .field("frames-late-publisher", s.late_publisher)
            .field("frames-late-local", s.late_local)
            .field(
                "render-late",
                shared.counters.render_late.load(Ordering::Relaxed),
            );
        let viewer = shared.viewer.lock().unwrap().clone();
        builder = builder
            .field("reports-sent", viewer.reports_sent)
            .field("keyframe-requests-sent", viewer.keyframe_requests_sent)
            .field("layer-changes", viewer.layer_changes)
            .field("local-stalls", viewer.local_stalls)
            .field("local-stall-ms", viewer.local_stall_ms);
        if let Some(change) = *shared.last_layer_change.lock().unwrap() {
            builder = builder
                .field("layer-reason", change.reason.as_str())
                .field("layer-from", change.from.id);
        }
        // The layers of the first video track (the usual single one).
        if let Some((selected, playing)) = shared.layers.lock().unwrap().values().next() {
            builder = builder.field("layer", *selected);
            if let Some(playing) = playing {
                builder = builder.field("playing-layer", *playing);
            }
        }
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

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
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
    viewer: Viewer,
    outputs: BTreeMap<u32, TrackOutput>,
    settings: Settings,
    layer_choice: tokio::sync::watch::Receiver<LayerChoice>,
    /// The fixed layer applied per layered track (None: adapting).
    fixed_layers: BTreeMap<u32, Option<u32>>,
}

/// How often the data plane's link-loss measure is handed to the layer controllers.
const LINK_LOSS_PERIOD: std::time::Duration = std::time::Duration::from_millis(250);

async fn drive(mut driver: Driver) {
    let mut stats_tick = common::stats_ticker(driver.settings.net.stats_interval_ms);
    let mut next_link_loss = Instant::now();
    loop {
        let deadline = driver.viewer.poll_timeout();
        tokio::select! {
            event = driver.events.recv() => match event {
                None => break,
                Some(event) => driver.handle_node_event(event),
            },
            _ = common::sleep_until(deadline) => {}
            Ok(()) = driver.layer_choice.changed() => driver.apply_layer_choice(),
            _ = common::next_tick(&mut stats_tick) => {
                if let Some(element) = driver.element.upgrade() {
                    common::post_stats(element.upcast_ref(), element.imp().stats());
                }
            }
        }
        let now = Instant::now();
        if now >= next_link_loss {
            next_link_loss = now + LINK_LOSS_PERIOD;
            let loss = driver
                .node
                .stats()
                .data_plane
                .map(|dp| f64::from(dp.link_loss_permille) / 1000.0);
            driver.viewer.set_link_loss(loss);
        }
        driver.viewer.handle_timeout(now);
        if !driver.drain_viewer() {
            break;
        }
    }
}

impl Driver {
    fn handle_node_event(&mut self, event: Event) {
        match event {
            Event::Message { message, .. } => {
                self.viewer.handle_message(Instant::now(), message);
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
            Event::BootstrapUnreachable { peer, reason } => {
                if let Some(element) = self.element.upgrade() {
                    common::warn_bootstrap_unreachable(element.upcast_ref(), *CAT, &peer, &reason);
                }
            }
            // Only a publisher's node reports its audience.
            Event::Audience { .. } => {}
        }
    }

    /// Acts on everything the core released; false once the element is gone.
    fn drain_viewer(&mut self) -> bool {
        let Some(element) = self.element.upgrade() else {
            return false;
        };
        let imp = element.imp();
        let latency = Duration::from_millis(self.settings.latency_ms.into());
        while let Some(event) = self.viewer.poll_event() {
            match event {
                SubscriberEvent::Catalog(catalog) => {
                    let mut state = self.shared.publisher_state.lock().unwrap();
                    if *state == PublisherState::Waiting {
                        *state = PublisherState::Live;
                    }
                    drop(state);
                    self.apply_catalog(imp, &catalog);
                    self.apply_layer_choice();
                }
                SubscriberEvent::Restarted { epoch } => {
                    gst::info!(CAT, imp = imp, "publisher restarted (epoch {epoch:x})");
                }
                SubscriberEvent::Frame(frame) => {
                    if frame.layer_switch {
                        self.follow_layer_switch(imp, &frame);
                    }
                    match self.outputs.get(&frame.track) {
                        Some(output) => imp.push_frame(&self.shared, output, frame, latency),
                        None => {
                            self.shared
                                .counters
                                .discarded
                                .fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                SubscriberEvent::EndOfStream => {
                    gst::info!(CAT, imp = imp, "publisher ended the stream");
                    *self.shared.ended.lock().unwrap() = true;
                    *self.shared.publisher_state.lock().unwrap() = PublisherState::Ended;
                    self.end_outputs(imp);
                }
                SubscriberEvent::PublisherLost { silent } => self.publisher_lost(imp, silent),
                SubscriberEvent::PublisherBack { lost_for } => {
                    gst::info!(
                        CAT,
                        imp = imp,
                        "publisher is back after {} ms",
                        lost_for.as_millis()
                    );
                    *self.shared.publisher_state.lock().unwrap() = PublisherState::Live;
                    let structure = gst::Structure::builder("p2plive-publisher-back")
                        .field("publisher", self.publisher_string())
                        .field("lost-ms", duration_ms(lost_for))
                        .build();
                    let _ = imp.obj().post_message(
                        gst::message::Element::builder(structure)
                            .src(&*imp.obj())
                            .build(),
                    );
                }
            }
        }
        while let Some((track, change)) = self.viewer.poll_layer_change() {
            self.report_layer_change(imp, track, change);
        }
        while let Some(change) = self.viewer.poll_channel_change() {
            let result = match change {
                ChannelChange::Subscribe(channel) => self.node.subscribe(&self.topic, channel),
                ChannelChange::Unsubscribe(channel) => self.node.unsubscribe(&self.topic, channel),
            };
            if let Err(err) = result {
                gst::warning!(CAT, imp = imp, "{change:?} failed: {err}");
            }
        }
        while let Some(transmit) = self.viewer.poll_transmit() {
            // Reports and keyframe requests are best effort: a full queue drops one.
            if let Err(err) = self
                .node
                .publish(&self.topic, transmit.channel, transmit.payload)
            {
                gst::debug!(CAT, imp = imp, "report not sent: {err}");
            }
        }
        if let Some(latency_ms) = *self.shared.latency_ms.lock().unwrap() {
            self.viewer
                .set_measured_latency(Duration::from_millis(latency_ms.max(0.0) as u64));
        }
        let subscriber = self.viewer.subscriber();
        *self.shared.subscriber.lock().unwrap() = subscriber.stats();
        *self.shared.viewer.lock().unwrap() = self.viewer.stats();
        *self.shared.layers.lock().unwrap() = self
            .outputs
            .iter()
            .filter(|(_, output)| output.kind == TrackKind::Video)
            .filter_map(|(&track, _)| {
                let selected = subscriber.selected_layer(track)?.id;
                Some((
                    track,
                    (selected, subscriber.playing_layer(track).map(|l| l.id)),
                ))
            })
            .collect();
        true
    }

    /// EOS on every output, or on the bus when there is none yet.
    fn end_outputs(&self, imp: &P2pLiveSrc) {
        if imp.obj().src_pads().is_empty() {
            imp.post_eos_without_pads(gst::Seqnum::next());
        }
        for output in self.outputs.values() {
            let _ = output.appsrc.end_of_stream();
        }
    }

    fn publisher_string(&self) -> String {
        self.shared
            .publisher
            .lock()
            .unwrap()
            .map(|p| p.to_string())
            .unwrap_or_default()
    }

    /// Nothing valid from the publisher for `publisher-timeout`: say so, then act as
    /// `publisher-timeout-action` says.
    fn publisher_lost(&mut self, imp: &P2pLiveSrc, silent: Duration) {
        let action = self.settings.publisher_timeout_action;
        *self.shared.publisher_state.lock().unwrap() = PublisherState::Lost;
        // The property's own nick, so messages and gst-launch spell it alike.
        let nick = glib::EnumValue::from_value(&action.to_value())
            .map(|(_, value)| value.nick().to_string())
            .unwrap_or_default();
        let structure = gst::Structure::builder("p2plive-publisher-lost")
            .field("publisher", self.publisher_string())
            .field("silent-ms", duration_ms(silent))
            .field("action", nick)
            .build();
        let obj = imp.obj();
        let _ = obj.post_message(gst::message::Element::builder(structure).src(&*obj).build());
        let text = format!(
            "Nothing from the publisher for {} ms (killed, crashed or unreachable)",
            silent.as_millis()
        );
        match action {
            PublisherTimeoutAction::Wait => {
                gst::element_imp_warning!(
                    imp,
                    gst::ResourceError::Read,
                    ("{text}; waiting for it to return")
                );
            }
            PublisherTimeoutAction::Eos => {
                gst::element_imp_warning!(
                    imp,
                    gst::ResourceError::Read,
                    ("{text}; ending the stream")
                );
                *self.shared.ended.lock().unwrap() = true;
                self.end_outputs(imp);
            }
            PublisherTimeoutAction::Error => {
                gst::element_imp_error!(imp, gst::ResourceError::Read, ("{text}"));
            }
        }
    }

    /// Posts a `p2plive-layer-changed` message for a controller decision and keeps the
    /// latest one of the video track for `stats`.
    fn report_layer_change(&self, imp: &P2pLiveSrc, track: u32, change: LayerChange) {
        gst::info!(
            CAT,
            imp = imp,
            "track {track}: layer {} -> {} ({})",
            change.from.id,
            change.to.id,
            change.reason.as_str()
        );
        let first_video = self
            .outputs
            .iter()
            .find(|(_, output)| output.kind == TrackKind::Video)
            .map(|(&id, _)| id);
        if first_video == Some(track) {
            *self.shared.last_layer_change.lock().unwrap() = Some(change);
        }
        let mut builder = gst::Structure::builder("p2plive-layer-changed")
            .field("track", track)
            .field("from", change.from.id)
            .field("to", change.to.id)
            .field("reason", change.reason.as_str());
        if let Some(probe) = change.probe {
            builder = builder.field("probe", probe.id);
        }
        let obj = imp.obj();
        let _ = obj.post_message(
            gst::message::Element::builder(builder.build())
                .src(&*obj)
                .build(),
        );
    }

    /// The first frame of another simulcast layer: its resolution goes into the caps.
    fn follow_layer_switch(&mut self, imp: &P2pLiveSrc, frame: &OutputFrame) {
        let Some(output) = self.outputs.get_mut(&frame.track) else {
            return;
        };
        let layer = self.viewer.subscriber().catalog().and_then(|catalog| {
            catalog
                .tracks
                .iter()
                .find(|t| t.id == frame.track)?
                .layers
                .iter()
                .find(|l| l.id == frame.layer)
                .cloned()
        });
        let Some(layer) = layer else {
            return;
        };
        let Ok(mut caps) = output.caps.parse::<gst::Caps>() else {
            return;
        };
        if layer.width > 0 && layer.height > 0 {
            let caps = caps.make_mut();
            caps.set("width", layer.width as i32);
            caps.set("height", layer.height as i32);
        }
        gst::info!(
            CAT,
            imp = imp,
            "track {} now plays layer {} ({}x{})",
            frame.track,
            layer.id,
            layer.width,
            layer.height
        );
        output.appsrc.set_caps(Some(&caps));
    }

    /// Applies `auto-layer` / `layer` to every layered track: adapting, or a fixed layer
    /// (the highest one within `max-layer` when `layer` is -1).
    fn apply_layer_choice(&mut self) {
        let choice = *self.layer_choice.borrow_and_update();
        let Some(catalog) = self.viewer.subscriber().catalog().cloned() else {
            return;
        };
        let now = Instant::now();
        for track in catalog.tracks.iter().filter(|t| t.layers.len() > 1) {
            let wanted = (!choice.auto).then(|| {
                let ceiling = choice
                    .layer
                    .unwrap_or(u32::MAX)
                    .min(self.settings.max_layer);
                track
                    .layers
                    .iter()
                    .map(|l| l.id)
                    .filter(|&id| id <= ceiling)
                    .max()
                    .unwrap_or(0)
            });
            if self.fixed_layers.get(&track.id) != Some(&wanted)
                && self.viewer.set_fixed_layer(now, track.id, wanted)
            {
                self.fixed_layers.insert(track.id, wanted);
            }
        }
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
                    // The viewer says which of its layers to receive (poll_channel_change).
                    self.outputs.insert(track.id, output);
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
