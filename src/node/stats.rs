//! Counters shared between the event loop and every [`super::Node`] handle.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use libp2p::{Multiaddr, PeerId};

/// Live counters, written by the event loop (and by handles for queue-full publishes).
#[derive(Debug, Default)]
pub(crate) struct NodeStats {
    pub connected_peers: AtomicUsize,
    pub messages_received: AtomicU64,
    pub messages_accepted: AtomicU64,
    pub messages_rejected: AtomicU64,
    pub messages_ignored: AtomicU64,
    pub messages_not_joined: AtomicU64,
    pub messages_before_lock: AtomicU64,
    pub events_dropped: AtomicU64,
    pub messages_published: AtomicU64,
    pub publish_failures: AtomicU64,
    pub publish_no_peers: AtomicU64,
    pub publish_queue_full: AtomicU64,
    pub slow_peer_reports: AtomicU64,
    pub send_queue_drops: AtomicU64,
    pub messages_dropped_by_hook: AtomicU64,
    pub media_frames_received: AtomicU64,
    pub media_frames_sent: AtomicU64,
    pub peers_banned: AtomicU64,
    /// Streams this node takes part in (published, joined or forwarded).
    pub streams: AtomicUsize,
    /// Circuit relay v2 service: reservations and circuits held now.
    pub relay_reservations: AtomicUsize,
    pub relay_circuits: AtomicUsize,
    /// AutoNAT's verdict: 0 unknown, 1 public, 2 private (behind a NAT or firewall).
    pub reachability: AtomicUsize,
    /// Relayed connections upgraded to direct ones by hole punching (DCUtR), and attempts
    /// that failed.
    pub hole_punches: AtomicU64,
    pub hole_punch_failures: AtomicU64,
    /// The data plane's counters (trees mode, the first stream's), refreshed on its timers.
    pub data_plane: Mutex<Option<crate::core::dataplane::DataPlaneStats>>,
    /// libp2p's bandwidth metrics of the node's transports (see `behaviour::build_swarm`).
    pub bandwidth: Mutex<libp2p::metrics::Registry>,
    pub listen_addrs: Mutex<Vec<Multiaddr>>,
    /// Set by `shutdown` (refuses further commands) and when the loop ends.
    pub stopping: AtomicBool,
    /// Set when the event loop has ended.
    pub stopped: AtomicBool,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A copy of a node's counters at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatsSnapshot {
    pub peer_id: PeerId,
    /// Peers with at least one open connection.
    pub connected_peers: usize,
    /// Full listen addresses (ending in `/p2p/<own id>`), as last announced by
    /// [`super::Event::Listening`].
    pub listen_addrs: Vec<Multiaddr>,
    /// Pubsub messages received from the network (before validation).
    pub messages_received: u64,
    /// Messages that passed validation (and were relayed to the mesh).
    pub messages_accepted: u64,
    /// Messages that do not decode or violate the limits (rejected: not relayed).
    pub messages_rejected: u64,
    /// Messages authored by someone else than the stream's publisher (ignored: not relayed).
    pub messages_ignored: u64,
    /// Messages on a stream or channel this node has not joined (ignored).
    pub messages_not_joined: u64,
    /// Non-catalog messages received before the publisher was locked in (ignored).
    pub messages_before_lock: u64,
    /// Events dropped because the event channel was full.
    pub events_dropped: u64,
    /// Messages handed to gossipsub successfully by [`super::Node::publish`].
    pub messages_published: u64,
    /// Publishes gossipsub refused (duplicate, too large, all peer queues full, ...).
    pub publish_failures: u64,
    /// Publishes not sent because no peer was subscribed to the channel yet.
    pub publish_no_peers: u64,
    /// Publishes refused by [`super::Node::publish`] because the publish queue was full.
    pub publish_queue_full: u64,
    /// Times gossipsub reported a peer too slow to take what we send it.
    pub slow_peer_reports: u64,
    /// Messages not queued for a peer because its send queue was full (see
    /// `PEER_SEND_QUEUE_BYTES`): what a stalled peer missed; nobody else waited for it.
    pub send_queue_drops: u64,
    /// Received messages dropped by the [`super::InboundLoss`] test hook.
    pub messages_dropped_by_hook: u64,
    /// Data-plane frames read from and written to `/p2plive/media/1` streams.
    pub media_frames_received: u64,
    pub media_frames_sent: u64,
    /// Peers disconnected for misbehaving on the data plane (forged, altered or replayed
    /// media, malformed messages).
    pub peers_banned: u64,
    /// Whether other peers can dial this node (AutoNAT).
    pub reachability: Reachability,
    /// Relayed connections upgraded to direct ones by hole punching.
    pub hole_punches: u64,
    /// The data plane's counters (trees mode; the first stream's).
    pub data_plane: Option<crate::core::dataplane::DataPlaneStats>,
    /// Bytes read from the node's connections, all protocols (gossipsub, identify, kademlia,
    /// ping), counted on the multiplexed streams: TCP/IP, noise and yamux (or QUIC) framing
    /// are not included.
    pub bytes_in: u64,
    /// Bytes written to the node's connections, counted like [`Self::bytes_in`].
    pub bytes_out: u64,
}

/// Whether other peers can dial a node, as AutoNAT (libp2p `autonat/autonat-v1.md`) judged
/// from peers that tried to dial it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reachability {
    /// Not probed yet, or no peer could judge.
    #[default]
    Unknown,
    /// Dialled back successfully.
    Public,
    /// Behind a NAT or firewall: the node holds relay reservations instead.
    Private,
}

