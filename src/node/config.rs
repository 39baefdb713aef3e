//! Node configuration and the parsers of the address properties the elements expose.

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
pub use libp2p::pnet::PreSharedKey;
use libp2p::{Multiaddr, PeerId};

use super::NodeError;
use crate::core::Limits;

/// Default gossipsub max transmit size: a 16 000-byte fragment plus envelope and pubsub overhead.
pub const DEFAULT_MAX_TRANSMIT_SIZE: usize = 16_000 + 4096;
/// Default capacity of the event channel handed out by [`super::Node::spawn`].
pub const DEFAULT_EVENT_CAPACITY: usize = 4096;
/// Default capacity of the publish queue (about 1 s of a 30 fps stream cut in ~30 fragments).
pub const DEFAULT_PUBLISH_CAPACITY: usize = 1024;
/// Default number of connections the node opens by itself to peers it discovered.
pub const DEFAULT_MAX_DIALED_PEERS: usize = 12;

/// Which gossipsub parameters the node runs with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GossipsubProfile {
    /// Tuned for live media (the default): publish into the mesh only (no flood publish),
    /// mesh degree 5, 250 ms heartbeat, short history, IDONTWANT for fragments. See
    /// `behaviour::gossipsub_config`.
    #[default]
    Media,
    /// rust-libp2p's defaults (mesh degree 6, flood publish on, 1 s heartbeat), with only what
    /// the node needs to work: strict signing, validation by the node, the max transmit size.
    /// The reference point of the mesh benchmark, not meant for deployments.
    Libp2pDefaults,
}

/// Which data plane carries media. Every peer of a stream must use the same one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DataPlaneMode {
    /// Striped push trees with erasure coding over `/p2plive/media/1` (see
    /// [`crate::core::dataplane`]); gossipsub carries only the control channel. About one
    /// copy of the stream down and up per viewer. The default.
    #[default]
    Trees,
    /// Every channel over gossipsub, media included: each viewer receives and relays about
    /// `D` copies. Kept as the benchmark's reference and for peers of older versions.
    Gossipsub,
}

/// Default bound on connected peers in [`DataPlaneMode::Trees`]: up to 16 parents (one per
/// stripe) and 32 children, plus room for the bootstrap and discovery connections.
pub const DEFAULT_MAX_PEERS: usize = 64;

/// Test and benchmark hook: the node drops a share of the pubsub messages it receives, as if
/// every copy of them had been lost on the way. A dropped message is neither delivered nor
/// relayed, and gossipsub treats later copies as duplicates. Drops are counted in
/// [`super::NodeStatsSnapshot::messages_dropped_by_hook`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InboundLoss {
    /// Share of received messages dropped, in `0.0..=1.0`.
    pub share: f64,
    /// Seed of the RNG that picks the dropped messages: equal seeds and inputs drop the same.
    pub seed: u64,
}

/// Everything [`super::Node::spawn`] needs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The node's identity; its peer id is the stream author id of everything it publishes.
    pub keypair: Keypair,
    /// Addresses to listen on. Default: [`default_listen`].
    pub listen: Vec<Multiaddr>,
    /// Peers dialled at start (each address ends in `/p2p/<peer id>`) and added to kademlia.
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the local network with mDNS. Default true.
    pub mdns: bool,
    /// Run the kademlia DHT (stream announcement and discovery). Default true.
    pub kademlia: bool,
    /// Largest gossipsub message (payload plus pubsub framing). Default
    /// [`DEFAULT_MAX_TRANSMIT_SIZE`]. Gossipsub is given 8 KiB more, because libp2p-gossipsub
    /// 0.50 checks its receive buffer (one RPC plus part of the next) against this limit.
    pub max_transmit_size: usize,
    /// Limits applied when decoding messages received from the network.
    pub limits: Limits,
    /// Capacity of the event channel. Default [`DEFAULT_EVENT_CAPACITY`].
    pub event_capacity: usize,
    /// Capacity of the publish queue behind [`super::Node::publish`]. Default
    /// [`DEFAULT_PUBLISH_CAPACITY`].
    pub publish_capacity: usize,
    /// How many connections the node opens on its own to peers found through the DHT or mDNS
    /// (bootstrap peers are always dialled). Default [`DEFAULT_MAX_DIALED_PEERS`].
    pub max_dialed_peers: usize,
    /// Gossipsub parameters. Default [`GossipsubProfile::Media`].
    pub gossipsub_profile: GossipsubProfile,
    /// Test and benchmark hook (see [`InboundLoss`]); `None` (the default) drops nothing.
    pub inbound_loss: Option<InboundLoss>,
    /// Which data plane carries media. Default [`DataPlaneMode::Trees`].
    pub data_plane: DataPlaneMode,
    /// Upload (kbit/s) this node offers for forwarding media to other viewers: `None`
    /// unlimited (the default), `Some(0)` receive only. The trees never give it more children
    /// than fit, and its media sending is paced to it.
    pub upload_capacity_kbps: Option<u64>,
    /// How long a viewer's data plane waits after an object's first sign before pulling a
    /// shard that may still be on its way (see
    /// [`crate::core::dataplane::DataPlaneConfig::repair_delay`]). `None` (the default):
    /// the data plane's 400 ms. A viewer sets it from its playout latency
    /// ([`repair_delay_for_playout`]), so that a repair fits in it.
    pub repair_delay: Option<Duration>,
    /// Most connected peers with [`DataPlaneMode::Trees`]; beyond it, connections that are
    /// not tree edges are closed. Default [`DEFAULT_MAX_PEERS`].
    pub max_peers: usize,
    /// Serve circuit relay v2 (`/libp2p/circuit/relay/0.2.0/hop`) within these limits, for
    /// peers that cannot be dialled directly. `None` (the default): no relay service. The
    /// `p2plive-node` binary turns it on.
    pub relay_server: Option<RelayServerConfig>,
    /// Run on a libp2p private network: every TCP connection starts with the pnet handshake
    /// under this pre-shared key, so a peer without the same key cannot connect. QUIC has no
    /// such handshake, so a private node listens and dials over TCP only. `None` (the
    /// default): a public swarm.
    pub psk: Option<PreSharedKey>,
    /// Addresses at which others can reach this node although it does not listen on them
    /// (a public address forwarded to it, a DNS name): advertised through identify, and in
    /// relay reservations. Default none.
    pub external_addrs: Vec<Multiaddr>,
}

