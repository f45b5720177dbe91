import Foundation
import Testing
@testable import DflockdClient

/// Locks and semaphores on a ``LockSession`` against both real servers: many locks over one
/// connection, isolation of refusals, shared fate on a lost connection, close semantics.
@Suite(.timeLimit(.minutes(2)))
struct LockSessionTests {
    /// Counts lost-lock reports per key (from the loop thread).
    final class LossLog: Sendable {
        private let lost = ThreadLock<[String: Int]>([:])
        var handler: @Sendable (String, String) -> Void { { key, _ in self.lost.withLock { $0[key, default: 0] += 1 } } }
        var counts: [String: Int] { lost.withLock { $0 } }
        var total: Int { counts.values.reduce(0, +) }
    }

    /// Waits (polling the public state, up to `seconds`) until `condition` holds.
    private func eventually(_ seconds: Double = 10, _ condition: () -> Bool) async throws -> Bool {
        let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
        while ContinuousClock.now < deadline {
            if condition() { return true }
            try await Task.sleep(for: .milliseconds(20))
        }
        return condition()
    }

    /// A session's locks renew by their ratio alone (a 60 s lease: every 30 s); what keeps a
    /// shared connection from the server's read timeout (3 s here) is the session's idle check,
    /// shortened to 1 s for the test: a connection silent that long has one held lock renew.
    @Test("a shared connection holding 60 s leases stays open on a server with --read-timeout 3", arguments: ServerKind.allCases)
    func idleCheckKeepsTheSharedConnectionOpen(on kind: ServerKind) async throws {
        let server = try await SharedServers.readTimeout3(kind)
        let session = try LockSession(servers: [("127.0.0.1", server.port)])
        session.idleCheckMs = 1000
        defer { session.close() }
        let losses = LossLog()
        let locks = try (0..<3).map { try DistributedLock(key: "idle-session-\($0)", acquireTimeoutS: 5, leaseTtlS: 60,
                                                          onLockLost: losses.handler, session: session) }
        for lock in locks { #expect(try await lock.acquire()) }
        let tokens = locks.map(\.token)
        // Eight seconds: more than twice the read timeout, far less than a renewal period.
        for _ in 0..<8 {
            try await Task.sleep(for: .seconds(1))
            #expect(losses.total == 0)
            #expect(locks.allSatisfy { $0.state == .held })
        }
        #expect(locks.map(\.token) == tokens)
        for index in locks.indices {
            #expect(try await offThread { try isHeld("idle-session-\(index)", port: server.port) })
        }
        for lock in locks { try await lock.release() }
    }

    /// The same without the idle check (60 s between checks): the shared connection goes
    /// silent, the server drops it, and every lock on it is lost, so the test above can fail.
    @Test("without the idle check the read timeout ends the shared connection and its locks", arguments: ServerKind.allCases)
    func withoutTheIdleCheckTheReadTimeoutWins(on kind: ServerKind) async throws {
        let server = try await SharedServers.readTimeout3(kind)
        let session = try LockSession(servers: [("127.0.0.1", server.port)])
        session.idleCheckMs = 60_000
        defer { session.close() }
        let losses = LossLog()
        let locks = try (0..<3).map { try DistributedLock(key: "idle-unchecked-\($0)", acquireTimeoutS: 5, leaseTtlS: 60,
                                                          onLockLost: losses.handler, session: session) }
        for lock in locks { #expect(try await lock.acquire()) }
        #expect(try await eventually(10) { losses.total == 3 }, "lost: \(losses.counts)")
        #expect(losses.counts.values.allSatisfy { $0 == 1 }, "each lock lost once: \(losses.counts)")
        #expect(locks.allSatisfy { $0.state == .closed })
    }

    @Test(arguments: ServerKind.allCases)
    func manyLocksShareOneConnectionAndRenewWithUnchangedTokens(on kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        let session = try LockSession(servers: [("127.0.0.1", server.port)])
        defer { session.close() }
        let losses = LossLog()
        let locks = try (0..<200).map { try DistributedLock(key: "many-\($0)", acquireTimeoutS: 5, leaseTtlS: 2,
                                                            onLockLost: losses.handler, session: session) }
        try await withThrowingTaskGroup(of: Bool.self) { group in
            for lock in locks { group.addTask { try await lock.acquire() } }
            for try await held in group { #expect(held) }
        }
        let tokens = locks.map(\.token)
        #expect(tokens.allSatisfy { $0 != nil })
        if kind == .go {
            let stats = try await DflockdClient.stats(port: server.port)
            // The session's one connection and the stats call's own.
            #expect(stats.connections == 2, "200 locks over one connection: \(stats.connections) connections")
            #expect(stats.locks.count == 200)
        }
        // 3.5 s is more than one and a half of the 2-second leases: held only by renewing.
        try await Task.sleep(for: .milliseconds(3500))
        #expect(locks.allSatisfy { $0.state == .held })
        #expect(locks.map(\.token) == tokens, "renewals keep the tokens")
        #expect(losses.total == 0)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for lock in locks { group.addTask { try await lock.release() } }
            try await group.waitForAll()
        }
        let probe = try Connection(port: server.port)
        defer { probe.close() }
        for index in [0, 99, 199] {
            let grant = try #require(try await probe.acquire(key: "many-\(index)", timeoutS: 0), "released keys are free")
            try await probe.release(key: "many-\(index)", token: grant.token)
        }
    }

    @Test(arguments: ServerKind.allCases)
    func aRefusedRenewalLosesThatLockOnly(on kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        let session = try LockSession(servers: [("127.0.0.1", server.port)])
        defer { session.close() }
        let losses = LossLog()
        // 3 s: dflockd 0.5.0 answers a renewal with a second less, so a 2 s lease leaves 1 s,
        // too little on a loaded machine for the locks that must stay held.
        let locks = try (0..<5).map { try DistributedLock(key: "iso-\($0)", leaseTtlS: 3, onLockLost: losses.handler, session: session) }
        for lock in locks { #expect(try await lock.acquire()) }
        // Another client frees iso-0 with its token: the next renewal of iso-0 is refused.
        let other = try Connection(port: server.port)
        defer { other.close() }
        let token0 = try #require(locks[0].token)
        try await other.release(key: "iso-0", token: token0)
        #expect(try await eventually { losses.counts["iso-0"] == 1 })
        // Both servers answer a renewal of a freed token with `error` and keep the connection;
        // the others renew past their first lease meanwhile.
        try await Task.sleep(for: .milliseconds(3500))
        #expect(losses.counts == ["iso-0": 1], "only the refused lock is lost")
        #expect(locks.dropFirst().allSatisfy { $0.state == .held })
        await #expect(throws: LockError.lockLost(key: "iso-0", token: token0)) { try await locks[0].release() }
        for lock in locks.dropFirst() { try await lock.release() }
        let next = try DistributedLock(key: "iso-next", session: session)
        #expect(try await next.acquire(), "the shared connection carries on")
        try await next.release()
    }

    @Test(arguments: ServerKind.allCases)
    func aWaitingLockDoesNotDelayOthersAndWaitersAreGrantedInOrder(on kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        let session = try LockSession(servers: [("127.0.0.1", server.port)])
        defer { session.close() }
        let holder = try DistributedLock(key: "fifo", leaseTtlS: 10, session: session)
        #expect(try await holder.acquire())
        let first = try DistributedLock(key: "fifo", acquireTimeoutS: 10, leaseTtlS: 10, session: session)
        let second = try DistributedLock(key: "fifo", acquireTimeoutS: 10, leaseTtlS: 10, session: session)
        async let firstGranted = first.acquire()
        #expect(try await eventually { first.state == .queued })
        try await Task.sleep(for: .milliseconds(200))  // the server has first's wait queued
        async let secondGranted = second.acquire()
        #expect(try await eventually { second.state == .queued })
        try await Task.sleep(for: .milliseconds(200))

        // Two blocked waits: the shared connection still serves other keys at once.
        let started = ContinuousClock.now
        let other = try DistributedLock(key: "fifo-other", session: session)
        #expect(try await other.acquire())
        try await other.release()
        #expect(ContinuousClock.now - started < .seconds(1))

        try await holder.release()
        #expect(try await firstGranted, "the first waiter is granted first")
        #expect(second.state == .queued)
        try await first.release()
        #expect(try await secondGranted)
        try await second.release()
    }

    @Test(arguments: ServerKind.allCases)
    func aKilledServerLosesEverySessionLockOnceAndTheSessionReconnects(on kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        let session = try LockSession(servers: [("127.0.0.1", server.port)])
        defer { session.close() }
        let losses = LossLog()
        let locks = try (0..<20).map { try DistributedLock(key: "kill-\($0)", leaseTtlS: 10, onLockLost: losses.handler, session: session) }
        for lock in locks { #expect(try await lock.acquire()) }
        server.kill()
        #expect(try await eventually { losses.total == 20 })
        try await Task.sleep(for: .milliseconds(300))
        #expect(losses.counts.count == 20 && losses.counts.values.allSatisfy { $0 == 1 }, "each lock lost exactly once")
        #expect(locks.allSatisfy { $0.state == .closed })
        try await offThePool { try server.restart() }
        let again = try DistributedLock(key: "kill-0", acquireTimeoutS: 0, session: session)
        var acquired = false
        for _ in 0..<30 where !acquired {
            // A connect that fails while the server comes up backs off briefly, then retries.
            do { acquired = try await again.acquire() } catch { try await Task.sleep(for: .milliseconds(200)) }
        }
        #expect(acquired, "the session reconnects for the next acquire")
        try await again.release()
    }

    @Test(arguments: ServerKind.allCases)
    func closeAndSessionCloseFreeTheKeysAtOnce(on kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        let session = try LockSession(servers: [("127.0.0.1", server.port)])
        let losses = LossLog()
        let locks = try (0..<3).map { try DistributedLock(key: "close-\($0)", leaseTtlS: 30, onLockLost: losses.handler, session: session) }
        for lock in locks { #expect(try await lock.acquire()) }
        let probe = try Connection(port: server.port)
        defer { probe.close() }

        locks[0].close()
        var started = ContinuousClock.now
        let grant = try #require(try await probe.acquire(key: "close-0", timeoutS: 5), "close() released the key")
        #expect(ContinuousClock.now - started < .seconds(1))
        try await probe.release(key: "close-0", token: grant.token)
        #expect(locks[1].state == .held && locks[2].state == .held, "the other locks carry on")

        session.close()
        started = ContinuousClock.now
        for key in ["close-1", "close-2"] {
            let grant = try #require(try await probe.acquire(key: key, timeoutS: 5), "session.close() released \(key)")
            try await probe.release(key: key, token: grant.token)
        }
        #expect(ContinuousClock.now - started < .seconds(1))
        #expect(losses.total == 0, "closing is not losing")
        await #expect(throws: LockError.sessionClosed) { try await locks[1].acquire() }
        let late = try DistributedLock(key: "close-late", session: session)
        await #expect(throws: LockError.sessionClosed) { try await late.acquire() }
    }

    @Test(arguments: ServerKind.allCases)
    func aDroppedHeldLockIsReleased(on kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        let session = try LockSession(servers: [("127.0.0.1", server.port)])
        defer { session.close() }
        var lock: DistributedLock? = try DistributedLock(key: "dropped", leaseTtlS: 30, session: session)
        #expect(try await lock!.acquire())
        lock = nil
        let probe = try Connection(port: server.port)
        defer { probe.close() }
        let grant = try #require(try await probe.acquire(key: "dropped", timeoutS: 5), "the dropped lock released its key")
        try await probe.release(key: "dropped", token: grant.token)
    }

    /// A dropped lock's driver is freed once its handle has gone and its call in flight (if
    /// any) has completed: a held one releases its key, one waiting on a connection of its own
    /// completes its acquire first and then frees it, an idle one just goes. Nothing on the
    /// session (members, lease timers, registry) keeps a driver alive.
    @Test("dropped session locks go away: held, waiting on a connection of its own, idle; their keys are free",
          arguments: ServerKind.allCases)
    func droppedLocksLeaveNothingBehind(on kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        let session = try LockSession(servers: [("127.0.0.1", server.port)])
        defer { session.close() }
        let probe = try Connection(port: server.port)
        defer { probe.close() }
        let taken = try #require(try await probe.acquire(key: "gone-waiting", timeoutS: 5))
        weak var heldDriver: LeaseDriver?
        weak var waitingDriver: LeaseDriver?
        weak var idleDriver: LeaseDriver?
        let outcome = ThreadLock<Result<Bool, LockError>?>(nil)
        do {
            let held = try DistributedLock(key: "gone-held", leaseTtlS: 30, session: session)
            #expect(try await held.acquire())
            let waiting = try DistributedLock(key: "gone-waiting", acquireTimeoutS: 10, leaseTtlS: 30, session: session)
            waiting.acquire { result in outcome.withLock { $0 = result } }
            let idle = try DistributedLock(key: "gone-idle", session: session)
            (heldDriver, waitingDriver, idleDriver) = (held.driver, waiting.driver, idle.driver)
            #expect(try await eventually { waiting.state == .queued })
        }
        #expect(try await eventually { heldDriver == nil && idleDriver == nil }, "a dropped lock's driver was kept alive")
        #expect(waitingDriver != nil, "a lock dropped with its acquire in flight went before completing it")
        try await probe.release(key: "gone-waiting", token: taken.token)
        #expect(try await eventually { outcome.withLock { $0 } != nil })
        guard case .success(true)? = outcome.withLock({ $0 }) else {
            Issue.record("the dropped lock's acquire ended with \(String(describing: outcome.withLock { $0 }))")
            return
        }
        #expect(try await eventually { waitingDriver == nil }, "the driver stayed after its acquire completed")
        for key in ["gone-held", "gone-waiting"] {
            let grant = try #require(try await probe.acquire(key: key, timeoutS: 5), "\(key) was not freed")
            try await probe.release(key: key, token: grant.token)
        }
    }

    /// A lock dropped right after starting an acquire, its try still unanswered on the shared
    /// connection: the grant that answers it is released, so the key is free within a round
    /// trip, not when the 30 s lease runs out.
    @Test("a lock dropped with its try in flight on the shared connection frees the key it is granted",
          arguments: ServerKind.allCases)
    func aLockDroppedMidTryFreesItsGrant(on kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        let session = try LockSession(servers: [("127.0.0.1", server.port)])
        defer { session.close() }
        let probe = try Connection(port: server.port)
        defer { probe.close() }
        let outcome = ThreadLock<Result<Bool, LockError>?>(nil)
        weak var driver: LeaseDriver?
        do {
            let trying = try DistributedLock(key: "gone-trying", leaseTtlS: 30, session: session)
            driver = trying.driver
            trying.acquire { result in outcome.withLock { $0 = result } }
        }
        #expect(try await eventually { outcome.withLock { $0 } != nil }, "the dropped lock's acquire never ended")
        #expect(try await eventually { driver == nil }, "the dropped lock's driver stayed")
        let grant = try #require(try await probe.acquire(key: "gone-trying", timeoutS: 5),
                                 "the grant of the dropped lock's try was not released")
        try await probe.release(key: "gone-trying", token: grant.token)
    }

    /// The same with the acquire's task cancelled while its try is unanswered: the call ends
    /// (cancelled, or granted when the answer won the race, then released when the lock goes),
    /// and whatever the try was granted is released.
    @Test("a cancelled acquire whose try is in flight on the shared connection leaves its key free",
          arguments: ServerKind.allCases)
    func aCancelledTryLeavesItsKeyFree(on kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        let session = try LockSession(servers: [("127.0.0.1", server.port)])
        defer { session.close() }
        let probe = try Connection(port: server.port)
        defer { probe.close() }
        for round in 0..<20 {
            let key = "cancelled-try-\(round)"
            let lock = try DistributedLock(key: key, leaseTtlS: 30, session: session)
            let task = Task { try await lock.acquire() }
            // A different interleaving each round: from before the try is sent to after it is
            // answered.
            for _ in 0..<round { await Task.yield() }
            task.cancel()
            let acquired: Bool
            do {
                acquired = try await task.value
            } catch LockError.cancelled {
                acquired = false
            }
            #expect(acquired || lock.state != .held)
            if acquired { try await lock.release() }
            #expect(lock.state != .held, "\(key): held after the cancelled acquire and its release")
            let grant = try #require(try await probe.acquire(key: key, timeoutS: 5), "\(key): the cancelled try's grant was kept")
            try await probe.release(key: key, token: grant.token)
        }
    }

    /// `session.close()` closes every lock of the session, also one whose handle has gone while
    /// its acquire still waits (on a connection of its own, the key being taken): the acquire
    /// fails, and the key is never granted to it.
    @Test("session.close() closes a lock dropped with its acquire in flight", arguments: ServerKind.allCases)
    func closeReachesADroppedLockWithACallInFlight(on kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        let session = try LockSession(servers: [("127.0.0.1", server.port)])
        let probe = try Connection(port: server.port)
        defer { probe.close() }
        let taken = try #require(try await probe.acquire(key: "orphan", timeoutS: 5))
        let outcome = ThreadLock<Result<Bool, LockError>?>(nil)
        do {
            let waiting = try DistributedLock(key: "orphan", acquireTimeoutS: 10, leaseTtlS: 30, session: session)
            waiting.acquire { result in outcome.withLock { $0 = result } }
            #expect(try await eventually { waiting.state == .queued })
        }
        session.close()
        #expect(try await eventually { outcome.withLock { $0 } != nil }, "the dropped lock's acquire never ended")
        if case .success? = outcome.withLock({ $0 }) {
            Issue.record("the dropped lock's acquire went on after session.close(): \(String(describing: outcome.withLock { $0 }))")
        }
        try await probe.release(key: "orphan", token: taken.token)
        let again = try #require(try await probe.acquire(key: "orphan", timeoutS: 5), "the key went to the closed lock")
        try await probe.release(key: "orphan", token: again.token)
    }

    @Test func semaphoresOnASession() async throws {
        let server = try await RealServer.launch(.go)
        let session = try LockSession(servers: [("127.0.0.1", server.port)])
        defer { session.close() }
        let a = try DistributedSemaphore(key: "pool", limit: 2, leaseTtlS: 2, session: session)
        let b = try DistributedSemaphore(key: "pool", limit: 2, leaseTtlS: 2, session: session)
        let c = try DistributedSemaphore(key: "pool", limit: 2, acquireTimeoutS: 5, leaseTtlS: 2, session: session)
        #expect(try await a.acquire())
        #expect(try await b.acquire())
        async let cGranted = c.acquire()
        #expect(try await eventually { c.state == .queued })
        try await Task.sleep(for: .milliseconds(3000))
        #expect(a.state == .held && b.state == .held, "renewed on the shared connection")
        try await a.release()
        #expect(try await cGranted, "a's release admits the waiter (on its own connection)")
        let stats = try await DflockdClient.stats(port: server.port)
        #expect(stats.semaphores.first { $0.key == "pool" }?.holders == 2)
        try await b.release()
        try await c.release()
        let d = try DistributedSemaphore(key: "pool", limit: 2, acquireTimeoutS: 0, session: session)
        #expect(try await d.enqueue() == .acquired, "a free slot is taken on the shared connection")
        try await d.release()
    }

    @Test func tlsAndAuthOnASession() async throws {
        let pki = try await offThePool { try TLSFixture.pki() }
        let server = try await RealServer.launch(.go, [.authToken("s3cret-session"),
                                                       .tls(certificate: pki.serverCertificate, key: pki.serverKey)])
        let session = try LockSession(servers: [("localhost", server.port)], tls: TLSOptions(caFile: pki.caFile),
                                      auth: "s3cret-session", connectTimeoutMs: 10_000)
        defer { session.close() }
        let locks = try (0..<10).map { try DistributedLock(key: "tls-\($0)", leaseTtlS: 2, session: session) }
        for lock in locks { #expect(try await lock.acquire()) }
        let waiter = try DistributedLock(key: "tls-0", acquireTimeoutS: 5, session: session)
        async let waited = waiter.acquire()  // on its own TLS connection, with auth
        try await Task.sleep(for: .milliseconds(3000))
        #expect(locks.allSatisfy { $0.state == .held })
        try await locks[0].release()
        #expect(try await waited)
        try await waiter.release()
        for lock in locks.dropFirst() { try await lock.release() }

        let wrong = try LockSession(servers: [("localhost", server.port)], tls: TLSOptions(caFile: pki.caFile), auth: "wrong")
        defer { wrong.close() }
        let refused = try DistributedLock(key: "tls-refused", session: wrong)
        await #expect(throws: LockError.authFailed) { try await refused.acquire() }
    }

    @Test func invalidSessionOptionsThrow() throws {
        #expect(throws: LockError.self) { try LockSession(servers: []) }
        #expect(throws: LockError.self) { try LockSession(connectionsPerServer: 0) }
        let session = try LockSession(servers: [("127.0.0.1", 1)])
        defer { session.close() }
        #expect(throws: LockError.self) { try DistributedLock(key: "has space", session: session) }
        #expect(throws: LockError.self) { try DistributedSemaphore(key: "k", limit: 0, session: session) }
    }
}
