//! A deterministic, dependency-free stand-in for fuzzing that runs with every `cargo test`:
//! thousands of mutated and random frames go through the decoder, which must return, not
//! panic. Whatever decodes must also survive an encode/decode round trip unchanged, so a
//! frame is never accepted into a message the encoder cannot reproduce.

use bytes::{Bytes, BytesMut};

use super::samples::{SampleFrame, frames};
use crate::pgoutput::{Decoder, LogicalMessage};

/// xorshift64*: a tiny PRNG so the run is the same on every machine and needs no crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, bound: usize) -> usize {
        // Modulo bias is irrelevant for test input generation.
        (self.next() % bound.max(1) as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }
}

/// Bytes that are likely to hit edge cases when written over a length or count field.
const INTERESTING: [&[u8]; 6] = [
    &[0xFF, 0xFF, 0xFF, 0xFF],
    &[0x7F, 0xFF, 0xFF, 0xFF],
    &[0x80, 0x00, 0x00, 0x00],
    &[0xFF, 0xFF],
    &[0x00, 0x00],
    &[0x00],
];

fn mutate(rng: &mut Rng, frame: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(frame.len() + 1);
        match rng.below(7) {
            0 if at < frame.len() => frame[at] ^= 1 << rng.below(8),
            1 if at < frame.len() => frame[at] = rng.byte(),
            2 => frame.insert(at, rng.byte()),
            3 if at < frame.len() => {
                frame.remove(at);
            }
            4 => frame.truncate(at),
            5 => {
                let pattern = INTERESTING[rng.below(INTERESTING.len())];
                for (offset, &byte) in pattern.iter().enumerate() {
                    if let Some(slot) = frame.get_mut(at + offset) {
                        *slot = byte;
                    }
                }
            }
            _ => {
                let from = rng.below(other.len() + 1);
                frame.truncate(at);
                frame.extend_from_slice(other.get(from..).unwrap_or_default());
            }
        }
    }
}

/// Decodes `frame` with `decoder` and, if it decodes, checks the round trip.
fn check(decoder: &mut Decoder, frame: Vec<u8>) -> bool {
    let Ok(message) = decoder.decode(Bytes::from(frame)) else {
        return false;
    };
    let mut buf = BytesMut::new();
    message
        .encode(decoder.protocol_version(), &mut buf)
        .unwrap_or_else(|error| panic!("decoded {message:?} cannot be re-encoded: {error}"));
    // Stream Start/Stop moved the decoder on; re-decode in the state the frame was read in.
    let mut replay = Decoder::new(decoder.protocol_version());
    let was_in_stream = match message {
        LogicalMessage::StreamStart(_) => false,
        LogicalMessage::StreamStop => true,
        _ => decoder.in_stream(),
    };
    if was_in_stream {
        replay
            .decode(Bytes::from_static(b"S\x00\x00\x00\x01\x01"))
            .expect("stream start");
    }
    assert_eq!(replay.decode(buf.freeze()), Ok(message));
    true
}

#[test]
fn mutated_frames_never_panic_and_decoded_ones_round_trip() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let samples: Vec<SampleFrame> = (1..=4).flat_map(frames).collect();
    let (mut runs, mut accepted) = (0, 0);
    for round in 0..60 {
        for (index, sample) in samples.iter().enumerate() {
            let other = &samples[(index + round + 1) % samples.len()].frame;
            let mut frame = sample.frame.to_vec();
            mutate(&mut rng, &mut frame, other);
            let mut decoder = sample.decoder.clone();
            accepted += usize::from(check(&mut decoder, frame));
            runs += 1;
        }
    }
    assert!(runs > 10_000, "only {runs} mutated frames");
    // Some mutations (a flipped data byte) leave a valid frame; if none did, the mutator
    // would be broken.
    assert!(accepted > runs / 20, "{accepted} of {runs} accepted");
}

#[test]
fn random_frames_never_panic() {
    let mut rng = Rng(42);
    let tags = b"BCORYIUDTMSEcAbPKrpNKOntub\0";
    for _ in 0..20_000 {
        let mut frame = vec![tags[rng.below(tags.len())]];
        let length = rng.below(48);
        frame.extend((0..length).map(|_| {
            // Mostly small values and tag letters, so counts and markers are often plausible.
            match rng.below(4) {
                0 => tags[rng.below(tags.len())],
                1 => 0,
                _ => rng.byte(),
            }
        }));
        let version = 1 + rng.below(4) as u32;
        let mut decoder = Decoder::new(version);
        if version >= 2 && rng.below(2) == 0 {
            decoder
                .decode(Bytes::from_static(b"S\x00\x00\x00\x01\x01"))
                .expect("stream start");
        }
        check(&mut decoder, frame);
    }
}
