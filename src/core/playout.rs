//! Playout: puts complete frames of each track back in sequence order, maps stream time
//! onto the local clock, and decides when a missing frame is given up.
//!
//! Timing: one stream clock is shared by all tracks so they stay in sync. The first frame
//! released (of any track) anchors it: `base = (now, stream time)`, and a frame's local
//! time is `base.local + (stream time - base.stream) × rate`, where `rate` (local seconds per
//! stream second) follows the publisher's clock as [`super::drift::DriftEstimator`] measures
//! it, re-anchored at each new estimate so the mapping stays continuous. The element stamps output with that
//! local time and reports `latency`, so the sink renders at local time + latency: that is
//! each frame's deadline. Frames are released as soon as they are in order; the sink
//! waits for their time.
//!
//! A missing frame never stalls a track: it is given up shortly before the next buffered
//! frame is due (or `gap_wait` after a later frame arrived, if set), or when the buffer is
//! full. Playback then resumes at the next keyframe.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::drift::{DriftEstimator, DriftUpdate};
use super::reassembly::CompleteFrame;
use super::wire::{FrameHeader, TrackEnd};

/// A gap is given up this long before the next buffered frame's deadline, so that frame
/// still reaches the sink in time.
const GAP_DEADLINE_MARGIN: Duration = Duration::from_millis(5);

/// Period over which arrival slack is watched before the clock is moved earlier.
const DRIFT_WINDOW: Duration = Duration::from_secs(2);

/// How long every frame must be late before the clock moves later: shorter runs of late
/// frames are bursts after a stall, which must not raise latency for good.
const LATE_WINDOW: Duration = Duration::from_millis(500);

/// The clock moves earlier by at most 1/DRIFT_STEP_DIVISOR of the elapsed time, so
/// excess latency is shed slowly and output stays smooth.
const DRIFT_STEP_DIVISOR: u32 = 100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlayoutConfig {
    /// Delay between a frame's local time and its rendering; reported to the sink.
    pub latency: Duration,
    /// Most frames buffered per track.
    pub buffer_size: usize,
    /// How late a frame may be before the clock is rebased; with a `gap_wait`, a gap waits
    /// at least this long once a later frame arrived.
    pub jitter_tolerance: Duration,
    /// How long a gap may wait once a later frame arrived (at least `jitter_tolerance`, and
    /// never past the next frame's deadline). `None` (the default): until shortly before the
    /// next frame's deadline, so the whole latency is time for the data plane to pull what is
    /// missing; giving a frame up costs the rest of its GOP, while the frames after it wait
    /// within their deadline at no cost. Frames without timestamps (no deadline) then wait
    /// `latency`.
    ///
    /// A fixed 200 ms (the default until session 14) made a larger `latency` no more robust:
    /// a frame repaired 285 ms after capture was given up at 243 ms, with a deadline near
    /// 330 ms, and the 30 frames after it went with it (mesh benchmark, 5 % loss).
    pub gap_wait: Option<Duration>,
}

impl Default for PlayoutConfig {
    fn default() -> Self {
        Self {
            latency: Duration::from_millis(300),
            buffer_size: 256,
            jitter_tolerance: Duration::from_millis(60),
            gap_wait: None,
        }
    }
}

/// A frame ready for the element, in sequence order per track.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputFrame {
    pub track: u32,
    pub layer: u32,
    pub sequence: u64,
    /// Local time of the frame on the viewer's timeline; the sink renders it at
    /// `pts + latency`. Non-decreasing per track (for streams without reordering).
    pub pts: Instant,
    pub dts: Option<Instant>,
    pub duration: Option<Duration>,
    pub keyframe: bool,
    /// First frame after the start, a gap or a skip (a decodable point).
    pub discont: bool,
    /// First frame of this track since the stream clock moved (rebase or drift step): its
    /// timestamps jump. Sample-counting consumers such as audio decoders must resync here.
    pub resync: bool,
    pub capture_unix_ns: u64,
    /// The publisher's PTS in stream time.
    pub stream_pts: Option<Duration>,
    /// First frame of another spatial (simulcast) layer than the previous output of this
    /// track: resolution and caps may change here. Always a keyframe with `discont`.
    pub layer_switch: bool,
    pub data: Bytes,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlayoutStats {
    pub frames_output: u64,
    /// Sequences given up without ever arriving.
    pub frames_lost: u64,
    /// Frames that arrived after their sequence was passed.
    pub frames_late: u64,
    /// Frames that arrived but could not be decoded (before the first keyframe, or after
    /// a gap until the next one).
    pub frames_skipped: u64,
    pub duplicates: u64,
    /// Times the clock was moved later because frames came too late.
    pub rebases: u64,
    /// The publisher's clock against the local one, ppm (negative: it runs slow), as the
    /// playout follows it; 0 until estimated.
    pub clock_drift_ppm: i64,
    /// Frames of a layer other than the one played on their track.
    pub other_layer: u64,
    /// Frames of a track the playout does not know.
    pub unknown_track: u64,
    /// Frames whose temporal layer counts contradict the catalog or their sequence.
    pub inconsistent: u64,
    /// Frames dropped because the played layers changed (switch, stepping down): neither
    /// lost nor counted in `frames_skipped`.
    pub switch_dropped: u64,
    /// Frames buffered now, all tracks.
    pub buffered_frames: u64,
}

/// Signed `a - b` in nanoseconds.
fn signed_nanos(a: Instant, b: Instant) -> i128 {
    if a >= b {
        (a - b).as_nanos() as i128
    } else {
        -((b - a).as_nanos() as i128)
    }
}

fn nanos(duration: Duration) -> i128 {
    duration.as_nanos() as i128
}

/// The stream time a frame occupies on the timeline: decode order, so frames of a track
/// reach it in sequence order even when presentation is reordered.
fn timeline_stream_time(header: &FrameHeader) -> Option<Duration> {
    header.dts_ns.or(header.pts_ns).map(Duration::from_nanos)
}

struct ClockBase {
    local: Instant,
    stream: Duration,
}

struct DriftWindow {
    start: Instant,
    /// Smallest margin (local time - arrival) seen in the window, nanoseconds.
    min_margin: i128,
}

/// Consecutive frames later than their deadline plus the jitter tolerance.
struct LateRun {
    start: Instant,
    /// Least lateness (past the deadline) seen in the run, nanoseconds.
    min_lateness: i128,
}

/// The mapping from stream time to local time, shared by all tracks.
struct StreamClock {
    base: Option<ClockBase>,
    /// Local nanoseconds per stream nanosecond (1.0 until the drift is estimated).
    rate: f64,
    drift: DriftEstimator,
    window: Option<DriftWindow>,
    /// The current run of frames later than the tolerance allows, if any.
    late_run: Option<LateRun>,
    /// Bumped whenever the mapping moves, so every track flags its next frame `resync`:
    /// downstream (audio decoders above all) must follow the jump, not smooth it over.
    generation: u64,
    /// Arrivals up to `.1`, and frames whose local time is before `.0` (they would have
    /// arrived before it), say nothing about the path: the viewer itself stalled until `.0`
    /// and is draining its backlog (see [`Playout::ignore_stall`]).
    ignore: Option<(Instant, Instant)>,
}

impl Default for StreamClock {
    fn default() -> Self {
        Self {
            base: None,
            rate: 1.0,
            drift: DriftEstimator::new(),
            window: None,
            late_run: None,
            generation: 0,
            ignore: None,
        }
    }
}

impl StreamClock {
    fn local(&self, stream: Duration) -> Option<Instant> {
        let base = self.base.as_ref()?;
        Some(if stream >= base.stream {
            base.local
                .checked_add(self.scale(stream - base.stream))
                .unwrap_or(base.local)
        } else {
            base.local
                .checked_sub(self.scale(base.stream - stream))
                .unwrap_or(base.local)
        })
    }

    /// The stream time that maps to `local`.
    fn stream_at(&self, local: Instant) -> Option<Duration> {
        let base = self.base.as_ref()?;
        let unscale =
            |d: Duration| Duration::try_from_secs_f64(d.as_secs_f64() / self.rate).unwrap_or(d);
        Some(if local >= base.local {
            base.stream.saturating_add(unscale(local - base.local))
        } else {
            base.stream.saturating_sub(unscale(base.local - local))
        })
    }

    /// A stream-time span in local time.
    fn scale(&self, span: Duration) -> Duration {
        if self.rate == 1.0 {
            return span;
        }
        Duration::try_from_secs_f64(span.as_secs_f64() * self.rate).unwrap_or(span)
    }

    /// Follows a new rate estimate from `stream` on: the mapping keeps its value there, so
    /// output stays continuous (no resync).
    fn set_rate(&mut self, rate: f64, stream: Duration) {
        if let Some(local) = self.local(stream) {
            self.base = Some(ClockBase { local, stream });
            self.rate = rate;
        }
    }

    fn start(&mut self, now: Instant, stream: Duration) {
        if self.base.is_none() {
            self.base = Some(ClockBase { local: now, stream });
        }
    }

    /// Takes note of a frame completed at `arrival`. Moves the clock later when every frame
    /// of a whole `LATE_WINDOW` came later than the jitter tolerance allows (the path got
    /// slower; returns true), or earlier, slowly, when frames have kept arriving well ahead
    /// of time. A burst after a stall holds on-time frames too, so it moves nothing: its
    /// late frames miss their deadline once, and latency does not grow for good.
    /// `sent` is when the frame was published, on the publisher's clock (its stream time plus
    /// its publish delay): what the drift estimate is made from.
    fn observe(
        &mut self,
        arrival: Instant,
        stream: Duration,
        sent: Duration,
        config: &PlayoutConfig,
    ) -> bool {
        let Some(local) = self.local(stream) else {
            return false;
        };
        if self
            .ignore
            .is_some_and(|(resumed, until)| arrival <= until || local <= resumed)
        {
            self.late_run = None;
            self.window = None;
            return false;
        }
        match self.drift.observe(arrival, sent) {
            Some(DriftUpdate::Rate(rate)) => self.set_rate(rate, stream),
            Some(DriftUpdate::PathChange { shift_ns }) if shift_ns > 0.0 => {
                // The path got slower for good: keep the whole latency as headroom. (A faster
                // path is followed by the slow step earlier below: never a jump back.)
                if let Some(base) = self.base.as_mut() {
                    let shift = Duration::from_nanos(shift_ns as u64);
                    base.local = base.local.checked_add(shift).unwrap_or(base.local);
                    self.generation += 1;
                    self.late_run = None;
                    self.window = None;
                    return true;
                }
            }
            _ => {}
        }
        let Some(local) = self.local(stream) else {
            return false;
        };
        let margin = signed_nanos(local, arrival);
        let lateness = -margin - nanos(config.latency);
        let tolerance = nanos(config.jitter_tolerance);
        if lateness > tolerance {
            self.window = None;
            let late = self.late_run.get_or_insert(LateRun {
                start: arrival,
                min_lateness: lateness,
            });
            late.min_lateness = late.min_lateness.min(lateness);
            if arrival.saturating_duration_since(late.start) < LATE_WINDOW {
                return false;
            }
            // Every frame needs at least the least lateness seen; the tolerance on top is
            // headroom so the next slightly slower frame is not late again at once.
            let shift = Duration::from_nanos(
                u64::try_from(late.min_lateness + tolerance).unwrap_or(u64::MAX),
            );
            self.late_run = None;
            let Some(base) = self.base.as_mut() else {
                return false;
            };
            base.local = base.local.checked_add(shift).unwrap_or(base.local);
            self.generation += 1;
            // A path change: transit before and after it are not on one line.
            self.drift.restart();
            return true;
        }
        self.late_run = None;
        let window = self.window.get_or_insert(DriftWindow {
            start: arrival,
            min_margin: margin,
        });
        window.min_margin = window.min_margin.min(margin);
        let elapsed = arrival.saturating_duration_since(window.start);
        if elapsed >= DRIFT_WINDOW {
            if window.min_margin > tolerance
                && let Some(base) = self.base.as_mut()
            {
                let most = nanos(elapsed / DRIFT_STEP_DIVISOR);
                let advance = Duration::from_nanos(window.min_margin.min(most) as u64);
                base.local = base.local.checked_sub(advance).unwrap_or(base.local);
                self.generation += 1;
            }
            self.window = None;
        }
        false
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Before the first keyframe, or after a base layer gap until the next one. Nothing
    /// buffered is a resume point in this mode: one arriving resumes playback at once.
    WaitingForKeyframe,
    Playing,
    /// After the end of stream: everything is late.
    Finished,
}

/// Where a layer sits in its track's ladder (from the catalog).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LayerPosition {
    pub id: u32,
    /// Simulcast encode the layer belongs to.
    pub spatial: u32,
    /// Temporal layer within it, 0 upward.
    pub temporal: u32,
}

