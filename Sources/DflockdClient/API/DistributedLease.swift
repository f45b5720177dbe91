import CUV

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
    public var key: String { settings.key }
    /// The loop this instance runs on.
    public let loop: EventLoop

    let settings: LeaseSettings

    // Loop-confined.
    private var machine: LeaseMachine
    private var connection: Connection?
    /// Renewals and the local lease deadline share this one timer.
    private var leaseTimer: LoopTimer?
    private var operation: PendingOperation?
    private var releaseCompletion: ((Result<Void, LockError>) -> Void)?
    /// Set while a completion is owed, so that it runs even if the caller let go.
    private var selfWhileBusy: DistributedLease?
    /// Completions and callbacks produced by the current step, run once it is published.
    private var deliveries: [() -> Void] = []

    private let published: ThreadLock<Published>

    private struct Published {
        var state = LockState.idle
        var token: String?
        var lease = 0
        var deadlineMs: UInt64?
    }

    private enum PendingOperation {
        case acquire((Result<Bool, LockError>) -> Void)
        case enqueue((Result<EnqueueResult, LockError>) -> Void)
        case wait((Result<Bool, LockError>) -> Void)
    }

    init(settings: LeaseSettings, loop: EventLoop) {
        self.settings = settings
        self.loop = loop
        self.machine = LeaseMachine(key: settings.key, acquireTimeoutS: settings.acquireTimeoutS,
                                    renewRatio: settings.renewRatio, maxIdleMs: settings.maxIdleMs)
        self.published = ThreadLock(Published(lease: settings.leaseTtlS ?? 0))
    }

    deinit {
        let connection = self.connection
        let timer = self.leaseTimer
        if connection != nil || timer != nil {
            loop.runOnLoop {
                connection?.close()
                timer?.close()
            }
        }
    }

    // MARK: - Properties

    /// The token of the current grant, or `nil` when nothing is held.
    public var token: String? { published.withLock { $0.token } }

    /// The lease in seconds, from the last grant or renewal (before any: `leaseTtlS`, or 0).
    public var lease: Int { published.withLock { $0.lease } }

    /// Where the instance is in its life cycle.
    public var state: LockState { published.withLock { $0.state } }

    /// The fencing value of the current token (2.x servers); see ``fenceFromToken(_:)``.
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
        guard let deadlineMs = published.withLock({ $0.deadlineMs }) else { return nil }
        let nowMs = uv_hrtime() / 1_000_000
        return deadlineMs > nowMs ? .milliseconds(Int64(deadlineMs - nowMs)) : .zero
    }

    // MARK: - Completion-handler API

    /// Connects and waits up to `acquireTimeoutS` for the key. Completes with `true` when held
    /// (renewal then runs in the background), `false` on timeout (the connection is closed).
    ///
    /// Fails with ``LockError/alreadyConnected(key:)`` when a session is open, unless `force`,
    /// which closes that session first.
    public func acquire(force: Bool = false, completion: @escaping (Result<Bool, LockError>) -> Void) {
        callerCall(.acquireRequested(force: force), operation: .acquire(completion))
    }

    /// Two-phase step 1: connects and joins the key's FIFO queue. Completes with `.acquired`
    /// when the key was free (renewal starts at once) or `.queued`.
    public func enqueue(force: Bool = false, completion: @escaping (Result<EnqueueResult, LockError>) -> Void) {
        callerCall(.enqueueRequested(force: force), operation: .enqueue(completion))
    }

    /// Two-phase step 2: waits up to `timeoutS` (default `acquireTimeoutS`) for the grant.
    /// Completes with `true` at once if ``enqueue(force:completion:)`` already acquired, `false`
    /// on timeout (the connection is closed).
    public func wait(timeoutS: Int? = nil, completion: @escaping (Result<Bool, LockError>) -> Void) {
        let timeoutS = timeoutS ?? settings.acquireTimeoutS
        do throws(LockError) {
            try Validation.timeout(timeoutS, name: "timeoutS")
        } catch {
            loop.runLater { completion(.failure(error)) }
            return
        }
        callerCall(.waitRequested(timeoutS: timeoutS), operation: .wait(completion))
    }

    /// Releases the key and closes the connection; stops renewal.
    ///
    /// Fails with ``LockError/notConnected(key:)`` when already released or closed, with
    /// ``LockError/lockLost(key:token:)`` once after the lease was lost, and with
    /// ``LockError/notHeld(key:)`` when the server says the token no longer held the key. A
    /// release whose connection had already died succeeds: the server releases a dead session's
    /// keys itself.
    public func release(completion: @escaping (Result<Void, LockError>) -> Void) {
        loop.runOnLoop(ifShutDown: { completion(.failure(.eventLoopShutDown)) }) { [self] in
            drive(.releaseRequested, fromCaller: true,
                  accept: { self.releaseCompletion = completion },
                  reject: { error in completion(.failure(error)) })
        }
    }

    /// Closes the connection without sending a release: the server frees the key when it sees
    /// the connection end. An operation in flight fails with ``LockError/closed``. Idempotent;
    /// safe from any thread.
    public func close() {
        loop.runOnLoop { [self] in drive(.closeRequested, fromCaller: true) }
    }

    // MARK: - Async API

    /// Connects and waits up to `acquireTimeoutS` for the key; `true` when held, `false` on
    /// timeout. Cancelling the task closes the connection and throws ``LockError/cancelled``.
    public func acquire(force: Bool = false) async throws -> Bool {
        try await bridge { self.acquire(force: force, completion: $0) }
    }

    /// Releases the key and closes the connection (see ``release(completion:)``).
    public func release() async throws {
        try await bridge { self.release(completion: $0) }
    }

    /// Two-phase step 1 (see ``enqueue(force:completion:)``).
    public func enqueue(force: Bool = false) async throws -> EnqueueResult {
        try await bridge { self.enqueue(force: force, completion: $0) }
    }

    /// Two-phase step 2 (see ``wait(timeoutS:completion:)``). Cancelling the task closes the
    /// connection and throws ``LockError/cancelled``.
    public func wait(timeoutS: Int? = nil) async throws -> Bool {
        try await bridge { self.wait(timeoutS: timeoutS, completion: $0) }
    }

    /// Acquires, runs `body`, and releases, even when `body` throws (its error then wins over a
    /// release error).
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

    private func callerCall(_ event: LeaseMachine.Event, operation newOperation: PendingOperation) {
        loop.runOnLoop(ifShutDown: { Self.finish(newOperation, .failed(.eventLoopShutDown)) }) { [self] in
            drive(event, fromCaller: true,
                  accept: { self.operation = newOperation },
                  reject: { error in Self.finish(newOperation, .failed(error)) })
        }
    }

    /// Feeds one event from the connection or a timer.
    private func step(_ event: LeaseMachine.Event) {
        drive(event, fromCaller: false)
    }

    /// Feeds `event` to the machine and performs its actions; `accept` and `reject` settle the
    /// caller's request that raised it. Completions run after the new state is published, so a
    /// caller resumed by one sees the state that completed it; and when a caller's call is on
    /// the stack, on a later turn of the loop, never inside that call.
    private func drive(_ event: LeaseMachine.Event, fromCaller: Bool,
                       accept: (() -> Void)? = nil, reject: ((LockError) -> Void)? = nil) {
        for action in machine.handle(event) {
            switch action {
            case .accept, .acceptRelease: accept?()
            case .reject(let error): deliveries.append { reject?(error) }
            default: perform(action)
            }
        }
        publish()
        let wasBusy = selfWhileBusy
        defer { withExtendedLifetime(wasBusy) {} }
        selfWhileBusy = operation != nil || releaseCompletion != nil ? self : nil
        guard !deliveries.isEmpty else { return }
        let ready = deliveries
        deliveries.removeAll()
        if fromCaller {
            loop.runLater { for delivery in ready { delivery() } }
        } else {
            for delivery in ready { delivery() }
        }
    }

    private func perform(_ action: LeaseMachine.Action) {
        switch action {
        case .openConnection:
            openConnection()
        case .closeConnection:
            connection?.close()
            connection = nil
            leaseTimer?.close()
            leaseTimer = nil
        case .send(let outgoing):
            send(outgoing)
        case .scheduleTimer(let milliseconds):
            let timer = leaseTimer ?? LoopTimer(loop: loop) { [weak self] in
                guard let self else { return }
                uv_update_time(loop.raw)
                step(.timerFired(nowMs: uv_now(loop.raw)))
            }
            leaseTimer = timer
            timer.schedule(afterMilliseconds: milliseconds)
        case .cancelTimer:
            leaseTimer?.cancel()
        case .finish(_, let outcome):
            guard let finished = operation else { return }
            operation = nil
            deliver { Self.finish(finished, outcome) }
        case .finishRelease(let error):
            guard let completion = releaseCompletion else { return }
            releaseCompletion = nil
            deliver { completion(error.map { .failure($0) } ?? .success(())) }
        case .reportLockLost(let token):
            if let onLockLost = settings.onLockLost {
                let key = settings.key
                deliver { onLockLost(key, token) }
            }
        case .stateChanged, .accept, .acceptRelease, .reject:
            break
        }
    }

    private func deliver(_ body: @escaping () -> Void) {
        deliveries.append(body)
    }

    private static func finish(_ operation: PendingOperation, _ outcome: LeaseMachine.Outcome) {
        switch (operation, outcome) {
        case (.acquire(let completion), .granted), (.wait(let completion), .granted):
            completion(.success(true))
        case (.acquire(let completion), .timedOut), (.wait(let completion), .timedOut):
            completion(.success(false))
        case (.acquire(let completion), .failed(let error)), (.wait(let completion), .failed(let error)):
            completion(.failure(error))
        case (.enqueue(let completion), .granted):
            completion(.success(.acquired))
        case (.enqueue(let completion), .queued):
            completion(.success(.queued))
        case (.enqueue(let completion), .failed(let error)):
            completion(.failure(error))
        case (.acquire(let completion), .queued), (.wait(let completion), .queued):
            completion(.failure(.protocolViolation("a queued answer to a blocking request")))
        case (.enqueue(let completion), .timedOut):
            completion(.failure(.protocolViolation("a timeout answer to enqueue")))
        }
    }

    private func openConnection() {
        let connection = Connection(endpoint: settings.endpoint, configuration: settings.connection, loop: loop)
        connection.delegate = self
        self.connection = connection
        connection.connect { [weak self, weak connection] result in
            guard let self, let connection, self.connection === connection else { return }
            switch result {
            case .success: step(.connected)
            case .failure(let error): step(.connectionLost(error))
            }
        }
    }

    private func send(_ outgoing: LeaseMachine.Outgoing) {
        guard let connection else { return }
        let request: Request
        do throws(LockError) {
            request = try settings.request(for: outgoing)
        } catch {
            loop.runLater { [self] in step(.requestFailed(error)) }
            return
        }
        // The loop's cached time is from before this turn's work: an early send time only
        // makes the local deadline more cautious.
        let sentAtMs = uv_now(loop.raw)
        connection.send(request) { [weak self, weak connection] result in
            guard let self, let connection, self.connection === connection else { return }
            switch result {
            case .success(.granted(let grant)): step(.granted(grant, sentAtMs: sentAtMs))
            case .success(.queued): step(.enqueuedBehindHolder)
            case .success(.timeout): step(.timedOut)
            case .success(.renewed(let seconds)): step(.renewed(leaseS: seconds, sentAtMs: sentAtMs))
            case .success(.ok): step(.released)
            case .success(.stats): step(.requestFailed(.protocolViolation("a stats reply to '\(request.command.rawValue)'")))
            case .failure(let error) where error.isServerAnswer: step(.requestFailed(error))
            case .failure(let error): step(.connectionLost(error))
            }
        }
    }

    private func publish() {
        let state = machine.publicState
        let holding = machine.holding
        published.withLock { published in
            published.state = state
            published.token = holding?.grant.token
            if let holding { published.lease = holding.leaseS }
            published.deadlineMs = holding?.deadlineMs
        }
    }

    /// Runs a completion-handler operation as an async call (see `EventLoop.bridge`). Cancelling
    /// the task ends the session (the operation fails with ``LockError/cancelled``); a task
    /// cancelled before the operation reached the loop never starts it.
    private func bridge<Value: Sendable>(_ start: @escaping (@escaping (Result<Value, LockError>) -> Void) -> Void) async throws -> Value {
        try await loop.bridge(start) {
            self.loop.runOnLoop { [self] in step(.cancelRequested) }
        }
    }
}

extension DistributedLease: ConnectionDelegate {
    func connection(_ connection: Connection, didCloseWith error: LockError) {
        guard connection === self.connection else { return }
        step(.connectionLost(error))
    }
}

/// The result of `enqueue()`: `"acquired" | "queued"` in dflockd's TypeScript client.
public enum EnqueueResult: Sendable, Hashable {
    /// The key was free and is now held (renewal already runs).
    case acquired
    /// The key is taken; this instance waits in its FIFO queue. Call `wait()`.
    case queued
}

extension LockError {
    /// Whether the server itself answered with this status, as opposed to the connection
    /// failing under the request.
    var isServerAnswer: Bool {
        switch self {
        case .notHeld, .notEnqueued, .alreadyEnqueued, .maxLocks, .maxWaiters, .limitMismatch,
             .leaseExpired, .serverDraining, .serverError, .authFailed:
            return true
        default:
            return false
        }
    }
}
