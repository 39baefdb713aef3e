//! Reassembly of fragments into frames, within hard memory limits.
//!
//! Fragments may arrive in any order, duplicated, or never. A frame is held until all its
//! fragments are in, its `fragment_timeout` passes, or it is evicted to make room; frames
//! that completed or were given up are remembered for a while so their stragglers are
//! dropped at once instead of starting a frame that can never complete.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::wire::{Fragment, FrameHeader, Limits};

/// How many finished (completed or abandoned) frames are remembered to classify
/// stragglers; tens of seconds of a typical stream.
const RECENT_FRAMES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReassemblyConfig {
    /// How long an incomplete frame is kept after its first fragment arrived.
    pub fragment_timeout: Duration,
    /// Most incomplete frames held at once.
    pub max_pending_frames: usize,
    /// Most payload bytes held in incomplete frames at once.
    pub max_pending_bytes: usize,
    /// Most fragments a frame may have.
    pub max_fragment_count: u32,
}

impl Default for ReassemblyConfig {
    fn default() -> Self {
        Self {
            fragment_timeout: Duration::from_secs(1),
            max_pending_frames: 64,
            max_pending_bytes: 32 * 1024 * 1024,
            max_fragment_count: Limits::default().max_fragment_count,
        }
    }
}

/// A frame whose fragments are all in.
#[derive(Debug, Clone, PartialEq)]
pub struct CompleteFrame {
    pub track: u32,
    pub layer: u32,
    pub sequence: u64,
    pub header: FrameHeader,
    pub data: Bytes,
    /// When the frame's first fragment arrived.
    pub first_arrival: Instant,
}

/// Why a fragment was not used. Each is counted in [`ReassemblyStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReassemblyDrop {
    /// The fragment is already held, or its frame already completed.
    #[error("duplicate fragment")]
    Duplicate,
    /// Its frame was given up earlier (expired, evicted or inconsistent).
    #[error("fragment of an abandoned frame")]
    Abandoned,
    /// It contradicts the fragments already held (count, size): the whole frame is dropped.
    #[error("fragment inconsistent with its frame")]
    Inconsistent,
    /// Its frame was the oldest pending one when room was needed for this fragment.
    #[error("frame evicted to stay within the memory limits")]
    Evicted,
    /// Its frame can never fit within `max_pending_bytes`.
    #[error("frame larger than the reassembly memory limit")]
    TooLarge,
    /// Malformed: count or index out of range, frame header missing or misplaced.
    #[error("malformed fragment")]
    Invalid,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReassemblyStats {
    pub fragments: u64,
    pub frames_completed: u64,
    pub duplicates: u64,
    pub abandoned: u64,
    pub inconsistent: u64,
    pub evicted: u64,
    pub expired: u64,
    pub too_large: u64,
    pub invalid: u64,
    /// Incomplete frames held now.
    pub pending_frames: u64,
    /// Payload bytes held in incomplete frames now.
    pub pending_bytes: u64,
}

/// (track, layer, sequence)
type FrameKey = (u32, u32, u64);

struct PendingFrame {
    count: u32,
    header: Option<FrameHeader>,
    parts: BTreeMap<u32, Bytes>,
    bytes: usize,
    first_arrival: Instant,
    /// Tie-breaker for frames with equal `first_arrival` in the age index.
    serial: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Completed,
    Abandoned,
}

/// Bounded memory of frames that are finished one way or another.
#[derive(Default)]
struct RecentFrames {
    order: VecDeque<FrameKey>,
    outcomes: HashMap<FrameKey, Outcome>,
}

impl RecentFrames {
    fn get(&self, key: &FrameKey) -> Option<Outcome> {
        self.outcomes.get(key).copied()
    }

    fn insert(&mut self, key: FrameKey, outcome: Outcome) {
        if self.outcomes.insert(key, outcome).is_none() {
            self.order.push_back(key);
            if self.order.len() > RECENT_FRAMES
                && let Some(oldest) = self.order.pop_front()
            {
                self.outcomes.remove(&oldest);
            }
        }
    }
}

/// See the module documentation.
pub struct Reassembler {
    config: ReassemblyConfig,
    pending: HashMap<FrameKey, PendingFrame>,
    /// Pending frames, oldest first.
    by_age: BTreeMap<(Instant, u64), FrameKey>,
    next_serial: u64,
    pending_bytes: usize,
    recent: RecentFrames,
    stats: ReassemblyStats,
}