impl LayerPosition {
    /// The single base layer of a track without layering.
    pub const BASE: LayerPosition = LayerPosition {
        id: 0,
        spatial: 0,
        temporal: 0,
    };
}

struct Buffered {
    frame: CompleteFrame,
    /// When the frame completed.
    arrival: Instant,
    temporal: u32,
    /// Per temporal id of its spatial layer: frames published before this one.
    counts: Vec<u64>,
}

impl Buffered {
    /// Position in the merged stream of temporal layers `0..=level`.
    fn merged(&self, level: u32) -> u64 {
        merged(&self.counts, level)
    }

    /// A keyframe of the base temporal layer: everything after it decodes from it.
    fn resume_point(&self) -> bool {
        self.temporal == 0 && self.frame.header.keyframe
    }

    fn sync(&self) -> bool {
        self.frame.header.keyframe || self.frame.header.temporal_sync
    }
}

fn merged(counts: &[u64], level: u32) -> u64 {
    counts
        .iter()
        .take(level as usize + 1)
        .fold(0u64, |sum, &count| sum.saturating_add(count))
}

/// Position of a frame among all frames of its spatial layer, all temporal layers.
fn full_position(counts: &[u64]) -> u64 {
    merged(counts, u32::MAX - 1)
}

/// What a track needs from the playout while it works.
struct Context<'a> {
    config: &'a PlayoutConfig,
    clock: &'a mut StreamClock,
    stats: &'a mut PlayoutStats,
    output: &'a mut VecDeque<OutputFrame>,
}

impl Context<'_> {
    fn observe(&mut self, arrival: Instant, frame: &CompleteFrame) {
        let publish_delay = Duration::from_micros(frame.header.publish_delay_us.into());
        if let Some(stream) = timeline_stream_time(&frame.header)
            && self
                .clock
                .observe(arrival, stream, stream + publish_delay, self.config)
        {
            self.stats.rebases += 1;
        }
    }
}

/// When a frame must reach the sink: its local time plus the latency.
fn deadline(config: &PlayoutConfig, clock: &StreamClock, frame: &CompleteFrame) -> Option<Instant> {
    let local = clock.local(timeline_stream_time(&frame.header)?)?;
    local.checked_add(config.latency)
}

/// The playout of one spatial layer of a track: its temporal layers `0..=level` merged in
/// decode order. `level` climbs to `target` one temporal layer at a time, at sync frames;
/// a loss in temporal layer `t > 0` drops it to `t - 1` (frames above reference the lost
/// one) until the next sync frame; a loss in the base layer waits for a keyframe.
///
/// Frames are keyed by their position among all frames of the spatial layer, and a
/// `cursor` counts per temporal layer the frames passed. A frame of layer `t <= level` is
/// next when its merged position (frames of layers `0..=level` before it) equals the
/// cursor's: a difference is a real loss, while frames of layers above `level` (not
/// received or not played) never look like one.
struct GroupPlayout {
    spatial: u32,
    /// Temporal layers in this spatial layer.
    layers: u32,
    target: u32,
    level: u32,
    mode: Mode,
    /// Frames passed per temporal layer; entries above `level` are stale. `None` before
    /// the first keyframe.
    cursor: Option<Vec<u64>>,
    /// Position of the last released frame.
    passed: Option<u64>,
    /// The next released frame starts a new run.
    discont: bool,
    buffer: BTreeMap<u64, Buffered>,
    /// Released frames and their `discont` flag, for the track to emit.
    ready: VecDeque<(CompleteFrame, bool)>,
    /// The spatial layer being switched to, not yet played.
    switching: bool,
}

impl GroupPlayout {
    fn new(spatial: u32, layers: u32, target: u32) -> Self {
        Self {
            spatial,
            layers: layers.max(1),
            target: target.min(layers.saturating_sub(1)),
            level: 0,
            mode: Mode::WaitingForKeyframe,
            cursor: None,
            passed: None,
            discont: true,
            buffer: BTreeMap::new(),
            ready: VecDeque::new(),
            switching: false,
        }
    }

    /// Undecodable frames: skipped, or dropped by the switch while this group is the
    /// spatial layer being switched to (awaiting its keyframe is no loss of quality).
    fn count_skipped(&self, ctx: &mut Context<'_>, frames: u64) {
        if self.switching {
            ctx.stats.switch_dropped += frames;
        } else {
            ctx.stats.frames_skipped += frames;
        }
    }

    fn next_merged(&self) -> Option<u64> {
        self.cursor
            .as_ref()
            .map(|cursor| merged(cursor, self.level))
    }

    /// Whether the frame may be the next one played.
    fn eligible(&self, buffered: &Buffered) -> bool {
        match self.mode {
            Mode::Finished => false,
            Mode::WaitingForKeyframe => buffered.resume_point(),
            Mode::Playing => {
                buffered.temporal <= self.level
                    || (buffered.temporal == self.level + 1
                        && buffered.temporal <= self.target
                        && buffered.sync())
            }
        }
    }

    fn first_eligible(&self) -> Option<u64> {
        self.buffer
            .iter()
            .find(|(_, buffered)| self.eligible(buffered))
            .map(|(&position, _)| position)
    }

    /// Plays temporal layers up to `target` from now on: lower at once, higher from their
    /// next sync frames.
    fn set_target(&mut self, ctx: &mut Context<'_>, target: u32) {
        self.target = target.min(self.layers - 1);
        if self.level > self.target {
            self.level = self.target;
        }
        let before = self.buffer.len();
        let target = self.target;
        self.buffer
            .retain(|_, buffered| buffered.temporal <= target);
        ctx.stats.switch_dropped += (before - self.buffer.len()) as u64;
        self.release_ready(ctx);
    }

    fn push(&mut self, ctx: &mut Context<'_>, now: Instant, buffered: Buffered) {
        if buffered.temporal > self.target {
            ctx.stats.other_layer += 1;
            return;
        }
        if self.mode == Mode::Finished {
            ctx.stats.frames_late += 1;
            return;
        }
        let position = full_position(&buffered.counts);
        if let Some(next) = self.next_merged() {
            if buffered.temporal <= self.level && buffered.merged(self.level) < next {
                ctx.stats.frames_late += 1;
                return;
            }
            if self.passed.is_some_and(|passed| position <= passed) {
                // A higher layer behind the playout: never decodable now.
                ctx.stats.switch_dropped += 1;
                return;
            }
        }
        if self.buffer.contains_key(&position) {
            ctx.stats.duplicates += 1;
            return;
        }
        let resume = self.mode == Mode::WaitingForKeyframe && buffered.resume_point();
        if resume || (self.mode == Mode::Playing && self.eligible(&buffered)) {
            ctx.observe(now, &buffered.frame);
        }
        self.buffer.insert(position, buffered);
        if resume {
            self.resume_at(ctx, now, position);
        } else {
            self.release_ready(ctx);
        }
    }

    /// Continues playback at the resume point `position`: what is buffered before it can
    /// never be decoded.
    fn resume_at(&mut self, ctx: &mut Context<'_>, now: Instant, position: u64) {
        let kept = self.buffer.split_off(&position);
        let skipped = std::mem::replace(&mut self.buffer, kept);
        self.count_skipped(ctx, skipped.len() as u64);
        let Some(keyframe) = self.buffer.get(&position) else {
            return;
        };
        if let Some(cursor) = &self.cursor {
            // Frames of the played layers between the cursor and the keyframe that never
            // arrived are lost.
            let next = merged(cursor, self.level);
            let expected = keyframe.merged(self.level).saturating_sub(next);
            let arrived = skipped
                .values()
                .filter(|b| b.temporal <= self.level && b.merged(self.level) >= next)
                .count() as u64;
            ctx.stats.frames_lost = ctx
                .stats
                .frames_lost
                .saturating_add(expected.saturating_sub(arrived));
        }
        self.cursor = Some(keyframe.counts.clone());
        self.level = self.target;
        self.mode = Mode::Playing;
        self.discont = true;
        let stream = timeline_stream_time(&keyframe.frame.header)
            .or_else(|| ctx.clock.stream_at(now))
            .unwrap_or_default();
        ctx.clock.start(now, stream);
        self.release_ready(ctx);
    }

    fn release_ready(&mut self, ctx: &mut Context<'_>) {
        while self.mode == Mode::Playing {
            let (Some(position), Some(next)) = (self.first_eligible(), self.next_merged()) else {
                return;
            };
            let buffered = &self.buffer[&position];
            let at = buffered.merged(self.level);
            if at > next {
                return;
            }
            let buffered = self
                .buffer
                .remove(&position)
                .expect("eligible frame is buffered");
            if at < next {
                // Behind the cursor since the level changed: undecodable.
                ctx.stats.switch_dropped += 1;
                continue;
            }
            if buffered.temporal > self.level {
                // A sync frame: step up.
                self.level = buffered.temporal;
            }
            if buffered.resume_point() {
                self.level = self.target;
            }
            // Whatever precedes it and was not played never will be.
            let behind = self.buffer.split_off(&position);
            ctx.stats.switch_dropped += std::mem::replace(&mut self.buffer, behind).len() as u64;
            self.advance_past(&buffered, position);
            let discont = std::mem::take(&mut self.discont);
            self.ready.push_back((buffered.frame, discont));
        }
    }

