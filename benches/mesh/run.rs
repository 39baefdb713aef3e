//! One run: one mode, N viewers. Starts the nodes, publishes the synthetic stream, measures
//! over the window, stops everything, and returns the raw observations reduced to figures.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use gstp2plive::core::dataplane::DataPlaneStats;
use gstp2plive::core::wire::{Layer, LayerKind, TrackKind};
use gstp2plive::core::{
    Channel, EncodedFrame, Message, Publisher, PublisherConfig, SubscriberConfig, SubscriberEvent,
    Viewer, ViewerConfig,
};
use gstp2plive::node::{
    self, DataPlaneMode, Event, GossipsubProfile, InboundLoss, Node, NodeConfig, NodeStatsSnapshot,
};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, RngCore as _, SeedableRng as _};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::report::{self, RunResult};
use crate::{Args, Mode};

const STREAM: &str = "bench";
/// After the window, the publisher goes on this long so the window's last frames can arrive.
pub const DRAIN: Duration = Duration::from_millis(1500);
/// Upper bound of stopping the nodes and collecting the viewers' reports.
pub const TEARDOWN: Duration = Duration::from_secs(10);
/// Most time one node may take to report its listen address.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Viewers are started this far apart.
const JOIN_SPACING: Duration = Duration::from_millis(20);
/// Most hops followed when tracing a frame back to the publisher.
const MAX_HOPS: usize = 64;

/// Setup time allowed for `viewers` viewers.
pub fn setup_budget(viewers: usize) -> Duration {
    LISTEN_TIMEOUT + (JOIN_SPACING + Duration::from_millis(500)) * viewers as u32
}

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub mode: Mode,
    pub viewers: usize,
    pub bitrate: u64,
    pub layers: u32,
    pub fps: u32,
    pub gop: Duration,
    pub keyframe_ratio: f64,
    pub warmup: Duration,
    pub duration: Duration,
    pub bootstrap_peers: usize,
    pub churn: f64,
    pub loss: f64,
    pub loss_nodes: f64,
    pub seed: u64,
}

impl RunConfig {
    pub fn new(args: &Args, mode: Mode, viewers: usize, bitrate: u64) -> Self {
        Self {
            mode,
            viewers,
            bitrate,
            layers: args.layers,
            fps: args.fps,
            gop: args.gop,
            keyframe_ratio: args.keyframe_ratio,
            warmup: args.warmup,
            duration: args.duration,
            bootstrap_peers: args.bootstrap_peers,
            churn: args.churn,
            loss: args.loss,
            loss_nodes: args.loss_nodes,
            seed: args.seed,
        }
    }

    /// Bitrate of `layer`: the top layer carries `bitrate`, each one below a quarter of it.
    pub fn layer_bitrate(&self, layer: u32) -> u64 {
        self.bitrate >> (2 * (self.layers - 1 - layer))
    }

    fn played_layer(&self, viewer: usize) -> u32 {
        (viewer % self.layers as usize) as u32
    }
}

/// One published frame.
#[derive(Debug, Clone, Copy)]
struct Published {
    layer: u32,
    sequence: u64,
    at: Instant,
    bytes: u64,
}

/// What one viewer instance observed.
#[derive(Debug)]
pub struct ViewerReport {
    pub peer_id: PeerId,
    pub joined_at: Instant,
    pub first_frame_at: Option<Instant>,
    /// (sequence, latency publish → complete in ms) of the played layer.
    pub completions: Vec<(u64, f64)>,
    /// Sequences released by the playout before their deadline.
    pub on_time: BTreeSet<u64>,
    /// Sequences released after their deadline.
    pub late: u64,
    /// Who delivered the first copy of each frame's first fragment: (layer, sequence) → peer.
    pub first_copy_from: HashMap<(u32, u64), PeerId>,
}

struct ViewerHandle {
    node: Node,
    layer: u32,
    tcp_addr: Multiaddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<ViewerReport>,
    /// A viewer started before the window and never killed.
    original: bool,
    killed: bool,
}

fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn node_config(mode: Mode, bootstrap: Vec<Multiaddr>, publisher: bool) -> NodeConfig {
    let mut config = NodeConfig::new(Keypair::generate_ed25519());
    config.listen = node::parse_multiaddrs("/ip4/127.0.0.1/tcp/0").expect("listen address");
    config.bootstrap = bootstrap;
    config.mdns = false;
    match mode {
        Mode::P2plive => config.data_plane = DataPlaneMode::Trees,
        Mode::P2pliveGossipsub => config.data_plane = DataPlaneMode::Gossipsub,
        Mode::GossipsubDefault => {
            config.data_plane = DataPlaneMode::Gossipsub;
            config.gossipsub_profile = GossipsubProfile::Libp2pDefaults;
        }
        Mode::Unicast => {
            config.data_plane = DataPlaneMode::Gossipsub;
            // A star: viewers know only the publisher, find nobody else, and the publisher
            // floods every message to each subscribed viewer.
            config.gossipsub_profile = GossipsubProfile::Libp2pDefaults;
            config.kademlia = false;
            if !publisher {
                config.max_dialed_peers = 0;
            }
        }
    }
    if publisher {
        // Room for a few seconds of keyframes at high bitrates.
        config.publish_capacity = 8192;
    } else {
        // As a p2plivesrc with the same playout latency sets it.
        let playout = SubscriberConfig::default();
        config.repair_delay = Some(node::repair_delay_for_playout(
            playout.latency,
            playout.jitter_tolerance,
            playout.gap_wait,
        ));
    }
    config
}

/// Spawns a node and waits for its TCP listen address.
async fn start_node(
    config: NodeConfig,
) -> Result<(Node, mpsc::Receiver<Event>, Multiaddr), String> {
    let (node, mut events) = Node::spawn(config, &tokio::runtime::Handle::current())
        .map_err(|err| format!("node: {err}"))?;
    let is_tcp = |addr: &Multiaddr| {
        addr.iter()
            .any(|p| matches!(p, libp2p::multiaddr::Protocol::Tcp(_)))
    };
    // A loaded machine may announce an empty set first (after 1 s); a later announcement
    // follows once the listener is up.
    let tcp = tokio::time::timeout(LISTEN_TIMEOUT, async {
        loop {
            match events.recv().await {
                Some(Event::Listening { addrs }) => {
                    if let Some(tcp) = addrs.into_iter().find(is_tcp) {
                        break Some(tcp);
                    }
                }
                Some(_) => continue,
                None => break None,
            }
        }
    })
    .await
    .map_err(|_| "node did not report a TCP listen address in time".to_owned())?
    .ok_or("node stopped before listening")?;
    Ok((node, events, tcp))
}

/// Process CPU time (user + system).
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

