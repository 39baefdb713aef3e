//! Playout of complete frames that arrive late, out of order, duplicated or never, on
//! tracks whose layer ladders, played layers and set change under way, on a virtual clock.
//!
//! A simulated publisher numbers frames per track and spatial layer as the real one does
//! (sequence and per-temporal-layer counts), the input decides which frame arrives when,
//! forges frames with any header, selects layers, changes ladders and tracks, ends, resets
//! and moves the clock. Checked after every step, on what [`Playout`] promises:
//! - output of each track and layer comes in increasing sequence order (unless forged
//!   frames with contradictory counts were pushed on the track: the order is the one their
//!   counts give), from a track and layer the playout has; its timeline (DTS, or PTS of
//!   frames without a stream PTS) never goes backwards; a layer switch is a keyframe with
//!   `discont`; nothing after `finish`;
//! - at most `buffer_size` frames buffered per played spatial layer of a track;
//! - after `handle_timeout(now)`, no gap is still due at or before `now` (a driver that
//!   sleeps until `poll_timeout` would spin otherwise).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use bytes::Bytes;
use gstp2plive::core::wire::{FrameHeader, TrackEnd};
use gstp2plive::core::{CompleteFrame, LayerPosition, OutputFrame, Playout, PlayoutConfig};

use super::input::Input;
use super::trace;

/// Track ids used: one more than the simulated publisher sends on, so unknown tracks occur.
const TRACKS: u32 = 4;

/// The simulated publisher's state of one track.
#[derive(Default)]
struct SimTrack {
    ladder: Vec<LayerPosition>,
    /// Per spatial layer: frames published so far per temporal layer. Never reset nor
    /// shortened while the stream goes on, whatever the ladder: one numbering, so frames
    /// still in flight from an earlier ladder never contradict newer ones.
    counts: BTreeMap<u32, Vec<u64>>,
    /// Stream time of the next frame, nanoseconds.
    stream_ns: u64,
}

impl SimTrack {
    /// The ladder as the playout sees it: empty means one base layer.
    fn layers(&self) -> Vec<LayerPosition> {
        if self.ladder.is_empty() {
            vec![LayerPosition::BASE]
        } else {
            self.ladder.clone()
        }
    }

    fn group_size(&self, spatial: u32) -> usize {
        self.layers()
            .iter()
            .filter(|layer| layer.spatial == spatial)
            .count()
    }
}

struct Harness {
    start: Instant,
    now: Instant,
    config: PlayoutConfig,
    playout: Playout,
    /// The track set last given to the playout.
    tracks: BTreeSet<u32>,
    sim: BTreeMap<u32, SimTrack>,
    in_flight: Vec<CompleteFrame>,
    /// Last sequence output per (track, layer), since that track last started over.
    last_sequence: BTreeMap<(u32, u32), u64>,
    /// Latest timeline instant output per track.
    last_timeline: BTreeMap<u32, Instant>,
    /// Tracks that got forged frames since they last started over.
    forged: BTreeSet<u32>,
    /// `finish` was called and its output collected: nothing may come out until `reset`.
    finished: bool,
}

/// One fuzz case.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let config = PlayoutConfig {
        latency: input.millis(1_000),
        buffer_size: input.index(33),
        jitter_tolerance: input.millis(200),
        // The gap then waits the fuzzed jitter tolerance (the same code path); reading one
        // more value here would change what the stored regression inputs mean.
        gap_wait: Some(std::time::Duration::ZERO),
    };
    let start = Instant::now();
    trace(format_args!("Playout::new({config:?})"));
    let mut harness = Harness {
        start,
        now: start,
        playout: Playout::new(config.clone()),
        config,
        tracks: BTreeSet::new(),
        sim: BTreeMap::new(),
        in_flight: Vec::new(),
        last_sequence: BTreeMap::new(),
        last_timeline: BTreeMap::new(),
        forged: BTreeSet::new(),
        finished: false,
    };
    harness.set_tracks(0b11);
    while !input.is_empty() {
        harness.step(&mut input);
        harness.collect_output();
        harness.check_buffers();
    }
}

