//! Clock drift estimation: how fast the publisher's clock (its stream time) runs against the
//! viewer's local clock, from the capture timestamps of frames and their arrival times.
//!
//! Method: the lower envelope of the transit times, as in Moon, Skelly and Towsley,
//! "Estimation and removal of clock skew from network delay measurements" (IEEE INFOCOM
//! 1999), and as RTP jitter buffers do. Transit (arrival − send time, the send time in the
//! publisher's clock: a frame's stream time plus its publish delay, so the encoder's varying
//! delay is left out) is queueing delay plus
//! a term that grows linearly with the skew; queueing only ever adds, so the least transit in
//! each [`BUCKET`] of arrival time lies close to the line `offset + skew × stream time`. The
//! line is fitted by least squares over the minima of the last [`WINDOW_BUCKETS`] buckets,
//! then fitted again without the minima farther from it than three median absolute deviations
//! (a burst that delayed a whole bucket). A fit is adopted only once it is significant: its
//! skew at least three standard errors from zero, or its standard error under
//! [`PRECISE_SKEW`] (real minima scatter by milliseconds, so a few seconds of them say little
//! about a skew of 100 ppm, while a wrong rate would move every frame). A minimum more than
//! [`PATH_CHANGE`] off an adopted line is left out; two in a row off the same way mean the
//! path changed: the window starts over, keeps the last estimate, and the change is reported
//! ([`DriftUpdate::PathChange`]) so the playout can move its clock by it.
//!
//! The estimate is the rate of local time per stream time (1.0: same speed; 1.005: the
//! publisher's clock runs 0.5 % slow, so its stream seconds take 1.005 local seconds).
//! Sans-IO: arrivals are passed in.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Width of one bucket of arrival time, whose least transit is one point of the envelope.
pub const BUCKET: Duration = Duration::from_secs(1);
/// Buckets fitted: 60 s, so a 1 ms error in a minimum moves the slope by under 20 ppm.
pub const WINDOW_BUCKETS: usize = 60;
/// Fewest bucket minima, and shortest span of stream time, before a first estimate.
const MIN_POINTS: usize = 8;
const MIN_SPAN: Duration = Duration::from_secs(6);
/// A bucket minimum this far off the fitted line is a path change, not drift.
pub const PATH_CHANGE: Duration = Duration::from_millis(50);
/// Largest skew believed: far beyond any crystal or audio device (0.1–0.5 %); a steeper fit
/// is the envelope of a chaotic path, not drift, and is not adopted.
pub const MAX_SKEW: f64 = 0.01;
/// A fit whose skew has a standard error below this is adopted even when the skew is small.
pub const PRECISE_SKEW: f64 = 10e-6;
/// Fewest minima before a path change can be told from a noisy line.
const MIN_POINTS_FOR_PATH_CHANGE: usize = 10;

/// One point of the lower envelope: send time (publisher clock) and the least transit of its
/// bucket, ns.
#[derive(Debug, Clone, Copy)]
struct Point {
    stream: f64,
    transit: f64,
}

/// What an observation changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DriftUpdate {
    /// A new estimate of local seconds per stream second.
    Rate(f64),
    /// The least transit jumped by this much (ns; positive: the path got slower) and
    /// stayed for a whole bucket: a path change, not drift.
    PathChange { shift_ns: f64 },
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct DriftEstimator {
    /// Arrival and stream time transit is measured against (the first observation).
    reference: Option<(Instant, Duration)>,
    /// The bucket being filled: its start and its least-transit point so far.
    current: Option<(Instant, Point)>,
    points: VecDeque<Point>,
    /// Local seconds per stream second, once estimated.
    rate: Option<f64>,
    /// The fitted line (offset ns, skew), for the path change test.
    line: Option<(f64, f64)>,
    /// A minimum off the line, and its residual (ns), waiting for the next one to tell a
    /// lasting path change from a one-bucket spike.
    suspect: Option<(Point, f64)>,
    path_changes: u64,
}

impl Default for DriftEstimator {
    fn default() -> Self {
        Self::new()
    }
}

impl DriftEstimator {
    pub fn new() -> Self {
        Self {
            reference: None,
            current: None,
            points: VecDeque::new(),
            rate: None,
            line: None,
            suspect: None,
            path_changes: 0,
        }
    }

