//! What `p2plivesink` and `p2plivesrc` share: both run a libp2p node and expose the same
//! network properties, bus messages and statistics for it.

use std::path::PathBuf;

use gst::glib;
use gst::prelude::*;
use libp2p::Multiaddr;

use crate::node::{self, NodeConfig, NodeError};

pub const DEFAULT_TOPIC: &str = "p2plive";
pub const DEFAULT_MDNS: bool = true;
pub const DEFAULT_KADEMLIA: bool = true;
pub const DEFAULT_STATS_INTERVAL_MS: u32 = 1000;

/// The element's view of its node settings; strings are kept as the user wrote them and
/// parsed when the node starts, so a bad value fails the state change with a clear error.
#[derive(Debug, Clone)]
pub struct NetworkSettings {
    pub topic: String,
    pub listen: String,
    pub bootstrap: String,
    pub identity_file: Option<PathBuf>,
    pub mdns: bool,
    pub kademlia: bool,
    pub stats_interval_ms: u32,
    /// kbit/s offered for forwarding media: -1 unlimited, 0 receive only.
    pub upload_capacity_kbps: i64,
    /// `gossipsub` or `trees` (see `node::DataPlaneMode`).
    pub data_plane: String,
    /// Private-network key file (`node::load_psk`); `None`: a public swarm.
    pub psk_file: Option<PathBuf>,
}

impl Default for NetworkSettings {
    fn default() -> Self {
        Self {
            topic: DEFAULT_TOPIC.into(),
            listen: join_addrs(&node::default_listen()),
            bootstrap: String::new(),
            identity_file: None,
            mdns: DEFAULT_MDNS,
            kademlia: DEFAULT_KADEMLIA,
            stats_interval_ms: DEFAULT_STATS_INTERVAL_MS,
            upload_capacity_kbps: -1,
            data_plane: "trees".into(),
            psk_file: None,
        }
    }
}