    /// Moves the cursor past `buffered`.
    fn advance_past(&mut self, buffered: &Buffered, position: u64) {
        let cursor = self.cursor.get_or_insert_with(|| buffered.counts.clone());
        let resume = buffered.resume_point();
        for (layer, slot) in cursor.iter_mut().enumerate() {
            if resume || layer as u32 <= self.level {
                *slot = buffered.counts[layer];
            }
        }
        if let Some(slot) = cursor.get_mut(buffered.temporal as usize) {
            *slot = slot.saturating_add(1);
        }
        self.passed = Some(position);
    }

    /// Gives up the missing frames before the first playable buffered one. Returns whether
    /// anything changed.
    fn give_up_gap(&mut self, ctx: &mut Context<'_>, now: Instant) -> bool {
        let Some(position) = self.first_eligible() else {
            return false;
        };
        let Some(cursor) = self.cursor.as_mut() else {
            return false;
        };
        let buffered = &self.buffer[&position];
        let mut lowest_lost = None;
        for layer in 0..=self.level {
            let index = layer as usize;
            let missing = buffered.counts[index].saturating_sub(cursor[index]);
            if missing > 0 {
                ctx.stats.frames_lost = ctx.stats.frames_lost.saturating_add(missing);
                lowest_lost.get_or_insert(layer);
                cursor[index] = buffered.counts[index];
            }
        }
        let Some(lost_layer) = lowest_lost else {
            return false;
        };
        self.discont = true;
        if lost_layer == 0 && !buffered.resume_point() {
            self.mode = Mode::WaitingForKeyframe;
            let keyframe = self
                .buffer
                .iter()
                .find(|(_, buffered)| buffered.resume_point())
                .map(|(&position, _)| position);
            if let Some(keyframe) = keyframe {
                self.resume_at(ctx, now, keyframe);
            }
        } else if lost_layer > 0 {
            self.level = self.level.min(lost_layer - 1);
        }
        self.release_ready(ctx);
        true
    }

    /// Drops the earliest buffered frame (waiting for a keyframe, or nothing playable).
    fn drop_first(&mut self, ctx: &mut Context<'_>) {
        let Some((position, buffered)) = self.buffer.pop_first() else {
            return;
        };
        if self.passed.is_some_and(|passed| position <= passed) {
            ctx.stats.switch_dropped += 1;
            return;
        }
        self.count_skipped(ctx, 1);
        if buffered.temporal > self.level {
            return;
        }
        if let Some(cursor) = self.cursor.as_mut() {
            let played = self.level as usize + 1;
            for (slot, &count) in cursor.iter_mut().zip(&buffered.counts).take(played) {
                ctx.stats.frames_lost = ctx
                    .stats
                    .frames_lost
                    .saturating_add(count.saturating_sub(*slot));
                *slot = (*slot).max(count);
            }
            let own = &mut cursor[buffered.temporal as usize];
            *own = own.saturating_add(1);
            self.passed = Some(position);
        }
    }

    /// When the gap before the first playable buffered frame is given up.
    fn give_up_at(&self, config: &PlayoutConfig, clock: &StreamClock) -> Option<Instant> {
        if self.mode != Mode::Playing {
            return None;
        }
        let first = &self.buffer[&self.first_eligible()?];
        let earliest_arrival = self
            .buffer
            .values()
            .filter(|buffered| self.eligible(buffered))
            .map(|buffered| buffered.arrival)
            .min()?;
        let by_arrival = config
            .gap_wait
            .map(|wait| earliest_arrival + config.jitter_tolerance.max(wait));
        let by_deadline = deadline(config, clock, &first.frame).map(|deadline| {
            deadline
                .checked_sub(GAP_DEADLINE_MARGIN)
                .unwrap_or(deadline)
        });
        Some(match (by_deadline, by_arrival) {
            (Some(deadline), Some(arrival)) => deadline.min(arrival),
            (Some(at), None) | (None, Some(at)) => at,
            (None, None) => earliest_arrival + config.latency.max(config.jitter_tolerance),
        })
    }

    /// Enforces the buffer limit and gives up gaps whose time has come.
    fn service(&mut self, ctx: &mut Context<'_>, now: Instant) {
        let limit = ctx.config.buffer_size.max(1);
        while self.buffer.len() > limit {
            let progressed = self.mode == Mode::Playing && self.give_up_gap(ctx, now);
            if !progressed {
                self.drop_first(ctx);
            }
        }
        while self
            .give_up_at(ctx.config, ctx.clock)
            .is_some_and(|at| at <= now)
        {
            if !self.give_up_gap(ctx, now) {
                // Nothing was missing after all: cannot happen with a consistent cursor;
                // never spin on it.
                self.drop_first(ctx);
            }
        }
    }

    /// Whether every sequence of temporal layer `temporal` below `end` was released or
    /// given up.
    fn is_complete(&self, temporal: u32, end: u64) -> bool {
        if self.mode == Mode::Finished || temporal > self.target {
            return true;
        }
        self.cursor
            .as_ref()
            .and_then(|cursor| cursor.get(temporal as usize))
            .map_or(end == 0, |&passed| passed >= end)
    }

    /// Releases what can still be released, gives up the rest up to the per-temporal-layer
    /// `ends`, and refuses anything that comes later.
    fn finish(&mut self, ctx: &mut Context<'_>, now: Instant, ends: &[(u32, u64)]) {
        while !self.buffer.is_empty() {
            let progressed = self.mode == Mode::Playing && self.give_up_gap(ctx, now);
            if !progressed {
                self.drop_first(ctx);
            }
        }
        if let Some(cursor) = self.cursor.as_mut() {
            for &(temporal, end) in ends {
                if temporal <= self.level
                    && let Some(passed) = cursor.get_mut(temporal as usize)
                    && *passed < end
                {
                    // `end` comes from the wire: a huge one must not overflow the count.
                    ctx.stats.frames_lost = ctx.stats.frames_lost.saturating_add(end - *passed);
                    *passed = end;
                }
            }
        }
        self.mode = Mode::Finished;
    }

    fn drop_all(&mut self, ctx: &mut Context<'_>) {
        ctx.stats.switch_dropped += self.buffer.len() as u64;
        self.buffer.clear();
    }
}

/// The playout state of one track: the spatial layer played, and the one being switched
/// to until its first keyframe.
struct TrackPlayout {
    layers: Vec<LayerPosition>,
    current: GroupPlayout,
    /// The selected spatial layer while it waits for a keyframe; the current one keeps
    /// playing meanwhile.
    switching: Option<GroupPlayout>,
    finished: bool,
    last_spatial: Option<u32>,
    last_timeline_local: Option<Instant>,
    last_timeline_stream: Option<Duration>,
    last_duration: Option<Duration>,
    /// The clock generation this track's last frame was mapped with.
    clock_generation: u64,
}

impl TrackPlayout {
    fn new(layers: Vec<LayerPosition>) -> Self {
        let mut track = Self {
            layers: Vec::new(),
            current: GroupPlayout::new(0, 1, 0),
            switching: None,
            finished: false,
            last_spatial: None,
            last_timeline_local: None,
            last_timeline_stream: None,
            last_duration: None,
            clock_generation: 0,
        };
        track.set_layers(layers);
        track
    }

    fn group_size(&self, spatial: u32) -> u32 {
        self.layers.iter().filter(|l| l.spatial == spatial).count() as u32
    }

    fn position(&self, layer: u32) -> Option<LayerPosition> {
        self.layers.iter().copied().find(|l| l.id == layer)
    }

    fn position_of(&self, spatial: u32, temporal: u32) -> Option<LayerPosition> {
        self.layers
            .iter()
            .copied()
            .find(|l| l.spatial == spatial && l.temporal == temporal)
    }

    /// Replaces the ladder; starts over at its lowest layer when it changed.
    fn set_layers(&mut self, mut layers: Vec<LayerPosition>) {
        if layers.is_empty() {
            layers.push(LayerPosition::BASE);
        }
        layers.sort();
        if layers == self.layers {
            return;
        }
        self.layers = layers;
        let lowest = self.layers[0];
        let mut group = GroupPlayout::new(lowest.spatial, self.group_size(lowest.spatial), 0);
        if self.finished {
            group.mode = Mode::Finished;
        }
        self.current = group;
        self.switching = None;
    }

    /// The selected layer: the target of the switch under way, or of the current group.
    fn selected(&self) -> Option<LayerPosition> {
        let group = self.switching.as_ref().unwrap_or(&self.current);
        self.position_of(group.spatial, group.target)
    }

    /// The layer played now: the highest temporal layer decodable in the current group.
    fn playing(&self) -> Option<LayerPosition> {
        self.current.cursor.as_ref()?;
        self.position_of(self.current.spatial, self.current.level)
    }

    fn select(&mut self, ctx: &mut Context<'_>, now: Instant, layer: u32) -> bool {
        let Some(position) = self.position(layer) else {
            return false;
        };
        if position.spatial == self.current.spatial {
            if let Some(mut switching) = self.switching.take() {
                switching.drop_all(ctx);
            }
            self.current.set_target(ctx, position.temporal);
        } else if let Some(switching) = self
            .switching
            .as_mut()
            .filter(|group| group.spatial == position.spatial)
        {
            switching.set_target(ctx, position.temporal);
        } else {
            let size = self.group_size(position.spatial);
            let mut group = GroupPlayout::new(position.spatial, size, position.temporal);
            if self.finished {
                group.mode = Mode::Finished;
            }
            if let Some(mut old) = self.switching.take() {
                old.drop_all(ctx);
            }
            if self.current.cursor.is_none() {
                // Nothing played yet: nothing to keep playing meanwhile.
                self.current.drop_all(ctx);
                self.current = group;
            } else {
                group.switching = true;
                self.switching = Some(group);
            }
        }
        self.drain(ctx, now);
        true
    }

    fn push(&mut self, ctx: &mut Context<'_>, now: Instant, frame: CompleteFrame) {
        let Some(position) = self.position(frame.layer) else {
            ctx.stats.other_layer += 1;
            return;
        };
        let size = self.group_size(position.spatial);
        let counts = if frame.header.temporal_counts.is_empty() && size == 1 {
            vec![frame.sequence]
        } else {
            frame.header.temporal_counts.clone()
        };
        if counts.len() != size as usize || counts[position.temporal as usize] != frame.sequence {
            ctx.stats.inconsistent += 1;
            return;
        }
        let buffered = Buffered {
            frame,
            arrival: now,
            temporal: position.temporal,
            counts,
        };
        if position.spatial == self.current.spatial {
            self.current.push(ctx, now, buffered);
        } else if let Some(switching) = self
            .switching
            .as_mut()
            .filter(|group| group.spatial == position.spatial)
        {
            switching.push(ctx, now, buffered);
        } else {
            ctx.stats.other_layer += 1;
            return;
        }
        self.drain(ctx, now);
    }

