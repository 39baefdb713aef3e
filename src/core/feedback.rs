//! Publisher side of viewer feedback: the latest report of each viewer, expired when the
//! viewer falls silent, aggregated into audience statistics; and keyframe requests,
//! aggregated and rate-limited per layer so a crowd asking at once forces one keyframe.
//! Memory is bounded: at most `max_viewers` viewers are tracked, the longest silent one
//! is evicted for a newcomer.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::wire::Feedback;

/// Longest report interval believed when computing expiry, so a viewer claiming a huge
/// interval cannot pin its entry.
const MAX_EXPIRY_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedbackConfig {
    /// Most viewers tracked at once.
    pub max_viewers: usize,
    /// A viewer not heard from for this many of its report intervals drops out.
    pub expiry_intervals: u32,
    /// At most one forced keyframe per layer per this interval.
    pub keyframe_request_interval: Duration,
}

impl Default for FeedbackConfig {
    fn default() -> Self {
        Self {
            max_viewers: 4096,
            expiry_intervals: 3,
            keyframe_request_interval: Duration::from_secs(1),
        }
    }
}

/// What the publisher knows of its audience.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AudienceStats {
    /// Viewers heard from recently.
    pub viewers: u64,
    /// Viewers per layer they play now (layer id of the layered track).
    pub layer_histogram: BTreeMap<u32, u64>,
    /// Viewers per layer they ask for.
    pub requested_histogram: BTreeMap<u32, u64>,
    pub latency_p50_ms: Option<u32>,
    pub latency_p95_ms: Option<u32>,
    /// Late + lost over expected frames in the viewers' latest reports.
    pub loss_ratio: f64,
    /// Reports taken, all time.
    pub reports: u64,
    /// Reports of another publisher epoch.
    pub stale_reports: u64,
    /// Viewers evicted to stay within `max_viewers`.
    pub evicted: u64,
    pub keyframe_requests: u64,
    /// Requests folded into a keyframe forced recently or already pending.
    pub keyframe_requests_limited: u64,
    /// Requests for a track or layer that does not exist, or of another epoch.
    pub keyframe_requests_invalid: u64,
    pub forced_keyframes: u64,
}

struct Viewer {
    report: Feedback,
    heard: Instant,
}

/// See the module documentation.
pub struct Audience {
    config: FeedbackConfig,
    viewers: HashMap<Vec<u8>, Viewer>,
    last_forced: BTreeMap<(u32, u32), Instant>,
    pending: VecDeque<(u32, u32)>,
    stats: AudienceStats,
}

impl Audience {
    pub fn new(config: FeedbackConfig) -> Self {
        Self {
            config,
            viewers: HashMap::new(),
            last_forced: BTreeMap::new(),
            pending: VecDeque::new(),
            stats: AudienceStats::default(),
        }
    }