pub async fn run(config: RunConfig) -> Result<RunResult, String> {
    let mut rng = StdRng::seed_from_u64(config.seed ^ (config.viewers as u64) << 32);
    let start = Instant::now();

    // ---- publisher --------------------------------------------------------------------
    let (pub_node, pub_events, pub_addr) =
        start_node(node_config(config.mode, Vec::new(), true)).await?;
    let publisher_id = pub_node.peer_id();
    // As p2plivesink: the stream, and the feedback channel its viewers' reports and
    // keyframe requests come on.
    pub_node
        .announce_stream(STREAM)
        .and_then(|()| pub_node.subscribe(STREAM, Channel::Feedback))
        .map_err(|err| format!("announce: {err}"))?;
    let (pub_stop_tx, pub_stop) = watch::channel(false);
    let pub_task = tokio::spawn(publish(
        config.clone(),
        pub_node.clone(),
        pub_events,
        pub_stop,
        rng.next_u64(),
    ));

    // ---- viewers ----------------------------------------------------------------------
    let lossy: BTreeSet<usize> = {
        let mut order: Vec<usize> = (0..config.viewers).collect();
        order.shuffle(&mut rng);
        let count = (config.loss_nodes * config.viewers as f64).round() as usize;
        if config.loss > 0.0 {
            order.into_iter().take(count).collect()
        } else {
            BTreeSet::new()
        }
    };
    let mut viewers: Vec<ViewerHandle> = Vec::with_capacity(config.viewers);
    let setup_deadline = start + setup_budget(config.viewers);
    for index in 0..config.viewers {
        if Instant::now() > setup_deadline {
            return Err(format!(
                "setup took longer than {:?}",
                setup_budget(config.viewers)
            ));
        }
        let loss = lossy.contains(&index).then_some(InboundLoss {
            share: config.loss,
            seed: config.seed ^ index as u64,
        });
        let viewer = start_viewer(
            &config,
            index,
            &pub_addr,
            publisher_id,
            &viewers,
            loss,
            &mut rng,
        )
        .await?;
        viewers.push(viewer);
        tokio::time::sleep(JOIN_SPACING).await;
    }

    // ---- measurement window -----------------------------------------------------------
    tokio::time::sleep(config.warmup).await;
    let t0 = Instant::now();
    let cpu0 = cpu_time();
    let pub0 = pub_node.stats();
    let viewers0: Vec<NodeStatsSnapshot> = viewers.iter().map(|v| v.node.stats()).collect();

    let t1 = t0 + config.duration;
    let churn_events = (config.churn * config.viewers as f64 * config.duration.as_secs_f64() / 60.0)
        .round() as usize;
    let mut churned = 0;
    let mut restarts = 0usize;
    for k in 0..churn_events {
        let at = t0
            + config
                .duration
                .mul_f64((k as f64 + 0.5) / churn_events as f64);
        tokio::time::sleep_until(at.into()).await;
        let alive: Vec<usize> = (0..viewers.len()).filter(|&i| !viewers[i].killed).collect();
        let Some(&victim) = alive.get(rng.random_range(0..alive.len().max(1))) else {
            break;
        };
        viewers[victim].killed = true;
        viewers[victim].node.shutdown(Duration::ZERO);
        let _ = viewers[victim].stop.send(true);
        churned += 1;
        // The viewer comes back at once as a new peer, like a restarted player.
        let index = viewers.len();
        let loss = lossy.contains(&victim).then_some(InboundLoss {
            share: config.loss,
            seed: config.seed ^ index as u64,
        });
        let mut viewer = start_viewer(
            &config,
            victim,
            &pub_addr,
            publisher_id,
            &viewers,
            loss,
            &mut rng,
        )
        .await?;
        viewer.original = false;
        viewers.push(viewer);
        restarts += 1;
    }
    tokio::time::sleep_until(t1.into()).await;
    let cpu1 = cpu_time();
    let pub1 = pub_node.stats();
    let viewers1: Vec<NodeStatsSnapshot> = viewers.iter().map(|v| v.node.stats()).collect();
    if std::env::var_os("MESH_STATS").is_some() {
        print_stats(&viewers0, &viewers1);
    }
    let window = t1 - t0;

    // ---- drain and stop ---------------------------------------------------------------
    tokio::time::sleep(DRAIN).await;
    let _ = pub_stop_tx.send(true);
    let teardown_deadline = tokio::time::Instant::now() + TEARDOWN;
    let published = tokio::time::timeout_at(teardown_deadline, pub_task)
        .await
        .map_err(|_| "publisher task did not stop in time")?
        .map_err(|err| format!("publisher task: {err}"))?;
    for viewer in &viewers {
        let _ = viewer.stop.send(true);
    }
    let mut reports = Vec::with_capacity(viewers.len());
    for viewer in &mut viewers {
        let report = tokio::time::timeout_at(teardown_deadline, &mut viewer.task)
            .await
            .map_err(|_| "viewer task did not stop in time")?
            .map_err(|err| format!("viewer task: {err}"))?;
        reports.push(report);
    }
    let viewer_totals: Vec<NodeStatsSnapshot> = viewers.iter().map(|v| v.node.stats()).collect();
    if std::env::var_os("MESH_DEBUG").is_some() {
        for s in viewer_totals.iter().take(4).chain([&pub_node.stats()]) {
            eprintln!(
                "{:?} peers {} {:?}",
                s.peer_id, s.connected_peers, s.data_plane
            );
        }
    }
    let publisher_total = pub_node.stats();
    for viewer in &viewers {
        viewer.node.shutdown(Duration::ZERO);
    }
    pub_node.shutdown(Duration::ZERO);
    for node in viewers.iter().map(|v| &v.node).chain([&pub_node]) {
        let _ = tokio::time::timeout_at(teardown_deadline, node.stopped()).await;
    }

    // ---- figures ----------------------------------------------------------------------
    let in_window: Vec<Published> = published
        .iter()
        .copied()
        .filter(|p| p.at >= t0 && p.at < t1)
        .collect();
    let mut window_frames: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
    let mut window_bytes: BTreeMap<u32, u64> = BTreeMap::new();
    for p in &in_window {
        window_frames.entry(p.layer).or_default().insert(p.sequence);
        *window_bytes.entry(p.layer).or_default() += p.bytes;
    }
    let stream_bytes: u64 = window_bytes.values().sum();

    let records: HashMap<PeerId, &HashMap<(u32, u64), PeerId>> = reports
        .iter()
        .map(|r| (r.peer_id, &r.first_copy_from))
        .collect();
    let hops_of = |viewer: PeerId, key: (u32, u64)| -> Option<u32> {
        let mut at = viewer;
        for hop in 1..=MAX_HOPS as u32 {
            let from = *records.get(&at)?.get(&key)?;
            if from == publisher_id {
                return Some(hop);
            }
            at = from;
        }
        None
    };

    let mut survivors = Vec::new();
    for (index, (viewer, report)) in viewers.iter().zip(&reports).enumerate() {
        if !viewer.original || viewer.killed {
            continue;
        }
        let frames = window_frames.get(&viewer.layer);
        let expected = frames.map_or(0, BTreeSet::len);
        let on_time = frames.map_or(0, |f| f.intersection(&report.on_time).count());
        let latencies: Vec<f64> = report
            .completions
            .iter()
            .filter(|(seq, _)| frames.is_some_and(|f| f.contains(seq)))
            .map(|(_, ms)| *ms)
            .collect();
        let hops: Vec<u32> = frames
            .into_iter()
            .flatten()
            .filter_map(|&seq| hops_of(report.peer_id, (viewer.layer, seq)))
            .collect();
        if std::env::var_os("MESH_GAPS").is_some() && on_time < expected {
            print_gaps(index, report, frames.into_iter().flatten());
        }
        let played_bytes = window_bytes.get(&viewer.layer).copied().unwrap_or(0);
        let (s0, s1) = (&viewers0[index], &viewers1[index]);
        survivors.push(report::Survivor {
            frames_expected: expected as u64,
            frames_on_time: on_time as u64,
            frames_late: report.late,
            latencies_ms: latencies,
            hops,
            bytes_in: s1.bytes_in - s0.bytes_in,
            bytes_out: s1.bytes_out - s0.bytes_out,
            played_bytes,
        });
    }
    if std::env::var_os("MESH_STATS").is_some() {
        print_heaviest(&viewers, &viewers0, &viewers1, &window_bytes);
    }
    let joins_ms: Vec<Option<f64>> = reports
        .iter()
        .map(|r| {
            r.first_frame_at
                .map(|at| at.duration_since(r.joined_at).as_secs_f64() * 1000.0)
        })
        .collect();

    let mut health = report::Health::default();
    for s in viewer_totals.iter().chain([&publisher_total]) {
        health.events_dropped += s.events_dropped;
        health.publish_failures += s.publish_failures;
        health.publish_queue_full += s.publish_queue_full;
        health.slow_peer_reports += s.slow_peer_reports;
        health.messages_dropped_by_hook += s.messages_dropped_by_hook;
    }
    health.publisher_no_peers = publisher_total.publish_no_peers;
    health.viewers_connected_mean = viewer_totals
        .iter()
        .zip(&viewers)
        .filter(|(_, v)| !v.killed)
        .map(|(s, _)| s.connected_peers as f64)
        .sum::<f64>()
        / viewers.iter().filter(|v| !v.killed).count().max(1) as f64;
    health.publisher_connected = publisher_total.connected_peers as u64;

    Ok(report::reduce(
        &config,
        report::Raw {
            window,
            cpu: cpu1.saturating_sub(cpu0),
            stream_bytes,
            frames_published: in_window.len() as u64,
            publisher_bytes_out: pub1.bytes_out - pub0.bytes_out,
            publisher_bytes_in: pub1.bytes_in - pub0.bytes_in,
            survivors,
            joins_ms,
            churned,
            restarts,
            lossy_viewers: lossy.len(),
            health,
            elapsed: start.elapsed(),
        },
    ))
}

