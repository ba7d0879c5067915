//! Decoding of `pgoutput` XLogData payloads into [`LogicalMessage`]s.
//!
//! The payload is untrusted input: every read is bounds-checked, no length from the wire is used
//! before it is checked against what the frame holds, and a frame must be consumed exactly.
//! Anything else is a [`DecodeError`], never a panic. Column data and message contents are
//! [`Bytes::slice`]s of the frame, so decoding a row allocates only the one `Vec` of its values.

use std::str::Utf8Error;

use bytes::Bytes;

use super::message::{
    BeginBody, BeginPrepareBody, CommitBody, CommitPreparedBody, DeleteBody, InsertBody,
    LogicalMessage, MessageBody, OriginBody, PrepareBody, RelationBody, RelationColumn,
    RollbackPreparedBody, StreamAbortBody, StreamAbortInfo, StreamCommitBody, StreamStartBody,
    TruncateBody, TupleData, TupleValue, TypeBody, UpdateBody,
};
use super::tag::*;
use crate::lsn::Lsn;

/// Why a frame could not be decoded. Offsets count bytes from the start of the frame (the tag).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The frame had no bytes at all.
    #[error("empty pgoutput frame")]
    Empty,
    /// The first byte is not a known message tag.
    #[error("unknown pgoutput message tag {tag:#04x}")]
    UnknownTag {
        /// The tag byte.
        tag: u8,
    },
    /// The message does not exist in the negotiated protocol version.
    #[error("pgoutput message {tag:?} needs protocol version {required}, negotiated {version}")]
    UnsupportedByVersion {
        /// The tag byte, as a char.
        tag: char,
        /// The lowest protocol version that has the message.
        required: u32,
        /// The version the decoder was created for.
        version: u32,
    },
    /// The frame ended before a field was complete (or a length claimed more than it holds).
    #[error("pgoutput frame truncated: {needed} bytes needed at offset {offset}, {available} left")]
    Truncated {
        /// Where the field starts.
        offset: usize,
        /// How many bytes the field needs.
        needed: usize,
        /// How many bytes the frame still had.
        available: usize,
    },
    /// A length field was negative.
    #[error("negative length {length} at offset {offset} in pgoutput frame")]
    NegativeLength {
        /// Where the length field starts.
        offset: usize,
        /// The value read.
        length: i32,
    },
    /// A string field had no terminating NUL before the end of the frame.
    #[error("unterminated string at offset {offset} in pgoutput frame")]
    UnterminatedString {
        /// Where the string starts.
        offset: usize,
    },
    /// A string field was not UTF-8.
    #[error("string at offset {offset} in pgoutput frame is not UTF-8")]
    InvalidUtf8 {
        /// Where the string starts.
        offset: usize,
        /// The validation failure.
        #[source]
        source: Utf8Error,
    },
    /// A tuple column started with a kind byte other than `n`, `u`, `t` or `b`.
    #[error("unknown tuple column kind {kind:#04x} at offset {offset}")]
    UnknownColumnKind {
        /// Where the column starts.
        offset: usize,
        /// The kind byte.
        kind: u8,
    },
    /// A row message had the wrong tuple marker (`K`, `O`, `N`) at a position.
    #[error("expected tuple marker {expected} at offset {offset}, found {found:#04x}")]
    UnexpectedTupleMarker {
        /// Where the marker is.
        offset: usize,
        /// The markers allowed there.
        expected: &'static str,
        /// The byte found.
        found: u8,
    },
    /// Stream Start inside a stream block, or Stream Stop outside one.
    #[error("pgoutput message {tag:?} not allowed while in_stream = {in_stream}")]
    StreamState {
        /// The tag byte, as a char.
        tag: char,
        /// Whether the decoder was inside a stream block.
        in_stream: bool,
    },
    /// The message ended before the end of the frame.
    #[error("{trailing} trailing bytes after a complete pgoutput message of {consumed} bytes")]
    TrailingBytes {
        /// Bytes the message used.
        consumed: usize,
        /// Bytes left over.
        trailing: usize,
    },
}

