//! The one-byte tags of the `pgoutput` wire format: the first byte of every message, the
//! markers in front of each tuple of a row message, and the kind byte of each tuple column.
//! Decoder and encoder share them so the two cannot drift apart.

pub(super) const BEGIN_TAG: u8 = b'B';
pub(super) const COMMIT_TAG: u8 = b'C';
pub(super) const ORIGIN_TAG: u8 = b'O';
pub(super) const RELATION_TAG: u8 = b'R';
pub(super) const TYPE_TAG: u8 = b'Y';
pub(super) const INSERT_TAG: u8 = b'I';
pub(super) const UPDATE_TAG: u8 = b'U';
pub(super) const DELETE_TAG: u8 = b'D';
pub(super) const TRUNCATE_TAG: u8 = b'T';
pub(super) const MESSAGE_TAG: u8 = b'M';
pub(super) const STREAM_START_TAG: u8 = b'S';
pub(super) const STREAM_STOP_TAG: u8 = b'E';
pub(super) const STREAM_COMMIT_TAG: u8 = b'c';
pub(super) const STREAM_ABORT_TAG: u8 = b'A';
pub(super) const BEGIN_PREPARE_TAG: u8 = b'b';
pub(super) const PREPARE_TAG: u8 = b'P';
pub(super) const COMMIT_PREPARED_TAG: u8 = b'K';
pub(super) const ROLLBACK_PREPARED_TAG: u8 = b'r';
pub(super) const STREAM_PREPARE_TAG: u8 = b'p';

/// Precedes the new row in Insert and Update.
pub(super) const NEW_TUPLE_TAG: u8 = b'N';
/// Precedes the old key columns in Update and Delete.
pub(super) const KEY_TUPLE_TAG: u8 = b'K';
/// Precedes the whole old row (replica identity full) in Update and Delete.
pub(super) const OLD_TUPLE_TAG: u8 = b'O';

pub(super) const NULL_COLUMN_TAG: u8 = b'n';
pub(super) const UNCHANGED_TOAST_COLUMN_TAG: u8 = b'u';
pub(super) const TEXT_COLUMN_TAG: u8 = b't';
pub(super) const BINARY_COLUMN_TAG: u8 = b'b';

/// `Message` flags bit: the message was emitted transactionally.
pub(super) const MESSAGE_TRANSACTIONAL_FLAG: u8 = 1;

/// The first protocol version that has the streaming messages (Stream Start/Stop/Commit/Abort)
/// and the extra leading xid on messages inside a stream block.
pub(super) const STREAMING_MIN_VERSION: u32 = 2;
/// The first protocol version that has the two-phase commit messages.
pub(super) const TWO_PHASE_MIN_VERSION: u32 = 3;
/// The first protocol version whose Stream Abort may carry the abort LSN and time.
pub(super) const PARALLEL_STREAMING_MIN_VERSION: u32 = 4;
/// The newest protocol version this module speaks.
pub(super) const MAX_VERSION: u32 = 4;
