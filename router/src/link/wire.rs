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