impl Reassembler {
    pub fn new(config: ReassemblyConfig) -> Self {
        Self {
            config,
            pending: HashMap::new(),
            by_age: BTreeMap::new(),
            next_serial: 0,
            pending_bytes: 0,
            recent: RecentFrames::default(),
            stats: ReassemblyStats::default(),
        }
    }

    /// Takes one fragment. Returns the frame it completes, if any.
    pub fn push(
        &mut self,
        now: Instant,
        fragment: Fragment,
    ) -> Result<Option<CompleteFrame>, ReassemblyDrop> {
        self.stats.fragments += 1;
        let result = self.accept(now, fragment);
        match result {
            Ok(Some(_)) => self.stats.frames_completed += 1,
            Ok(None) => {}
            Err(drop) => match drop {
                ReassemblyDrop::Duplicate => self.stats.duplicates += 1,
                ReassemblyDrop::Abandoned => self.stats.abandoned += 1,
                ReassemblyDrop::Inconsistent => self.stats.inconsistent += 1,
                // Already counted once per frame in `evicted`.
                ReassemblyDrop::Evicted => {}
                ReassemblyDrop::TooLarge => self.stats.too_large += 1,
                ReassemblyDrop::Invalid => self.stats.invalid += 1,
            },
        }
        self.refresh_gauges();
        result
    }

