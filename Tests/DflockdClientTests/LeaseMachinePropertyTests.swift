import Foundation
import Testing
@testable import DflockdClient

/// Model-based test of ``LeaseMachine``: several simulated clients per key, each a machine with
/// a faithful stand-in for its driver (connection, timer, deferred failures), against a small
/// model of a dflockd server, driven by long random sequences of caller calls, server steps,
/// deliveries, connection losses, request timeouts, stale events and timer firings. After every
/// step: at most one holder per key (a client that believes it holds, by its own deadline, is the
/// server's holder with that token), every call completes exactly once, a stale event changes
/// nothing, and a closed machine acts only to start anew or answer a call.
///
/// `LEASE_PROPERTY_SEED` replays one seed; `LEASE_PROPERTY_STEPS` sets the step count
/// (`make soak` raises it). A failure prints the seed, the step and the recent trace.
@Suite struct LeaseMachinePropertyTests {
    static var seed: UInt64 {
        ProcessInfo.processInfo.environment["LEASE_PROPERTY_SEED"].flatMap { UInt64($0) } ?? UInt64(Date().timeIntervalSince1970 * 1000)
    }

    static var steps: Int {
        ProcessInfo.processInfo.environment["LEASE_PROPERTY_STEPS"].flatMap { Int($0) } ?? 120_000
    }

    @Test func randomSequencesKeepEveryInvariant() {
        let seed = Self.seed
        var rng = SplitMix64(seed: seed)
        var simulation = Simulation(rng: rng)
        var stepsRun = 0
        var coverage = Coverage()
        while stepsRun < Self.steps {
            // Episodes of varying length, each from a fresh server, so both short and long
            // histories are explored.
            let length = 200 + Int(rng.next() % 4_000)
            simulation = Simulation(rng: SplitMix64(seed: rng.next()))
            for _ in 0..<length {
                simulation.step()
                if let failure = simulation.failure {
                    Issue.record("""
                        LeaseMachine property violated (LEASE_PROPERTY_SEED=\(seed), step \(stepsRun)): \(failure)
                        recent trace:
                        \(simulation.trace.suffix(40).joined(separator: "\n"))
                        """)
                    return
                }
                stepsRun += 1
            }
            simulation.finish()
            coverage.add(simulation.coverage)
            if let failure = simulation.failure {
                Issue.record("LeaseMachine property violated at the end of an episode (LEASE_PROPERTY_SEED=\(seed)): \(failure)\n\(simulation.trace.suffix(40).joined(separator: "\n"))")
                return
            }
        }
        print("LeaseMachine property test: \(stepsRun) random steps, seed \(seed), \(coverage)")
        #expect(stepsRun >= Self.steps)
        #expect(coverage.grants > 0 && coverage.releases > 0 && coverage.losses > 0 && coverage.staleEvents > 0)
        #expect(coverage.lateGrantsConfirmed > 0 && coverage.lateGrantsRefused > 0, "the late-grant paths were never reached: \(coverage)")
        #expect(coverage.sharedGrants > 0 && coverage.sharedLossesOfSeveral > 0, "the shared-connection paths were never reached: \(coverage)")
    }
}

/// A small deterministic generator, so a seed replays a run exactly.
struct SplitMix64: RandomNumberGenerator {
    private var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    mutating func below(_ bound: Int) -> Int { Int(next() % UInt64(bound)) }
    mutating func chance(_ percent: Int) -> Bool { below(100) < percent }
}

private typealias Call = LeaseMachine.CallID

/// The server model: per key one holder and a FIFO queue; per connection the requests not yet
/// read, whether a blocking request parks it, and a grant made while it was enqueued but not
/// waiting (which both real servers hand back to a later `w` even after its lease ran out).
private struct ServerModel {
    struct Holder { var connection: Int; var token: String; var expiresAtMs: UInt64 }
    enum Waiter: Equatable { case blocking(connection: Int, deadlineMs: UInt64, request: LeaseMachine.Outgoing), enqueued(connection: Int) }
    struct ConnectionState {
        /// The key of a lock's own connection; nil for a session's shared connection, whose
        /// requests each name their key.
        let key: String?
        var alive = true
        /// (request, send time, key, client; client -1: nobody waits for the answer).
        var inbound: [(request: LeaseMachine.Outgoing, sentAtMs: UInt64, key: String, client: Int)] = []
        var parked = false
        var storedGrant: Grant?
    }

