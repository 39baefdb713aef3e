//! p2plive: live audio and video from one publisher to many viewers over a libp2p mesh.
//!
//! Layers (see `docs/ARCHITECTURE.md`):
//! - [`core`]: sans-IO protocol state machines (framing, fragments, reassembly, playout);
//! - [`node`]: the libp2p swarm, driven by one tokio task behind a command channel;
//! - `p2plivesink` / `p2plivesrc`: the GStreamer elements.

use std::sync::LazyLock;

use gst::glib;

mod common;
pub mod core;
pub mod node;
mod p2plivesink;
mod p2plivesrc;

pub use p2plivesink::{LayerLadder, VideoCodec};

/// Generated wire types (`proto/p2plive.proto`).
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/p2plive.v1.rs"));
}

/// One tokio runtime per process drives every element's libp2p node.
pub(crate) static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .thread_name("p2plive")
        .build()
        .expect("tokio runtime")
});

fn plugin_init(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    p2plivesink::register(plugin)?;
    p2plivesrc::register(plugin)?;
    Ok(())
}

gst::plugin_define!(
    p2plive,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    concat!(env!("CARGO_PKG_VERSION"), "-", env!("COMMIT_ID")),
    "MPL",
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_REPOSITORY"),
    env!("BUILD_REL_DATE")
);
