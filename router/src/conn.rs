//! One client connection's bytes: the transport (TCP, then TLS), the framer, a read
//! buffer, and the read-rate token bucket. Reading is cancel-safe (a read either returns
//! bytes that are parsed at once or has consumed nothing), so the session loop can race
//! it against its queue and timers.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;

use crate::Limits;
use crate::error::StreamErrorCondition;
use crate::xml::{Frame, FrameLimits, Framer};

/// Reads go into a buffer on the stack of the poll that reads, and are parsed in that
/// same poll: the buffer exists only while the task runs, so an idle connection holds
/// no read buffer at all, not even inline in its session (DESIGN: memory per session
/// is a budget).
const READ_CHUNK: usize = 4096;

/// Reads per wake-up at most (STYLE 5): 16 × 4 KiB, then back to the loop.
const MAX_READS: usize = 16;

/// The byte stream under a client connection.
#[allow(clippy::large_enum_variant)]
pub enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What ended a read.
#[derive(Debug)]
pub enum ReadError {
    /// The peer closed the TCP connection or it failed.
    Closed,
    /// The peer broke the protocol.
    Stream(StreamErrorCondition),
}

/// A token bucket on bytes read (Prosody's and ejabberd's "shaper"): excess input is not
/// an error, the server just stops reading for a while and TCP pushes back.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, burst: u32) -> TokenBucket {
        TokenBucket {
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            updated: Instant::now(),
        }
    }

    /// Takes `n` tokens; returns how long to wait before reading again (zero if none).
    pub fn take(&mut self, n: usize) -> Duration {
        let now = Instant::now();
        let elapsed = now.duration_since(self.updated).as_secs_f64();
        self.updated = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// One connection: transport, framer and what was parsed but not yet handled.
pub struct Conn {
    pub io: Transport,
    pub framer: Framer,
    pub peer: SocketAddr,
    /// `tls-exporter` channel-binding value (RFC 9266), on TLS 1.3 connections.
    pub channel_binding: Option<Vec<u8>>,
    /// The transport reported end of stream during a drain; the next read says so.
    eof: bool,
    frames: VecDeque<Frame>,
    bucket: TokenBucket,
    /// Reads are paused until then by the rate limit.
    pub paused_until: Option<Instant>,
    /// A write that takes longer fails: the peer does not read.
    write_timeout: Duration,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// A connection not yet authenticated (its element cap is the pre-auth one).
    pub fn new(io: Transport, peer: SocketAddr, limits: &Limits) -> Conn {
        Conn {
            io,
            framer: Framer::new(FrameLimits::unauthenticated(
                limits.max_stanza_bytes_unauthenticated,
            )),
            peer,
            channel_binding: None,
            eof: false,
            frames: VecDeque::new(),
            bucket: TokenBucket::new(limits.read_rate, limits.read_burst),
            paused_until: None,
            write_timeout: limits.write_timeout,
        }
    }

    /// New limits on the same stream, from the next element on (SASL2).
    pub fn set_limits(&mut self, limits: FrameLimits) {
        self.framer.set_limits(limits);
    }

    /// Starts a new stream on the same transport (after SASL success), with the
    /// limits of an authenticated stream.
    pub fn reset_stream(&mut self, limits: FrameLimits) {
        self.framer = Framer::new(limits);
        self.frames.clear();
    }

    /// A frame parsed earlier and not yet handled.
    pub fn pop_frame(&mut self) -> Option<Frame> {
        self.frames.pop_front()
    }

    /// Reads what arrived and parses it. Cancel-safe: the only waits are the rate
    /// limit's pause and a poll that found nothing to read, which consumed nothing.
    /// Frames are queued for [`Self::pop_frame`]; the rate limit may pause the next
    /// read.
    pub async fn read_some(&mut self) -> Result<(), ReadError> {
        if self.eof {
            return Err(ReadError::Closed);
        }
        if let Some(until) = self.paused_until {
            tokio::time::sleep_until(until).await;
            self.paused_until = None;
        }
        self.read_now().await
    }

    /// [`Self::read_some`] for a caller that keeps the rate limit's pause itself (a
    /// session's one timer): reads at once, pause or not. A session's idle future
    /// then holds no timer of the read's own (112 bytes).
    pub async fn read_now(&mut self) -> Result<(), ReadError> {
        if self.eof {
            return Err(ReadError::Closed);
        }
        let total = std::future::poll_fn(|cx| self.poll_read_and_parse(cx)).await?;
        let wait = self.bucket.take(total);
        if !wait.is_zero() {
            self.paused_until = Some(Instant::now() + wait);
        }
        Ok(())
    }

    /// Reads what is available, up to [`MAX_READS`] chunks, into a buffer on this
    /// poll's stack, parsing each chunk before the next read. Pending only when the
    /// first read found nothing; an end of stream after some bytes is reported by the
    /// next call.
    fn poll_read_and_parse(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, ReadError>> {
        let mut space = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut buf = ReadBuf::uninit(&mut space);
        let mut total = 0;
        for read in 0..MAX_READS {
            let first = read == 0;
            buf.clear();
            match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
                Poll::Pending if first => return Poll::Pending,
                Poll::Pending => break,
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    let n = buf.filled().len();
                    total += n;
                    if let Err(e) = self.parse(buf.filled()) {
                        return Poll::Ready(Err(e));
                    }
                    if n < READ_CHUNK {
                        break;
                    }
                }
                // End of stream or a failed transport.
                Poll::Ready(_) if first => return Poll::Ready(Err(ReadError::Closed)),
                Poll::Ready(_) => {
                    self.eof = true;
                    break;
                }
            }
        }
        Poll::Ready(Ok(total))
    }

    fn parse(&mut self, mut buf: &[u8]) -> Result<(), ReadError> {
        while let Some(frame) = self
            .framer
            .next_frame(&mut buf)
            .map_err(|e| ReadError::Stream(e.into()))?
        {
            self.frames.push_back(frame);
        }
        Ok(())
    }

    /// The next frame, reading as needed (negotiation uses this; not cancel-safe across
    /// frames, which negotiation does not need).
    pub async fn next_frame(&mut self) -> Result<Frame, ReadError> {
        loop {
            if let Some(frame) = self.frames.pop_front() {
                return Ok(frame);
            }
            self.read_some().await?;
        }
    }

    /// Gives back per-connection buffers before the session waits for input again.
    /// Called when a read found nothing more queued: an idle session then holds no read
    /// buffer of its own (DESIGN: memory per session is a budget).
    pub fn idle(&mut self) {
        if self.frames.capacity() > 0 && self.frames.is_empty() {
            self.frames = VecDeque::new();
        }
        self.framer.release_temporaries();
    }

    /// Lets the stream rest between stanzas ([`Framer::rest`]): an idle session then
    /// holds no parser. Returns whether it rests.
    pub fn rest(&mut self) -> bool {
        self.frames.is_empty() && self.framer.rest()
    }

    /// When the stream should rest, given its last read: `None` when it rests already
    /// or cannot (it holds part of an element), so that a session never waits for a
    /// rest that cannot happen (its timer would fire again at once).
    pub fn rest_at(&self, last_read: Instant, after: Duration) -> Option<Instant> {
        (self.frames.is_empty() && self.framer.can_rest()).then(|| last_read + after)
    }

    /// Writes and flushes, within the write deadline: a peer that stops reading gets
    /// `TimedOut` instead of holding this task (and what it buffers) forever.
    pub async fn send(&mut self, data: &str) -> std::io::Result<()> {
        let write = async {
            self.io.write_all(data.as_bytes()).await?;
            self.io.flush().await
        };
        match tokio::time::timeout(self.write_timeout, write).await {
            Ok(result) => result,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }

    /// Sends `</stream:stream>` (after an optional stream error) and waits a bounded
    /// time for the peer's footer before closing (RFC 6120 §4.4).
    pub async fn close(self, error: Option<(StreamErrorCondition, Option<&str>)>, wait: Duration) {
        let error = error
            .map(|(condition, text)| condition.to_xml(text))
            .unwrap_or_default();
        self.close_with(error, wait).await;
    }

    /// [`Self::close`] with a stream error already serialized (`error`, may be empty).
    pub async fn close_with(mut self, error: String, wait: Duration) {
        let mut out = error;
        out.push_str("</stream:stream>");
        if self.send(&out).await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(wait, async {
            loop {
                match self.next_frame().await {
                    Ok(Frame::Footer) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        let _ = self.io.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn token_bucket_pauses_after_the_burst() {
        let mut bucket = TokenBucket::new(1000, 2000);
        assert!(bucket.take(1500).is_zero());
        let wait = bucket.take(1500);
        assert_eq!(wait, Duration::from_secs(1));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(bucket.take(1000).is_zero());
    }

    /// A stream is due to rest only between stanzas: a peer that sent half a tag and
    /// paused is never scheduled a rest it cannot take (the session's one timer would
    /// fire at once, again and again).
    #[tokio::test]
    async fn a_stream_is_due_to_rest_only_between_stanzas() {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, peer) = listener.accept().await.unwrap();
        let mut conn = Conn::new(Transport::Plain(tcp), peer, &Limits::default());
        let after = Duration::from_secs(2);
        let now = Instant::now();
        let mut feed = async |bytes: &[u8], conn: &mut Conn| {
            client.write_all(bytes).await.unwrap();
            conn.read_some().await.unwrap();
            while conn.pop_frame().is_some() {}
        };
        feed(
            b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'><presence/>",
            &mut conn,
        )
        .await;
        assert_eq!(conn.rest_at(now, after), Some(now + after));
        feed(b" <pres", &mut conn).await;
        assert_eq!(conn.rest_at(now, after), None, "half a tag is held");
        feed(b"ence/>", &mut conn).await;
        assert!(conn.rest());
        assert_eq!(conn.rest_at(now, after), None, "it rests already");
        feed(b"<presence/>", &mut conn).await;
        assert_eq!(
            conn.rest_at(now, after),
            Some(now + after),
            "woken by input"
        );
    }
}