    let leaseS: Int
    var holders: [String: Holder] = [:]
    var queues: [String: [Waiter]] = [:]
    var connections: [Int: ConnectionState] = [:]
    var nextToken = 0
    /// Replies ready to go back: (connection, request, reply or refusal).
    var replies: [(connection: Int, request: LeaseMachine.Outgoing, result: Result<Reply, LockError>, sentAtMs: UInt64, client: Int)] = []
    /// The client each blocking request came from.
    var blockingClient: [Int: Int] = [:]

    mutating func token() -> String {
        nextToken += 1
        return String(format: "%032x", nextToken)
    }

    func isFree(_ key: String, nowMs: UInt64) -> Bool {
        guard let holder = holders[key] else { return true }
        return holder.expiresAtMs <= nowMs
    }

    mutating func grantNext(_ key: String, nowMs: UInt64) {
        if let holder = holders[key], holder.expiresAtMs <= nowMs { holders[key] = nil }
        guard holders[key] == nil else { return }
        while var queue = queues[key], !queue.isEmpty {
            let waiter = queue.removeFirst()
            queues[key] = queue
            switch waiter {
            case .blocking(let connection, _, let request):
                guard connections[connection]?.alive == true else { continue }
                let grant = Grant(token: token(), leaseS: leaseS)
                holders[key] = Holder(connection: connection, token: grant.token, expiresAtMs: nowMs + UInt64(leaseS) * 1000)
                connections[connection]?.parked = false
                replies.append((connection, request, .success(.granted(grant)), 0, blockingClient[connection] ?? -1))
                return
            case .enqueued(let connection):
                guard connections[connection]?.alive == true else { continue }
                let grant = Grant(token: token(), leaseS: leaseS)
                holders[key] = Holder(connection: connection, token: grant.token, expiresAtMs: nowMs + UInt64(leaseS) * 1000)
                connections[connection]?.storedGrant = grant
                return
            }
        }
    }

    /// Leases that ran out and blocking requests whose timeout passed.
    mutating func tick(nowMs: UInt64) {
        for key in Set(holders.keys).union(queues.keys) {
            if var queue = queues[key] {
                var kept: [Waiter] = []
                for waiter in queue {
                    if case .blocking(let connection, let deadline, let request) = waiter, deadline <= nowMs {
                        connections[connection]?.parked = false
                        replies.append((connection, request, .success(.timeout), 0, blockingClient[connection] ?? -1))
                    } else {
                        kept.append(waiter)
                    }
                }
                queue = kept
                queues[key] = queue
            }
            grantNext(key, nowMs: nowMs)
        }
    }

