//! The `p2plive-node` binary as an operator runs it, with real pipelines on 127.0.0.1: viewers
//! that know only the node's address and the stream name, the edge forwarder, `/metrics`,
//! private networks (pre-shared key) and a clean stop on SIGTERM.

mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use gst::prelude::*;

const JOIN: Duration = Duration::from_secs(20);
/// Loopback only, TCP, random ports; no mDNS; the DHT on (discovery by stream name).
const LOOPBACK_DHT: &str = "listen=/ip4/127.0.0.1/tcp/0 mdns=false kademlia=true";

/// A running `p2plive-node`; SIGKILLed when dropped if still running.
struct NodeProcess {
    child: Child,
    /// Its first listen address (ends in /p2p/<id>).
    addr: String,
    /// Its metrics address, if it serves metrics.
    metrics: Option<String>,
    /// Its log (standard error), as read so far.
    log: mpsc::Receiver<String>,
}

impl NodeProcess {
    fn start(args: &[&str]) -> Self {
        Self::start_listening("/ip4/127.0.0.1/tcp/0", args)
    }

    fn start_listening(listen: &str, args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_p2plive-node"))
            .args(["--listen", listen, "--metrics", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("p2plive-node starts");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut addr = String::new();
        stdout
            .read_line(&mut addr)
            .expect("reads the first address");
        // Drain the other address lines so the node never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = stdout.read_to_string(&mut rest);
        });
        let mut node = NodeProcess {
            child,
            addr: addr.trim().to_owned(),
            metrics: None,
            log,
        };
        assert!(node.addr.contains("/p2p/"), "address line: {:?}", node.addr);
        node.metrics = node
            .wait_log("metrics on http://", Duration::from_secs(5))
            .and_then(|line| {
                let start = line.find("http://")?;
                Some(line[start..].trim().to_owned())
            });
        node
    }

    /// The first log line containing `needle` within `timeout`.
    fn wait_log(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Some(line),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }

    /// `GET /metrics` as text.
    fn scrape(&self) -> String {
        let url = self.metrics.as_ref().expect("metrics served");
        let rest = url.strip_prefix("http://").expect("http url");
        let (host, path) = rest.split_once('/').expect("a path");
        let mut stream = std::net::TcpStream::connect(host).expect("connects to /metrics");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        write!(
            stream,
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("reads");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        response
    }

    /// The value of an unlabelled metric.
    fn metric(&self, name: &str) -> f64 {
        let text = self.scrape();
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} in\n{text}"))
            .trim()
            .parse()
            .expect("a number")
    }

    /// SIGTERM, then the exit status within `timeout`.
    fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("waits") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn viewer(topic: &str, bootstrap: &str, name: &str, extra: &str) -> (Running, Log) {
    let viewer = Running::start(launch(&format!(
        "p2plivesrc name={name} topic={topic} bootstrap={bootstrap} decode=false {LOOPBACK_DHT} \
         {extra} ! appsink name=out sync=false"
    )));
    let frames = record_appsink(&viewer.by_name("out"));
    (viewer, frames)
}

#[test]
fn viewers_find_a_stream_by_name_through_the_node_which_forwards_and_exports_metrics() {
    init();
    let topic = unique_topic("deploy");
    let mut node = NodeProcess::start(&["--forward", &topic, "--upload-capacity", "20000"]);

    // Everyone knows only the node's address and the stream name.
    let publisher = Running::start(launch(&format!(
        "videotestsrc is-live=true ! video/x-raw,width=320,height=240,framerate=30/1 \
         ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=15 \
         ! video/x-h264,stream-format=byte-stream,alignment=au \
         ! p2plivesink name=pub topic={topic} bootstrap={} {LOOPBACK_DHT}",
        node.addr
    )));
    let (first, first_frames) = viewer(&topic, &node.addr, "a", "");
    let (second, second_frames) = viewer(&topic, &node.addr, "b", "");
    for (name, frames) in [("a", &first_frames), ("b", &second_frames)] {
        assert!(
            wait_for(frames, 30, JOIN),
            "viewer {name} got {} frames",
            frames.lock().unwrap().len()
        );
    }
    // The viewers found peers of the stream beyond the node (the publisher or each other).
    for (name, running) in [("a", &first), ("b", &second)] {
        let stats = running.stats(name);
        assert!(
            stats.get::<u64>("connected-peers").unwrap() >= 2,
            "viewer {name} knows more than the node: {stats}"
        );
    }
    assert!(
        publisher.problems().is_empty(),
        "{:?}",
        publisher.problems()
    );

    // The node forwards the stream and says so on /metrics.
    assert_eq!(node.metric("p2plive_streams"), 1.0);
    assert!(node.metric("p2plive_connected_peers") >= 3.0);
    let deadline = Instant::now() + JOIN;
    while node.metric("p2plive_media_frames_received_total") == 0.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        node.metric("p2plive_media_frames_received_total") > 0.0,
        "the forwarder receives media:\n{}",
        node.scrape()
    );
    let text = node.scrape();
    for family in [
        "libp2p_bandwidth_bytes_total{protocols=\"/ip4/tcp\",direction=\"Inbound\"}",
        "p2plive_relay_reservations ",
        "p2plive_relay_circuits ",
        "libp2p_swarm_connections_established_total",
    ] {
        assert!(text.contains(family), "{family} in\n{text}");
    }

