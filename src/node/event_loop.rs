//! The task that owns the swarm.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt as _;
use libp2p::core::transport::ListenerId;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, PublishError};
use libp2p::metrics::Recorder as _;
use libp2p::swarm::SwarmEvent;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId, Swarm, autonat, dcutr, identify, kad, mdns, relay};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use bytes::Bytes;
use ed25519_dalek::{SigningKey, VerifyingKey};
use libp2p::identity::Keypair;

use super::behaviour::{Behaviour, BehaviourEvent, KAD_PROTOCOL};
use super::media::{Media, MediaEvent};
use super::stats::{NodeStats, bump};
use super::{DataPlaneMode, Event, NodeError};
use crate::core::dataplane::{
    DataPlane, DataPlaneConfig, LocalReport, ObjectKey, Output, PeerKey, Role, stream_tag,
};
use crate::core::wire::{self, WireError, provider_key};
use crate::core::{Channel, Limits, Message};

/// Most listen addresses of a peer passed on in redirects.
const MAX_INFO_ADDRS: usize = 8;
/// Media events handled per event-loop iteration at most.
const MEDIA_BATCH: usize = 64;
/// Times our media stream to one peer is re-opened while connected before giving up.
const MEDIA_RETRIES: u32 = 3;
/// A media stream that stayed open this long was working: its end starts the count of
/// re-opens over (see [`MediaRetries`]).
const MEDIA_STEADY: Duration = Duration::from_secs(30);
/// While a data plane has queued messages, its writers are refilled at least this often.
/// Relays a node behind a NAT holds a reservation on at once.
const MAX_RELAY_RESERVATIONS: usize = 2;
const MEDIA_FLUSH: Duration = Duration::from_millis(5);

impl PeerKey for PeerId {
    fn to_bytes(&self) -> Vec<u8> {
        PeerId::to_bytes(*self)
    }
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        PeerId::from_bytes(bytes).ok()
    }
}

/// The ed25519 signing key of the node's identity (`None` for other key types).
fn signing_key(keypair: &Keypair) -> Option<SigningKey> {
    let bytes = keypair.clone().try_into_ed25519().ok()?.to_bytes();
    Some(SigningKey::from_bytes(bytes[..32].try_into().ok()?))
}

/// The ed25519 public key inlined in a peer id (ed25519 peer ids are identity multihashes
/// of the protobuf-encoded key).
fn verifying_key(peer: &PeerId) -> Option<VerifyingKey> {
    let multihash: &libp2p::multihash::Multihash<64> = peer.as_ref();
    if multihash.code() != 0 {
        return None;
    }
    let key = libp2p::identity::PublicKey::try_decode_protobuf(multihash.digest()).ok()?;
    VerifyingKey::from_bytes(&key.try_into_ed25519().ok()?.to_bytes()).ok()
}

/// A peer's listen addresses as the opaque `info` of the data plane (passed on in redirects):
/// each address as a length byte and its bytes.
fn encode_info(addrs: &[Multiaddr]) -> Bytes {
    let mut out = Vec::new();
    for addr in addrs.iter().take(MAX_INFO_ADDRS) {
        let bytes = addr.to_vec();
        if let Ok(len) = u8::try_from(bytes.len()) {
            out.push(len);
            out.extend_from_slice(&bytes);
        }
    }
    out.into()
}

fn decode_info(info: &[u8]) -> Vec<Multiaddr> {
    let mut addrs = Vec::new();
    let mut rest = info;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len);
        if tail.len() < len || addrs.len() >= MAX_INFO_ADDRS {
            break;
        }
        if let Ok(addr) = Multiaddr::try_from(tail[..len].to_vec()) {
            addrs.push(addr);
        }
        rest = &tail[len..];
    }
    addrs
}

/// Pends forever on `None` (a select! branch that never fires).
async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Without every listener reporting an address, `Listening` is emitted this long after start.
const LISTENING_DEADLINE: Duration = Duration::from_secs(1);
/// Listen addresses arrive in bursts (one per interface); they are announced together.
const LISTENING_DEBOUNCE: Duration = Duration::from_millis(20);
/// Period of the housekeeping: bootstrap redials, provider lookups.
const MAINTENANCE_PERIOD: Duration = Duration::from_secs(5);
/// A joined stream looks for more providers at most this often while under-connected.
const PROVIDER_LOOKUP_PERIOD: Duration = Duration::from_secs(15);
/// Most control events (listening, peers, publisher locked) waiting for room in the channel.
const MAX_PENDING_CONTROL_EVENTS: usize = 256;
/// Most addresses of one peer taken from identify into kademlia.
const MAX_IDENTIFY_ADDRS: usize = 16;
/// A publisher locked in on its first catalog (not pinned) is replaced by the author of
/// another catalog only after this long without a catalog or a verified manifest from it:
/// a publisher restarted without its identity file comes back under a new peer id. Five
/// repeats of the catalog (sent every second), the viewer's default `publisher-timeout`.
const PUBLISHER_RELOCK_AFTER: Duration = Duration::from_secs(5);

pub(crate) enum Command {
    Announce {
        stream: String,
    },
    Join {
        stream: String,
        publisher: Option<PeerId>,
        channels: Vec<Channel>,
    },
    Subscribe {
        stream: String,
        channel: Channel,
    },
    Unsubscribe {
        stream: String,
        channel: Channel,
    },
}

/// The [`super::InboundLoss`] hook: a seeded RNG deciding which received messages to drop.
/// The share is shared with the [`super::Node`] handle, which may change it while running.
pub(crate) struct LossHook {
    /// `f64` bits of the share of messages dropped.
    share: Arc<std::sync::atomic::AtomicU64>,
    rng: rand::rngs::StdRng,
}

impl LossHook {
    pub(crate) fn new(loss: super::InboundLoss) -> Self {
        use rand::SeedableRng as _;
        Self {
            share: Arc::new(std::sync::atomic::AtomicU64::new(loss.share.to_bits())),
            rng: rand::rngs::StdRng::seed_from_u64(loss.seed),
        }
    }

    /// The share, as the node handle sets it.
    pub(crate) fn share_handle(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.share.clone()
    }

    fn drops(&mut self) -> bool {
        use rand::Rng as _;
        let share = f64::from_bits(self.share.load(Ordering::Relaxed));
        share > 0.0 && self.rng.random::<f64>() < share
    }
}

pub(crate) struct Publish {
    pub stream: String,
    pub channel: Channel,
    pub payload: Vec<u8>,
}

/// What the node knows and wants about one stream.
#[derive(Debug, Default)]
struct StreamState {
    /// We publish it (`announce_stream`).
    announced: bool,
    /// We view it (`join_stream` / `subscribe`).
    joined: bool,
    /// The only author whose messages are accepted; `None` until locked in.
    publisher: Option<PeerId>,
    /// The publisher was given (`join_stream`) or is us: it is never replaced.
    pinned: bool,
    /// When the publisher's last accepted message arrived (see [`PUBLISHER_RELOCK_AFTER`]).
    heard: Option<Instant>,
    /// Channels joined (always including the control channel while joined).
    channels: BTreeSet<Channel>,
    /// When the next provider lookup may run.
    next_lookup: Option<Instant>,
}

impl StreamState {
    fn wants(&self, channel: Channel) -> bool {
        (self.announced && channel == Channel::Control)
            || (self.joined && self.channels.contains(&channel))
    }
}

/// Why a message is not used.
enum Ignored {
    NotJoined,
    Foreign,
    BeforeLock,
}

enum Verdict {
    Accept { message: Message, locked: bool },
    Reject(WireError),
    Ignore(Ignored),
}

/// The event channel plus a small queue for events that must not be lost (listening, peers,
/// publisher locked); media messages are dropped (and counted) when the channel is full.
struct EventSink {
    tx: mpsc::Sender<Event>,
    pending: VecDeque<Event>,
    closed: bool,
    stats: Arc<NodeStats>,
}

impl EventSink {
    fn control(&mut self, event: Event) {
        if self.closed {
            return;
        }
        let same_kind = |queued: &Event| {
            matches!(
                (queued, &event),
                (Event::Listening { .. }, Event::Listening { .. })
                    | (Event::PeersChanged { .. }, Event::PeersChanged { .. })
            )
        };
        if let Some(slot) = self.pending.iter().position(same_kind) {
            // Only the latest state matters.
            self.pending[slot] = event;
        } else {
            if self.pending.len() >= MAX_PENDING_CONTROL_EVENTS {
                self.pending.pop_front();
                bump(&self.stats.events_dropped);
            }
            self.pending.push_back(event);
        }
        self.flush();
    }

