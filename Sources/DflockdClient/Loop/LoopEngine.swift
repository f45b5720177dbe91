import CUV
import Glibc

/// What runs an ``EventLoop``: its `uv_loop_t`, thread, wake-up handle, inbox of work from
/// other threads, and the registry of what shutdown must close.
///
/// Separate from the public object so that its life is tied to libuv's: the wake-up handle
/// holds a reference to the engine until its close callback, so no callback ever meets a freed
/// engine, and the public object's deinit can shut a forgotten loop down from any thread.
///
/// Inbox and drain (for executors that hook in): ``tryExecute(_:)`` appends under the inbox
/// lock and sends the wake-up; ``drainInbox()`` runs on the loop thread in the wake-up's
/// callback and runs the work taken in one batch, in order.
final class LoopEngine: @unchecked Sendable {
    let raw: UnsafeMutablePointer<uv_loop_t>

    /// One read buffer for every stream on the loop: libuv calls a stream's allocation callback
    /// and its read callback back to back on this thread, so the bytes are consumed before the
    /// buffer is handed out again. Thousands of idle connections then cost no buffer each.
    let readBuffer: UnsafeMutableRawBufferPointer

    /// The batching window the loop was made with (applied by the transport layer); nil for none.
    let batchingWindow: Duration?

    private let ownsLoop: Bool
    private let loopThread: pthread_t
    private let wakeup: UnsafeMutablePointer<uv_async_t>
    private let inbox = ThreadLock(Inbox())
    /// The inbox's other buffer, empty between drains (see ``drainInbox()``). Loop thread only.
    private var spareInbox: [LoopWork] = []
    /// Runs the work queued with ``atEndOfTurn(_:)`` just before the loop polls: the
    /// gathering point for writes issued by the timers, reads and work of one turn.
    /// Made on first use (a loop without shared connections has none), unreferenced, and
    /// started only while work is queued. Loop thread only.
    private var endOfTurn: UnsafeMutablePointer<uv_prepare_t>?
    // Those marked `@exclusivity(unchecked)` skip Swift's dynamic exclusivity
    // checks in release builds: they were a tenth of a request's instructions (callgrind), only
    // the loop thread touches them, and debug builds, which the tests run, check every access.
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    private var endOfTurnWork: [LoopWork] = []
    /// `endOfTurnWork`'s other buffer, empty between passes (as ``spareInbox``).
    private var spareEndOfTurnWork: [LoopWork] = []

    /// The top-level owners of handles (connections, timers of locks) that shutdown closes.
    /// Loop thread only. Held weakly: a connection its owner dropped must still be free to go.
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    private var resources: [ObjectIdentifier: WeakResource] = [:]
    private var registrations = 0
    /// Set when shutdown begins; from then on no work runs on the loop. Loop thread only.
    private(set) var isShutDown = false
    /// Whether the (normally unreferenced) wake-up of a borrowed loop is referenced for now,
    /// because work given to `execute` on the loop thread has yet to run. Loop thread only.
    private var wakeupKeepsLoopAlive = false
    /// Taken by the caller of `shutdown()` that does the work, for all of it; true once done,
    /// so concurrent and later callers wait for it and then return.
    private let shutdownDone = ThreadLock(false)
    /// Runs on the loop thread during shutdown, after the registered owners have closed and
    /// before the wake-up closes (the executor finishes its jobs there). Set once, by the
    /// public loop's initializer, before any work can reach the loop thread.
    var willCloseWakeup: (() -> Void)?

    private struct Inbox {
        /// Not `@Sendable`: work runs on the loop thread, where what it touches lives, and the
        /// layers above hand the loop work that may touch only that (``EventLoop/runOnLoop``).
        var work: [LoopWork] = []
        var isClosed = false
        /// Set by an owned loop's shutdown: the next wake-up closes everything.
        var closeRequested = false
    }

    init(batchingWindow: Duration) {
        raw = .allocate(capacity: 1)
        precondition(uv_loop_init(raw) == 0, "uv_loop_init failed")
        ownsLoop = true
        readBuffer = .allocate(byteCount: 64 * 1024, alignment: 16)
        wakeup = .allocate(capacity: 1)
        precondition(uv_async_init(raw, wakeup, LoopEngine.onWakeup) == 0, "uv_async_init failed")
        let window = min(max(batchingWindow, .zero), .milliseconds(10))
        self.batchingWindow = window > .zero ? window : nil
        loopThread = LoopEngine.startThread(running: raw)
        // Set before anything can wake the loop. Released in the wake-up's close callback.
        wakeup.pointee.data = Unmanaged.passRetained(self).toOpaque()
    }

    init(borrowing loop: UnsafeMutablePointer<uv_loop_t>) {
        raw = loop
        ownsLoop = false
        batchingWindow = nil
        readBuffer = .allocate(byteCount: 64 * 1024, alignment: 16)
        wakeup = .allocate(capacity: 1)
        precondition(uv_async_init(raw, wakeup, LoopEngine.onWakeup) == 0, "uv_async_init failed")
        uv_unref(wakeup.asHandle)
        loopThread = pthread_self()
        wakeup.pointee.data = Unmanaged.passRetained(self).toOpaque()
    }

