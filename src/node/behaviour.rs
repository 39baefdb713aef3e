//! The composed libp2p behaviour, its configuration and the swarm construction.

use std::time::Duration;

use libp2p::core::Transport as _;
use libp2p::core::upgrade;
use libp2p::identity::Keypair;
use libp2p::pnet::PnetConfig;
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, Swarm, autonat, dcutr, gossipsub, identify, kad, mdns, noise, relay, tcp, yamux,
};

use super::{GossipsubProfile, NodeConfig, NodeError};
use crate::core::Channel;

/// Kademlia protocol of p2plive's own DHT (kept apart from the public IPFS DHT).
pub(crate) const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/p2plive/kad/1.0.0");
/// Identify protocol version string.
const IDENTIFY_PROTOCOL_VERSION: &str = "/p2plive/1.0.0";
/// Connections nothing keeps alive (no mesh, no query) are closed after this long.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// A QUIC connection that carries nothing for this long (ms) is taken as dead, with a
/// keep-alive packet every `QUIC_KEEP_ALIVE` so that a live one never is. A peer that
/// vanished without closing (a killed process: QUIC has no FIN) was noticed only after
/// libp2p-quic's 10 s, and a viewer whose parents in every stripe it was played nothing
/// until then (10 s and 293 frames lost with `gst-launch-1.0`). The idle timeout in force
/// is the lower of the two peers' (RFC 9000 §10.1).
const QUIC_IDLE_TIMEOUT_MS: u32 = 3000;
const QUIC_KEEP_ALIVE: Duration = Duration::from_secs(1);

/// Gossipsub heartbeat: mesh maintenance and IHAVE gossip. Short, because live media is useless
/// after a second or two and a repair through IHAVE/IWANT must come within that.
pub(crate) const HEARTBEAT: Duration = Duration::from_millis(250);
/// Most topics a remote peer may have us track for it, and per subscription RPC.
const MAX_PEER_TOPICS: usize = 1024;
const MAX_SUBSCRIPTIONS_PER_RPC: usize = 256;
/// Upper bound of one encoded message id in an IHAVE/IWANT: a 38-byte ed25519 peer id, the
/// longest `core::wire::message_id` (72 bytes) and protobuf framing.
const MAX_ENCODED_MESSAGE_ID: usize = 38 + 72 + 2;
/// libp2p-gossipsub 0.50 checks its whole receive buffer against the max transmit size, and
/// that buffer holds the RPC being decoded plus up to one read (8 KiB, asynchronous-codec's
/// read size) of the next: without this slack, a full-size message followed closely by
/// another makes the receiver drop the stream, and every message queued behind it.
const RECEIVE_BUFFER_SLACK: usize = 8 * 1024;
/// rust-libp2p gossipsub's default max transmit size.
const LIBP2P_DEFAULT_MAX_TRANSMIT_SIZE: usize = 65_536;
/// Gossipsub's (default) limit on the control part of one RPC.
const MAX_CONTROL_MESSAGE_SIZE: usize = 16 * 1024;
/// Bytes of messages queued for one connection at most. Gossipsub bounds its per-connection
/// queue by a message count, so the count is this over the largest message: a stalled or
/// frozen peer costs at most this much memory, and the messages beyond it are dropped for
/// that peer alone (counted as `send-queue-drops`). 4 MiB is over 10 s of a 3 Mbit/s stream.
pub const PEER_SEND_QUEUE_BYTES: usize = 4 * 1024 * 1024;
/// Bounds of that count: enough for a keyframe's fragments to every mesh peer even with
/// large messages, never more than ~2 s of small ones at 1000 messages/s.
const PEER_SEND_QUEUE_MIN_MESSAGES: usize = 64;
const PEER_SEND_QUEUE_MAX_MESSAGES: usize = 2048;

