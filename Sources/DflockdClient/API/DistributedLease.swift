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
    public var key: String { settings.key }
    /// The loop this instance runs on.
    public let loop: EventLoop

    let settings: LeaseSettings
    /// Where the lock's session keeps it (0 without a session).
    private var registryIndex: UInt32 = 0

    // Loop-confined.
    private var machine: LeaseMachine
    /// The connection of the machine's current session, while it is open.
    private var connection: Connection?
    /// Reports the current connection's end, tagged with its session (the connection holds its
    /// delegate weakly).
    private var connectionObserver: SessionObserver?
    /// This lock's place on its session's shared connection. It stays a member between
    /// acquisitions while the connection is open (events of a session it ended are stale), so
    /// that the next acquire needs no attach; the session drops it when the connection ends.
    private var sharedMember: SharedConnectionMachine.Member?
    /// Renewals and the local lease deadline share this one timer, made on first use in a
    /// session and closed with it; `timerSession` is the session it was last scheduled for.
    /// A lock on a ``LockSession`` uses a slot of the session's ``TickTimers`` instead, made
    /// on first use and freed with the lock.
    private var leaseTimer: LoopTimer?
    private var timerSession: LeaseMachine.Session = 0
    private var tickTimerSlot: TickTimers<DistributedLease>.Slot?
    /// The completion of every call the machine has not completed yet.
    private var completions = CallTable<LeaseMachine.CallID, PendingCompletion>()
    /// Set while a completion is owed, so that it runs even if the caller let go.
    private var selfWhileBusy: DistributedLease?
    /// Events that arrived while the machine's actions were being performed (a connection
    /// closed by an action reports on its way out): fed to the machine afterwards, in order.
    private var eventQueue: [LeaseMachine.Event] = []
    private var isDraining = false
    /// Completions and callbacks produced by the events being drained, run once the resulting
    /// state is published.
    private var deliveries: [() -> Void] = []

    private let published: ThreadLock<Published>
    /// The local lease deadline (loop clock, ms; `UInt64.max`: nothing held), apart from the
    /// rest so that a renewal, which moves only the deadline, publishes without a lock.
    private let publishedDeadlineMs = Atomic<UInt64>(.max)
    /// Logs and metrics of the machine's steps. Loop-confined.
    private var telemetry: LeaseTelemetry

    /// Call identities for completion and cancellation; any thread.
    private static let callCounter = Atomic<UInt64>(0)

    private struct Published {
        var state = LockState.idle
        var token: String?
        var lease = 0
    }

    private enum PendingCompletion {
        case acquire((Result<Bool, LockError>) -> Void)
        case enqueue((Result<EnqueueResult, LockError>) -> Void)
        case wait((Result<Bool, LockError>) -> Void)
        case release((Result<Void, LockError>) -> Void)
    }

    init(settings: LeaseSettings, loop: EventLoop) {
        self.settings = settings
        self.loop = loop
        self.machine = LeaseMachine(configuration: settings, jitterSeed: UInt64.random(in: 1...UInt64.max))
        self.published = ThreadLock(Published(lease: settings.leaseTtlS ?? 0))
        self.telemetry = LeaseTelemetry(settings: settings)
        registryIndex = settings.session?.register(self) ?? 0
    }

    deinit {
        telemetry.released()
        let timer = self.leaseTimer
        if let session = settings.session {
            session.unregister(registryIndex)
            // A lock held on a shared connection is released there: the connection stays.
            let release = machine.releaseWhenDropped.flatMap { dropped in try? settings.request(for: .release(token: dropped.token)) }
            let (member, channel, slot) = (sharedMember, settings.channel, tickTimerSlot)
            let connection = member == nil ? self.connection : nil
            if release != nil || member != nil || timer != nil || connection != nil || slot != nil {
                loop.runOnLoop {
                    if let release { session.sendUnanswered(release, channel: channel) }
                    if let member { session.detach(member) }
                    if let slot { session.leaseTimers.freeSlot(slot) }
                    connection?.close()
                    timer?.close()
                }
            }
            return
        }
        let connection = self.connection
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
        let deadlineMs = publishedDeadlineMs.load(ordering: .acquiring)
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
        loop.runOnLoop { [self] in drive(.closeRequested, deliverLater: true) }
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

    private static func nextCall() -> LeaseMachine.CallID {
        LeaseMachine.CallID(raw: callCounter.wrappingAdd(1, ordering: .relaxed).newValue)
    }

    /// Registers `completion` for `call` and feeds the machine the caller's event; the
    /// machine completes every call exactly once, on a later turn of the loop.
    private func call(_ call: LeaseMachine.CallID, _ completion: PendingCompletion,
                      _ event: @escaping (LeaseMachine.CallID) -> LeaseMachine.Event) {
        loop.runOnLoop(ifShutDown: { Self.complete(completion, .failed(.eventLoopShutDown)) }) { [self] in
            completions.set(completion, for: call)
            drive(event(call), deliverLater: true)
        }
    }

    /// Feeds `event` to the machine, then every event that arrives while its actions are
    /// performed, in order. Completions run once the final state is published, so a caller
    /// resumed by one sees the state that completed it. The results of a caller's call are
    /// delivered on a later turn (`deliverLater`), never inside that call.
    private func drive(_ event: LeaseMachine.Event, deliverLater: Bool = false) {
        guard !isDraining else {
            eventQueue.append(event)
            return
        }
        isDraining = true
        step(event)
        if !eventQueue.isEmpty {
            var next = 0
            while next < eventQueue.count {
                step(eventQueue[next])
                next += 1
            }
            // Not kept for the next time: with 100,000 locks a queue's storage each is 20 MB.
            eventQueue = []
        }
        isDraining = false
        publish()
        let wasBusy = selfWhileBusy
        defer { withExtendedLifetime(wasBusy) {} }
        selfWhileBusy = completions.isEmpty ? nil : self
        guard !deliveries.isEmpty else { return }
        let ready = deliveries
        deliveries.removeAll()
        if deliverLater {
            loop.runLater { for delivery in ready { delivery() } }
        } else {
            for delivery in ready { delivery() }
        }
    }

    private func step(_ event: LeaseMachine.Event) {
        let before = telemetry.before(machine)
        let actions = machine.handle(event)
        telemetry.observe(event, before: before, actions: actions, after: machine, nowMs: loop.nowMs)
        for action in actions { perform(action) }
    }

    private func perform(_ action: LeaseMachine.Action) {
        switch action {
        case .openConnection(let session):
            openConnection(session, to: settings.endpoint)
        case .closeConnection:
            // The machine only closes its live session, which is this connection.
            // The timer belongs to the session too: an idle lock keeps no libuv handle.
            let closing = connection
            connection = nil
            connectionObserver = nil
            closing?.close()
            leaseTimer?.close()
            leaseTimer = nil
            cancelTickTimer()
        case .redirectSession(_, let session, let server):
            // Only the connection changes: the lease timer, if scheduled, goes on for the new
            // session.
            let follower = connection
            connection = nil
            connectionObserver = nil
            follower?.close()
            timerSession = session
            openConnection(session, to: server)
        case .attachShared(let session):
            guard let lockSession = settings.session else {
                assertionFailure("\(key): attachShared without a session")
                return
            }
            if let member = sharedMember, let open = lockSession.reattach(member, session: session) {
                // Still a member of the open connection: ready now (the event is queued behind
                // this action, as every event that arrives while actions are performed).
                connection = open
                drive(.connected(session))
                return
            }
            if let member = sharedMember { lockSession.detach(member) }
            sharedMember = lockSession.attach(self, session: session, channel: settings.channel)
        case .detachShared:
            connection = nil
            cancelTickTimer()
        case .releaseUnanswered(_, let token):
            if let request = try? settings.request(for: .release(token: token)) {
                settings.session?.sendUnanswered(request, channel: settings.channel)
            }
        case .send(let session, let outgoing):
            send(outgoing, session: session)
        case .scheduleTimer(let session, let milliseconds):
            timerSession = session
            if let timers = settings.session?.leaseTimers {
                let slot = tickTimerSlot ?? timers.makeSlot(for: self)
                tickTimerSlot = slot
                timers.schedule(slot, afterMilliseconds: milliseconds)
                return
            }
            let timer = leaseTimer ?? LoopTimer(loop: loop) { [weak self] in self?.leaseTimerFired() }
            leaseTimer = timer
            timer.schedule(afterMilliseconds: milliseconds)
        case .cancelTimer:
            leaseTimer?.cancel()
            cancelTickTimer()
        case .complete(let call, _, let outcome):
            guard let completion = completions.removeValue(forKey: call) else {
                assertionFailure("\(key): a completion for unknown call \(call)")
                return
            }
            deliveries.append { Self.complete(completion, outcome) }
        case .reportLockLost(let token):
            if let onLockLost = settings.onLockLost {
                let key = settings.key
                deliveries.append { onLockLost(key, token) }
            }
        case .stateChanged:
            break
        }
    }

    private static func complete(_ completion: PendingCompletion, _ outcome: LeaseMachine.Outcome) {
        switch (completion, outcome) {
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
        case (.release(let completion), .released):
            completion(.success(()))
        case (.release(let completion), .failed(let error)):
            completion(.failure(error))
        case (.acquire(let completion), _), (.wait(let completion), _):
            completion(.failure(.protocolViolation("outcome \(outcome) for a blocking call")))
        case (.enqueue(let completion), _):
            completion(.failure(.protocolViolation("outcome \(outcome) for enqueue")))
        case (.release(let completion), _):
            completion(.failure(.protocolViolation("outcome \(outcome) for release")))
        }
    }

    private func openConnection(_ session: LeaseMachine.Session, to server: Endpoint) {
        let connection = Connection(endpoint: server, configuration: settings.connection, loop: loop)
        let observer = SessionObserver(lease: self, session: session)
        connection.delegate = observer
        self.connection = connection
        connectionObserver = observer
        connection.connect { [weak self] result in
            switch result {
            case .success: self?.drive(.connected(session))
            case .failure(let error): self?.drive(.failed(session, nil, error))
            }
        }
    }

    private func send(_ outgoing: LeaseMachine.Outgoing, session: LeaseMachine.Session) {
        guard let connection else {
            assertionFailure("\(key): send without a connection")
            return
        }
        let request: Request
        do throws(LockError) {
            request = try settings.request(for: outgoing)
        } catch {
            drive(.failed(session, outgoing, error))
            return
        }
        // The loop's cached time is from before this turn's work: an early send time only
        // makes the local deadline more cautious.
        let sentAtMs = uv_now(loop.raw)
        connection.send(request) { [weak self] result in
            switch result {
            case .success(let reply): self?.drive(.answered(session, outgoing, reply, sentAtMs: sentAtMs))
            case .failure(let error): self?.drive(.failed(session, outgoing, error))
            }
        }
    }

    /// Publishes the state for other threads. The deadline first: a reader that sees `.held`
    /// under the lock then sees the deadline of that grant too.
    private func publish() {
        let holding = machine.holding
        publishedDeadlineMs.store(holding?.deadlineMs ?? .max, ordering: .releasing)
        var next = published.valueForItsOnlyWriter()
        let unchanged = next.state == machine.publicState && next.token == holding?.grant.token
            && (holding == nil || next.lease == holding?.leaseS)
        guard !unchanged else { return }
        next.state = machine.publicState
        next.token = holding?.grant.token
        if let holding { next.lease = holding.leaseS }
        published.withLock { $0 = next }
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
            self.loop.runOnLoop { [self] in drive(.cancelRequested(call), deliverLater: true) }
        }
    }
}

