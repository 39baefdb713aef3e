//! Publisher state machine: turns encoded frames into fragment messages and keeps the
//! catalog and end-of-stream announcements flowing. Sans-IO: the caller feeds frames and
//! time in and drains [`Transmit`]s out.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::feedback::{Audience, AudienceStats, FeedbackConfig};
use super::wire::{
    self, Catalog, Channel, EndOfStream, Feedback, Fragment, FrameHeader, KeyframeRequest, Layer,
    LayerKind, Limits, Message, Track, TrackEnd, TrackKind,
};

/// Bytes an encoded fragment may need beyond its payload (envelope, ids, frame header).
/// Generous on purpose: it only caps the configured fragment size.
const FRAGMENT_OVERHEAD: usize = 256;

/// Shortest catalog republish period, so a zero interval cannot turn into a busy loop.
const MIN_CATALOG_INTERVAL: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherConfig {
    /// Payload bytes per fragment.
    pub max_fragment_size: usize,
    /// How often the catalog is republished for late joiners.
    pub catalog_interval: Duration,
    /// How many times the end-of-stream announcement is sent (at least once).
    pub eos_repeats: u32,
    /// Time between end-of-stream repeats.
    pub eos_interval: Duration,
    /// Viewer reports and keyframe requests (see [`Publisher::handle_feedback`]).
    pub feedback: FeedbackConfig,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            max_fragment_size: 16_000,
            catalog_interval: Duration::from_secs(1),
            eos_repeats: 3,
            eos_interval: Duration::from_millis(100),
            feedback: FeedbackConfig::default(),
        }
    }
}

/// One encoded frame as produced by an encoder or parser, timestamps in stream time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedFrame {
    pub pts: Option<Duration>,
    pub dts: Option<Duration>,
    pub duration: Option<Duration>,
    /// A decodable point: viewers may start or resume here.
    pub keyframe: bool,
    /// Publisher wall clock at capture, Unix epoch nanoseconds.
    pub capture_unix_ns: u64,
    /// How long the frame took from capture to [`Publisher::push_frame`] (encoding and
    /// queueing); zero when unknown. Carried to viewers (saturated at `u32::MAX` µs) so they
    /// can tell lateness caused by a starved publisher from lateness caused by the network.
    pub publish_delay: Duration,
    pub data: Bytes,
}

