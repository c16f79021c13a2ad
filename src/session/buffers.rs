//! Sizing of a session's four buffers, and what happens to them when the
//! session goes idle: an idle client keeps no large buffer (it may stay idle
//! for hours, and 10,000 of them should fit in about 100 MB), and the small
//! ones it gives up serve the next transaction on the same worker thread.

use bytes::BytesMut;

/// Spare capacity made available for each read.
pub(super) const READ_RESERVE: usize = 16 * 1024;
/// Spare capacity for a client's next request while it holds no server
/// connection: most requests fit, and an idle client costs little.
pub(super) const IDLE_READ_RESERVE: usize = 1024;
/// Spare capacity for reads while it suffices: most answers are small, and a
/// small buffer is cheap to allocate for each transaction. A read that fills
/// it switches the attachment to [`READ_RESERVE`].
pub(super) const SMALL_READ_RESERVE: usize = 2048;
/// Empty buffers larger than this are freed when a client goes idle.
const IDLE_KEEP: usize = 1024;

/// Spare buffers kept per worker thread (see [`recycle`]).
const SPARE_MAX: usize = 64;

thread_local! {
    /// Emptied buffers of sessions that went idle, for the next transaction
    /// that runs on this thread: a buffer of a few KiB is past glibc's
    /// per-thread cache, so reusing one here saves a malloc and a free per
    /// transaction, and an idle client still holds none.
    static SPARE: std::cell::RefCell<Vec<BytesMut>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Gives up an empty buffer's large allocation (the next use allocates
/// again).
pub(super) fn shrink(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > IDLE_KEEP {
        *buf = BytesMut::new();
    }
}

/// [`shrink`] for a buffer nothing was ever split off (the server read
/// buffer and the two output buffers): a small allocation goes to this
/// thread's spare buffers when there is room.
pub(super) fn recycle(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > IDLE_KEEP {
        let mut old = std::mem::take(buf);
        // A buffer's capacity counts only what lies after its start: bring
        // the whole allocation into view (nothing shares it, and it is
        // empty, so this moves nothing) before judging its size.
        let _ = old.try_reclaim(old.capacity() + 1);
        if old.capacity() <= 2 * READ_RESERVE {
            // Not during a thread's teardown.
            let _ = SPARE.try_with(|spare| {
                let mut spare = spare.borrow_mut();
                if spare.len() < SPARE_MAX {
                    spare.push(old);
                }
            });
        }
    }
}

/// A spare buffer of this thread, or a new empty one.
pub(super) fn spare_buffer() -> BytesMut {
    SPARE
        .try_with(|spare| spare.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_default()
}
