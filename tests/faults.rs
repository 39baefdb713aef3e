//! Faults end to end: a publisher that vanishes without an end of stream, and EOS sent to a
//! source that never got a pad. Real pipelines and libp2p nodes on 127.0.0.1.

mod common;

use std::time::{Duration, Instant};

use common::*;
use gst::prelude::*;

const JOIN: Duration = Duration::from_secs(20);
/// The shortest allowed, so the tests are quick; the default is 5 s.
const TIMEOUT_MS: u32 = 2000;

/// A TCP port on 127.0.0.1 that was free a moment ago, so a restarted publisher can listen
/// where its viewers redial.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// A publisher with a fixed identity and port: the same peer at the same address each start.
fn publisher_pipeline(topic: &str, key: &std::path::Path, port: u16) -> gst::Pipeline {
    launch(&format!(
        "videotestsrc is-live=true pattern=ball ! video/x-raw,width=160,height=120,framerate=30/1 \
         ! p2plivesink name=pub topic={topic} keyframe-interval=500 \
         listen=/ip4/127.0.0.1/tcp/{port} mdns=false kademlia=false identity-file={}",
        key.display()
    ))
}

/// Waits for an element message named `name` from element `src`; returns it and when it came.
fn wait_element_message(
    pipeline: &gst::Pipeline,
    src: &str,
    name: &str,
    timeout: Duration,
) -> Option<(gst::Structure, Instant)> {
    let bus = pipeline.bus().expect("bus");
    let deadline = Instant::now() + timeout;
    while let Some(remaining) = deadline.checked_duration_since(Instant::now()) {
        let message = bus.timed_pop_filtered(
            gst::ClockTime::from_nseconds(remaining.as_nanos() as u64),
            &[gst::MessageType::Element, gst::MessageType::Error],
        )?;
        match message.view() {
            gst::MessageView::Element(element)
                if message.src().is_some_and(|s| s.name() == src) =>
            {
                let structure = element.structure().expect("structure");
                if structure.name() == name {
                    return Some((structure.to_owned(), Instant::now()));
                }
            }
            gst::MessageView::Error(err) => panic!("pipeline error: {err:?}"),
            _ => {}
        }
    }
    None
}

fn key_file(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("p2plive-{}", unique_topic(name)));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join("key")
}

#[test]
fn killed_publisher_is_reported_lost_and_playback_resumes_when_it_returns() {
    init();
    let topic = unique_topic("killed");
    let key = key_file("killed");
    let port = free_port();
    let publisher = Running::start(publisher_pipeline(&topic, &key, port));
    let addr = publisher.listening_addr("pub", JOIN);
    let viewer = Running::start(launch(&format!(
        "p2plivesrc name=view topic={topic} bootstrap={addr} decode=false \
         publisher-timeout={TIMEOUT_MS} {LOOPBACK} ! appsink name=out sync=false"
    )));
    let frames = record_appsink(&viewer.by_name("out"));
    assert!(wait_for(&frames, 20, JOIN), "viewer plays before the kill");

    // Killed: no end of stream, the node and its connections just go.
    let killed_at = Instant::now();
    publisher.0.set_state(gst::State::Null).expect("stops");
    let (lost, lost_at) = wait_element_message(
        &viewer.0,
        "view",
        "p2plive-publisher-lost",
        Duration::from_millis(u64::from(TIMEOUT_MS) + 5000),
    )
    .expect("p2plive-publisher-lost within the timeout");
    let after = lost_at - killed_at;
    assert!(
        after >= Duration::from_millis(u64::from(TIMEOUT_MS) - 200),
        "lost only {after:?} after the kill"
    );
    assert_eq!(lost.get::<String>("action").unwrap(), "wait");
    assert!(lost.get::<u64>("silent-ms").unwrap() >= u64::from(TIMEOUT_MS));
    // The WARNING follows the message from the same thread: give it a moment.
    let bus = viewer.0.bus().expect("bus");
    let warned = (0..40).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        std::iter::from_fn(|| bus.pop_filtered(&[gst::MessageType::Warning])).any(|m| {
            matches!(m.view(), gst::MessageView::Warning(w)
                if w.error().to_string().contains("Nothing from the publisher"))
        })
    });
    assert!(warned, "a WARNING saying why is posted");
    assert_eq!(viewer.0.current_state(), gst::State::Playing);
    let stats = viewer.stats("view");
    assert_eq!(stats.get::<&str>("publisher-state").unwrap(), "lost");

    // The same publisher (identity, address) starts again, as a new epoch.
    let played_before = frames.lock().unwrap().len();
    let restarted = Running::start(publisher_pipeline(&topic, &key, port));
    let (back, _) = wait_element_message(&viewer.0, "view", "p2plive-publisher-back", JOIN)
        .expect("p2plive-publisher-back once it returns");
    assert!(back.get::<u64>("lost-ms").unwrap() > 0);
    assert!(
        wait_for(&frames, played_before + 20, JOIN),
        "plays again: {} frames after {played_before}",
        frames.lock().unwrap().len()
    );
    let stats = viewer.stats("view");
    assert_eq!(stats.get::<&str>("publisher-state").unwrap(), "live");
    assert_eq!(stats.get::<u64>("publisher-lost").unwrap(), 1);
    drop(restarted);
    let _ = std::fs::remove_dir_all(key.parent().unwrap());
}

#[test]
fn publisher_timeout_action_eos_ends_the_stream() {
    init();
    let topic = unique_topic("killed-eos");
    let key = key_file("killed-eos");
    let publisher = Running::start(publisher_pipeline(&topic, &key, free_port()));
    let addr = publisher.listening_addr("pub", JOIN);
    let viewer = Running::start(launch(&format!(
        "p2plivesrc name=view topic={topic} bootstrap={addr} decode=false \
         publisher-timeout={TIMEOUT_MS} publisher-timeout-action=eos {LOOPBACK} \
         ! appsink name=out sync=false"
    )));
    let frames = record_appsink(&viewer.by_name("out"));
    assert!(wait_for(&frames, 10, JOIN), "viewer plays before the kill");
    publisher.0.set_state(gst::State::Null).expect("stops");
    assert!(
        viewer.wait_eos(Duration::from_millis(u64::from(TIMEOUT_MS) + 5000)),
        "EOS once the publisher is lost"
    );
    let _ = std::fs::remove_dir_all(key.parent().unwrap());
}

#[test]
fn eos_before_any_catalog_ends_the_stream() {
    init();
    // Nobody publishes this topic: the source never gets a pad, as with
    // `gst-launch-1.0 -e p2plivesrc ...` interrupted before the publisher appeared.
    let topic = unique_topic("nobody");
    let viewer = Running::start(launch(&format!(
        "p2plivesrc name=view topic={topic} {LOOPBACK} ! fakesink"
    )));
    std::thread::sleep(Duration::from_millis(300));
    assert!(viewer.by_name::<gst::Element>("view").src_pads().is_empty());
    assert!(viewer.0.send_event(gst::event::Eos::new()));
    assert!(
        viewer.wait_eos(Duration::from_secs(5)),
        "EOS reaches the application"
    );
}
