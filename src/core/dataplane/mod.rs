//! The media data plane: striped push trees with erasure coding, pull repair, signed
//! manifests and feedback aggregated up the trees. Sans-IO: the node, the simulator and the
//! tests drive the same state machine with time passed in.
//!
//! The design follows SplitStream (Castro et al., SOSP 2003: one tree per stripe, every peer
//! interior in at most one), Plumtree (Leitão et al., SRDS 2007: eager push on tree edges,
//! lazy "have" announcements and pulls beside them) and Solana's Turbine (erasure-coded
//! shreds, relays that rebuild before forwarding).
//!
//! - An **object** is one encoded `Fragment` envelope of the publisher. It is cut into `k` data
//!   and `m` parity shards ([`fec::Layout`]); shard `i` of object `o` travels in stripe
//!   `(i + r(o)) mod S` ([`stripe_of`]), so every stripe carries about `1/S` of the bytes and
//!   losing a whole stripe costs at most `m` shards of an object, which parity rebuilds.
//! - The publisher signs each object's **manifest** (layout and shard digests, [`auth`]); the
//!   manifest travels down the tree of the stripe of shard 0. Nobody forwards or uses a shard
//!   before its digest matched a verified manifest. A peer that sends a forged manifest, an
//!   altered shard or a replayed object is banned and disconnected.
//! - **Trees**: every stripe has the publisher as its root (`root_slots` children, default 1,
//!   so the publisher sends about one copy). A viewer joins each stripe by asking any peer; a
//!   peer with room accepts, a full one pushes the joiner down to one of its children that
//!   forwards in that stripe, and a peer that does not forward in the stripe redirects upwards.
//!   A viewer forwards in the first stripe where it accepts a child (its interior stripe) and
//!   is a leaf in the others; a joiner that forwards in the stripe preempts a leaf child of a
//!   full parent. Paths to the root travel with each accept, so a join that would close a loop
//!   is refused.
//! - **Repair**: a relay with `k` verified shards rebuilds the object and forwards the shards
//!   its children missed, so losses do not compound over hops. Every `have_interval` each
//!   peer tells its tree neighbours which frames it has; what is still missing
//!   `repair_delay` after its first sign is pulled from a neighbour that has it, until
//!   `deadline` after that first sign, never later.
//! - **Feedback**: viewer reports are merged ([`audience::Summary`]) at each hop up the tree of
//!   stripe 0; keyframe requests go up the same way, coalesced per layer.

pub mod audience;
pub mod auth;
pub mod fec;
pub mod queue;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt::Debug;
use std::hash::Hash;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ed25519_dalek::{SigningKey, VerifyingKey};
use prost::Message as _;

use crate::proto::dp_message::Body;
use crate::proto::{
    DpAccept, DpHave, DpHaveLayer, DpJoin, DpKey, DpKeyframe, DpLeave, DpManifest, DpMessage,
    DpPull, DpRedirect, DpShard, DpSubscribe, DpTrackLayer,
};
pub use audience::{LocalReport, Summary};
use fec::Layout;
use queue::{Class, SendQueue};

/// The stripe whose tree carries reports and keyframe requests up to the publisher.
pub const FEEDBACK_STRIPE: u8 = 0;
/// Largest data-plane message accepted (bytes): a shard of the largest object plus framing.
pub const MAX_MESSAGE_LEN: usize = 256 * 1024;
/// Largest object (bytes): the publisher's fragments are far smaller.
pub const MAX_OBJECT_LEN: usize = 1 << 20;
/// Objects tracked at once at most (complete ones kept for pulls included).
const MAX_OBJECTS: usize = 8192;
/// Shards held per object while its manifest has not arrived.
const MAX_UNVERIFIED: usize = 64;
/// Bytes of such shards held over all objects: what a peer sending shards of objects that
/// have no manifest can make us hold (about 10 s of a 3 Mbit/s stream).
const MAX_UNVERIFIED_BYTES: usize = 4 * 1024 * 1024;
/// A manifest this many frames older than the newest of its layer, and not wanted, is a replay.
const REPLAY_WINDOW: u64 = 512;
/// Layers tracked per peer's have announcement.
const MAX_HAVE_LAYERS: usize = 32;
/// Redirects after which a peer accepts a joiner even outside its interior stripe (so that a
/// stripe without any forwarder is still served), and after which a joiner starts over.
const SPARE_AFTER_REDIRECTS: u32 = 4;
const RESTART_AFTER_REDIRECTS: u32 = 12;
/// Free child slots a joiner needs to take the root slot of a stripe from a root child
/// that neither forwards there nor has room.
const SPARE_ROOT_ROOM: u32 = 4;
/// The link loss's per-stripe counts are multiplied by this at each report (every
/// `report_interval`, 1 s): about the last 3 s weigh. Counted afresh each second, a viewer
/// at 10 % loss on a 320×240 stream (a few shards per parent per second) measured anything
/// from 0 to 462 ‰ from one second to the next, and its ABR stepped down to layer 0 (found
/// by the fresh helper, session 14).
const LINK_LOSS_DECAY: f64 = 0.7;
/// The link loss is not reported in a viewer's first seconds of media: what it joined in the
/// middle of comes by pulls (answered by its new parents), which is no loss of its link. A
/// viewer at 10 % loss measured 273 ‰ in its third second and stepped down at once.
const LINK_LOSS_WARM_UP: Duration = Duration::from_secs(5);
/// A viewer's shard loss sizes the publisher's parity only for the objects it first saw this
/// long after its first push: its first second or two are tree changes, which pulls repair.
/// Session 16 left out the reports of a viewer's first 5 s (the link loss's warm-up); with
/// the measure's `LOSS_SAMPLE_AGE` and the feedback tree's hops, the base parity then covered
/// 8 of the mesh benchmark's 20 s (download 1.18× at N = 30, against 1.10× before).
const SHARD_LOSS_WARM_UP: Duration = Duration::from_secs(2);
/// Shards due (decayed) from a parent for its own loss share to count in the link loss.
const LINK_LOSS_MIN_DUE: f64 = 20.0;
/// A stripe quiet for `parent_silence / RESUBSCRIBE` sends its parent the subscription again:
/// a lost one leaves the parent pushing nothing until the silence drops it (session 16's core
/// harness: 3 s of 20 % loss on every link left viewers missing 50–300 ‰ 5 s later).
const RESUBSCRIBE: u32 = 3;
/// Between two graft attempts in one stripe.
const GRAFT_INTERVAL: Duration = Duration::from_secs(2);
/// What a child that adds a layer gets of the objects already seen (their stripe's share).
const CATCH_UP: Duration = Duration::from_millis(300);
/// After a parent change, pulls wait only `FAST_REPAIR_DELAY`, for this long.
const FAST_REPAIR: Duration = Duration::from_millis(500);
const FAST_REPAIR_DELAY: Duration = Duration::from_millis(15);
/// How long an object with enough shards waits for a missing data shard before it is
/// decoded with parity. Shards of one object travel different stripes, whose paths differ by
/// tens of ms on real networks. A decode costs only ~6 µs (8 + 1 shards of 1 100 bytes, see
/// [`fec`]), but 5 ms instead of 30 raised the simulator's download from 1.65× to 1.94× and
/// lowered delivery (N = 100, residential, seed 1): 30 ms, as measured before the codec
/// change.
const DECODE_GRACE: Duration = Duration::from_millis(30);
/// An object's pushed shards are counted for the shard-loss measure this long after its
/// first sign (shards still on their way by then are as good as lost for playout).
const LOSS_SAMPLE_AGE: Duration = Duration::from_millis(1000);
/// A stripe's shards count for the shard-loss measure only if its parent was the same this
/// long before the object's first sign (what a parent change loses is not link loss).
const STABLE_PARENT: Duration = Duration::from_millis(200);
/// The publisher sizes parity for this quantile of its peers' shard loss (the median): loss
/// on most links is what parity is for; the lossier half rely on pulls. A higher quantile
/// lets a few capacity-limited relays, whose children miss what they shed, raise everyone's
/// load, which makes them shed more (a feedback loop seen in the unit tests).
const PARITY_QUANTILE: f64 = 0.5;
/// Parity is sized so that an object loses more shards than it has parity with at most this
/// probability at the measured loss (binomial tail); the rest is pulled.
const PARITY_RESIDUAL: f64 = 0.01;
/// The highest shard loss parity is sized for (the last histogram bucket's bound).
const MAX_PARITY_LOSS: f64 = 0.2;
/// A lower loss measure lowers the parity only after this long (a raise is immediate).
const PARITY_HOLD: Duration = Duration::from_secs(10);
/// Media queued longer than this for one peer is shed (see `queue`): later than a pull.
const MAX_QUEUE_DELAY: Duration = Duration::from_millis(500);
/// How long after a later object came in a stripe a shard still missing there is taken as
/// lost (see `Stripe::newest_pushed`): a quarter of the smoothed pull round trip (RACK's
/// `min_RTT / 4`, RFC 8985 §6.2), between these bounds; the upper one before any pull was
/// timed. 60 ms covers the reordering the simulator saw on Internet-like paths; on
/// 127.0.0.1 a few ms do, and a longer wait made repairs miss a 300 ms latency.
const REORDER_WINDOW_MIN: Duration = Duration::from_millis(5);
const REORDER_WINDOW: Duration = Duration::from_millis(60);
/// Entries of that history per stripe and layer (about 2 s of objects).
const PUSH_HISTORY: usize = 64;
/// Share of its upload capacity a viewer fills with its children's pushes at most. The rest
/// is headroom: a line near full queues, each hop adds that queue, and shed shards come back
/// as pulls. In the simulator (N = 300, residential, 10 s, seeds 1 / 2) delivery overall was
/// 0.88 / 0.76 at 0.9, 0.96 / 0.98 at 0.7, 0.84 / 0.96 at 0.6 and 0.87 / 0.88 at 0.5
/// (fewer children per relay make deeper trees). Those runs measured the rate on every
/// shard received (about 1.8× the stream's); on the stream's own shards (session 10), 0.7
/// gave 0.9999 / 0.9997 / 0.9997 for seeds 1–3 and 0.45 gave 0.978 / 0.957 / 0.991.
const CHILDREN_SHARE: f64 = 0.7;
/// Share of its upload capacity a viewer spends on answering pulls at most.
const REPAIR_SHARE: f64 = 0.15;
/// Backoff (ms) after a refused join search: this plus up to as much again, at random.
/// Starved (no object completed for `STARVED_AFTER`), it doubles for each search
/// refused in a row (up to `JOIN_BACKOFF_DOUBLINGS` times) while each search follows half as
/// many redirects, until media flows again (an object completes, a neighbour's have shows
/// frames new to us) or the publisher itself connects. Exponential backoff with jitter, as
/// for TCP's retransmission timer (RFC 6298 §5.5): with no publisher reachable, 16 stripes'
/// searches every 100–200 ms, each a chain of up to 12 redirects, came to 100–180 joins a
/// second per viewer. Only when starved: while 300 viewers join in 5 s, searches fail often but briefly, and backing off
/// there cost the simulator's delivery (10 seeds: 0.9993 → 0.9927 on average).
const JOIN_BACKOFF_MS: u64 = 100;
/// 100 ms × 2^5: 3.2–6.4 s between searches at most.
const JOIN_BACKOFF_DOUBLINGS: u32 = 5;
/// No object completed for this long: the joins back off (see `JOIN_BACKOFF_MS`).
const STARVED_AFTER: Duration = Duration::from_secs(5);
/// Shards pushed in a stripe by a peer that is not our parent there (of objects we never
/// pulled) before we send it a leave for that stripe: it still counts us as its child (a
/// leave lost in a race, say) and would send the stripe a second time for as long as we
/// watch. Plumtree prunes on the first duplicate eager push (Leitão et al., SRDS 2007,
/// §3.2); 16 leaves room for the shards in flight when we change parents. At most one
/// such leave per peer a second. In the mesh benchmark one viewer downloaded 1.17× against
/// its peers' 1.11× this way: a whole stripe twice for the 20 s window.
const PRUNE_AFTER_UNSOLICITED: u32 = 16;
/// Children are evicted for capacity only once the measured rate is this many times the
/// rate they were accepted at (see `maintain_tree`).
const EVICT_RATE_MARGIN: f64 = 1.1;

/// A peer's identity as the data plane sees it: libp2p's `PeerId` in the node, an integer in
/// the simulator and tests.
pub trait PeerKey: Copy + Ord + Eq + Hash + Debug {
    /// Bytes on the wire (in redirects).
    fn to_bytes(&self) -> Vec<u8>;
    /// From wire bytes; `None` if malformed.
    fn from_bytes(bytes: &[u8]) -> Option<Self>;
}

impl PeerKey for u32 {
    fn to_bytes(&self) -> Vec<u8> {
        self.to_be_bytes().to_vec()
    }
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Some(u32::from_be_bytes(bytes.try_into().ok()?))
    }
}

/// FNV-1a, 64 bit (a short, stable id for paths; not a security boundary: a forged path
/// only makes a join be refused).
fn fnv64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The 32-bit tag of a stream name in every data-plane message (FNV-1a folded).
pub fn stream_tag(stream: &str) -> u32 {
    let h = fnv64(stream.as_bytes());
    (h ^ (h >> 32)) as u32
}

/// One object: a fragment of a frame of one track and layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub track: u32,
    pub layer: u32,
    pub sequence: u64,
    pub fragment: u32,
}

impl ObjectKey {
    fn to_proto(self) -> DpKey {
        DpKey {
            track: self.track,
            layer: self.layer,
            sequence: self.sequence,
            fragment: self.fragment,
        }
    }
    fn from_proto(key: &DpKey) -> ObjectKey {
        ObjectKey {
            track: key.track,
            layer: key.layer,
            sequence: key.sequence,
            fragment: key.fragment,
        }
    }
    fn frame(&self) -> (u32, u32, u64) {
        (self.track, self.layer, self.sequence)
    }
}

/// The stripe carrying shard `index` of `key` among `stripes`: rotated per object so every
/// stripe carries about the same share of shards (and of manifests, which go with shard 0).
pub fn stripe_of(key: &ObjectKey, index: u32, stripes: u8) -> u8 {
    let rotation = key
        .sequence
        .wrapping_add(u64::from(key.fragment).wrapping_mul(7))
        .wrapping_add(u64::from(key.track).wrapping_mul(5))
        .wrapping_add(u64::from(key.layer).wrapping_mul(3));
    (rotation.wrapping_add(u64::from(index)) % u64::from(stripes.max(1))) as u8
}

/// The kind of a data-plane message body, by its `DpMessage` field name ("shard",
/// "manifest", "join", ...), for diagnostics that split traffic by kind.
pub fn body_kind(body: &Body) -> &'static str {
    match body {
        Body::Shard(_) => "shard",
        Body::Manifest(_) => "manifest",
        Body::Join(_) => "join",
        Body::Accept(_) => "accept",
        Body::Redirect(_) => "redirect",
        Body::Leave(_) => "leave",
        Body::Have(_) => "have",
        Body::Pull(_) => "pull",
        Body::Subscribe(_) => "subscribe",
        Body::Report(_) => "report",
        Body::Keyframe(_) => "keyframe",
    }
}

/// Settings of the data plane. The defaults are the ones the node uses.
#[derive(Debug, Clone)]
pub struct DataPlaneConfig {
    /// Stripes `S` (2..=32). 16: parity of `1/15` rebuilds a lost stripe, at about 16
    /// parents per viewer.
    pub stripes: u8,
    /// Target shard size (bytes); objects are cut into `⌈len / target⌉` data shards.
    pub target_shard_bytes: usize,
    /// Children of the publisher per stripe: 1 means the publisher sends each shard once.
    pub root_slots: usize,
    /// Upload this peer offers (kbit/s): `None` unlimited, `Some(0)` receive only. The tree
    /// never gives it more children than fit, and its sending is paced to it.
    pub upload_capacity_kbps: Option<u64>,
    /// Children at most (over all stripes) when the capacity is unlimited.
    pub max_children: usize,
    /// A join not answered within this is given up.
    pub join_timeout: Duration,
    /// A parent that has not sent a shard due in its stripe (a verified manifest put one
    /// there) for this long, while other stripes carried data, is replaced.
    pub parent_silence: Duration,
    /// Period of "have" announcements to tree neighbours.
    pub have_interval: Duration,
    /// Wait after the first sign of an object before pulling what is missing, unless the
    /// stripe it is missing in already carried a later object (then it was lost and is
    /// pulled after 15 ms) or changed parent. Long enough for shards on a slower path
    /// (stripes take different routes): 400 ms. A viewer with a shorter playout latency
    /// shortens it (see `crate::node::NodeConfig::repair_delay`): a sparse stream carries a
    /// later object in a given stripe only every second or so.
    pub repair_delay: Duration,
    /// Nothing is pulled later than this after an object's first sign (its deadline).
    pub deadline: Duration,
    /// Between two pulls of one object at most; sooner (twice the smoothed pull round trip
    /// plus 10 ms, at least 20 ms, doubled after the third unanswered pull) once answers
    /// were timed.
    pub pull_retry: Duration,
    /// Move to a neighbour at least two hops closer to the root when one has room
    /// (Plumtree's optimisation, by hops): lower delay, at the cost of a few shards in flight
    /// (which pulls bring back) per move.
    pub graft: bool,
    /// Objects are kept this long (to serve pulls, to recognise duplicates).
    pub retain: Duration,
    /// Period of reports up the feedback tree.
    pub report_interval: Duration,
    /// One keyframe request per layer per this, at each hop.
    pub keyframe_coalesce: Duration,
    /// Bytes queued per peer at most before media is shed.
    pub queue_bytes: usize,
    /// Stream rate assumed (kbit/s) for the capacity rule until one is measured.
    pub assumed_stream_kbps: u64,
    /// Publisher: size the parity of each object from the shard loss its audience measures
    /// (reported up the feedback tree), instead of always `⌈k / (stripes − 1)⌉`: no parity
    /// while the median viewer loses nothing, at least `⌈k / (stripes − 1)⌉` once it loses
    /// any, more as [`parity_for_loss`] asks. Until the first report, `⌈k / (stripes − 1)⌉`.
    /// A viewer's loss is reported only for the objects it first saw `SHARD_LOSS_WARM_UP`
    /// (2 s) or more after its first push: the base parity covers an audience's first seconds.
    pub adaptive_parity: bool,
    /// Seed of the core's own random choices (peer picks): deterministic runs.
    pub seed: u64,
    /// **Simulator only; no security.** Shard digests and manifest signatures use a cheap
    /// non-cryptographic stand-in ([`auth::digest_with`], [`auth::sign_with`]) instead of
    /// SHA-256 and ed25519, so that `p2plive-sim` can run 10^5 peers on one machine. Every
    /// check still runs (a shard is used only if its digest matches the manifest), but
    /// anyone can forge. Peers with different settings cannot talk. The node and the
    /// elements never set it.
    pub insecure_simulated_auth: bool,
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        Self {
            stripes: 16,
            target_shard_bytes: 1100,
            root_slots: 1,
            upload_capacity_kbps: None,
            max_children: 32,
            join_timeout: Duration::from_millis(1500),
            parent_silence: Duration::from_millis(1500),
            have_interval: Duration::from_millis(250),
            repair_delay: Duration::from_millis(400),
            deadline: Duration::from_millis(1500),
            pull_retry: Duration::from_millis(200),
            graft: true,
            retain: Duration::from_secs(4),
            report_interval: Duration::from_secs(1),
            keyframe_coalesce: Duration::from_millis(500),
            queue_bytes: 512 * 1024,
            assumed_stream_kbps: 4000,
            adaptive_parity: true,
            seed: 1,
            insecure_simulated_auth: false,
        }
    }
}

