import CUV
import Glibc

/// A single-threaded libuv event loop that every lock, semaphore and connection runs on.
///
/// All state of the objects bound to a loop is touched only on the loop's thread; other
/// threads reach it through ``execute(_:)``. An `EventLoop` either owns its `uv_loop_t` and a
/// thread that runs it (``init()``, ``shared``), or borrows a loop that the caller already runs
/// (``init(borrowing:)``), for embedding in an existing libuv program.
///
/// Dropping the last reference to a loop without ``shutdown()`` shuts it down (the libuv
/// handles keep the loop's engine alive until they have closed).
public final class EventLoop: @unchecked Sendable {
    /// The process-wide loop, started on first use on a thread of its own. It is never shut down.
    public static let shared = EventLoop()

    /// The libuv loop. Touch it only on the loop thread.
    let raw: UnsafeMutablePointer<uv_loop_t>
    /// The one read buffer of every stream on the loop (see ``LoopEngine/readBuffer``).
    let readBuffer: UnsafeMutableRawBufferPointer
    /// What runs the loop; it outlives this object until the loop's handles have closed.
    let engine: LoopEngine
    /// The executor's jobs enqueued on the loop thread (`EventLoop+Executor.swift`).
    let runQueue = RunQueue()
    /// The storage the lease drivers of this loop borrow while they drive, made on first use
    /// (``LeaseDriver``'s `DriverScratch`; an upper layer's type, hence `AnyObject`). Loop
    /// thread only, and unchecked for the reason ``LeaseDriver`` gives for its own state.
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    var leaseDriverScratch: AnyObject?

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
        engine = LoopEngine(batchingWindow: batchingWindow)
        raw = engine.raw
        readBuffer = engine.readBuffer
        bindRunQueue()
    }

    /// Wraps a libuv loop that the caller runs, for embedding in an existing libuv program.
    ///
    /// Create it on the thread that runs `loop`, before or between runs of the loop. The wrapper
    /// adds one unreferenced `uv_async_t` to the loop, so it never keeps `uv_run` from
    /// returning by itself; open connections and timers do, as any libuv handle does, and so
    /// does work given to ``execute(_:)`` on the loop thread until it has run. Call
    /// ``shutdown()`` on the loop thread before closing the loop (dropping the wrapper on the
    /// loop thread does the same).
    ///
    /// - Parameter loop: A loop initialised with `uv_loop_init` (or `uv_default_loop()`).
    public init(borrowing loop: UnsafeMutablePointer<uv_loop_t>) {
        engine = LoopEngine(borrowing: loop)
        raw = engine.raw
        readBuffer = engine.readBuffer
        bindRunQueue()
    }

    /// Ties the executor's run queue to this loop: its jobs run to their end during shutdown,
    /// after the connections and timers have failed what they owed and before the wake-up closes.
    private func bindRunQueue() {
        runQueue.bind(to: self)
        let runQueue = runQueue
        // Unowned: the engine outlives this object; the hook runs only during a shutdown, which
        // this object's deinit waits for, and a queue with jobs waiting keeps the loop alive.
        engine.willCloseWakeup = { [unowned(unsafe) self] in runQueue.shutDown(loop: self) }
    }

    deinit {
        engine.ownerDropped()
    }

    /// Whether the calling thread is the one that runs this loop.
    public var inEventLoop: Bool { engine.inEventLoop }

    /// Schedules `work` to run on the loop thread. Safe from any thread, including the loop's own
    /// (the work then runs on a later turn of the loop, never re-entrantly).
    ///
    /// On a borrowed loop, work given on the loop thread keeps the loop alive until it has run,
    /// so `uv_run` does not return before it. Work from another thread wakes a borrowed loop
    /// that is running; a borrowed loop with nothing else to keep it alive runs it on its next
    /// `uv_run` only if something else (a handle of the caller's) keeps that run going.
    ///
    /// Work submitted once ``shutdown()`` has begun never runs; it is dropped.
    public func execute(_ work: @escaping @Sendable () -> Void) {
        _ = engine.tryExecute(work)
    }

    /// Closes every connection and timer still open on this loop, then its own handles.
    ///
    /// From the moment shutdown begins, no work runs on the loop: ``execute(_:)`` drops what
    /// it is given, and every call of a lock, semaphore or connection bound to the loop fails
    /// with ``LockError/eventLoopShutDown`` — at once, on the calling thread, since the loop
    /// has no later turn to report it on. Work queued before still runs, during the shutdown.
    /// Connections close before timers, each kind in the order it was created; each reports
    /// ``LockError/eventLoopShutDown`` to whatever waits on it (a TLS connection in its
    /// handshake too).
    ///
    /// For a loop made with ``init()`` this blocks until the loop thread has exited and frees the
    /// loop; do not call it on the loop thread. For a borrowed loop call it on the loop thread;
    /// the close callbacks run on the caller's next turn of the loop. Calling it again, or from
    /// several threads at once, does nothing more (concurrent callers return once it is done).
    ///
    /// An owned loop dropped without `shutdown()` shuts itself down the same way, without
    /// blocking when the last reference goes on the loop thread itself. A borrowed loop must be
    /// shut down, or dropped on its loop thread (which shuts it down), before its `uv_loop_t`
    /// is closed.
    public func shutdown() {
        engine.shutdown()
    }

    /// Schedules `work` like ``execute(_:)``; false when the loop has shut down and the work
    /// was dropped. Not `@Sendable`: the layers above hand the loop work that touches what only
    /// the loop thread touches, which is what the loop thread is for (a wrapper making it
    /// `@Sendable` cost an allocation per call).
    func tryExecute(_ work: @escaping () -> Void) -> Bool {
        engine.tryExecute(work)
    }

    /// The loop's cached time in milliseconds (libuv's `uv_now`), for deadlines. Loop thread only.
    var nowMs: UInt64 { uv_now(raw) }

    /// Whether shutdown has begun; from then on no work runs on the loop. Loop thread only.
    var isShutDown: Bool { engine.isShutDown }

    /// The batching window this loop was made with (``init(batchingWindow:)``), which the
    /// transport layer applies; nil for none.
    var batchingWindow: Duration? { engine.batchingWindow }

    /// Tracks a top-level owner of handles so that ``shutdown()`` can close it. Loop thread
    /// only. Register owners only: what they own, they close.
    func register(_ resource: any LoopResource) { engine.register(resource) }

    /// Stops tracking a resource that has closed itself. Loop thread only.
    func unregister(_ resource: any LoopResource) { engine.unregister(ObjectIdentifier(resource)) }

    /// Stops tracking a resource by identity, from its deinit. Loop thread only.
    func unregister(_ identifier: ObjectIdentifier) { engine.unregister(identifier) }

    /// Runs `work` on this turn of the loop just before it polls for I/O: after the timers,
    /// reads and queued work of the turn. Loop thread only.
    func atEndOfTurn(_ work: @escaping () -> Void) { engine.atEndOfTurn(work) }

    /// Fails fast when loop-confined state is touched from another thread.
    @inline(__always)
    func assertInLoop(_ file: StaticString = #fileID, _ line: UInt = #line) {
        assert(inEventLoop, "touched off the event loop thread", file: file, line: line)
    }
}
