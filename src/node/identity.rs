//! A persistent node identity, so that a node's peer id (and with it the author id of the
//! streams it publishes) survives restarts.

use std::io::Write as _;
use std::path::Path;

use libp2p::identity::Keypair;

use super::NodeError;

/// Loads the protobuf-encoded keypair stored at `path`, or creates a new ed25519 keypair there
/// (parent directories included, file mode 0600 on Unix) if the file does not exist.
pub fn load_or_create_identity(path: &Path) -> Result<Keypair, NodeError> {
    let io_err = |source| NodeError::IdentityIo {
        path: path.to_owned(),
        source,
    };
    match std::fs::read(path) {
        Ok(bytes) => {
            let keypair = decode(path, &bytes)?;
            tracing::info!(
                path = %path.display(),
                peer_id = %keypair.public().to_peer_id(),
                "loaded the node identity"
            );
            return Ok(keypair);
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(io_err(err)),
    }

    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_err)?;
    }
    let keypair = Keypair::generate_ed25519();
    let bytes = keypair
        .to_protobuf_encoding()
        .map_err(|err| NodeError::IdentityDecode {
            path: path.to_owned(),
            reason: err.to_string(),
        })?;

    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = match options.open(path) {
        Ok(file) => file,
        // Another process created it between our read and our create: use theirs.
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
            let bytes = std::fs::read(path).map_err(io_err)?;
            return decode(path, &bytes);
        }
        Err(err) => return Err(io_err(err)),
    };
    file.write_all(&bytes).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    tracing::info!(
        path = %path.display(),
        peer_id = %keypair.public().to_peer_id(),
        "created a new node identity"
    );
    Ok(keypair)
}

fn decode(path: &Path, bytes: &[u8]) -> Result<Keypair, NodeError> {
    let keypair =
        Keypair::from_protobuf_encoding(bytes).map_err(|err| NodeError::IdentityDecode {
            path: path.to_owned(),
            reason: err.to_string(),
        })?;
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt as _;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                "identity file is readable by other users; it should have mode 0600"
            );
        }
    }
    Ok(keypair)
}
