//! Throughput of the `pgoutput` decoder on a realistic mix of frames: transactions of Inserts
//! (4 text columns, ~100 bytes of data), Updates with the old and new row (replica identity
//! full), Deletes by key, framed by Begin and Commit. The goal is at least one million DML
//! messages per second on one core.
//!
//! `cargo bench -p pgstream-host --bench decoder` prints criterion's figures, then a plain
//! messages-per-second line measured by a simple timed loop.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput};
use pgstream_host::lsn::Lsn;
use pgstream_host::pgoutput::{
    BeginBody, CommitBody, Decoder, DeleteBody, InsertBody, LogicalMessage, TupleData, TupleValue,
    UpdateBody,
};

const PROTOCOL_VERSION: u32 = 2;

fn text(value: &str) -> TupleValue {
    TupleValue::Text(Bytes::copy_from_slice(value.as_bytes()))
}

/// A row of a `documents(id bigint, title text, body text, updated_at timestamptz)` table.
fn document(id: u64) -> TupleData {
    TupleData::new(vec![
        text(&id.to_string()),
        text("Quarterly report on vector search"),
        text("Embeddings are computed per paragraph and upserted."),
        text("2026-11-24 07:48:26.123456+00"),
    ])
}

fn insert(id: u64) -> LogicalMessage {
    LogicalMessage::Insert(InsertBody {
        xid: None,
        rel_id: 16_384,
        new: document(id),
    })
}

fn update(id: u64) -> LogicalMessage {
    LogicalMessage::Update(UpdateBody {
        xid: None,
        rel_id: 16_384,
        key: None,
        old: Some(document(id)),
        new: document(id),
    })
}

fn delete(id: u64) -> LogicalMessage {
    LogicalMessage::Delete(DeleteBody {
        xid: None,
        rel_id: 16_384,
        key: Some(TupleData::new(vec![text(&id.to_string())])),
        old: None,
    })
}

/// Encodes `messages` into one buffer and slices each frame out of it, the way the replication
/// stream hands frames over: as `Bytes` sharing one allocation.
fn frames(messages: &[LogicalMessage]) -> Vec<Bytes> {
    let mut buf = BytesMut::new();
    let mut ends = Vec::new();
    for message in messages {
        message
            .encode(PROTOCOL_VERSION, &mut buf)
            .expect("benchmark messages are encodable");
        ends.push(buf.len());
    }
    let buf = buf.freeze();
    let mut start = 0;
    ends.into_iter()
        .map(|end| {
            let frame = buf.slice(start..end);
            start = end;
            frame
        })
        .collect()
}

/// Begin, 6 Inserts, 2 Updates, 2 Deletes, Commit: 12 messages, 10 of them DML.
fn transaction() -> (Vec<Bytes>, u64) {
    let mut messages = vec![LogicalMessage::Begin(BeginBody {
        final_lsn: Lsn(0x16_B374_D848),
        commit_time: 785_000_000_000_000,
        xid: 731,
    })];
    messages.extend((1..=6).map(insert));
    messages.extend((1..=2).map(update));
    messages.extend((3..=4).map(delete));
    messages.push(LogicalMessage::Commit(CommitBody {
        flags: 0,
        commit_lsn: Lsn(0x16_B374_D848),
        end_lsn: Lsn(0x16_B374_D878),
        commit_time: 785_000_000_000_000,
    }));
    (frames(&messages), 10)
}

fn decode_all(decoder: &mut Decoder, frames: &[Bytes]) {
    for frame in frames {
        black_box(
            decoder
                .decode(black_box(frame.clone()))
                .expect("valid frame"),
        );
    }
}

fn bench_decoder(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("pgoutput_decode");
    let cases = [
        ("transaction_mix", transaction().0),
        ("insert_4_text_columns", frames(&[insert(1)])),
        ("update_old_and_new", frames(&[update(1)])),
        ("delete_by_key", frames(&[delete(1)])),
    ];
    for (name, frames) in cases {
        group.throughput(Throughput::Elements(frames.len() as u64));
        let mut decoder = Decoder::new(PROTOCOL_VERSION);
        group.bench_function(name, |bencher| {
            bencher.iter(|| decode_all(&mut decoder, &frames))
        });
    }
    group.finish();
}

/// A plain timed loop over the transaction mix, so the headline figure does not depend on
/// reading criterion's output.
fn print_messages_per_second() {
    let (frames, dml_per_transaction) = transaction();
    let mut decoder = Decoder::new(PROTOCOL_VERSION);
    let deadline = Duration::from_secs(2);
    let started = Instant::now();
    let mut transactions = 0_u64;
    while started.elapsed() < deadline {
        for _ in 0..1_000 {
            decode_all(&mut decoder, &frames);
        }
        transactions += 1_000;
    }
    let seconds = started.elapsed().as_secs_f64();
    let messages = transactions * frames.len() as u64;
    let frame_bytes: usize = frames.iter().map(Bytes::len).sum();
    println!(
        "pgoutput decoder, one core: {:.2} M messages/s, {:.2} M DML messages/s, {:.0} MB/s \
         ({} frames of {} bytes per transaction)",
        messages as f64 / seconds / 1e6,
        (transactions * dml_per_transaction) as f64 / seconds / 1e6,
        (transactions as f64 * frame_bytes as f64) / seconds / 1e6,
        frames.len(),
        frame_bytes,
    );
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    bench_decoder(&mut criterion);
    criterion.final_summary();
    // `cargo test --benches` runs bench binaries without `--bench` to smoke-test them; the timed
    // loop is only for real benchmark runs.
    if std::env::args().any(|arg| arg == "--bench") {
        print_messages_per_second();
    }
}
