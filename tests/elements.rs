//! End to end: real GStreamer pipelines, real encoders and decoders, real libp2p nodes on
//! 127.0.0.1 (mDNS and DHT off, peers given explicitly).

mod common;

use std::time::Duration;

use common::*;
use gst::prelude::*;

const JOIN: Duration = Duration::from_secs(20);

/// A publisher of `source` (a pipeline fragment ending where the sink's pad is linked).
fn publisher(source: &str, topic: &str, extra: &str) -> (Running, String) {
    init();
    let pipeline = launch(&format!(
        "{source} ! p2plivesink name=pub topic={topic} {LOOPBACK} {extra}"
    ));
    let running = Running::start(pipeline);
    let addr = running.listening_addr("pub", JOIN);
    (running, addr)
}

fn h264_source(keyframe_every: u32) -> String {
    format!(
        "videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=30/1 \
         ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={keyframe_every} \
         ! video/x-h264,stream-format=byte-stream,alignment=au"
    )
}

#[test]
fn encoded_h264_arrives_bit_exact_and_in_order() {
    let topic = unique_topic("bitexact");
    let (publisher, addr) = publisher(&h264_source(15), &topic, "");
    let published = record_pad(
        &publisher
            .by_name::<gst::Element>("pub")
            .static_pad("video_0")
            .expect("video_0"),
    );

    let viewer = Running::start(launch(&format!(
        "p2plivesrc name=view topic={topic} bootstrap={addr} decode=false {LOOPBACK} \
         ! appsink name=out sync=false"
    )));
    let received = record_appsink(&viewer.by_name("out"));
    assert!(
        wait_for(&received, 60, JOIN),
        "viewer got {} frames",
        received.lock().unwrap().len()
    );

    let received = received.lock().unwrap().clone();
    let published = published.lock().unwrap().clone();
    assert!(received[0].keyframe, "playback starts at a keyframe");
    let start = published
        .iter()
        .position(|p| p.data == received[0].data)
        .expect("first received access unit was published");
    for (offset, frame) in received.iter().enumerate() {
        let original = &published[start + offset];
        assert_eq!(frame.data, original.data, "access unit {offset} differs");
        assert_eq!(
            frame.keyframe, original.keyframe,
            "keyframe flag of {offset}"
        );
    }
    for pair in received.windows(2) {
        assert!(
            pair[1].pts > pair[0].pts,
            "timestamps increase: {:?} then {:?}",
            pair[0].pts,
            pair[1].pts
        );
    }
    let caps = received[0].caps.as_ref().expect("caps");
    assert_eq!(caps.structure(0).unwrap().name(), "video/x-h264");
    assert!(viewer.problems().is_empty(), "{:?}", viewer.problems());
}

#[test]
fn raw_video_is_encoded_and_decoded_at_its_size() {
    let topic = unique_topic("raw");
    let (_publisher, addr) = publisher(
        "videotestsrc is-live=true ! video/x-raw,width=320,height=180,framerate=30/1",
        &topic,
        "keyframe-interval=500",
    );
    let viewer = Running::start(launch(&format!(
        "p2plivesrc name=view topic={topic} bootstrap={addr} {LOOPBACK} ! appsink name=out sync=false"
    )));
    let frames = record_appsink(&viewer.by_name("out"));
    assert!(
        wait_for(&frames, 30, JOIN),
        "viewer got {} frames",
        frames.lock().unwrap().len()
    );
    let frames = frames.lock().unwrap();
    for frame in frames.iter() {
        assert_eq!(frame.video_size(), (320, 180));
        assert!(frame.is_whole_video_frame(), "a whole decoded frame");
    }
    let stats = viewer.stats("view");
    assert!(stats.get::<u64>("frames-output").unwrap() >= 30, "{stats}");
    assert!(viewer.problems().is_empty(), "{:?}", viewer.problems());
}

