/// The life cycle of one lock (or semaphore slot) as a pure value: events in, actions out.
///
/// It owns no socket and no timer, so a unit test drives it with events alone. The driver
/// (``DistributedLock``) performs the actions it returns, in order, and feeds back what the
/// connection and timers report. Lock and semaphore share it: it names its requests abstractly
/// (``Outgoing``) and the driver maps them to `l`/`sl` and friends.
struct LeaseMachine: Sendable {
    /// The caller-facing operations that can be in flight, one at a time.
    enum Operation: Sendable, Hashable {
        case acquire, enqueue, wait
    }

    /// How an operation ended.
    enum Outcome: Sendable, Hashable {
        /// Granted (acquire/wait true; enqueue `.acquired`).
        case granted
        /// Enqueue found the key taken and joined its queue.
        case queued
        /// The server's timeout passed (acquire/wait false).
        case timedOut
        case failed(LockError)
    }

    /// Requests the driver sends on the current connection.
    enum Outgoing: Sendable, Hashable {
        case acquire(timeoutS: Int)
        case enqueue
        case wait(timeoutS: Int)
        case renew(token: String)
        case release(token: String)
    }

    enum Event: Sendable, Hashable {
        // From the caller.
        case acquireRequested(force: Bool)
        case enqueueRequested(force: Bool)
        case waitRequested(timeoutS: Int)
        case releaseRequested
        case closeRequested
        /// The caller's task was cancelled while an operation was in flight.
        case cancelRequested
        // From the connection.
        case connected
        /// The grant reached us; `sentAtMs` is when the request that earned it was sent.
        case granted(Grant, sentAtMs: UInt64)
        case enqueuedBehindHolder
        case timedOut
        case renewed(leaseS: Int, sentAtMs: UInt64)
        case released
        case requestFailed(LockError)
        case connectionLost(LockError)
        /// The lease timer fired: renew, or, with a renewal unanswered, check the deadline.
        case timerFired(nowMs: UInt64)
    }

    enum Action: Sendable, Hashable {
        case openConnection
        case closeConnection
        case send(Outgoing)
        /// (Re)starts the one lease timer: it fires ``Event/timerFired(nowMs:)``.
        case scheduleTimer(afterMs: Int)
        case cancelTimer
        /// Ends the operation in flight with `outcome`.
        case finish(Operation, Outcome)
        /// Ends the pending release: with success when `error` is nil.
        case finishRelease(error: LockError?)
        /// Rejects the request just made, leaving the machine as it was.
        case reject(LockError)
        /// Accepts the request just made as the operation in flight.
        case accept(Operation)
        /// Accepts the release just requested; ``finishRelease(_:)`` follows, now or later.
        case acceptRelease
        /// Calls `onLockLost(key, token)`.
        case reportLockLost(token: String)
        case stateChanged(LockState)
    }

    /// What the machine knows about a held grant.
    struct Holding: Sendable, Hashable {
        var grant: Grant
        var leaseS: Int
        /// When the lease ends by our own clock, less a safety margin: the send time of the
        /// request that earned the grant or the last renewal, plus the lease the server answered,
        /// minus ``LeaseMachine/safetyMarginMs(leaseMs:renewalDelayMs:)``. The lock is declared
        /// lost when the timer reaches it without a renewal having moved it.
        var deadlineMs: UInt64
        var renewalInFlight = false
    }

    enum State: Sendable, Hashable {
        case idle
        case connecting(Operation)
        /// Placed in the key's queue, or asking to be: `operation` is in flight when non-nil
        /// (acquire or wait blocking, enqueue awaiting its answer), nil between enqueue and wait.
        case queued(Operation?)
        case held(Holding)
        case releasing(token: String)
        /// Released, closed, timed out or lost; `lostToken` is set after a lost lease until the
        /// next acquisition, so that `release()` can say what happened.
        case closed(lostToken: String?)
    }

    let key: String
    let acquireTimeoutS: Int
    let renewRatio: Double
    /// The longest gap between two requests on a held connection: servers close a connection
    /// that sends nothing for their read timeout (23 s by default), releasing its locks.
    let maxIdleMs: Int?
    private(set) var state = State.idle

    init(key: String, acquireTimeoutS: Int, renewRatio: Double, maxIdleMs: Int? = nil) {
        self.key = key
        self.acquireTimeoutS = acquireTimeoutS
        self.renewRatio = renewRatio
        self.maxIdleMs = maxIdleMs
    }

    /// The caller-facing state.
    var publicState: LockState {
        switch state {
        case .idle: return .idle
        case .connecting: return .connecting
        case .queued: return .queued
        case .held: return .held
        case .releasing: return .releasing
        case .closed: return .closed
        }
    }