/// Who this data plane is.
#[derive(Debug, Clone)]
pub enum Role<P> {
    /// The stream's publisher: root of every stripe, signs manifests.
    Publisher { key: SigningKey },
    /// A viewer of `publisher`'s stream; `key` verifies its manifests.
    Viewer { publisher: P, key: VerifyingKey },
}

/// What a peer did wrong (it is banned and disconnected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    /// Undecodable or invalid message.
    Malformed,
    /// A manifest whose signature is not the publisher's.
    ForgedManifest,
    /// A shard whose digest is not the manifest's.
    AlteredShard,
    /// An object of an older epoch or far older than the stream.
    Replay,
}

/// What the data plane asks of its driver.
#[derive(Debug, Clone, PartialEq)]
pub enum Output<P> {
    /// A verified, complete object (one `Fragment` envelope) of a wanted layer; `from` is the
    /// peer its manifest came from (its parent in the manifest's stripe, usually).
    Deliver {
        key: ObjectKey,
        object: Bytes,
        from: P,
    },
    /// Connect to `peer` (`info`: how to reach it, as given to [`DataPlane::handle_peer_up`]
    /// by whoever redirected us); call `handle_peer_up` once connected.
    Connect { peer: P, info: Bytes },
    /// Close every connection to `peer`.
    Disconnect { peer: P, reason: Misbehaviour },
    /// Publisher only: the whole audience, once per report interval.
    Audience(Summary),
    /// Publisher only: viewers asked for a keyframe of `(track, layer)` (coalesced); `epoch`
    /// is the publisher's current one.
    KeyframeRequest { epoch: u64, track: u32, layer: u32 },
}

/// The cumulative counters of [`DataPlaneStats`] by name (see [`DataPlaneStats::counters`]).
pub type Counters = [(&'static str, u64); 34];

/// Counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataPlaneStats {
    pub shards_received: u64,
    pub shards_duplicate: u64,
    pub shards_sent: u64,
    pub manifests_received: u64,
    /// Objects rebuilt with parity (some data shard missing).
    pub objects_rebuilt: u64,
    /// Shards regenerated and forwarded because the stripe's parent had not sent them.
    pub shards_regenerated: u64,
    pub objects_delivered: u64,
    pub pulls_sent: u64,
    pub pulls_served: u64,
    /// Pulls not answered: answering would exceed the repair budget (see
    /// `REPAIR_SHARE`).
    pub pulls_refused: u64,
    /// Objects given up: still incomplete at their deadline.
    pub objects_missed: u64,
    pub messages_malformed: u64,
    /// Shards dropped because too many waited for their manifest.
    pub unverified_dropped: u64,
    pub manifests_forged: u64,
    pub shards_altered: u64,
    pub replays: u64,
    /// Messages of an epoch other than the current one (not a replay).
    pub stale: u64,
    pub peers_banned: u64,
    /// Media messages shed from full send queues.
    pub shed: u64,
    /// Media messages sent from the send queues, the time (µs) they waited there in all,
    /// and the longest wait (µs): the pacing's share of each hop's delay.
    pub media_dequeued: u64,
    pub media_queue_wait_us: u64,
    pub media_queue_wait_max_us: u64,
    /// Objects whose first shard came before their manifest, and the time (µs) from the
    /// object's first sign (that shard, or a have) to the manifest in all: how long shards
    /// waited to be verified.
    pub manifest_waits: u64,
    pub manifest_wait_us: u64,
    pub joins_sent: u64,
    /// Joins sent to a shallower neighbour while having a parent (see `graft`).
    pub grafts_sent: u64,
    pub redirects_received: u64,
    pub parent_changes: u64,
    /// Parents lost, by cause: the parent redirected us to make room for a forwarder
    /// (preempted), sent a leave (it evicted us or dissolved its orphaned subtree), went
    /// silent while the stream flowed, or disconnected.
    pub parents_preempted: u64,
    pub parents_left: u64,
    pub parents_silent: u64,
    pub parents_gone: u64,
    /// Children dropped to make room in the interior stripe or because the upload capacity
    /// shrank, and orphaned subtrees dissolved (their children rejoin elsewhere).
    pub children_evicted: u64,
    pub subtrees_dissolved: u64,
    /// Leaves sent to peers that kept pushing a stripe in which they are not our parent.
    pub stale_edges_pruned: u64,
    /// Current state.
    pub parents: usize,
    pub children: usize,
    pub interior_stripe: Option<u8>,
    pub peers: usize,
    /// Deepest path to the root over the stripes (hops).
    pub depth: usize,
    /// Viewer: share (‰) of the shards its parents pushed that did not arrive, over the
    /// last report interval with data.
    pub shard_loss_permille: u32,
    /// Viewer: the loss (‰) of its own link, over about the last 3 s (`LINK_LOSS_DECAY`;
    /// not in its first 5 s of media): the lower median over its parents of each one's
    /// share of shards that did not come from it unasked (a pull answer from the parent does
    /// not hide a loss), over the parents with 20 shards due (else pooled over all of
    /// them). A loss on the viewer's link shows at every parent. A relay that
    /// forwards only part of what it should (a bad line of its own, a full uplink) shows at
    /// that parent only, however many stripes it serves, and a lower layer would not cure
    /// it; one that repairs first and pushes late shows at no parent. What ABR steps down
    /// for.
    pub link_loss_permille: u32,
    /// Publisher: the shard loss (‰) its parity is sized for (0: no parity once the audience
    /// reported, the base parity before).
    pub parity_loss_permille: u32,
}

impl DataPlaneStats {
    /// The cumulative counters by name, for diagnostics that sum them over peers
    /// (`SIM_STATS=1` in the simulator, `MESH_STATS=1` in the mesh benchmark). Not the current
    /// state (`parents` and below) nor `media_queue_wait_max_us`, a maximum.
    pub fn counters(&self) -> Counters {
        [
            ("shards_received", self.shards_received),
            ("shards_duplicate", self.shards_duplicate),
            ("shards_sent", self.shards_sent),
            ("manifests_received", self.manifests_received),
            ("objects_rebuilt", self.objects_rebuilt),
            ("shards_regenerated", self.shards_regenerated),
            ("objects_delivered", self.objects_delivered),
            ("pulls_sent", self.pulls_sent),
            ("pulls_served", self.pulls_served),
            ("pulls_refused", self.pulls_refused),
            ("objects_missed", self.objects_missed),
            ("messages_malformed", self.messages_malformed),
            ("unverified_dropped", self.unverified_dropped),
            ("manifests_forged", self.manifests_forged),
            ("shards_altered", self.shards_altered),
            ("replays", self.replays),
            ("stale", self.stale),
            ("peers_banned", self.peers_banned),
            ("shed", self.shed),
            ("media_dequeued", self.media_dequeued),
            ("media_queue_wait_us", self.media_queue_wait_us),
            ("manifest_waits", self.manifest_waits),
            ("manifest_wait_us", self.manifest_wait_us),
            ("joins_sent", self.joins_sent),
            ("grafts_sent", self.grafts_sent),
            ("redirects_received", self.redirects_received),
            ("parent_changes", self.parent_changes),
            ("parents_preempted", self.parents_preempted),
            ("parents_left", self.parents_left),
            ("parents_silent", self.parents_silent),
            ("parents_gone", self.parents_gone),
            ("children_evicted", self.children_evicted),
            ("subtrees_dissolved", self.subtrees_dissolved),
            ("stale_edges_pruned", self.stale_edges_pruned),
        ]
    }

    /// [`DataPlaneStats::counters`] summed over `stats` (several peers).
    pub fn summed_counters<'a>(stats: impl IntoIterator<Item = &'a DataPlaneStats>) -> Counters {
        let mut sums = DataPlaneStats::default().counters();
        for s in stats {
            for (sum, (_, value)) in sums.iter_mut().zip(s.counters()) {
                sum.1 += value;
            }
        }
        sums
    }
}

struct Manifest {
    proto: DpManifest,
    layout: Layout,
    digests: Vec<[u8; auth::DIGEST_LEN]>,
}

struct Object<P> {
    manifest: Option<Manifest>,
    manifest_from: Option<P>,
    /// Shard payloads (slices of the messages they came in: no copy).
    shards: Vec<Option<Bytes>>,
    /// The encoded message of each shard held: the one it arrived in, forwarded verbatim to
    /// every child (one allocation per shard however many peers relay it), or the one we
    /// encoded for it.
    wire: Vec<Option<Bytes>>,
    received: usize,
    /// Shards waiting for the manifest: sender, index, payload, message.
    unverified: Vec<(P, u32, Bytes, Option<Bytes>)>,
    /// Enough shards arrived (and were rebuilt if needed). The shards stay (they serve pulls
    /// and catch-ups), the assembled object does not: it goes to the driver and is dropped.
    complete: bool,
    first_seen: Instant,
    /// Shards forwarded to children (bit i: shard i).
    forwarded: u64,
    last_pull: Option<Instant>,
    missed: bool,
    /// Enough shards, some data shard missing: decode at this time unless it comes.
    decode_at: Option<Instant>,
    /// Shards that came from the parent of their stripe (bit i: shard i): what was pushed,
    /// not pulled. Measures the loss on the way from the parents (see `adaptive_parity`).
    pushed: u64,
    /// Of those, the shards that were not the parent's answer to our pull: what the link
    /// from the parent carried unasked (the link loss, see
    /// [`DataPlaneStats::link_loss_permille`]).
    pushed_unasked: u64,
    /// Shards asked for in our pulls (bit i: shard i).
    pulled_shards: u64,
    /// Stripes whose parent we pulled it from (bit s: stripe s).
    pulled_parents: u32,
    /// Counted in the shard-loss measure already.
    sampled: bool,
    /// The peer of the last pull, until its first answer times the round trip.
    pulled_from: Option<P>,
    /// Pulls sent for it that got no answer yet (an answer resets it).
    pulls: u32,
}

impl<P> Object<P> {
    fn new(now: Instant) -> Self {
        Object {
            manifest: None,
            manifest_from: None,
            shards: Vec::new(),
            wire: Vec::new(),
            received: 0,
            unverified: Vec::new(),
            complete: false,
            first_seen: now,
            forwarded: 0,
            last_pull: None,
            missed: false,
            decode_at: None,
            pushed: 0,
            pushed_unasked: 0,
            pulled_shards: 0,
            pulled_parents: 0,
            sampled: false,
            pulled_from: None,
            pulls: 0,
        }
    }
}

#[derive(Default)]
struct FrameState {
    fragments: u32,
    complete: u32,
    first_seen: Option<Instant>,
}

struct Peer {
    info: Bytes,
    short: u64,
    queue: SendQueue,
    /// Per (track, layer): the newest frame and a bitmap of complete frames before it.
    have: BTreeMap<(u32, u32), DpHaveLayer>,
    /// What it wants from us, per stripe in which it is our child.
    subs: HashMap<u8, BTreeSet<(u32, u32)>>,
    /// From its joins: the stripe it forwards in, and whether it can forward at all.
    interior: Option<u8>,
    can_forward: bool,
    report: Option<(Instant, Summary)>,
    /// Its depth in each stripe, from its last have (0: unknown or not attached).
    depths: Vec<u32>,
    /// Children it can still take, from its last join or have.
    room: u32,
    /// Reachable only through a relay (the driver says): a parent of last resort.
    relayed: bool,
    /// Its haves carry another epoch than ours (a publisher restarted under a new peer id,
    /// or another one on the topic): neither a parent nor a source of pulls.
    foreign: bool,
    /// When a manifest of another epoch it sent was last checked against our publisher's key.
    stale_checked: Option<Instant>,
    /// Shards it pushed us per stripe in which it is not our parent, of objects we never
    /// pulled, since we last told it to stop (see `PRUNE_AFTER_UNSOLICITED`).
    unsolicited: BTreeMap<u8, u32>,
    /// When we last told it to stop pushing (a `DpLeave` for a stripe it is not our parent in).
    pruned_at: Option<Instant>,
}

struct Stripe<P> {
    parent: Option<P>,
    /// Per (track, layer), each time `newest_from` pushed us a later object (sequence,
    /// fragment) than any before in this stripe, and when (the last `PUSH_HISTORY`). A
    /// shard of an older object still missing a reorder window after a later one came in
    /// its stripe was lost, not slow: it is pulled at once, and nothing is pulled while it
    /// may still be on its way, however long the path (RACK's rule, RFC 8985 §6.2; the
    /// window covers a relay holding shards until their manifest, which travels another
    /// stripe).
    newest_pushed: BTreeMap<(u32, u32), PushHistory>,
    newest_from: Option<P>,
    /// Since when `parent` is this parent.
    parent_since: Instant,
    /// A join sent (or waiting for a connection) and when.
    joining: Option<(P, Instant, bool)>,
    next_candidate: Option<P>,
    children: BTreeSet<P>,
    /// Short ids from the root to this peer (included).
    path: Vec<u64>,
    redirects: u32,
    /// No new join before this (backoff after a refusal).
    next_join_at: Instant,
    /// Join searches refused in a row since a parent last accepted (see `JOIN_BACKOFF_MS`).
    join_failures: u32,
    /// Redirects followed in the current search.
    chain: u32,
    /// Since when we have children but no parent here.
    orphan_since: Option<Instant>,
    /// No graft attempt before this.
    next_graft: Instant,
    refused: BTreeMap<P, Instant>,
    sent_subs: Option<BTreeSet<(u32, u32)>>,
    /// When the subscription was last sent to the parent (see `maintain_tree`).
    subs_sent_at: Option<Instant>,
    /// Since when a shard is due from the parent (a verified manifest put one of an object
    /// it sends us in this stripe) with nothing from it since; see `parent_silence`.
    due_since: Option<Instant>,
    /// Shards of the objects played that the parent should have pushed us, and how many of
    /// them it did not push unasked (the link loss), decayed by `LINK_LOSS_DECAY` at each
    /// report.
    link_counts: (f64, f64),
}

impl<P: PartialEq + Copy> Stripe<P> {
    /// `parent` pushed (a shard or the manifest of) `key` in this stripe.
    fn note_pushed(&mut self, parent: P, key: &ObjectKey, now: Instant) {
        if self.newest_from != Some(parent) {
            self.newest_from = Some(parent);
            self.newest_pushed.clear();
        }
        let history = self
            .newest_pushed
            .entry((key.track, key.layer))
            .or_default();
        let position = (key.sequence, key.fragment);
        if history.back().is_none_or(|(newest, _)| *newest < position) {
            if history.len() >= PUSH_HISTORY {
                history.pop_front();
            }
            history.push_back((position, now));
        }
    }

    /// Whether the current parent pushed a later object of `key`'s layer than `key` at
    /// least `window` before `now`.
    fn overtook(&self, key: &ObjectKey, now: Instant, window: Duration) -> bool {
        if self.parent.is_none() || self.newest_from != self.parent {
            return false;
        }
        let position = (key.sequence, key.fragment);
        self.newest_pushed
            .get(&(key.track, key.layer))
            .and_then(|history| history.iter().find(|(later, _)| *later > position))
            .is_some_and(|(_, at)| *at + window <= now)
    }
}

/// (sequence, fragment) of each object that advanced a stripe's newest push, and when.
type PushHistory = VecDeque<((u64, u32), Instant)>;