/// One message to publish on one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub channel: Channel,
    /// An encoded `Envelope`.
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PublishError {
    #[error("unknown track {0}")]
    UnknownTrack(u32),
    #[error("track {track} has no layer {layer}")]
    UnknownLayer { track: u32, layer: u32 },
    #[error("frame of {size} bytes exceeds the limit of {max}")]
    FrameTooLarge { size: usize, max: usize },
    #[error("the stream has ended")]
    Ended,
    #[error("empty frame")]
    EmptyFrame,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublisherStats {
    pub frames: u64,
    pub keyframes: u64,
    pub fragments: u64,
    /// Frame bytes, before framing.
    pub payload_bytes: u64,
    /// Encoded bytes of every queued message (fragments, catalogs, end-of-stream).
    pub message_bytes: u64,
    pub catalogs: u64,
}

struct PublishedTrack {
    description: Track,
    /// Next sequence number per layer id.
    next_sequence: BTreeMap<u32, u64>,
}

/// See the module documentation.
pub struct Publisher {
    topic: String,
    epoch: u64,
    config: PublisherConfig,
    limits: Limits,
    tracks: Vec<PublishedTrack>,
    catalog_version: u64,
    catalog_sequence: u64,
    /// `None` until the first track exists and again after the end of stream.
    next_catalog_at: Option<Instant>,
    ended: bool,
    eos_sequence: u64,
    /// When the remaining end-of-stream repeats are due, earliest first.
    eos_repeats_due: VecDeque<Instant>,
    queue: VecDeque<Transmit>,
    /// A changed catalog waits here until the next `poll_transmit`, so tracks added together
    /// go out in one catalog (a viewer then sees them all at once), ahead of their frames.
    catalog_due: Option<Instant>,
    stats: PublisherStats,
    audience: Audience,
}

impl Publisher {
    pub fn new(topic: &str, epoch: u64, config: PublisherConfig) -> Self {
        Self {
            topic: topic.to_owned(),
            epoch,
            limits: Limits::default(),
            tracks: Vec::new(),
            catalog_version: 0,
            catalog_sequence: 0,
            next_catalog_at: None,
            ended: false,
            eos_sequence: 0,
            eos_repeats_due: VecDeque::new(),
            queue: VecDeque::new(),
            catalog_due: None,
            stats: PublisherStats::default(),
            audience: Audience::new(config.feedback.clone()),
            config,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Adds a track; `layers` empty means one base layer with id 0. Bumps the catalog
    /// version and queues a catalog at once. Track ids are assigned from 0 upwards.
    ///
    /// Viewers reject catalogs beyond [`Limits`] (more than `max_tracks` tracks,
    /// `max_layers` layers, empty or overlong caps); the caller keeps within them.
    pub fn add_track(
        &mut self,
        now: Instant,
        kind: TrackKind,
        caps: String,
        layers: Vec<Layer>,
    ) -> u32 {
        let id = self
            .tracks
            .last()
            .map_or(0, |track| track.description.id.saturating_add(1));
        let layers = if layers.is_empty() {
            vec![Layer {
                id: 0,
                kind: LayerKind::Base as i32,
                ..Layer::default()
            }]
        } else {
            layers
        };
        let probe = Catalog {
            tracks: vec![Track {
                id,
                kind: kind as i32,
                caps: caps.clone(),
                layers: layers.clone(),
            }],
            ..Catalog::default()
        };
        if self.tracks.len() >= self.limits.max_tracks
            || wire::validate(&Message::Catalog(probe), &self.limits).is_err()
        {
            tracing::warn!(
                id,
                "track outside the catalog limits: viewers will reject the catalog"
            );
        }
        let next_sequence = layers.iter().map(|layer| (layer.id, 0)).collect();
        self.tracks.push(PublishedTrack {
            description: Track {
                id,
                kind: kind as i32,
                caps,
                layers,
            },
            next_sequence,
        });
        self.catalog_changed(now);
        id
    }

    /// Replaces a track's caps; bumps the catalog version and queues a catalog when they
    /// differ from the current ones.
    pub fn update_track_caps(
        &mut self,
        now: Instant,
        track: u32,
        caps: String,
    ) -> Result<(), PublishError> {
        let published = self.track_mut(track)?;
        if published.description.caps != caps {
            published.description.caps = caps;
            self.catalog_changed(now);
        }
        Ok(())
    }

    /// Splits the frame into fragments of at most `max_fragment_size` payload bytes (frame
    /// header on index 0) and queues them. Returns the frame's sequence number: per track
    /// and layer, consecutive from 0.
    pub fn push_frame(
        &mut self,
        now: Instant,
        track: u32,
        layer: u32,
        frame: EncodedFrame,
    ) -> Result<u64, PublishError> {
        self.push_layer_frame(now, track, layer, frame, false)
    }

    /// [`Publisher::push_frame`] for a temporal layer: `temporal_sync` marks a frame that
    /// references only lower temporal layers (GstVP8Meta `layer_sync`), where viewers may
    /// step up to this layer. The frame header gets the per-temporal-layer frame counts of
    /// its spatial layer, from which viewers tell loss from layers they do not receive.
    pub fn push_layer_frame(
        &mut self,
        _now: Instant,
        track: u32,
        layer: u32,
        frame: EncodedFrame,
        temporal_sync: bool,
    ) -> Result<u64, PublishError> {
        if self.ended {
            return Err(PublishError::Ended);
        }
        let fragment_size = self.fragment_size();
        let max_frame_size = self.max_frame_size();
        let epoch = self.epoch;
        let published = self.track_mut(track)?;
        let sequence_slot = published
            .next_sequence
            .get(&layer)
            .ok_or(PublishError::UnknownLayer { track, layer })?;
        let size = frame.data.len();
        if size == 0 {
            return Err(PublishError::EmptyFrame);
        }
        if size > max_frame_size {
            return Err(PublishError::FrameTooLarge {
                size,
                max: max_frame_size,
            });
        }
        let sequence = *sequence_slot;
        let temporal_counts = temporal_counts(published, layer);
        if let Some(slot) = published.next_sequence.get_mut(&layer) {
            *slot += 1;
        }

        let count = size.div_ceil(fragment_size);
        let header = FrameHeader {
            pts_ns: frame.pts.map(duration_ns),
            dts_ns: frame.dts.map(duration_ns),
            duration_ns: frame.duration.map(duration_ns),
            keyframe: frame.keyframe,
            capture_unix_ns: frame.capture_unix_ns,
            publish_delay_us: u32::try_from(frame.publish_delay.as_micros()).unwrap_or(u32::MAX),
            // Fits: bounded by max_frame_size above.
            frame_size: size as u32,
            temporal_sync,
            temporal_counts,
        };
        let channel = Channel::Media { track, layer };
        for index in 0..count {
            let start = index * fragment_size;
            let end = (start + fragment_size).min(size);
            let fragment = Fragment {
                epoch,
                track,
                layer,
                sequence,
                index: index as u32,
                count: count as u32,
                header: (index == 0).then(|| header.clone()),
                payload: frame.data.slice(start..end),
            };
            self.queue_message(channel, &Message::Fragment(fragment));
        }
        self.stats.frames += 1;
        self.stats.keyframes += u64::from(frame.keyframe);
        self.stats.fragments += count as u64;
        self.stats.payload_bytes += size as u64;
        Ok(sequence)
    }

    /// Queues an end-of-stream announcement now and repeats it `eos_repeats - 1` more times
    /// `eos_interval` apart, each with its own `sequence`. Later frames are refused with
    /// [`PublishError::Ended`]. Only the first call has an effect.
    pub fn end_of_stream(&mut self, now: Instant) {
        if self.ended {
            return;
        }
        self.ended = true;
        self.next_catalog_at = None;
        self.queue_end_of_stream();
        let mut due = now;
        for _ in 1..self.config.eos_repeats {
            due += self.config.eos_interval;
            self.eos_repeats_due.push_back(due);
        }
    }

    /// Republishes the catalog periodically and sends due end-of-stream repeats.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.next_catalog_at.is_some_and(|due| due <= now) {
            self.queue_catalog(now);
        }
        while self.eos_repeats_due.front().is_some_and(|&due| due <= now) {
            self.eos_repeats_due.pop_front();
            self.queue_end_of_stream();
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.next_catalog_at, self.eos_repeats_due.front().copied()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if let Some(changed_at) = self.catalog_due.take() {
            let before = self.queue.len();
            self.queue_catalog(changed_at);
            // Ahead of the frames queued since the change, which need it to be played.
            if self.queue.len() > before
                && let Some(catalog) = self.queue.pop_back()
            {
                self.queue.push_front(catalog);
            }
        }
        self.queue.pop_front()
    }

    /// Takes a viewer report (feedback channel). `viewer` is an opaque key for its author,
    /// such as the transport's source peer id.
    pub fn handle_feedback(&mut self, now: Instant, viewer: &[u8], report: Feedback) {
        self.audience
            .handle_feedback(now, self.epoch, viewer, report);
    }

    /// Takes a viewer's keyframe request. Returns whether it forces a keyframe: the
    /// layer exists and none was forced on it within `keyframe_request_interval`. The
    /// element then gets it from [`Publisher::poll_keyframe_request`].
    pub fn handle_keyframe_request(&mut self, now: Instant, request: KeyframeRequest) -> bool {
        let exists = request.epoch == self.epoch
            && self.tracks.iter().any(|track| {
                track.description.id == request.track
                    && track.next_sequence.contains_key(&request.layer)
            });
        if !exists || self.ended {
            self.audience.count_invalid_request();
            return false;
        }
        self.audience
            .handle_keyframe_request(now, request.track, request.layer)
    }

    /// The next `(track, layer)` whose encoder must force a keyframe (that layer's only).
    pub fn poll_keyframe_request(&mut self) -> Option<(u32, u32)> {
        self.audience.poll_keyframe_request()
    }

    /// What viewers report: viewers, layer histogram, latency percentiles, loss.
    pub fn audience_stats(&mut self, now: Instant) -> AudienceStats {
        self.audience.stats(now)
    }

    /// The current catalog; `sequence` is the one the next republish will carry.
    pub fn catalog(&self) -> Catalog {
        Catalog {
            epoch: self.epoch,
            version: self.catalog_version,
            sequence: self.catalog_sequence,
            topic: self.topic.clone(),
            tracks: self
                .tracks
                .iter()
                .map(|track| track.description.clone())
                .collect(),
        }
    }

    pub fn stats(&self) -> PublisherStats {
        self.stats.clone()
    }

    /// Whether [`Publisher::end_of_stream`] was called.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Largest frame `push_frame` accepts: the wire limit, or fewer bytes when the
    /// fragment count limit is reached first.
    pub fn max_frame_size(&self) -> usize {
        let by_count = self
            .fragment_size()
            .saturating_mul(self.limits.max_fragment_count as usize);
        by_count.min(self.limits.max_frame_size as usize)
    }

    /// Payload bytes per fragment actually used: the configured size, kept within what one
    /// message may carry.
    fn fragment_size(&self) -> usize {
        let most = self
            .limits
            .max_message_bytes
            .saturating_sub(FRAGMENT_OVERHEAD)
            .max(1);
        self.config.max_fragment_size.clamp(1, most)
    }

    fn track_mut(&mut self, track: u32) -> Result<&mut PublishedTrack, PublishError> {
        self.tracks
            .iter_mut()
            .find(|published| published.description.id == track)
            .ok_or(PublishError::UnknownTrack(track))
    }

    fn catalog_changed(&mut self, now: Instant) {
        self.catalog_version += 1;
        if !self.ended {
            self.catalog_due.get_or_insert(now);
        }
    }

    fn queue_catalog(&mut self, now: Instant) {
        let catalog = self.catalog();
        self.catalog_sequence += 1;
        self.stats.catalogs += 1;
        self.queue_message(Channel::Control, &Message::Catalog(catalog));
        let interval = self.config.catalog_interval.max(MIN_CATALOG_INTERVAL);
        self.next_catalog_at = Some(now + interval);
    }

    fn queue_end_of_stream(&mut self) {
        let tracks = self
            .tracks
            .iter()
            .flat_map(|published| {
                published
                    .next_sequence
                    .iter()
                    .map(|(&layer, &next_sequence)| TrackEnd {
                        track: published.description.id,
                        layer,
                        next_sequence,
                    })
            })
            .collect();
        let eos = EndOfStream {
            epoch: self.epoch,
            sequence: self.eos_sequence,
            tracks,
        };
        self.eos_sequence += 1;
        self.queue_message(Channel::Control, &Message::EndOfStream(eos));
    }

    fn queue_message(&mut self, channel: Channel, message: &Message) {
        let payload = wire::encode(message);
        self.stats.message_bytes += payload.len() as u64;
        self.queue.push_back(Transmit { channel, payload });
    }
}

/// Per temporal layer of `layer`'s spatial layer (by temporal id), the frames published so
/// far; empty when that spatial layer has a single temporal layer.
fn temporal_counts(published: &PublishedTrack, layer: u32) -> Vec<u64> {
    let layers = &published.description.layers;
    let Some(own) = layers.iter().find(|l| l.id == layer) else {
        return Vec::new();
    };
    let mut group: Vec<&Layer> = layers
        .iter()
        .filter(|l| l.spatial_id == own.spatial_id)
        .collect();
    if group.len() < 2 {
        return Vec::new();
    }
    group.sort_by_key(|l| l.temporal_id);
    group
        .iter()
        .map(|l| published.next_sequence.get(&l.id).copied().unwrap_or(0))
        .collect()
}

fn duration_ns(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::wire::{Body, decode};

    fn frame(size: usize, keyframe: bool) -> EncodedFrame {
        EncodedFrame {
            pts: Some(Duration::from_millis(40)),
            dts: None,
            duration: Some(Duration::from_millis(20)),
            keyframe,
            capture_unix_ns: 1_700_000_000_000_000_000,
            publish_delay: Duration::ZERO,
            data: (0..size).map(|i| i as u8).collect::<Vec<u8>>().into(),
        }
    }

    fn drain(publisher: &mut Publisher) -> Vec<(Channel, Message)> {
        std::iter::from_fn(|| publisher.poll_transmit())
            .map(|transmit| {
                let message = decode(&transmit.payload, &Limits::default()).expect("decodes");
                assert_eq!(Channel::of(&message), transmit.channel);
                (transmit.channel, message)
            })
            .collect()
    }

    fn config(max_fragment_size: usize) -> PublisherConfig {
        PublisherConfig {
            max_fragment_size,
            ..PublisherConfig::default()
        }
    }

    #[test]
    fn tracks_added_together_go_out_in_one_catalog_with_a_base_layer() {
        let t0 = Instant::now();
        let mut publisher = Publisher::new("demo", 9, PublisherConfig::default());
        let video = publisher.add_track(t0, TrackKind::Video, "video/x-vp8".into(), vec![]);
        let audio = publisher.add_track(t0, TrackKind::Audio, "audio/x-opus".into(), vec![]);
        assert_eq!((video, audio), (0, 1));
        // A frame queued before the catalog went out still comes after it.
        let frame = EncodedFrame {
            pts: Some(Duration::ZERO),
            dts: None,
            duration: None,
            keyframe: true,
            capture_unix_ns: 1,
            publish_delay: Duration::ZERO,
            data: bytes::Bytes::from_static(b"frame"),
        };
        publisher.push_frame(t0, video, 0, frame).unwrap();
        let messages = drain(&mut publisher);
        assert_eq!(messages.len(), 2, "one catalog, then the frame");
        let Message::Catalog(catalog) = &messages[0].1 else {
            panic!("expected a catalog first, got {:?}", messages[0]);
        };
        assert!(matches!(messages[1].1, Message::Fragment(_)));
        assert_eq!(catalog.epoch, 9);
        assert_eq!(catalog.version, 2);
        assert_eq!(catalog.sequence, 0);
        assert_eq!(catalog.topic, "demo");
        assert_eq!(catalog.tracks.len(), 2);
        assert_eq!(catalog.tracks[0].layers.len(), 1);
        assert_eq!(catalog.tracks[0].layers[0].id, 0);
        assert_eq!(publisher.stats().catalogs, 1);
    }

    #[test]
    fn frames_are_split_into_bounded_fragments() {
        let t0 = Instant::now();
        let mut publisher = Publisher::new("demo", 1, config(100));
        let track = publisher.add_track(t0, TrackKind::Video, "video/x-vp8".into(), vec![]);
        drain(&mut publisher);

        let sent = frame(250, true);
        assert_eq!(publisher.push_frame(t0, track, 0, sent.clone()), Ok(0));
        assert_eq!(publisher.push_frame(t0, track, 0, frame(100, false)), Ok(1));
        let messages = drain(&mut publisher);
        let fragments: Vec<Fragment> = messages
            .into_iter()
            .map(|(channel, message)| {
                assert_eq!(channel, Channel::Media { track, layer: 0 });
                match message {
                    Message::Fragment(fragment) => fragment,
                    other => panic!("expected a fragment, got {other:?}"),
                }
            })
            .collect();
        assert_eq!(fragments.len(), 4);
        let first_frame: Vec<_> = fragments.iter().filter(|f| f.sequence == 0).collect();
        assert_eq!(first_frame.len(), 3);
        assert!(
            first_frame
                .iter()
                .all(|f| f.count == 3 && f.payload.len() <= 100)
        );
        let header = first_frame[0].header.clone().expect("header on index 0");
        assert_eq!(header.frame_size, 250);
        assert_eq!(header.pts_ns, Some(40_000_000));
        assert!(header.keyframe);
        let joined: Vec<u8> = first_frame
            .iter()
            .flat_map(|f| f.payload.iter().copied())
            .collect();
        assert_eq!(joined, sent.data.to_vec());
        assert!(first_frame[1..].iter().all(|f| f.header.is_none()));

        let stats = publisher.stats();
        assert_eq!((stats.frames, stats.keyframes, stats.fragments), (2, 1, 4));
        assert_eq!(stats.payload_bytes, 350);
    }

    #[test]
    fn rejects_bad_frames() {
        let t0 = Instant::now();
        let mut publisher = Publisher::new("demo", 1, config(10));
        let track = publisher.add_track(t0, TrackKind::Video, "video/x-vp8".into(), vec![]);
        assert_eq!(
            publisher.push_frame(t0, 7, 0, frame(5, true)),
            Err(PublishError::UnknownTrack(7))
        );
        assert_eq!(
            publisher.push_frame(t0, track, 3, frame(5, true)),
            Err(PublishError::UnknownLayer { track, layer: 3 })
        );
        assert_eq!(
            publisher.push_frame(t0, track, 0, frame(0, true)),
            Err(PublishError::EmptyFrame)
        );
        // 10 bytes per fragment, at most 1024 fragments.
        assert_eq!(publisher.max_frame_size(), 10_240);
        assert_eq!(
            publisher.push_frame(t0, track, 0, frame(10_241, true)),
            Err(PublishError::FrameTooLarge {
                size: 10_241,
                max: 10_240
            })
        );
        // Refused frames use no sequence number.
        assert_eq!(
            publisher.push_frame(t0, track, 0, frame(10_240, true)),
            Ok(0)
        );
        assert_eq!(publisher.stats().frames, 1);
    }

    #[test]
    fn oversized_fragment_setting_still_fits_a_message() {
        let t0 = Instant::now();
        let mut publisher = Publisher::new("demo", 1, config(usize::MAX));
        let track = publisher.add_track(t0, TrackKind::Video, "video/x-vp8".into(), vec![]);
        drain(&mut publisher);
        let size = Limits::default().max_message_bytes * 2;
        publisher
            .push_frame(t0, track, 0, frame(size, true))
            .unwrap();
        let messages = drain(&mut publisher);
        assert!(messages.len() >= 3);
    }

    #[test]
    fn sequences_are_per_track_and_layer() {
        let t0 = Instant::now();
        let mut publisher = Publisher::new("demo", 1, PublisherConfig::default());
        let layers = vec![
            Layer {
                id: 0,
                kind: LayerKind::Base as i32,
                ..Layer::default()
            },
            Layer {
                id: 1,
                kind: LayerKind::Temporal as i32,
                depends_on: vec![0],
                ..Layer::default()
            },
        ];
        let video = publisher.add_track(t0, TrackKind::Video, "video/x-vp9".into(), layers);
        let audio = publisher.add_track(t0, TrackKind::Audio, "audio/x-opus".into(), vec![]);
        assert_eq!(publisher.push_frame(t0, video, 0, frame(3, true)), Ok(0));
        assert_eq!(publisher.push_frame(t0, video, 1, frame(3, false)), Ok(0));
        assert_eq!(publisher.push_frame(t0, video, 0, frame(3, false)), Ok(1));
        assert_eq!(publisher.push_frame(t0, audio, 0, frame(3, true)), Ok(0));
        assert_eq!(publisher.push_frame(t0, video, 1, frame(3, false)), Ok(1));
    }

    #[test]
    fn catalog_is_republished_periodically_with_new_sequence() {
        let t0 = Instant::now();
        let mut publisher = Publisher::new("demo", 1, PublisherConfig::default());
        assert_eq!(publisher.poll_timeout(), None);
        let track = publisher.add_track(t0, TrackKind::Video, "video/x-vp8".into(), vec![]);
        drain(&mut publisher);
        let due = publisher.poll_timeout().expect("catalog timer");
        assert_eq!(due, t0 + Duration::from_secs(1));

        publisher.handle_timeout(due - Duration::from_millis(1));
        assert!(publisher.poll_transmit().is_none());
        publisher.handle_timeout(due);
        let messages = drain(&mut publisher);
        let [(Channel::Control, Message::Catalog(catalog))] = messages.as_slice() else {
            panic!("expected one catalog, got {messages:?}");
        };
        assert_eq!((catalog.version, catalog.sequence), (1, 1));

        let later = due + Duration::from_millis(300);
        publisher
            .update_track_caps(later, track, "video/x-vp8,width=640".into())
            .unwrap();
        let messages = drain(&mut publisher);
        let [(_, Message::Catalog(catalog))] = messages.as_slice() else {
            panic!("expected one catalog, got {messages:?}");
        };
        assert_eq!((catalog.version, catalog.sequence), (2, 2));
        assert_eq!(catalog.tracks[0].caps, "video/x-vp8,width=640");
        assert_eq!(
            publisher.poll_timeout(),
            Some(later + Duration::from_secs(1))
        );

        // Same caps: nothing to announce.
        publisher
            .update_track_caps(later, track, "video/x-vp8,width=640".into())
            .unwrap();
        assert!(publisher.poll_transmit().is_none());
        assert_eq!(
            publisher.update_track_caps(later, 5, "x".into()),
            Err(PublishError::UnknownTrack(5))
        );
    }

    #[test]
    fn end_of_stream_is_repeated_and_stops_the_stream() {
        let t0 = Instant::now();
        let mut publisher = Publisher::new("demo", 4, PublisherConfig::default());
        let video = publisher.add_track(t0, TrackKind::Video, "video/x-vp8".into(), vec![]);
        let audio = publisher.add_track(t0, TrackKind::Audio, "audio/x-opus".into(), vec![]);
        for _ in 0..3 {
            publisher.push_frame(t0, video, 0, frame(10, true)).unwrap();
        }
        publisher.push_frame(t0, audio, 0, frame(10, true)).unwrap();
        drain(&mut publisher);

        publisher.end_of_stream(t0);
        publisher.end_of_stream(t0);
        assert_eq!(
            publisher.push_frame(t0, video, 0, frame(10, true)),
            Err(PublishError::Ended)
        );
        let mut announcements = Vec::new();
        let mut now = t0;
        loop {
            for (channel, message) in drain(&mut publisher) {
                assert_eq!(channel, Channel::Control);
                match message {
                    Message::EndOfStream(eos) => announcements.push((now, eos)),
                    other => panic!("only end-of-stream after the end, got {other:?}"),
                }
            }
            let Some(due) = publisher.poll_timeout() else {
                break;
            };
            now = due;
            publisher.handle_timeout(now);
        }
        assert_eq!(announcements.len(), 3);
        for (i, (at, eos)) in announcements.iter().enumerate() {
            assert_eq!(*at, t0 + Duration::from_millis(100) * i as u32);
            assert_eq!(eos.sequence, i as u64);
            assert_eq!(eos.epoch, 4);
            assert_eq!(
                eos.tracks,
                vec![
                    TrackEnd {
                        track: video,
                        layer: 0,
                        next_sequence: 3
                    },
                    TrackEnd {
                        track: audio,
                        layer: 0,
                        next_sequence: 1
                    },
                ]
            );
        }
        // Every queued message is accounted for.
        let stats = publisher.stats();
        assert!(stats.message_bytes > stats.payload_bytes);
    }

    #[test]
    fn keyframe_requests_are_checked_and_rate_limited_per_layer() {
        let t0 = Instant::now();
        let mut publisher = Publisher::new("demo", 5, PublisherConfig::default());
        let layers = (0..2)
            .map(|spatial| Layer {
                id: spatial,
                kind: LayerKind::Spatial as i32,
                spatial_id: spatial,
                ..Layer::default()
            })
            .collect();
        let video = publisher.add_track(t0, TrackKind::Video, "video/x-vp8".into(), layers);
        let request = |layer, epoch| KeyframeRequest {
            epoch,
            track: video,
            layer,
            ..KeyframeRequest::default()
        };
        assert!(!publisher.handle_keyframe_request(t0, request(2, 5)));
        assert!(!publisher.handle_keyframe_request(t0, request(0, 4)));
        assert!(publisher.handle_keyframe_request(t0, request(0, 5)));
        assert!(publisher.handle_keyframe_request(t0, request(1, 5)));
        assert!(!publisher.handle_keyframe_request(t0 + Duration::from_millis(10), request(1, 5)));
        assert_eq!(publisher.poll_keyframe_request(), Some((video, 0)));
        assert_eq!(publisher.poll_keyframe_request(), Some((video, 1)));
        assert_eq!(publisher.poll_keyframe_request(), None);
        assert!(publisher.handle_keyframe_request(t0 + Duration::from_secs(1), request(1, 5)));
        let stats = publisher.audience_stats(t0);
        assert_eq!(stats.keyframe_requests_invalid, 2);
        assert_eq!(stats.forced_keyframes, 3);
        assert_eq!(stats.keyframe_requests_limited, 1);

        publisher.handle_feedback(
            t0,
            b"peer",
            Feedback {
                epoch: 5,
                interval_ms: 1000,
                current_layer: 1,
                latency_ms: 250,
                ..Feedback::default()
            },
        );
        let stats = publisher.audience_stats(t0);
        assert_eq!(stats.viewers, 1);
        assert_eq!(stats.layer_histogram[&1], 1);
        assert_eq!(stats.latency_p95_ms, Some(250));
    }

    #[test]
    fn temporal_layers_carry_their_counts() {
        let t0 = Instant::now();
        let mut publisher = Publisher::new("demo", 1, PublisherConfig::default());
        let layers = (0..3)
            .map(|temporal| Layer {
                id: temporal,
                kind: LayerKind::Temporal as i32,
                temporal_id: temporal,
                ..Layer::default()
            })
            .collect();
        let video = publisher.add_track(t0, TrackKind::Video, "video/x-vp8".into(), layers);
        drain(&mut publisher);
        for (index, layer) in [0, 2, 1, 2, 0].into_iter().enumerate() {
            publisher
                .push_layer_frame(t0, video, layer, frame(4, index == 0), layer == 1)
                .unwrap();
        }
        let headers: Vec<FrameHeader> = drain(&mut publisher)
            .into_iter()
            .filter_map(|(_, message)| match message {
                Message::Fragment(fragment) => fragment.header,
                _ => None,
            })
            .collect();
        let counts: Vec<Vec<u64>> = headers.iter().map(|h| h.temporal_counts.clone()).collect();
        assert_eq!(
            counts,
            [
                vec![0, 0, 0],
                vec![1, 0, 0],
                vec![1, 0, 1],
                vec![1, 1, 1],
                vec![1, 1, 2]
            ]
        );
        let syncs: Vec<bool> = headers.iter().map(|h| h.temporal_sync).collect();
        assert_eq!(syncs, [false, false, true, false, false]);
    }

    #[test]
    fn transmits_decode_into_the_envelope_body_they_announce() {
        let t0 = Instant::now();
        let mut publisher = Publisher::new("demo", 1, PublisherConfig::default());
        let track = publisher.add_track(t0, TrackKind::Audio, "audio/x-opus".into(), vec![]);
        publisher.push_frame(t0, track, 0, frame(50, true)).unwrap();
        let mut total = 0;
        while let Some(transmit) = publisher.poll_transmit() {
            total += transmit.payload.len() as u64;
            let envelope = <wire::Envelope as prost::Message>::decode(&transmit.payload[..])
                .expect("valid envelope");
            match (transmit.channel, envelope.body) {
                (Channel::Control, Some(Body::Catalog(_)))
                | (Channel::Media { .. }, Some(Body::Fragment(_))) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(publisher.stats().message_bytes, total);
    }
}
