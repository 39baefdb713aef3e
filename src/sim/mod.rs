//! `p2plive-sim`'s engine: the media data plane ([`crate::core::dataplane`]) of one
//! publisher and up to 10^5 viewers over a modelled network, on a virtual clock.
//!
//! There is no second implementation of the protocol: every viewer is a
//! [`DataPlane`](crate::core::dataplane::DataPlane), fed the messages, connections and
//! timers the node would feed it, and its messages are carried by the model. The only
//! difference from the node is [`DataPlaneConfig::insecure_simulated_auth`] (a cheap
//! stand-in for SHA-256 and ed25519, [`SimConfig::real_crypto`] turns it off).
//!
//! The model (see [`network`] and `docs/SIMULATOR.md`):
//! - a discrete-event loop in nanoseconds, one seeded generator ([`network::Rng`]): one seed
//!   and one configuration give one run;
//! - per peer an uplink (bytes ÷ rate, FIFO): the driver takes messages from the data plane
//!   only while the uplink holds less than [`UPLINK_BUFFER`], as the node hands them to a
//!   bounded writer, so the data plane's own queues and shedding act as in life;
//! - per peer a downlink (bytes ÷ rate) that drops past its buffer;
//! - per link a one-way delay from the peers' regions, access lines and path;
//! - loss per receiving line (independent or Gilbert-Elliott bursts), as message loss;
//! - joins (a ramp, then Poisson), abrupt leaves (Poisson): the departed peer's neighbours
//!   notice only after [`SimConfig::leave_detect`], as a transport idle timeout.
//!
//! [`flood`] is the baseline: a gossipsub-like flood (mesh of 6, every message to every mesh
//! peer) on the same network model.

pub mod flood;
pub mod network;
pub mod report;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use prost::Message as _;

use crate::core::dataplane::{
    DataPlane, DataPlaneConfig, DataPlaneStats, ObjectKey, Output, Role, body_kind,
};
use crate::proto::{Envelope, Fragment, envelope};
use flood::FloodNode;
use network::{Line, NetworkModel, Rng};
pub use report::{Dist, SimReport};

/// The driver takes messages from a data plane while its uplink holds less than this much
/// sending time (a socket buffer of a few tens of ms; the rest waits in the data plane's
/// per-peer queues, which shed as in the node).
pub const UPLINK_BUFFER: Duration = Duration::from_millis(20);
/// The node flushes queued messages this often when the upload pacing held them
/// (`MEDIA_FLUSH` in `node::event_loop`).
const PACING_FLUSH: Duration = Duration::from_millis(5);
/// Downlink queueing below this is not modelled as a separate event (the message is handed
/// over on arrival): it saves half the events at a cost of at most this much delay.
const DOWNLINK_EXACT_ABOVE_NS: u64 = 1_000_000;
/// Frames tracked per viewer for completeness (a frame older than this many frames is done).
const FRAME_RING: usize = 128;
/// The stream's name (its tag is in every message).
const STREAM: &str = "sim";
const EPOCH: u64 = 1;
/// A viewer that never got a frame is counted from this long after it joined.
const NO_FRAME_GRACE_NS: u64 = 5_000_000_000;
/// Recovery sampling period and give-up.
const RECOVERY_SAMPLE_NS: u64 = 50_000_000;
const RECOVERY_GIVE_UP_NS: u64 = 10_000_000_000;

/// Which data plane the viewers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `core::dataplane`: striped trees, FEC, pull repair.
    Trees,
    /// The gossipsub-like flood baseline ([`flood`]).
    Flood,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Trees => "p2plive",
            Mode::Flood => "flood",
        }
    }
}

/// One simulation run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub mode: Mode,
    /// Viewers present at once (the ramp brings them, churn replaces them).
    pub viewers: usize,
    /// Stream rate (bit/s) and frame rate: frames are the publisher's objects.
    pub bitrate_bps: u64,
    pub fps: u32,
    /// Keyframe period, and a keyframe's size over a delta frame's.
    pub gop: Duration,
    pub keyframe_ratio: f64,
    /// Largest object (bytes): frames are cut into fragments of at most this (the publisher's
    /// `max_fragment_size`, 16 000).
    pub max_object: usize,
    /// The viewers join at uniform random times over the ramp.
    pub ramp: Duration,
    /// Then the run settles this long before the window.
    pub warmup: Duration,
    /// The measured window.
    pub window: Duration,
    /// A frame counts as delivered if complete this long after publication.
    pub deadline: Duration,
    pub seed: u64,
    pub network: NetworkModel,
    /// Name of the network for the report (`residential`, `loopback`, or `custom`).
    pub network_name: String,
    /// Leaves per minute as a share of the audience (Poisson, after the ramp); each leave is
    /// matched by a join.
    pub churn_per_min: f64,
    /// Peers a joining viewer connects to (random present peers; the publisher only while
    /// fewer viewers are present).
    pub bootstrap: usize,
    /// How long a departed peer's neighbours take to notice (transport idle timeout).
    pub leave_detect: Duration,
    /// Viewers tell their data plane 90 % of their line's upload as `upload-capacity` (the
    /// publisher its whole line); off: unlimited, as a node with no property set.
    pub capacity_known: bool,
    /// Real SHA-256 and ed25519 instead of the simulator's stand-in (slow at scale).
    pub real_crypto: bool,
    /// The data plane's settings (defaults: the node's).
    pub dataplane: DataPlaneConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            mode: Mode::Trees,
            viewers: 1000,
            bitrate_bps: 2_000_000,
            fps: 30,
            gop: Duration::from_secs(2),
            keyframe_ratio: 6.0,
            max_object: 16_000,
            ramp: Duration::from_secs(5),
            warmup: Duration::from_secs(5),
            window: Duration::from_secs(30),
            deadline: Duration::from_secs(1),
            seed: 1,
            network: NetworkModel::residential(),
            network_name: "residential".into(),
            churn_per_min: 0.1,
            bootstrap: 4,
            leave_detect: Duration::from_secs(10),
            capacity_known: true,
            real_crypto: false,
            dataplane: DataPlaneConfig::default(),
        }
    }
}

/// Where a run is, for a progress line.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Virtual time (s) and the run's end.
    pub at_s: f64,
    pub end_s: f64,
    pub events: u64,
    pub present: usize,
}

enum Node {
    Gone,
    Trees(Box<DataPlane<u32>>),
    Flood(Box<FloodNode>),
}