/// The per-connection queue length that keeps queued bytes within [`PEER_SEND_QUEUE_BYTES`]
/// for messages of up to `max_transmit_size` bytes (or close, at the minimum count).
pub(crate) fn peer_send_queue_len(max_transmit_size: usize) -> usize {
    (PEER_SEND_QUEUE_BYTES / max_transmit_size.max(1))
        .clamp(PEER_SEND_QUEUE_MIN_MESSAGES, PEER_SEND_QUEUE_MAX_MESSAGES)
}

pub(crate) type Gossipsub = gossipsub::Behaviour<
    gossipsub::IdentityTransform,
    gossipsub::MaxCountSubscriptionFilter<P2pliveTopics>,
>;

/// Only p2plive topics are tracked, for us and for our peers.
#[derive(Debug, Default, Clone)]
pub(crate) struct P2pliveTopics;

impl gossipsub::TopicSubscriptionFilter for P2pliveTopics {
    fn can_subscribe(&mut self, topic_hash: &gossipsub::TopicHash) -> bool {
        Channel::parse(topic_hash.as_str()).is_some()
    }
}

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub gossipsub: Gossipsub,
    pub identify: identify::Behaviour,
    pub kademlia: Toggle<kad::Behaviour<kad::store::MemoryStore>>,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    /// Circuit relay v2 service ([`NodeConfig::relay_server`]).
    pub relay: Toggle<relay::Behaviour>,
    /// Circuit relay v2 client: reserves a slot on a relay when this node is not reachable
    /// (AutoNAT says private), and dials peers through relays.
    pub relay_client: relay::client::Behaviour,
    /// Direct connection upgrade through relay (hole punching, libp2p `relay/DCUtR.md`).
    pub dcutr: dcutr::Behaviour,
    /// AutoNAT v1 (libp2p `autonat/autonat-v1.md`): asks peers to dial back, so the node
    /// learns whether it is reachable; it also answers other peers' probes.
    pub autonat: autonat::Behaviour,
    /// Our outbound streams of `/p2plive/media/1` (see `media`).
    pub media: libp2p_stream::Behaviour,
    /// Inbound `/p2plive/media/1` streams, with the trees data plane only (see `accept`).
    pub media_inbound: Toggle<super::accept::Accept>,
    /// Inbound ping streams (`/ipfs/ping/1.0.0`), answered by `ping::Responder`.
    pub ping: super::accept::Accept,
}

/// The gossipsub configuration of `profile`.
pub(crate) fn gossipsub_config(
    profile: GossipsubProfile,
    max_transmit_size: usize,
) -> Result<gossipsub::Config, NodeError> {
    match profile {
        GossipsubProfile::Media => media_gossipsub_config(max_transmit_size),
        GossipsubProfile::Libp2pDefaults => gossipsub::ConfigBuilder::default()
            // What the node relies on: signed messages, validated by the node before relaying.
            .validation_mode(gossipsub::ValidationMode::Strict)
            .validate_messages()
            // The library's 64 KiB unless more is asked for: its RPCs bundle messages with
            // gossip whose size the media profile bounds and this one does not.
            .max_transmit_size(
                max_transmit_size.max(LIBP2P_DEFAULT_MAX_TRANSMIT_SIZE) + RECEIVE_BUFFER_SLACK,
            )
            .build()
            .map_err(|err| NodeError::Build(format!("gossipsub configuration: {err}"))),
    }
}