/// The stripes an object's manifest travels in: those of shards 0 and 1 (one when there is a
/// single stripe). A relay forwards a shard only once it holds the manifest that
/// verifies it, so every shard of an object waits, at every hop, for the manifest to come
/// down the other trees: with one manifest stripe that wait compounds over the depth of 16
/// independent trees. In the simulator (N = 300, residential, 10 s, seeds 1 / 2 / 3) one
/// stripe delivered 0.955 / 0.981 / 0.977 of the frames, and a third of the objects waited
/// 240 ms on average for their manifest at each hop; two stripes (the earlier of two trees)
/// delivered 0.992 / 0.999 / 1.000, and fewer pulls made up for the extra manifest copy
/// (download 1.92× → 1.79× at seed 1); three were no better (0.999 / 0.998 / 0.995), and
/// every stripe of the object took download to 2.45× for 0.993.
fn manifest_stripes(key: &ObjectKey, stripes: u8) -> Vec<u8> {
    let first = stripe_of(key, 0, stripes);
    let second = stripe_of(key, 1, stripes);
    if second != first {
        vec![first, second]
    } else {
        vec![first]
    }
}

/// Parity shards `m` for `data` data shards such that more than `m` of the `data + m`
/// shards are lost with probability at most `residual` when each is lost independently with
/// probability `loss` (the binomial tail); at most `data` (a loss that needs more is left to
/// pulls). 0 when `loss` is 0.
pub fn parity_for_loss(data: usize, loss: f64, residual: f64) -> usize {
    if loss <= 0.0 || data == 0 {
        return 0;
    }
    let p = loss.min(0.5);
    for m in 0..=data {
        let n = data + m;
        // P(X <= m) for X ~ Binomial(n, p).
        let mut term = (1.0 - p).powi(n as i32);
        let mut cdf = term;
        for i in 1..=m {
            term *= (n - i + 1) as f64 / i as f64 * p / (1.0 - p);
            cdf += term;
        }
        if 1.0 - cdf <= residual {
            return m;
        }
    }
    data
}

/// Whether an object of `key`'s layer first seen at `first_seen` is played: its layer is
/// subscribed, and it is at most `CATCH_UP` older than the subscription.
fn plays(
    subscription: &BTreeSet<(u32, u32)>,
    subscribed_at: &HashMap<(u32, u32), Instant>,
    key: &ObjectKey,
    first_seen: Instant,
) -> bool {
    let layer = (key.track, key.layer);
    subscription.contains(&layer)
        && subscribed_at
            .get(&layer)
            .is_none_or(|&at| first_seen + CATCH_UP >= at)
}

/// The data plane of one stream at one peer. See the module documentation.
pub struct DataPlane<P: PeerKey> {
    config: DataPlaneConfig,
    role: Role<P>,
    me: P,
    me_short: u64,
    tag: u32,
    epoch: Option<u64>,
    old_epochs: HashSet<u64>,
    /// When the last manifest of the current epoch verified (viewer).
    last_verified: Option<Instant>,
    peers: BTreeMap<P, Peer>,
    banned: HashSet<P>,
    stripes: Vec<Stripe<P>>,
    interior: Option<u8>,
    subscription: BTreeSet<(u32, u32)>,
    /// When each subscribed layer was (last) added: a relay holds older objects of a layer
    /// it forwards but did not play; those are neither pulled nor delivered when it starts
    /// playing that layer (they would arrive late in a burst), only the last `CATCH_UP`.
    subscribed_at: HashMap<(u32, u32), Instant>,
    /// Shards expected and missing (not pushed by the stripe's parent) of the objects played
    /// since the last report: all of them, and those first seen `SHARD_LOSS_WARM_UP` or
    /// more after our first push (what the report sizes the parity with).
    shard_loss: (u64, u64),
    shard_loss_sized: (u64, u64),
    /// Smoothed round trip of pulls (RFC 6298's SRTT, alpha 1/8), once one was timed.
    pull_rtt: Option<Duration>,
    /// Publisher: the shard loss parity is sized for, and when it was last set.
    parity_loss: f64,
    parity_loss_at: Instant,
    /// Publisher: whether the audience has reported any shard loss measure yet (until then
    /// the base parity is used).
    parity_measured: bool,
    objects: BTreeMap<ObjectKey, Object<P>>,
    /// The objects neither complete nor given up (what the repair timer scans: a few in
    /// flight, not the seconds of objects kept for pulls).
    incomplete: BTreeSet<ObjectKey>,
    /// Peers that may have queued messages, in the order they were queued to
    /// ([`DataPlane::poll_transmit_next`]); each at most once.
    ready: VecDeque<P>,
    frames: BTreeMap<(u32, u32, u64), FrameState>,
    /// Newest sequence seen per (track, layer), and the first (pulls start there).
    newest: HashMap<(u32, u32), u64>,
    first: HashMap<(u32, u32), u64>,
    outputs: VecDeque<Output<P>>,
    own_report: Option<LocalReport>,
    last_keyframe: HashMap<(u32, u32), Instant>,
    next_have: Instant,
    next_report: Instant,
    next_expire: Instant,
    /// Measured incoming (viewer) or published (publisher) media rate, bytes/s (EWMA).
    rate_bytes: f64,
    rate_window: (Instant, u64),
    /// Upload pacing (bytes) when the capacity is limited.
    tokens: f64,
    tokens_at: Instant,
    /// Repair budget (bytes) for answering pulls, and when it was last refilled.
    repair_tokens: f64,
    repair_at: Instant,
    rng: u64,
    /// The latest `now` seen.
    last_now: Instant,
    /// The last run of the timers (periodic ticks are relative to it).
    last_timeout: Instant,
    /// Media last pushed by any parent, and since when it flows without a pause of
    /// `parent_silence` (before the stream starts, or after a pause, every stripe's parent
    /// was silent: none of them is to blame when the first shards arrive).
    last_pushed: Instant,
    /// When a parent first pushed us anything (the link loss's warm-up).
    first_pushed: Option<Instant>,
    /// When an object last became complete here (pushed, pulled or rebuilt).
    last_complete: Instant,
    /// The next have goes to every peer, not only tree neighbours: media came again after
    /// starving (see `STARVED_AFTER`).
    have_to_all: bool,
    flow_since: Instant,
    /// Some object may still need a pull (cleared when a scan finds none).
    repair_pending: bool,
    /// Until then (a parent just changed) the repair timer ticks every 5 ms, not 20 ms.
    fast_repair_until: Instant,
    /// No graft in any stripe before this.
    next_graft_any: Instant,
    /// Objects with enough shards waiting for their decode grace.
    pending_decodes: BTreeSet<ObjectKey>,
    /// Newest complete frame per (track, layer).
    newest_complete: HashMap<(u32, u32), u64>,
    /// Bytes of shards waiting for their manifest (bounded by `MAX_UNVERIFIED_BYTES`).
    unverified_bytes: usize,
    stats: DataPlaneStats,
}

impl<P: PeerKey> DataPlane<P> {
    /// A data plane for `stream` at peer `me`.
    pub fn new(
        now: Instant,
        stream: &str,
        me: P,
        role: Role<P>,
        mut config: DataPlaneConfig,
    ) -> Self {
        config.stripes = config.stripes.clamp(2, 32);
        config.root_slots = config.root_slots.max(1);
        let stripes = (0..config.stripes)
            .map(|_| Stripe {
                parent: None,
                parent_since: now,
                joining: None,
                next_candidate: None,
                children: BTreeSet::new(),
                path: Vec::new(),
                redirects: 0,
                next_join_at: now,
                join_failures: 0,
                chain: 0,
                orphan_since: None,
                next_graft: now,
                refused: BTreeMap::new(),
                sent_subs: None,
                subs_sent_at: None,
                due_since: None,
                newest_pushed: BTreeMap::new(),
                newest_from: None,
                link_counts: (0.0, 0.0),
            })
            .collect();
        let me_short = fnv64(&me.to_bytes());
        let rng = config.seed ^ me_short | 1;
        let mut plane = DataPlane {
            role,
            me,
            me_short,
            tag: stream_tag(stream),
            epoch: None,
            old_epochs: HashSet::new(),
            last_verified: None,
            peers: BTreeMap::new(),
            banned: HashSet::new(),
            stripes,
            interior: None,
            subscription: BTreeSet::new(),
            subscribed_at: HashMap::new(),
            shard_loss: (0, 0),
            shard_loss_sized: (0, 0),
            pull_rtt: None,
            parity_loss: 0.0,
            parity_loss_at: now,
            parity_measured: false,
            objects: BTreeMap::new(),
            incomplete: BTreeSet::new(),
            ready: VecDeque::new(),
            frames: BTreeMap::new(),
            newest: HashMap::new(),
            first: HashMap::new(),
            outputs: VecDeque::new(),
            own_report: None,
            last_keyframe: HashMap::new(),
            next_have: now + config.have_interval,
            next_report: now + config.report_interval,
            next_expire: now,
            rate_bytes: 0.0,
            rate_window: (now, 0),
            tokens: 0.0,
            tokens_at: now,
            repair_tokens: 0.0,
            repair_at: now,
            rng,
            last_now: now,
            last_timeout: now,
            last_pushed: now,
            first_pushed: None,
            last_complete: now,
            have_to_all: false,
            flow_since: now,
            repair_pending: false,
            fast_repair_until: now,
            next_graft_any: now,
            pending_decodes: BTreeSet::new(),
            newest_complete: HashMap::new(),
            unverified_bytes: 0,
            stats: DataPlaneStats::default(),
            config,
        };
        if plane.is_publisher() {
            for stripe in &mut plane.stripes {
                stripe.path = vec![me_short];
            }
        } else if plane.can_forward() {
            // The interior stripe follows from the peer id, as in SplitStream: uniform over
            // the stripes, so forwarding is shared evenly once viewers outnumber stripes.
            plane.interior = Some((me_short % u64::from(plane.config.stripes)) as u8);
        }
        plane
    }

    pub fn is_publisher(&self) -> bool {
        matches!(self.role, Role::Publisher { .. })
    }

    pub fn config(&self) -> &DataPlaneConfig {
        &self.config
    }

    /// Viewer: when a manifest signed by the publisher last verified (`None`: never, or
    /// none since the epoch changed). The node follows a new publisher only after it and
    /// the catalog have both been silent for a while.
    pub fn last_verified(&self) -> Option<Instant> {
        self.last_verified
    }

    fn random(&mut self) -> u64 {
        // xorshift64*: the core's randomness comes from the seed it was given.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> Option<T> {
        if items.is_empty() {
            None
        } else {
            let i = (self.random() % items.len() as u64) as usize;
            Some(items[i])
        }
    }

    /// The current epoch (from the verified catalog). Objects of other epochs are dropped from
    /// now on; objects of an epoch that was current before are replays.
    pub fn set_epoch(&mut self, epoch: u64) {
        if self.epoch == Some(epoch) {
            return;
        }
        if let Some(old) = self.epoch.replace(epoch) {
            self.old_epochs.insert(old);
            self.last_verified = None;
            // Told again by their next haves.
            for peer in self.peers.values_mut() {
                peer.foreign = false;
            }
            self.objects.clear();
            self.incomplete.clear();
            self.frames.clear();
            self.newest.clear();
            self.newest_complete.clear();
            self.first.clear();
        }
    }

    /// The (track, layer) pairs this viewer plays; only those are delivered, and only those
    /// (and what its children want) are asked from its parents.
    pub fn set_subscription(&mut self, now: Instant, layers: BTreeSet<(u32, u32)>) {
        self.last_now = self.last_now.max(now);
        for &layer in layers.difference(&self.subscription) {
            self.subscribed_at.insert(layer, now);
            // Pulls of frames announced by haves start from what is new now, not from the
            // first frame this peer ever relayed of the layer.
            match self.newest.get(&layer) {
                Some(&newest) => self.first.insert(layer, newest),
                None => self.first.remove(&layer),
            };
        }
        self.subscribed_at.retain(|layer, _| layers.contains(layer));
        self.subscription = layers;
        for s in 0..self.config.stripes {
            self.send_subscription(s);
        }
    }

    /// The viewer's report of the last interval; merged into the next summary sent up.
    pub fn set_report(&mut self, report: LocalReport) {
        self.own_report = Some(report);
    }

    /// Asks the publisher for a keyframe of `(track, layer)` up the feedback tree.
    pub fn request_keyframe(&mut self, now: Instant, track: u32, layer: u32) {
        self.forward_keyframe(now, track, layer);
    }

    /// A connection to `peer` that speaks the data plane is up (or its `info` changed).
    pub fn handle_peer_up(&mut self, now: Instant, peer: P, info: Bytes) {
        if self.banned.contains(&peer) || peer == self.me {
            return;
        }
        let short = fnv64(&peer.to_bytes());
        if matches!(self.role, Role::Viewer { publisher, .. } if publisher == peer) {
            // The publisher (back): searches backing off start again.
            self.retry_joins_soon(now);
        }
        let entry = self.peers.entry(peer).or_insert_with(|| Peer {
            info: Bytes::new(),
            short,
            queue: SendQueue::default(),
            have: BTreeMap::new(),
            subs: HashMap::new(),
            interior: None,
            can_forward: false,
            report: None,
            depths: Vec::new(),
            room: 0,
            relayed: false,
            foreign: false,
            stale_checked: None,
            unsolicited: BTreeMap::new(),
            pruned_at: None,
        });
        if !info.is_empty() {
            entry.info = info;
        }
        // Joins that waited for this connection.
        for s in 0..self.config.stripes {
            if let Some((target, _, false)) = self.stripes[usize::from(s)].joining
                && target == peer
            {
                self.stripes[usize::from(s)].joining = Some((peer, now, true));
                self.send_join(s, peer);
            }
        }
        self.maintain_tree(now);
    }

    /// Whether `peer` is connected only through a relay (a circuit relay v2 hop): its
    /// shards take the relay's uplink too, and relays cap circuits in bytes and time, so
    /// it is taken as a parent only when no directly connected peer is a candidate. Call
    /// after [`Self::handle_peer_up`]; unknown peers are ignored.
    pub fn set_peer_relayed(&mut self, peer: P, relayed: bool) {
        if let Some(entry) = self.peers.get_mut(&peer) {
            entry.relayed = relayed;
        }
    }

    /// Every connection to `peer` is gone.
    pub fn handle_peer_down(&mut self, now: Instant, peer: P) {
        if self.peers.remove(&peer).is_none() {
            return;
        }
        self.forget_peer(peer);
        self.maintain_tree(now);
    }

    fn forget_peer(&mut self, peer: P) {
        self.ready.retain(|p| *p != peer);
        for s in 0..self.config.stripes {
            let stripe = &mut self.stripes[usize::from(s)];
            if stripe.parent == Some(peer) {
                stripe.parent = None;
                stripe.path.clear();
                stripe.sent_subs = None;
                self.stats.parents_gone += 1;
                self.parent_changed();
                self.update_child_paths(s);
            }
            let stripe = &mut self.stripes[usize::from(s)];
            if stripe.joining.is_some_and(|(p, _, _)| p == peer) {
                stripe.joining = None;
            }
            if stripe.next_candidate == Some(peer) {
                stripe.next_candidate = None;
            }
            if stripe.children.remove(&peer) {
                self.send_subscription(s);
            }
        }
    }

    /// Publisher: sends `object` (one encoded `Fragment` of `epoch`) down the trees.
    pub fn publish(&mut self, now: Instant, epoch: u64, key: ObjectKey, object: Bytes) {
        let Role::Publisher { key: signing } = &self.role else {
            return;
        };
        let signing = signing.clone();
        if object.is_empty() || object.len() > MAX_OBJECT_LEN {
            return;
        }
        if self.epoch != Some(epoch) {
            self.set_epoch(epoch);
        }
        let mut layout = Layout::for_object(
            object.len(),
            usize::from(self.config.stripes),
            self.config.target_shard_bytes,
        );
        if self.config.adaptive_parity && self.parity_measured {
            layout.parity = if self.parity_loss > 0.0 {
                parity_for_loss(layout.data, self.parity_loss, PARITY_RESIDUAL)
                    .clamp(layout.parity, layout.data.max(layout.parity))
                    .min(fec::MAX_SHARDS - layout.data)
            } else {
                // The median viewer lost nothing: parity would be pure overhead (1/11 of a
                // 3 Mbit/s delta frame). A shard that does go missing is pulled; a loss
                // raises the parity again at the next report.
                0
            };
        }
        let Ok(shards) = fec::encode(&object, &layout) else {
            return;
        };
        let simulated = self.config.insecure_simulated_auth;
        let digests: Vec<[u8; auth::DIGEST_LEN]> = shards
            .iter()
            .map(|s| auth::digest_with(simulated, s))
            .collect();
        let digest_bytes: Vec<u8> = digests.iter().flatten().copied().collect();
        let fragments = fragment_count(&object).unwrap_or(1);
        let signed = auth::signed_bytes(
            self.tag,
            epoch,
            &key,
            layout.length as u32,
            layout.data as u32,
            layout.parity as u32,
            fragments,
            &digest_bytes,
        );
        let signature = auth::sign_with(simulated, &signing, &signed);
        let proto = DpManifest {
            epoch,
            key: Some(key.to_proto()),
            length: layout.length as u32,
            data_shards: layout.data as u32,
            parity_shards: layout.parity as u32,
            fragments,
            digests: digest_bytes.into(),
            signature: signature.to_vec().into(),
        };
        self.note_rate(now, object.len());
        let mut obj = Object::new(now);
        obj.manifest = Some(Manifest {
            proto,
            layout,
            digests,
        });
        obj.received = layout.total();
        obj.wire = vec![None; shards.len()];
        obj.shards = shards.into_iter().map(Some).collect();
        obj.complete = true;
        self.objects.insert(key, obj);
        self.note_frame(now, &key, fragments, true);
        self.forward_manifest(key);
        for i in 0..layout.total() as u32 {
            self.forward_shard(key, i);
        }
        self.expire(now);
    }