    drop((first, second, publisher));
    let status = node.terminate(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM stops the node cleanly: {status:?}"
    );
}

/// Writes a swarm key with `p2plive-node --generate-psk`.
fn generate_psk(dir: &std::path::Path, name: &str) -> String {
    let path = dir.join(name);
    let output = Command::new(env!("CARGO_BIN_EXE_p2plive-node"))
        .arg("--generate-psk")
        .arg(&path)
        .output()
        .expect("runs");
    assert!(output.status.success(), "{output:?}");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.starts_with("/key/swarm/psk/1.0.0/\n/base16/\n"),
        "{text}"
    );
    // It never overwrites a key.
    let again = Command::new(env!("CARGO_BIN_EXE_p2plive-node"))
        .arg("--generate-psk")
        .arg(&path)
        .output()
        .expect("runs");
    assert!(!again.status.success());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    path.display().to_string()
}

/// The warnings on `running`'s bus within `timeout`, until one contains `needle`.
fn wait_warning(running: &Running, needle: &str, timeout: Duration) -> Result<String, Vec<String>> {
    let bus = running.0.bus().unwrap();
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Some(message) = bus.timed_pop_filtered(
            gst::ClockTime::from_nseconds(left.as_nanos() as u64),
            &[gst::MessageType::Warning],
        ) else {
            break;
        };
        if let gst::MessageView::Warning(warning) = message.view() {
            let text = warning.error().to_string();
            if text.contains(needle) {
                return Ok(text);
            }
            seen.push(text);
        }
    }
    Err(seen)
}

#[test]
fn a_private_network_refuses_peers_without_its_key_and_says_why() {
    init();
    let dir = std::env::temp_dir().join(format!("p2plive-psk-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = generate_psk(&dir, "swarm.key");
    let other = generate_psk(&dir, "other.key");
    let node = NodeProcess::start(&["--psk-file", &key]);
    let topic = unique_topic("psk");

    let (member, _) = viewer(&topic, &node.addr, "m", &format!("psk-file={key}"));
    let (stranger, _) = viewer(&topic, &node.addr, "s", &format!("psk-file={other}"));
    let (public, _) = viewer(&topic, &node.addr, "p", "");

    // The member connects; the others are refused, each with a message naming the cause.
    let deadline = Instant::now() + JOIN;
    while member.stats("m").get::<u64>("connected-peers").unwrap() == 0 && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(member.stats("m").get::<u64>("connected-peers").unwrap(), 1);
    let refused = wait_warning(&stranger, "private network", JOIN);
    assert!(refused.is_ok(), "warnings: {refused:?}");
    let refused = wait_warning(&public, "pre-shared key", JOIN);
    assert!(refused.is_ok(), "warnings: {refused:?}");
    assert_eq!(
        stranger.stats("s").get::<u64>("connected-peers").unwrap(),
        0
    );
    assert_eq!(public.stats("p").get::<u64>("connected-peers").unwrap(), 0);

    // A bad key file fails the element's start with the file's name and the expected format.
    std::fs::write(dir.join("bad.key"), "not a key\n").unwrap();
    let bad = launch(&format!(
        "p2plivesrc topic={topic} psk-file={} {LOOPBACK_DHT} ! fakesink",
        dir.join("bad.key").display()
    ));
    let error = start_error(&bad);
    assert!(
        error.contains("bad.key") && error.contains("/key/swarm/psk/1.0.0/"),
        "{error}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The value of `metric` on `node` once `done` holds for it, polled every 100 ms, with the
/// time that took; `None` after `timeout`.
fn wait_metric(
    node: &NodeProcess,
    metric: &str,
    done: impl Fn(f64) -> bool,
    timeout: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if done(node.metric(metric)) {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

#[test]
fn a_peer_that_vanishes_over_quic_is_dropped_within_seconds() {
    // A killed process closes nothing on QUIC (no FIN): its peers notice only by the idle
    // timeout. Viewers whose parents it was wait that long, so it must be seconds (3 s with
    // a keep-alive every 1 s), not libp2p-quic's default 10 s.
    init();
    const QUIC: &str = "/ip4/127.0.0.1/udp/0/quic-v1";
    let node = NodeProcess::start_listening(QUIC, &[]);
    assert!(node.addr.contains("/quic-v1/"), "{}", node.addr);
    let mut peer = NodeProcess::start_listening(QUIC, &["--bootstrap", &node.addr]);
    let connected = wait_metric(&node, "p2plive_connected_peers", |n| n >= 1.0, JOIN);
    assert!(connected.is_some(), "the peer never connected over QUIC");
    peer.child.kill().expect("SIGKILL");
    peer.child.wait().expect("reaped");
    let gone = wait_metric(
        &node,
        "p2plive_connected_peers",
        |n| n == 0.0,
        Duration::from_secs(15),
    );
    let gone = gone.expect("the dead peer still counted as connected after 15 s");
    assert!(
        gone < Duration::from_secs(7),
        "the dead peer was dropped after {gone:?}; the idle timeout is 3 s"
    );
}
