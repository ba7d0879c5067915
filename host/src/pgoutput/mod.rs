//! The `pgoutput` logical replication protocol (versions 1 to 4): a pure, synchronous decoder
//! from XLogData payloads to typed [`LogicalMessage`]s, and the matching encoder.
//!
//! This module knows nothing of connections or async runtimes: the replication layer hands it
//! one frame at a time, in order, and gets back messages whose column data are zero-copy
//! slices of that frame. Keeping it pure makes it cheap to test exhaustively and to fuzz.
//!
//! ```
//! use bytes::BytesMut;
//! use pgstream_host::lsn::Lsn;
//! use pgstream_host::pgoutput::{BeginBody, Decoder, LogicalMessage};
//!
//! let begin = LogicalMessage::Begin(BeginBody { final_lsn: Lsn(0x16_B374_D848), commit_time: 0, xid: 7 });
//! let mut frame = BytesMut::new();
//! begin.encode(1, &mut frame).unwrap();
//! assert_eq!(Decoder::new(1).decode(frame.freeze()).unwrap(), begin);
//! ```

mod decode;
mod encode;
mod message;
mod tag;
#[cfg(test)]
mod tests;

pub use decode::{DecodeError, Decoder, UnsupportedProtocolVersion};
pub use encode::EncodeError;
pub use message::{
    BeginBody, BeginPrepareBody, CommitBody, CommitPreparedBody, DeleteBody, InsertBody,
    LogicalMessage, MessageBody, OriginBody, POSTGRES_EPOCH_OFFSET_MICROS, PrepareBody,
    RelationBody, RelationColumn, RollbackPreparedBody, StreamAbortBody, StreamAbortInfo,
    StreamCommitBody, StreamPrepareBody, StreamStartBody, TruncateBody, TupleData, TupleValue,
    TypeBody, UpdateBody, pg_micros_to_unix_micros,
};
