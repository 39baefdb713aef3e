//! What a simulation run reports. Everything here is a function of the seed and the flags
//! (wall time and memory are reported beside it, by the binary, not in it), so the same run
//! gives byte-identical JSON.

use serde::Serialize;

/// A distribution: count, mean and quantiles (nearest rank).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Dist {
    pub count: usize,
    pub mean: f64,
    pub min: f64,
    pub p1: f64,
    pub p10: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Dist {
    /// The distribution of `values` (sorted here; NaNs are dropped).
    pub fn of(mut values: Vec<f64>) -> Dist {
        values.retain(|v| !v.is_nan());
        if values.is_empty() {
            return Dist::default();
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let q = |p: f64| values[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        Dist {
            count: n,
            mean: round(values.iter().sum::<f64>() / n as f64),
            min: round(values[0]),
            p1: round(q(0.01)),
            p10: round(q(0.10)),
            p50: round(q(0.50)),
            p90: round(q(0.90)),
            p99: round(q(0.99)),
            max: round(values[n - 1]),
        }
    }
}

/// The CDF of `values` at every 2 % (nearest rank).
pub fn cdf(values: &[f64]) -> Vec<(f64, f64)> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    if sorted.is_empty() {
        return Vec::new();
    }
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    (1..=50)
        .map(|i| {
            let q = f64::from(i) / 50.0;
            let v = sorted[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
            (round(v), q)
        })
        .collect()
}

/// Six significant decimals: the JSON stays readable and stable.
pub fn round(x: f64) -> f64 {
    if x.is_finite() {
        (x * 1e6).round() / 1e6
    } else {
        x
    }
}

/// The figures of one run (one mode at one audience size).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SimReport {
    /// `p2plive` (the data plane of `core::dataplane`) or `flood` (the gossipsub-like
    /// baseline).
    pub mode: String,
    /// Audience size the run keeps (viewers present at once, churn aside).
    pub viewers: usize,
    pub seed: u64,
    pub bitrate_kbps: u64,
    /// The measured window (s of stream) after the ramp and the warm-up.
    pub window_s: f64,
    pub network: String,
    pub loss: f64,
    pub loss_burst: f64,
    pub churn_per_min: f64,
    /// Delivery deadline after publication (ms): a frame counts if all of its objects reach
    /// the viewer by then.
    pub deadline_ms: u64,
    /// Frames published in the window.
    pub frames: u64,
    /// Per viewer: frames complete by the deadline over frames published in the window
    /// while it watched (from its first frame; if it never got one, from 5 s after it joined
    /// or the window's start, whichever is first; until a deadline before it left).
    pub delivery: Dist,
    /// All viewers' complete frames over all expected.
    pub delivery_overall: f64,
    /// Publication to delivery (ms) of every object delivered in the window.
    pub delay_ms: Dist,
    /// The delay CDF: (ms, share of the objects delivered in the window) at every 2 %.
    pub delay_cdf: Vec<(f64, f64)>,
    /// Tree depth of each viewer at the end (the deepest of its stripes, hops from the
    /// publisher); for `flood`, the hops of each delivered object.
    pub hops: Dist,
    /// Per viewer present through the window: bytes received over the bytes published
    /// (everything received, control included).
    pub download_x: Dist,
    /// The same for bytes sent.
    pub upload_x: Dist,
    /// Mean upload (× the stream) per line class.
    pub upload_x_by_class: Vec<(String, f64)>,
    pub publisher_upload_x: f64,
    /// Share of all bytes sent that are not shards and manifests (trees) or media (flood).
    pub control_share: f64,
    /// Join to first delivered object (ms), every join (initial and churn).
    pub join_ms: Dist,
    /// Joins with no frame by the end of the run.
    pub joins_without_frame: usize,
    /// Per stripe a viewer lost its parent in (the parent left without a word): time until
    /// it has a new parent (ms), sampled every 50 ms.
    pub recovery_ms: Dist,
    /// Such stripes without a new parent 10 s later.
    pub recoveries_missed: usize,
    /// Per viewer: its p99 delay over the one-way propagation delay from the publisher
    /// (the shortest path in the same topology).
    pub delay_over_bound: Dist,
    /// Highest over viewers of the upload sent in the window over what the
    /// `upload-capacity` it set (90 % of its line) allows in that time (control included;
    /// ≤ 1 is within capacity; 0 when capacities are unknown). The flood baseline knows no
    /// capacity: there it shows how far it overruns it.
    pub max_upload_over_capacity: f64,
    /// Media bytes sent by receive-only viewers (must be 0 for p2plive; the flood baseline
    /// knows no capacity).
    pub receive_only_media_bytes: u64,
    /// Delivered objects equal to the published ones, and any that were not (must be 0).
    pub delivered_intact: u64,
    pub delivered_altered: u64,
    /// Objects the data planes gave up (incomplete at their deadline), all viewers.
    pub objects_missed: u64,
    pub pulls_sent: u64,
    /// Messages lost on lines (loss model), dropped by full downlinks, and sent to peers
    /// that had left.
    pub messages_lost: u64,
    pub messages_dropped_downlink: u64,
    /// Flood only: forwards that waited in an uplink past gossipsub's 1 s.
    pub messages_dropped_uplink: u64,
    pub messages_to_departed: u64,
    pub joins: u64,
    pub leaves: u64,
    /// Simulator events processed.
    pub events: u64,
}