/// [`Decoder::try_new`] was given a protocol version outside 1 to 4.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported pgoutput protocol version {0}: supported are 1 to 4")]
pub struct UnsupportedProtocolVersion(pub u32);

/// Decodes the XLogData payloads of one replication session, in order.
///
/// The decoder is stateful only in one respect: between Stream Start and Stream Stop every
/// row, Relation, Type, Truncate and Message message carries an extra leading xid, so the
/// decoder must see every frame of the session, in order.
#[derive(Debug, Clone)]
pub struct Decoder {
    protocol_version: u32,
    in_stream: bool,
}

impl Decoder {
    /// A decoder for the `proto_version` negotiated in `START_REPLICATION`.
    ///
    /// # Panics
    ///
    /// If `protocol_version` is not 1 to 4; use [`Decoder::try_new`] for a version that comes
    /// from configuration.
    pub fn new(protocol_version: u32) -> Decoder {
        match Decoder::try_new(protocol_version) {
            Ok(decoder) => decoder,
            Err(error) => panic!("{error}"),
        }
    }

    /// A decoder for `protocol_version`, or an error if it is not 1 to 4.
    pub fn try_new(protocol_version: u32) -> Result<Decoder, UnsupportedProtocolVersion> {
        if (1..=MAX_VERSION).contains(&protocol_version) {
            Ok(Decoder {
                protocol_version,
                in_stream: false,
            })
        } else {
            Err(UnsupportedProtocolVersion(protocol_version))
        }
    }

    /// The protocol version this decoder speaks.
    pub fn protocol_version(&self) -> u32 {
        self.protocol_version
    }

    /// Whether the last frames opened a stream block (Stream Start without Stream Stop yet).
    pub fn in_stream(&self) -> bool {
        self.in_stream
    }

