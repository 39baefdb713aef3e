//! Erasure coding of one object (a Fragment envelope) into data and parity shards with
//! `reed-solomon-erasure` (systematic Reed-Solomon over GF(2^8) with a Vandermonde-derived
//! matrix, after Backblaze's JavaReedSolomon and klauspost/reedsolomon): any `data` of the
//! `data + parity` shards rebuild the object.
//!
//! Why this codec: an object has at most [`MAX_SHARDS`] shards, and a matrix code's decode
//! costs O(k² + k × shard bytes): 6 µs for 8 + 1 shards of 1 100 bytes on the 2-core
//! machine. `reed-solomon-simd` (Leopard-RS over GF(2^16)), used before, encodes faster but
//! pays two transforms over all 65 536 field positions per decode whatever the shard count:
//! 250–330 µs for the same object, 54 % of the simulator's time at N = 300.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use bytes::Bytes;
use reed_solomon_erasure::galois_8::ReedSolomon;

/// Most shards (data + parity) of one object: `DpPull` names shards in a 64-bit bitmap.
pub const MAX_SHARDS: usize = 64;

/// How one object is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Bytes of the object before padding.
    pub length: usize,
    /// Data shards `k` (1..=60).
    pub data: usize,
    /// Parity shards `m`: [`Layout::base_parity`], more when the publisher's audience measured
    /// loss, 0 when it measured none (`data + parity` ≤ [`MAX_SHARDS`]).
    pub parity: usize,
    /// Bytes of every shard, rounded up to even (the layout rule of the first codec, which
    /// needed 2-byte symbols; kept so that layouts stay what they were).
    pub shard_len: usize,
}

/// Why shards could not be turned back into an object.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FecError {
    #[error("only {have} of the {need} shards needed")]
    NotEnough { have: usize, need: usize },
    #[error("bad layout: {0}")]
    Layout(&'static str),
    #[error("reed-solomon: {0}")]
    Codec(String),
}

impl Layout {
    /// The layout of an object of `length` bytes spread over `stripes` stripes with shards of
    /// about `target_shard` bytes: `k = ⌈length / target⌉` (at most 60) data shards and
    /// `m = ⌈k / (stripes − 1)⌉` parity shards. Shard `i` goes to stripe `(i + r) mod
    /// stripes`, so no stripe carries more than `m` shards of one object and the loss of one
    /// whole stripe is always rebuilt from parity, at a cost of about `1 / (stripes − 1)`.
    pub fn for_object(length: usize, stripes: usize, target_shard: usize) -> Layout {
        let data = length.div_ceil(target_shard.max(2)).clamp(1, 60);
        let parity = Self::base_parity(data, stripes);
        let shard_len = length.div_ceil(data).max(2).next_multiple_of(2);
        Layout {
            length,
            data,
            parity,
            shard_len,
        }
    }

    /// The parity without measured loss: `⌈data / (stripes − 1)⌉` (1 at least), enough to
    /// rebuild one whole lost stripe.
    pub fn base_parity(data: usize, stripes: usize) -> usize {
        data.div_ceil(stripes.max(2) - 1)
            .clamp(1, MAX_SHARDS - data.min(MAX_SHARDS - 1))
    }

    /// Checks a layout received from the network against the limits.
    pub fn validate(&self, max_object: usize) -> Result<(), FecError> {
        if self.data == 0 || self.data + self.parity > MAX_SHARDS {
            return Err(FecError::Layout("shard counts"));
        }
        if self.length > max_object || self.length == 0 {
            return Err(FecError::Layout("length"));
        }
        if !self.shard_len.is_multiple_of(2)
            || self.shard_len < self.length.div_ceil(self.data)
            || self.shard_len > self.length.div_ceil(self.data) + 2
        {
            return Err(FecError::Layout("shard length"));
        }
        Ok(())
    }

    /// Shards in all.
    pub fn total(&self) -> usize {
        self.data + self.parity
    }
}

thread_local! {
    /// One codec per (data, parity): building one inverts a matrix (~50 µs at 8 + 1), and
    /// each keeps a cache of decode matrices. At most one per layout the publisher used
    /// (every layout comes from a signed manifest), so this stays small.
    static CODECS: RefCell<HashMap<(usize, usize), Rc<ReedSolomon>>> =
        RefCell::new(HashMap::new());
}

fn codec(layout: &Layout) -> Result<Rc<ReedSolomon>, FecError> {
    if layout.data == 0 || layout.parity == 0 || layout.total() > MAX_SHARDS {
        return Err(FecError::Layout("shard counts"));
    }
    CODECS.with(|codecs| {
        let mut codecs = codecs.borrow_mut();
        if let Some(codec) = codecs.get(&(layout.data, layout.parity)) {
            return Ok(codec.clone());
        }
        let codec = Rc::new(
            ReedSolomon::new(layout.data, layout.parity)
                .map_err(|err| FecError::Codec(format!("{err:?}")))?,
        );
        codecs.insert((layout.data, layout.parity), codec.clone());
        Ok(codec)
    })
}

