//! Watches the request bytes of an HTTP/1 connection as hyper reads them, to learn two things
//! hyper does not tell the service: when a request head started arriving (so the accept loop can
//! time every head, not only the first), and whether a head carried both `Content-Length` and
//! `Transfer-Encoding`. hyper resolves that conflict itself (chunked wins, `Content-Length` is
//! dropped from the header map), so the service cannot see it; but a request framed two ways is
//! how requests are smuggled past a proxy that reads the other framing (RFC 9112 §6.3, §11.2),
//! and nginx and Envoy refuse it. This is the only place it can be seen: the connection marks
//! the request ([`crate::call::FramedTwice`]) and `access` refuses it.
//!
//! It follows message boundaries with the same rules hyper uses (a head, then a body of
//! `Content-Length` bytes or chunked); when it meets something it does not follow (the HTTP/2
//! preface, a head hyper will refuse anyway) it stops watching, and hyper's own parser decides.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::conn::ConnState;
use super::MAX_HEADER_BYTES;

/// hyper's default limit on the number of headers in a request (more gets 431).
const MAX_HEADERS: usize = 100;

/// An IO that reports request heads to the connection's [`ConnState`] as they are read.
pub(crate) struct Watched<I> {
    io: I,
    framing: Framing,
    state: Arc<ConnState>,
}