    /// Drops incomplete frames whose first fragment is `fragment_timeout` old.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some((&(first_arrival, _), &key)) = self.by_age.first_key_value() {
            if first_arrival + self.config.fragment_timeout > now {
                break;
            }
            self.abandon(&key);
            self.stats.expired += 1;
        }
        self.refresh_gauges();
    }

    /// When the oldest incomplete frame expires.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.by_age
            .first_key_value()
            .map(|(&(first_arrival, _), _)| first_arrival + self.config.fragment_timeout)
    }

    pub fn stats(&self) -> ReassemblyStats {
        self.stats.clone()
    }

    /// Forgets every frame (a new publisher epoch); statistics are kept.
    pub fn reset(&mut self) {
        self.pending.clear();
        self.by_age.clear();
        self.pending_bytes = 0;
        self.recent = RecentFrames::default();
        self.refresh_gauges();
    }

    fn accept(
        &mut self,
        now: Instant,
        fragment: Fragment,
    ) -> Result<Option<CompleteFrame>, ReassemblyDrop> {
        let Fragment {
            track,
            layer,
            sequence,
            index,
            count,
            header,
            payload,
            ..
        } = fragment;
        if count == 0
            || count > self.config.max_fragment_count
            || index >= count
            || (index == 0) != header.is_some()
            || header
                .as_ref()
                .is_some_and(|h| (h.frame_size as usize) < payload.len())
        {
            return Err(ReassemblyDrop::Invalid);
        }
        let key = (track, layer, sequence);
        match self.recent.get(&key) {
            Some(Outcome::Completed) => return Err(ReassemblyDrop::Duplicate),
            Some(Outcome::Abandoned) => return Err(ReassemblyDrop::Abandoned),
            None => {}
        }

        if count == 1 {
            // Whole frame in one fragment: complete at once, nothing stored.
            if self.pending.contains_key(&key) {
                // Earlier fragments claimed more than one.
                self.abandon(&key);
                return Err(ReassemblyDrop::Inconsistent);
            }
            let header = header.ok_or(ReassemblyDrop::Invalid)?;
            if header.frame_size as usize != payload.len() {
                self.recent.insert(key, Outcome::Abandoned);
                return Err(ReassemblyDrop::Inconsistent);
            }
            self.recent.insert(key, Outcome::Completed);
            return Ok(Some(CompleteFrame {
                track,
                layer,
                sequence,
                header,
                data: payload,
                first_arrival: now,
            }));
        }

        let too_large = payload.len() > self.config.max_pending_bytes
            || header
                .as_ref()
                .is_some_and(|h| h.frame_size as usize > self.config.max_pending_bytes);
        if too_large {
            self.abandon(&key);
            return Err(ReassemblyDrop::TooLarge);
        }

        if let Some(frame) = self.pending.get(&key) {
            if frame.count != count {
                self.abandon(&key);
                return Err(ReassemblyDrop::Inconsistent);
            }
            if frame.parts.contains_key(&index) {
                return Err(ReassemblyDrop::Duplicate);
            }
            let frame_size = header
                .as_ref()
                .or(frame.header.as_ref())
                .map(|h| h.frame_size as usize);
            if frame_size.is_some_and(|size| frame.bytes + payload.len() > size) {
                self.abandon(&key);
                return Err(ReassemblyDrop::Inconsistent);
            }
        } else {
            while self.pending.len() >= self.config.max_pending_frames.max(1) {
                self.evict_oldest();
            }
            let serial = self.next_serial;
            self.next_serial += 1;
            self.by_age.insert((now, serial), key);
            self.pending.insert(
                key,
                PendingFrame {
                    count,
                    header: None,
                    parts: BTreeMap::new(),
                    bytes: 0,
                    first_arrival: now,
                    serial,
                },
            );
        }

        // Make room, oldest first; this frame itself may be the oldest. The fragment that
        // completes a frame needs none: the frame leaves the pending set at once.
        let completes = self
            .pending
            .get(&key)
            .is_some_and(|frame| frame.parts.len() + 1 == frame.count as usize);
        while !completes && self.pending_bytes + payload.len() > self.config.max_pending_bytes {
            if self.evict_oldest() == Some(key) {
                return Err(ReassemblyDrop::Evicted);
            }
        }

        let frame = self
            .pending
            .get_mut(&key)
            .expect("pending frame inserted or found above");
        if header.is_some() {
            frame.header = header;
        }
        frame.bytes += payload.len();
        self.pending_bytes += payload.len();
        frame.parts.insert(index, payload);
        if frame.parts.len() < frame.count as usize {
            return Ok(None);
        }

        let frame = self.remove_pending(&key).expect("pending frame present");
        let header = frame
            .header
            .expect("index 0 carries the header and all indices are in");
        if header.frame_size as usize != frame.bytes {
            self.recent.insert(key, Outcome::Abandoned);
            return Err(ReassemblyDrop::Inconsistent);
        }
        let mut data = BytesMut::with_capacity(frame.bytes);
        for part in frame.parts.values() {
            data.extend_from_slice(part);
        }
        self.recent.insert(key, Outcome::Completed);
        Ok(Some(CompleteFrame {
            track,
            layer,
            sequence,
            header,
            data: data.freeze(),
            first_arrival: frame.first_arrival,
        }))
    }

    /// Evicts the oldest pending frame; returns its key.
    fn evict_oldest(&mut self) -> Option<FrameKey> {
        let (_, &key) = self.by_age.first_key_value()?;
        self.abandon(&key);
        self.stats.evicted += 1;
        Some(key)
    }

    /// Drops a pending frame (if held) and remembers it as given up.
    fn abandon(&mut self, key: &FrameKey) {
        self.remove_pending(key);
        self.recent.insert(*key, Outcome::Abandoned);
    }

    fn remove_pending(&mut self, key: &FrameKey) -> Option<PendingFrame> {
        let frame = self.pending.remove(key)?;
        self.by_age.remove(&(frame.first_arrival, frame.serial));
        self.pending_bytes -= frame.bytes;
        Some(frame)
    }

    fn refresh_gauges(&mut self) {
        self.stats.pending_frames = self.pending.len() as u64;
        self.stats.pending_bytes = self.pending_bytes as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    /// Whether no frame completed twice.
    fn unique(frames: &[CompleteFrame]) -> bool {
        let mut seen = HashSet::new();
        frames
            .iter()
            .all(|frame| seen.insert((frame.track, frame.layer, frame.sequence)))
    }

    const MS: Duration = Duration::from_millis(1);

    /// The fragments of one frame of `size` bytes cut into `part`-byte pieces.
    fn fragments(sequence: u64, size: usize, part: usize) -> (Bytes, Vec<Fragment>) {
        let data: Bytes = (0..size)
            .map(|i| (i as u64 * 7 + sequence) as u8)
            .collect::<Vec<u8>>()
            .into();
        let count = size.div_ceil(part) as u32;
        let fragments = (0..count)
            .map(|index| {
                let start = index as usize * part;
                let end = (start + part).min(size);
                Fragment {
                    epoch: 1,
                    track: 0,
                    layer: 0,
                    sequence,
                    index,
                    count,
                    header: (index == 0).then_some(FrameHeader {
                        pts_ns: Some(sequence * 1000),
                        keyframe: sequence == 0,
                        frame_size: size as u32,
                        ..FrameHeader::default()
                    }),
                    payload: data.slice(start..end),
                }
            })
            .collect();
        (data, fragments)
    }

    #[test]
    fn single_fragment_frames_complete_at_once() {
        let t0 = Instant::now();
        let mut reassembler = Reassembler::new(ReassemblyConfig::default());
        let (data, parts) = fragments(3, 10, 100);
        let frame = reassembler.push(t0, parts[0].clone()).unwrap().unwrap();
        assert_eq!(frame.data, data);
        assert_eq!(frame.sequence, 3);
        assert_eq!(frame.first_arrival, t0);
        assert_eq!(reassembler.stats().pending_frames, 0);
        assert_eq!(
            reassembler.push(t0, parts[0].clone()),
            Err(ReassemblyDrop::Duplicate)
        );
        assert_eq!(reassembler.stats().duplicates, 1);
    }

    #[test]
    fn out_of_order_fragments_complete_when_all_are_in() {
        let t0 = Instant::now();
        let mut reassembler = Reassembler::new(ReassemblyConfig::default());
        let (data, parts) = fragments(0, 35, 10);
        // Header last: the other fragments wait for it.
        for (step, index) in [3, 1, 2].into_iter().enumerate() {
            let now = t0 + MS * step as u32;
            assert_eq!(reassembler.push(now, parts[index].clone()), Ok(None));
        }
        assert_eq!(reassembler.stats().pending_bytes, 25);
        let frame = reassembler
            .push(t0 + MS * 5, parts[0].clone())
            .unwrap()
            .expect("complete");
        assert_eq!(frame.data, data);
        assert_eq!(frame.first_arrival, t0);
        assert_eq!(frame.header.frame_size, 35);
        let stats = reassembler.stats();
        assert_eq!((stats.pending_frames, stats.pending_bytes), (0, 0));
        assert_eq!(stats.frames_completed, 1);
        assert_eq!(reassembler.poll_timeout(), None);
    }

    #[test]
    fn duplicates_and_stragglers_are_counted_not_restarted() {
        let t0 = Instant::now();
        let mut reassembler = Reassembler::new(ReassemblyConfig::default());
        let (_, parts) = fragments(0, 20, 10);
        reassembler.push(t0, parts[1].clone()).unwrap();
        assert_eq!(
            reassembler.push(t0, parts[1].clone()),
            Err(ReassemblyDrop::Duplicate)
        );
        assert!(reassembler.push(t0, parts[0].clone()).unwrap().is_some());
        // A late copy of a completed frame's fragment must not open a new pending frame.
        assert_eq!(
            reassembler.push(t0, parts[1].clone()),
            Err(ReassemblyDrop::Duplicate)
        );
        assert_eq!(
            reassembler.push(t0, parts[0].clone()),
            Err(ReassemblyDrop::Duplicate)
        );
        let stats = reassembler.stats();
        assert_eq!((stats.duplicates, stats.pending_frames), (3, 0));
    }

    #[test]
    fn incomplete_frames_expire() {
        let t0 = Instant::now();
        let config = ReassemblyConfig::default();
        let mut reassembler = Reassembler::new(config.clone());
        let (_, first) = fragments(0, 30, 10);
        let (_, second) = fragments(1, 30, 10);
        reassembler.push(t0, first[0].clone()).unwrap();
        reassembler.push(t0 + MS * 100, second[2].clone()).unwrap();
        assert_eq!(
            reassembler.poll_timeout(),
            Some(t0 + config.fragment_timeout)
        );

        reassembler.handle_timeout(t0 + config.fragment_timeout - MS);
        assert_eq!(reassembler.stats().expired, 0);
        reassembler.handle_timeout(t0 + config.fragment_timeout);
        let stats = reassembler.stats();
        assert_eq!((stats.expired, stats.pending_frames), (1, 1));
        assert_eq!(
            reassembler.poll_timeout(),
            Some(t0 + MS * 100 + config.fragment_timeout)
        );
        // The rest of an expired frame is dropped at once.
        assert_eq!(
            reassembler.push(t0 + config.fragment_timeout, first[1].clone()),
            Err(ReassemblyDrop::Abandoned)
        );
        reassembler.handle_timeout(t0 + Duration::from_secs(10));
        let stats = reassembler.stats();
        assert_eq!(
            (stats.expired, stats.pending_frames, stats.pending_bytes),
            (2, 0, 0)
        );
    }

    #[test]
    fn frame_count_limit_evicts_the_oldest() {
        let t0 = Instant::now();
        let mut reassembler = Reassembler::new(ReassemblyConfig {
            max_pending_frames: 2,
            ..ReassemblyConfig::default()
        });
        let frames: Vec<_> = (0..3).map(|sequence| fragments(sequence, 20, 10)).collect();
        for (sequence, (_, parts)) in frames.iter().enumerate() {
            reassembler
                .push(t0 + MS * sequence as u32, parts[0].clone())
                .unwrap();
        }
        let stats = reassembler.stats();
        assert_eq!((stats.evicted, stats.pending_frames), (1, 2));
        assert_eq!(
            reassembler.push(t0 + MS * 5, frames[0].1[1].clone()),
            Err(ReassemblyDrop::Abandoned)
        );
        let (data, _) = &frames[2];
        let frame = reassembler
            .push(t0 + MS * 5, frames[2].1[1].clone())
            .unwrap()
            .unwrap();
        assert_eq!(&frame.data, data);
    }

    #[test]
    fn byte_limit_evicts_the_oldest_even_the_growing_frame() {
        let t0 = Instant::now();
        let mut reassembler = Reassembler::new(ReassemblyConfig {
            max_pending_bytes: 25,
            ..ReassemblyConfig::default()
        });
        let (_, a) = fragments(0, 25, 10);
        let (_, b) = fragments(1, 35, 10);
        let (_, c) = fragments(2, 25, 10);
        reassembler.push(t0, a[0].clone()).unwrap();
        reassembler.push(t0 + MS, a[1].clone()).unwrap();
        // 20 bytes held; 10 more need the oldest frame (a) gone.
        reassembler.push(t0 + MS * 2, b[1].clone()).unwrap();
        let stats = reassembler.stats();
        assert_eq!((stats.evicted, stats.pending_bytes), (1, 10));
        reassembler.push(t0 + MS * 3, b[2].clone()).unwrap();
        reassembler.push(t0 + MS * 4, c[2].clone()).unwrap();
        assert_eq!(reassembler.stats().pending_bytes, 25);
        // b (its header, which would have been too large, never came) is the oldest
        // frame, so growing it is what must give way.
        assert_eq!(
            reassembler.push(t0 + MS * 5, b[3].clone()),
            Err(ReassemblyDrop::Evicted)
        );
        let stats = reassembler.stats();
        assert_eq!(
            (stats.evicted, stats.pending_frames, stats.pending_bytes),
            (2, 1, 5)
        );
        assert_eq!(
            reassembler.push(t0 + MS * 6, b[0].clone()),
            Err(ReassemblyDrop::Abandoned)
        );
    }

    #[test]
    fn the_fragment_completing_a_frame_needs_no_room() {
        let t0 = Instant::now();
        let mut reassembler = Reassembler::new(ReassemblyConfig {
            max_pending_bytes: 25,
            ..ReassemblyConfig::default()
        });
        let (data, d) = fragments(0, 25, 10);
        let (_, e) = fragments(1, 20, 10);
        reassembler.push(t0, d[0].clone()).unwrap();
        reassembler.push(t0, d[2].clone()).unwrap();
        reassembler.push(t0 + MS, e[0].clone()).unwrap();
        assert_eq!(reassembler.stats().pending_bytes, 25);
        let frame = reassembler
            .push(t0 + MS * 2, d[1].clone())
            .unwrap()
            .unwrap();
        assert_eq!(frame.data, data);
        let stats = reassembler.stats();
        assert_eq!((stats.evicted, stats.pending_bytes), (0, 10));
    }

    #[test]
    fn frames_beyond_the_byte_limit_are_refused() {
        let t0 = Instant::now();
        let mut reassembler = Reassembler::new(ReassemblyConfig {
            max_pending_bytes: 15,
            ..ReassemblyConfig::default()
        });
        let (_, parts) = fragments(0, 30, 10);
        assert_eq!(reassembler.push(t0, parts[1].clone()), Ok(None));
        assert_eq!(
            reassembler.push(t0, parts[0].clone()),
            Err(ReassemblyDrop::TooLarge)
        );
        assert_eq!(
            reassembler.push(t0, parts[2].clone()),
            Err(ReassemblyDrop::Abandoned)
        );
        assert_eq!(reassembler.stats().pending_bytes, 0);
    }

    #[test]
    fn inconsistent_fragments_drop_the_frame() {
        let t0 = Instant::now();
        let mut reassembler = Reassembler::new(ReassemblyConfig::default());
        // Count disagrees.
        let (_, parts) = fragments(0, 30, 10);
        reassembler.push(t0, parts[1].clone()).unwrap();
        let wrong_count = Fragment {
            count: 4,
            ..parts[2].clone()
        };
        assert_eq!(
            reassembler.push(t0, wrong_count),
            Err(ReassemblyDrop::Inconsistent)
        );
        assert_eq!(reassembler.stats().pending_frames, 0);

        // Payloads add up to more than the header's frame size.
        let (_, parts) = fragments(1, 30, 10);
        let mut header_fragment = parts[0].clone();
        header_fragment.header.as_mut().unwrap().frame_size = 12;
        reassembler.push(t0, header_fragment).unwrap();
        assert_eq!(
            reassembler.push(t0, parts[1].clone()),
            Err(ReassemblyDrop::Inconsistent)
        );

        // Payloads add up to less than the header's frame size.
        let (_, parts) = fragments(2, 30, 10);
        let mut header_fragment = parts[0].clone();
        header_fragment.header.as_mut().unwrap().frame_size = 40;
        reassembler.push(t0, header_fragment).unwrap();
        reassembler.push(t0, parts[1].clone()).unwrap();
        assert_eq!(
            reassembler.push(t0, parts[2].clone()),
            Err(ReassemblyDrop::Inconsistent)
        );

        // A single fragment that is not the whole frame.
        let (_, parts) = fragments(3, 10, 10);
        let mut short = parts[0].clone();
        short.header.as_mut().unwrap().frame_size = 11;
        assert_eq!(
            reassembler.push(t0, short),
            Err(ReassemblyDrop::Inconsistent)
        );

        let stats = reassembler.stats();
        assert_eq!(stats.inconsistent, 4);
        assert_eq!((stats.pending_frames, stats.pending_bytes), (0, 0));
    }

    #[test]
    fn malformed_fragments_are_invalid() {
        let t0 = Instant::now();
        let mut reassembler = Reassembler::new(ReassemblyConfig {
            max_fragment_count: 8,
            ..ReassemblyConfig::default()
        });
        let (_, parts) = fragments(0, 30, 10);
        let bad = [
            Fragment {
                count: 0,
                ..parts[1].clone()
            },
            Fragment {
                index: 3,
                ..parts[1].clone()
            },
            Fragment {
                count: 9,
                ..parts[1].clone()
            },
            Fragment {
                header: None,
                ..parts[0].clone()
            },
            Fragment {
                header: parts[0].header.clone(),
                ..parts[1].clone()
            },
        ];
        for fragment in bad {
            assert_eq!(reassembler.push(t0, fragment), Err(ReassemblyDrop::Invalid));
        }
        assert_eq!(reassembler.stats().invalid, 5);
        assert_eq!(reassembler.stats().pending_frames, 0);
    }

    proptest! {
        /// Any order, duplication and loss of the fragments of a few frames: no panic,
        /// only published bytes come out, each frame at most once, and the limits hold.
        #[test]
        fn any_arrival_pattern_is_safe(
            sizes in proptest::collection::vec(1usize..60, 1..8),
            picks in proptest::collection::vec((0usize..64, 0u32..30), 0..200),
            max_pending_frames in 1usize..4,
            max_pending_bytes in 1usize..80,
        ) {
            let t0 = Instant::now();
            let config = ReassemblyConfig {
                fragment_timeout: MS * 50,
                max_pending_frames,
                max_pending_bytes,
                ..ReassemblyConfig::default()
            };
            let mut reassembler = Reassembler::new(config);
            let frames: Vec<_> = sizes
                .iter()
                .enumerate()
                .map(|(sequence, &size)| fragments(sequence as u64, size, 8))
                .collect();
            let all: Vec<&Fragment> = frames.iter().flat_map(|(_, parts)| parts).collect();
            let mut completed = Vec::new();
            let mut now = t0;
            for (pick, advance_ms) in picks {
                now += MS * advance_ms;
                reassembler.handle_timeout(now);
                if let Ok(Some(frame)) = reassembler.push(now, all[pick % all.len()].clone()) {
                    prop_assert_eq!(&frame.data, &frames[frame.sequence as usize].0);
                    completed.push(frame);
                }
                let stats = reassembler.stats();
                prop_assert!(stats.pending_bytes as usize <= max_pending_bytes);
                prop_assert!(stats.pending_frames as usize <= max_pending_frames);
            }
            prop_assert!(unique(&completed));
        }
    }
}
