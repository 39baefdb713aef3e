//! The media data plane's libp2p protocol, `/p2plive/media/1`: one long-lived stream per
//! peer and direction, carrying length-delimited [`crate::proto::DpMessage`]s (an unsigned
//! varint length, then the message, as libp2p's own protocols frame theirs).
//!
//! The event loop owns the [`crate::core::dataplane::DataPlane`]s; this module only moves
//! bytes: an outbound stream is opened to every connected peer and written by one task per
//! peer from a short queue (the data plane's own per-peer queue, bounded in bytes and shed by
//! layer, holds the rest), and every inbound stream is read by one task that hands frames to
//! the event loop (bounded: a slow event loop slows the readers, not memory).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::task::{Context, Poll};

use asynchronous_codec::Framed;
use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use libp2p::core::upgrade::{DeniedUpgrade, ReadyUpgrade};
use libp2p::core::{Endpoint, transport::PortUse};
use libp2p::swarm::handler::{ConnectionEvent, FullyNegotiatedInbound};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use tokio::sync::mpsc;
use unsigned_varint::codec::UviBytes;

use crate::core::dataplane::MAX_MESSAGE_LEN;

/// The protocol name.
pub(crate) const MEDIA_PROTOCOL: StreamProtocol = StreamProtocol::new("/p2plive/media/1");
/// Messages waiting in one peer's writer at most (about 32 shards: a few ms of a stream).
const WRITER_QUEUE: usize = 32;
/// Frames read but not yet handled by the event loop, over all peers.
const INBOUND_QUEUE: usize = 4096;
/// Inbound streams of one connection not yet handed to the behaviour, at most (a peer opens
/// one at a time; more are reset).
const MAX_PENDING_INBOUND: usize = 4;

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
    /// [`Inbound`] through [`Media::accept`]) and the event receiver.
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

/// Accepts inbound `/p2plive/media/1` streams in each connection's own handler and hands them
/// to the event loop as swarm events (it calls [`Media::accept`]). `libp2p-stream`'s accept
/// channel holds one stream and resets an inbound stream that finds it full, so streams
/// opened by several peers at once (viewers joining together) were reset and re-opened, and
/// three such races over a connection's life dropped the peer from the data plane
/// (`MEDIA_RETRIES`); the same race reset pings (see `ping`).
#[derive(Default)]
pub(crate) struct Inbound {
    streams: VecDeque<(PeerId, libp2p::Stream)>,
}

impl NetworkBehaviour for Inbound {
    type ConnectionHandler = InboundHandler;
    type ToSwarm = (PeerId, libp2p::Stream);

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(InboundHandler::default())
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(InboundHandler::default())
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        _: ConnectionId,
        stream: THandlerOutEvent<Self>,
    ) {
        // Bounded by the handlers: each holds at most `MAX_PENDING_INBOUND`, and the swarm
        // polls this behaviour, which hands every stream on, before their next events.
        self.streams.push_back((peer, stream));
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        match self.streams.pop_front() {
            Some(stream) => Poll::Ready(ToSwarm::GenerateEvent(stream)),
            None => Poll::Pending,
        }
    }
}

/// One connection's inbound media streams, handed to [`Inbound`] as they are negotiated.
#[derive(Default)]
pub(crate) struct InboundHandler {
    pending: VecDeque<libp2p::Stream>,
}

impl ConnectionHandler for InboundHandler {
    type FromBehaviour = Infallible;
    type ToBehaviour = libp2p::Stream;
    type InboundProtocol = ReadyUpgrade<StreamProtocol>;
    type OutboundProtocol = DeniedUpgrade;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = Infallible;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(ReadyUpgrade::new(MEDIA_PROTOCOL), ())
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, Infallible, Self::ToBehaviour>> {
        match self.pending.pop_front() {
            Some(stream) => Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(stream)),
            None => Poll::Pending,
        }
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        match event {}
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol, (), Infallible>,
    ) {
        if let ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
            protocol: stream,
            ..
        }) = event
        {
            if self.pending.len() < MAX_PENDING_INBOUND {
                self.pending.push_back(stream);
            } else {
                tracing::debug!("too many media streams pending on one connection; dropping one");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::AsyncWriteExt as _;
    use libp2p::core::transport::MemoryTransport;
    use libp2p::core::{Transport as _, upgrade};
    use libp2p::swarm::SwarmEvent;
    use libp2p::{Swarm, SwarmBuilder, noise, yamux};

    fn swarm<B: NetworkBehaviour>(behaviour: B) -> Swarm<B> {
        SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_other_transport(|key| {
                MemoryTransport::default()
                    .upgrade(upgrade::Version::V1)
                    .authenticate(noise::Config::new(key).unwrap())
                    .multiplex(yamux::Config::default())
            })
            .unwrap()
            .with_behaviour(|_| behaviour)
            .unwrap()
            .build()
    }

    /// Media streams opened by many peers at the same instant (viewers joining together)
    /// all arrive and carry their first frame. Through `libp2p-stream`'s accept channel
    /// (capacity one) most were reset: frames came from 2 of 16 peers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_opened_by_many_peers_at_once_all_arrive() {
        const PEERS: usize = 16;
        let mut server = swarm(Inbound::default());
        let addr: Multiaddr = format!("/memory/{}", rand::random::<u64>() | 1)
            .parse()
            .unwrap();
        server.listen_on(addr.clone()).unwrap();
        let server_id = *server.local_peer_id();
        let (frames_tx, mut frames) = mpsc::channel::<PeerId>(PEERS);
        tokio::spawn(async move {
            loop {
                if let SwarmEvent::Behaviour((peer, stream)) = server.select_next_some().await {
                    let frames_tx = frames_tx.clone();
                    tokio::spawn(async move {
                        let mut codec = UviBytes::<Bytes>::default();
                        codec.set_max_len(MAX_MESSAGE_LEN);
                        let mut framed = Framed::new(stream, codec);
                        if let Some(Ok(_)) = framed.next().await {
                            let _ = frames_tx.send(peer).await;
                        }
                        // Held open until the test ends.
                        while framed.next().await.is_some() {}
                    });
                }
            }
        });
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(PEERS));
        let mut clients = Vec::new();
        for _ in 0..PEERS {
            let mut client = swarm(libp2p_stream::Behaviour::new());
            let mut control = client.behaviour().new_control();
            client
                .dial(
                    addr.clone()
                        .with(libp2p::multiaddr::Protocol::P2p(server_id)),
                )
                .unwrap();
            tokio::spawn(async move {
                loop {
                    client.select_next_some().await;
                }
            });
            let start = start.clone();
            clients.push(tokio::spawn(async move {
                // Connected first (a stream we close at once), then all at the same time.
                let mut first = control.open_stream(server_id, MEDIA_PROTOCOL).await?;
                first.close().await?;
                start.wait().await;
                let stream = control.open_stream(server_id, MEDIA_PROTOCOL).await?;
                let mut codec = UviBytes::<Bytes>::default();
                codec.set_max_len(MAX_MESSAGE_LEN);
                let mut framed = Framed::new(stream, codec);
                framed.send(Bytes::from_static(b"frame")).await?;
                tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
            }));
        }
        let mut seen = std::collections::HashSet::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while seen.len() < PEERS {
            match tokio::time::timeout_at(deadline, frames.recv()).await {
                Ok(Some(peer)) => {
                    seen.insert(peer);
                }
                _ => break,
            }
        }
        for client in clients {
            client.abort();
        }
        assert_eq!(
            seen.len(),
            PEERS,
            "frames from {} of {PEERS} peers",
            seen.len()
        );
    }
}
