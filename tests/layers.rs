//! Layered video end to end: real VP8 temporal layers and simulcast, real decoders, real
//! libp2p nodes on 127.0.0.1, and the viewer's layer adaptation.

mod common;

use std::time::{Duration, Instant};

use common::*;
use gst::prelude::*;

const JOIN: Duration = Duration::from_secs(20);

/// These tests judge whether frames arrive in time, so they run one at a time: several
/// encoders and decoders at once on a 2-core machine make every viewer late, and then
/// stepping down is the right answer.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn start_publisher(source: &str, topic: &str, extra: &str) -> (Running, String) {
    init();
    let running = Running::start(launch(&format!(
        "{source} ! p2plivesink name=pub topic={topic} {LOOPBACK} keyframe-interval=500 {extra}"
    )));
    let addr = running.listening_addr("pub", JOIN);
    (running, addr)
}

fn start_viewer(topic: &str, addr: &str, extra: &str) -> (Running, Log) {
    let running = Running::start(launch(&format!(
        "p2plivesrc name=view topic={topic} bootstrap={addr} {LOOPBACK} ack-interval=300 latency=500 {extra} \
         ! appsink name=out sync=false"
    )));
    let frames = record_appsink(&running.by_name("out"));
    (running, frames)
}

/// Polls `condition` every 50 ms until it holds or `timeout` passes.
fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    condition()
}

fn layer_of(viewer: &Running) -> Option<u32> {
    viewer.stats("view").get::<u32>("layer").ok()
}

#[test]
fn temporal_base_layer_viewer_gets_a_quarter_of_the_frames_for_fewer_bytes() {
    let _serial = one_at_a_time();
    let topic = unique_topic("temporal");
    let (publisher, addr) = start_publisher(
        "videotestsrc is-live=true ! video/x-raw,width=320,height=240,framerate=30/1",
        &topic,
        "layers=temporal",
    );
    let (base, base_frames) = start_viewer(&topic, &addr, "auto-layer=false layer=0");
    let (full, full_frames) = start_viewer(&topic, &addr, "auto-layer=false");
    assert!(wait_for(&base_frames, 5, JOIN) && wait_for(&full_frames, 20, JOIN));

    // Count the frames of the same stretch of the publisher's stream time, not of wall time:
    // frames arrive in bursts (a pulled shard, a late object), and in a 4 s wall-clock window
    // a burst of ~6 frames moved the ratio past its bound (CI, 36 vs 112).
    let stream_times = |frames: &Log| -> Vec<gst::ClockTime> {
        frames
            .lock()
            .unwrap()
            .iter()
            .filter_map(|seen| seen.stream_time)
            .collect()
    };
    let window_start = stream_times(&full_frames)
        .into_iter()
        .max()
        .expect("stream-time meta on every frame");
    let window = window_start..window_start + gst::ClockTime::from_seconds(4);
    let bytes = |viewer: &Running| viewer.stats("view").get::<u64>("fragment-bytes").unwrap();
    let (base_bytes_start, full_bytes_start) = (bytes(&base), bytes(&full));
    std::thread::sleep(Duration::from_secs(4));
    let (base_bytes, full_bytes) = (
        bytes(&base) - base_bytes_start,
        bytes(&full) - full_bytes_start,
    );
    // Frames of the window reach both viewers within their 500 ms latency.
    std::thread::sleep(Duration::from_millis(1500));
    let in_window = |frames: &Log| {
        let mut times: Vec<_> = stream_times(frames)
            .into_iter()
            .filter(|time| window.contains(time))
            .collect();
        times.dedup();
        times.len()
    };
    let (base_count, full_count) = (in_window(&base_frames), in_window(&full_frames));
    // A quarter of the frames, plus the keyframes (every 500 ms here) that do not fall on
    // layer 0's every fourth frame: 36 of 120 in every run on this machine.
    let ratio = base_count as f64 / full_count as f64;
    assert!(
        full_count >= 100 && (0.2..=0.34).contains(&ratio),
        "of 4 s of stream, layer 0 played {base_count} frames, all layers {full_count}"
    );
    assert!(
        (base_bytes as f64) < 0.8 * full_bytes as f64,
        "layer 0 downloaded {base_bytes} bytes, all layers {full_bytes}"
    );
    // Every frame of the base layer decodes: whole frames, no decoder complaints.
    assert!(
        base_frames
            .lock()
            .unwrap()
            .iter()
            .all(Seen::is_whole_video_frame)
    );
    assert!(base.problems().is_empty(), "{:?}", base.problems());
    assert_eq!(layer_of(&base), Some(0));
    assert_eq!(layer_of(&full), Some(2));

    // The publisher hears both viewers and sees them on their layers.
    let audience = || -> (u64, gst::Structure) {
        let stats = publisher.stats("pub");
        (
            stats.get("viewers").unwrap(),
            stats.get("viewer-layers").unwrap(),
        )
    };
    assert!(
        eventually(Duration::from_secs(10), || {
            let (viewers, layers) = audience();
            viewers == 2
                && layers.get::<u64>("layer-0").ok() == Some(1)
                && layers.get::<u64>("layer-2").ok() == Some(1)
        }),
        "publisher stats: {}",
        publisher.stats("pub")
    );
    // Each merged summary stands for one report of each viewer it counts.
    let reports = publisher.stats("pub").get::<u64>("viewer-reports").unwrap();
    assert!(reports >= 2, "viewer-reports {reports}");
}