#[allow(clippy::too_many_arguments)]
async fn start_viewer(
    config: &RunConfig,
    index: usize,
    pub_addr: &Multiaddr,
    publisher_id: PeerId,
    running: &[ViewerHandle],
    loss: Option<InboundLoss>,
    rng: &mut StdRng,
) -> Result<ViewerHandle, String> {
    // A few random peers among the publisher and the viewers already up.
    let bootstrap = if config.mode == Mode::Unicast {
        vec![pub_addr.clone()]
    } else {
        let mut candidates: Vec<&Multiaddr> = running
            .iter()
            .filter(|v| !v.killed)
            .map(|v| &v.tcp_addr)
            .chain([pub_addr])
            .collect();
        candidates.shuffle(rng);
        candidates
            .into_iter()
            .take(config.bootstrap_peers)
            .cloned()
            .collect()
    };
    let mut node_config = node_config(config.mode, bootstrap, false);
    node_config.inbound_loss = loss;
    let (node, events, tcp_addr) = start_node(node_config).await?;
    let layer = config.played_layer(index);
    let channels: Vec<Channel> = match config.mode {
        // All layers on one topic: every viewer gets every layer.
        Mode::GossipsubDefault => (0..config.layers)
            .map(|layer| Channel::Media { track: 0, layer })
            .collect(),
        Mode::P2plive | Mode::P2pliveGossipsub | Mode::Unicast => {
            vec![Channel::Media { track: 0, layer }]
        }
    };
    let joined_at = Instant::now();
    node.join_stream(STREAM, Some(publisher_id), channels)
        .map_err(|err| format!("join: {err}"))?;
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(view(
        node.clone(),
        index as u64 + 1,
        layer,
        joined_at,
        events,
        stop_rx,
    ));
    Ok(ViewerHandle {
        node,
        layer,
        tcp_addr,
        stop,
        task,
        original: true,
        killed: false,
    })
}

