//! Layer (ABR) controller of one track: a deterministic state machine fed with per-layer
//! arrival counts at regular intervals. It steps down one rung of the ladder as soon as the
//! share of late and lost frames of the played layers over `downgrade_window` reaches
//! `downgrade_loss_threshold`, and steps up only after `upgrade_cooldown` without trouble
//! and a probe: the next rung is received (not played) for `probe_settle` plus
//! `probe_duration`, and taken only if its frames arrived in time during `probe_duration`
//! while the played ones stayed clean. A failed probe doubles the wait before the next one,
//! up to `max_probe_backoff`.
//!
//! The ladder is the track's layers lightest first: the temporal layers of a spatial
//! layer, then the next spatial layer, so stepping down drops temporal layers before
//! spatial ones. After any switch the window starts over: gaps while the new layers
//! resynchronise are not held against them.
//!
//! Only the network's share of trouble counts: frames late because the publisher was slow
//! to encode them, or because this viewer itself stalled, and gaps left by a stall (see
//! [`LayerCounts`]), are reported but never make it step down or fail a probe. Stepping
//! down cannot speed up a starved publisher, which encodes every layer anyway.
//!
//! Every change of the played layer, and every failed probe, is recorded with its
//! [`LayerChangeReason`] ([`Abr::poll_change`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::playout::LayerPosition;
use super::subscriber::LayerCounts;

#[derive(Debug, Clone, PartialEq)]
pub struct AbrConfig {
    /// Lowest and highest layer ids the controller may choose.
    pub min_layer: u32,
    pub max_layer: u32,
    /// Plays this layer whatever happens (`auto-layer=false`).
    pub fixed_layer: Option<u32>,
    /// Where adaptation starts.
    pub start: AbrStart,
    /// Share of late + lost frames of the played layers that triggers a step down.
    pub downgrade_loss_threshold: f64,
    /// Period over which that share is measured.
    pub downgrade_window: Duration,
    /// Fewest frames expected in the window before it is judged.
    pub min_window_frames: u64,
    /// Share of the shards the data plane's parents push that this viewer's link loses
    /// ([`Abr::set_link_loss`]) that triggers a step down, held over half the window. The
    /// trees repair such loss (parity, pulls), so frames stay whole and in time while the
    /// link, often congested, carries ever more repair traffic: the loss itself is the
    /// signal.
    pub downgrade_link_loss: f64,
    /// Time without trouble before a probe of the next layer up.
    pub upgrade_cooldown: Duration,
    /// Start of a probe whose frames are not judged. Joining a layer brings in the
    /// frames already under way (the data plane pulls what its new parents announced),
    /// and these complete after their deadline whatever the link: on 127.0.0.1 three
    /// of the first ten frames of a probed temporal layer were late, and every probe
    /// failed. Frames of that span count neither for nor against the probe.
    pub probe_settle: Duration,
    /// How long a probed layer must then arrive in time before it is taken.
    pub probe_duration: Duration,
    /// Longest wait between probes after repeated failures.
    pub max_probe_backoff: Duration,
}

impl Default for AbrConfig {
    fn default() -> Self {
        Self {
            min_layer: 0,
            max_layer: u32::MAX,
            fixed_layer: None,
            start: AbrStart::default(),
            downgrade_loss_threshold: 0.1,
            downgrade_window: Duration::from_secs(2),
            min_window_frames: 10,
            downgrade_link_loss: 0.15,
            upgrade_cooldown: Duration::from_secs(10),
            probe_settle: Duration::from_secs(1),
            probe_duration: Duration::from_secs(3),
            max_probe_backoff: Duration::from_secs(160),
        }
    }
}

/// The layer adaptation starts from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AbrStart {
    /// The lightest layer.
    Lowest,
    /// All temporal layers of the lightest spatial layer: full frame rate at the smallest
    /// size. Stepping down is quick, so starting there costs a weak viewer little, and
    /// without simulcast it is full quality from the first frame.
    #[default]
    LowestSizeFullRate,
}

