//! Errors of the node layer.

use std::path::PathBuf;

/// Everything that can go wrong when configuring, starting or talking to a [`super::Node`].
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// One entry of a comma-separated multiaddr list does not parse.
    #[error("invalid multiaddr {entry:?}: {reason}")]
    InvalidMultiaddr { entry: String, reason: String },
    /// A bootstrap address lacks the peer id the node must know to authenticate the peer.
    #[error("bootstrap address {addr:?} must end with /p2p/<peer id>")]
    BootstrapWithoutPeerId { addr: String },
    /// A bootstrap address names this node itself.
    #[error("bootstrap address {addr:?} is this node's own peer id")]
    BootstrapIsSelf { addr: String },
    /// Reading, creating or writing the identity file failed.
    #[error("identity file {}: {source}", path.display())]
    IdentityIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The identity file exists but does not hold a protobuf-encoded keypair.
    #[error("identity file {} does not hold a valid protobuf-encoded keypair: {reason}", path.display())]
    IdentityDecode { path: PathBuf, reason: String },
    /// The private-network key file cannot be read or does not hold a key.
    #[error("pre-shared key file {path}: {reason}")]
    Psk { path: String, reason: String },
    /// A configuration value is out of range.
    #[error("invalid node configuration: {0}")]
    InvalidConfig(String),
    /// The libp2p transports or behaviours could not be built.
    #[error("building the libp2p swarm failed: {0}")]
    Build(String),
    /// Listening on a configured address failed (unsupported address, port in use, ...).
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    /// Dialling a bootstrap address failed before any network traffic.
    #[error("cannot dial bootstrap address {addr}: {reason}")]
    Dial { addr: String, reason: String },
    /// A stream name is empty or longer than the configured limit.
    #[error("invalid stream name {name:?}: {reason}")]
    InvalidStream { name: String, reason: String },
    /// The node's command queue is full; the command was dropped.
    #[error("node command queue is full")]
    QueueFull,
    /// The node was shut down (or its event loop ended).
    #[error("node is stopped")]
    Stopped,
}
