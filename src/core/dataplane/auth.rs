//! Publisher authenticity of media without per-message signatures: the publisher signs each
//! object's manifest (its shard digests and layout) once with its ed25519 key (the key of its
//! peer id); a shard is accepted, forwarded and used only if its digest is in a verified
//! manifest.

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest as _, Sha256};

use super::ObjectKey;

/// Bytes of a shard digest: SHA-256 truncated to 128 bits (second-preimage resistance of
/// 2^128, as for any truncated SHA-2; collisions would only be the publisher's own).
pub const DIGEST_LEN: usize = 16;
/// Bytes of an ed25519 signature (RFC 8032).
pub const SIGNATURE_LEN: usize = 64;
/// Domain separation of the signed bytes.
const CONTEXT: &[u8] = b"p2plive/dp/manifest/1";

/// The digest of one shard.
pub fn digest(shard: &[u8]) -> [u8; DIGEST_LEN] {
    let full = Sha256::digest(shard);
    let mut out = [0u8; DIGEST_LEN];
    out.copy_from_slice(&full[..DIGEST_LEN]);
    out
}

/// What a manifest signature covers: context, stream tag, epoch, object key, layout, fragment
/// count and the digests, each fixed-width big-endian.
#[allow(clippy::too_many_arguments)]
pub fn signed_bytes(
    stream: u32,
    epoch: u64,
    key: &ObjectKey,
    length: u32,
    data: u32,
    parity: u32,
    fragments: u32,
    digests: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(CONTEXT.len() + 48 + digests.len());
    out.extend_from_slice(CONTEXT);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&key.track.to_be_bytes());
    out.extend_from_slice(&key.layer.to_be_bytes());
    out.extend_from_slice(&key.sequence.to_be_bytes());
    out.extend_from_slice(&key.fragment.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(&data.to_be_bytes());
    out.extend_from_slice(&parity.to_be_bytes());
    out.extend_from_slice(&fragments.to_be_bytes());
    out.extend_from_slice(digests);
    out
}

/// Signs `message` with the publisher's key.
pub fn sign(key: &SigningKey, message: &[u8]) -> [u8; SIGNATURE_LEN] {
    key.sign(message).to_bytes()
}

/// Whether `signature` is the publisher's over `message` (strict verification: RFC 8032 with
/// canonical encodings and no small-order keys).
pub fn verify(key: &VerifyingKey, message: &[u8], signature: &[u8]) -> bool {
    let Ok(bytes) = <[u8; SIGNATURE_LEN]>::try_from(signature) else {
        return false;
    };
    key.verify_strict(message, &Signature::from_bytes(&bytes))
        .is_ok()
}
