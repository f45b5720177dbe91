import CUV
import Glibc

/// A single-threaded libuv event loop that every lock, semaphore and connection runs on.
///
/// All state of the objects bound to a loop is touched only on the loop's thread; other
/// threads reach it through ``execute(_:)``. An `EventLoop` either owns its `uv_loop_t` and a
/// thread that runs it (``init()``, ``shared``), or borrows a loop that the caller already runs
/// (``init(borrowing:)``), for embedding in an existing libuv program.
public final class EventLoop: @unchecked Sendable {
    /// The process-wide loop, started on first use on a thread of its own. It is never shut down.
    public static let shared = EventLoop()

    /// The libuv loop. Touch it only on the loop thread.
    let raw: UnsafeMutablePointer<uv_loop_t>

    /// One read buffer for every stream on the loop: libuv calls a stream's allocation callback
    /// and its read callback back to back on this thread, so the bytes are consumed before the
    /// buffer is handed out again. Thousands of idle connections then cost no buffer each.
    let readBuffer: UnsafeMutableRawBufferPointer

    /// One buffer for the plaintext that every TLS connection on the loop decrypts into (the
    /// ciphertext it decrypts sits in ``readBuffer`` at the time, hence a second buffer). A
    /// connection fills it with `SSL_read` and hands it to its delegate before returning from
    /// its read callback, and libuv never nests read callbacks, so one buffer serves them all.
    /// 16 KiB is the largest plaintext of one TLS record. Allocated on first TLS use; loop thread only.
    var tlsPlaintextBuffer: UnsafeMutableRawBufferPointer {
        if let buffer = tlsBuffer { return buffer }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 16 * 1024, alignment: 16)
        tlsBuffer = buffer
        return buffer
    }

    /// Set while a TLS connection has undelivered plaintext in ``tlsPlaintextBuffer`` (a check
    /// that the buffer is never used by two connections at once). Loop thread only.
    var tlsPlaintextBufferInUse = false

    private var tlsBuffer: UnsafeMutableRawBufferPointer?

    /// Read callbacks since the loop last polled: one per connection that had bytes waiting
    /// (more only for a connection with over 64 KiB waiting). Loop thread only.
    var readsSincePoll = 0

    /// Times the loop waited out its batching window before polling. Loop thread only.
    private(set) var batchingWaits = 0

    private let ownsLoop: Bool
    private let loopThread: pthread_t
    private let wakeup: UnsafeMutablePointer<uv_async_t>
    /// Runs just before each poll to apply the batching window; nil when the window is zero.
    private let beforePoll: UnsafeMutablePointer<uv_prepare_t>?
    private let batchingWindow: timespec
    private let inbox = ThreadLock(Inbox())

    /// Resources that must be closed when the loop shuts down. Loop thread only. Held weakly:
    /// a connection its owner dropped must still be free to go away.
    private var resources: [ObjectIdentifier: WeakResource] = [:]
    private var isShutDown = false

    /// The executor's jobs enqueued on the loop thread (`EventLoop+Executor.swift`).
    let runQueue = RunQueue()

    private struct Inbox {
        var work: [@Sendable () -> Void] = []
        var isClosed = false
    }

    /// Creates a loop with its own `uv_loop_t` and starts a thread that runs it.
    ///
    /// Call ``shutdown()`` to stop the thread and free the loop; ``shared`` never needs it.
    public convenience init() {
        self.init(batchingWindow: .zero)
    }

    /// Creates a loop with its own thread, like ``init()``, that batches the replies of a busy
    /// server into fewer wake-ups.
    ///
    /// Whenever the last turn of the loop read from more than one connection, the loop waits
    /// `batchingWindow` before it polls again, so that the replies arriving meanwhile are read
    /// in one wake-up instead of one each. Every wake-up costs the client a context switch and
    /// costs the server the work of waking it, so with many connections busy at once (hundreds
    /// of workers, thousands of renewing locks) this saves CPU on both sides and, when the
    /// server is the bottleneck, raises its throughput. A loop that reads from one connection
    /// at a time never waits, so a lightly loaded client pays nothing; a busy one pays up to
    /// `batchingWindow` of latency per turn, and timers and ``execute(_:)`` work may run that
    /// much later too.
    ///
    /// With `make bench` (100 workers against dflockd 0.5.0 on loopback), a window of 300 µs
    /// raised throughput by about a third and lowered client CPU per operation by about 40 %;
    /// the README's Performance section has the figures.
    ///
    /// - Parameter batchingWindow: How long to wait before polling after a busy turn. Zero
    ///   turns batching off (the behaviour of ``init()``); a negative value counts as zero, and
    ///   anything above 10 ms as 10 ms.
    public init(batchingWindow: Duration) {
        raw = .allocate(capacity: 1)
        precondition(uv_loop_init(raw) == 0, "uv_loop_init failed")
        ownsLoop = true
        readBuffer = .allocate(byteCount: 64 * 1024, alignment: 16)
        wakeup = .allocate(capacity: 1)
        precondition(uv_async_init(raw, wakeup, EventLoop.onWakeup) == 0, "uv_async_init failed")
        let window = min(max(batchingWindow, .zero), .milliseconds(10))
        let nanoseconds = window.components.seconds * 1_000_000_000 + window.components.attoseconds / 1_000_000_000
        self.batchingWindow = timespec(tv_sec: Int(nanoseconds / 1_000_000_000), tv_nsec: Int(nanoseconds % 1_000_000_000))
        if nanoseconds > 0 {
            let prepare = UnsafeMutablePointer<uv_prepare_t>.allocate(capacity: 1)
            precondition(uv_prepare_init(raw, prepare) == 0, "uv_prepare_init failed")
            // Unreferenced: the window must never be what keeps the loop running.
            uv_unref(prepare.asHandle)
            beforePoll = prepare
        } else {
            beforePoll = nil
        }
        loopThread = EventLoop.startThread(running: raw)
        runQueue.bind(to: self)
        wakeup.pointee.data = Unmanaged.passUnretained(self).toOpaque()
        if let beforePoll {
            beforePoll.pointee.data = Unmanaged.passUnretained(self).toOpaque()
            // Started on the loop thread: the handle is the loop's from here on.
            execute { [self] in startBatching() }
        }
    }

    /// Wraps a libuv loop that the caller runs, for embedding in an existing libuv program.
    ///
    /// Create it on the thread that runs `loop`, before or between runs of the loop. The wrapper
    /// adds one unreferenced `uv_async_t` to the loop, so it never keeps `uv_run` from
    /// returning by itself; open connections and timers do, as any libuv handle does. Call
    /// ``shutdown()`` on the loop thread before closing the loop.
    ///
    /// - Parameter loop: A loop initialised with `uv_loop_init` (or `uv_default_loop()`).
    public init(borrowing loop: UnsafeMutablePointer<uv_loop_t>) {
        raw = loop
        ownsLoop = false
        beforePoll = nil
        batchingWindow = timespec()
        readBuffer = .allocate(byteCount: 64 * 1024, alignment: 16)
        wakeup = .allocate(capacity: 1)
        precondition(uv_async_init(raw, wakeup, EventLoop.onWakeup) == 0, "uv_async_init failed")
        uv_unref(wakeup.asHandle)
        loopThread = pthread_self()
        runQueue.bind(to: self)
        wakeup.pointee.data = Unmanaged.passUnretained(self).toOpaque()
    }

    /// Whether the calling thread is the one that runs this loop.
    public var inEventLoop: Bool {
        pthread_equal(pthread_self(), loopThread) != 0
    }

    /// Schedules `work` to run on the loop thread. Safe from any thread, including the loop's own
    /// (the work then runs on a later turn of the loop, never re-entrantly).
    ///
    /// Work submitted after ``shutdown()`` is dropped.
    public func execute(_ work: @escaping @Sendable () -> Void) {
        _ = tryExecute(work)
    }

    /// Schedules `work` like ``execute(_:)``; false when the loop has shut down and the work
    /// was dropped.
    func tryExecute(_ work: @escaping @Sendable () -> Void) -> Bool {
        // The send happens under the lock: once shutdown has marked the inbox closed, no thread
        // can reach the wake-up handle, which is closed right after.
        inbox.withLock { inbox -> Bool in
            guard !inbox.isClosed else { return false }
            inbox.work.append(work)
            uv_async_send(wakeup)
            return true
        }
    }

    /// Closes every connection and timer still open on this loop, then its wake-up handle.
    ///
    /// For a loop made with ``init()`` this blocks until the loop thread has exited and frees the
    /// loop; do not call it on the loop thread. For a borrowed loop call it on the loop thread;
    /// the close callbacks run on the caller's next turn of the loop. Calling it twice does
    /// nothing more.
    public func shutdown() {
        if ownsLoop {
            precondition(!inEventLoop, "EventLoop.shutdown() of an owned loop must not be called on its own thread")
            let wasClosed = inbox.withLock { $0.isClosed }
            guard !wasClosed else { return }
            execute { [self] in closeEverything() }
            pthread_join(loopThread, nil)
            precondition(uv_loop_close(raw) == 0, "a libuv handle outlived EventLoop.shutdown()")
            raw.deallocate()
        } else {
            precondition(inEventLoop, "EventLoop.shutdown() of a borrowed loop must be called on the loop thread")
            closeEverything()
        }
    }

    deinit {
        readBuffer.deallocate()
        tlsBuffer?.deallocate()
    }

    // MARK: - Loop-thread internals

    /// Tracks a resource so that ``shutdown()`` can close it. Loop thread only.
    func register(_ resource: any LoopResource) {
        resources[ObjectIdentifier(resource)] = WeakResource(resource: resource)
    }

    /// Stops tracking a resource that has closed itself. Loop thread only.
    func unregister(_ resource: any LoopResource) {
        unregister(ObjectIdentifier(resource))
    }

    /// Stops tracking a resource by identity, from its deinit. Loop thread only.
    func unregister(_ identifier: ObjectIdentifier) {
        resources[identifier] = nil
    }

    /// Fails fast when loop-confined state is touched from another thread.
    @inline(__always)
    func assertInLoop(_ file: StaticString = #fileID, _ line: UInt = #line) {
        assert(inEventLoop, "touched off the event loop thread", file: file, line: line)
    }

    private func closeEverything() {
        guard !isShutDown else { return }
        isShutDown = true
        // Closed first, then drained: work queued up to now still runs (it may be the close of
        // a lock a caller dropped), and whatever that work schedules finds the loop closed and
        // completes inline instead of being lost.
        inbox.withLock { $0.isClosed = true }
        drainInbox()
        while let (identifier, entry) = resources.first {
            resources[identifier] = nil
            entry.resource?.closeForShutdown()
        }
        // Executor jobs: the tasks just failed with eventLoopShutDown run on to their end.
        runQueue.shutDown(loop: self)
        uv_close(wakeup.asHandle, freeHandleOnClose)
        if let beforePoll { uv_close(beforePoll.asHandle, freeHandleOnClose) }
    }

    private func drainInbox() {
        let work = inbox.withLock { inbox -> [@Sendable () -> Void] in
            let work = inbox.work
            inbox.work.removeAll(keepingCapacity: true)
            return work
        }
        for item in work { item() }
    }

    private static let onWakeup: uv_async_cb = { handle in
        guard let data = handle?.pointee.data else { return }
        Unmanaged<EventLoop>.fromOpaque(data).takeUnretainedValue().drainInbox()
    }

    private func startBatching() {
        guard let beforePoll, !isShutDown else { return }
        uv_prepare_start(beforePoll, EventLoop.onBeforePoll)
    }

    private static let onBeforePoll: uv_prepare_cb = { handle in
        guard let data = handle?.pointee.data else { return }
        let loop = Unmanaged<EventLoop>.fromOpaque(data).takeUnretainedValue()
        let busy = loop.readsSincePoll > 1
        loop.readsSincePoll = 0
        guard busy else { return }
        loop.batchingWaits &+= 1
        var window = loop.batchingWindow
        // An interrupted sleep only shortens the window; the poll that follows is what matters.
        _ = nanosleep(&window, nil)
    }

    private static func startThread(running loop: UnsafeMutablePointer<uv_loop_t>) -> pthread_t {
        var thread = pthread_t()
        let context = UnsafeMutableRawPointer(loop)
        let result = pthread_create(&thread, nil, { context in
            let loop = context!.assumingMemoryBound(to: uv_loop_t.self)
            // The wake-up handle stays referenced until shutdown, so this returns only then.
            while uv_run(loop, UV_RUN_DEFAULT) != 0 {}
            return nil
        }, context)
        precondition(result == 0, "pthread_create failed: \(result)")
        return thread
    }
}

private struct WeakResource {
    weak var resource: (any LoopResource)?
}

/// Something on the loop that holds libuv handles and must be closed before the loop stops.
protocol LoopResource: AnyObject {
    /// Closes the resource's handles through `uv_close`, failing whatever waits on it. Called
    /// on the loop thread by ``EventLoop/shutdown()``; idempotent.
    func closeForShutdown()
}