impl Harness {
    fn step(&mut self, input: &mut Input<'_>) {
        match input.u8() % 16 {
            0..=3 => {
                let frame = self.publish(input);
                self.push(frame);
            }
            4 | 5 => {
                let frame = self.publish(input);
                self.in_flight.push(frame);
            }
            6 | 7 => self.deliver(input),
            8 => {
                let frame = forge(input, self.now);
                self.forged.insert(frame.track);
                self.push(frame);
            }
            9 => {
                let (track, layer) = (input.small(TRACKS), input.small(6));
                let selected = self.playout.select(self.now, track, layer);
                trace(format_args!(
                    "{:?} select({track}, {layer}) -> {selected}",
                    self.at()
                ));
                let known = self
                    .playout
                    .track_layers(track)
                    .is_some_and(|layers| layers.iter().any(|l| l.id == layer));
                assert_eq!(selected, known);
                if selected {
                    assert_eq!(
                        self.playout.selected_layer(track).map(|l| l.id),
                        Some(layer)
                    );
                }
            }
            10 => {
                self.now += input.millis(500);
                if input.bool() {
                    self.handle_timeout();
                }
            }
            11 => {
                if let Some(at) = self.playout.poll_timeout() {
                    self.now = self.now.max(at);
                }
                self.handle_timeout();
            }
            12 => self.set_tracks(input.u8()),
            13 => {
                let track = input.small(TRACKS);
                let ladder = ladder(input);
                self.set_track_layers(track, ladder);
            }
            14 => self.query(input),
            _ => match input.u8() % 4 {
                0 => self.reset(),
                1 => self.finish(input),
                _ => self.now += input.millis(5_000),
            },
        }
    }

    fn set_tracks(&mut self, mask: u8) {
        let tracks: BTreeSet<u32> = (0..TRACKS).filter(|t| mask & (1 << t) != 0).collect();
        for &removed in self.tracks.difference(&tracks) {
            // A removed track starts from scratch when it comes back.
            self.last_sequence.retain(|&(track, _), _| track != removed);
            self.last_timeline.remove(&removed);
            self.forged.remove(&removed);
        }
        for &added in tracks.difference(&self.tracks) {
            // The playout starts it on one base layer; the publisher's numbering goes on.
            self.sim.entry(added).or_default().ladder.clear();
        }
        trace(format_args!("set_tracks({tracks:?})"));
        self.playout.set_tracks(tracks.iter().copied());
        self.tracks = tracks;
    }

    fn set_track_layers(&mut self, track: u32, ladder: Vec<LayerPosition>) {
        let before = self.playout.track_layers(track).map(<[_]>::to_vec);
        trace(format_args!("set_track_layers({track}, {ladder:?})"));
        self.playout.set_track_layers(track, ladder.clone());
        let after = self.playout.track_layers(track).map(<[_]>::to_vec);
        if before != after {
            // The track starts over at its lowest layer; its timeline goes on.
            self.last_sequence.retain(|&(t, _), _| t != track);
            self.forged.remove(&track);
        }
        if after.is_some() {
            self.sim.entry(track).or_default().ladder = ladder;
        }
    }

