//! The libp2p node: one tokio task owns the [`libp2p::Swarm`] and talks to the rest of the
//! process through bounded channels only — a command queue in, an [`Event`] channel out.
//!
//! - Transports: QUIC and TCP (noise + yamux).
//! - Data plane: gossipsub with strict signing; the node validates every received message
//!   itself (topic, wire decoding, author) before gossipsub relays it, so a viewer only ever
//!   forwards what its stream's publisher signed.
//! - Discovery: bootstrap addresses, kademlia (`/p2plive/kad/1.0.0`, stream announcements
//!   under [`crate::core::wire::provider_key`]) fed by identify, and optionally mDNS.
//!
//! The node does not depend on GStreamer: elements, the headless node binary and benchmarks
//! all use it the same way.

mod accept;
mod behaviour;
mod config;
mod error;
mod event_loop;
mod identity;
mod media;
mod ping;
mod stats;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, watch};

pub use behaviour::PEER_SEND_QUEUE_BYTES;
pub use config::{
    DEFAULT_EVENT_CAPACITY, DEFAULT_MAX_DIALED_PEERS, DEFAULT_MAX_PEERS, DEFAULT_MAX_TRANSMIT_SIZE,
    DEFAULT_PUBLISH_CAPACITY, DataPlaneMode, GossipsubProfile, InboundLoss, NodeConfig,
    PreSharedKey, RelayServerConfig, default_listen, default_tcp_listen, load_psk, parse_bootstrap,
    parse_multiaddrs, repair_delay_for_playout,
};
pub use error::NodeError;
pub use identity::load_or_create_identity;
pub use stats::{NodeStatsSnapshot, Reachability};

use crate::core::{Channel, Message};
use event_loop::{Command, EventLoop, Publish};
use stats::NodeStats;

/// Capacity of the queue of stream commands (announce, join, subscribe, unsubscribe), kept
/// apart from the publish queue so that media cannot starve them.
const COMMAND_CAPACITY: usize = 256;

/// What the node reports to its owner.
// Nearly every event is a `Message`: boxing it would add an allocation per message and save
// nothing on the rare small variants.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Once every configured listener has at least one address (or after 1 s with what there
    /// is); again whenever the set changes. Addresses are full and dialable, ending in
    /// `/p2p/<own id>`.
    Listening { addrs: Vec<Multiaddr> },
    /// A validated message of a joined stream, authored by its publisher.
    Message {
        stream: String,
        channel: Channel,
        /// The author (the stream's publisher).
        source: PeerId,
        /// The peer this first copy arrived from (this node's own id for its own publishes).
        propagation_source: PeerId,
        message: Message,
    },
    /// The publisher of `stream` was locked in on its first valid catalog (trust on first use).
    PublisherLocked { stream: String, publisher: PeerId },
    /// The number of connected peers changed.
    PeersChanged { connected: usize },
    /// A bootstrap peer could not be reached (reported once until it connects); `reason` is
    /// the whole error chain, with a hint when a private-network key may be the cause. The
    /// node keeps redialling it.
    BootstrapUnreachable { peer: PeerId, reason: String },
    /// Publisher side, [`DataPlaneMode::Trees`]: the whole audience of `stream`, merged up
    /// the feedback tree, once per second.
    Audience {
        stream: String,
        summary: crate::core::dataplane::Summary,
    },
}