    /// Takes a frame sent at `sent` (publisher clock: stream time plus publish delay) that
    /// arrived at `arrival`. Returns what changed when this observation closed a bucket.
    pub fn observe(&mut self, arrival: Instant, sent: Duration) -> Option<DriftUpdate> {
        let (ref_local, ref_sent) = *self.reference.get_or_insert((arrival, sent));
        let local_ns = signed_ns(arrival, ref_local);
        let stream_ns = sent.as_nanos() as f64 - ref_sent.as_nanos() as f64;
        let point = Point {
            stream: stream_ns,
            transit: local_ns - stream_ns,
        };
        let Some((started, least)) = self.current.as_mut() else {
            self.current = Some((arrival, point));
            return None;
        };
        if arrival.saturating_duration_since(*started) < BUCKET {
            if point.transit < least.transit {
                *least = point;
            }
            return None;
        }
        let closed = *least;
        self.current = Some((arrival, point));
        self.add(closed)
    }

    /// Local seconds per stream second, once known.
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// The publisher's clock against ours in parts per million: negative when it runs slow
    /// (−5000: 0.5 % slow). 0 before the first estimate.
    pub fn drift_ppm(&self) -> f64 {
        self.rate.map_or(0.0, |rate| (1.0 / rate - 1.0) * 1e6)
    }

    /// Times the envelope jumped (a path change) and the window started over.
    pub fn path_changes(&self) -> u64 {
        self.path_changes
    }

    /// Forgets the envelope but keeps the estimate: the path changed (a rebase), so transit
    /// before and after are not on one line.
    pub fn restart(&mut self) {
        self.reference = None;
        self.current = None;
        self.points.clear();
        self.line = None;
        self.suspect = None;
    }

    fn add(&mut self, point: Point) -> Option<DriftUpdate> {
        if let Some((offset, skew)) = self
            .line
            .filter(|_| self.points.len() >= MIN_POINTS_FOR_PATH_CHANGE)
        {
            let residual = point.transit - (offset + skew * point.stream);
            let off = residual.abs() > PATH_CHANGE.as_nanos() as f64;
            match self.suspect.take() {
                // Two buckets in a row off the same way: the path changed, by the lesser.
                Some((first, previous)) if off && previous.signum() == residual.signum() => {
                    self.path_changes += 1;
                    self.points.clear();
                    self.points.extend([first, point]);
                    self.line = None;
                    let shift_ns = if residual > 0.0 {
                        previous.min(residual)
                    } else {
                        previous.max(residual)
                    };
                    return Some(DriftUpdate::PathChange { shift_ns });
                }
                // A spike is left out of the envelope.
                _ if off => {
                    self.suspect = Some((point, residual));
                    return None;
                }
                _ => {}
            }
        }
        self.points.push_back(point);
        while self.points.len() > WINDOW_BUCKETS {
            self.points.pop_front();
        }
        let span = self.points.back()?.stream - self.points.front()?.stream;
        if self.points.len() < MIN_POINTS || span < MIN_SPAN.as_nanos() as f64 {
            return None;
        }
        let all: Vec<Point> = self.points.iter().copied().collect();
        let (offset, skew) = fit(&all)?;
        // Once more without the minima a burst pushed off the line.
        let residuals: Vec<f64> = all
            .iter()
            .map(|p| (p.transit - (offset + skew * p.stream)).abs())
            .collect();
        let mad = median(residuals.clone());
        let kept: Vec<Point> = all
            .iter()
            .zip(&residuals)
            .filter(|(_, r)| **r <= 3.0 * mad + 1.0e5)
            .map(|(p, _)| *p)
            .collect();
        // Significance is judged on every minimum: leaving out the worst ones would make any
        // fit look precise.
        let error = standard_error(&all, offset, skew);
        let (offset, skew) = if kept.len() >= MIN_POINTS {
            fit(&kept).unwrap_or((offset, skew))
        } else {
            (offset, skew)
        };
        if (skew.abs() < 3.0 * error && error > PRECISE_SKEW) || skew.abs() > MAX_SKEW {
            return None;
        }
        self.line = Some((offset, skew));
        let rate = 1.0 + skew;
        self.rate = Some(rate);
        Some(DriftUpdate::Rate(rate))
    }
}

/// Least squares line `transit = offset + skew × stream`; `None` without spread in stream
/// time.
fn fit(points: &[Point]) -> Option<(f64, f64)> {
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.stream).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.transit).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.stream - mean_x).powi(2)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let sxy: f64 = points
        .iter()
        .map(|p| (p.stream - mean_x) * (p.transit - mean_y))
        .sum();
    let skew = sxy / sxx;
    Some((mean_y - skew * mean_x, skew))
}