    /// The simulated publisher's next frame on one of its layers (a track it does not
    /// have gets a base layer frame: an unknown track for the playout).
    fn publish(&mut self, input: &mut Input<'_>) -> CompleteFrame {
        let track = input.small(TRACKS);
        let sim = self.sim.entry(track).or_default();
        let layers = sim.layers();
        let layer = layers[input.index(layers.len())];
        let size = sim.group_size(layer.spatial);
        let counts = sim.counts.entry(layer.spatial).or_default();
        if counts.len() < size {
            counts.resize(size, 0);
        }
        let snapshot = counts[..size].to_vec();
        let sequence = counts[layer.temporal as usize];
        counts[layer.temporal as usize] += 1;
        sim.stream_ns = sim
            .stream_ns
            .saturating_add(1_000_000 * (1 + input.below(40)));
        let stream = sim.stream_ns;
        let temporal_counts = if size == 1 && input.bool() {
            Vec::new()
        } else {
            snapshot
        };
        let (pts_ns, dts_ns) = match input.u8() % 8 {
            0 => (None, None),
            1 => (None, Some(stream)),
            // B-frames: presented later than decoded.
            2 => (Some(stream + 40_000_000), Some(stream)),
            3 => (Some(input.near(stream, 1_000_000_000)), None),
            _ => (Some(stream), None),
        };
        let header = FrameHeader {
            pts_ns,
            dts_ns,
            duration_ns: input.bool().then_some(20_000_000),
            keyframe: input.u8() < 48,
            temporal_sync: input.bool(),
            temporal_counts,
            frame_size: 4,
            ..FrameHeader::default()
        };
        CompleteFrame {
            track,
            layer: layer.id,
            sequence,
            header,
            data: Bytes::from_static(b"data"),
            first_arrival: self.now,
        }
    }

    /// One in-flight frame completes now; sometimes a copy stays in flight.
    fn deliver(&mut self, input: &mut Input<'_>) {
        if self.in_flight.is_empty() {
            return;
        }
        let index = input.index(self.in_flight.len());
        let mut frame = if input.u8() < 32 {
            self.in_flight[index].clone()
        } else {
            self.in_flight.swap_remove(index)
        };
        frame.first_arrival = self.now;
        self.push(frame);
    }

    fn push(&mut self, frame: CompleteFrame) {
        // The deadline is only defined once the clock started; it must not panic either way.
        let _ = self.playout.deadline(&frame);
        trace(format_args!("{:?} push({frame:?})", self.at()));
        self.playout.push(self.now, frame);
    }

    fn handle_timeout(&mut self) {
        trace(format_args!("{:?} handle_timeout", self.at()));
        self.playout.handle_timeout(self.now);
        self.check_timer();
    }

    /// The virtual time, from the start of the run.
    fn at(&self) -> std::time::Duration {
        self.now - self.start
    }

    fn check_timer(&self) {
        if let Some(at) = self.playout.poll_timeout() {
            let at = at - self.start;
            assert!(at > self.at(), "gap due at {at:?} left after servicing it");
        }
    }

    fn finish(&mut self, input: &mut Input<'_>) {
        let mut ends = Vec::new();
        for (&track, sim) in &self.sim {
            for layer in sim.layers() {
                let published = sim
                    .counts
                    .get(&layer.spatial)
                    .and_then(|counts| counts.get(layer.temporal as usize))
                    .copied()
                    .unwrap_or(0);
                // Usually what was published; sometimes an end that claims more or less.
                let next_sequence = match input.u8() % 8 {
                    0 => input.u64(),
                    1 => published.saturating_sub(input.below(4)),
                    _ => published,
                };
                ends.push(TrackEnd {
                    track,
                    layer: layer.id,
                    next_sequence,
                });
            }
        }
        trace(format_args!("{:?} finish({ends:?})", self.at()));
        self.playout.finish(self.now, &ends);
        self.collect_output();
        self.finished = true;
        let _ = self.playout.is_complete(&ends);
    }

    fn reset(&mut self) {
        trace(format_args!("reset"));
        self.playout.reset();
        // A new publisher epoch: everything starts over.
        self.tracks.clear();
        self.sim.clear();
        self.in_flight.clear();
        self.last_sequence.clear();
        self.last_timeline.clear();
        self.forged.clear();
        self.finished = false;
    }

    /// Read-only calls the subscriber and the ABR make; they must not panic.
    fn query(&mut self, input: &mut Input<'_>) {
        let track = input.small(TRACKS);
        let _ = self.playout.selected_layer(track);
        let playing = self.playout.playing_layer(track);
        if let Some(playing) = playing {
            let layers = self.playout.track_layers(track).expect("a playing track");
            assert!(layers.contains(&playing));
        }
        let _ = self.playout.awaiting_keyframe(track);
        let ends = [TrackEnd {
            track,
            layer: input.small(6),
            next_sequence: input.below(64),
        }];
        let _ = self.playout.is_complete(&ends);
    }