    /// Reads and handles the next request of `connection`, unless a blocking one parks it.
    mutating func process(_ connection: Int, nowMs: UInt64) {
        guard var state = connections[connection], state.alive, !state.parked, !state.inbound.isEmpty else { return }
        let (request, sentAtMs, key, client) = state.inbound.removeFirst()
        connections[connection] = state
        blockingClient[connection] = client
        func reply(_ result: Result<Reply, LockError>) { replies.append((connection, request, result, sentAtMs, client)) }
        func grantHere() -> Grant {
            let grant = Grant(token: token(), leaseS: leaseS)
            holders[key] = Holder(connection: connection, token: grant.token, expiresAtMs: nowMs + UInt64(leaseS) * 1000)
            return grant
        }
        let queueEmpty = queues[key, default: []].isEmpty
        switch request {
        case .acquire(let timeoutS):
            if isFree(key, nowMs: nowMs), queueEmpty {
                reply(.success(.granted(grantHere())))
            } else if timeoutS == 0 {
                reply(.success(.timeout))
            } else {
                queues[key, default: []].append(.blocking(connection: connection, deadlineMs: nowMs + UInt64(timeoutS) * 1000, request: request))
                connections[connection]?.parked = true
            }
        case .enqueue:
            if isFree(key, nowMs: nowMs), queueEmpty {
                reply(.success(.granted(grantHere())))
            } else {
                queues[key, default: []].append(.enqueued(connection: connection))
                reply(.success(.queued))
            }
        case .wait(let timeoutS):
            if let stored = connections[connection]?.storedGrant {
                // Handed back as granted, whether or not its lease is still running.
                connections[connection]?.storedGrant = nil
                reply(.success(.granted(stored)))
            } else if let index = queues[key, default: []].firstIndex(of: .enqueued(connection: connection)) {
                if timeoutS == 0 {
                    queues[key]?.remove(at: index)
                    reply(.success(.timeout))
                } else {
                    queues[key]?[index] = .blocking(connection: connection, deadlineMs: nowMs + UInt64(timeoutS) * 1000, request: request)
                    connections[connection]?.parked = true
                }
            } else {
                reply(.failure(.notEnqueued(key: key)))
            }
        case .renew(let token):
            if let holder = holders[key], holder.connection == connection, holder.token == token, holder.expiresAtMs > nowMs {
                holders[key]?.expiresAtMs = nowMs + UInt64(leaseS) * 1000
                reply(.success(.renewed(remainingS: leaseS)))
            } else {
                reply(.failure(.notHeld(key: key)))
            }
        case .release(let token):
            if let holder = holders[key], holder.connection == connection, holder.token == token, holder.expiresAtMs > nowMs {
                holders[key] = nil
                grantNext(key, nowMs: nowMs)
                reply(.success(.ok))
            } else {
                reply(.failure(.notHeld(key: key)))
            }
        }
    }

    /// The server sees the connection end: it leaves every queue and frees what it held.
    mutating func drop(_ connection: Int, nowMs: UInt64) {
        guard let state = connections[connection], state.alive else { return }
        connections[connection]?.alive = false
        connections[connection]?.inbound = []
        let keys = Set(holders.keys).union(queues.keys)
        for key in keys {
            queues[key]?.removeAll { waiter in
                switch waiter {
                case .blocking(let c, _, _), .enqueued(let c): return c == connection
                }
            }
            if holders[key]?.connection == connection { holders[key] = nil }
        }
        for key in keys.sorted() { grantNext(key, nowMs: nowMs) }
    }
}

/// One simulated `DistributedLease`: the machine, and what its driver owns.
private struct Client {
    var machine: LeaseMachine
    /// The open connection (model connection id) and its machine session.
    var connection: (id: Int, session: LeaseMachine.Session, connected: Bool)?
    /// Requests sent on the current connection, not yet answered: their failure is reported,
    /// once each, when the connection ends.
    var outstanding: [(request: LeaseMachine.Outgoing, sentAtMs: UInt64)] = []
    var timer: (session: LeaseMachine.Session, fireAtMs: UInt64)?
    /// Calls made and not yet completed.
    var openCalls: [Call: LeaseMachine.Operation] = [:]
    var completedCalls: Set<Call> = []
    /// Sessions that have ended, for stale events.
    var pastSessions: [LeaseMachine.Session] = []
    /// Requests still in flight on the shared connection for a session the lock has left:
    /// their answers still come (to a try abandoned by a cancel or close, say).
    var orphans: [(connection: Int, session: LeaseMachine.Session, request: LeaseMachine.Outgoing, sentAtMs: UInt64)] = []
}

struct Coverage {
    var grants = 0
    var lateGrantsConfirmed = 0
    var lateGrantsRefused = 0
    var losses = 0
    var staleEvents = 0
    var releases = 0
    /// Grants on a session's shared connection, and shared connections lost with several
    /// locks held on them.
    var sharedGrants = 0
    var sharedLossesOfSeveral = 0