/// Publishes the synthetic stream until told to stop; returns every frame published.
///
/// Viewers' keyframe requests are honoured as `p2plivesink` honours them: the publisher core
/// coalesces them (at most one per layer per `keyframe_request_interval`, 1 s), and the
/// next frame of that layer is a keyframe, from which the next GOP counts (as an encoder
/// forced to an IDR frame restarts its keyframe interval).
async fn publish(
    config: RunConfig,
    node: Node,
    mut events: mpsc::Receiver<Event>,
    mut stop: watch::Receiver<bool>,
    seed: u64,
) -> Vec<Published> {
    let mut rng = StdRng::seed_from_u64(seed);
    let frame_interval = Duration::from_secs_f64(1.0 / f64::from(config.fps));
    let gop_frames = (config.gop.as_secs_f64() * f64::from(config.fps))
        .round()
        .max(1.0) as u64;
    // Per GOP: one keyframe `ratio` times the mean delta frame, and gop_frames - 1 deltas.
    let delta_size = |layer: u32| -> f64 {
        let gop_bytes = config.layer_bitrate(layer) as f64 / 8.0 * config.gop.as_secs_f64();
        gop_bytes / (config.keyframe_ratio + gop_frames as f64 - 1.0)
    };
    let largest = (delta_size(config.layers - 1) * config.keyframe_ratio * 1.25) as usize + 1;
    let mut noise = vec![0u8; largest];
    rng.fill_bytes(&mut noise);
    let noise = Bytes::from(noise);

    let now = Instant::now();
    let mut publisher = Publisher::new(STREAM, rng.next_u64(), PublisherConfig::default());
    let layers = (0..config.layers)
        .map(|id| Layer {
            id,
            kind: if id == 0 {
                LayerKind::Base
            } else {
                LayerKind::Spatial
            } as i32,
            bitrate: config.layer_bitrate(id),
            framerate_num: config.fps,
            framerate_den: 1,
            ..Layer::default()
        })
        .collect();
    publisher.add_track(
        now,
        TrackKind::Video,
        "video/x-h264,stream-format=byte-stream,alignment=au".into(),
        layers,
    );
    let send = |publisher: &mut Publisher| {
        while let Some(transmit) = publisher.poll_transmit() {
            // A full queue is counted by the node (publish_queue_full).
            let _ = node.publish(STREAM, transmit.channel, transmit.payload);
        }
    };
    send(&mut publisher);

    let mut published = Vec::new();
    let mut ticker = tokio::time::interval(frame_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut frame: u64 = 0;
    // Per layer: the frame that is the next keyframe.
    let mut next_keyframe: Vec<u64> = vec![0; config.layers as usize];
    // Until the node stops (its event channel closes); publishing goes on until told to stop.
    let mut events_open = true;
    loop {
        let timer = publisher
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            _ = stop.changed() => break,
            () = tokio::time::sleep_until(timer.into()) => {
                publisher.handle_timeout(Instant::now());
                send(&mut publisher);
            }
            event = events.recv(), if events_open => match event {
                Some(Event::Message { message, source, .. }) => match message {
                    Message::KeyframeRequest(request) => {
                        publisher.handle_keyframe_request(Instant::now(), request);
                        while let Some((_, layer)) = publisher.poll_keyframe_request() {
                            if let Some(next) = next_keyframe.get_mut(layer as usize) {
                                *next = frame;
                            }
                        }
                    }
                    Message::Feedback(report) => {
                        publisher.handle_feedback(Instant::now(), &source.to_bytes(), report);
                    }
                    _ => {}
                },
                Some(_) => {}
                None => events_open = false,
            },
            _ = ticker.tick() => {
                let pts = frame_interval * frame as u32;
                for layer in 0..config.layers {
                    let keyframe = frame >= next_keyframe[layer as usize];
                    if keyframe {
                        next_keyframe[layer as usize] = frame + gop_frames;
                    }
                    let mean = delta_size(layer);
                    let size = if keyframe {
                        mean * config.keyframe_ratio
                    } else {
                        mean * rng.random_range(0.8..1.2)
                    }
                    .round()
                    .clamp(1.0, largest as f64) as usize;
                    let at = Instant::now();
                    let encoded = EncodedFrame {
                        pts: Some(pts),
                        dts: Some(pts),
                        duration: Some(frame_interval),
                        keyframe,
                        capture_unix_ns: wall_ns(),
                        publish_delay: Duration::ZERO,
                        data: noise.slice(..size),
                    };
                    match publisher.push_frame(at, 0, layer, encoded) {
                        Ok(sequence) => published.push(Published {
                            layer,
                            sequence,
                            at,
                            bytes: size as u64,
                        }),
                        Err(err) => tracing::warn!(%err, "frame not published"),
                    }
                    send(&mut publisher);
                }
                frame += 1;
            }
        }
    }
    published
}

