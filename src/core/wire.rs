//! Wire (de)coding. Decoding is total: any byte string yields a validated [`Message`] or a
//! [`WireError`], and the input length is checked before prost allocates anything sized by it.

use std::fmt::Write as _;
use std::hash::{Hash, Hasher};

use prost::Message as _;

pub use crate::proto::{
    Catalog, EndOfStream, Envelope, Feedback, Fragment, FrameHeader, KeyframeRequest, Layer,
    LayerKind, Track, TrackEnd, TrackKind, envelope::Body,
};

/// Longest interval a viewer report may cover.
pub const MAX_FEEDBACK_INTERVAL_MS: u32 = 60_000;
/// Most frames one viewer report may count in each of its counters: far above any real
/// frame rate over [`MAX_FEEDBACK_INTERVAL_MS`], low enough that sums cannot overflow.
pub const MAX_FEEDBACK_FRAMES: u64 = 1_000_000;
/// Largest latency or buffered time a viewer report may claim.
pub const MAX_FEEDBACK_MS: u32 = 600_000;

/// Hard limits applied while decoding anything received from the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest encoded message accepted at all.
    pub max_message_bytes: usize,
    /// Most fragments one frame may be split into.
    pub max_fragment_count: u32,
    /// Largest frame (sum of its fragments' payloads).
    pub max_frame_size: u32,
    /// Most tracks in a catalog.
    pub max_tracks: usize,
    /// Most layers per track.
    pub max_layers: usize,
    /// Longest caps string of a track.
    pub max_caps_len: usize,
    /// Longest stream topic name.
    pub max_topic_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 256 * 1024,
            max_fragment_count: 1024,
            max_frame_size: 16 * 1024 * 1024,
            max_tracks: 16,
            max_layers: 16,
            max_caps_len: 16 * 1024,
            max_topic_len: 256,
        }
    }
}

/// A decoded and validated protocol message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Catalog(Catalog),
    Fragment(Fragment),
    EndOfStream(EndOfStream),
    /// A viewer's report (feedback channel).
    Feedback(Feedback),
    /// A viewer's request for a keyframe (feedback channel).
    KeyframeRequest(KeyframeRequest),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("malformed protobuf: {0}")]
    Malformed(#[from] prost::DecodeError),
    #[error("envelope carries no message")]
    Empty,
    #[error("invalid message: {0}")]
    Invalid(String),
}

fn invalid(what: impl Into<String>) -> WireError {
    WireError::Invalid(what.into())
}

/// Decodes and validates one message received from the network.
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Message, WireError> {
    if bytes.len() > limits.max_message_bytes {
        return Err(WireError::TooLarge {
            len: bytes.len(),
            max: limits.max_message_bytes,
        });
    }
    let envelope = Envelope::decode(bytes)?;
    let message = match envelope.body.ok_or(WireError::Empty)? {
        Body::Catalog(catalog) => Message::Catalog(catalog),
        Body::Fragment(fragment) => Message::Fragment(fragment),
        Body::EndOfStream(eos) => Message::EndOfStream(eos),
        Body::Feedback(feedback) => Message::Feedback(feedback),
        Body::KeyframeRequest(request) => Message::KeyframeRequest(request),
    };
    validate(&message, limits)?;
    Ok(message)
}

/// Encodes one message for the network.
pub fn encode(message: &Message) -> Vec<u8> {
    let body = match message {
        Message::Catalog(catalog) => Body::Catalog(catalog.clone()),
        Message::Fragment(fragment) => Body::Fragment(fragment.clone()),
        Message::EndOfStream(eos) => Body::EndOfStream(eos.clone()),
        Message::Feedback(feedback) => Body::Feedback(*feedback),
        Message::KeyframeRequest(request) => Body::KeyframeRequest(*request),
    };
    Envelope { body: Some(body) }.encode_to_vec()
}

/// Checks the invariants prost cannot express.
pub fn validate(message: &Message, limits: &Limits) -> Result<(), WireError> {
    match message {
        Message::Catalog(catalog) => validate_catalog(catalog, limits),
        Message::Fragment(fragment) => validate_fragment(fragment, limits),
        Message::EndOfStream(eos) => {
            if eos.tracks.len() > limits.max_tracks * limits.max_layers {
                return Err(invalid("end-of-stream lists too many tracks"));
            }
            Ok(())
        }
        Message::Feedback(feedback) => validate_feedback(feedback),
        // Track and layer are checked against the catalog by the publisher.
        Message::KeyframeRequest(_) => Ok(()),
    }
}

