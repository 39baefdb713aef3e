//! The whole viewer side: message sequences through [`Subscriber`] on a virtual clock.
//!
//! A simulated publisher (restartable: new epochs) sends catalogs, frames split into
//! fragments and end-of-stream announcements; the input decides which message arrives when
//! (lost, late, duplicated), forges messages, feeds raw bytes through the wire decoder,
//! switches layers, reads and forgets layer counts and moves the clock. Checked on the
//! events and after every step:
//! - frames of each track and layer come in increasing sequence order (unless forged
//!   messages of that epoch came in: contradictory catalogs or frame counts order frames
//!   their way), only from tracks and layers of the catalog announced last; catalogs of one
//!   epoch in increasing versions, a restart only to another epoch;
//! - the end of stream comes at most once per epoch and no frame follows it;
//! - the reassembly memory limits hold;
//! - after `handle_timeout(now)` nothing is due at or before `now`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use bytes::Bytes;
use gstp2plive::core::wire::{
    self, Catalog, EndOfStream, Feedback, Fragment, FrameHeader, KeyframeRequest, Layer, LayerKind,
    Message, Track, TrackEnd, TrackKind,
};
use gstp2plive::core::{LayerPosition, Subscriber, SubscriberConfig, SubscriberEvent};

use super::input::Input;
use super::playout::ladder;
use super::trace;

/// The simulated publisher of one epoch.
#[derive(Default)]
struct SimPublisher {
    epoch: u64,
    version: u64,
    catalog_sequence: u64,
    tracks: Vec<Track>,
    /// Per (track, spatial layer): frames published so far per temporal layer.
    counts: BTreeMap<(u32, u32), Vec<u64>>,
    stream_ns: u64,
}

impl SimPublisher {
    fn positions(track: &Track) -> Vec<LayerPosition> {
        if track.layers.is_empty() {
            return vec![LayerPosition::BASE];
        }
        track
            .layers
            .iter()
            .map(|layer| LayerPosition {
                id: layer.id,
                spatial: layer.spatial_id,
                temporal: layer.temporal_id,
            })
            .collect()
    }

    fn catalog(&mut self) -> Catalog {
        self.catalog_sequence += 1;
        Catalog {
            epoch: self.epoch,
            version: self.version,
            sequence: self.catalog_sequence,
            topic: "fuzz".into(),
            tracks: self.tracks.clone(),
        }
    }
}

struct Harness {
    start: Instant,
    now: Instant,
    config: SubscriberConfig,
    subscriber: Subscriber,
    publisher: SimPublisher,
    in_flight: Vec<Message>,
    /// Tracks and layer ids of the catalog announced last.
    announced: BTreeMap<u32, BTreeSet<u32>>,
    last_sequence: BTreeMap<(u32, u32), u64>,
    /// The end of stream of the current epoch was emitted.
    ended: bool,
    /// Epoch and version of the catalog announced last.
    catalog: Option<(u64, u64)>,
    /// Epochs that forged catalogs, fragments or ends of stream were sent for.
    forged_epochs: BTreeSet<u64>,
}

/// One fuzz case.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let config = SubscriberConfig {
        latency: input.millis(1_000),
        buffer_size: input.index(33),
        jitter_tolerance: input.millis(200),
        fragment_timeout: input.millis(2_000),
        max_pending_frames: input.index(17),
        max_pending_bytes: input.index(64 * 1024 + 1),
        // Default limits, and whatever else the subscriber has defaults for.
        ..SubscriberConfig::default()
    };
    let start = Instant::now();
    trace(format_args!("Subscriber::new({config:?})"));
    let mut harness = Harness {
        start,
        now: start,
        subscriber: Subscriber::new(config.clone()),
        config,
        publisher: SimPublisher {
            epoch: 1,
            ..SimPublisher::default()
        },
        in_flight: Vec::new(),
        announced: BTreeMap::new(),
        last_sequence: BTreeMap::new(),
        ended: false,
        catalog: None,
        forged_epochs: BTreeSet::new(),
    };
    while !input.is_empty() {
        harness.step(&mut input);
        harness.collect_events();
        harness.check_limits();
    }
}

