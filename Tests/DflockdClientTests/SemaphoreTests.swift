import Testing
@testable import DflockdClient

/// Semaphores, which the 0.5.0 server lacks: against the real Go dflockd 1.10.0.
@Suite(.timeLimit(.minutes(1)))
struct SemaphoreTests {
    @Test func connectionSemaphoreCommandsOnTheGoServer() async throws {
        let server = try await RealServer.launch(.go)
        let a = try Connection(port: server.port)
        let b = try Connection(port: server.port)
        let c = try Connection(port: server.port)
        defer { [a, b, c].forEach { $0.close() } }

        let first = try #require(try await a.acquireSemaphore(key: "pool", limit: 2, timeoutS: 5))
        #expect(first.leaseS == ServerKind.go.defaultLeaseSeconds)
        #expect(first.token.count == 32)
        let second = try #require(try await b.acquireSemaphore(key: "pool", limit: 2, timeoutS: 5, leaseTtlS: 30))
        #expect(second.leaseS == 30)
        #expect(try await c.acquireSemaphore(key: "pool", limit: 2, timeoutS: 0) == nil, "a third holder would exceed the limit")
        await #expect(throws: LockError.limitMismatch(key: "pool")) {
            try await c.acquireSemaphore(key: "pool", limit: 3, timeoutS: 0)
        }
        await #expect(throws: LockError.limitMismatch(key: "pool")) { try await c.acquire(key: "pool", timeoutS: 0) }
        #expect(try await a.renewSemaphore(key: "pool", token: first.token) == 33, "1.10 answers a renewal with the full lease")
        #expect(try await a.renewSemaphore(key: "pool", token: first.token, leaseTtlS: 40) == 40)
        #expect(try await c.enqueueSemaphore(key: "pool", limit: 2) == .queued)
        async let third = c.waitSemaphore(key: "pool", timeoutS: 5)
        try await a.releaseSemaphore(key: "pool", token: first.token)
        let granted = try #require(try await third, "a's release admits the queued holder")
        #expect(granted.token != first.token)
        try await c.releaseSemaphore(key: "pool", token: granted.token)
        try await b.releaseSemaphore(key: "pool", token: second.token)
        await #expect(throws: LockError.notHeld(key: "pool")) {
            try await b.releaseSemaphore(key: "pool", token: second.token)
        }
    }

    @Test func distributedSemaphoreAdmitsUpToLimitAndRenewsWithAndWithoutTtl() async throws {
        let server = try await RealServer.launch(.go)
        func semaphore(_ leaseTtlS: Int?, acquireTimeoutS: Int = 5) throws -> DistributedSemaphore {
            try DistributedSemaphore(key: "pool", limit: 2, acquireTimeoutS: acquireTimeoutS, leaseTtlS: leaseTtlS,
                                     servers: [("127.0.0.1", server.port)])
        }
        let a = try semaphore(2)
        let b = try semaphore(3)
        let c = try semaphore(nil, acquireTimeoutS: 0)
        #expect(a.limit == 2)
        #expect(try await a.acquire())
        #expect(try await b.acquire())
        #expect(try await c.acquire() == false, "the limit is 2")
        #expect(c.state == .closed)
        // Five seconds are 2.5 of a's leases: both stay held only by renewing.
        try await Task.sleep(for: .seconds(5))
        #expect(a.state == .held && b.state == .held)
        #expect(try await c.acquire() == false, "both holders still count against the limit")
        let stats = try await DflockdClient.stats(port: server.port)
        #expect(stats.semaphores.first { $0.key == "pool" }?.holders == 2)
        try await a.release()
        #expect(try await c.acquire(), "a's release freed a slot")
        try await b.release()
        try await c.release()
    }

    @Test func semaphoreLimitMismatchIsItsOwnError() async throws {
        let server = try await RealServer.launch(.go)
        let holder = try DistributedSemaphore(key: "pool", limit: 2, servers: [("127.0.0.1", server.port)])
        #expect(try await holder.acquire())
        let other = try DistributedSemaphore(key: "pool", limit: 3, acquireTimeoutS: 0, servers: [("127.0.0.1", server.port)])
        await #expect(throws: LockError.limitMismatch(key: "pool")) { try await other.acquire() }
        #expect(other.state == .closed)
        try await holder.release()
    }

    @Test func twoPhaseSemaphore() async throws {
        let server = try await RealServer.launch(.go)
        let holder = try DistributedSemaphore(key: "pool", limit: 1, servers: [("127.0.0.1", server.port)])
        #expect(try await holder.enqueue() == .acquired)
        let semaphore = try DistributedSemaphore(key: "pool", limit: 1, servers: [("127.0.0.1", server.port)])
        #expect(try await semaphore.enqueue() == .queued)
        #expect(try await semaphore.wait(timeoutS: 1) == false)
        #expect(try await semaphore.enqueue() == .queued)
        async let granted = semaphore.wait(timeoutS: 10)
        try await holder.release()
        #expect(try await granted)
        #expect(semaphore.token?.count == 32)
        try await semaphore.release()
    }

    /// Replayed: only 2.x servers issue fencing tokens (1.10's are random), and neither server
    /// here is 2.x.
    @Test func fenceOfASemaphoreTokenIsItsFirstSixteenHexDigits() async throws {
        let peer = try ScriptedPeer(script: """
            A > b'sl\\npool\\n5 2\\n'
            A < ok 000000000000000a59c1e0a4b2d3f001 33
            A > b'sr\\npool\\n000000000000000a59c1e0a4b2d3f001\\n'
            A < ok
            """)
        let a = try DistributedSemaphore(key: "pool", limit: 2, acquireTimeoutS: 5, servers: [("127.0.0.1", peer.port)])
        #expect(try await a.acquire())
        #expect(a.fence == 10)
        try await a.release()
        try await peer.finish()
    }

    @Test func invalidLimitIsRejected() {
        #expect(throws: LockError.invalidArgument(name: "limit", reason: "must be at least 1, got 0")) {
            try DistributedSemaphore(key: "pool", limit: 0)
        }
    }
}

