//! The responder side of libp2p ping (`/ipfs/ping/1.0.0`, libp2p `ping/ping.md`): every
//! 32-byte payload read on an inbound stream is written back, until the stream ends.
//!
//! It replaces libp2p-ping's `Behaviour`. That handler (libp2p-ping 0.48) stops answering
//! inbound pings on a connection once its own outbound ping was refused: its inactive state
//! returns before the inbound stream is polled, while the protocol is still advertised. A
//! js-libp2p 2.x peer without a ping service refuses our ping, and its connection monitor
//! (a ping every 10 s, aborted after 5 s) then cut the connection after about 15 s. p2plive
//! never used the round trips libp2p-ping measured; the data plane times its own pulls.

use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncReadExt as _, AsyncWriteExt as _, StreamExt as _};
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

/// Starts answering pings on `control`'s connections (spawns on the current runtime).
pub(crate) fn serve(mut control: libp2p_stream::Control) -> Result<(), String> {
    let mut incoming = control
        .accept(PING_PROTOCOL)
        .map_err(|_| "ping protocol registered twice".to_owned())?;
    let permits = Arc::new(Semaphore::new(MAX_STREAMS));
    tokio::spawn(async move {
        while let Some((peer, stream)) = incoming.next().await {
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "too many ping streams; dropping one");
                continue;
            };
            tokio::spawn(async move {
                echo(stream).await;
                drop(permit);
            });
        }
    });
    Ok(())
}

/// Echoes payloads until the stream ends, fails or idles.
async fn echo(mut stream: libp2p::Stream) {
    let mut payload = [0u8; PAYLOAD];
    loop {
        match tokio::time::timeout(IDLE, stream.read_exact(&mut payload)).await {
            Ok(Ok(())) => {}
            // End of stream, an error, or idle: done.
            _ => return,
        }
        if stream.write_all(&payload).await.is_err() || stream.flush().await.is_err() {
            return;
        }
    }
}