impl Harness {
    fn step(&mut self, input: &mut Input<'_>) {
        match input.u8() % 16 {
            0..=3 => {
                let message = self.in_flight.pop();
                self.send_frame(input);
                // Usually in order: the previous message goes first.
                if let Some(message) = message {
                    self.in_flight.push(message);
                }
            }
            4..=7 => self.deliver(input),
            8 => self.change_tracks(input),
            9 => {
                let catalog = self.publisher.catalog();
                self.in_flight.push(Message::Catalog(catalog));
            }
            10 => self.end_of_stream(input),
            11 => {
                let forged = self.forge(input);
                self.taint(&forged);
                self.handle(forged);
            }
            12 => {
                let len = input.index(512);
                if let Ok(message) = wire::decode(input.bytes(len), &self.config.limits) {
                    self.taint(&message);
                    self.handle(message);
                }
            }
            13 => {
                self.now += input.millis(500);
                if input.bool() {
                    self.handle_timeout();
                }
            }
            14 => {
                if let Some(at) = self.subscriber.poll_timeout() {
                    self.now = self.now.max(at);
                }
                self.handle_timeout();
            }
            _ => self.control(input),
        }
    }

    /// What the element does besides feeding messages.
    fn control(&mut self, input: &mut Input<'_>) {
        let track = input.small(4);
        let layer = input.small(6);
        match input.u8() % 4 {
            0 => {
                let selected = self.subscriber.set_layer(self.now, track, layer);
                trace(format_args!(
                    "{:?} set_layer({track}, {layer}) -> {selected}",
                    self.at()
                ));
            }
            1 => {
                let grace = input.millis(2_000);
                trace(format_args!("{:?} take_layer_counts({grace:?})", self.at()));
                for (_, counts) in self.subscriber.take_layer_counts(self.now, grace) {
                    assert!(counts.late <= counts.received, "{counts:?}");
                }
            }
            2 => {
                trace(format_args!("forget_layer({track}, {layer})"));
                self.subscriber.forget_layer(track, layer);
            }
            _ => {
                // A publisher restart: a new epoch (never one used before), same tracks,
                // numbering from scratch.
                let epoch = self.publisher.epoch + 1 + input.below(3);
                let tracks = std::mem::take(&mut self.publisher.tracks);
                self.publisher = SimPublisher {
                    epoch,
                    tracks,
                    ..SimPublisher::default()
                };
            }
        }
    }

    /// The publisher adds a track (ids from 0 up; a track's ladder never changes once
    /// announced, as with `Publisher::add_track`) or only re-announces; either way with a
    /// new catalog version.
    fn change_tracks(&mut self, input: &mut Input<'_>) {
        let id = self.publisher.tracks.len() as u32;
        if id < 4 && input.u8() < 192 {
            let video = input.bool();
            self.publisher.tracks.push(track(input, id, video));
        }
        self.publisher.version += 1;
        let catalog = self.publisher.catalog();
        self.in_flight.push(Message::Catalog(catalog));
    }

    /// The publisher's next frame on one of its layers, as fragments in flight.
    fn send_frame(&mut self, input: &mut Input<'_>) {
        let publisher = &mut self.publisher;
        if publisher.tracks.is_empty() {
            return;
        }
        let track = &publisher.tracks[input.index(publisher.tracks.len())];
        let positions = SimPublisher::positions(track);
        let layer = positions[input.index(positions.len())];
        let size = positions
            .iter()
            .filter(|p| p.spatial == layer.spatial)
            .count();
        let counts = publisher
            .counts
            .entry((track.id, layer.spatial))
            .or_insert_with(|| vec![0; size]);
        let snapshot = counts.clone();
        let sequence = counts[layer.temporal as usize];
        counts[layer.temporal as usize] += 1;
        publisher.stream_ns += 1_000_000 * (1 + input.below(40));
        let frame_size = input.index(2048);
        let count = 1 + input.index(4).min(frame_size.saturating_sub(1));
        let header = FrameHeader {
            pts_ns: Some(publisher.stream_ns),
            dts_ns: input.bool().then_some(publisher.stream_ns),
            duration_ns: Some(20_000_000),
            keyframe: input.u8() < 48,
            temporal_sync: input.bool(),
            frame_size: frame_size as u32,
            temporal_counts: if size == 1 { Vec::new() } else { snapshot },
            ..FrameHeader::default()
        };
        let data = Bytes::from(vec![0x5a; frame_size]);
        let part = frame_size / count;
        for index in 0..count {
            let start = index * part;
            let end = if index + 1 == count {
                frame_size
            } else {
                start + part
            };
            self.in_flight.push(Message::Fragment(Fragment {
                epoch: publisher.epoch,
                track: track.id,
                layer: layer.id,
                sequence,
                index: index as u32,
                count: count as u32,
                header: (index == 0).then(|| header.clone()),
                payload: data.slice(start..end),
            }));
        }
    }

