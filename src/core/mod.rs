//! Sans-IO protocol core: deterministic state machines, no clock, no IO, no async.
//! Time is passed in as `now: Instant`; randomness (the publisher epoch) is passed in too.

pub mod wire;

pub use wire::{Channel, Limits, Message, WireError};

pub mod abr;
pub mod dataplane;
pub mod drift;
pub mod feedback;
pub mod playout;
pub mod publisher;
pub mod reassembly;
pub mod subscriber;
pub mod viewer;

pub use abr::{Abr, AbrConfig, AbrStats};
pub use feedback::{Audience, AudienceStats, FeedbackConfig};
pub use playout::{LayerPosition, OutputFrame, Playout, PlayoutConfig, PlayoutStats};
pub use publisher::{
    EncodedFrame, PublishError, Publisher, PublisherConfig, PublisherStats, Transmit,
};
pub use reassembly::{
    CompleteFrame, Reassembler, ReassemblyConfig, ReassemblyDrop, ReassemblyStats,
};
pub use subscriber::{LayerCounts, Subscriber, SubscriberConfig, SubscriberEvent, SubscriberStats};
pub use viewer::{ChannelChange, Viewer, ViewerConfig, ViewerStats};