    /// Emits what the groups released; switches to the selected spatial layer once it
    /// released its first keyframe.
    fn drain(&mut self, ctx: &mut Context<'_>, now: Instant) {
        while let Some((frame, discont)) = self.current.ready.pop_front() {
            self.emit(ctx, now, frame, discont);
        }
        if self
            .switching
            .as_ref()
            .is_some_and(|group| !group.ready.is_empty())
        {
            let switching = self.switching.take().expect("checked above");
            let mut old = std::mem::replace(&mut self.current, switching);
            old.drop_all(ctx);
            self.current.switching = false;
            while let Some((frame, discont)) = self.current.ready.pop_front() {
                self.emit(ctx, now, frame, discont);
            }
        }
    }

    fn emit(&mut self, ctx: &mut Context<'_>, now: Instant, frame: CompleteFrame, discont: bool) {
        let header = &frame.header;
        let timeline_stream = timeline_stream_time(header)
            .or_else(|| {
                self.last_timeline_stream
                    .map(|last| last.saturating_add(self.last_duration.unwrap_or_default()))
            })
            .or_else(|| ctx.clock.stream_at(now))
            .unwrap_or_default();
        let mut timeline_local = ctx.clock.local(timeline_stream).unwrap_or(now);
        // Moving the clock earlier must never make a track's output go backwards.
        let mut correction = Duration::ZERO;
        if let Some(last) = self.last_timeline_local
            && timeline_local < last
        {
            correction = last - timeline_local;
            timeline_local = last;
        }
        let pts = header
            .pts_ns
            .map(Duration::from_nanos)
            .and_then(|pts| ctx.clock.local(pts))
            .map_or(timeline_local, |pts| {
                pts.checked_add(correction).unwrap_or(timeline_local)
            });
        self.last_timeline_local = Some(timeline_local);
        self.last_timeline_stream = Some(timeline_stream);
        self.last_duration = header.duration_ns.map(Duration::from_nanos);
        ctx.stats.frames_output += 1;
        let resync = self.clock_generation != ctx.clock.generation;
        self.clock_generation = ctx.clock.generation;
        let spatial = self.current.spatial;
        let layer_switch = self.last_spatial.is_some_and(|last| last != spatial);
        self.last_spatial = Some(spatial);
        ctx.output.push_back(OutputFrame {
            track: frame.track,
            layer: frame.layer,
            sequence: frame.sequence,
            pts,
            dts: header.dts_ns.map(|_| timeline_local),
            // In local time, so buffers stay contiguous however fast the publisher's clock runs.
            duration: header
                .duration_ns
                .map(|ns| ctx.clock.scale(Duration::from_nanos(ns))),
            keyframe: header.keyframe,
            discont,
            resync,
            capture_unix_ns: header.capture_unix_ns,
            stream_pts: header.pts_ns.map(Duration::from_nanos),
            layer_switch,
            data: frame.data,
        });
    }

    fn service(&mut self, ctx: &mut Context<'_>, now: Instant) {
        self.current.service(ctx, now);
        if let Some(switching) = self.switching.as_mut() {
            switching.service(ctx, now);
        }
        self.drain(ctx, now);
    }

    fn give_up_at(&self, config: &PlayoutConfig, clock: &StreamClock) -> Option<Instant> {
        // The group being switched to waits for a keyframe: no timer.
        self.current.give_up_at(config, clock)
    }

    fn buffered(&self) -> usize {
        self.current.buffer.len() + self.switching.as_ref().map_or(0, |g| g.buffer.len())
    }

    fn is_complete(&self, layer: u32, end: u64) -> bool {
        match self.position(layer) {
            Some(position) if position.spatial == self.current.spatial => {
                self.current.is_complete(position.temporal, end)
            }
            _ => true,
        }
    }

    fn finish(&mut self, ctx: &mut Context<'_>, now: Instant, ends: &[TrackEnd]) {
        self.finished = true;
        if let Some(mut switching) = self.switching.take() {
            switching.drop_all(ctx);
        }
        let spatial = self.current.spatial;
        let group_ends: Vec<(u32, u64)> = ends
            .iter()
            .filter_map(|end| {
                let position = self.position(end.layer)?;
                (position.spatial == spatial).then_some((position.temporal, end.next_sequence))
            })
            .collect();
        self.current.finish(ctx, now, &group_ends);
        self.drain(ctx, now);
    }
}

/// See the module documentation.
pub struct Playout {
    config: PlayoutConfig,
    clock: StreamClock,
    tracks: BTreeMap<u32, TrackPlayout>,
    output: VecDeque<OutputFrame>,
    stats: PlayoutStats,
    /// After `finish`: tracks added later are finished too.
    finished: bool,
}

impl Playout {
    pub fn new(config: PlayoutConfig) -> Self {
        Self {
            config,
            clock: StreamClock::default(),
            tracks: BTreeMap::new(),
            output: VecDeque::new(),
            stats: PlayoutStats::default(),
            finished: false,
        }
    }

    /// The tracks, and the rest of the playout as their working context.
    fn split(&mut self) -> (Context<'_>, &mut BTreeMap<u32, TrackPlayout>) {
        let ctx = Context {
            config: &self.config,
            clock: &mut self.clock,
            stats: &mut self.stats,
            output: &mut self.output,
        };
        (ctx, &mut self.tracks)
    }

    pub fn config(&self) -> &PlayoutConfig {
        &self.config
    }

    /// Makes the played tracks exactly `tracks`: new ones start waiting for a keyframe on
    /// a single base layer (see [`Playout::set_track_layers`]), the frames buffered for
    /// removed ones are dropped as skipped.
    pub fn set_tracks(&mut self, tracks: impl IntoIterator<Item = u32>) {
        let wanted: BTreeMap<u32, ()> = tracks.into_iter().map(|id| (id, ())).collect();
        let stats = &mut self.stats;
        self.tracks.retain(|id, track| {
            let keep = wanted.contains_key(id);
            if !keep {
                stats.frames_skipped += track.buffered() as u64;
            }
            keep
        });
        for &id in wanted.keys() {
            self.tracks.entry(id).or_insert_with(|| {
                let mut track = TrackPlayout::new(vec![LayerPosition::BASE]);
                if self.finished {
                    track.finished = true;
                    track.current.mode = Mode::Finished;
                }
                track
            });
        }
    }

    /// Sets a track's layer ladder (from the catalog; empty means one base layer). When
    /// it changed, the track starts over waiting for a keyframe of its lowest layer.
    pub fn set_track_layers(&mut self, track: u32, layers: Vec<LayerPosition>) {
        if let Some(track) = self.tracks.get_mut(&track) {
            track.set_layers(layers);
        }
    }

    /// Selects the layer a track plays: for another temporal layer of the spatial layer
    /// played, lower at once and higher from the next sync frame of each layer up; for
    /// another spatial layer, from its first keyframe (the current one plays until then).
    /// Gaps and frames dropped by the switch are not counted as lost. Returns false for
    /// an unknown track or layer.
    pub fn select(&mut self, now: Instant, track: u32, layer: u32) -> bool {
        let (mut ctx, tracks) = self.split();
        tracks
            .get_mut(&track)
            .is_some_and(|track| track.select(&mut ctx, now, layer))
    }

    /// The layer a track is set to play (see [`Playout::select`]).
    pub fn selected_layer(&self, track: u32) -> Option<LayerPosition> {
        self.tracks.get(&track)?.selected()
    }

    /// The highest layer a track decodes now; `None` before its first keyframe.
    pub fn playing_layer(&self, track: u32) -> Option<LayerPosition> {
        self.tracks.get(&track)?.playing()
    }

    /// A track's layer ladder.
    pub fn track_layers(&self, track: u32) -> Option<&[LayerPosition]> {
        self.tracks.get(&track).map(|track| track.layers.as_slice())
    }

    /// Whether a track waits for a keyframe of its current or selected spatial layer.
    pub fn awaiting_keyframe(&self, track: u32) -> bool {
        self.tracks.get(&track).is_some_and(|track| {
            track.current.mode == Mode::WaitingForKeyframe || track.switching.is_some()
        })
    }

    /// The viewer stalled (a frozen or starved process) and runs again at `resumed`: the
    /// backlog it now drains arrives late through no fault of the path. Arrivals until
    /// `until`, and frames whose local time is before `resumed` (captured while it was
    /// stalled), neither move the clock later nor earlier. Without this, a backlog drained
    /// over more than half a second moved the clock later by seconds, and latency took
    /// minutes to come back down.
    pub fn ignore_stall(&mut self, resumed: Instant, until: Instant) {
        let until = self.clock.ignore.map_or(until, |(_, u)| u.max(until));
        self.clock.ignore = Some((resumed, until));
        self.clock.late_run = None;
        self.clock.window = None;
    }

    /// When a frame must reach the sink; `None` before the clock started.
    pub fn deadline(&self, frame: &CompleteFrame) -> Option<Instant> {
        deadline(&self.config, &self.clock, frame)
    }

    /// Takes a frame that just completed.
    pub fn push(&mut self, now: Instant, frame: CompleteFrame) {
        let (mut ctx, tracks) = self.split();
        let Some(track) = tracks.get_mut(&frame.track) else {
            ctx.stats.unknown_track += 1;
            return;
        };
        track.push(&mut ctx, now, frame);
        // The frame may have moved the shared clock: every track's timers are affected.
        for track in tracks.values_mut() {
            track.service(&mut ctx, now);
        }
    }

    /// Gives up the gaps whose time has come.
    pub fn handle_timeout(&mut self, now: Instant) {
        let (mut ctx, tracks) = self.split();
        for track in tracks.values_mut() {
            track.service(&mut ctx, now);
        }
    }

