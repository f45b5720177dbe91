import CUV
import Synchronization

/// The machinery of one ``DistributedLease``: its ``LeaseMachine`` on the event loop, the
/// connection of its current session (its own, or its place on a ``LockSession``'s shared
/// one), its lease timer, and the state it publishes for other threads.
///
/// Callers hold the lease, a handle that owns its driver; the driver is never referenced
/// weakly. A weak reference would give it a side table, and every retain and release of it
/// (several per renewal) would take the runtime's slow path. The loop's long-lived tables (a
/// session's members and lease timers, its connection's delegate, its own timer) refer to the
/// driver without keeping it alive, and the driver takes itself out of all of them on the loop
/// (``tearDown()``) when its handle has gone and no call is in flight. Until then the handle, a
/// call in flight (``selfWhileBusy``) or a request in flight keeps it alive.
final class LeaseDriver: @unchecked Sendable {
    let settings: LeaseSettings
    let loop: EventLoop
    var key: String { settings.key }

    // Loop-confined. Those marked `@exclusivity(unchecked)` skip Swift's dynamic exclusivity
    // checks in release builds: they were a tenth of a request's instructions (callgrind), only
    // the loop thread touches them, and debug builds, which the tests run, check every access.
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
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
    private var tickTimerSlot: TickTimers<LeaseDriver>.Slot?
    /// The completion of every call the machine has not completed yet.
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    private var completions = CallTable<LeaseMachine.CallID, PendingCompletion>()
    /// Set while a completion is owed, so that it runs even if the caller let go of the handle.
    private var selfWhileBusy: LeaseDriver?
    /// The handle has gone: tear down once no call is in flight.
    private var handleIsGone = false
    /// Out of the loop's tables, its connection closed: events of requests still in flight
    /// find nothing to do.
    private var isTornDown = false
    /// Events that arrived while the machine's actions were being performed (a connection
    /// closed by an action reports on its way out): fed to the machine afterwards, in order.
    /// Its storage is borrowed from the loop's ``DriverScratch`` while in use.
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    private var eventQueue: [LeaseMachine.Event] = []
    private var isDraining = false
    /// A step changed the state, token or lease that ``publish()`` shows other threads.
    private var mustPublish = false
    /// Completions and callbacks produced by the events being drained, run once the resulting
    /// state is published. Its storage is borrowed from the loop's ``DriverScratch``.
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    private var deliveries: [Delivery] = []

    let published: ThreadLock<Published>
    /// The local lease deadline (loop clock, ms; `UInt64.max`: nothing held), apart from the
    /// rest so that a renewal, which moves only the deadline, publishes without a lock.
    let publishedDeadlineMs = Atomic<UInt64>(.max)
    /// Logs and metrics of the machine's steps. Loop-confined.
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    private var telemetry: LeaseTelemetry

    struct Published {
        var state = LockState.idle
        var token: String?
        var lease = 0
    }

    /// What a drained step owes: data, not a closure, so that it costs no allocation.
    fileprivate enum Delivery {
        case complete(PendingCompletion, LeaseMachine.Outcome)
        case lockLost(token: String)
    }

    enum PendingCompletion {
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
    }

    deinit {
        // A loop shut down before the handle went never ran the tear-down; the held gauge
        // still counts down (nothing else refers to the telemetry by now, on any thread).
        if !isTornDown { telemetry.released() }
    }

    // MARK: - From the handle (any thread)

    /// Registers `completion` for `call` and feeds the machine the caller's event; the
    /// machine completes every call exactly once, on a later turn of the loop.
    func call(_ call: LeaseMachine.CallID, _ completion: PendingCompletion,
              _ event: (LeaseMachine.CallID) -> LeaseMachine.Event) {
        let event = event(call)
        if loop.inEventLoop, !loop.isShutDown {
            // Called on the loop (a completion handler, or a task on the loop's executor):
            // no closure to allocate for a hop that is not needed.
            completions.set(completion, for: call)
            drive(event, deliverLater: true)
            return
        }
        loop.runOnLoop(ifShutDown: { Self.complete(completion, .failed(.eventLoopShutDown)) }) { [self] in
            completions.set(completion, for: call)
            drive(event, deliverLater: true)
        }
    }

