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
//! Inbound ping streams are accepted by [`super::accept::Accept`] (not `libp2p-stream`'s
//! accept channel, which reset pings that arrived together); [`Responder::answer`] echoes
//! each on its own task.

use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncReadExt as _, AsyncWriteExt as _};
use libp2p::StreamProtocol;
use tokio::sync::Semaphore;

/// The protocol name.
pub(crate) const PING_PROTOCOL: StreamProtocol = StreamProtocol::new("/ipfs/ping/1.0.0");
/// Size of a ping payload (the spec).
const PAYLOAD: usize = 32;
/// A stream with no ping for this long is closed. rust-libp2p pingers reuse their stream
/// every 15 s; js-libp2p opens one per ping.
const IDLE: Duration = Duration::from_secs(60);
/// Inbound ping streams answered at once, over all peers; more are dropped at once.
const MAX_STREAMS: usize = 256;

/// Answers ping streams, at most `MAX_STREAMS` at once.
pub(crate) struct Responder {
    permits: Arc<Semaphore>,
}

impl Default for Responder {
    fn default() -> Self {
        Self {
            permits: Arc::new(Semaphore::new(MAX_STREAMS)),
        }
    }
}

impl Responder {
    /// Echoes `stream`'s pings on a task of the current runtime, or drops it if too many
    /// are being answered.
    pub(crate) fn answer(&self, peer: libp2p::PeerId, stream: libp2p::Stream) {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "too many ping streams; dropping one");
            return;
        };
        tokio::spawn(async move {
            echo(stream).await;
            drop(permit);
        });
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
    use crate::node::accept::{Accept, testing};
    use futures::StreamExt as _;
    use libp2p::swarm::SwarmEvent;

    /// Pings from many peers at the same instant (js-libp2p's connection monitors of peers
    /// started together) are all answered. Through `libp2p-stream`'s accept channel (capacity
    /// one) some were reset: 3 to 15 of 16 in four runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pings_from_many_peers_at_once_are_all_answered() {
        const PEERS: usize = 16;
        let mut server = testing::swarm(Accept::new(PING_PROTOCOL));
        let addr = testing::listen(&mut server);
        let server_id = *server.local_peer_id();
        tokio::spawn(async move {
            let responder = Responder::default();
            loop {
                if let SwarmEvent::Behaviour((peer, stream)) = server.select_next_some().await {
                    responder.answer(peer, stream);
                }
            }
        });
        let ping = |i: usize, mut stream: libp2p::Stream| async move {
            let payload = [i as u8; PAYLOAD];
            stream.write_all(&payload).await?;
            stream.flush().await?;
            let mut echoed = [0u8; PAYLOAD];
            stream.read_exact(&mut echoed).await?;
            stream.close().await?;
            Ok(echoed == payload)
        };
        let results = tokio::time::timeout(
            Duration::from_secs(20),
            testing::open_at_once(addr, server_id, PING_PROTOCOL, PEERS, ping),
        )
        .await
        .expect("answered in time");
        let failed: Vec<String> = results
            .into_iter()
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
