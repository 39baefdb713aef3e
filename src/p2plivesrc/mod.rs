//! `p2plivesrc`: plays a live stream received from a libp2p mesh, relaying it to other viewers.
//!
//! A live source bin with sometimes pads `video_%u` and `audio_%u`, added once the stream's
//! catalog arrives. Outputs decoded raw media by default, the encoded media with `decode=false`.

use gst::glib;
use gst::prelude::*;

mod imp;

glib::wrapper! {
    pub struct P2pLiveSrc(ObjectSubclass<imp::P2pLiveSrc>)
        @extends gst::Bin, gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "p2plivesrc",
        gst::Rank::NONE,
        P2pLiveSrc::static_type(),
    )
}
