//! A streaming RFC 6455 frame parser for one direction of an upgraded connection.
//!
//! It reads the bytes the pump forwards, in whatever pieces they arrive, and reports frame
//! boundaries, finished messages, Close frames and protocol errors. It keeps only frame
//! headers and Close payloads (at most 125 bytes): data payloads are skipped, never copied,
//! so its cost does not grow with message size. On request it also holds Pong frames back
//! whole until their payload is known, so that the pump can consume the answers to its own
//! heartbeat Pings.

/// Who sends the frames this parser reads: clients must mask, servers must not (RFC 6455 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    Client,
    Server,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    ReservedOpcode,
    UnmaskedClientFrame,
    MaskedServerFrame,
    ReservedBits,
    ControlFrameTooLong,
    FragmentedControlFrame,
    UnexpectedContinuation,
    InterruptedMessage,
    OneByteClosePayload,
    InvalidCloseCode,
    LengthOverflow,
    /// A data message larger than the configured cap (closed with 1009, not 1002).
    MessageTooBig,
}

impl ProtocolError {
    /// Metric label and log word.
    pub fn kind(self) -> &'static str {
        match self {
            ProtocolError::ReservedOpcode => "reserved_opcode",
            ProtocolError::UnmaskedClientFrame => "unmasked_client_frame",
            ProtocolError::MaskedServerFrame => "masked_server_frame",
            ProtocolError::ReservedBits => "reserved_bits",
            ProtocolError::ControlFrameTooLong => "control_frame_too_long",
            ProtocolError::FragmentedControlFrame => "fragmented_control_frame",
            ProtocolError::UnexpectedContinuation => "unexpected_continuation",
            ProtocolError::InterruptedMessage => "interrupted_message",
            ProtocolError::OneByteClosePayload => "one_byte_close_payload",
            ProtocolError::InvalidCloseCode => "invalid_close_code",
            ProtocolError::LengthOverflow => "length_overflow",
            ProtocolError::MessageTooBig => "message_too_big",
        }
    }

    /// The Close code the gateway sends both ways for this error.
    pub fn close_code(self) -> u16 {
        match self {
            ProtocolError::MessageTooBig => 1009,
            _ => 1002,
        }
    }

    pub const ALL: [ProtocolError; 12] = [
        ProtocolError::ReservedOpcode,
        ProtocolError::UnmaskedClientFrame,
        ProtocolError::MaskedServerFrame,
        ProtocolError::ReservedBits,
        ProtocolError::ControlFrameTooLong,
        ProtocolError::FragmentedControlFrame,
        ProtocolError::UnexpectedContinuation,
        ProtocolError::InterruptedMessage,
        ProtocolError::OneByteClosePayload,
        ProtocolError::InvalidCloseCode,
        ProtocolError::LengthOverflow,
        ProtocolError::MessageTooBig,
    ];
}

/// A Close frame as seen on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseFrame {
    /// `None` for an empty Close payload (reported to applications as 1005).
    pub code: Option<u16>,
    /// Length of the reason in bytes; the text itself may carry user data and is not kept.
    pub reason_len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameEvent {
    /// A whole frame went by (its header and all of its payload).
    Frame {
        opcode: u8,
        fin: bool,
        len: u64,
    },
    /// The last frame of a data message went by.
    MessageEnd,
    Close(CloseFrame),
}

/// What [`FrameParser::feed`] found in one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// Every byte belongs to well-formed frames (the last may be unfinished).
    Ok,
    /// The frame starting at `offset` is malformed: bytes before it are safe to forward,
    /// the rest are not. `offset` is 0 also when the frame began in an earlier chunk.
    Error { offset: usize, error: ProtocolError },
}

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;
/// The longest control frame: a 14-byte header and 125 bytes of payload.
pub const MAX_CONTROL_FRAME: usize = 14 + 125;