/// Gossipsub tuned for live media; see the comments on each setting.
fn media_gossipsub_config(max_transmit_size: usize) -> Result<gossipsub::Config, NodeError> {
    // IHAVE and IWANT lists are sent as one RPC each, which the receiver refuses if larger than
    // its max transmit size or its control-size limit: bound the number of ids accordingly.
    let max_ids = (MAX_CONTROL_MESSAGE_SIZE.min(max_transmit_size) - 1024) / MAX_ENCODED_MESSAGE_ID;
    gossipsub::ConfigBuilder::default()
        // Every message is signed by its author; the node checks the author itself.
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        // Ids from content (epoch/track/layer/sequence/fragment), so copies arriving along
        // different paths are recognised, prefixed by the author so that nobody else can
        // poison the duplicate cache with a legitimate fragment's id.
        .message_id_fn(|message: &gossipsub::Message| {
            let mut id = message.source.map(|p| p.to_bytes()).unwrap_or_default();
            id.extend_from_slice(&crate::core::wire::message_id(&message.data));
            gossipsub::MessageId::new(&id)
        })
        .max_transmit_size(max_transmit_size + RECEIVE_BUFFER_SLACK)
        // Publish into the mesh (or fanout) only: the publisher's upload is D copies, not one
        // per subscriber, and viewers relay.
        .flood_publish(false)
        .heartbeat_interval(HEARTBEAT)
        .heartbeat_initial_delay(Duration::from_millis(50))
        // A modest mesh: each viewer uploads each fragment to ~mesh_n - 1 peers.
        .mesh_n(5)
        .mesh_n_low(4)
        .mesh_n_high(8)
        .mesh_outbound_min(2)
        .gossip_lazy(4)
        .gossip_factor(0.25)
        // Serve IWANTs for 2 s of messages, advertise the last 750 ms in IHAVE: older media is
        // past its playout deadline anyway.
        .history_length(8)
        .history_gossip(3)
        .max_control_messages_sent(max_ids.clamp(16, 5000))
        // One IHAVE per topic per heartbeat; a stream has a control topic and one per layer.
        .max_ihave_messages_heartbeat(32)
        .iwant_followup_time(Duration::from_secs(1))
        // Content ids make late duplicates rare; at ~1000 messages/s this keeps ~30 k ids.
        .duplicate_cache_time(Duration::from_secs(30))
        // IDONTWANT (gossipsub 1.2) for anything bigger than a small control message: nearly
        // every fragment, which saves duplicate transmissions inside the mesh.
        .idontwant_message_size_threshold(1000)
        .idontwant_on_publish(true)
        // Per-connection queues bounded in bytes (see PEER_SEND_QUEUE_BYTES); a stale frame is
        // useless, so forwarded messages expire after 1 s and own publishes after 2 s.
        .connection_handler_queue_len(peer_send_queue_len(max_transmit_size))
        .publish_queue_duration(Duration::from_secs(2))
        .forward_queue_duration(Duration::from_secs(1))
        .prune_backoff(Duration::from_secs(30))
        .build()
        .map_err(|err| NodeError::Build(format!("gossipsub configuration: {err}")))
}

/// AutoNAT probing, quicker than libp2p's defaults (first probe after 15 s, retries every
/// 90 s): a viewer behind a NAT should hold a relay reservation within seconds of joining.
fn autonat_config(config: &NodeConfig) -> autonat::Config {
    autonat::Config {
        boot_delay: Duration::from_secs(2),
        retry_interval: Duration::from_secs(10),
        refresh_interval: Duration::from_secs(300),
        throttle_server_period: Duration::from_secs(15),
        timeout: Duration::from_secs(15),
        // With bootstrap peers (a p2plive-node, or whoever an element was told to join
        // through), probes go to them only: they are connected anyway, and a dial-back from
        // a random discovered peer would add a connection the trees did not ask for.
        // Without (a p2plive-node itself), the connected peers probe: that is how a relay
        // learns the external address its reservations must carry.
        use_connected: config.bootstrap.is_empty(),
        // Private addresses count too: a LAN deployment, or a campus NAT, is reachable to
        // the peers on its side. A server dials back only addresses with the IP it observes
        // the client at (libp2p's rule), so this opens no amplification.
        only_global_ips: false,
        ..autonat::Config::default()
    }
}

