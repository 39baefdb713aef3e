//! The simulator (`gstp2plive::sim`, `cargo bench --bench sim`): determinism, and the
//! invariants of small runs. Figures are not asserted against wall time.

use std::time::Duration;

use gstp2plive::sim::network::NetworkModel;
use gstp2plive::sim::{self, Mode, SimConfig, SimReport};

fn small(seed: u64) -> SimConfig {
    SimConfig {
        viewers: 24,
        ramp: Duration::from_secs(1),
        warmup: Duration::from_secs(2),
        window: Duration::from_secs(3),
        seed,
        ..SimConfig::default()
    }
}

fn run(config: &SimConfig) -> SimReport {
    sim::run(config, &mut |_| {})
}

#[test]
fn the_same_seed_gives_byte_identical_json() {
    let a = serde_json::to_string(&run(&small(7))).unwrap();
    let b = serde_json::to_string(&run(&small(7))).unwrap();
    assert_eq!(a, b);
    let c = serde_json::to_string(&run(&small(8))).unwrap();
    assert_ne!(a, c, "another seed, another run");
}

#[test]
fn a_small_residential_run_keeps_the_invariants() {
    let report = run(&small(3));
    assert!(report.frames > 80, "{} frames in the window", report.frames);
    assert!(report.delivered_intact > 500, "{report:?}");
    // Every delivered object is the published one (each shard was checked against the
    // signed manifest's digest on the way, with the simulator's stand-in).
    assert_eq!(report.delivered_altered, 0);
    // Receive-only viewers forward no media; no viewer uploads beyond its capacity.
    assert_eq!(report.receive_only_media_bytes, 0);
    assert!(
        report.max_upload_over_capacity > 0.0 && report.max_upload_over_capacity <= 1.05,
        "upload over capacity {}",
        report.max_upload_over_capacity
    );
    assert!(report.joins >= 24 && report.delivery.count > 0);
    assert!(report.publisher_upload_x > 0.5);
}

#[test]
fn on_a_loopback_network_every_viewer_gets_everything_at_about_one_copy() {
    let config = SimConfig {
        network: NetworkModel::loopback(),
        network_name: "loopback".into(),
        churn_per_min: 0.0,
        ..small(5)
    };
    let report = run(&config);
    assert!(report.delivery.min >= 0.99, "{:?}", report.delivery);
    assert!(report.download_x.mean < 1.35, "{:?}", report.download_x);
    assert!(
        report.publisher_upload_x < 2.0,
        "{}",
        report.publisher_upload_x
    );
    assert_eq!(report.delivered_altered, 0);
}

#[test]
fn the_flood_baseline_costs_about_its_mesh_degree() {
    let config = SimConfig {
        mode: Mode::Flood,
        network: NetworkModel::loopback(),
        network_name: "loopback".into(),
        churn_per_min: 0.0,
        ..small(5)
    };
    let report = run(&config);
    assert_eq!(report.mode, "flood");
    assert!(report.delivery.min >= 0.99, "{:?}", report.delivery);
    // Each viewer receives each message from most of its mesh peers.
    assert!(report.download_x.mean > 3.0, "{:?}", report.download_x);
}