/// The delegate of one session's connection: reports its end as that session's failure.
private final class SessionObserver: ConnectionDelegate {
    weak var lease: DistributedLease?
    let session: LeaseMachine.Session

    init(lease: DistributedLease, session: LeaseMachine.Session) {
        self.lease = lease
        self.session = session
    }

    func connection(_ connection: Connection, didCloseWith error: LockError) {
        lease?.connectionEnded(session: session, error: error)
    }
}

extension DistributedLease: TickTimerOwner {
    fileprivate func connectionEnded(session: LeaseMachine.Session, error: LockError) {
        drive(.failed(session, nil, error))
    }

    /// The session's shared connection has been silent too long: renew now, if this lock holds
    /// through it (the machine decides). Whether the lock holds there. Loop thread.
    func renewForSilentConnection() -> Bool {
        guard machine.route == .shared, machine.holding != nil else { return false }
        drive(.renewalRequested(machine.session, nowMs: loop.nowMs))
        return true
    }

    private func cancelTickTimer() {
        if let tickTimerSlot { settings.session?.leaseTimers.cancel(tickTimerSlot) }
    }

    /// The session's ``TickTimers`` fired this lock's live timer. Loop thread.
    func tickTimerFired() {
        leaseTimerFired()
    }

    /// The lease timer (the lock's own or its slot of the session's) fired, perhaps late: the
    /// machine decides with the loop's fresh time.
    private func leaseTimerFired() {
        uv_update_time(loop.raw)
        drive(.timerFired(timerSession, nowMs: uv_now(loop.raw)))
    }