/// A viewer: the node's events into the viewer core `p2plivesrc` runs (its `Subscriber`,
/// keyframe requests while it waits for a keyframe, a report each second), on `layer`
/// whatever the layer controller would choose, until told to stop.
async fn view(
    node: Node,
    viewer_id: u64,
    layer: u32,
    joined_at: Instant,
    mut events: mpsc::Receiver<Event>,
    mut stop: watch::Receiver<bool>,
) -> ViewerReport {
    let config = ViewerConfig {
        viewer_id,
        ..ViewerConfig::default()
    };
    let latency = config.subscriber.latency;
    let mut viewer = Viewer::new(config);
    let mut layer_fixed = false;
    let mut report = ViewerReport {
        peer_id: node.peer_id(),
        joined_at,
        first_frame_at: None,
        completions: Vec::new(),
        on_time: BTreeSet::new(),
        late: 0,
        first_copy_from: HashMap::new(),
    };
    // Fragments received per incomplete frame of the played layer: (received, count, capture).
    let mut pending: BTreeMap<u64, (u32, u32, Option<u64>)> = BTreeMap::new();
    let mut done_below: u64 = 0;

    loop {
        let timer = viewer
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            _ = stop.changed() => break,
            () = tokio::time::sleep_until(timer.into()) => {
                viewer.handle_timeout(Instant::now());
            }
            event = events.recv() => {
                let Some(event) = event else { break };
                let Event::Message { propagation_source, message, .. } = event else {
                    continue;
                };
                if let Message::Fragment(f) = &message {
                    if f.index == 0 {
                        report.first_copy_from.insert((f.layer, f.sequence), propagation_source);
                    }
                    if f.layer != layer {
                        // Another layer (all layers on one topic): relayed, not played.
                        continue;
                    }
                    if f.sequence >= done_below {
                        let entry = pending.entry(f.sequence).or_insert((0, f.count, None));
                        entry.0 += 1;
                        if let Some(header) = &f.header {
                            entry.2 = Some(header.capture_unix_ns);
                        }
                        if entry.0 >= entry.1
                            && let Some(capture) = entry.2
                        {
                            let ms = wall_ns().saturating_sub(capture) as f64 / 1e6;
                            report.completions.push((f.sequence, ms));
                            pending.remove(&f.sequence);
                        }
                        // Bounded: frames still incomplete 10 s of frames later are given up.
                        while pending.len() > 300 {
                            if let Some((&seq, _)) = pending.iter().next() {
                                pending.remove(&seq);
                                done_below = seq + 1;
                            }
                        }
                    }
                }
                viewer.handle_message(Instant::now(), message);
            }
        }
        let now = Instant::now();
        if !layer_fixed {
            layer_fixed = viewer.set_fixed_layer(now, 0, Some(layer));
        }
        // The bench subscribed the viewer's channels itself.
        while viewer.poll_channel_change().is_some() {}
        while viewer.poll_layer_change().is_some() {}
        while let Some(transmit) = viewer.poll_transmit() {
            // Best effort, as in p2plivesrc: a full queue drops a report.
            let _ = node.publish(STREAM, transmit.channel, transmit.payload);
        }
        while let Some(event) = viewer.poll_event() {
            if let SubscriberEvent::Frame(frame) = event {
                report.first_frame_at.get_or_insert(now);
                if now <= frame.pts + latency {
                    report.on_time.insert(frame.sequence);
                } else {
                    report.late += 1;
                }
            }
        }
    }
    report
}

