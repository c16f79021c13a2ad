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
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

/// Lines the queue holds: minutes of ordinary logging.
pub const QUEUE_LINES: usize = 16 * 1024;

/// Bytes the queued lines may hold between them. Some lines repeat what a
/// client sent (a refused login names its user, up to a startup packet's
/// 10,000 bytes), so the line count alone would not bound the memory.
pub const QUEUE_BYTES: usize = 8 * 1024 * 1024;

/// Bytes gathered into one write to stderr.
const BATCH_BYTES: usize = 64 * 1024;

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped so far: the queue to stderr was full, or stderr refused
/// the write.
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
    counts: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    /// Bytes queued and not yet written.
    queued: AtomicUsize,
    /// Lines queued and not yet written.
    queued_lines: AtomicUsize,
    /// Lines this queue dropped (`DROPPED` counts those of all queues).
    dropped: AtomicU64,
}

impl QueueWriter {
    fn count_dropped(&self, lines: usize) {
        self.counts.dropped.fetch_add(lines as u64, Ordering::Relaxed);
        DROPPED.fetch_add(lines as u64, Ordering::Relaxed);
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for QueueWriter {
    type Writer = &'a QueueWriter;

    fn make_writer(&'a self) -> &'a QueueWriter {
        self
    }
}

impl Write for &QueueWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Counted before it is sent, so that the writer thread, which
        // uncounts what it wrote, never takes the counts below zero.
        let (bytes, lines) = (&self.counts.queued, &self.counts.queued_lines);
        let over = bytes.fetch_add(buf.len(), Ordering::Relaxed) + buf.len() > QUEUE_BYTES;
        lines.fetch_add(1, Ordering::Relaxed);
        // Full, or the writer thread is gone.
        if over || self.tx.try_send(Msg::Line(buf.to_vec())).is_err() {
            bytes.fetch_sub(buf.len(), Ordering::Relaxed);
            lines.fetch_sub(1, Ordering::Relaxed);
            self.count_dropped(1);
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
    // Through the subscriber, so it has the configured format; it queues
    // like any other line (without waiting).
    spawn(out, |_, dropped| {
        tracing::warn!(dropped, "log lines dropped: stderr did not take them fast enough")
    })
}

/// [`start`] with `report(writer, n)` saying that `n` more lines were dropped.
fn spawn(
    out: impl Write + Send + 'static,
    report: impl Fn(&QueueWriter, u64) + Send + 'static,
) -> std::io::Result<(QueueWriter, Flusher)> {
    let (tx, rx) = sync_channel(QUEUE_LINES);
    let writer = QueueWriter {
        tx: tx.clone(),
        counts: Arc::default(),
    };
    let own = writer.clone();
    std::thread::Builder::new()
        .name("dbproxy-log".into())
        .spawn(move || write_lines(rx, out, &own, report))?;
    Ok((writer, Flusher { tx }))
}

fn write_lines(rx: Receiver<Msg>, mut out: impl Write, own: &QueueWriter, report: impl Fn(&QueueWriter, u64)) {
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    let dropped_so_far = || own.counts.dropped.load(Ordering::Relaxed);
    let mut reported = 0;
    // While stderr trickles, at most one report a second.
    let mut last_report: Option<Instant> = None;
    // Flushes wait until the lines before them are written, and the report of
    // lines dropped before them.
    let mut acks: Vec<SyncSender<()>> = Vec::new();
    loop {
        let unreported = dropped_so_far() > reported;
        let first = if !acks.is_empty() {
            // A flush waits; if the report does not come through (no
            // subscriber, or the queue was full again), not for long.
            rx.recv_timeout(Duration::from_millis(20))
        } else if unreported {
            // Drops not yet reported: report them within a second even if
            // nothing else is logged.
            rx.recv_timeout(Duration::from_secs(1))
        } else {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        };
        let timed_out = matches!(first, Err(RecvTimeoutError::Timeout));
        let mut lines = 0;
        match first {
            Ok(first) => {
                let mut next = Some(first);
                // Gather what is already queued into one write.
                while let Some(msg) = next {
                    match msg {
                        Msg::Line(line) => {
                            batch.extend_from_slice(&line);
                            lines += 1;
                        }
                        Msg::Flush(ack) => acks.push(ack),
                    }
                    if batch.len() >= BATCH_BYTES {
                        break;
                    }
                    next = rx.try_recv().ok();
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if !batch.is_empty() && out.write_all(&batch).and_then(|()| out.flush()).is_err() {
            // stderr closed or refusing: nothing to tell, but count them.
            own.count_dropped(lines);
        }
        own.counts.queued.fetch_sub(batch.len(), Ordering::Relaxed);
        own.counts.queued_lines.fetch_sub(lines, Ordering::Relaxed);
        batch.clear();
        let dropped = dropped_so_far();
        let due = last_report.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        // A flush that just came in gets its report at once; and only with
        // room in the queue, lest the report itself be dropped.
        let room = own.counts.queued.load(Ordering::Relaxed) < QUEUE_BYTES / 2
            && own.counts.queued_lines.load(Ordering::Relaxed) < QUEUE_LINES / 2;
        let due_now = dropped > reported && room && (due || (!acks.is_empty() && !timed_out));
        if due_now {
            // A flush waits for this line (up to the 20 ms above).
            report(own, dropped - reported);
            reported = dropped;
            last_report = Some(Instant::now());
        }
        // Once the queue is empty (the report written too), or nothing came
        // for 20 ms.
        let drained = own.counts.queued_lines.load(Ordering::Relaxed) == 0;
        if timed_out || (!due_now && drained && dropped == reported) {
            acks.drain(..).for_each(|ack| {
                let _ = ack.try_send(());
            });
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
        let line = [b'x'; 256];
        let started = Instant::now();
        for _ in 0..QUEUE_LINES + 1000 {
            (&writer).write_all(&line).unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        // The writer thread holds one batch it cannot write (at most 256 of
        // these lines), the queue the next QUEUE_LINES; the rest are dropped.
        let dropped = writer.counts.dropped.load(Ordering::Relaxed);
        assert!(dropped >= 1000 - 256, "{dropped}");
        // A flush with stderr blocked gives up after its limit.
        let started = Instant::now();
        flusher.flush(Duration::from_millis(100));
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(closed);
        flusher.flush(Duration::from_secs(10));
        assert!(sink.bytes.lock().unwrap().len() >= QUEUE_LINES * line.len());
    }

    #[test]
    fn dropped_lines_are_reported_before_a_flush_returns() {
        let sink = Sink::default();
        let closed = sink.gate.lock().unwrap();
        let (writer, flusher) = spawn(sink.clone(), |mut w, n| {
            let _ = w.write_all(format!("dropped {n}\n").as_bytes());
        })
        .unwrap();
        // Long enough that the writer thread's blocked batch holds few.
        let line = [b'x'; 255].iter().chain(b"\n").copied().collect::<Vec<u8>>();
        for _ in 0..QUEUE_LINES + 1000 {
            (&writer).write_all(&line).unwrap();
        }
        drop(closed);
        flusher.flush(Duration::from_secs(10));
        let text = String::from_utf8(sink.bytes.lock().unwrap().clone()).unwrap();
        let last = text.lines().last().unwrap_or_default();
        let n: usize = last.strip_prefix("dropped ").and_then(|n| n.parse().ok()).unwrap_or(0);
        // The writer thread's batch took some lines before it blocked.
        assert!(n > 0 && text.lines().count() == QUEUE_LINES + 1000 - n + 1, "{last}");
    }

    #[test]
    fn the_queue_holds_at_most_queue_bytes() {
        let sink = Sink::default();
        let closed = sink.gate.lock().unwrap();
        let (writer, flusher) = start(sink.clone()).unwrap();
        let line = vec![b'y'; 100 * 1024];
        for _ in 0..200 {
            (&writer).write_all(&line).unwrap();
        }
        // QUEUE_BYTES / 100 KiB = 81 lines, the one in the blocked batch
        // included.
        assert_eq!(writer.counts.dropped.load(Ordering::Relaxed), 200 - 81);
        assert!(writer.counts.queued.load(Ordering::Relaxed) <= QUEUE_BYTES);
        drop(closed);
        flusher.flush(Duration::from_secs(10));
        assert_eq!(writer.counts.queued.load(Ordering::Relaxed), 0);
        assert_eq!(sink.bytes.lock().unwrap().len(), 81 * line.len());
    }
}
