//! The whole viewer side: a [`Subscriber`] plus, per layered video track, an [`Abr`]
//! controller; it decides which media channels to receive, sends periodic reports and
//! rate-limited keyframe requests on the feedback channel. Sans-IO like the rest: the
//! element feeds messages and time, and drains events, channel changes and transmits.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use super::abr::{Abr, AbrConfig};
use super::publisher::Transmit;
use super::subscriber::{LayerCounts, Subscriber, SubscriberConfig, SubscriberEvent};
use super::wire::{self, Catalog, Channel, Feedback, KeyframeRequest, Message, TrackKind};

/// Shortest sample and report periods, so a zero setting cannot turn into a busy loop.
const MIN_INTERVAL: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, PartialEq)]
pub struct ViewerConfig {
    pub subscriber: SubscriberConfig,
    /// Layer choice; `fixed_layer` turns adaptation off (`auto-layer=false`).
    pub abr: AbrConfig,
    /// Random per viewer session, carried in reports and requests.
    pub viewer_id: u64,
    /// How often a report is sent.
    pub ack_interval: Duration,
    /// How often arrival counts are fed to the layer controller.
    pub sample_interval: Duration,
    /// At most one keyframe request per track per this interval.
    pub keyframe_request_interval: Duration,
}

impl Default for ViewerConfig {
    fn default() -> Self {
        Self {
            subscriber: SubscriberConfig::default(),
            abr: AbrConfig::default(),
            viewer_id: 0,
            ack_interval: Duration::from_secs(1),
            sample_interval: Duration::from_millis(250),
            keyframe_request_interval: Duration::from_secs(1),
        }
    }
}

/// A media channel to start or stop receiving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelChange {
    Subscribe(Channel),
    Unsubscribe(Channel),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViewerStats {
    pub reports_sent: u64,
    pub keyframe_requests_sent: u64,
    pub layer_changes: u64,
}

/// See the module documentation.
pub struct Viewer {
    config: ViewerConfig,
    subscriber: Subscriber,
    /// Layered video tracks and their controllers.
    abrs: BTreeMap<u32, Abr>,
    subscribed: BTreeSet<Channel>,
    changes: VecDeque<ChannelChange>,
    events: VecDeque<SubscriberEvent>,
    transmits: VecDeque<Transmit>,
    next_sample_at: Option<Instant>,
    next_report_at: Option<Instant>,
    /// Counts since the last report.
    report_counts: LayerCounts,
    last_report_at: Option<Instant>,
    last_keyframe_request: BTreeMap<u32, Instant>,
    report_sequence: u64,
    request_sequence: u64,
    latency: Option<Duration>,
    /// When the last output frame is rendered (pts + latency).
    buffered_until: Option<Instant>,
    stats: ViewerStats,
}

impl Viewer {
    pub fn new(config: ViewerConfig) -> Self {
        Self {
            subscriber: Subscriber::new(config.subscriber.clone()),
            config,
            abrs: BTreeMap::new(),
            subscribed: BTreeSet::new(),
            changes: VecDeque::new(),
            events: VecDeque::new(),
            transmits: VecDeque::new(),
            next_sample_at: None,
            next_report_at: None,
            report_counts: LayerCounts::default(),
            last_report_at: None,
            last_keyframe_request: BTreeMap::new(),
            report_sequence: 0,
            request_sequence: 0,
            latency: None,
            buffered_until: None,
            stats: ViewerStats::default(),
        }
    }