/// Limits of the circuit relay v2 service (libp2p `relay::Config`; the protocol is specified
/// in libp2p's `relay/circuit-v2.md`). The defaults are sized for live media rather than for
/// libp2p's signalling defaults (2 min and 128 KiB per circuit, which would cut a relayed
/// viewer off within a second of a 3 Mbit/s stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayServerConfig {
    /// Reservations held at once, over all peers. Default 128.
    pub max_reservations: usize,
    /// Reservations held at once by one peer. Default 4.
    pub max_reservations_per_peer: usize,
    /// How long a reservation lasts before the peer must renew it (libp2p renews it on its
    /// own while it keeps the slot). Default 5 min: a peer that stops needing its slot (found
    /// reachable, or gone without closing) frees it within this time.
    pub reservation_duration: Duration,
    /// Circuits open at once, over all peers. Default 64.
    pub max_circuits: usize,
    /// Circuits open at once per peer (as source or destination). Default 8.
    pub max_circuits_per_peer: usize,
    /// Lifetime of one circuit; the peers then reconnect (or have upgraded to a direct
    /// connection). Default 10 min.
    pub max_circuit_duration: Duration,
    /// Bytes relayed in each direction of one circuit before it is closed; 0 = unlimited.
    /// Default 256 MiB (about 11 min of a 3 Mbit/s stream).
    pub max_circuit_bytes: u64,
}

