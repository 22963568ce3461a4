//! The one error type of the core. Every variant says what failed and where.

use std::io;

/// Errors of theta-core. Each variant is its own Python exception in `theta-py` (errors.py).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O error, with the path it happened on.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    /// A stored frame does not decode, or decodes to bytes whose BLAKE3 is not its id.
    #[error("corrupt frame: {0}")]
    CorruptFrame(String),
    /// A pack entry or pack file is malformed.
    #[error("corrupt pack {path} at offset {offset}: {what}")]
    CorruptPack {
        path: String,
        offset: u64,
        what: String,
    },
    /// A frame, base chunk or object that should be there is not.
    #[error("not found: {0}")]
    NotFound(String),
    /// The file being added changed (cut short, rewritten) while it was read: nothing was stored.
    #[error("{0}: changed while being added; nothing was stored, add it again")]
    Changed(String),
    /// git's pkt-line stream is broken: there is nothing to resynchronise on.
    #[error("filter protocol: {0}")]
    Protocol(String),
    /// A caller passed arguments that cannot be honoured (a bug in the caller, not bad data).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The operation was interrupted (Ctrl-C).
    #[error("interrupted")]
    Interrupted,
}

impl Error {
    pub fn io(path: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