fn build_behaviour(
    key: &Keypair,
    relay_client: relay::client::Behaviour,
    config: &NodeConfig,
) -> Result<Behaviour, NodeError> {
    let peer_id = key.public().to_peer_id();
    let gossipsub = Gossipsub::new_with_subscription_filter(
        gossipsub::MessageAuthenticity::Signed(key.clone()),
        gossipsub_config(config.gossipsub_profile, config.max_transmit_size)?,
        gossipsub::MaxCountSubscriptionFilter {
            filter: P2pliveTopics,
            max_subscribed_topics: MAX_PEER_TOPICS,
            max_subscriptions_per_request: MAX_SUBSCRIPTIONS_PER_RPC,
        },
    )
    .map_err(|err| NodeError::Build(format!("gossipsub: {err}")))?;

    let identify = identify::Behaviour::new(
        identify::Config::new(IDENTIFY_PROTOCOL_VERSION.to_owned(), key.public())
            .with_agent_version(format!("p2plive/{}", env!("CARGO_PKG_VERSION")))
            // A relay reservation adds an address: peers (the node's DHT above all) learn
            // it at once rather than at the next identify round (5 min).
            .with_push_listen_addr_updates(true),
    );

    let kademlia = config.kademlia.then(|| {
        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        // Streams come and go: announcements expire within minutes and are refreshed every
        // minute while the stream lives.
        kad_config
            .set_provider_record_ttl(Some(Duration::from_secs(300)))
            .set_provider_publication_interval(Some(Duration::from_secs(60)))
            .set_query_timeout(Duration::from_secs(30));
        let mut kademlia =
            kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
        kademlia.set_mode(Some(kad::Mode::Server));
        kademlia
    });

    let mdns = if config.mdns {
        Some(
            mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)
                .map_err(|err| NodeError::Build(format!("mdns: {err}")))?,
        )
    } else {
        None
    };

    let relay = config.relay_server.map(|limits| {
        let mut relay = relay::Behaviour::new(
            peer_id,
            relay::Config {
                max_reservations: limits.max_reservations,
                max_reservations_per_peer: limits.max_reservations_per_peer,
                reservation_duration: limits.reservation_duration,
                max_circuits: limits.max_circuits,
                max_circuits_per_peer: limits.max_circuits_per_peer,
                max_circuit_duration: limits.max_circuit_duration,
                max_circuit_bytes: limits.max_circuit_bytes,
                // libp2p's per-peer and per-IP rate limits on reservations and circuits.
                ..relay::Config::default()
            },
        );
        // Serve at once: libp2p would wait for a confirmed external address, which a node
        // without AutoNAT or `external_addrs` never gets. The operator asked for a relay.
        relay.set_status(Some(relay::Status::Enable));
        relay
    });

    Ok(Behaviour {
        gossipsub,
        identify,
        kademlia: Toggle::from(kademlia),
        mdns: Toggle::from(mdns),
        relay: Toggle::from(relay),
        relay_client,
        dcutr: dcutr::Behaviour::new(peer_id),
        autonat: autonat::Behaviour::new(peer_id, autonat_config(config)),
        media: libp2p_stream::Behaviour::new(),
        media_inbound: Toggle::from(
            (config.data_plane == super::DataPlaneMode::Trees)
                .then(|| super::accept::Accept::new(super::media::MEDIA_PROTOCOL)),
        ),
        ping: super::accept::Accept::new(super::ping::PING_PROTOCOL),
    })
}

/// What follows the transports, the same for public and private swarms: the relay client,
/// bandwidth metrics, the behaviour, the idle timeout. A macro, because each transport
/// choice gives the builder another type.
macro_rules! finish_swarm {
    ($builder:expr, $config:expr, $bandwidth:expr) => {
        Ok($builder
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|err| NodeError::Build(format!("relay client transport: {err}")))?
            .with_bandwidth_metrics($bandwidth)
            .with_behaviour(|key, relay_client| {
                build_behaviour(key, relay_client, $config)
                    .map_err(|err| Box::new(err) as Box<dyn std::error::Error + Send + Sync>)
            })
            .map_err(|err| NodeError::Build(err.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
            .build())
    };
}

/// Builds the swarm (TCP+noise+yamux and QUIC; TCP+pnet+noise+yamux alone on a private
/// network). Must run inside a tokio runtime context. Every byte read or written on the
/// connections' streams (all protocols) is counted in `bandwidth` (libp2p's bandwidth
/// metrics).
pub(crate) fn build_swarm(
    config: &NodeConfig,
    bandwidth: &mut libp2p::metrics::Registry,
) -> Result<Swarm<Behaviour>, NodeError> {
    if let Some(psk) = config.psk {
        return build_private_swarm(config, psk, bandwidth);
    }
    let builder = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|err| NodeError::Build(format!("tcp transport: {err}")))?
        .with_quic_config(|mut quic| {
            quic.max_idle_timeout = QUIC_IDLE_TIMEOUT_MS;
            quic.keep_alive_interval = QUIC_KEEP_ALIVE;
            quic
        });
    finish_swarm!(builder, config, bandwidth)
}