    fn end_of_stream(&mut self, input: &mut Input<'_>) {
        let publisher = &self.publisher;
        let mut tracks = Vec::new();
        for track in &publisher.tracks {
            for layer in SimPublisher::positions(track) {
                let published = publisher
                    .counts
                    .get(&(track.id, layer.spatial))
                    .and_then(|counts| counts.get(layer.temporal as usize))
                    .copied()
                    .unwrap_or(0);
                tracks.push(TrackEnd {
                    track: track.id,
                    layer: layer.id,
                    next_sequence: published + input.below(2),
                });
            }
        }
        let eos = EndOfStream {
            epoch: publisher.epoch,
            sequence: input.below(4),
            tracks,
        };
        self.in_flight.push(Message::EndOfStream(eos));
    }

    /// A message of any kind from anyone: small ids and epochs so that it meets the real
    /// stream, any header.
    fn forge(&mut self, input: &mut Input<'_>) -> Message {
        match input.u8() % 5 {
            0 => Message::Fragment(Fragment {
                epoch: input.below(5),
                track: input.small(4),
                layer: input.small(6),
                sequence: input.near(4, 4),
                index: input.small(4),
                count: input.small(5),
                header: input.bool().then(|| FrameHeader {
                    pts_ns: input.bool().then(|| input.near(1 << 30, 1 << 30)),
                    dts_ns: input.bool().then(|| input.near(1 << 30, 1 << 30)),
                    keyframe: input.bool(),
                    temporal_sync: input.bool(),
                    frame_size: input.small(64),
                    temporal_counts: (0..input.below(4)).map(|_| input.near(4, 4)).collect(),
                    ..FrameHeader::default()
                }),
                payload: Bytes::from(vec![0; input.index(64)]),
            }),
            1 => {
                let mut catalog = self.publisher.catalog();
                catalog.epoch = input.below(5);
                catalog.version = input.below(4);
                if input.bool() {
                    // Any tracks, any ladders: layers may change meaning under way.
                    let (id, video) = (input.small(4), input.bool());
                    catalog.tracks = vec![track(input, id, video)];
                }
                Message::Catalog(catalog)
            }
            2 => Message::EndOfStream(EndOfStream {
                epoch: input.below(5),
                sequence: 0,
                tracks: (0..input.below(4))
                    .map(|_| TrackEnd {
                        track: input.small(4),
                        layer: input.small(6),
                        next_sequence: input.near(8, 8),
                    })
                    .collect(),
            }),
            3 => Message::Feedback(Feedback {
                epoch: input.below(5),
                interval_ms: 1_000,
                ..Feedback::default()
            }),
            _ => Message::KeyframeRequest(KeyframeRequest {
                epoch: input.below(5),
                ..KeyframeRequest::default()
            }),
        }
    }

    /// One in-flight message arrives; sometimes a copy stays in flight.
    fn deliver(&mut self, input: &mut Input<'_>) {
        if self.in_flight.is_empty() {
            return;
        }
        // Mostly the oldest: a network reorders a little.
        let index = match input.u8() % 4 {
            0 => input.index(self.in_flight.len()),
            _ => 0,
        };
        let message = if input.u8() < 32 {
            self.in_flight[index].clone()
        } else {
            self.in_flight.remove(index)
        };
        self.handle(message);
    }

    /// Remembers the epoch a forged message was sent for.
    fn taint(&mut self, message: &Message) {
        let epoch = match message {
            Message::Catalog(catalog) => catalog.epoch,
            Message::Fragment(fragment) => fragment.epoch,
            Message::EndOfStream(eos) => eos.epoch,
            Message::Feedback(_) | Message::KeyframeRequest(_) => return,
        };
        self.forged_epochs.insert(epoch);
    }