    mutating func add(_ other: Coverage) {
        grants += other.grants
        lateGrantsConfirmed += other.lateGrantsConfirmed
        lateGrantsRefused += other.lateGrantsRefused
        losses += other.losses
        staleEvents += other.staleEvents
        releases += other.releases
        sharedGrants += other.sharedGrants
        sharedLossesOfSeveral += other.sharedLossesOfSeveral
    }
}

private struct Simulation {
    var rng: SplitMix64
    var nowMs: UInt64 = 1_000
    var server: ServerModel
    var clients: [Client] = []
    var nextConnection = 0
    var nextCall: UInt64 = 0
    /// Events owed to a client on a later turn (a closed connection's outstanding requests).
    var deferred: [(client: Int, event: LeaseMachine.Event)] = []
    var failure: String?
    var trace: [String] = []
    /// What the run reached, so that a run that never got anywhere interesting fails.
    var coverage = Coverage()
    let keys = ["a", "b"]
    /// The session's shared connection (model connection id), while one is open.
    var shared: Int?

    init(rng: SplitMix64) {
        var rng = rng
        server = ServerModel(leaseS: 2 + rng.below(4))
        // Half the episodes put most clients on one session (several locks per connection,
        // on three keys), beside clients with connections of their own.
        let withSession = rng.chance(50)
        let count = withSession ? 6 + rng.below(4) : 4 + rng.below(3)
        for index in 0..<count {
            let acquireTimeoutS = rng.below(4)
            let onSession = withSession && !rng.chance(25)
            clients.append(Client(machine: LeaseMachine(key: (withSession ? ["a", "b", "c"] : ["a", "b"])[index % (withSession ? 3 : 2)],
                                                        acquireTimeoutS: acquireTimeoutS,
                                                        renewRatio: [0.3, 0.5, 0.8][rng.below(3)],
                                                        maxIdleMs: rng.chance(50) ? nil : 1_000 + rng.below(3_000),
                                                        sharesConnection: onSession, jitterSeed: rng.next())))
        }
        self.rng = rng
    }

    mutating func step() {
        let choice = rng.below(100)
        let index = rng.below(clients.count)
        switch choice {
        case 0..<22: callerCall(index)
        case 22..<25: feed(index, .closeRequested, from: "close")
        case 25..<29: cancel(index)
        case 29..<38: connectOutcome(pickClient { $0.connection.map { !$0.connected } ?? false } ?? index)
        case 38..<53: serverProcess(pickClient { [server] client in
            guard let connection = client.connection, let state = server.connections[connection.id] else { return false }
            return connection.connected && !state.parked && !state.inbound.isEmpty
        } ?? index)
        case 53..<68: deliverReply()
        case 68..<73: deliverDeferred()
        case 73..<75: loseConnection(index)
        case 75..<77: timeOutRequest(index)
        case 77..<81: staleEvent(index)
        case 81..<89: fireTimer(pickClient { [nowMs] in ($0.timer?.fireAtMs ?? .max) <= nowMs } ?? index)
        default: advanceTime()
        }
        checkInvariants()
    }

    /// A random client for which `condition` holds, so that steps mostly do something.
    mutating func pickClient(_ condition: (Client) -> Bool) -> Int? {
        clients.indices.filter { condition(clients[$0]) }.randomElement(using: &rng)
    }

    /// Closes every client, lets everything owed arrive, and checks that every call completed.
    mutating func finish() {
        for index in clients.indices { feed(index, .closeRequested, from: "final close") }
        while !deferred.isEmpty { deliverDeferred() }
        for index in clients.indices where !clients[index].openCalls.isEmpty {
            fail("client \(index) has calls that never completed: \(clients[index].openCalls)")
        }
    }

    // MARK: Steps