    fn message(&mut self, event: Event) {
        if self.closed {
            return;
        }
        self.flush();
        if !self.pending.is_empty() {
            // Keep the order: nothing overtakes a queued control event.
            bump(&self.stats.events_dropped);
            return;
        }
        match self.tx.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => bump(&self.stats.events_dropped),
            Err(mpsc::error::TrySendError::Closed(_)) => self.closed = true,
        }
    }

    fn flush(&mut self) {
        while let Some(event) = self.pending.pop_front() {
            match self.tx.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(event)) => {
                    self.pending.push_front(event);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.closed = true;
                    self.pending.clear();
                    return;
                }
            }
        }
    }
}

/// Completes when `tx` has room for one event (without taking it), or fails if it is closed.
async fn wait_for_room(tx: &mpsc::Sender<Event>) -> Result<(), mpsc::error::SendError<()>> {
    tx.reserve().await.map(drop)
}

pub(crate) struct Parts {
    pub swarm: Swarm<Behaviour>,
    pub peer_id: PeerId,
    pub commands: mpsc::Receiver<Command>,
    pub publishes: mpsc::Receiver<Publish>,
    pub shutdown: watch::Receiver<Option<Duration>>,
    pub stopped: watch::Sender<bool>,
    pub events: mpsc::Sender<Event>,
    pub stats: Arc<NodeStats>,
    pub limits: Limits,
    pub max_dialed_peers: usize,
    pub inbound_loss: Option<LossHook>,
    pub listeners: HashMap<ListenerId, BTreeSet<Multiaddr>>,
    pub bootstrap: Vec<(PeerId, Vec<Multiaddr>)>,
    pub data_plane: DataPlaneMode,
    pub upload_capacity_kbps: Option<u64>,
    pub repair_delay: Option<Duration>,
    pub max_peers: usize,
    pub keypair: Keypair,
    /// libp2p's swarm and protocol metrics, on the node's registry.
    pub metrics: libp2p::metrics::Metrics,
    /// Fingerprint of the private-network key, if any (named in connection errors).
    pub psk_fingerprint: Option<String>,
}

pub(crate) struct EventLoop {
    swarm: Swarm<Behaviour>,
    peer_id: PeerId,
    commands: mpsc::Receiver<Command>,
    publishes: mpsc::Receiver<Publish>,
    shutdown: watch::Receiver<Option<Duration>>,
    stopped: watch::Sender<bool>,
    events: EventSink,
    stats: Arc<NodeStats>,
    limits: Limits,
    max_dialed_peers: usize,
    inbound_loss: Option<LossHook>,
    streams: HashMap<String, StreamState>,
    /// Addresses of each configured listener still open.
    listeners: HashMap<ListenerId, BTreeSet<Multiaddr>>,
    listening_deadline: Instant,
    /// When to announce the listen addresses next, if they (may have) changed.
    listening_flush: Option<Instant>,
    /// The addresses last announced.
    announced_addrs: Option<Vec<Multiaddr>>,
    bootstrap: Vec<(PeerId, Vec<Multiaddr>)>,
    /// Peers we dialled on our own and are still dialling.
    dialing: HashSet<PeerId>,
    mode: DataPlaneMode,
    /// The media streams (trees mode).
    media: Option<Media>,
    media_events: Option<mpsc::Receiver<MediaEvent>>,
    /// One data plane per stream, and the stream of each tag.
    planes: HashMap<String, DataPlane<PeerId>>,
    tags: HashMap<u32, String>,
    plane_config: DataPlaneConfig,
    signing: Option<SigningKey>,
    /// Listen addresses of peers (from identify), as data-plane `info`.
    peer_info: HashMap<PeerId, Bytes>,
    /// Peers the data plane caught misbehaving: disconnected, never accepted again.
    banned: HashSet<PeerId>,
    /// Our media streams re-opened per peer.
    media_retries: HashMap<PeerId, MediaRetries>,
    /// Answers the ping streams `Behaviour::ping` accepts.
    ping: super::ping::Responder,
    max_peers: usize,
    metrics: libp2p::metrics::Metrics,
    psk_fingerprint: Option<String>,
    /// Bootstrap peers whose last dial failure was reported (reported once until they
    /// connect again).
    bootstrap_failed: HashSet<PeerId>,
    /// Bootstrap peers we were connected to once: only those are followed to a new peer id
    /// at their address (a first contact under the wrong id keeps failing, as the address
    /// says whom to expect).
    bootstrap_reached: HashSet<PeerId>,
    /// Our reachability as AutoNAT last judged it.
    nat: autonat::NatStatus,
    /// Connected peers that serve circuit relay v2 (identify lists the hop protocol), with
    /// an address to reach them at.
    relays: HashMap<PeerId, Multiaddr>,
    /// Relay reservations asked for (a `/p2p-circuit` listener on each relay).
    relay_listeners: HashMap<PeerId, ListenerId>,
    /// Open connections per peer: (direct, relayed).
    connections: HashMap<PeerId, (u32, u32)>,
}

impl EventLoop {
    pub(crate) fn new(parts: Parts) -> Result<Self, NodeError> {
        let listening_deadline = Instant::now() + LISTENING_DEADLINE;
        let (media, media_events) = match parts.data_plane {
            DataPlaneMode::Trees => {
                let control = parts.swarm.behaviour().media.new_control();
                let (media, events) = Media::new(control);
                (Some(media), Some(events))
            }
            DataPlaneMode::Gossipsub => (None, None),
        };
        let defaults = DataPlaneConfig::default();
        let plane_config = DataPlaneConfig {
            upload_capacity_kbps: parts.upload_capacity_kbps,
            seed: rand::random(),
            repair_delay: parts.repair_delay.unwrap_or(defaults.repair_delay),
            ..defaults
        };
        let signing = signing_key(&parts.keypair);
        let mut swarm = parts.swarm;
        // Bootstrap peers (a p2plive-node) answer AutoNAT probes from the start.
        for (peer, addrs) in &parts.bootstrap {
            swarm
                .behaviour_mut()
                .autonat
                .add_server(*peer, addrs.first().cloned());
        }
        Ok(Self {
            swarm,
            peer_id: parts.peer_id,
            commands: parts.commands,
            publishes: parts.publishes,
            shutdown: parts.shutdown,
            stopped: parts.stopped,
            events: EventSink {
                tx: parts.events,
                pending: VecDeque::new(),
                closed: false,
                stats: parts.stats.clone(),
            },
            stats: parts.stats,
            limits: parts.limits,
            max_dialed_peers: parts.max_dialed_peers,
            inbound_loss: parts.inbound_loss,
            streams: HashMap::new(),
            listeners: parts.listeners,
            listening_deadline,
            listening_flush: Some(listening_deadline),
            announced_addrs: None,
            bootstrap: parts.bootstrap,
            dialing: HashSet::new(),
            mode: parts.data_plane,
            media,
            media_events,
            planes: HashMap::new(),
            tags: HashMap::new(),
            plane_config,
            signing,
            peer_info: HashMap::new(),
            banned: HashSet::new(),
            media_retries: HashMap::new(),
            ping: super::ping::Responder::default(),
            max_peers: parts.max_peers,
            metrics: parts.metrics,
            psk_fingerprint: parts.psk_fingerprint,
            bootstrap_failed: HashSet::new(),
            bootstrap_reached: HashSet::new(),
            nat: autonat::NatStatus::Unknown,
            relays: HashMap::new(),
            relay_listeners: HashMap::new(),
            connections: HashMap::new(),
        })
    }

