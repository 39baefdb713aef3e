//! Real libp2p nodes on 127.0.0.1 (mDNS off): publishing, relaying, author checks, trust on
//! first use, malformed input, identity files, listen addresses and shutdown.
//!
//! Nothing here sleeps for a fixed time: publishers republish every 100 ms until the viewer
//! has seen what the test waits for, bounded by a generous timeout.

use std::collections::BTreeSet;
use std::time::Duration;

use gstp2plive::core::wire::{self, Catalog, Fragment, FrameHeader, Track, TrackKind};
use gstp2plive::core::{Channel, Message};
use gstp2plive::node::{self, Event, Node, NodeConfig, NodeError, NodeStatsSnapshot};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc::Receiver;

const TIMEOUT: Duration = Duration::from_secs(30);
const REPUBLISH: Duration = Duration::from_millis(100);
const STREAM: &str = "test/stream";
const MEDIA: Channel = Channel::Media { track: 0, layer: 0 };

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A node on 127.0.0.1 with media over gossipsub: most tests here check that data plane's
/// promises (authors, relays, counters per message); the trees have their own test below and
/// `src/core/dataplane/tests.rs`.
fn local_config(bootstrap: &[&Multiaddr], kademlia: bool) -> NodeConfig {
    let mut config = trees_config(bootstrap, kademlia);
    config.data_plane = node::DataPlaneMode::Gossipsub;
    config
}

/// A node on 127.0.0.1 with the media data plane (the trees).
fn trees_config(bootstrap: &[&Multiaddr], kademlia: bool) -> NodeConfig {
    let mut config = NodeConfig::new(Keypair::generate_ed25519());
    config.data_plane = node::DataPlaneMode::Trees;
    config.listen =
        node::parse_multiaddrs("/ip4/127.0.0.1/udp/0/quic-v1, /ip4/127.0.0.1/tcp/0").unwrap();
    config.bootstrap = bootstrap.iter().map(|addr| (*addr).clone()).collect();
    config.mdns = false;
    config.kademlia = kademlia;
    config
}

struct Peer {
    node: Node,
    events: Receiver<Event>,
    addrs: Vec<Multiaddr>,
}

impl Peer {
    async fn start(config: NodeConfig) -> Peer {
        let (node, events) =
            Node::spawn(config, &tokio::runtime::Handle::current()).expect("node starts");
        Self::from_spawned(node, events).await
    }

    /// Waits for the node's listen addresses.
    async fn from_spawned(node: Node, mut events: Receiver<Event>) -> Peer {
        let addrs = tokio::time::timeout(TIMEOUT, async {
            loop {
                match events.recv().await {
                    Some(Event::Listening { addrs }) => break addrs,
                    Some(_) => continue,
                    None => panic!("event channel closed before Listening"),
                }
            }
        })
        .await
        .expect("Listening event");
        Peer {
            node,
            events,
            addrs,
        }
    }

    fn id(&self) -> PeerId {
        self.node.peer_id()
    }

    /// A QUIC address, the default transport between p2plive peers.
    fn quic_addr(&self) -> &Multiaddr {
        self.addrs
            .iter()
            .find(|addr| addr.iter().any(|p| p == Protocol::QuicV1))
            .expect("a QUIC listen address")
    }

    fn tcp_addr(&self) -> &Multiaddr {
        self.addrs
            .iter()
            .find(|addr| addr.iter().any(|p| matches!(p, Protocol::Tcp(_))))
            .expect("a TCP listen address")
    }
}

/// `addr` without its `/p2p/<id>` part.
fn without_peer_id(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect()
}

fn catalog(epoch: u64, sequence: u64) -> Vec<u8> {
    wire::encode(&Message::Catalog(Catalog {
        epoch,
        version: 1,
        sequence,
        topic: STREAM.into(),
        tracks: vec![Track {
            id: 0,
            kind: TrackKind::Video as i32,
            caps: "video/x-h264,stream-format=byte-stream".into(),
            layers: vec![],
        }],
    }))
}

fn fragment(epoch: u64, sequence: u64) -> Vec<u8> {
    let payload = sequence.to_be_bytes().to_vec();
    wire::encode(&Message::Fragment(Fragment {
        epoch,
        track: 0,
        layer: 0,
        sequence,
        index: 0,
        count: 1,
        header: Some(FrameHeader {
            pts_ns: Some(sequence * 33_333_333),
            keyframe: true,
            frame_size: payload.len() as u32,
            ..Default::default()
        }),
        payload: payload.into(),
    }))
}

fn fragment_sequence(event: &Event) -> Option<(PeerId, u64)> {
    match event {
        Event::Message {
            source,
            message: Message::Fragment(f),
            ..
        } => Some((*source, f.sequence)),
        _ => None,
    }
}

fn is_catalog_from(event: &Event, author: PeerId) -> bool {
    matches!(event, Event::Message { source, message: Message::Catalog(_), .. } if *source == author)
}

fn is_fragment_from(event: &Event, author: PeerId) -> bool {
    fragment_sequence(event).is_some_and(|(source, _)| source == author)
}

