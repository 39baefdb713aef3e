//! Viewer reports merged on their way up the feedback tree: each hop sends one summary of its
//! subtree per interval, so the publisher sees its whole audience while no viewer receives
//! another viewer's report, and a report's size does not grow with the audience.

use std::collections::BTreeMap;

use crate::proto::{DpLayerCount, DpReport};

/// Upper bounds (ms) of the latency histogram's buckets; the last bucket is everything above.
pub const LATENCY_BUCKETS_MS: [u32; 11] = [
    100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10_000,
];

/// Upper bounds (‰) of the shard-loss histogram's buckets; the last bucket is everything
/// above. Fine below 5 %, where one parity shard more or less matters most.
pub const SHARD_LOSS_BUCKETS_PERMILLE: [u32; 12] =
    [0, 5, 10, 20, 30, 40, 50, 60, 80, 100, 150, 200];

/// The index of the bucket of `histogram` (counts per bucket) that holds the `q` (0..=1)
/// quantile; `None` if it counts nothing.
fn quantile_bucket(histogram: &[u32], q: f64) -> Option<usize> {
    let total: u64 = histogram.iter().map(|&c| u64::from(c)).sum();
    if total == 0 {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    histogram.iter().position(|&count| {
        seen += u64::from(count);
        seen >= rank
    })
}

/// Adds `other`'s counts to `into`'s bucket by bucket, `into` grown to `len` buckets.
fn add_buckets(into: &mut Vec<u32>, other: &[u32], len: usize) {
    if into.len() < len {
        into.resize(len, 0);
    }
    for (a, b) in into.iter_mut().zip(other) {
        *a = a.saturating_add(*b);
    }
}

/// One viewer's report for one interval (counts are for that interval).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalReport {
    pub track: u32,
    pub layer: u32,
    /// Capture to playout (ms).
    pub latency_ms: u32,
    pub received: u64,
    pub late: u64,
    pub lost: u64,
    pub recovered: u64,
}

/// A subtree's audience.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub viewers: u32,
    /// Viewers per played (track, layer).
    pub layers: BTreeMap<(u32, u32), u32>,
    /// Viewers per latency bucket ([`LATENCY_BUCKETS_MS`], then one for above).
    pub latency_histogram: Vec<u32>,
    pub received: u64,
    pub late: u64,
    pub lost: u64,
    pub recovered: u64,
    /// Peers per shard-loss bucket ([`SHARD_LOSS_BUCKETS_PERMILLE`], then one for above);
    /// empty if no peer measured any.
    pub shard_loss_histogram: Vec<u32>,
}

/// Bounds of a decoded report: at most this many layer entries.
const MAX_LAYERS: usize = 64;

impl Summary {
    pub fn from_local(report: &LocalReport) -> Summary {
        let mut histogram = vec![0; LATENCY_BUCKETS_MS.len() + 1];
        let bucket = LATENCY_BUCKETS_MS
            .iter()
            .position(|&b| report.latency_ms <= b)
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        histogram[bucket] = 1;
        Summary {
            viewers: 1,
            layers: BTreeMap::from([((report.track, report.layer), 1)]),
            latency_histogram: histogram,
            received: report.received,
            late: report.late,
            lost: report.lost,
            recovered: report.recovered,
            shard_loss_histogram: Vec::new(),
        }
    }

    /// Adds one peer whose parents' pushes lost `loss` (0..=1) of the shards.
    pub fn add_shard_loss(&mut self, loss: f64) {
        let permille = (loss.clamp(0.0, 1.0) * 1000.0).round() as u32;
        let bucket = SHARD_LOSS_BUCKETS_PERMILLE
            .iter()
            .position(|&b| permille <= b)
            .unwrap_or(SHARD_LOSS_BUCKETS_PERMILLE.len());
        self.shard_loss_histogram
            .resize(SHARD_LOSS_BUCKETS_PERMILLE.len() + 1, 0);
        self.shard_loss_histogram[bucket] = self.shard_loss_histogram[bucket].saturating_add(1);
    }

    /// The shard loss (0..=1) at or below which `q` (0..=1) of the measuring peers are: the
    /// upper bound of the bucket that holds that quantile (1.0 for the last); `None` if no
    /// peer measured any.
    pub fn shard_loss_quantile(&self, q: f64) -> Option<f64> {
        quantile_bucket(&self.shard_loss_histogram, q).map(|i| {
            SHARD_LOSS_BUCKETS_PERMILLE
                .get(i)
                .map_or(1.0, |&b| f64::from(b) / 1000.0)
        })
    }

    pub fn merge(&mut self, other: &Summary) {
        self.viewers = self.viewers.saturating_add(other.viewers);
        for (key, count) in &other.layers {
            if self.layers.len() < MAX_LAYERS || self.layers.contains_key(key) {
                let entry = self.layers.entry(*key).or_default();
                *entry = entry.saturating_add(*count);
            }
        }
        add_buckets(
            &mut self.latency_histogram,
            &other.latency_histogram,
            LATENCY_BUCKETS_MS.len() + 1,
        );
        self.received = self.received.saturating_add(other.received);
        self.late = self.late.saturating_add(other.late);
        self.lost = self.lost.saturating_add(other.lost);
        self.recovered = self.recovered.saturating_add(other.recovered);
        // Empty when nobody below measured any: it stays empty (no measure), not zeros.
        if !other.shard_loss_histogram.is_empty() {
            add_buckets(
                &mut self.shard_loss_histogram,
                &other.shard_loss_histogram,
                SHARD_LOSS_BUCKETS_PERMILLE.len() + 1,
            );
        }
    }

    /// The latency (ms) below which `q` (0..=1) of the viewers are: the upper bound of the
    /// bucket that holds that quantile (`None` with no viewers).
    pub fn latency_quantile_ms(&self, q: f64) -> Option<u32> {
        quantile_bucket(&self.latency_histogram, q)
            .map(|i| LATENCY_BUCKETS_MS.get(i).copied().unwrap_or(u32::MAX))
    }

    pub fn to_proto(&self) -> DpReport {
        DpReport {
            viewers: self.viewers,
            layers: self
                .layers
                .iter()
                .map(|(&(track, layer), &viewers)| DpLayerCount {
                    track,
                    layer,
                    viewers,
                })
                .collect(),
            latency_histogram: self.latency_histogram.clone(),
            received: self.received,
            late: self.late,
            lost: self.lost,
            recovered: self.recovered,
            shard_loss_histogram: self.shard_loss_histogram.clone(),
        }
    }

    /// A received report, bounded: extra layers and buckets are ignored.
    pub fn from_proto(report: &DpReport) -> Summary {
        let mut summary = Summary {
            viewers: report.viewers,
            latency_histogram: report
                .latency_histogram
                .iter()
                .copied()
                .take(LATENCY_BUCKETS_MS.len() + 1)
                .collect(),
            received: report.received,
            late: report.late,
            lost: report.lost,
            recovered: report.recovered,
            shard_loss_histogram: report
                .shard_loss_histogram
                .iter()
                .copied()
                .take(SHARD_LOSS_BUCKETS_PERMILLE.len() + 1)
                .collect(),
            ..Summary::default()
        };
        summary
            .latency_histogram
            .resize(LATENCY_BUCKETS_MS.len() + 1, 0);
        for entry in report.layers.iter().take(MAX_LAYERS) {
            summary
                .layers
                .insert((entry.track, entry.layer), entry.viewers);
        }
        summary
    }
}
