//! Sans-IO protocol core: deterministic state machines, no clock, no IO, no async.
//! Time is passed in as `now: Instant`; randomness (the publisher epoch) is passed in too.

pub mod wire;

pub use wire::{Channel, Limits, Message, WireError};

pub mod playout;
pub mod publisher;
pub mod reassembly;
pub mod subscriber;

pub use playout::{OutputFrame, Playout, PlayoutConfig, PlayoutStats};
pub use publisher::{
    EncodedFrame, PublishError, Publisher, PublisherConfig, PublisherStats, Transmit,
};
pub use reassembly::{
    CompleteFrame, Reassembler, ReassemblyConfig, ReassemblyDrop, ReassemblyStats,
};
pub use subscriber::{Subscriber, SubscriberConfig, SubscriberEvent, SubscriberStats};