/// A publisher, viewer B bootstrapping from it and viewer C knowing only B (mDNS and the DHT
/// are off), all on `data_plane`; returns them once C has played 30 frames, the first a
/// keyframe.
fn relay_chain(data_plane: &str) -> (Running, Running, Running) {
    let topic = unique_topic(&format!("relay-{data_plane}"));
    let (publisher, addr) = publisher(
        &h264_source(15),
        &topic,
        &format!("data-plane={data_plane}"),
    );
    let first = Running::start(launch(&format!(
        "p2plivesrc name=b topic={topic} bootstrap={addr} decode=false \
         data-plane={data_plane} {LOOPBACK} ! fakesink"
    )));
    let relay_addr = first.listening_addr("b", JOIN);
    let second = Running::start(launch(&format!(
        "p2plivesrc name=c topic={topic} bootstrap={relay_addr} decode=false \
         data-plane={data_plane} {LOOPBACK} ! appsink name=out sync=false"
    )));
    let frames = record_appsink(&second.by_name("out"));
    assert!(
        wait_for(&frames, 30, JOIN),
        "C got {} frames",
        frames.lock().unwrap().len()
    );
    assert!(frames.lock().unwrap()[0].keyframe);
    (publisher, first, second)
}

#[test]
fn viewer_plays_through_another_viewer() {
    let (_publisher, _first, second) = relay_chain("gossipsub");
    // On gossipsub C finds nobody else: everything it plays came through B.
    let stats = second.stats("c");
    assert_eq!(
        stats.get::<u64>("connected-peers").unwrap(),
        1,
        "C is connected to B only: {stats}"
    );
}

#[test]
fn viewer_plays_through_another_viewer_with_the_trees() {
    let (_publisher, first, _second) = relay_chain("trees");
    // C joins the trees through B (redirects may connect it to the publisher too); with one
    // publisher slot per stripe, B is C's parent in some stripes: B forwards.
    let relay = first.stats("b");
    assert!(
        relay.get::<u64>("shards-sent").unwrap() > 0
            && relay.get::<u64>("tree-children").unwrap() > 0,
        "B forwards media to C: {relay}"
    );
    // On loopback nothing is lost: the measured link loss is (near) 0, so no step down for
    // loss and no extra parity.
    let loss = relay.get::<u32>("shard-loss-permille").unwrap();
    assert!(loss < 50, "B measures {loss} ‰ lost on loopback: {relay}");
}

#[test]
fn late_joiner_starts_at_a_keyframe_and_decodes_cleanly() {
    let topic = unique_topic("late");
    // Keyframes every second; join mid-GOP after the stream has run for a while.
    let (_publisher, addr) = publisher(&h264_source(30), &topic, "");
    std::thread::sleep(Duration::from_millis(2300));
    let encoded = Running::start(launch(&format!(
        "p2plivesrc name=enc topic={topic} bootstrap={addr} decode=false {LOOPBACK} ! appsink name=out sync=false"
    )));
    let decoded = Running::start(launch(&format!(
        "p2plivesrc name=dec topic={topic} bootstrap={addr} {LOOPBACK} ! appsink name=out sync=false"
    )));
    let encoded_frames = record_appsink(&encoded.by_name("out"));
    let decoded_frames = record_appsink(&decoded.by_name("out"));
    assert!(wait_for(&encoded_frames, 45, JOIN));
    assert!(wait_for(&decoded_frames, 45, JOIN));
    assert!(
        encoded_frames.lock().unwrap()[0].keyframe,
        "first output frame is a keyframe"
    );
    assert!(
        decoded.problems().is_empty(),
        "decoder complained: {:?}",
        decoded.problems()
    );
    assert!(encoded.problems().is_empty(), "{:?}", encoded.problems());
}