    /// When the earliest gap will be given up.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.tracks
            .values()
            .filter_map(|track| track.give_up_at(&self.config, &self.clock))
            .min()
    }

    pub fn poll_output(&mut self) -> Option<OutputFrame> {
        self.output.pop_front()
    }

    pub fn stats(&self) -> PlayoutStats {
        PlayoutStats {
            buffered_frames: self.buffered_frames() as u64,
            clock_drift_ppm: self.clock.drift.drift_ppm().round() as i64,
            ..self.stats.clone()
        }
    }

    /// Frames buffered now, all tracks.
    pub fn buffered_frames(&self) -> usize {
        self.tracks.values().map(TrackPlayout::buffered).sum()
    }

    /// Frames buffered now for one track.
    pub fn track_buffered_frames(&self, track: u32) -> usize {
        self.tracks.get(&track).map_or(0, TrackPlayout::buffered)
    }

    /// Whether every listed track and layer released or gave up all sequences below its
    /// `next_sequence`. Unknown tracks and layers not played are ignored.
    pub fn is_complete(&self, ends: &[TrackEnd]) -> bool {
        ends.iter().all(|end| {
            self.tracks
                .get(&end.track)
                .is_none_or(|track| track.is_complete(end.layer, end.next_sequence))
        })
    }

    /// Ends every track: releases what can be released, counts the rest up to the listed
    /// `next_sequence` as lost, and refuses later frames as late.
    pub fn finish(&mut self, now: Instant, ends: &[TrackEnd]) {
        self.finished = true;
        let (mut ctx, tracks) = self.split();
        for (&id, track) in tracks.iter_mut() {
            let track_ends: Vec<TrackEnd> =
                ends.iter().filter(|end| end.track == id).copied().collect();
            track.finish(&mut ctx, now, &track_ends);
        }
    }

    /// Forgets all tracks, buffered frames and the clock (a new publisher epoch);
    /// statistics are kept.
    pub fn reset(&mut self) {
        self.clock = StreamClock::default();
        self.tracks.clear();
        self.output.clear();
        self.finished = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const MS: Duration = Duration::from_millis(1);
    const VIDEO: u32 = 0;
    const AUDIO: u32 = 1;

    fn frame(track: u32, sequence: u64, pts: Duration, keyframe: bool) -> CompleteFrame {
        CompleteFrame {
            track,
            layer: 0,
            sequence,
            header: FrameHeader {
                pts_ns: Some(pts.as_nanos() as u64),
                dts_ns: None,
                duration_ns: None,
                keyframe,
                capture_unix_ns: 0,
                frame_size: 1,
                ..FrameHeader::default()
            },
            data: Bytes::from(vec![sequence as u8]),
            first_arrival: Instant::now(),
        }
    }

    /// Video at 25 fps with a keyframe every `gop` frames.
    fn video(sequence: u64, gop: u64) -> CompleteFrame {
        frame(
            VIDEO,
            sequence,
            MS * 40 * sequence as u32,
            sequence.is_multiple_of(gop),
        )
    }

    fn playout(config: PlayoutConfig) -> Playout {
        let mut playout = Playout::new(config);
        playout.set_tracks([VIDEO, AUDIO]);
        playout
    }

    /// Delivers frames at the given times, servicing timers in between and afterwards as
    /// the element would; returns every output frame.
    fn run(playout: &mut Playout, arrivals: Vec<(Instant, CompleteFrame)>) -> Vec<OutputFrame> {
        let mut output = Vec::new();
        for (at, frame) in arrivals {
            while let Some(due) = playout.poll_timeout().filter(|&due| due <= at) {
                playout.handle_timeout(due);
            }
            playout.push(at, frame);
            output.extend(std::iter::from_fn(|| playout.poll_output()));
        }
        while let Some(due) = playout.poll_timeout() {
            playout.handle_timeout(due);
        }
        output.extend(std::iter::from_fn(|| playout.poll_output()));
        output
    }

    fn sequences(output: &[OutputFrame], track: u32) -> Vec<u64> {
        output
            .iter()
            .filter(|frame| frame.track == track)
            .map(|frame| frame.sequence)
            .collect()
    }

    /// Frames arriving on their timeline position, `arrival(sequence)` after t0.
    fn on_time(
        t0: Instant,
        frames: impl IntoIterator<Item = CompleteFrame>,
    ) -> Vec<(Instant, CompleteFrame)> {
        frames
            .into_iter()
            .map(|frame| {
                (
                    t0 + Duration::from_nanos(frame.header.pts_ns.unwrap()),
                    frame,
                )
            })
            .collect()
    }

    #[test]
    fn in_order_frames_are_released_at_once() {
        let t0 = Instant::now();
        let mut playout = playout(PlayoutConfig::default());
        for sequence in 0..5 {
            let now = t0 + MS * 40 * sequence as u32;
            playout.push(now, video(sequence, 100));
            let out = playout.poll_output().expect("released immediately");
            assert_eq!(out.sequence, sequence);
            assert_eq!(out.pts, now);
            assert_eq!(out.discont, sequence == 0);
            assert!(playout.poll_output().is_none());
            assert_eq!(playout.poll_timeout(), None);
        }
        assert_eq!(playout.stats().frames_output, 5);
    }

    #[test]
    fn a_gap_waits_until_shortly_before_the_next_frame_is_due() {
        let t0 = Instant::now();
        let mut playout = playout(PlayoutConfig::default());
        playout.push(t0, video(0, 100));
        playout.push(t0 + MS * 80, video(2, 100));
        // Frame 2 (stream time 80 ms) is due at 80 + 300 ms: the gap before it waits until
        // 5 ms before that, not a fixed time after 2 arrived.
        assert_eq!(playout.poll_timeout(), Some(t0 + MS * 375));
        // 1 comes 220 ms after 2 (a repair that needed a few pulls): still in time. With
        // the former fixed 200 ms gap wait it was given up at 280 ms, and 2 with it.
        playout.handle_timeout(t0 + MS * 300);
        playout.push(t0 + MS * 300, video(1, 100));
        let output = run(&mut playout, vec![]);
        assert_eq!(sequences(&output, VIDEO), [0, 1, 2]);
        assert!(output.iter().skip(1).all(|frame| !frame.discont));
        let stats = playout.stats();
        assert_eq!((stats.frames_lost, stats.frames_skipped), (0, 0));
        assert_eq!(playout.poll_timeout(), None);
    }

    #[test]
    fn a_set_gap_wait_gives_up_earlier() {
        let t0 = Instant::now();
        let mut playout = playout(PlayoutConfig {
            gap_wait: Some(MS * 200),
            ..PlayoutConfig::default()
        });
        playout.push(t0, video(0, 100));
        playout.push(t0 + MS * 80, video(2, 100));
        // At most the gap wait (200 ms) after 2 arrived.
        assert_eq!(playout.poll_timeout(), Some(t0 + MS * 280));
        playout.handle_timeout(t0 + MS * 280);
        playout.push(t0 + MS * 300, video(1, 100));
        let output = run(&mut playout, vec![]);
        assert_eq!(sequences(&output, VIDEO), [0]);
        assert_eq!(playout.stats().frames_lost, 1);
    }

    #[test]
    fn gap_is_given_up_before_the_next_frame_is_due() {
        let t0 = Instant::now();
        // A gap wait longer than the latency: the deadline decides.
        let mut playout = playout(PlayoutConfig {
            gap_wait: Some(Duration::from_secs(5)),
            ..PlayoutConfig::default()
        });
        playout.push(t0, video(0, 1));
        playout.push(t0 + MS * 80, video(2, 1));
        let due = t0 + MS * 80 + MS * 300 - GAP_DEADLINE_MARGIN;
        assert_eq!(playout.poll_timeout(), Some(due));
        playout.handle_timeout(due);
        let output: Vec<_> = std::iter::from_fn(|| playout.poll_output()).collect();
        assert_eq!(sequences(&output, VIDEO), [0, 2]);
        assert!(output[1].discont);
        assert_eq!(playout.stats().frames_lost, 1);
    }

    #[test]
    fn permanent_loss_skips_to_the_next_keyframe_and_keeps_flowing() {
        let t0 = Instant::now();
        let mut playout = playout(PlayoutConfig::default());
        let frames = (0..40)
            .filter(|&sequence| sequence != 7)
            .map(|sequence| video(sequence, 10));
        let output = run(&mut playout, on_time(t0, frames));
        let expected: Vec<u64> = (0..7).chain(10..40).collect();
        assert_eq!(sequences(&output, VIDEO), expected);
        let resumed = output.iter().find(|frame| frame.sequence == 10).unwrap();
        assert!(resumed.discont && resumed.keyframe);
        // 8 arrived at 320 ms: 7 was given up at 380 ms, well before 10 arrived.
        let stats = playout.stats();
        assert_eq!((stats.frames_lost, stats.frames_skipped), (1, 2));
        assert_eq!(stats.buffered_frames, 0);
        assert!(output.windows(2).all(|pair| pair[0].pts <= pair[1].pts));
    }

    #[test]
    fn a_full_buffer_gives_up_the_gap_at_once() {
        let t0 = Instant::now();
        let mut playout = playout(PlayoutConfig {
            buffer_size: 4,
            ..PlayoutConfig::default()
        });
        playout.push(t0, video(0, 1));
        // A burst after a loss: five frames arrive together, one more than the buffer holds.
        for sequence in 2..7 {
            playout.push(t0 + MS * 10, video(sequence, 1));
            assert!(playout.buffered_frames() <= 4);
        }
        let output: Vec<_> = std::iter::from_fn(|| playout.poll_output()).collect();
        assert_eq!(sequences(&output, VIDEO), [0, 2, 3, 4, 5, 6]);
        assert_eq!(playout.stats().frames_lost, 1);
    }

    #[test]
    fn late_join_starts_at_a_keyframe() {
        let t0 = Instant::now();
        let mut playout = playout(PlayoutConfig::default());
        // Joined mid-GOP: 13 and 14 cannot be decoded; 16 completes before keyframe 15.
        let arrivals = vec![
            (t0, video(13, 5)),
            (t0 + MS * 40, video(14, 5)),
            (t0 + MS * 75, video(16, 5)),
            (t0 + MS * 90, video(15, 5)),
            (t0 + MS * 120, video(17, 5)),
        ];
        let output = run(&mut playout, arrivals);
        assert_eq!(sequences(&output, VIDEO), [15, 16, 17]);
        assert!(output[0].keyframe && output[0].discont);
        assert!(!output[1].discont && !output[2].discont);
        let stats = playout.stats();
        assert_eq!((stats.frames_skipped, stats.frames_lost), (2, 0));
        // The clock starts at the first released frame.
        assert_eq!(output[0].pts, t0 + MS * 90);
        assert_eq!(output[1].pts, t0 + MS * 130);
    }

    #[test]
    fn frames_after_their_sequence_was_passed_are_late() {
        let t0 = Instant::now();
        let mut playout = playout(PlayoutConfig::default());
        let frames = (0..6)
            .filter(|&sequence| sequence != 2)
            .map(|sequence| video(sequence, 1));
        let mut output = run(&mut playout, on_time(t0, frames));
        playout.push(t0 + Duration::from_secs(1), video(2, 1));
        playout.push(t0 + Duration::from_secs(1), video(4, 1));
        playout.push(t0 + Duration::from_secs(1), video(6, 1));
        playout.push(t0 + Duration::from_secs(1), video(6, 1));
        output.extend(std::iter::from_fn(|| playout.poll_output()));
        assert_eq!(sequences(&output, VIDEO), [0, 1, 3, 4, 5, 6]);
        // 2 and 4 were passed, and so was 6 once released.
        let stats = playout.stats();
        assert_eq!(
            (stats.frames_late, stats.frames_lost, stats.duplicates),
            (3, 1, 0)
        );
        // A duplicate while still buffered (behind a missing frame).
        let mut playout = self::playout(PlayoutConfig::default());
        let _ = run(
            &mut playout,
            on_time(t0, (0..2).map(|sequence| video(sequence, 1))),
        );
        playout.push(t0 + MS * 130, video(3, 1));
        playout.push(t0 + MS * 130, video(3, 1));
        assert_eq!(playout.stats().duplicates, 1);
    }

    #[test]
    fn a_slower_path_rebases_the_clock_once_and_latency_creeps_back() {
        let t0 = Instant::now();
        let config = PlayoutConfig::default();
        let mut playout = playout(config.clone());
        // Frames 0..10 on time, then for three seconds (frames 10..85) the path is one second
        // slower, then frames are on time again for two minutes.
        let arrivals: Vec<_> = (0..3000u64)
            .map(|sequence| {
                let sent = t0 + MS * 40 * sequence as u32;
                let arrival = if (10..85).contains(&sequence) {
                    sent + Duration::from_secs(1)
                } else {
                    sent
                };
                (arrival, video(sequence, 50))
            })
            .collect();
        let arrival_of: Vec<Instant> = arrivals.iter().map(|(at, _)| *at).collect();
        let output = run(&mut playout, arrivals);
        assert_eq!(output.len(), 3000, "nothing is lost");
        assert_eq!(playout.stats().rebases, 1);
        assert!(output.windows(2).all(|pair| pair[0].pts <= pair[1].pts));
        // Every move of the clock (the rebase and each step back) is flagged, so decoders
        // resync to the new timeline instead of smoothing the jump over.
        let offset = |frame: &OutputFrame| {
            (frame.pts - t0).as_nanos() as i128 - frame.stream_pts.unwrap().as_nanos() as i128
        };
        // (Following the publisher's clock rate moves it by well under 1 ms per frame, smoothly.)
        let moves = output
            .windows(2)
            .filter(|pair| (offset(&pair[0]) - offset(&pair[1])).abs() > 1_000_000)
            .inspect(|pair| assert!(pair[1].resync, "unflagged jump at {}", pair[1].sequence))
            .count();
        assert!(moves > 1, "the clock moved {moves} times");
        // Once late for a whole window (half a second: frames 10..23), the clock moves and
        // every later frame reaches the sink before it is due.
        for frame in &output[23..] {
            assert!(frame.pts + config.latency >= arrival_of[frame.sequence as usize]);
        }
        // Every frame of the run was 700 ms past its deadline: the clock moved 760 ms (that
        // lateness plus the tolerance as headroom).
        let lead = |frame: &OutputFrame| frame.pts - (t0 + MS * 40 * frame.sequence as u32);
        let after_rebase = lead(&output[84]);
        assert_eq!(after_rebase, Duration::from_millis(760));
        // Excess delay is shed, at most 1% of the time elapsed since the path recovered.
        let end = lead(&output[2999]);
        let shed = after_rebase - end;
        let elapsed = arrival_of[2999] - arrival_of[85];
        assert!(shed > Duration::from_millis(400), "shed only {shed:?}");
        assert!(shed <= elapsed / 100, "shed {shed:?} in {elapsed:?}");
        // Stops once frames are no longer well ahead, and never makes them late.
        assert!(end <= config.jitter_tolerance, "still {end:?} ahead");
    }

    #[test]
    fn a_stall_does_not_raise_latency_for_good() {
        let t0 = Instant::now();
        let config = PlayoutConfig::default();
        let mut playout = playout(config.clone());
        // A one second stall: frames 10..36 arrive together when it ends, then on time.
        let stall_end = t0 + MS * 400 + Duration::from_secs(1);
        let arrivals: Vec<_> = (0..200u64)
            .map(|sequence| {
                let sent = t0 + MS * 40 * sequence as u32;
                let arrival = if (10..36).contains(&sequence) {
                    sent.max(stall_end)
                } else {
                    sent
                };
                (arrival, video(sequence, 50))
            })
            .collect();
        let output = run(&mut playout, arrivals);
        assert_eq!(
            output.len(),
            200,
            "late frames are still handed on, in order"
        );
        assert_eq!(playout.stats().rebases, 0);
        // After the burst every frame plays with the latency it had before the stall.
        let delay = |frame: &OutputFrame| {
            frame.pts + config.latency - (t0 + MS * 40 * frame.sequence as u32)
        };
        assert_eq!(delay(&output[199]), delay(&output[0]));
    }

    #[test]
    fn output_never_goes_backwards_when_the_clock_moves_earlier() {
        let t0 = Instant::now();
        let mut playout = playout(PlayoutConfig::default());
        // 5 ms audio frames: the clock moving earlier by 20 ms would reorder them.
        let late_start = Duration::from_secs(2);
        let arrivals: Vec<_> = (0..4000u64)
            .map(|sequence| {
                let sent = t0 + MS * 5 * sequence as u32;
                let arrival = if sequence < 10 {
                    sent + late_start
                } else {
                    sent
                };
                (
                    arrival.max(t0 + late_start),
                    frame(AUDIO, sequence, MS * 5 * sequence as u32, true),
                )
            })
            .collect();
        let output = run(&mut playout, arrivals);
        assert_eq!(output.len(), 4000);
        assert!(output.windows(2).all(|pair| pair[0].pts <= pair[1].pts));
        // The clock did move earlier: later frames are less delayed than the first.
        let first = output[0].pts - (t0 + late_start);
        let last = output[3999].pts - (t0 + MS * 5 * 3999);
        assert!(last + Duration::from_millis(100) < first + late_start);
    }

    #[test]
    fn audio_and_video_share_one_timeline() {
        let t0 = Instant::now();
        let mut playout = playout(PlayoutConfig::default());
        // Audio every 20 ms arrives 3 ms after capture, video every 40 ms 25 ms after.
        let mut arrivals = Vec::new();
        for sequence in 0..50u64 {
            let pts = MS * 20 * sequence as u32 + Duration::from_secs(10);
            arrivals.push((t0 + pts + MS * 3, frame(AUDIO, sequence, pts, true)));
        }
        for sequence in 0..25u64 {
            let pts = MS * 40 * sequence as u32 + Duration::from_secs(10);
            arrivals.push((
                t0 + pts + MS * 25,
                frame(VIDEO, sequence, pts, sequence == 0),
            ));
        }
        arrivals.sort_by_key(|(at, _)| *at);
        let output = run(&mut playout, arrivals);
        assert_eq!(sequences(&output, AUDIO).len(), 50);
        assert_eq!(sequences(&output, VIDEO).len(), 25);
        let reference = &output[0];
        for frame in &output {
            let stream_delta = frame.stream_pts.unwrap() - reference.stream_pts.unwrap();
            assert_eq!(frame.pts - reference.pts, stream_delta, "{frame:?}");
        }
    }

    #[test]
    fn decode_order_drives_the_timeline_with_reordered_presentation() {
        let t0 = Instant::now();
        let mut playout = playout(PlayoutConfig::default());
        // I P B B: decode times 0, 40, 80, 120; presentation 40, 160, 80, 120.
        let presentation = [40u64, 160, 80, 120];
        let arrivals: Vec<_> = presentation
            .iter()
            .enumerate()
            .map(|(sequence, &pts)| {
                let mut frame = frame(VIDEO, sequence as u64, MS * pts as u32, sequence == 0);
                frame.header.dts_ns = Some(40_000_000 * sequence as u64);
                (t0 + MS * 40 * sequence as u32, frame)
            })
            .collect();
        let output = run(&mut playout, arrivals);
        assert_eq!(output.len(), 4);
        for (sequence, frame) in output.iter().enumerate() {
            assert_eq!(frame.dts, Some(t0 + MS * 40 * sequence as u32));
            assert_eq!(frame.pts, t0 + MS * presentation[sequence] as u32);
        }
    }

    #[test]
    fn frames_without_timestamps_follow_the_previous_duration() {
        let t0 = Instant::now();
        let mut playout = playout(PlayoutConfig::default());
        let mut first = frame(AUDIO, 0, Duration::ZERO, true);
        first.header.duration_ns = Some(20_000_000);
        let mut second = frame(AUDIO, 1, Duration::ZERO, true);
        second.header.pts_ns = None;
        let output = run(&mut playout, vec![(t0, first), (t0 + MS * 21, second)]);
        assert_eq!(output[1].pts, t0 + MS * 20);
        assert_eq!(output[1].stream_pts, None);
    }

    #[test]
    fn finish_flushes_and_counts_the_missing_tail() {
        let t0 = Instant::now();
        let mut playout = playout(PlayoutConfig::default());
        let mut output = run(
            &mut playout,
            on_time(t0, (0..5).map(|sequence| video(sequence, 1))),
        );
        let ends = [TrackEnd {
            track: VIDEO,
            layer: 0,
            next_sequence: 8,
        }];
        assert!(!playout.is_complete(&ends));
        assert!(playout.is_complete(&[TrackEnd {
            next_sequence: 5,
            ..ends[0]
        }]));
        // Frame 6 is buffered behind the missing 5; 7 never comes.
        playout.push(t0 + MS * 240, video(6, 1));
        playout.finish(t0 + MS * 250, &ends);
        output.extend(std::iter::from_fn(|| playout.poll_output()));
        assert_eq!(sequences(&output, VIDEO), [0, 1, 2, 3, 4, 6]);
        assert!(playout.is_complete(&ends));
        assert_eq!(playout.stats().frames_lost, 2);
        playout.push(t0 + MS * 260, video(7, 1));
        assert_eq!(playout.stats().frames_late, 1);
        assert_eq!(playout.poll_timeout(), None);
    }

    #[test]
    fn other_layers_and_unknown_tracks_are_refused() {
        let t0 = Instant::now();
        let mut playout = playout(PlayoutConfig::default());
        playout.push(t0, video(0, 1));
        let mut other = video(1, 1);
        other.layer = 1;
        playout.push(t0, other);
        playout.push(t0, frame(9, 0, Duration::ZERO, true));
        let stats = playout.stats();
        assert_eq!(
            (stats.other_layer, stats.unknown_track, stats.frames_output),
            (1, 1, 1)
        );
        playout.set_tracks([AUDIO]);
        playout.push(t0, video(1, 1));
        assert_eq!(playout.stats().unknown_track, 2);
    }

    // ---- layered playout ------------------------------------------------------------------

    /// The 1/4, 1/2, 1 temporal pattern of vp8enc's three-layer mode.
    const PATTERN: [u32; 4] = [0, 2, 1, 2];

    struct Layered {
        spatial: u32,
        /// Temporal layers of each spatial layer; layer id = spatial * temporal + t.
        temporal: u32,
        frames: u64,
        gop: u64,
        /// Frames of layers above 0 are sync points in the first pattern period after
        /// every multiple of this.
        sync_every: u64,
    }

    impl Layered {
        fn temporal_of(&self, index: u64) -> u32 {
            let pattern: Vec<u32> = PATTERN.iter().map(|&t| t.min(self.temporal - 1)).collect();
            pattern[(index % 4) as usize]
        }

        fn ladder(&self) -> Vec<LayerPosition> {
            (0..self.spatial)
                .flat_map(|spatial| {
                    (0..self.temporal).map(move |temporal| LayerPosition {
                        id: spatial * self.temporal + temporal,
                        spatial,
                        temporal,
                    })
                })
                .collect()
        }

        /// Every frame of every layer, in publishing order.
        fn frames(&self) -> Vec<CompleteFrame> {
            let mut out = Vec::new();
            let mut counts = vec![vec![0u64; self.temporal as usize]; self.spatial as usize];
            for index in 0..self.frames {
                let temporal = self.temporal_of(index);
                for spatial in 0..self.spatial {
                    let group = &mut counts[spatial as usize];
                    let sequence = group[temporal as usize];
                    let keyframe = index.is_multiple_of(self.gop);
                    out.push(CompleteFrame {
                        track: VIDEO,
                        layer: spatial * self.temporal + temporal,
                        sequence,
                        header: FrameHeader {
                            pts_ns: Some(40_000_000 * index),
                            keyframe,
                            temporal_sync: temporal > 0 && index % self.sync_every < 4,
                            temporal_counts: if self.temporal > 1 {
                                group.clone()
                            } else {
                                vec![]
                            },
                            frame_size: 1,
                            ..FrameHeader::default()
                        },
                        data: Bytes::from(index.to_be_bytes().to_vec()),
                        first_arrival: Instant::now(),
                    });
                    group[temporal as usize] += 1;
                }
            }
            out
        }
    }

    fn layered_playout(shape: &Layered) -> Playout {
        let mut playout = Playout::new(PlayoutConfig::default());
        playout.set_tracks([VIDEO]);
        playout.set_track_layers(VIDEO, shape.ladder());
        playout
    }

    fn index_of(frame: &OutputFrame) -> u64 {
        u64::from_be_bytes(frame.data[..8].try_into().unwrap())
    }

    /// Checks that a decoder could decode every output frame: a keyframe starts a spatial
    /// layer; a delta frame of temporal layer t references the latest frame of every layer
    /// 0..=t before it (0..t for a sync frame) since the last keyframe, and each of those
    /// must have been output before it, from the same spatial layer.
    fn assert_decodable(shape: &Layered, output: &[OutputFrame]) {
        let mut decoded: HashSet<(u32, u64)> = HashSet::new();
        let mut spatial_played: Option<u32> = None;
        let mut last_index: Option<u64> = None;
        for frame in output {
            let spatial = frame.layer / shape.temporal;
            let temporal = frame.layer % shape.temporal;
            let index = index_of(frame);
            if spatial_played != Some(spatial) {
                assert!(
                    frame.keyframe,
                    "spatial layer entered at a delta frame {index}"
                );
                assert_eq!(frame.layer_switch, spatial_played.is_some());
                spatial_played = Some(spatial);
                decoded.clear();
                // A new decode sequence; it may start at the time the old one reached.
                last_index = None;
            } else {
                assert!(!frame.layer_switch);
            }
            assert!(last_index.is_none_or(|last| index > last), "decode order");
            last_index = Some(index);
            if !frame.keyframe {
                let key = index - index % shape.gop;
                let sync = temporal > 0 && index % shape.sync_every < 4;
                let top = if sync { temporal } else { temporal + 1 };
                for layer in 0..top {
                    let reference = (key..index).rev().find(|&i| shape.temporal_of(i) == layer);
                    if let Some(reference) = reference {
                        assert!(
                            decoded.contains(&(spatial, reference)),
                            "frame {index} (T{temporal}) references missing {reference}"
                        );
                    }
                }
                assert!(
                    decoded.contains(&(spatial, key)),
                    "frame {index} without its keyframe"
                );
            }
            decoded.insert((spatial, index));
        }
    }

    /// Frames arrive on time, 40 ms apart, the ones `keep` refuses never.
    fn deliver_layered(
        playout: &mut Playout,
        t0: Instant,
        frames: Vec<CompleteFrame>,
        keep: impl Fn(&CompleteFrame) -> bool,
    ) -> Vec<OutputFrame> {
        let arrivals = frames
            .into_iter()
            .filter(|frame| keep(frame))
            .map(|frame| {
                (
                    t0 + Duration::from_nanos(frame.header.pts_ns.unwrap()),
                    frame,
                )
            })
            .collect();
        run(playout, arrivals)
    }

    #[test]
    fn base_temporal_layer_plays_a_quarter_of_the_frames_without_loss() {
        let t0 = Instant::now();
        let shape = Layered {
            spatial: 1,
            temporal: 3,
            frames: 96,
            gop: 32,
            sync_every: 8,
        };
        // Subscribed to layer 0 only: the other layers never arrive.
        let mut playout = layered_playout(&shape);
        assert_eq!(playout.selected_layer(VIDEO).unwrap().id, 0);
        let output = deliver_layered(&mut playout, t0, shape.frames(), |f| f.layer == 0);
        assert_eq!(output.len(), 24);
        assert!(output.iter().all(|frame| index_of(frame).is_multiple_of(4)));
        assert_decodable(&shape, &output);
        let stats = playout.stats();
        assert_eq!(
            stats.frames_lost + stats.frames_skipped + stats.frames_late,
            0
        );

        // Receiving every layer while playing layer 0 changes nothing but `other_layer`.
        let mut playout = layered_playout(&shape);
        let output = deliver_layered(&mut playout, t0, shape.frames(), |_| true);
        assert_eq!(output.len(), 24);
        let stats = playout.stats();
        assert_eq!(stats.frames_lost + stats.frames_skipped, 0);
        assert_eq!(stats.other_layer, 72);
    }

    #[test]
    fn every_temporal_layer_merges_in_decode_order() {
        let t0 = Instant::now();
        let shape = Layered {
            spatial: 1,
            temporal: 3,
            frames: 64,
            gop: 32,
            sync_every: 8,
        };
        for (layer, share) in [(1, 2), (2, 1)] {
            let mut playout = layered_playout(&shape);
            assert!(playout.select(t0, VIDEO, layer));
            let output = deliver_layered(&mut playout, t0, shape.frames(), |f| f.layer <= layer);
            let indices: Vec<u64> = output.iter().map(index_of).collect();
            let expected: Vec<u64> = (0..64).filter(|i: &u64| i.is_multiple_of(share)).collect();
            assert_eq!(indices, expected);
            assert_decodable(&shape, &output);
            assert_eq!(playout.stats().frames_lost, 0);
            assert_eq!(playout.playing_layer(VIDEO).unwrap().id, layer);
        }
    }

    #[test]
    fn loss_in_a_played_temporal_layer_is_counted_and_resumes_at_sync_frames() {
        let t0 = Instant::now();
        let shape = Layered {
            spatial: 1,
            temporal: 3,
            frames: 64,
            gop: 64,
            sync_every: 16,
        };
        let mut playout = layered_playout(&shape);
        playout.select(t0, VIDEO, 2);
        // Frame 18 (layer 1) is lost: layers 1 and 2 stop until layer 1's next sync frame
        // (34), layer 2 until its next sync after that (33 is before: 35); layer 0 goes on.
        let output = deliver_layered(&mut playout, t0, shape.frames(), |f| {
            !(f.layer == 1 && f.header.pts_ns == Some(40_000_000 * 18))
        });
        assert_decodable(&shape, &output);
        let indices: Vec<u64> = output.iter().map(index_of).collect();
        let expected: Vec<u64> = (0..18)
            .chain((20..34).step_by(4))
            .chain(34..64)
            .filter(|&i| i != 33)
            .collect();
        assert_eq!(indices, expected);
        let stats = playout.stats();
        assert_eq!(stats.frames_lost, 1);
        assert_eq!(stats.frames_late, 0);
        assert_eq!(playout.playing_layer(VIDEO).unwrap().id, 2);
    }

    #[test]
    fn base_layer_loss_waits_for_a_keyframe() {
        let t0 = Instant::now();
        let shape = Layered {
            spatial: 1,
            temporal: 3,
            frames: 64,
            gop: 32,
            sync_every: 8,
        };
        let mut playout = layered_playout(&shape);
        playout.select(t0, VIDEO, 2);
        let output = deliver_layered(&mut playout, t0, shape.frames(), |f| {
            !(f.layer == 0 && f.header.pts_ns == Some(40_000_000 * 8))
        });
        assert_decodable(&shape, &output);
        let indices: Vec<u64> = output.iter().map(index_of).collect();
        assert_eq!(indices, (0..8).chain(32..64).collect::<Vec<_>>());
        let stats = playout.stats();
        assert_eq!(stats.frames_lost, 1);
        // The frames in between arrived but could not be decoded.
        assert_eq!(stats.frames_skipped, 23);
    }

    #[test]
    fn temporal_switches_step_down_at_once_and_up_at_sync_frames() {
        let t0 = Instant::now();
        let shape = Layered {
            spatial: 1,
            temporal: 3,
            frames: 64,
            gop: 64,
            sync_every: 16,
        };
        let mut playout = layered_playout(&shape);
        playout.select(t0, VIDEO, 2);
        let mut output = Vec::new();
        for frame in shape.frames() {
            let index = frame.header.pts_ns.unwrap() / 40_000_000;
            let at = t0 + MS * 40 * index as u32;
            if index == 10 && frame.layer == PATTERN[2] {
                // Before frame 10: down to layer 0 at once.
                assert!(playout.select(at, VIDEO, 0));
                assert_eq!(playout.selected_layer(VIDEO).unwrap().id, 0);
            }
            if index == 20 && frame.layer == 0 {
                // Back up to everything: layer 1 from its sync frame 34 (the next after
                // 20), layer 2 from the first sync frame after that (35).
                assert!(playout.select(at, VIDEO, 2));
            }
            playout.push(at, frame);
            output.extend(std::iter::from_fn(|| playout.poll_output()));
        }
        assert_decodable(&shape, &output);
        let indices: Vec<u64> = output.iter().map(index_of).collect();
        let expected: Vec<u64> = (0..10)
            .chain((12..34).step_by(4))
            .chain(34..64)
            .filter(|&i| i != 33)
            .collect();
        assert_eq!(indices, expected);
        let stats = playout.stats();
        assert_eq!(stats.frames_lost + stats.frames_late, 0, "{stats:?}");
    }

    #[test]
    fn simulcast_switch_waits_for_the_target_keyframe() {
        let t0 = Instant::now();
        let shape = Layered {
            spatial: 2,
            temporal: 1,
            frames: 60,
            gop: 20,
            sync_every: 4,
        };
        let mut playout = layered_playout(&shape);
        let mut output = Vec::new();
        for frame in shape.frames() {
            let index = frame.header.pts_ns.unwrap() / 40_000_000;
            let at = t0 + MS * 40 * index as u32;
            if index == 5 && frame.layer == 0 {
                assert!(playout.select(at, VIDEO, 1));
                assert!(playout.awaiting_keyframe(VIDEO));
                // Still playing layer 0 meanwhile.
                assert_eq!(playout.playing_layer(VIDEO).unwrap().id, 0);
            }
            // A loss in the target layer before its keyframe is not counted.
            if index == 12 && frame.layer == 1 {
                continue;
            }
            playout.push(at, frame);
            output.extend(std::iter::from_fn(|| playout.poll_output()));
        }
        assert_decodable(&shape, &output);
        let layers: Vec<(u64, u32)> = output.iter().map(|f| (index_of(f), f.layer)).collect();
        // Layer 0's keyframe 20 arrived just before layer 1's, so both were output.
        let expected: Vec<(u64, u32)> = (0..=20)
            .map(|i| (i, 0))
            .chain((20..60).map(|i| (i, 1)))
            .collect();
        assert_eq!(layers, expected);
        let switched = &output[21];
        assert!(switched.layer_switch && switched.keyframe && switched.discont);
        assert_eq!(output.iter().filter(|f| f.layer_switch).count(), 1);
        assert!(!playout.awaiting_keyframe(VIDEO));
        let stats = playout.stats();
        assert_eq!(stats.frames_lost + stats.frames_skipped, 0, "{stats:?}");
        assert_eq!(playout.playing_layer(VIDEO).unwrap().id, 1);
    }

    #[test]
    fn inconsistent_temporal_counts_are_refused() {
        let t0 = Instant::now();
        let shape = Layered {
            spatial: 1,
            temporal: 3,
            frames: 8,
            gop: 8,
            sync_every: 8,
        };
        let mut playout = layered_playout(&shape);
        let mut frames = shape.frames();
        frames[0].header.temporal_counts.clear();
        frames[1].header.temporal_counts = vec![0, 0];
        frames[2].header.temporal_counts[1] = 7;
        for frame in frames.into_iter().take(3) {
            playout.push(t0, frame);
        }
        assert_eq!(playout.stats().inconsistent, 3);
        assert!(playout.poll_output().is_none());
    }

    /// Found by the `playout` fuzz target: an end of stream announcing huge next sequences
    /// for several layers overflowed the lost-frame count (a panic in debug builds).
    #[test]
    fn a_huge_end_of_stream_saturates_the_loss_count() {
        let t0 = Instant::now();
        let shape = Layered {
            spatial: 1,
            temporal: 3,
            frames: 1,
            gop: 8,
            sync_every: 8,
        };
        let mut playout = layered_playout(&shape);
        assert!(playout.select(t0, VIDEO, 2));
        for frame in shape.frames() {
            playout.push(t0, frame);
        }
        assert!(playout.poll_output().is_some());
        let ends: Vec<TrackEnd> = (0..3)
            .map(|layer| TrackEnd {
                track: VIDEO,
                layer,
                next_sequence: u64::MAX - 10,
            })
            .collect();
        playout.finish(t0, &ends);
        assert_eq!(playout.stats().frames_lost, u64::MAX);
    }

    proptest::proptest! {
        /// Random loss, reordering and layer selections over two simulcast layers of three
        /// temporal layers: every output frame is decodable, in decode order, a spatial
        /// layer is entered only at its keyframe, and the buffer stays bounded.
        #[test]
        fn layer_switches_never_output_undecodable_frames(
            losses in proptest::collection::vec(proptest::bool::weighted(0.05), 480),
            delays in proptest::collection::vec(0u32..120, 480),
            switches in proptest::collection::vec((0u64..240, 0u32..6), 0..8),
            gop in 1u64..5,
            sync_every in 1u64..5,
            buffer_size in 2usize..40,
        ) {
            let t0 = Instant::now();
            let shape = Layered {
                spatial: 2,
                temporal: 3,
                frames: 240,
                gop: gop * 16,
                sync_every: sync_every * 4,
            };
            let mut playout = Playout::new(PlayoutConfig {
                buffer_size,
                ..PlayoutConfig::default()
            });
            playout.set_tracks([VIDEO]);
            playout.set_track_layers(VIDEO, shape.ladder());
            let mut arrivals: Vec<(Instant, CompleteFrame)> = shape
                .frames()
                .into_iter()
                .enumerate()
                .filter(|(i, _)| !losses[i % losses.len()])
                .map(|(i, frame)| {
                    let sent = t0 + Duration::from_nanos(frame.header.pts_ns.unwrap());
                    (sent + MS * delays[i % delays.len()], frame)
                })
                .collect();
            arrivals.sort_by_key(|(at, _)| *at);
            let mut switches = switches;
            switches.sort();
            let mut output = Vec::new();
            let mut next_switch = 0;
            for (at, frame) in arrivals {
                while let Some(due) = playout.poll_timeout().filter(|&due| due <= at) {
                    playout.handle_timeout(due);
                }
                while next_switch < switches.len()
                    && t0 + MS * 40 * switches[next_switch].0 as u32 <= at
                {
                    playout.select(at, VIDEO, switches[next_switch].1);
                    next_switch += 1;
                }
                playout.push(at, frame);
                proptest::prop_assert!(playout.buffered_frames() <= 2 * buffer_size);
                output.extend(std::iter::from_fn(|| playout.poll_output()));
            }
            while let Some(due) = playout.poll_timeout() {
                playout.handle_timeout(due);
            }
            output.extend(std::iter::from_fn(|| playout.poll_output()));
            assert_decodable(&shape, &output);
            for frame in &output {
                if frame.layer_switch {
                    proptest::prop_assert!(frame.keyframe && frame.discont);
                }
            }
        }
    }

    /// The playout after a [`drifting`] run, its output, each frame's arrival by (track,
    /// sequence), and the estimated drift (ppm) at every arrival past 60 s.
    type Drifting = (
        Playout,
        Vec<OutputFrame>,
        std::collections::HashMap<(u32, u64), Instant>,
        Vec<i64>,
    );

    /// Audio (50 fps, 20 ms frames) and video (25 fps, a keyframe every 2 s) from a publisher
    /// whose clock runs at `publisher_rate` stream seconds per real second, over a path of
    /// 20 ms plus 0–15 ms of queueing, plus `step` (from a real second on, for good).
    fn drifting(publisher_rate: f64, seconds: u64, step: Option<(f64, Duration)>) -> Drifting {
        let t0 = Instant::now();
        let mut frames = Vec::new();
        // Deterministic queueing delay from a small LCG.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut queueing = move || {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) as f64 / (1u64 << 31) as f64 * 0.015
        };
        for (track, period_ms, count) in
            [(VIDEO, 40u64, seconds * 25), (AUDIO, 20u64, seconds * 50)]
        {
            for sequence in 0..count {
                let stream = MS * (period_ms * sequence) as u32;
                let mut frame = frame(
                    track,
                    sequence,
                    stream,
                    track == AUDIO || sequence.is_multiple_of(50),
                );
                frame.header.duration_ns = Some(period_ms * 1_000_000);
                let sent = stream.as_secs_f64() / publisher_rate;
                let extra = step
                    .filter(|(from, _)| sent >= *from)
                    .map_or(0.0, |(_, extra)| extra.as_secs_f64());
                let arrival = t0 + Duration::from_secs_f64(sent + 0.020 + queueing() + extra);
                frames.push((arrival, frame));
            }
        }
        frames.sort_by_key(|(at, frame)| (*at, frame.track));
        let arrivals = frames
            .iter()
            .map(|(at, frame)| ((frame.track, frame.sequence), *at))
            .collect();
        let mut playout = playout(PlayoutConfig::default());
        let mut output = Vec::new();
        let mut estimates = Vec::new();
        for (at, frame) in frames {
            while let Some(due) = playout.poll_timeout().filter(|&due| due <= at) {
                playout.handle_timeout(due);
            }
            playout.push(at, frame);
            output.extend(std::iter::from_fn(|| playout.poll_output()));
            if at >= t0 + Duration::from_secs(60) {
                estimates.push(playout.stats().clock_drift_ppm);
            }
        }
        (playout, output, arrivals, estimates)
    }

    #[test]
    fn playout_follows_a_drifting_publisher_clock_without_rebasing() {
        let config = PlayoutConfig::default();
        for truth_ppm in [-5000i64, 5000, -100, 100] {
            let rate = 1.0 + truth_ppm as f64 / 1e6;
            let (playout, output, arrivals, estimates) = drifting(rate, 600, None);
            assert_eq!(output.len(), 600 * 75, "{truth_ppm} ppm: every frame plays");
            assert_eq!(playout.stats().rebases, 0, "{truth_ppm} ppm");
            assert!(
                output
                    .iter()
                    .all(|frame| !frame.resync && !frame.discont || frame.sequence == 0)
            );
            // Every frame renders `latency` after its arrival, give or take the tolerance.
            for frame in &output {
                let arrival = arrivals[&(frame.track, frame.sequence)];
                let render = frame.pts + config.latency;
                let delay = signed_nanos(render, arrival) - nanos(config.latency);
                assert!(
                    delay.abs() <= nanos(config.jitter_tolerance),
                    "{truth_ppm} ppm: track {} frame {} renders {} ms off",
                    frame.track,
                    frame.sequence,
                    delay / 1_000_000
                );
            }
            // The estimate is right from a minute on.
            let tolerance = (truth_ppm.abs() / 10).max(20);
            for estimate in &estimates {
                assert!(
                    (estimate - truth_ppm).abs() <= tolerance,
                    "truth {truth_ppm} ppm, estimate {estimate} ppm"
                );
            }
            // Audio stays contiguous: no overlap, no gap over half a frame (10 ms).
            let audio: Vec<&OutputFrame> =
                output.iter().filter(|frame| frame.track == AUDIO).collect();
            for pair in audio.windows(2) {
                let end = pair[0].pts + pair[0].duration.unwrap();
                let gap = signed_nanos(pair[1].pts, end);
                assert!(
                    (-1_000..=10_000_000).contains(&gap),
                    "{truth_ppm} ppm: audio {} starts {gap} ns after {} ends",
                    pair[1].sequence,
                    pair[0].sequence
                );
            }
            // Audio and video on one mapping: equal stream times map to equal local times.
            let local_of = |track: u32, stream_ms: u64| {
                output
                    .iter()
                    .find(|f| f.track == track && f.stream_pts == Some(MS * stream_ms as u32))
                    .map(|f| f.pts)
                    .unwrap()
            };
            for stream_ms in [1_000u64, 300_000, 599_000] {
                let skew = signed_nanos(local_of(VIDEO, stream_ms), local_of(AUDIO, stream_ms));
                assert!(
                    skew.abs() < 1_000_000,
                    "A/V apart by {skew} ns at {stream_ms} ms"
                );
            }
        }
    }

    #[test]
    fn a_lasting_path_change_is_one_rebase_not_a_drift() {
        let truth_ppm = -100i64;
        let rate = 1.0 + truth_ppm as f64 / 1e6;
        let (playout, output, _, estimates) =
            drifting(rate, 300, Some((120.0, Duration::from_millis(200))));
        assert_eq!(output.len(), 300 * 75);
        assert_eq!(playout.stats().rebases, 1);
        let last = *estimates.last().unwrap();
        assert!((last - truth_ppm).abs() <= 20, "estimate {last} ppm");
    }
}
