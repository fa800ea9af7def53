//! Arbitrary bytes, in arbitrary chunks, into the frame parser: it must never panic, never
//! report more consumed than it was given, and report errors inside the chunk.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../src/websocket/frame.rs"]
#[allow(dead_code)]
mod frame;

use frame::{Feed, FrameParser, Sender};

fuzz_target!(|data: &[u8]| {
    let Some((&control, mut rest)) = data.split_first() else { return };
    let sender = if control & 1 == 0 { Sender::Client } else { Sender::Server };
    let mut parser = FrameParser::new(sender, control & 2 != 0);
    // The control byte's upper bits pick the chunk size, so splits vary with the input.
    let chunk = usize::from(control >> 2).max(1);
    while !rest.is_empty() {
        let take = chunk.min(rest.len());
        let (piece, tail) = rest.split_at(take);
        let stop = control & 0x80 != 0;
        let (consumed, result) = parser.feed_to_boundary(piece, stop, |_| {});
        assert!(consumed <= piece.len());
        if let Feed::Error { offset, .. } = result {
            assert!(offset <= piece.len());
            break;
        }
        rest = if consumed < piece.len() { &piece[consumed..] } else { tail };
        if consumed == 0 && rest.len() == piece.len() && take == piece.len() {
            rest = tail;
        }
    }
});
