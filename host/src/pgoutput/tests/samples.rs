//! Valid message sequences, as Postgres could send them in one session, for each protocol
//! version: the shared input of the round-trip, malformed-input and mutation tests.

use bytes::{Bytes, BytesMut};

use crate::lsn::Lsn;
use crate::pgoutput::{
    BeginBody, BeginPrepareBody, CommitBody, CommitPreparedBody, Decoder, DeleteBody, InsertBody,
    LogicalMessage, MessageBody, OriginBody, PrepareBody, RelationBody, RelationColumn,
    RollbackPreparedBody, StreamAbortBody, StreamAbortInfo, StreamCommitBody, StreamStartBody,
    TruncateBody, TupleData, TupleValue, TypeBody, UpdateBody,
};

/// A row with every kind of column value, including an empty text and non-UTF-8 binary data.
pub fn row(seed: u8) -> TupleData {
    TupleData::new(vec![
        TupleValue::Text(Bytes::from(format!("id-{seed}"))),
        TupleValue::Null,
        TupleValue::UnchangedToast,
        TupleValue::Text(Bytes::new()),
        TupleValue::Binary(Bytes::from(vec![0xFF, 0x00, seed])),
    ])
}

fn key(seed: u8) -> TupleData {
    TupleData::new(vec![TupleValue::Text(Bytes::from(format!("id-{seed}")))])
}

/// Every message that may appear in a transaction's body (outside or, with `xid`, inside a
/// stream block).
fn body_messages(xid: Option<u32>) -> Vec<LogicalMessage> {
    vec![
        LogicalMessage::Relation(RelationBody {
            xid,
            rel_id: 16_384,
            namespace: "public".into(),
            name: "dokumente_ü".into(),
            replica_identity: b'd',
            columns: vec![
                RelationColumn {
                    flags: RelationColumn::KEY_FLAG,
                    name: "id".into(),
                    type_oid: 25,
                    type_modifier: -1,
                },
                RelationColumn {
                    flags: 0,
                    name: "title".into(),
                    type_oid: 1043,
                    type_modifier: 104,
                },
            ],
        }),
        LogicalMessage::Relation(RelationBody {
            xid,
            rel_id: 1,
            namespace: String::new(),
            name: "no_columns".into(),
            replica_identity: b'n',
            columns: Vec::new(),
        }),
        LogicalMessage::Type(TypeBody {
            xid,
            type_oid: 90_000,
            namespace: "public".into(),
            name: "mood".into(),
        }),
        LogicalMessage::Insert(InsertBody {
            xid,
            rel_id: 16_384,
            new: row(1),
        }),
        LogicalMessage::Insert(InsertBody {
            xid,
            rel_id: 16_384,
            new: TupleData::default(),
        }),
        LogicalMessage::Update(UpdateBody {
            xid,
            rel_id: 16_384,
            key: None,
            old: None,
            new: row(2),
        }),
        LogicalMessage::Update(UpdateBody {
            xid,
            rel_id: 16_384,
            key: Some(key(3)),
            old: None,
            new: row(4),
        }),
        LogicalMessage::Update(UpdateBody {
            xid,
            rel_id: 16_384,
            key: None,
            old: Some(row(5)),
            new: row(6),
        }),
        LogicalMessage::Delete(DeleteBody {
            xid,
            rel_id: 16_384,
            key: Some(key(7)),
            old: None,
        }),
        LogicalMessage::Delete(DeleteBody {
            xid,
            rel_id: 16_384,
            key: None,
            old: Some(row(8)),
        }),
        LogicalMessage::Truncate(TruncateBody {
            xid,
            options: TruncateBody::CASCADE | TruncateBody::RESTART_IDENTITY,
            rel_ids: vec![16_384, 16_390],
        }),
        LogicalMessage::Message(MessageBody {
            xid,
            transactional: true,
            lsn: Lsn(0x1_0000_0010),
            prefix: "pgstream".into(),
            content: Bytes::from_static(b"{\"hello\":1}\0binary"),
        }),
    ]
}