    fn handle(&mut self, message: Message) {
        trace(format_args!("{:?} handle_message({message:?})", self.at()));
        self.subscriber.handle_message(self.now, message);
    }

    /// The virtual time, from the start of the run.
    fn at(&self) -> std::time::Duration {
        self.now - self.start
    }

    fn handle_timeout(&mut self) {
        trace(format_args!("{:?} handle_timeout", self.at()));
        self.subscriber.handle_timeout(self.now);
        if let Some(at) = self.subscriber.poll_timeout() {
            let at = at - self.start;
            assert!(
                at > self.at(),
                "timer at {at:?} still due after handling it"
            );
        }
    }

    fn collect_events(&mut self) {
        while let Some(event) = self.subscriber.poll_event() {
            trace(format_args!("  -> {event:?}"));
            match event {
                SubscriberEvent::Catalog(catalog) => {
                    // Within an epoch, only newer versions are announced.
                    if let Some((epoch, version)) = self.catalog {
                        assert!(
                            catalog.epoch != epoch || catalog.version > version,
                            "catalog {}/{} after {epoch}/{version}",
                            catalog.epoch,
                            catalog.version
                        );
                    }
                    self.catalog = Some((catalog.epoch, catalog.version));
                    self.announced = catalog
                        .tracks
                        .iter()
                        .map(|track| {
                            let positions = SimPublisher::positions(track);
                            (track.id, positions.iter().map(|p| p.id).collect())
                        })
                        .collect();
                    // Tracks may start over on a new ladder.
                    self.last_sequence.clear();
                }
                SubscriberEvent::Restarted { epoch } => {
                    assert_ne!(self.catalog.map(|(e, _)| e), Some(epoch));
                    self.ended = false;
                    self.announced.clear();
                    self.last_sequence.clear();
                }
                SubscriberEvent::Frame(frame) => {
                    assert!(!self.ended, "frame after the end of stream: {frame:?}");
                    let layers = self.announced.get(&frame.track);
                    assert!(
                        layers.is_some_and(|layers| layers.contains(&frame.layer)),
                        "frame of a track or layer not announced: {frame:?}"
                    );
                    if frame.layer_switch {
                        self.last_sequence.retain(|&(t, _), _| t != frame.track);
                    }
                    let key = (frame.track, frame.layer);
                    let forged = self
                        .catalog
                        .is_some_and(|(epoch, _)| self.forged_epochs.contains(&epoch));
                    if let Some(&last) = self.last_sequence.get(&key)
                        && !forged
                    {
                        assert!(frame.sequence > last, "{frame:?} after {last}");
                    }
                    self.last_sequence.insert(key, frame.sequence);
                }
                SubscriberEvent::EndOfStream => {
                    assert!(!self.ended, "a second end of stream in one epoch");
                    self.ended = true;
                    assert!(self.subscriber.is_ended());
                }
                // Status events added since are not checked here.
                #[allow(unreachable_patterns)]
                _ => {}
            }
        }
    }

    fn check_limits(&self) {
        let stats = self.subscriber.stats();
        assert!(stats.pending_frames <= self.config.max_pending_frames.max(1) as u64);
        assert!(stats.pending_bytes <= self.config.max_pending_bytes as u64);
        assert_eq!(self.subscriber.is_ended(), self.ended);
    }
}

/// A track with a ladder that passes the catalog's validation.
fn track(input: &mut Input<'_>, id: u32, video: bool) -> Track {
    let layers = ladder(input)
        .into_iter()
        .map(|position| Layer {
            id: position.id,
            kind: if position.spatial > 0 {
                LayerKind::Spatial
            } else if position.temporal > 0 {
                LayerKind::Temporal
            } else {
                LayerKind::Base
            } as i32,
            spatial_id: position.spatial,
            temporal_id: position.temporal,
            ..Layer::default()
        })
        .collect();
    Track {
        id,
        kind: if video {
            TrackKind::Video
        } else {
            TrackKind::Audio
        } as i32,
        caps: if video { "video/x-vp8" } else { "audio/x-opus" }.into(),
        layers,
    }
}