/// Calls `tick(n)` every 100 ms (n = 0, 1, ...) and collects `events` until `done(&seen)`.
/// Panics with `what` and the viewer's counters after [`TIMEOUT`].
async fn drive(
    what: &str,
    events: &mut Receiver<Event>,
    viewer: &Node,
    mut tick: impl FnMut(u64),
    mut done: impl FnMut(&[Event]) -> bool,
) -> Vec<Event> {
    let mut seen = Vec::new();
    let mut interval = tokio::time::interval(REPUBLISH);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut n = 0;
    while !done(&seen) {
        tokio::select! {
            _ = interval.tick() => {
                tick(n);
                n += 1;
            }
            event = events.recv() => seen.push(event.expect("viewer event channel open")),
            () = tokio::time::sleep_until(deadline) => {
                panic!("timed out waiting for {what}; viewer stats {:?}; events {seen:?}", viewer.stats())
            }
        }
    }
    seen
}

/// Polls `condition` every 20 ms; panics with `what` after [`TIMEOUT`].
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every message event must be well-formed and authored by `author`.
fn assert_all_from(seen: &[Event], author: PeerId) {
    for event in seen {
        if let Event::Message {
            stream,
            channel,
            source,
            message,
            ..
        } = event
        {
            assert_eq!(stream, STREAM);
            assert_eq!(
                *source, author,
                "message from an unexpected author: {event:?}"
            );
            assert_eq!(*channel, Channel::of(message));
        }
    }
}

fn publish_both(node: &Node, epoch: u64, n: u64) {
    // Before the viewers' subscriptions arrive, the queue accepts but gossipsub finds no
    // peer: that is counted by the node, not an error here.
    node.publish(STREAM, Channel::Control, catalog(epoch, n))
        .unwrap();
    node.publish(STREAM, MEDIA, fragment(epoch, n)).unwrap();
}