#[test]
fn audio_and_video_stay_in_sync_and_end_together() {
    let topic = unique_topic("av");
    init();
    // Four seconds of audio and video, then the publisher ends the stream.
    let publisher = Running::start(launch(&format!(
        "p2plivesink name=pub topic={topic} {LOOPBACK} keyframe-interval=500 \
         videotestsrc is-live=true num-buffers=120 ! video/x-raw,width=160,height=120,framerate=30/1 ! pub.video_0 \
         audiotestsrc is-live=true num-buffers=200 samplesperbuffer=960 ! audio/x-raw,rate=48000,channels=2 ! pub.audio_0"
    )));
    let addr = publisher.listening_addr("pub", JOIN);
    let viewer = Running::start(launch(&format!(
        "p2plivesrc name=view topic={topic} bootstrap={addr} {LOOPBACK} auto-layer=false \
         view.video_0 ! queue ! appsink name=video sync=false \
         view.audio_0 ! queue ! appsink name=audio sync=false"
    )));
    let video = record_appsink(&viewer.by_name("video"));
    let audio = record_appsink(&viewer.by_name("audio"));
    assert!(
        viewer.wait_eos(Duration::from_secs(30)),
        "publisher EOS reaches the viewer"
    );
    assert!(publisher.wait_eos(Duration::from_secs(5)));

    let video = video.lock().unwrap();
    let audio = audio.lock().unwrap();
    assert!(video.len() >= 30, "video frames: {}", video.len());
    assert!(audio.len() >= 30, "audio buffers: {}", audio.len());
    let stats = viewer.stats("view");
    assert!(stats.get::<bool>("ended").unwrap());
    // The video's layer (the top of the default three temporal layers), not the audio's.
    assert_eq!(stats.get::<u32>("layer").unwrap(), 2, "{stats}");

    // Both tracks are placed on one timeline: a video frame and the audio buffer played
    // nearest to it have the same offset between viewer time and publisher stream time.
    // (Pairing neighbours keeps the check exact across clock rebases, which move both.)
    let timed = |log: &[Seen]| -> Vec<(i128, i128)> {
        log.iter()
            .filter_map(|s| {
                let pts = s.pts?.nseconds() as i128;
                Some((pts, pts - s.stream_time?.nseconds() as i128))
            })
            .collect()
    };
    let (video_timed, audio_timed) = (timed(&video), timed(&audio));
    assert!(
        !video_timed.is_empty() && !audio_timed.is_empty(),
        "stream time metas present"
    );
    let mut skews: Vec<i128> = video_timed
        .iter()
        .map(|(pts, offset)| {
            let nearest = audio_timed
                .iter()
                .min_by_key(|(audio_pts, _)| (audio_pts - pts).abs())
                .expect("audio buffers");
            (offset - nearest.1).abs()
        })
        .collect();
    skews.sort();
    let median_skew_ms = skews[skews.len() / 2] as f64 / 1e6;
    assert!(median_skew_ms < 1.0, "audio/video skew {median_skew_ms} ms");
}

#[test]
fn viewer_reports_its_latency_in_the_latency_query() {
    let topic = unique_topic("latency");
    let (_publisher, addr) = publisher(&h264_source(15), &topic, "");
    let viewer = Running::start(launch(&format!(
        "p2plivesrc name=view topic={topic} bootstrap={addr} decode=false latency=450 {LOOPBACK} \
         ! appsink name=out sync=false"
    )));
    let frames = record_appsink(&viewer.by_name("out"));
    assert!(wait_for(&frames, 5, JOIN));
    let mut query = gst::query::Latency::new();
    let src: gst::Element = viewer.by_name("view");
    assert!(
        src.static_pad("video_0")
            .expect("video_0")
            .query(&mut query)
    );
    let (live, min, _max) = query.result();
    assert!(live);
    assert_eq!(min, gst::ClockTime::from_mseconds(450));
}

#[test]
fn bad_properties_fail_with_clear_errors() {
    init();
    let cases = [
        (
            "videotestsrc ! p2plivesink listen=not-an-address",
            "not-an-address",
        ),
        (
            "p2plivesrc bootstrap=/ip4/127.0.0.1/tcp/1 ! fakesink",
            "/p2p/",
        ),
        ("p2plivesrc publisher=nobody ! fakesink", "peer id"),
        ("p2plivesrc topic=\"\" ! fakesink", "topic"),
        ("p2plivesrc topic=\" \" ! fakesink", "blank"),
        ("videotestsrc ! p2plivesink topic=\"news \"", "spaces"),
        (
            "p2plivesrc min-layer=2 max-layer=0 ! fakesink",
            "min-layer 2 is above",
        ),
    ];
    for (description, expected) in cases {
        let error = start_error(&launch(description));
        assert!(
            error.contains(expected),
            "'{description}': error '{error}' should mention '{expected}'"
        );
    }
}

/// The text of the first WARNING `running` posts within 5 s.
fn first_warning(running: &Running) -> Option<String> {
    running
        .0
        .bus()
        .expect("bus")
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(5),
            &[gst::MessageType::Warning],
        )
        .and_then(|m| match m.view() {
            gst::MessageView::Warning(w) => Some(w.error().to_string()),
            _ => None,
        })
}