    /// A data-plane message from `from`.
    ///
    /// Shard payloads are slices of `bytes` (no copy).
    pub fn handle_message(&mut self, now: Instant, from: P, bytes: Bytes) {
        self.last_now = now;
        if self.banned.contains(&from) || !self.peers.contains_key(&from) {
            return;
        }
        if bytes.len() > MAX_MESSAGE_LEN {
            return self.misbehaved(now, from, Misbehaviour::Malformed);
        }
        let wire = bytes.clone();
        let Ok(message) = DpMessage::decode(bytes) else {
            return self.misbehaved(now, from, Misbehaviour::Malformed);
        };
        if message.stream != self.tag {
            // Another stream's message on this stream's session: the driver routes by tag.
            return;
        }
        match message.body {
            Some(Body::Shard(shard)) => self.on_shard(now, from, shard, wire),
            Some(Body::Manifest(manifest)) => self.on_manifest(now, from, manifest),
            Some(Body::Join(join)) => self.on_join(now, from, join),
            Some(Body::Accept(accept)) => self.on_accept(now, from, accept),
            Some(Body::Redirect(redirect)) => self.on_redirect(now, from, redirect),
            Some(Body::Leave(leave)) => self.on_leave(now, from, leave),
            Some(Body::Have(have)) => self.on_have(now, from, have),
            Some(Body::Pull(pull)) => self.on_pull(from, pull),
            Some(Body::Subscribe(sub)) => self.on_subscribe(from, sub),
            Some(Body::Report(report)) => {
                let is_child = self.stripes[usize::from(FEEDBACK_STRIPE)]
                    .children
                    .contains(&from);
                if let Some(peer) = self.peers.get_mut(&from)
                    && is_child
                {
                    peer.report = Some((now, Summary::from_proto(&report)));
                }
            }
            Some(Body::Keyframe(k)) => self.forward_keyframe(now, k.track, k.layer),
            None => self.misbehaved(now, from, Misbehaviour::Malformed),
        }
    }

    fn misbehaved(&mut self, now: Instant, peer: P, reason: Misbehaviour) {
        match reason {
            Misbehaviour::Malformed => self.stats.messages_malformed += 1,
            Misbehaviour::ForgedManifest => self.stats.manifests_forged += 1,
            Misbehaviour::AlteredShard => self.stats.shards_altered += 1,
            Misbehaviour::Replay => self.stats.replays += 1,
        }
        if !self.banned.insert(peer) {
            return;
        }
        tracing::warn!(?peer, ?reason, "data plane: peer banned");
        self.stats.peers_banned += 1;
        self.peers.remove(&peer);
        for obj in self.objects.values_mut() {
            obj.unverified.retain(|(p, _, _, _)| *p != peer);
        }
        self.forget_peer(peer);
        self.outputs.push_back(Output::Disconnect { peer, reason });
        self.maintain_tree(now);
    }

    // ---- media --------------------------------------------------------------------------

    fn on_shard(&mut self, now: Instant, from: P, shard: DpShard, wire: Bytes) {
        let Some(key) = shard.key.as_ref().map(ObjectKey::from_proto) else {
            return self.misbehaved(now, from, Misbehaviour::Malformed);
        };
        if shard.index as usize >= fec::MAX_SHARDS || shard.data.len() > MAX_MESSAGE_LEN {
            return self.misbehaved(now, from, Misbehaviour::Malformed);
        }
        self.stats.shards_received += 1;
        // Another epoch's shards: their manifests would never verify.
        if self.is_foreign(&from) {
            self.stats.stale += 1;
            return;
        }
        // Forwarded verbatim only if it is exactly what we would encode (no unknown fields a
        // peer could use to bloat what we relay).
        let canonical = self.encoded_shard_len(&shard);
        let wire = (wire.len() == canonical).then_some(wire);
        let s = stripe_of(&key, shard.index, self.config.stripes);
        let pushed = self.stripes[usize::from(s)].parent == Some(from);
        // Pushed by the parent, but in answer to our pull (not its own push).
        let answer = pushed
            && self.objects.get(&key).is_some_and(|obj| {
                obj.pulled_shards & (1 << shard.index) != 0 && obj.pulled_parents & (1 << s) != 0
            });
        if pushed {
            self.stripes[usize::from(s)].note_pushed(from, &key, now);
            // An answer to our pull is no sign the parent still pushes to us: one that
            // dropped us (its leave lost) would otherwise keep the edge alive for as long as
            // we pull from it.
            if !answer {
                self.stripes[usize::from(s)].due_since = None;
            }
            if now.saturating_duration_since(self.last_pushed) >= self.config.parent_silence {
                self.flow_since = now;
            }
            self.last_pushed = now;
            self.first_pushed.get_or_insert(now);
        }
        if !self.objects.contains_key(&key) {
            if self.objects.len() >= MAX_OBJECTS || self.is_old(&key) {
                self.stats.shards_duplicate += 1;
                return;
            }
            self.objects.insert(key, Object::new(now));
            self.incomplete.insert(key);
            self.repair_pending = true;
        }
        let obj = self.objects.get_mut(&key).expect("inserted above");
        if pushed {
            obj.pushed |= 1 << shard.index;
            if !answer {
                obj.pushed_unasked |= 1 << shard.index;
            }
        }
        let unsolicited = !pushed && obj.last_pull.is_none() && !self.is_publisher();
        if unsolicited {
            self.note_unsolicited(now, from, s);
        }
        let obj = self.objects.get_mut(&key).expect("inserted above");
        if obj.pulled_from == Some(from)
            && let Some(at) = obj.last_pull
        {
            obj.pulled_from = None;
            obj.pulls = 0;
            let sample = now.saturating_duration_since(at);
            self.pull_rtt = Some(match self.pull_rtt {
                Some(srtt) => (srtt * 7 + sample) / 8,
                None => sample,
            });
        }
        if obj.complete {
            self.stats.shards_duplicate += 1;
            return;
        }
        if obj.manifest.is_none() {
            let len = shard.data.len();
            if obj.unverified.len() < MAX_UNVERIFIED
                && self.unverified_bytes + len <= MAX_UNVERIFIED_BYTES
            {
                obj.unverified.push((from, shard.index, shard.data, wire));
                self.unverified_bytes += len;
            } else {
                self.stats.unverified_dropped += 1;
            }
            return;
        }
        self.accept_shard(now, from, key, shard.index, shard.data, wire);
    }

    /// `from` pushed us a shard in stripe `s`, where it is not our parent, of an object we
    /// never pulled: after `PRUNE_AFTER_UNSOLICITED` of them, a leave for `s` ends the edge
    /// it still believes in.
    fn note_unsolicited(&mut self, now: Instant, from: P, s: u8) {
        let Some(peer) = self.peers.get_mut(&from) else {
            return;
        };
        let count = peer.unsolicited.entry(s).or_default();
        *count += 1;
        if *count < PRUNE_AFTER_UNSOLICITED
            || peer
                .pruned_at
                .is_some_and(|at| now.saturating_duration_since(at) < Duration::from_secs(1))
        {
            return;
        }
        peer.unsolicited.remove(&s);
        peer.pruned_at = Some(now);
        self.stats.stale_edges_pruned += 1;
        self.enqueue_control(
            from,
            Body::Leave(DpLeave {
                stripe: u32::from(s),
            }),
        );
    }

    /// Bytes of the message carrying `shard` as we encode it.
    fn encoded_shard_len(&self, shard: &DpShard) -> usize {
        DpMessage {
            stream: self.tag,
            body: Some(Body::Shard(shard.clone())),
        }
        .encoded_len()
    }

    /// Whether `key` is older than anything still tracked for its layer (already expired).
    fn is_old(&self, key: &ObjectKey) -> bool {
        self.newest
            .get(&(key.track, key.layer))
            .is_some_and(|&newest| key.sequence.saturating_add(REPLAY_WINDOW) < newest)
    }

    fn accept_shard(
        &mut self,
        now: Instant,
        from: P,
        key: ObjectKey,
        index: u32,
        data: Bytes,
        wire: Option<Bytes>,
    ) {
        let simulated = self.config.insecure_simulated_auth;
        let Some(obj) = self.objects.get_mut(&key) else {
            return;
        };
        let Some(manifest) = &obj.manifest else {
            return;
        };
        let i = index as usize;
        if i >= manifest.layout.total() || data.len() != manifest.layout.shard_len {
            return self.misbehaved(now, from, Misbehaviour::AlteredShard);
        }
        if auth::digest_with(simulated, &data) != manifest.digests[i] {
            return self.misbehaved(now, from, Misbehaviour::AlteredShard);
        }
        if obj.complete || obj.shards[i].is_some() {
            self.stats.shards_duplicate += 1;
            return;
        }
        obj.shards[i] = Some(data);
        obj.wire[i] = wire;
        obj.received += 1;
        let data_count = manifest.layout.data;
        let enough = obj.received >= data_count;
        // Every data shard: the object is their concatenation. Enough with parity among
        // them: a data shard still on its way gets DECODE_GRACE before the decode.
        let all_data = obj.shards[..data_count].iter().all(Option::is_some);
        let decode_at = now + DECODE_GRACE;
        if enough && !all_data && obj.decode_at.is_none() {
            obj.decode_at = Some(decode_at);
        }
        self.forward_shard(key, index);
        if all_data {
            self.complete(now, key);
        } else if enough {
            self.pending_decodes.insert(key);
        }
    }

    /// Objects whose decode grace ended.
    fn run_decodes(&mut self, now: Instant) {
        if self.pending_decodes.is_empty() {
            return;
        }
        let due: Vec<ObjectKey> = self
            .pending_decodes
            .iter()
            .filter(|key| {
                self.objects
                    .get(key)
                    .is_none_or(|o| o.complete || o.decode_at.is_none_or(|at| at <= now))
            })
            .copied()
            .collect();
        for key in due {
            self.pending_decodes.remove(&key);
            if self.objects.get(&key).is_some_and(|o| !o.complete) {
                self.complete(now, key);
            }
        }
    }

    fn on_manifest(&mut self, now: Instant, from: P, m: DpManifest) {
        let Some(key) = m.key.as_ref().map(ObjectKey::from_proto) else {
            return self.misbehaved(now, from, Misbehaviour::Malformed);
        };
        let layout = Layout {
            length: m.length as usize,
            data: m.data_shards as usize,
            parity: m.parity_shards as usize,
            shard_len: (m.length as usize)
                .div_ceil((m.data_shards as usize).max(1))
                .max(2)
                .next_multiple_of(2),
        };
        if layout.validate(MAX_OBJECT_LEN).is_err()
            || m.digests.len() != layout.total() * auth::DIGEST_LEN
            || m.fragments == 0
            || m.fragments > 4096
        {
            return self.misbehaved(now, from, Misbehaviour::Malformed);
        }
        if self.is_publisher() {
            return;
        }
        if let Some(epoch) = self.epoch
            && m.epoch != epoch
        {
            // Whose stream it is costs a signature check: at most one per `have_interval`
            // per peer (a replay of an epoch we knew is checked every time, as it bans).
            let check = self.peers.get(&from).is_some_and(|p| {
                !p.foreign
                    && p.stale_checked.is_none_or(|at| {
                        now.saturating_duration_since(at) >= self.config.have_interval
                    })
            });
            if !check && !self.old_epochs.contains(&m.epoch) {
                self.stats.stale += 1;
                return;
            }
            if let Some(p) = self.peers.get_mut(&from) {
                p.stale_checked = Some(now);
            }
            let ours = self.verify_manifest(&key, &m);
            if ours && self.old_epochs.contains(&m.epoch) {
                return self.misbehaved(now, from, Misbehaviour::Replay);
            }
            self.stats.stale += 1;
            // Signed by our publisher: its next epoch, the catalog is on its way. Otherwise
            // the sender relays another publisher's stream (or made this up): it can only
            // shut itself out.
            if !ours {
                self.mark_foreign(now, from);
            }
            return;
        }
        if self
            .objects
            .get(&key)
            .is_some_and(|o| o.manifest.is_some() || o.complete)
        {
            self.stats.manifests_received += 1;
            return;
        }
        if !self.verify_manifest(&key, &m) {
            return self.misbehaved(now, from, Misbehaviour::ForgedManifest);
        }
        if self.is_old(&key) && !self.objects.contains_key(&key) {
            return self.misbehaved(now, from, Misbehaviour::Replay);
        }
        self.stats.manifests_received += 1;
        self.last_verified = Some(now);
        // What every stripe's children cost: the object's shards, parity included, once;
        // not what reached us (duplicates and repairs would shrink our fan-out as they grow).
        self.note_rate(now, layout.total() * layout.shard_len);
        // Each stripe's parent that sends us this layer owes us its shard of the object.
        let layer = (key.track, key.layer);
        for i in 0..layout.total() as u32 {
            let stripe = &mut self.stripes[usize::from(stripe_of(&key, i, self.config.stripes))];
            if stripe.parent.is_some()
                && stripe
                    .sent_subs
                    .as_ref()
                    .is_some_and(|subs| subs.contains(&layer))
            {
                stripe.due_since.get_or_insert(now);
            }
        }
        if self.epoch.is_none() {
            self.epoch = Some(m.epoch);
        }
        if !self.objects.contains_key(&key) {
            if self.objects.len() >= MAX_OBJECTS {
                return;
            }
            self.objects.insert(key, Object::new(now));
            self.incomplete.insert(key);
            self.repair_pending = true;
        }
        let s = stripe_of(&key, 0, self.config.stripes);
        if self.stripes[usize::from(s)].parent == Some(from) {
            self.stripes[usize::from(s)].due_since = None;
            self.stripes[usize::from(s)].note_pushed(from, &key, now);
        }
        let fragments = m.fragments;
        let digests = m
            .digests
            .chunks_exact(auth::DIGEST_LEN)
            .map(|c| c.try_into().expect("chunks of DIGEST_LEN"))
            .collect();
        let obj = self.objects.get_mut(&key).expect("inserted above");
        obj.shards = vec![None; layout.total()];
        obj.wire = vec![None; layout.total()];
        obj.manifest = Some(Manifest {
            proto: m,
            layout,
            digests,
        });
        obj.manifest_from = Some(from);
        let pending = std::mem::take(&mut obj.unverified);
        let held: usize = pending.iter().map(|(_, _, data, _)| data.len()).sum();
        if !pending.is_empty() {
            self.stats.manifest_waits += 1;
            self.stats.manifest_wait_us +=
                now.saturating_duration_since(obj.first_seen).as_micros() as u64;
        }
        self.unverified_bytes = self.unverified_bytes.saturating_sub(held);
        self.note_frame(now, &key, fragments, false);
        self.forward_manifest(key);
        for (peer, index, data, wire) in pending {
            if !self.banned.contains(&peer) {
                self.accept_shard(now, peer, key, index, data, wire);
            }
        }
    }

    fn verify_manifest(&self, key: &ObjectKey, m: &DpManifest) -> bool {
        let Role::Viewer { key: verifying, .. } = &self.role else {
            return true;
        };
        let signed = auth::signed_bytes(
            self.tag,
            m.epoch,
            key,
            m.length,
            m.data_shards,
            m.parity_shards,
            m.fragments,
            &m.digests,
        );
        auth::verify_with(
            self.config.insecure_simulated_auth,
            verifying,
            &signed,
            &m.signature,
        )
    }

    /// `key` has enough shards: rebuild, deliver, and forward what the children still miss.
    fn complete(&mut self, now: Instant, key: ObjectKey) {
        let Some(obj) = self.objects.get(&key) else {
            return;
        };
        let Some(manifest) = &obj.manifest else {
            return;
        };
        let layout = manifest.layout;
        let from = obj.manifest_from;
        let first_seen = obj.first_seen;
        let fragments = manifest.proto.fragments;
        // Shards our children in their stripes have not had from us yet.
        let missing: Vec<u32> = (0..layout.total() as u32)
            .filter(|&i| obj.forwarded & (1 << i) == 0 && self.children_want(&key, i))
            .collect();
        let regenerate = missing.iter().any(|&i| obj.shards[i as usize].is_none());
        let plays = plays(&self.subscription, &self.subscribed_at, &key, first_seen);
        // The object is assembled only to be played or to regenerate shards: a relay of a
        // layer it does not play just forwards.
        let object = if plays || regenerate {
            let Ok(object) = fec::decode(&obj.shards, &layout) else {
                return;
            };
            if obj.shards[..layout.data].iter().any(Option::is_none) {
                self.stats.objects_rebuilt += 1;
            }
            Some(object)
        } else {
            None
        };
        let obj = self.objects.get_mut(&key).expect("present");
        obj.complete = true;
        obj.unverified.clear();
        self.incomplete.remove(&key);
        if regenerate
            && let Some(object) = &object
            && let Ok(shards) = fec::encode(object, &layout)
        {
            for &i in &missing {
                let slot = &mut obj.shards[i as usize];
                if slot.is_none() {
                    *slot = Some(shards[i as usize].clone());
                    self.stats.shards_regenerated += 1;
                }
            }
        }
        for &i in &missing {
            self.forward_shard(key, i);
        }
        self.note_frame(now, &key, fragments, true);
        if self.starved(now) {
            // Media again (pulled, say): searches backing off start again, and every peer
            // hears of it with our next have. Haves go only to tree neighbours, and a peer
            // that starved has none: without this it learned that the stream flows again
            // only when its join backoff (up to 6.4 s) ran out.
            self.retry_joins_soon(now);
            self.have_to_all = true;
        }
        self.last_complete = now;
        if plays && let (Some(from), Some(object)) = (from, object) {
            self.stats.objects_delivered += 1;
            self.outputs.push_back(Output::Deliver {
                key,
                object: object.into(),
                from,
            });
        }
    }