@Suite(.timeLimit(.minutes(1)))
struct StatsTests {
    /// A reply recorded from dflockd 1.10 (transcripts/go-1.10-core.txt), for the malformed-reply cases.
    private static let recordedJSON = #"{"connections":3,"locks":[{"key":"s1","owner_conn_id":20,"lease_expires_in_s":32.799063312,"waiters":1}],"semaphores":[],"idle_locks":[{"key":"drop","idle_s":10.070362386},{"key":"hot","idle_s":11.472803744},{"key":"short","idle_s":8.419566747},{"key":"job","idle_s":12.874895068},{"key":"clé-锁","idle_s":0.403538947},{"key":"crlf","idle_s":0.404058307},{"key":"two","idle_s":10.271117545}],"idle_semaphores":[{"key":"pool","idle_s":0.201914348}]}"#

    @Test func statsOfTheGoServerDescribeItsLocksSemaphoresAndIdleKeys() async throws {
        let server = try await RealServer.launch(.go)
        let a = try Connection(port: server.port)
        let b = try Connection(port: server.port)
        let s = try Connection(port: server.port)
        defer { [a, b, s].forEach { $0.close() } }
        for connection in [a, b, s] { try await connection.connect() }
        let idle = try #require(try await a.acquire(key: "clé-锁", timeoutS: 5))
        try await a.release(key: "clé-锁", token: idle.token)
        let held = try #require(try await a.acquire(key: "s1", timeoutS: 5))
        #expect(try await b.enqueue(key: "s1") == .queued)
        let pool = try #require(try await s.acquireSemaphore(key: "pool", limit: 3, timeoutS: 5))

        let stats = try await s.stats()
        #expect(stats.connections == 3)
        let lock = try #require(stats.locks.first { $0.key == "s1" })
        #expect(lock.waiters == 1)
        #expect(lock.leaseExpiresInS > 30 && lock.leaseExpiresInS <= 33)
        #expect(stats.semaphores.map(\.key) == ["pool"])
        #expect(stats.semaphores.first?.limit == 3 && stats.semaphores.first?.holders == 1)
        #expect(stats.idleLocks.map(\.key).contains("clé-锁"), "a released key stays known, idle, until GC")

        try await s.releaseSemaphore(key: "pool", token: pool.token)
        try await a.release(key: "s1", token: held.token)
        let granted = try #require(try await b.wait(key: "s1", timeoutS: 5))
        try await b.release(key: "s1", token: granted.token)
        let after = try await DflockdClient.stats(port: server.port)
        #expect(after.locks.isEmpty && after.semaphores.isEmpty)
        #expect(after.idleSemaphores.map(\.key) == ["pool"])
    }