fn stats(peer: &Peer) -> NodeStatsSnapshot {
    peer.node.stats()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_receives_catalog_and_fragments_from_publisher() {
    init_tracing();
    let a = Peer::start(local_config(&[], true)).await;
    let mut b = Peer::start(local_config(&[a.quic_addr()], true)).await;
    a.node.announce_stream(STREAM).unwrap();
    b.node
        .join_stream(STREAM, Some(a.id()), vec![MEDIA])
        .unwrap();

    let a_id = a.id();
    let seen = drive(
        "a catalog and a fragment from A",
        &mut b.events,
        &b.node,
        |n| publish_both(&a.node, 1, n),
        |seen| {
            seen.iter().any(|e| is_catalog_from(e, a_id))
                && seen.iter().any(|e| is_fragment_from(e, a_id))
        },
    )
    .await;
    assert_all_from(&seen, a_id);
    let b_stats = stats(&b);
    assert!(b_stats.messages_accepted >= 2, "{b_stats:?}");
    assert_eq!(b_stats.messages_rejected, 0, "{b_stats:?}");
    assert!(b_stats.connected_peers >= 1, "{b_stats:?}");
    assert!(stats(&a).messages_published >= 2, "{:?}", stats(&a));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_relay_to_viewers_that_cannot_reach_the_publisher() {
    init_tracing();
    // No kademlia anywhere: C only knows B and has no way to find A.
    let a = Peer::start(local_config(&[], false)).await;
    let b = Peer::start(local_config(&[a.quic_addr()], false)).await;
    let mut c = Peer::start(local_config(&[b.tcp_addr()], false)).await;
    a.node.announce_stream(STREAM).unwrap();
    b.node
        .join_stream(STREAM, Some(a.id()), vec![MEDIA])
        .unwrap();
    c.node
        .join_stream(STREAM, Some(a.id()), vec![MEDIA])
        .unwrap();

    let a_id = a.id();
    let seen = drive(
        "a fragment from A relayed by B",
        &mut c.events,
        &c.node,
        |n| publish_both(&a.node, 1, n),
        |seen| {
            seen.iter().any(|e| is_fragment_from(e, a_id))
                && seen.iter().any(|e| is_catalog_from(e, a_id))
        },
    )
    .await;
    assert_all_from(&seen, a_id);
    assert_eq!(
        stats(&c).connected_peers,
        1,
        "C must only be connected to B"
    );
    // Authored by A, and every first copy came from B.
    let b_id = b.id();
    for event in &seen {
        if let Event::Message {
            propagation_source, ..
        } = event
        {
            assert_eq!(*propagation_source, b_id, "{event:?}");
        }
    }
    assert!(stats(&b).messages_accepted >= 2, "{:?}", stats(&b));
}

/// A fragment of `size` payload bytes, distinct per `sequence`.
fn large_fragment(epoch: u64, sequence: u64, size: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..size).map(|i| (i as u64 ^ sequence) as u8).collect();
    wire::encode(&Message::Fragment(Fragment {
        epoch,
        track: 0,
        layer: 0,
        sequence,
        index: 0,
        count: 1,
        header: Some(FrameHeader {
            pts_ns: Some(sequence * 33_333_333),
            keyframe: true,
            frame_size: size as u32,
            ..Default::default()
        }),
        payload: payload.into(),
    }))
}

/// Publishes a 30 frames/s stream of 6 kB frames (shards over every stripe) with the
/// catalog every second, numbering frames from `*sequence`, for at most `ms` ms; each event of
/// `viewers[i]` is appended to `seen[i]`. Stops early once `done(seen)`; returns whether it
/// did.
async fn stream_frames(
    publisher: &Peer,
    viewers: &mut [Peer],
    seen: &mut [Vec<Event>],
    epoch: u64,
    sequence: &mut u64,
    ms: u64,
    mut done: impl FnMut(&[Vec<Event>]) -> bool,
) -> bool {
    let mut tick = tokio::time::interval(Duration::from_millis(33));
    let end = tokio::time::Instant::now() + Duration::from_millis(ms);
    while tokio::time::Instant::now() < end {
        tick.tick().await;
        if sequence.is_multiple_of(30) {
            let _ = publisher
                .node
                .publish(STREAM, Channel::Control, catalog(epoch, *sequence));
        }
        let _ = publisher
            .node
            .publish(STREAM, MEDIA, large_fragment(epoch, *sequence, 6000));
        *sequence += 1;
        for (viewer, seen) in viewers.iter_mut().zip(seen.iter_mut()) {
            while let Ok(event) = viewer.events.try_recv() {
                seen.push(event);
            }
        }
        if done(seen) {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_counters_count_every_byte_on_the_connections() {
    init_tracing();
    const SIZE: usize = 8_000;
    let a = Peer::start(local_config(&[], false)).await;
    // Nothing counted before there is a connection (B starts dialling A as soon as it
    // starts, so only A, still alone, is certain to be at zero).
    assert_eq!((stats(&a).bytes_in, stats(&a).bytes_out), (0, 0));
    let mut b = Peer::start(local_config(&[a.tcp_addr()], false)).await;
    a.node.announce_stream(STREAM).unwrap();
    b.node
        .join_stream(STREAM, Some(a.id()), vec![MEDIA])
        .unwrap();

    let mut sequences = std::collections::BTreeSet::new();
    drive(
        "20 large fragments",
        &mut b.events,
        &b.node,
        |n| {
            a.node
                .publish(STREAM, Channel::Control, catalog(1, n))
                .unwrap();
            a.node
                .publish(STREAM, MEDIA, large_fragment(1, n, SIZE))
                .unwrap();
        },
        |seen| {
            sequences.extend(seen.iter().filter_map(fragment_sequence).map(|(_, s)| s));
            sequences.len() >= 20
        },
    )
    .await;
    let payload = (sequences.len() * SIZE) as u64;
    let (a_stats, b_stats) = (stats(&a), stats(&b));
    // Everything B received came over its one connection, from A; both counted it.
    assert!(b_stats.bytes_in >= payload, "{b_stats:?}");
    assert!(a_stats.bytes_out >= payload, "{a_stats:?}");
    // B sent its subscriptions, identify and ping, but no media.
    assert!(b_stats.bytes_out > 0, "{b_stats:?}");
    assert!(b_stats.bytes_out < payload / 4, "{b_stats:?}");
}

/// A keyframe's worth of full-size fragments published at once reach the viewer: the
/// receiver's buffer then holds one message and part of the next, which libp2p-gossipsub
/// 0.50 checks against the max transmit size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_of_full_size_fragments_all_arrive() {
    init_tracing();
    const BURST: u64 = 40;
    let a = Peer::start(local_config(&[], false)).await;
    let mut b = Peer::start(local_config(&[a.tcp_addr()], false)).await;
    a.node.announce_stream(STREAM).unwrap();
    b.node
        .join_stream(STREAM, Some(a.id()), vec![MEDIA])
        .unwrap();
    let a_id = a.id();
    drive(
        "a catalog",
        &mut b.events,
        &b.node,
        |n| {
            a.node
                .publish(STREAM, Channel::Control, catalog(1, n))
                .unwrap()
        },
        |seen| seen.iter().any(|e| is_catalog_from(e, a_id)),
    )
    .await;
    // The largest fragment the default publisher configuration produces.
    let size = gstp2plive::core::PublisherConfig::default().max_fragment_size;
    let mut published = 0;
    let mut sequences = std::collections::BTreeSet::new();
    drive(
        "every fragment of two bursts",
        &mut b.events,
        &b.node,
        |n| {
            if n < 2 {
                for _ in 0..BURST {
                    a.node
                        .publish(STREAM, MEDIA, large_fragment(1, published, size))
                        .unwrap();
                    published += 1;
                }
            }
        },
        |seen| {
            sequences.extend(seen.iter().filter_map(fragment_sequence).map(|(_, s)| s));
            sequences.len() as u64 >= 2 * BURST
        },
    )
    .await;
    assert_eq!(stats(&b).messages_rejected, 0, "{:?}", stats(&b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_loss_hook_drops_the_configured_share() {
    init_tracing();
    const MESSAGES: u64 = 200;
    let a = Peer::start(local_config(&[], false)).await;
    let mut lossy = local_config(&[a.tcp_addr()], false);
    lossy.inbound_loss = Some(node::InboundLoss {
        share: 0.5,
        seed: 42,
    });
    let mut b = Peer::start(lossy).await;
    a.node.announce_stream(STREAM).unwrap();
    b.node
        .join_stream(STREAM, Some(a.id()), vec![MEDIA])
        .unwrap();

    // Catalogs until B is subscribed and locked in, then MESSAGES fragments, each once.
    let a_id = a.id();
    drive(
        "a catalog through the lossy node",
        &mut b.events,
        &b.node,
        |n| {
            a.node
                .publish(STREAM, Channel::Control, catalog(1, n))
                .unwrap()
        },
        |seen| seen.iter().any(|e| is_catalog_from(e, a_id)),
    )
    .await;
    let before = stats(&b);
    for sequence in 0..MESSAGES {
        a.node
            .publish(STREAM, MEDIA, fragment(1, sequence))
            .unwrap();
    }
    let settled = |s: &NodeStatsSnapshot| s.messages_accepted + s.messages_dropped_by_hook;
    wait_until("every fragment accepted or dropped by B", || {
        settled(&stats(&b)) >= settled(&before) + MESSAGES
    })
    .await;
    let after = stats(&b);
    let dropped = after.messages_dropped_by_hook - before.messages_dropped_by_hook;
    let accepted = after.messages_accepted - before.messages_accepted;
    // A catalog of the last tick or two may still have been on its way.
    let received = after.messages_received - before.messages_received;
    assert!((MESSAGES..=MESSAGES + 2).contains(&received), "{after:?}");
    assert_eq!(dropped + accepted, received, "{after:?}");
    assert!(
        (60..=142).contains(&dropped),
        "{dropped} of {received}: {after:?}"
    );
    // Exactly the accepted messages reach the owner.
    let mut delivered = 0;
    while let Ok(event) = b.events.try_recv() {
        delivered += u64::from(matches!(event, Event::Message { .. }));
    }
    assert_eq!(delivered, accepted, "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_find_each_other_through_the_dht() {
    init_tracing();
    // B and C only know A; kademlia makes them meet so they can relay to each other.
    let a = Peer::start(local_config(&[], true)).await;
    let mut b = Peer::start(local_config(&[a.quic_addr()], true)).await;
    let mut c = Peer::start(local_config(&[a.quic_addr()], true)).await;
    a.node.announce_stream(STREAM).unwrap();
    b.node
        .join_stream(STREAM, Some(a.id()), vec![MEDIA])
        .unwrap();
    let a_id = a.id();
    drive(
        "B to receive A's fragments",
        &mut b.events,
        &b.node,
        |n| publish_both(&a.node, 1, n),
        |seen| seen.iter().any(|e| is_fragment_from(e, a_id)),
    )
    .await;

    c.node
        .join_stream(STREAM, Some(a.id()), vec![MEDIA])
        .unwrap();
    let c_node = c.node.clone();
    let seen = drive(
        "C to connect to B and receive A's fragments",
        &mut c.events,
        &c.node,
        |n| publish_both(&a.node, 1, 1000 + n),
        |seen| {
            c_node.stats().connected_peers >= 2 && seen.iter().any(|e| is_fragment_from(e, a_id))
        },
    )
    .await;
    assert_all_from(&seen, a_id);
    wait_until("B to count C among its peers", || {
        b.node.stats().connected_peers >= 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_by_a_foreign_author_are_ignored() {
    init_tracing();
    let a = Peer::start(local_config(&[], false)).await;
    let mut b = Peer::start(local_config(&[a.quic_addr()], false)).await;
    let d = Peer::start(local_config(&[b.quic_addr()], false)).await;
    a.node.announce_stream(STREAM).unwrap();
    d.node.announce_stream(STREAM).unwrap();
    b.node
        .join_stream(STREAM, Some(a.id()), vec![MEDIA])
        .unwrap();

    let (a_id, b_node) = (a.id(), b.node.clone());
    let seen = drive(
        "B to ignore D's messages and accept A's",
        &mut b.events,
        &b.node,
        |n| {
            publish_both(&a.node, 1, n);
            publish_both(&d.node, 99, n);
        },
        |seen| {
            seen.iter().any(|e| is_fragment_from(e, a_id)) && b_node.stats().messages_ignored >= 2
        },
    )
    .await;
    assert_all_from(&seen, a_id);
    let b_stats = stats(&b);
    assert_eq!(b_stats.messages_rejected, 0, "{b_stats:?}");
    assert!(stats(&d).messages_published >= 2, "{:?}", stats(&d));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_locks_the_publisher_on_its_first_catalog() {
    init_tracing();
    let a = Peer::start(local_config(&[], true)).await;
    let mut b = Peer::start(local_config(&[a.tcp_addr()], true)).await;
    a.node.announce_stream(STREAM).unwrap();
    b.node.join_stream(STREAM, None, vec![MEDIA]).unwrap();

    // Fragments before any catalog: nothing is trusted yet, so they are ignored.
    let b_node = b.node.clone();
    let seen = drive(
        "fragments ignored before the lock",
        &mut b.events,
        &b.node,
        |n| a.node.publish(STREAM, MEDIA, fragment(1, n)).unwrap(),
        |_| b_node.stats().messages_before_lock >= 2,
    )
    .await;
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, Event::Message { .. } | Event::PublisherLocked { .. })),
        "{seen:?}"
    );

    let a_id = a.id();
    let seen = drive(
        "PublisherLocked then A's fragments",
        &mut b.events,
        &b.node,
        |n| publish_both(&a.node, 1, 1000 + n),
        |seen| {
            seen.iter().any(|e| is_fragment_from(e, a_id))
                && seen.iter().any(|e| is_catalog_from(e, a_id))
        },
    )
    .await;
    let locked = seen
        .iter()
        .position(|e| matches!(e, Event::PublisherLocked { .. }))
        .expect("PublisherLocked emitted");
    assert_eq!(
        seen[locked],
        Event::PublisherLocked {
            stream: STREAM.into(),
            publisher: a_id
        }
    );
    let first_message = seen
        .iter()
        .position(|e| matches!(e, Event::Message { .. }))
        .unwrap();
    assert!(
        locked < first_message,
        "lock announced before any message: {seen:?}"
    );
    assert!(is_catalog_from(&seen[first_message], a_id));
    assert_eq!(
        seen.iter()
            .filter(|e| matches!(e, Event::PublisherLocked { .. }))
            .count(),
        1
    );
    assert_all_from(&seen, a_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads_are_rejected_and_later_messages_still_arrive() {
    init_tracing();
    let a = Peer::start(local_config(&[], false)).await;
    let mut b = Peer::start(local_config(&[a.quic_addr()], false)).await;
    a.node.announce_stream(STREAM).unwrap();
    b.node
        .join_stream(STREAM, Some(a.id()), vec![MEDIA])
        .unwrap();

    let b_node = b.node.clone();
    let seen = drive(
        "malformed messages rejected",
        &mut b.events,
        &b.node,
        |n| {
            // Not protobuf at all.
            let mut garbage = vec![0xff, 0xff, 0xff];
            garbage.extend_from_slice(&n.to_be_bytes());
            a.node.publish(STREAM, MEDIA, garbage).unwrap();
            // Decodes, but violates the limits: fragment index beyond its count.
            let bad = Fragment {
                epoch: 1,
                sequence: n,
                index: 5,
                count: 2,
                ..Default::default()
            };
            a.node
                .publish(STREAM, MEDIA, wire::encode(&Message::Fragment(bad)))
                .unwrap();
            // Valid, but on the wrong channel.
            a.node.publish(STREAM, MEDIA, catalog(1, n)).unwrap();
        },
        |_| b_node.stats().messages_rejected >= 6,
    )
    .await;
    assert!(
        !seen.iter().any(|e| matches!(e, Event::Message { .. })),
        "{seen:?}"
    );

    let a_id = a.id();
    let seen = drive(
        "valid fragments after the malformed ones",
        &mut b.events,
        &b.node,
        |n| publish_both(&a.node, 1, n),
        |seen| seen.iter().any(|e| is_fragment_from(e, a_id)),
    )
    .await;
    assert_all_from(&seen, a_id);
    assert!(b.node.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listening_addresses_are_full_and_dialable() {
    init_tracing();
    let a = Peer::start(local_config(&[], false)).await;
    assert_eq!(a.addrs.len(), 2, "{:?}", a.addrs);
    assert_eq!(stats(&a).listen_addrs, a.addrs);
    for addr in &a.addrs {
        assert_eq!(addr.iter().last(), Some(Protocol::P2p(a.id())), "{addr}");
        assert_eq!(
            addr.iter().next(),
            Some(Protocol::Ip4([127, 0, 0, 1].into())),
            "{addr}"
        );
        // The announced address works as a bootstrap address as it is.
        let mut x = Peer::start(local_config(&[addr], false)).await;
        // The connection may come up before `Listening`, whose wait skips other events.
        let x_node = x.node.clone();
        drive(
            "a connection to A",
            &mut x.events,
            &x.node,
            |_| {},
            |_| x_node.stats().connected_peers >= 1,
        )
        .await;
        x.node.shutdown(Duration::ZERO);
        tokio::time::timeout(TIMEOUT, x.node.stopped())
            .await
            .expect("X stops");
        assert!(!x.node.is_running());
        assert_eq!(x.node.stats().connected_peers, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lingers_until_queued_publishes_are_out() {
    init_tracing();
    let a = Peer::start(local_config(&[], false)).await;
    let mut b = Peer::start(local_config(&[a.quic_addr()], false)).await;
    a.node.announce_stream(STREAM).unwrap();
    b.node
        .join_stream(STREAM, Some(a.id()), vec![MEDIA])
        .unwrap();

    let a_id = a.id();
    drive(
        "the mesh to carry A's fragments",
        &mut b.events,
        &b.node,
        |n| publish_both(&a.node, 1, n),
        |seen| seen.iter().any(|e| is_fragment_from(e, a_id)),
    )
    .await;

    const LAST: u64 = 1_000_000;
    let Peer {
        node: a_node,
        events: mut a_events,
        ..
    } = a;
    let linger = Duration::from_secs(2);
    let shutdown_at = tokio::time::Instant::now();
    a_node.publish(STREAM, MEDIA, fragment(1, LAST)).unwrap();
    a_node.shutdown(linger);
    a_node.shutdown(Duration::from_secs(5)); // idempotent
    assert!(matches!(
        a_node.publish(STREAM, MEDIA, fragment(1, LAST + 1)),
        Err(NodeError::Stopped)
    ));
    assert!(matches!(
        a_node.announce_stream("other"),
        Err(NodeError::Stopped)
    ));
    // Dropping the handles right after `shutdown` must not cut the linger short.
    drop(a_node);

    drive(
        "the fragment published right before shutdown",
        &mut b.events,
        &b.node,
        |_| {},
        |seen| {
            seen.iter()
                .any(|e| fragment_sequence(e) == Some((a_id, LAST)))
        },
    )
    .await;
    let closed =
        tokio::time::timeout(TIMEOUT, async { while a_events.recv().await.is_some() {} }).await;
    assert!(closed.is_ok(), "A's event channel ends with the node");
    // B stayed connected, so A lingered for the whole time asked.
    assert!(
        shutdown_at.elapsed() >= linger,
        "{:?}",
        shutdown_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_every_handle_stops_the_node() {
    init_tracing();
    let Peer {
        node, mut events, ..
    } = Peer::start(local_config(&[], true)).await;
    let second = node.clone();
    drop(node);
    assert!(second.is_running());
    drop(second);
    let closed =
        tokio::time::timeout(TIMEOUT, async { while events.recv().await.is_some() {} }).await;
    assert!(
        closed.is_ok(),
        "event channel still open after every handle was dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_reports_configuration_errors() {
    init_tracing();
    let handle = tokio::runtime::Handle::current();
    let spawn = |config: NodeConfig| Node::spawn(config, &handle).map(|_| ()).unwrap_err();

    // UDP without QUIC is no transport of ours.
    let mut config = local_config(&[], false);
    config.listen = node::parse_multiaddrs("/ip4/127.0.0.1/udp/0").unwrap();
    let err = spawn(config);
    assert!(matches!(err, NodeError::Listen { .. }), "{err}");
    assert!(err.to_string().contains("/ip4/127.0.0.1/udp/0"), "{err}");

    // Port in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut config = local_config(&[], false);
    config.listen = node::parse_multiaddrs(&format!("/ip4/127.0.0.1/tcp/{port}")).unwrap();
    let err = spawn(config);
    assert!(matches!(err, NodeError::Listen { .. }), "{err}");
    assert!(err.to_string().contains(&port.to_string()), "{err}");
    drop(taken);

    // A port another node listens on: libp2p-tcp binds with SO_REUSEPORT, so without a
    // check a second node shared the port (and its incoming connections) with the first.
    let mut config = local_config(&[], false);
    config.listen = node::parse_multiaddrs("/ip4/127.0.0.1/tcp/0").unwrap();
    let first = Peer::start(config).await;
    let first_addr = without_peer_id(&first.addrs[0]);
    let mut config = local_config(&[], false);
    config.listen = vec![first_addr.clone()];
    let err = spawn(config);
    assert!(matches!(err, NodeError::Listen { .. }), "{err}");
    assert!(err.to_string().contains("in use"), "{err}");
    // Every address: 0.0.0.0 holds 127.0.0.1's port too.
    let Some(libp2p::multiaddr::Protocol::Tcp(held)) = first_addr.iter().nth(1) else {
        panic!("{first_addr}");
    };
    let mut config = local_config(&[], false);
    config.listen = node::parse_multiaddrs(&format!("/ip4/0.0.0.0/tcp/{held}")).unwrap();
    assert!(matches!(spawn(config), NodeError::Listen { .. }));
    first.node.shutdown(Duration::ZERO);

    // Bootstrap to ourselves, without a peer id, over an unsupported transport.
    let mut config = local_config(&[], false);
    let own = config.keypair.public().to_peer_id();
    config.bootstrap = vec![format!("/ip4/127.0.0.1/tcp/1/p2p/{own}").parse().unwrap()];
    assert!(matches!(spawn(config), NodeError::BootstrapIsSelf { .. }));
    let mut config = local_config(&[], false);
    config.bootstrap = vec!["/ip4/127.0.0.1/tcp/1".parse().unwrap()];
    assert!(matches!(
        spawn(config),
        NodeError::BootstrapWithoutPeerId { .. }
    ));
    let mut config = local_config(&[], false);
    config.bootstrap = vec![
        format!("/dns4/example.invalid/tcp/1/p2p/{}", PeerId::random())
            .parse()
            .unwrap(),
    ];
    assert!(matches!(spawn(config), NodeError::Dial { .. }));

    let mut config = local_config(&[], false);
    config.event_capacity = 0;
    assert!(matches!(spawn(config), NodeError::InvalidConfig(_)));
}

#[test]
fn identity_file_is_created_once_and_reloaded() {
    let dir = std::env::temp_dir().join(format!(
        "p2plive-node-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let path = dir.join("nested/dir/identity.key");
    assert!(!path.exists());

    let created = node::load_or_create_identity(&path).unwrap();
    assert!(path.exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let loaded = node::load_or_create_identity(&path).unwrap();
    assert_eq!(created.public().to_peer_id(), loaded.public().to_peer_id());
    assert!(loaded.clone().try_into_ed25519().is_ok());

    let corrupt = dir.join("corrupt.key");
    std::fs::write(&corrupt, b"not a key").unwrap();
    let err = node::load_or_create_identity(&corrupt).unwrap_err();
    assert!(matches!(err, NodeError::IdentityDecode { .. }), "{err}");
    assert!(err.to_string().contains("corrupt.key"), "{err}");

    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn address_lists_parse_with_clear_errors() {
    assert!(node::parse_multiaddrs("").unwrap().is_empty());
    assert_eq!(
        node::parse_multiaddrs(" /ip4/127.0.0.1/tcp/1 , /ip6/::1/udp/2/quic-v1 ")
            .unwrap()
            .len(),
        2
    );

    let err = node::parse_multiaddrs("/ip4/127.0.0.1/tcp/1, not-an-address").unwrap_err();
    assert!(matches!(err, NodeError::InvalidMultiaddr { .. }), "{err}");
    assert!(err.to_string().contains("\"not-an-address\""), "{err}");

    let err = node::parse_bootstrap("/ip4/127.0.0.1/tcp/4001").unwrap_err();
    assert!(
        matches!(err, NodeError::BootstrapWithoutPeerId { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("/ip4/127.0.0.1/tcp/4001"), "{err}");
    assert!(err.to_string().contains("/p2p/"), "{err}");

    let peer = PeerId::random();
    let ok = node::parse_bootstrap(&format!("/ip4/127.0.0.1/udp/4001/quic-v1/p2p/{peer}")).unwrap();
    assert_eq!(ok[0].iter().last(), Some(Protocol::P2p(peer)));
}

/// The media data plane between real nodes: a viewer that forwards to others is killed, and
/// every other viewer keeps receiving (the trees repair; pulls fill the gap); a receive-only
/// viewer forwards no media and still receives everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trees_repair_after_a_forwarding_viewer_dies_and_receive_only_viewers_forward_nothing() {
    init_tracing();
    let publisher = Peer::start(trees_config(&[], false)).await;
    publisher.node.announce_stream(STREAM).unwrap();
    let mut viewers: Vec<Peer> = Vec::new();
    for i in 0..8 {
        let mut bootstrap = vec![publisher.tcp_addr().clone()];
        bootstrap.extend(viewers.iter().rev().take(2).map(|v| v.tcp_addr().clone()));
        let refs: Vec<&Multiaddr> = bootstrap.iter().collect();
        let mut config = trees_config(&refs, false);
        if i == 7 {
            config.upload_capacity_kbps = Some(0);
        }
        let viewer = Peer::start(config).await;
        viewer
            .node
            .join_stream(STREAM, Some(publisher.id()), vec![MEDIA])
            .unwrap();
        viewers.push(viewer);
    }
    let epoch = 7;
    let mut sequence = 0u64;
    let mut seen: Vec<Vec<Event>> = vec![Vec::new(); viewers.len()];
    stream_frames(
        &publisher,
        &mut viewers,
        &mut seen,
        epoch,
        &mut sequence,
        6000,
        |_| false,
    )
    .await;
    let forwarded = |peer: &Peer| peer.node.stats().data_plane.map_or(0, |dp| dp.children);
    // The viewer with the most children dies (not the receive-only one).
    let victim = (0..7).max_by_key(|&i| forwarded(&viewers[i])).unwrap();
    assert!(forwarded(&viewers[victim]) > 0, "nobody forwards");
    viewers[victim].node.shutdown(Duration::ZERO);
    let killed_at = sequence;
    stream_frames(
        &publisher,
        &mut viewers,
        &mut seen,
        epoch,
        &mut sequence,
        6000,
        |_| false,
    )
    .await;
    let end = sequence;
    let received = seen.iter().map(|events| {
        events
            .iter()
            .filter_map(fragment_sequence)
            .map(|(_, seq)| seq)
            .collect::<BTreeSet<u64>>()
    });
    for (i, got) in received.enumerate() {
        if i == victim {
            continue;
        }
        // The last 4 s all arrived: the tree repaired within the first 2 s after the kill.
        let tail: Vec<u64> = (killed_at + 60..end - 5)
            .filter(|s| !got.contains(s))
            .collect();
        assert!(
            tail.is_empty(),
            "viewer {i} missed {tail:?}; {:?}",
            viewers[i].node.stats()
        );
        let window = (killed_at..end).filter(|s| got.contains(s)).count() as u64;
        assert!(
            window * 10 >= (end - killed_at) * 9,
            "viewer {i}: {window} of {}",
            end - killed_at
        );
    }
    let phone = viewers[7].node.stats();
    let dp = phone.data_plane.expect("a data plane");
    assert_eq!(dp.children, 0);
    assert_eq!(
        dp.shards_sent, 0,
        "the receive-only viewer sent shards: {dp:?}"
    );
    for viewer in &viewers {
        viewer.node.shutdown(Duration::ZERO);
    }
    publisher.node.shutdown(Duration::ZERO);
}

/// A peer that speaks no ping itself (as a js-libp2p node without the ping service) still
/// gets its pings answered, on one stream reused and on new streams, long after our own
/// ping to it would have been refused. libp2p-ping 0.48 stopped answering in that case, and
/// js-libp2p's connection monitor then closed the connection after ~15 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_are_answered_for_peers_that_do_not_ping_back() {
    use futures::{AsyncReadExt as _, AsyncWriteExt as _, StreamExt as _};
    use libp2p::StreamProtocol;

    init_tracing();
    let node = Peer::start(trees_config(&[], false)).await;
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    let mut control = swarm.behaviour().new_control();
    swarm.dial(node.tcp_addr().clone()).unwrap();
    let driver = tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    // By now the node has tried to ping us (we refuse: no ping protocol here).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    const PING: StreamProtocol = StreamProtocol::new("/ipfs/ping/1.0.0");
    for stream_no in 0..2 {
        let mut stream = tokio::time::timeout(TIMEOUT, control.open_stream(node.id(), PING))
            .await
            .expect("opens in time")
            .expect("the node speaks ping");
        for round in 0..3u8 {
            let payload = [round ^ (stream_no * 16); 32];
            stream.write_all(&payload).await.unwrap();
            stream.flush().await.unwrap();
            let mut echo = [0u8; 32];
            tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echo))
                .await
                .unwrap_or_else(|_| panic!("ping {round} on stream {stream_no} answered in 5 s"))
                .unwrap();
            assert_eq!(echo, payload);
        }
        stream.close().await.unwrap();
    }
    driver.abort();
}

/// A publisher restarted without its identity file comes back on the same address under a
/// new peer id. The viewers' bootstrap redials reach it under that id. A viewer that locked
/// in on the first catalog (no publisher given) follows the new one once the old one has
/// been silent for `PUBLISHER_RELOCK_AFTER` (5 s); a viewer given the old publisher's id
/// keeps refusing the new one, and does not flood it with pulls meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_back_under_a_new_peer_id_is_followed_unless_pinned() {
    init_tracing();
    let old = Peer::start(trees_config(&[], false)).await;
    old.node.announce_stream(STREAM).unwrap();
    let mut viewers = Vec::new();
    for pinned in [None, Some(old.id())] {
        let viewer = Peer::start(trees_config(&[old.tcp_addr()], false)).await;
        viewer
            .node
            .join_stream(STREAM, pinned, vec![MEDIA])
            .unwrap();
        viewers.push(viewer);
    }
    let from = |seen: &[Event], author: PeerId| {
        seen.iter().filter(|e| is_fragment_from(e, author)).count()
    };
    let mut seen = vec![Vec::new(), Vec::new()];
    let old_id = old.id();
    let both = stream_frames(&old, &mut viewers, &mut seen, 1, &mut 0, 20_000, |seen| {
        seen.iter().all(|s| from(s, old_id) >= 30)
    })
    .await;
    assert!(
        both,
        "the first publisher's stream did not reach both viewers"
    );
    old.node.shutdown(Duration::ZERO);

    // The new publisher listens where the old one did and dials nobody: the viewers find
    // it by redialling their bootstrap address, which now answers under another peer id.
    let mut config = trees_config(&[], false);
    config.listen = old.addrs.iter().map(without_peer_id).collect();
    // The old node's sockets close a moment after its shutdown.
    let mut tries = 0;
    let new = loop {
        match Node::spawn(config.clone(), &tokio::runtime::Handle::current()) {
            Ok((node, events)) => break Peer::from_spawned(node, events).await,
            Err(err) if tries < 50 => {
                tries += 1;
                tracing::debug!(%err, "address still in use");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("the new publisher cannot listen where the old one did: {err}"),
        }
    };
    new.node.announce_stream(STREAM).unwrap();
    let new_id = new.id();
    let mut seen = vec![Vec::new(), Vec::new()];
    let pulls_before = viewers[1]
        .node
        .stats()
        .data_plane
        .map_or(0, |dp| dp.pulls_sent);
    let started = tokio::time::Instant::now();
    let followed = stream_frames(&new, &mut viewers, &mut seen, 2, &mut 0, 25_000, |seen| {
        from(&seen[0], new_id) >= 30
    })
    .await;
    let took = started.elapsed();
    assert!(
        followed,
        "the unpinned viewer did not follow the new publisher: {:?}",
        viewers[0].node.stats()
    );
    assert!(
        seen[0].contains(&Event::PublisherLocked {
            stream: STREAM.into(),
            publisher: new_id
        }),
        "{:?}",
        seen[0]
    );
    // Not before the old publisher had been silent for the relock delay.
    assert!(took >= Duration::from_secs(4), "followed after {took:?}");
    assert_eq!(
        from(&seen[1], new_id),
        0,
        "the pinned viewer played the new publisher"
    );
    let pulls = viewers[1]
        .node
        .stats()
        .data_plane
        .map_or(0, |dp| dp.pulls_sent)
        - pulls_before;
    let secs = took.as_secs_f64();
    assert!(
        (pulls as f64) < 10.0 * secs,
        "the pinned viewer sent {pulls} pulls in {secs:.1} s: {:?}",
        viewers[1].node.stats().data_plane
    );
    for viewer in &viewers {
        viewer.node.shutdown(Duration::ZERO);
    }
    new.node.shutdown(Duration::ZERO);
}

/// A bootstrap address that answers under another peer id at first contact is not
/// followed: the address says whom to expect, so the node stays unconnected (only a
/// bootstrap peer reached before is followed to a new id, as after a restart without its
/// identity file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_address_under_another_id_at_first_contact_is_not_followed() {
    init_tracing();
    let a = Peer::start(trees_config(&[], false)).await;
    let expected = PeerId::random();
    let wrong = without_peer_id(a.tcp_addr()).with(Protocol::P2p(expected));
    let b = Peer::start(trees_config(&[&wrong], false)).await;
    // The first dial and a maintenance round's redial (5 s) both reach A and fail.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(b.node.stats().connected_peers, 0, "{:?}", b.node.stats());
    a.node.shutdown(Duration::ZERO);
    b.node.shutdown(Duration::ZERO);
}