fn validate_feedback(feedback: &Feedback) -> Result<(), WireError> {
    if feedback.interval_ms == 0 || feedback.interval_ms > MAX_FEEDBACK_INTERVAL_MS {
        return Err(invalid(format!(
            "feedback interval {} ms outside 1..={MAX_FEEDBACK_INTERVAL_MS}",
            feedback.interval_ms
        )));
    }
    if feedback.latency_ms > MAX_FEEDBACK_MS || feedback.buffered_ms > MAX_FEEDBACK_MS {
        return Err(invalid("feedback latency or buffer beyond the limit"));
    }
    let counts = [
        feedback.received,
        feedback.late,
        feedback.lost,
        feedback.recovered,
    ];
    if counts.iter().any(|&count| count > MAX_FEEDBACK_FRAMES) {
        return Err(invalid("feedback frame count beyond the limit"));
    }
    Ok(())
}

fn validate_catalog(catalog: &Catalog, limits: &Limits) -> Result<(), WireError> {
    if catalog.topic.len() > limits.max_topic_len {
        return Err(invalid("catalog topic too long"));
    }
    if catalog.tracks.len() > limits.max_tracks {
        return Err(invalid(format!(
            "catalog has {} tracks, limit {}",
            catalog.tracks.len(),
            limits.max_tracks
        )));
    }
    for (index, track) in catalog.tracks.iter().enumerate() {
        if catalog.tracks[..index].iter().any(|t| t.id == track.id) {
            return Err(invalid(format!("duplicate track id {}", track.id)));
        }
        if TrackKind::try_from(track.kind).unwrap_or(TrackKind::Unspecified)
            == TrackKind::Unspecified
        {
            return Err(invalid(format!("track {} has no valid kind", track.id)));
        }
        if track.caps.is_empty() || track.caps.len() > limits.max_caps_len {
            return Err(invalid(format!(
                "track {} caps empty or too long",
                track.id
            )));
        }
        if track.layers.len() > limits.max_layers {
            return Err(invalid(format!("track {} has too many layers", track.id)));
        }
        for layer in &track.layers {
            if LayerKind::try_from(layer.kind).is_err() {
                return Err(invalid(format!(
                    "track {} layer {} kind",
                    track.id, layer.id
                )));
            }
            if layer.depends_on.len() > limits.max_layers {
                return Err(invalid("layer depends on too many layers"));
            }
        }
        validate_ladder(track)?;
    }
    Ok(())
}

/// Layer ids unique; ordered by id, layers go by spatial layer, then temporal layer, and
/// the temporal ids of each spatial layer run 0, 1, 2... (the ladder a viewer steps).
fn validate_ladder(track: &Track) -> Result<(), WireError> {
    let mut layers: Vec<&Layer> = track.layers.iter().collect();
    layers.sort_by_key(|layer| layer.id);
    for pair in layers.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if a.id == b.id {
            return Err(invalid(format!(
                "track {} has layer {} twice",
                track.id, a.id
            )));
        }
        let next_temporal = b.spatial_id == a.spatial_id && b.temporal_id == a.temporal_id + 1;
        let next_spatial = b.spatial_id > a.spatial_id && b.temporal_id == 0;
        if !(next_temporal || next_spatial) {
            return Err(invalid(format!(
                "track {} layers {} and {} break the ladder order",
                track.id, a.id, b.id
            )));
        }
    }
    if layers.first().is_some_and(|first| first.temporal_id != 0) {
        return Err(invalid(format!(
            "track {} lowest layer is not a base temporal layer",
            track.id
        )));
    }
    Ok(())
}

