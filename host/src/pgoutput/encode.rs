//! Encoding of [`LogicalMessage`]s into `pgoutput` wire frames, the inverse of the decoder.
//!
//! Postgres is the only real producer of these frames; the encoder exists so that tests,
//! benchmarks and fake replication servers can build exact frames from typed values. It refuses
//! what the wire cannot express rather than writing a frame the decoder would misread.

use bytes::{BufMut, BytesMut};

use super::message::{
    LogicalMessage, PrepareBody, RelationBody, StreamAbortBody, TupleData, TupleValue,
};
use super::tag::*;
use crate::lsn::Lsn;

/// Why a message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The protocol version is not 1 to 4.
    #[error("unsupported pgoutput protocol version {0}: supported are 1 to 4")]
    UnsupportedVersion(u32),
    /// The message, or one of its fields, does not exist in the requested protocol version.
    #[error("{what} needs pgoutput protocol version {required}, asked for {version}")]
    UnsupportedByVersion {
        /// The message or field.
        what: &'static str,
        /// The lowest protocol version that has it.
        required: u32,
        /// The version asked for.
        version: u32,
    },
    /// An Update carried both a key and an old tuple, or a Delete carried neither or both.
    #[error("{0}")]
    InvalidTuples(&'static str),
    /// A tuple or relation has more columns than the Int16 count can say.
    #[error("{count} columns do not fit the wire's 16-bit column count")]
    TooManyColumns {
        /// The number of columns.
        count: usize,
    },
    /// A value, message content or list is longer than the wire's Int32 length allows.
    #[error("length {length} does not fit the wire's 32-bit length")]
    TooLong {
        /// The length.
        length: usize,
    },
    /// A string field contains a NUL byte, which would end it early on the wire.
    #[error("string field contains a NUL byte: {0:?}")]
    NulInString(String),
}

impl LogicalMessage {
    /// Appends this message as a `pgoutput` frame for `protocol_version` to `buf`.
    ///
    /// Row, Relation, Type, Truncate and Message bodies write their `xid` only when it is
    /// `Some`, which is correct exactly for messages inside a stream block. On error `buf` is
    /// left as it was.
    pub fn encode(&self, protocol_version: u32, buf: &mut BytesMut) -> Result<(), EncodeError> {
        let start = buf.len();
        let result = self.write_frame(protocol_version, buf);
        if result.is_err() {
            buf.truncate(start);
        }
        result
    }