    deinit {
        readBuffer.deallocate()
    }

    var inEventLoop: Bool {
        pthread_equal(pthread_self(), loopThread) != 0
    }

    func tryExecute(_ work: @escaping () -> Void) -> Bool {
        // The send happens under the lock: once shutdown has marked the inbox closed, no thread
        // can reach the wake-up handle, which is closed right after.
        let accepted = inbox.withLock { inbox -> Bool in
            guard !inbox.isClosed else { return false }
            inbox.work.append(LoopWork(run: work))
            uv_async_send(wakeup)
            return true
        }
        // A borrowed loop's wake-up is unreferenced so that it never keeps `uv_run` going by
        // itself; work waiting to run must, or a loop whose only handle it is would return
        // before running it. Only the loop thread may touch the handle's flags.
        if accepted, !ownsLoop, inEventLoop, !wakeupKeepsLoopAlive {
            wakeupKeepsLoopAlive = true
            uv_ref(wakeup.asHandle)
        }
        return accepted
    }

    func shutdown() {
        if ownsLoop {
            precondition(!inEventLoop, "EventLoop.shutdown() of an owned loop must not be called on its own thread")
            shutdownDone.withLock { done in
                guard !done else { return }
                done = true
                requestClose()
                // The thread closes and frees the uv_loop_t once its last handle has closed.
                pthread_join(loopThread, nil)
            }
        } else {
            precondition(inEventLoop, "EventLoop.shutdown() of a borrowed loop must be called on the loop thread")
            closeEverything()
        }
    }

    /// The public object went away. Nothing of the library holds a handle on the loop any more
    /// (each such object holds the public loop), so this closes the loop's own handles.
    func ownerDropped() {
        if ownsLoop {
            let alreadyDone = shutdownDone.withLock { done -> Bool in
                defer { done = true }
                return done
            }
            guard !alreadyDone else { return }
            if inEventLoop {
                // Dropped inside a callback of this loop: it cannot wait for its own thread.
                // The handles close now; the thread frees the loop when uv_run returns.
                closeEverything()
                pthread_detach(loopThread)
            } else {
                requestClose()
                pthread_join(loopThread, nil)
            }
        } else if !isShutDown {
            precondition(inEventLoop, "an EventLoop(borrowing:) was dropped off its loop thread without shutdown(); call shutdown() on the loop thread first")
            closeEverything()
        }
    }

    // MARK: - Loop thread

    func register(_ resource: any LoopResource) {
        let identifier = ObjectIdentifier(resource)
        guard resources[identifier] == nil else { return }
        registrations += 1
        resources[identifier] = WeakResource(resource: resource, order: registrations)
    }

    func unregister(_ identifier: ObjectIdentifier) {
        resources[identifier] = nil
    }

    /// Asks the loop thread to close everything, through the wake-up handle.
    private func requestClose() {
        inbox.withLock { inbox in
            guard !inbox.isClosed else { return }
            inbox.closeRequested = true
            uv_async_send(wakeup)
        }
    }

    private func closeEverything() {
        guard !isShutDown else { return }
        // Closed first, then drained: work queued up to now still runs (it may be the close of
        // a lock a caller dropped), and whatever that work schedules finds the loop closed and
        // completes inline instead of being lost.
        inbox.withLock { inbox in
            inbox.isClosed = true
            inbox.closeRequested = false
        }
        drainInbox()
        isShutDown = true
        // A fixed order, not the hash order of the table: connections (which tell their owners)
        // before timers, each kind oldest first. Only top-level owners are registered, so a TLS
        // connection in its handshake reports the shutdown, not its TCP stream's end.
        let owners = resources.values.sorted { ($0.rank, $0.order) < ($1.rank, $1.order) }
        resources.removeAll()
        for entry in owners { entry.resource?.closeForShutdown() }
        resources.removeAll()
        willCloseWakeup?()
        willCloseWakeup = nil
        wakeupKeepsLoopAlive = false
        uv_close(wakeup.asHandle, LoopEngine.onWakeupClosed)
        endOfTurnWork.removeAll()
        if let endOfTurn { uv_close(endOfTurn.asHandle, freeHandleOnClose) }
        endOfTurn = nil
    }

    /// Queues `work` to run on this turn of the loop, after its timers, reads and queued work
    /// and before it polls again. Loop thread only; dropped once shutdown has begun.
    func atEndOfTurn(_ work: @escaping () -> Void) {
        guard !isShutDown else { return }
        if endOfTurnWork.isEmpty { uv_prepare_start(endOfTurnHandle(), LoopEngine.onEndOfTurn) }
        endOfTurnWork.append(LoopWork(run: work))
    }