/// Cuts `object` into `layout.total()` shards: the data shards (zero-padded) then parity.
pub fn encode(object: &[u8], layout: &Layout) -> Result<Vec<Bytes>, FecError> {
    if layout.parity == 0 {
        if layout.data == 0 || layout.data > MAX_SHARDS {
            return Err(FecError::Layout("shard counts"));
        }
        return Ok(data_shards(object, layout)
            .into_iter()
            .map(Bytes::from)
            .collect());
    }
    let codec = codec(layout)?;
    let mut shards = data_shards(object, layout);
    shards.resize(layout.total(), vec![0; layout.shard_len]);
    codec
        .encode(&mut shards)
        .map_err(|err| FecError::Codec(format!("{err:?}")))?;
    Ok(shards.into_iter().map(Bytes::from).collect())
}

fn data_shards(object: &[u8], layout: &Layout) -> Vec<Vec<u8>> {
    (0..layout.data)
        .map(|i| {
            let start = (i * layout.shard_len).min(object.len());
            let end = ((i + 1) * layout.shard_len).min(object.len());
            let mut shard = Vec::with_capacity(layout.shard_len);
            shard.extend_from_slice(&object[start..end]);
            shard.resize(layout.shard_len, 0);
            shard
        })
        .collect()
}

/// Rebuilds the object from any `layout.data` of its shards (`shards[i]` is shard `i`).
pub fn decode(shards: &[Option<Bytes>], layout: &Layout) -> Result<Vec<u8>, FecError> {
    let have = shards.iter().filter(|s| s.is_some()).count();
    if have < layout.data {
        return Err(FecError::NotEnough {
            have,
            need: layout.data,
        });
    }
    let mut object = Vec::with_capacity(layout.data * layout.shard_len);
    let all_data = shards[..layout.data].iter().all(Option::is_some);
    if all_data {
        for shard in shards[..layout.data].iter().flatten() {
            object.extend_from_slice(shard);
        }
    } else {
        if shards.len() != layout.total()
            || shards.iter().flatten().any(|s| s.len() != layout.shard_len)
        {
            return Err(FecError::Layout("shard length"));
        }
        let codec = codec(layout)?;
        let mut work: Vec<Option<Vec<u8>>> = shards
            .iter()
            .map(|s| s.as_ref().map(|s| s.to_vec()))
            .collect();
        codec
            .reconstruct_data(&mut work)
            .map_err(|err| FecError::Codec(format!("{err:?}")))?;
        for shard in &work[..layout.data] {
            object.extend_from_slice(
                shard
                    .as_ref()
                    .ok_or(FecError::Codec("shard not restored".into()))?,
            );
        }
    }
    object.truncate(layout.length);
    Ok(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn layout_tolerates_one_stripe_lost() {
        for len in [1, 100, 1100, 5000, 12_500, 16_000, 65_000] {
            let layout = Layout::for_object(len, 16, 1100);
            assert!(layout.total() <= MAX_SHARDS, "{layout:?}");
            // Shards per stripe at most the parity count: one stripe's loss is rebuilt.
            assert!(layout.total().div_ceil(16) <= layout.parity, "{layout:?}");
            assert!(layout.data * layout.shard_len >= len);
            layout.validate(1 << 20).unwrap();
        }
    }

    #[test]
    fn any_data_count_of_shards_rebuild_the_object() {
        let obj = object(12_345);
        let layout = Layout::for_object(obj.len(), 16, 1100);
        let shards = encode(&obj, &layout).unwrap();
        assert_eq!(shards.len(), layout.total());
        // Lose `parity` shards at every offset.
        for first in 0..layout.total() {
            let mut some: Vec<Option<Bytes>> = shards.iter().cloned().map(Some).collect();
            for j in 0..layout.parity {
                some[(first + j) % layout.total()] = None;
            }
            assert_eq!(decode(&some, &layout).unwrap(), obj);
        }
        let mut too_few: Vec<Option<Bytes>> = shards.iter().cloned().map(Some).collect();
        for s in too_few.iter_mut().take(layout.parity + 1) {
            *s = None;
        }
        assert!(matches!(
            decode(&too_few, &layout),
            Err(FecError::NotEnough { .. })
        ));
    }

    #[test]
    fn bad_layouts_are_refused() {
        let good = Layout::for_object(5000, 16, 1100);
        for bad in [
            Layout { data: 0, ..good },
            Layout {
                data: 65,
                parity: 0,
                ..good
            },
            Layout {
                data: 63,
                parity: 2,
                ..good
            },
            Layout {
                shard_len: 3,
                ..good
            },
            Layout {
                shard_len: good.shard_len * 4,
                ..good
            },
            Layout { length: 0, ..good },
        ] {
            assert!(bad.validate(1 << 20).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn without_parity_the_data_shards_alone_rebuild_the_object() {
        let obj = object(12_345);
        let layout = Layout {
            parity: 0,
            ..Layout::for_object(obj.len(), 16, 1100)
        };
        layout.validate(1 << 20).unwrap();
        let shards = encode(&obj, &layout).unwrap();
        assert_eq!(shards.len(), layout.data);
        let all: Vec<Option<Bytes>> = shards.iter().cloned().map(Some).collect();
        assert_eq!(decode(&all, &layout).unwrap(), obj);
        let mut one_lost = all.clone();
        one_lost[3] = None;
        assert_eq!(
            decode(&one_lost, &layout),
            Err(FecError::NotEnough {
                have: layout.data - 1,
                need: layout.data
            })
        );
    }
}
