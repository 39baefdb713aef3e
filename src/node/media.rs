//! The media data plane's libp2p protocol, `/p2plive/media/1`: one long-lived stream per
//! peer and direction, carrying length-delimited [`crate::proto::DpMessage`]s (an unsigned
//! varint length, then the message, as libp2p's own protocols frame theirs).
//!
//! The event loop owns the [`crate::core::dataplane::DataPlane`]s; this module only moves
//! bytes: an outbound stream is opened to every connected peer and written by one task per
//! peer from a short queue (the data plane's own per-peer queue, bounded in bytes and shed by
//! layer, holds the rest), and every inbound stream is read by one task that hands frames to
//! the event loop (bounded: a slow event loop slows the readers, not memory).

use std::collections::HashMap;

use asynchronous_codec::Framed;
use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use libp2p::{PeerId, StreamProtocol};
use tokio::sync::mpsc;
use unsigned_varint::codec::UviBytes;

use crate::core::dataplane::MAX_MESSAGE_LEN;

/// The protocol name.
pub(crate) const MEDIA_PROTOCOL: StreamProtocol = StreamProtocol::new("/p2plive/media/1");
/// Messages waiting in one peer's writer at most (about 32 shards: a few ms of a stream).
const WRITER_QUEUE: usize = 32;
/// Frames read but not yet handled by the event loop, over all peers.
const INBOUND_QUEUE: usize = 4096;

/// What the stream tasks tell the event loop.
pub(crate) enum MediaEvent {
    /// Our stream to `peer` is open; write to it through `writer`.
    Up {
        peer: PeerId,
        writer: mpsc::Sender<Bytes>,
    },
    /// Our stream to `peer` closed or could not be opened.
    Down { peer: PeerId },
    /// A frame from `peer`.
    Frame { peer: PeerId, bytes: Bytes },
}

pub(crate) struct Media {
    control: libp2p_stream::Control,
    events: mpsc::Sender<MediaEvent>,
    /// Open outbound streams.
    pub writers: HashMap<PeerId, mpsc::Sender<Bytes>>,
    /// Streams being opened.
    opening: HashMap<PeerId, tokio::task::JoinHandle<()>>,
}

impl Media {
    /// The handle (outbound streams are opened through `control`; inbound ones come from
    /// [`super::accept::Accept`] through [`Media::accept`]) and the event receiver.
    pub(crate) fn new(control: libp2p_stream::Control) -> (Self, mpsc::Receiver<MediaEvent>) {
        let (events, rx) = mpsc::channel(INBOUND_QUEUE);
        (
            Self {
                control,
                events,
                writers: HashMap::new(),
                opening: HashMap::new(),
            },
            rx,
        )
    }

    /// Reads `peer`'s inbound stream until it ends (one task per stream).
    pub(crate) fn accept(&self, peer: PeerId, stream: libp2p::Stream) {
        tokio::spawn(read(peer, stream, self.events.clone()));
    }

    /// Opens our stream to a newly connected `peer` (once).
    pub(crate) fn open(&mut self, peer: PeerId) {
        if self.writers.contains_key(&peer) || self.opening.contains_key(&peer) {
            return;
        }
        let mut control = self.control.clone();
        let events = self.events.clone();
        let task = tokio::spawn(async move {
            let stream = match control.open_stream(peer, MEDIA_PROTOCOL).await {
                Ok(stream) => stream,
                Err(err) => {
                    tracing::debug!(%peer, %err, "media stream not opened");
                    let _ = events.send(MediaEvent::Down { peer }).await;
                    return;
                }
            };
            let (writer, mut queue) = mpsc::channel::<Bytes>(WRITER_QUEUE);
            if events.send(MediaEvent::Up { peer, writer }).await.is_err() {
                return;
            }
            let mut codec = UviBytes::<Bytes>::default();
            codec.set_max_len(MAX_MESSAGE_LEN);
            let mut framed = Framed::new(stream, codec);
            while let Some(bytes) = queue.recv().await {
                // Several queued messages go out in one write.
                let mut result = framed.feed(bytes).await;
                while result.is_ok()
                    && let Ok(more) = queue.try_recv()
                {
                    result = framed.feed(more).await;
                }
                if let Err(err) = result.and(framed.flush().await) {
                    tracing::debug!(%peer, %err, "media stream write failed");
                    break;
                }
            }
            let _ = events.send(MediaEvent::Down { peer }).await;
        });
        self.opening.insert(peer, task);
    }

    /// The writer task reported in.
    pub(crate) fn opened(&mut self, peer: PeerId, writer: mpsc::Sender<Bytes>) {
        self.opening.remove(&peer);
        self.writers.insert(peer, writer);
    }

    /// Forgets `peer` (disconnected, or its stream ended).
    pub(crate) fn close(&mut self, peer: &PeerId) {
        self.writers.remove(peer);
        if let Some(task) = self.opening.remove(peer) {
            task.abort();
        }
    }
}

/// Reads frames from one inbound stream until it ends.
async fn read(peer: PeerId, stream: libp2p::Stream, events: mpsc::Sender<MediaEvent>) {
    let mut codec = UviBytes::<Bytes>::default();
    codec.set_max_len(MAX_MESSAGE_LEN);
    let mut framed = Framed::new(stream, codec);
    while let Some(frame) = framed.next().await {
        match frame {
            Ok(bytes) => {
                let bytes = bytes.freeze();
                if events
                    .send(MediaEvent::Frame { peer, bytes })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(err) => {
                tracing::debug!(%peer, %err, "media stream read failed");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::accept::{Accept, testing};
    use libp2p::swarm::SwarmEvent;

    /// Media streams opened by many peers at the same instant (viewers joining together)
    /// all arrive and carry their first frame. Through `libp2p-stream`'s accept channel
    /// (capacity one) most were reset: frames came from 2 of 16 peers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_opened_by_many_peers_at_once_all_arrive() {
        const PEERS: usize = 16;
        let mut server = testing::swarm(Accept::new(MEDIA_PROTOCOL));
        let addr = testing::listen(&mut server);
        let server_id = *server.local_peer_id();
        // Outbound streams are not opened here: a control of a swarm-less behaviour will do.
        let (media, mut events) = Media::new(libp2p_stream::Behaviour::new().new_control());
        tokio::spawn(async move {
            loop {
                if let SwarmEvent::Behaviour((peer, stream)) = server.select_next_some().await {
                    media.accept(peer, stream);
                }
            }
        });
        let send = |_: usize, stream: libp2p::Stream| async move {
            let mut codec = UviBytes::<Bytes>::default();
            codec.set_max_len(MAX_MESSAGE_LEN);
            let mut framed = Framed::new(stream, codec);
            framed.send(Bytes::from_static(b"frame")).await?;
            // Held open a while: the frame is read, not the stream's end.
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            Ok(())
        };
        tokio::spawn(testing::open_at_once(
            addr,
            server_id,
            MEDIA_PROTOCOL,
            PEERS,
            send,
        ));
        let mut seen = std::collections::HashSet::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while seen.len() < PEERS {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(MediaEvent::Frame { peer, .. })) => {
                    seen.insert(peer);
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        assert_eq!(
            seen.len(),
            PEERS,
            "frames from {} of {PEERS} peers",
            seen.len()
        );
    }
}