/// Why the layer controller changed what it plays (or dropped a probe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerChangeReason {
    /// Stepped down: frames of the played layers were lost on the network.
    Loss,
    /// Stepped down: frames of the played layers arrived after their deadline.
    Lateness,
    /// The probed layer did not arrive in time (or at all); it is dropped and the played
    /// layer stays.
    ProbeFailed,
    /// Stepped up: the probed layer arrived in time for the whole probe.
    ProbeSucceeded,
    /// The application fixed the layer (`auto-layer=false`, `layer`).
    Manual,
}

impl LayerChangeReason {
    /// The name used in stats and bus messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loss => "loss",
            Self::Lateness => "lateness",
            Self::ProbeFailed => "probe-failed",
            Self::ProbeSucceeded => "probe-succeeded",
            Self::Manual => "manual",
        }
    }
}

/// One decision of the controller: the layer played before and after (equal for a failed
/// probe), the layer probed when the reason is a probe's outcome, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerChange {
    pub at: Instant,
    pub from: LayerPosition,
    pub to: LayerPosition,
    pub probe: Option<LayerPosition>,
    pub reason: LayerChangeReason,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AbrStats {
    pub steps_down: u64,
    /// Of `steps_down`: for network loss, for network lateness.
    pub steps_down_loss: u64,
    pub steps_down_lateness: u64,
    pub steps_up: u64,
    pub probes: u64,
    pub probes_failed: u64,
    /// Layer changes the application asked for.
    pub manual: u64,
    /// The reason of the latest change.
    pub last_reason: Option<LayerChangeReason>,
}

struct Probe {
    /// Ladder index probed.
    rung: usize,
    started: Instant,
    counts: LayerCounts,
}

/// See the module documentation.
pub struct Abr {
    config: AbrConfig,
    /// Usable layers, lightest first.
    ladder: Vec<LayerPosition>,
    rung: usize,
    probe: Option<Probe>,
    /// Counts of the played layers per sample, newest last.
    window: VecDeque<(Instant, LayerCounts)>,
    /// The link's shard loss as last measured (0..=1), if the data plane measures it.
    link_loss: Option<f64>,
    /// That measure per sample since the last change, newest last.
    link_window: VecDeque<(Instant, f64)>,
    /// When the played layers were last in trouble or last changed.
    stable_since: Instant,
    next_probe_at: Instant,
    failed_probes: u32,
    stats: AbrStats,
    /// Decisions not yet taken by [`Abr::poll_change`]; bounded by the caller's draining
    /// (at most a few per sample).
    changes: VecDeque<LayerChange>,
}

impl Abr {
    /// Starts at the lowest usable layer (or the fixed one). `ladder` is the track's
    /// layers in any order; those outside `min_layer..=max_layer` are never chosen.
    pub fn new(now: Instant, ladder: &[LayerPosition], config: AbrConfig) -> Self {
        let mut usable: Vec<LayerPosition> = ladder
            .iter()
            .copied()
            .filter(|layer| (config.min_layer..=config.max_layer).contains(&layer.id))
            .collect();
        if usable.is_empty() {
            usable = ladder.to_vec();
        }
        usable.sort();
        let start = match config.start {
            AbrStart::Lowest => 0,
            AbrStart::LowestSizeFullRate => usable
                .iter()
                .rposition(|layer| Some(layer.spatial) == usable.first().map(|l| l.spatial))
                .unwrap_or(0),
        };
        let rung = config
            .fixed_layer
            .and_then(|fixed| usable.iter().position(|layer| layer.id == fixed))
            .unwrap_or(start);
        Self {
            next_probe_at: now + config.upgrade_cooldown,
            config,
            ladder: usable,
            rung,
            probe: None,
            window: VecDeque::new(),
            link_loss: None,
            link_window: VecDeque::new(),
            stable_since: now,
            failed_probes: 0,
            stats: AbrStats::default(),
            changes: VecDeque::new(),
        }
    }

    /// The next decision taken, oldest first.
    pub fn poll_change(&mut self) -> Option<LayerChange> {
        self.changes.pop_front()
    }

    /// The layer to play.
    pub fn layer(&self) -> Option<LayerPosition> {
        self.ladder.get(self.rung).copied()
    }