impl Reachability {
    /// `unknown`, `public` or `private`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reachability::Unknown => "unknown",
            Reachability::Public => "public",
            Reachability::Private => "private",
        }
    }
}

impl NodeStats {
    pub(crate) fn snapshot(&self, peer_id: PeerId) -> NodeStatsSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (bytes_in, bytes_out) = self
            .bandwidth
            .lock()
            .map(|registry| bandwidth_totals(&registry))
            .unwrap_or_default();
        NodeStatsSnapshot {
            peer_id,
            connected_peers: self.connected_peers.load(Ordering::Relaxed),
            listen_addrs: self
                .listen_addrs
                .lock()
                .map(|addrs| addrs.clone())
                .unwrap_or_default(),
            messages_received: load(&self.messages_received),
            messages_accepted: load(&self.messages_accepted),
            messages_rejected: load(&self.messages_rejected),
            messages_ignored: load(&self.messages_ignored),
            messages_not_joined: load(&self.messages_not_joined),
            messages_before_lock: load(&self.messages_before_lock),
            events_dropped: load(&self.events_dropped),
            messages_published: load(&self.messages_published),
            publish_failures: load(&self.publish_failures),
            publish_no_peers: load(&self.publish_no_peers),
            publish_queue_full: load(&self.publish_queue_full),
            slow_peer_reports: load(&self.slow_peer_reports),
            send_queue_drops: load(&self.send_queue_drops),
            messages_dropped_by_hook: load(&self.messages_dropped_by_hook),
            media_frames_received: load(&self.media_frames_received),
            media_frames_sent: load(&self.media_frames_sent),
            peers_banned: load(&self.peers_banned),
            reachability: match self.reachability.load(Ordering::Relaxed) {
                1 => Reachability::Public,
                2 => Reachability::Private,
                _ => Reachability::Unknown,
            },
            hole_punches: load(&self.hole_punches),
            data_plane: self.data_plane.lock().ok().and_then(|s| s.clone()),
            bytes_in,
            bytes_out,
        }
    }
}

/// Name of libp2p's bandwidth counter family (`libp2p_metrics::BandwidthTransport`) in the
/// OpenMetrics text encoding; one counter per protocol stack and direction.
const BANDWIDTH_COUNTER: &str = "libp2p_bandwidth_bytes_total{";

/// Inbound and outbound bytes summed over every protocol stack of `registry`. libp2p's
/// counters are only readable through an encoding, so the registry is encoded as text.
fn bandwidth_totals(registry: &libp2p::metrics::Registry) -> (u64, u64) {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
        return (0, 0);
    }
    let (mut inbound, mut outbound) = (0, 0);
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(BANDWIDTH_COUNTER) else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Ok(value) = value.trim().parse::<u64>() else {
            continue;
        };
        if labels.contains("direction=\"Inbound\"") {
            inbound += value;
        } else if labels.contains("direction=\"Outbound\"") {
            outbound += value;
        }
    }
    (inbound, outbound)
}

/// Exposes a node's own counters on its Prometheus registry, read at each scrape (see
/// `Node::encode_metrics`). Holds the counters weakly: the registry lives inside them.
#[derive(Debug)]
pub(crate) struct Collector(pub std::sync::Weak<NodeStats>);

impl prometheus_client::collector::Collector for Collector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;

        let Some(stats) = self.0.upgrade() else {
            return Ok(());
        };
        let gauges: [(&str, &str, usize); 5] = [
            (
                "p2plive_reachability",
                "AutoNAT's verdict: 0 unknown, 1 public, 2 private.",
                stats.reachability.load(Ordering::Relaxed),
            ),
            (
                "p2plive_connected_peers",
                "Peers with at least one open connection.",
                stats.connected_peers.load(Ordering::Relaxed),
            ),
            (
                "p2plive_streams",
                "Streams this node publishes, plays or forwards.",
                stats.streams.load(Ordering::Relaxed),
            ),
            (
                "p2plive_relay_reservations",
                "Circuit relay v2 reservations held now.",
                stats.relay_reservations.load(Ordering::Relaxed),
            ),
            (
                "p2plive_relay_circuits",
                "Circuit relay v2 circuits open now.",
                stats.relay_circuits.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value as i64);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let counters: [(&str, &str, u64); 8] = [
            (
                "p2plive_hole_punches",
                "Relayed connections upgraded to direct ones (DCUtR).",
                load(&stats.hole_punches),
            ),
            (
                "p2plive_hole_punch_failures",
                "Hole punching attempts that failed (the peers stay relayed).",
                load(&stats.hole_punch_failures),
            ),
            (
                "p2plive_media_frames_received",
                "Data-plane messages read from /p2plive/media/1 streams.",
                load(&stats.media_frames_received),
            ),
            (
                "p2plive_media_frames_sent",
                "Data-plane messages written to /p2plive/media/1 streams.",
                load(&stats.media_frames_sent),
            ),
            (
                "p2plive_pubsub_messages_received",
                "Gossipsub messages received (catalogs, end of stream, feedback).",
                load(&stats.messages_received),
            ),
            (
                "p2plive_pubsub_messages_rejected",
                "Gossipsub messages that did not decode or broke the limits.",
                load(&stats.messages_rejected),
            ),
            (
                "p2plive_peers_banned",
                "Peers disconnected for forged, altered, replayed or malformed media.",
                load(&stats.peers_banned),
            ),
            (
                "p2plive_send_queue_drops",
                "Messages not queued for a peer whose send queue was full.",
                load(&stats.send_queue_drops),
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}