/// A valid session for `version`: every message type the version has, in an order Postgres
/// could send them, so one decoder can decode the whole list front to back.
pub fn session(version: u32) -> Vec<LogicalMessage> {
    let mut messages = vec![
        LogicalMessage::Message(MessageBody {
            xid: None,
            transactional: false,
            lsn: Lsn(0x1_0000_0000),
            prefix: String::new(),
            content: Bytes::new(),
        }),
        LogicalMessage::Begin(BeginBody {
            final_lsn: Lsn(0x16_B374_D848),
            commit_time: 785_000_000_000_000,
            xid: 731,
        }),
        LogicalMessage::Origin(OriginBody {
            commit_lsn: Lsn(0x2_0000_0000),
            name: "node_b".into(),
        }),
    ];
    messages.extend(body_messages(None));
    messages.push(LogicalMessage::Commit(CommitBody {
        flags: 0,
        commit_lsn: Lsn(0x16_B374_D848),
        end_lsn: Lsn(0x16_B374_D878),
        commit_time: 785_000_000_000_000,
    }));
    if version >= 2 {
        for first_segment in [true, false] {
            messages.push(LogicalMessage::StreamStart(StreamStartBody {
                xid: 900,
                first_segment,
            }));
            messages.extend(body_messages(Some(900)));
            messages.push(LogicalMessage::StreamStop);
        }
        messages.push(LogicalMessage::StreamAbort(StreamAbortBody {
            xid: 900,
            subxid: 901,
            abort_info: None,
        }));
        messages.push(LogicalMessage::StreamCommit(StreamCommitBody {
            xid: 900,
            flags: 0,
            commit_lsn: Lsn(0x17_0000_0000),
            end_lsn: Lsn(0x17_0000_0030),
            commit_time: -1,
        }));
    }
    if version >= 3 {
        messages.push(LogicalMessage::BeginPrepare(BeginPrepareBody {
            prepare_lsn: Lsn(0x18_0000_0000),
            end_lsn: Lsn(0x18_0000_0040),
            prepare_time: 1,
            xid: 950,
            gid: "gid-950".into(),
        }));
        messages.extend(body_messages(None));
        messages.push(LogicalMessage::Prepare(prepare_body(950)));
        messages.push(LogicalMessage::CommitPrepared(CommitPreparedBody {
            flags: 0,
            commit_lsn: Lsn(0x19_0000_0000),
            end_lsn: Lsn(0x19_0000_0040),
            commit_time: 2,
            xid: 950,
            gid: "gid-950".into(),
        }));
        messages.push(LogicalMessage::RollbackPrepared(RollbackPreparedBody {
            flags: 0,
            prepare_end_lsn: Lsn(0x18_0000_0040),
            rollback_end_lsn: Lsn(0x1A_0000_0000),
            prepare_time: 1,
            rollback_time: 3,
            xid: 951,
            gid: String::new(),
        }));
        messages.push(LogicalMessage::StreamStart(StreamStartBody {
            xid: 960,
            first_segment: true,
        }));
        messages.extend(body_messages(Some(960)));
        messages.push(LogicalMessage::StreamStop);
        messages.push(LogicalMessage::StreamPrepare(prepare_body(960)));
    }
    if version >= 4 {
        messages.push(LogicalMessage::StreamAbort(StreamAbortBody {
            xid: 970,
            subxid: 970,
            abort_info: Some(StreamAbortInfo {
                abort_lsn: Lsn(0x1B_0000_0000),
                abort_time: 4,
            }),
        }));
    }
    messages
}

fn prepare_body(xid: u32) -> PrepareBody {
    PrepareBody {
        flags: 0,
        prepare_lsn: Lsn(0x18_0000_0000),
        end_lsn: Lsn(0x18_0000_0040),
        prepare_time: 1,
        xid,
        gid: format!("gid-{xid}"),
    }
}

/// One frame of a session, with the decoder state it must be decoded in.
pub struct SampleFrame {
    pub message: LogicalMessage,
    pub frame: Bytes,
    /// A decoder that has seen every frame before this one.
    pub decoder: Decoder,
}

/// The session for `version`, encoded, each frame paired with the decoder state before it.
pub fn frames(version: u32) -> Vec<SampleFrame> {
    let mut decoder = Decoder::new(version);
    session(version)
        .into_iter()
        .map(|message| {
            let mut buf = BytesMut::new();
            message
                .encode(version, &mut buf)
                .unwrap_or_else(|error| panic!("encoding {message:?} for v{version}: {error}"));
            let frame = buf.freeze();
            let before = decoder.clone();
            decoder
                .decode(frame.clone())
                .unwrap_or_else(|error| panic!("decoding {message:?} for v{version}: {error}"));
            SampleFrame {
                message,
                frame,
                decoder: before,
            }
        })
        .collect()
}
