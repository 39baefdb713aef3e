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

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "p2plivesink",
        gst::Rank::NONE,
        P2pLiveSink::static_type(),
    )
}