struct Host {
    node: Node,
    line: Line,
    up_busy: u64,
    down_busy: u64,
    /// Gilbert-Elliott state of its downlink.
    lossy: bool,
    timer_at: u64,
    flush_at: u64,
    links: Vec<u32>,
    joined_at: u64,
    left_at: u64,
    first_delivery: u64,
    /// One-way propagation delay from the publisher (ms): the shortest-path bound.
    bound_ms: f64,
    /// In the window.
    up_bytes: u64,
    down_bytes: u64,
    media_up_bytes: u64,
    frames_ok: u32,
    delays_ms: Vec<f32>,
    /// Frame sequence and objects delivered in time, per slot.
    ring: Vec<(u64, u16)>,
}

/// One published frame.
struct Frame {
    at: u64,
    objects: u16,
}

#[derive(Debug)]
enum Kind {
    Publish,
    Join,
    ChurnJoin,
    ChurnLeave,
    Connected(u32, u32),
    Detect {
        at: u32,
        gone: u32,
    },
    Timer(u32),
    Flush(u32),
    Arrive {
        to: u32,
        from: u32,
        bytes: Bytes,
    },
    Deliver {
        to: u32,
        from: u32,
        bytes: Bytes,
    },
    FloodArrive {
        to: u32,
        from: u32,
        message: flood::Message,
    },
    FloodDeliver {
        to: u32,
        from: u32,
        message: flood::Message,
    },
    Heartbeat,
    Sample,
}

