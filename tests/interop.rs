//! Interop: standard js-libp2p 2.x peers (tests/interop/js, npm packages pinned there) dial a
//! live p2plive stream on 127.0.0.1, subscribe to its control topic and stay for 25 s. One
//! runs js-libp2p's ping service, one does not; both must stay connected the whole time
//! (js-libp2p's connection monitor pings every 10 s and closes a connection whose ping is not
//! answered within 5 s) and receive the publisher's catalogs over gossipsub.
//!
//! Needs Node.js and npm (`scripts/test.sh` installs them where missing); the npm packages are
//! installed here with `npm ci` on first use. Without Node.js the test says so and passes
//! nothing off as tested: it fails unless `P2PLIVE_SKIP_JS_INTEROP=1` is set.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const STAY: Duration = Duration::from_secs(25);

fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/js")
}

/// Whether Node.js runs; installs the pinned npm packages if they are missing.
fn node_ready() -> bool {
    let version = Command::new("node").arg("--version").output();
    let Some(version) = version.ok().filter(|o| o.status.success()) else {
        return false;
    };
    eprintln!("node {}", String::from_utf8_lossy(&version.stdout).trim());
    if !js_dir().join("node_modules/libp2p").exists() {
        let status = Command::new("timeout")
            .args(["600", "npm", "ci", "--no-audit", "--no-fund"])
            .current_dir(js_dir())
            .status()
            .expect("runs npm");
        assert!(status.success(), "npm ci in tests/interop/js failed");
    }
    true
}

#[test]
fn js_libp2p_peers_stay_connected_to_a_live_stream_and_receive_its_catalog() {
    if !node_ready() {
        assert!(
            std::env::var_os("P2PLIVE_SKIP_JS_INTEROP").is_some(),
            "Node.js is not installed (scripts/test.sh installs it); set \
             P2PLIVE_SKIP_JS_INTEROP=1 to skip this test knowingly"
        );
        eprintln!("skipping: Node.js is not installed and P2PLIVE_SKIP_JS_INTEROP is set");
        return;
    }
    init();
    let topic = unique_topic("interop");
    // TCP only: js-libp2p's TCP transport, noise and yamux, as a browser-less JS peer has.
    let publisher = Running::start(launch(&format!(
        "videotestsrc is-live=true ! video/x-raw,width=160,height=120,framerate=15/1 \
         ! p2plivesink name=pub topic={topic} listen=/ip4/127.0.0.1/tcp/0 mdns=false \
         kademlia=false"
    )));
    let addr = publisher.listening_addr("pub", Duration::from_secs(20));
    let control = format!("/p2plive/1/{topic}/control");

    let peers: Vec<_> = [true, false]
        .into_iter()
        .map(|with_ping| {
            let mut command = Command::new("timeout");
            command
                .arg((STAY.as_secs() + 30).to_string())
                .args(["node", "peer.mjs", &addr, "--topic", &control, "--seconds"])
                .arg(STAY.as_secs().to_string())
                .current_dir(js_dir())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            if !with_ping {
                command.arg("--no-ping");
            }
            (with_ping, command.spawn().expect("node starts"))
        })
        .collect();

    for (with_ping, child) in peers {
        let output = child.wait_with_output().expect("js peer ends");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let summary = stdout.lines().last().unwrap_or_default();
        let what = format!(
            "js peer (ping service: {with_ping}): {summary}\nstderr: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "{what}");
        let summary: serde_json::Value = serde_json::from_str(summary).expect(&what);
        assert_eq!(summary["opened"], 1, "one connection: {what}");
        assert_eq!(
            summary["closed"], 0,
            "never closed during the stream: {what}"
        );
        assert_eq!(summary["connected_at_end"], 1, "{what}");
        // The publisher republishes its catalog every second.
        assert!(
            summary["messages"].as_u64().unwrap_or(0) >= STAY.as_secs() / 2,
            "catalogs received over gossipsub: {what}"
        );
    }
    assert!(
        publisher.problems().is_empty(),
        "{:?}",
        publisher.problems()
    );
}