#[derive(Debug)]
pub struct FrameParser {
    sender: Sender,
    /// permessage-deflate was negotiated: RSV1 marks a compressed message.
    deflate: bool,
    /// Largest data message allowed (payload bytes over all its frames), if capped.
    max_message: Option<u64>,
    /// Payload bytes of the data message in progress.
    message_len: u64,
    header: [u8; 14],
    header_len: usize,
    /// Payload bytes of the current frame still to come; `None` while reading a header.
    remaining: Option<u64>,
    current: CurrentFrame,
    in_message: bool,
    /// The unmasked payload of the Close or held Pong frame being read.
    control_payload: [u8; 125],
    control_len: usize,
    failed: bool,
    bad_frame_began_in_chunk: bool,
    /// Stop before every Pong frame and hold it back (see [`Self::hold_pongs`]).
    hold_pongs: bool,
    /// The frame being read is a Pong held back.
    holding: bool,
    /// Stop before every data message (see [`Self::gate_messages`]).
    gate_messages: bool,
    /// Stopped before a data message, until [`Self::open_gate`].
    at_gate: bool,
    /// The data message at the gate may go on.
    gate_open: bool,
    /// `hold_pongs || gate_messages`: whether a frame's first byte is looked at, one check
    /// per frame when neither is on.
    first_byte_stops: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct CurrentFrame {
    opcode: u8,
    fin: bool,
    len: u64,
    mask: Option<[u8; 4]>,
}

impl FrameParser {
    pub fn new(sender: Sender, deflate: bool) -> Self {
        FrameParser {
            sender,
            deflate,
            max_message: None,
            message_len: 0,
            header: [0; 14],
            header_len: 0,
            remaining: None,
            current: CurrentFrame::default(),
            in_message: false,
            control_payload: [0; 125],
            control_len: 0,
            failed: false,
            bad_frame_began_in_chunk: false,
            hold_pongs: false,
            holding: false,
            gate_messages: false,
            at_gate: false,
            gate_open: false,
            first_byte_stops: false,
        }
    }

    /// From now on, stop before the first byte of every Pong frame: the caller forwards
    /// nothing of it until the frame is whole, then reads its payload with
    /// [`Self::pong_payload`] and either drops it or forwards [`Self::held_pong_frame`].
    pub fn hold_pongs(&mut self) {
        self.hold_pongs = true;
        self.first_byte_stops = true;
    }

    /// From now on, stop before the first byte of every frame that begins a data message
    /// (text or binary), so that the caller can charge it to a rate limit first; nothing of
    /// it is consumed until [`Self::open_gate`].
    pub fn gate_messages(&mut self) {
        self.gate_messages = true;
        self.first_byte_stops = true;
    }

    /// Whether the parser stopped before a data message (see [`Self::gate_messages`]).
    pub fn at_message_gate(&self) -> bool {
        self.at_gate
    }

    /// Lets the data message at the gate go on.
    pub fn open_gate(&mut self) {
        self.at_gate = false;
        self.gate_open = true;
    }

    /// Whether to stop before the frame whose first byte is `first`: a Pong to hold back, or
    /// a data message the caller has not let through yet.
    fn stops_before(&mut self, first: u8) -> bool {
        let opcode = first & 0x0f;
        if self.hold_pongs && !self.holding && opcode == OP_PONG {
            // It may answer a Ping of the gateway's own: nothing of it goes on before its
            // payload is known.
            self.holding = true;
            return true;
        }
        if self.gate_messages && !self.in_message && (opcode == OP_TEXT || opcode == OP_BINARY) {
            if !self.gate_open {
                self.at_gate = true;
                return true;
            }
            self.gate_open = false;
        }
        false
    }

    /// Whether a Pong frame is being held back: fed bytes belong to it until it ends, and the
    /// bytes forwarded so far end between two frames.
    pub fn holding_pong(&self) -> bool {
        self.holding && !self.failed
    }

    /// The unmasked payload of the Pong held back last, once it has ended.
    pub fn pong_payload(&self) -> &[u8] {
        &self.control_payload[..self.control_len.min(125)]
    }

    /// The held Pong's frame as it came on the wire (header, then the payload masked again
    /// with its own key), written to `out`; returns its length.
    pub fn held_pong_frame(&self, out: &mut [u8; MAX_CONTROL_FRAME]) -> usize {
        let header = self.frame_header_size();
        out[..header].copy_from_slice(&self.header[..header]);
        let payload = self.pong_payload();
        for (i, (slot, b)) in out[header..].iter_mut().zip(payload).enumerate() {
            *slot = self.current.mask.map_or(*b, |key| b ^ key[i % 4]);
        }
        header + payload.len()
    }

    /// Caps data messages at `max` payload bytes (compressed size under permessage-deflate).
    pub fn with_max_message(mut self, max: Option<u64>) -> Self {
        self.max_message = max;
        self
    }

    /// Whether the bytes fed so far end exactly between two frames, where a frame of the
    /// gateway's own may be inserted.
    pub fn at_frame_boundary(&self) -> bool {
        !self.failed && self.remaining.is_none() && self.header_len == 0
    }

    /// After an error: whether the malformed frame began in the chunk that revealed it, so
    /// that forwarding stops exactly between two frames and a Close may still follow.
    pub fn failed_frame_began_in_last_chunk(&self) -> bool {
        self.failed && self.bad_frame_began_in_chunk
    }

