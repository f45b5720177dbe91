import CUV
import Glibc

/// The batching window of ``EventLoop/init(batchingWindow:)``, applied where the reads happen.
///
/// The TCP transports of a loop count their read callbacks here; an unreferenced `uv_prepare_t`,
/// run just before each poll, sleeps the window when the turn that just ended read from more
/// than one stream, so that the replies arriving meanwhile are read in one wake-up. A loop that
/// reads one stream at a time never waits.
///
/// One per loop thread with a window (an owned loop is the only loop on its thread; a borrowed
/// loop has no window), made by the loop's first TCP transport, kept in the thread's specific
/// data and released when the thread exits. The loop's shutdown closes the handle.
final class ReadBatching: LoopResource {
    /// Read callbacks since the loop last polled. Loop thread only.
    var readsSincePoll = 0
    /// Times the window was waited out before a poll. Loop thread only.
    private(set) var waits = 0

    private let window: timespec
    private var prepare: UnsafeMutablePointer<uv_prepare_t>?

    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        precondition(pthread_key_create(&key, { data in
            if let data { Unmanaged<ReadBatching>.fromOpaque(data).release() }
        }) == 0, "pthread_key_create failed")
        return key
    }()

    /// The batching of `loop`, on its thread; nil when the loop has no window (or has shut down).
    static func of(_ loop: EventLoop) -> ReadBatching? {
        loop.assertInLoop()
        guard let window = loop.batchingWindow else { return nil }
        if let data = pthread_getspecific(key) {
            return Unmanaged<ReadBatching>.fromOpaque(data).takeUnretainedValue()
        }
        guard !loop.isShutDown else { return nil }
        let batching = ReadBatching(loop: loop, window: window)
        pthread_setspecific(key, Unmanaged.passRetained(batching).toOpaque())
        return batching
    }

    private init(loop: EventLoop, window: Duration) {
        let nanoseconds = window.components.seconds * 1_000_000_000 + window.components.attoseconds / 1_000_000_000
        self.window = timespec(tv_sec: Int(nanoseconds / 1_000_000_000), tv_nsec: Int(nanoseconds % 1_000_000_000))
        let prepare = UnsafeMutablePointer<uv_prepare_t>.allocate(capacity: 1)
        precondition(uv_prepare_init(loop.raw, prepare) == 0, "uv_prepare_init failed")
        // Unreferenced: the window must never be what keeps the loop running.
        uv_unref(prepare.asHandle)
        prepare.pointee.data = Unmanaged.passUnretained(self).toOpaque()
        uv_prepare_start(prepare, Self.onBeforePoll)
        self.prepare = prepare
        loop.register(self)
    }

    var closesBeforeTimers: Bool { false }

    func closeForShutdown() {
        guard let prepare else { return }
        self.prepare = nil
        uv_close(prepare.asHandle, freeHandleOnClose)
    }

    private static let onBeforePoll: uv_prepare_cb = { handle in
        guard let data = handle?.pointee.data else { return }
        let batching = Unmanaged<ReadBatching>.fromOpaque(data).takeUnretainedValue()
        let busy = batching.readsSincePoll > 1
        batching.readsSincePoll = 0
        guard busy else { return }
        batching.waits &+= 1
        var window = batching.window
        // An interrupted sleep only shortens the window; the poll that follows is what matters.
        _ = nanosleep(&window, nil)
    }
}