/// Comma-separated form used by the `listen`, `bootstrap` and `multiaddrs` properties.
pub fn join_addrs(addrs: &[Multiaddr]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Builds the shared property specs; called once per element class, since a GObject
/// property spec can be installed on one class only.
fn network_properties() -> Vec<glib::ParamSpec> {
    let defaults = NetworkSettings::default();
    vec![
        glib::ParamSpecString::builder("topic")
            .nick("Topic")
            .blurb("Name of the stream; the publisher and its viewers use the same topic")
            .default_value(Some(DEFAULT_TOPIC))
            .mutable_ready()
            .build(),
        glib::ParamSpecString::builder("listen")
            .nick("Listen addresses")
            .blurb(
                "Comma-separated multiaddrs to listen on, e.g. /ip4/0.0.0.0/udp/4001/quic-v1,/ip4/0.0.0.0/tcp/4001 \
                 (default: every interface, QUIC and TCP, random ports)",
            )
            .default_value(Some(defaults.listen.as_str()))
            .mutable_ready()
            .build(),
        glib::ParamSpecString::builder("bootstrap")
            .nick("Bootstrap peers")
            .blurb(
                "Comma-separated multiaddrs of peers to join through, each ending in /p2p/<peer id> \
                 (the publisher or any viewer)",
            )
            .default_value(Some(""))
            .mutable_ready()
            .build(),
        glib::ParamSpecString::builder("identity-file")
            .nick("Identity file")
            .blurb(
                "File holding this peer's key; created if missing so the peer id survives restarts \
                 (default: a new identity each start)",
            )
            .mutable_ready()
            .build(),
        glib::ParamSpecString::builder("psk-file")
            .nick("Pre-shared key file")
            .blurb(
                "Join a private network: a libp2p swarm key file (/key/swarm/psk/1.0.0/, /base16/, \
                 64 hex digits; p2plive-node --generate-psk writes one). Only peers with the same \
                 key can connect; QUIC is not used (default listen becomes TCP only)",
            )
            .mutable_ready()
            .build(),
        glib::ParamSpecBoolean::builder("mdns")
            .nick("mDNS")
            .blurb("Discover peers on the local network with mDNS")
            .default_value(DEFAULT_MDNS)
            .mutable_ready()
            .build(),
        glib::ParamSpecBoolean::builder("kademlia")
            .nick("Kademlia")
            .blurb("Find more peers of the stream through the Kademlia DHT")
            .default_value(DEFAULT_KADEMLIA)
            .mutable_ready()
            .build(),
        glib::ParamSpecString::builder("data-plane")
            .nick("Data plane")
            .blurb(
                "What carries media: trees (the default: striped, erasure-coded push trees, \
                 about one copy down and up per viewer) or gossipsub (media over gossipsub: \
                 each viewer receives and relays about five copies; the benchmark's \
                 reference). Every peer of a stream must use the same",
            )
            .default_value(Some("trees"))
            .mutable_ready()
            .build(),
        glib::ParamSpecInt64::builder("upload-capacity")
            .nick("Upload capacity")
            .blurb(
                "kbit/s this peer offers for forwarding media to other viewers: -1 unlimited \
                 (the default: a viewer forwards about one copy of the stream on average, at \
                 most two), 0 receive only (e.g. a phone on a metered link), as is a value \
                 too small for one child (a sixteenth of the stream over 0.7). The trees never \
                 give it more children than fit and its media sending is paced to it",
            )
            .minimum(-1)
            .maximum(10_000_000)
            .default_value(-1)
            .mutable_ready()
            .build(),
        glib::ParamSpecUInt::builder("stats-interval")
            .nick("Statistics interval")
            .blurb("Milliseconds between p2plive-stats element messages on the bus (0 = none)")
            .default_value(DEFAULT_STATS_INTERVAL_MS)
            .mutable_playing()
            .build(),
        glib::ParamSpecString::builder("peer-id")
            .nick("Peer id")
            .blurb("This element's libp2p peer id (known once the element is READY)")
            .read_only()
            .build(),
        glib::ParamSpecString::builder("multiaddrs")
            .nick("Multiaddrs")
            .blurb("Comma-separated dialable addresses of this peer, each ending in /p2p/<peer id>")
            .read_only()
            .build(),
        glib::ParamSpecBoxed::builder::<gst::Structure>("stats")
            .nick("Statistics")
            .blurb("Counters of this element and its node")
            .read_only()
            .build(),
    ]
}

impl NetworkSettings {
    /// New property specs for one element class.
    pub fn properties() -> Vec<glib::ParamSpec> {
        network_properties()
    }

    /// Applies a writable shared property; false when `name` is not one of them.
    pub fn set_property(&mut self, name: &str, value: &glib::Value) -> bool {
        match name {
            "topic" => {
                self.topic = value
                    .get::<Option<String>>()
                    .expect("type checked upstream")
                    .unwrap_or_else(|| DEFAULT_TOPIC.into())
            }
            "listen" => {
                self.listen = value
                    .get::<Option<String>>()
                    .expect("type checked upstream")
                    .unwrap_or_default()
            }
            "bootstrap" => {
                self.bootstrap = value
                    .get::<Option<String>>()
                    .expect("type checked upstream")
                    .unwrap_or_default()
            }
            "identity-file" => {
                self.identity_file = value
                    .get::<Option<String>>()
                    .expect("type checked upstream")
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
            }
            "psk-file" => {
                self.psk_file = value
                    .get::<Option<String>>()
                    .expect("type checked upstream")
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
            }
            "mdns" => self.mdns = value.get().expect("type checked upstream"),
            "kademlia" => self.kademlia = value.get().expect("type checked upstream"),
            "upload-capacity" => {
                self.upload_capacity_kbps = value.get().expect("type checked upstream")
            }
            "data-plane" => {
                self.data_plane = value
                    .get::<Option<String>>()
                    .expect("type checked upstream")
                    .unwrap_or_else(|| "trees".into())
            }
            "stats-interval" => {
                self.stats_interval_ms = value.get().expect("type checked upstream")
            }
            _ => return false,
        }
        true
    }

    /// Reads a writable shared property; None when `name` is not one of them.
    pub fn property(&self, name: &str) -> Option<glib::Value> {
        Some(match name {
            "topic" => self.topic.to_value(),
            "listen" => self.listen.to_value(),
            "bootstrap" => self.bootstrap.to_value(),
            "identity-file" => self
                .identity_file
                .as_ref()
                .map(|p| p.display().to_string())
                .to_value(),
            "psk-file" => self
                .psk_file
                .as_ref()
                .map(|p| p.display().to_string())
                .to_value(),
            "mdns" => self.mdns.to_value(),
            "kademlia" => self.kademlia.to_value(),
            "upload-capacity" => self.upload_capacity_kbps.to_value(),
            "data-plane" => self.data_plane.to_value(),
            "stats-interval" => self.stats_interval_ms.to_value(),
            _ => return None,
        })
    }

    /// Checks the topic before anything is started with it.
    pub fn validate_topic(&self) -> Result<(), String> {
        let limits = crate::core::Limits::default();
        if self.topic.trim().is_empty() {
            return Err(format!("topic {:?} is empty or blank", self.topic));
        }
        // A topic is typed by hand on both sides: spaces at its ends or invisible characters
        // would make a publisher and its viewers miss each other without a word.
        if self.topic.trim() != self.topic || self.topic.chars().any(char::is_control) {
            return Err(format!(
                "topic {:?} starts or ends with spaces or holds control characters",
                self.topic
            ));
        }
        if self.topic.len() > limits.max_topic_len {
            return Err(format!(
                "topic is {} bytes long, at most {} allowed",
                self.topic.len(),
                limits.max_topic_len
            ));
        }
        Ok(())
    }

    /// Turns the settings into a node configuration, parsing every address.
    pub fn node_config(&self, max_transmit_size: usize) -> Result<NodeConfig, NodeError> {
        let keypair = match &self.identity_file {
            Some(path) => node::load_or_create_identity(path)?,
            None => libp2p::identity::Keypair::generate_ed25519(),
        };
        let mut config = NodeConfig::new(keypair);
        config.listen = node::parse_multiaddrs(&self.listen)?;
        if let Some(path) = &self.psk_file {
            config.psk = Some(node::load_psk(path)?);
            // The default listen set has QUIC, which a private network cannot use.
            if config.listen == node::default_listen() {
                config.listen = node::default_tcp_listen();
            }
        }
        config.bootstrap = node::parse_bootstrap(&self.bootstrap)?;
        config.mdns = self.mdns;
        config.kademlia = self.kademlia;
        config.max_transmit_size = max_transmit_size;
        config.upload_capacity_kbps = u64::try_from(self.upload_capacity_kbps).ok();
        config.data_plane = match self.data_plane.as_str() {
            "gossipsub" => node::DataPlaneMode::Gossipsub,
            "trees" => node::DataPlaneMode::Trees,
            other => {
                return Err(NodeError::InvalidConfig(format!(
                    "data-plane {other:?}: expected gossipsub or trees"
                )));
            }
        };
        Ok(config)
    }
}

/// Announces that `element`'s node listens: logs the exact line a viewer can paste, posts
/// the `p2plive-listening` element message and notifies the `multiaddrs` property.
pub fn announce_listening(
    element: &gst::Element,
    cat: gst::DebugCategory,
    topic: &str,
    peer_id: &str,
    addrs: &[Multiaddr],
) {
    if let Some(addr) = preferred_addr(addrs) {
        gst::info!(
            cat,
            obj = element,
            "listening on {}; viewers join with: p2plivesrc topic={topic} bootstrap={addr}",
            join_addrs(addrs)
        );
    }
    let structure = gst::Structure::builder("p2plive-listening")
        .field("peer-id", peer_id)
        .field("multiaddrs", join_addrs(addrs))
        .build();
    let _ = element.post_message(
        gst::message::Element::builder(structure)
            .src(element)
            .build(),
    );
    element.notify("multiaddrs");
}

/// Posts a warning on the bus: a bootstrap peer cannot be reached (the node keeps trying).
pub fn warn_bootstrap_unreachable(
    element: &gst::Element,
    cat: gst::DebugCategory,
    peer: &libp2p::PeerId,
    reason: &str,
) {
    gst::warning!(
        cat,
        obj = element,
        "bootstrap peer {peer} unreachable: {reason}"
    );
    let _ = element.post_message(
        gst::message::Warning::builder(
            gst::ResourceError::OpenReadWrite,
            &format!("bootstrap peer {peer} unreachable: {reason}"),
        )
        .src(element)
        .build(),
    );
}

/// Posts `stats` as a periodic `p2plive-stats` element message.
pub fn post_stats(element: &gst::Element, stats: gst::Structure) {
    let _ = element.post_message(gst::message::Element::builder(stats).src(element).build());
}

/// Sleeps until `deadline`, or forever when there is none (for `tokio::select!` arms).
pub async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// A ticker for periodic statistics; `None` when they are off.
pub fn stats_ticker(interval_ms: u32) -> Option<tokio::time::Interval> {
    (interval_ms > 0).then(|| {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(interval_ms.into()));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        tick
    })
}

