//! Playout: puts complete frames of each track back in sequence order, maps stream time
//! onto the local clock, and decides when a missing frame is given up.
//!
//! Timing: one stream clock is shared by all tracks so they stay in sync. The first frame
//! released (of any track) anchors it: `base = (now, stream time)`, and a frame's local
//! time is `base.local + (stream time - base.stream)`. The element stamps output with that
//! local time and reports `latency`, so the sink renders at local time + latency: that is
//! each frame's deadline. Frames are released as soon as they are in order; the sink
//! waits for their time.
//!
//! A missing frame never stalls a track: it is given up shortly before the next buffered
//! frame is due, or `jitter_tolerance` after a later frame arrived, or when the buffer is
//! full. Playback then resumes at the next keyframe.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

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
    /// How long a gap may wait once a later frame arrived; also how late a frame may be
    /// before the clock is rebased.
    pub jitter_tolerance: Duration,
}

impl Default for PlayoutConfig {
    fn default() -> Self {
        Self {
            latency: Duration::from_millis(300),
            buffer_size: 256,
            jitter_tolerance: Duration::from_millis(60),
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
    /// Frames of a layer other than the one played on their track.
    pub other_layer: u64,
    /// Frames of a track the playout does not know.
    pub unknown_track: u64,
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
#[derive(Default)]
struct StreamClock {
    base: Option<ClockBase>,
    window: Option<DriftWindow>,
    /// The current run of frames later than the tolerance allows, if any.
    late_run: Option<LateRun>,
    /// Bumped whenever the mapping moves, so every track flags its next frame `resync`:
    /// downstream (audio decoders above all) must follow the jump, not smooth it over.
    generation: u64,
}

impl StreamClock {
    fn local(&self, stream: Duration) -> Option<Instant> {
        let base = self.base.as_ref()?;
        Some(if stream >= base.stream {
            base.local
                .checked_add(stream - base.stream)
                .unwrap_or(base.local)
        } else {
            base.local
                .checked_sub(base.stream - stream)
                .unwrap_or(base.local)
        })
    }

    /// The stream time that maps to `local`.
    fn stream_at(&self, local: Instant) -> Option<Duration> {
        let base = self.base.as_ref()?;
        Some(if local >= base.local {
            base.stream.saturating_add(local - base.local)
        } else {
            base.stream.saturating_sub(base.local - local)
        })
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
    fn observe(&mut self, arrival: Instant, stream: Duration, config: &PlayoutConfig) -> bool {
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
    /// Before the first keyframe, or after a gap until the next one. Nothing buffered is
    /// a keyframe in this mode: one arriving resumes playback at once.
    WaitingForKeyframe,
    Playing,
    /// After the end of stream: everything is late.
    Finished,
}

struct Buffered {
    frame: CompleteFrame,
    /// When the frame completed.
    arrival: Instant,
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
        if let Some(stream) = timeline_stream_time(&frame.header)
            && self.clock.observe(arrival, stream, self.config)
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

/// The playout state of one track. One layer per track for now: the layer of the first
/// frame; each layer would get one of these to play several.
struct TrackPlayout {
    layer: Option<u32>,
    mode: Mode,
    /// Next sequence to release or give up; `None` before the first keyframe.
    next: Option<u64>,
    /// The next released frame starts a new run.
    discont: bool,
    buffer: BTreeMap<u64, Buffered>,
    last_timeline_local: Option<Instant>,
    last_timeline_stream: Option<Duration>,
    last_duration: Option<Duration>,
    /// The clock generation this track's last frame was mapped with.
    clock_generation: u64,
}

impl TrackPlayout {
    fn new() -> Self {
        Self {
            layer: None,
            mode: Mode::WaitingForKeyframe,
            next: None,
            discont: true,
            buffer: BTreeMap::new(),
            last_timeline_local: None,
            last_timeline_stream: None,
            last_duration: None,
            clock_generation: 0,
        }
    }

    fn push(&mut self, ctx: &mut Context<'_>, now: Instant, frame: CompleteFrame) {
        let sequence = frame.sequence;
        if self.mode == Mode::Finished || self.next.is_some_and(|next| sequence < next) {
            ctx.stats.frames_late += 1;
            return;
        }
        if self.buffer.contains_key(&sequence) {
            ctx.stats.duplicates += 1;
            return;
        }
        let keyframe = frame.header.keyframe;
        let playable = self.mode == Mode::Playing || keyframe;
        if playable {
            ctx.observe(now, &frame);
        }
        self.buffer.insert(
            sequence,
            Buffered {
                frame,
                arrival: now,
            },
        );
        if self.mode == Mode::WaitingForKeyframe && keyframe {
            // Nothing else buffered is a keyframe, so this is the earliest.
            self.resume_at(ctx, now, sequence);
        } else {
            self.release_ready(ctx, now);
        }
    }

    /// Continues playback at keyframe `keyframe`: what is buffered before it can never be
    /// decoded.
    fn resume_at(&mut self, ctx: &mut Context<'_>, now: Instant, keyframe: u64) {
        let kept = self.buffer.split_off(&keyframe);
        let skipped = std::mem::replace(&mut self.buffer, kept).len() as u64;
        ctx.stats.frames_skipped += skipped;
        if let Some(next) = self.next {
            ctx.stats.frames_lost += (keyframe - next).saturating_sub(skipped);
        }
        self.next = Some(keyframe);
        self.mode = Mode::Playing;
        self.discont = true;
        if let Some(first) = self.buffer.get(&keyframe) {
            let stream = timeline_stream_time(&first.frame.header)
                .or_else(|| ctx.clock.stream_at(now))
                .unwrap_or_default();
            ctx.clock.start(now, stream);
        }
        self.release_ready(ctx, now);
    }

    fn release_ready(&mut self, ctx: &mut Context<'_>, now: Instant) {
        if self.mode != Mode::Playing {
            return;
        }
        while let Some(entry) = self.buffer.first_entry() {
            let sequence = *entry.key();
            if Some(sequence) != self.next {
                break;
            }
            let buffered = entry.remove();
            self.emit(ctx, now, buffered.frame);
            self.next = Some(sequence + 1);
        }
    }

    fn emit(&mut self, ctx: &mut Context<'_>, now: Instant, frame: CompleteFrame) {
        let header = frame.header;
        let timeline_stream = timeline_stream_time(&header)
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
        ctx.output.push_back(OutputFrame {
            track: frame.track,
            layer: frame.layer,
            sequence: frame.sequence,
            pts,
            dts: header.dts_ns.map(|_| timeline_local),
            duration: header.duration_ns.map(Duration::from_nanos),
            keyframe: header.keyframe,
            discont: std::mem::take(&mut self.discont),
            resync,
            capture_unix_ns: header.capture_unix_ns,
            stream_pts: header.pts_ns.map(Duration::from_nanos),
            data: frame.data,
        });
    }

    /// Gives up the missing sequences before the first buffered frame.
    fn give_up_gap(&mut self, ctx: &mut Context<'_>, now: Instant) {
        let (Some(next), Some((&first, buffered))) = (self.next, self.buffer.first_key_value())
        else {
            return;
        };
        let first_is_keyframe = buffered.frame.header.keyframe;
        ctx.stats.frames_lost += first.saturating_sub(next);
        self.next = Some(first);
        if first_is_keyframe {
            self.discont = true;
            self.release_ready(ctx, now);
            return;
        }
        self.mode = Mode::WaitingForKeyframe;
        let keyframe = self
            .buffer
            .iter()
            .find(|(_, buffered)| buffered.frame.header.keyframe)
            .map(|(&sequence, _)| sequence);
        if let Some(keyframe) = keyframe {
            self.resume_at(ctx, now, keyframe);
        }
    }

    /// Drops the earliest buffered frame while waiting for a keyframe.
    fn drop_first_waiting(&mut self, ctx: &mut Context<'_>) {
        let Some((sequence, _)) = self.buffer.pop_first() else {
            return;
        };
        ctx.stats.frames_skipped += 1;
        if let Some(next) = self.next {
            ctx.stats.frames_lost += sequence.saturating_sub(next);
            self.next = Some(sequence + 1);
        }
    }

    /// When the gap before the first buffered frame is given up.
    fn give_up_at(&self, config: &PlayoutConfig, clock: &StreamClock) -> Option<Instant> {
        if self.mode != Mode::Playing {
            return None;
        }
        let (_, first) = self.buffer.first_key_value()?;
        let earliest_arrival = self
            .buffer
            .values()
            .map(|buffered| buffered.arrival)
            .min()?;
        let by_arrival = earliest_arrival + config.jitter_tolerance;
        let by_deadline = deadline(config, clock, &first.frame).map(|deadline| {
            deadline
                .checked_sub(GAP_DEADLINE_MARGIN)
                .unwrap_or(deadline)
        });
        Some(by_deadline.map_or(by_arrival, |deadline| deadline.min(by_arrival)))
    }

    /// Enforces the buffer limit and gives up gaps whose time has come.
    fn service(&mut self, ctx: &mut Context<'_>, now: Instant) {
        let limit = ctx.config.buffer_size.max(1);
        while self.buffer.len() > limit {
            match self.mode {
                Mode::Playing => self.give_up_gap(ctx, now),
                Mode::WaitingForKeyframe | Mode::Finished => self.drop_first_waiting(ctx),
            }
        }
        while self
            .give_up_at(ctx.config, ctx.clock)
            .is_some_and(|at| at <= now)
        {
            self.give_up_gap(ctx, now);
        }
    }

    /// Whether every sequence of `layer` below `end` was released or given up.
    fn is_complete(&self, layer: u32, end: u64) -> bool {
        match self.layer {
            Some(played) if played != layer => true,
            _ => self.mode == Mode::Finished || self.next.unwrap_or(0) >= end,
        }
    }

    /// Releases what can still be released, gives up the rest up to `end`, and refuses
    /// anything that comes later.
    fn finish(&mut self, ctx: &mut Context<'_>, now: Instant, end: Option<u64>) {
        while !self.buffer.is_empty() {
            match self.mode {
                Mode::Playing => self.give_up_gap(ctx, now),
                Mode::WaitingForKeyframe | Mode::Finished => self.drop_first_waiting(ctx),
            }
        }
        if let (Some(next), Some(end)) = (self.next, end)
            && next < end
        {
            ctx.stats.frames_lost += end - next;
            self.next = Some(end);
        }
        self.mode = Mode::Finished;
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

    /// Makes the played tracks exactly `tracks`: new ones start waiting for a keyframe,
    /// the frames buffered for removed ones are dropped as skipped.
    pub fn set_tracks(&mut self, tracks: impl IntoIterator<Item = u32>) {
        let wanted: BTreeMap<u32, ()> = tracks.into_iter().map(|id| (id, ())).collect();
        let stats = &mut self.stats;
        self.tracks.retain(|id, track| {
            let keep = wanted.contains_key(id);
            if !keep {
                stats.frames_skipped += track.buffer.len() as u64;
            }
            keep
        });
        for &id in wanted.keys() {
            self.tracks.entry(id).or_insert_with(|| {
                let mut track = TrackPlayout::new();
                if self.finished {
                    track.mode = Mode::Finished;
                }
                track
            });
        }
    }

    /// Takes a frame that just completed.
    pub fn push(&mut self, now: Instant, frame: CompleteFrame) {
        let (mut ctx, tracks) = self.split();
        let Some(track) = tracks.get_mut(&frame.track) else {
            ctx.stats.unknown_track += 1;
            return;
        };
        match track.layer {
            Some(layer) if layer != frame.layer => {
                ctx.stats.other_layer += 1;
                return;
            }
            Some(_) => {}
            None => track.layer = Some(frame.layer),
        }
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
            ..self.stats.clone()
        }
    }

    /// Frames buffered now, all tracks.
    pub fn buffered_frames(&self) -> usize {
        self.tracks.values().map(|track| track.buffer.len()).sum()
    }

    /// Frames buffered now for one track.
    pub fn track_buffered_frames(&self, track: u32) -> usize {
        self.tracks
            .get(&track)
            .map_or(0, |track| track.buffer.len())
    }

    /// Whether every listed track and layer released or gave up all sequences below its
    /// `next_sequence`. Unknown tracks and layers other than the played one are ignored.
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
            let end = ends
                .iter()
                .find(|end| end.track == id && track.layer.is_none_or(|layer| layer == end.layer))
                .map(|end| end.next_sequence);
            track.finish(&mut ctx, now, end);
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
    fn reordering_within_the_jitter_tolerance_is_restored() {
        let t0 = Instant::now();
        let mut playout = playout(PlayoutConfig::default());
        playout.push(t0, video(0, 100));
        playout.push(t0 + MS * 80, video(2, 100));
        // Waits for 1 at most the jitter tolerance after 2 arrived.
        assert_eq!(playout.poll_timeout(), Some(t0 + MS * 140));
        playout.handle_timeout(t0 + MS * 100);
        playout.push(t0 + MS * 100, video(1, 100));
        let output = run(&mut playout, vec![]);
        assert_eq!(sequences(&output, VIDEO), [0, 1, 2]);
        assert!(output.iter().skip(1).all(|frame| !frame.discont));
        let stats = playout.stats();
        assert_eq!((stats.frames_lost, stats.frames_skipped), (0, 0));
        assert_eq!(playout.poll_timeout(), None);
    }

    #[test]
    fn gap_is_given_up_before_the_next_frame_is_due() {
        let t0 = Instant::now();
        // A tolerance longer than the latency: the deadline decides.
        let mut playout = playout(PlayoutConfig {
            jitter_tolerance: Duration::from_secs(5),
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
        let _ = run(&mut playout, on_time(t0, (0..2).map(|sequence| video(sequence, 1))));
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
        let moves = output
            .windows(2)
            .filter(|pair| offset(&pair[0]) != offset(&pair[1]))
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
}
