//! p2plive: live audio and video from one publisher to many viewers over a libp2p mesh.
//!
//! Layers (see `docs/ARCHITECTURE.md`):
//! - [`core`]: sans-IO protocol state machines (framing, fragments, reassembly, playout);
//! - [`node`]: the libp2p swarm, driven by one tokio task behind a command channel;
//! - `p2plivesink` / `p2plivesrc`: the GStreamer elements.
//!
//! Everything but [`core`] and [`proto`] needs the default `plugin` feature; without it the
//! crate builds with no system library (the fuzz targets in `fuzz/` link it that way).

#[cfg(feature = "plugin")]
use std::sync::LazyLock;

#[cfg(feature = "plugin")]
use gst::glib;

#[cfg(feature = "plugin")]
mod common;
pub mod core;
#[cfg(feature = "plugin")]
pub mod node;
#[cfg(feature = "plugin")]
mod p2plivesink;
#[cfg(feature = "plugin")]
mod p2plivesrc;
pub mod sim;

#[cfg(feature = "plugin")]
pub use p2plivesink::{LayerLadder, VideoCodec};

/// Generated wire types (`proto/p2plive.proto`).
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/p2plive.v1.rs"));
}

/// One tokio runtime per process drives every element's libp2p node.
#[cfg(feature = "plugin")]
pub(crate) static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .thread_name("p2plive")
        .build()
        .expect("tokio runtime")
});

#[cfg(feature = "plugin")]
fn plugin_init(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    // The libp2p node logs through `tracing`, which GStreamer's debug log does not see:
    // `P2PLIVE_LOG=<filter>` (the `RUST_LOG` syntax, e.g. `info` or `libp2p_dcutr=debug`)
    // writes those logs to standard error. A host application that installed its own
    // subscriber keeps it.
    if let Ok(filter) = std::env::var("P2PLIVE_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .try_init();
    }
    p2plivesink::register(plugin)?;
    p2plivesrc::register(plugin)?;
    Ok(())
}

#[cfg(feature = "plugin")]
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