    mutating func callerCall(_ index: Int) {
        nextCall += 1
        let call = Call(raw: nextCall)
        let event: LeaseMachine.Event
        let operation: LeaseMachine.Operation
        switch rng.below(20) {
        case 0..<6: (event, operation) = (.acquireRequested(call, force: rng.chance(20)), .acquire)
        case 6..<11: (event, operation) = (.enqueueRequested(call, force: rng.chance(20)), .enqueue)
        case 11..<16: (event, operation) = (.waitRequested(call, timeoutS: rng.chance(30) ? nil : rng.below(4) - (rng.chance(5) ? 2 : 0)), .wait)
        default: (event, operation) = (.releaseRequested(call), .release)
        }
        clients[index].openCalls[call] = operation
        feed(index, event, from: "caller")
    }

    mutating func cancel(_ index: Int) {
        // The call in flight, a completed call (a cancellation that lost the race) or a release.
        let candidates = Array(clients[index].openCalls.keys) + Array(clients[index].completedCalls.prefix(3))
        guard let call = candidates.randomElement(using: &rng) else { return }
        feed(index, .cancelRequested(call), from: "cancel")
    }

    mutating func connectOutcome(_ index: Int) {
        guard let connection = clients[index].connection, !connection.connected else { return }
        if clients[index].machine.route == .shared {
            // The shared connection opens for the first lock that needs it; later ones join.
            if shared == nil {
                guard rng.chance(85) else {
                    endConnection(index, reportingTo: .failed(connection.session, nil, .connectFailed(host: "127.0.0.1", port: 1, reason: "refused")))
                    return
                }
                nextConnection += 1
                server.connections[nextConnection] = ServerModel.ConnectionState(key: nil)
                shared = nextConnection
            }
            clients[index].connection = (shared!, connection.session, true)
            feed(index, .connected(connection.session), from: "shared connection ready")
            return
        }
        if rng.chance(85) {
            clients[index].connection?.connected = true
            feed(index, .connected(connection.session), from: "connect")
        } else {
            endConnection(index, reportingTo: .failed(connection.session, nil, .connectFailed(host: "127.0.0.1", port: 1, reason: "refused")))
        }
    }

    mutating func serverProcess(_ index: Int) {
        guard let connection = clients[index].connection, connection.connected else { return }
        server.process(connection.id, nowMs: nowMs)
    }

    mutating func deliverReply() {
        guard !server.replies.isEmpty else { return }
        // Replies of one connection stay in order; different connections interleave.
        let pick = rng.below(server.replies.count)
        let connectionID = server.replies[pick].connection
        let first = server.replies.firstIndex { $0.connection == connectionID }!
        let reply = server.replies.remove(at: first)
        let index = reply.client
        guard index >= 0 else { return }  // a release nobody waits for
        // Answers come in the order sent: those of a session left come before the current one's.
        if let position = clients[index].orphans.firstIndex(where: { $0.connection == connectionID && $0.request == reply.request }) {
            let orphan = clients[index].orphans.remove(at: position)
            let event: LeaseMachine.Event
            switch reply.result {
            case .success(let answer): event = .answered(orphan.session, orphan.request, answer, sentAtMs: orphan.sentAtMs)
            case .failure(let error): event = .failed(orphan.session, orphan.request, error)
            }
            let actions = feed(index, event, from: "answer to a session left")
            if actions.contains(where: { if case .releaseUnanswered = $0 { false } else { true } }) {
                fail("an answer to a left session did more than release an orphaned grant: \(actions)")
            }
            return
        }
        guard clients[index].connection?.id == connectionID,
              let position = clients[index].outstanding.firstIndex(where: { $0.request == reply.request }) else {
            fail("a reply to \(reply.request) that client \(index) never sent")
            return
        }
        let sent = clients[index].outstanding.remove(at: position)
        let session = clients[index].connection!.session
        switch reply.result {
        case .success(let answer):
            feed(index, .answered(session, sent.request, answer, sentAtMs: sent.sentAtMs), from: "reply")
        case .failure(let error):
            feed(index, .failed(session, sent.request, error), from: "refusal")
        }
    }