/// A handle on a running node. Cheap to clone; the node stops when [`Node::shutdown`] is called
/// or when every handle is dropped.
#[derive(Clone)]
pub struct Node {
    commands: mpsc::Sender<Command>,
    publishes: mpsc::Sender<Publish>,
    shutdown: Arc<watch::Sender<Option<Duration>>>,
    stopped: watch::Receiver<bool>,
    peer_id: PeerId,
    stats: Arc<NodeStats>,
    max_stream_len: usize,
    /// `f64` bits of the inbound loss share (test and benchmark hook).
    inbound_loss: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("peer_id", &self.peer_id)
            .field("stopping", &self.stats.stopping.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Builds the swarm, starts listening and dialling, spawns the event loop on `runtime`.
    /// Configuration errors (bad listen or bootstrap address, port in use) are returned here.
    pub fn spawn(
        config: NodeConfig,
        runtime: &tokio::runtime::Handle,
    ) -> Result<(Node, mpsc::Receiver<Event>), NodeError> {
        config.validate()?;
        let peer_id = config.keypair.public().to_peer_id();

        // Bootstrap addresses grouped by peer, each without its /p2p suffix.
        let mut bootstrap: BTreeMap<PeerId, Vec<Multiaddr>> = BTreeMap::new();
        for addr in &config.bootstrap {
            let peer = config::bootstrap_peer(addr)?;
            if peer == peer_id {
                return Err(NodeError::BootstrapIsSelf {
                    addr: addr.to_string(),
                });
            }
            check_dialable(addr)?;
            bootstrap
                .entry(peer)
                .or_default()
                .push(config::without_peer_id(addr));
        }

        // Transports create their sockets and tasks in the runtime's context.
        let _guard = runtime.enter();
        let mut registry = libp2p::metrics::Registry::default();
        let mut swarm = behaviour::build_swarm(&config, &mut registry)?;
        let metrics = libp2p::metrics::Metrics::new(&mut registry);

        let mut listeners = HashMap::new();
        for addr in &config.listen {
            check_port_free(addr)?;
            let id = swarm
                .listen_on(addr.clone())
                .map_err(|err| NodeError::Listen {
                    addr: addr.to_string(),
                    reason: error_chain(&err),
                })?;
            listeners.insert(id, Default::default());
        }

        for addr in &config.external_addrs {
            swarm.add_external_address(addr.clone());
        }

        let bootstrap: Vec<(PeerId, Vec<Multiaddr>)> = bootstrap.into_iter().collect();
        if let Some(kademlia) = swarm.behaviour_mut().kademlia.as_mut() {
            for (peer, addrs) in &bootstrap {
                for addr in addrs {
                    kademlia.add_address(peer, addr.clone());
                }
            }
        }
        for (peer, addrs) in &bootstrap {
            let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(*peer)
                .addresses(addrs.clone())
                .condition(libp2p::swarm::dial_opts::PeerCondition::DisconnectedAndNotDialing)
                .build();
            swarm.dial(opts).map_err(|err| NodeError::Dial {
                addr: format!("{}/p2p/{peer}", addrs[0]),
                reason: error_chain(&err),
            })?;
        }
        if !bootstrap.is_empty()
            && let Some(kademlia) = swarm.behaviour_mut().kademlia.as_mut()
        {
            // Fills the routing table; without known peers there is nothing to do yet.
            let _ = kademlia.bootstrap();
        }

        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_CAPACITY);
        let (publishes_tx, publishes_rx) = mpsc::channel(config.publish_capacity);
        let (events_tx, events_rx) = mpsc::channel(config.event_capacity);
        let (shutdown_tx, shutdown_rx) = watch::channel(None);
        let (stopped_tx, stopped_rx) = watch::channel(false);
        let stats = Arc::new_cyclic(|stats| {
            registry.register_collector(Box::new(stats::Collector(stats.clone())));
            NodeStats {
                bandwidth: std::sync::Mutex::new(registry),
                ..NodeStats::default()
            }
        });

        // Always present, so the share can be changed later; a zero share drops nothing.
        let loss_hook = event_loop::LossHook::new(config.inbound_loss.unwrap_or(InboundLoss {
            share: 0.0,
            seed: rand::random(),
        }));
        let inbound_loss = loss_hook.share_handle();
        tracing::info!(%peer_id, mdns = config.mdns, kademlia = config.kademlia, "p2plive node starting");
        let event_loop = EventLoop::new(event_loop::Parts {
            swarm,
            peer_id,
            commands: commands_rx,
            publishes: publishes_rx,
            shutdown: shutdown_rx,
            stopped: stopped_tx,
            events: events_tx,
            stats: stats.clone(),
            limits: config.limits.clone(),
            max_dialed_peers: config.max_dialed_peers,
            inbound_loss: Some(loss_hook),
            listeners,
            bootstrap,
            data_plane: config.data_plane,
            upload_capacity_kbps: config.upload_capacity_kbps,
            repair_delay: config.repair_delay,
            max_peers: config.max_peers,
            keypair: config.keypair.clone(),
            metrics,
            psk_fingerprint: config.psk.map(|psk| psk.fingerprint().to_string()),
        })?;
        runtime.spawn(event_loop.run());

        let node = Node {
            commands: commands_tx,
            publishes: publishes_tx,
            shutdown: Arc::new(shutdown_tx),
            stopped: stopped_rx,
            peer_id,
            stats,
            max_stream_len: config.limits.max_topic_len,
            inbound_loss,
        };
        Ok((node, events_rx))
    }