    fn note_frame(&mut self, now: Instant, key: &ObjectKey, fragments: u32, complete: bool) {
        let layer = (key.track, key.layer);
        if complete {
            let newest = self.newest_complete.entry(layer).or_insert(key.sequence);
            *newest = (*newest).max(key.sequence);
        }
        let newest = self.newest.entry(layer).or_insert(key.sequence);
        *newest = (*newest).max(key.sequence);
        self.first.entry(layer).or_insert(key.sequence);
        let frame = self.frames.entry(key.frame()).or_default();
        frame.first_seen.get_or_insert(now);
        frame.fragments = frame.fragments.max(fragments);
        if complete {
            frame.complete += 1;
        }
    }

    fn children_want(&self, key: &ObjectKey, index: u32) -> bool {
        let s = stripe_of(key, index, self.config.stripes);
        self.stripes[usize::from(s)].children.iter().any(|c| {
            self.peers
                .get(c)
                .and_then(|p| p.subs.get(&s))
                .is_some_and(|subs| subs.contains(&(key.track, key.layer)))
        })
    }

    fn forward_shard(&mut self, key: ObjectKey, index: u32) {
        let s = stripe_of(&key, index, self.config.stripes);
        let Some(obj) = self.objects.get_mut(&key) else {
            return;
        };
        if obj.forwarded & (1 << index) != 0 {
            return;
        }
        obj.forwarded |= 1 << index;
        if !obj.shards.get(index as usize).is_some_and(Option::is_some) {
            return;
        }
        let targets = self.wanting_children(s, &key);
        if targets.is_empty() {
            return;
        }
        let Some(bytes) = self.shard_message(&key, index) else {
            return;
        };
        for child in targets {
            self.stats.shards_sent += 1;
            self.enqueue(child, Class::Media { layer: key.layer }, bytes.clone());
        }
    }

    /// The message carrying shard `index` of `key`, if held: the one it arrived in, or one
    /// encoded now and kept (every later send of it reuses the same bytes).
    fn shard_message(&mut self, key: &ObjectKey, index: u32) -> Option<Bytes> {
        let tag = self.tag;
        let obj = self.objects.get_mut(key)?;
        let i = index as usize;
        if let Some(Some(wire)) = obj.wire.get(i) {
            return Some(wire.clone());
        }
        let data = obj.shards.get(i)?.clone()?;
        let bytes: Bytes = DpMessage {
            stream: tag,
            body: Some(Body::Shard(DpShard {
                key: Some(key.to_proto()),
                index,
                data,
            })),
        }
        .encode_to_vec()
        .into();
        if obj.wire.len() < obj.shards.len() {
            obj.wire.resize(obj.shards.len(), None);
        }
        obj.wire[i] = Some(bytes.clone());
        Some(bytes)
    }

    fn forward_manifest(&mut self, key: ObjectKey) {
        let Some(manifest) = self.objects.get(&key).and_then(|o| o.manifest.as_ref()) else {
            return;
        };
        let body = Body::Manifest(manifest.proto.clone());
        let mut targets = BTreeSet::new();
        for s in manifest_stripes(&key, self.config.stripes) {
            targets.extend(self.wanting_children(s, &key));
        }
        if targets.is_empty() {
            return;
        }
        let bytes = self.encode(body);
        for child in targets {
            self.enqueue(child, Class::Media { layer: key.layer }, bytes.clone());
        }
    }

    fn wanting_children(&self, s: u8, key: &ObjectKey) -> Vec<P> {
        self.stripes[usize::from(s)]
            .children
            .iter()
            .filter(|c| {
                self.peers
                    .get(c)
                    .and_then(|p| p.subs.get(&s))
                    .is_some_and(|subs| subs.contains(&(key.track, key.layer)))
            })
            .copied()
            .collect()
    }

    /// A stripe changed parent: shards in flight there may be lost, so for a while the
    /// repair timer ticks faster (what is missing in that stripe is pulled after
    /// `FAST_REPAIR_DELAY`, see `pull_missing`).
    fn parent_changed(&mut self) {
        self.stats.parent_changes += 1;
        self.fast_repair_until = self.last_now + FAST_REPAIR;
    }

    fn note_rate(&mut self, now: Instant, bytes: usize) {
        self.rate_window.1 += bytes as u64;
        let elapsed = now.saturating_duration_since(self.rate_window.0);
        if elapsed >= Duration::from_secs(1) {
            // A slowly decaying peak: the capacity rule stays conservative through pauses
            // and keyframe-free stretches.
            let rate = self.rate_window.1 as f64 / elapsed.as_secs_f64();
            self.rate_bytes = rate.max(self.rate_bytes * 0.95);
            self.rate_window = (now, 0);
        }
    }

    // ---- tree ---------------------------------------------------------------------------

    /// Children this peer may have over all stripes: its upload capacity over the rate of one
    /// stripe times [`CHILDREN_SHARE`], at most `max_children`. The rate is the stream's,
    /// parity included, from the manifests that verified (a decaying peak over 1 s windows;
    /// `assumed_stream_kbps` before the first): what reaches us, duplicates and repairs
    /// included, is not what a child costs, and unverified bytes from a hostile peer could
    /// otherwise shrink the fan-out.
    pub fn max_children(&self) -> usize {
        self.children_limit(1.0)
    }

    /// [`Self::max_children`] at `rate_factor` times the measured rate.
    fn children_limit(&self, rate_factor: f64) -> usize {
        match self.config.upload_capacity_kbps {
            None => self.config.max_children,
            Some(0) => 0,
            Some(capacity) => {
                let stream_kbps = if self.rate_bytes > 0.0 {
                    self.rate_bytes * 8.0 / 1000.0
                } else {
                    self.config.assumed_stream_kbps as f64
                };
                let stripe_kbps =
                    (stream_kbps * rate_factor / f64::from(self.config.stripes)).max(1.0);
                ((capacity as f64 * CHILDREN_SHARE / stripe_kbps) as usize)
                    .min(self.config.max_children)
            }
        }
    }

    fn total_children(&self) -> usize {
        self.stripes.iter().map(|s| s.children.len()).sum()
    }

    /// Forwards nothing in its interior stripe yet (so it may move it).
    fn is_flexible(&self) -> bool {
        self.can_forward()
            && self
                .interior
                .is_none_or(|i| self.stripes[usize::from(i)].children.is_empty())
    }

    /// Children this peer can still take over all stripes.
    fn room(&self) -> u32 {
        u32::try_from(self.max_children().saturating_sub(self.total_children())).unwrap_or(u32::MAX)
    }

    /// Whether this peer can take a child at all. A capacity too small for one stripe (say
    /// 1 kbit/s) is receive-only, like `0`: as a stripe root or a forwarder it would starve
    /// everyone below it.
    fn can_forward(&self) -> bool {
        self.max_children() > 0
    }

    /// What we want from a parent in `s`: our own layers and our children's there.
    fn wanted_in(&self, s: u8) -> BTreeSet<(u32, u32)> {
        let mut wanted = self.subscription.clone();
        for child in &self.stripes[usize::from(s)].children {
            if let Some(subs) = self.peers.get(child).and_then(|p| p.subs.get(&s)) {
                wanted.extend(subs.iter().copied());
            }
        }
        wanted
    }

    fn send_join(&mut self, s: u8, to: P) {
        if self.stripes[usize::from(s)].parent.is_some() {
            self.stats.grafts_sent += 1;
        } else {
            self.stats.joins_sent += 1;
        }
        let wanted = self.wanted_in(s);
        let join = DpJoin {
            stripe: u32::from(s),
            interior: self.interior.map_or(-1, i32::from),
            can_forward: self.can_forward(),
            redirects: self.stripes[usize::from(s)].redirects,
            flexible: self.is_flexible(),
            graft: self.stripes[usize::from(s)].parent.is_some(),
            room: self.room(),
            layers: wanted
                .iter()
                .map(|&(track, layer)| DpTrackLayer { track, layer })
                .collect(),
        };
        self.enqueue_control(to, Body::Join(join));
    }

    /// Parents for every stripe, joins that timed out, silent parents, children beyond the
    /// upload capacity.
    fn maintain_tree(&mut self, now: Instant) {
        if self.is_publisher() {
            return;
        }
        // Over capacity (the measured rate grew): spare children go first, then the newest
        // known; they rejoin elsewhere. Only beyond a tenth more than the rate they were
        // taken at: the rate is a decaying peak that each keyframe restores, and without
        // the margin a full relay would drop a child every GOP and take another.
        let max = self.children_limit(1.0 / EVICT_RATE_MARGIN);
        while self.total_children() > max {
            let spare = self
                .stripes
                .iter()
                .enumerate()
                .filter(|(i, s)| self.interior != Some(*i as u8) && !s.children.is_empty())
                .map(|(i, _)| i)
                .next();
            let si = spare.or(self.interior.map(usize::from)).unwrap_or(0);
            let Some(child) = self.stripes[si].children.iter().next_back().copied() else {
                break;
            };
            self.evict(si as u8, child);
        }
        // The newest media pushed by any parent: a stripe is silent only relative to it, so
        // the end of the stream (or a pause) silences no one. Not the time of the newest
        // parent change, as it was: after the stream ended, a parent change elsewhere made
        // every stripe still owed a shard of the last object look silent.
        let newest_data = self.last_pushed;
        for s in 0..self.config.stripes {
            let si = usize::from(s);
            let retry_after = self.config.join_timeout * 2;
            self.stripes[si]
                .refused
                .retain(|_, at| now.saturating_duration_since(*at) < retry_after);
            if let Some((peer, since, sent)) = self.stripes[si].joining {
                let timeout = if sent {
                    self.config.join_timeout
                } else {
                    self.config.join_timeout * 2
                };
                if now.saturating_duration_since(since) >= timeout {
                    self.stripes[si].joining = None;
                    self.stripes[si].refused.insert(peer, now);
                }
            }
            // Silent: a shard of an object verified since it last sent anything is still
            // not here while other stripes carried data for `parent_silence` (counted at the
            // earliest from when the stream (re)started flowing, or this parent took us).
            // Not merely idle: a sparse stream (a base temporal layer of small frames) leaves
            // a stripe empty for seconds.
            let quiet_for = self.stripes[si].due_since.map(|due| {
                let since = due.max(self.flow_since).max(self.stripes[si].parent_since);
                newest_data.saturating_duration_since(since)
            });
            let silent = quiet_for.is_some_and(|d| d >= self.config.parent_silence);
            if self.stripes[si].parent.is_some() && silent {
                // A parent that stopped forwarding while the stream flows: graft elsewhere.
                self.stats.parents_silent += 1;
                self.abandon_parent(now, s);
            } else if self.stripes[si].parent.is_some() {
                // Quiet for a third of that: the subscription may have been lost (it is sent
                // only when it changes), and the parent pushes nothing until it comes. It is
                // sent again, at most once a `RESUBSCRIBE` of the silence.
                let resend = self.config.parent_silence / RESUBSCRIBE;
                let quiet = quiet_for.is_some_and(|d| d >= resend);
                let sent_long_ago = self.stripes[si]
                    .subs_sent_at
                    .is_none_or(|at| now.saturating_duration_since(at) >= resend);
                if quiet && sent_long_ago {
                    self.stripes[si].sent_subs = None;
                    self.send_subscription(s);
                }
            }
            // An orphan subtree whose every candidate is below it (their paths contain us)
            // would wait for ever: after a while it is dissolved and its children rejoin.
            if self.stripes[si].parent.is_none() && !self.stripes[si].children.is_empty() {
                let since = *self.stripes[si].orphan_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= self.config.join_timeout {
                    let children = std::mem::take(&mut self.stripes[si].children);
                    self.stats.subtrees_dissolved += 1;
                    for child in children {
                        if let Some(peer) = self.peers.get_mut(&child) {
                            peer.subs.remove(&s);
                        }
                        self.enqueue_control(
                            child,
                            Body::Leave(DpLeave {
                                stripe: u32::from(s),
                            }),
                        );
                    }
                    self.stripes[si].orphan_since = None;
                }
            } else {
                self.stripes[si].orphan_since = None;
            }
            if self.stripes[si].parent.is_some() {
                self.try_graft(now, s);
                continue;
            }
            if self.stripes[si].joining.is_some() || now < self.stripes[si].next_join_at {
                continue;
            }
            let candidate = match self.stripes[si].next_candidate.take() {
                Some(c) if !self.banned.contains(&c) && !self.is_foreign(&c) => Some(c),
                _ => self.pick_join_candidate(s),
            };
            let Some(candidate) = candidate else { continue };
            if self.peers.contains_key(&candidate) {
                self.stripes[si].joining = Some((candidate, now, true));
                self.send_join(s, candidate);
            } else {
                self.stripes[si].joining = Some((candidate, now, false));
            }
        }
    }