    /// Takes a viewer's report; `viewer` is an opaque key (the transport's source peer).
    /// Reports of other epochs than `epoch` are counted and dropped.
    pub fn handle_feedback(&mut self, now: Instant, epoch: u64, viewer: &[u8], report: Feedback) {
        if report.epoch != epoch {
            self.stats.stale_reports += 1;
            return;
        }
        self.stats.reports += 1;
        self.expire(now);
        if !self.viewers.contains_key(viewer) && self.viewers.len() >= self.config.max_viewers {
            let oldest = self
                .viewers
                .iter()
                .min_by_key(|(key, entry)| (entry.heard, (*key).clone()))
                .map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                self.viewers.remove(&oldest);
                self.stats.evicted += 1;
            }
        }
        if self.config.max_viewers > 0 {
            self.viewers
                .insert(viewer.to_vec(), Viewer { report, heard: now });
        }
    }

    /// Takes a keyframe request for a layer the caller checked exists (which bounds the
    /// rate limit state by the catalog's tracks and layers). Returns whether it
    /// forces a keyframe (at most one per layer per `keyframe_request_interval`).
    pub fn handle_keyframe_request(&mut self, now: Instant, track: u32, layer: u32) -> bool {
        self.stats.keyframe_requests += 1;
        let key = (track, layer);
        let recent = self
            .last_forced
            .get(&key)
            .is_some_and(|&at| now < at + self.config.keyframe_request_interval);
        if recent || self.pending.contains(&key) {
            self.stats.keyframe_requests_limited += 1;
            return false;
        }
        self.last_forced.insert(key, now);
        self.pending.push_back(key);
        self.stats.forced_keyframes += 1;
        true
    }

    pub(crate) fn count_invalid_request(&mut self) {
        self.stats.keyframe_requests += 1;
        self.stats.keyframe_requests_invalid += 1;
    }

    /// The next layer whose encoder must produce a keyframe: `(track, layer)`.
    pub fn poll_keyframe_request(&mut self) -> Option<(u32, u32)> {
        self.pending.pop_front()
    }

    /// Drops viewers silent for `expiry_intervals` of their report interval.
    pub fn expire(&mut self, now: Instant) {
        let intervals = self.config.expiry_intervals.max(1);
        self.viewers.retain(|_, viewer| {
            let interval =
                Duration::from_millis(viewer.report.interval_ms.into()).min(MAX_EXPIRY_INTERVAL);
            now < viewer.heard + interval * intervals
        });
    }

    pub fn stats(&mut self, now: Instant) -> AudienceStats {
        self.expire(now);
        let mut stats = AudienceStats {
            viewers: self.viewers.len() as u64,
            layer_histogram: BTreeMap::new(),
            requested_histogram: BTreeMap::new(),
            ..self.stats.clone()
        };
        let mut latencies: Vec<u32> = Vec::with_capacity(self.viewers.len());
        let (mut bad, mut expected) = (0u64, 0u64);
        for viewer in self.viewers.values() {
            let report = &viewer.report;
            *stats
                .layer_histogram
                .entry(report.current_layer)
                .or_default() += 1;
            *stats
                .requested_histogram
                .entry(report.requested_layer)
                .or_default() += 1;
            latencies.push(report.latency_ms);
            // Bounded by the wire limits: no overflow.
            bad += report.late + report.lost;
            expected += report.received + report.lost;
        }
        latencies.sort_unstable();
        stats.latency_p50_ms = percentile(&latencies, 50);
        stats.latency_p95_ms = percentile(&latencies, 95);
        stats.loss_ratio = if expected == 0 {
            0.0
        } else {
            (bad as f64 / expected as f64).min(1.0)
        };
        stats
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u32], percent: usize) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (percent * sorted.len()).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn report(layer: u32, latency_ms: u32, received: u64, lost: u64) -> Feedback {
        Feedback {
            epoch: 1,
            interval_ms: 1000,
            current_layer: layer,
            requested_layer: layer + 1,
            latency_ms,
            received,
            lost,
            ..Feedback::default()
        }
    }

    #[test]
    fn aggregates_histogram_percentiles_and_loss() {
        let t0 = Instant::now();
        let mut audience = Audience::new(FeedbackConfig::default());
        for viewer in 0..20u32 {
            let layer = viewer % 3;
            audience.handle_feedback(
                t0,
                1,
                &viewer.to_be_bytes(),
                report(layer, 100 + viewer * 10, 95, 5),
            );
        }
        // A second report replaces the first.
        audience.handle_feedback(t0, 1, &0u32.to_be_bytes(), report(2, 100, 100, 0));
        // Another epoch is not counted.
        audience.handle_feedback(
            t0,
            1,
            &99u32.to_be_bytes(),
            Feedback {
                epoch: 2,
                ..report(0, 1, 1, 1)
            },
        );
        let stats = audience.stats(t0);
        assert_eq!(stats.viewers, 20);
        assert_eq!(
            stats.layer_histogram,
            BTreeMap::from([(0, 6), (1, 7), (2, 7)])
        );
        assert_eq!(stats.requested_histogram[&3], 7);
        // Latencies 100, 110..=290: the 10th of 20 is 190, the 19th 280.
        assert_eq!(stats.latency_p50_ms, Some(190));
        assert_eq!(stats.latency_p95_ms, Some(280));
        assert!((stats.loss_ratio - 95.0 / 2000.0).abs() < 1e-9);
        assert_eq!((stats.reports, stats.stale_reports), (21, 1));
    }

    #[test]
    fn silent_viewers_expire_after_three_intervals() {
        let t0 = Instant::now();
        let mut audience = Audience::new(FeedbackConfig::default());
        audience.handle_feedback(t0, 1, b"a", report(0, 10, 1, 0));
        audience.handle_feedback(t0 + MS * 2000, 1, b"b", report(0, 10, 1, 0));
        assert_eq!(audience.stats(t0 + MS * 2999).viewers, 2);
        assert_eq!(audience.stats(t0 + MS * 3000).viewers, 1);
        assert_eq!(audience.stats(t0 + MS * 5000).viewers, 0);
        assert_eq!(audience.stats(t0).latency_p50_ms, None);
    }

    #[test]
    fn memory_is_bounded_by_evicting_the_longest_silent_viewer() {
        let t0 = Instant::now();
        let mut audience = Audience::new(FeedbackConfig {
            max_viewers: 8,
            ..FeedbackConfig::default()
        });
        for viewer in 0..100u32 {
            let at = t0 + MS * viewer;
            audience.handle_feedback(at, 1, &viewer.to_be_bytes(), report(0, viewer, 1, 0));
            assert!(audience.viewers.len() <= 8);
        }
        let stats = audience.stats(t0 + MS * 100);
        assert_eq!((stats.viewers, stats.evicted), (8, 92));
        // The most recent ones are kept.
        assert_eq!(stats.latency_p50_ms, Some(95));
    }

    #[test]
    fn keyframe_requests_are_rate_limited_per_layer() {
        let t0 = Instant::now();
        let mut audience = Audience::new(FeedbackConfig {
            keyframe_request_interval: MS * 500,
            ..FeedbackConfig::default()
        });
        // A crowd asks for layer 0 and one viewer for layer 3, all at once.
        for _ in 0..50 {
            audience.handle_keyframe_request(t0, 0, 0);
        }
        assert!(audience.handle_keyframe_request(t0, 0, 3));
        assert_eq!(audience.poll_keyframe_request(), Some((0, 0)));
        assert_eq!(audience.poll_keyframe_request(), Some((0, 3)));
        assert_eq!(audience.poll_keyframe_request(), None);
        // Within the interval: folded into the keyframe just forced.
        assert!(!audience.handle_keyframe_request(t0 + MS * 499, 0, 0));
        assert_eq!(audience.poll_keyframe_request(), None);
        // After it: one more.
        assert!(audience.handle_keyframe_request(t0 + MS * 500, 0, 0));
        assert_eq!(audience.poll_keyframe_request(), Some((0, 0)));
        let stats = audience.stats(t0);
        assert_eq!(
            (
                stats.keyframe_requests,
                stats.keyframe_requests_limited,
                stats.forced_keyframes
            ),
            (53, 50, 3)
        );
    }
}
