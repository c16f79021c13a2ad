//! Log lines leave the worker threads without waiting for stderr.
//!
//! stderr is usually a pipe to a log collector (journald, a container runtime,
//! a shell's `| tee`). When the collector stops reading, the pipe fills, and a
//! plain `write` blocks: the worker thread that logged a login would stop
//! serving every client on it, and soon every thread would. So the binary's log
//! lines go into a bounded queue that one thread of their own writes to stderr;
//! a line that finds the queue full is dropped and counted
//! (`dbproxy_log_lines_dropped_total`), and once stderr takes lines again a
//! warning says how many were lost.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::{Duration, Instant};

/// Lines the queue holds: a few MiB of text at most, minutes of ordinary logging.
pub const QUEUE_LINES: usize = 16 * 1024;

/// Bytes gathered into one write to stderr.
const BATCH_BYTES: usize = 64 * 1024;

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped so far because the queue to stderr was full.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

enum Msg {
    Line(Vec<u8>),
    /// Everything queued before it has been written: say so on the channel.
    Flush(SyncSender<()>),
}

/// The writer for `tracing_subscriber::fmt().with_writer(..)`: queues each
/// formatted event (one `write` call per event) without blocking.
#[derive(Clone)]
pub struct QueueWriter {
    tx: SyncSender<Msg>,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for QueueWriter {
    type Writer = &'a QueueWriter;

    fn make_writer(&'a self) -> &'a QueueWriter {
        self
    }
}

impl Write for &QueueWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(Msg::Line(buf.to_vec())) {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts the thread that writes queued lines to `out` (stderr in the binary).
/// Returns the writer to log through and a handle to flush it at exit.
pub fn start(out: impl Write + Send + 'static) -> std::io::Result<(QueueWriter, Flusher)> {
    let (tx, rx) = sync_channel(QUEUE_LINES);
    std::thread::Builder::new()
        .name("dbproxy-log".into())
        .spawn(move || write_lines(rx, out))?;
    Ok((QueueWriter { tx: tx.clone() }, Flusher { tx }))
}

fn write_lines(rx: Receiver<Msg>, mut out: impl Write) {
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    let mut reported = 0;
    while let Ok(first) = rx.recv() {
        let mut acks = Vec::new();
        let mut next = Ok(first);
        // Gather what is already queued into one write.
        while let Ok(msg) = next {
            match msg {
                Msg::Line(line) => batch.extend_from_slice(&line),
                Msg::Flush(ack) => acks.push(ack),
            }
            if batch.len() >= BATCH_BYTES {
                break;
            }
            next = rx.try_recv().map_err(|e| matches!(e, TryRecvError::Disconnected));
        }
        // A write error (stderr closed) drops the batch: nothing else to tell.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        for ack in acks {
            let _ = ack.try_send(());
        }
        let dropped = dropped_lines();
        if dropped > reported {
            // Through the subscriber, so it has the configured format; it
            // queues like any other line, and cannot wait on this thread.
            tracing::warn!(
                dropped = dropped - reported,
                "log lines dropped: stderr did not take them fast enough"
            );
            reported = dropped;
        }
    }
}

/// Flushes the log queue at exit.
pub struct Flusher {
    tx: SyncSender<Msg>,
}

impl Flusher {
    /// Waits until the lines logged so far are written, or `limit` passed (a
    /// stderr nobody reads must not keep the process from exiting).
    pub fn flush(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let (ack_tx, ack_rx) = sync_channel(1);
        let mut msg = Msg::Flush(ack_tx);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
        let _ = ack_rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A `Write` whose bytes the test can read, and which can be made to block.
    #[derive(Clone, Default)]
    struct Sink {
        bytes: Arc<Mutex<Vec<u8>>>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _open = self.gate.lock().unwrap();
            self.bytes.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_written_in_order_and_flush_waits_for_them() {
        let sink = Sink::default();
        let (writer, flusher) = start(sink.clone()).unwrap();
        for i in 0..1000 {
            (&writer).write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        flusher.flush(Duration::from_secs(10));
        let text = String::from_utf8(sink.bytes.lock().unwrap().clone()).unwrap();
        let expected: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text, expected);
    }

    #[test]
    fn a_blocked_output_drops_lines_instead_of_blocking_the_caller() {
        let sink = Sink::default();
        let closed = sink.gate.lock().unwrap();
        let (writer, flusher) = start(sink.clone()).unwrap();
        let before = dropped_lines();
        let line = [b'x'; 512];
        let started = Instant::now();
        for _ in 0..QUEUE_LINES + 1000 {
            (&writer).write_all(&line).unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        // The writer thread holds one batch it cannot write (at most 129 of
        // these lines), the queue the next QUEUE_LINES; the rest are dropped.
        assert!(dropped_lines() - before >= 1000 - 129, "{}", dropped_lines() - before);
        // A flush with stderr blocked gives up after its limit.
        let started = Instant::now();
        flusher.flush(Duration::from_millis(100));
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(closed);
        flusher.flush(Duration::from_secs(10));
        assert!(sink.bytes.lock().unwrap().len() >= QUEUE_LINES * line.len());
    }
}