impl Default for RelayServerConfig {
    fn default() -> Self {
        Self {
            max_reservations: 128,
            max_reservations_per_peer: 4,
            reservation_duration: Duration::from_secs(300),
            max_circuits: 64,
            max_circuits_per_peer: 8,
            max_circuit_duration: Duration::from_secs(600),
            max_circuit_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Reads a libp2p private-network key file: the three lines `/key/swarm/psk/1.0.0/`,
/// `/base16/` and 64 hexadecimal digits (the format of go-ipfs `swarm.key`, as written by
/// `ipfs-swarm-key-gen` or `p2plive-node --generate-psk`).
pub fn load_psk(path: &std::path::Path) -> Result<PreSharedKey, NodeError> {
    let text = std::fs::read_to_string(path).map_err(|err| NodeError::Psk {
        path: path.display().to_string(),
        reason: err.to_string(),
    })?;
    text.trim()
        .parse()
        .map_err(|_: libp2p::pnet::KeyParseError| NodeError::Psk {
            path: path.display().to_string(),
            reason: "not a swarm key file: expected the lines /key/swarm/psk/1.0.0/, /base16/ \
                     and 64 hex digits"
                .to_owned(),
        })
}

impl NodeConfig {
    /// Defaults for everything but the identity.
    pub fn new(keypair: Keypair) -> Self {
        Self {
            keypair,
            listen: default_listen(),
            bootstrap: Vec::new(),
            mdns: true,
            kademlia: true,
            max_transmit_size: DEFAULT_MAX_TRANSMIT_SIZE,
            limits: Limits::default(),
            event_capacity: DEFAULT_EVENT_CAPACITY,
            publish_capacity: DEFAULT_PUBLISH_CAPACITY,
            max_dialed_peers: DEFAULT_MAX_DIALED_PEERS,
            gossipsub_profile: GossipsubProfile::default(),
            inbound_loss: None,
            data_plane: DataPlaneMode::default(),
            upload_capacity_kbps: None,
            repair_delay: None,
            max_peers: DEFAULT_MAX_PEERS,
            relay_server: None,
            psk: None,
            external_addrs: Vec::new(),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), NodeError> {
        if self.event_capacity == 0 {
            return Err(NodeError::InvalidConfig(
                "event_capacity must be at least 1".into(),
            ));
        }
        if self.publish_capacity == 0 {
            return Err(NodeError::InvalidConfig(
                "publish_capacity must be at least 1".into(),
            ));
        }
        if self.max_transmit_size < 4096 {
            return Err(NodeError::InvalidConfig(format!(
                "max_transmit_size {} is below the minimum of 4096 bytes",
                self.max_transmit_size
            )));
        }
        if self.listen.is_empty() {
            return Err(NodeError::InvalidConfig(
                "at least one listen address is needed".into(),
            ));
        }
        for addr in &self.bootstrap {
            bootstrap_peer(addr)?;
        }
        if self.psk.is_some()
            && let Some(addr) = self.listen.iter().chain(&self.bootstrap).find(|a| {
                a.iter()
                    .any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic))
            })
        {
            return Err(NodeError::InvalidConfig(format!(
                "{addr}: QUIC cannot carry a private network (pre-shared key); use TCP addresses"
            )));
        }
        if let Some(loss) = self.inbound_loss
            && !(0.0..=1.0).contains(&loss.share)
        {
            return Err(NodeError::InvalidConfig(format!(
                "inbound_loss share {} is outside 0..=1",
                loss.share
            )));
        }
        Ok(())
    }
}

/// The repair delay (see [`NodeConfig::repair_delay`]) of a viewer whose playout never plays
/// a frame later than `latency + jitter_tolerance` after it began to arrive, and gives a
/// missing one up `gap_wait` (at least `jitter_tolerance`) after a later frame arrived if
/// that is set ([`crate::core::PlayoutConfig`]): a third of the former, at most half of the
/// latter, 20 ms to 400 ms, so a lost shard is pulled with time left for the answer and a
/// retry. With the defaults (300 ms, 60 ms, no gap wait): 120 ms.
///
/// Waiting the data plane's 400 ms made every frame with a lost shard late when its stripe
/// carried no later object in time (a sparse stream: 1–2 shards per frame over 16 stripes);
/// a third of a large latency alone (`latency=600`: 220 ms) came after a fixed 200 ms gap
/// wait had given the frame up (a viewer at 10 % loss lost 62 frames in 30 s, against 3 at
/// `latency=450`).
pub fn repair_delay_for_playout(
    latency: Duration,
    jitter_tolerance: Duration,
    gap_wait: Option<Duration>,
) -> Duration {
    let by_latency = (latency + jitter_tolerance) / 3;
    gap_wait
        .map_or(by_latency, |wait| {
            by_latency.min(wait.max(jitter_tolerance) / 2)
        })
        .clamp(Duration::from_millis(20), Duration::from_millis(400))
}

/// `/ip4/0.0.0.0/udp/0/quic-v1` and `/ip4/0.0.0.0/tcp/0`: every IPv4 interface, ports chosen by
/// the system.
pub fn default_listen() -> Vec<Multiaddr> {
    vec![
        Multiaddr::empty()
            .with(Protocol::Ip4([0, 0, 0, 0].into()))
            .with(Protocol::Udp(0))
            .with(Protocol::QuicV1),
        Multiaddr::empty()
            .with(Protocol::Ip4([0, 0, 0, 0].into()))
            .with(Protocol::Tcp(0)),
    ]
}

/// `/ip4/0.0.0.0/tcp/0` only: the default listen address of a node on a private network
/// ([`NodeConfig::psk`]), where QUIC cannot be used.
pub fn default_tcp_listen() -> Vec<Multiaddr> {
    vec![
        Multiaddr::empty()
            .with(Protocol::Ip4([0, 0, 0, 0].into()))
            .with(Protocol::Tcp(0)),
    ]
}

/// Parses a comma-separated list of multiaddrs. Whitespace around entries and empty entries
/// are tolerated; an empty string gives an empty list.
pub fn parse_multiaddrs(s: &str) -> Result<Vec<Multiaddr>, NodeError> {
    s.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            entry
                .parse::<Multiaddr>()
                .map_err(|err| NodeError::InvalidMultiaddr {
                    entry: entry.to_owned(),
                    reason: err.to_string(),
                })
        })
        .collect()
}

/// Like [`parse_multiaddrs`], and every address must end with `/p2p/<peer id>`.
pub fn parse_bootstrap(s: &str) -> Result<Vec<Multiaddr>, NodeError> {
    let addrs = parse_multiaddrs(s)?;
    for addr in &addrs {
        bootstrap_peer(addr)?;
    }
    Ok(addrs)
}

