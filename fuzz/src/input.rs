//! Structured values drawn from the fuzzer's bytes.
//!
//! Every read succeeds: once the bytes run out, reads yield zeros, so a harness loops
//! `while !input.is_empty()` and any byte string is a valid program. A small reader of
//! our own rather than `arbitrary`, so the main crate replays saved inputs with no extra
//! dependency.

use std::time::Duration;

/// The fuzzer's bytes, consumed from the front.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads from `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Whether every byte was consumed.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `len` bytes (fewer when the input ends).
    pub fn bytes(&mut self, len: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(len.min(self.data.len()));
        self.data = tail;
        head
    }

    /// Little-endian, from `N` bytes; missing bytes are zero.
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        let head = self.bytes(N);
        out[..head.len()].copy_from_slice(head);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A value in `0..n` (`n > 0`), reading as few bytes as `n` needs.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        let raw = if n <= 1 << 8 {
            u64::from(self.u8())
        } else if n <= 1 << 16 {
            u64::from(self.u16())
        } else if n <= 1 << 32 {
            u64::from(self.u32())
        } else {
            self.u64()
        };
        raw % n
    }

    /// A value in `0..n` as `usize`.
    pub fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    /// A value in `0..n` as `u32`.
    pub fn small(&mut self, n: u32) -> u32 {
        self.below(u64::from(n)) as u32
    }

    /// Whole milliseconds in `0..max_ms`.
    pub fn millis(&mut self, max_ms: u64) -> Duration {
        Duration::from_millis(self.below(max_ms))
    }

    /// Mostly a value near `typical` (within `spread`), sometimes any `u64`: plausible
    /// values reach deep states, extreme ones the overflow paths.
    pub fn near(&mut self, typical: u64, spread: u64) -> u64 {
        match self.u8() {
            0..=239 => typical
                .saturating_add(self.below(spread.saturating_mul(2).max(1)))
                .saturating_sub(spread),
            240..=247 => 0,
            248..=251 => u64::MAX - self.below(4),
            _ => self.u64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_zeros_once_exhausted() {
        let mut input = Input::new(&[0x34, 0x12, 7]);
        assert_eq!(input.u16(), 0x1234);
        assert_eq!(input.u32(), 7);
        assert!(input.is_empty());
        assert_eq!(input.u64(), 0);
        assert_eq!(input.below(10), 0);
    }

    #[test]
    fn below_stays_in_range() {
        let mut input = Input::new(&[255, 255, 255, 9]);
        assert_eq!(input.below(10), 5);
        assert_eq!(input.below(1000), 65535 % 1000);
        assert_eq!(input.below(3), 0);
    }
}