    /// The session's shared connection is open for this lock's `session`. Loop thread.
    func sharedConnectionReady(_ session: LeaseMachine.Session, connection: Connection) {
        if machine.session == session, machine.route == .shared { self.connection = connection }
        drive(.connected(session))
    }

    /// The shared connection of this lock's `session` could not be had, or ended. Loop thread.
    func sharedConnectionFailed(_ session: LeaseMachine.Session, error: LockError) {
        // The session has already dropped the member, whichever session it last served.
        sharedMember = nil
        drive(.failed(session, nil, error))
    }

    /// Whether the lock holds through the shared connection in `session` (for the session's
    /// log of what a lost connection took). Loop thread.
    func holdsOnSharedConnection(in session: LeaseMachine.Session) -> Bool {
        machine.session == session && machine.route == .shared && machine.holding != nil
    }

    /// The session closes: like ``close()``, on the loop thread, now. Loop thread.
    func closeForSession() {
        drive(.closeRequested, deliverLater: true)
    }
}

/// The result of `enqueue()`: `"acquired" | "queued"` in dflockd's TypeScript client.
public enum EnqueueResult: Sendable, Hashable {
    /// The key was free and is now held (renewal already runs).
    case acquired
    /// The key is taken; this instance waits in its FIFO queue. Call `wait()`.
    case queued
}