fn validate_fragment(fragment: &Fragment, limits: &Limits) -> Result<(), WireError> {
    if fragment.count == 0 || fragment.count > limits.max_fragment_count {
        return Err(invalid(format!(
            "fragment count {} outside 1..={}",
            fragment.count, limits.max_fragment_count
        )));
    }
    if fragment.index >= fragment.count {
        return Err(invalid(format!(
            "fragment index {} not below count {}",
            fragment.index, fragment.count
        )));
    }
    match (&fragment.header, fragment.index) {
        (None, 0) => return Err(invalid("first fragment lacks the frame header")),
        (Some(_), index) if index != 0 => {
            return Err(invalid("frame header on a fragment other than the first"));
        }
        _ => {}
    }
    if let Some(header) = &fragment.header {
        if header.frame_size > limits.max_frame_size {
            return Err(invalid(format!(
                "frame size {} exceeds the limit {}",
                header.frame_size, limits.max_frame_size
            )));
        }
        if (header.frame_size as usize) < fragment.payload.len() {
            return Err(invalid("fragment payload larger than its frame"));
        }
        if header.temporal_counts.len() > limits.max_layers {
            return Err(invalid("frame header lists too many temporal layers"));
        }
    }
    if fragment.payload.len() > limits.max_frame_size as usize {
        return Err(invalid("fragment payload exceeds the frame size limit"));
    }
    Ok(())
}

/// A pubsub channel of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    /// Catalog and end-of-stream announcements; every viewer subscribes to it.
    Control,
    /// The fragments of one layer of one track.
    Media { track: u32, layer: u32 },
    /// Viewer reports and keyframe requests, read by the publisher.
    Feedback,
}

const TOPIC_PREFIX: &str = "/p2plive/1/";

impl Channel {
    /// The pubsub topic of this channel in stream `stream`.
    pub fn topic(&self, stream: &str) -> String {
        match self {
            Channel::Control => format!("{TOPIC_PREFIX}{stream}/control"),
            Channel::Feedback => format!("{TOPIC_PREFIX}{stream}/feedback"),
            Channel::Media { track, layer } => {
                format!("{TOPIC_PREFIX}{stream}/media/{track}/{layer}")
            }
        }
    }

    /// Splits a pubsub topic into its stream name and channel.
    pub fn parse(topic: &str) -> Option<(&str, Channel)> {
        let rest = topic.strip_prefix(TOPIC_PREFIX)?;
        if let Some(stream) = rest.strip_suffix("/control") {
            return Some((stream, Channel::Control));
        }
        if let Some(stream) = rest.strip_suffix("/feedback") {
            return Some((stream, Channel::Feedback));
        }
        let (head, layer) = rest.rsplit_once('/')?;
        let (head, track) = head.rsplit_once('/')?;
        let stream = head.strip_suffix("/media")?;
        Some((
            stream,
            Channel::Media {
                track: track.parse().ok()?,
                layer: layer.parse().ok()?,
            },
        ))
    }

    /// The channel a message travels on.
    pub fn of(message: &Message) -> Channel {
        match message {
            Message::Fragment(f) => Channel::Media {
                track: f.track,
                layer: f.layer,
            },
            Message::Catalog(_) | Message::EndOfStream(_) => Channel::Control,
            Message::Feedback(_) | Message::KeyframeRequest(_) => Channel::Feedback,
        }
    }
}

/// The name under which a stream is announced in the DHT.
pub fn provider_key(stream: &str) -> Vec<u8> {
    format!("{TOPIC_PREFIX}{stream}").into_bytes()
}

