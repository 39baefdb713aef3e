//! The responder side of libp2p ping (`/ipfs/ping/1.0.0`, libp2p `ping/ping.md`): every
//! 32-byte payload read on an inbound stream is written back, until the stream ends.
//!
//! It replaces libp2p-ping's `Behaviour`. That handler (libp2p-ping 0.48) stops answering
//! inbound pings on a connection once its own outbound ping was refused: its inactive state
//! returns before the inbound stream is polled, while the protocol is still advertised. A
//! js-libp2p 2.x peer without a ping service refuses our ping, and its connection monitor
//! (a ping every 10 s, aborted after 5 s) then cut the connection after about 15 s. p2plive
//! never used the round trips libp2p-ping measured; the data plane times its own pulls.
//!
//! Each connection's handler answers its own streams. Streams accepted through
//! `libp2p-stream` (as before session 14) pass one shared channel of capacity one, and an
//! inbound stream that finds it full is reset: two js-libp2p peers whose connection monitors
//! pinged in the same instant had one ping reset, and that peer closed the connection
//! (`tests/interop.rs`, now and then, at 10 s).

use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{AsyncReadExt as _, AsyncWriteExt as _, FutureExt as _, StreamExt as _};
use libp2p::core::upgrade::{DeniedUpgrade, ReadyUpgrade};
use libp2p::core::{Endpoint, transport::PortUse};
use libp2p::swarm::handler::{ConnectionEvent, FullyNegotiatedInbound};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId, StreamProtocol};

/// The protocol name.
pub(crate) const PING_PROTOCOL: StreamProtocol = StreamProtocol::new("/ipfs/ping/1.0.0");
/// Size of a ping payload (the spec).
const PAYLOAD: usize = 32;
/// A stream with no ping for this long is closed. rust-libp2p pingers reuse their stream
/// every 15 s; js-libp2p opens one per ping.
const IDLE: Duration = Duration::from_secs(60);
/// Inbound ping streams answered at once per connection; more are reset at once (a pinger
/// needs one at a time).
const MAX_STREAMS: usize = 8;

/// Answers pings on every connection; emits nothing.
#[derive(Debug, Default)]
pub(crate) struct Responder;

impl NetworkBehaviour for Responder {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(Handler::default())
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(Handler::default())
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

/// One connection's ping streams, each echoed by a future polled with the connection.
#[derive(Default)]
pub(crate) struct Handler {
    streams: FuturesUnordered<BoxFuture<'static, ()>>,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Infallible;
    type ToBehaviour = Infallible;
    type InboundProtocol = ReadyUpgrade<StreamProtocol>;
    type OutboundProtocol = DeniedUpgrade;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = Infallible;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(ReadyUpgrade::new(PING_PROTOCOL), ())
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, Infallible, Self::ToBehaviour>> {
        while let Poll::Ready(Some(())) = self.streams.poll_next_unpin(cx) {}
        Poll::Pending
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
            if self.streams.len() < MAX_STREAMS {
                self.streams.push(echo(stream).boxed());
            } else {
                tracing::debug!("too many ping streams on one connection; dropping one");
            }
        }
    }
}

/// Echoes payloads until the stream ends, fails or idles.
async fn echo(mut stream: libp2p::Stream) {
    let mut payload = [0u8; PAYLOAD];
    loop {
        match tokio::time::timeout(IDLE, stream.read_exact(&mut payload)).await {
            Ok(Ok(())) => {}
            // End of stream, an error, or idle: done.
            _ => break,
        }
        if stream.write_all(&payload).await.is_err() || stream.flush().await.is_err() {
            return;
        }
    }
    // Our half closed too (a FIN, not a reset) so the pinger's close completes.
    let _ = stream.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::core::transport::MemoryTransport;
    use libp2p::core::{Transport as _, upgrade};
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

    /// Pings from many peers at the same instant (js-libp2p's connection monitors of peers
    /// started together) are all answered. Through `libp2p-stream`'s accept channel (capacity
    /// one) some were reset: 3–5 of 16 in each of three runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pings_from_many_peers_at_once_are_all_answered() {
        const PEERS: usize = 16;
        let mut server = swarm(Responder);
        let addr: Multiaddr = format!("/memory/{}", rand::random::<u64>() | 1)
            .parse()
            .unwrap();
        server.listen_on(addr.clone()).unwrap();
        let server_id = *server.local_peer_id();
        tokio::spawn(async move {
            loop {
                server.select_next_some().await;
            }
        });
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(PEERS));
        let mut pings = Vec::new();
        for i in 0..PEERS {
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
            pings.push(tokio::spawn(async move {
                // Connected (an open waits for the connection), then all at once.
                let mut stream = control.open_stream(server_id, PING_PROTOCOL).await?;
                stream.close().await?;
                start.wait().await;
                let mut stream = control.open_stream(server_id, PING_PROTOCOL).await?;
                let payload = [i as u8; PAYLOAD];
                stream.write_all(&payload).await?;
                stream.flush().await?;
                let mut echoed = [0u8; PAYLOAD];
                stream.read_exact(&mut echoed).await?;
                stream.close().await?;
                Ok::<bool, Box<dyn std::error::Error + Send + Sync>>(echoed == payload)
            }));
        }
        let results =
            tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(pings))
                .await
                .expect("answered in time");
        let failed: Vec<String> = results
            .into_iter()
            .map(|r| r.expect("task ran"))
            .filter(|r| !matches!(r, Ok(true)))
            .map(|r| format!("{r:?}"))
            .collect();
        assert!(
            failed.is_empty(),
            "{} of {PEERS} pings failed: {failed:?}",
            failed.len()
        );
    }
}