    /// The layer received as a probe, not played.
    pub fn probe_layer(&self) -> Option<LayerPosition> {
        self.probe
            .as_ref()
            .and_then(|probe| self.ladder.get(probe.rung).copied())
    }

    /// Layers to receive: the played ones (temporal layers 0..=T of the chosen spatial
    /// layer) and the probe.
    pub fn wanted_layers(&self) -> Vec<LayerPosition> {
        let mut wanted: Vec<LayerPosition> = self
            .layer()
            .map(|chosen| {
                self.ladder
                    .iter()
                    .copied()
                    .filter(|l| l.spatial == chosen.spatial && l.temporal <= chosen.temporal)
                    .collect()
            })
            .unwrap_or_default();
        wanted.extend(self.probe_layer());
        wanted
    }

    pub fn stats(&self) -> AbrStats {
        self.stats.clone()
    }

    /// Plays `layer` from now on and stops adapting; `None` resumes adapting from it.
    pub fn set_fixed(&mut self, now: Instant, layer: Option<u32>) {
        self.config.fixed_layer = layer;
        if let Some(rung) = layer.and_then(|id| self.ladder.iter().position(|l| l.id == id))
            && rung != self.rung
        {
            self.stats.manual += 1;
            self.record(now, rung, None, LayerChangeReason::Manual);
            self.switch_to(now, rung);
        }
        self.probe = None;
    }

    /// Forgets the trouble measured so far: the viewer stalled, so what the window holds
    /// says nothing about the network.
    pub fn restart_window(&mut self, now: Instant) {
        self.window.clear();
        if let Some(probe) = self.probe.as_mut() {
            probe.counts = LayerCounts::default();
            probe.started = now;
        }
    }

    /// The share (0..=1) of the shards pushed to this viewer that its link lost, as the data
    /// plane measures it (`None`: not measured, e.g. media over gossipsub). Taken at each
    /// sample.
    pub fn set_link_loss(&mut self, loss: Option<f64>) {
        self.link_loss = loss;
    }

    /// Takes the counts of one interval, per layer id (layers not received are absent).
    /// Returns whether the chosen layer or the probe changed.
    pub fn on_sample(&mut self, now: Instant, samples: &[(u32, LayerCounts)]) -> bool {
        if self.config.fixed_layer.is_some() || self.ladder.is_empty() {
            return false;
        }
        let played: Vec<u32> = self
            .wanted_layers()
            .iter()
            .filter(|layer| Some(**layer) != self.probe_layer())
            .map(|layer| layer.id)
            .collect();
        let mut counts = LayerCounts::default();
        let mut probe_counts = LayerCounts::default();
        let probe_id = self.probe_layer().map(|layer| layer.id);
        for (layer, sample) in samples {
            if played.contains(layer) {
                counts.add(sample);
            } else if Some(*layer) == probe_id {
                probe_counts.add(sample);
            }
        }
        self.window.push_back((now, counts));
        prune(&mut self.window, now, self.config.downgrade_window);
        let mut total = LayerCounts::default();
        for (_, counts) in &self.window {
            total.add(counts);
        }
        let expected = total.received + total.lost_network();
        let frames_troubled = expected >= self.config.min_window_frames.max(1)
            && bad_share(&total) >= self.config.downgrade_loss_threshold;
        if let Some(loss) = self.link_loss {
            self.link_window.push_back((now, loss));
        }
        prune(&mut self.link_window, now, self.config.downgrade_window);
        // Judged once it spans half the window since the last change, so one step down is
        // taken per half window while the loss lasts, not all at once.
        let link_troubled = self.link_window.front().is_some_and(|(first, _)| {
            now.saturating_duration_since(*first) >= self.config.downgrade_window / 2
        }) && self.link_window.iter().map(|(_, l)| l).sum::<f64>()
            / self.link_window.len().max(1) as f64
            >= self.config.downgrade_link_loss;
        let troubled = frames_troubled || link_troubled;

        if troubled {
            self.stable_since = now;
            if let Some(probe) = self.probe.take() {
                // The probe may be what overloads the link: drop it first.
                self.fail_probe(now, probe.rung);
                return true;
            }
            if self.rung > 0 {
                self.stats.steps_down += 1;
                let reason = if link_troubled || total.lost_network() >= total.late_network() {
                    self.stats.steps_down_loss += 1;
                    LayerChangeReason::Loss
                } else {
                    self.stats.steps_down_lateness += 1;
                    LayerChangeReason::Lateness
                };
                self.record(now, self.rung - 1, None, reason);
                self.switch_to(now, self.rung - 1);
                return true;
            }
            return false;
        }

        if let Some(probe) = self.probe.as_mut() {
            if now <= probe.started + self.config.probe_settle {
                return false;
            }
            probe.counts.add(&probe_counts);
            let probed = probe.counts;
            let probe_expected = probed.received + probed.lost_network();
            if probe_expected > 0 && bad_share(&probed) >= self.config.downgrade_loss_threshold {
                let rung = probe.rung;
                self.probe = None;
                self.fail_probe(now, rung);
                return true;
            }
            if now >= probe.started + self.config.probe_settle + self.config.probe_duration {
                let rung = probe.rung;
                self.probe = None;
                if probed.received == 0 {
                    self.fail_probe(now, rung);
                } else {
                    self.failed_probes = 0;
                    self.stats.steps_up += 1;
                    let probed_layer = self.ladder.get(rung).copied();
                    self.record(now, rung, probed_layer, LayerChangeReason::ProbeSucceeded);
                    self.switch_to(now, rung);
                }
                return true;
            }
            return false;
        }

        let stable =
            now.saturating_duration_since(self.stable_since) >= self.config.upgrade_cooldown;
        if stable && now >= self.next_probe_at && self.rung + 1 < self.ladder.len() {
            self.stats.probes += 1;
            self.probe = Some(Probe {
                rung: self.rung + 1,
                started: now,
                counts: LayerCounts::default(),
            });
            return true;
        }
        false
    }

