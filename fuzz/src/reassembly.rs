//! Reassembly of fragments that arrive in any order, duplicated, late or never, mixed with
//! forged fragments, on a virtual clock.
//!
//! A simulated publisher splits frames into fragments and puts them "in flight"; the input
//! decides which one arrives next (and whether a copy stays in flight), forges fragments,
//! moves the clock, fires the timer and resets. Checked after every step:
//! - the memory limits hold (`pending_frames`, `pending_bytes`);
//! - after `handle_timeout(now)` nothing is due at or before `now`, and a timer is armed
//!   exactly while frames are pending;
//! - a completed frame is as long as its header says; one made only of the publisher's own
//!   fragments is exactly the frame it sent; no frame completes twice;
//! - a fragment the wire layer accepts is never rejected as malformed.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Instant;

use bytes::Bytes;
use gstp2plive::core::wire::{self, Fragment, FrameHeader, Limits, Message};
use gstp2plive::core::{CompleteFrame, Reassembler, ReassemblyConfig, ReassemblyDrop};

use super::input::Input;
use super::trace;

/// How many finished frames the reassembler remembers (its private `RECENT_FRAMES`): a
/// frame sent again after more than this many others finished may complete again.
const RECENT_FRAMES: usize = 4096;

/// (track, layer, sequence)
type Key = (u32, u32, u64);

struct Sent {
    header: FrameHeader,
    data: Bytes,
}

struct Harness {
    base: Instant,
    now: Instant,
    config: ReassemblyConfig,
    reassembler: Reassembler,
    /// Next sequence per (track, layer) of the simulated publisher.
    next_sequence: BTreeMap<(u32, u32), u64>,
    /// What the simulated publisher sent, by key.
    sent: BTreeMap<Key, Sent>,
    in_flight: Vec<Fragment>,
    /// Keys a forged fragment was pushed for: their content is anyone's guess.
    tainted: HashSet<Key>,
    /// Keys pushed and completed since the last reset.
    pushed: BTreeSet<Key>,
    completed: HashSet<Key>,
}

/// One fuzz case.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let config = ReassemblyConfig {
        fragment_timeout: input.millis(2_000),
        max_pending_frames: input.index(17),
        max_pending_bytes: input.index(64 * 1024 + 1),
        max_fragment_count: input.small(65),
    };
    let base = Instant::now();
    trace(format_args!("Reassembler::new({config:?})"));
    let mut harness = Harness {
        base,
        now: base,
        reassembler: Reassembler::new(config.clone()),
        config,
        next_sequence: BTreeMap::new(),
        sent: BTreeMap::new(),
        in_flight: Vec::new(),
        tainted: HashSet::new(),
        pushed: BTreeSet::new(),
        completed: HashSet::new(),
    };
    while !input.is_empty() {
        harness.step(&mut input);
        harness.check_limits();
    }
}

impl Harness {
    fn step(&mut self, input: &mut Input<'_>) {
        match input.u8() % 8 {
            0 | 1 => self.send_frame(input),
            2..=4 => self.deliver(input),
            5 => {
                let fragment = forge(input);
                self.tainted
                    .insert((fragment.track, fragment.layer, fragment.sequence));
                self.push(fragment);
            }
            6 => {
                self.now += input.millis(3_000);
                if input.bool() {
                    self.timeout();
                }
            }
            _ => {
                if input.u8() == 0 {
                    trace(format_args!("reset"));
                    self.reassembler.reset();
                    self.pushed.clear();
                    self.completed.clear();
                } else if let Some(at) = self.reassembler.poll_timeout() {
                    self.now = self.now.max(at);
                    self.timeout();
                }
            }
        }
    }

    /// The simulated publisher sends one frame: its fragments go in flight.
    fn send_frame(&mut self, input: &mut Input<'_>) {
        let track = input.small(3);
        let layer = input.small(3);
        let next = self.next_sequence.entry((track, layer)).or_default();
        let sequence = *next;
        *next += 1;
        let size = input.index(8 * 1024);
        let count = 1 + input.index(8).min(size.saturating_sub(1));
        let fill = input.u8();
        let data = Bytes::from(
            (0..size)
                .map(|i| fill.wrapping_add(i as u8))
                .collect::<Vec<u8>>(),
        );
        let header = FrameHeader {
            pts_ns: Some(sequence * 20_000_000),
            keyframe: input.bool(),
            frame_size: size as u32,
            ..FrameHeader::default()
        };
        // Even split; the last fragment takes the remainder.
        let part = size / count;
        for index in 0..count {
            let start = index * part;
            let end = if index + 1 == count {
                size
            } else {
                start + part
            };
            self.in_flight.push(Fragment {
                track,
                layer,
                sequence,
                index: index as u32,
                count: count as u32,
                header: (index == 0).then(|| header.clone()),
                payload: data.slice(start..end),
                ..Fragment::default()
            });
        }
        self.sent
            .insert((track, layer, sequence), Sent { header, data });
    }