    pub fn handle_message(&mut self, now: Instant, message: Message) {
        self.subscriber.handle_message(now, message);
        self.after(now);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.subscriber.handle_timeout(now);
        if self.next_sample_at.is_some_and(|due| due <= now) {
            self.sample(now);
        }
        if self.next_report_at.is_some_and(|due| due <= now) {
            self.report(now);
        }
        self.after(now);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.subscriber.poll_timeout(),
            self.next_sample_at,
            self.next_report_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn poll_event(&mut self) -> Option<SubscriberEvent> {
        self.events.pop_front()
    }

    /// Media channels to subscribe or unsubscribe, in order.
    pub fn poll_channel_change(&mut self) -> Option<ChannelChange> {
        self.changes.pop_front()
    }

    /// Reports and keyframe requests to publish (on [`Channel::Feedback`]).
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The capture-to-render latency the element measures (wall clocks), for reports.
    pub fn set_measured_latency(&mut self, latency: Duration) {
        self.latency = Some(latency);
    }

    /// Plays `layer` of `track` from now on (`Some`), or lets the controller choose again
    /// starting from it (`None` keeps the current layer). Returns false for a track without
    /// layers or an unknown layer.
    pub fn set_fixed_layer(&mut self, now: Instant, track: u32, layer: Option<u32>) -> bool {
        let Some(abr) = self.abrs.get_mut(&track) else {
            return false;
        };
        if let Some(id) = layer
            && !self
                .subscriber
                .track_layers(track)
                .is_some_and(|layers| layers.iter().any(|l| l.id == id))
        {
            return false;
        }
        abr.set_fixed(now, layer);
        self.apply_layers(now);
        true
    }

    pub fn subscriber(&self) -> &Subscriber {
        &self.subscriber
    }

    pub fn abr(&self, track: u32) -> Option<&Abr> {
        self.abrs.get(&track)
    }

    pub fn stats(&self) -> ViewerStats {
        self.stats.clone()
    }

    fn after(&mut self, now: Instant) {
        while let Some(event) = self.subscriber.poll_event() {
            match &event {
                SubscriberEvent::Catalog(catalog) => self.adopt_catalog(now, catalog),
                SubscriberEvent::Restarted { .. } => {
                    self.abrs.clear();
                    self.last_keyframe_request.clear();
                }
                SubscriberEvent::Frame(frame) => {
                    let latency = self.config.subscriber.latency;
                    self.buffered_until = frame.pts.checked_add(latency);
                }
                SubscriberEvent::EndOfStream => {}
            }
            self.events.push_back(event);
        }
        self.request_keyframes(now);
    }

    fn adopt_catalog(&mut self, now: Instant, catalog: &Catalog) {
        let mut abrs = BTreeMap::new();
        for track in &catalog.tracks {
            let layered = track.kind == TrackKind::Video as i32 && track.layers.len() > 1;
            let Some(ladder) = self.subscriber.track_layers(track.id) else {
                continue;
            };
            if layered {
                let abr = self
                    .abrs
                    .remove(&track.id)
                    .unwrap_or_else(|| Abr::new(now, ladder, self.config.abr.clone()));
                abrs.insert(track.id, abr);
            }
        }
        self.abrs = abrs;
        let interval = self.config.sample_interval.max(MIN_INTERVAL);
        self.next_sample_at.get_or_insert(now + interval);
        let interval = self.config.ack_interval.max(MIN_INTERVAL);
        self.next_report_at.get_or_insert(now + interval);
        self.last_report_at.get_or_insert(now);
        self.apply_layers(now);
    }

    /// Selects the controllers' layers in the playout and brings the subscriptions in
    /// line: every track's played layers (during a spatial switch both the old and the
    /// new ones), probes, and layer 0 of unlayered tracks.
    fn apply_layers(&mut self, now: Instant) {
        let mut wanted = BTreeSet::new();
        if let Some(catalog) = self.subscriber.catalog().cloned() {
            for track in &catalog.tracks {
                match self.abrs.get(&track.id) {
                    Some(abr) => {
                        if let Some(layer) = abr.layer()
                            && self.subscriber.selected_layer(track.id) != Some(layer)
                        {
                            self.subscriber.set_layer(now, track.id, layer.id);
                            self.stats.layer_changes += 1;
                        }
                        for layer in abr.wanted_layers() {
                            wanted.insert(Channel::Media {
                                track: track.id,
                                layer: layer.id,
                            });
                        }
                        // Until a spatial switch completes, the old layers keep playing.
                        let playing = self.subscriber.playing_layer(track.id);
                        let selected = self.subscriber.selected_layer(track.id);
                        if let (Some(playing), Some(selected), Some(layers)) =
                            (playing, selected, self.subscriber.track_layers(track.id))
                            && playing.spatial != selected.spatial
                        {
                            for layer in layers.iter().filter(|l| {
                                l.spatial == playing.spatial && l.temporal <= playing.temporal
                            }) {
                                wanted.insert(Channel::Media {
                                    track: track.id,
                                    layer: layer.id,
                                });
                            }
                        }
                    }
                    None => {
                        let layers = self.subscriber.track_layers(track.id).unwrap_or_default();
                        for layer in layers.iter() {
                            wanted.insert(Channel::Media {
                                track: track.id,
                                layer: layer.id,
                            });
                        }
                    }
                }
            }
        }
        let gone: Vec<Channel> = self.subscribed.difference(&wanted).copied().collect();
        for channel in gone {
            if let Channel::Media { track, layer } = channel {
                self.subscriber.forget_layer(track, layer);
            }
            self.changes.push_back(ChannelChange::Unsubscribe(channel));
        }
        for &channel in wanted.difference(&self.subscribed) {
            self.changes.push_back(ChannelChange::Subscribe(channel));
        }
        self.subscribed = wanted;
        self.collect();
    }

    fn collect(&mut self) {
        while let Some(event) = self.subscriber.poll_event() {
            self.events.push_back(event);
        }
    }

    fn sample(&mut self, now: Instant) {
        let grace = self.config.subscriber.latency + self.config.subscriber.jitter_tolerance;
        let counts = self.subscriber.take_layer_counts(now, grace);
        for (&track, abr) in self.abrs.iter_mut() {
            let samples: Vec<(u32, LayerCounts)> = counts
                .iter()
                .filter(|((t, _), _)| *t == track)
                .map(|((_, layer), counts)| (*layer, *counts))
                .collect();
            abr.on_sample(now, &samples);
        }
        for (_, layer_counts) in &counts {
            self.report_counts.add(layer_counts);
        }
        self.next_sample_at = Some(now + self.config.sample_interval.max(MIN_INTERVAL));
        // Also releases the old layers once a spatial switch completed.
        self.apply_layers(now);
    }

    fn report(&mut self, now: Instant) {
        let Some(epoch) = self.subscriber.epoch() else {
            return;
        };
        let since = self.last_report_at.unwrap_or(now);
        let interval_ms = u32::try_from(now.saturating_duration_since(since).as_millis())
            .unwrap_or(u32::MAX)
            .clamp(1, wire::MAX_FEEDBACK_INTERVAL_MS);
        let counts = std::mem::take(&mut self.report_counts);
        let cap = |count: u64| count.min(wire::MAX_FEEDBACK_FRAMES);
        let ms = |duration: Duration| {
            u32::try_from(duration.as_millis())
                .unwrap_or(u32::MAX)
                .min(wire::MAX_FEEDBACK_MS)
        };
        let (track, current, requested) = self
            .abrs
            .iter()
            .next()
            .map(|(&track, abr)| {
                let playing = self.subscriber.playing_layer(track).map_or(0, |l| l.id);
                (track, playing, abr.layer().map_or(0, |l| l.id))
            })
            .unwrap_or((0, 0, 0));
        let report = Feedback {
            epoch,
            viewer_id: self.config.viewer_id,
            sequence: self.report_sequence,
            interval_ms,
            track,
            current_layer: current,
            requested_layer: requested,
            latency_ms: self.latency.map_or(0, ms),
            buffered_ms: self
                .buffered_until
                .map_or(0, |until| ms(until.saturating_duration_since(now))),
            received: cap(counts.received),
            late: cap(counts.late),
            lost: cap(counts.lost),
            recovered: cap(counts.recovered),
        };
        self.report_sequence += 1;
        self.stats.reports_sent += 1;
        self.last_report_at = Some(now);
        self.next_report_at = Some(now + self.config.ack_interval.max(MIN_INTERVAL));
        self.transmits.push_back(Transmit {
            channel: Channel::Feedback,
            payload: wire::encode(&Message::Feedback(report)),
        });
    }

    /// Asks for a keyframe of the spatial layer a video track waits for (joining,
    /// switching, base layer loss), at most once per `keyframe_request_interval`.
    fn request_keyframes(&mut self, now: Instant) {
        let (Some(epoch), Some(catalog)) = (self.subscriber.epoch(), self.subscriber.catalog())
        else {
            return;
        };
        let waiting: Vec<(u32, u32)> = catalog
            .tracks
            .iter()
            .filter(|track| track.kind == TrackKind::Video as i32)
            .filter(|track| self.subscriber.awaiting_keyframe(track.id))
            .filter_map(|track| {
                let selected = self.subscriber.selected_layer(track.id)?;
                let base = self
                    .subscriber
                    .track_layers(track.id)?
                    .iter()
                    .find(|l| l.spatial == selected.spatial && l.temporal == 0)?;
                Some((track.id, base.id))
            })
            .collect();
        for (track, layer) in waiting {
            let recent = self
                .last_keyframe_request
                .get(&track)
                .is_some_and(|&at| now < at + self.config.keyframe_request_interval);
            if recent {
                continue;
            }
            self.last_keyframe_request.insert(track, now);
            let request = KeyframeRequest {
                epoch,
                track,
                layer,
                viewer_id: self.config.viewer_id,
                sequence: self.request_sequence,
            };
            self.request_sequence += 1;
            self.stats.keyframe_requests_sent += 1;
            self.transmits.push_back(Transmit {
                channel: Channel::Feedback,
                payload: wire::encode(&Message::KeyframeRequest(request)),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::publisher::{EncodedFrame, Publisher, PublisherConfig};
    use crate::core::wire::{Layer, LayerKind, Limits, decode};
    use bytes::Bytes;

    const MS: Duration = Duration::from_millis(1);
    const PATTERN: [u32; 4] = [0, 2, 1, 2];

    struct Net {
        publisher: Publisher,
        viewer: Viewer,
        subscribed: BTreeSet<Channel>,
        force_keyframe: bool,
        frame_index: u64,
        outputs: Vec<(Instant, u32)>,
        changes: Vec<(Instant, ChannelChange)>,
        reports: u64,
        requests: u64,
    }

    impl Net {
        fn new(t0: Instant, abr: AbrConfig) -> Self {
            let mut publisher = Publisher::new("demo", 9, PublisherConfig::default());
            let layers = (0..3)
                .map(|temporal| Layer {
                    id: temporal,
                    kind: if temporal == 0 {
                        LayerKind::Base
                    } else {
                        LayerKind::Temporal
                    } as i32,
                    temporal_id: temporal,
                    framerate_num: 25 >> (2 - temporal),
                    framerate_den: 1,
                    ..Layer::default()
                })
                .collect();
            publisher.add_track(t0, TrackKind::Video, "video/x-vp8".into(), layers);
            let viewer = Viewer::new(ViewerConfig {
                abr,
                viewer_id: 42,
                ..ViewerConfig::default()
            });
            Self {
                publisher,
                viewer,
                subscribed: BTreeSet::from([Channel::Control]),
                force_keyframe: false,
                frame_index: 0,
                outputs: Vec::new(),
                changes: Vec::new(),
                reports: 0,
                requests: 0,
            }
        }

        /// Runs 40 ms frame ticks until `end`; `drop` decides which fragments are lost.
        fn run(&mut self, until: Instant, t0: Instant, drop: &mut dyn FnMut(&Message) -> bool) {
            loop {
                let tick = t0 + MS * 40 * self.frame_index as u32;
                if tick >= until {
                    break;
                }
                while let Some(due) = self.viewer.poll_timeout().filter(|&due| due <= tick) {
                    self.viewer.handle_timeout(due);
                    self.pump(due);
                }
                if self.publisher.poll_timeout().is_some_and(|due| due <= tick) {
                    self.publisher.handle_timeout(tick);
                }
                let index = self.frame_index;
                let layer = PATTERN[(index % 4) as usize];
                let keyframe = index.is_multiple_of(100) || (layer == 0 && self.force_keyframe);
                if keyframe {
                    self.force_keyframe = false;
                }
                let frame = EncodedFrame {
                    pts: Some(MS * 40 * index as u32),
                    dts: None,
                    duration: Some(MS * 40),
                    keyframe,
                    capture_unix_ns: index,
                    data: Bytes::from(vec![layer as u8; 300]),
                };
                let sync = layer > 0 && index % 16 < 4;
                self.publisher
                    .push_layer_frame(tick, 0, layer, frame, sync)
                    .unwrap();
                self.frame_index += 1;
                while let Some(transmit) = self.publisher.poll_transmit() {
                    let message = decode(&transmit.payload, &Limits::default()).unwrap();
                    if self.subscribed.contains(&transmit.channel) && !drop(&message) {
                        self.viewer.handle_message(tick + MS * 20, message);
                        self.pump(tick + MS * 20);
                    }
                }
            }
        }

        fn pump(&mut self, now: Instant) {
            while let Some(change) = self.viewer.poll_channel_change() {
                match change {
                    ChannelChange::Subscribe(channel) => self.subscribed.insert(channel),
                    ChannelChange::Unsubscribe(channel) => self.subscribed.remove(&channel),
                };
                self.changes.push((now, change));
            }
            while let Some(transmit) = self.viewer.poll_transmit() {
                assert_eq!(transmit.channel, Channel::Feedback);
                match decode(&transmit.payload, &Limits::default()).unwrap() {
                    Message::Feedback(report) => {
                        self.reports += 1;
                        self.publisher.handle_feedback(now, b"viewer", report);
                    }
                    Message::KeyframeRequest(request) => {
                        self.requests += 1;
                        self.publisher.handle_keyframe_request(now, request);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            while self.publisher.poll_keyframe_request().is_some() {
                self.force_keyframe = true;
            }
            while let Some(event) = self.viewer.poll_event() {
                if let SubscriberEvent::Frame(frame) = event {
                    self.outputs.push((now, frame.layer));
                }
            }
        }

        fn layer(&self) -> u32 {
            self.viewer.abr(0).unwrap().layer().unwrap().id
        }
    }

    #[test]
    fn joins_low_asks_for_a_keyframe_climbs_reports_and_steps_down_under_loss() {
        let t0 = Instant::now();
        let abr = AbrConfig {
            start: crate::core::abr::AbrStart::Lowest,
            upgrade_cooldown: Duration::from_secs(4),
            probe_duration: Duration::from_secs(2),
            ..AbrConfig::default()
        };
        let mut net = Net::new(t0, abr);
        // Joins on the first catalog: layer 0 only, mid-GOP after the first keyframe is
        // lost, so it asks for one instead of waiting 4 s.
        let mut lose_first = |m: &Message| matches!(m, Message::Fragment(f) if f.sequence == 0);
        net.run(t0 + MS * 1000, t0, &mut lose_first);
        assert_eq!(
            net.changes.first().map(|(_, c)| *c),
            Some(ChannelChange::Subscribe(Channel::Media {
                track: 0,
                layer: 0
            }))
        );
        assert!(
            !net.subscribed
                .contains(&Channel::Media { track: 0, layer: 1 })
        );
        assert!(net.requests >= 1);
        assert!(!net.outputs.is_empty(), "started on the forced keyframe");
        assert!(net.outputs[0].0 < t0 + MS * 300);
        assert!(net.outputs.iter().all(|(_, layer)| *layer == 0));

        // Clean: probes and climbs to layer 2 after the cooldowns.
        net.run(t0 + Duration::from_secs(20), t0, &mut |_| false);
        assert_eq!(net.layer(), 2);
        assert!(
            net.subscribed
                .contains(&Channel::Media { track: 0, layer: 2 })
        );
        let played: BTreeSet<u32> = net.outputs.iter().map(|(_, layer)| *layer).collect();
        assert_eq!(played, BTreeSet::from([0, 1, 2]));
        let abr = net.viewer.abr(0).unwrap().stats();
        assert_eq!((abr.steps_up, abr.probes_failed), (2, 0));

        // A third of layer 2's frames lost: down to layer 1 within the window, layer 2
        // unsubscribed.
        let loss_start = t0 + Duration::from_secs(20);
        let mut counter = 0u64;
        let mut lossy = |m: &Message| {
            counter += 1;
            matches!(m, Message::Fragment(f) if f.layer == 2 && counter.is_multiple_of(3))
        };
        net.run(loss_start + Duration::from_secs(3), t0, &mut lossy);
        assert_eq!(net.layer(), 1);
        let unsubscribed = net
            .changes
            .iter()
            .find(|(_, c)| *c == ChannelChange::Unsubscribe(Channel::Media { track: 0, layer: 2 }))
            .expect("layer 2 unsubscribed");
        assert!(unsubscribed.0 <= loss_start + Duration::from_secs(2));

        // Reports every second, aggregated by the publisher.
        assert!((21..=24).contains(&net.reports), "{} reports", net.reports);
        let audience = net
            .publisher
            .audience_stats(loss_start + Duration::from_secs(3));
        assert_eq!(audience.viewers, 1);
        assert_eq!(
            audience.layer_histogram.keys().copied().collect::<Vec<_>>(),
            [1]
        );
        assert!(audience.reports >= 21);
        let stats = net.viewer.subscriber().stats();
        assert!(stats.frames_lost > 0);
    }
}