/// A de-duplication key for a pubsub message derived from what it carries
/// (stream epoch, track, layer, sequence, fragment), so that every copy of one fragment has
/// one id whichever path it took. Undecodable data falls back to a hash of the bytes.
pub fn message_id(bytes: &[u8]) -> Vec<u8> {
    let limits = Limits::default();
    let mut id = String::with_capacity(48);
    match decode(bytes, &limits) {
        Ok(Message::Fragment(f)) => {
            let _ = write!(
                id,
                "f/{:x}/{}/{}/{}/{}",
                f.epoch, f.track, f.layer, f.sequence, f.index
            );
        }
        Ok(Message::Catalog(c)) => {
            let _ = write!(id, "c/{:x}/{}/{}", c.epoch, c.version, c.sequence);
        }
        Ok(Message::EndOfStream(e)) => {
            let _ = write!(id, "e/{:x}/{}", e.epoch, e.sequence);
        }
        Ok(Message::Feedback(b)) => {
            let _ = write!(id, "b/{:x}/{:x}/{}", b.epoch, b.viewer_id, b.sequence);
        }
        Ok(Message::KeyframeRequest(k)) => {
            // The sequence is unique per viewer request; at most 56 bytes like reports.
            let _ = write!(id, "k/{:x}/{:x}/{}", k.epoch, k.viewer_id, k.sequence);
        }
        Err(_) => {
            // SipHash with fixed keys: stable within and across processes of one build.
            let mut hasher = std::hash::DefaultHasher::new();
            bytes.hash(&mut hasher);
            let _ = write!(id, "x/{:016x}/{}", hasher.finish(), bytes.len());
        }
    }
    id.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fragment(index: u32, count: u32) -> Fragment {
        Fragment {
            epoch: 7,
            track: 1,
            layer: 0,
            sequence: 42,
            index,
            count,
            header: (index == 0).then(|| FrameHeader {
                pts_ns: Some(1_000),
                keyframe: true,
                frame_size: 10,
                ..Default::default()
            }),
            payload: vec![1, 2, 3].into(),
        }
    }

    #[test]
    fn round_trip() {
        let message = Message::Fragment(fragment(0, 2));
        let bytes = encode(&message);
        assert_eq!(decode(&bytes, &Limits::default()).unwrap(), message);
    }

    #[test]
    fn rejects_oversized_input_before_decoding() {
        let limits = Limits {
            max_message_bytes: 8,
            ..Limits::default()
        };
        assert_eq!(
            decode(&[0u8; 9], &limits),
            Err(WireError::TooLarge { len: 9, max: 8 })
        );
    }

    #[test]
    fn rejects_impossible_fragments() {
        let limits = Limits::default();
        for bad in [
            fragment(0, 0),
            fragment(3, 2),
            fragment(0, limits.max_fragment_count + 1),
            Fragment {
                header: None,
                ..fragment(0, 2)
            },
            Fragment {
                header: Some(FrameHeader::default()),
                ..fragment(1, 2)
            },
        ] {
            let bytes = encode(&Message::Fragment(bad.clone()));
            assert!(
                matches!(decode(&bytes, &limits), Err(WireError::Invalid(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn rejects_garbage_and_empty_envelopes() {
        let limits = Limits::default();
        assert!(matches!(
            decode(&[0xff, 0xff, 0xff], &limits),
            Err(WireError::Malformed(_))
        ));
        assert_eq!(decode(&[], &limits), Err(WireError::Empty));
    }

    #[test]
    fn rejects_bad_catalogs() {
        let limits = Limits::default();
        let track = |id| Track {
            id,
            kind: TrackKind::Video as i32,
            caps: "video/x-vp8".into(),
            layers: vec![],
        };
        let duplicate = Catalog {
            tracks: vec![track(1), track(1)],
            ..Default::default()
        };
        let no_kind = Catalog {
            tracks: vec![Track {
                kind: 0,
                ..track(1)
            }],
            ..Default::default()
        };
        let no_caps = Catalog {
            tracks: vec![Track {
                caps: String::new(),
                ..track(1)
            }],
            ..Default::default()
        };
        for bad in [duplicate, no_kind, no_caps] {
            let bytes = encode(&Message::Catalog(bad));
            assert!(matches!(
                decode(&bytes, &limits),
                Err(WireError::Invalid(_))
            ));
        }
        let good = Catalog {
            tracks: vec![track(0), track(1)],
            ..Default::default()
        };
        assert!(decode(&encode(&Message::Catalog(good)), &limits).is_ok());
    }

    #[test]
    fn topics_round_trip() {
        for channel in [
            Channel::Control,
            Channel::Feedback,
            Channel::Media { track: 3, layer: 2 },
        ] {
            let topic = channel.topic("my/stream");
            assert_eq!(Channel::parse(&topic), Some(("my/stream", channel)));
        }
        assert_eq!(Channel::parse("/other/control"), None);
        assert_eq!(Channel::parse("/p2plive/1/s/media/x/0"), None);
    }

    #[test]
    fn message_ids_identify_fragments() {
        let a = encode(&Message::Fragment(fragment(0, 2)));
        let b = encode(&Message::Fragment(fragment(1, 2)));
        assert_eq!(message_id(&a), message_id(&a.clone()));
        assert_ne!(message_id(&a), message_id(&b));
        assert_ne!(message_id(b"junk"), message_id(b"junk2"));
    }

    fn feedback() -> Feedback {
        Feedback {
            epoch: 7,
            viewer_id: 0xfeed,
            sequence: 3,
            interval_ms: 1000,
            track: 0,
            current_layer: 1,
            requested_layer: 2,
            latency_ms: 350,
            buffered_ms: 300,
            received: 30,
            late: 1,
            lost: 2,
            recovered: 1,
        }
    }

    #[test]
    fn viewer_messages_round_trip_on_the_feedback_channel() {
        let limits = Limits::default();
        let request = KeyframeRequest {
            epoch: 7,
            track: 0,
            layer: 3,
            viewer_id: 0xfeed,
            sequence: 9,
        };
        for message in [
            Message::Feedback(feedback()),
            Message::KeyframeRequest(request),
        ] {
            let bytes = encode(&message);
            assert_eq!(decode(&bytes, &limits).unwrap(), message);
            assert_eq!(Channel::of(&message), Channel::Feedback);
            let id = message_id(&bytes);
            assert!(id.len() <= 72, "{} bytes", id.len());
        }
        // Reports of one viewer are distinct, as are two viewers' identical reports.
        let other = Feedback {
            sequence: 4,
            ..feedback()
        };
        let another_viewer = Feedback {
            viewer_id: 1,
            ..feedback()
        };
        let id = |f: Feedback| message_id(&encode(&Message::Feedback(f)));
        assert_ne!(id(feedback()), id(other));
        assert_ne!(id(feedback()), id(another_viewer));
        // The longest possible ids stay within what the node budgets for.
        let longest = Feedback {
            epoch: u64::MAX,
            viewer_id: u64::MAX,
            sequence: u64::MAX,
            ..feedback()
        };
        assert!(id(longest).len() <= 72);
    }

    #[test]
    fn rejects_impossible_feedback() {
        let limits = Limits::default();
        for bad in [
            Feedback {
                interval_ms: 0,
                ..feedback()
            },
            Feedback {
                interval_ms: MAX_FEEDBACK_INTERVAL_MS + 1,
                ..feedback()
            },
            Feedback {
                latency_ms: MAX_FEEDBACK_MS + 1,
                ..feedback()
            },
            Feedback {
                buffered_ms: MAX_FEEDBACK_MS + 1,
                ..feedback()
            },
            Feedback {
                lost: MAX_FEEDBACK_FRAMES + 1,
                ..feedback()
            },
            Feedback {
                received: u64::MAX,
                ..feedback()
            },
        ] {
            let bytes = encode(&Message::Feedback(bad));
            assert!(matches!(
                decode(&bytes, &limits),
                Err(WireError::Invalid(_))
            ));
        }
    }

    #[test]
    fn rejects_frames_listing_too_many_temporal_layers() {
        let limits = Limits::default();
        let mut ok = fragment(0, 1);
        ok.header.as_mut().unwrap().temporal_counts = vec![4; limits.max_layers];
        assert!(decode(&encode(&Message::Fragment(ok.clone())), &limits).is_ok());
        ok.header.as_mut().unwrap().temporal_counts.push(4);
        assert!(matches!(
            decode(&encode(&Message::Fragment(ok)), &limits),
            Err(WireError::Invalid(_))
        ));
    }

    fn layer(id: u32, spatial_id: u32, temporal_id: u32) -> Layer {
        Layer {
            id,
            kind: if temporal_id > 0 {
                LayerKind::Temporal
            } else if spatial_id > 0 {
                LayerKind::Spatial
            } else {
                LayerKind::Base
            } as i32,
            spatial_id,
            temporal_id,
            ..Layer::default()
        }
    }

    #[test]
    fn catalog_layers_must_form_a_ladder() {
        let limits = Limits::default();
        let catalog = |layers: Vec<Layer>| {
            encode(&Message::Catalog(Catalog {
                tracks: vec![Track {
                    id: 0,
                    kind: TrackKind::Video as i32,
                    caps: "video/x-vp8".into(),
                    layers,
                }],
                ..Default::default()
            }))
        };
        // Two simulcast layers of three temporal layers each, listed in any order.
        let good = vec![
            layer(3, 1, 0),
            layer(0, 0, 0),
            layer(1, 0, 1),
            layer(2, 0, 2),
            layer(4, 1, 1),
            layer(5, 1, 2),
        ];
        assert!(decode(&catalog(good), &limits).is_ok());
        for bad in [
            vec![layer(0, 0, 0), layer(0, 0, 1)],
            // Temporal id gap.
            vec![layer(0, 0, 0), layer(1, 0, 2)],
            // A spatial layer not starting at its base.
            vec![layer(0, 0, 0), layer(1, 1, 1)],
            // Ids not in ladder order.
            vec![layer(0, 1, 0), layer(1, 0, 0)],
            vec![layer(0, 0, 1)],
            // The same (spatial, temporal) twice.
            vec![layer(0, 0, 0), layer(1, 0, 0)],
        ] {
            assert!(
                matches!(
                    decode(&catalog(bad.clone()), &limits),
                    Err(WireError::Invalid(_))
                ),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn feedback_topic_round_trips() {
        let topic = Channel::Feedback.topic("a/feedback");
        assert_eq!(topic, "/p2plive/1/a/feedback/feedback");
        assert_eq!(
            Channel::parse(&topic),
            Some(("a/feedback", Channel::Feedback))
        );
        assert_eq!(
            Channel::parse("/p2plive/1/a/feedback/control"),
            Some(("a/feedback", Channel::Control))
        );
    }

    fn arbitrary_message() -> impl proptest::strategy::Strategy<Value = Message> {
        use proptest::prelude::*;
        let feedback = (
            any::<u64>(),
            any::<u64>(),
            0u32..70_000,
            0u32..700_000,
            0u64..2_000_000,
            0u64..2_000_000,
        )
            .prop_map(
                |(viewer_id, sequence, interval_ms, latency_ms, received, lost)| {
                    Message::Feedback(Feedback {
                        viewer_id,
                        sequence,
                        interval_ms,
                        latency_ms,
                        received,
                        lost,
                        ..Feedback::default()
                    })
                },
            );
        let request =
            (any::<u32>(), any::<u32>(), any::<u64>()).prop_map(|(track, layer, sequence)| {
                Message::KeyframeRequest(KeyframeRequest {
                    track,
                    layer,
                    sequence,
                    ..KeyframeRequest::default()
                })
            });
        let fragment = (
            0u32..4,
            0u32..4,
            proptest::collection::vec(any::<u64>(), 0..20),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..16),
        )
            .prop_map(|(index, count, temporal_counts, temporal_sync, payload)| {
                Message::Fragment(Fragment {
                    index,
                    count,
                    header: (index == 0).then(|| FrameHeader {
                        frame_size: 16,
                        temporal_sync,
                        temporal_counts,
                        ..FrameHeader::default()
                    }),
                    payload: payload.into(),
                    ..Fragment::default()
                })
            });
        let catalog =
            proptest::collection::vec((0u32..5, 0u32..3, 0u32..4), 0..8).prop_map(|layers| {
                Message::Catalog(Catalog {
                    tracks: vec![Track {
                        id: 0,
                        kind: TrackKind::Video as i32,
                        caps: "video/x-vp8".into(),
                        layers: layers
                            .into_iter()
                            .map(|(id, spatial, temporal)| layer(id, spatial, temporal))
                            .collect(),
                    }],
                    ..Catalog::default()
                })
            });
        proptest::prop_oneof![feedback, request, fragment, catalog]
    }

    proptest::proptest! {
        #[test]
        fn decode_is_total(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode(&bytes, &Limits::default());
            let _ = message_id(&bytes);
        }

        /// Structured messages, valid or not: decoding agrees with validation and what
        /// decodes re-encodes to the same message.
        #[test]
        fn decode_agrees_with_validate(message in arbitrary_message()) {
            let limits = Limits::default();
            let bytes = encode(&message);
            match decode(&bytes, &limits) {
                Ok(decoded) => {
                    proptest::prop_assert_eq!(&decoded, &message);
                    proptest::prop_assert!(validate(&message, &limits).is_ok());
                    proptest::prop_assert!(message_id(&bytes).len() <= 72);
                }
                Err(WireError::Invalid(_)) => {
                    proptest::prop_assert!(validate(&message, &limits).is_err());
                }
                Err(other) => proptest::prop_assert!(false, "{other:?}"),
            }
        }
    }
}