/// A tenth of what reaches a viewer is lost. Its shards are pulled within its playout
/// latency, so it keeps the top layer and plays nearly every frame: 0, 4 and 5 frames lost
/// of ~290 in three runs. (Before viewers pulled after a third of their playout budget they
/// waited 400 ms, and this test saw 23 and 34 lost of ~220: late, then the step down.)
#[test]
fn a_viewer_losing_a_tenth_keeps_its_layer_and_plays_nearly_every_frame() {
    let _serial = one_at_a_time();
    let topic = unique_topic("tenth");
    let (_publisher, addr) = start_publisher(
        "videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=30/1",
        &topic,
        "layers=temporal",
    );
    let (lossy, frames) = start_viewer(&topic, &addr, "simulated-loss=0.1");
    assert!(wait_for(&frames, 20, JOIN));
    let counters = |viewer: &Running| {
        let stats = viewer.stats("view");
        (
            stats.get::<u64>("frames-output").unwrap(),
            stats.get::<u64>("frames-lost").unwrap(),
        )
    };
    let (output_start, lost_start) = counters(&lossy);
    std::thread::sleep(Duration::from_secs(10));
    let (output, lost) = counters(&lossy);
    let (output, lost) = (output - output_start, lost - lost_start);
    let stats = lossy.stats("view");
    assert!(
        output >= 200 && lost * 100 <= 3 * (output + lost),
        "{lost} frames lost, {output} played in 10 s: {stats}"
    );
    assert_eq!(layer_of(&lossy), Some(2), "{stats}");
}

#[test]
fn a_lossy_viewer_steps_down_keeps_playing_and_steps_back_up() {
    let _serial = one_at_a_time();
    let topic = unique_topic("abr");
    let (_publisher, addr) = start_publisher(
        "videotestsrc is-live=true ! video/x-raw,width=320,height=240,framerate=30/1",
        &topic,
        "layers=temporal",
    );
    let quick = "layer-upgrade-cooldown=1000";
    let (lossy, lossy_frames) = start_viewer(&topic, &addr, quick);
    let (steady, steady_frames) = start_viewer(&topic, &addr, quick);
    assert!(wait_for(&lossy_frames, 20, JOIN) && wait_for(&steady_frames, 20, JOIN));
    assert!(eventually(JOIN, || layer_of(&lossy) == Some(2)
        && layer_of(&steady) == Some(2)));

    // A third of what reaches one viewer is lost: it steps down and keeps playing.
    let src: gst::Element = lossy.by_name("view");
    src.set_property("simulated-loss", 0.35f64);
    assert!(
        eventually(Duration::from_secs(15), || layer_of(&lossy)
            .is_some_and(|l| l < 2)),
        "no step down: {}",
        lossy.stats("view")
    );
    let during = lossy_frames.lock().unwrap().len();
    assert!(
        wait_for(&lossy_frames, during + 10, Duration::from_secs(10)),
        "keeps playing"
    );
    assert_eq!(
        layer_of(&steady),
        Some(2),
        "the other viewer is unaffected: {}",
        steady.stats("view")
    );

    // The loss stops: after the cooldown and a successful probe it climbs back.
    src.set_property("simulated-loss", 0.0f64);
    assert!(
        eventually(Duration::from_secs(40), || layer_of(&lossy) == Some(2)),
        "no step back up: {}",
        lossy.stats("view")
    );
    let stats = lossy.stats("view");
    assert!(stats.get::<u64>("layer-changes").unwrap() >= 2, "{stats}");
    assert_eq!(
        stats.get::<&str>("layer-reason").unwrap(),
        "probe-succeeded"
    );
    // Every decision was announced on the bus with its reason.
    let bus = lossy.0.bus().expect("bus");
    let reasons: Vec<String> =
        std::iter::from_fn(|| bus.pop_filtered(&[gst::MessageType::Element]))
            .filter_map(|message| {
                let structure = message.structure()?;
                (structure.name() == "p2plive-layer-changed")
                    .then(|| structure.get::<String>("reason").ok())
                    .flatten()
            })
            .collect();
    // On the trees, pulls repair most losses, but past the latency: the step down is then
    // for lateness. Either way it is the network's fault, never a local stall.
    assert!(
        matches!(
            reasons.first().map(String::as_str),
            Some("loss" | "lateness")
        ),
        "{reasons:?}"
    );
    assert_eq!(
        reasons.last().map(String::as_str),
        Some("probe-succeeded"),
        "{reasons:?}"
    );
    assert_eq!(layer_of(&steady), Some(2));
    assert!(steady.problems().is_empty(), "{:?}", steady.problems());
}

