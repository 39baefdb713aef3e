//! A viewer frozen (SIGSTOP) while the publisher keeps sending: the publisher's memory stays
//! bounded (the frozen peer's send queue is bounded in bytes and drops the excess for that
//! peer alone), and the viewer, resumed, notices its own stall and plays on without moving
//! its clock. The viewer is a real `gst-launch-1.0` process; this file is its own test binary
//! so that the publisher's memory is measured in a process doing nothing else.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use gst::prelude::*;

const JOIN: Duration = Duration::from_secs(30);
const FREEZE: Duration = Duration::from_secs(15);

/// Resident set size of this process, bytes (Linux).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .expect("VmRSS")
        * 1024
}

/// A directory holding only the plugin cargo built for this test binary, for
/// `GST_PLUGIN_PATH`. `cargo test` leaves it in `target/<profile>/deps/` beside many other
/// shared objects (proc macros among them) that GStreamer must not try to load, and puts it
/// in `target/<profile>/` only after a `cargo build`: a link to it goes in a fresh directory.
fn plugin_dir() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps dir");
    let plugin = [
        deps.join("libgstp2plive.so"),
        deps.join("../libgstp2plive.so"),
    ]
    .into_iter()
    .find(|candidate| candidate.exists())
    .unwrap_or_else(|| panic!("no libgstp2plive.so in or above {}", deps.display()));
    let dir = std::env::temp_dir().join(format!("p2plive-plugin-{}", unique_topic("dir")));
    std::fs::create_dir_all(&dir).expect("plugin dir");
    std::os::unix::fs::symlink(
        plugin.canonicalize().expect("plugin path"),
        dir.join("libgstp2plive.so"),
    )
    .expect("link to the plugin");
    dir
}

/// A `gst-launch-1.0 -m` viewer whose `p2plive-stats` lines are kept as they come.
struct ViewerProcess {
    child: Child,
    /// The `GST_PLUGIN_PATH` made for it, removed with it.
    plugin_dir: std::path::PathBuf,
    stats: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl ViewerProcess {
    fn spawn(topic: &str, bootstrap: &str) -> Self {
        let plugin_dir = plugin_dir();
        let mut child = Command::new("gst-launch-1.0")
            .args(["-m", "p2plivesrc", "name=view"])
            .arg(format!("topic={topic}"))
            .arg(format!("bootstrap={bootstrap}"))
            .args([
                "listen=/ip4/127.0.0.1/tcp/0",
                "mdns=false",
                "kademlia=false",
                "decode=false",
                "stats-interval=250",
                "!",
                "fakesink",
                "sync=true",
            ])
            .env("GST_PLUGIN_PATH", &plugin_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("gst-launch-1.0 starts");
        let stdout = child.stdout.take().expect("stdout");
        let stats: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let sink = stats.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("p2plive-stats") {
                    sink.lock().unwrap().push((Instant::now(), line));
                }
            }
        });
        ViewerProcess {
            child,
            plugin_dir,
            stats,
        }
    }

    /// A counter of the latest stats line (`name=(guint64)N`).
    fn counter(&self, name: &str) -> Option<u64> {
        let stats = self.stats.lock().unwrap();
        let (_, line) = stats.last()?;
        field(line, name)
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill({signal})");
    }

    /// Waits until `counter` reaches `at_least`; false on timeout.
    fn wait_counter(&self, name: &str, at_least: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.counter(name).is_some_and(|value| value >= at_least) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for ViewerProcess {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.plugin_dir);
    }
}

/// `name=(guint64)N` in a printed structure.
fn field(line: &str, name: &str) -> Option<u64> {
    let start = line.find(&format!(" {name}=(guint64)"))? + name.len() + 11;
    let digits: String = line[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[test]
fn frozen_viewer_costs_the_publisher_bounded_memory_and_resumes() {
    init();
    let topic = unique_topic("frozen");
    // Noise does not compress: x264 really sends ~4 Mbit/s, ~7.5 MB over the freeze.
    let pipeline = launch(&format!(
        "videotestsrc is-live=true pattern=snow ! video/x-raw,width=320,height=240,framerate=30/1 \
         ! x264enc tune=zerolatency speed-preset=ultrafast bitrate=4000 key-int-max=30 \
         ! video/x-h264,stream-format=byte-stream,alignment=au \
         ! p2plivesink name=pub topic={topic} {LOOPBACK}"
    ));
    let publisher = Running::start(pipeline);
    publisher.listening_addr("pub", JOIN);
    // The viewer dials TCP, so its backlog sits in one TCP connection.
    let addr = publisher
        .by_name::<gst::Element>("pub")
        .property::<String>("multiaddrs")
        .split(',')
        .find(|a| a.starts_with("/ip4/127.0.0.1/tcp/"))
        .expect("a TCP address")
        .to_string();
    let viewer = ViewerProcess::spawn(&topic, &addr);
    assert!(
        viewer.wait_counter("frames-output", 60, JOIN),
        "the viewer plays: {:?}",
        viewer.stats.lock().unwrap().last()
    );

    let rss_before = rss_bytes();
    viewer.signal(libc::SIGSTOP);
    let mut rss_peak = rss_before;
    let frozen_until = Instant::now() + FREEZE;
    while Instant::now() < frozen_until {
        std::thread::sleep(Duration::from_millis(250));
        rss_peak = rss_peak.max(rss_bytes());
    }
    let publisher_stats = publisher.stats("pub");
    let sent = publisher_stats.get::<u64>("payload-bytes").unwrap();
    // Gossipsub's queue (`send-queue-drops`); with data-plane=trees, the data plane's per-peer
    // queue sheds instead (`media-shed`, absent otherwise).
    let drops = publisher_stats.get::<u64>("send-queue-drops").unwrap()
        + publisher_stats.get::<u64>("media-shed").unwrap_or(0);
    let growth = rss_peak.saturating_sub(rss_before);
    eprintln!(
        "publisher RSS {} MB -> peak {} MB during the freeze (+{} MB); {} MB published in all; \
         {drops} messages dropped for the frozen peer",
        rss_before >> 20,
        rss_peak >> 20,
        growth >> 20,
        sent >> 20
    );
    assert!(drops > 0, "the frozen peer's queue overflowed and dropped");
    // The queue is bounded at 4 MiB; socket buffers and allocator slack add a few more.
    assert!(growth < 16 << 20, "publisher grew {} MB", growth >> 20);

    let output_before = viewer.counter("frames-output").unwrap_or(0);
    let rebases_before = viewer.counter("rebases").unwrap_or(0);
    viewer.signal(libc::SIGCONT);
    // Plays again within latency + one GOP (1 s at key-int-max=30) and some slack.
    assert!(
        viewer.wait_counter("frames-output", output_before + 30, Duration::from_secs(6)),
        "plays after the freeze: {:?}",
        viewer.stats.lock().unwrap().last()
    );
    std::thread::sleep(Duration::from_millis(500));
    // The backlog was put down to the stall: late, but the clock did not move for it.
    assert!(viewer.counter("local-stalls").unwrap_or(0) >= 1);
    assert!(viewer.counter("frames-late-local").unwrap_or(0) > 0);
    assert_eq!(
        viewer.counter("rebases"),
        Some(rebases_before),
        "the backlog moved the clock"
    );
    assert_eq!(viewer.counter("publisher-lost"), Some(0));
}