    /// Decodes one XLogData payload. Tracks StreamStart/StreamStop so that in-stream DML
    /// messages (which then carry an extra leading xid) parse correctly.
    ///
    /// A frame that fails to decode leaves the decoder's state unchanged.
    pub fn decode(&mut self, frame: Bytes) -> Result<LogicalMessage, DecodeError> {
        let mut reader = Reader::new(&frame);
        let tag = reader.u8().map_err(|_| DecodeError::Empty)?;
        let message = match tag {
            BEGIN_TAG => LogicalMessage::Begin(BeginBody {
                final_lsn: reader.lsn()?,
                commit_time: reader.i64()?,
                xid: reader.u32()?,
            }),
            COMMIT_TAG => LogicalMessage::Commit(CommitBody {
                flags: reader.u8()?,
                commit_lsn: reader.lsn()?,
                end_lsn: reader.lsn()?,
                commit_time: reader.i64()?,
            }),
            ORIGIN_TAG => LogicalMessage::Origin(OriginBody {
                commit_lsn: reader.lsn()?,
                name: reader.string()?,
            }),
            RELATION_TAG => LogicalMessage::Relation(self.relation(&mut reader)?),
            TYPE_TAG => LogicalMessage::Type(TypeBody {
                xid: self.stream_xid(&mut reader)?,
                type_oid: reader.u32()?,
                namespace: reader.string()?,
                name: reader.string()?,
            }),
            INSERT_TAG => LogicalMessage::Insert(self.insert(&mut reader)?),
            UPDATE_TAG => LogicalMessage::Update(self.update(&mut reader)?),
            DELETE_TAG => LogicalMessage::Delete(self.delete(&mut reader)?),
            TRUNCATE_TAG => LogicalMessage::Truncate(self.truncate(&mut reader)?),
            MESSAGE_TAG => LogicalMessage::Message(MessageBody {
                xid: self.stream_xid(&mut reader)?,
                transactional: reader.u8()? & MESSAGE_TRANSACTIONAL_FLAG != 0,
                lsn: reader.lsn()?,
                prefix: reader.string()?,
                content: reader.length_prefixed()?,
            }),
            STREAM_START_TAG => {
                self.require(tag, STREAMING_MIN_VERSION)?;
                self.require_stream_state(tag, false)?;
                LogicalMessage::StreamStart(StreamStartBody {
                    xid: reader.u32()?,
                    first_segment: reader.u8()? == 1,
                })
            }
            STREAM_STOP_TAG => {
                self.require(tag, STREAMING_MIN_VERSION)?;
                self.require_stream_state(tag, true)?;
                LogicalMessage::StreamStop
            }
            STREAM_COMMIT_TAG => {
                self.require(tag, STREAMING_MIN_VERSION)?;
                LogicalMessage::StreamCommit(StreamCommitBody {
                    xid: reader.u32()?,
                    flags: reader.u8()?,
                    commit_lsn: reader.lsn()?,
                    end_lsn: reader.lsn()?,
                    commit_time: reader.i64()?,
                })
            }
            STREAM_ABORT_TAG => {
                self.require(tag, STREAMING_MIN_VERSION)?;
                let xid = reader.u32()?;
                let subxid = reader.u32()?;
                // Whether the abort LSN and time follow depends on `streaming = parallel`, which
                // the frame does not say; a frame is always one whole message, so in protocol 4
                // their presence is read off the remaining length.
                let abort_info = if self.protocol_version >= PARALLEL_STREAMING_MIN_VERSION
                    && !reader.is_at_end()
                {
                    Some(StreamAbortInfo {
                        abort_lsn: reader.lsn()?,
                        abort_time: reader.i64()?,
                    })
                } else {
                    None
                };
                LogicalMessage::StreamAbort(StreamAbortBody {
                    xid,
                    subxid,
                    abort_info,
                })
            }
            BEGIN_PREPARE_TAG => {
                self.require(tag, TWO_PHASE_MIN_VERSION)?;
                LogicalMessage::BeginPrepare(BeginPrepareBody {
                    prepare_lsn: reader.lsn()?,
                    end_lsn: reader.lsn()?,
                    prepare_time: reader.i64()?,
                    xid: reader.u32()?,
                    gid: reader.string()?,
                })
            }
            PREPARE_TAG => {
                self.require(tag, TWO_PHASE_MIN_VERSION)?;
                LogicalMessage::Prepare(prepare(&mut reader)?)
            }
            STREAM_PREPARE_TAG => {
                self.require(tag, TWO_PHASE_MIN_VERSION)?;
                LogicalMessage::StreamPrepare(prepare(&mut reader)?)
            }
            COMMIT_PREPARED_TAG => {
                self.require(tag, TWO_PHASE_MIN_VERSION)?;
                LogicalMessage::CommitPrepared(CommitPreparedBody {
                    flags: reader.u8()?,
                    commit_lsn: reader.lsn()?,
                    end_lsn: reader.lsn()?,
                    commit_time: reader.i64()?,
                    xid: reader.u32()?,
                    gid: reader.string()?,
                })
            }
            ROLLBACK_PREPARED_TAG => {
                self.require(tag, TWO_PHASE_MIN_VERSION)?;
                LogicalMessage::RollbackPrepared(RollbackPreparedBody {
                    flags: reader.u8()?,
                    prepare_end_lsn: reader.lsn()?,
                    rollback_end_lsn: reader.lsn()?,
                    prepare_time: reader.i64()?,
                    rollback_time: reader.i64()?,
                    xid: reader.u32()?,
                    gid: reader.string()?,
                })
            }
            _ => return Err(DecodeError::UnknownTag { tag }),
        };
        reader.finish()?;
        // State changes only once the whole frame proved valid.
        match message {
            LogicalMessage::StreamStart(_) => self.in_stream = true,
            LogicalMessage::StreamStop => self.in_stream = false,
            _ => {}
        }
        Ok(message)
    }

    fn require(&self, tag: u8, required: u32) -> Result<(), DecodeError> {
        if self.protocol_version >= required {
            Ok(())
        } else {
            Err(DecodeError::UnsupportedByVersion {
                tag: char::from(tag),
                required,
                version: self.protocol_version,
            })
        }
    }

    fn require_stream_state(&self, tag: u8, in_stream: bool) -> Result<(), DecodeError> {
        if self.in_stream == in_stream {
            Ok(())
        } else {
            Err(DecodeError::StreamState {
                tag: char::from(tag),
                in_stream: self.in_stream,
            })
        }
    }

