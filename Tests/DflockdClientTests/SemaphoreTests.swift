import Testing
@testable import DflockdClient

/// Semaphores and stats, which the 0.5.0 server lacks: replayed from the Go 1.10 transcripts.
@Suite(.timeLimit(.minutes(1)))
struct SemaphoreTests {
    /// The steps of one transcript section, without the last `drop` lines.
    private func section(_ title: String, of transcript: String, droppingLast drop: Int = 0) throws -> String {
        let text = try TestSupport.transcript(transcript)
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        let start = try #require(lines.firstIndex { $0 == "## \(title)" }, "no section \(title)")
        let rest = lines[(start + 1)...]
        let end = rest.firstIndex { $0.hasPrefix("## ") } ?? rest.endIndex
        let steps = rest[..<end].filter { !$0.isEmpty }
        return steps.dropLast(drop).joined(separator: "\n")
    }

    @Test func recordedSemaphoreExchangeReplaysThroughConnection() async throws {
        // The section ends with `sl … 5 0` (lease 0), which this client refuses to send.
        let peer = try ScriptedPeer(script: section("semaphore: limit 2, third waits, limit mismatch, two-phase",
                                                    of: "go-1.10-core.txt", droppingLast: 2))
        let a = try Connection(port: peer.port)
        let b = try Connection(port: peer.port)
        let c = try Connection(port: peer.port)
        defer { [a, b, c].forEach { $0.close() } }

        let first = try #require(try await a.acquireSemaphore(key: "pool", limit: 2, timeoutS: 5))
        #expect(first == Grant(token: "45d099c205a29b62451df05fe4fe68f5", leaseS: 33))
        let second = try #require(try await b.acquireSemaphore(key: "pool", limit: 2, timeoutS: 5, leaseTtlS: 30))
        #expect(second.leaseS == 30)
        #expect(try await c.acquireSemaphore(key: "pool", limit: 2, timeoutS: 0) == nil, "the third holder waits")
        await #expect(throws: LockError.limitMismatch(key: "pool")) {
            try await c.acquireSemaphore(key: "pool", limit: 3, timeoutS: 0)
        }
        await #expect(throws: LockError.limitMismatch(key: "pool")) { try await c.acquire(key: "pool", timeoutS: 0) }
        #expect(try await a.renewSemaphore(key: "pool", token: first.token) == 33)
        #expect(try await a.renewSemaphore(key: "pool", token: first.token, leaseTtlS: 40) == 40)
        #expect(try await c.enqueueSemaphore(key: "pool", limit: 2) == .queued)
        async let third = c.waitSemaphore(key: "pool", timeoutS: 5)
        try await a.releaseSemaphore(key: "pool", token: first.token)
        let granted = try #require(try await third)
        #expect(granted.token == "f9805161a99435a2f9b734234e4b5dcb")
        try await c.releaseSemaphore(key: "pool", token: granted.token)
        try await b.releaseSemaphore(key: "pool", token: second.token)
        await #expect(throws: LockError.notHeld(key: "pool")) {
            try await b.releaseSemaphore(key: "pool", token: second.token)
        }
        try await peer.finish()
    }

    @Test func distributedSemaphoreAdmitsUpToLimitAndRenewsWithAndWithoutTtl() async throws {
        let peer = try ScriptedPeer(script: """
            A > b'sl\\npool\\n5 2\\n'
            A < ok 000000000000000a59c1e0a4b2d3f001 2
            B > b'sl\\npool\\n5 2 30\\n'
            B < ok 0000000000000000000000000000000b 2
            C > b'sl\\npool\\n0 2\\n'
            C < timeout
            A > b'sn\\npool\\n000000000000000a59c1e0a4b2d3f001\\n'
            A < ok 31
            B > b'sn\\npool\\n0000000000000000000000000000000b 30\\n'
            B < ok 29
            A > b'sr\\npool\\n000000000000000a59c1e0a4b2d3f001\\n'
            A < ok
            B > b'sr\\npool\\n0000000000000000000000000000000b\\n'
            B < ok
            """)
        func semaphore(_ leaseTtlS: Int?, acquireTimeoutS: Int = 5) throws -> DistributedSemaphore {
            try DistributedSemaphore(key: "pool", limit: 2, acquireTimeoutS: acquireTimeoutS, leaseTtlS: leaseTtlS,
                                     servers: [("127.0.0.1", peer.port)])
        }
        let a = try semaphore(nil)
        let b = try semaphore(30)
        let c = try semaphore(nil, acquireTimeoutS: 0)
        #expect(a.limit == 2)
        #expect(try await a.acquire())
        #expect(try await b.acquire())
        #expect(try await c.acquire() == false)
        #expect(c.state == .closed)
        // Granted 2 s: each renews once after 1 s (B with its TTL); the answers show up as
        // `lease`, and the next renewal is maxIdleMs (10 s) away, after the test.
        await waitUntil { a.lease == 31 && b.lease == 29 }
        #expect(a.fence == 10, "a token's first 16 hex digits are its fence")
        try await a.release()
        try await b.release()
        try await peer.finish()
    }

    @Test func semaphoreLimitMismatchIsItsOwnError() async throws {
        let peer = try ScriptedPeer(script: """
            A > b'sl\\npool\\n0 3\\n'
            A < error_limit_mismatch
            """)
        let semaphore = try DistributedSemaphore(key: "pool", limit: 3, acquireTimeoutS: 0, servers: [("127.0.0.1", peer.port)])
        await #expect(throws: LockError.limitMismatch(key: "pool")) { try await semaphore.acquire() }
        #expect(semaphore.state == .closed)
        try await peer.finish()
    }

    @Test func twoPhaseSemaphore() async throws {
        let peer = try ScriptedPeer(script: """
            C > b'se\\npool\\n2\\n'
            C < queued
            C > b'sw\\npool\\n5\\n'
            C < ok f9805161a99435a2f9b734234e4b5dcb 33
            C > b'sn\\npool\\nf9805161a99435a2f9b734234e4b5dcb\\n'
            C < ok 33
            C > b'sr\\npool\\nf9805161a99435a2f9b734234e4b5dcb\\n'
            C < ok
            """)
        let semaphore = try DistributedSemaphore(key: "pool", limit: 2, servers: [("127.0.0.1", peer.port)])
        #expect(try await semaphore.enqueue() == .queued)
        // The grant `sw` found is confirmed by a renewal before it counts as held.
        #expect(try await semaphore.wait(timeoutS: 5))
        #expect(semaphore.token == "f9805161a99435a2f9b734234e4b5dcb")
        try await semaphore.release()
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
    private static let recordedJSON = #"{"connections":3,"locks":[{"key":"s1","owner_conn_id":20,"lease_expires_in_s":32.799063312,"waiters":1}],"semaphores":[],"idle_locks":[{"key":"drop","idle_s":10.070362386},{"key":"hot","idle_s":11.472803744},{"key":"short","idle_s":8.419566747},{"key":"job","idle_s":12.874895068},{"key":"clé-锁","idle_s":0.403538947},{"key":"crlf","idle_s":0.404058307},{"key":"two","idle_s":10.271117545}],"idle_semaphores":[{"key":"pool","idle_s":0.201914348}]}"#

    @Test func recordedStatsReplyDecodes() async throws {
        let peer = try ScriptedPeer(transcript: "go-1.10-core.txt", section: "stats")
        let a = try Connection(port: peer.port)
        let b = try Connection(port: peer.port)
        let s = try Connection(port: peer.port)
        defer { [a, b, s].forEach { $0.close() } }
        // The peer binds A, B, S to connections in the order it accepts them.
        for connection in [a, b, s] { try await connection.connect() }
        let held = try #require(try await a.acquire(key: "s1", timeoutS: 5))
        async let waiting = b.acquire(key: "s1", timeoutS: 5)
        let stats = try await s.stats()
        #expect(stats.connections == 3)
        #expect(stats.locks == [.init(key: "s1", ownerConnId: 20, leaseExpiresInS: 32.799063312, waiters: 1)])
        #expect(stats.semaphores.isEmpty)
        #expect(stats.idleLocks.count == 7)
        #expect(stats.idleLocks.contains(.init(key: "clé-锁", idleS: 0.403538947)))
        #expect(stats.idleSemaphores == [.init(key: "pool", idleS: 0.201914348)])
        try await a.release(key: "s1", token: held.token)
        let granted = try #require(try await waiting)
        try await b.release(key: "s1", token: granted.token)
        try await peer.finish()
    }

    @Test func statsFunctionUsesAShortLivedConnection() async throws {
        let peer = try ScriptedPeer(script: """
            S > b'stats\\n_\\n\\n'
            S < ok \(Self.recordedJSON)
            S ! closed by client
            """)
        let stats = try await DflockdClient.stats(port: peer.port)
        #expect(stats.idleLocks.map(\.key) == ["drop", "hot", "short", "job", "clé-锁", "crlf", "two"])
        try await peer.finish()
    }

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

/// `ping` keep-alives for 2.x servers, replayed by a scripted peer.
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