struct Event {
    at: u64,
    seq: u64,
    kind: Kind,
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Event {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct Sim<'a> {
    cfg: SimConfig,
    base: Instant,
    now: u64,
    seq: u64,
    heap: BinaryHeap<Reverse<Event>>,
    rng: Rng,
    hosts: Vec<Host>,
    alive: Vec<u32>,
    alive_pos: Vec<u32>,
    signing: SigningKey,
    frames: Vec<Frame>,
    /// Published objects kept for the delivery check (until they are older than the
    /// deadline plus the data plane's retention).
    objects: BTreeMap<(u64, u32), Bytes>,
    window: (u64, u64),
    end: u64,
    loss_chain: Option<(f64, f64)>,
    connecting: BTreeSet<(u32, u32)>,
    /// (viewer, stripe, departed parent, since).
    recoveries: Vec<(u32, u8, u32, u64)>,
    recovery_ms: Vec<f64>,
    recoveries_missed: usize,
    join_ms: Vec<f64>,
    flood_hops: Vec<f64>,
    all_delays: Vec<f64>,
    intact: u64,
    altered: u64,
    lost: u64,
    dropped_downlink: u64,
    /// `SIM_STATS`: bytes received in the window per message kind ([`body_kind`]).
    kind_bytes: Option<BTreeMap<&'static str, u64>>,
    dropped_uplink: u64,
    to_departed: u64,
    joins: u64,
    leaves: u64,
    events: u64,
    publisher_up_bytes: u64,
    media_bytes_sent: u64,
    bytes_sent: u64,
    pulls_sent_departed: u64,
    missed_departed: u64,
    progress: &'a mut dyn FnMut(&Progress),
}

/// Runs one simulation and reports its figures; `progress` is called once per simulated
/// second.
pub fn run(config: &SimConfig, progress: &mut dyn FnMut(&Progress)) -> SimReport {
    let mut sim = Sim::new(config.clone(), progress);
    sim.start();
    sim.run();
    sim.report()
}

impl<'a> Sim<'a> {
    fn new(cfg: SimConfig, progress: &'a mut dyn FnMut(&Progress)) -> Sim<'a> {
        let mut rng = Rng::new(cfg.seed);
        let window_start = (cfg.ramp + cfg.warmup).as_nanos() as u64;
        let window_end = window_start + cfg.window.as_nanos() as u64;
        let end = window_end + cfg.deadline.as_nanos() as u64 + 500_000_000;
        let publisher_line = cfg.network.publisher_line(&mut rng);
        let loss_chain = cfg.network.loss_chain();
        let mut sim = Sim {
            base: Instant::now(),
            now: 0,
            seq: 0,
            heap: BinaryHeap::new(),
            rng,
            hosts: Vec::with_capacity(cfg.viewers + 1),
            alive: Vec::new(),
            alive_pos: Vec::new(),
            signing: SigningKey::from_bytes(&[42u8; 32]),
            frames: Vec::new(),
            objects: BTreeMap::new(),
            window: (window_start, window_end),
            end,
            loss_chain,
            connecting: BTreeSet::new(),
            recoveries: Vec::new(),
            recovery_ms: Vec::new(),
            recoveries_missed: 0,
            join_ms: Vec::new(),
            flood_hops: Vec::new(),
            all_delays: Vec::new(),
            intact: 0,
            altered: 0,
            lost: 0,
            dropped_downlink: 0,
            kind_bytes: std::env::var_os("SIM_STATS").map(|_| BTreeMap::new()),
            dropped_uplink: 0,
            to_departed: 0,
            joins: 0,
            leaves: 0,
            events: 0,
            publisher_up_bytes: 0,
            media_bytes_sent: 0,
            bytes_sent: 0,
            pulls_sent_departed: 0,
            missed_departed: 0,
            progress,
            cfg,
        };
        let node = match sim.cfg.mode {
            Mode::Trees => {
                let mut config = sim.plane_config(0, &publisher_line);
                config.upload_capacity_kbps = sim
                    .cfg
                    .capacity_known
                    .then_some(publisher_line.capacity_kbps);
                Node::Trees(Box::new(DataPlane::new(
                    sim.base,
                    STREAM,
                    0,
                    Role::Publisher {
                        key: sim.signing.clone(),
                    },
                    config,
                )))
            }
            Mode::Flood => Node::Flood(Box::new(FloodNode::new(0))),
        };
        sim.add_host(node, publisher_line);
        sim
    }

    fn plane_config(&self, id: u32, line: &Line) -> DataPlaneConfig {
        DataPlaneConfig {
            seed: self.cfg.seed ^ u64::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            upload_capacity_kbps: self
                .cfg
                .capacity_known
                .then_some(line.capacity_kbps * 9 / 10),
            insecure_simulated_auth: !self.cfg.real_crypto,
            ..self.cfg.dataplane.clone()
        }
    }

    fn add_host(&mut self, node: Node, line: Line) -> u32 {
        let id = self.hosts.len() as u32;
        let bound_ms = match self.hosts.first() {
            Some(publisher) => {
                self.cfg
                    .network
                    .propagation_ms(&publisher.line, &line, pair_hash(0, id))
            }
            None => 0.0,
        };
        self.hosts.push(Host {
            node,
            line,
            up_busy: 0,
            down_busy: 0,
            lossy: false,
            timer_at: u64::MAX,
            flush_at: u64::MAX,
            links: Vec::new(),
            joined_at: self.now,
            left_at: u64::MAX,
            first_delivery: u64::MAX,
            bound_ms,
            up_bytes: 0,
            down_bytes: 0,
            media_up_bytes: 0,
            frames_ok: 0,
            delays_ms: Vec::new(),
            ring: Vec::new(),
        });
        self.alive_pos.push(u32::MAX);
        id
    }

    fn push(&mut self, at: u64, kind: Kind) {
        self.seq += 1;
        self.heap.push(Reverse(Event {
            at: at.max(self.now),
            seq: self.seq,
            kind,
        }));
    }

    fn instant(&self, at: u64) -> Instant {
        self.base + Duration::from_nanos(at)
    }

    fn start(&mut self) {
        self.push(0, Kind::Publish);
        let ramp = self.cfg.ramp.as_nanos() as u64;
        for _ in 0..self.cfg.viewers {
            let at = (self.rng.unit() * ramp as f64) as u64;
            self.push(at, Kind::Join);
        }
        if self.cfg.churn_per_min > 0.0 {
            self.schedule_churn(ramp, true);
            self.schedule_churn(ramp, false);
        }
        if self.cfg.mode == Mode::Flood {
            self.push(1_000_000_000, Kind::Heartbeat);
        }
        self.push(RECOVERY_SAMPLE_NS, Kind::Sample);
    }

    fn schedule_churn(&mut self, from: u64, join: bool) {
        let rate_per_s = self.cfg.churn_per_min * self.cfg.viewers as f64 / 60.0;
        if rate_per_s <= 0.0 {
            return;
        }
        let gap = self.rng.exponential(1.0 / rate_per_s);
        let at = from + (gap * 1e9) as u64;
        self.push(
            at,
            if join {
                Kind::ChurnJoin
            } else {
                Kind::ChurnLeave
            },
        );
    }

    fn run(&mut self) {
        let mut next_progress = 0u64;
        while let Some(Reverse(event)) = self.heap.pop() {
            if event.at > self.end {
                break;
            }
            self.now = event.at;
            self.events += 1;
            if self.now >= next_progress {
                next_progress = self.now + 1_000_000_000;
                (self.progress)(&Progress {
                    at_s: self.now as f64 / 1e9,
                    end_s: self.end as f64 / 1e9,
                    events: self.events,
                    present: self.alive.len(),
                });
            }
            match event.kind {
                Kind::Publish => self.publish(),
                Kind::Join => self.join(),
                Kind::ChurnJoin => {
                    self.join();
                    self.schedule_churn(self.now, true);
                }
                Kind::ChurnLeave => {
                    if !self.alive.is_empty() {
                        let victim = self.alive[self.rng.below(self.alive.len())];
                        self.leave(victim);
                    }
                    self.schedule_churn(self.now, false);
                }
                Kind::Connected(a, b) => self.connected(a, b),
                Kind::Detect { at, gone } => self.detect(at, gone),
                Kind::Timer(id) => self.timer(id),
                Kind::Flush(id) => {
                    let host = &mut self.hosts[id as usize];
                    if host.flush_at == self.now {
                        host.flush_at = u64::MAX;
                    }
                    self.drive(id);
                }
                Kind::Arrive { to, from, bytes } => self.arrive(to, from, bytes),
                Kind::Deliver { to, from, bytes } => self.deliver_message(to, from, bytes),
                Kind::FloodArrive { to, from, message } => self.flood_arrive(to, from, message),
                Kind::FloodDeliver { to, from, message } => self.flood_receive(to, from, message),
                Kind::Heartbeat => self.heartbeat(),
                Kind::Sample => self.sample(),
            }
        }
    }

    // ---- the stream -----------------------------------------------------------------------

    fn publish(&mut self) {
        let sequence = self.frames.len() as u64;
        let gop_frames = (self.cfg.gop.as_secs_f64() * f64::from(self.cfg.fps))
            .round()
            .max(1.0) as u64;
        let per_gop = self.cfg.bitrate_bps as f64 / 8.0 * self.cfg.gop.as_secs_f64();
        let delta = per_gop / (gop_frames as f64 - 1.0 + self.cfg.keyframe_ratio);
        let size = if sequence.is_multiple_of(gop_frames) {
            delta * self.cfg.keyframe_ratio
        } else {
            delta
        }
        .round()
        .max(16.0) as usize;
        let max = self.cfg.max_object.max(64);
        let count = size.div_ceil(max) as u32;
        for index in 0..count {
            let start = index as usize * max;
            let len = (size - start).min(max);
            let payload: Vec<u8> = (0..len)
                .map(|i| (sequence as usize * 131 + i * 7 + index as usize) as u8)
                .collect();
            let object: Bytes = Envelope {
                body: Some(envelope::Body::Fragment(Fragment {
                    epoch: EPOCH,
                    track: 0,
                    layer: 0,
                    sequence,
                    index,
                    count,
                    header: None,
                    payload: payload.into(),
                })),
            }
            .encode_to_vec()
            .into();
            let key = ObjectKey {
                track: 0,
                layer: 0,
                sequence,
                fragment: index,
            };
            let now = self.instant(self.now);
            match &mut self.hosts[0].node {
                Node::Trees(plane) => {
                    self.objects.insert((sequence, index), object.clone());
                    plane.publish(now, EPOCH, key, object);
                }
                Node::Flood(node) => {
                    let message = flood::Message {
                        sequence,
                        fragment: index,
                        len: object.len() as u32 + flood::OVERHEAD,
                        hops: 0,
                    };
                    node.seen(sequence, index);
                    let targets = node.mesh.clone();
                    for to in targets {
                        self.flood_send(0, to, message.clone());
                    }
                }
                Node::Gone => {}
            }
        }
        self.frames.push(Frame {
            at: self.now,
            objects: count as u16,
        });
        // Published objects are checked against deliveries for a while.
        let keep_ns = (self.cfg.dataplane.retain + self.cfg.deadline).as_nanos() as u64;
        let horizon = self.now.saturating_sub(keep_ns);
        while let Some((&(seq, _), _)) = self.objects.first_key_value() {
            if self.frames[seq as usize].at < horizon {
                self.objects.pop_first();
            } else {
                break;
            }
        }
        self.drive(0);
        let interval = 1_000_000_000 / u64::from(self.cfg.fps.max(1));
        if self.now + interval <= self.end {
            self.push(self.now + interval, Kind::Publish);
        }
    }

    // ---- membership -----------------------------------------------------------------------

    fn join(&mut self) {
        let line = self.cfg.network.draw_line(&mut self.rng);
        let id = self.hosts.len() as u32;
        let node = match self.cfg.mode {
            Mode::Trees => {
                let config = self.plane_config(id, &line);
                let mut plane = DataPlane::new(
                    self.instant(self.now),
                    STREAM,
                    id,
                    Role::Viewer {
                        publisher: 0,
                        key: self.signing.verifying_key(),
                    },
                    config,
                );
                plane.set_subscription(self.instant(self.now), BTreeSet::from([(0, 0)]));
                Node::Trees(Box::new(plane))
            }
            Mode::Flood => Node::Flood(Box::new(FloodNode::new(id))),
        };
        let id = self.add_host(node, line);
        self.joins += 1;
        // Bootstrap: random present viewers, the publisher while there are too few.
        let want = if self.cfg.mode == Mode::Flood {
            flood::MESH
        } else {
            self.cfg.bootstrap.max(1)
        };
        let mut picks = BTreeSet::new();
        if self.alive.len() < want {
            picks.insert(0u32);
        }
        let mut tries = 0;
        while picks.len() < want.min(self.alive.len() + 1) && tries < want * 4 {
            tries += 1;
            let pick = self.alive[self.rng.below(self.alive.len())];
            picks.insert(pick);
        }
        self.alive_pos[id as usize] = self.alive.len() as u32;
        self.alive.push(id);
        for peer in picks {
            self.dial(id, peer);
        }
        self.schedule_timer(id);
    }

    fn leave(&mut self, id: u32) {
        let host = &mut self.hosts[id as usize];
        if matches!(host.node, Node::Gone) || id == 0 {
            return;
        }
        if let Node::Trees(plane) = &host.node {
            let stats = plane.stats();
            self.pulls_sent_departed += stats.pulls_sent;
            self.missed_departed += stats.objects_missed;
        }
        host.node = Node::Gone;
        host.left_at = self.now;
        host.ring = Vec::new();
        self.leaves += 1;
        let pos = self.alive_pos[id as usize] as usize;
        self.alive.swap_remove(pos);
        if let Some(&moved) = self.alive.get(pos) {
            self.alive_pos[moved as usize] = pos as u32;
        }
        self.alive_pos[id as usize] = u32::MAX;
        let links = std::mem::take(&mut self.hosts[id as usize].links);
        let detect = self.now + self.cfg.leave_detect.as_nanos() as u64;
        for peer in links {
            // Its children start counting from now: how long until each has a new parent.
            if let Node::Trees(plane) = &self.hosts[peer as usize].node {
                for s in 0..plane.config().stripes {
                    if plane.parent(s) == Some(id) {
                        self.recoveries.push((peer, s, id, self.now));
                    }
                }
            }
            self.push(detect, Kind::Detect { at: peer, gone: id });
        }
    }

    fn detect(&mut self, at: u32, gone: u32) {
        let now = self.instant(self.now);
        let host = &mut self.hosts[at as usize];
        host.links.retain(|&p| p != gone);
        match &mut host.node {
            Node::Trees(plane) => plane.handle_peer_down(now, gone),
            Node::Flood(node) => node.mesh.retain(|&p| p != gone),
            Node::Gone => return,
        }
        self.drive(at);
    }

    /// Starts a connection from `a` to `b`: up one round trip later (a QUIC handshake).
    fn dial(&mut self, a: u32, b: u32) {
        if a == b || self.hosts[a as usize].links.contains(&b) {
            return;
        }
        if !self.connecting.insert((a.min(b), a.max(b))) {
            return;
        }
        let rtt = 2.0 * self.propagation_ms(a, b);
        self.push(self.now + (rtt * 1e6) as u64, Kind::Connected(a, b));
    }

    fn connected(&mut self, a: u32, b: u32) {
        self.connecting.remove(&(a.min(b), a.max(b)));
        let gone = |h: &Host| matches!(h.node, Node::Gone);
        if gone(&self.hosts[a as usize]) || gone(&self.hosts[b as usize]) {
            return;
        }
        if self.hosts[a as usize].links.contains(&b) {
            return;
        }
        self.hosts[a as usize].links.push(b);
        self.hosts[b as usize].links.push(a);
        let now = self.instant(self.now);
        for (x, y) in [(a, b), (b, a)] {
            match &mut self.hosts[x as usize].node {
                Node::Trees(plane) => plane.handle_peer_up(now, y, Bytes::new()),
                Node::Flood(node) => {
                    if !node.mesh.contains(&y) {
                        node.mesh.push(y);
                    }
                }
                Node::Gone => {}
            }
        }
        self.drive(a);
        self.drive(b);
    }

    fn disconnect(&mut self, a: u32, b: u32) {
        self.hosts[a as usize].links.retain(|&p| p != b);
        self.hosts[b as usize].links.retain(|&p| p != a);
        let now = self.instant(self.now);
        for (x, y) in [(a, b), (b, a)] {
            if let Node::Trees(plane) = &mut self.hosts[x as usize].node {
                plane.handle_peer_down(now, y);
            }
        }
        self.drive(b);
    }

    fn propagation_ms(&self, a: u32, b: u32) -> f64 {
        self.cfg.network.propagation_ms(
            &self.hosts[a as usize].line,
            &self.hosts[b as usize].line,
            pair_hash(a, b),
        )
    }

    // ---- the data plane ---------------------------------------------------------------------

    fn timer(&mut self, id: u32) {
        let now = self.instant(self.now);
        let host = &mut self.hosts[id as usize];
        if host.timer_at != self.now {
            return;
        }
        host.timer_at = u64::MAX;
        if let Node::Trees(plane) = &mut host.node
            && plane.poll_timeout() <= now
        {
            plane.handle_timeout(now);
        }
        self.drive(id);
    }

    fn schedule_timer(&mut self, id: u32) {
        let host = &self.hosts[id as usize];
        let Node::Trees(plane) = &host.node else {
            return;
        };
        let at = (plane
            .poll_timeout()
            .saturating_duration_since(self.base)
            .as_nanos() as u64)
            .max(self.now);
        if at < host.timer_at {
            self.hosts[id as usize].timer_at = at;
            self.push(at, Kind::Timer(id));
        }
    }

    /// After anything happened at `id`: acts on its outputs, sends what its uplink takes,
    /// and sets its next timer.
    fn drive(&mut self, id: u32) {
        let mut outputs = Vec::new();
        if let Node::Trees(plane) = &mut self.hosts[id as usize].node {
            while let Some(output) = plane.poll_output() {
                outputs.push(output);
            }
        }
        for output in outputs {
            match output {
                Output::Deliver { key, object, .. } => self.delivered(id, key, &object),
                Output::Connect { peer, .. } => {
                    if !matches!(self.hosts[peer as usize].node, Node::Gone) {
                        self.dial(id, peer);
                    }
                }
                Output::Disconnect { peer, .. } => self.disconnect(id, peer),
                Output::Audience(_) | Output::KeyframeRequest { .. } => {}
            }
        }
        self.flush(id);
        self.schedule_timer(id);
    }

    /// Hands queued messages to the uplink while it has room (one per peer per round).
    fn flush(&mut self, id: u32) {
        let limit = self.now + UPLINK_BUFFER.as_nanos() as u64;
        let now = self.instant(self.now);
        let mut sends: Vec<(u32, Bytes)> = Vec::new();
        let host = &mut self.hosts[id as usize];
        let Node::Trees(plane) = &mut host.node else {
            return;
        };
        if !plane.has_queued() {
            return;
        }
        let bps = host.line.up_bps;
        let mut busy = host.up_busy.max(self.now);
        while busy < limit {
            let Some((peer, bytes)) = plane.poll_transmit_next(now) else {
                break;
            };
            busy += serialisation_ns(bytes.len(), bps);
            sends.push((peer, bytes));
        }
        let queued = plane.has_queued();
        for (peer, bytes) in sends {
            self.send(id, peer, bytes);
        }
        if queued {
            let host = &self.hosts[id as usize];
            // The uplink is full: come back when half of it went out; else the pacing held it.
            let at = if host.up_busy >= limit {
                host.up_busy - UPLINK_BUFFER.as_nanos() as u64 / 2
            } else {
                self.now + PACING_FLUSH.as_nanos() as u64
            };
            if at < host.flush_at {
                self.hosts[id as usize].flush_at = at;
                self.push(at, Kind::Flush(id));
            }
        }
    }

    fn in_window(&self) -> bool {
        self.now >= self.window.0 && self.now < self.window.1
    }

    fn send(&mut self, from: u32, to: u32, bytes: Bytes) {
        let media = is_media(&bytes);
        if let Some(arrive) = self.uplink(from, to, wire_len(bytes.len()), media, None) {
            self.push(arrive, Kind::Arrive { to, from, bytes });
        }
    }

    /// Puts `len` bytes on `from`'s uplink towards `to` and counts them: when they reach
    /// `to`'s line, or `None` if the loss model took them or they would wait in the uplink
    /// longer than `max_wait_ns` (the flood's forward timeout).
    fn uplink(
        &mut self,
        from: u32,
        to: u32,
        len: usize,
        media: bool,
        max_wait_ns: Option<u64>,
    ) -> Option<u64> {
        let in_window = self.in_window();
        let host = &mut self.hosts[from as usize];
        let start = host.up_busy.max(self.now);
        if max_wait_ns.is_some_and(|wait| start > self.now + wait) {
            self.dropped_uplink += 1;
            return None;
        }
        let done = start + serialisation_ns(len, host.line.up_bps);
        host.up_busy = done;
        if in_window {
            host.up_bytes += len as u64;
            self.bytes_sent += len as u64;
            if media {
                host.media_up_bytes += len as u64;
                self.media_bytes_sent += len as u64;
            }
            if from == 0 {
                self.publisher_up_bytes += len as u64;
            }
        }
        let arrive = done + (self.propagation_ms(from, to) * 1e6) as u64;
        if self.lose(to) {
            self.lost += 1;
            return None;
        }
        Some(arrive)
    }

    /// The loss model, one step of the receiver's line.
    fn lose(&mut self, to: u32) -> bool {
        let Some((p, r)) = self.loss_chain else {
            return false;
        };
        let u = self.rng.unit();
        let host = &mut self.hosts[to as usize];
        host.lossy = if host.lossy { u >= r } else { u < p };
        host.lossy
    }

    fn arrive(&mut self, to: u32, from: u32, bytes: Bytes) {
        let Some(done) = self.downlink(to, wire_len(bytes.len())) else {
            return;
        };
        if self.in_window()
            && let Some(kinds) = self.kind_bytes.as_mut()
        {
            let kind = crate::proto::DpMessage::decode(bytes.clone())
                .ok()
                .and_then(|m| m.body)
                .map_or("undecodable", |body| body_kind(&body));
            *kinds.entry(kind).or_default() += wire_len(bytes.len()) as u64;
        }
        if done > self.now + DOWNLINK_EXACT_ABOVE_NS {
            self.push(done, Kind::Deliver { to, from, bytes });
        } else {
            self.deliver_message(to, from, bytes);
        }
    }

    /// Queues `len` bytes on `to`'s downlink: when they are through, or `None` if the peer
    /// left or its buffer is full.
    fn downlink(&mut self, to: u32, len: usize) -> Option<u64> {
        let in_window = self.in_window();
        let buffer_ns = (self.cfg.network.downlink_buffer_ms * 1e6) as u64;
        let host = &mut self.hosts[to as usize];
        if matches!(host.node, Node::Gone) {
            self.to_departed += 1;
            return None;
        }
        let start = host.down_busy.max(self.now);
        if start > self.now + buffer_ns {
            self.dropped_downlink += 1;
            return None;
        }
        let done = start + serialisation_ns(len, host.line.down_bps);
        host.down_busy = done;
        if in_window {
            host.down_bytes += len as u64;
        }
        Some(done)
    }

    fn deliver_message(&mut self, to: u32, from: u32, bytes: Bytes) {
        let now = self.instant(self.now);
        let host = &mut self.hosts[to as usize];
        if !host.links.contains(&from) {
            return;
        }
        let Node::Trees(plane) = &mut host.node else {
            return;
        };
        plane.handle_message(now, from, bytes);
        self.drive(to);
    }

    /// A viewer got a whole object.
    fn delivered(&mut self, id: u32, key: ObjectKey, object: &Bytes) {
        match self.objects.get(&(key.sequence, key.fragment)) {
            Some(published) if published == object => self.intact += 1,
            Some(_) => self.altered += 1,
            None => {}
        }
        self.count_delivery(id, key.sequence, None);
    }

    fn count_delivery(&mut self, id: u32, sequence: u64, hops: Option<u8>) {
        let Some(frame) = self.frames.get(sequence as usize) else {
            return;
        };
        let (published, objects) = (frame.at, frame.objects);
        let delay = self.now.saturating_sub(published);
        let in_window = published >= self.window.0 && published < self.window.1;
        let deadline = self.cfg.deadline.as_nanos() as u64;
        let host = &mut self.hosts[id as usize];
        if host.first_delivery == u64::MAX {
            host.first_delivery = self.now;
            self.join_ms.push((self.now - host.joined_at) as f64 / 1e6);
        }
        if !in_window {
            return;
        }
        let ms = delay as f64 / 1e6;
        self.all_delays.push(ms);
        host.delays_ms.push(ms as f32);
        if let Some(h) = hops {
            self.flood_hops.push(f64::from(h));
        }
        if delay > deadline || published < host.first_delivery {
            return;
        }
        if host.ring.is_empty() {
            host.ring = vec![(u64::MAX, 0); FRAME_RING];
        }
        let slot = &mut host.ring[sequence as usize % FRAME_RING];
        if slot.0 != sequence {
            *slot = (sequence, 0);
        }
        slot.1 += 1;
        if slot.1 == objects {
            host.frames_ok += 1;
        }
    }

    // ---- the flood baseline -------------------------------------------------------------------

    fn flood_send(&mut self, from: u32, to: u32, message: flood::Message) {
        // gossipsub drops a forward queued longer than its `forward_queue_duration` (1 s);
        // the publisher's own messages wait.
        let max_wait = (from != 0).then_some(flood::FORWARD_QUEUE_NS);
        if let Some(arrive) = self.uplink(from, to, message.len as usize, true, max_wait) {
            self.push(arrive, Kind::FloodArrive { to, from, message });
        }
    }

    fn flood_arrive(&mut self, to: u32, from: u32, message: flood::Message) {
        let Some(done) = self.downlink(to, message.len as usize) else {
            return;
        };
        if done > self.now + DOWNLINK_EXACT_ABOVE_NS {
            self.push(done, Kind::FloodDeliver { to, from, message });
        } else {
            self.flood_receive(to, from, message);
        }
    }

    fn flood_receive(&mut self, to: u32, from: u32, message: flood::Message) {
        let host = &mut self.hosts[to as usize];
        if !host.links.contains(&from) {
            return;
        }
        let Node::Flood(node) = &mut host.node else {
            return;
        };
        if !node.seen(message.sequence, message.fragment) {
            return;
        }
        let targets: Vec<u32> = node.mesh.iter().copied().filter(|&p| p != from).collect();
        let forwarded = flood::Message {
            hops: message.hops.saturating_add(1),
            ..message.clone()
        };
        self.count_delivery(to, message.sequence, Some(forwarded.hops));
        for peer in targets {
            self.flood_send(to, peer, forwarded.clone());
        }
    }

    /// gossipsub's heartbeat (1 s): a mesh below 4 grows back to 6, above 12 is pruned to 6.
    fn heartbeat(&mut self) {
        let ids = self.alive.clone();
        for id in ids.into_iter().chain([0]) {
            let Node::Flood(node) = &self.hosts[id as usize].node else {
                continue;
            };
            let degree = node.mesh.len();
            if degree < flood::MESH_LOW {
                for _ in degree..flood::MESH {
                    if self.alive.is_empty() {
                        break;
                    }
                    let pick = self.alive[self.rng.below(self.alive.len())];
                    self.dial(id, pick);
                }
            } else if degree > flood::MESH_HIGH {
                let mut mesh = node.mesh.clone();
                while mesh.len() > flood::MESH {
                    let drop = mesh.remove(self.rng.below(mesh.len()));
                    // A prune leaves the connection, not the mesh of the other side.
                    if let Node::Flood(node) = &mut self.hosts[id as usize].node {
                        node.mesh.retain(|&p| p != drop);
                    }
                }
            }
        }
        self.push(self.now + 1_000_000_000, Kind::Heartbeat);
    }

    // ---- sampling and the report --------------------------------------------------------------

    fn sample(&mut self) {
        let now = self.now;
        let mut open = Vec::new();
        for (viewer, stripe, gone, since) in std::mem::take(&mut self.recoveries) {
            let Node::Trees(plane) = &self.hosts[viewer as usize].node else {
                continue;
            };
            match plane.parent(stripe) {
                Some(parent) if parent != gone => {
                    self.recovery_ms.push((now - since) as f64 / 1e6);
                }
                _ if now - since > RECOVERY_GIVE_UP_NS => self.recoveries_missed += 1,
                _ => open.push((viewer, stripe, gone, since)),
            }
        }
        self.recoveries = open;
        self.push(now + RECOVERY_SAMPLE_NS, Kind::Sample);
    }

    /// `SIM_TREES=1`: the shape of the stripe trees at the end, on stderr: hops from the
    /// publisher over all (viewer, stripe) pairs, the forwarders by kind (interior stripe or
    /// spare capacity) with their children and room, and the deepest path with each hop's
    /// interior stripe, children, and capacity.
    fn print_trees(&self) {
        let planes: BTreeMap<u64, (usize, &DataPlane<u32>)> = self
            .hosts
            .iter()
            .enumerate()
            .filter_map(|(i, h)| match &h.node {
                Node::Trees(plane) => Some((plane.short_id(), (i, plane.as_ref()))),
                _ => None,
            })
            .collect();
        let Node::Trees(publisher_plane) = &self.hosts[0].node else {
            return;
        };
        let stripes = publisher_plane.config().stripes;
        let mut hops: BTreeMap<usize, usize> = BTreeMap::new();
        let mut detached = 0usize;
        // (interior forwarders, their children, their max, idle interior ones, spare
        // forwarders, their children, one-child forwarders)
        let mut f = [0usize; 7];
        let mut deepest: Option<(usize, u8, Vec<u64>)> = None;
        for (i, plane) in planes.values().filter(|(i, _)| *i > 0) {
            let interior_stripe = plane.stats().interior_stripe;
            for s in 0..stripes {
                let path = plane.path(s);
                if path.is_empty() {
                    detached += 1;
                } else {
                    *hops.entry(path.len() - 1).or_default() += 1;
                    if deepest.as_ref().is_none_or(|d| d.2.len() < path.len()) {
                        deepest = Some((*i, s, path.to_vec()));
                    }
                }
                let children = plane.children(s).count();
                if interior_stripe == Some(s) {
                    f[0] += 1;
                    f[1] += children;
                    f[2] += plane.max_children();
                    f[3] += usize::from(children == 0);
                } else if children > 0 {
                    f[4] += 1;
                    f[5] += children;
                }
                f[6] += usize::from(children == 1);
            }
        }
        let root: Vec<usize> = (0..stripes)
            .map(|s| publisher_plane.children(s).count())
            .collect();
        eprintln!("trees: publisher children per stripe {root:?}");
        eprintln!("trees: hops histogram {hops:?}, detached {detached}");
        eprintln!(
            "trees: interior forwarders {} with {} children (max {}), idle {}; spare forwarders {} with {} children; one-child forwarders {}",
            f[0], f[1], f[2], f[3], f[4], f[5], f[6]
        );
        if let Some((_, s, path)) = deepest {
            eprintln!("trees: deepest path, stripe {s}:");
            for short in path.iter().skip(1) {
                if let Some((i, plane)) = planes.get(short) {
                    let st = plane.stats();
                    eprintln!(
                        "  host {i}: interior {:?} children here {} total {} max {} capacity {} kbit/s joins {} redirects {} parent changes {}",
                        st.interior_stripe,
                        plane.children(s).count(),
                        st.children,
                        plane.max_children(),
                        self.hosts[*i].line.capacity_kbps,
                        st.joins_sent,
                        st.redirects_received,
                        st.parent_changes
                    );
                }
            }
        }
    }

    /// `SIM_STATS=1`: the data-plane counters ([`DataPlaneStats::counters`]) of the
    /// publisher, and summed over the viewers present at the end, over the whole run (not
    /// only the window), with the mean waits in the send queues and for manifests; on stderr.
    fn print_stats(&self) {
        let stats: Vec<(bool, DataPlaneStats)> = self
            .hosts
            .iter()
            .enumerate()
            .filter_map(|(i, h)| match &h.node {
                Node::Trees(plane) => Some((i == 0, plane.stats())),
                _ => None,
            })
            .collect();
        for (name, publisher) in [("publisher", true), ("viewers", false)] {
            let of: Vec<&DataPlaneStats> = stats
                .iter()
                .filter(|(p, _)| *p == publisher)
                .map(|(_, s)| s)
                .collect();
            let mut line = format!("p2plive-sim: {name} ({}):", of.len());
            for (field, value) in DataPlaneStats::summed_counters(of.iter().copied()) {
                line += &format!(" {field} {value}");
            }
            let sum = |get: fn(&DataPlaneStats) -> u64| of.iter().map(|s| get(s)).sum::<u64>();
            let mean_ms = |total_us: u64, count: u64| total_us as f64 / count.max(1) as f64 / 1e3;
            line += &format!(
                "; mean queue wait {:.1} ms (max {:.1} ms), mean manifest wait {:.1} ms",
                mean_ms(sum(|s| s.media_queue_wait_us), sum(|s| s.media_dequeued)),
                of.iter()
                    .map(|s| s.media_queue_wait_max_us)
                    .max()
                    .unwrap_or(0) as f64
                    / 1e3,
                mean_ms(sum(|s| s.manifest_wait_us), sum(|s| s.manifest_waits)),
            );
            eprintln!("{line}");
        }
        // The loss the publisher's parity is sized for, against what viewers measure.
        let mut loss: Vec<u32> = stats
            .iter()
            .filter(|(p, _)| !p)
            .map(|(_, s)| s.shard_loss_permille)
            .collect();
        loss.sort_unstable();
        let at = |q: f64| {
            loss.get(((loss.len() as f64 * q) as usize).min(loss.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        eprintln!(
            "p2plive-sim: parity sized for {} ‰ shard loss; viewers' last shard loss p50 {} ‰, p90 {} ‰, max {} ‰",
            stats
                .iter()
                .find(|(p, _)| *p)
                .map_or(0, |(_, s)| s.parity_loss_permille),
            at(0.5),
            at(0.9),
            loss.last().copied().unwrap_or(0)
        );
        if let Some(kinds) = &self.kind_bytes {
            let total = kinds.values().sum::<u64>().max(1) as f64;
            let mut line = "p2plive-sim: viewers' download by kind:".to_owned();
            for (name, bytes) in kinds {
                line += &format!(" {name} {:.1} %", *bytes as f64 * 100.0 / total);
            }
            eprintln!("{line}");
        }
    }

    fn report(mut self) -> SimReport {
        let (ws, we) = self.window;
        let deadline = self.cfg.deadline.as_nanos() as u64;
        let window_frames: Vec<&Frame> = self
            .frames
            .iter()
            .filter(|f| f.at >= ws && f.at < we)
            .collect();
        let published_bytes = self.cfg.bitrate_bps as f64 / 8.0 * self.cfg.window.as_secs_f64();
        let mut delivery = Vec::new();
        let (mut ok_all, mut expected_all) = (0u64, 0u64);
        let mut down_x = Vec::new();
        let mut up_x = Vec::new();
        let mut ratio = Vec::new();
        let mut hops = Vec::new();
        let mut by_class: BTreeMap<u8, (f64, usize)> = BTreeMap::new();
        let mut max_over_capacity: f64 = 0.0;
        let mut receive_only_media = 0u64;
        let (mut missed, mut pulls) = (self.missed_departed, self.pulls_sent_departed);
        for host in self.hosts.iter_mut().skip(1) {
            // A viewer that never got a frame counts from 5 s after it joined (from the start of
            // the window if it was there before): every frame there is a miss.
            let from = if host.first_delivery == u64::MAX {
                (host.joined_at + NO_FRAME_GRACE_NS).min(ws.max(host.joined_at))
            } else {
                host.first_delivery
            };
            let until = host.left_at.saturating_sub(deadline);
            let expected = window_frames
                .iter()
                .filter(|f| f.at >= from && f.at < until)
                .count() as u64;
            if expected > 0 {
                delivery.push(f64::from(host.frames_ok) / expected as f64);
                ok_all += u64::from(host.frames_ok).min(expected);
                expected_all += expected;
            }
            if let Node::Trees(plane) = &host.node {
                let stats = plane.stats();
                missed += stats.objects_missed;
                pulls += stats.pulls_sent;
                if stats.depth > 0 {
                    hops.push(stats.depth as f64 - 1.0);
                }
            }
            if host.line.capacity_kbps == 0 {
                receive_only_media += host.media_up_bytes;
            }
            // Whole-window figures: viewers present from before the window to its end.
            if host.joined_at <= ws && host.left_at >= we {
                let down = host.down_bytes as f64 / published_bytes;
                let up = host.up_bytes as f64 / published_bytes;
                down_x.push(down);
                up_x.push(up);
                let class = by_class.entry(host.line.class).or_default();
                class.0 += up;
                class.1 += 1;
                // Against the `upload-capacity` it set (90 % of its line).
                if self.cfg.capacity_known && host.line.capacity_kbps > 0 {
                    let allowed = (host.line.capacity_kbps * 9 / 10) as f64 * 1000.0 / 8.0
                        * self.cfg.window.as_secs_f64();
                    max_over_capacity = max_over_capacity.max(host.up_bytes as f64 / allowed);
                }
            }
            if !host.delays_ms.is_empty() && host.bound_ms > 0.0 {
                let mut delays = std::mem::take(&mut host.delays_ms);
                delays.sort_unstable_by(f32::total_cmp);
                let p99 = delays
                    [((delays.len() as f64 * 0.99).ceil() as usize).clamp(1, delays.len()) - 1];
                ratio.push(f64::from(p99) / host.bound_ms);
            }
        }
        if std::env::var_os("SIM_STATS").is_some() {
            self.print_stats();
        }
        if std::env::var_os("SIM_TREES").is_some() {
            self.print_trees();
        }
        if self.cfg.mode == Mode::Flood {
            hops = std::mem::take(&mut self.flood_hops);
        }
        let joins_without_frame = self
            .hosts
            .iter()
            .skip(1)
            .filter(|h| h.first_delivery == u64::MAX)
            .count();
        SimReport {
            mode: self.cfg.mode.name().into(),
            viewers: self.cfg.viewers,
            seed: self.cfg.seed,
            bitrate_kbps: self.cfg.bitrate_bps / 1000,
            window_s: self.cfg.window.as_secs_f64(),
            network: self.cfg.network_name.clone(),
            loss: self.cfg.network.loss,
            loss_burst: self.cfg.network.loss_burst,
            churn_per_min: self.cfg.churn_per_min,
            deadline_ms: self.cfg.deadline.as_millis() as u64,
            frames: window_frames.len() as u64,
            delivery: Dist::of(delivery),
            delivery_overall: report::round(if expected_all > 0 {
                ok_all as f64 / expected_all as f64
            } else {
                0.0
            }),
            delay_cdf: report::cdf(&self.all_delays),
            delay_ms: Dist::of(std::mem::take(&mut self.all_delays)),
            hops: Dist::of(hops),
            download_x: Dist::of(down_x),
            upload_x: Dist::of(up_x),
            upload_x_by_class: by_class
                .into_iter()
                .map(|(class, (sum, n))| {
                    let name = self
                        .cfg
                        .network
                        .classes
                        .get(usize::from(class))
                        .map_or("publisher".to_string(), |c| c.name.clone());
                    (name, report::round(sum / n as f64))
                })
                .collect(),
            publisher_upload_x: report::round(self.publisher_up_bytes as f64 / published_bytes),
            control_share: report::round(if self.bytes_sent > 0 {
                1.0 - self.media_bytes_sent as f64 / self.bytes_sent as f64
            } else {
                0.0
            }),
            join_ms: Dist::of(std::mem::take(&mut self.join_ms)),
            joins_without_frame,
            recovery_ms: Dist::of(std::mem::take(&mut self.recovery_ms)),
            recoveries_missed: self.recoveries_missed + self.recoveries.len(),
            delay_over_bound: Dist::of(ratio),
            max_upload_over_capacity: report::round(max_over_capacity),
            receive_only_media_bytes: receive_only_media,
            delivered_intact: self.intact,
            delivered_altered: self.altered,
            objects_missed: missed,
            pulls_sent: pulls,
            messages_lost: self.lost,
            messages_dropped_downlink: self.dropped_downlink,
            messages_dropped_uplink: self.dropped_uplink,
            messages_to_departed: self.to_departed,
            joins: self.joins,
            leaves: self.leaves,
            events: self.events,
        }
    }
}

/// Bytes a message takes on the wire: itself and its length prefix (unsigned varint), as the
/// node's length-delimited stream sends it.
fn wire_len(len: usize) -> usize {
    len + if len < 128 {
        1
    } else if len < 16_384 {
        2
    } else {
        3
    }
}

fn serialisation_ns(len: usize, bps: f64) -> u64 {
    (len as f64 * 8.0 / bps * 1e9).ceil() as u64
}

/// Whether a data-plane message carries media (a shard or a manifest): its `body` field
/// number, after the fixed32 stream tag (`proto/p2plive.proto`, `DpMessage`).
fn is_media(bytes: &[u8]) -> bool {
    let key = if bytes.first() == Some(&0x0d) {
        bytes.get(5)
    } else {
        bytes.first()
    };
    matches!(key, Some(0x12) | Some(0x1a))
}

/// A stable hash of an unordered pair (the per-pair path delay).
fn pair_hash(a: u32, b: u32) -> u64 {
    let (lo, hi) = (a.min(b), a.max(b));
    let mut z = (u64::from(lo) << 32 | u64::from(hi)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Parses `2M`, `500k`, `1500000` (bit/s).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (number, scale) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1e3),
        Some('m' | 'M') => (&s[..s.len() - 1], 1e6),
        Some('g' | 'G') => (&s[..s.len() - 1], 1e9),
        _ => (s, 1.0),
    };
    let value: f64 = number.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if !(value.is_finite() && value > 0.0) {
        return Err(format!("{s:?}: not a positive rate"));
    }
    Ok((value * scale).round() as u64)
}
