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

/// A 64-bit hash, eight bytes at a time (a multiply-xorshift mix in the manner of
/// wyhash/xxHash): the simulator's stand-in for SHA-256 and ed25519. It catches accidental
/// corruption, not forgery: **no security**, see [`digest_with`].
fn stand_in(seed: u64, bytes: &[u8]) -> u64 {
    let mix = |h: u64, v: u64| {
        let x = (h ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^ (x >> 29)
    };
    let mut h = seed ^ (bytes.len() as u64).wrapping_mul(0xff51_afd7_ed55_8ccd);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        h = mix(h, u64::from_le_bytes(c.try_into().expect("8 bytes")));
    }
    let mut tail = [0u8; 8];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    mix(mix(h, u64::from_le_bytes(tail)), 0x94d0_49bb_1331_11eb)
}

/// The digest of one shard: [`digest`], or with `insecure_simulated` (the simulator's switch,
/// `DataPlaneConfig::insecure_simulated_auth`) a 128-bit non-cryptographic stand-in that
/// costs a few percent of SHA-256, so 10^5 simulated peers fit one machine.
pub fn digest_with(insecure_simulated: bool, shard: &[u8]) -> [u8; DIGEST_LEN] {
    if !insecure_simulated {
        return digest(shard);
    }
    let mut out = [0u8; DIGEST_LEN];
    out[..8].copy_from_slice(&stand_in(0x5a5a, shard).to_le_bytes());
    out[8..].copy_from_slice(&stand_in(0xa5a5, shard).to_le_bytes());
    out
}

/// [`sign`], or with `insecure_simulated` a keyed stand-in of the same length (keyed by the
/// public key, so anyone can compute it: simulator only).
pub fn sign_with(
    insecure_simulated: bool,
    key: &SigningKey,
    message: &[u8],
) -> [u8; SIGNATURE_LEN] {
    if !insecure_simulated {
        return sign(key, message);
    }
    stand_in_signature(&key.verifying_key(), message)
}

/// [`verify`], or with `insecure_simulated` the check of [`sign_with`]'s stand-in.
pub fn verify_with(
    insecure_simulated: bool,
    key: &VerifyingKey,
    message: &[u8],
    signature: &[u8],
) -> bool {
    if !insecure_simulated {
        return verify(key, message, signature);
    }
    signature == stand_in_signature(key, message)
}

fn stand_in_signature(key: &VerifyingKey, message: &[u8]) -> [u8; SIGNATURE_LEN] {
    let seed = stand_in(1, key.as_bytes());
    let mut out = [0u8; SIGNATURE_LEN];
    for (lane, chunk) in out.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&stand_in(seed ^ lane as u64, message).to_le_bytes());
    }
    out
}
