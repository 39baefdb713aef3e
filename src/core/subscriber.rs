//! Viewer state machine: takes decoded protocol messages, follows the publisher's catalog
//! and epoch, reassembles frames and plays them out in time (see [`super::playout`]).
//! Sans-IO: messages and time go in, [`SubscriberEvent`]s come out.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

pub use super::playout::OutputFrame;
use super::playout::{LayerPosition, Playout, PlayoutConfig, PlayoutStats};
use super::reassembly::{CompleteFrame, Reassembler, ReassemblyConfig, ReassemblyStats};
use super::wire::{self, Catalog, EndOfStream, Fragment, Limits, Message, TrackEnd};

/// Most sequence gaps remembered per layer while waiting for them to fill; beyond, the
/// oldest is counted lost at once.
const MAX_MISSING_PER_LAYER: usize = 512;

/// How many past publisher epochs are remembered, so a delayed message of a publisher
/// that restarted cannot restart the viewer back into the old stream.
const RETIRED_EPOCHS: usize = 8;

/// Default [`SubscriberConfig::publisher_timeout`]: five catalog republish periods (the
/// publisher repeats its catalog every second, so even a silent audio track keeps it alive).
pub const DEFAULT_PUBLISHER_TIMEOUT: Duration = Duration::from_secs(5);

/// Period of the sliding minimum of each track's publish delay (see [`LateCause`]); the
/// minimum is taken over the current and the previous period, so over 10 to 20 s.
const PUBLISH_DELAY_FLOOR_PERIOD: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberConfig {
    /// Delay between a frame's local time and its rendering (reported to GStreamer).
    pub latency: Duration,
    /// Most frames buffered per track.
    pub buffer_size: usize,
    /// How late a frame may be before the clock is rebased (a gap waits at least this long).
    pub jitter_tolerance: Duration,
    /// How long a gap may wait once a later frame arrived; `None`: until shortly before the
    /// next frame is due ([`PlayoutConfig::gap_wait`]).
    pub gap_wait: Option<Duration>,
    /// How long an incomplete frame waits for its missing fragments.
    pub fragment_timeout: Duration,
    /// Most incomplete frames held.
    pub max_pending_frames: usize,
    /// Most payload bytes held in incomplete frames.
    pub max_pending_bytes: usize,
    pub limits: Limits,
    /// How long nothing valid may arrive from the publisher before it is declared lost
    /// ([`SubscriberEvent::PublisherLost`]); `None`: never. Counted from the first valid
    /// message, so a viewer started before its publisher waits quietly.
    pub publisher_timeout: Option<Duration>,
}

impl Default for SubscriberConfig {
    fn default() -> Self {
        let playout = PlayoutConfig::default();
        let reassembly = ReassemblyConfig::default();
        Self {
            latency: playout.latency,
            buffer_size: playout.buffer_size,
            jitter_tolerance: playout.jitter_tolerance,
            gap_wait: playout.gap_wait,
            fragment_timeout: reassembly.fragment_timeout,
            max_pending_frames: reassembly.max_pending_frames,
            max_pending_bytes: reassembly.max_pending_bytes,
            limits: Limits::default(),
            publisher_timeout: Some(DEFAULT_PUBLISHER_TIMEOUT),
        }
    }
}

impl SubscriberConfig {
    fn playout(&self) -> PlayoutConfig {
        PlayoutConfig {
            latency: self.latency,
            buffer_size: self.buffer_size,
            jitter_tolerance: self.jitter_tolerance,
            gap_wait: self.gap_wait,
        }
    }

