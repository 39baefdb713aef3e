//! The whole viewer side: a [`Subscriber`] plus, per layered video track, an [`Abr`]
//! controller; it decides which media channels to receive, sends periodic reports and
//! rate-limited keyframe requests on the feedback channel. Sans-IO like the rest: the
//! element feeds messages and time, and drains events, channel changes and transmits.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use super::abr::{Abr, AbrConfig, LayerChange};
use super::publisher::Transmit;
use super::subscriber::{LayerCounts, Subscriber, SubscriberConfig, SubscriberEvent};
use super::wire::{self, Catalog, Channel, Feedback, KeyframeRequest, Message, TrackKind};

/// Shortest sample and report periods, so a zero setting cannot turn into a busy loop.
const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// The sample timer firing this much later than it was due means the viewer itself did not
/// run (a starved machine, a suspended process): well above scheduling jitter on a busy
/// machine (tens of ms), well below a stall that piles up a backlog.
pub const LOCAL_STALL_THRESHOLD: Duration = Duration::from_millis(200);

/// Shortest time after a local stall during which late frames and new gaps are put down to
/// the stall's backlog rather than the network (besides frames already due during it).
const MIN_STALL_DRAIN: Duration = Duration::from_millis(500);

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
    /// Times this viewer noticed it had not run for at least [`LOCAL_STALL_THRESHOLD`],
    /// and how long that was in all (ms).
    pub local_stalls: u64,
    pub local_stall_ms: u64,
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
    /// Controller decisions per track, for the element to report.
    layer_decisions: VecDeque<(u32, LayerChange)>,
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
            layer_decisions: VecDeque::new(),
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
        self.check_stall(now);
        self.subscriber.handle_message(now, message);
        self.after(now);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.check_stall(now);
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

    /// The layer controllers' decisions (track, decision), oldest first: every change of
    /// the played layer and every failed probe, with its reason.
    pub fn poll_layer_change(&mut self) -> Option<(u32, LayerChange)> {
        self.layer_decisions.pop_front()
    }

    /// Notices that the sample timer fired late by [`LOCAL_STALL_THRESHOLD`] or more: this
    /// viewer did not run. The backlog it now drains is not held against the network (see
    /// [`Subscriber::note_local_stall`]) and the controllers start their windows over.
    fn check_stall(&mut self, now: Instant) {
        let Some(due) = self.next_sample_at else {
            return;
        };
        let overdue = now.saturating_duration_since(due);
        if overdue < LOCAL_STALL_THRESHOLD {
            return;
        }
        let config = &self.config.subscriber;
        let drain = (config.latency + config.jitter_tolerance).max(MIN_STALL_DRAIN);
        self.subscriber.note_local_stall(now, drain);
        for abr in self.abrs.values_mut() {
            abr.restart_window(now);
        }
        // What was counted up to now is the stall's: the next sample starts afresh.
        let grace = config.latency + config.jitter_tolerance;
        let _ = self.subscriber.take_layer_counts(now, grace);
        self.next_sample_at = Some(now + self.config.sample_interval.max(MIN_INTERVAL));
        self.stats.local_stalls += 1;
        self.stats.local_stall_ms += u64::try_from(overdue.as_millis()).unwrap_or(u64::MAX);
    }

    fn collect_layer_decisions(&mut self) {
        for (&track, abr) in self.abrs.iter_mut() {
            while let Some(change) = abr.poll_change() {
                self.layer_decisions.push_back((track, change));
            }
        }
    }

    /// The capture-to-render latency the element measures (wall clocks), for reports.
    /// The share (0..=1) of pushed shards this viewer's link loses, from the data plane
    /// (`None` when not measured); every track's layer controller takes it into account
    /// ([`Abr::set_link_loss`]).
    pub fn set_link_loss(&mut self, loss: Option<f64>) {
        for abr in self.abrs.values_mut() {
            abr.set_link_loss(loss);
        }
    }

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
        self.collect_layer_decisions();
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
                SubscriberEvent::EndOfStream
                | SubscriberEvent::PublisherLost { .. }
                | SubscriberEvent::PublisherBack { .. } => {}
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
        self.collect_layer_decisions();
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
            // The network's share: what a stall of this viewer or a slow publisher caused
            // would only mislead the publisher about its audience's links.
            late: cap(counts.late_network()),
            lost: cap(counts.lost_network()),
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

    /// A slow stretch: frames `from..to` reach the viewer `extra` later than usual, because
    /// the publisher took that long to publish them (`publisher`) or the network did.
    struct Slow {
        from: u64,
        to: u64,
        extra: Duration,
        publisher: bool,
    }

    /// The viewer does not run from `.0` to `.1` (SIGSTOP): what was sent in the last
    /// `FROZEN_BACKLOG` of it (the rest overflowed the sender's bounded queue) is delivered
    /// in order over `BACKLOG_DRAIN` once it runs again, as a TCP backlog would.
    type Freeze = (Instant, Instant);
    const FROZEN_BACKLOG: Duration = Duration::from_secs(2);
    const BACKLOG_DRAIN: Duration = Duration::from_millis(600);

    struct Net {
        publisher: Publisher,
        viewer: Viewer,
        subscribed: BTreeSet<Channel>,
        force_keyframe: bool,
        frame_index: u64,
        outputs: Vec<(Instant, u32)>,
        /// When each frame came out, and its publisher frame index.
        output_indices: Vec<(Instant, u64)>,
        changes: Vec<(Instant, ChannelChange)>,
        reports: u64,
        requests: u64,
        /// Messages on their way, by delivery time (and send order).
        in_flight: BTreeMap<(Instant, u64), Message>,
        sent: u64,
        slow: Option<Slow>,
        freeze: Option<Freeze>,
        /// Publisher lost / back events as they came out.
        liveness: Vec<(Instant, SubscriberEvent)>,
    }

    /// A publisher of epoch `epoch` with one VP8 track of three temporal layers (25 fps).
    fn temporal_publisher(now: Instant, epoch: u64) -> Publisher {
        let mut publisher = Publisher::new("demo", epoch, PublisherConfig::default());
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
        publisher.add_track(now, TrackKind::Video, "video/x-vp8".into(), layers);
        publisher
    }

    impl Net {
        fn new(t0: Instant, abr: AbrConfig) -> Self {
            let publisher = temporal_publisher(t0, 9);
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
                output_indices: Vec::new(),
                changes: Vec::new(),
                reports: 0,
                requests: 0,
                in_flight: BTreeMap::new(),
                sent: 0,
                slow: None,
                freeze: None,
                liveness: Vec::new(),
            }
        }

        /// Runs the viewer's timers and deliveries up to `to`, in time order; nothing runs
        /// during a freeze.
        fn advance(&mut self, to: Instant) {
            loop {
                let delivery = self.in_flight.keys().next().map(|&(at, _)| at);
                let mut timeout = self.viewer.poll_timeout();
                if let (Some(due), Some((start, end))) = (timeout, self.freeze)
                    && due >= start
                    && due < end
                {
                    timeout = Some(end);
                }
                let next = match (delivery, timeout) {
                    (Some(d), Some(t)) => d.min(t),
                    (d, t) => match d.or(t) {
                        Some(next) => next,
                        None => return,
                    },
                };
                if next > to {
                    return;
                }
                if delivery == Some(next) {
                    let (_, message) = self.in_flight.pop_first().expect("checked");
                    self.viewer.handle_message(next, message);
                } else {
                    self.viewer.handle_timeout(next);
                }
                self.pump(next);
            }
        }

        /// When a message sent at `tick` for frame `index` reaches the viewer; `None` if it
        /// overflowed the queue of a frozen viewer.
        fn delivery(&self, tick: Instant, index: u64) -> Option<Instant> {
            let extra = self
                .slow
                .as_ref()
                .filter(|slow| (slow.from..slow.to).contains(&index))
                .map_or(Duration::ZERO, |slow| slow.extra);
            let at = tick + MS * 20 + extra;
            match self.freeze {
                Some((start, end)) if at >= start && at < end => {
                    let kept_from = end - FROZEN_BACKLOG;
                    (at >= kept_from).then(|| {
                        let into = (at - kept_from).as_secs_f64() / FROZEN_BACKLOG.as_secs_f64();
                        end + BACKLOG_DRAIN.mul_f64(into)
                    })
                }
                _ => Some(at),
            }
        }

        /// Runs 40 ms frame ticks until `end`; `drop` decides which fragments are lost.
        fn run(&mut self, until: Instant, t0: Instant, drop: &mut dyn FnMut(&Message) -> bool) {
            loop {
                let tick = t0 + MS * 40 * self.frame_index as u32;
                if tick >= until {
                    break;
                }
                self.advance(tick);
                if self.publisher.poll_timeout().is_some_and(|due| due <= tick) {
                    self.publisher.handle_timeout(tick);
                }
                let index = self.frame_index;
                let layer = PATTERN[(index % 4) as usize];
                let keyframe = index.is_multiple_of(100) || (layer == 0 && self.force_keyframe);
                if keyframe {
                    self.force_keyframe = false;
                }
                let publish_delay = self
                    .slow
                    .as_ref()
                    .filter(|slow| slow.publisher && (slow.from..slow.to).contains(&index))
                    .map_or(Duration::ZERO, |slow| slow.extra);
                let frame = EncodedFrame {
                    pts: Some(MS * 40 * index as u32),
                    dts: None,
                    duration: Some(MS * 40),
                    keyframe,
                    capture_unix_ns: index,
                    publish_delay,
                    data: Bytes::from(vec![layer as u8; 300]),
                };
                let sync = layer > 0 && index % 16 < 4;
                self.publisher
                    .push_layer_frame(tick, 0, layer, frame, sync)
                    .unwrap();
                self.frame_index += 1;
                while let Some(transmit) = self.publisher.poll_transmit() {
                    let message = decode(&transmit.payload, &Limits::default()).unwrap();
                    if self.subscribed.contains(&transmit.channel)
                        && !drop(&message)
                        && let Some(at) = self.delivery(tick, index)
                    {
                        self.sent += 1;
                        self.in_flight.insert((at, self.sent), message);
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
                match event {
                    SubscriberEvent::Frame(frame) => {
                        self.outputs.push((now, frame.layer));
                        self.output_indices.push((now, frame.capture_unix_ns));
                    }
                    SubscriberEvent::PublisherLost { .. }
                    | SubscriberEvent::PublisherBack { .. } => {
                        self.liveness.push((now, event));
                    }
                    _ => {}
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
        assert_eq!(
            net.viewer.abr(0).unwrap().stats().last_reason,
            Some(crate::core::abr::LayerChangeReason::Loss)
        );

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

    fn decisions(net: &mut Net) -> Vec<LayerChange> {
        std::iter::from_fn(|| net.viewer.poll_layer_change())
            .map(|(_, change)| change)
            .collect()
    }

    #[test]
    fn a_frozen_viewer_resumes_at_the_live_edge_without_stepping_down() {
        let t0 = Instant::now();
        let mut net = Net::new(t0, AbrConfig::default());
        net.run(t0 + Duration::from_secs(10), t0, &mut |_| false);
        assert_eq!(net.layer(), 2, "full frame rate before the freeze");
        let before = decisions(&mut net);
        assert!(before.is_empty(), "{before:?}");

        // Frozen for 40 s (SIGSTOP), then resumed with a 2 s backlog drained over 600 ms.
        let resumed = t0 + Duration::from_secs(50);
        net.freeze = Some((t0 + Duration::from_secs(10), resumed));
        net.run(t0 + Duration::from_secs(70), t0, &mut |_| false);

        // The live edge: a frame published at or after the resume plays within latency +
        // one GOP (keyframes every 100 frames of 40 ms).
        let live_index = (resumed - t0).as_millis() as u64 / 40;
        let (played_at, _) = *net
            .output_indices
            .iter()
            .find(|(_, index)| *index >= live_index)
            .expect("plays again after the freeze");
        let bound = resumed + Duration::from_millis(300) + MS * 40 * 100;
        assert!(
            played_at <= bound,
            "live again {:?} after the resume",
            played_at - resumed
        );
        // And keeps playing every frame from there.
        let after: Vec<u64> = net
            .output_indices
            .iter()
            .filter(|(at, _)| *at > played_at)
            .map(|(_, index)| *index)
            .collect();
        assert!(after.len() > 300, "{} frames after the resume", after.len());

        // The stall is this viewer's: no step down, no clock move, no false alarm.
        assert_eq!(net.layer(), 2);
        let after_freeze = decisions(&mut net);
        assert!(
            after_freeze
                .iter()
                .all(|c| c.reason == crate::core::abr::LayerChangeReason::ProbeSucceeded),
            "{after_freeze:?}"
        );
        let stats = net.viewer.subscriber().stats();
        assert_eq!(stats.rebases, 0);
        assert!(stats.late_local > 0, "the backlog was late: {stats:?}");
        assert_eq!(stats.late_network, 0);
        assert_eq!(net.viewer.stats().local_stalls, 1);
        assert!(net.viewer.stats().local_stall_ms >= 39_000);
        assert!(net.liveness.is_empty(), "{:?}", net.liveness);
    }

    #[test]
    fn lateness_the_publisher_adds_is_told_apart_and_does_not_step_down() {
        use crate::core::abr::LayerChangeReason;
        for publisher in [true, false] {
            let t0 = Instant::now();
            let mut net = Net::new(t0, AbrConfig::default());
            net.run(t0 + Duration::from_secs(10), t0, &mut |_| false);
            assert_eq!(net.layer(), 2);
            // Two seconds of frames 500 ms later than usual (latency is 300 ms).
            net.slow = Some(Slow {
                from: 250,
                to: 300,
                extra: Duration::from_millis(500),
                publisher,
            });
            net.run(t0 + Duration::from_secs(14), t0, &mut |_| false);
            let stats = net.viewer.subscriber().stats();
            let changes = decisions(&mut net);
            if publisher {
                assert!(stats.late_publisher > 0, "{stats:?}");
                assert_eq!(stats.late_network, 0, "{stats:?}");
                assert_eq!(
                    net.layer(),
                    2,
                    "a starved publisher is no reason to step down"
                );
                assert!(changes.is_empty(), "{changes:?}");
            } else {
                assert!(stats.late_network > 0, "{stats:?}");
                assert_eq!(stats.late_publisher, 0, "{stats:?}");
                assert!(net.layer() < 2);
                assert_eq!(changes[0].reason, LayerChangeReason::Lateness);
                assert_eq!((changes[0].from.id, changes[0].to.id), (2, 1));
                assert_eq!(
                    net.viewer.abr(0).unwrap().stats().last_reason,
                    Some(changes.last().unwrap().reason)
                );
            }
        }
    }

    #[test]
    fn a_silent_publisher_is_declared_lost_and_back_when_it_returns() {
        let t0 = Instant::now();
        let mut net = Net::new(t0, AbrConfig::default());
        net.run(t0 + Duration::from_secs(5), t0, &mut |_| false);
        assert!(net.liveness.is_empty());
        // Gone without an end of stream for 8 s: nothing it sends arrives.
        let gone = t0 + Duration::from_secs(5);
        net.run(t0 + Duration::from_secs(13), t0, &mut |_| true);
        let [(lost_at, SubscriberEvent::PublisherLost { silent })] = net.liveness[..] else {
            panic!("{:?}", net.liveness);
        };
        let timeout = crate::core::subscriber::DEFAULT_PUBLISHER_TIMEOUT;
        assert!(
            lost_at >= gone + timeout - MS * 100 && lost_at <= gone + timeout + MS * 100,
            "lost {:?} after the last message",
            lost_at - gone
        );
        assert!(silent >= timeout);
        assert!(net.viewer.subscriber().is_publisher_lost());
        assert_eq!(net.viewer.subscriber().stats().publisher_lost, 1);

        // It comes back as a new process (new epoch): back, and playing again.
        let back = t0 + Duration::from_secs(13);
        net.publisher = temporal_publisher(back, 10);
        let output_before = net.output_indices.len();
        net.run(t0 + Duration::from_secs(20), t0, &mut |_| false);
        assert_eq!(net.liveness.len(), 2, "{:?}", net.liveness);
        let (back_at, SubscriberEvent::PublisherBack { lost_for }) = net.liveness[1] else {
            panic!("{:?}", net.liveness);
        };
        assert!(back_at >= back && back_at <= back + Duration::from_secs(2));
        assert!(lost_for >= Duration::from_secs(2));
        assert!(!net.viewer.subscriber().is_publisher_lost());
        assert_eq!(net.viewer.subscriber().stats().restarts, 1);
        assert!(net.output_indices.len() > output_before + 50);
    }
}
