//! Encode/decode round trips of every message in every protocol version, plus frames written
//! out by hand from the protocol documentation so that encoder and decoder cannot agree on a
//! wrong layout.

use std::collections::HashSet;
use std::mem::discriminant;

use bytes::{Bytes, BytesMut};

use super::samples::{frames, row, session};
use crate::lsn::Lsn;
use crate::pgoutput::{
    BeginBody, DecodeError, Decoder, DeleteBody, EncodeError, InsertBody, LogicalMessage,
    MessageBody, StreamAbortBody, StreamAbortInfo, StreamStartBody, TupleData, TupleValue,
    UpdateBody, pg_micros_to_unix_micros,
};

fn encode(message: &LogicalMessage, version: u32) -> Bytes {
    let mut buf = BytesMut::new();
    message.encode(version, &mut buf).expect("encodable");
    buf.freeze()
}

#[test]
fn every_message_round_trips_in_every_version() {
    for version in 1..=4 {
        let mut decoder = Decoder::new(version);
        for message in session(version) {
            let decoded = decoder.decode(encode(&message, version));
            assert_eq!(decoded.as_ref(), Ok(&message), "v{version}");
        }
        assert!(
            !decoder.in_stream(),
            "v{version} session ends outside a stream"
        );
    }
}

#[test]
fn sessions_cover_every_message_type() {
    let kinds = |version| {
        session(version)
            .iter()
            .map(discriminant)
            .collect::<HashSet<_>>()
            .len()
    };
    // 10 kinds exist in version 1, streaming adds 4, two-phase commit adds 5.
    assert_eq!(kinds(1), 10);
    assert_eq!(kinds(2), 14);
    assert_eq!(kinds(3), 19);
    assert_eq!(kinds(4), 19);
}

#[test]
fn decodes_documented_layouts_byte_for_byte() {
    let mut begin = vec![b'B'];
    begin.extend_from_slice(&0x0000_0016_B374_D848_u64.to_be_bytes());
    begin.extend_from_slice(&1_000_000_i64.to_be_bytes());
    begin.extend_from_slice(&731_u32.to_be_bytes());
    let mut decoder = Decoder::new(1);
    assert_eq!(
        decoder.decode(Bytes::from(begin.clone())),
        Ok(LogicalMessage::Begin(BeginBody {
            final_lsn: Lsn(0x16_B374_D848),
            commit_time: 1_000_000,
            xid: 731,
        }))
    );

    // Insert into relation 16384: 'N', 3 columns: text "42", null, unchanged TOAST.
    let insert: &[u8] = b"I\x00\x00\x40\x00N\x00\x03t\x00\x00\x00\x0242nu";
    let expected = LogicalMessage::Insert(InsertBody {
        xid: None,
        rel_id: 16_384,
        new: TupleData::new(vec![
            TupleValue::Text(Bytes::from_static(b"42")),
            TupleValue::Null,
            TupleValue::UnchangedToast,
        ]),
    });
    assert_eq!(
        decoder.decode(Bytes::from_static(insert)).as_ref(),
        Ok(&expected)
    );
    assert_eq!(encode(&expected, 1), insert);
    assert_eq!(encode(&LogicalMessage::Begin(body_of_begin()), 1), begin);

    // Delete by key in a stream block of protocol 2: 'D', xid 9, relation 16384, 'K', 1 column.
    let mut decoder = Decoder::new(2);
    decoder
        .decode(Bytes::from_static(b"S\x00\x00\x00\x09\x01"))
        .expect("stream start");
    let delete: &[u8] = b"D\x00\x00\x00\x09\x00\x00\x40\x00K\x00\x01b\x00\x00\x00\x01\xff";
    assert_eq!(
        decoder.decode(Bytes::from_static(delete)),
        Ok(LogicalMessage::Delete(DeleteBody {
            xid: Some(9),
            rel_id: 16_384,
            key: Some(TupleData::new(vec![TupleValue::Binary(
                Bytes::from_static(b"\xff")
            )])),
            old: None,
        }))
    );
    assert_eq!(
        decoder.decode(Bytes::from_static(b"E")),
        Ok(LogicalMessage::StreamStop)
    );
    assert!(!decoder.in_stream());
}

fn body_of_begin() -> BeginBody {
    BeginBody {
        final_lsn: Lsn(0x16_B374_D848),
        commit_time: 1_000_000,
        xid: 731,
    }
}

#[test]
fn in_stream_messages_carry_a_leading_xid_only_inside_a_stream_block() {
    let outside = LogicalMessage::Insert(InsertBody {
        xid: None,
        rel_id: 16_384,
        new: row(1),
    });
    let inside = LogicalMessage::Insert(InsertBody {
        xid: Some(900),
        rel_id: 16_384,
        new: row(1),
    });
    assert_eq!(encode(&inside, 2).len(), encode(&outside, 1).len() + 4);
    assert!(matches!(
        inside.encode(1, &mut BytesMut::new()),
        Err(EncodeError::UnsupportedByVersion { required: 2, .. })
    ));

    let mut decoder = Decoder::new(2);
    // Outside a stream block the xid would be misread as the relation id.
    assert!(decoder.decode(encode(&inside, 2)).is_err());
    decoder
        .decode(encode(
            &LogicalMessage::StreamStart(StreamStartBody {
                xid: 900,
                first_segment: true,
            }),
            2,
        ))
        .expect("stream start");
    assert!(decoder.in_stream());
    assert_eq!(decoder.decode(encode(&inside, 2)), Ok(inside));
    assert!(decoder.decode(encode(&outside, 2)).is_err());
    decoder
        .decode(encode(&LogicalMessage::StreamStop, 2))
        .expect("stream stop");
    assert_eq!(decoder.decode(encode(&outside, 2)), Ok(outside));
}

