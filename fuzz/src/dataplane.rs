//! The media data plane (`core::dataplane`) fed by hostile peers.
//!
//! A viewer's data plane gets messages from four peers: structurally valid `DpMessage`s of
//! every kind built from the fuzzer's bytes (shards, manifests, joins, accepts, redirects,
//! pulls, haves, reports...), raw bytes, connections coming and going, and the real
//! publisher's shards and manifests for objects it publishes. It must never panic, and every
//! object it delivers must be one the publisher published, byte for byte.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use gstp2plive::core::dataplane::{DataPlane, DataPlaneConfig, ObjectKey, Output, Role};
use gstp2plive::proto::dp_message::Body;
use gstp2plive::proto::{
    DpAccept, DpHave, DpHaveLayer, DpJoin, DpKey, DpLeave, DpManifest, DpMessage, DpPull,
    DpRedirect, DpReport, DpShard, DpSubscribe, DpTrackLayer,
};
use prost::Message as _;

use super::trace;

const PUBLISHER: u32 = 0;
const VIEWER: u32 = 9;

struct Reader<'a> {
    data: &'a [u8],
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from(self.byte()?) | u32::from(self.byte()?) << 8)
    }
    fn bytes(&mut self, max: usize) -> Option<Vec<u8>> {
        let len = usize::from(self.byte()?).min(max).min(self.data.len());
        let (head, rest) = self.data.split_at(len);
        self.data = rest;
        Some(head.to_vec())
    }
}

fn key(r: &mut Reader) -> Option<DpKey> {
    Some(DpKey {
        track: u32::from(r.byte()? % 2),
        layer: u32::from(r.byte()? % 2),
        sequence: u64::from(r.byte()?),
        fragment: u32::from(r.byte()? % 3),
    })
}

/// A message of kind `kind` with fields from `r`.
fn message(kind: u8, tag: u32, r: &mut Reader) -> Option<DpMessage> {
    let body = match kind % 12 {
        0 => Body::Shard(DpShard {
            key: Some(key(r)?),
            index: u32::from(r.byte()? % 70),
            data: r.bytes(255)?.into(),
        }),
        1 => Body::Manifest(DpManifest {
            epoch: u64::from(r.byte()? % 3),
            key: Some(key(r)?),
            length: r.u32()?,
            data_shards: u32::from(r.byte()? % 70),
            parity_shards: u32::from(r.byte()? % 8),
            fragments: u32::from(r.byte()? % 5),
            digests: r.bytes(255)?.into(),
            signature: r.bytes(64)?.into(),
        }),
        2 => Body::Join(DpJoin {
            stripe: u32::from(r.byte()? % 20),
            interior: i32::from(r.byte()? % 20) - 1,
            can_forward: r.byte()? % 2 == 0,
            redirects: u32::from(r.byte()?),
            layers: vec![DpTrackLayer { track: 0, layer: 0 }],
            flexible: r.byte()? % 2 == 0,
            graft: r.byte()? % 2 == 0,
            room: u32::from(r.byte()? % 40),
        }),
        3 => Body::Accept(DpAccept {
            stripe: u32::from(r.byte()? % 20),
            path: (0..r.byte()? % 8).map(u64::from).collect(),
        }),
        4 => Body::Redirect(DpRedirect {
            stripe: u32::from(r.byte()? % 20),
            peer: u32::from(r.byte()? % 6).to_be_bytes().to_vec().into(),
            info: r.bytes(16)?.into(),
        }),
        5 => Body::Leave(DpLeave {
            stripe: u32::from(r.byte()? % 20),
        }),
        6 => Body::Have(DpHave {
            layers: vec![DpHaveLayer {
                track: 0,
                layer: 0,
                latest: u64::from(r.byte()?),
                complete: u64::from(r.u32()?) << 16 | u64::from(r.u32()?),
                latest_complete: r.byte()? % 2 == 0,
            }],
            depths: (0..r.byte()? % 20).map(u32::from).collect(),
            room: u32::from(r.byte()? % 40),
            epoch: u64::from(r.byte()? % 3),
        }),
        7 => Body::Pull(DpPull {
            key: Some(key(r)?),
            shards: u64::from(r.u32()?),
            manifest: r.byte()? % 2 == 0,
            count: u32::from(r.byte()? % 20),
        }),
        8 => Body::Subscribe(DpSubscribe {
            layers: vec![DpTrackLayer {
                track: 0,
                layer: u32::from(r.byte()? % 3),
            }],
            stripe: u32::from(r.byte()? % 20),
        }),
        9 => Body::Report(DpReport {
            viewers: r.u32()?,
            latency_histogram: (0..r.byte()? % 16).map(u32::from).collect(),
            ..Default::default()
        }),
        _ => return None,
    };
    Some(DpMessage {
        stream: tag,
        body: Some(body),
    })
}