    fn reassembly(&self) -> ReassemblyConfig {
        ReassemblyConfig {
            fragment_timeout: self.fragment_timeout,
            max_pending_frames: self.max_pending_frames,
            max_pending_bytes: self.max_pending_bytes,
            max_fragment_count: self.limits.max_fragment_count,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum SubscriberEvent {
    /// The first catalog, or a new version of it.
    Catalog(Catalog),
    /// The publisher restarted (new epoch): the element flushes. A `Catalog` follows.
    Restarted {
        epoch: u64,
    },
    Frame(OutputFrame),
    /// The publisher ended the stream; sent once per epoch, after its last frame.
    EndOfStream,
    /// Nothing valid came from the publisher for `publisher_timeout` (it was killed, crashed
    /// or its network went away without an end of stream). `silent` is how long since the
    /// last valid message.
    PublisherLost {
        silent: Duration,
    },
    /// A valid message of the publisher (same or new epoch) arrived after `PublisherLost`;
    /// `lost_for` is how long it had been silent.
    PublisherBack {
        lost_for: Duration,
    },
}

/// Why a frame completed after its deadline. The deadline is the frame's local time plus
/// `latency`, on a clock anchored at the first frame, so it already contains the publisher's
/// usual capture-to-publish delay; the frame's own delay (`publish_delay_us` in its header)
/// tells how much of its lateness the publisher added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LateCause {
    /// The network (or relays) delivered it late.
    Network,
    /// The publisher's capture-to-publish delay exceeded its recent minimum by at least the
    /// lateness: a starved encoder or machine at the publisher. Stepping down a layer cannot
    /// help, since the publisher encodes every layer anyway.
    Publisher,
    /// This viewer did not run for a while (a starved or suspended machine, see
    /// [`Subscriber::note_local_stall`]): a backlog is being drained.
    Local,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriberStats {
    pub messages: u64,
    pub fragments: u64,
    pub fragment_bytes: u64,
    pub frames_completed: u64,
    pub frames_output: u64,
    /// Sequences given up without ever arriving.
    pub frames_lost: u64,
    /// Frames that completed after their sequence was passed.
    pub frames_late: u64,
    /// Frames dropped because they could not be decoded (waiting for a keyframe).
    pub frames_skipped: u64,
    /// Duplicate fragments and frames.
    pub duplicates: u64,
    /// Malformed or inconsistent messages, unknown tracks or layers, oversized frames.
    pub invalid: u64,
    /// Incomplete frames that timed out.
    pub expired: u64,
    /// Incomplete frames evicted to stay within the memory limits.
    pub evicted: u64,
    pub before_catalog: u64,
    pub wrong_epoch: u64,
    pub restarts: u64,
    pub rebases: u64,
    /// The publisher's clock against ours as the playout follows it, ppm (negative: slow).
    pub clock_drift_ppm: i64,
    /// Frames completed after their deadline, by cause (see [`LateCause`]).
    pub late_network: u64,
    pub late_publisher: u64,
    pub late_local: u64,
    /// Times the publisher was declared lost ([`SubscriberEvent::PublisherLost`]).
    pub publisher_lost: u64,
    /// Frames buffered in the playout now.
    pub buffered_frames: u64,
    /// Payload bytes held in incomplete frames now.
    pub pending_bytes: u64,
    /// Incomplete frames held now.
    pub pending_frames: u64,
    /// Fragments of frames already given up (expired, evicted, inconsistent).
    pub abandoned: u64,
    /// Frames of a layer other than the one played on their track.
    pub other_layer: u64,
    /// Frames dropped because the played layers changed; not losses.
    pub switch_dropped: u64,
    /// Viewer messages (reports, keyframe requests) a viewer has no use for.
    pub ignored: u64,
}

/// What arrived on one layer since the last [`Subscriber::take_layer_counts`]. Counted per
/// layer's own sequence space, whether the layer is played or only received (a probe),
/// from the first frame after the layer was (re)subscribed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerCounts {
    pub received: u64,
    /// Completed after their deadline (local time + latency), whatever the cause.
    pub late: u64,
    /// Of `late`: late because of the publisher ([`LateCause::Publisher`]).
    pub late_publisher: u64,
    /// Of `late`: late because this viewer stalled ([`LateCause::Local`]).
    pub late_local: u64,
    /// Sequences still missing `loss_grace` after a later one arrived.
    pub lost: u64,
    /// Of `lost`: gaps noticed while this viewer was stalled or draining the backlog after
    /// a stall (data the publisher's queue to a frozen viewer dropped).
    pub lost_local: u64,
    /// Sequences that were missing (a later one came first) and then arrived.
    pub recovered: u64,
}

impl LayerCounts {
    pub fn add(&mut self, other: &LayerCounts) {
        self.received += other.received;
        self.late += other.late;
        self.late_publisher += other.late_publisher;
        self.late_local += other.late_local;
        self.lost += other.lost;
        self.lost_local += other.lost_local;
        self.recovered += other.recovered;
    }

    /// Late frames the network is to blame for.
    pub fn late_network(&self) -> u64 {
        self.late
            .saturating_sub(self.late_publisher)
            .saturating_sub(self.late_local)
    }

    /// Lost frames the network is to blame for.
    pub fn lost_network(&self) -> u64 {
        self.lost.saturating_sub(self.lost_local)
    }
}

/// Sliding minimum of a track's publish delay over one to two
/// [`PUBLISH_DELAY_FLOOR_PERIOD`]s (two buckets: the current period and the previous one).
#[derive(Debug, Clone, Copy)]
struct DelayFloor {
    started: Instant,
    current: Duration,
    previous: Option<Duration>,
}

impl DelayFloor {
    /// Takes a sample and returns the floor including it.
    fn observe(&mut self, now: Instant, delay: Duration) -> Duration {
        if now.saturating_duration_since(self.started) >= PUBLISH_DELAY_FLOOR_PERIOD {
            self.previous = Some(self.current);
            self.current = delay;
            self.started = now;
        } else {
            self.current = self.current.min(delay);
        }
        self.previous.map_or(self.current, |p| p.min(self.current))
    }
}

/// Per-layer arrival accounting for feedback and the layer controller.
#[derive(Default)]
struct LayerMonitor {
    highest: Option<u64>,
    /// Local time (when it arrives on a usual path: its deadline less the latency) of the
    /// highest sequence.
    highest_local: Option<Instant>,
    /// Missing sequences, when they were noticed, and whether they went missing while this
    /// viewer was stalled.
    missing: BTreeMap<u64, (Instant, bool)>,
    counts: LayerCounts,
}

impl LayerMonitor {
    /// Takes a completed frame of local time `local`. `resumed` is when this viewer last
    /// ran again after a stall: a gap after a frame of local time before it went missing
    /// during the stall (a frozen viewer's sender drops what it cannot queue).
    fn frame(
        &mut self,
        now: Instant,
        sequence: u64,
        local: Option<Instant>,
        late: Option<LateCause>,
        resumed: Option<Instant>,
    ) {
        self.counts.received += 1;
        if let Some(cause) = late {
            self.counts.late += 1;
            match cause {
                LateCause::Network => {}
                LateCause::Publisher => self.counts.late_publisher += 1,
                LateCause::Local => self.counts.late_local += 1,
            }
        }
        match self.highest {
            None => {
                self.highest = Some(sequence);
                self.highest_local = local;
            }
            Some(highest) if sequence > highest => {
                let gap = sequence - highest - 1;
                let during_stall = resumed.is_some_and(|resumed| {
                    self.highest_local.is_some_and(|before| before <= resumed)
                });
                // Too many to track one by one: the excess is lost at once.
                let tracked = gap.min(MAX_MISSING_PER_LAYER as u64);
                // Sequences come from the wire: a huge jump must not overflow the counts.
                self.counts.lost = self.counts.lost.saturating_add(gap - tracked);
                if during_stall {
                    self.counts.lost_local = self.counts.lost_local.saturating_add(gap - tracked);
                }
                for missing in sequence - tracked..sequence {
                    self.missing.insert(missing, (now, during_stall));
                }
                while let Some((_, (_, local))) = (self.missing.len() > MAX_MISSING_PER_LAYER)
                    .then(|| self.missing.pop_first())
                    .flatten()
                {
                    self.counts.lost += 1;
                    self.counts.lost_local += u64::from(local);
                }
                self.highest = Some(sequence);
                self.highest_local = local;
            }
            Some(_) => {
                if self.missing.remove(&sequence).is_some() {
                    self.counts.recovered += 1;
                }
            }
        }
    }

    /// The counts since the last call. Gaps older than `grace` are lost; those noticed
    /// before `local_stall_until` are counted as lost locally.
    fn take(
        &mut self,
        now: Instant,
        grace: Duration,
        local_stall_until: Option<Instant>,
    ) -> LayerCounts {
        let counts = &mut self.counts;
        self.missing.retain(|_, (noticed, during_stall)| {
            let keep = *noticed + grace > now;
            if !keep {
                counts.lost += 1;
                if *during_stall || local_stall_until.is_some_and(|until| *noticed <= until) {
                    counts.lost_local += 1;
                }
            }
            keep
        });
        std::mem::take(&mut self.counts)
    }
}

struct PendingEnd {
    tracks: Vec<TrackEnd>,
    /// When the end of stream is emitted even if frames are still missing.
    deadline: Instant,
}

/// See the module documentation.
pub struct Subscriber {
    config: SubscriberConfig,
    epoch: Option<u64>,
    retired_epochs: VecDeque<u64>,
    catalog: Option<Catalog>,
    reassembler: Reassembler,
    playout: Playout,
    pending_end: Option<PendingEnd>,
    ended: bool,
    events: VecDeque<SubscriberEvent>,
    /// Per (track, layer) of the catalog that frames arrived on.
    monitors: BTreeMap<(u32, u32), LayerMonitor>,
    /// Per track: the publish delay floor lateness is judged against.
    delay_floors: BTreeMap<u32, DelayFloor>,
    /// The latest local stall: when the viewer ran again, and until when late frames and
    /// new gaps are its own doing (the stall's backlog).
    local_stall: Option<(Instant, Instant)>,
    /// When the last valid message of the publisher arrived.
    last_heard: Option<Instant>,
    /// Since when the publisher is declared lost.
    lost_since: Option<Instant>,
    /// Counters kept here; the reassembler's and playout's are added in `stats`.
    stats: SubscriberStats,
}

impl Subscriber {
    pub fn new(config: SubscriberConfig) -> Self {
        Self {
            reassembler: Reassembler::new(config.reassembly()),
            playout: Playout::new(config.playout()),
            config,
            epoch: None,
            retired_epochs: VecDeque::new(),
            catalog: None,
            pending_end: None,
            ended: false,
            events: VecDeque::new(),
            monitors: BTreeMap::new(),
            delay_floors: BTreeMap::new(),
            local_stall: None,
            last_heard: None,
            lost_since: None,
            stats: SubscriberStats::default(),
        }
    }

    /// Takes one decoded message. Messages that break the [`Limits`] are counted invalid.
    pub fn handle_message(&mut self, now: Instant, message: Message) {
        self.stats.messages += 1;
        if wire::validate(&message, &self.config.limits).is_err() {
            self.stats.invalid += 1;
            return;
        }
        let from_publisher = match message {
            Message::Catalog(catalog) => self.handle_catalog(catalog),
            Message::Fragment(fragment) => self.handle_fragment(now, fragment),
            Message::EndOfStream(eos) => self.handle_end_of_stream(now, eos),
            Message::Feedback(_) | Message::KeyframeRequest(_) => {
                self.stats.ignored += 1;
                false
            }
        };
        if from_publisher {
            self.heard_publisher(now);
        }
        self.collect_output();
        self.check_end(now);
    }

    /// Expires incomplete frames, gives up gaps, ends the stream and declares the publisher
    /// lost when due.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.reassembler.handle_timeout(now);
        self.playout.handle_timeout(now);
        self.collect_output();
        self.check_end(now);
        if let Some(due) = self.publisher_lost_at()
            && now >= due
        {
            let silent = now.saturating_duration_since(self.last_heard.unwrap_or(now));
            self.lost_since = Some(now);
            self.stats.publisher_lost += 1;
            self.events
                .push_back(SubscriberEvent::PublisherLost { silent });
        }
    }

    /// The earliest of: reassembly expiry, gap give-up, end-of-stream deadline, publisher
    /// timeout.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let end = self
            .pending_end
            .as_ref()
            .filter(|_| !self.ended)
            .map(|end| end.deadline);
        [
            self.reassembler.poll_timeout(),
            self.playout.poll_timeout(),
            end,
            self.publisher_lost_at(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Whether the publisher is declared lost now.
    pub fn is_publisher_lost(&self) -> bool {
        self.lost_since.is_some()
    }

    /// Tells the subscriber that this viewer has just run again after not running for a
    /// while (its timers fired late: a starved or suspended machine). Frames captured before
    /// `now` (local time before it), late frames arriving until `now + drain`, and gaps noticed until then
    /// are this viewer's own doing, not the network's ([`LateCause::Local`]), and the
    /// playout clock ignores them: a backlog delivered at once after a freeze must neither
    /// move the clock later nor look like a bad network.
    pub fn note_local_stall(&mut self, now: Instant, drain: Duration) {
        let until = now + drain;
        self.local_stall = Some((now, until));
        // Silence while this viewer was not listening says nothing about the publisher.
        if let Some(heard) = self.last_heard.as_mut() {
            *heard = (*heard).max(now);
        }
        self.playout.ignore_stall(now, until);
    }

    /// When the publisher will be declared lost, if nothing valid comes before.
    fn publisher_lost_at(&self) -> Option<Instant> {
        if self.lost_since.is_some() || self.ended {
            return None;
        }
        Some(self.last_heard? + self.config.publisher_timeout?)
    }

    fn heard_publisher(&mut self, now: Instant) {
        self.last_heard = Some(now);
        if let Some(since) = self.lost_since.take() {
            let lost_for = now.saturating_duration_since(since);
            self.events
                .push_back(SubscriberEvent::PublisherBack { lost_for });
        }
    }

    pub fn poll_event(&mut self) -> Option<SubscriberEvent> {
        self.events.pop_front()
    }

    pub fn stats(&self) -> SubscriberStats {
        let ReassemblyStats {
            fragments: _,
            frames_completed,
            duplicates: fragment_duplicates,
            abandoned,
            inconsistent,
            evicted,
            expired,
            too_large,
            invalid: invalid_fragments,
            pending_frames,
            pending_bytes,
        } = self.reassembler.stats();
        let PlayoutStats {
            frames_output,
            frames_lost,
            frames_late,
            frames_skipped,
            duplicates: frame_duplicates,
            rebases,
            clock_drift_ppm,
            other_layer,
            unknown_track,
            inconsistent: inconsistent_frames,
            switch_dropped,
            buffered_frames,
        } = self.playout.stats();
        let own = &self.stats;
        SubscriberStats {
            frames_completed,
            frames_output,
            frames_lost,
            frames_late,
            frames_skipped,
            duplicates: fragment_duplicates + frame_duplicates,
            invalid: own.invalid
                + inconsistent
                + too_large
                + invalid_fragments
                + unknown_track
                + inconsistent_frames,
            expired,
            evicted,
            rebases,
            clock_drift_ppm,
            buffered_frames,
            pending_bytes,
            pending_frames,
            abandoned,
            other_layer,
            switch_dropped,
            ..own.clone()
        }
    }

    pub fn catalog(&self) -> Option<&Catalog> {
        self.catalog.as_ref()
    }

    /// The publisher epoch being followed.
    pub fn epoch(&self) -> Option<u64> {
        self.epoch
    }

    /// Whether the current epoch's end of stream was emitted.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    pub fn config(&self) -> &SubscriberConfig {
        &self.config
    }

    /// Selects the layer a track plays (see [`Playout::select`]): another temporal layer
    /// of the spatial layer played is followed at once going down and from its next sync
    /// frame going up; another spatial layer from its first keyframe, the current one
    /// playing until then. Frames dropped and gaps left by the switch are not counted as
    /// lost. The caller subscribes the layers' channels (see [`Subscriber::channels_for`]).
    /// Returns false for an unknown track or layer.
    pub fn set_layer(&mut self, now: Instant, track: u32, layer: u32) -> bool {
        let selected = self.playout.select(now, track, layer);
        self.collect_output();
        selected
    }

    /// The layer a track is set to play.
    pub fn selected_layer(&self, track: u32) -> Option<LayerPosition> {
        self.playout.selected_layer(track)
    }

    /// The highest layer a track decodes now; `None` before its first keyframe.
    pub fn playing_layer(&self, track: u32) -> Option<LayerPosition> {
        self.playout.playing_layer(track)
    }

    /// A track's layer ladder, lightest first.
    pub fn track_layers(&self, track: u32) -> Option<&[LayerPosition]> {
        self.playout.track_layers(track)
    }

    /// Whether a track waits for a keyframe (joining, after a base layer loss, or for the
    /// spatial layer it switches to): the moment to ask for one.
    pub fn awaiting_keyframe(&self, track: u32) -> bool {
        self.playout.awaiting_keyframe(track)
    }

    /// Per layer that frames arrived on, what arrived since the last call. Gaps still
    /// open after `loss_grace` count as lost.
    pub fn take_layer_counts(
        &mut self,
        now: Instant,
        loss_grace: Duration,
    ) -> Vec<((u32, u32), LayerCounts)> {
        let stall = self.local_stall.map(|(_, until)| until);
        self.monitors
            .iter_mut()
            .map(|(&key, monitor)| (key, monitor.take(now, loss_grace, stall)))
            .collect()
    }

    /// Forgets a layer's arrival history (it was unsubscribed): when it comes back, its
    /// first frame starts a new count, so the gap in between is not a loss.
    pub fn forget_layer(&mut self, track: u32, layer: u32) {
        self.monitors.remove(&(track, layer));
    }

    /// Returns whether the catalog is the publisher's current one (a sign of life).
    fn handle_catalog(&mut self, catalog: Catalog) -> bool {
        match self.epoch {
            Some(epoch) if epoch == catalog.epoch => {
                let newer = self
                    .catalog
                    .as_ref()
                    .is_none_or(|current| catalog.version > current.version);
                if newer {
                    self.adopt_catalog(catalog);
                }
            }
            Some(_) if self.retired_epochs.contains(&catalog.epoch) => {
                self.stats.wrong_epoch += 1;
                return false;
            }
            Some(epoch) => {
                self.retired_epochs.push_back(epoch);
                if self.retired_epochs.len() > RETIRED_EPOCHS {
                    self.retired_epochs.pop_front();
                }
                self.reassembler.reset();
                self.playout.reset();
                self.monitors.clear();
                self.delay_floors.clear();
                self.pending_end = None;
                self.ended = false;
                self.stats.restarts += 1;
                self.epoch = Some(catalog.epoch);
                self.events.push_back(SubscriberEvent::Restarted {
                    epoch: catalog.epoch,
                });
                self.adopt_catalog(catalog);
            }
            None => {
                self.epoch = Some(catalog.epoch);
                self.adopt_catalog(catalog);
            }
        }
        true
    }

    fn adopt_catalog(&mut self, catalog: Catalog) {
        self.playout
            .set_tracks(catalog.tracks.iter().map(|track| track.id));
        for track in &catalog.tracks {
            let layers = track
                .layers
                .iter()
                .map(|layer| LayerPosition {
                    id: layer.id,
                    spatial: layer.spatial_id,
                    temporal: layer.temporal_id,
                })
                .collect();
            self.playout.set_track_layers(track.id, layers);
        }
        let known = |(track, layer): &(u32, u32)| {
            catalog.tracks.iter().any(|t| {
                t.id == *track
                    && (t.layers.iter().any(|l| l.id == *layer)
                        || (t.layers.is_empty() && *layer == 0))
            })
        };
        self.monitors.retain(|key, _| known(key));
        self.events
            .push_back(SubscriberEvent::Catalog(catalog.clone()));
        self.catalog = Some(catalog);
    }

    /// Returns whether the fragment belongs to the current epoch (a sign of life).
    fn handle_fragment(&mut self, now: Instant, fragment: Fragment) -> bool {
        self.stats.fragments += 1;
        self.stats.fragment_bytes += fragment.payload.len() as u64;
        let (Some(epoch), Some(catalog)) = (self.epoch, &self.catalog) else {
            self.stats.before_catalog += 1;
            return false;
        };
        if fragment.epoch != epoch {
            self.stats.wrong_epoch += 1;
            return false;
        }
        let known = catalog
            .tracks
            .iter()
            .find(|track| track.id == fragment.track)
            .is_some_and(|track| {
                if track.layers.is_empty() {
                    fragment.layer == 0
                } else {
                    track.layers.iter().any(|layer| layer.id == fragment.layer)
                }
            });
        if !known {
            self.stats.invalid += 1;
            return false;
        }
        // Otherwise incomplete, or dropped and counted by the reassembler.
        if let Ok(Some(frame)) = self.reassembler.push(now, fragment) {
            self.monitor(now, &frame);
            self.playout.push(now, frame);
        }
        true
    }

    fn monitor(&mut self, now: Instant, frame: &CompleteFrame) {
        let publish_delay = Duration::from_micros(frame.header.publish_delay_us.into());
        let floor = self
            .delay_floors
            .entry(frame.track)
            .or_insert(DelayFloor {
                started: now,
                current: publish_delay,
                previous: None,
            })
            .observe(now, publish_delay);
        let deadline = self.playout.deadline(frame);
        // When it arrives on a usual path (the deadline less the latency).
        let local = deadline.and_then(|deadline| deadline.checked_sub(self.config.latency));
        let lateness = deadline
            .and_then(|deadline| now.checked_duration_since(deadline))
            .filter(|lateness| !lateness.is_zero());
        let cause = lateness.map(|lateness| {
            // Captured while this viewer was stalled, or arriving while it drains the backlog.
            let backlog = self.local_stall.is_some_and(|(resumed, until)| {
                now <= until || local.is_some_and(|local| local <= resumed)
            });
            if backlog {
                LateCause::Local
            } else if publish_delay.saturating_sub(floor) >= lateness {
                // On time but for what the publisher added.
                LateCause::Publisher
            } else {
                LateCause::Network
            }
        });
        match cause {
            Some(LateCause::Network) => self.stats.late_network += 1,
            Some(LateCause::Publisher) => self.stats.late_publisher += 1,
            Some(LateCause::Local) => self.stats.late_local += 1,
            None => {}
        }
        self.monitors
            .entry((frame.track, frame.layer))
            .or_default()
            .frame(
                now,
                frame.sequence,
                local,
                cause,
                self.local_stall.map(|(resumed, _)| resumed),
            );
    }

    /// Returns whether the announcement belongs to the current epoch (a sign of life).
    fn handle_end_of_stream(&mut self, now: Instant, eos: EndOfStream) -> bool {
        let Some(epoch) = self.epoch else {
            self.stats.before_catalog += 1;
            return false;
        };
        if eos.epoch != epoch {
            self.stats.wrong_epoch += 1;
            return false;
        }
        // Repeats of the announcement are expected and carry nothing new.
        if self.pending_end.is_some() {
            return true;
        }
        self.pending_end = Some(PendingEnd {
            tracks: eos.tracks,
            deadline: now + self.config.latency + self.config.jitter_tolerance,
        });
        true
    }

    fn check_end(&mut self, now: Instant) {
        if self.ended {
            return;
        }
        let Some(end) = &self.pending_end else {
            return;
        };
        if now < end.deadline && !self.playout.is_complete(&end.tracks) {
            return;
        }
        self.playout.finish(now, &end.tracks);
        self.collect_output();
        self.ended = true;
        self.events.push_back(SubscriberEvent::EndOfStream);
    }

    fn collect_output(&mut self) {
        while let Some(frame) = self.playout.poll_output() {
            self.events.push_back(SubscriberEvent::Frame(frame));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::publisher::{EncodedFrame, Publisher, PublisherConfig};
    use crate::core::wire::{TrackKind, decode};
    use bytes::Bytes;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;

    const MS: Duration = Duration::from_millis(1);
    const VIDEO: u32 = 0;
    const AUDIO: u32 = 1;
    const EPOCH: u64 = 77;

    /// What one publisher sent, with send times.
    struct Published {
        messages: Vec<(Instant, Message)>,
        frames: HashMap<(u32, u64), EncodedFrame>,
        publisher: Publisher,
    }

    struct StreamShape {
        epoch: u64,
        video_frames: u64,
        audio_frames: u64,
        /// A video keyframe every `gop` frames.
        gop: u64,
        fragment_size: usize,
        video_size: fn(u64) -> usize,
        end: bool,
    }

    impl Default for StreamShape {
        fn default() -> Self {
            Self {
                epoch: EPOCH,
                video_frames: 20,
                audio_frames: 0,
                gop: 10,
                fragment_size: 100,
                video_size: |sequence| 50 + (sequence as usize * 37) % 400,
                end: false,
            }
        }
    }

    fn payload(track: u32, sequence: u64, size: usize) -> Bytes {
        (0..size)
            .map(|i| (i as u64 ^ sequence.wrapping_mul(31) ^ u64::from(track) << 5) as u8)
            .collect::<Vec<u8>>()
            .into()
    }

    fn drain_into(publisher: &mut Publisher, now: Instant, out: &mut Vec<(Instant, Message)>) {
        while let Some(transmit) = publisher.poll_transmit() {
            let message = decode(&transmit.payload, &Limits::default()).expect("decodes");
            out.push((now, message));
        }
    }

    /// Video at 25 fps (track 0) and audio at 50 fps (track 1, every frame a keyframe),
    /// published on a 20 ms tick from t0.
    fn publish(t0: Instant, shape: &StreamShape) -> Published {
        let config = PublisherConfig {
            max_fragment_size: shape.fragment_size,
            ..PublisherConfig::default()
        };
        let mut publisher = Publisher::new("demo", shape.epoch, config);
        let video = publisher.add_track(t0, TrackKind::Video, "video/x-vp8".into(), vec![]);
        let audio = publisher.add_track(t0, TrackKind::Audio, "audio/x-opus".into(), vec![]);
        assert_eq!((video, audio), (VIDEO, AUDIO));
        let mut messages = Vec::new();
        let mut frames = HashMap::new();
        drain_into(&mut publisher, t0, &mut messages);
        let ticks = shape.audio_frames.max(shape.video_frames * 2);
        let mut now = t0;
        for tick in 0..ticks {
            now = t0 + MS * 20 * tick as u32;
            if publisher.poll_timeout().is_some_and(|due| due <= now) {
                publisher.handle_timeout(now);
            }
            let mut send = |track: u32, sequence: u64, frame: EncodedFrame| {
                let sent = publisher.push_frame(now, track, 0, frame.clone());
                assert_eq!(sent, Ok(sequence));
                frames.insert((track, sequence), frame);
            };
            if tick < shape.audio_frames {
                send(
                    AUDIO,
                    tick,
                    EncodedFrame {
                        pts: Some(MS * 20 * tick as u32),
                        dts: None,
                        duration: Some(MS * 20),
                        keyframe: true,
                        capture_unix_ns: tick,
                        publish_delay: Duration::ZERO,
                        data: payload(AUDIO, tick, 1 + tick as usize % 60),
                    },
                );
            }
            let sequence = tick / 2;
            if tick % 2 == 0 && sequence < shape.video_frames {
                send(
                    VIDEO,
                    sequence,
                    EncodedFrame {
                        pts: Some(MS * 40 * sequence as u32),
                        dts: None,
                        duration: Some(MS * 40),
                        keyframe: sequence.is_multiple_of(shape.gop),
                        capture_unix_ns: sequence,
                        publish_delay: Duration::ZERO,
                        data: payload(VIDEO, sequence, (shape.video_size)(sequence)),
                    },
                );
            }
            drain_into(&mut publisher, now, &mut messages);
        }
        if shape.end {
            now += MS * 20;
            publisher.end_of_stream(now);
            drain_into(&mut publisher, now, &mut messages);
            while let Some(due) = publisher.poll_timeout() {
                publisher.handle_timeout(due);
                drain_into(&mut publisher, due, &mut messages);
            }
        }
        Published {
            messages,
            frames,
            publisher,
        }
    }

    /// Feeds messages at their arrival times, servicing timers in between and afterwards
    /// as the element would. Checks the memory limits after every step.
    fn deliver(
        subscriber: &mut Subscriber,
        mut arrivals: Vec<(Instant, Message)>,
    ) -> Vec<SubscriberEvent> {
        arrivals.sort_by_key(|(at, _)| *at);
        let mut events = Vec::new();
        let check = |subscriber: &mut Subscriber, events: &mut Vec<SubscriberEvent>| {
            let config = subscriber.config().clone();
            let stats = subscriber.stats();
            assert!(stats.pending_bytes as usize <= config.max_pending_bytes);
            assert!(stats.pending_frames as usize <= config.max_pending_frames.max(1));
            let tracks = subscriber
                .catalog()
                .map_or(0, |catalog| catalog.tracks.len());
            assert!(stats.buffered_frames as usize <= config.buffer_size.max(1) * tracks);
            events.extend(std::iter::from_fn(|| subscriber.poll_event()));
        };
        for (at, message) in arrivals {
            while let Some(due) = subscriber.poll_timeout().filter(|&due| due <= at) {
                subscriber.handle_timeout(due);
                check(subscriber, &mut events);
            }
            subscriber.handle_message(at, message);
            check(subscriber, &mut events);
        }
        for _ in 0..10_000 {
            let Some(due) = subscriber.poll_timeout() else {
                break;
            };
            subscriber.handle_timeout(due);
            check(subscriber, &mut events);
        }
        assert_eq!(subscriber.poll_timeout(), None, "timers settle");
        events
    }

    fn frames_of(events: &[SubscriberEvent]) -> Vec<&OutputFrame> {
        events
            .iter()
            .filter_map(|event| match event {
                SubscriberEvent::Frame(frame) => Some(frame),
                _ => None,
            })
            .collect()
    }

    fn sequences(events: &[SubscriberEvent], track: u32) -> Vec<u64> {
        frames_of(events)
            .into_iter()
            .filter(|frame| frame.track == track)
            .map(|frame| frame.sequence)
            .collect()
    }

    fn count_end_of_stream(events: &[SubscriberEvent]) -> usize {
        events
            .iter()
            .filter(|event| matches!(event, SubscriberEvent::EndOfStream))
            .count()
    }

    /// Every frame is what was published for its track and sequence.
    fn assert_intact(events: &[SubscriberEvent], published: &Published) {
        for frame in frames_of(events) {
            let sent = &published.frames[&(frame.track, frame.sequence)];
            assert_eq!(frame.data, sent.data);
            assert_eq!(frame.keyframe, sent.keyframe);
            assert_eq!(frame.stream_pts, sent.pts);
            assert_eq!(frame.duration, sent.duration);
            assert_eq!(frame.capture_unix_ns, sent.capture_unix_ns);
        }
    }

    fn is_fragment_of(message: &Message, track: u32, sequence: u64) -> bool {
        matches!(message, Message::Fragment(f) if f.track == track && f.sequence == sequence)
    }

    #[test]
    fn frames_round_trip_in_order() {
        let t0 = Instant::now();
        let published = publish(t0, &StreamShape::default());
        let mut subscriber = Subscriber::new(SubscriberConfig::default());
        let events = deliver(&mut subscriber, published.messages.clone());
        // One catalog per added track.
        let catalogs: Vec<_> = events
            .iter()
            .filter_map(|event| match event {
                SubscriberEvent::Catalog(catalog) => Some(catalog),
                _ => None,
            })
            .collect();
        // Both tracks were added together: one catalog lists them.
        assert_eq!(catalogs.len(), 1);
        assert_eq!(catalogs[0].epoch, EPOCH);
        assert_eq!(catalogs[0].tracks.len(), 2);
        assert_eq!(sequences(&events, VIDEO), (0..20).collect::<Vec<_>>());
        assert_intact(&events, &published);
        for frame in frames_of(&events) {
            // Arrives on its timeline position: local time is the send time.
            assert_eq!(frame.pts, t0 + frame.stream_pts.unwrap());
            assert_eq!(frame.discont, frame.sequence == 0);
        }
        let stats = subscriber.stats();
        assert_eq!((stats.frames_completed, stats.frames_output), (20, 20));
        assert_eq!(stats.fragments, published.publisher.stats().fragments);
        assert_eq!(
            stats.fragment_bytes,
            published.publisher.stats().payload_bytes
        );
        assert_eq!((stats.pending_bytes, stats.buffered_frames), (0, 0));
        assert_eq!(stats.frames_lost + stats.frames_skipped + stats.invalid, 0);
    }

    #[test]
    fn fragments_in_random_order_round_trip() {
        let t0 = Instant::now();
        let shape = StreamShape {
            video_frames: 50,
            audio_frames: 100,
            fragment_size: 64,
            video_size: |sequence| 200 + (sequence as usize * 997) % 3000,
            ..StreamShape::default()
        };
        let published = publish(t0, &shape);
        let mut rng = StdRng::seed_from_u64(7);
        let (catalog, mut rest): (Vec<_>, Vec<_>) = published
            .messages
            .clone()
            .into_iter()
            .partition(|(_, message)| matches!(message, Message::Catalog(_)));
        // Shuffle in windows of 30 messages (several frames) and spread over 30 ms.
        for window in rest.chunks_mut(30) {
            let start = window[0].0;
            window.shuffle(&mut rng);
            for (at, _) in window.iter_mut() {
                *at = (*at).max(start) + MS * rng.random_range(0..30);
            }
        }
        let mut subscriber = Subscriber::new(SubscriberConfig::default());
        let events = deliver(&mut subscriber, catalog.into_iter().chain(rest).collect());
        assert_eq!(sequences(&events, VIDEO), (0..50).collect::<Vec<_>>());
        assert_eq!(sequences(&events, AUDIO), (0..100).collect::<Vec<_>>());
        assert_intact(&events, &published);
        let stats = subscriber.stats();
        assert_eq!(
            stats.frames_lost + stats.frames_late + stats.frames_skipped,
            0
        );
    }

    #[test]
    fn audio_and_video_share_one_timeline() {
        let t0 = Instant::now();
        let shape = StreamShape {
            video_frames: 25,
            audio_frames: 50,
            ..StreamShape::default()
        };
        let published = publish(t0, &shape);
        // Video needs 30 ms more than audio to arrive.
        let arrivals = published
            .messages
            .iter()
            .map(|(at, message)| {
                let delay = if is_fragment_of_track(message, VIDEO) {
                    35
                } else {
                    5
                };
                (*at + MS * delay, message.clone())
            })
            .collect();
        let mut subscriber = Subscriber::new(SubscriberConfig::default());
        let events = deliver(&mut subscriber, arrivals);
        let frames = frames_of(&events);
        assert_eq!(frames.len(), 75);
        let reference = frames[0];
        assert_eq!(reference.track, AUDIO);
        for frame in &frames {
            let stream_delta = frame.stream_pts.unwrap() - reference.stream_pts.unwrap();
            assert_eq!(frame.pts - reference.pts, stream_delta);
        }
    }

    fn is_fragment_of_track(message: &Message, track: u32) -> bool {
        matches!(message, Message::Fragment(f) if f.track == track)
    }

    #[test]
    fn fragments_before_the_first_catalog_are_dropped() {
        let t0 = Instant::now();
        let shape = StreamShape {
            video_frames: 60,
            ..StreamShape::default()
        };
        let published = publish(t0, &shape);
        // The first catalogs are lost; the periodic republish at 1 s lets the viewer in.
        let messages: Vec<_> = published
            .messages
            .iter()
            .filter(|(at, message)| !(matches!(message, Message::Catalog(_)) && *at == t0))
            .cloned()
            .collect();
        let before = messages
            .iter()
            .take_while(|(_, message)| !matches!(message, Message::Catalog(_)))
            .count();
        let mut subscriber = Subscriber::new(SubscriberConfig::default());
        let mut events = deliver(&mut subscriber, messages[..before].to_vec());
        assert!(events.is_empty());
        assert_eq!(subscriber.stats().before_catalog, before as u64);
        events.extend(deliver(&mut subscriber, messages[before..].to_vec()));
        assert!(matches!(events[0], SubscriberEvent::Catalog(_)));
        // The catalog came with frame 25; playback starts at the keyframe 30.
        assert_eq!(sequences(&events, VIDEO), (30..60).collect::<Vec<_>>());
        assert_eq!(subscriber.stats().frames_skipped, 5);
    }

    #[test]
    fn late_join_starts_at_a_keyframe() {
        let t0 = Instant::now();
        let shape = StreamShape {
            video_frames: 40,
            ..StreamShape::default()
        };
        let published = publish(t0, &shape);
        let catalog = published.messages[0].clone();
        assert!(matches!(catalog.1, Message::Catalog(_)));
        // Joined at 500 ms: frames from 13 on, keyframe at 20.
        let joined = t0 + MS * 500;
        let arrivals: Vec<_> = std::iter::once((joined, catalog.1))
            .chain(
                published
                    .messages
                    .iter()
                    .filter(|(at, _)| *at >= joined)
                    .cloned(),
            )
            .collect();
        let mut subscriber = Subscriber::new(SubscriberConfig::default());
        let events = deliver(&mut subscriber, arrivals);
        assert_eq!(sequences(&events, VIDEO), (20..40).collect::<Vec<_>>());
        let first = frames_of(&events)[0];
        assert!(first.keyframe && first.discont);
        let stats = subscriber.stats();
        assert_eq!((stats.frames_skipped, stats.frames_lost), (7, 0));
    }

    #[test]
    fn permanent_loss_skips_to_the_next_keyframe_without_stalling() {
        let t0 = Instant::now();
        let shape = StreamShape {
            video_frames: 60,
            ..StreamShape::default()
        };
        let published = publish(t0, &shape);
        // One fragment of frame 13 never arrives.
        let mut dropped = false;
        let arrivals: Vec<_> = published
            .messages
            .iter()
            .filter(|(_, message)| {
                let drop = !dropped && is_fragment_of(message, VIDEO, 13);
                dropped |= drop;
                !drop
            })
            .cloned()
            .collect();
        let mut subscriber = Subscriber::new(SubscriberConfig::default());
        let events = deliver(&mut subscriber, arrivals);
        let expected: Vec<u64> = (0..13).chain(20..60).collect();
        assert_eq!(sequences(&events, VIDEO), expected);
        let resumed = frames_of(&events)
            .into_iter()
            .find(|frame| frame.sequence == 20)
            .unwrap();
        assert!(resumed.discont);
        let stats = subscriber.stats();
        assert_eq!((stats.frames_lost, stats.frames_skipped), (1, 6));
        assert_eq!((stats.expired, stats.pending_bytes), (1, 0));
    }

    #[test]
    fn incomplete_frames_expire_after_the_fragment_timeout() {
        let t0 = Instant::now();
        let shape = StreamShape {
            video_size: |_| 500,
            ..StreamShape::default()
        };
        let published = publish(t0, &shape);
        let mut subscriber = Subscriber::new(SubscriberConfig {
            // Long silences here are part of the scenario, not a lost publisher.
            publisher_timeout: None,
            ..SubscriberConfig::default()
        });
        let (catalog, first_fragment) = (&published.messages[0], &published.messages[1]);
        subscriber.handle_message(t0, catalog.1.clone());
        subscriber.handle_message(t0, first_fragment.1.clone());
        assert!(subscriber.stats().pending_bytes > 0);
        assert_eq!(subscriber.poll_timeout(), Some(t0 + Duration::from_secs(1)));
        subscriber.handle_timeout(t0 + Duration::from_secs(1));
        let stats = subscriber.stats();
        assert_eq!(
            (stats.expired, stats.pending_bytes, stats.pending_frames),
            (1, 0, 0)
        );
        assert_eq!(subscriber.poll_timeout(), None);
    }

    #[test]
    fn memory_limits_evict_the_oldest_incomplete_frames() {
        let t0 = Instant::now();
        let shape = StreamShape {
            video_frames: 30,
            fragment_size: 100,
            video_size: |_| 1000,
            ..StreamShape::default()
        };
        let published = publish(t0, &shape);
        // Everything but the last fragment of each frame, then the last fragments.
        let (lasts, others): (Vec<_>, Vec<_>) = published.messages.iter().cloned().partition(
            |(_, message)| matches!(message, Message::Fragment(f) if f.index + 1 == f.count),
        );
        let late = t0 + MS * 2000;
        let arrivals: Vec<_> = others
            .into_iter()
            .chain(lasts.into_iter().map(|(_, message)| (late, message)))
            .collect();
        let config = SubscriberConfig {
            max_pending_bytes: 4500,
            max_pending_frames: 8,
            fragment_timeout: Duration::from_secs(10),
            ..SubscriberConfig::default()
        };
        let mut subscriber = Subscriber::new(config);
        // `deliver` checks the limits after every step.
        let events = deliver(&mut subscriber, arrivals);
        let stats = subscriber.stats();
        // 900 bytes per incomplete frame: five fit, the other 25 were evicted.
        assert_eq!(stats.evicted, 25);
        assert_eq!(stats.abandoned, 25);
        assert!(
            sequences(&events, VIDEO).is_empty(),
            "the survivors are not keyframes"
        );
    }

    #[test]
    fn duplicates_are_counted_and_dropped() {
        let t0 = Instant::now();
        let published = publish(t0, &StreamShape::default());
        let arrivals: Vec<_> = published
            .messages
            .iter()
            .flat_map(|(at, message)| [(*at, message.clone()), (*at + MS * 3, message.clone())])
            .collect();
        let mut subscriber = Subscriber::new(SubscriberConfig::default());
        let events = deliver(&mut subscriber, arrivals);
        assert_eq!(sequences(&events, VIDEO), (0..20).collect::<Vec<_>>());
        assert_eq!(
            subscriber.stats().duplicates,
            published.publisher.stats().fragments
        );
        // One per catalog version, not per copy.
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, SubscriberEvent::Catalog(_)))
                .count(),
            1
        );
    }

    #[test]
    fn a_stall_costs_no_frames_and_no_lasting_latency() {
        let t0 = Instant::now();
        let shape = StreamShape {
            video_frames: 100,
            ..StreamShape::default()
        };
        let published = publish(t0, &shape);
        // Nothing arrives between 1 s and 2.5 s; then the backlog comes at once.
        let stall_end = t0 + MS * 2500;
        let arrivals: Vec<_> = published
            .messages
            .iter()
            .map(|(at, message)| {
                let at = if *at >= t0 + MS * 1000 {
                    (*at).max(stall_end)
                } else {
                    *at
                };
                (at, message.clone())
            })
            .collect();
        let arrival_of: HashMap<u64, Instant> = arrivals
            .iter()
            .filter_map(|(at, message)| match message {
                Message::Fragment(f) if f.index + 1 == f.count => Some((f.sequence, *at)),
                _ => None,
            })
            .collect();
        let config = SubscriberConfig::default();
        let mut subscriber = Subscriber::new(config.clone());
        let events = deliver(&mut subscriber, arrivals);
        assert_eq!(sequences(&events, VIDEO), (0..100).collect::<Vec<_>>());
        let stats = subscriber.stats();
        assert_eq!(
            stats.rebases, 0,
            "a burst after a stall does not move the clock"
        );
        // Once the backlog is through, every frame is in time for the sink again.
        let caught_up = frames_of(&events)
            .into_iter()
            .filter(|f| arrival_of[&f.sequence] > stall_end);
        let mut checked = 0;
        for frame in caught_up {
            assert!(frame.pts + config.latency >= arrival_of[&frame.sequence]);
            checked += 1;
        }
        assert!(checked > 20, "{checked} frames after the stall");
    }

    #[test]
    fn a_new_epoch_restarts_the_stream() {
        let t0 = Instant::now();
        let old = publish(t0, &StreamShape::default());
        let restart = t0 + MS * 5000;
        let new = publish(
            restart,
            &StreamShape {
                epoch: 78,
                ..StreamShape::default()
            },
        );
        let mut subscriber = Subscriber::new(SubscriberConfig::default());
        let first = deliver(&mut subscriber, old.messages.clone());
        assert_eq!(sequences(&first, VIDEO).len(), 20);

        // A straggler of the old stream is not a restart once the new one took over.
        let stale_catalog = old.messages[0].1.clone();
        let stale_fragment = old.messages[1].1.clone();
        let mut arrivals = new.messages.clone();
        arrivals.push((restart + MS * 100, stale_catalog));
        arrivals.push((restart + MS * 100, stale_fragment));
        let events = deliver(&mut subscriber, arrivals);
        assert_eq!(events[0], SubscriberEvent::Restarted { epoch: 78 });
        assert!(matches!(&events[1], SubscriberEvent::Catalog(catalog) if catalog.epoch == 78));
        assert_eq!(sequences(&events, VIDEO), (0..20).collect::<Vec<_>>());
        let frames = frames_of(&events);
        assert!(frames[0].discont);
        // A new clock: the new stream's time 0 is its first frame's arrival.
        assert_eq!(frames[0].pts, restart);
        let stats = subscriber.stats();
        assert_eq!((stats.restarts, stats.wrong_epoch), (1, 2));
        assert_eq!(subscriber.epoch(), Some(78));
    }

    #[test]
    fn catalog_changes_are_announced_once() {
        let t0 = Instant::now();
        let mut published = publish(t0, &StreamShape::default());
        let mut subscriber = Subscriber::new(SubscriberConfig {
            // Long silences here are part of the scenario, not a lost publisher.
            publisher_timeout: None,
            ..SubscriberConfig::default()
        });
        deliver(&mut subscriber, published.messages.clone());
        assert_eq!(subscriber.catalog().unwrap().version, 2);

        let later = t0 + MS * 3000;
        let publisher = &mut published.publisher;
        publisher
            .update_track_caps(later, VIDEO, "video/x-vp8,width=320".into())
            .unwrap();
        let mut messages = Vec::new();
        drain_into(publisher, later, &mut messages);
        publisher.handle_timeout(later + Duration::from_secs(1));
        drain_into(publisher, later + Duration::from_secs(1), &mut messages);
        assert_eq!(messages.len(), 2);
        let events = deliver(&mut subscriber, messages);
        let [SubscriberEvent::Catalog(catalog)] = events.as_slice() else {
            panic!("expected one catalog event, got {events:?}");
        };
        assert_eq!(catalog.version, 3);
        assert_eq!(catalog.tracks[0].caps, "video/x-vp8,width=320");
    }

    #[test]
    fn fragments_of_unknown_tracks_and_malformed_messages_are_invalid() {
        let t0 = Instant::now();
        let published = publish(t0, &StreamShape::default());
        let mut subscriber = Subscriber::new(SubscriberConfig::default());
        deliver(&mut subscriber, published.messages[..1].to_vec());
        let Message::Fragment(fragment) = published.messages[1].1.clone() else {
            panic!("expected a fragment");
        };
        let unknown_track = Fragment {
            track: 9,
            ..fragment.clone()
        };
        let unknown_layer = Fragment {
            layer: 3,
            ..fragment.clone()
        };
        let malformed = Fragment {
            count: 0,
            ..fragment.clone()
        };
        for bad in [unknown_track, unknown_layer, malformed] {
            subscriber.handle_message(t0, Message::Fragment(bad));
        }
        let stats = subscriber.stats();
        assert_eq!(
            (stats.invalid, stats.pending_frames, stats.messages),
            (3, 0, 4)
        );
    }

    #[test]
    fn end_of_stream_follows_the_last_frame() {
        let t0 = Instant::now();
        let published = publish(
            t0,
            &StreamShape {
                audio_frames: 40,
                end: true,
                ..StreamShape::default()
            },
        );
        let eos_count = published
            .messages
            .iter()
            .filter(|(_, message)| matches!(message, Message::EndOfStream(_)))
            .count();
        assert_eq!(eos_count, 3);
        let mut subscriber = Subscriber::new(SubscriberConfig::default());
        let mut events = Vec::new();
        let mut ended_at = None;
        for (at, message) in published.messages.clone() {
            subscriber.handle_message(at, message);
            events.extend(std::iter::from_fn(|| subscriber.poll_event()));
            if ended_at.is_none() && count_end_of_stream(&events) == 1 {
                ended_at = Some(at);
            }
        }
        // At once on the first announcement: every frame was already out.
        let first_eos = published
            .messages
            .iter()
            .find(|(_, message)| matches!(message, Message::EndOfStream(_)))
            .unwrap()
            .0;
        assert_eq!(ended_at, Some(first_eos));
        assert_eq!(count_end_of_stream(&events), 1);
        assert_eq!(events.last(), Some(&SubscriberEvent::EndOfStream));
        assert_eq!(sequences(&events, VIDEO).len(), 20);
        assert_eq!(sequences(&events, AUDIO).len(), 40);
        assert!(subscriber.is_ended());
        assert_eq!(subscriber.poll_timeout(), None);
    }

    #[test]
    fn end_of_stream_is_emitted_by_its_deadline_when_the_last_frames_are_lost() {
        let t0 = Instant::now();
        let published = publish(
            t0,
            &StreamShape {
                end: true,
                ..StreamShape::default()
            },
        );
        let arrivals: Vec<_> = published
            .messages
            .iter()
            .filter(|(_, message)| {
                !is_fragment_of(message, VIDEO, 18) && !is_fragment_of(message, VIDEO, 19)
            })
            .cloned()
            .collect();
        let first_eos = arrivals
            .iter()
            .find(|(_, message)| matches!(message, Message::EndOfStream(_)))
            .unwrap()
            .0;
        let config = SubscriberConfig::default();
        let deadline = first_eos + config.latency + config.jitter_tolerance;
        let mut subscriber = Subscriber::new(config);
        let before: Vec<_> = arrivals
            .iter()
            .filter(|(at, _)| *at <= first_eos)
            .cloned()
            .collect();
        for (at, message) in before {
            subscriber.handle_message(at, message);
        }
        assert_eq!(subscriber.poll_timeout(), Some(deadline));
        subscriber.handle_timeout(deadline - MS);
        let mut events: Vec<_> = std::iter::from_fn(|| subscriber.poll_event()).collect();
        assert_eq!(count_end_of_stream(&events), 0);
        events.extend(deliver(
            &mut subscriber,
            arrivals
                .into_iter()
                .filter(|(at, _)| *at > first_eos)
                .collect(),
        ));
        assert_eq!(count_end_of_stream(&events), 1);
        assert_eq!(events.last(), Some(&SubscriberEvent::EndOfStream));
        assert_eq!(sequences(&events, VIDEO), (0..18).collect::<Vec<_>>());
        assert_eq!(subscriber.stats().frames_lost, 2);
    }

    #[test]
    fn end_of_stream_of_another_epoch_or_before_the_catalog_is_ignored() {
        let t0 = Instant::now();
        let eos = |epoch| {
            Message::EndOfStream(EndOfStream {
                epoch,
                sequence: 0,
                tracks: vec![],
            })
        };
        let mut subscriber = Subscriber::new(SubscriberConfig::default());
        subscriber.handle_message(t0, eos(EPOCH));
        let published = publish(t0, &StreamShape::default());
        deliver(&mut subscriber, published.messages[..2].to_vec());
        subscriber.handle_message(t0, eos(EPOCH + 1));
        let stats = subscriber.stats();
        assert_eq!((stats.before_catalog, stats.wrong_epoch), (1, 1));
        assert!(!subscriber.is_ended());
        // An empty list ends the stream at once.
        subscriber.handle_message(t0, eos(EPOCH));
        assert!(subscriber.is_ended());
    }

    /// Delivery plan for one message: dropped, or delivered once or more after delays.
    fn arbitrary_plan() -> impl Strategy<Value = (bool, Vec<u32>)> {
        (
            prop::bool::weighted(0.08),
            prop::collection::vec(0u32..400, 1..3),
        )
    }

    proptest! {
        /// Any permutation, duplication and loss of a stream's messages: no panic, ordered
        /// output per track, only published bytes, keyframes at every start, and the
        /// memory limits hold throughout (checked by `deliver`).
        #[test]
        fn any_delivery_pattern_keeps_the_invariants(
            video_frames in 1u64..40,
            audio_frames in 0u64..60,
            gop in 1u64..8,
            plans in prop::collection::vec(arbitrary_plan(), 400),
            buffer_size in 1usize..12,
            max_pending_frames in 1usize..6,
            max_pending_bytes in 100usize..3000,
            latency_ms in 0u64..400,
        ) {
            let t0 = Instant::now();
            let shape = StreamShape {
                video_frames,
                audio_frames,
                gop,
                fragment_size: 64,
                video_size: |sequence| 1 + (sequence as usize * 131) % 500,
                end: true,
                ..StreamShape::default()
            };
            let published = publish(t0, &shape);
            let mut arrivals = Vec::new();
            for (index, (at, message)) in published.messages.iter().enumerate() {
                let (drop, delays) = &plans[index % plans.len()];
                // The catalog always gets through so there is something to check.
                if *drop && !matches!(message, Message::Catalog(_)) {
                    continue;
                }
                for delay in delays {
                    arrivals.push((*at + MS * *delay, message.clone()));
                }
            }
            let config = SubscriberConfig {
                latency: MS * latency_ms as u32,
                buffer_size,
                max_pending_frames,
                max_pending_bytes,
                ..SubscriberConfig::default()
            };
            let mut subscriber = Subscriber::new(config);
            let events = deliver(&mut subscriber, arrivals);

            prop_assert!(count_end_of_stream(&events) <= 1);
            if let Some(end) = events.iter().position(|e| *e == SubscriberEvent::EndOfStream) {
                prop_assert!(frames_of(&events[end..]).is_empty(), "frames after the end");
            }
            assert_intact(&events, &published);
            for track in [VIDEO, AUDIO] {
                let frames: Vec<_> = frames_of(&events)
                    .into_iter()
                    .filter(|frame| frame.track == track)
                    .collect();
                if let Some(first) = frames.first() {
                    prop_assert!(first.discont && first.keyframe);
                }
                for pair in frames.windows(2) {
                    prop_assert!(pair[0].sequence < pair[1].sequence);
                    prop_assert!(pair[0].pts <= pair[1].pts);
                    if pair[1].discont {
                        prop_assert!(pair[1].keyframe);
                    } else {
                        prop_assert_eq!(pair[0].sequence + 1, pair[1].sequence);
                    }
                }
            }
        }

        /// Reordering shorter than the jitter tolerance, without loss, loses nothing.
        #[test]
        fn reordering_within_the_jitter_tolerance_loses_nothing(
            video_frames in 1u64..40,
            audio_frames in 0u64..60,
            delays in prop::collection::vec(0u32..50, 400),
        ) {
            let t0 = Instant::now();
            let shape = StreamShape {
                video_frames,
                audio_frames,
                gop: 5,
                fragment_size: 64,
                video_size: |sequence| 1 + (sequence as usize * 131) % 500,
                end: true,
                ..StreamShape::default()
            };
            let published = publish(t0, &shape);
            let arrivals = published
                .messages
                .iter()
                .enumerate()
                .map(|(index, (at, message))| {
                    // A viewer starts at the first keyframe that completes, by design: keep
                    // the first catalogs and frames in order so there is no earlier one.
                    let first = match message {
                        Message::Catalog(_) => *at == t0,
                        Message::Fragment(f) => f.sequence == 0,
                        Message::EndOfStream(_)
                        | Message::Feedback(_)
                        | Message::KeyframeRequest(_) => false,
                    };
                    let delay = if first { 0 } else { delays[index % delays.len()] };
                    (*at + MS * delay, message.clone())
                })
                .collect();
            let mut subscriber = Subscriber::new(SubscriberConfig::default());
            let events = deliver(&mut subscriber, arrivals);
            prop_assert_eq!(sequences(&events, VIDEO), (0..video_frames).collect::<Vec<_>>());
            prop_assert_eq!(sequences(&events, AUDIO), (0..audio_frames).collect::<Vec<_>>());
            prop_assert_eq!(events.last(), Some(&SubscriberEvent::EndOfStream));
            let stats = subscriber.stats();
            prop_assert_eq!(stats.frames_lost + stats.frames_skipped + stats.frames_late, 0);
        }
    }
}
