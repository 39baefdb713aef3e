//! A bounded per-peer send queue. Control messages are never shed; when media exceeds the
//! byte bound, the highest layer's oldest message goes first, so one slow peer costs only its
//! own queue and the base layer survives longest. Media that waited longer than a bound is
//! shed too: a late shard is worth less than the room it takes (the child pulls it from a
//! neighbour instead), and a paced link must not build seconds of delay.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

/// Priority class of a queued message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Tree maintenance, pulls, reports: small, never shed.
    Control,
    /// Media of `layer` (0 = base).
    Media { layer: u32 },
}

#[derive(Debug, Default)]
pub struct SendQueue {
    items: VecDeque<(Class, Bytes, Instant)>,
    bytes: usize,
    /// Media messages shed because the queue was full.
    pub shed: u64,
}

impl SendQueue {
    /// Queues `message`; sheds media beyond `max_bytes`. Returns the messages shed.
    pub fn push(&mut self, class: Class, message: Bytes, max_bytes: usize, now: Instant) -> u64 {
        self.bytes += message.len();
        self.items.push_back((class, message, now));
        let mut shed = 0;
        while self.bytes > max_bytes {
            // The highest layer, oldest first.
            let victim = self
                .items
                .iter()
                .enumerate()
                .filter_map(|(i, (class, _, _))| match class {
                    Class::Media { layer } => Some((i, *layer)),
                    Class::Control => None,
                })
                .max_by_key(|&(i, layer)| (layer, std::cmp::Reverse(i)));
            let Some((index, _)) = victim else { break };
            if let Some((_, message, _)) = self.items.remove(index) {
                self.bytes -= message.len();
                shed += 1;
            }
        }
        self.shed += shed;
        shed
    }

    /// The message at the head, its class and when it was queued.
    pub fn pop(&mut self) -> Option<(Class, Bytes, Instant)> {
        let (class, message, at) = self.items.pop_front()?;
        self.bytes -= message.len();
        Some((class, message, at))
    }

    /// Sheds the media at the head of the queue that was queued before `cutoff`. Returns the
    /// messages shed.
    pub fn shed_queued_before(&mut self, cutoff: Instant) -> u64 {
        let mut shed = 0;
        while let Some((Class::Media { .. }, message, at)) = self.items.front()
            && *at < cutoff
        {
            self.bytes -= message.len();
            self.items.pop_front();
            shed += 1;
        }
        self.shed += shed;
        shed
    }

    /// The class and length (bytes) of the next message.
    pub fn front(&self) -> Option<(Class, usize)> {
        self.items.front().map(|(c, m, _)| (*c, m.len()))
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sheds_highest_layer_oldest_first_and_never_control() {
        let now = Instant::now();
        let mut q = SendQueue::default();
        let m = |n: u8| Bytes::from(vec![n; 100]);
        q.push(Class::Control, m(0), 350, now);
        q.push(Class::Media { layer: 0 }, m(1), 350, now);
        q.push(Class::Media { layer: 1 }, m(2), 350, now);
        q.push(Class::Media { layer: 1 }, m(3), 350, now);
        assert_eq!(q.shed, 1);
        assert_eq!(q.bytes(), 300);
        let order: Vec<u8> = std::iter::from_fn(|| q.pop())
            .map(|(_, b, _)| b[0])
            .collect();
        // Message 2 (layer 1, oldest) went.
        assert_eq!(order, vec![0, 1, 3]);
        // Control alone over the bound stays.
        let mut q = SendQueue::default();
        q.push(Class::Control, m(0), 50, now);
        assert_eq!(q.shed, 0);
        assert_eq!(q.pop().unwrap().1[0], 0);
    }

    #[test]
    fn media_queued_too_long_is_shed_control_stays() {
        let t0 = Instant::now();
        let later = t0 + std::time::Duration::from_millis(600);
        let mut q = SendQueue::default();
        let m = |n: u8| Bytes::from(vec![n; 100]);
        q.push(Class::Media { layer: 0 }, m(1), 10_000, t0);
        q.push(Class::Control, m(2), 10_000, t0);
        q.push(Class::Media { layer: 0 }, m(3), 10_000, t0);
        q.push(Class::Media { layer: 0 }, m(4), 10_000, later);
        let cutoff = later - std::time::Duration::from_millis(500);
        // The head: stale media goes; control stops the shedding and is sent.
        assert_eq!(q.shed_queued_before(cutoff), 1);
        assert_eq!(q.pop().unwrap().1[0], 2);
        assert_eq!(q.shed_queued_before(cutoff), 1);
        assert_eq!(q.pop().unwrap().1[0], 4);
        assert_eq!((q.shed, q.bytes()), (2, 0));
    }
}