/// Waits for the next statistics tick, or forever when statistics are off.
pub async fn next_tick(ticker: &mut Option<tokio::time::Interval>) {
    match ticker {
        Some(tick) => {
            tick.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The address a viewer should bootstrap from: a non-loopback one if there is one, since
/// it also works from other machines.
pub fn preferred_addr(addrs: &[Multiaddr]) -> Option<&Multiaddr> {
    let is_loopback = |a: &Multiaddr| {
        a.iter().any(|p| match p {
            libp2p::multiaddr::Protocol::Ip4(ip) => ip.is_loopback(),
            libp2p::multiaddr::Protocol::Ip6(ip) => ip.is_loopback(),
            _ => false,
        })
    };
    addrs
        .iter()
        .find(|a| !is_loopback(a))
        .or_else(|| addrs.first())
}

/// Adds the node's counters to an element's `stats` structure.
pub fn node_stats_fields(
    builder: gst::structure::Builder,
    node: &crate::node::Node,
) -> gst::structure::Builder {
    let stats = node.stats();
    let builder = builder
        .field("connected-peers", stats.connected_peers as u64)
        .field("messages-received", stats.messages_received)
        .field("messages-accepted", stats.messages_accepted)
        .field("messages-rejected", stats.messages_rejected)
        .field("messages-ignored", stats.messages_ignored)
        .field("messages-before-lock", stats.messages_before_lock)
        .field("events-dropped", stats.events_dropped)
        .field("messages-published", stats.messages_published)
        .field("node-publish-failures", stats.publish_failures)
        .field("publish-no-peers", stats.publish_no_peers)
        .field("publish-queue-full", stats.publish_queue_full)
        .field("slow-peer-reports", stats.slow_peer_reports)
        .field("send-queue-drops", stats.send_queue_drops);
    let builder = builder
        .field("peers-banned", stats.peers_banned)
        .field("media-frames-received", stats.media_frames_received)
        .field("media-frames-sent", stats.media_frames_sent)
        .field("reachability", stats.reachability.as_str())
        .field("hole-punches", stats.hole_punches);
    match stats.data_plane {
        Some(dp) => builder
            .field("tree-parents", dp.parents as u64)
            .field("tree-children", dp.children as u64)
            .field("tree-depth", dp.depth as u64)
            .field(
                "tree-interior-stripe",
                dp.interior_stripe.map_or(-1, i32::from),
            )
            .field("tree-parent-changes", dp.parent_changes)
            .field("shards-received", dp.shards_received)
            .field("shards-sent", dp.shards_sent)
            .field("objects-rebuilt", dp.objects_rebuilt)
            .field("objects-missed", dp.objects_missed)
            .field("pulls-sent", dp.pulls_sent)
            .field("pulls-served", dp.pulls_served)
            .field("media-shed", dp.shed)
            .field("shard-loss-permille", dp.shard_loss_permille)
            .field("link-loss-permille", dp.link_loss_permille)
            .field("parity-loss-permille", dp.parity_loss_permille),
        None => builder,
    }
}

/// Stops `node`, letting it send what is queued for up to `linger`, and waits for that
/// (bounded) so a process that exits right after stopping still delivers its last messages.
pub fn stop_node(node: &crate::node::Node, linger: std::time::Duration) {
    node.shutdown(linger);
    let waiting = node.clone();
    wait_on_runtime(
        async move { waiting.stopped().await },
        linger + std::time::Duration::from_millis(200),
    );
}

/// Aborts a driver task and waits (bounded) until it has stopped, so it cannot touch the
/// element while the element tears down what the task used.
pub fn abort_and_wait(task: tokio::task::JoinHandle<()>) {
    task.abort();
    wait_on_runtime(
        async move {
            let _ = task.await;
        },
        std::time::Duration::from_secs(1),
    );
}

/// Runs `future` on the shared runtime and blocks the calling (state change) thread until it
/// completes or `timeout` passes. Safe from any thread, a runtime worker included, unlike
/// `block_on`.
fn wait_on_runtime(
    future: impl std::future::Future<Output = ()> + Send + 'static,
    timeout: std::time::Duration,
) {
    let (done_tx, done_rx) = std::sync::mpsc::sync_channel::<()>(1);
    crate::RUNTIME.spawn(async move {
        future.await;
        let _ = done_tx.send(());
    });
    let _ = done_rx.recv_timeout(timeout);
}
