//! Helpers for the end-to-end element tests: real pipelines, real libp2p nodes on 127.0.0.1.
#![allow(dead_code)] // each test binary uses a different subset

use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use gst::prelude::*;

/// Loopback only, QUIC and TCP, random ports; no mDNS, no DHT (peers are given explicitly).
pub const LOOPBACK: &str =
    "listen=/ip4/127.0.0.1/udp/0/quic-v1,/ip4/127.0.0.1/tcp/0 mdns=false kademlia=false";

pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        gst::init().expect("GStreamer initialises");
        gstp2plive::plugin_register_static().expect("p2plive plugin registers");
    });
}

/// A topic no other test uses, so tests running in parallel never see each other's streams.
pub fn unique_topic(name: &str) -> String {
    format!("{name}-{:016x}", rand::random::<u64>())
}

pub fn launch(description: &str) -> gst::Pipeline {
    gst::parse::launch(description)
        .unwrap_or_else(|e| panic!("pipeline '{description}' parses: {e}"))
        .downcast()
        .expect("a pipeline")
}

/// Stops the pipeline when dropped, so a failing assertion does not leak a running node.
pub struct Running(pub gst::Pipeline);

impl Running {
    pub fn start(pipeline: gst::Pipeline) -> Self {
        pipeline
            .set_state(gst::State::Playing)
            .expect("pipeline starts");
        Running(pipeline)
    }

    pub fn by_name<T: IsA<gst::Element>>(&self, name: &str) -> T {
        self.0
            .by_name(name)
            .unwrap_or_else(|| panic!("element {name}"))
            .downcast()
            .expect("element type")
    }

    /// Waits for the `p2plive-listening` message of element `name` and returns an address of
    /// it that a viewer can bootstrap from.
    pub fn listening_addr(&self, name: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let bus = self.0.bus().expect("pipeline bus");
        while let Some(remaining) = deadline.checked_duration_since(Instant::now()) {
            let Some(message) =
                bus.timed_pop(gst::ClockTime::from_nseconds(remaining.as_nanos() as u64))
            else {
                break;
            };
            match message.view() {
                gst::MessageView::Element(element)
                    if message.src().map(|s| s.name() == name).unwrap_or(false) =>
                {
                    let structure = element.structure().expect("element message structure");
                    if structure.name() == "p2plive-listening" {
                        let addrs: String = structure.get("multiaddrs").expect("multiaddrs field");
                        let peer_id: String = structure.get("peer-id").expect("peer-id field");
                        let first = addrs.split(',').next().expect("an address").to_string();
                        assert!(
                            first.ends_with(&format!("/p2p/{peer_id}")),
                            "{first} names {peer_id}"
                        );
                        return first;
                    }
                }
                gst::MessageView::Error(err) => panic!("error before listening: {err:?}"),
                _ => {}
            }
        }
        panic!("{name} did not report listening within {timeout:?}");
    }

    /// Waits for end of stream; returns false on timeout. Panics on an error message.
    pub fn wait_eos(&self, timeout: Duration) -> bool {
        let bus = self.0.bus().expect("pipeline bus");
        let deadline = Instant::now() + timeout;
        while let Some(remaining) = deadline.checked_duration_since(Instant::now()) {
            let Some(message) = bus.timed_pop_filtered(
                gst::ClockTime::from_nseconds(remaining.as_nanos() as u64),
                &[gst::MessageType::Eos, gst::MessageType::Error],
            ) else {
                return false;
            };
            match message.view() {
                gst::MessageView::Eos(_) => return true,
                gst::MessageView::Error(err) => panic!("pipeline error: {err:?}"),
                _ => {}
            }
        }
        false
    }

    /// Error and warning messages posted so far (drains the bus).
    pub fn problems(&self) -> Vec<String> {
        let bus = self.0.bus().expect("pipeline bus");
        let mut problems = Vec::new();
        while let Some(message) =
            bus.pop_filtered(&[gst::MessageType::Error, gst::MessageType::Warning])
        {
            problems.push(format!("{message:?}"));
        }
        problems
    }

    pub fn stats(&self, name: &str) -> gst::Structure {
        self.by_name::<gst::Element>(name).property("stats")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.set_state(gst::State::Null);
    }
}

/// A buffer as seen at a probe or an appsink.
#[derive(Debug, Clone)]
pub struct Seen {
    pub data: Vec<u8>,
    pub pts: Option<gst::ClockTime>,
    pub keyframe: bool,
    pub caps: Option<gst::Caps>,
    /// The publisher's stream time from the `timestamp/x-p2plive-stream` reference meta.
    pub stream_time: Option<gst::ClockTime>,
}

impl Seen {
    /// Width and height from the caps of a raw video buffer.
    pub fn video_size(&self) -> (u32, u32) {
        let info = gst_video::VideoInfo::from_caps(self.caps.as_ref().expect("caps"))
            .expect("raw video caps");
        (info.width(), info.height())
    }

    /// Whether the buffer holds exactly one whole frame of its raw video caps.
    pub fn is_whole_video_frame(&self) -> bool {
        gst_video::VideoInfo::from_caps(self.caps.as_ref().expect("caps"))
            .is_ok_and(|info| info.size() == self.data.len())
    }

    fn of(buffer: &gst::BufferRef, caps: Option<gst::Caps>) -> Self {
        let stream_time = buffer
            .iter_meta::<gst::ReferenceTimestampMeta>()
            .find(|m| {
                m.reference()
                    .structure(0)
                    .map(|s| s.name() == "timestamp/x-p2plive-stream")
                    .unwrap_or(false)
            })
            .map(|m| m.timestamp());
        Seen {
            data: buffer
                .map_readable()
                .map(|m| m.to_vec())
                .unwrap_or_default(),
            pts: buffer.pts(),
            keyframe: !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT),
            caps,
            stream_time,
        }
    }
}

pub type Log = Arc<Mutex<Vec<Seen>>>;

/// Records every buffer passing `pad`.
pub fn record_pad(pad: &gst::Pad) -> Log {
    let log: Log = Arc::default();
    let sink = log.clone();
    pad.add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
        if let Some(buffer) = info.buffer() {
            sink.lock()
                .unwrap()
                .push(Seen::of(buffer, pad.current_caps()));
        }
        gst::PadProbeReturn::Ok
    });
    log
}

/// Records every sample reaching `appsink`.
pub fn record_appsink(appsink: &gst_app::AppSink) -> Log {
    let log: Log = Arc::default();
    let sink = log.clone();
    appsink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |appsink| {
                let sample = appsink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                if let Some(buffer) = sample.buffer() {
                    sink.lock()
                        .unwrap()
                        .push(Seen::of(buffer, sample.caps().map(|c| c.to_owned())));
                }
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );
    log
}

/// Waits until `log` holds at least `count` entries; false on timeout.
pub fn wait_for(log: &Log, count: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if log.lock().unwrap().len() >= count {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    log.lock().unwrap().len() >= count
}

/// The headline of the error a pipeline posts when it fails to start (not its debug text).
pub fn start_error(pipeline: &gst::Pipeline) -> String {
    let result = pipeline.set_state(gst::State::Playing);
    let bus = pipeline.bus().expect("bus");
    let message = bus
        .timed_pop_filtered(gst::ClockTime::from_seconds(5), &[gst::MessageType::Error])
        .expect("an error message");
    let _ = pipeline.set_state(gst::State::Null);
    assert!(result.is_err(), "start should fail");
    match message.view() {
        // The headline alone (what gst-launch shows first), not the debug text.
        gst::MessageView::Error(err) => err.error().to_string(),
        _ => unreachable!(),
    }
}