    mutating func deliverDeferred() {
        guard !deferred.isEmpty else { return }
        let (index, event) = deferred.removeFirst()
        feed(index, event, from: "deferred", expectStale: true)
    }

    /// The connection breaks: the server drops it at once, and the client hears it in the same
    /// step (the server's own notice and the client's are simultaneous in this model).
    mutating func loseConnection(_ index: Int) {
        guard let connection = clients[index].connection else { return }
        if connection.id == shared { return loseShared() }
        endConnection(index, reportingTo: .failed(connection.session, nil, .connectionClosed(reason: "reset")))
    }

    /// A request deadline passes (the server froze): the connection fails that request and
    /// closes itself.
    mutating func timeOutRequest(_ index: Int) {
        guard let connection = clients[index].connection, let head = clients[index].outstanding.first else { return }
        // A deadline ends the connection: a shared one for every lock on it.
        if connection.id == shared { return loseShared() }
        clients[index].outstanding.removeFirst()
        endConnection(index, reportingTo: .failed(connection.session, head.request, .socketTimeout(milliseconds: 500)))
    }

    mutating func staleEvent(_ index: Int) {
        guard let session = clients[index].pastSessions.randomElement(using: &rng) else { return }
        // A try abandoned on the shared connection still has its one answer to come: a second
        // answer to it is not something a connection can produce.
        if session == clients[index].machine.orphanedTry { return }
        let grant = Grant(token: String(repeating: "f", count: 32), leaseS: 3)
        let events: [LeaseMachine.Event] = [
            .connected(session), .failed(session, nil, .connectionClosed(reason: "old")),
            .answered(session, .acquire(timeoutS: 1), .granted(grant), sentAtMs: nowMs),
            .answered(session, .renew(token: grant.token), .renewed(remainingS: 3), sentAtMs: nowMs),
            .failed(session, .release(token: grant.token), .notHeld(key: "a")),
            .timerFired(session, nowMs: nowMs),
        ]
        feed(index, events[rng.below(events.count)], from: "stale", expectStale: true)
    }

    mutating func fireTimer(_ index: Int) {
        guard let timer = clients[index].timer, timer.fireAtMs <= nowMs else { return }
        clients[index].timer = nil
        feed(index, .timerFired(timer.session, nowMs: nowMs), from: "timer")
    }

    mutating func advanceTime() {
        nowMs += UInt64(1 + rng.below(rng.chance(25) ? 4_000 : 400))
        server.tick(nowMs: nowMs)
    }

    /// The shared connection breaks: every lock on it hears it in the same step; each lock
    /// held through it is lost exactly once, and no other lock is touched.
    mutating func loseShared() {
        guard let id = shared else { return }
        shared = nil
        server.drop(id, nowMs: nowMs)
        server.replies.removeAll { $0.connection == id }
        var heldLost = 0
        for index in clients.indices {
            clients[index].orphans.removeAll { $0.connection == id }
            guard let connection = clients[index].connection, connection.id == id else { continue }
            let wasHeld = clients[index].machine.holding != nil
            clients[index].connection = nil
            clients[index].pastSessions.append(connection.session)
            for sent in clients[index].outstanding {
                deferred.append((index, .failed(connection.session, sent.request, .connectionClosed(reason: "reset"))))
            }
            clients[index].outstanding = []
            let others = clients.indices.filter { $0 != index }.map { clients[$0].machine }
            let actions = feed(index, .failed(connection.session, nil, .connectionClosed(reason: "reset")), from: "shared connection end")
            let reports = actions.filter { if case .reportLockLost = $0 { true } else { false } }.count
            if reports != (wasHeld ? 1 : 0) { fail("client \(index) (held: \(wasHeld)) reported \(reports) losses when the shared connection ended") }
            if wasHeld { heldLost += 1 }
            if clients.indices.filter({ $0 != index }).map({ clients[$0].machine.state }) != others.map(\.state) {
                fail("the end of the shared connection reported to client \(index) changed another client")
            }
        }
        if heldLost >= 2 { coverage.sharedLossesOfSeveral += 1 }
    }