impl<I> Watched<I> {
    /// Wraps a freshly accepted connection.
    pub(crate) fn new(io: I, state: Arc<ConnState>) -> Self {
        Watched {
            io,
            framing: Framing::default(),
            state,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let read = &buf.filled()[before..];
            if !read.is_empty() {
                this.state.moved();
                for event in this.framing.feed(read) {
                    match event {
                        Event::HeadStarted => this.state.head_started(),
                        Event::HeadDone { index, conflict } => {
                            this.state.head_done(index, conflict)
                        }
                        Event::Stopped => this.state.head_abandoned(),
                    }
                }
            }
        }
        result
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            if n > 0 {
                this.state.moved();
            }
        }
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = written {
            if n > 0 {
                this.state.moved();
            }
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// What the byte stream told us.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// The first byte of a request head arrived.
    HeadStarted,
    /// A request head is complete: the `index`-th on this connection (from 0); `conflict` if it
    /// carried both `Content-Length` and `Transfer-Encoding`.
    HeadDone { index: u64, conflict: bool },
    /// Not watching any more: no head is on its way as far as we know.
    Stopped,
}

/// Where in the request stream we are.
#[derive(Debug)]
enum Step {
    /// Between messages, or inside a head (`partial` holds what has arrived of it).
    Head { partial: Vec<u8> },
    /// Inside a body of known length: this many bytes to go.
    Body(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// Not watching any more (HTTP/2, a head hyper refuses, a conflict: hyper closes after it).
    Off,
}

/// Where in a chunked body we are (RFC 9112 §7.1).
#[derive(Debug)]
enum Chunk {
    /// Reading the size line; `size` so far, `digits` ended by an extension or whitespace.
    Size { size: u64, digits: bool },
    /// Inside chunk data: this many bytes to go.
    Data(u64),
    /// After chunk data, until the end of its CRLF.
    DataEnd,
    /// In the trailer section; `empty` while the current line has nothing but CR.
    Trailers { empty: bool },
}

/// The framing state machine, fed with every byte read from the client.
#[derive(Debug)]
pub(crate) struct Framing {
    step: Step,
    heads: u64,
}

impl Default for Framing {
    fn default() -> Self {
        Framing {
            step: Step::Head {
                partial: Vec::new(),
            },
            heads: 0,
        }
    }
}

impl Framing {
    /// Consumes bytes read from the client and returns what they completed or began.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) -> Vec<Event> {
        let mut events = Vec::new();
        while !bytes.is_empty() {
            match &mut self.step {
                Step::Off => break,
                Step::Body(left) => {
                    let take = (*left).min(bytes.len() as u64);
                    *left -= take;
                    bytes = &bytes[take as usize..];
                    if *left == 0 {
                        self.step = Step::Head {
                            partial: Vec::new(),
                        };
                    }
                }
                Step::Chunked(chunk) => {
                    let (used, done) = chunk.feed(bytes);
                    bytes = &bytes[used..];
                    match done {
                        Some(true) => {
                            self.step = Step::Head {
                                partial: Vec::new(),
                            }
                        }
                        // Not a chunked body hyper accepts: it fails the request and closes.
                        Some(false) => self.step = Step::Off,
                        None => {}
                    }
                }
                Step::Head { partial } => {
                    let first = partial.is_empty();
                    if first {
                        // Blank lines between messages are skipped (RFC 9112 §2.2), as hyper does;
                        // they do not start a head.
                        let blank = bytes
                            .iter()
                            .take_while(|b| matches!(b, b'\r' | b'\n'))
                            .count();
                        bytes = &bytes[blank..];
                        if bytes.is_empty() {
                            break;
                        }
                        events.push(Event::HeadStarted);
                    }
                    let had = partial.len();
                    let parsed = if first {
                        parse_head(bytes)
                    } else {
                        partial.extend_from_slice(bytes);
                        parse_head(partial)
                    };
                    match parsed {
                        Parsed::Partial => {
                            if first {
                                partial.extend_from_slice(bytes);
                            }
                            bytes = &[];
                            if partial.len() > MAX_HEADER_BYTES {
                                // hyper answers 431 and closes.
                                self.step = Step::Off;
                                events.push(Event::Stopped);
                            }
                        }
                        Parsed::Refused => {
                            self.step = Step::Off;
                            events.push(Event::Stopped);
                        }
                        Parsed::Done { len, framing } => {
                            // Only the part of this read that belongs to the head is used.
                            bytes = &bytes[len - had..];
                            let index = self.heads;
                            self.heads += 1;
                            let conflict = matches!(framing, BodyFraming::Conflict);
                            events.push(Event::HeadDone { index, conflict });
                            self.step = match framing {
                                BodyFraming::Length(0) => Step::Head {
                                    partial: Vec::new(),
                                },
                                BodyFraming::Length(n) => Step::Body(n),
                                BodyFraming::Chunked => Step::Chunked(Chunk::Size {
                                    size: 0,
                                    digits: false,
                                }),
                                BodyFraming::Conflict => Step::Off,
                            };
                        }
                    }
                }
            }
        }
        events
    }
}

impl Chunk {
    /// Consumes bytes of a chunked body: how many it used, and `Some(true)` when the body ended,
    /// `Some(false)` when the bytes are not a chunked body hyper would accept.
    fn feed(&mut self, bytes: &[u8]) -> (usize, Option<bool>) {
        let mut i = 0;
        while i < bytes.len() {
            match self {
                Chunk::Size { size, digits } => {
                    let b = bytes[i];
                    i += 1;
                    if b == b'\n' {
                        *self = if *size == 0 {
                            Chunk::Trailers { empty: true }
                        } else {
                            Chunk::Data(*size)
                        };
                    } else if !*digits {
                        match (b as char).to_digit(16) {
                            Some(d) => match size.checked_mul(16) {
                                Some(s) => *size = s + u64::from(d),
                                None => return (i, Some(false)),
                            },
                            None => *digits = true,
                        }
                    }
                }
                Chunk::Data(left) => {
                    let take = (*left).min((bytes.len() - i) as u64);
                    *left -= take;
                    i += take as usize;
                    if *left == 0 {
                        *self = Chunk::DataEnd;
                    }
                }
                Chunk::DataEnd => {
                    let b = bytes[i];
                    i += 1;
                    if b == b'\n' {
                        *self = Chunk::Size {
                            size: 0,
                            digits: false,
                        };
                    }
                }
                Chunk::Trailers { empty } => {
                    let b = bytes[i];
                    i += 1;
                    if b == b'\n' {
                        if *empty {
                            return (i, Some(true));
                        }
                        *empty = true;
                    } else if b != b'\r' {
                        *empty = false;
                    }
                }
            }
        }
        (i, None)
    }
}

/// How a request's body is framed (RFC 9112 §6.3).
#[derive(Debug)]
enum BodyFraming {
    Length(u64),
    Chunked,
    /// Both `Content-Length` and `Transfer-Encoding`.
    Conflict,
}

enum Parsed {
    Partial,
    /// Not a head hyper accepts (or the HTTP/2 preface): hyper decides what happens.
    Refused,
    Done {
        len: usize,
        framing: BodyFraming,
    },
}

fn parse_head(bytes: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(_) => Parsed::Refused,
        Ok(httparse::Status::Complete(len)) => {
            let mut length = None;
            let mut unparsable = false;
            let mut chunked = false;
            let mut te = false;
            for header in request.headers.iter() {
                if header.name.eq_ignore_ascii_case("content-length") {
                    // A value hyper cannot parse is still a second framing when it comes after
                    // `Transfer-Encoding`: hyper skips it unread and serves the chunked body,
                    // while a proxy in front may read it (`5, 5`) as a length.
                    match std::str::from_utf8(header.value)
                        .ok()
                        .and_then(|v| v.trim().parse::<u64>().ok())
                    {
                        Some(n) => length = Some(n),
                        None => unparsable = true,
                    }
                } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                    te = true;
                    // The last coding decides (hyper reads the last value the same way).
                    chunked = header
                        .value
                        .rsplit(|b| *b == b',')
                        .next()
                        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                }
            }
            let framing = match (te, length) {
                (true, _) if unparsable => BodyFraming::Conflict,
                // Without `Transfer-Encoding` hyper refuses the head itself.
                (false, _) if unparsable => return Parsed::Refused,
                (true, Some(_)) => BodyFraming::Conflict,
                (true, None) if chunked => BodyFraming::Chunked,
                (true, None) => return Parsed::Refused,
                (false, Some(n)) => BodyFraming::Length(n),
                (false, None) => BodyFraming::Length(0),
            };
            Parsed::Done { len, framing }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(index: u64, conflict: bool) -> Event {
        Event::HeadDone { index, conflict }
    }

    #[test]
    fn heads_are_found_across_bodies_and_reads() {
        let mut f = Framing::default();
        let stream: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
            POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
            POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n\
            GET /d HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        let want = vec![
            Event::HeadStarted,
            done(0, false),
            Event::HeadStarted,
            done(1, false),
            Event::HeadStarted,
            done(2, false),
            Event::HeadStarted,
            done(3, true),
        ];
        // All at once, and one byte at a time, give the same events.
        assert_eq!(f.feed(stream), want);
        let mut f = Framing::default();
        let bytewise: Vec<Event> = stream.chunks(1).flat_map(|b| f.feed(b)).collect();
        assert_eq!(bytewise, want);
        let mut f = Framing::default();
        let sevens: Vec<Event> = stream.chunks(7).flat_map(|b| f.feed(b)).collect();
        assert_eq!(sevens, want);
    }

    #[test]
    fn blank_lines_between_messages_do_not_start_a_head() {
        let mut f = Framing::default();
        let body = b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(f.feed(body), vec![Event::HeadStarted, done(0, false)]);
        assert!(f.feed(b"\r\n").is_empty());
        assert_eq!(
            f.feed(b"GET / HTTP/1.1\r\n\r\n"),
            vec![Event::HeadStarted, done(1, false)]
        );
    }

    #[test]
    fn either_order_of_the_two_framings_is_a_conflict() {
        for head in [
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"[..],
            &b"POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: gzip, chunked\r\n\r\n"[..],
            // hyper never parses a Content-Length after Transfer-Encoding: any value conflicts.
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3, 3\r\n\r\n"[..],
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: x\r\n\r\n"[..],
        ] {
            let mut f = Framing::default();
            assert_eq!(f.feed(head), vec![Event::HeadStarted, done(0, true)]);
        }
    }

    #[test]
    fn the_http2_preface_and_garbage_stop_the_watch() {
        let mut f = Framing::default();
        assert_eq!(
            f.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0"),
            vec![Event::HeadStarted, Event::Stopped]
        );
        assert!(f.feed(b"GET / HTTP/1.1\r\n\r\n").is_empty());
    }
}
