//! theta-core: the byte work of theta-store, with no Python in it.
//!
//! - [`frame`]: chunk ids (BLAKE3) and frames (byte planes + rANS / zstd / raw per plane).
//! - [`delta`]: bit-level deltas (XOR, zigzag integer difference) against a base chunk.
//! - [`sparse`]: sparse deltas (changed positions and values) against a base chunk.
//! - [`lowrank`]: lossless low-rank deltas (factors + exact residual), deterministic SVD.
//! - [`ans`]: the order-0 rANS coder used on float exponent planes.
//! - [`cdc`]: content-defined chunking for opaque bytes.
//! - [`mapped`]: read-only mappings of the file being added, safe if it is cut short meanwhile.
//! - [`pack`]: Git pack and index writing (zlib level 0), plain-blob reads.
//! - [`pipeline`]: whole files: scan, write the new chunks, read them back.
//! - [`store`]: where frames go and come from: the sink and source seams, Git packs, memory.
//! - [`reflate`]: deflated ZIP members kept inflated, and deflated back byte-exactly (pinned zlib).
//! - [`pktline`]: git's pkt-line content framing for the filter process.
//! - [`tensordelta`]: one changed tensor coded against its base, the smallest frame per chunk.
//! - [`sha1x16`]: Git object ids of many blobs at once (AVX-512 lanes).

pub mod ans;
pub mod cdc;
pub mod delta;
pub mod dtype;
pub mod error;
pub mod frame;
pub mod lowrank;
pub mod mapped;
pub mod pack;
pub mod pipeline;
pub mod pktline;
pub mod reflate;
pub mod sha1x16;
pub mod sparse;
pub mod store;
pub mod tensordelta;

pub use dtype::DType;
pub use error::{Error, Result};
