/// The life cycle of one lock (or semaphore slot) as a pure value: events in, actions out.
///
/// Every rule that decides a transition lives here: which call may start when, which failure
/// means the lease is lost, refused or released, the `wait` timeout default, how a late grant is
/// verified, what cancelling does, and which events are stale. The driver
/// (``DistributedLease``) only performs the actions, in order, and feeds back what the
/// connection and timers report, each connection event tagged with the ``Session`` it belongs
/// to. Lock and semaphore share it: it names its requests abstractly (``Outgoing``) and the
/// driver maps them to `l`/`sl` and friends.
///
/// Every call the caller makes (``Event/acquireRequested(_:force:)`` and the rest carry a
/// ``CallID``) ends in exactly one ``Action/complete(_:_:_:)``, now or later.
struct LeaseMachine: Sendable {
    /// One connection's generation: every connection event names the session it came from, and
    /// events of a session that has ended are ignored.
    typealias Session = UInt64

    /// Names one caller call, so its completion and its cancellation find it.
    struct CallID: Sendable, Hashable, CustomStringConvertible {
        let raw: UInt64
        var description: String { "#\(raw)" }
    }

    /// The caller-facing operations.
    enum Operation: Sendable, Hashable {
        case acquire, enqueue, wait, release
    }

    /// How a call ended.
    enum Outcome: Sendable, Hashable {
        /// Granted (acquire/wait true; enqueue `.acquired`).
        case granted
        /// Enqueue found the key taken and joined its queue.
        case queued
        /// The server's timeout passed (acquire/wait false).
        case timedOut
        /// The release took effect (or the session it would have ended is gone).
        case released
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

    enum Event: Sendable, Equatable {
        // From the session of a lock on a shared connection.
        /// The shared connection has been silent for a while: renew now if held (and no renewal
        /// is in flight), so the server's read timeout does not end the connection.
        case renewalRequested(Session, nowMs: UInt64)
        // From the caller.
        case acquireRequested(CallID, force: Bool)
        case enqueueRequested(CallID, force: Bool)
        /// `timeoutS` nil: the lock's `acquireTimeoutS`.
        case waitRequested(CallID, timeoutS: Int?)
        case releaseRequested(CallID)
        case closeRequested
        /// The task that made call `CallID` was cancelled.
        case cancelRequested(CallID)
        // From the connection of `Session`.
        case connected(Session)
        /// The server answered `request`, which was sent at `sentAtMs` (loop clock).
        case answered(Session, Outgoing, Reply, sentAtMs: UInt64)
        /// `request` failed (a server status or the connection failing under it); nil
        /// `request`: the connection itself failed or ended.
        case failed(Session, Outgoing?, LockError)
        // From the lease timer, scheduled for `Session`.
        case timerFired(Session, nowMs: UInt64)
    }

    enum Action: Sendable, Hashable {
        case openConnection(Session)
        /// Replaces the connection of session `from` with a new one, session `to`, to `server`
        /// (a cluster's leader). The lease goes on across it: a scheduled lease timer keeps
        /// running and fires for `to`. Indirect: rare, and its endpoint inline made every
        /// action, copied on every step, 58 bytes instead of 34.
        indirect case redirectSession(from: Session, to: Session, server: Endpoint)
        case closeConnection(Session)
        /// Join the session's shared connection for the key (a lock on a ``LockSession``):
        /// ``Event/connected(_:)`` or ``Event/failed(_:_:_:)`` follows, as for a connection of
        /// its own.
        case attachShared(Session)
        /// Leave the shared connection: nothing is closed, later events of the session are
        /// stale.
        case detachShared(Session)
        /// Send `r` for `token` on the shared connection of `Session` and ignore the answer: a
        /// shared connection cannot be closed to free one lock's key.
        case releaseUnanswered(Session, token: String)
        case send(Session, Outgoing)
        /// (Re)starts the one lease timer: it fires ``Event/timerFired(_:nowMs:)``.
        case scheduleTimer(Session, afterMs: Int)
        case cancelTimer
        /// Ends call `CallID` (an `Operation`) with `Outcome`. Exactly once per call.
        case complete(CallID, Operation, Outcome)
        /// Calls `onLockLost(key, token)`.
        case reportLockLost(token: String)
        case stateChanged(LockState)
    }

    /// The one caller operation in flight (besides a release).
    struct Pending: Sendable, Hashable {
        let call: CallID
        let operation: Operation
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
        /// The renewal in flight was redirected: it is sent again once the new session opens.
        var renewalAwaitsConnection = false
    }