    // MARK: The driver stand-in

    /// Ends the client's connection from below: the server drops it, the first report goes to
    /// the machine now, and each outstanding request's failure follows on a later turn.
    mutating func endConnection(_ index: Int, reportingTo event: LeaseMachine.Event) {
        guard let connection = clients[index].connection else { return }
        server.drop(connection.id, nowMs: nowMs)
        clients[index].connection = nil
        clients[index].pastSessions.append(connection.session)
        for sent in clients[index].outstanding {
            deferred.append((index, .failed(connection.session, sent.request, .connectionClosed(reason: "reset"))))
        }
        clients[index].outstanding = []
        server.replies.removeAll { $0.connection == connection.id }
        feed(index, event, from: "connection end")
    }

    @discardableResult
    mutating func feed(_ index: Int, _ event: LeaseMachine.Event, from source: String, expectStale: Bool = false) -> [LeaseMachine.Action] {
        let before = clients[index].machine
        let wasClosed = !before.isConnected
        let actions = clients[index].machine.handle(event)
        if case .verifying = before.state, case .answered(_, .renew, _, _) = event, actions.contains(where: { if case .complete(_, .wait, .granted) = $0 { true } else { false } }) {
            coverage.lateGrantsConfirmed += 1
        }
        if actions.contains(where: { if case .complete(_, .wait, .failed(.leaseExpired)) = $0 { true } else { false } }) {
            coverage.lateGrantsRefused += 1
        }
        if isStale(event, for: before) { coverage.staleEvents += 1 }
        for action in actions {
            switch action {
            case .complete(_, _, .granted):
                coverage.grants += 1
                if clients[index].machine.route == .shared { coverage.sharedGrants += 1 }
            case .complete(_, .release, .released): coverage.releases += 1
            case .reportLockLost: coverage.losses += 1
            default: break
            }
        }
        trace.append("t=\(nowMs) c\(index) [\(source)] \(event) -> \(actions)")
        if trace.count > 200 { trace.removeFirst(100) }
        if expectStale, isStale(event, for: before), !actions.isEmpty {
            fail("a stale event changed client \(index): \(event) -> \(actions)")
        }
        var startsAnew = false
        if case .acquireRequested = event { startsAnew = true }
        if case .enqueueRequested = event { startsAnew = true }
        if wasClosed, !startsAnew {
            for action in actions {
                switch action {
                // An orphaned grant is released whatever the lock does now.
                case .complete, .releaseUnanswered: break
                default: fail("client \(index) acted after closed without a new start: \(event) -> \(actions)")
                }
            }
        }
        for action in actions { perform(action, for: index) }
        return actions
    }

    /// Whether `event` belongs to a session the machine had already left.
    func isStale(_ event: LeaseMachine.Event, for machine: LeaseMachine) -> Bool {
        let session: LeaseMachine.Session
        switch event {
        case .connected(let s), .answered(let s, _, _, _), .failed(let s, _, _), .timerFired(let s, _): session = s
        default: return false
        }
        return !machine.isConnected || session != machine.session
    }