/// `MESH_STATS=1`: data-plane counters summed over the viewers, before the window (the
/// trees forming) and in it, and each viewer's connection count at the end.
fn print_stats(before: &[NodeStatsSnapshot], after: &[NodeStatsSnapshot]) {
    let sums = |snaps: &[NodeStatsSnapshot]| {
        DataPlaneStats::summed_counters(snaps.iter().filter_map(|s| s.data_plane.as_ref()))
    };
    for ((name, b), (_, a)) in sums(before).into_iter().zip(sums(after)) {
        eprintln!("mesh: stats {name}: before window {b}, in window {}", a - b);
    }
    let peers: Vec<usize> = after.iter().map(|s| s.connected_peers).collect();
    eprintln!("mesh: connected peers per viewer {peers:?}");
}

/// `MESH_STATS=1`: the three surviving viewers with the largest download in the window, each
/// with its data-plane counters in the window (where a download above the median goes).
fn print_heaviest(
    viewers: &[ViewerHandle],
    before: &[NodeStatsSnapshot],
    after: &[NodeStatsSnapshot],
    window_bytes: &BTreeMap<u32, u64>,
) {
    let mut heavy: Vec<(f64, usize)> = viewers
        .iter()
        .enumerate()
        .filter(|(_, v)| v.original && !v.killed)
        .map(|(i, v)| {
            let played = window_bytes.get(&v.layer).copied().unwrap_or(0).max(1);
            (
                (after[i].bytes_in - before[i].bytes_in) as f64 / played as f64,
                i,
            )
        })
        .collect();
    heavy.sort_by(|a, b| b.0.total_cmp(&a.0));
    for &(down, i) in heavy.iter().take(3) {
        let (Some(b), Some(a)) = (&before[i].data_plane, &after[i].data_plane) else {
            continue;
        };
        let counters: Vec<String> = a
            .counters()
            .into_iter()
            .zip(b.counters())
            .filter(|((_, x), (_, y))| x > y)
            .map(|((name, x), (_, y))| format!("{name} {}", x - y))
            .collect();
        eprintln!(
            "mesh: viewer {i} download {down:.3}x, peers {}: {}",
            after[i].connected_peers,
            counters.join(" ")
        );
    }
}