    /// This node's peer id: the author id of everything it publishes.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Queues `payload` for publication on `channel` of `stream`. Never blocks: fails if the
    /// publish queue is full or the node stopped (the caller counts failures).
    pub fn publish(
        &self,
        stream: &str,
        channel: Channel,
        payload: Vec<u8>,
    ) -> Result<(), NodeError> {
        self.check_stream(stream)?;
        let publish = Publish {
            stream: stream.to_owned(),
            channel,
            payload,
        };
        self.publishes.try_send(publish).map_err(|err| match err {
            mpsc::error::TrySendError::Full(_) => {
                stats::bump(&self.stats.publish_queue_full);
                NodeError::QueueFull
            }
            mpsc::error::TrySendError::Closed(_) => NodeError::Stopped,
        })
    }

    /// Publisher side: announces `stream` in the DHT and subscribes its control channel.
    pub fn announce_stream(&self, stream: &str) -> Result<(), NodeError> {
        self.check_stream(stream)?;
        self.command(Command::Announce {
            stream: stream.to_owned(),
        })
    }

    /// Viewer side: subscribes to `channels` of `stream` (the control channel always).
    /// Only messages authored by `publisher` are accepted; with `None`, the author of the first
    /// valid catalog is locked in and [`Event::PublisherLocked`] emitted. The node also
    /// announces itself as a provider of the stream and dials other providers (up to
    /// [`NodeConfig::max_dialed_peers`] connections), so that viewers relay to each other.
    pub fn join_stream(
        &self,
        stream: &str,
        publisher: Option<PeerId>,
        channels: Vec<Channel>,
    ) -> Result<(), NodeError> {
        self.check_stream(stream)?;
        self.command(Command::Join {
            stream: stream.to_owned(),
            publisher,
            channels,
        })
    }

    /// Subscribes one more channel of `stream`. On a stream not joined yet, this joins it
    /// without a known publisher (trust on first use).
    pub fn subscribe(&self, stream: &str, channel: Channel) -> Result<(), NodeError> {
        self.check_stream(stream)?;
        self.command(Command::Subscribe {
            stream: stream.to_owned(),
            channel,
        })
    }

    /// Unsubscribes one channel of `stream`; leaving the last channel leaves the stream.
    pub fn unsubscribe(&self, stream: &str, channel: Channel) -> Result<(), NodeError> {
        self.check_stream(stream)?;
        self.command(Command::Unsubscribe {
            stream: stream.to_owned(),
            channel,
        })
    }

    /// Stops the node: publishes already queued are still handed to gossipsub, and the swarm
    /// is driven up to `linger` more (less if no peer is connected) so they go out; then every
    /// connection is closed and the event channel ends. Idempotent; later calls change nothing.
    pub fn shutdown(&self, linger: Duration) {
        self.stats.stopping.store(true, Ordering::Relaxed);
        self.shutdown.send_if_modified(|state| {
            if state.is_none() {
                *state = Some(linger);
                true
            } else {
                false
            }
        });
    }

    /// Completes once the event loop has ended (after [`Node::shutdown`] and its linger).
    pub async fn stopped(&self) {
        let mut stopped = self.stopped.clone();
        // An error means the loop is gone, which is what we wait for.
        let _ = stopped.wait_for(|stopped| *stopped).await;
    }

    /// Whether the event loop is still running.
    pub fn is_running(&self) -> bool {
        !self.stats.stopped.load(Ordering::Relaxed) && !self.publishes.is_closed()
    }

    /// Test and benchmark hook: from now on drop this share (`0.0..=1.0`, clamped) of the
    /// messages received, as a lossy link would. 0 stops dropping.
    pub fn set_inbound_loss(&self, share: f64) {
        let share = if share.is_nan() {
            0.0
        } else {
            share.clamp(0.0, 1.0)
        };
        self.inbound_loss.store(share.to_bits(), Ordering::Relaxed);
    }

