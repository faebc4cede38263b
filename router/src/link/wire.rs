//! The router link's wire format: the stream header and what it announces, the
//! acknowledgement element, which stanzas keep their place behind the outbox, framed
//! reads and writes with a deadline. No state of the link lives here.

use std::collections::VecDeque;
use std::time::Duration;

use minidom::Element;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::{LINK_NS, LINK_PROTOCOL, LinkError, MAX_LINK_STANZA};
use crate::stanza::{self, Kind};
use crate::xml::{Frame, Framer, escape};

/// The protocol version and features a link stream header announces.
pub(super) fn announced(h: &crate::xml::Header) -> (u32, Vec<String>) {
    (
        h.protocol
            .as_deref()
            .and_then(|p| p.parse().ok())
            .unwrap_or(1),
        h.features
            .as_deref()
            .unwrap_or_default()
            .split_ascii_whitespace()
            .take(64)
            .map(str::to_owned)
            .collect(),
    )
}

/// A stream header; the opening node's `id` is its epoch (a new one at every start
/// of its link task), which the accepting node echoes.
pub(super) fn header(from: &str, to: &str, epoch: &str, features: &[String]) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream xmlns='{LINK_NS}' \
         xmlns:stream='http://etherx.jabber.org/streams' xmlns:impmesh='{LINK_NS}' \
         version='1.0' from='{}' to='{}' id='{}' impmesh:protocol='{LINK_PROTOCOL}' \
         impmesh:features='{}'>",
        escape(from),
        escape(to),
        escape(epoch),
        escape(&features.join(" "))
    )
}

/// The acknowledgement: `h` stanzas of the epoch handled so far.
pub(super) fn ack(h: u64) -> String {
    format!("<a xmlns='{LINK_NS}' h='{h}'/>")
}

/// The count an acknowledgement carries.
pub(super) fn ack_count(element: &Element) -> Option<u64> {
    if !element.is("a", LINK_NS) {
        return None;
    }
    element.attr("h")?.parse().ok()
}

/// Whether a stanza keeps its place behind the outbox (messages and subscription
/// stanzas, which are delivered in order) rather than going out at once.
pub(super) fn waits_its_turn(xml: &str) -> bool {
    let Some(stanza) = stanza::parse_own(xml) else {
        return false;
    };
    match Kind::of(&stanza) {
        Some(Kind::Message) => true,
        Some(Kind::Presence) => matches!(
            stanza.attr("type"),
            Some("subscribe" | "subscribed" | "unsubscribe" | "unsubscribed")
        ),
        _ => false,
    }
}

/// Writes and flushes a batch within `deadline`, then empties the buffer.
pub(super) async fn write_batch<S: AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut String,
    deadline: Duration,
) -> std::io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    write_within(stream, buf.as_bytes(), deadline).await?;
    buf.clear();
    Ok(())
}

/// Writes and flushes, failing with `TimedOut` when the peer node does not read
/// within `deadline` (M5: a node that stops reading must not hold the link task and
/// its queue forever; the link is reopened and its stanzas resent or parked).
pub(super) async fn write_within<S: AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
    deadline: Duration,
) -> std::io::Result<()> {
    let write = async {
        stream.write_all(bytes).await?;
        stream.flush().await
    };
    match tokio::time::timeout(deadline, write).await {
        Ok(result) => result,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Frames read from a link, with what a read brought beyond the frame asked for.
pub(super) struct FrameReader {
    framer: Framer,
    pub(super) queue: VecDeque<Frame>,
}

impl FrameReader {
    pub(super) fn new() -> FrameReader {
        FrameReader {
            framer: Framer::new(crate::xml::FrameLimits::authenticated(MAX_LINK_STANZA)),
            queue: VecDeque::new(),
        }
    }

    /// Parses a chunk; the frames wait in the queue.
    pub(super) fn feed(&mut self, mut chunk: &[u8]) -> Result<(), LinkError> {
        while let Some(frame) = self
            .framer
            .next_frame(&mut chunk)
            .map_err(|e| LinkError::Stream(e.into()))?
        {
            self.queue.push_back(frame);
        }
        Ok(())
    }

    /// The next frame, reading as needed.
    pub(super) async fn next<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
    ) -> Result<Frame, LinkError> {
        let mut buf = [0u8; 1024];
        loop {
            if let Some(frame) = self.queue.pop_front() {
                return Ok(frame);
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(LinkError::Closed);
            }
            self.feed(&buf[..n])?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzzing on stable (STYLE 12): mutated link streams (a header with features,
    /// acknowledgements, stanzas of each kind), fed in random chunks, never panic the
    /// frame reader or what reads the frames (the header's announcement, ack counts,
    /// the stanza kind and its JIDs); and the unmutated stream gives the same frames
    /// however it is cut. The seed is printed on failure, to keep a crash as a case.
    #[test]
    fn mutated_link_frames_never_panic() {
        use impmesh_testkit::mutate;
        use rand::{Rng as _, SeedableRng as _};
        let seed: u64 = rand::random();
        eprintln!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let features = vec!["outbox-v2".to_owned(), "x".repeat(40)];
        let stream = format!(
            "{}{}<message xmlns='jabber:client' from='a@d/r' to='b@d' type='chat'><body>hi</body></message>\
             <presence xmlns='jabber:client' from='a@d' to='b@d' type='subscribe'/>\
             <iq xmlns='jabber:client' from='a@d/r' to='b@d' type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq>\
             {}</stream:stream>",
            header("n1.c1", "n2.c2", "epoch-1", &features),
            ack(7),
            ack(u64::MAX),
        );
        let read_all = |input: &[u8], rng: &mut rand::rngs::StdRng| {
            let mut reader = FrameReader::new();
            let mut rest = input;
            let mut frames = vec![];
            while !rest.is_empty() {
                let n = rng.gen_range(1..=rest.len().min(96));
                let (chunk, tail) = rest.split_at(n);
                rest = tail;
                if reader.feed(chunk).is_err() {
                    break;
                }
                frames.extend(reader.queue.drain(..));
            }
            for frame in &frames {
                match frame {
                    Frame::Header(h) => {
                        let (_, announced) = announced(h);
                        assert!(announced.len() <= 64, "seed {seed}");
                    }
                    Frame::Element(e) => {
                        let _ = ack_count(e);
                        let _ = Kind::of(e);
                        let _ = e.attr("from").and_then(stanza::parse_jid);
                        let _ = e.attr("to").and_then(stanza::parse_jid);
                        let _ = waits_its_turn(&String::from(e));
                    }
                    Frame::Footer => {}
                }
            }
            frames
        };
        let whole = read_all(stream.as_bytes(), &mut rng);
        assert_eq!(whole.len(), 7, "header, two acks, three stanzas, footer");
        assert!(matches!(&whole[0], Frame::Header(h) if announced(h).1 == features));
        let counts: Vec<_> = whole
            .iter()
            .filter_map(|f| match f {
                Frame::Element(e) => ack_count(e),
                _ => None,
            })
            .collect();
        assert_eq!(counts, [7, u64::MAX]);
        for round in 0..10_000 {
            let input = if round % 10 == 0 {
                stream.as_bytes().to_vec()
            } else {
                mutate(stream.as_bytes(), &mut rng)
            };
            let frames = read_all(&input, &mut rng);
            if round % 10 == 0 {
                assert_eq!(frames.len(), whole.len(), "seed {seed}");
            }
        }
    }
}