    fn write_frame(&self, version: u32, buf: &mut BytesMut) -> Result<(), EncodeError> {
        if !(1..=MAX_VERSION).contains(&version) {
            return Err(EncodeError::UnsupportedVersion(version));
        }
        let require = |what: &'static str, required: u32| {
            if version >= required {
                Ok(())
            } else {
                Err(EncodeError::UnsupportedByVersion {
                    what,
                    required,
                    version,
                })
            }
        };
        let put_xid = |buf: &mut BytesMut, xid: Option<u32>| {
            if let Some(xid) = xid {
                require("an in-stream xid", STREAMING_MIN_VERSION)?;
                buf.put_u32(xid);
            }
            Ok::<(), EncodeError>(())
        };
        match self {
            LogicalMessage::Begin(body) => {
                buf.put_u8(BEGIN_TAG);
                put_lsn(buf, body.final_lsn);
                buf.put_i64(body.commit_time);
                buf.put_u32(body.xid);
            }
            LogicalMessage::Commit(body) => {
                buf.put_u8(COMMIT_TAG);
                buf.put_u8(body.flags);
                put_lsn(buf, body.commit_lsn);
                put_lsn(buf, body.end_lsn);
                buf.put_i64(body.commit_time);
            }
            LogicalMessage::Origin(body) => {
                buf.put_u8(ORIGIN_TAG);
                put_lsn(buf, body.commit_lsn);
                put_string(buf, &body.name)?;
            }
            LogicalMessage::Relation(body) => {
                buf.put_u8(RELATION_TAG);
                put_xid(buf, body.xid)?;
                put_relation(buf, body)?;
            }
            LogicalMessage::Type(body) => {
                buf.put_u8(TYPE_TAG);
                put_xid(buf, body.xid)?;
                buf.put_u32(body.type_oid);
                put_string(buf, &body.namespace)?;
                put_string(buf, &body.name)?;
            }
            LogicalMessage::Insert(body) => {
                buf.put_u8(INSERT_TAG);
                put_xid(buf, body.xid)?;
                buf.put_u32(body.rel_id);
                buf.put_u8(NEW_TUPLE_TAG);
                put_tuple(buf, &body.new)?;
            }
            LogicalMessage::Update(body) => {
                buf.put_u8(UPDATE_TAG);
                put_xid(buf, body.xid)?;
                buf.put_u32(body.rel_id);
                match (&body.key, &body.old) {
                    (Some(_), Some(_)) => {
                        return Err(EncodeError::InvalidTuples(
                            "an Update carries a key or an old tuple, not both",
                        ));
                    }
                    (Some(key), None) => {
                        buf.put_u8(KEY_TUPLE_TAG);
                        put_tuple(buf, key)?;
                    }
                    (None, Some(old)) => {
                        buf.put_u8(OLD_TUPLE_TAG);
                        put_tuple(buf, old)?;
                    }
                    (None, None) => {}
                }
                buf.put_u8(NEW_TUPLE_TAG);
                put_tuple(buf, &body.new)?;
            }
            LogicalMessage::Delete(body) => {
                buf.put_u8(DELETE_TAG);
                put_xid(buf, body.xid)?;
                buf.put_u32(body.rel_id);
                match (&body.key, &body.old) {
                    (Some(key), None) => {
                        buf.put_u8(KEY_TUPLE_TAG);
                        put_tuple(buf, key)?;
                    }
                    (None, Some(old)) => {
                        buf.put_u8(OLD_TUPLE_TAG);
                        put_tuple(buf, old)?;
                    }
                    _ => {
                        return Err(EncodeError::InvalidTuples(
                            "a Delete carries exactly one of a key or an old tuple",
                        ));
                    }
                }
            }
            LogicalMessage::Truncate(body) => {
                buf.put_u8(TRUNCATE_TAG);
                put_xid(buf, body.xid)?;
                buf.put_i32(int32_length(body.rel_ids.len())?);
                buf.put_u8(body.options);
                for &rel_id in &body.rel_ids {
                    buf.put_u32(rel_id);
                }
            }
            LogicalMessage::Message(body) => {
                buf.put_u8(MESSAGE_TAG);
                put_xid(buf, body.xid)?;
                buf.put_u8(if body.transactional {
                    MESSAGE_TRANSACTIONAL_FLAG
                } else {
                    0
                });
                put_lsn(buf, body.lsn);
                put_string(buf, &body.prefix)?;
                buf.put_i32(int32_length(body.content.len())?);
                buf.put_slice(&body.content);
            }
            LogicalMessage::StreamStart(body) => {
                require("Stream Start", STREAMING_MIN_VERSION)?;
                buf.put_u8(STREAM_START_TAG);
                buf.put_u32(body.xid);
                buf.put_u8(u8::from(body.first_segment));
            }
            LogicalMessage::StreamStop => {
                require("Stream Stop", STREAMING_MIN_VERSION)?;
                buf.put_u8(STREAM_STOP_TAG);
            }
            LogicalMessage::StreamCommit(body) => {
                require("Stream Commit", STREAMING_MIN_VERSION)?;
                buf.put_u8(STREAM_COMMIT_TAG);
                buf.put_u32(body.xid);
                buf.put_u8(body.flags);
                put_lsn(buf, body.commit_lsn);
                put_lsn(buf, body.end_lsn);
                buf.put_i64(body.commit_time);
            }
            LogicalMessage::StreamAbort(body) => {
                require("Stream Abort", STREAMING_MIN_VERSION)?;
                put_stream_abort(buf, body, require)?;
            }
            LogicalMessage::BeginPrepare(body) => {
                require("Begin Prepare", TWO_PHASE_MIN_VERSION)?;
                buf.put_u8(BEGIN_PREPARE_TAG);
                put_lsn(buf, body.prepare_lsn);
                put_lsn(buf, body.end_lsn);
                buf.put_i64(body.prepare_time);
                buf.put_u32(body.xid);
                put_string(buf, &body.gid)?;
            }
            LogicalMessage::Prepare(body) => {
                require("Prepare", TWO_PHASE_MIN_VERSION)?;
                put_prepare(buf, PREPARE_TAG, body)?;
            }
            LogicalMessage::StreamPrepare(body) => {
                require("Stream Prepare", TWO_PHASE_MIN_VERSION)?;
                put_prepare(buf, STREAM_PREPARE_TAG, body)?;
            }
            LogicalMessage::CommitPrepared(body) => {
                require("Commit Prepared", TWO_PHASE_MIN_VERSION)?;
                buf.put_u8(COMMIT_PREPARED_TAG);
                buf.put_u8(body.flags);
                put_lsn(buf, body.commit_lsn);
                put_lsn(buf, body.end_lsn);
                buf.put_i64(body.commit_time);
                buf.put_u32(body.xid);
                put_string(buf, &body.gid)?;
            }
            LogicalMessage::RollbackPrepared(body) => {
                require("Rollback Prepared", TWO_PHASE_MIN_VERSION)?;
                buf.put_u8(ROLLBACK_PREPARED_TAG);
                buf.put_u8(body.flags);
                put_lsn(buf, body.prepare_end_lsn);
                put_lsn(buf, body.rollback_end_lsn);
                buf.put_i64(body.prepare_time);
                buf.put_i64(body.rollback_time);
                buf.put_u32(body.xid);
                put_string(buf, &body.gid)?;
            }
        }
        Ok(())
    }
}