    /// One in-flight fragment arrives; sometimes a copy stays in flight (a duplicate).
    fn deliver(&mut self, input: &mut Input<'_>) {
        if self.in_flight.is_empty() {
            return;
        }
        let index = input.index(self.in_flight.len());
        let fragment = if input.u8() < 32 {
            self.in_flight[index].clone()
        } else {
            self.in_flight.swap_remove(index)
        };
        self.push(fragment);
    }

    fn push(&mut self, fragment: Fragment) {
        let key = (fragment.track, fragment.layer, fragment.sequence);
        let limits = Limits {
            max_fragment_count: self.config.max_fragment_count,
            ..Limits::default()
        };
        let valid_on_wire = wire::validate(&Message::Fragment(fragment.clone()), &limits).is_ok();
        self.pushed.insert(key);
        trace(format_args!(
            "{:?} push({fragment:?})",
            self.now - self.base
        ));
        let result = self.reassembler.push(self.now, fragment);
        trace(format_args!("  -> {result:?}"));
        match result {
            Ok(Some(frame)) => self.check_complete(key, frame),
            Ok(None) => {}
            Err(ReassemblyDrop::Invalid) => {
                assert!(!valid_on_wire, "a fragment the wire accepts was malformed");
            }
            Err(_) => {}
        }
    }

    fn check_complete(&mut self, key: Key, frame: CompleteFrame) {
        assert_eq!((frame.track, frame.layer, frame.sequence), key);
        assert_eq!(frame.data.len(), frame.header.frame_size as usize);
        assert!(frame.first_arrival >= self.base && frame.first_arrival <= self.now);
        if self.pushed.len() <= RECENT_FRAMES {
            assert!(self.completed.insert(key), "{key:?} completed twice");
        }
        if !self.tainted.contains(&key) {
            let sent = self.sent.get(&key).expect("only sent frames are untainted");
            assert_eq!(frame.header, sent.header);
            assert_eq!(frame.data, sent.data);
        }
    }

    fn timeout(&mut self) {
        trace(format_args!("{:?} handle_timeout", self.now - self.base));
        self.reassembler.handle_timeout(self.now);
        if let Some(at) = self.reassembler.poll_timeout() {
            let (at, now) = (at - self.base, self.now - self.base);
            assert!(
                at > now,
                "expiry at {at:?} still due at {now:?} after handling it"
            );
        }
    }

    fn check_limits(&self) {
        let stats = self.reassembler.stats();
        assert!(stats.pending_frames <= self.config.max_pending_frames.max(1) as u64);
        assert!(stats.pending_bytes <= self.config.max_pending_bytes as u64);
        assert_eq!(
            self.reassembler.poll_timeout().is_some(),
            stats.pending_frames > 0
        );
        // An expiry time cannot be before the first fragment of the oldest frame arrived.
        if let Some(at) = self.reassembler.poll_timeout() {
            assert!(at >= self.base + self.config.fragment_timeout);
            assert!(at <= self.now + self.config.fragment_timeout);
        }
    }
}

/// Anything a peer could send: small ids so that forged fragments collide with real
/// frames, any index, count, header and size.
fn forge(input: &mut Input<'_>) -> Fragment {
    let count = match input.u8() % 4 {
        0 => input.u32(),
        _ => input.small(9),
    };
    let index = match input.u8() % 4 {
        0 => input.u32(),
        _ => input.small(9),
    };
    let header = input.bool().then(|| FrameHeader {
        frame_size: match input.u8() % 4 {
            0 => input.u32(),
            _ => input.small(16 * 1024),
        },
        keyframe: input.bool(),
        ..FrameHeader::default()
    });
    let payload = Bytes::from(vec![input.u8(); input.index(16 * 1024)]);
    Fragment {
        track: input.small(3),
        layer: input.small(3),
        sequence: input.below(8),
        index,
        count,
        header,
        payload,
        ..Fragment::default()
    }
}