    private func endOfTurnHandle() -> UnsafeMutablePointer<uv_prepare_t> {
        if let endOfTurn { return endOfTurn }
        let handle = UnsafeMutablePointer<uv_prepare_t>.allocate(capacity: 1)
        precondition(uv_prepare_init(raw, handle) == 0, "uv_prepare_init failed")
        // Unreferenced: what the queued work serves (a connection) keeps the loop running.
        uv_unref(handle.asHandle)
        handle.pointee.data = Unmanaged.passUnretained(self).toOpaque()
        endOfTurn = handle
        return handle
    }

    private static let onEndOfTurn: uv_prepare_cb = { handle in
        guard let data = handle?.pointee.data else { return }
        let engine = Unmanaged<LoopEngine>.fromOpaque(data).takeUnretainedValue()
        // Work queued by this work runs in the same pass: nothing is left for after the poll.
        while !engine.endOfTurnWork.isEmpty {
            var work: [LoopWork] = []
            swap(&work, &engine.spareEndOfTurnWork)
            swap(&work, &engine.endOfTurnWork)
            for item in work { item.run() }
            work.removeAll(keepingCapacity: true)
            if work.capacity > engine.spareEndOfTurnWork.capacity { swap(&work, &engine.spareEndOfTurnWork) }
        }
        if let handle { uv_prepare_stop(handle) }
    }

    /// Runs the work taken from the inbox, in order. Loop thread only.
    func drainInbox() {
        // Two buffers change places: the inbox gets the spare's empty storage, and the work
        // taken is emptied in place once it has run (copying the inbox's array out and
        // emptying it there gave it new storage, grown again by the next appends: an
        // allocation per call that crossed threads). A nested drain finds no spare.
        var work: [LoopWork] = []
        swap(&work, &spareInbox)
        let closeRequested = inbox.withLock { inbox -> Bool in
            swap(&work, &inbox.work)
            return inbox.closeRequested
        }
        for item in work { item.run() }
        work.removeAll(keepingCapacity: true)
        if work.capacity > spareInbox.capacity { swap(&work, &spareInbox) }
        if closeRequested {
            closeEverything()
        } else if wakeupKeepsLoopAlive, !isShutDown, inbox.withLock({ $0.work.isEmpty }) {
            wakeupKeepsLoopAlive = false
            uv_unref(wakeup.asHandle)
        }
    }

    private static let onWakeup: uv_async_cb = { handle in
        guard let data = handle?.pointee.data else { return }
        // The handle holds a reference until its close callback.
        Unmanaged<LoopEngine>.fromOpaque(data).takeUnretainedValue().drainInbox()
    }

    private static let onWakeupClosed: uv_close_cb = { handle in
        guard let handle else { return }
        if let data = handle.pointee.data { Unmanaged<LoopEngine>.fromOpaque(data).release() }
        UnsafeMutableRawPointer(handle).deallocate()
    }

    private static func startThread(running loop: UnsafeMutablePointer<uv_loop_t>) -> pthread_t {
        var thread = pthread_t()
        let context = UnsafeMutableRawPointer(loop)
        let result = pthread_create(&thread, nil, { context in
            let loop = context!.assumingMemoryBound(to: uv_loop_t.self)
            // The wake-up handle stays referenced until shutdown, so this returns only then.
            while uv_run(loop, UV_RUN_DEFAULT) != 0 {}
            // Every handle has closed. The thread owns the uv_loop_t to the end, so a loop
            // shut down from its own thread (dropped there) is freed too.
            precondition(uv_loop_close(loop) == 0, "a libuv handle outlived EventLoop.shutdown()")
            loop.deallocate()
            return nil
        }, context)
        precondition(result == 0, "pthread_create failed: \(result)")
        return thread
    }
}

private struct WeakResource {
    weak var resource: (any LoopResource)?
    let order: Int
    /// Connections first: they tell their owners, whose timers may then close by themselves.
    let rank: Int

    init(resource: any LoopResource, order: Int) {
        self.resource = resource
        self.order = order
        rank = resource.closesBeforeTimers ? 0 : 1
    }
}

/// A top-level owner of libuv handles on the loop (a connection, a lock's timer), which must be
/// closed before the loop stops. What it owns (a transport, its timers) it closes itself.
protocol LoopResource: AnyObject {
    /// Closes the resource's handles through `uv_close`, failing whatever waits on it with
    /// ``LockError/eventLoopShutDown``. Called on the loop thread by ``EventLoop/shutdown()``;
    /// idempotent.
    func closeForShutdown()
    /// Whether shutdown closes it in the first round (connections), before timers.
    var closesBeforeTimers: Bool { get }
}

extension LoopResource {
    var closesBeforeTimers: Bool { true }
}

/// A closure as the loop's queues keep it. A bare function type as an array's element is stored
/// behind a reabstraction thunk, which costs an allocation per closure queued.
private struct LoopWork {
    let run: () -> Void
}