/// A second sink given the port a first one listens on fails to start, saying the port is
/// in use, instead of sharing it (and its incoming connections) through `SO_REUSEPORT`; a
/// viewer told to drop every message warns that it will play nothing.
#[test]
fn a_port_in_use_and_a_total_simulated_loss_are_reported() {
    init();
    let topic = unique_topic("port");
    let first = Running::start(launch(&format!(
        "videotestsrc is-live=true ! video/x-raw,width=64,height=48 ! \
         p2plivesink name=pub topic={topic} listen=/ip4/127.0.0.1/tcp/0 mdns=false kademlia=false"
    )));
    let addr = first.listening_addr("pub", JOIN);
    let tcp = addr.split("/p2p/").next().expect("an address");
    let error = start_error(&launch(&format!(
        "videotestsrc is-live=true ! video/x-raw,width=64,height=48 ! \
         p2plivesink topic={topic} listen={tcp} mdns=false kademlia=false"
    )));
    assert!(
        error.contains("in use"),
        "'{error}' should say the port is in use"
    );

    let viewer = Running::start(launch(&format!(
        "p2plivesrc topic={topic} bootstrap={addr} simulated-loss=1.0 {LOOPBACK} ! fakesink"
    )));
    assert_total_loss_warning(&viewer, "set at launch");

    // Set while playing, too.
    let viewer = Running::start(launch(&format!(
        "p2plivesrc name=view topic={topic} bootstrap={addr} {LOOPBACK} ! fakesink"
    )));
    viewer
        .by_name::<gst::Element>("view")
        .set_property("simulated-loss", 1.0f64);
    assert_total_loss_warning(&viewer, "set while playing");
}

/// The viewer's first warning names `simulated-loss=1` (`when`: how it was set).
fn assert_total_loss_warning(viewer: &Running, when: &str) {
    let warning = first_warning(viewer);
    assert!(
        warning
            .as_deref()
            .is_some_and(|w| w.contains("simulated-loss=1")),
        "a warning about simulated-loss=1 {when}, got {warning:?}"
    );
}

