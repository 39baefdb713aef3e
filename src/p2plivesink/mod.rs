//! `p2plivesink`: publishes live audio and video to a libp2p mesh.
//!
//! A bin with request pads `video_%u` and `audio_%u`. Raw input is encoded inside the element
//! (VP8 or H.264 for video, Opus for audio); already-encoded input is published as it is.

use gst::glib;
use gst::prelude::*;

mod imp;

glib::wrapper! {
    pub struct P2pLiveSink(ObjectSubclass<imp::P2pLiveSink>)
        @extends gst::Bin, gst::Element, gst::Object;
}

/// The encoder used for raw video input.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstP2pLiveVideoCodec")]
pub enum VideoCodec {
    #[default]
    #[enum_value(name = "VP8 (vp8enc, realtime)", nick = "vp8")]
    Vp8 = 0,
    #[enum_value(name = "H.264 (x264enc, zerolatency)", nick = "h264")]
    H264 = 1,
}

/// Which layers raw video is encoded into.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstP2pLiveLayers")]
pub enum LayerLadder {
    /// Temporal layers with VP8, a single layer with H.264.
    #[default]
    #[enum_value(
        name = "Auto: temporal layers with VP8, one layer with H.264",
        nick = "auto"
    )]
    Auto = 0,
    #[enum_value(name = "One layer", nick = "single")]
    Single = 1,
    #[enum_value(
        name = "Three VP8 temporal layers (1/4, 1/2 and all of the frame rate)",
        nick = "temporal"
    )]
    Temporal = 2,
    #[enum_value(
        name = "Simulcast: 360p, 720p and the input size, each at most the input size",
        nick = "simulcast"
    )]
    Simulcast = 3,
    #[enum_value(
        name = "Simulcast with three VP8 temporal layers in each resolution",
        nick = "simulcast-temporal"
    )]
    SimulcastTemporal = 4,
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "p2plivesink",
        gst::Rank::NONE,
        P2pLiveSink::static_type(),
    )
}