    /// The extra leading xid that messages inside a stream block carry.
    fn stream_xid(&self, reader: &mut Reader<'_>) -> Result<Option<u32>, DecodeError> {
        if self.in_stream {
            reader.u32().map(Some)
        } else {
            Ok(None)
        }
    }

    fn relation(&self, reader: &mut Reader<'_>) -> Result<RelationBody, DecodeError> {
        let xid = self.stream_xid(reader)?;
        let rel_id = reader.u32()?;
        let namespace = reader.string()?;
        let name = reader.string()?;
        let replica_identity = reader.u8()?;
        let count = usize::from(reader.u16()?);
        // A column takes at least 10 bytes; capping by what the frame can hold keeps a lying
        // count from reserving memory the frame cannot fill.
        let mut columns = Vec::with_capacity(count.min(reader.remaining() / 10));
        for _ in 0..count {
            columns.push(RelationColumn {
                flags: reader.u8()?,
                name: reader.string()?,
                type_oid: reader.u32()?,
                type_modifier: reader.i32()?,
            });
        }
        Ok(RelationBody {
            xid,
            rel_id,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }

    fn insert(&self, reader: &mut Reader<'_>) -> Result<InsertBody, DecodeError> {
        let xid = self.stream_xid(reader)?;
        let rel_id = reader.u32()?;
        reader.tuple_marker(&[NEW_TUPLE_TAG], "N")?;
        Ok(InsertBody {
            xid,
            rel_id,
            new: reader.tuple()?,
        })
    }

    fn update(&self, reader: &mut Reader<'_>) -> Result<UpdateBody, DecodeError> {
        let xid = self.stream_xid(reader)?;
        let rel_id = reader.u32()?;
        let (mut key, mut old) = (None, None);
        let marker =
            reader.tuple_marker(&[KEY_TUPLE_TAG, OLD_TUPLE_TAG, NEW_TUPLE_TAG], "K, O or N")?;
        if marker != NEW_TUPLE_TAG {
            let tuple = Some(reader.tuple()?);
            if marker == KEY_TUPLE_TAG {
                key = tuple;
            } else {
                old = tuple;
            }
            reader.tuple_marker(&[NEW_TUPLE_TAG], "N")?;
        }
        Ok(UpdateBody {
            xid,
            rel_id,
            key,
            old,
            new: reader.tuple()?,
        })
    }

    fn delete(&self, reader: &mut Reader<'_>) -> Result<DeleteBody, DecodeError> {
        let xid = self.stream_xid(reader)?;
        let rel_id = reader.u32()?;
        let marker = reader.tuple_marker(&[KEY_TUPLE_TAG, OLD_TUPLE_TAG], "K or O")?;
        let tuple = Some(reader.tuple()?);
        let (key, old) = if marker == KEY_TUPLE_TAG {
            (tuple, None)
        } else {
            (None, tuple)
        };
        Ok(DeleteBody {
            xid,
            rel_id,
            key,
            old,
        })
    }

    fn truncate(&self, reader: &mut Reader<'_>) -> Result<TruncateBody, DecodeError> {
        let xid = self.stream_xid(reader)?;
        let count = reader.length()?;
        let options = reader.u8()?;
        let mut rel_ids = Vec::with_capacity(count.min(reader.remaining() / 4));
        for _ in 0..count {
            rel_ids.push(reader.u32()?);
        }
        Ok(TruncateBody {
            xid,
            options,
            rel_ids,
        })
    }
}

/// Prepare and Stream Prepare share one layout.
fn prepare(reader: &mut Reader<'_>) -> Result<PrepareBody, DecodeError> {
    Ok(PrepareBody {
        flags: reader.u8()?,
        prepare_lsn: reader.lsn()?,
        end_lsn: reader.lsn()?,
        prepare_time: reader.i64()?,
        xid: reader.u32()?,
        gid: reader.string()?,
    })
}

/// A bounds-checked cursor over one frame. Integers are big-endian, as Postgres sends them.
struct Reader<'a> {
    frame: &'a Bytes,
    position: usize,
}

impl<'a> Reader<'a> {
    fn new(frame: &'a Bytes) -> Reader<'a> {
        Reader { frame, position: 0 }
    }

    fn rest(&self) -> &'a [u8] {
        self.frame.get(self.position..).unwrap_or_default()
    }