fn put_lsn(buf: &mut BytesMut, lsn: Lsn) {
    buf.put_u64(lsn.0);
}

fn put_string(buf: &mut BytesMut, text: &str) -> Result<(), EncodeError> {
    if text.as_bytes().contains(&0) {
        return Err(EncodeError::NulInString(text.to_owned()));
    }
    buf.put_slice(text.as_bytes());
    buf.put_u8(0);
    Ok(())
}

fn int32_length(length: usize) -> Result<i32, EncodeError> {
    i32::try_from(length).map_err(|_| EncodeError::TooLong { length })
}

fn column_count(count: usize) -> Result<u16, EncodeError> {
    u16::try_from(count).map_err(|_| EncodeError::TooManyColumns { count })
}

fn put_relation(buf: &mut BytesMut, body: &RelationBody) -> Result<(), EncodeError> {
    buf.put_u32(body.rel_id);
    put_string(buf, &body.namespace)?;
    put_string(buf, &body.name)?;
    buf.put_u8(body.replica_identity);
    buf.put_u16(column_count(body.columns.len())?);
    for column in &body.columns {
        buf.put_u8(column.flags);
        put_string(buf, &column.name)?;
        buf.put_u32(column.type_oid);
        buf.put_i32(column.type_modifier);
    }
    Ok(())
}

fn put_tuple(buf: &mut BytesMut, tuple: &TupleData) -> Result<(), EncodeError> {
    buf.put_u16(column_count(tuple.values().len())?);
    for value in tuple.values() {
        match value {
            TupleValue::Null => buf.put_u8(NULL_COLUMN_TAG),
            TupleValue::UnchangedToast => buf.put_u8(UNCHANGED_TOAST_COLUMN_TAG),
            TupleValue::Text(data) => put_column_data(buf, TEXT_COLUMN_TAG, data)?,
            TupleValue::Binary(data) => put_column_data(buf, BINARY_COLUMN_TAG, data)?,
        }
    }
    Ok(())
}

fn put_column_data(buf: &mut BytesMut, kind: u8, data: &[u8]) -> Result<(), EncodeError> {
    buf.put_u8(kind);
    buf.put_i32(int32_length(data.len())?);
    buf.put_slice(data);
    Ok(())
}

fn put_stream_abort(
    buf: &mut BytesMut,
    body: &StreamAbortBody,
    require: impl Fn(&'static str, u32) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    buf.put_u8(STREAM_ABORT_TAG);
    buf.put_u32(body.xid);
    buf.put_u32(body.subxid);
    if let Some(info) = body.abort_info {
        require("Stream Abort LSN and time", PARALLEL_STREAMING_MIN_VERSION)?;
        put_lsn(buf, info.abort_lsn);
        buf.put_i64(info.abort_time);
    }
    Ok(())
}

fn put_prepare(buf: &mut BytesMut, tag: u8, body: &PrepareBody) -> Result<(), EncodeError> {
    buf.put_u8(tag);
    buf.put_u8(body.flags);
    put_lsn(buf, body.prepare_lsn);
    put_lsn(buf, body.end_lsn);
    buf.put_i64(body.prepare_time);
    buf.put_u32(body.xid);
    put_string(buf, &body.gid)
}