    fn collect_output(&mut self) {
        while let Some(frame) = self.playout.poll_output() {
            trace(format_args!("  -> {frame:?}"));
            self.check_output(&frame);
        }
    }

    fn check_output(&mut self, frame: &OutputFrame) {
        assert!(!self.finished, "output after finish: {frame:?}");
        assert!(self.tracks.contains(&frame.track), "{frame:?}");
        let layers = self.playout.track_layers(frame.track).expect("known track");
        assert!(layers.iter().any(|l| l.id == frame.layer), "{frame:?}");
        if frame.layer_switch {
            assert!(frame.keyframe && frame.discont, "{frame:?}");
            // The spatial layer switched to numbers its frames on its own.
            self.last_sequence.retain(|&(t, _), _| t != frame.track);
        }
        let key = (frame.track, frame.layer);
        if let Some(&last) = self.last_sequence.get(&key)
            && !self.forged.contains(&frame.track)
        {
            assert!(
                frame.sequence > last,
                "sequence {} after {last} on {key:?}",
                frame.sequence
            );
        }
        self.last_sequence.insert(key, frame.sequence);

        let timeline = frame
            .dts
            .or_else(|| frame.stream_pts.is_none().then_some(frame.pts));
        if let Some(timeline) = timeline {
            let last = self.last_timeline.entry(frame.track).or_insert(timeline);
            assert!(timeline >= *last, "timeline went backwards: {frame:?}");
            *last = timeline;
        }
    }

    fn check_buffers(&self) {
        let limit = self.config.buffer_size.max(1);
        let mut total = 0;
        for &track in &self.tracks {
            let buffered = self.playout.track_buffered_frames(track);
            total += buffered;
            // The spatial layer played and, during a switch, the one switched to.
            assert!(buffered <= 2 * limit, "{buffered} frames buffered");
            if !self.playout.awaiting_keyframe(track) {
                assert!(buffered <= limit, "{buffered} frames buffered");
            }
        }
        assert_eq!(self.playout.buffered_frames(), total);
        assert_eq!(self.playout.stats().buffered_frames, total as u64);
    }
}

/// A ladder that passes the catalog's validation: ids and spatial ids ascending (with
/// gaps), temporal ids 0, 1, ... within each spatial layer. Empty means one base layer.
pub fn ladder(input: &mut Input<'_>) -> Vec<LayerPosition> {
    let mut layers = Vec::new();
    let mut id = 0;
    let mut spatial = 0;
    for _ in 0..input.below(4) {
        for temporal in 0..1 + input.small(3) {
            layers.push(LayerPosition {
                id,
                spatial,
                temporal,
            });
            id += 1 + input.small(2);
        }
        spatial += 1 + input.small(2);
    }
    layers
}

/// A frame with anything in its header: its counts may contradict its sequence or the
/// ladder, its timestamps may be anywhere.
fn forge(input: &mut Input<'_>, now: Instant) -> CompleteFrame {
    let counts = (0..input.below(4))
        .map(|_| input.near(8, 8))
        .collect::<Vec<_>>();
    let option = |input: &mut Input<'_>| input.bool().then(|| input.near(1_000_000_000, 1 << 30));
    let header = FrameHeader {
        pts_ns: option(input),
        dts_ns: option(input),
        duration_ns: option(input),
        keyframe: input.bool(),
        temporal_sync: input.bool(),
        temporal_counts: counts,
        ..FrameHeader::default()
    };
    CompleteFrame {
        track: input.small(TRACKS),
        layer: input.small(6),
        sequence: input.near(8, 8),
        header,
        data: Bytes::new(),
        first_arrival: now,
    }
}
