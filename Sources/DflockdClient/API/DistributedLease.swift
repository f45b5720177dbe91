import CUV
import Synchronization

/// The machinery ``DistributedLock`` and ``DistributedSemaphore`` share: one session with the
/// key's server, driven by a state machine (`LeaseMachine`) on the event loop, with lease
/// renewal on a timer.
///
/// Every method may be called from any thread. Completion handlers run on the loop thread,
/// never before the method that took them has returned. The properties may be read from any
/// thread; they show the state as of the loop's last step.
///
/// An instance with an operation or a release in flight keeps itself alive until that
/// completion has run, even if the caller dropped every reference; an instance dropped while
/// merely holding closes its connection (the server then frees what it held).
public class DistributedLease: @unchecked Sendable {
    /// The default longest gap between two renewals of a held lease: well under the 23-second
    /// read timeout after which dflockd servers drop a silent connection and its locks.
    public static let defaultMaxIdleMs = 10_000

    /// The key (lock name or semaphore name).
    public var key: String { driver.settings.key }
    /// The loop this instance runs on.
    public var loop: EventLoop { driver.loop }

    /// The lock's machinery on the loop, which the handle owns; see ``LeaseDriver``.
    let driver: LeaseDriver
    var settings: LeaseSettings { driver.settings }
    /// Where the lock's session keeps it (0 without a session).
    private var registryIndex: UInt32 = 0

    /// Call identities for completion and cancellation; any thread.
    private static let callCounter = Atomic<UInt64>(0)

    init(settings: LeaseSettings, loop: EventLoop) {
        driver = LeaseDriver(settings: settings, loop: loop)
        registryIndex = settings.session?.register(driver) ?? 0
    }

    deinit {
        settings.session?.unregister(registryIndex)
        driver.handleDropped()
    }

    // MARK: - Properties

    /// The token of the current grant, or `nil` when nothing is held.
    public var token: String? { driver.published.withLock { $0.token } }

    /// The lease in seconds, from the last grant or renewal (before any: `leaseTtlS`, or 0).
    public var lease: Int { driver.published.withLock { $0.lease } }

    /// Where the instance is in its life cycle.
    public var state: LockState { driver.published.withLock { $0.state } }

    /// The fencing value of the current token (dflockd 2.1 and later; older servers issue random
    /// tokens, whose "fence" orders nothing); see ``fenceFromToken(_:)``.
    public var fence: UInt64? { token.flatMap(fenceFromToken) }

    /// How long the current lease is still certain to be ours, by the client's own clock: from
    /// when the request that earned the grant or the last renewal was *sent*, plus the lease the
    /// server answered, less a safety margin (a tenth of the lease, at most 1 s) for a loop
    /// that runs late. `nil` when nothing is held.
    ///
    /// Check it right before a write that must not happen without the lock. When it reaches
    /// zero without a renewal having moved it, the lock is declared lost (`onLockLost`) before
    /// the server can grant it elsewhere.
    public var leaseRemaining: Duration? {
        let deadlineMs = driver.publishedDeadlineMs.load(ordering: .acquiring)
        guard deadlineMs != .max else { return nil }
        let nowMs = uv_hrtime() / 1_000_000
        return deadlineMs > nowMs ? .milliseconds(Int64(deadlineMs - nowMs)) : .zero
    }

    // MARK: - Completion-handler API

    /// Connects and waits up to `acquireTimeoutS` for the key. Completes with `true` when held
    /// (renewal then runs in the background), `false` on timeout (the connection is closed).
    ///
    /// Fails with ``LockError/alreadyConnected(key:)`` when a session is open, unless `force`,
    /// which closes that session first (an operation in flight on it fails with
    /// ``LockError/closed``; a lease held on it ends with the connection).
    public func acquire(force: Bool = false, completion: @escaping (Result<Bool, LockError>) -> Void) {
        call(Self.nextCall(), .acquire(completion)) { .acquireRequested($0, force: force) }
    }

    /// Two-phase step 1: connects and joins the key's FIFO queue. Completes with `.acquired`
    /// when the key was free (renewal starts at once) or `.queued`.
    public func enqueue(force: Bool = false, completion: @escaping (Result<EnqueueResult, LockError>) -> Void) {
        call(Self.nextCall(), .enqueue(completion)) { .enqueueRequested($0, force: force) }
    }

    /// Two-phase step 2: waits up to `timeoutS` (default `acquireTimeoutS`) for the grant.
    /// Completes with `true` at once if ``enqueue(force:completion:)`` already acquired, `false`
    /// on timeout (the connection is closed).
    ///
    /// The server starts a lease when it grants the key, which may be long before `wait` is
    /// called: a grant that `wait` finds is therefore confirmed with an immediate renewal before
    /// it is reported, and the local lease deadline counts from that renewal. When the renewal
    /// is refused (the lease ran out and the key may be someone else's), `wait` fails with
    /// ``LockError/leaseExpired(key:)`` and the connection is closed.
    public func wait(timeoutS: Int? = nil, completion: @escaping (Result<Bool, LockError>) -> Void) {
        call(Self.nextCall(), .wait(completion)) { .waitRequested($0, timeoutS: timeoutS) }
    }