    mutating func perform(_ action: LeaseMachine.Action, for index: Int) {
        let machineSession = clients[index].machine.session
        switch action {
        case .openConnection(let session):
            if clients[index].connection != nil { fail("client \(index) opened a connection over an open one") }
            nextConnection += 1
            server.connections[nextConnection] = ServerModel.ConnectionState(key: clients[index].machine.key)
            if clients[index].machine.route != .own { fail("client \(index) opened a connection of its own on the shared route") }
            clients[index].connection = (nextConnection, session, false)
        case .closeConnection(let session):
            guard let connection = clients[index].connection else { return }
            if connection.id == shared { fail("client \(index) closed the shared connection: one lock's request must not end it") }
            if connection.session != session { fail("client \(index) closed session \(session) while \(connection.session) is open") }
            server.drop(connection.id, nowMs: nowMs)
            server.replies.removeAll { $0.connection == connection.id }
            clients[index].pastSessions.append(connection.session)
            // Connection.close() fails what was outstanding on a later turn.
            for sent in clients[index].outstanding {
                deferred.append((index, .failed(connection.session, sent.request, .closed)))
            }
            clients[index].outstanding = []
            clients[index].connection = nil
        case .send(let session, let request):
            guard let connection = clients[index].connection, connection.session == session, connection.connected else {
                fail("client \(index) sent \(request) on session \(session) without that session connected")
                return
            }
            clients[index].outstanding.append((request, nowMs))
            server.connections[connection.id]?.inbound.append((request, nowMs, clients[index].machine.key, index))
        case .scheduleTimer(let session, let afterMs):
            if session != machineSession { fail("client \(index) scheduled a timer for old session \(session)") }
            clients[index].timer = (session, nowMs + UInt64(afterMs))
        case .cancelTimer:
            clients[index].timer = nil
        case .complete(let call, let operation, _):
            guard let expected = clients[index].openCalls.removeValue(forKey: call) else {
                fail("client \(index) completed \(call) twice or without a call")
                return
            }
            if expected != operation { fail("client \(index) completed \(call) (\(expected)) as \(operation)") }
            clients[index].completedCalls.insert(call)
        case .reportLockLost, .stateChanged:
            break
        case .attachShared(let session):
            if !clients[index].machine.sharesConnection { fail("client \(index) without a session attached to a shared connection") }
            if clients[index].connection != nil { fail("client \(index) attached over an open connection") }
            // Connected (to the one open, or to one opened for it) by a later connect step.
            clients[index].connection = (-1, session, false)
        case .detachShared(let session):
            guard let connection = clients[index].connection else { return }
            if connection.session != session { fail("client \(index) left session \(session) while \(connection.session) is open") }
            if connection.id >= 0 {
                clients[index].orphans += clients[index].outstanding.map { (connection.id, connection.session, $0.request, $0.sentAtMs) }
            }
            clients[index].outstanding = []
            clients[index].pastSessions.append(connection.session)
            clients[index].connection = nil
        case .releaseUnanswered(_, let token):
            if let shared { server.connections[shared]?.inbound.append((.release(token: token), nowMs, clients[index].machine.key, -1)) }
        }
    }

    // MARK: Invariants

    mutating func checkInvariants() {
        var believedHolders: [String: Int] = [:]
        for (index, client) in clients.enumerated() {
            let machine = client.machine
            if let holding = machine.holding, nowMs < holding.deadlineMs {
                if let other = believedHolders[machine.key] {
                    fail("clients \(other) and \(index) both hold '\(machine.key)'")
                }
                believedHolders[machine.key] = index
                guard let connection = client.connection else {
                    fail("client \(index) holds without a connection")
                    continue
                }
                guard let holder = server.holders[machine.key], holder.expiresAtMs > nowMs else {
                    fail("client \(index) holds '\(machine.key)' until \(holding.deadlineMs) but the server has no live holder")
                    continue
                }
                if holder.connection != connection.id || holder.token != holding.grant.token {
                    fail("client \(index) holds '\(machine.key)' with \(holding.grant.token) but the server's holder is connection \(holder.connection) with \(holder.token)")
                }
                if holding.deadlineMs > holder.expiresAtMs {
                    fail("client \(index)'s deadline \(holding.deadlineMs) is later than the server's lease end \(holder.expiresAtMs)")
                }
            }
            // The state agrees with what the driver holds.
            if machine.isConnected != (client.connection != nil) {
                fail("client \(index) is \(machine.state) but its connection is \(String(describing: client.connection))")
            }
            if machine.publicState == .held, client.timer == nil, machine.holding.map({ nowMs < $0.deadlineMs }) == true {
                fail("client \(index) holds with no lease timer")
            }
            if let pending = machine.pending, client.openCalls[pending.call] == nil {
                fail("client \(index)'s pending \(pending.call) is not an open call")
            }
        }
    }

    mutating func fail(_ message: String) {
        if failure == nil { failure = message }
    }
}