#[test]
fn identity_file_keeps_the_peer_id() {
    init();
    let dir = std::env::temp_dir().join(format!("p2plive-identity-{:x}", rand::random::<u64>()));
    let file = dir.join("key");
    let peer_id = || {
        let element = gst::ElementFactory::make("p2plivesrc")
            .property("identity-file", file.to_str().unwrap())
            .property("mdns", false)
            .property("kademlia", false)
            .property("listen", "/ip4/127.0.0.1/tcp/0")
            .build()
            .unwrap();
        element.set_state(gst::State::Ready).unwrap();
        let id: String = element.property("peer-id");
        element.set_state(gst::State::Null).unwrap();
        id
    };
    let first = peer_id();
    assert!(file.exists());
    assert_eq!(peer_id(), first);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn every_property_is_documented() {
    init();
    for name in ["p2plivesink", "p2plivesrc"] {
        let element = gst::ElementFactory::make(name).build().unwrap();
        let properties = element.list_properties();
        for required in [
            "topic",
            "listen",
            "bootstrap",
            "identity-file",
            "mdns",
            "peer-id",
            "multiaddrs",
            "stats",
        ] {
            assert!(
                properties.iter().any(|p| p.name() == required),
                "{name} lacks {required}"
            );
        }
        for pspec in properties.iter().filter(|p| {
            p.owner_type() != gst::Object::static_type()
                && p.name() != "async-handling"
                && p.name() != "message-forward"
        }) {
            let blurb = pspec.blurb().unwrap_or_default();
            assert!(
                blurb.len() > 10,
                "{name}::{} has blurb '{blurb}'",
                pspec.name()
            );
        }
    }
    let src = gst::ElementFactory::make("p2plivesrc").build().unwrap();
    assert!(src.property::<bool>("decode"));
    assert!(src.property::<bool>("mdns"));
    assert_eq!(src.property::<u32>("latency"), 300);
}

#[test]
fn hostile_peer_cannot_inject_media_or_stop_the_stream() {
    use gstp2plive::core::Channel;
    use gstp2plive::core::wire::{self, Catalog, Fragment, FrameHeader, Message, Track, TrackKind};
    use gstp2plive::node::{Node, NodeConfig};

    let topic = unique_topic("hostile");
    let (_publisher, addr) = publisher(&h264_source(15), &topic, "");
    let viewer = Running::start(launch(&format!(
        "p2plivesrc name=view topic={topic} bootstrap={addr} decode=false {LOOPBACK} \
         ! appsink name=out sync=false"
    )));
    let viewer_addr = viewer.listening_addr("view", JOIN);
    let frames = record_appsink(&viewer.by_name("out"));
    assert!(
        wait_for(&frames, 10, JOIN),
        "the stream plays before the attack"
    );

    // A peer of the mesh that publishes garbage, a forged catalog and forged fragments.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut config = NodeConfig::new(libp2p::identity::Keypair::generate_ed25519());
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    config.bootstrap = vec![viewer_addr.parse().unwrap()];
    config.mdns = false;
    config.kademlia = false;
    let (attacker, _events) = Node::spawn(config, runtime.handle()).unwrap();
    let media = Channel::Media { track: 0, layer: 0 };
    attacker.join_stream(&topic, None, vec![media]).unwrap();
    let forged_catalog = wire::encode(&Message::Catalog(Catalog {
        epoch: 1,
        topic: topic.clone(),
        tracks: vec![Track {
            id: 0,
            kind: TrackKind::Video as i32,
            caps: "video/x-h264,stream-format=byte-stream,alignment=au".into(),
            layers: vec![],
        }],
        ..Default::default()
    }));
    let before = frames.lock().unwrap().len();
    for sequence in 0..60u64 {
        let forged_frame = wire::encode(&Message::Fragment(Fragment {
            epoch: 1,
            track: 0,
            layer: 0,
            sequence,
            index: 0,
            count: 1,
            header: Some(FrameHeader {
                pts_ns: Some(sequence * 33_000_000),
                keyframe: true,
                frame_size: 4,
                ..Default::default()
            }),
            payload: vec![0xde, 0xad, 0xbe, 0xef].into(),
        }));
        let _ = attacker.publish(&topic, Channel::Control, forged_catalog.clone());
        let _ = attacker.publish(&topic, media, forged_frame);
        let _ = attacker.publish(&topic, media, vec![0xff; 64]);
        // Media goes on the data plane, where forged media is refused without a valid
        // manifest (src/core/dataplane/tests.rs); garbage on the control channel too.
        let _ = attacker.publish(&topic, Channel::Control, vec![0xff; 64]);
        std::thread::sleep(Duration::from_millis(50));
    }

    assert!(
        wait_for(&frames, before + 30, JOIN),
        "the stream keeps playing under attack"
    );
    let stats = viewer.stats("view");
    let rejected: u64 = stats.get("messages-rejected").unwrap();
    let ignored: u64 = stats.get("messages-ignored").unwrap();
    assert!(rejected > 0, "garbage was counted as rejected: {stats}");
    assert!(
        ignored > 0,
        "forged messages were counted as ignored: {stats}"
    );
    assert_eq!(
        stats.get::<u64>("restarts").unwrap(),
        0,
        "the forged epoch was not followed"
    );
    let forged = [0xde, 0xad, 0xbe, 0xef];
    assert!(
        frames.lock().unwrap().iter().all(|f| f.data != forged),
        "no forged frame was played"
    );
    attacker.shutdown(Duration::ZERO);
}

#[test]
fn unsupported_input_is_refused_clearly() {
    init();
    // Audio offered to a video pad, and a codec the sink does not carry, cannot link.
    for description in [
        "p2plivesink name=s audiotestsrc ! s.video_0",
        "videotestsrc ! theoraenc ! p2plivesink",
    ] {
        let error = gst::parse::launch(description)
            .err()
            .unwrap_or_else(|| panic!("'{description}' should not link"));
        assert!(error.to_string().contains("link"), "{description}: {error}");
    }
}

/// A source that sets no caps (fakesrc) fails with the sink's own error, which says what is
/// missing; before, GStreamer's capsfilter inside the sink asserted (a CRITICAL) and only
/// the source's "Internal data stream error" followed.
#[test]
fn data_without_caps_fails_with_a_clear_error() {
    init();
    let pipeline = launch(&format!(
        "fakesrc num-buffers=5 ! p2plivesink topic={} {LOOPBACK}",
        unique_topic("nocaps")
    ));
    let _ = pipeline.set_state(gst::State::Playing);
    let message = pipeline
        .bus()
        .expect("bus")
        .timed_pop_filtered(gst::ClockTime::from_seconds(10), &[gst::MessageType::Error])
        .expect("an error message");
    let _ = pipeline.set_state(gst::State::Null);
    let gst::MessageView::Error(err) = message.view() else {
        unreachable!()
    };
    assert!(
        err.error().to_string().contains("without caps"),
        "{} ({:?})",
        err.error(),
        err.debug()
    );
}

#[test]
fn all_tracks_are_announced_together_before_no_more_pads() {
    let topic = unique_topic("together");
    init();
    // Audio starts 300 ms after video: announcing each track on its first frame would give
    // a viewer already watching a catalog with video only, and `no-more-pads` before the
    // audio pad exists (gst-launch then fails to link it).
    let publisher = Running(launch(&format!(
        "p2plivesink name=pub topic={topic} {LOOPBACK} \
         videotestsrc is-live=true ! video/x-raw,width=160,height=120,framerate=30/1 ! pub.video_0 \
         audiotestsrc is-live=true ! queue min-threshold-time=300000000 max-size-time=0 \
            max-size-buffers=0 max-size-bytes=0 ! pub.audio_0"
    )));
    // READY: the node listens, no media flows yet.
    publisher.0.set_state(gst::State::Ready).unwrap();
    let addr = publisher.listening_addr("pub", JOIN);
    let pipeline = launch(&format!(
        "p2plivesrc name=view topic={topic} bootstrap={addr} decode=false {LOOPBACK} ! fakesink"
    ));
    let src = pipeline.by_name("view").expect("p2plivesrc");
    let (pads_tx, pads_rx) = std::sync::mpsc::channel();
    src.connect_no_more_pads(move |element| {
        let mut names: Vec<String> = element
            .src_pads()
            .iter()
            .map(|p| p.name().to_string())
            .collect();
        names.sort();
        let _ = pads_tx.send(names);
    });
    let viewer = Running::start(pipeline);
    // The viewer is in the mesh before the first frame is encoded.
    let deadline = std::time::Instant::now() + JOIN;
    while viewer
        .stats("view")
        .get::<u64>("connected-peers")
        .unwrap_or(0)
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "viewer never connected"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1000));
    publisher.0.set_state(gst::State::Playing).unwrap();
    let names = pads_rx.recv_timeout(JOIN).expect("no-more-pads");
    assert_eq!(names, ["audio_0", "video_0"]);
}