/// The private-network swarm: every TCP connection runs libp2p's pnet handshake (an
/// XSalsa20 stream keyed by the pre-shared key, libp2p `pnet/README.md`) before noise, so a
/// peer with another key or none fails its protocol negotiation right away.
fn build_private_swarm(
    config: &NodeConfig,
    psk: libp2p::pnet::PreSharedKey,
    bandwidth: &mut libp2p::metrics::Registry,
) -> Result<Swarm<Behaviour>, NodeError> {
    let builder = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_other_transport(|key| {
            let noise = noise::Config::new(key)
                .map_err(|err| Box::new(err) as Box<dyn std::error::Error + Send + Sync>)?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                tcp::tokio::Transport::new(tcp::Config::default())
                    .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                    .upgrade(upgrade::Version::V1)
                    .authenticate(noise)
                    .multiplex(yamux::Config::default())
                    .timeout(PRIVATE_UPGRADE_TIMEOUT),
            )
        })
        .map_err(|err| NodeError::Build(format!("private tcp transport: {err}")))?;
    finish_swarm!(builder, config, bandwidth)
}

/// Time for the TCP connect and the pnet, noise and yamux upgrades of one private
/// connection (what `SwarmBuilder::with_tcp` allows a public one). A peer with another key
/// often fails only by this timeout: its multistream-select reads noise.
const PRIVATE_UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gossipsub_config_builds_for_small_and_large_transmit_sizes() {
        for size in [
            4096,
            super::super::config::DEFAULT_MAX_TRANSMIT_SIZE,
            1 << 20,
        ] {
            let config = gossipsub_config(GossipsubProfile::Media, size).unwrap();
            assert_eq!(config.max_transmit_size(), size + RECEIVE_BUFFER_SLACK);
            // An IHAVE with the most ids we send must fit what a peer with the same
            // configuration accepts.
            assert!(
                config.max_control_messages_sent() * MAX_ENCODED_MESSAGE_ID + 1024
                    <= size.min(MAX_CONTROL_MESSAGE_SIZE)
            );
        }
    }

    #[test]
    fn libp2p_defaults_profile_keeps_the_library_defaults() {
        let config = gossipsub_config(GossipsubProfile::Libp2pDefaults, 20_000).unwrap();
        let defaults = gossipsub::Config::default();
        assert_eq!(
            config.max_transmit_size(),
            defaults.max_transmit_size() + RECEIVE_BUFFER_SLACK
        );
        assert_eq!(config.mesh_n(), defaults.mesh_n());
        assert_eq!(config.mesh_n(), 6);
        assert!(config.flood_publish());
        assert_eq!(config.heartbeat_interval(), defaults.heartbeat_interval());
        assert!(matches!(
            config.validation_mode(),
            gossipsub::ValidationMode::Strict
        ));
        let media = gossipsub_config(GossipsubProfile::Media, 1 << 16).unwrap();
        assert!(!media.flood_publish());
        assert_eq!(media.mesh_n(), 5);
    }

    #[test]
    fn topic_filter_accepts_only_p2plive_topics() {
        use gossipsub::TopicSubscriptionFilter as _;
        let mut filter = P2pliveTopics;
        let ours = gossipsub::IdentTopic::new(Channel::Control.topic("demo")).hash();
        let other = gossipsub::IdentTopic::new("/eth2/beacon_block").hash();
        assert!(filter.can_subscribe(&ours));
        assert!(!filter.can_subscribe(&other));
    }
}
