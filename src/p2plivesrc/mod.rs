//! `p2plivesrc`: plays a live stream received from a libp2p mesh, relaying it to other viewers.
//!
//! A live source bin with sometimes pads `video_%u` and `audio_%u`, added once the stream's
//! catalog arrives. Outputs decoded raw media by default, the encoded media with `decode=false`.

use gst::glib;
use gst::prelude::*;

mod imp;

/// What `p2plivesrc` does when nothing valid has come from the publisher for
/// `publisher-timeout` ms. In every case it first posts a `p2plive-publisher-lost` element
/// message and a WARNING.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstP2pLivePublisherTimeoutAction")]
pub enum PublisherTimeoutAction {
    /// Keep PLAYING and resume by itself when the publisher (same or new epoch) returns,
    /// posting `p2plive-publisher-back`.
    #[default]
    #[enum_value(
        name = "Wait: keep playing and resume when the publisher returns",
        nick = "wait"
    )]
    Wait = 0,
    /// End the stream: EOS on every pad (or on the bus when no pad exists yet).
    #[enum_value(name = "End of stream", nick = "eos")]
    Eos = 1,
    /// Post an ERROR: the application stops the pipeline.
    #[enum_value(name = "Error", nick = "error")]
    Error = 2,
}

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
