//! Malformed frames: every one must come back as a typed [`DecodeError`], never a panic, and
//! must leave the decoder's stream state untouched.

use bytes::Bytes;

use super::samples::frames;
use crate::pgoutput::{DecodeError, Decoder, LogicalMessage, StreamAbortBody};

fn decode(version: u32, frame: &[u8]) -> Result<LogicalMessage, DecodeError> {
    Decoder::new(version).decode(Bytes::copy_from_slice(frame))
}

#[test]
fn every_truncation_of_every_valid_frame_is_an_error() {
    let mut checked = 0;
    for version in 1..=4 {
        for sample in frames(version) {
            for length in 0..sample.frame.len() {
                let mut decoder = sample.decoder.clone();
                let result = decoder.decode(sample.frame.slice(..length));
                // In protocol 4 a Stream Abort cut right before its optional abort LSN is the
                // valid short form.
                let is_short_abort = version >= 4
                    && length == 9
                    && matches!(sample.message, LogicalMessage::StreamAbort(_));
                if is_short_abort {
                    assert!(matches!(
                        result,
                        Ok(LogicalMessage::StreamAbort(StreamAbortBody {
                            abort_info: None,
                            ..
                        }))
                    ));
                } else {
                    assert!(
                        result.is_err(),
                        "v{version}: {length} of {} bytes of {:?} decoded as {result:?}",
                        sample.frame.len(),
                        sample.message
                    );
                    if length == 0 {
                        assert_eq!(result, Err(DecodeError::Empty));
                    }
                }
                assert_eq!(decoder.in_stream(), sample.decoder.in_stream());
                checked += 1;
            }
        }
    }
    assert!(checked > 5_000, "only {checked} truncations checked");
}

#[test]
fn trailing_bytes_after_a_valid_frame_are_an_error() {
    for version in 1..=4 {
        for sample in frames(version) {
            let mut frame = sample.frame.to_vec();
            frame.push(0);
            let mut decoder = sample.decoder.clone();
            let result = decoder.decode(Bytes::from(frame));
            // A short v4 Stream Abort with one more byte reads as a truncated long form.
            let expected_truncation = version >= 4
                && matches!(
                    sample.message,
                    LogicalMessage::StreamAbort(StreamAbortBody {
                        abort_info: None,
                        ..
                    })
                );
            if expected_truncation {
                assert!(matches!(result, Err(DecodeError::Truncated { .. })));
            } else {
                assert_eq!(
                    result,
                    Err(DecodeError::TrailingBytes {
                        consumed: sample.frame.len(),
                        trailing: 1
                    }),
                    "v{version}: {:?}",
                    sample.message
                );
            }
            assert_eq!(decoder.in_stream(), sample.decoder.in_stream());
        }
    }
}

#[test]
fn unknown_tags_are_an_error() {
    let known = b"BCORYIUDTMSEcAbPKrp";
    for tag in 0..=u8::MAX {
        if known.contains(&tag) {
            continue;
        }
        for version in 1..=4 {
            assert_eq!(
                decode(version, &[tag, 0, 0, 0, 0]),
                Err(DecodeError::UnknownTag { tag })
            );
        }
    }
}

#[test]
fn huge_and_negative_lengths_are_an_error() {
    // A text column claiming i32::MAX bytes.
    let huge_column = b"I\x00\x00\x00\x01N\x00\x01t\x7f\xff\xff\xffabc";
    assert!(matches!(
        decode(1, huge_column),
        Err(DecodeError::Truncated {
            offset: 13,
            needed: 0x7fff_ffff,
            available: 3
        })
    ));
    // A text column claiming -1 bytes (Postgres sends NULL as 'n', never as length -1).
    let negative_column = b"I\x00\x00\x00\x01N\x00\x01t\xff\xff\xff\xff";
    assert_eq!(
        decode(1, negative_column),
        Err(DecodeError::NegativeLength {
            offset: 9,
            length: -1
        })
    );
    // 65535 columns announced, one present.
    let many_columns = b"I\x00\x00\x00\x01N\xff\xffn";
    assert!(matches!(
        decode(1, many_columns),
        Err(DecodeError::Truncated { .. })
    ));
    // A Truncate of i32::MAX relations, and one of a negative number of them.
    assert!(matches!(
        decode(1, b"T\x7f\xff\xff\xff\x00\x00\x00\x00\x01"),
        Err(DecodeError::Truncated { .. })
    ));
    assert!(matches!(
        decode(1, b"T\x80\x00\x00\x00\x00"),
        Err(DecodeError::NegativeLength { .. })
    ));
    // A Relation announcing 65535 columns.
    assert!(matches!(
        decode(1, b"R\x00\x00\x00\x01public\0t\0d\xff\xff\x01id\0"),
        Err(DecodeError::Truncated { .. })
    ));
    // A Message whose content claims 2 GiB.
    assert!(matches!(
        decode(
            1,
            b"M\x01\x00\x00\x00\x00\x00\x00\x00\x01p\0\x7f\xff\xff\xffxyz"
        ),
        Err(DecodeError::Truncated { .. })
    ));
}

#[test]
fn bad_strings_are_an_error() {
    assert!(matches!(
        decode(1, b"O\x00\x00\x00\x00\x00\x00\x00\x01\xff\xfe\0"),
        Err(DecodeError::InvalidUtf8 { offset: 9, .. })
    ));
    assert_eq!(
        decode(1, b"O\x00\x00\x00\x00\x00\x00\x00\x01no-nul"),
        Err(DecodeError::UnterminatedString { offset: 9 })
    );
    assert!(matches!(
        decode(1, b"R\x00\x00\x00\x01public\0\xc3\x28\0d\x00\x00"),
        Err(DecodeError::InvalidUtf8 { offset: 12, .. })
    ));
}

#[test]
fn bad_tuple_markers_and_column_kinds_are_an_error() {
    assert_eq!(
        decode(1, b"I\x00\x00\x00\x01K\x00\x00"),
        Err(DecodeError::UnexpectedTupleMarker {
            offset: 5,
            expected: "N",
            found: b'K'
        })
    );
    // An Update must end with a new tuple, after at most one K or O tuple.
    assert!(matches!(
        decode(1, b"U\x00\x00\x00\x01K\x00\x00K\x00\x00"),
        Err(DecodeError::UnexpectedTupleMarker { offset: 8, .. })
    ));
    assert!(matches!(
        decode(1, b"D\x00\x00\x00\x01N\x00\x00"),
        Err(DecodeError::UnexpectedTupleMarker { offset: 5, .. })
    ));
    assert_eq!(
        decode(1, b"I\x00\x00\x00\x01N\x00\x02nx"),
        Err(DecodeError::UnknownColumnKind {
            offset: 9,
            kind: b'x'
        })
    );
}

#[test]
fn stream_blocks_must_pair_up() {
    let mut decoder = Decoder::new(2);
    assert!(matches!(
        decoder.decode(Bytes::from_static(b"E")),
        Err(DecodeError::StreamState {
            in_stream: false,
            ..
        })
    ));
    decoder
        .decode(Bytes::from_static(b"S\x00\x00\x00\x01\x01"))
        .expect("stream start");
    assert!(matches!(
        decoder.decode(Bytes::from_static(b"S\x00\x00\x00\x01\x00")),
        Err(DecodeError::StreamState {
            in_stream: true,
            ..
        })
    ));
    assert!(decoder.in_stream(), "a rejected frame changes no state");
}