    fn remaining(&self) -> usize {
        self.frame.len().saturating_sub(self.position)
    }

    fn is_at_end(&self) -> bool {
        self.remaining() == 0
    }

    fn truncated(&self, needed: usize) -> DecodeError {
        DecodeError::Truncated {
            offset: self.position,
            needed,
            available: self.remaining(),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let bytes = *self
            .rest()
            .first_chunk::<N>()
            .ok_or_else(|| self.truncated(N))?;
        self.position += N;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.array::<1>().map(|[byte]| byte)
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_be_bytes)
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        self.array().map(i32::from_be_bytes)
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        self.array().map(i64::from_be_bytes)
    }

    fn lsn(&mut self) -> Result<Lsn, DecodeError> {
        self.array().map(|bytes| Lsn(u64::from_be_bytes(bytes)))
    }

    /// An Int32 count or length, rejected if negative.
    fn length(&mut self) -> Result<usize, DecodeError> {
        let offset = self.position;
        let length = self.i32()?;
        // A non-negative i32 always fits a usize on the 32- and 64-bit targets Rust supports.
        usize::try_from(length).map_err(|_| DecodeError::NegativeLength { offset, length })
    }

    /// `length` bytes as a zero-copy slice of the frame.
    fn slice(&mut self, length: usize) -> Result<Bytes, DecodeError> {
        let end = self
            .position
            .checked_add(length)
            .filter(|&end| end <= self.frame.len())
            .ok_or_else(|| self.truncated(length))?;
        let bytes = self.frame.slice(self.position..end);
        self.position = end;
        Ok(bytes)
    }

    /// An Int32 length followed by that many bytes.
    fn length_prefixed(&mut self) -> Result<Bytes, DecodeError> {
        let length = self.length()?;
        self.slice(length)
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self) -> Result<String, DecodeError> {
        let offset = self.position;
        let rest = self.rest();
        let (text, _) = rest
            .iter()
            .position(|&byte| byte == 0)
            .and_then(|nul| rest.split_at_checked(nul))
            .ok_or(DecodeError::UnterminatedString { offset })?;
        let text = std::str::from_utf8(text)
            .map_err(|source| DecodeError::InvalidUtf8 { offset, source })?;
        self.position += text.len() + 1;
        Ok(text.to_owned())
    }

    /// The marker byte in front of a tuple, which must be one of `allowed`.
    fn tuple_marker(&mut self, allowed: &[u8], expected: &'static str) -> Result<u8, DecodeError> {
        let offset = self.position;
        let marker = self.u8()?;
        if allowed.contains(&marker) {
            Ok(marker)
        } else {
            Err(DecodeError::UnexpectedTupleMarker {
                offset,
                expected,
                found: marker,
            })
        }
    }

    /// TupleData: an Int16 column count, then per column a kind byte and, for text and
    /// binary values, an Int32 length and the data.
    fn tuple(&mut self) -> Result<TupleData, DecodeError> {
        let count = usize::from(self.u16()?);
        // Each column takes at least its kind byte, so the frame bounds the real count.
        let mut values = Vec::with_capacity(count.min(self.remaining()));
        for _ in 0..count {
            let offset = self.position;
            let value = match self.u8()? {
                NULL_COLUMN_TAG => TupleValue::Null,
                UNCHANGED_TOAST_COLUMN_TAG => TupleValue::UnchangedToast,
                TEXT_COLUMN_TAG => TupleValue::Text(self.length_prefixed()?),
                BINARY_COLUMN_TAG => TupleValue::Binary(self.length_prefixed()?),
                kind => return Err(DecodeError::UnknownColumnKind { offset, kind }),
            };
            values.push(value);
        }
        Ok(TupleData::new(values))
    }

    /// Checks that the message used the whole frame.
    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            trailing => Err(DecodeError::TrailingBytes {
                consumed: self.position,
                trailing,
            }),
        }
    }
}