    /// The current grant, while held.
    var holding: Holding? {
        if case .held(let holding) = state { return holding }
        return nil
    }

    private var isConnected: Bool {
        switch state {
        case .idle, .closed: return false
        case .connecting, .queued, .held, .releasing: return true
        }
    }

    private var operationInFlight: Operation? {
        switch state {
        case .connecting(let operation): return operation
        case .queued(let operation): return operation
        default: return nil
        }
    }

    mutating func handle(_ event: Event) -> [Action] {
        let before = publicState
        var actions = transition(on: event)
        if publicState != before { actions.append(.stateChanged(publicState)) }
        return actions
    }

    private mutating func transition(on event: Event) -> [Action] {
        switch event {
        case .acquireRequested(let force):
            return start(.acquire, force: force)
        case .enqueueRequested(let force):
            return start(.enqueue, force: force)
        case .waitRequested(let timeoutS):
            return startWait(timeoutS: timeoutS)
        case .releaseRequested:
            return release()
        case .closeRequested:
            return shutDown(failingWith: .closed)
        case .cancelRequested:
            guard operationInFlight != nil else { return [] }
            return shutDown(failingWith: .cancelled)
        case .connected:
            return connected()
        case .granted(let grant, let sentAtMs):
            return granted(grant, sentAtMs: sentAtMs)
        case .enqueuedBehindHolder:
            guard case .queued(.enqueue) = state else { return [] }
            state = .queued(nil)
            return [.finish(.enqueue, .queued)]
        case .timedOut:
            guard case .queued(let operation?) = state, operation != .enqueue else { return [] }
            state = .closed(lostToken: nil)
            return [.closeConnection, .finish(operation, .timedOut)]
        case .renewed(let leaseS, let sentAtMs):
            guard case .held(var holding) = state else { return [] }
            holding.renewalInFlight = false
            holding.leaseS = leaseS
            holding.deadlineMs = deadline(sentAtMs: sentAtMs, leaseS: leaseS)
            state = .held(holding)
            return [.scheduleTimer(afterMs: renewalDelayMs(leaseS: leaseS))]
        case .released:
            guard case .releasing = state else { return [] }
            state = .closed(lostToken: nil)
            return [.closeConnection, .finishRelease(error: nil)]
        case .requestFailed(let error):
            return requestFailed(error)
        case .connectionLost(let error):
            return connectionLost(error)
        case .timerFired(let nowMs):
            return timerFired(nowMs: nowMs)
        }
    }

    /// Renews when due; with a renewal unanswered, the timer waits for the local deadline, and
    /// reaching it loses the lock before the server can hand it to someone else.
    private mutating func timerFired(nowMs: UInt64) -> [Action] {
        guard case .held(var holding) = state else { return [] }
        if nowMs >= holding.deadlineMs {
            return lose(holding.grant.token)
        }
        let untilDeadline = Int(holding.deadlineMs - nowMs)
        if holding.renewalInFlight {
            return [.scheduleTimer(afterMs: untilDeadline)]
        }
        holding.renewalInFlight = true
        state = .held(holding)
        return [.send(.renew(token: holding.grant.token)), .scheduleTimer(afterMs: untilDeadline)]
    }

    private mutating func start(_ operation: Operation, force: Bool) -> [Action] {
        var actions: [Action] = []
        if isConnected {
            guard force else { return [.reject(.alreadyConnected(key: key))] }
            actions = shutDown(failingWith: .closed)
        }
        state = .connecting(operation)
        return actions + [.accept(operation), .openConnection]
    }

    private mutating func startWait(timeoutS: Int) -> [Action] {
        switch state {
        case .held:
            // The fast path of enqueue already holds the lock.
            return [.accept(.wait), .finish(.wait, .granted)]
        case .queued(nil):
            state = .queued(.wait)
            return [.accept(.wait), .send(.wait(timeoutS: timeoutS))]
        case .queued(.some), .connecting:
            return [.reject(.operationInProgress(key: key))]
        case .idle, .closed, .releasing:
            return [.reject(.notEnqueued(key: key))]
        }
    }

    private mutating func release() -> [Action] {
        switch state {
        case .held(let holding):
            state = .releasing(token: holding.grant.token)
            return [.acceptRelease, .cancelTimer, .send(.release(token: holding.grant.token))]
        case .connecting, .queued:
            // Nothing is held yet: leaving the queue is closing the session.
            return [.acceptRelease] + shutDown(failingWith: .closed) + [.finishRelease(error: nil)]
        case .releasing:
            return [.reject(.notConnected(key: key))]
        case .closed(let lostToken?):
            state = .closed(lostToken: nil)
            return [.reject(.lockLost(key: key, token: lostToken))]
        case .idle, .closed(nil):
            return [.reject(.notConnected(key: key))]
        }
    }