/// Standard error of the slope of a least squares line through `points`.
fn standard_error(points: &[Point], offset: f64, skew: f64) -> f64 {
    let n = points.len() as f64;
    if n < 3.0 {
        return f64::INFINITY;
    }
    let mean_x = points.iter().map(|p| p.stream).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.stream - mean_x).powi(2)).sum();
    let ssr: f64 = points
        .iter()
        .map(|p| (p.transit - (offset + skew * p.stream)).powi(2))
        .sum();
    if sxx <= 0.0 {
        return f64::INFINITY;
    }
    (ssr / (n - 2.0) / sxx).sqrt()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn signed_ns(a: Instant, b: Instant) -> f64 {
    if a >= b {
        (a - b).as_nanos() as f64
    } else {
        -((b - a).as_nanos() as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Frames every 20 ms of stream time from a publisher whose clock runs at
    /// `publisher_rate` (stream seconds per real second), over a path of 20 ms plus up to
    /// `jitter` of queueing; returns the estimate's drift in ppm after `seconds`.
    fn run(publisher_rate: f64, jitter: Duration, seconds: u64, seed: u64) -> f64 {
        let t0 = Instant::now();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut estimator = DriftEstimator::new();
        let frames = seconds * 50;
        for index in 0..frames {
            let stream = Duration::from_millis(20 * index);
            let sent = stream.as_secs_f64() / publisher_rate;
            let queueing = rng.random_range(0.0..=jitter.as_secs_f64());
            let arrival = t0 + Duration::from_secs_f64(sent + 0.020 + queueing);
            estimator.observe(arrival, stream);
        }
        estimator.drift_ppm()
    }

    #[test]
    fn estimates_drift_within_tolerance_after_a_minute() {
        for (truth_ppm, seed) in [(-5000.0, 1), (5000.0, 2), (-100.0, 3), (100.0, 4), (0.0, 5)] {
            let rate = 1.0 + truth_ppm / 1e6;
            let estimate = run(rate, Duration::from_millis(30), 70, seed);
            let tolerance = (truth_ppm.abs() * 0.1_f64).max(20.0);
            assert!(
                (estimate - truth_ppm).abs() <= tolerance,
                "truth {truth_ppm} ppm, estimate {estimate:.1} ppm"
            );
        }
    }

    #[test]
    fn a_path_change_restarts_the_envelope_instead_of_bending_the_estimate() {
        let t0 = Instant::now();
        let mut estimator = DriftEstimator::new();
        for index in 0..(120 * 50) {
            let stream = Duration::from_millis(20 * index);
            // 200 ms more delay for good after a minute.
            let path = if index < 60 * 50 { 0.020 } else { 0.220 };
            let arrival = t0 + Duration::from_secs_f64(stream.as_secs_f64() + path);
            estimator.observe(arrival, stream);
        }
        assert_eq!(estimator.path_changes(), 1);
        assert!(
            estimator.drift_ppm().abs() < 20.0,
            "{}",
            estimator.drift_ppm()
        );
    }

    #[test]
    fn no_estimate_before_enough_of_the_envelope() {
        let t0 = Instant::now();
        let mut estimator = DriftEstimator::new();
        for index in 0..50 {
            let stream = Duration::from_millis(20 * index);
            estimator.observe(t0 + stream, stream);
        }
        assert_eq!(estimator.rate(), None);
        assert_eq!(estimator.drift_ppm(), 0.0);
    }

    #[test]
    fn scattered_minima_never_swing_the_rate() {
        // Queueing exponential with a 10 ms mean and a 200 ms burst one frame in fifty, as on
        // a loaded machine; the clocks agree. Early fits are noise and must not be adopted.
        let t0 = Instant::now();
        let mut rng = StdRng::seed_from_u64(9);
        let mut estimator = DriftEstimator::new();
        for index in 0..(120 * 50) {
            let stream = Duration::from_millis(20 * index);
            let mut queueing = -0.010 * (1.0 - rng.random::<f64>()).ln();
            if index % 50 == 7 {
                queueing += 0.2;
            }
            let arrival = t0 + Duration::from_secs_f64(stream.as_secs_f64() + 0.020 + queueing);
            if let Some(DriftUpdate::Rate(rate)) = estimator.observe(arrival, stream) {
                let ppm = (1.0 / rate - 1.0) * 1e6;
                assert!(ppm.abs() < 300.0, "adopted {ppm:.0} ppm at frame {index}");
            }
        }
        assert!(
            estimator.drift_ppm().abs() < 50.0,
            "{}",
            estimator.drift_ppm()
        );
        assert_eq!(estimator.path_changes(), 0);
    }
}
