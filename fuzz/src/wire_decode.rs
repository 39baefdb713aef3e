//! Wire decoding of untrusted bytes.
//!
//! `decode` must be total (any bytes: a message or an error, never a panic), and what it
//! accepts must satisfy `validate`, survive a re-encoding unchanged and keep its
//! de-duplication id and its channel's topic.

use gstp2plive::core::wire::{self, Limits, Message};
use gstp2plive::core::{Channel, WireError};

/// One fuzz case: `data` is the message as received.
pub fn run(data: &[u8]) {
    let limits = Limits::default();
    let decoded = wire::decode(data, &limits);
    // The id of every received message, valid or not, is computed before validation.
    let id = wire::message_id(data);
    let message = match decoded {
        Ok(message) => message,
        Err(WireError::TooLarge { len, max }) => {
            assert_eq!(len, data.len());
            assert!(len > max);
            return;
        }
        Err(_) => return,
    };
    assert_eq!(wire::validate(&message, &limits), Ok(()), "{message:?}");

    let encoded = wire::encode(&message);
    // A re-encoding is canonical, hence usually no longer than what came in; negative enum
    // values are the exception (10-byte varints), so it may exceed the size limit.
    if encoded.len() <= limits.max_message_bytes {
        assert_eq!(wire::decode(&encoded, &limits).as_ref(), Ok(&message));
        // Copies that took different encodings are still one message to gossipsub.
        assert_eq!(wire::message_id(&encoded), id);
    }

    let channel = Channel::of(&message);
    let stream = match &message {
        Message::Catalog(catalog) => catalog.topic.as_str(),
        _ => "stream",
    };
    assert_eq!(
        Channel::parse(&channel.topic(stream)),
        Some((stream, channel)),
        "{message:?}"
    );
}