    /// Releases the key and closes the connection; stops renewal.
    ///
    /// Fails with ``LockError/notConnected(key:)`` when already released or closed, with
    /// ``LockError/lockLost(key:token:)`` once after the lease was lost, with
    /// ``LockError/notHeld(key:)`` when the server says the token no longer held the key, and
    /// with ``LockError/releaseUnconfirmed(key:leaseS:)`` when the server did not answer in time
    /// (the key is then free at the latest when its lease ends). A release whose connection had
    /// already closed succeeds: the server releases a closed session's keys itself. A release
    /// always runs to its end, even from a cancelled task.
    public func release(completion: @escaping (Result<Void, LockError>) -> Void) {
        call(Self.nextCall(), .release(completion)) { .releaseRequested($0) }
    }

    /// Closes the connection without sending a release: the server frees the key when it sees
    /// the connection end. An operation in flight fails with ``LockError/closed``; a release in
    /// flight succeeds. Idempotent; safe from any thread.
    public func close() {
        driver.close()
    }

    // MARK: - Async API

    /// Connects and waits up to `acquireTimeoutS` for the key; `true` when held, `false` on
    /// timeout. Cancelling the task closes the connection and throws ``LockError/cancelled``.
    public func acquire(force: Bool = false) async throws -> Bool {
        try await bridge(cancellable: true) { call, completion in
            self.call(call, .acquire(completion)) { .acquireRequested($0, force: force) }
        }
    }

    /// Releases the key and closes the connection (see ``release(completion:)``). Cancelling
    /// the task does not stop the release: it runs to its end and its outcome is returned.
    public func release() async throws {
        try await bridge(cancellable: false) { call, completion in
            self.call(call, .release(completion)) { .releaseRequested($0) }
        }
    }

    /// Two-phase step 1 (see ``enqueue(force:completion:)``). Cancelling the task closes the
    /// connection and throws ``LockError/cancelled``.
    public func enqueue(force: Bool = false) async throws -> EnqueueResult {
        try await bridge(cancellable: true) { call, completion in
            self.call(call, .enqueue(completion)) { .enqueueRequested($0, force: force) }
        }
    }

    /// Two-phase step 2 (see ``wait(timeoutS:completion:)``). Cancelling the task closes the
    /// connection and throws ``LockError/cancelled``.
    public func wait(timeoutS: Int? = nil) async throws -> Bool {
        try await bridge(cancellable: true) { call, completion in
            self.call(call, .wait(completion)) { .waitRequested($0, timeoutS: timeoutS) }
        }
    }

    /// Acquires, runs `body`, and releases, even when `body` throws (its error then wins over a
    /// release error) and when the task is cancelled during `body`: the release always runs
    /// before `withLock` returns or throws.
    ///
    /// `body` runs in the caller's isolation: called from an actor, it may touch the actor's
    /// state (`isolation` is the caller's, filled in by the compiler). On the loop's executor
    /// (an actor whose executor is the loop, or inside `withTaskExecutorPreference(loop)`) the
    /// acquire, `body` and the release all run on the loop thread, without a thread hop; a `body`
    /// that blocks the thread then blocks every lock on the loop until it returns.
    ///
    /// - Throws: ``LockError/acquireTimeout(key:)`` when the key was not granted in time.
    public func withLock<T>(isolation: isolated (any Actor)? = #isolation,
                            _ body: () async throws -> T) async throws -> T {
        guard try await acquire() else { throw LockError.acquireTimeout(key: key) }
        let value: T
        do {
            value = try await body()
        } catch {
            try? await release()
            throw error
        }
        try await release()
        return value
    }

    // MARK: - Driving the machine

    static func nextCall() -> LeaseMachine.CallID {
        LeaseMachine.CallID(raw: callCounter.wrappingAdd(1, ordering: .relaxed).newValue)
    }

    private func call(_ call: LeaseMachine.CallID, _ completion: LeaseDriver.PendingCompletion,
                      _ event: (LeaseMachine.CallID) -> LeaseMachine.Event) {
        driver.call(call, completion, event)
    }

    /// Runs a completion-handler call as an async call, through the loop's bridge (no hop when
    /// the task is already on the loop). When `cancellable`, cancelling the task cancels the call
    /// (the machine ends its session and the call fails with ``LockError/cancelled``), and a
    /// call whose task was cancelled before it started never starts; otherwise (release)
    /// cancellation changes nothing and the call runs to its end.
    private func bridge<Value: Sendable>(cancellable: Bool,
                                         _ start: (LeaseMachine.CallID, @escaping (Result<Value, LockError>) -> Void) -> Void) async throws -> Value {
        let call = Self.nextCall()
        return try await loop.bridge(startsWhenCancelled: !cancellable, { completion in start(call, completion) }) {
            guard cancellable else { return }
            // A cancellation that beats the start finds no such call in the machine: ignored.
            self.driver.cancel(call)
        }
    }
}

/// The result of `enqueue()`: `"acquired" | "queued"` in dflockd's TypeScript client.
public enum EnqueueResult: Sendable, Hashable {
    /// The key was free and is now held (renewal already runs).
    case acquired
    /// The key is taken; this instance waits in its FIFO queue. Call `wait()`.
    case queued
}