/// `MESH_GAPS=1`: a viewer's frames of the window that were not played on time, as ranges of
/// sequence numbers, each with how many of them were complete (every fragment received) and
/// their latest completion (ms after capture). Tells a frame that never arrived from one the
/// playout dropped (a gap before it, waiting for a keyframe). A second line shows the 30
/// frames around the first range as `sequence:completion ms (-1: never):sender`, the sender
/// being the end of the peer id that delivered its first fragment first: a slow parent shows
/// as one sender, a slow process as all of them.
fn print_gaps<'a>(index: usize, report: &ViewerReport, window: impl Iterator<Item = &'a u64>) {
    let completed: HashMap<u64, f64> = report.completions.iter().copied().collect();
    let mut ranges: Vec<(u64, u64, usize, f64)> = Vec::new();
    for &seq in window {
        if report.on_time.contains(&seq) {
            continue;
        }
        let done = completed.get(&seq).copied();
        match ranges.last_mut() {
            Some(last) if last.1 + 1 == seq => {
                last.1 = seq;
                if let Some(ms) = done {
                    last.2 += 1;
                    last.3 = last.3.max(ms);
                }
            }
            _ => ranges.push((seq, seq, usize::from(done.is_some()), done.unwrap_or(0.0))),
        }
    }
    let text: Vec<String> = ranges
        .iter()
        .map(|(a, b, done, ms)| format!("{a}-{b} ({done} complete, latest {ms:.0} ms)"))
        .collect();
    eprintln!(
        "mesh: viewer {index} {}: missed {}",
        report.peer_id,
        text.join(", ")
    );
    if let Some(first) = ranges.first() {
        let from = |seq: u64| {
            report
                .first_copy_from
                .get(&(0, seq))
                // The last 6 characters of the sender's peer id.
                .map(|p| {
                    let id = p.to_string();
                    id[id.len().saturating_sub(6)..].to_string()
                })
        };
        let line: Vec<String> = (first.0.saturating_sub(20)..first.0 + 10)
            .map(|seq| {
                format!(
                    "{seq}:{:.0}:{}",
                    completed.get(&seq).copied().unwrap_or(-1.0),
                    from(seq).unwrap_or_default()
                )
            })
            .collect();
        eprintln!("   {}", line.join(" "));
    }
}