    /// Parses `data`, reporting events to `on_event` in stream order. After an error the
    /// parser stays failed: the connection is to be closed.
    pub fn feed(&mut self, data: &[u8], on_event: impl FnMut(FrameEvent)) -> Feed {
        self.feed_to_boundary(data, false, on_event).1
    }

    /// Like [`Self::feed`], but stops after a Close frame (nothing may follow one) and, with
    /// `stop_at_boundary`, after the first frame that ends within `data`, so that a frame of the
    /// gateway's own can follow it. While Pongs are held, it also stops before a Pong frame
    /// and after it; while messages are gated, before a data message until the gate opens.
    /// Returns how many bytes were consumed.
    pub fn feed_to_boundary(
        &mut self,
        data: &[u8],
        stop_at_boundary: bool,
        mut on_event: impl FnMut(FrameEvent),
    ) -> (usize, Feed) {
        if self.failed {
            let error = ProtocolError::InterruptedMessage;
            return (0, Feed::Error { offset: 0, error });
        }
        let mut pos = 0;
        while pos < data.len() {
            match self.remaining {
                None => {
                    if self.header_len == 0 && self.first_byte_stops && self.stops_before(data[pos])
                    {
                        return (pos, Feed::Ok);
                    }
                    let frame_start = pos.saturating_sub(self.header_len);
                    let need = self.header_need();
                    let take = (need - self.header_len).min(data.len() - pos);
                    self.header[self.header_len..self.header_len + take]
                        .copy_from_slice(&data[pos..pos + take]);
                    self.header_len += take;
                    pos += take;
                    // The length of the header grows as its first bytes arrive.
                    if self.header_len < self.header_need() {
                        continue;
                    }
                    let began_here = pos >= self.header_len;
                    if let Err(error) = self.start_frame() {
                        self.fail(began_here);
                        return (
                            pos,
                            Feed::Error {
                                offset: frame_start,
                                error,
                            },
                        );
                    }
                    if self.current.len == 0 {
                        if let Err(error) = self.end_frame(&mut on_event) {
                            self.fail(began_here);
                            return (
                                pos,
                                Feed::Error {
                                    offset: frame_start,
                                    error,
                                },
                            );
                        }
                        if stop_at_boundary || self.current.opcode == OP_CLOSE || self.holding {
                            self.holding = false;
                            return (pos, Feed::Ok);
                        }
                    }
                }
                Some(remaining) => {
                    let available = (data.len() - pos) as u64;
                    let take = remaining.min(available) as usize;
                    if self.current.opcode == OP_CLOSE || self.holding {
                        self.capture_control(&data[pos..pos + take]);
                    }
                    pos += take;
                    let left = remaining - take as u64;
                    self.remaining = Some(left);
                    if left == 0 {
                        if let Err(error) = self.end_frame(&mut on_event) {
                            // The Close frame is the bad one; it started before this chunk
                            // or within it, and either way nothing after it is forwarded.
                            let frame_len = self.current.len as usize + self.frame_header_size();
                            self.fail(pos >= frame_len);
                            let offset = pos.saturating_sub(frame_len);
                            return (pos, Feed::Error { offset, error });
                        }
                        if stop_at_boundary || self.current.opcode == OP_CLOSE || self.holding {
                            self.holding = false;
                            return (pos, Feed::Ok);
                        }
                    }
                }
            }
        }
        (pos, Feed::Ok)
    }

    fn fail(&mut self, began_in_chunk: bool) {
        self.failed = true;
        // Nothing of a held frame was forwarded: forwarding stopped where it began.
        self.bad_frame_began_in_chunk = began_in_chunk || self.holding;
    }

    /// Bytes the header needs, given what has been read of it.
    fn header_need(&self) -> usize {
        if self.header_len < 2 {
            return 2;
        }
        self.frame_header_size()
    }

