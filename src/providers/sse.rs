//! Incremental server-sent-events parser.
//!
//! Upstream bodies arrive in TCP-sized pieces that split events, lines and even UTF-8
//! sequences anywhere. The parser keeps only the unfinished tail and hands out whole
//! events, each with its raw bytes so an unchanged event can be forwarded without being
//! re-encoded.

use bytes::{Bytes, BytesMut};

/// One complete event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The event exactly as received, terminator included.
    pub raw: Bytes,
    /// The `event:` field, empty when absent.
    pub event: Bytes,
    /// The `data:` lines joined by `\n`.
    pub data: Bytes,
}

#[derive(Debug, Default)]
pub struct SseParser {
    buf: BytesMut,
    /// Bytes of `buf` already known to hold no event terminator.
    scanned: usize,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Bytes received after the last complete event.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// The next complete event, if one has fully arrived.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            let end = self.find_terminator()?;
            let raw = self.buf.split_to(end).freeze();
            self.scanned = 0;
            let (event, data, has_field) = parse_fields(&raw);
            if has_field {
                return Some(SseEvent { raw, event, data });
            }
            // A block made only of comments (keep-alives) carries nothing to translate.
        }
    }

    /// Position just after the first blank line (`\n\n`, `\n\r\n`, or `\r\r`).
    fn find_terminator(&mut self) -> Option<usize> {
        let b = &self.buf[..];
        // Back up one byte so a terminator split across pushes is still seen.
        let mut i = self.scanned.saturating_sub(2);
        while i < b.len() {
            if b[i] == b'\n' {
                if b.get(i + 1) == Some(&b'\n') {
                    return Some(i + 2);
                }
                if b.get(i + 1) == Some(&b'\r') && b.get(i + 2) == Some(&b'\n') {
                    return Some(i + 3);
                }
            } else if b[i] == b'\r'
                && b.get(i + 1) == Some(&b'\r')
                && b.get(i + 2) != Some(&b'\n')
                && i + 2 < b.len()
            {
                return Some(i + 2);
            }
            i += 1;
        }
        self.scanned = b.len();
        None
    }
}

fn parse_fields(raw: &Bytes) -> (Bytes, Bytes, bool) {
    let mut event = Bytes::new();
    let mut data: Option<Bytes> = None;
    let mut joined: Option<Vec<u8>> = None;
    let mut has_field = false;
    let mut start = 0;
    let b = &raw[..];
    while start < b.len() {
        let mut end = start;
        while end < b.len() && b[end] != b'\n' && b[end] != b'\r' {
            end += 1;
        }
        let line = &b[start..end];
        // skip the terminator (\r\n counts as one)
        let mut next = end + 1;
        if end < b.len() && b[end] == b'\r' && b.get(end + 1) == Some(&b'\n') {
            next = end + 2;
        }
        if !line.is_empty() && line[0] != b':' {
            let (name, value_start) = match line.iter().position(|&c| c == b':') {
                Some(p) => {
                    let vs = if line.get(p + 1) == Some(&b' ') {
                        p + 2
                    } else {
                        p + 1
                    };
                    (&line[..p], start + vs)
                }
                None => (line, end),
            };
            let value = raw.slice(value_start.min(end)..end);
            match name {
                b"event" => {
                    event = value;
                    has_field = true;
                }
                b"data" => {
                    has_field = true;
                    match (&mut data, &mut joined) {
                        (None, _) => data = Some(value),
                        (Some(first), None) => {
                            let mut v = first.to_vec();
                            v.push(b'\n');
                            v.extend_from_slice(&value);
                            joined = Some(v);
                        }
                        (Some(_), Some(v)) => {
                            v.push(b'\n');
                            v.extend_from_slice(&value);
                        }
                    }
                }
                _ => has_field = true,
            }
        }
        start = next;
    }
    let data = match joined {
        Some(v) => Bytes::from(v),
        None => data.unwrap_or_default(),
    };
    (event, data, has_field)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_events(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::new();
        let mut out = vec![];
        for c in chunks {
            p.push(c);
            while let Some(e) = p.next_event() {
                out.push(e);
            }
        }
        out
    }

    const STREAM: &[u8] = b"event: message_start\ndata: {\"a\":1}\n\n: keepalive\n\nevent: ping\r\ndata: {}\r\n\r\ndata: line1\ndata: line2\n\ndata: [DONE]\n\n";

    #[test]
    fn parses_fields_and_skips_comments() {
        let ev = all_events(&[STREAM]);
        assert_eq!(ev.len(), 4);
        assert_eq!(&ev[0].event[..], b"message_start");
        assert_eq!(&ev[0].data[..], b"{\"a\":1}");
        assert_eq!(&ev[1].event[..], b"ping");
        assert_eq!(&ev[1].data[..], b"{}");
        assert_eq!(&ev[2].data[..], b"line1\nline2");
        assert_eq!(&ev[3].data[..], b"[DONE]");
    }

    #[test]
    fn every_split_gives_the_same_events() {
        let whole = all_events(&[STREAM]);
        for i in 0..=STREAM.len() {
            for j in i..=STREAM.len() {
                let got = all_events(&[&STREAM[..i], &STREAM[i..j], &STREAM[j..]]);
                assert_eq!(got, whole, "split at {i},{j}");
            }
        }
    }

    #[test]
    fn raw_concatenation_is_lossless_for_data_events() {
        let s: &[u8] = b"data: {\"x\":1}\n\ndata: [DONE]\n\n";
        let ev = all_events(&[s]);
        let raw: Vec<u8> = ev.iter().flat_map(|e| e.raw.to_vec()).collect();
        assert_eq!(raw, s);
    }

    #[test]
    fn unfinished_tail_stays_pending() {
        let mut p = SseParser::new();
        p.push(b"data: {\"x\":1}\n\ndata: {\"y\"");
        assert!(p.next_event().is_some());
        assert!(p.next_event().is_none());
        assert_eq!(p.pending(), b"data: {\"y\"");
    }
}