    private mutating func connected() -> [Action] {
        guard case .connecting(let operation) = state else { return [] }
        state = .queued(operation)
        switch operation {
        case .acquire: return [.send(.acquire(timeoutS: acquireTimeoutS))]
        case .enqueue: return [.send(.enqueue)]
        case .wait: return []
        }
    }

    private mutating func granted(_ grant: Grant, sentAtMs: UInt64) -> [Action] {
        guard case .queued(let operation?) = state else { return [] }
        state = .held(Holding(grant: grant, leaseS: grant.leaseS, deadlineMs: deadline(sentAtMs: sentAtMs, leaseS: grant.leaseS)))
        return [.scheduleTimer(afterMs: renewalDelayMs(leaseS: grant.leaseS)), .finish(operation, .granted)]
    }

    private mutating func requestFailed(_ error: LockError) -> [Action] {
        switch state {
        case .held(let holding) where holding.renewalInFlight:
            return lose(holding.grant.token)
        case .releasing:
            // The token no longer held the key; say so, and end the session either way.
            state = .closed(lostToken: nil)
            return [.closeConnection, .finishRelease(error: error)]
        case .connecting, .queued:
            return shutDown(failingWith: error)
        default:
            return []
        }
    }

    private mutating func connectionLost(_ error: LockError) -> [Action] {
        switch state {
        case .held(let holding):
            return lose(holding.grant.token)
        case .releasing:
            // The server releases everything of a closed session: the release happened.
            state = .closed(lostToken: nil)
            return [.closeConnection, .finishRelease(error: nil)]
        case .connecting, .queued:
            return shutDown(failingWith: error)
        case .idle, .closed:
            return []
        }
    }

    private mutating func lose(_ token: String) -> [Action] {
        state = .closed(lostToken: token)
        return [.cancelTimer, .closeConnection, .reportLockLost(token: token)]
    }

    /// Ends the session: closes the connection and fails the operation in flight, if any.
    private mutating func shutDown(failingWith error: LockError) -> [Action] {
        let operation = operationInFlight
        let wasReleasing: Bool
        if case .releasing = state { wasReleasing = true } else { wasReleasing = false }
        let wasConnected = isConnected
        if case .closed = state {} else { state = .closed(lostToken: nil) }
        var actions: [Action] = []
        if wasConnected { actions += [.cancelTimer, .closeConnection] }
        if let operation { actions.append(.finish(operation, .failed(error))) }
        if wasReleasing { actions.append(.finishRelease(error: nil)) }
        return actions
    }

    /// A lease in milliseconds; absurd leases from a misbehaving server are capped at 2³¹ s
    /// (68 years) rather than overflowing.
    static func milliseconds(_ seconds: Int) -> UInt64 {
        UInt64(min(max(seconds, 0), 1 << 31)) * 1000
    }

    /// How much sooner than the end of the lease by our clock the lock is given up.
    ///
    /// The server starts a lease when it reads the request, which is after we sent it, so
    /// `sentAt + lease` is the earliest moment it may hand the key to someone else. A timer
    /// never fires before its time, and fires late by however long the loop is busy: a deadline
    /// checked exactly at `sentAt + lease` loses that race about half the time. A tenth of the
    /// lease, at most a second, absorbs ordinary lateness; it never takes more than half the
    /// time between the renewal and the end of the lease, so the renewal still has time to be
    /// answered. (A stall longer than the margin cannot be covered by any timer: callers check
    /// `leaseRemaining` before a protected write.)
    static func safetyMarginMs(leaseMs: UInt64, renewalDelayMs: UInt64) -> UInt64 {
        guard leaseMs > renewalDelayMs else { return 0 }
        return min(leaseMs / 10, 1000, (leaseMs - renewalDelayMs) / 2)
    }

    /// The local deadline of a lease of `leaseS` earned by a request sent at `sentAtMs`.
    private func deadline(sentAtMs: UInt64, leaseS: Int) -> UInt64 {
        let leaseMs = Self.milliseconds(leaseS)
        let margin = Self.safetyMarginMs(leaseMs: leaseMs, renewalDelayMs: UInt64(renewalDelayMs(leaseS: leaseS)))
        return sentAtMs + leaseMs - margin
    }

    private func renewalDelayMs(leaseS: Int) -> Int {
        let byRatio = max(1, Int((Double(Self.milliseconds(leaseS)) * renewRatio).rounded(.down)))
        return maxIdleMs.map { min(byRatio, $0) } ?? byRatio
    }
}