#[test]
fn stream_abort_carries_lsn_and_time_only_in_version_4() {
    let plain = LogicalMessage::StreamAbort(StreamAbortBody {
        xid: 5,
        subxid: 6,
        abort_info: None,
    });
    let parallel = LogicalMessage::StreamAbort(StreamAbortBody {
        xid: 5,
        subxid: 6,
        abort_info: Some(StreamAbortInfo {
            abort_lsn: Lsn(77),
            abort_time: 88,
        }),
    });
    assert_eq!(encode(&plain, 4).len(), 9);
    assert_eq!(encode(&parallel, 4).len(), 25);
    let mut decoder = Decoder::new(4);
    assert_eq!(decoder.decode(encode(&plain, 4)), Ok(plain.clone()));
    assert_eq!(decoder.decode(encode(&parallel, 4)), Ok(parallel.clone()));
    for version in [2, 3] {
        assert!(parallel.encode(version, &mut BytesMut::new()).is_err());
        // Before version 4 the extra 16 bytes cannot be abort info.
        assert!(matches!(
            Decoder::new(version).decode(encode(&parallel, 4)),
            Err(DecodeError::TrailingBytes { trailing: 16, .. })
        ));
        assert_eq!(
            Decoder::new(version).decode(encode(&plain, 4)),
            Ok(plain.clone())
        );
    }
}

#[test]
fn column_values_are_slices_of_the_frame() {
    let frame = encode(
        &LogicalMessage::Insert(InsertBody {
            xid: None,
            rel_id: 1,
            new: row(9),
        }),
        1,
    );
    let frame_range = frame.as_ptr_range();
    let Ok(LogicalMessage::Insert(insert)) = Decoder::new(1).decode(frame.clone()) else {
        panic!("not an insert");
    };
    let mut checked = 0;
    for value in insert.new.values() {
        if let TupleValue::Text(data) | TupleValue::Binary(data) = value
            && !data.is_empty()
        {
            assert!(frame_range.contains(&data.as_ptr()), "{value:?} was copied");
            checked += 1;
        }
    }
    assert_eq!(checked, 2);
}

#[test]
fn encoder_refuses_what_the_wire_cannot_express() {
    let mut buf = BytesMut::from(&b"keep"[..]);
    let both = LogicalMessage::Update(UpdateBody {
        xid: None,
        rel_id: 1,
        key: Some(row(1)),
        old: Some(row(2)),
        new: row(3),
    });
    let neither = LogicalMessage::Delete(DeleteBody {
        xid: None,
        rel_id: 1,
        key: None,
        old: None,
    });
    let nul = LogicalMessage::Message(MessageBody {
        xid: None,
        transactional: false,
        lsn: Lsn::ZERO,
        prefix: "a\0b".into(),
        content: Bytes::new(),
    });
    let wide = LogicalMessage::Insert(InsertBody {
        xid: None,
        rel_id: 1,
        new: TupleData::new(vec![TupleValue::Null; 70_000]),
    });
    assert!(matches!(
        both.encode(1, &mut buf),
        Err(EncodeError::InvalidTuples(_))
    ));
    assert!(matches!(
        neither.encode(1, &mut buf),
        Err(EncodeError::InvalidTuples(_))
    ));
    assert!(matches!(
        nul.encode(1, &mut buf),
        Err(EncodeError::NulInString(_))
    ));
    assert!(matches!(
        wide.encode(1, &mut buf),
        Err(EncodeError::TooManyColumns { count: 70_000 })
    ));
    assert!(matches!(
        LogicalMessage::StreamStop.encode(1, &mut buf),
        Err(EncodeError::UnsupportedByVersion { required: 2, .. })
    ));
    assert!(matches!(
        LogicalMessage::StreamStop.encode(5, &mut buf),
        Err(EncodeError::UnsupportedVersion(5))
    ));
    assert_eq!(
        &buf[..],
        b"keep",
        "a failed encode leaves the buffer as it was"
    );
}

#[test]
fn newer_messages_are_rejected_by_older_versions() {
    let mut rejected = 0;
    for sample in frames(4) {
        let required = match sample.frame.first() {
            Some(b'b' | b'P' | b'K' | b'r' | b'p') => 3,
            Some(b'S' | b'E' | b'c' | b'A') => 2,
            _ => continue,
        };
        let older = required - 1;
        assert!(
            matches!(
                Decoder::new(older).decode(sample.frame.clone()),
                Err(DecodeError::UnsupportedByVersion { .. })
            ),
            "{:?} accepted by v{older}",
            sample.message
        );
        rejected += 1;
    }
    assert!(rejected >= 9);
}

#[test]
fn converts_postgres_epoch_to_unix_epoch() {
    assert_eq!(pg_micros_to_unix_micros(0), 946_684_800_000_000);
    assert_eq!(pg_micros_to_unix_micros(-946_684_800_000_000), 0);
    assert_eq!(pg_micros_to_unix_micros(i64::MAX), i64::MAX);
}

#[test]
fn decoder_rejects_unknown_versions() {
    assert!(Decoder::try_new(0).is_err());
    assert!(Decoder::try_new(5).is_err());
    assert_eq!(Decoder::try_new(4).map(|d| d.protocol_version()), Ok(4));
}
