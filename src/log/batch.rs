//! Where log lines go: stderr. On a terminal each line is written as it is logged. Anywhere else
//! (a file, a pipe to a log collector, as a sidecar runs) lines are kept in a buffer of
//! [`BATCH_BYTES`] and written when it fills, and by a thread of their own at most [`BATCH_PERIOD`]
//! after they were logged: one `write` for a few hundred access-log lines instead of one for each
//! call, which under load was the gateway's largest single cost after the socket itself.
//!
//! A warning or an error is written at once, with every line logged before it, and so is whatever
//! is buffered when the process exits ([`flush`], called by `main`) or panics. A process killed
//! with SIGKILL loses at most the last [`BATCH_PERIOD`] of lines below warning level.
//!
//! The buffer is std's `BufWriter` behind a mutex; tracing-appender's non-blocking writer was
//! measured instead and not kept: it hands every line to its thread through a channel, and the
//! wake-ups cost more than the writes they saved (README, Performance).

use std::io::{self, BufWriter, Write};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// How much is buffered before it is written.
pub const BATCH_BYTES: usize = 64 * 1024;

/// The longest a line below warning level waits in the buffer.
pub const BATCH_PERIOD: Duration = Duration::from_millis(100);

/// Lines on their way to `W`.
#[derive(Debug)]
pub struct Batch<W: Write> {
    out: Mutex<BufWriter<W>>,
}

impl<W: Write> Batch<W> {
    /// An empty batch in front of `out`.
    pub fn new(out: W) -> Self {
        Batch {
            out: Mutex::new(BufWriter::with_capacity(BATCH_BYTES, out)),
        }
    }

    /// Adds one line (as the formatter hands it over, newline included); `urgent` writes it out
    /// now with everything before it.
    pub fn write_line(&self, line: &[u8], urgent: bool) -> io::Result<()> {
        let mut out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        out.write_all(line)?;
        if urgent {
            out.flush()?;
        }
        Ok(())
    }

    /// Writes out whatever is buffered.
    pub fn flush(&self) -> io::Result<()> {
        self.out
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .flush()
    }

    /// The writer behind the buffer (what has been written out so far).
    pub fn get_ref(&self) -> std::sync::MutexGuard<'_, BufWriter<W>> {
        self.out.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// stderr's batch, once [`batch_stderr`] has been called.
static STDERR: OnceLock<Batch<io::Stderr>> = OnceLock::new();

/// From now on, lines below warning level written through [`Stderr`] are batched: starts the
/// thread that writes them out every [`BATCH_PERIOD`], and makes a panic write them out before
/// its message. Called once, by `main`, when stderr is not a terminal; later calls do nothing.
pub fn batch_stderr() {
    if STDERR.get().is_some() {
        return;
    }
    // The thread first: without it nothing would write out a quiet gateway's lines, so they are
    // then written as they come, unbatched.
    let flusher = std::thread::Builder::new()
        .name("pcgate-log".to_owned())
        .spawn(|| loop {
            std::thread::sleep(BATCH_PERIOD);
            flush();
        });
    if flusher.is_err() || STDERR.set(Batch::new(io::stderr())).is_err() {
        return;
    }
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        flush();
        previous(info);
    }));
}

/// Writes out whatever stderr's batch holds (nothing to do when lines are not batched).
pub fn flush() {
    if let Some(batch) = STDERR.get() {
        let _ = batch.flush();
    }
}

/// The log's writer (`.with_writer(Stderr)`): stderr, batched once [`batch_stderr`] was called.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stderr;

/// One line on its way to stderr.
#[derive(Debug)]
pub struct Line {
    urgent: bool,
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match STDERR.get() {
            Some(batch) => batch.write_line(buf, self.urgent).map(|()| buf.len()),
            None => io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match STDERR.get() {
            Some(batch) if self.urgent => batch.flush(),
            Some(_) => Ok(()),
            None => io::stderr().flush(),
        }
    }
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line { urgent: true }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        Line {
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(batch: &Batch<Vec<u8>>) -> String {
        String::from_utf8(batch.get_ref().get_ref().clone()).unwrap()
    }

    #[test]
    fn lines_wait_until_a_flush_an_urgent_line_or_a_full_buffer() {
        let batch = Batch::new(Vec::new());
        batch.write_line(b"one\n", false).unwrap();
        batch.write_line(b"two\n", false).unwrap();
        assert_eq!(written(&batch), "", "a line below warning waits");
        batch.flush().unwrap();
        assert_eq!(written(&batch), "one\ntwo\n");

        batch.write_line(b"three\n", false).unwrap();
        batch.write_line(b"warned\n", true).unwrap();
        assert_eq!(
            written(&batch),
            "one\ntwo\nthree\nwarned\n",
            "an urgent line goes out at once, after what came before it"
        );

        let line = [b'x'; 1000];
        let before = written(&batch).len();
        for _ in 0..(BATCH_BYTES / line.len() + 1) {
            batch.write_line(&line, false).unwrap();
        }
        let after = written(&batch).len();
        assert!(
            after > before && after - before >= BATCH_BYTES - line.len(),
            "a full buffer is written out without a flush: {} bytes",
            after - before
        );
    }

    #[test]
    fn warnings_and_errors_are_urgent_the_rest_is_not() {
        let urgent = |level| {
            let callsite = tracing::callsite::Identifier(&CALLSITE);
            let fields = tracing::field::FieldSet::new(&[], callsite);
            let meta = Metadata::new(
                "test",
                "pcgate::test",
                level,
                None,
                None,
                None,
                fields,
                tracing::metadata::Kind::EVENT,
            );
            Stderr.make_writer_for(&meta).urgent
        };
        assert!(urgent(Level::ERROR));
        assert!(urgent(Level::WARN));
        assert!(!urgent(Level::INFO));
        assert!(!urgent(Level::DEBUG));
        assert!(!urgent(Level::TRACE));
    }

    struct Callsite;
    static CALLSITE: Callsite = Callsite;
    impl tracing::callsite::Callsite for Callsite {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &Metadata<'_> {
            unreachable!("not registered")
        }
    }
}