    fn fail_probe(&mut self, now: Instant, rung: usize) {
        self.stats.probes_failed += 1;
        let probed = self.ladder.get(rung).copied();
        self.record(now, self.rung, probed, LayerChangeReason::ProbeFailed);
        self.failed_probes = self.failed_probes.saturating_add(1);
        let factor = 1u32 << self.failed_probes.min(16);
        let wait = self.config.upgrade_cooldown.saturating_mul(factor).min(
            self.config
                .max_probe_backoff
                .max(self.config.upgrade_cooldown),
        );
        self.next_probe_at = now + wait;
    }

    /// Notes a decision to move from the current rung to `to`.
    fn record(
        &mut self,
        now: Instant,
        to: usize,
        probe: Option<LayerPosition>,
        reason: LayerChangeReason,
    ) {
        let (Some(from), Some(to)) = (self.ladder.get(self.rung), self.ladder.get(to)) else {
            return;
        };
        self.stats.last_reason = Some(reason);
        self.changes.push_back(LayerChange {
            at: now,
            from: *from,
            to: *to,
            probe,
            reason,
        });
    }

    fn switch_to(&mut self, now: Instant, rung: usize) {
        self.rung = rung.min(self.ladder.len().saturating_sub(1));
        self.window.clear();
        self.link_window.clear();
        self.stable_since = now;
        self.next_probe_at = self.next_probe_at.max(now + self.config.upgrade_cooldown);
    }
}

/// Drops the samples of `window` (oldest first) that are `span` old or older at `now`.
fn prune<T>(window: &mut VecDeque<(Instant, T)>, now: Instant, span: Duration) {
    while window.front().is_some_and(|(at, _)| *at + span <= now) {
        window.pop_front();
    }
}