pub fn run(data: &[u8]) {
    let start = Instant::now();
    let mut now = start;
    let signing = SigningKey::from_bytes(&[3u8; 32]);
    let config = DataPlaneConfig {
        seed: 1,
        ..DataPlaneConfig::default()
    };
    let mut publisher = DataPlane::new(
        now,
        "fuzz",
        PUBLISHER,
        Role::Publisher {
            key: signing.clone(),
        },
        config.clone(),
    );
    let mut viewer = DataPlane::new(
        now,
        "fuzz",
        VIEWER,
        Role::Viewer {
            publisher: PUBLISHER,
            key: signing.verifying_key(),
        },
        config,
    );
    viewer.set_subscription(now, BTreeSet::from([(0, 0)]));
    publisher.handle_peer_up(now, VIEWER, Bytes::new());
    viewer.handle_peer_up(now, PUBLISHER, Bytes::new());
    let tag = gstp2plive::core::dataplane::stream_tag("fuzz");
    let mut published: BTreeMap<ObjectKey, Bytes> = BTreeMap::new();
    let mut sequence = 0u64;
    let mut r = Reader { data };
    while let Some(op) = r.byte() {
        let peer = u32::from(op >> 5) % 5; // 0: the publisher's link, 1..4 hostile
        match op & 0x1f {
            0..=11 => {
                let Some(message) = message(op & 0x1f, tag, &mut r) else {
                    break;
                };
                let from = if peer == 0 { 1 } else { peer };
                trace(format_args!("message from {from}: {message:?}"));
                viewer.handle_message(now, from, message.encode_to_vec().into());
            }
            12 => {
                let Some(raw) = r.bytes(255) else { break };
                viewer.handle_message(now, peer.max(1), raw.into());
            }
            13 => viewer.handle_peer_up(now, peer.max(1), Bytes::new()),
            14 => viewer.handle_peer_down(now, peer.max(1)),
            15 => {
                let Some(size) = r.byte() else { break };
                let key = ObjectKey {
                    track: 0,
                    layer: 0,
                    sequence,
                    fragment: 0,
                };
                sequence += 1;
                let object: Bytes = vec![size; usize::from(size) * 40 + 1].into();
                published.insert(key, object.clone());
                publisher.publish(now, 1, key, object);
            }
            _ => {
                let Some(ms) = r.byte() else { break };
                now += Duration::from_millis(u64::from(ms));
                publisher.handle_timeout(now);
                viewer.handle_timeout(now);
            }
        }
        // The publisher's link to the viewer carries everything it sends.
        while let Some(bytes) = publisher.poll_transmit(now, VIEWER) {
            viewer.handle_message(now, PUBLISHER, bytes);
        }
        while let Some(bytes) = viewer.poll_transmit(now, PUBLISHER) {
            publisher.handle_message(now, VIEWER, bytes);
        }
        for peer in 1..5 {
            while viewer.poll_transmit(now, peer).is_some() {}
        }
        while publisher.poll_output().is_some() {}
        while let Some(output) = viewer.poll_output() {
            if let Output::Deliver { key, object, .. } = output {
                assert_eq!(
                    published.get(&key),
                    Some(&object),
                    "delivered {key:?} was never published so"
                );
            }
        }
    }
}