    fn frame_header_size(&self) -> usize {
        let masked = self.header[1] & 0x80 != 0;
        let extended = match self.header[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + extended + if masked { 4 } else { 0 }
    }

    fn start_frame(&mut self) -> Result<(), ProtocolError> {
        let b0 = self.header[0];
        let b1 = self.header[1];
        let fin = b0 & 0x80 != 0;
        let rsv = b0 & 0x70;
        let opcode = b0 & 0x0f;
        let masked = b1 & 0x80 != 0;
        let (len, mask_at) = match b1 & 0x7f {
            126 => (
                u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
                4,
            ),
            127 => {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(&self.header[2..10]);
                let len = u64::from_be_bytes(bytes);
                if len >> 63 != 0 {
                    return Err(ProtocolError::LengthOverflow);
                }
                (len, 10)
            }
            short => (u64::from(short), 2),
        };
        let is_control = opcode & 0x08 != 0;
        match opcode {
            OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG => {}
            _ => return Err(ProtocolError::ReservedOpcode),
        }
        match (self.sender, masked) {
            (Sender::Client, false) => return Err(ProtocolError::UnmaskedClientFrame),
            (Sender::Server, true) => return Err(ProtocolError::MaskedServerFrame),
            _ => {}
        }
        // RSV1 is permessage-deflate's "compressed" bit, allowed only on a message's first frame.
        let rsv1_allowed = self.deflate && !is_control && opcode != OP_CONTINUATION;
        if rsv & 0x30 != 0 || (rsv & 0x40 != 0 && !rsv1_allowed) {
            return Err(ProtocolError::ReservedBits);
        }
        if is_control {
            if len > 125 {
                return Err(ProtocolError::ControlFrameTooLong);
            }
            if !fin {
                return Err(ProtocolError::FragmentedControlFrame);
            }
        } else if opcode == OP_CONTINUATION {
            if !self.in_message {
                return Err(ProtocolError::UnexpectedContinuation);
            }
        } else if self.in_message {
            return Err(ProtocolError::InterruptedMessage);
        }
        if opcode == OP_CLOSE && len == 1 {
            return Err(ProtocolError::OneByteClosePayload);
        }
        if !is_control {
            let so_far = if opcode == OP_CONTINUATION {
                self.message_len
            } else {
                0
            };
            let total = so_far.saturating_add(len);
            if self.max_message.is_some_and(|max| total > max) {
                return Err(ProtocolError::MessageTooBig);
            }
            self.message_len = total;
        }
        let mask = masked.then(|| {
            let mut key = [0u8; 4];
            key.copy_from_slice(&self.header[mask_at..mask_at + 4]);
            key
        });
        self.current = CurrentFrame {
            opcode,
            fin,
            len,
            mask,
        };
        self.control_len = 0;
        self.remaining = Some(len);
        Ok(())
    }

    fn capture_control(&mut self, bytes: &[u8]) {
        for &b in bytes {
            let i = self.control_len;
            let unmasked = match self.current.mask {
                Some(key) => b ^ key[i % 4],
                None => b,
            };
            // Control payloads are at most 125 bytes, checked in start_frame.
            if let Some(slot) = self.control_payload.get_mut(i) {
                *slot = unmasked;
            }
            self.control_len += 1;
        }
    }

    fn end_frame(&mut self, on_event: &mut impl FnMut(FrameEvent)) -> Result<(), ProtocolError> {
        let CurrentFrame {
            opcode, fin, len, ..
        } = self.current;
        if opcode == OP_CLOSE {
            let close = parse_close_payload(&self.control_payload[..self.control_len])?;
            on_event(FrameEvent::Frame { opcode, fin, len });
            on_event(FrameEvent::Close(close));
        } else {
            on_event(FrameEvent::Frame { opcode, fin, len });
            if opcode & 0x08 == 0 {
                self.in_message = !fin;
                if fin {
                    on_event(FrameEvent::MessageEnd);
                }
            }
        }
        self.header_len = 0;
        self.remaining = None;
        Ok(())
    }
}

fn parse_close_payload(payload: &[u8]) -> Result<CloseFrame, ProtocolError> {
    match payload {
        [] => Ok(CloseFrame {
            code: None,
            reason_len: 0,
        }),
        [_] => Err(ProtocolError::OneByteClosePayload),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_wire_close_code(code) {
                return Err(ProtocolError::InvalidCloseCode);
            }
            Ok(CloseFrame {
                code: Some(code),
                reason_len: reason.len(),
            })
        }
    }
}

/// Codes an endpoint may put in a Close frame (RFC 6455 §7.4 and the IANA registry): 1004,
/// 1005, 1006 and 1015 are reserved for reporting and never sent.
pub fn is_valid_wire_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// A Close frame of the gateway's own. Frames toward a server are masked (the gateway is
/// its client); `mask` is the key to use there.
pub fn close_frame(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    let reason = truncate_utf8(reason, 123);
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    let mut frame = Vec::with_capacity(6 + payload.len());
    frame.push(0x80 | OP_CLOSE);
    // At most 125 by the truncation above.
    let len = payload.len() as u8;
    match mask {
        Some(key) => {
            frame.push(0x80 | len);
            frame.extend_from_slice(&key);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => {
            frame.push(len);
            frame.extend_from_slice(&payload);
        }
    }
    frame
}

/// A masking key for frames of the gateway's own toward an upstream. RFC 6455 asks for
/// unpredictable keys so that a client cannot steer the bytes on the wire; a per-process
/// random seed stepped by a counter through splitmix64 gives that without a crypto
/// dependency on the hot path.
pub fn mask_key() -> [u8; 4] {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        let state = std::collections::hash_map::RandomState::new();
        std::hash::BuildHasher::hash_one(&state, std::process::id())
    });
    let mut z = seed.wrapping_add(COUNTER.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    let bytes = (z ^ (z >> 31)).to_le_bytes();
    [bytes[0], bytes[1], bytes[2], bytes[3]]
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Encodes one frame, masking it when `mask` is given.
    pub fn frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = vec![(u8::from(fin) << 7) | (rsv << 4) | opcode];
        let mask_bit = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(mask_bit | n as u8),
            n if n <= 0xffff => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(key) => {
                out.extend_from_slice(&key);
                out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            }
            None => out.extend_from_slice(payload),
        }
        out
    }

    pub fn events(parser: &mut FrameParser, chunks: &[&[u8]]) -> (Vec<FrameEvent>, Feed) {
        let mut seen = Vec::new();
        let mut result = Feed::Ok;
        for chunk in chunks {
            result = parser.feed(chunk, |e| seen.push(e));
            if result != Feed::Ok {
                break;
            }
        }
        (seen, result)
    }

    const KEY: Option<[u8; 4]> = Some([1, 2, 3, 4]);

    fn close_payload(code: u16, reason: &str) -> Vec<u8> {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(reason.as_bytes());
        p
    }

    #[test]
    fn reads_a_masked_close_split_byte_by_byte() {
        let bytes = frame(true, 0, OP_CLOSE, &close_payload(4001, "bye"), KEY);
        let chunks: Vec<&[u8]> = bytes.chunks(1).collect();
        let mut p = FrameParser::new(Sender::Client, false);
        let (seen, result) = events(&mut p, &chunks);
        assert_eq!(result, Feed::Ok);
        assert_eq!(
            seen.last(),
            Some(&FrameEvent::Close(CloseFrame {
                code: Some(4001),
                reason_len: 3
            }))
        );
        assert!(p.at_frame_boundary());
    }

    #[test]
    fn length_forms_and_several_frames_per_read() {
        let mut stream = Vec::new();
        for len in [0usize, 125, 126, 65535, 65536, 70000] {
            stream.extend(frame(true, 0, OP_BINARY, &vec![7u8; len], None));
        }
        let mut p = FrameParser::new(Sender::Server, false);
        let (seen, result) = events(&mut p, &[&stream]);
        assert_eq!(result, Feed::Ok);
        let lens: Vec<u64> = seen
            .iter()
            .filter_map(|e| match e {
                FrameEvent::Frame { len, .. } => Some(*len),
                _ => None,
            })
            .collect();
        assert_eq!(lens, [0, 125, 126, 65535, 65536, 70000]);
        assert_eq!(
            seen.iter()
                .filter(|e| **e == FrameEvent::MessageEnd)
                .count(),
            6
        );
    }

    #[test]
    fn fragmented_message_with_a_ping_in_the_middle() {
        let mut stream = frame(false, 0, OP_TEXT, b"hel", KEY);
        stream.extend(frame(true, 0, OP_PING, b"", KEY));
        stream.extend(frame(true, 0, OP_CONTINUATION, b"lo", KEY));
        let mut p = FrameParser::new(Sender::Client, false);
        let (seen, result) = events(&mut p, &[&stream]);
        assert_eq!(result, Feed::Ok);
        assert_eq!(
            seen.iter()
                .filter(|e| matches!(e, FrameEvent::Frame { .. }))
                .count(),
            3
        );
        assert_eq!(
            seen.iter()
                .filter(|e| **e == FrameEvent::MessageEnd)
                .count(),
            1
        );
        assert_eq!(seen.last(), Some(&FrameEvent::MessageEnd));
    }

    #[test]
    fn deflate_rsv1_only_where_negotiated_and_allowed() {
        let compressed = frame(true, 0b100, OP_TEXT, b"x", None);
        let mut p = FrameParser::new(Sender::Server, true);
        assert_eq!(events(&mut p, &[&compressed]).1, Feed::Ok);
        let mut p = FrameParser::new(Sender::Server, false);
        assert!(matches!(
            events(&mut p, &[&compressed]).1,
            Feed::Error {
                error: ProtocolError::ReservedBits,
                ..
            }
        ));
        let compressed_close = frame(true, 0b100, OP_CLOSE, &close_payload(1000, ""), None);
        let mut p = FrameParser::new(Sender::Server, true);
        assert!(matches!(
            events(&mut p, &[&compressed_close]).1,
            Feed::Error {
                error: ProtocolError::ReservedBits,
                ..
            }
        ));
    }

    #[test]
    fn protocol_errors_report_where_the_bad_frame_starts() {
        let good = frame(true, 0, OP_TEXT, b"ok", KEY);
        let cases: Vec<(Vec<u8>, ProtocolError)> = vec![
            (frame(true, 0, 0x3, b"", KEY), ProtocolError::ReservedOpcode),
            (
                frame(true, 0, OP_TEXT, b"hi", None),
                ProtocolError::UnmaskedClientFrame,
            ),
            (
                frame(true, 0, OP_PING, &[0; 126], KEY),
                ProtocolError::ControlFrameTooLong,
            ),
            (
                frame(false, 0, OP_PING, b"", KEY),
                ProtocolError::FragmentedControlFrame,
            ),
            (
                frame(true, 0, OP_CLOSE, &[3], KEY),
                ProtocolError::OneByteClosePayload,
            ),
            (
                frame(true, 0, OP_CLOSE, &close_payload(1006, ""), KEY),
                ProtocolError::InvalidCloseCode,
            ),
            (
                frame(true, 0, OP_CLOSE, &close_payload(1005, ""), KEY),
                ProtocolError::InvalidCloseCode,
            ),
            (
                frame(true, 0, OP_CONTINUATION, b"x", KEY),
                ProtocolError::UnexpectedContinuation,
            ),
            (
                frame(true, 0b010, OP_TEXT, b"x", KEY),
                ProtocolError::ReservedBits,
            ),
        ];
        for (bad, expected) in cases {
            let mut stream = good.clone();
            stream.extend(&bad);
            let mut p = FrameParser::new(Sender::Client, false);
            let (_, result) = events(&mut p, &[&stream]);
            assert_eq!(
                result,
                Feed::Error {
                    offset: good.len(),
                    error: expected
                },
                "{expected:?}"
            );
            assert!(!p.at_frame_boundary());
        }
        let mut p = FrameParser::new(Sender::Server, false);
        let masked = frame(true, 0, OP_TEXT, b"x", KEY);
        assert!(matches!(
            events(&mut p, &[&masked]).1,
            Feed::Error {
                error: ProtocolError::MaskedServerFrame,
                ..
            }
        ));
        let mut overflow = vec![0x82, 127];
        overflow.extend_from_slice(&u64::MAX.to_be_bytes());
        let mut p = FrameParser::new(Sender::Server, false);
        assert!(matches!(
            events(&mut p, &[&overflow]).1,
            Feed::Error {
                error: ProtocolError::LengthOverflow,
                ..
            }
        ));
    }

    #[test]
    fn invalid_close_code_split_across_reads_is_located() {
        let good = frame(true, 0, OP_TEXT, b"ok", None);
        let bad = frame(true, 0, OP_CLOSE, &close_payload(999, "r"), None);
        let mut stream = good.clone();
        stream.extend(&bad);
        let (first, second) = stream.split_at(good.len() + 3);
        let mut p = FrameParser::new(Sender::Server, false);
        assert_eq!(p.feed(first, |_| {}), Feed::Ok);
        // The Close began in the first chunk: nothing of the second may be forwarded.
        assert_eq!(
            p.feed(second, |_| {}),
            Feed::Error {
                offset: 0,
                error: ProtocolError::InvalidCloseCode
            }
        );
    }

    #[test]
    fn messages_over_the_cap_are_refused_whole_or_fragmented() {
        let mut p = FrameParser::new(Sender::Client, false).with_max_message(Some(10));
        let fits = frame(true, 0, OP_TEXT, &[1; 10], KEY);
        assert_eq!(events(&mut p, &[&fits]).1, Feed::Ok);
        let mut stream = frame(false, 0, OP_TEXT, &[1; 6], KEY);
        stream.extend(frame(true, 0, OP_CONTINUATION, &[1; 5], KEY));
        let (_, result) = events(&mut p, &[&stream]);
        assert!(matches!(
            result,
            Feed::Error {
                error: ProtocolError::MessageTooBig,
                ..
            }
        ));
        assert_eq!(ProtocolError::MessageTooBig.close_code(), 1009);
    }

    #[test]
    fn gateway_close_frames_parse_back() {
        for mask in [None, KEY] {
            let sender = if mask.is_some() {
                Sender::Client
            } else {
                Sender::Server
            };
            let bytes = close_frame(1001, "going away", mask);
            let mut p = FrameParser::new(sender, false);
            let (seen, result) = events(&mut p, &[&bytes]);
            assert_eq!(result, Feed::Ok);
            assert_eq!(
                seen.last(),
                Some(&FrameEvent::Close(CloseFrame {
                    code: Some(1001),
                    reason_len: 10
                }))
            );
        }
        assert_eq!(close_frame(1011, &"é".repeat(100), None).len(), 2 + 2 + 122);
    }

    #[test]
    fn stops_at_the_first_boundary_when_asked() {
        let first = frame(true, 0, OP_TEXT, b"one", None);
        let mut stream = first.clone();
        stream.extend(frame(true, 0, OP_TEXT, b"two", None));
        let mut p = FrameParser::new(Sender::Server, false);
        let (consumed, result) = p.feed_to_boundary(&stream[..2], true, |_| {});
        assert_eq!((consumed, result), (2, Feed::Ok));
        assert!(!p.at_frame_boundary());
        let (consumed, result) = p.feed_to_boundary(&stream[2..], true, |_| {});
        assert_eq!((consumed + 2, result), (first.len(), Feed::Ok));
        assert!(p.at_frame_boundary());
    }

    #[test]
    fn valid_close_codes() {
        for code in [
            1000, 1001, 1002, 1003, 1007, 1011, 1012, 1013, 1014, 3000, 4001, 4999,
        ] {
            assert!(is_valid_wire_close_code(code), "{code}");
        }
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert!(!is_valid_wire_close_code(code), "{code}");
        }
    }

    /// Held Pongs: the parser stops before one, then after it; its payload is unmasked and
    /// its frame rebuilt byte for byte, wherever the reads split it.
    #[test]
    fn held_pongs_are_whole_before_anything_is_decided() {
        let before = frame(true, 0, OP_TEXT, b"hi", KEY);
        let pong = frame(true, 0, OP_PONG, b"agw-hb\0\0\0\x01", KEY);
        let after = frame(true, 0, OP_PING, b"p", KEY);
        let stream = [before.clone(), pong.clone(), after.clone()].concat();
        for cut in 0..=stream.len() {
            let mut p = FrameParser::new(Sender::Client, false);
            p.hold_pongs();
            let mut consumed = Vec::new();
            let mut rebuilt = None;
            for chunk in [&stream[..cut], &stream[cut..]] {
                let mut rest = chunk;
                while !rest.is_empty() {
                    let was_holding = p.holding_pong();
                    let (n, result) = p.feed_to_boundary(rest, false, |_| {});
                    assert_eq!(result, Feed::Ok);
                    if !was_holding {
                        // Everything up to the Pong's first byte goes on.
                        consumed.push(rest[..n].to_vec());
                    }
                    if was_holding && !p.holding_pong() {
                        assert_eq!(p.pong_payload(), b"agw-hb\0\0\0\x01");
                        let mut out = [0u8; MAX_CONTROL_FRAME];
                        let len = p.held_pong_frame(&mut out);
                        rebuilt = Some(out[..len].to_vec());
                    }
                    rest = &rest[n..];
                }
            }
            assert_eq!(rebuilt.as_deref(), Some(&pong[..]), "cut at {cut}");
            assert_eq!(consumed.concat(), [before.clone(), after.clone()].concat());
            assert!(p.at_frame_boundary() && !p.holding_pong());
        }
    }

    /// Gated: the parser stops before the first byte of every data message, wherever the reads
    /// split the stream, and not before control frames or a message's continuations.
    #[test]
    fn gated_messages_stop_before_their_first_byte() {
        let first = frame(false, 0, OP_TEXT, b"he", KEY);
        let ping = frame(true, 0, OP_PING, b"p", KEY);
        let rest = frame(true, 0, OP_CONTINUATION, b"llo", KEY);
        let second = frame(true, 0, OP_BINARY, b"x", KEY);
        let stream = [first, ping, rest, second].concat();
        for cut in 0..=stream.len() {
            let mut p = FrameParser::new(Sender::Client, false);
            p.gate_messages();
            let mut gates = Vec::new();
            let mut offset = 0;
            for chunk in [&stream[..cut], &stream[cut..]] {
                let mut left = chunk;
                while !left.is_empty() {
                    let (n, result) = p.feed_to_boundary(left, false, |_| {});
                    assert_eq!(result, Feed::Ok);
                    offset += n;
                    left = &left[n..];
                    if p.at_message_gate() {
                        gates.push(offset);
                        // Fed again unopened, it stays where it is.
                        assert_eq!(p.feed_to_boundary(left, false, |_| {}).0, 0);
                        p.open_gate();
                    }
                }
            }
            let second_at = stream.len() - frame(true, 0, OP_BINARY, b"x", KEY).len();
            assert_eq!(gates, [0, second_at], "cut at {cut}");
            assert!(p.at_frame_boundary());
        }
    }

    #[test]
    fn a_bad_held_frame_leaves_forwarding_between_frames() {
        let mut p = FrameParser::new(Sender::Client, false);
        p.hold_pongs();
        let unmasked = frame(true, 0, OP_PONG, b"x", None);
        assert_eq!(
            p.feed_to_boundary(&unmasked[..1], false, |_| {}),
            (0, Feed::Ok)
        );
        assert!(p.holding_pong());
        assert_eq!(
            p.feed_to_boundary(&unmasked[..1], false, |_| {}),
            (1, Feed::Ok)
        );
        assert!(matches!(
            p.feed_to_boundary(&unmasked[1..], false, |_| {}).1,
            Feed::Error {
                error: ProtocolError::UnmaskedClientFrame,
                ..
            }
        ));
        assert!(p.failed_frame_began_in_last_chunk());
    }

    mod rechunking {
        use super::*;
        use proptest::prelude::*;

        /// One frame of a valid stream: opcode, fin and payload length.
        fn frame_spec() -> impl Strategy<Value = (u8, usize)> {
            prop_oneof![
                (Just(OP_TEXT), 0usize..200),
                (Just(OP_BINARY), 0usize..70_000),
                (Just(OP_PING), 0usize..126),
                (Just(OP_PONG), 0usize..126),
            ]
        }

        /// A valid client stream: messages, some fragmented with control frames between
        /// the fragments, ending with a Close.
        fn stream() -> impl Strategy<Value = Vec<u8>> {
            (
                proptest::collection::vec((frame_spec(), 1usize..4, any::<bool>()), 0..12),
                any::<[u8; 4]>(),
            )
                .prop_map(|(specs, key)| {
                    let mut out = Vec::new();
                    for ((opcode, len), fragments, ping_between) in specs {
                        let payload = vec![0x5au8; len];
                        let is_control = opcode & 0x08 != 0;
                        if is_control || fragments == 1 {
                            out.extend(frame(true, 0, opcode, &payload, Some(key)));
                            continue;
                        }
                        let size = len.div_ceil(fragments).max(1);
                        let pieces: Vec<&[u8]> = if payload.is_empty() {
                            vec![&[]]
                        } else {
                            payload.chunks(size).collect()
                        };
                        for (i, piece) in pieces.iter().enumerate() {
                            let op = if i == 0 { opcode } else { OP_CONTINUATION };
                            out.extend(frame(i + 1 == pieces.len(), 0, op, piece, Some(key)));
                            if ping_between && i + 1 < pieces.len() {
                                out.extend(frame(true, 0, OP_PING, b"p", Some(key)));
                            }
                        }
                    }
                    out.extend(frame(
                        true,
                        0,
                        OP_CLOSE,
                        &close_payload(4001, "done"),
                        Some(key),
                    ));
                    out
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(200))]
            #[test]
            fn any_rechunking_yields_the_same_frames(stream in stream(), cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..40)) {
                let mut whole = FrameParser::new(Sender::Client, false);
                let (expected, result) = events(&mut whole, &[&stream]);
                prop_assert_eq!(result, Feed::Ok);
                let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
                points.push(0);
                points.push(stream.len());
                points.sort_unstable();
                points.dedup();
                let chunks: Vec<&[u8]> = points.windows(2).map(|w| &stream[w[0]..w[1]]).collect();
                let mut chunked = FrameParser::new(Sender::Client, false);
                let mut seen = Vec::new();
                for chunk in &chunks {
                    // Close ends the stream; feeding continues to check nothing breaks after it.
                    let mut rest: &[u8] = chunk;
                    while !rest.is_empty() {
                        let (consumed, result) = chunked.feed_to_boundary(rest, false, |e| seen.push(e));
                        prop_assert_eq!(result, Feed::Ok);
                        if consumed == 0 { break; }
                        rest = &rest[consumed..];
                    }
                }
                prop_assert_eq!(seen, expected);
                prop_assert!(chunked.at_frame_boundary());
            }
        }
    }
}
