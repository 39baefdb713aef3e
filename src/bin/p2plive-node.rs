//! `p2plive-node`: the always-on piece an operator runs for p2plive streams.
//!
//! - a bootstrap node with a stable identity, listening on QUIC and TCP, serving the
//!   Kademlia DHT in which streams are announced and found by name;
//! - a circuit relay v2 server (with limits) for peers that cannot be dialled directly;
//! - an edge forwarder: `--forward <topic>` joins a stream's data plane as a relay with a
//!   large upload capacity, without decoding anything, adding upload where viewers lack it;
//! - `/metrics` in the Prometheus text format, on a loopback address by default.
//!
//! Logs go to standard error (`RUST_LOG` filters them, default `info`, kademlia's at `error`); once listening, the
//! node prints its full addresses on standard output, one per line, for scripts. SIGINT and
//! SIGTERM stop it cleanly.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use gstp2plive::core::{Channel, Message};
use gstp2plive::node::{self, Event, Node, NodeConfig, RelayServerConfig};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use libp2p::Multiaddr;

/// Default listen addresses: a fixed port, as a bootstrap address must not change.
const DEFAULT_LISTEN: &str = "/ip4/0.0.0.0/udp/4001/quic-v1,/ip4/0.0.0.0/tcp/4001";
/// Default upload offered by a forwarder, kbit/s (100 Mbit/s).
const DEFAULT_FORWARD_CAPACITY_KBPS: u64 = 100_000;
/// How long in-flight messages may still go out after a stop signal.
const SHUTDOWN_LINGER: Duration = Duration::from_millis(500);
/// A metrics client must send its request headers within this time.
const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The always-on p2plive node: bootstrap, relay and edge forwarder.
///
/// Viewers and publishers use its address as their `bootstrap` property; they find the
/// peers of a stream by its name through the node's DHT, and reserve a relay slot on it when
/// they cannot be dialled.
#[derive(Parser, Debug)]
#[command(name = "p2plive-node", version)]
struct Args {
    /// File holding the node's key, created on first start (keep it: the peer id in every
    /// bootstrap address depends on it). Default: a new identity at each start.
    #[arg(long, value_name = "PATH")]
    identity_file: Option<PathBuf>,

    /// Comma-separated multiaddrs to listen on (QUIC and TCP on port 4001 by default; TCP
    /// only with --psk-file).
    #[arg(long, value_name = "MULTIADDRS")]
    listen: Option<String>,

