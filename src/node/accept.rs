//! Inbound streams of one protocol, accepted in each connection's own handler and handed to
//! the event loop as swarm events: the media streams (`/p2plive/media/1`, see `media`) and
//! pings (`/ipfs/ping/1.0.0`, see `ping`).
//!
//! `libp2p-stream`'s accept channel (used for both until session 14) holds one stream and
//! resets an inbound stream that finds it full. Of 16 peers opening their media streams at
//! once, frames came from 2 (the rest were reset and re-opened, and three such failures over
//! a connection's life dropped the peer from the data plane, `MEDIA_RETRIES`); pings arriving
//! together were reset, and js-libp2p closes a connection whose ping fails (the rare
//! `tests/interop.rs` failure at 10 s). `libp2p-stream` still opens our outbound streams.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::task::{Context, Poll};

use libp2p::core::upgrade::{DeniedUpgrade, ReadyUpgrade};
use libp2p::core::{Endpoint, transport::PortUse};
use libp2p::swarm::handler::{ConnectionEvent, FullyNegotiatedInbound};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol};

/// Inbound streams of one connection not yet handed to the behaviour, at most (a peer opens
/// one media stream, or one ping, at a time; more are reset).
const MAX_PENDING: usize = 4;

/// Accepts inbound streams of `protocol`; emits each with the peer that opened it.
pub(crate) struct Accept {
    protocol: StreamProtocol,
    streams: VecDeque<(PeerId, Stream)>,
}

impl Accept {
    pub(crate) fn new(protocol: StreamProtocol) -> Self {
        Self {
            protocol,
            streams: VecDeque::new(),
        }
    }

    fn handler(&self) -> Handler {
        Handler {
            protocol: self.protocol.clone(),
            pending: VecDeque::new(),
        }
    }
}

impl NetworkBehaviour for Accept {
    type ConnectionHandler = Handler;
    type ToSwarm = (PeerId, Stream);

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler())
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler())
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        _: ConnectionId,
        stream: THandlerOutEvent<Self>,
    ) {
        // Bounded by the handlers: each holds at most `MAX_PENDING`, and the swarm polls
        // this behaviour, which hands every stream on, before their next events.
        self.streams.push_back((peer, stream));
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        match self.streams.pop_front() {
            Some(stream) => Poll::Ready(ToSwarm::GenerateEvent(stream)),
            None => Poll::Pending,
        }
    }
}

/// One connection's inbound streams, handed to [`Accept`] as they are negotiated.
pub(crate) struct Handler {
    protocol: StreamProtocol,
    pending: VecDeque<Stream>,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Infallible;
    type ToBehaviour = Stream;
    type InboundProtocol = ReadyUpgrade<StreamProtocol>;
    type OutboundProtocol = DeniedUpgrade;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = Infallible;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(ReadyUpgrade::new(self.protocol.clone()), ())
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
            if self.pending.len() < MAX_PENDING {
                self.pending.push_back(stream);
            } else {
                tracing::debug!(protocol = %self.protocol, "too many streams pending on one connection; dropping one");
            }
        }
    }
}

/// Test support: swarms over libp2p's in-memory transport, and many peers that each open a
/// stream to one of them at the same instant.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use futures::{AsyncWriteExt as _, StreamExt as _};
    use libp2p::core::transport::MemoryTransport;
    use libp2p::core::{Transport as _, upgrade};
    use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol, Swarm, SwarmBuilder, noise, yamux};

    pub(crate) fn swarm<B: libp2p::swarm::NetworkBehaviour>(behaviour: B) -> Swarm<B> {
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

    /// A listening address of `swarm` on the in-memory transport.
    pub(crate) fn listen<B: libp2p::swarm::NetworkBehaviour>(swarm: &mut Swarm<B>) -> Multiaddr {
        let addr: Multiaddr = format!("/memory/{}", rand::random::<u64>() | 1)
            .parse()
            .unwrap();
        swarm.listen_on(addr.clone()).unwrap();
        addr.with(libp2p::multiaddr::Protocol::P2p(*swarm.local_peer_id()))
    }

    /// `peers` swarms dial `addr` (of `server`); once all are connected (each opened and
    /// closed one stream), each opens another at the same instant and runs `use_stream`
    /// on it. Returns each peer's result.
    pub(crate) async fn open_at_once<F, Fut, T>(
        addr: Multiaddr,
        server: PeerId,
        protocol: StreamProtocol,
        peers: usize,
        use_stream: F,
    ) -> Vec<Result<T, Box<dyn std::error::Error + Send + Sync>>>
    where
        F: Fn(usize, Stream) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Result<T, Box<dyn std::error::Error + Send + Sync>>> + Send,
        T: Send + 'static,
    {
        let start = Arc::new(tokio::sync::Barrier::new(peers));
        let mut tasks = Vec::new();
        for i in 0..peers {
            let mut client = swarm(libp2p_stream::Behaviour::new());
            let mut control = client.behaviour().new_control();
            client.dial(addr.clone()).unwrap();
            tokio::spawn(async move {
                loop {
                    client.select_next_some().await;
                }
            });
            let (start, protocol, use_stream) =
                (start.clone(), protocol.clone(), use_stream.clone());
            tasks.push(tokio::spawn(async move {
                let mut first = control.open_stream(server, protocol.clone()).await?;
                first.close().await?;
                start.wait().await;
                let stream = control.open_stream(server, protocol).await?;
                use_stream(i, stream).await
            }));
        }
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.expect("task ran"));
        }
        results
    }
}