/// Share of frames late or lost on the network among those expected (gaps a local stall
/// left are not expected: they are nobody's loss on the path).
fn bad_share(counts: &LayerCounts) -> f64 {
    let expected = counts.received + counts.lost_network();
    if expected == 0 {
        return 0.0;
    }
    // Late frames are among the received ones.
    (counts.late_network() + counts.lost_network()) as f64 / expected as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Two spatial layers of three temporal layers: ids 0..6.
    fn ladder() -> Vec<LayerPosition> {
        (0..2)
            .flat_map(|spatial| {
                (0..3).map(move |temporal| LayerPosition {
                    id: spatial * 3 + temporal,
                    spatial,
                    temporal,
                })
            })
            .collect()
    }

    fn counts(received: u64, late: u64, lost: u64) -> LayerCounts {
        LayerCounts {
            received,
            late,
            lost,
            ..LayerCounts::default()
        }
    }

    /// One 250 ms sample: 6 frames per received layer, `bad` of them lost on the played
    /// layers, `probe_bad` on the probe.
    fn sample(abr: &Abr, bad: u64, probe_bad: u64) -> Vec<(u32, LayerCounts)> {
        let probe = abr.probe_layer();
        abr.wanted_layers()
            .into_iter()
            .map(|layer| {
                let lost = if Some(layer) == probe { probe_bad } else { bad };
                (layer.id, counts(6 - lost.min(6), 0, lost))
            })
            .collect()
    }

    /// Starting from the lightest layer, to exercise every step up.
    fn config() -> AbrConfig {
        AbrConfig {
            start: AbrStart::Lowest,
            upgrade_cooldown: Duration::from_secs(4),
            probe_settle: Duration::ZERO,
            probe_duration: Duration::from_secs(2),
            max_probe_backoff: Duration::from_secs(32),
            ..AbrConfig::default()
        }
    }

    /// Runs samples every 250 ms from `from` for `duration`; returns the end time.
    fn run(
        abr: &mut Abr,
        from: Instant,
        duration: Duration,
        mut losses: impl FnMut(&Abr) -> (u64, u64),
    ) -> Instant {
        let mut now = from;
        while now < from + duration {
            now += MS * 250;
            let (bad, probe_bad) = losses(abr);
            let samples = sample(abr, bad, probe_bad);
            abr.on_sample(now, &samples);
        }
        now
    }

    fn layer_id(abr: &Abr) -> u32 {
        abr.layer().unwrap().id
    }

    #[test]
    fn climbs_one_probe_at_a_time_after_the_cooldown() {
        let t0 = Instant::now();
        let mut abr = Abr::new(t0, &ladder(), config());
        assert_eq!(layer_id(&abr), 0);
        // Nothing before the cooldown.
        let now = run(&mut abr, t0, MS * 3750, |_| (0, 0));
        assert_eq!((layer_id(&abr), abr.probe_layer()), (0, None));
        // The cooldown passes: probe layer 1, received alongside.
        let now = run(&mut abr, now, MS * 250, |_| (0, 0));
        assert_eq!(abr.probe_layer().unwrap().id, 1);
        assert_eq!(
            abr.wanted_layers().iter().map(|l| l.id).collect::<Vec<_>>(),
            [0, 1]
        );
        // Taken after the probe duration, not before.
        let now = run(&mut abr, now, MS * 1750, |_| (0, 0));
        assert_eq!(layer_id(&abr), 0);
        run(&mut abr, now, MS * 250, |_| (0, 0));
        assert_eq!(layer_id(&abr), 1);
        assert_eq!(abr.probe_layer(), None);
        // Clean for long: up the whole ladder, spatial layer 1 last.
        run(&mut abr, t0, Duration::from_secs(60), |_| (0, 0));
        assert_eq!(layer_id(&abr), 5);
        assert_eq!(
            abr.wanted_layers().iter().map(|l| l.id).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        assert_eq!(abr.stats().steps_up, 5);
    }

    #[test]
    fn steps_down_within_the_window_temporal_first() {
        let t0 = Instant::now();
        let mut abr = Abr::new(t0, &ladder(), config());
        let now = run(&mut abr, t0, Duration::from_secs(60), |_| (0, 0));
        assert_eq!(layer_id(&abr), 5);
        // 2 of 6 frames lost from now on: one step per window, (1,2) -> (1,1) -> (1,0)
        // -> (0,2): temporal layers go first.
        let mut steps = Vec::new();
        let mut at = now;
        for _ in 0..40 {
            at += MS * 250;
            let before = layer_id(&abr);
            let samples = sample(&abr, 2, 0);
            abr.on_sample(at, &samples);
            if layer_id(&abr) != before {
                steps.push((at - now, layer_id(&abr)));
            }
        }
        let layers: Vec<u32> = steps.iter().map(|(_, layer)| *layer).collect();
        assert_eq!(layers, [4, 3, 2, 1, 0]);
        // The first step on the first sample that holds enough frames, well within the
        // window; each later one on fresh evidence from the new layers, never on stale
        // counts of the old ones.
        assert!(steps[0].0 <= config().downgrade_window, "{steps:?}");
        for pair in steps.windows(2) {
            assert!(pair[1].0 - pair[0].0 <= MS * 500, "{steps:?}");
        }
        assert_eq!(abr.stats().steps_down, 5);
    }

    #[test]
    fn a_failed_probe_backs_off_exponentially() {
        let t0 = Instant::now();
        let mut abr = Abr::new(t0, &ladder(), config());
        // The probed layer always loses half its frames; the played one is clean.
        let mut probes = Vec::new();
        let mut now = t0;
        for _ in 0..(4 * 200) {
            now += MS * 250;
            let probing = abr.probe_layer().is_some();
            let samples = sample(&abr, 0, 3);
            abr.on_sample(now, &samples);
            if !probing && abr.probe_layer().is_some() {
                probes.push(now - t0);
            }
        }
        assert_eq!(layer_id(&abr), 0, "never stepped up");
        // Cooldown 4 s, then waits of 8, 16, 32 (the cap), 32...
        let gaps: Vec<Duration> = probes.windows(2).map(|p| p[1] - p[0]).collect();
        assert_eq!(probes[0], Duration::from_secs(4));
        assert!(gaps[0] >= Duration::from_secs(8) && gaps[0] < Duration::from_secs(9));
        assert!(gaps[1] >= Duration::from_secs(16) && gaps[1] < Duration::from_secs(17));
        assert!(gaps[2] >= Duration::from_secs(32) && gaps[2] < Duration::from_secs(33));
        assert!(gaps[3] >= Duration::from_secs(32) && gaps[3] < Duration::from_secs(33));
        let stats = abr.stats();
        assert_eq!(stats.probes, stats.probes_failed);
        assert_eq!(stats.steps_up, 0);
    }

    #[test]
    fn late_frames_while_a_probe_settles_do_not_fail_it() {
        let t0 = Instant::now();
        let settle = AbrConfig {
            probe_settle: MS * 1000,
            ..config()
        };
        let mut abr = Abr::new(t0, &ladder(), settle.clone());
        let now = run(&mut abr, t0, Duration::from_secs(4), |_| (0, 0));
        assert!(abr.probe_layer().is_some());
        // Half the probed layer's frames are lost during the first second (frames under
        // way when it was joined), none afterwards.
        let now = run(&mut abr, now, MS * 1000, |_| (0, 3));
        assert_eq!(abr.stats().probes_failed, 0);
        assert!(abr.probe_layer().is_some());
        // Taken once the judged span (probe_duration after the settle) is clean.
        let now = run(&mut abr, now, MS * 1750, |_| (0, 0));
        assert_eq!(layer_id(&abr), 0);
        run(&mut abr, now, MS * 250, |_| (0, 0));
        assert_eq!(layer_id(&abr), 1);

        // The same loss past the settle fails the probe.
        let mut abr = Abr::new(t0, &ladder(), settle);
        let now = run(&mut abr, t0, Duration::from_secs(4), |_| (0, 0));
        let now = run(&mut abr, now, MS * 1000, |_| (0, 0));
        run(&mut abr, now, MS * 250, |_| (0, 3));
        assert_eq!(abr.stats().probes_failed, 1);
        assert_eq!(layer_id(&abr), 0);
    }

    #[test]
    fn trouble_during_a_probe_drops_the_probe_before_the_layer() {
        let t0 = Instant::now();
        let mut abr = Abr::new(t0, &ladder(), config());
        let now = run(&mut abr, t0, Duration::from_secs(4), |_| (0, 0));
        assert!(abr.probe_layer().is_some());
        let now = run(&mut abr, now, MS * 1000, |_| (2, 0));
        assert_eq!((layer_id(&abr), abr.probe_layer()), (0, None));
        assert_eq!(abr.stats().probes_failed, 1);
        // Still at the bottom: no lower layer to go to, nothing else happens.
        run(&mut abr, now, Duration::from_secs(2), |_| (2, 0));
        assert_eq!(layer_id(&abr), 0);
    }

    #[test]
    fn starts_at_full_frame_rate_of_the_smallest_size() {
        let t0 = Instant::now();
        let config = AbrConfig {
            start: AbrStart::LowestSizeFullRate,
            ..config()
        };
        let abr = Abr::new(t0, &ladder(), config.clone());
        let start = abr.layer().expect("a layer");
        let lightest_spatial = ladder().iter().map(|l| l.spatial).min().unwrap();
        let top_temporal = ladder()
            .iter()
            .filter(|l| l.spatial == lightest_spatial)
            .map(|l| l.temporal)
            .max()
            .unwrap();
        assert_eq!(
            (start.spatial, start.temporal),
            (lightest_spatial, top_temporal)
        );
        // Within bounds, the same rule on what is allowed.
        let bounded = Abr::new(
            t0,
            &ladder(),
            AbrConfig {
                min_layer: 4,
                ..config
            },
        );
        let start = bounded.layer().expect("a layer");
        assert!(start.id >= 4);
        assert_eq!(start.temporal, top_temporal);
    }

    #[test]
    fn fixed_and_bounded_layers() {
        let t0 = Instant::now();
        let fixed = AbrConfig {
            fixed_layer: Some(4),
            ..config()
        };
        let mut abr = Abr::new(t0, &ladder(), fixed);
        run(&mut abr, t0, Duration::from_secs(30), |_| (3, 3));
        assert_eq!(layer_id(&abr), 4);
        assert_eq!(abr.stats(), AbrStats::default());

        let bounded = AbrConfig {
            min_layer: 1,
            max_layer: 3,
            ..config()
        };
        let mut abr = Abr::new(t0, &ladder(), bounded);
        assert_eq!(layer_id(&abr), 1);
        let now = run(&mut abr, t0, Duration::from_secs(60), |_| (0, 0));
        assert_eq!(layer_id(&abr), 3);
        assert_eq!(abr.probe_layer(), None);
        run(&mut abr, now, Duration::from_secs(10), |_| (3, 0));
        assert_eq!(layer_id(&abr), 1);

        // Releasing a fixed layer resumes adapting from it.
        let mut abr = Abr::new(t0, &ladder(), config());
        abr.set_fixed(t0, Some(2));
        assert_eq!(layer_id(&abr), 2);
        abr.set_fixed(t0, None);
        run(&mut abr, t0, MS * 250, |_| (3, 0));
        assert_eq!(layer_id(&abr), 1);
    }

    #[test]
    fn a_lossy_link_steps_down_even_when_repair_keeps_frames_whole() {
        let t0 = Instant::now();
        let mut abr = Abr::new(t0, &ladder(), config());
        let now = run(&mut abr, t0, Duration::from_secs(60), |_| (0, 0));
        assert_eq!(layer_id(&abr), 5);
        // Every frame arrives, but the link loses a third of the shards: a step down per
        // half window (1 s), the reason is loss.
        abr.set_link_loss(Some(0.33));
        let now = run(&mut abr, now, MS * 750, |_| (0, 0));
        assert_eq!(layer_id(&abr), 5, "judged only over half a window");
        let now = run(&mut abr, now, MS * 500, |_| (0, 0));
        assert_eq!(layer_id(&abr), 4);
        assert_eq!(abr.stats().last_reason, Some(LayerChangeReason::Loss));
        let now = run(&mut abr, now, Duration::from_secs(6), |_| (0, 0));
        assert_eq!(layer_id(&abr), 0);
        // A little loss is the trees' business (parity), not a reason to step down; and
        // once the loss is gone the probes succeed again.
        abr.set_link_loss(Some(0.05));
        run(&mut abr, now, Duration::from_secs(60), |_| (0, 0));
        assert_eq!(layer_id(&abr), 5);
    }
}