    /// Comma-separated addresses at which others reach this node although it does not
    /// listen on them (a port forwarded from a public address, a DNS name), each without
    /// /p2p. Advertised to peers and in relay reservations.
    #[arg(
        long,
        value_name = "MULTIADDRS",
        default_value = "",
        hide_default_value = true
    )]
    external_address: String,

    /// Comma-separated addresses of other p2plive nodes, each ending in /p2p/<peer id>.
    #[arg(
        long,
        value_name = "MULTIADDRS",
        default_value = "",
        hide_default_value = true
    )]
    bootstrap: String,

    /// Run on a private network: a libp2p swarm key file (/key/swarm/psk/1.0.0/, /base16/,
    /// 64 hex digits). Peers without the same key cannot connect. QUIC is not used.
    #[arg(long, value_name = "PATH")]
    psk_file: Option<PathBuf>,

    /// Write a new random swarm key to PATH (refusing to overwrite one) and exit.
    #[arg(long, value_name = "PATH", exclusive = true)]
    generate_psk: Option<PathBuf>,

    /// Join this stream as a forwarder (repeatable): receive every layer of every track and
    /// forward it to viewers within --upload-capacity, decoding nothing. The stream's
    /// publisher is trusted on its first valid catalog, as a viewer without `publisher` does.
    #[arg(long = "forward", value_name = "TOPIC")]
    forward: Vec<String>,

    /// Upload offered to forwarded streams, kbit/s (all streams together).
    #[arg(long, value_name = "KBPS", default_value_t = DEFAULT_FORWARD_CAPACITY_KBPS,
          value_parser = clap::value_parser!(u64).range(1..))]
    upload_capacity: u64,

    /// Most connected peers; beyond it, connections that are not data-plane tree edges are
    /// closed.
    #[arg(long, value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    max_peers: u64,

    /// Do not serve circuit relay v2.
    #[arg(long)]
    no_relay: bool,

    /// Relay: reservations held at once, over all peers.
    #[arg(long, value_name = "N", default_value_t = RelayServerConfig::default().max_reservations)]
    relay_max_reservations: usize,

    /// Relay: reservations held at once by one peer.
    #[arg(long, value_name = "N", default_value_t = RelayServerConfig::default().max_reservations_per_peer)]
    relay_max_reservations_per_peer: usize,

    /// Relay: lifetime of a reservation, seconds (peers renew it before it ends).
    #[arg(long, value_name = "SECONDS", default_value_t = RelayServerConfig::default().reservation_duration.as_secs())]
    relay_reservation_duration: u64,

    /// Relay: circuits open at once, over all peers.
    #[arg(long, value_name = "N", default_value_t = RelayServerConfig::default().max_circuits)]
    relay_max_circuits: usize,

    /// Relay: circuits open at once per peer.
    #[arg(long, value_name = "N", default_value_t = RelayServerConfig::default().max_circuits_per_peer)]
    relay_max_circuits_per_peer: usize,

    /// Relay: lifetime of one circuit, seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = RelayServerConfig::default().max_circuit_duration.as_secs())]
    relay_max_circuit_duration: u64,

    /// Relay: bytes relayed per direction of one circuit before it is closed (0: no limit).
    #[arg(long, value_name = "BYTES", default_value_t = RelayServerConfig::default().max_circuit_bytes)]
    relay_max_circuit_bytes: u64,

    /// Address of the /metrics HTTP endpoint (Prometheus text format), or "off".
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9464")]
    metrics: String,

    /// Discover peers on the local network with mDNS.
    #[arg(long)]
    mdns: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            // Kademlia warns when its periodic bootstrap finds no peer: normal for the first
            // node of a deployment.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,libp2p_kad=error")),
        )
        .init();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("p2plive-node: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    if let Some(path) = &args.generate_psk {
        return generate_psk(path);
    }
    let config = node_config(&args)?;
    let external = config.external_addrs.clone();
    if let Some(psk) = config.psk {
        tracing::info!(fingerprint = %psk.fingerprint(), "private network (pre-shared key)");
    }
    let metrics_addr: Option<SocketAddr> = match args.metrics.as_str() {
        "off" => None,
        addr => Some(
            addr.parse()
                .map_err(|err| format!("--metrics {addr:?}: {err} (expected ADDR:PORT or off)"))?,
        ),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|err| format!("cannot start the runtime: {err}"))?;
    runtime.block_on(async move {
        let metrics_listener = match metrics_addr {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|err| format!("--metrics {addr}: {err}"))?,
            ),
            None => None,
        };
        let (node, events) = Node::spawn(config, &tokio::runtime::Handle::current())
            .map_err(|err| err.to_string())?;
        tracing::info!(peer_id = %node.peer_id(), relay = !args.no_relay, "p2plive-node started");
        if let Some(listener) = metrics_listener {
            let addr = listener.local_addr().map_err(|err| err.to_string())?;
            tracing::info!("metrics on http://{addr}/metrics");
            tokio::spawn(serve_metrics(listener, node.clone()));
        }
        for topic in &args.forward {
            node.join_stream(topic, None, vec![Channel::Control, Channel::Feedback])
                .map_err(|err| format!("--forward {topic:?}: {err}"))?;
            tracing::info!(%topic, "forwarding stream");
        }
        let forwarding = tokio::spawn(handle_events(node.clone(), external, events));
        wait_for_signal().await;
        tracing::info!("stopping");
        node.shutdown(SHUTDOWN_LINGER);
        node.stopped().await;
        forwarding.abort();
        Ok(())
    })
}