/// A publisher's pipeline stopped and dropped (as `gst-launch-1.0` does on Ctrl-C) logs no
/// errors. The bin removes its children before its request pads are released; the sink then
/// removed each element of the pad's chain a second time, and every shutdown logged "Element
/// '…' is not in bin" and "Failed to remove the element" four times (found by a fresh user's
/// `gst-launch-1.0` run, session 18).
#[test]
fn a_stopped_publisher_logs_no_errors() {
    init();
    let errors = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = errors.clone();
    gst::log::set_active(true);
    gst::log::set_threshold_for_name("GST_RUST", gst::DebugLevel::Error);
    let log =
        gst::log::add_log_function(move |_cat, level, _file, _func, _line, object, message| {
            let from_us = object.is_some_and(|o| o.to_string().contains("teardown"));
            if level <= gst::DebugLevel::Error && from_us {
                let text = message.get().map(|m| m.to_string()).unwrap_or_default();
                seen.lock().unwrap().push(text);
            }
        });
    let pipeline = launch(&format!(
        "{} ! p2plivesink name=teardown topic=teardown {LOOPBACK}",
        h264_source(30)
    ));
    pipeline.set_state(gst::State::Playing).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    pipeline.set_state(gst::State::Null).unwrap();
    drop(pipeline);
    gst::log::remove_log_function(log);
    let errors = errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "errors logged at shutdown: {errors:?}");
}