    enum State: Sendable, Hashable {
        case idle
        /// Opening the session for an acquire or enqueue.
        case connecting(Pending)
        /// `l`, `e` or `w` sent, the answer awaited.
        case requesting(Pending)
        /// A `w` answered with a grant that may have started long before it: the server dates
        /// a lease from the grant, which can precede the `w` by more than the lease. The renewal
        /// sent to confirm it is awaited before the wait reports held.
        case verifying(Pending, Grant)
        /// In the key's queue (enqueue answered `queued`), no call in flight.
        case queued
        case held(Holding)
        /// `r` sent for `token`; `leaseS` is the lease it ran under, for the error that says when
        /// the server frees the key at the latest.
        case releasing(CallID, token: String, leaseS: Int)
        /// Released, closed, timed out or lost; `lostToken` is set after a lost lease until the
        /// next acquisition, so that `release()` can say what happened.
        case closed(lostToken: String?)
    }

    /// What a machine is made with, fixed for its life. A class, so that the machine (a value,
    /// copied as it steps) carries one reference, and so that a lock's settings can be this very
    /// object (``LeaseSettings`` extends it): with 100,000 locks, a copy of these in every
    /// machine cost 50 bytes a lock.
    class Configuration: @unchecked Sendable {
        let key: String
        let acquireTimeoutS: Int
        let renewRatio: Double
        /// The longest gap between two requests on a held connection: servers close a
        /// connection that sends nothing for their read timeout (23 s by default), releasing its
        /// locks. It caps the renewal period of a lock on a connection of its own; a shared
        /// connection is kept from going silent by its ``LockSession`` instead (one early
        /// renewal for the whole connection, not every lock renewing that often).
        let maxIdleMs: Int?
        /// Every configured server: a cluster follower's redirect is followed only to one of
        /// them.
        let members: [Endpoint]
        /// A lock on a ``LockSession``: acquire and enqueue first try the key on the shared
        /// connection without blocking, and hold it there when granted.
        let sharesConnection: Bool

        init(key: String, acquireTimeoutS: Int, renewRatio: Double, maxIdleMs: Int?, members: [Endpoint], sharesConnection: Bool) {
            self.key = key
            self.acquireTimeoutS = acquireTimeoutS
            self.renewRatio = renewRatio
            self.maxIdleMs = maxIdleMs
            self.members = members
            self.sharesConnection = sharesConnection
        }
    }

    let configuration: Configuration
    var key: String { configuration.key }
    var acquireTimeoutS: Int { configuration.acquireTimeoutS }
    var renewRatio: Double { configuration.renewRatio }
    var maxIdleMs: Int? { configuration.maxIdleMs }
    var members: [Endpoint] { configuration.members }
    var sharesConnection: Bool { configuration.sharesConnection }
    private(set) var state = State.idle
    /// Redirects followed for the call (or renewal) in flight; see ``LeaderHint/redirectBudget``.
    private var redirects = 0
    /// Where the current session runs: the shared connection or one of the lock's own.
    private(set) var route = Route.own
    /// A shared session ended with a try (`l key 0`) unanswered: a grant it still brings is
    /// released unanswered, so that no key stays held by nobody.
    private(set) var orphanedTry: Session?
    /// State of the renewal jitter (xorshift).
    private var jitterState: UInt64

    enum Route: Sendable, Hashable {
        case own, shared
    }
    /// The latest session opened; it is live while ``isConnected``.
    private(set) var session: Session = 0

    init(configuration: Configuration, jitterSeed: UInt64 = 0) {
        self.configuration = configuration
        self.jitterState = jitterSeed | 1
    }

    init(key: String, acquireTimeoutS: Int, renewRatio: Double, maxIdleMs: Int? = nil, members: [Endpoint] = [],
         sharesConnection: Bool = false, jitterSeed: UInt64 = 0) {
        self.init(configuration: Configuration(key: key, acquireTimeoutS: acquireTimeoutS, renewRatio: renewRatio, maxIdleMs: maxIdleMs,
                                               members: members, sharesConnection: sharesConnection),
                  jitterSeed: jitterSeed)
    }

    /// What must be sent when the driver is dropped now: a lock held on a shared connection
    /// releases its key there (the connection outlives it).
    var releaseWhenDropped: (Session, token: String)? {
        guard route == .shared, case .held(let holding) = state else { return nil }
        return (session, holding.grant.token)
    }