/// The peer id a bootstrap address ends with.
pub(crate) fn bootstrap_peer(addr: &Multiaddr) -> Result<PeerId, NodeError> {
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => Ok(peer),
        _ => Err(NodeError::BootstrapWithoutPeerId {
            addr: addr.to_string(),
        }),
    }
}

/// `addr` without its trailing `/p2p/<id>`, as kademlia's routing table wants it.
pub(crate) fn without_peer_id(addr: &Multiaddr) -> Multiaddr {
    let mut addr = addr.clone();
    if let Some(Protocol::P2p(_)) = addr.iter().last() {
        addr.pop();
    }
    addr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repair_delay_leaves_room_before_the_playout_gives_up() {
        let ms = Duration::from_millis;
        // p2plivesrc's defaults: 300 ms latency, 60 ms jitter tolerance, no gap wait.
        assert_eq!(repair_delay_for_playout(ms(300), ms(60), None), ms(120));
        // A large latency: at most 400 ms (a third would be 686 ms).
        assert_eq!(repair_delay_for_playout(ms(2000), ms(60), None), ms(400));
        // A gap wait shorter than the latency: half of it.
        assert_eq!(
            repair_delay_for_playout(ms(2000), ms(60), Some(ms(200))),
            ms(100)
        );
        // A large jitter tolerance lengthens the gap wait.
        assert_eq!(
            repair_delay_for_playout(ms(2000), ms(500), Some(ms(200))),
            ms(250)
        );
        // A small latency: a third of it, at least 20 ms.
        assert_eq!(repair_delay_for_playout(ms(100), ms(20), None), ms(40));
        assert_eq!(
            repair_delay_for_playout(ms(20), ms(0), Some(ms(200))),
            ms(20)
        );
    }

    #[test]
    fn parses_lists_with_whitespace_and_empty_entries() {
        let addrs =
            parse_multiaddrs(" /ip4/127.0.0.1/tcp/1 ,, /ip4/127.0.0.1/udp/2/quic-v1 ,").unwrap();
        assert_eq!(
            addrs,
            vec![
                "/ip4/127.0.0.1/tcp/1".parse::<Multiaddr>().unwrap(),
                "/ip4/127.0.0.1/udp/2/quic-v1".parse().unwrap()
            ]
        );
        assert!(parse_multiaddrs("  ").unwrap().is_empty());
    }

    #[test]
    fn strips_only_a_trailing_peer_id() {
        let peer = PeerId::random();
        let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/1/p2p/{peer}").parse().unwrap();
        assert_eq!(bootstrap_peer(&addr).unwrap(), peer);
        assert_eq!(
            without_peer_id(&addr),
            "/ip4/127.0.0.1/tcp/1".parse::<Multiaddr>().unwrap()
        );
        let bare: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        assert_eq!(without_peer_id(&bare), bare);
    }

    #[test]
    fn default_config_is_valid() {
        NodeConfig::new(Keypair::generate_ed25519())
            .validate()
            .unwrap();
        let zero = NodeConfig {
            event_capacity: 0,
            ..NodeConfig::new(Keypair::generate_ed25519())
        };
        assert!(matches!(zero.validate(), Err(NodeError::InvalidConfig(_))));
        for share in [-0.1, 1.5, f64::NAN] {
            let lossy = NodeConfig {
                inbound_loss: Some(InboundLoss { share, seed: 1 }),
                ..NodeConfig::new(Keypair::generate_ed25519())
            };
            assert!(
                matches!(lossy.validate(), Err(NodeError::InvalidConfig(_))),
                "{share}"
            );
        }
    }

    #[test]
    fn a_private_network_refuses_quic_and_reads_only_swarm_key_files() {
        let key = PreSharedKey::new([7; 32]);
        let private = NodeConfig {
            psk: Some(key),
            ..NodeConfig::new(Keypair::generate_ed25519())
        };
        let err = private.validate().unwrap_err().to_string();
        assert!(err.contains("QUIC") && err.contains("TCP"), "{err}");
        NodeConfig {
            listen: default_tcp_listen(),
            ..private
        }
        .validate()
        .unwrap();

        let dir = std::env::temp_dir().join(format!("p2plive-psk-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("swarm.key");
        std::fs::write(&good, key.to_key_file() + "\n").unwrap();
        assert_eq!(load_psk(&good).unwrap().to_string(), key.to_string());
        let bad = dir.join("bad.key");
        std::fs::write(&bad, "/key/swarm/psk/1.0.0/\n/base16/\nxyz\n").unwrap();
        let err = load_psk(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.key") && err.contains("64 hex"), "{err}");
        let err = load_psk(&dir.join("missing.key")).unwrap_err().to_string();
        assert!(err.contains("missing.key"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