    pub(crate) async fn run(mut self) {
        let mut maintenance =
            tokio::time::interval_at(Instant::now() + MAINTENANCE_PERIOD, MAINTENANCE_PERIOD);
        maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            let listening_flush = self.listening_flush;
            let plane_deadline = self.plane_deadline();
            let planes_running = !self.planes.is_empty();
            tokio::select! {
                changed = self.shutdown.changed() => match changed {
                    Ok(()) => {
                        if self.shutdown.borrow_and_update().is_some() {
                            break;
                        }
                    }
                    // Every handle is gone.
                    Err(_) => break,
                },
                command = self.commands.recv() => match command {
                    Some(command) => self.handle_command(command),
                    None => break,
                },
                publish = self.publishes.recv() => match publish {
                    Some(publish) => self.handle_publish(publish),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.handle_swarm_event(event),
                // Room in the event channel for the queued control events.
                room = wait_for_room(&self.events.tx), if !self.events.pending.is_empty() => {
                    match room {
                        Ok(()) => self.events.flush(),
                        Err(_) => {
                            self.events.closed = true;
                            self.events.pending.clear();
                        }
                    }
                }
                () = tokio::time::sleep_until(listening_flush.unwrap_or(self.listening_deadline)),
                    if listening_flush.is_some() => self.flush_listening(),
                _ = maintenance.tick() => self.maintenance(),
                event = recv_opt(&mut self.media_events) => match event {
                    Some(event) => {
                        self.handle_media_event(event);
                        // Frames come in bursts (a frame is ~16 shards): take what is
                        // queued before the per-iteration work (timers, flushing writers).
                        for _ in 0..MEDIA_BATCH {
                            match self.media_events.as_mut().map(mpsc::Receiver::try_recv) {
                                Some(Ok(event)) => self.handle_media_event(event),
                                _ => break,
                            }
                        }
                    }
                    None => self.media_events = None,
                },
                () = tokio::time::sleep_until(plane_deadline), if planes_running => {
                    self.plane_timeout();
                }
            }
            self.flush_media();
        }
        // A shutdown requested just before the last handle was dropped keeps its linger,
        // whichever of the two the loop noticed first.
        let linger = self.shutdown.borrow().unwrap_or(Duration::ZERO);

        self.stats.stopping.store(true, Ordering::Relaxed);
        // Whatever was queued before the shutdown still goes out.
        while let Ok(command) = self.commands.try_recv() {
            self.handle_command(command);
        }
        while let Ok(publish) = self.publishes.try_recv() {
            self.handle_publish(publish);
        }
        if !linger.is_zero() && self.swarm.connected_peers().next().is_some() {
            tracing::debug!(?linger, "node lingering before shutdown");
            let deadline = Instant::now() + linger;
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => break,
                    event = self.swarm.select_next_some() => {
                        self.handle_swarm_event(event);
                        if self.swarm.connected_peers().next().is_none() {
                            break;
                        }
                    }
                }
            }
        }
        // Dropping `self` (the swarm) closes every connection and listener, and ends the event
        // channel once its queued events are read.
        self.events.flush();
        self.stats.connected_peers.store(0, Ordering::Relaxed);
        self.stats.stopped.store(true, Ordering::Relaxed);
        self.stopped.send_replace(true);
        tracing::info!(peer_id = %self.peer_id, "p2plive node stopped");
    }

    // ---- commands -------------------------------------------------------------------------

    fn handle_command(&mut self, command: Command) {
        match command {
            Command::Announce { stream } => {
                let state = self.streams.entry(stream.clone()).or_default();
                if !state.announced {
                    state.announced = true;
                    tracing::info!(%stream, "announcing stream");
                }
                self.sync_subscription(&stream, Channel::Control);
                self.start_providing(&stream);
                self.ensure_plane(&stream);
            }
            Command::Join {
                stream,
                publisher,
                channels,
            } => self.join(stream, publisher, channels),
            Command::Subscribe { stream, channel } => match self.streams.get_mut(&stream) {
                Some(state) if state.joined => {
                    state.channels.insert(channel);
                    self.sync_subscription(&stream, channel);
                    self.update_plane_subscription(&stream);
                }
                _ => self.join(stream, None, vec![channel]),
            },
            Command::Unsubscribe { stream, channel } => self.unsubscribe(stream, channel),
        }
        let streams = self
            .streams
            .values()
            .filter(|s| s.announced || s.joined)
            .count();
        self.stats.streams.store(streams, Ordering::Relaxed);
    }

    fn join(&mut self, stream: String, publisher: Option<PeerId>, channels: Vec<Channel>) {
        let own_id = self.peer_id;
        let state = self.streams.entry(stream.clone()).or_default();
        let newly_joined = !state.joined;
        state.joined = true;
        match publisher {
            Some(publisher) => {
                if state.publisher.is_some_and(|p| p != publisher) {
                    tracing::info!(%stream, %publisher, "stream publisher replaced");
                }
                state.publisher = Some(publisher);
                state.pinned = true;
            }
            // Our own stream: we are its publisher.
            None if state.announced => {
                state.publisher = Some(own_id);
                state.pinned = true;
            }
            None => {}
        }
        state.channels.insert(Channel::Control);
        state.channels.extend(channels);
        let channels: Vec<Channel> = state.channels.iter().copied().collect();
        if newly_joined {
            tracing::info!(%stream, publisher = ?state.publisher, ?channels, "joining stream");
        }
        for channel in channels {
            self.sync_subscription(&stream, channel);
        }
        self.start_providing(&stream);
        self.lookup_providers(&stream);
        self.ensure_plane(&stream);
        self.update_plane_subscription(&stream);
    }

    fn unsubscribe(&mut self, stream: String, channel: Channel) {
        let Some(state) = self.streams.get_mut(&stream) else {
            return;
        };
        state.channels.remove(&channel);
        if state.joined && state.channels.is_empty() {
            tracing::info!(%stream, "leaving stream");
            state.joined = false;
            state.publisher = None;
            state.pinned = false;
        }
        let remove = !state.joined && !state.announced;
        self.sync_subscription(&stream, channel);
        self.update_plane_subscription(&stream);
        if remove {
            self.streams.remove(&stream);
            if self.planes.remove(&stream).is_some() {
                self.tags.remove(&stream_tag(&stream));
            }
            if let Some(kademlia) = self.swarm.behaviour_mut().kademlia.as_mut() {
                kademlia.stop_providing(&kad::RecordKey::new(&provider_key(&stream)));
            }
        }
    }

    /// Makes gossipsub's subscription to `channel` of `stream` match what the stream state wants.
    fn sync_subscription(&mut self, stream: &str, channel: Channel) {
        // With the trees, media and feedback travel on the data plane, not on gossipsub.
        let on_plane = self.mode == DataPlaneMode::Trees && channel != Channel::Control;
        let want = !on_plane
            && self
                .streams
                .get(stream)
                .is_some_and(|state| state.wants(channel));
        let topic = IdentTopic::new(channel.topic(stream));
        let gossipsub = &mut self.swarm.behaviour_mut().gossipsub;
        if want {
            match gossipsub.subscribe(&topic) {
                Ok(true) => tracing::debug!(%topic, "subscribed"),
                Ok(false) => {}
                Err(err) => tracing::warn!(%topic, %err, "cannot subscribe"),
            }
        } else if gossipsub.unsubscribe(&topic) {
            tracing::debug!(%topic, "unsubscribed");
        }
    }

    fn start_providing(&mut self, stream: &str) {
        if let Some(kademlia) = self.swarm.behaviour_mut().kademlia.as_mut()
            && let Err(err) = kademlia.start_providing(kad::RecordKey::new(&provider_key(stream)))
        {
            tracing::warn!(%stream, %err, "cannot announce stream in the DHT");
        }
    }

    fn lookup_providers(&mut self, stream: &str) {
        let Some(kademlia) = self.swarm.behaviour_mut().kademlia.as_mut() else {
            return;
        };
        kademlia.get_providers(kad::RecordKey::new(&provider_key(stream)));
        if let Some(state) = self.streams.get_mut(stream) {
            state.next_lookup = Some(Instant::now() + PROVIDER_LOOKUP_PERIOD);
        }
    }

    fn handle_publish(&mut self, publish: Publish) {
        let Publish {
            stream,
            channel,
            payload,
        } = publish;
        // Local viewers of our own stream (a sink and a source sharing this node).
        if self
            .streams
            .get(&stream)
            .is_some_and(|state| state.joined && state.channels.contains(&channel))
        {
            let own_id = self.peer_id;
            let verdict = self.validate(&stream, channel, Some(own_id), &payload);
            self.deliver(&stream, channel, own_id, own_id, verdict);
        }
        if self.mode == DataPlaneMode::Trees && channel != Channel::Control {
            return self.publish_on_plane(&stream, payload);
        }
        let topic = IdentTopic::new(channel.topic(&stream));
        match self.swarm.behaviour_mut().gossipsub.publish(topic, payload) {
            Ok(_) => bump(&self.stats.messages_published),
            Err(PublishError::NoPeersSubscribedToTopic) => {
                bump(&self.stats.publish_no_peers);
                tracing::trace!(%stream, ?channel, "no peer subscribed yet");
            }
            Err(err) => {
                bump(&self.stats.publish_failures);
                tracing::debug!(%stream, ?channel, ?err, "publish failed");
            }
        }
    }

    // ---- validation -----------------------------------------------------------------------

    fn validate(
        &mut self,
        stream: &str,
        channel: Channel,
        source: Option<PeerId>,
        data: &[u8],
    ) -> Verdict {
        let Some(state) = self
            .streams
            .get_mut(stream)
            .filter(|state| state.joined && state.channels.contains(&channel))
        else {
            return Verdict::Ignore(Ignored::NotJoined);
        };
        let message = match wire::decode(data, &self.limits) {
            Ok(message) => message,
            Err(err) => return Verdict::Reject(err),
        };
        if Channel::of(&message) != channel {
            return Verdict::Reject(WireError::Invalid(format!(
                "message of channel {:?} published on {channel:?}",
                Channel::of(&message)
            )));
        }
        let Some(source) = source else {
            return Verdict::Reject(WireError::Invalid("unsigned message".into()));
        };
        // Viewer reports and keyframe requests are written by viewers, not the publisher;
        // the channel check above lets only those two kinds through on this channel.
        if channel == Channel::Feedback {
            return Verdict::Accept {
                message,
                locked: false,
            };
        }
        let now = Instant::now();
        let catalog = matches!(message, Message::Catalog(_));
        match state.publisher {
            Some(publisher) if publisher == source => {
                state.heard = Some(now);
                Verdict::Accept {
                    message,
                    locked: false,
                }
            }
            Some(publisher) => {
                // Silent both on gossipsub and in the data plane (its signed manifests).
                let silent = |heard: Option<Instant>| {
                    heard.is_none_or(|at| now.duration_since(at) >= PUBLISHER_RELOCK_AFTER)
                };
                let plane_heard = self
                    .planes
                    .get(stream)
                    .and_then(DataPlane::last_verified)
                    .map(Instant::from_std);
                if state.pinned || !catalog || !silent(state.heard) || !silent(plane_heard) {
                    return Verdict::Ignore(Ignored::Foreign);
                }
                tracing::info!(%stream, old = %publisher, new = %source,
                    "stream publisher silent for {PUBLISHER_RELOCK_AFTER:?}: following the author of a new catalog");
                state.publisher = Some(source);
                state.heard = Some(now);
                Verdict::Accept {
                    message,
                    locked: true,
                }
            }
            None if catalog => {
                state.publisher = Some(source);
                state.heard = Some(now);
                Verdict::Accept {
                    message,
                    locked: true,
                }
            }
            None => Verdict::Ignore(Ignored::BeforeLock),
        }
    }

    /// Emits the events of an accepted message; returns what to tell gossipsub.
    fn deliver(
        &mut self,
        stream: &str,
        channel: Channel,
        source: PeerId,
        propagation_source: PeerId,
        verdict: Verdict,
    ) -> MessageAcceptance {
        match verdict {
            Verdict::Accept { message, locked } => {
                if locked {
                    tracing::info!(%stream, publisher = %source, "stream publisher locked in on its first catalog");
                    self.events.control(Event::PublisherLocked {
                        stream: stream.to_owned(),
                        publisher: source,
                    });
                    // A replaced publisher: its successor signs with another key.
                    if self.planes.get(stream).is_some_and(|p| !p.is_publisher()) {
                        self.planes.remove(stream);
                    }
                    self.ensure_plane(stream);
                    self.update_plane_subscription(stream);
                }
                if let Message::Catalog(catalog) = &message
                    && let Some(plane) = self.planes.get_mut(stream)
                    && !plane.is_publisher()
                {
                    plane.set_epoch(catalog.epoch);
                }
                self.events.message(Event::Message {
                    stream: stream.to_owned(),
                    channel,
                    source,
                    propagation_source,
                    message,
                });
                MessageAcceptance::Accept
            }
            Verdict::Reject(err) => {
                tracing::debug!(%stream, ?channel, %source, %err, "invalid message rejected");
                MessageAcceptance::Reject
            }
            Verdict::Ignore(_) => MessageAcceptance::Ignore,
        }
    }

    fn on_gossip_message(
        &mut self,
        propagation_source: PeerId,
        message_id: gossipsub::MessageId,
        message: gossipsub::Message,
    ) {
        bump(&self.stats.messages_received);
        if self.inbound_loss.as_mut().is_some_and(LossHook::drops) {
            bump(&self.stats.messages_dropped_by_hook);
            self.swarm
                .behaviour_mut()
                .gossipsub
                .report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    MessageAcceptance::Ignore,
                );
            return;
        }
        let acceptance = match Channel::parse(message.topic.as_str()) {
            Some((stream, channel)) => {
                let verdict = self.validate(stream, channel, message.source, &message.data);
                match &verdict {
                    Verdict::Accept { .. } => bump(&self.stats.messages_accepted),
                    Verdict::Reject(_) => bump(&self.stats.messages_rejected),
                    Verdict::Ignore(Ignored::Foreign) => bump(&self.stats.messages_ignored),
                    Verdict::Ignore(Ignored::NotJoined) => bump(&self.stats.messages_not_joined),
                    Verdict::Ignore(Ignored::BeforeLock) => bump(&self.stats.messages_before_lock),
                }
                // `source` is present in every non-rejected verdict (strict validation).
                let source = message.source.unwrap_or(propagation_source);
                self.deliver(stream, channel, source, propagation_source, verdict)
            }
            None => {
                bump(&self.stats.messages_not_joined);
                MessageAcceptance::Ignore
            }
        };
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&message_id, &propagation_source, acceptance);
    }

    // ---- swarm events ---------------------------------------------------------------------

    fn handle_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        self.metrics.record(&event);
        match event {
            SwarmEvent::Behaviour(event) => self.handle_behaviour_event(event),
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                tracing::debug!(%address, "new listen address");
                if let Some(addrs) = self.listeners.get_mut(&listener_id) {
                    addrs.insert(address);
                    self.schedule_listening();
                }
            }
            SwarmEvent::ExpiredListenAddr {
                listener_id,
                address,
            } => {
                tracing::debug!(%address, "listen address expired");
                if let Some(addrs) = self.listeners.get_mut(&listener_id) {
                    addrs.remove(&address);
                    self.schedule_listening();
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } => {
                match reason {
                    Ok(()) => tracing::info!(?addresses, "listener closed"),
                    Err(err) => tracing::warn!(?addresses, %err, "listener failed"),
                }
                if self.listeners.remove(&listener_id).is_some() {
                    self.schedule_listening();
                }
                // A reservation that ended is asked for again by the maintenance.
                self.relay_listeners.retain(|_, id| *id != listener_id);
            }
            SwarmEvent::ListenerError { error, .. } => {
                tracing::warn!(%error, "listener error");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                endpoint,
                ..
            } => {
                self.dialing.remove(&peer_id);
                self.bootstrap_failed.remove(&peer_id);
                if self.bootstrap.iter().any(|(b, _)| *b == peer_id) {
                    self.bootstrap_reached.insert(peer_id);
                }
                if self.banned.contains(&peer_id) {
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                let relayed = is_relayed(endpoint.get_remote_address());
                let counts = self.connections.entry(peer_id).or_default();
                if relayed {
                    counts.1 += 1;
                    tracing::debug!(%peer_id, "relayed connection (hole punching follows)");
                } else {
                    counts.0 += 1;
                }
                if num_established.get() == 1 {
                    tracing::debug!(%peer_id, addr = %endpoint.get_remote_address(), "peer connected");
                    if let Some(media) = self.media.as_mut() {
                        // The data plane may queue for it at once; the writer takes the
                        // queue once our stream is open (or the peer goes down if it does
                        // not speak the protocol).
                        media.open(peer_id);
                        let now = std::time::Instant::now();
                        let info = self.peer_info.get(&peer_id).cloned().unwrap_or_default();
                        for plane in self.planes.values_mut() {
                            plane.handle_peer_up(now, peer_id, info.clone());
                        }
                        self.drain_planes();
                    }
                    self.peers_changed();
                }
                self.update_relayed(peer_id);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                endpoint,
                ..
            } => {
                if let Some(counts) = self.connections.get_mut(&peer_id) {
                    if is_relayed(endpoint.get_remote_address()) {
                        counts.1 = counts.1.saturating_sub(1);
                    } else {
                        counts.0 = counts.0.saturating_sub(1);
                    }
                }
                if num_established == 0 {
                    tracing::debug!(%peer_id, ?cause, "peer disconnected");
                    self.connections.remove(&peer_id);
                    self.relays.remove(&peer_id);
                    self.media_down(peer_id);
                    self.peers_changed();
                } else {
                    self.update_relayed(peer_id);
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                if let Some(peer_id) = peer_id {
                    self.dialing.remove(&peer_id);
                    let followed = match &error {
                        libp2p::swarm::DialError::WrongPeerId { obtained, address } => {
                            self.follow_bootstrap(peer_id, *obtained, address)
                        }
                        _ => false,
                    };
                    if !followed
                        && self.bootstrap.iter().any(|(b, _)| *b == peer_id)
                        && self.bootstrap_failed.insert(peer_id)
                    {
                        let reason = self.explain_dial_error(&error);
                        tracing::warn!(%peer_id, %reason, "bootstrap peer unreachable");
                        self.events.control(Event::BootstrapUnreachable {
                            peer: peer_id,
                            reason,
                        });
                    }
                }
                tracing::debug!(?peer_id, %error, "outgoing connection failed");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                tracing::debug!(%send_back_addr, %error, "incoming connection failed");
            }
            _ => {}
        }
    }

    /// A bootstrap address we reached before answered as `new` instead of `old`: the peer
    /// there restarted without its identity file (a publisher run without `identity-file`).
    /// Its addresses are dialled as `new` from now on; whom to accept media from is still
    /// decided by the publisher lock, so another peer there gains nothing but a connection.
    /// False (nothing followed) if `old` is no bootstrap peer or was never reached.
    fn follow_bootstrap(&mut self, old: PeerId, new: PeerId, address: &Multiaddr) -> bool {
        if new == self.peer_id
            || !self.bootstrap_reached.contains(&old)
            || self.bootstrap.iter().any(|(b, _)| *b == new)
        {
            return false;
        }
        let Some(entry) = self.bootstrap.iter_mut().find(|(b, _)| *b == old) else {
            return false;
        };
        tracing::info!(%old, %new, %address, "bootstrap address answers as another peer (restarted without its identity?): dialling it as that peer");
        entry.0 = new;
        self.bootstrap_reached.insert(new);
        let addrs = entry.1.clone();
        self.bootstrap_failed.remove(&old);
        if let Some(kademlia) = self.swarm.behaviour_mut().kademlia.as_mut() {
            kademlia.remove_peer(&old);
            for addr in &addrs {
                kademlia.add_address(&new, addr.clone());
            }
        }
        let opts = DialOpts::peer_id(new)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(err) = self.swarm.dial(opts) {
            tracing::debug!(%new, %err, "dial of the bootstrap peer's new id not started");
        }
        true
    }

    /// A dial error on one line, with what a private network (pre-shared key) changes: a
    /// key mismatch shows up only as a protocol negotiation that fails or never ends (the
    /// other side reads noise), which is also how a black-holed address looks.
    fn explain_dial_error(&self, error: &libp2p::swarm::DialError) -> String {
        let chain = super::error_chain(error);
        let negotiation = chain.contains("negotiat")
            || chain.contains("ultistream")
            || chain.contains("andshake");
        match (&self.psk_fingerprint, negotiation) {
            (Some(fingerprint), true) => format!(
                "{chain} (this node is on a private network, pre-shared key fingerprint \
                 {fingerprint}: if the peer is up, it has another key or none)"
            ),
            (None, true) => format!(
                "{chain} (if the peer is up, it may run a private network: this node then \
                 needs its pre-shared key, psk-file)"
            ),
            (_, false) => chain,
        }
    }

    fn handle_behaviour_event(&mut self, event: BehaviourEvent) {
        match &event {
            BehaviourEvent::Gossipsub(e) => self.metrics.record(e),
            BehaviourEvent::Identify(e) => self.metrics.record(e),
            BehaviourEvent::Kademlia(e) => self.metrics.record(e),
            BehaviourEvent::Relay(e) => self.metrics.record(e),
            BehaviourEvent::Dcutr(e) => self.metrics.record(e),
            BehaviourEvent::Mdns(_)
            | BehaviourEvent::Media(_)
            | BehaviourEvent::MediaInbound(_)
            | BehaviourEvent::Ping(_)
            | BehaviourEvent::RelayClient(_)
            | BehaviourEvent::Autonat(_) => {}
        }
        match event {
            BehaviourEvent::MediaInbound((peer, stream)) => {
                if let Some(media) = self.media.as_ref() {
                    media.accept(peer, stream);
                }
            }
            BehaviourEvent::Ping((peer, stream)) => self.ping.answer(peer, stream),
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => self.on_gossip_message(propagation_source, message_id, message),
            BehaviourEvent::Gossipsub(gossipsub::Event::SlowPeer {
                peer_id,
                failed_messages,
            }) => {
                bump(&self.stats.slow_peer_reports);
                let dropped = failed_messages.priority + failed_messages.non_priority;
                self.stats
                    .send_queue_drops
                    .fetch_add(dropped as u64, Ordering::Relaxed);
                tracing::debug!(%peer_id, ?failed_messages, "slow peer");
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::GossipsubNotSupported { peer_id }) => {
                tracing::debug!(%peer_id, "peer does not speak gossipsub");
            }
            BehaviourEvent::Gossipsub(_) => {}
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                tracing::debug!(%peer_id, agent = %info.agent_version, "identified peer");
                let dialable: Vec<Multiaddr> = info
                    .listen_addrs
                    .iter()
                    .filter(|a| super::check_dialable(a).is_ok())
                    .cloned()
                    .collect();
                let peer_info = encode_info(&dialable);
                self.peer_info.insert(peer_id, peer_info.clone());
                if self.swarm.is_connected(&peer_id) {
                    let now = std::time::Instant::now();
                    for plane in self.planes.values_mut() {
                        plane.handle_peer_up(now, peer_id, peer_info.clone());
                    }
                }
                if info.protocols.contains(&relay::HOP_PROTOCOL_NAME) {
                    let addr = self
                        .bootstrap
                        .iter()
                        .find(|(b, _)| *b == peer_id)
                        .and_then(|(_, addrs)| addrs.first().cloned())
                        .or_else(|| dialable.first().cloned());
                    if let Some(addr) = addr {
                        self.relays.insert(peer_id, addr);
                        self.reserve_relays();
                    }
                }
                if info.protocols.contains(&KAD_PROTOCOL)
                    && let Some(kademlia) = self.swarm.behaviour_mut().kademlia.as_mut()
                {
                    for addr in info.listen_addrs.into_iter().take(MAX_IDENTIFY_ADDRS) {
                        kademlia.add_address(&peer_id, addr);
                    }
                }
            }
            BehaviourEvent::Identify(_) | BehaviourEvent::Media(_) => {}
            BehaviourEvent::Kademlia(kad::Event::OutboundQueryProgressed { result, .. }) => {
                self.on_kad_result(result)
            }
            BehaviourEvent::Kademlia(_) => {}
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                for (peer, addr) in found {
                    by_peer.entry(peer).or_default().push(addr);
                }
                for (peer, addrs) in by_peer {
                    tracing::debug!(%peer, ?addrs, "discovered peer on the local network");
                    if let Some(kademlia) = self.swarm.behaviour_mut().kademlia.as_mut() {
                        for addr in &addrs {
                            kademlia.add_address(&peer, addr.clone());
                        }
                    }
                    self.dial_discovered(peer, addrs);
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Expired(_)) => {}
            BehaviourEvent::Relay(event) => self.on_relay_event(event),
            BehaviourEvent::RelayClient(event) => match event {
                relay::client::Event::ReservationReqAccepted {
                    relay_peer_id,
                    renewal,
                    ..
                } => {
                    if !renewal {
                        tracing::info!(relay = %relay_peer_id, "reachable through a relay");
                    }
                }
                other => tracing::debug!(event = ?other, "relay client"),
            },
            BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            }) => match result {
                Ok(_) => {
                    bump(&self.stats.hole_punches);
                    tracing::info!(peer = %remote_peer_id, "hole punched: direct connection");
                }
                Err(err) => {
                    bump(&self.stats.hole_punch_failures);
                    tracing::debug!(peer = %remote_peer_id, %err, "hole punching failed; staying relayed");
                }
            },
            BehaviourEvent::Autonat(autonat::Event::StatusChanged { old, new }) => {
                tracing::info!(?old, ?new, "reachability (AutoNAT)");
                let public = new.is_public();
                self.nat = new;
                self.stats.reachability.store(
                    match self.nat {
                        autonat::NatStatus::Unknown => 0,
                        autonat::NatStatus::Public(_) => 1,
                        autonat::NatStatus::Private => 2,
                    },
                    Ordering::Relaxed,
                );
                if public {
                    // Reachable directly: relayed addresses would only make peers take the
                    // long way.
                    for (_, listener) in self.relay_listeners.drain() {
                        self.swarm.remove_listener(listener);
                    }
                }
                self.reserve_relays();
            }
            BehaviourEvent::Autonat(_) => {}
        }
    }

    /// Unless AutoNAT found us reachable, holds a reservation on up to
    /// [`MAX_RELAY_RESERVATIONS`] relays, so that peers can reach us through them (and then
    /// try to punch a hole). From the start, not only once AutoNAT says private: its first
    /// verdict takes a dial-back timeout (~10 s) behind a NAT that drops the dial, and a
    /// viewer would wait that long to be reachable. The reservations end if it says public.
    fn reserve_relays(&mut self) {
        if self.nat.is_public() {
            return;
        }
        let wanted: Vec<(PeerId, Multiaddr)> = self
            .relays
            .iter()
            .filter(|(peer, _)| !self.relay_listeners.contains_key(peer))
            .map(|(peer, addr)| (*peer, addr.clone()))
            .take(MAX_RELAY_RESERVATIONS.saturating_sub(self.relay_listeners.len()))
            .collect();
        for (relay, addr) in wanted {
            let circuit = addr
                .with(libp2p::multiaddr::Protocol::P2p(relay))
                .with(libp2p::multiaddr::Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(id) => {
                    tracing::info!(%circuit, "not reachable directly: reserving a relay slot");
                    self.relay_listeners.insert(relay, id);
                    self.listeners.insert(id, BTreeSet::new());
                }
                Err(err) => tracing::warn!(%circuit, %err, "cannot reserve a relay slot"),
            }
        }
    }

    /// Tells the data planes whether `peer` is reachable only through a relay (they take it
    /// as a parent only when no direct peer will do).
    fn update_relayed(&mut self, peer: PeerId) {
        let relayed = self
            .connections
            .get(&peer)
            .is_some_and(|(direct, relayed)| *direct == 0 && *relayed > 0);
        for plane in self.planes.values_mut() {
            plane.set_peer_relayed(peer, relayed);
        }
    }

    /// Keeps the relay service's gauges (reservations and circuits held now).
    fn on_relay_event(&mut self, event: relay::Event) {
        let add = |gauge: &std::sync::atomic::AtomicUsize| gauge.fetch_add(1, Ordering::Relaxed);
        let sub = |gauge: &std::sync::atomic::AtomicUsize| {
            let _ = gauge.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(1))
            });
        };
        match event {
            relay::Event::ReservationReqAccepted {
                src_peer_id,
                renewed,
            } => {
                tracing::debug!(%src_peer_id, renewed, "relay reservation accepted");
                if !renewed {
                    add(&self.stats.relay_reservations);
                }
            }
            relay::Event::ReservationClosed { .. } | relay::Event::ReservationTimedOut { .. } => {
                sub(&self.stats.relay_reservations)
            }
            relay::Event::CircuitReqAccepted {
                src_peer_id,
                dst_peer_id,
            } => {
                tracing::debug!(%src_peer_id, %dst_peer_id, "relay circuit opened");
                add(&self.stats.relay_circuits);
            }
            relay::Event::CircuitClosed { .. } => sub(&self.stats.relay_circuits),
            other => tracing::debug!(event = ?other, "relay"),
        }
    }

    fn on_kad_result(&mut self, result: kad::QueryResult) {
        match result {
            kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
                providers,
                ..
            })) => {
                for peer in providers {
                    // With the trees, viewers find the tree through other viewers: the
                    // publisher is dialled only by a viewer that knows nobody else.
                    if self.mode == DataPlaneMode::Trees
                        && self.is_joined_stream_publisher(&peer)
                        && self.swarm.connected_peers().next().is_some()
                    {
                        continue;
                    }
                    self.dial_discovered(peer, Vec::new());
                }
            }
            kad::QueryResult::GetProviders(Err(err)) => {
                tracing::debug!(%err, "provider lookup failed");
            }
            kad::QueryResult::StartProviding(Err(err)) => {
                tracing::debug!(%err, "stream announcement not stored remotely (yet)");
            }
            kad::QueryResult::Bootstrap(Err(err)) => {
                tracing::debug!(%err, "kademlia bootstrap failed");
            }
            _ => {}
        }
    }

    /// Dials a peer found through the DHT or mDNS, within the connection budget.
    fn dial_discovered(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if peer == self.peer_id || self.swarm.is_connected(&peer) || self.dialing.contains(&peer) {
            return;
        }
        if self.swarm.connected_peers().count() + self.dialing.len() >= self.max_dialed_peers {
            tracing::trace!(%peer, "connection budget used up; not dialling");
            return;
        }
        let opts = if addrs.is_empty() {
            DialOpts::peer_id(peer)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build()
        } else {
            DialOpts::peer_id(peer)
                .addresses(addrs)
                .extend_addresses_through_behaviour()
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build()
        };
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.dialing.insert(peer);
            }
            Err(err) => tracing::debug!(%peer, %err, "cannot dial discovered peer"),
        }
    }

    fn peers_changed(&mut self) {
        let connected = self.swarm.connected_peers().count();
        self.stats
            .connected_peers
            .store(connected, Ordering::Relaxed);
        self.events.control(Event::PeersChanged { connected });
    }

    // ---- media data plane (trees) ---------------------------------------------------------

    fn is_joined_stream_publisher(&self, peer: &PeerId) -> bool {
        self.streams
            .values()
            .any(|s| s.joined && s.publisher.as_ref() == Some(peer))
    }

    /// Creates the data plane of `stream` once its role is known: the publisher's when
    /// announced, a viewer's once the publisher is known (property or first catalog).
    fn ensure_plane(&mut self, stream: &str) {
        if self.mode != DataPlaneMode::Trees || self.planes.contains_key(stream) {
            return;
        }
        let Some(state) = self.streams.get(stream) else {
            return;
        };
        let role = if state.announced {
            let Some(key) = self.signing.clone() else {
                tracing::warn!(%stream, "the data plane needs an ed25519 identity to publish");
                return;
            };
            Role::Publisher { key }
        } else if let Some(publisher) = state.publisher.filter(|_| state.joined) {
            let Some(key) = verifying_key(&publisher) else {
                tracing::warn!(%stream, %publisher, "publisher id has no ed25519 key: no data plane");
                return;
            };
            Role::Viewer { publisher, key }
        } else {
            return;
        };
        let now = std::time::Instant::now();
        let mut plane = DataPlane::new(now, stream, self.peer_id, role, self.plane_config.clone());
        if self.media.is_some() {
            for peer in self.swarm.connected_peers() {
                let info = self.peer_info.get(peer).cloned().unwrap_or_default();
                plane.handle_peer_up(now, *peer, info);
                if let Some((0, relayed)) = self.connections.get(peer)
                    && *relayed > 0
                {
                    plane.set_peer_relayed(*peer, true);
                }
            }
        }
        tracing::info!(%stream, publisher = plane.is_publisher(), "media data plane started");
        self.tags.insert(stream_tag(stream), stream.to_owned());
        self.planes.insert(stream.to_owned(), plane);
    }

    fn update_plane_subscription(&mut self, stream: &str) {
        let Some(state) = self.streams.get(stream) else {
            return;
        };
        let layers = state
            .channels
            .iter()
            .filter_map(|c| match c {
                Channel::Media { track, layer } if state.joined => Some((*track, *layer)),
                _ => None,
            })
            .collect();
        if let Some(plane) = self.planes.get_mut(stream)
            && !plane.is_publisher()
        {
            plane.set_subscription(std::time::Instant::now(), layers);
        }
    }

    /// Media and feedback published by this node, in trees mode.
    fn publish_on_plane(&mut self, stream: &str, payload: Vec<u8>) {
        let now = std::time::Instant::now();
        let Some(plane) = self.planes.get_mut(stream) else {
            bump(&self.stats.publish_no_peers);
            return;
        };
        match wire::decode(&payload, &self.limits) {
            Ok(Message::Fragment(f)) => {
                let key = ObjectKey {
                    track: f.track,
                    layer: f.layer,
                    sequence: f.sequence,
                    fragment: f.index,
                };
                plane.publish(now, f.epoch, key, payload.into());
                bump(&self.stats.messages_published);
            }
            Ok(Message::Feedback(f)) => plane.set_report(LocalReport {
                track: f.track,
                layer: f.current_layer,
                latency_ms: f.latency_ms,
                received: f.received,
                late: f.late,
                lost: f.lost,
                recovered: f.recovered,
            }),
            Ok(Message::KeyframeRequest(k)) => plane.request_keyframe(now, k.track, k.layer),
            Ok(_) | Err(_) => bump(&self.stats.publish_failures),
        }
        self.drain_planes();
    }

    fn handle_media_event(&mut self, event: MediaEvent) {
        let now = std::time::Instant::now();
        match event {
            MediaEvent::Up { peer, writer } => {
                if self.banned.contains(&peer) || !self.swarm.is_connected(&peer) {
                    return;
                }
                let Some(media) = self.media.as_mut() else {
                    return;
                };
                media.opened(peer, writer);
                self.media_retries.entry(peer).or_default().opened(now);
            }
            MediaEvent::Down { peer } => {
                // Our stream ended while the connection lives on (a race with a second
                // connection, a reset): open another; the data plane keeps the peer and its
                // queue meanwhile. Peers that do not speak the protocol fail again and again:
                // a few tries, then they are dropped from the data plane.
                let retry = self.media_retries.entry(peer).or_default().ended(now);
                if self.swarm.is_connected(&peer) && retry {
                    if let Some(media) = self.media.as_mut() {
                        media.close(&peer);
                        media.open(peer);
                    }
                } else {
                    self.media_down(peer);
                }
            }
            MediaEvent::Frame { peer, bytes } => {
                bump(&self.stats.media_frames_received);
                if self.inbound_loss.as_mut().is_some_and(LossHook::drops) {
                    bump(&self.stats.messages_dropped_by_hook);
                    return;
                }
                let Some(stream) = peek_stream_tag(&bytes).and_then(|tag| self.tags.get(&tag))
                else {
                    return;
                };
                if let Some(plane) = self.planes.get_mut(stream) {
                    plane.handle_message(now, peer, bytes);
                }
            }
        }
        self.drain_planes();
    }

    fn media_down(&mut self, peer: PeerId) {
        self.media_retries.remove(&peer);
        if let Some(media) = self.media.as_mut() {
            media.close(&peer);
        }
        let now = std::time::Instant::now();
        for plane in self.planes.values_mut() {
            plane.handle_peer_down(now, peer);
        }
        self.drain_planes();
    }

    fn plane_deadline(&self) -> Instant {
        let now = Instant::now();
        let mut next = now + MAINTENANCE_PERIOD;
        for plane in self.planes.values() {
            next = next.min(Instant::from_std(plane.poll_timeout()));
            if plane.has_queued() {
                next = next.min(now + MEDIA_FLUSH);
            }
        }
        next
    }

    fn plane_timeout(&mut self) {
        let now = std::time::Instant::now();
        for plane in self.planes.values_mut() {
            if plane.poll_timeout() <= now {
                plane.handle_timeout(now);
            }
        }
        self.drain_planes();
        if let Ok(mut stats) = self.stats.data_plane.lock() {
            *stats = self.planes.values().next().map(DataPlane::stats);
        }
    }

    /// Hands queued data-plane messages to the peers' writers while they have room.
    fn flush_media(&mut self) {
        let Some(media) = self.media.as_ref() else {
            return;
        };
        let now = std::time::Instant::now();
        for plane in self.planes.values_mut() {
            if !plane.has_queued() {
                continue;
            }
            for peer in plane.peers_with_data() {
                let Some(writer) = media.writers.get(&peer) else {
                    continue;
                };
                while let Ok(permit) = writer.try_reserve() {
                    match plane.poll_transmit(now, peer) {
                        Some(bytes) => {
                            bump(&self.stats.media_frames_sent);
                            permit.send(bytes);
                        }
                        None => break,
                    }
                }
            }
        }
    }

    /// Acts on what the data planes ask for.
    fn drain_planes(&mut self) {
        let mut outputs = Vec::new();
        for (stream, plane) in &mut self.planes {
            while let Some(output) = plane.poll_output() {
                outputs.push((stream.clone(), output));
            }
        }
        for (stream, output) in outputs {
            match output {
                Output::Deliver { key, object, from } => {
                    let Some(publisher) = self.streams.get(&stream).and_then(|s| s.publisher)
                    else {
                        continue;
                    };
                    match wire::decode(&object, &self.limits) {
                        Ok(message) => {
                            let channel = Channel::Media {
                                track: key.track,
                                layer: key.layer,
                            };
                            if Channel::of(&message) != channel {
                                bump(&self.stats.messages_rejected);
                                continue;
                            }
                            bump(&self.stats.messages_accepted);
                            self.events.message(Event::Message {
                                stream,
                                channel,
                                source: publisher,
                                propagation_source: from,
                                message,
                            });
                        }
                        // Signed by the publisher yet undecodable: its bug, not a relay's.
                        Err(_) => bump(&self.stats.messages_rejected),
                    }
                }
                Output::Connect { peer, info } => {
                    if self.banned.contains(&peer)
                        || self.swarm.is_connected(&peer)
                        || self.dialing.contains(&peer)
                    {
                        continue;
                    }
                    let addrs = decode_info(&info);
                    let opts = DialOpts::peer_id(peer)
                        .addresses(addrs)
                        .extend_addresses_through_behaviour()
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    match self.swarm.dial(opts) {
                        Ok(()) => {
                            self.dialing.insert(peer);
                        }
                        Err(err) => tracing::debug!(%peer, %err, "cannot dial redirect target"),
                    }
                }
                Output::Disconnect { peer, reason } => {
                    tracing::warn!(%peer, ?reason, %stream, "peer misbehaved on the data plane: disconnected");
                    bump(&self.stats.peers_banned);
                    self.banned.insert(peer);
                    let _ = self.swarm.disconnect_peer_id(peer);
                    if let Some(media) = self.media.as_mut() {
                        media.close(&peer);
                    }
                    let now = std::time::Instant::now();
                    for plane in self.planes.values_mut() {
                        plane.handle_peer_down(now, peer);
                    }
                }
                Output::Audience(summary) => {
                    self.events.control(Event::Audience { stream, summary });
                }
                Output::KeyframeRequest {
                    epoch,
                    track,
                    layer,
                } => {
                    let own = self.peer_id;
                    self.events.message(Event::Message {
                        stream,
                        channel: Channel::Feedback,
                        source: own,
                        propagation_source: own,
                        message: Message::KeyframeRequest(wire::KeyframeRequest {
                            epoch,
                            track,
                            layer,
                            ..Default::default()
                        }),
                    });
                }
            }
        }
    }

    /// Beyond `max_peers`, closes connections that are no tree edge (bootstrap peers kept).
    fn bound_connections(&mut self) {
        if self.mode != DataPlaneMode::Trees {
            return;
        }
        let connected: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        let Some(excess) = connected.len().checked_sub(self.max_peers) else {
            return;
        };
        let spare: Vec<PeerId> = connected
            .into_iter()
            .filter(|p| !self.planes.values().any(|plane| plane.is_tree_neighbour(p)))
            .filter(|p| !self.bootstrap.iter().any(|(b, _)| b == p))
            .take(excess)
            .collect();
        for peer in spare {
            tracing::debug!(%peer, "closing a connection that is no tree edge");
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    // ---- listening ------------------------------------------------------------------------

    fn schedule_listening(&mut self) {
        let all_ready = self.listeners.values().all(|addrs| !addrs.is_empty());
        let at = if all_ready || self.announced_addrs.is_some() {
            Instant::now() + LISTENING_DEBOUNCE
        } else {
            self.listening_deadline
        };
        self.listening_flush = Some(self.listening_flush.map_or(at, |t| t.min(at)));
    }

    fn flush_listening(&mut self) {
        self.listening_flush = None;
        let own_id = self.peer_id;
        let addrs: Vec<Multiaddr> = self
            .listeners
            .values()
            .flatten()
            .map(|addr| addr.clone().with_p2p(own_id).unwrap_or_else(|addr| addr))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if self.announced_addrs.as_ref() == Some(&addrs) {
            return;
        }
        let shown: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        tracing::info!(peer_id = %own_id, addrs = ?shown, "listening");
        if let Ok(mut stats_addrs) = self.stats.listen_addrs.lock() {
            stats_addrs.clone_from(&addrs);
        }
        self.announced_addrs = Some(addrs.clone());
        self.events.control(Event::Listening { addrs });
    }

    // ---- housekeeping ---------------------------------------------------------------------

    fn maintenance(&mut self) {
        self.bound_connections();
        self.reserve_relays();
        // Bootstrap peers are dialled again whenever we lost them.
        for index in 0..self.bootstrap.len() {
            let (peer, addrs) = &self.bootstrap[index];
            let peer = *peer;
            if self.swarm.is_connected(&peer) {
                continue;
            }
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs.clone())
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            if let Err(err) = self.swarm.dial(opts) {
                tracing::trace!(%peer, %err, "bootstrap redial not started");
            }
        }

        // Joined streams look for more peers while under-connected.
        let connected = self.swarm.connected_peers().count();
        if connected >= self.max_dialed_peers {
            return;
        }
        let now = Instant::now();
        let due: Vec<String> = self
            .streams
            .iter()
            .filter(|(_, state)| state.joined && state.next_lookup.is_none_or(|at| at <= now))
            .map(|(stream, _)| stream.clone())
            .collect();
        for stream in due {
            self.lookup_providers(&stream);
        }
    }
}