    /// The caller-facing state.
    var publicState: LockState {
        switch state {
        case .idle: return .idle
        case .connecting: return .connecting
        case .requesting, .verifying, .queued: return .queued
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

    /// Whether a session is open (or opening).
    var isConnected: Bool {
        switch state {
        case .idle, .closed: return false
        case .connecting, .requesting, .verifying, .queued, .held, .releasing: return true
        }
    }

    /// The caller operation in flight, other than a release.
    var pending: Pending? {
        switch state {
        case .connecting(let pending), .requesting(let pending), .verifying(let pending, _): return pending
        default: return nil
        }
    }

    /// Feeds `event` to the machine; the actions it chooses are appended to `actions`, in the
    /// order they must be performed. The driver passes a buffer it reuses: a step's actions
    /// then cost no allocation.
    mutating func handle(_ event: Event, into actions: inout [Action]) {
        let before = publicState
        transition(on: event, into: &actions)
        if publicState != before { actions.append(.stateChanged(publicState)) }
    }

    /// ``handle(_:into:)`` into a new array: the form for tests, which compare whole steps.
    mutating func handle(_ event: Event) -> [Action] {
        var actions: [Action] = []
        handle(event, into: &actions)
        return actions
    }

    private mutating func transition(on event: Event, into actions: inout [Action]) {
        switch event {
        case .acquireRequested(let call, let force):
            start(Pending(call: call, operation: .acquire), force: force, into: &actions)
        case .enqueueRequested(let call, let force):
            start(Pending(call: call, operation: .enqueue), force: force, into: &actions)
        case .waitRequested(let call, let timeoutS):
            startWait(call, timeoutS: timeoutS ?? acquireTimeoutS, into: &actions)
        case .releaseRequested(let call):
            release(call, into: &actions)
        case .closeRequested:
            shutDown(failingWith: .closed, into: &actions)
        case .cancelRequested(let call):
            // Only the operation in flight is cancelled; a release always runs to its end, and
            // a call that already completed (the cancellation raced its completion) stays done.
            guard pending?.call == call else { return }
            shutDown(failingWith: .cancelled, into: &actions)
        case .connected(let session):
            guard isLive(session) else { return }
            connected(into: &actions)
        case .answered(let session, let request, let reply, let sentAtMs):
            if session == orphanedTry, case .acquire = request {
                orphanedTry = nil
                if case .granted(let grant) = reply { actions.append(.releaseUnanswered(session, token: grant.token)) }
                return
            }
            guard isLive(session) else { return }
            answered(request, reply, sentAtMs: sentAtMs, into: &actions)
        case .failed(let session, let request, let error):
            if session == orphanedTry, request != nil { orphanedTry = nil }
            guard isLive(session) else { return }
            failed(request, error, into: &actions)
        case .timerFired(let session, let nowMs):
            guard isLive(session) else { return }
            timerFired(nowMs: nowMs, into: &actions)
        case .renewalRequested(let session, let nowMs):
            guard isLive(session), route == .shared, case .held(let holding) = state, !holding.renewalInFlight else { return }
            timerFired(nowMs: nowMs, into: &actions)
        }
    }

    /// A connection or timer event of a session that has ended (a forced restart, a close, a
    /// loss, or a failure reported once per outstanding request) is stale: ignored.
    private func isLive(_ session: Session) -> Bool {
        isConnected && session == self.session
    }

    // MARK: - Caller calls

    private mutating func start(_ pending: Pending, force: Bool, into actions: inout [Action]) {
        if isConnected {
            guard force else {
                actions.append(.complete(pending.call, pending.operation, .failed(.alreadyConnected(key: key))))
                return
            }
            shutDown(failingWith: .closed, into: &actions)
        }
        session += 1
        redirects = 0
        state = .connecting(pending)
        if sharesConnection {
            route = .shared
            actions.append(.attachShared(session))
            return
        }
        route = .own
        actions.append(.openConnection(session))
    }

    private mutating func startWait(_ call: CallID, timeoutS: Int, into actions: inout [Action]) {
        do throws(LockError) {
            try Validation.timeout(timeoutS, name: "timeoutS")
        } catch {
            actions.append(.complete(call, .wait, .failed(error)))
            return
        }
        switch state {
        case .held:
            // The fast path of enqueue already holds the lock.
            actions.append(.complete(call, .wait, .granted))
        case .queued:
            state = .requesting(Pending(call: call, operation: .wait))
            actions.append(.send(session, .wait(timeoutS: timeoutS)))
        case .connecting, .requesting, .verifying:
            actions.append(.complete(call, .wait, .failed(.operationInProgress(key: key))))
        case .idle, .closed, .releasing:
            actions.append(.complete(call, .wait, .failed(.notEnqueued(key: key))))
        }
    }

    private mutating func release(_ call: CallID, into actions: inout [Action]) {
        switch state {
        case .held(let holding):
            redirects = 0
            state = .releasing(call, token: holding.grant.token, leaseS: holding.leaseS)
            actions.append(.cancelTimer)
            // While the renewal's redirect is still connecting, the release goes there instead.
            if !holding.renewalAwaitsConnection { actions.append(.send(session, .release(token: holding.grant.token))) }
        case .connecting, .requesting, .verifying, .queued:
            // Nothing is held yet: leaving the queue is closing the session.
            shutDown(failingWith: .closed, into: &actions)
            actions.append(.complete(call, .release, .released))
        case .releasing:
            actions.append(.complete(call, .release, .failed(.operationInProgress(key: key))))
        case .closed(let lostToken?):
            state = .closed(lostToken: nil)
            actions.append(.complete(call, .release, .failed(.lockLost(key: key, token: lostToken))))
        case .idle, .closed(nil):
            actions.append(.complete(call, .release, .failed(.notConnected(key: key))))
        }
    }

    // MARK: - Connection events of the live session

    private mutating func connected(into actions: inout [Action]) {
        switch state {
        case .connecting(let pending):
            state = .requesting(pending)
            if route == .shared {
                // The uncontended case never blocks the shared connection: try, and wait on a
                // connection of the lock's own only if the key is taken.
                actions.append(.send(session, .acquire(timeoutS: 0)))
                return
            }
            switch pending.operation {
            case .acquire: actions.append(.send(session, .acquire(timeoutS: acquireTimeoutS)))
            case .enqueue: actions.append(.send(session, .enqueue))
            case .wait, .release: impossible("connecting for \(pending.operation)", into: &actions)
            }
        case .held(var holding) where holding.renewalAwaitsConnection:
            // A redirected renewal, sent again on the leader's session.
            holding.renewalAwaitsConnection = false
            state = .held(holding)
            actions.append(.send(session, .renew(token: holding.grant.token)))
        case .releasing(_, let token, _):
            // Only a redirected release opens a session while releasing.
            actions.append(.send(session, .release(token: token)))
        default:
            impossible("connected while \(state)", into: &actions)
        }
    }

    private mutating func answered(_ request: Outgoing, _ reply: Reply, sentAtMs: UInt64, into actions: inout [Action]) {
        switch (state, request, reply) {
        case (.requesting(let pending), .acquire, .granted(let grant)),
             (.requesting(let pending), .enqueue, .granted(let grant)):
            // Granted on receipt or while the request blocked: the lease started after we sent.
            hold(grant, leaseS: grant.leaseS, sentAtMs: sentAtMs, into: &actions)
            actions.append(.complete(pending.call, pending.operation, .granted))
        case (.requesting(let pending), .enqueue, .queued):
            state = .queued
            actions.append(.complete(pending.call, .enqueue, .queued))
        case (.requesting(let pending), .wait, .granted(let grant)):
            state = .verifying(pending, grant)
            actions.append(.send(session, .renew(token: grant.token)))
        case (.requesting(let pending), .acquire, .timeout) where route == .shared:
            actions.append(endSession())
            if pending.operation == .acquire, acquireTimeoutS == 0 {
                state = .closed(lostToken: nil)
                actions.append(.complete(pending.call, .acquire, .timedOut))
                return
            }
            // Taken: wait (or enqueue) on a connection of the lock's own, where the lock stays
            // until released.
            session += 1
            route = .own
            state = .connecting(pending)
            actions.append(.openConnection(session))
        case (.requesting(let pending), .acquire, .timeout), (.requesting(let pending), .wait, .timeout):
            state = .closed(lostToken: nil)
            actions.append(endSession())
            actions.append(.complete(pending.call, pending.operation, .timedOut))
        case (.verifying(let pending, let grant), .renew, .renewed(let leaseS)):
            hold(grant, leaseS: leaseS, sentAtMs: sentAtMs, into: &actions)
            actions.append(.complete(pending.call, .wait, .granted))
        case (.held(var holding), .renew, .renewed(let leaseS)):
            holding.renewalInFlight = false
            holding.leaseS = leaseS
            holding.deadlineMs = deadline(sentAtMs: sentAtMs, leaseS: leaseS)
            state = .held(holding)
            actions.append(.scheduleTimer(session, afterMs: renewalDelayMs(leaseS: leaseS)))
        case (.releasing(let call, _, _), .release, .ok):
            state = .closed(lostToken: nil)
            actions.append(endSession())
            actions.append(.complete(call, .release, .released))
        case (.releasing, .renew, .renewed):
            // A renewal that crossed the release: the release's own answer decides.
            break
        default:
            // The decoder admits only the replies each request can have, and each request is
            // sent from one state, which only its answer (or the session's end) leaves.
            impossible("\(reply) to \(request) while \(state)", into: &actions)
        }
    }

    private mutating func failed(_ request: Outgoing?, _ error: LockError, into actions: inout [Action]) {
        if case .notLeader(let hint) = error, let request {
            if redirect(request, hint: hint, into: &actions) { return }
            if case .verifying(let pending, _) = state {
                // Not a lease that ran out: the cluster's leader moved under the wait's grant.
                state = .closed(lostToken: nil)
                actions.append(.closeConnection(session))
                actions.append(.complete(pending.call, .wait, .failed(error)))
                return
            }
        }
        let refused = request != nil && error.isServerAnswer
        switch state {
        case .held(let holding):
            // A refused renewal or a lost connection: the lease is no longer ours.
            lose(holding.grant.token, into: &actions)
        case .releasing(let call, _, let leaseS):
            if refused {
                // A refused renewal that crossed the release changes nothing; a refused release
                // says the token no longer held the key.
                guard case .release = request else { return }
                state = .closed(lostToken: nil)
                actions.append(endSession())
                actions.append(.complete(call, .release, .failed(error)))
                return
            }
            state = .closed(lostToken: nil)
            actions.append(endSession())
            actions.append(.complete(call, .release, releaseOutcome(after: error, leaseS: leaseS)))
        case .verifying(let pending, _) where refused:
            // The grant's lease had run out on the server: someone else may hold the key now.
            state = .closed(lostToken: nil)
            actions.append(endSession())
            actions.append(.complete(pending.call, .wait, .failed(.leaseExpired(key: key))))
        case .connecting, .requesting, .verifying, .queued:
            shutDown(failingWith: error, into: &actions)
        case .idle, .closed:
            impossible("a failure of a live session while \(state)", into: &actions)
        }
    }

    /// Follows a cluster follower's `error_not_leader <hint>` to `request`, when the rule allows
    /// it (``LeaderHint``: a configured server, at most ``LeaderHint/redirectBudget`` times per
    /// call): the follower's session ends and a new one to the leader carries the request
    /// again. A request that holds nothing yet (acquire, enqueue) starts over there; a held
    /// lock's renewal and release go there with the same token, which a cluster keeps valid
    /// across a failover. The lease timer keeps running towards the local deadline meanwhile.
    /// `false`: not followed (nothing appended), and the error takes its ordinary course.
    private mutating func redirect(_ request: Outgoing, hint: String?, into actions: inout [Action]) -> Bool {
        // A lock on a session's shared connection does not own it: the session, not one lock,
        // would have to move. Not followed; the caller gets `notLeader` with the hint.
        guard route == .own, redirects < LeaderHint.redirectBudget,
              let leader = LeaderHint.configuredServer(named: hint, among: members) else { return false }
        switch (state, request) {
        case (.requesting(let pending), .acquire), (.requesting(let pending), .enqueue):
            state = .connecting(pending)
        case (.held(var holding), .renew) where holding.renewalInFlight:
            holding.renewalAwaitsConnection = true
            state = .held(holding)
        case (.releasing, .release):
            break
        default:
            // A wait's place in the queue belongs to the connection that enqueued: no
            // other server has it.
            return false
        }
        redirects += 1
        let follower = session
        session += 1
        actions.append(.redirectSession(from: follower, to: session, server: leader))
        return true
    }

    /// What a release whose session failed under it achieved. A closed connection releases
    /// everything it held (the server frees a closed session's keys); a release nobody
    /// answered (a deadline passed, a frozen server) may not have reached it, and the key is
    /// then free at the latest when its lease ends.
    private func releaseOutcome(after error: LockError, leaseS: Int) -> Outcome {
        switch error {
        case .connectionClosed, .tls, .closed:
            return .released
        case .eventLoopShutDown:
            return .failed(.eventLoopShutDown)
        default:
            return .failed(.releaseUnconfirmed(key: key, leaseS: leaseS))
        }
    }

    /// Renews when due; with a renewal unanswered, the timer waits for the local deadline, and
    /// reaching it loses the lock before the server can hand it to someone else.
    private mutating func timerFired(nowMs: UInt64, into actions: inout [Action]) {
        guard case .held(var holding) = state else {
            // The timer is cancelled whenever the lease ends; a firing already on its way is
            // stale.
            return
        }
        if nowMs >= holding.deadlineMs {
            // The server may still count the lease: on a shared connection, free it there.
            if route == .shared { actions.append(.releaseUnanswered(session, token: holding.grant.token)) }
            lose(holding.grant.token, into: &actions)
            return
        }
        let untilDeadline = Int(holding.deadlineMs - nowMs)
        if holding.renewalInFlight {
            actions.append(.scheduleTimer(session, afterMs: untilDeadline))
            return
        }
        holding.renewalInFlight = true
        redirects = 0
        state = .held(holding)
        actions.append(.send(session, .renew(token: holding.grant.token)))
        actions.append(.scheduleTimer(session, afterMs: untilDeadline))
    }

    // MARK: - Endings

    private mutating func hold(_ grant: Grant, leaseS: Int, sentAtMs: UInt64, into actions: inout [Action]) {
        state = .held(Holding(grant: grant, leaseS: leaseS, deadlineMs: deadline(sentAtMs: sentAtMs, leaseS: leaseS)))
        actions.append(.scheduleTimer(session, afterMs: firstRenewalDelayMs(leaseS: leaseS)))
    }

    /// The first renewal of a lock on a shared connection comes up to a tenth early, at random:
    /// locks acquired together then renew spread out, and stay spread, instead of in bursts.
    private mutating func firstRenewalDelayMs(leaseS: Int) -> Int {
        let delay = renewalDelayMs(leaseS: leaseS)
        guard sharesConnection, delay >= 10 else { return delay }
        jitterState ^= jitterState << 13
        jitterState ^= jitterState >> 7
        jitterState ^= jitterState << 17
        return delay - Int(jitterState % UInt64(delay / 10 + 1))
    }

    private mutating func lose(_ token: String, into actions: inout [Action]) {
        let leave = endSession()
        state = .closed(lostToken: token)
        actions.append(.cancelTimer)
        actions.append(leave)
        actions.append(.reportLockLost(token: token))
    }

    /// Ends the current session's hold on its connection: closes a connection of the lock's
    /// own (the server then frees what it held), leaves a shared one.
    private func endSession() -> Action {
        route == .shared ? .detachShared(session) : .closeConnection(session)
    }

    /// Ends the session: closes the connection, fails the operation in flight with `error`,
    /// and completes a release in flight (closing the session releases its keys).
    private mutating func shutDown(failingWith error: LockError, into actions: inout [Action]) {
        guard isConnected else { return }
        actions.append(.cancelTimer)
        if route == .shared {
            switch state {
            case .held(let holding):
                // A shared connection cannot be closed for one lock: its key is released there,
                // without waiting for the answer.
                actions.append(.releaseUnanswered(session, token: holding.grant.token))
            case .requesting:
                orphanedTry = session
            default:
                break
            }
        }
        actions.append(endSession())
        if let pending { actions.append(.complete(pending.call, pending.operation, .failed(error))) }
        if case .releasing(let call, _, _) = state { actions.append(.complete(call, .release, .released)) }
        state = .closed(lostToken: nil)
    }

    /// Events that the connection and the driver never produce: asserted in debug builds; in
    /// release builds the session ends as if the server had broken the protocol.
    private mutating func impossible(_ what: String, into actions: inout [Action]) {
        assertionFailure("LeaseMachine(\(key)): \(what)")
        if case .held(let holding) = state {
            lose(holding.grant.token, into: &actions)
            return
        }
        shutDown(failingWith: .protocolViolation(what), into: &actions)
    }

    // MARK: - Lease arithmetic

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
        guard route == .own, let maxIdleMs else { return byRatio }
        return min(byRatio, maxIdleMs)
    }
}

extension LockError {
    /// Whether the server itself answered with this status, as opposed to the connection
    /// failing under the request.
    var isServerAnswer: Bool {
        switch self {
        case .notHeld, .notEnqueued, .alreadyEnqueued, .maxLocks, .maxWaiters, .limitMismatch,
             .leaseExpired, .serverDraining, .serverError, .authFailed, .notLeader:
            return true
        default:
            return false
        }
    }
}