    /// `peer` serves another epoch (its haves say, or a manifest not signed by our publisher):
    /// it stops being our parent anywhere and is neither joined nor pulled from until its
    /// haves say our epoch (or ours changes).
    fn mark_foreign(&mut self, now: Instant, peer: P) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.foreign = true;
        // What only it sent us is of another epoch: not ours to wait for or pull.
        let theirs: Vec<ObjectKey> = self
            .incomplete
            .iter()
            .filter(|key| {
                self.objects.get(key).is_some_and(|o| {
                    o.manifest.is_none()
                        && !o.unverified.is_empty()
                        && o.unverified.iter().all(|(from, ..)| *from == peer)
                })
            })
            .copied()
            .collect();
        for key in theirs {
            if let Some(obj) = self.objects.remove(&key) {
                let held: usize = obj
                    .unverified
                    .iter()
                    .map(|(_, _, data, _)| data.len())
                    .sum();
                self.unverified_bytes = self.unverified_bytes.saturating_sub(held);
            }
            self.incomplete.remove(&key);
        }
        for s in 0..self.config.stripes {
            if self.stripes[usize::from(s)].parent == Some(peer) {
                self.stats.parents_silent += 1;
                self.abandon_parent(now, s);
            }
        }
    }

    fn is_foreign(&self, peer: &P) -> bool {
        self.peers.get(peer).is_some_and(|p| p.foreign)
    }

    /// Whether no object became complete here for `STARVED_AFTER` (no publisher reachable,
    /// or none yet): joins back off.
    fn starved(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_complete) >= STARVED_AFTER
    }

    /// Ends starved searches' backoff in every stripe without a parent (see
    /// `JOIN_BACKOFF_MS`).
    fn retry_joins_soon(&mut self, now: Instant) {
        for stripe in &mut self.stripes {
            if stripe.parent.is_none() && stripe.join_failures > 0 {
                stripe.join_failures = 0;
                stripe.chain = 0;
                stripe.next_join_at = stripe.next_join_at.min(now);
            }
        }
    }

    /// Leaves our parent in `s` (it is not asked again for a while); a new one is looked for.
    fn abandon_parent(&mut self, now: Instant, s: u8) {
        let si = usize::from(s);
        let Some(parent) = self.stripes[si].parent.take() else {
            return;
        };
        self.enqueue_control(
            parent,
            Body::Leave(DpLeave {
                stripe: u32::from(s),
            }),
        );
        self.stripes[si].path.clear();
        self.stripes[si].sent_subs = None;
        self.stripes[si].refused.insert(parent, now);
        self.parent_changed();
        self.update_child_paths(s);
    }

    /// Plumtree's optimisation, by hops: a neighbour at least two hops closer to the root
    /// than our parent is asked to take us; our parent is left only once it accepted.
    fn try_graft(&mut self, now: Instant, s: u8) {
        let si = usize::from(s);
        if self.stripes[si].joining.is_some()
            || now < self.stripes[si].next_graft
            || now < self.next_graft_any
        {
            return;
        }
        self.stripes[si].next_graft = now + GRAFT_INTERVAL;
        if !self.config.graft {
            return;
        }
        let ours = self.stripes[si].path.len() as u32;
        let parent = self.stripes[si].parent;
        let better: Vec<(P, u32)> = self
            .peers
            .iter()
            .filter(|(p, _)| Some(**p) != parent && !self.stripes[si].children.contains(p))
            .filter(|(p, peer)| !self.stripes[si].refused.contains_key(p) && !peer.foreign)
            .filter_map(|(p, peer)| peer.depths.get(si).map(|d| (*p, *d)))
            .filter(|(_, d)| *d > 0 && d + 2 < ours)
            .collect();
        let Some(best) = better.iter().map(|(_, d)| *d).min() else {
            return;
        };
        let shallowest: Vec<P> = better
            .iter()
            .filter(|(_, d)| *d == best)
            .map(|(p, _)| *p)
            .collect();
        if let Some(target) = self.pick(&shallowest) {
            // One move at a time: each costs shards in flight and reshapes a subtree.
            self.next_graft_any = now + GRAFT_INTERVAL / 4;
            self.stripes[si].joining = Some((target, now, true));
            self.send_join(s, target);
        }
    }

    fn pick_join_candidate(&mut self, s: u8) -> Option<P> {
        let si = usize::from(s);
        if let Role::Viewer { publisher, .. } = self.role
            && self.peers.get(&publisher).is_some_and(|peer| !peer.relayed)
            && !self.stripes[si].refused.contains_key(&publisher)
        {
            return Some(publisher);
        }
        let mut candidates: Vec<P> = self
            .peers
            .iter()
            .filter(|(_, peer)| !peer.foreign)
            .map(|(p, _)| p)
            .filter(|p| !self.stripes[si].refused.contains_key(p))
            .filter(|p| !self.stripes[si].children.contains(p))
            .copied()
            .collect();
        // Directly connected peers first; relayed ones only when there is nobody else.
        if candidates
            .iter()
            .any(|p| self.peers.get(p).is_some_and(|peer| !peer.relayed))
        {
            candidates.retain(|p| self.peers.get(p).is_some_and(|peer| !peer.relayed));
        }
        // The shallowest neighbours in this tree first (their haves say), else anyone.
        let depth = |p: &P| {
            self.peers
                .get(p)
                .and_then(|peer| peer.depths.get(si).copied())
                .filter(|d| *d > 0)
        };
        if let Some(best) = candidates.iter().filter_map(depth).min() {
            let shallowest: Vec<P> = candidates
                .iter()
                .filter(|p| depth(p) == Some(best))
                .copied()
                .collect();
            return self.pick(&shallowest);
        }
        if !candidates.is_empty() {
            return self.pick(&candidates);
        }
        // Everyone refused lately: ask again the one refused longest ago (the backoff paces
        // it), since a peer not attached a moment ago may be now.
        let oldest = self.stripes[si]
            .refused
            .iter()
            .filter(|(p, _)| {
                self.peers.get(p).is_some_and(|peer| !peer.foreign)
                    && !self.stripes[si].children.contains(p)
            })
            .min_by_key(|(_, at)| **at)
            .map(|(p, _)| *p);
        if let Some(peer) = oldest {
            self.stripes[si].refused.remove(&peer);
        }
        oldest
    }

    fn on_join(&mut self, now: Instant, from: P, join: DpJoin) {
        let Ok(s) = u8::try_from(join.stripe) else {
            return self.misbehaved(now, from, Misbehaviour::Malformed);
        };
        if s >= self.config.stripes
            || join.interior >= i32::from(self.config.stripes)
            || join.layers.len() > 256
        {
            return self.misbehaved(now, from, Misbehaviour::Malformed);
        }
        let si = usize::from(s);
        let their_interior = u8::try_from(join.interior).ok();
        let from_short = self.peers.get(&from).map_or(0, |p| p.short);
        let layers: BTreeSet<(u32, u32)> = join.layers.iter().map(|l| (l.track, l.layer)).collect();
        if let Some(peer) = self.peers.get_mut(&from) {
            peer.interior = their_interior;
            peer.can_forward = join.can_forward;
            peer.room = join.room;
            // Used if it becomes our child here (accept_child keeps it).
            peer.subs.insert(s, layers);
        }
        if self.stripes[si].children.contains(&from) {
            return self.accept_child(s, from);
        }
        if self.stripes[si].path.contains(&from_short) {
            return self.refuse(s, from);
        }
        let attached = self.is_publisher() || self.stripes[si].parent.is_some();
        if !attached {
            // Not in this tree yet: one of our parents elsewhere is closer to the root.
            let parents: Vec<P> = self
                .stripes
                .iter()
                .filter_map(|st| st.parent)
                .filter(|p| *p != from)
                .collect();
            return match self.pick(&parents) {
                Some(parent) => self.redirect(s, from, parent),
                None => self.refuse(s, from),
            };
        }
        // A joiner that forwards in this stripe (or, at the root, may start to).
        let capable = join.can_forward
            && (their_interior == Some(s) || (self.is_publisher() && join.flexible));
        let forwards_here = self.is_publisher() || self.interior == Some(s);
        if join.graft {
            let room = if self.is_publisher() {
                self.stripes[si].children.len() < self.config.root_slots
            } else {
                self.can_forward()
                    && (self.interior == Some(s) || !self.stripes[si].children.is_empty())
                    && self.total_children() < self.max_children()
            };
            return if room {
                self.accept_child(s, from)
            } else {
                self.refuse(s, from)
            };
        }
        // The interior stripe comes first: a spare child elsewhere makes room for it.
        if !self.is_publisher()
            && forwards_here
            && self.total_children() >= self.max_children()
            && self.max_children() > 0
        {
            self.evict_spare_child(None, 1);
        }
        // A stripe no viewer forwards in (few viewers, or their capacity spent) hangs off
        // whoever took the root slot, possibly a peer with no room left, and starves: such
        // a root child gives its slot to a joiner with room to spare.
        if self.is_publisher()
            && !capable
            && join.can_forward
            && join.room >= SPARE_ROOT_ROOM
            && self.stripes[si].children.len() >= self.config.root_slots
        {
            let full_leaf = self.stripes[si]
                .children
                .iter()
                .find(|c| {
                    self.peers
                        .get(c)
                        .is_some_and(|p| p.interior != Some(s) && p.room == 0)
                })
                .copied();
            if let Some(leaf) = full_leaf {
                return self.replace_child(s, leaf, from);
            }
        }
        let room = if self.is_publisher() {
            self.stripes[si].children.len() < self.config.root_slots
        } else {
            forwards_here && self.total_children() < self.max_children()
        };
        // After a few redirects, spare capacity outside the interior stripe serves it (a
        // stripe with too few forwarders, as with fewer viewers than stripes).
        let spare = !self.is_publisher()
            && !forwards_here
            && join.redirects >= SPARE_AFTER_REDIRECTS
            && self.can_forward()
            && self.total_children() < self.max_children();
        if room || spare {
            return self.accept_child(s, from);
        }
        // A joiner that found no room after many redirects: a full peer attached here that
        // feeds another spare stripe with more children moves one of them there (it has
        // siblings to rejoin through), so a stripe without forwarders cannot starve.
        if !self.is_publisher()
            && self.can_forward()
            && join.redirects >= 2 * SPARE_AFTER_REDIRECTS
            && self.evict_spare_child(Some(s), self.stripes[si].children.len() + 2)
        {
            return self.accept_child(s, from);
        }
        // Preempt a leaf child for a joiner that forwards here (SplitStream's push-down).
        if capable && forwards_here {
            let leaf = self.stripes[si]
                .children
                .iter()
                .find(|c| self.peers.get(c).is_none_or(|p| p.interior != Some(s)))
                .copied();
            if let Some(leaf) = leaf {
                return self.replace_child(s, leaf, from);
            }
        }
        // Push down to a child that forwards here. A peer that does not forward here sends
        // a fresh join up (towards the forwarders near the root), and one that has been
        // redirected a few times down (towards spare capacity): every chain ends.
        let children: Vec<P> = self.stripes[si]
            .children
            .iter()
            .filter(|c| **c != from)
            .copied()
            .collect();
        let forwarders: Vec<P> = children
            .iter()
            .filter(|c| self.peers.get(c).is_some_and(|p| p.interior == Some(s)))
            .copied()
            .collect();
        let downwards = forwards_here || join.redirects >= SPARE_AFTER_REDIRECTS;
        let target = self.pick(&forwarders).or_else(|| {
            if downwards {
                // Up again would bounce between full peers: refuse instead, and the
                // joiner asks someone else with its redirect count (spare capacity).
                self.pick(&children)
            } else {
                self.stripes[si].parent.or_else(|| self.pick(&children))
            }
        });
        match target {
            Some(target) if target != from => self.redirect(s, from, target),
            _ => self.refuse(s, from),
        }
    }

    /// `joiner` takes `child`'s place in `s`; `child` is sent to rejoin under `joiner`.
    fn replace_child(&mut self, s: u8, child: P, joiner: P) {
        self.stripes[usize::from(s)].children.remove(&child);
        if let Some(peer) = self.peers.get_mut(&child) {
            peer.subs.remove(&s);
        }
        self.redirect(s, child, joiner);
        // Also sends our own parent the subscription without `child`'s layers.
        self.accept_child(s, joiner);
    }

    fn redirect(&mut self, s: u8, to: P, target: P) {
        let info = self
            .peers
            .get(&target)
            .map(|p| p.info.clone())
            .unwrap_or_default();
        self.enqueue_control(
            to,
            Body::Redirect(DpRedirect {
                stripe: u32::from(s),
                peer: target.to_bytes().into(),
                info,
            }),
        );
    }

    /// Drops one child outside the interior stripe (and outside `except`), from the stripe
    /// with the most children if it has at least `min` (it rejoins elsewhere). Returns
    /// whether one was dropped.
    fn evict_spare_child(&mut self, except: Option<u8>, min: usize) -> bool {
        let interior = self.interior.map(usize::from);
        let except = except.map(usize::from);
        let Some(si) = (0..self.stripes.len())
            .filter(|i| Some(*i) != interior && Some(*i) != except)
            .max_by_key(|i| self.stripes[*i].children.len())
            .filter(|i| self.stripes[*i].children.len() >= min.max(1))
        else {
            return false;
        };
        let Some(child) = self.stripes[si].children.iter().next_back().copied() else {
            return false;
        };
        self.evict(si as u8, child);
        true
    }

    /// Drops `child` in `s` (it rejoins elsewhere) and tells our parent what we still want.
    fn evict(&mut self, s: u8, child: P) {
        self.stripes[usize::from(s)].children.remove(&child);
        if let Some(peer) = self.peers.get_mut(&child) {
            peer.subs.remove(&s);
        }
        self.stats.children_evicted += 1;
        self.enqueue_control(
            child,
            Body::Leave(DpLeave {
                stripe: u32::from(s),
            }),
        );
        self.send_subscription(s);
    }

    fn refuse(&mut self, s: u8, to: P) {
        self.enqueue_control(
            to,
            Body::Redirect(DpRedirect {
                stripe: u32::from(s),
                peer: Bytes::new(),
                info: Bytes::new(),
            }),
        );
    }

    fn accept_child(&mut self, s: u8, child: P) {
        let si = usize::from(s);
        self.stripes[si].children.insert(child);
        // Its layers (from its join) may be new to our own parent.
        self.send_subscription(s);
        let path = self.stripes[si].path.clone();
        self.enqueue_control(
            child,
            Body::Accept(DpAccept {
                stripe: u32::from(s),
                path,
            }),
        );
    }

    fn on_accept(&mut self, now: Instant, from: P, accept: DpAccept) {
        let Ok(s) = u8::try_from(accept.stripe) else {
            return self.misbehaved(now, from, Misbehaviour::Malformed);
        };
        if s >= self.config.stripes || accept.path.len() > 64 {
            return self.misbehaved(now, from, Misbehaviour::Malformed);
        }
        if self.is_publisher() {
            return;
        }
        let si = usize::from(s);
        let expected = self.stripes[si].parent == Some(from)
            || self.stripes[si].joining.is_some_and(|(p, _, _)| p == from);
        let foreign = self.is_foreign(&from);
        if foreign && self.stripes[si].joining.is_some_and(|(p, _, _)| p == from) {
            self.stripes[si].joining = None;
            self.stripes[si].refused.insert(from, now);
        }
        if !expected || foreign || accept.path.contains(&self.me_short) {
            // Stale, or a loop: end that edge.
            return self.enqueue_control(
                from,
                Body::Leave(DpLeave {
                    stripe: accept.stripe,
                }),
            );
        }
        let old = self.stripes[si].parent.replace(from);
        if old != Some(from) {
            self.stripes[si].parent_since = now;
        }
        if let Some(old) = old
            && old != from
        {
            self.enqueue_control(
                old,
                Body::Leave(DpLeave {
                    stripe: accept.stripe,
                }),
            );
        }
        if old != Some(from) {
            self.parent_changed();
            self.stripes[si].due_since = None;
            self.stripes[si].sent_subs = None;
        }
        self.stripes[si].joining = None;
        self.stripes[si].redirects = 0;
        self.stripes[si].chain = 0;
        // Starved, a parent is no proof that the search is over: without a publisher,
        // orphan subtrees take joiners and dissolve again.
        if !self.starved(now) {
            self.stripes[si].join_failures = 0;
        }
        // Taken as a stripe root while forwarding nothing elsewhere: forward here.
        if let Role::Viewer { publisher, .. } = self.role
            && from == publisher
            && self.interior != Some(s)
            && self.is_flexible()
        {
            self.interior = Some(s);
        }
        let mut path = accept.path;
        path.push(self.me_short);
        self.stripes[si].path = path;
        self.update_child_paths(s);
        self.send_subscription(s);
    }

    fn update_child_paths(&mut self, s: u8) {
        let si = usize::from(s);
        let children: Vec<P> = self.stripes[si].children.iter().copied().collect();
        if self.stripes[si].path.is_empty() {
            return;
        }
        let path = self.stripes[si].path.clone();
        for child in children {
            self.enqueue_control(
                child,
                Body::Accept(DpAccept {
                    stripe: u32::from(s),
                    path: path.clone(),
                }),
            );
        }
    }

    fn on_redirect(&mut self, now: Instant, from: P, redirect: DpRedirect) {
        let Ok(s) = u8::try_from(redirect.stripe) else {
            return self.misbehaved(now, from, Misbehaviour::Malformed);
        };
        if s >= self.config.stripes {
            return self.misbehaved(now, from, Misbehaviour::Malformed);
        }
        if self.is_publisher() {
            return;
        }
        let si = usize::from(s);
        let from_parent = self.stripes[si].parent == Some(from);
        let from_target = self.stripes[si].joining.is_some_and(|(p, _, _)| p == from);
        if !from_parent && !from_target {
            return;
        }
        if from_target && !from_parent && self.stripes[si].parent.is_some() {
            // A graft declined: keep the parent we have.
            self.stripes[si].joining = None;
            self.stripes[si].refused.insert(from, now);
            return;
        }
        self.stats.redirects_received += 1;
        if from_parent {
            // Preempted: our parent made room for a forwarder and sends us to it.
            self.stats.parents_preempted += 1;
            self.stripes[si].parent = None;
            self.stripes[si].path.clear();
            self.stripes[si].sent_subs = None;
            self.parent_changed();
            self.update_child_paths(s);
        }
        self.stripes[si].joining = None;
        // Counts every answer but an accept in this search (reset by the accept), so that
        // peers with spare capacity, then full ones that can move a child, take it up.
        self.stripes[si].redirects = (self.stripes[si].redirects + 1).min(64);
        self.stripes[si].chain = self.stripes[si].chain.saturating_add(1);
        // A new search every 12 redirects; starved, after 6, 3 and 1 once searches failed in
        // a row.
        let failures = self.stripes[si].join_failures;
        let follow = if failures == 0 {
            !self.stripes[si]
                .redirects
                .is_multiple_of(RESTART_AFTER_REDIRECTS)
        } else {
            self.stripes[si].chain < (RESTART_AFTER_REDIRECTS >> failures.min(3)).max(1)
        };
        let target = P::from_bytes(&redirect.peer).filter(|p| *p != self.me);
        match target {
            Some(target) if follow && !self.banned.contains(&target) => {
                self.stripes[si].next_candidate = Some(target);
                if !self.peers.contains_key(&target) {
                    self.outputs.push_back(Output::Connect {
                        peer: target,
                        info: redirect.info,
                    });
                }
            }
            _ => {
                // Refused, or too long a chain: start over elsewhere after a random backoff.
                // The redirect count stays (until a parent accepts), so that peers with spare
                // capacity take the next attempt.
                self.stripes[si].refused.insert(from, now);
                self.stripes[si].chain = 0;
                let doublings = self.stripes[si].join_failures.min(JOIN_BACKOFF_DOUBLINGS);
                self.stripes[si].join_failures = if self.starved(now) {
                    self.stripes[si].join_failures.saturating_add(1)
                } else {
                    0
                };
                let base = JOIN_BACKOFF_MS << doublings;
                let backoff = base + self.random() % base;
                self.stripes[si].next_join_at = now + Duration::from_millis(backoff);
            }
        }
        self.maintain_tree(now);
    }

    fn on_leave(&mut self, now: Instant, from: P, leave: DpLeave) {
        let Ok(s) = u8::try_from(leave.stripe) else {
            return self.misbehaved(now, from, Misbehaviour::Malformed);
        };
        if s >= self.config.stripes {
            return self.misbehaved(now, from, Misbehaviour::Malformed);
        }
        let si = usize::from(s);
        if self.stripes[si].children.remove(&from) {
            if let Some(peer) = self.peers.get_mut(&from) {
                peer.subs.remove(&s);
            }
            self.send_subscription(s);
        }
        if self.stripes[si].parent == Some(from) {
            self.stats.parents_left += 1;
            self.stripes[si].parent = None;
            self.stripes[si].path.clear();
            self.stripes[si].sent_subs = None;
            self.parent_changed();
            self.update_child_paths(s);
            self.maintain_tree(now);
        }
    }

    fn on_subscribe(&mut self, from: P, sub: DpSubscribe) {
        let Ok(s) = u8::try_from(sub.stripe) else {
            return;
        };
        if s >= self.config.stripes || sub.layers.len() > 256 {
            return;
        }
        if !self.stripes[usize::from(s)].children.contains(&from) {
            return;
        }
        let layers: BTreeSet<(u32, u32)> = sub.layers.iter().map(|l| (l.track, l.layer)).collect();
        let mut added = layers.clone();
        if let Some(peer) = self.peers.get_mut(&from)
            && let Some(old) = peer.subs.insert(s, layers)
        {
            added.retain(|l| !old.contains(l));
        }
        self.send_subscription(s);
        self.catch_up(from, s, &added);
    }

    /// A child just asked for `layers` in stripe `s`: it gets this stripe's share of the
    /// objects of those layers we saw in the last `CATCH_UP`, so the first frames after a
    /// layer switch are whole instead of waiting for pulls.
    fn catch_up(&mut self, child: P, s: u8, layers: &BTreeSet<(u32, u32)>) {
        if layers.is_empty() {
            return;
        }
        let now = self.last_now;
        let stripes = self.config.stripes;
        let mut sends = Vec::new();
        for (key, obj) in self.objects.range(..).rev() {
            if now.saturating_duration_since(obj.first_seen) > CATCH_UP {
                continue;
            }
            if !layers.contains(&(key.track, key.layer)) {
                continue;
            }
            let Some(manifest) = &obj.manifest else {
                continue;
            };
            let layout = manifest.layout;
            let with_manifest = manifest_stripes(key, stripes).contains(&s);
            let indices: Vec<u32> = (0..layout.total() as u32)
                .filter(|&i| stripe_of(key, i, stripes) == s)
                .collect();
            sends.push((*key, with_manifest.then(|| manifest.proto.clone()), indices));
        }
        for (key, manifest, indices) in sends {
            let layer = Class::Media { layer: key.layer };
            if let Some(manifest) = manifest {
                let bytes = self.encode(Body::Manifest(manifest));
                self.enqueue(child, layer, bytes);
            }
            if indices.iter().any(|&i| !self.holds_shard(&key, i)) {
                self.fill_shards(&key);
            }
            for i in indices {
                if let Some(bytes) = self.shard_message(&key, i) {
                    self.enqueue(child, layer, bytes);
                }
            }
        }
    }

    fn holds_shard(&self, key: &ObjectKey, index: u32) -> bool {
        self.objects
            .get(key)
            .and_then(|o| o.shards.get(index as usize))
            .is_some_and(Option::is_some)
    }

    /// A complete object's missing shards, regenerated (for a pull or a catch-up that asks
    /// for shards we never received): one decode and one encode.
    fn fill_shards(&mut self, key: &ObjectKey) {
        let Some(obj) = self.objects.get_mut(key) else {
            return;
        };
        let Some(manifest) = &obj.manifest else {
            return;
        };
        if !obj.complete || obj.shards.iter().all(Option::is_some) {
            return;
        }
        let layout = manifest.layout;
        let Ok(object) = fec::decode(&obj.shards, &layout) else {
            return;
        };
        let Ok(all) = fec::encode(&object, &layout) else {
            return;
        };
        for (slot, shard) in obj.shards.iter_mut().zip(all) {
            if slot.is_none() {
                *slot = Some(shard);
            }
        }
    }

    /// Sends our parent in `s` what we and our children in `s` want, if it changed.
    fn send_subscription(&mut self, s: u8) {
        if self.is_publisher() {
            return;
        }
        let si = usize::from(s);
        let Some(parent) = self.stripes[si].parent else {
            return;
        };
        let wanted = self.wanted_in(s);
        if self.stripes[si].sent_subs.as_ref() == Some(&wanted) {
            return;
        }
        let layers = wanted
            .iter()
            .map(|&(track, layer)| DpTrackLayer { track, layer })
            .collect();
        self.stripes[si].sent_subs = Some(wanted);
        self.stripes[si].subs_sent_at = Some(self.last_now);
        self.enqueue_control(
            parent,
            Body::Subscribe(DpSubscribe {
                layers,
                stripe: u32::from(s),
            }),
        );
    }

    // ---- repair -------------------------------------------------------------------------

    fn on_have(&mut self, now: Instant, from: P, have: DpHave) {
        if have.layers.len() > MAX_HAVE_LAYERS {
            return self.misbehaved(now, from, Misbehaviour::Malformed);
        }
        // A neighbour on another epoch has nothing of ours: none of its frames are pulled
        // (their manifests would be stale), and it is no parent (what it pushes never
        // verifies; we would pull every object of it until its deadline).
        let foreign = self
            .epoch
            .is_some_and(|epoch| have.epoch != 0 && have.epoch != epoch);
        if foreign {
            self.stats.stale += 1;
            return self.mark_foreign(now, from);
        }
        let mut learned = Vec::new();
        for layer in &have.layers {
            let id = (layer.track, layer.layer);
            if !self.subscription.contains(&id) {
                continue;
            }
            // Frames the neighbour completed that we never saw a sign of, since we started
            // and within what we still track (a have reaches 64 frames back, over 8 s on a
            // 7.5 fps temporal layer: older ones are gone everywhere, pulling them is waste).
            let Some(&first) = self.first.get(&id) else {
                continue;
            };
            let oldest_kept = self
                .frames
                .range((id.0, id.1, 0)..=(id.0, id.1, u64::MAX))
                .next()
                .map_or(first, |((_, _, seq), _)| *seq);
            let first = first.max(oldest_kept);
            let mut seqs = Vec::new();
            if layer.latest_complete {
                seqs.push(layer.latest);
            }
            for i in 0..64u64 {
                if layer.complete & (1 << i) != 0
                    && let Some(seq) = layer.latest.checked_sub(1 + i)
                {
                    seqs.push(seq);
                }
            }
            for seq in seqs {
                if seq >= first && !self.frames.contains_key(&(id.0, id.1, seq)) {
                    learned.push(ObjectKey {
                        track: id.0,
                        layer: id.1,
                        sequence: seq,
                        fragment: 0,
                    });
                }
            }
        }
        if let Some(peer) = self.peers.get_mut(&from) {
            peer.foreign = false;
            peer.have = have
                .layers
                .into_iter()
                .map(|l| ((l.track, l.layer), l))
                .collect();
            peer.depths = have.depths.into_iter().take(64).collect();
            peer.room = have.room;
        }
        // Starved, and a neighbour has frames new to us: the stream flows again somewhere
        // near, so searches backing off start again.
        let starved = self.starved(now);
        if starved
            && learned
                .iter()
                .any(|key| !self.objects.contains_key(key) && !self.is_old(key))
        {
            self.retry_joins_soon(now);
        }
        for key in learned {
            if self.objects.len() < MAX_OBJECTS && !self.is_old(&key) {
                self.repair_pending = true;
                if let std::collections::btree_map::Entry::Vacant(entry) = self.objects.entry(key) {
                    entry.insert(Object::new(now));
                    self.incomplete.insert(key);
                }
                self.frames.entry(key.frame()).or_default().first_seen = Some(now);
            }
        }
    }

    fn peer_has(&self, peer: &Peer, key: &ObjectKey) -> bool {
        let Some(layer) = peer.have.get(&(key.track, key.layer)) else {
            return false;
        };
        if key.sequence == layer.latest {
            return layer.latest_complete;
        }
        layer
            .latest
            .checked_sub(key.sequence.saturating_add(1))
            .is_some_and(|i| i < 64 && layer.complete & (1 << i) != 0)
    }

    fn send_haves(&mut self) {
        let mut per_layer: BTreeMap<(u32, u32), DpHaveLayer> = BTreeMap::new();
        for (&(track, layer, seq), frame) in self.frames.iter().rev() {
            let complete = frame.fragments > 0 && frame.complete >= frame.fragments;
            let entry = per_layer.entry((track, layer)).or_insert(DpHaveLayer {
                track,
                layer,
                latest: seq,
                complete: 0,
                latest_complete: complete,
            });
            if seq < entry.latest
                && complete
                && let Some(i) = (entry.latest - seq - 1)
                    .try_into()
                    .ok()
                    .filter(|i: &u32| *i < 64)
            {
                entry.complete |= 1 << i;
            }
        }
        let layers: Vec<DpHaveLayer> = per_layer.into_values().take(MAX_HAVE_LAYERS).collect();
        let depths = self.stripes.iter().map(|s| s.path.len() as u32).collect();
        let room = self.room();
        let bytes = self.encode(Body::Have(DpHave {
            layers,
            depths,
            room,
            epoch: self.epoch.unwrap_or(0),
        }));
        let neighbours: BTreeSet<P> = if std::mem::take(&mut self.have_to_all) {
            self.peers
                .iter()
                .filter(|(_, p)| !p.foreign)
                .map(|(id, _)| *id)
                .collect()
        } else {
            self.stripes
                .iter()
                .flat_map(|s| s.parent.iter().chain(s.children.iter()))
                .copied()
                .collect()
        };
        for peer in neighbours {
            self.enqueue(peer, Class::Control, bytes.clone());
        }
    }

    fn pull_missing(&mut self, now: Instant) {
        if !self.repair_pending {
            return;
        }
        let mut pulls = Vec::new();
        let mut given_up = Vec::new();
        let mut pending = false;
        let repair_delay = self.config.repair_delay;
        // A lost pull or answer is retried after about two round trips, not a fixed 200 ms:
        // on a short path that is the difference between a late frame and one in time.
        let pull_retry = self.pull_rtt.map_or(self.config.pull_retry, |rtt| {
            (rtt * 2 + Duration::from_millis(10))
                .clamp(Duration::from_millis(20), self.config.pull_retry)
        });
        // Stripes without a parent, or with one that changed within FAST_REPAIR: what is
        // missing there was probably lost in the change, not still on its way down.
        let stripes = self.config.stripes;
        let changed: u64 = self
            .stripes
            .iter()
            .enumerate()
            .filter(|(_, st)| {
                st.parent.is_none() || now.saturating_duration_since(st.parent_since) < FAST_REPAIR
            })
            .fold(0, |bits, (i, _)| bits | (1 << i));
        let reorder = self.pull_rtt.map_or(REORDER_WINDOW, |rtt| {
            (rtt / 4).clamp(REORDER_WINDOW_MIN, REORDER_WINDOW)
        });
        let stripe_state = &self.stripes;
        let objects = &mut self.objects;
        // Completion, giving up and expiry take keys out of `incomplete`; anything else found
        // there is dropped now (without a scan of the whole set every tick).
        for key in &self.incomplete {
            let Some(obj) = objects.get_mut(key).filter(|o| !o.complete && !o.missed) else {
                given_up.push(*key);
                continue;
            };
            if !plays(&self.subscription, &self.subscribed_at, key, obj.first_seen) {
                continue;
            }
            pending = true;
            let age = now.saturating_duration_since(obj.first_seen);
            if age >= self.config.deadline {
                obj.missed = true;
                self.stats.objects_missed += 1;
                given_up.push(*key);
                continue;
            }
            // After three unanswered pulls, each doubles the wait before the next one (RFC
            // 6298 §5.5's backoff), up to `pull_retry`: a loss is usually repaired by the
            // first retries, and an object nobody near can serve costs about ten pulls
            // before its deadline, not one every round trip.
            let backoff = (pull_retry * (1u32 << obj.pulls.saturating_sub(3).min(4)))
                .min(self.config.pull_retry);
            // The cheap tests first: this runs every tick for every incomplete object.
            if age < FAST_REPAIR_DELAY.min(repair_delay)
                || obj
                    .last_pull
                    .is_some_and(|at| now.saturating_duration_since(at) < backoff)
            {
                continue;
            }
            // A missing shard in a stripe whose parent has since pushed a later object was
            // lost; one in a stripe whose parent changed may have been lost in the change.
            // Anything else may still be on its way: it waits `repair_delay`.
            // (A changed parent matters only to objects that started before the change: the
            // new parent sends what comes after, in order.)
            // Before `repair_delay`, only the shards taken as lost are asked for, and only as
            // many as the object still lacks once those on their way arrive: asked for every
            // missing shard, a holder sent data shards that the stripes' parents were still
            // pushing, and both copies came (session 16, seed 9: of the shards that pulls
            // triggered by an overtaking or a parent change brought, 75 % were already held
            // or came after the object completed).
            let mut precise: Option<(u64, u32)> = None;
            if age < repair_delay {
                let in_changed = |i: u32| {
                    let s = stripe_of(key, i, stripes);
                    changed & (1 << s) != 0
                        && stripe_state[usize::from(s)].parent.is_none_or(|_| {
                            stripe_state[usize::from(s)].parent_since >= obj.first_seen
                        })
                };
                let overtaken = |i: u32| {
                    stripe_state[usize::from(stripe_of(key, i, stripes))]
                        .overtook(key, now, reorder)
                };
                let lost = |i: u32| in_changed(i) || overtaken(i);
                match &obj.manifest {
                    Some(m) => {
                        let (mut lost_bits, mut on_way, mut held) = (0u64, 0usize, 0usize);
                        for i in 0..m.layout.total() as u32 {
                            match obj.shards.get(i as usize) {
                                Some(Some(_)) => held += 1,
                                Some(None) if lost(i) => lost_bits |= 1 << i,
                                Some(None) => on_way += 1,
                                None => {}
                            }
                        }
                        let lacking = m.layout.data.saturating_sub(held + on_way);
                        if lost_bits == 0 || lacking == 0 {
                            continue;
                        }
                        precise = Some((lost_bits, lacking as u32));
                    }
                    None if !lost(0) => continue,
                    None => {}
                }
            }
            let (want_manifest, shards, count) = match (&obj.manifest, precise) {
                // Every shard but those held (unverified) yet.
                (None, _) => (
                    true,
                    obj.unverified
                        .iter()
                        .fold(u64::MAX, |bits, (_, i, _, _)| bits & !(1u64 << (i % 64))),
                    0,
                ),
                (Some(_), Some((lost, count))) => (false, lost, count),
                // Every missing shard: the holder sends as many as complete `data` (the
                // bits it is not asked for are the ones we hold).
                (Some(_), None) => (
                    false,
                    obj.shards
                        .iter()
                        .enumerate()
                        .filter(|(_, shard)| shard.is_none())
                        .fold(0u64, |bits, (i, _)| bits | (1 << i)),
                    0,
                ),
            };
            obj.last_pull = Some(now);
            obj.pulled_shards |= shards;
            obj.pulls = obj.pulls.saturating_add(1);
            pulls.push((*key, want_manifest, shards, count, obj.pulls));
        }
        self.repair_pending = pending;
        for key in given_up {
            self.incomplete.remove(&key);
        }
        for (key, manifest, shards, count, tries) in pulls {
            // A neighbour that announced the frame; else a parent (it is upstream).
            let holders: Vec<P> = self
                .peers
                .iter()
                .filter(|(_, p)| !p.foreign && self.peer_has(p, &key))
                .map(|(id, _)| *id)
                .collect();
            // Else the parent of a stripe that should have brought what is missing: it is
            // upstream of that loss, pulls in turn from its own parent if it lacks it too,
            // and pushes the shards down once it rebuilt the object, so a loss near the root
            // is repaired from the top (ultimately from the publisher) instead of among peers
            // that all lack it. A missing manifest is asked of the parents in its own
            // stripes. Each retry asks the next of those parents: one may lack it as well and
            // answers nothing (two peers each without a manifest, each the other's parent in
            // another stripe, asked each other for 200 ms).
            let mut upstream: Vec<P> = Vec::new();
            let stripes_of_missing: Vec<u8> = if manifest {
                manifest_stripes(&key, stripes)
            } else {
                (0..64u32)
                    .filter(|i| shards & (1 << i) != 0)
                    .map(|i| stripe_of(&key, i, stripes))
                    .collect()
            };
            for s in stripes_of_missing {
                if let Some(parent) = self.stripes[usize::from(s)].parent
                    && !upstream.contains(&parent)
                {
                    upstream.push(parent);
                }
            }
            // `tries` counts this pull: 1 for the first.
            let upstream = (!upstream.is_empty())
                .then(|| upstream[(tries.max(1) as usize - 1) % upstream.len()]);
            let parents: Vec<P> = self.stripes.iter().filter_map(|s| s.parent).collect();
            let target = self
                .pick(&holders)
                .or(upstream)
                .or_else(|| self.pick(&parents));
            let Some(target) = target else { continue };
            let asked = self
                .stripes
                .iter()
                .enumerate()
                .filter(|(_, stripe)| stripe.parent == Some(target))
                .fold(0u32, |bits, (i, _)| bits | (1 << i));
            if let Some(obj) = self.objects.get_mut(&key) {
                obj.pulled_from = Some(target);
                obj.pulled_parents |= asked;
            }
            self.stats.pulls_sent += 1;
            self.enqueue_control(
                target,
                Body::Pull(DpPull {
                    key: Some(key.to_proto()),
                    shards,
                    manifest,
                    count,
                }),
            );
        }
    }

    fn on_pull(&mut self, from: P, pull: DpPull) {
        // A receive-only peer uploads no media, pulls included (the puller tries another).
        if !self.can_forward() && !self.is_publisher() {
            return;
        }
        let Some(key) = pull.key.as_ref().map(ObjectKey::from_proto) else {
            return;
        };
        let Some(obj) = self.objects.get(&key) else {
            return;
        };
        let Some(manifest) = &obj.manifest else {
            return;
        };
        let layout = manifest.layout;
        let manifest_proto = manifest.proto.clone();
        // Bit i asks for shard i; unless `count` says how many to send, the bits not set are
        // shards the puller holds, so only as many as complete `data` are sent (data shards
        // first). 0 asks for the data shards.
        let (wanted, needed) = if pull.shards == 0 {
            ((0..layout.data).collect::<Vec<usize>>(), layout.data)
        } else {
            let wanted: Vec<usize> = (0..layout.total())
                .filter(|i| pull.shards & (1 << i) != 0)
                .collect();
            let needed = if pull.count > 0 {
                (pull.count as usize).min(layout.data)
            } else {
                layout.data.saturating_sub(layout.total() - wanted.len())
            };
            (wanted, needed)
        };
        let complete = obj.complete;
        let answer = needed.min(wanted.len()) * layout.shard_len
            + if pull.manifest {
                layout.total() * auth::DIGEST_LEN + 128
            } else {
                0
            };
        if !self.repair_budget(answer) {
            self.stats.pulls_refused += 1;
            return;
        }
        let held = |plane: &Self, i: usize| plane.holds_shard(&key, i as u32);
        if complete && wanted.iter().take(needed).any(|&i| !held(self, i)) {
            self.fill_shards(&key);
        }
        // Of those asked, the ones we have (a relay may still lack some), data first.
        let wanted: Vec<usize> = wanted
            .into_iter()
            .filter(|&i| held(self, i))
            .take(needed)
            .collect();
        self.stats.pulls_served += 1;
        if pull.manifest {
            let bytes = self.encode(Body::Manifest(manifest_proto));
            self.enqueue(from, Class::Media { layer: key.layer }, bytes);
        }
        for i in wanted {
            if let Some(bytes) = self.shard_message(&key, i as u32) {
                self.stats.shards_sent += 1;
                self.enqueue(from, Class::Media { layer: key.layer }, bytes);
            }
        }
    }

    /// Takes `bytes` from the repair budget if it has them. Pull answers may use
    /// `REPAIR_SHARE` of the upload capacity (unlimited, and the publisher: two stream
    /// copies, which the unit nets' 5 % loss needs): beyond it a peer asked by many stops pushing to its
    /// children in time (its queues shed what the pulls displace, and the children pull in
    /// turn, which the simulator showed as a collapse on home uplinks), while a refused
    /// puller asks another holder.
    fn repair_budget(&mut self, bytes: usize) -> bool {
        let now = self.last_now;
        let stream = if self.rate_bytes > 0.0 {
            self.rate_bytes
        } else {
            self.config.assumed_stream_kbps as f64 * 125.0
        };
        let rate = match self.config.upload_capacity_kbps {
            _ if self.is_publisher() => 2.0 * stream,
            Some(capacity) if capacity > 0 => capacity as f64 * 125.0 * REPAIR_SHARE,
            _ => 2.0 * stream,
        };
        let elapsed = now.saturating_duration_since(self.repair_at).as_secs_f64();
        self.repair_at = now;
        // A burst of 500 ms of the budget (a subtree repairing after its relay left), at
        // least a large answer.
        let burst = (rate * 0.5).max(32.0 * 1024.0);
        self.repair_tokens = (self.repair_tokens + elapsed * rate).min(burst);
        if self.repair_tokens < bytes as f64 {
            return false;
        }
        self.repair_tokens -= bytes as f64;
        true
    }

    // ---- feedback -----------------------------------------------------------------------

    fn forward_keyframe(&mut self, now: Instant, track: u32, layer: u32) {
        if self
            .last_keyframe
            .get(&(track, layer))
            .is_some_and(|at| now.saturating_duration_since(*at) < self.config.keyframe_coalesce)
        {
            return;
        }
        self.last_keyframe.insert((track, layer), now);
        if self.is_publisher() {
            self.outputs.push_back(Output::KeyframeRequest {
                epoch: self.epoch.unwrap_or(0),
                track,
                layer,
            });
        } else if let Some(parent) = self.stripes[usize::from(FEEDBACK_STRIPE)].parent {
            self.enqueue_control(parent, Body::Keyframe(DpKeyframe { track, layer }));
        }
    }

    fn send_report(&mut self, now: Instant) {
        let fresh = self.config.report_interval * 3;
        let mut summary = self
            .own_report
            .as_ref()
            .map(Summary::from_local)
            .unwrap_or_default();
        let (expected, missing) = std::mem::take(&mut self.shard_loss);
        if expected > 0 {
            self.stats.shard_loss_permille =
                (missing as f64 * 1000.0 / expected as f64).round() as u32;
        }
        // A viewer's first seconds are mostly tree changes, whose losses pulls repair.
        // Counted, they sized the parity for an audience joining at once at 20 % (the
        // simulator's ramp, N = 300): two thirds of the stream in parity, held 10 s.
        let (expected, missing) = std::mem::take(&mut self.shard_loss_sized);
        if expected > 0 {
            summary.add_shard_loss(missing as f64 / expected as f64);
        }
        let warm = self
            .first_pushed
            .is_some_and(|at| now.saturating_duration_since(at) >= LINK_LOSS_WARM_UP);
        if let Some(link) = self.link_loss().filter(|_| warm) {
            self.stats.link_loss_permille = (link * 1000.0).round() as u32;
        }
        for stripe in &mut self.stripes {
            stripe.link_counts.0 *= LINK_LOSS_DECAY;
            stripe.link_counts.1 *= LINK_LOSS_DECAY;
        }
        for child in &self.stripes[usize::from(FEEDBACK_STRIPE)].children {
            if let Some((at, report)) = self.peers.get(child).and_then(|p| p.report.as_ref())
                && now.saturating_duration_since(*at) < fresh
            {
                summary.merge(report);
            }
        }
        if self.is_publisher() {
            self.update_parity(now, &summary);
            self.outputs.push_back(Output::Audience(summary));
        } else if let Some(parent) = self.stripes[usize::from(FEEDBACK_STRIPE)].parent
            && (summary.viewers > 0 || !summary.shard_loss_histogram.is_empty())
        {
            self.enqueue_control(parent, Body::Report(summary.to_proto()));
        }
    }

    // ---- timers and output ----------------------------------------------------------------

    /// Runs the timers due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = now;
        self.last_timeout = now;
        self.run_decodes(now);
        self.maintain_tree(now);
        if now >= self.next_have {
            self.next_have = now + self.config.have_interval;
            self.send_haves();
        }
        if now >= self.next_report {
            self.next_report = now + self.config.report_interval;
            self.send_report(now);
        }
        if !self.is_publisher() {
            self.pull_missing(now);
        }
        self.expire(now);
    }

    fn expire(&mut self, now: Instant) {
        if now < self.next_expire {
            return;
        }
        self.next_expire = now + Duration::from_millis(250);
        if !self.is_publisher() {
            self.sample_shard_loss(now);
        }
        let retain = self.config.retain;
        self.objects
            .retain(|_, o| now.saturating_duration_since(o.first_seen) < retain);
        let objects = &self.objects;
        self.incomplete.retain(|key| objects.contains_key(key));
        // Recounted here (cleared lists, bans and expiry all release their bytes).
        self.unverified_bytes = self
            .objects
            .values()
            .flat_map(|o| o.unverified.iter().map(|(_, _, data, _)| data.len()))
            .sum();
        // A frame forgotten here is never learned again from a have (see `on_have`): an
        // older frame seen later outlives it, and without this the expired newer ones would
        // look never seen, be pulled from peers that expired them too and missed, and each
        // new record would bring the next ones back in turn.
        // Only up to the newest verified frame: a record learned from a hostile have of a
        // far-future frame must not stop the learning of real ones.
        let (first, newest) = (&mut self.first, &self.newest);
        self.frames.retain(|&(track, layer, sequence), f| {
            let keep = f
                .first_seen
                .is_none_or(|at| now.saturating_duration_since(at) < retain);
            if !keep
                && let Some(first) = first.get_mut(&(track, layer))
                && let Some(&newest) = newest.get(&(track, layer))
            {
                *first = (*first).max(sequence.min(newest).saturating_add(1));
            }
            keep
        });
    }

    /// Counts the shards pushed to us of the objects played that are `LOSS_SAMPLE_AGE` old,
    /// in the stripes whose parent was the same since before the object started: a shard
    /// missing there was lost on the link (or at the parent), not in a tree change.
    fn sample_shard_loss(&mut self, now: Instant) {
        let stripes = self.config.stripes;
        for (key, obj) in &mut self.objects {
            if obj.sampled || now.saturating_duration_since(obj.first_seen) < LOSS_SAMPLE_AGE {
                continue;
            }
            obj.sampled = true;
            // Without a manifest the object's size is unknown; the pulls count its loss.
            let Some(manifest) = &obj.manifest else {
                continue;
            };
            if !plays(&self.subscription, &self.subscribed_at, key, obj.first_seen) {
                continue;
            }
            let sized = self
                .first_pushed
                .is_some_and(|at| obj.first_seen >= at + SHARD_LOSS_WARM_UP);
            for i in 0..manifest.layout.total() as u32 {
                let stripe = &mut self.stripes[usize::from(stripe_of(key, i, stripes))];
                if stripe.parent.is_none() || stripe.parent_since + STABLE_PARENT > obj.first_seen {
                    continue;
                }
                let lost = u64::from(obj.pushed & (1 << i) == 0);
                self.shard_loss.0 += 1;
                self.shard_loss.1 += lost;
                if sized {
                    self.shard_loss_sized.0 += 1;
                    self.shard_loss_sized.1 += lost;
                }
                stripe.link_counts.0 += 1.0;
                if obj.pushed_unasked & (1 << i) == 0 {
                    stripe.link_counts.1 += 1.0;
                }
            }
        }
    }

    /// The loss of our own link (see [`DataPlaneStats::link_loss_permille`]) from the
    /// decayed per-stripe counts: the lower median over the parents with at least
    /// `LINK_LOSS_MIN_DUE` shards due, else the share pooled over all of them; `None`
    /// without counts.
    fn link_loss(&self) -> Option<f64> {
        // Each parent's stripes pooled (current parents; a stripe's counts may include a
        // few shards due from the one before).
        let mut per_parent: BTreeMap<P, (f64, f64)> = BTreeMap::new();
        for stripe in &self.stripes {
            let (due, missing) = stripe.link_counts;
            if let Some(parent) = stripe.parent
                && due > 0.0
            {
                let entry = per_parent.entry(parent).or_default();
                entry.0 += due;
                entry.1 += missing;
            }
        }
        let mut rates: Vec<f64> = per_parent
            .values()
            .filter(|(due, _)| *due >= LINK_LOSS_MIN_DUE)
            .map(|&(due, missing)| missing / due)
            .collect();
        if rates.is_empty() {
            // A sparse stream: no parent brought enough to judge alone.
            let (due, missing) = per_parent
                .values()
                .fold((0.0, 0.0), |(d, m), &(due, missing)| (d + due, m + missing));
            return (due > 0.0).then(|| missing / due);
        }
        rates.sort_by(f64::total_cmp);
        rates.get((rates.len() - 1) / 2).copied()
    }

    /// Publisher: the parity to use from the audience's shard loss (see
    /// [`DataPlaneConfig::adaptive_parity`]): a higher loss raises it at once, a lower one
    /// lowers it after `PARITY_HOLD`; no measure keeps it.
    fn update_parity(&mut self, now: Instant, audience: &Summary) {
        let Some(loss) = audience.shard_loss_quantile(PARITY_QUANTILE) else {
            return;
        };
        // Beyond MAX_PARITY_LOSS parity would cost more than the stream; such viewers step
        // down their layer (ABR takes the link loss) and pull the rest.
        let loss = loss.min(MAX_PARITY_LOSS);
        if !self.parity_measured {
            self.parity_measured = true;
            self.parity_loss = loss;
            self.parity_loss_at = now;
            return;
        }
        if loss >= self.parity_loss
            || now.saturating_duration_since(self.parity_loss_at) >= PARITY_HOLD
        {
            if loss != self.parity_loss {
                tracing::debug!(loss, "parity sized for a new shard loss");
            }
            self.parity_loss = loss;
            self.parity_loss_at = now;
        }
    }

    /// When [`DataPlane::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Instant {
        let mut next = self.next_have.min(self.next_report).min(self.next_expire);
        // Ticks count from the last run, not from the last message: a steady flow of
        // messages must not keep postponing them.
        if !self.pending_decodes.is_empty() {
            next = next.min(self.last_timeout + DECODE_GRACE);
        }
        if self.repair_pending && !self.is_publisher() {
            let tick = if self.last_timeout < self.fast_repair_until {
                Duration::from_millis(5)
            } else {
                Duration::from_millis(20)
            };
            next = next.min(self.last_timeout + tick);
        }
        let joining = self.stripes.iter().any(|s| s.parent.is_none());
        if joining && !self.is_publisher() {
            next = next.min(self.last_timeout + Duration::from_millis(100));
        }
        next
    }

    pub fn poll_output(&mut self) -> Option<Output<P>> {
        self.outputs.pop_front()
    }

    /// The next message for `peer`, if any and if the upload capacity allows it now.
    pub fn poll_transmit(&mut self, now: Instant, peer: P) -> Option<Bytes> {
        let bytes = self.transmit_from(now, peer);
        if self.peers.get(&peer).is_none_or(|p| p.queue.is_empty()) {
            self.ready.retain(|p| *p != peer);
        }
        bytes
    }

    fn transmit_from(&mut self, now: Instant, peer: P) -> Option<Bytes> {
        if let Some(cutoff) = now.checked_sub(MAX_QUEUE_DELAY) {
            self.peers.get_mut(&peer)?.queue.shed_queued_before(cutoff);
        }
        let (front, len) = self.peers.get(&peer)?.queue.front()?;
        if let Some(capacity) = self.config.upload_capacity_kbps.filter(|c| *c > 0) {
            let rate = capacity as f64 * 1000.0 / 8.0;
            let elapsed = now.saturating_duration_since(self.tokens_at).as_secs_f64();
            // 100 ms of sending (at least one large message) may go out at once.
            let burst = (rate * 0.1).max(16.0 * 1024.0);
            self.tokens = (self.tokens + elapsed * rate).min(burst);
            self.tokens_at = now;
            // Control (joins, subscriptions, haves, pulls, reports) goes out whatever the
            // capacity: a line too thin for it (say 1 kbit/s) would otherwise never keep a
            // parent. It is charged, so media waits for it.
            if front != Class::Control && self.tokens < len as f64 && self.tokens < burst {
                return None;
            }
            self.tokens = (self.tokens - len as f64).max(-burst);
        } else {
            self.tokens_at = now;
        }
        let (class, bytes, queued_at) = self.peers.get_mut(&peer)?.queue.pop()?;
        if matches!(class, Class::Media { .. }) {
            let wait = now.saturating_duration_since(queued_at).as_micros() as u64;
            self.stats.media_queue_wait_us += wait;
            self.stats.media_dequeued += 1;
            self.stats.media_queue_wait_max_us = self.stats.media_queue_wait_max_us.max(wait);
        }
        Some(bytes)
    }

    /// Whether any peer has queued messages.
    pub fn has_queued(&self) -> bool {
        self.ready
            .iter()
            .any(|p| self.peers.get(p).is_some_and(|s| !s.queue.is_empty()))
    }

    /// The next message to send and its peer, round robin over the peers with queued
    /// messages (one message each in turn), if the upload capacity allows it now: for a
    /// driver with one uplink for all peers (the simulator). `None` when nothing is queued or
    /// the pacing holds it back ([`DataPlane::has_queued`] tells which).
    pub fn poll_transmit_next(&mut self, now: Instant) -> Option<(P, Bytes)> {
        while let Some(peer) = self.ready.pop_front() {
            let Some(state) = self.peers.get(&peer) else {
                continue;
            };
            if state.queue.is_empty() {
                continue;
            }
            match self.transmit_from(now, peer) {
                Some(bytes) => {
                    if self.peers.get(&peer).is_some_and(|p| !p.queue.is_empty()) {
                        self.ready.push_back(peer);
                    }
                    return Some((peer, bytes));
                }
                None => {
                    // Paced (or everything queued was stale and shed).
                    if self.peers.get(&peer).is_some_and(|p| !p.queue.is_empty()) {
                        self.ready.push_front(peer);
                        return None;
                    }
                }
            }
        }
        None
    }

    /// Peers with queued messages.
    pub fn peers_with_data(&self) -> Vec<P> {
        let mut peers: Vec<P> = self
            .ready
            .iter()
            .filter(|p| self.peers.get(p).is_some_and(|s| !s.queue.is_empty()))
            .copied()
            .collect();
        peers.sort_unstable();
        peers.dedup();
        peers
    }

    /// Connected peers known to the data plane.
    pub fn peers(&self) -> impl Iterator<Item = &P> {
        self.peers.keys()
    }

    /// Whether `peer` is a parent or child in some stripe (a connection worth keeping).
    pub fn is_tree_neighbour(&self, peer: &P) -> bool {
        self.stripes
            .iter()
            .any(|s| s.parent.as_ref() == Some(peer) || s.children.contains(peer))
    }

    pub fn parent(&self, stripe: u8) -> Option<P> {
        self.stripes.get(usize::from(stripe)).and_then(|s| s.parent)
    }

    pub fn children(&self, stripe: u8) -> impl Iterator<Item = &P> {
        self.stripes
            .get(usize::from(stripe))
            .into_iter()
            .flat_map(|s| s.children.iter())
    }

    /// Short ids (64-bit FNV-1a of the peer id) from the root to this peer in `stripe`, both
    /// included; empty while detached there.
    pub fn path(&self, stripe: u8) -> &[u64] {
        self.stripes
            .get(usize::from(stripe))
            .map_or(&[], |s| s.path.as_slice())
    }

    /// This peer's short id, as in [`Self::path`].
    pub fn short_id(&self) -> u64 {
        self.me_short
    }

    /// One line per stripe: parent, join in progress, children (for logs and test failures).
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (i, s) in self.stripes.iter().enumerate() {
            out.push_str(&format!(
                "stripe {i}: parent {:?} joining {:?} next {:?} redirects {} refused {} children {}\n",
                s.parent,
                s.joining.map(|(p, _, sent)| (p, sent)),
                s.next_candidate,
                s.redirects,
                s.refused.len(),
                s.children.len()
            ));
        }
        out
    }

    pub fn stats(&self) -> DataPlaneStats {
        let mut stats = self.stats.clone();
        stats.parents = self.stripes.iter().filter(|s| s.parent.is_some()).count();
        stats.children = self.total_children();
        stats.interior_stripe = self.interior;
        stats.peers = self.peers.len();
        stats.shed = self.peers.values().map(|p| p.queue.shed).sum::<u64>() + self.stats.shed;
        stats.depth = self.stripes.iter().map(|s| s.path.len()).max().unwrap_or(0);
        stats.parity_loss_permille = (self.parity_loss * 1000.0).round() as u32;
        stats
    }

    fn encode(&self, body: Body) -> Bytes {
        DpMessage {
            stream: self.tag,
            body: Some(body),
        }
        .encode_to_vec()
        .into()
    }

    fn enqueue_control(&mut self, to: P, body: Body) {
        let bytes = self.encode(body);
        self.enqueue(to, Class::Control, bytes);
    }

    fn enqueue(&mut self, to: P, class: Class, bytes: Bytes) {
        let max = self.config.queue_bytes;
        if let Some(peer) = self.peers.get_mut(&to) {
            if peer.queue.is_empty() {
                self.ready.push_back(to);
            }
            peer.queue.push(class, bytes, max, self.last_now);
        }
    }
}

/// The fragment count of an encoded `Fragment` envelope (`None` if it is not one).
fn fragment_count(object: &[u8]) -> Option<u32> {
    match crate::proto::Envelope::decode(object).ok()?.body? {
        crate::proto::envelope::Body::Fragment(f) => Some(f.count.max(1)),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