    /// Cancels `call` if it is the operation in flight (the machine decides).
    func cancel(_ call: LeaseMachine.CallID) {
        loop.runOnLoop { [self] in drive(.cancelRequested(call), deliverLater: true) }
    }

    /// Closes the session, as ``DistributedLease/close()``.
    func close() {
        loop.runOnLoop { [self] in drive(.closeRequested, deliverLater: true) }
    }

    /// The caller-facing state, as of the loop's last step.
    var state: LockState { published.withLock { $0.state } }

    /// Releases what is held, for a session's graceful shutdown, which needs no outcome.
    func release() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            call(DistributedLease.nextCall(), .release({ _ in continuation.resume() })) { .releaseRequested($0) }
        }
    }

    /// The handle has gone: what it held is released or closed once no call is in flight.
    func handleDropped() {
        loop.runOnLoop { [self] in
            handleIsGone = true
            if !isDraining, completions.isEmpty { tearDown() }
        }
    }

    // MARK: - Driving the machine (loop thread)

    /// Feeds `event` to the machine, then every event that arrives while its actions are
    /// performed, in order. Completions run once the final state is published, so a caller
    /// resumed by one sees the state that completed it. The results of a caller's call are
    /// delivered on a later turn (`deliverLater`), never inside that call.
    private func drive(_ event: LeaseMachine.Event, deliverLater: Bool = false) {
        guard !isTornDown else { return }
        guard !isDraining else {
            if eventQueue.capacity == 0 { eventQueue = scratch.events.take() }
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
            // Not kept: with 100,000 locks a queue's storage each is 20 MB.
            scratch.events.giveBack(&eventQueue)
        }
        isDraining = false
        publish()
        let wasBusy = selfWhileBusy
        defer { withExtendedLifetime(wasBusy) {} }
        selfWhileBusy = completions.isEmpty ? nil : self
        if handleIsGone, completions.isEmpty { tearDown() }
        guard !deliveries.isEmpty else { return }
        var ready: [Delivery] = []
        swap(&ready, &deliveries)
        let onLockLost = settings.onLockLost, key = settings.key
        if deliverLater {
            loop.runLater { for delivery in ready { Self.deliver(delivery, onLockLost: onLockLost, key: key) } }
        } else {
            for delivery in ready { Self.deliver(delivery, onLockLost: onLockLost, key: key) }
            scratch.deliveries.giveBack(&ready)
        }
    }

    private static func deliver(_ delivery: Delivery, onLockLost: ((String, String) -> Void)?, key: String) {
        switch delivery {
        case .complete(let completion, let outcome): complete(completion, outcome)
        case .lockLost(let token): onLockLost?(key, token)
        }
    }

    private func owe(_ delivery: Delivery) {
        if deliveries.capacity == 0 { deliveries = scratch.deliveries.take() }
        deliveries.append(delivery)
    }

    private func step(_ event: LeaseMachine.Event) {
        let stateBefore = machine.publicState
        let holdingBefore = machine.holding
        let scratch = scratch
        var actions = scratch.actions.take()
        defer { scratch.actions.giveBack(&actions) }
        machine.handle(event, into: &actions)
        let holding = machine.holding
        telemetry.observe(event, before: LeaseTelemetry.Before(holding: holdingBefore), actions: actions, after: holding,
                          isConnected: machine.isConnected, nowMs: loop.nowMs)
        if !mustPublish {
            // A renewal moves only the deadline, which is published apart; the token changes
            // only with a new grant.
            mustPublish = machine.publicState != stateBefore || holding?.leaseS != holdingBefore?.leaseS
                || holding?.grant.token != holdingBefore?.grant.token
        }
        for action in actions { perform(action) }
    }

    /// The loop's scratch storage, made by the first driver that needs it.
    private var scratch: DriverScratch {
        if let made = loop.leaseDriverScratch { return unsafeDowncast(made, to: DriverScratch.self) }
        let scratch = DriverScratch()
        loop.leaseDriverScratch = scratch
        return scratch
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
            // The driver closes its timer before it goes (`closeConnection`, `tearDown()`).
            let timer = leaseTimer ?? LoopTimer(loop: loop) { [unowned(unsafe) self] in self.leaseTimerFired() }
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
            owe(.complete(completion, outcome))
        case .reportLockLost(let token):
            if settings.onLockLost != nil { owe(.lockLost(token: token)) }
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
        let connection = Connection(endpoint: server, sharedConfiguration: settings.connection, loop: loop)
        let observer = SessionObserver(driver: self, session: session)
        connection.delegate = observer
        self.connection = connection
        connectionObserver = observer
        connection.connect { [self] result in
            switch result {
            case .success: drive(.connected(session))
            case .failure(let error): drive(.failed(session, nil, error))
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
        // The request in flight keeps the driver alive until it is answered or fails (a
        // connection that ends fails every request on it).
        connection.send(request) { [self] result in
            switch result {
            case .success(let reply): drive(.answered(session, outgoing, reply, sentAtMs: sentAtMs))
            case .failure(let error): drive(.failed(session, outgoing, error))
            }
        }
    }

    /// Publishes the state for other threads. The deadline first: a reader that sees `.held`
    /// under the lock then sees the deadline of that grant too.
    private func publish() {
        let holding = machine.holding
        publishedDeadlineMs.store(holding?.deadlineMs ?? .max, ordering: .releasing)
        // Without reading the published copy (another allocation, a cache miss per lock when
        // 100,000 renew) unless a step changed what it shows.
        guard mustPublish else { return }
        mustPublish = false
        var next = published.valueForItsOnlyWriter()
        next.state = machine.publicState
        next.token = holding?.grant.token
        if let holding { next.lease = holding.leaseS }
        published.withLock { $0 = next }
    }

    /// Takes the driver out of the loop's tables and ends what its handle left: a key held on
    /// a shared connection is released there (the connection stays); a connection of the lock's
    /// own is closed (the server then frees what it held). Once, on the loop.
    private func tearDown() {
        guard !isTornDown else { return }
        isTornDown = true
        telemetry.released()
        if let session = settings.session {
            if let dropped = machine.releaseWhenDropped, let request = try? settings.request(for: .release(token: dropped.token)) {
                session.sendUnanswered(request, channel: settings.channel)
            }
            if let sharedMember { session.detach(sharedMember) }
            if let tickTimerSlot { session.leaseTimers.freeSlot(tickTimerSlot) }
            sharedMember = nil
            tickTimerSlot = nil
        }
        // A connection with an observer is the lock's own; the shared one is the session's.
        if connectionObserver != nil {
            connectionObserver = nil
            connection?.close()
        }
        connection = nil
        leaseTimer?.close()
        leaseTimer = nil
    }
}

/// Array storage the drivers of one loop borrow while they drive: a machine step's actions,
/// the events queued while they are performed, the completions owed. An array per step, per
/// queue and per drive cost an allocation, a reallocation or two and a free each, about a
/// fifth of a request's instructions on a shared connection (callgrind); a driver cannot keep
/// its own (with 100,000 locks they would cost as much memory as the locks). A driver that
/// drives while another holds the storage (one driver's completion driving another) borrows
/// an empty array, which allocates as before.
private final class DriverScratch {
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    var actions = Spare<LeaseMachine.Action>()
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    var events = Spare<LeaseMachine.Event>()
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    var deliveries = Spare<LeaseDriver.Delivery>()

    /// One spare array: taken whole (the taker gets its storage), given back emptied.
    struct Spare<Element> {
        private var storage: [Element] = []

        mutating func take() -> [Element] {
            var taken: [Element] = []
            swap(&taken, &storage)
            return taken
        }

        /// Keeps the larger storage of the two; `array` is left empty, without storage.
        mutating func giveBack(_ array: inout [Element]) {
            array.removeAll(keepingCapacity: true)
            if array.capacity > storage.capacity { swap(&array, &storage) }
            array = []
        }
    }
}

/// The delegate of one session's connection: reports its end as that session's failure.
private final class SessionObserver: ConnectionDelegate {
    /// The driver drops its observer before it goes.
    unowned(unsafe) let driver: LeaseDriver
    let session: LeaseMachine.Session

    init(driver: LeaseDriver, session: LeaseMachine.Session) {
        self.driver = driver
        self.session = session
    }

    func connection(_ connection: Connection, didCloseWith error: LockError) {
        driver.connectionEnded(session: session, error: error)
    }
}

extension LeaseDriver: TickTimerOwner {
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