/// The node configuration from the command line.
fn node_config(args: &Args) -> Result<NodeConfig, String> {
    let keypair = match &args.identity_file {
        Some(path) => node::load_or_create_identity(path).map_err(|err| err.to_string())?,
        None => libp2p::identity::Keypair::generate_ed25519(),
    };
    let mut config = NodeConfig::new(keypair);
    if let Some(path) = &args.psk_file {
        config.psk = Some(node::load_psk(path).map_err(|err| err.to_string())?);
    }
    config.listen = match (&args.listen, config.psk.is_some()) {
        (Some(listen), _) => node::parse_multiaddrs(listen).map_err(|err| err.to_string())?,
        (None, false) => node::parse_multiaddrs(DEFAULT_LISTEN).map_err(|err| err.to_string())?,
        (None, true) => vec!["/ip4/0.0.0.0/tcp/4001".parse::<Multiaddr>().expect("valid")],
    };
    config.external_addrs =
        node::parse_multiaddrs(&args.external_address).map_err(|err| err.to_string())?;
    if let Some(addr) = config.external_addrs.iter().find(|a| {
        a.iter()
            .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
    }) {
        return Err(format!(
            "--external-address {addr}: give it without /p2p (the node adds its own id)"
        ));
    }
    config.bootstrap = node::parse_bootstrap(&args.bootstrap).map_err(|err| err.to_string())?;
    config.mdns = args.mdns;
    config.kademlia = true;
    config.max_peers = usize::try_from(args.max_peers).unwrap_or(usize::MAX);
    config.upload_capacity_kbps = Some(args.upload_capacity);
    if !args.no_relay {
        config.relay_server = Some(RelayServerConfig {
            max_reservations: args.relay_max_reservations,
            max_reservations_per_peer: args.relay_max_reservations_per_peer,
            reservation_duration: Duration::from_secs(args.relay_reservation_duration),
            max_circuits: args.relay_max_circuits,
            max_circuits_per_peer: args.relay_max_circuits_per_peer,
            max_circuit_duration: Duration::from_secs(args.relay_max_circuit_duration),
            max_circuit_bytes: args.relay_max_circuit_bytes,
        });
    }
    Ok(config)
}

/// Writes a new swarm key file (mode 0600); never overwrites one.
fn generate_psk(path: &std::path::Path) -> Result<(), String> {
    use std::io::Write as _;
    let key = node::PreSharedKey::new(rand::random());
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .map_err(|err| format!("--generate-psk {}: {err}", path.display()))?;
    let fingerprint = key.fingerprint();
    file.write_all(key.to_key_file().as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .map_err(|err| format!("--generate-psk {}: {err}", path.display()))?;
    println!("{} (fingerprint {fingerprint})", path.display());
    Ok(())
}

/// Prints the listen addresses, subscribes forwarded streams to every layer of their
/// catalog, and drops media (a forwarder decodes nothing; its data plane relays by itself).
async fn handle_events(
    node: Node,
    external: Vec<Multiaddr>,
    mut events: tokio::sync::mpsc::Receiver<Event>,
) {
    let mut printed = false;
    let mut subscribed = std::collections::HashSet::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Listening { addrs } => {
                for addr in &addrs {
                    tracing::info!(%addr, "listening; use as bootstrap={addr}");
                }
                if !printed {
                    printed = true;
                    // The addresses others should use first: the external ones.
                    let id = libp2p::multiaddr::Protocol::P2p(node.peer_id());
                    for addr in &external {
                        let addr = addr.clone().with(id.clone());
                        tracing::info!(%addr, "external address; use as bootstrap={addr}");
                        println!("{addr}");
                    }
                    for addr in &addrs {
                        println!("{addr}");
                    }
                }
            }
            Event::Message {
                stream,
                message: Message::Catalog(catalog),
                ..
            } => {
                for track in &catalog.tracks {
                    for layer in &track.layers {
                        let channel = Channel::Media {
                            track: track.id,
                            layer: layer.id,
                        };
                        if subscribed.contains(&(stream.clone(), channel)) {
                            continue;
                        }
                        match node.subscribe(&stream, channel) {
                            Ok(()) => {
                                subscribed.insert((stream.clone(), channel));
                            }
                            Err(node::NodeError::Stopped) => return,
                            Err(err) => tracing::warn!(%stream, %err, "cannot subscribe a layer"),
                        }
                    }
                }
            }
            Event::PublisherLocked { stream, publisher } => {
                tracing::info!(%stream, %publisher, "forwarding the stream of this publisher");
            }
            Event::BootstrapUnreachable { peer, reason } => {
                tracing::warn!(%peer, %reason, "bootstrap peer unreachable");
            }
            Event::Message { .. } | Event::PeersChanged { .. } | Event::Audience { .. } => {}
        }
    }
}

/// Serves `GET /metrics` until the process ends.
async fn serve_metrics(listener: tokio::net::TcpListener, node: Node) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(%err, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let node = node.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let response = metrics_response(&node, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(METRICS_HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            if let Err(err) = served {
                tracing::debug!(%peer, %err, "metrics connection ended");
            }
        });
    }
}

fn metrics_response(node: &Node, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            node.encode_metrics(),
        ),
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "p2plive-node: metrics are at /metrics\n".to_owned(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// Completes on SIGINT or SIGTERM.
async fn wait_for_signal() {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => Some(signal),
            Err(err) => {
                tracing::warn!(%err, "cannot watch SIGTERM");
                None
            }
        };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match terminate.as_mut() {
                Some(signal) => { signal.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}
