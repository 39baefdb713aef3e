//! The baseline the simulator compares with: a gossipsub-like flood on the same network
//! model. Each viewer keeps a mesh of about [`MESH`] peers (gossipsub's `D`, rust-libp2p's
//! defaults: 6, pruned above 12, grown back below 5 at each 1 s heartbeat) and sends every
//! new message to every mesh peer but the one it came from; the publisher sends to its mesh.
//! What is not modelled: IHAVE/IWANT gossip (it repairs some losses at the cost of more
//! control), peer scoring, flood publishing to non-mesh peers.

use std::collections::BTreeSet;

/// Mesh degree (gossipsub `D`), and the bounds the heartbeat keeps it in (`D_lo`, `D_hi`).
pub const MESH: usize = 6;
pub const MESH_LOW: usize = 5;
pub const MESH_HIGH: usize = 12;
/// Bytes a gossipsub message adds to its data: RPC framing, source peer id, sequence
/// number, topic and signature (about 130 with ed25519 peer ids).
pub const OVERHEAD: u32 = 130;
/// A forward that waited longer than this in the uplink is dropped (rust-libp2p gossipsub's
/// `forward_queue_duration`, 1 s).
pub const FORWARD_QUEUE_NS: u64 = 1_000_000_000;
/// Message ids remembered (duplicates are recognised within this many).
const SEEN: usize = 4096;

/// One object in flight (the simulator carries its size, not its bytes).
#[derive(Debug, Clone)]
pub struct Message {
    pub sequence: u64,
    pub fragment: u32,
    /// Bytes on the wire.
    pub len: u32,
    /// Hops from the publisher so far.
    pub hops: u8,
}

/// One peer of the flood.
#[derive(Debug)]
pub struct FloodNode {
    pub id: u32,
    pub mesh: Vec<u32>,
    seen: BTreeSet<(u64, u32)>,
}

impl FloodNode {
    pub fn new(id: u32) -> FloodNode {
        FloodNode {
            id,
            mesh: Vec::new(),
            seen: BTreeSet::new(),
        }
    }

    /// Records the message id; `true` if it is new.
    pub fn seen(&mut self, sequence: u64, fragment: u32) -> bool {
        if !self.seen.insert((sequence, fragment)) {
            return false;
        }
        if self.seen.len() > SEEN {
            self.seen.pop_first();
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_recognised_within_the_window() {
        let mut node = FloodNode::new(1);
        assert!(node.seen(5, 0));
        assert!(!node.seen(5, 0));
        assert!(node.seen(5, 1));
        for s in 6..6 + SEEN as u64 {
            node.seen(s, 0);
        }
        assert!(node.seen.len() <= SEEN);
    }
}