#[test]
fn simulcast_switches_renegotiate_caps_without_decoder_errors() {
    let _serial = one_at_a_time();
    let topic = unique_topic("simulcast");
    // 640x480 input: rungs 480x360 (layer 0) and 640x480 (layer 1).
    let (_publisher, addr) = start_publisher(
        "videotestsrc is-live=true ! video/x-raw,width=640,height=480,framerate=30/1",
        &topic,
        "layers=simulcast video-bitrate=800",
    );
    let (viewer, frames) = start_viewer(&topic, &addr, "auto-layer=false layer=0");
    let last_size = || frames.lock().unwrap().last().map(Seen::video_size);
    assert!(wait_for(&frames, 10, JOIN));
    assert_eq!(last_size(), Some((480, 360)));

    let src: gst::Element = viewer.by_name("view");
    src.set_property("layer", 1i32);
    assert!(
        eventually(Duration::from_secs(15), || last_size() == Some((640, 480))),
        "no switch up: {}",
        viewer.stats("view")
    );
    src.set_property("layer", 0i32);
    assert!(
        eventually(Duration::from_secs(15), || last_size() == Some((480, 360))),
        "no switch down: {}",
        viewer.stats("view")
    );
    // Every frame is whole at the size its caps say, and nothing complained.
    let frames = frames.lock().unwrap();
    assert!(frames.iter().all(Seen::is_whole_video_frame));
    let sizes: Vec<_> = frames.iter().map(Seen::video_size).collect();
    let changes = sizes.windows(2).filter(|pair| pair[0] != pair[1]).count();
    assert_eq!(changes, 2, "one switch up, one down");
    assert!(viewer.problems().is_empty(), "{:?}", viewer.problems());
}

#[test]
fn encoded_inputs_become_the_layers_of_one_track() {
    let _serial = one_at_a_time();
    let topic = unique_topic("inputs");
    init();
    // Two encodes of one source; the smaller one arrives on the second pad, and is still
    // layer 0 (layers go lightest first by size).
    let publisher = Running::start(launch(&format!(
        "p2plivesink name=pub topic={topic} {LOOPBACK} simulcast-inputs=true \
         videotestsrc is-live=true ! video/x-raw,width=320,height=240,framerate=30/1 ! tee name=t \
         t. ! queue ! vp8enc deadline=1 keyframe-max-dist=15 ! pub.video_0 \
         t. ! queue ! videoscale ! video/x-raw,width=160,height=120 \
            ! vp8enc deadline=1 keyframe-max-dist=15 ! pub.video_1"
    )));
    let addr = publisher.listening_addr("pub", JOIN);
    let (viewer, frames) = start_viewer(&topic, &addr, "auto-layer=false layer=0");
    let last_size = || frames.lock().unwrap().last().map(Seen::video_size);
    assert!(wait_for(&frames, 10, JOIN));
    assert_eq!(last_size(), Some((160, 120)));
    let src: gst::Element = viewer.by_name("view");
    src.set_property("layer", 1i32);
    assert!(
        eventually(Duration::from_secs(15), || last_size() == Some((320, 240))),
        "no switch: {}",
        viewer.stats("view")
    );
    // One track with two layers, not two tracks.
    assert!(src.static_pad("video_1").is_none());
    assert!(viewer.problems().is_empty(), "{:?}", viewer.problems());
}

#[test]
fn a_joining_viewer_gets_a_keyframe_forced_for_it() {
    let _serial = one_at_a_time();
    let topic = unique_topic("keyframe");
    // Keyframes only every 10 s on their own: a viewer joining after the first one can start
    // soon only because its request forces one.
    init();
    let publisher = Running::start(launch(&format!(
        "videotestsrc is-live=true ! video/x-raw,width=320,height=240,framerate=30/1 \
         ! p2plivesink name=pub topic={topic} {LOOPBACK} keyframe-interval=10000"
    )));
    let addr = publisher.listening_addr("pub", JOIN);
    std::thread::sleep(Duration::from_millis(1500));
    let (viewer, frames) = start_viewer(&topic, &addr, "");
    assert!(
        wait_for(&frames, 5, Duration::from_secs(6)),
        "no frames before the next regular keyframe: {}",
        viewer.stats("view")
    );
    let stats = publisher.stats("pub");
    assert!(
        stats.get::<u64>("forced-keyframes").unwrap() >= 1,
        "{stats}"
    );
    assert!(viewer.problems().is_empty(), "{:?}", viewer.problems());
}