    @Test func statsFunctionUsesAShortLivedConnection() async throws {
        let server = try await RealServer.launch(.go)
        let before = try await DflockdClient.stats(port: server.port)
        #expect(before.connections == 1, "only the stats call's own connection")
        let after = try await DflockdClient.stats(port: server.port)
        #expect(after.connections == 1, "the first call's connection was closed")
    }

    /// Replayed: no real server sends a malformed stats reply.
    @Test(arguments: [
        String(recordedJSON.dropLast(20)),
        "not json at all",
        #"{"connections":"three"}"#,
    ])
    func malformedStatsIsAClearError(json: String) async throws {
        let peer = try ScriptedPeer(script: """
            S > b'stats\\n_\\n\\n'
            S < ok \(json)
            """)
        do {
            _ = try await DflockdClient.stats(port: peer.port)
            Issue.record("a malformed stats reply was accepted")
        } catch let error as LockError {
            guard case .protocolViolation(let detail) = error else {
                Issue.record("expected protocolViolation, got \(error)")
                return
            }
            #expect(detail.contains("stats reply"))
        }
        try await peer.finish()
    }

    @Test func statsOnTheRealPythonServerIsAnError() async throws {
        let server = try RealServer.start()
        await #expect(throws: LockError.serverError(command: "stats", key: "_")) {
            try await DflockdClient.stats(port: server.port)
        }
    }
}

/// `ping` keep-alives for 2.x servers, replayed by a scripted peer: neither server here speaks
/// `ping` (1.10 answers `error`, 0.5.0 closes the connection).
@Suite(.timeLimit(.minutes(1)))
struct KeepAliveTests {
    @Test func anIdleConnectionPingsEveryKeepAliveInterval() async throws {
        let peer = try ScriptedPeer(script: """
            A > b'l\\nk\\n5\\n'
            A < ok 0123456789abcdef0123456789abcdef 33
            A > b'ping\\n_\\n\\n'
            A < ok
            A > b'ping\\n_\\n\\n'
            """)
        let connection = try Connection(port: peer.port, keepAliveMs: 100)
        defer { connection.close() }
        #expect(try await connection.acquire(key: "k", timeoutS: 5) != nil)
        // The script ends once a second ping has arrived, unprompted, after the first was
        // answered; that second one stays unanswered, so no third can follow (pings go out
        // only while nothing is outstanding) and the script's end is not a race.
        try await peer.finish()
    }

    @Test func noPingWithoutKeepAlive() async throws {
        let peer = try ScriptedPeer(script: """
            A > b'l\\nk\\n5\\n'
            A < ok 0123456789abcdef0123456789abcdef 33
            A . nothing more for the quiet window
            """, quietWindow: .milliseconds(500))
        let connection = try Connection(port: peer.port)
        defer { connection.close() }
        #expect(try await connection.acquire(key: "k", timeoutS: 5) != nil)
        try await peer.finish()
    }

    @Test func keepAliveMustBePositive() {
        #expect(throws: LockError.invalidArgument(name: "keepAliveMs", reason: "must be at least 1 millisecond (nil means no limit), got 0")) {
            try Connection(keepAliveMs: 0)
        }
    }
}