    /// The node's metrics in the Prometheus (OpenMetrics) text format: libp2p's (bytes per
    /// transport protocol stack and direction, connections, identify, kademlia, DCUtR,
    /// gossipsub, relay) and p2plive's own (`p2plive_*`: peers, streams, relay reservations
    /// and circuits, media messages).
    pub fn encode_metrics(&self) -> String {
        let mut text = String::new();
        if let Ok(registry) = self.stats.bandwidth.lock() {
            // Writing into a String cannot fail.
            let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        }
        text
    }

    /// Current counters.
    pub fn stats(&self) -> NodeStatsSnapshot {
        self.stats.snapshot(self.peer_id)
    }

    fn command(&self, command: Command) -> Result<(), NodeError> {
        if self.stats.stopping.load(Ordering::Relaxed) {
            return Err(NodeError::Stopped);
        }
        self.commands.try_send(command).map_err(|err| match err {
            mpsc::error::TrySendError::Full(_) => NodeError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => NodeError::Stopped,
        })
    }

    fn check_stream(&self, stream: &str) -> Result<(), NodeError> {
        if self.stats.stopping.load(Ordering::Relaxed) {
            return Err(NodeError::Stopped);
        }
        let reason = if stream.is_empty() {
            "empty".to_owned()
        } else if stream.len() > self.max_stream_len {
            format!("longer than {} bytes", self.max_stream_len)
        } else {
            return Ok(());
        };
        Err(NodeError::InvalidStream {
            name: stream.to_owned(),
            reason,
        })
    }
}

/// Only IP addresses over TCP or QUIC v1 can be dialled by this node's transports.
fn check_dialable(addr: &Multiaddr) -> Result<(), NodeError> {
    let mut protocols = addr.iter();
    let ip = matches!(protocols.next(), Some(Protocol::Ip4(_) | Protocol::Ip6(_)));
    let transport = match protocols.next() {
        Some(Protocol::Tcp(_)) => true,
        Some(Protocol::Udp(_)) => matches!(protocols.next(), Some(Protocol::QuicV1)),
        _ => false,
    };
    if ip && transport {
        Ok(())
    } else {
        Err(NodeError::Dial {
            addr: addr.to_string(),
            reason: "unsupported address: expected /ip4 or /ip6, then /tcp/<port> or \
                     /udp/<port>/quic-v1"
                .into(),
        })
    }
}

/// Refuses a TCP listen address whose port another socket already listens on.
///
/// libp2p-tcp binds its listeners with `SO_REUSEPORT` (TCP hole punching dials from the
/// listening port), so a second node given the same `/tcp/<port>` (another `p2plivesink`
/// started with the same `listen` property, in this process or another of the same user)
/// would bind it too, and Linux would share the incoming connections between the two: some
/// viewers would find the wrong publisher. A plain bind (no `SO_REUSEPORT`) of the same
/// address fails with `AddrInUse` exactly when such a listener exists, and is closed at once.
/// Port 0 (any free port) and other addresses are left to the transport.
///
/// # Errors
///
/// [`NodeError::Listen`] when the port is in use.
fn check_port_free(addr: &Multiaddr) -> Result<(), NodeError> {
    let mut protocols = addr.iter();
    let ip: std::net::IpAddr = match protocols.next() {
        Some(Protocol::Ip4(ip)) => ip.into(),
        Some(Protocol::Ip6(ip)) => ip.into(),
        _ => return Ok(()),
    };
    let Some(Protocol::Tcp(port)) = protocols.next() else {
        return Ok(());
    };
    if port == 0 {
        return Ok(());
    }
    match std::net::TcpListener::bind((ip, port)) {
        Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => Err(NodeError::Listen {
            addr: addr.to_string(),
            reason: format!(
                "TCP port {port} is in use (by another node or program, or by an earlier \
                 address of this listen list): {err}"
            ),
        }),
        // Anything else (an address not on this host, say) is the transport's to report.
        _ => Ok(()),
    }
}

/// An error and its sources, on one line.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        let next = err.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = err.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ip_tcp_and_quic_addresses_are_dialable() {
        for ok in ["/ip4/127.0.0.1/tcp/1", "/ip6/::1/udp/1/quic-v1"] {
            assert!(check_dialable(&ok.parse().unwrap()).is_ok(), "{ok}");
        }
        for bad in [
            "/dns4/example.com/tcp/1",
            "/ip4/127.0.0.1/udp/1",
            "/ip4/127.0.0.1/udp/1/quic",
        ] {
            let err = check_dialable(&bad.parse().unwrap()).unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }
}