/// The stream tag of a data-plane message without decoding it (field 1, fixed32, first).
/// Whether a connection's remote address goes through a relay.
fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2pCircuit))
}

fn peek_stream_tag(bytes: &[u8]) -> Option<u32> {
    match bytes {
        [0x0d, a, b, c, d, ..] => Some(u32::from_le_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// Re-opens of our media stream to one peer while connected: at most [`MEDIA_RETRIES`] in a
/// row, so a peer that does not speak the protocol is dropped from the data plane; a stream
/// that stayed open [`MEDIA_STEADY`] starts the count over, so resets spread over a long
/// connection (a reset now and then over hours) never drop a working peer.
#[derive(Debug, Default)]
struct MediaRetries {
    tries: u32,
    up_since: Option<std::time::Instant>,
}

impl MediaRetries {
    fn opened(&mut self, now: std::time::Instant) {
        self.up_since = Some(now);
    }

    /// Our stream ended: whether to open another.
    fn ended(&mut self, now: std::time::Instant) -> bool {
        if self
            .up_since
            .take()
            .is_some_and(|at| now.saturating_duration_since(at) >= MEDIA_STEADY)
        {
            self.tries = 0;
        }
        self.tries += 1;
        self.tries <= MEDIA_RETRIES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streams that fail at once are re-opened three times; streams that worked a while are
    /// re-opened however often they end (before, the fourth end over a connection's whole
    /// life dropped the peer from the data plane).
    #[test]
    fn media_streams_that_worked_are_reopened_however_often_they_end() {
        let start = std::time::Instant::now();
        let mut failing = MediaRetries::default();
        let ends: Vec<bool> = (0..5).map(|_| failing.ended(start)).collect();
        assert_eq!(ends, [true, true, true, false, false]);

        let mut working = MediaRetries::default();
        for hour in 0..10u64 {
            let opened = start + Duration::from_secs(3600 * hour);
            working.opened(opened);
            assert!(working.ended(opened + MEDIA_STEADY), "end {hour}");
        }
        // Short-lived again: the count runs from the last working stream's end (the first
        // re-open), so two more re-opens.
        let later = start + Duration::from_secs(3600 * 11);
        let ends: Vec<bool> = (0..3)
            .map(|i| {
                working.opened(later + Duration::from_secs(i));
                working.ended(later + Duration::from_secs(i) + Duration::from_millis(10))
            })
            .collect();
        assert_eq!(ends, [true, true, false]);
    }

    #[test]
    fn stream_tag_is_read_without_decoding() {
        use prost::Message as _;
        let bytes = crate::proto::DpMessage {
            stream: stream_tag("demo"),
            body: Some(crate::proto::dp_message::Body::Leave(
                crate::proto::DpLeave { stripe: 3 },
            )),
        }
        .encode_to_vec();
        assert_eq!(peek_stream_tag(&bytes), Some(stream_tag("demo")));
        assert_eq!(peek_stream_tag(&[1, 2]), None);
    }

    #[test]
    fn peer_info_round_trips_and_tolerates_garbage() {
        let addrs: Vec<Multiaddr> = vec![
            "/ip4/127.0.0.1/tcp/4001".parse().unwrap(),
            "/ip6/::1/udp/4001/quic-v1".parse().unwrap(),
        ];
        assert_eq!(decode_info(&encode_info(&addrs)), addrs);
        assert!(decode_info(&[200, 1, 2]).is_empty());
        let peer = PeerId::from(Keypair::generate_ed25519().public());
        assert!(verifying_key(&peer).is_some());
    }

    fn sink(capacity: usize) -> (EventSink, mpsc::Receiver<Event>, Arc<NodeStats>) {
        let (tx, rx) = mpsc::channel(capacity);
        let stats = Arc::new(NodeStats::default());
        let sink = EventSink {
            tx,
            pending: VecDeque::new(),
            closed: false,
            stats: stats.clone(),
        };
        (sink, rx, stats)
    }

    fn message(source: PeerId, sequence: u64) -> Event {
        Event::Message {
            stream: "s".into(),
            channel: Channel::Media { track: 0, layer: 0 },
            source,
            propagation_source: source,
            message: Message::Fragment(wire::Fragment {
                sequence,
                count: 1,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn full_channel_drops_media_but_keeps_control_events_in_order() {
        let (mut sink, mut rx, stats) = sink(2);
        let peer = PeerId::random();
        let locked = Event::PublisherLocked {
            stream: "s".into(),
            publisher: peer,
        };
        sink.message(message(peer, 0));
        sink.message(message(peer, 1));
        sink.message(message(peer, 2)); // channel full: dropped
        sink.control(Event::PeersChanged { connected: 1 });
        sink.control(locked.clone());
        sink.control(Event::PeersChanged { connected: 2 }); // replaces the queued one
        sink.message(message(peer, 3)); // must not overtake the queued control events
        assert_eq!(stats.events_dropped.load(Ordering::Relaxed), 2);
        assert_eq!(sink.pending.len(), 2);

        assert_eq!(rx.try_recv().unwrap(), message(peer, 0));
        assert_eq!(rx.try_recv().unwrap(), message(peer, 1));
        sink.flush();
        assert_eq!(rx.try_recv().unwrap(), Event::PeersChanged { connected: 2 });
        assert_eq!(rx.try_recv().unwrap(), locked);
        assert!(sink.pending.is_empty());
        sink.message(message(peer, 4));
        assert_eq!(rx.try_recv().unwrap(), message(peer, 4));
        assert_eq!(stats.events_dropped.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn loss_hook_follows_a_share_changed_while_running() {
        let mut hook = LossHook::new(crate::node::InboundLoss {
            share: 0.0,
            seed: 3,
        });
        let share = hook.share_handle();
        assert!((0..1000).all(|_| !hook.drops()));
        share.store(1.0f64.to_bits(), Ordering::Relaxed);
        assert!((0..1000).all(|_| hook.drops()));
        share.store(0.0f64.to_bits(), Ordering::Relaxed);
        assert!((0..1000).all(|_| !hook.drops()));
    }

    #[test]
    fn loss_hook_drops_the_configured_share_deterministically() {
        let draw = |share: f64, seed: u64| -> Vec<bool> {
            let mut hook = LossHook::new(crate::node::InboundLoss { share, seed });
            (0..10_000).map(|_| hook.drops()).collect()
        };
        let dropped = draw(0.2, 7).iter().filter(|d| **d).count();
        assert!((1_800..=2_200).contains(&dropped), "{dropped} of 10000");
        assert_eq!(draw(0.2, 7), draw(0.2, 7));
        assert_ne!(draw(0.2, 7), draw(0.2, 8));
        assert!(draw(0.0, 1).iter().all(|d| !d));
        assert!(draw(1.0, 1).iter().all(|d| *d));
    }

    #[test]
    fn closed_channel_is_not_counted_as_drops() {
        let (mut sink, rx, stats) = sink(1);
        drop(rx);
        sink.message(message(PeerId::random(), 0));
        sink.control(Event::PeersChanged { connected: 1 });
        assert!(sink.closed);
        assert!(sink.pending.is_empty());
        assert_eq!(stats.events_dropped.load(Ordering::Relaxed), 0);
    }
}
