// Cluster mode (the newest dflockd; beta on the server): a follower answers mutating commands
// with `error_not_leader [host:port]`, and locks and semaphores follow the redirect to a
// configured member. The followers here are scripted peers written from the server's cluster
// documentation (DocumentedReplies/doc-cluster.txt); the leaders they name are real servers
// where what the test needs is a real grant.
import Foundation
import Testing
@testable import DflockdClient

@Suite("LeaderHint: which redirects are followed")
struct LeaderHintTests {
    let servers = [Endpoint(host: "10.0.0.1", port: 6388), Endpoint(host: "Node-2.Example", port: 6389),
                   Endpoint(host: "::1", port: 6390), Endpoint(host: "[fe80::1]", port: 6391)]

    @Test("a hint naming a configured server, as written, is followed to that server")
    func configured() {
        #expect(LeaderHint.configuredServer(named: "10.0.0.1:6388", among: servers) == servers[0])
        #expect(LeaderHint.configuredServer(named: "node-2.example:6389", among: servers) == servers[1], "host names ignore case")
        #expect(LeaderHint.configuredServer(named: "[::1]:6390", among: servers) == servers[2])
        #expect(LeaderHint.configuredServer(named: "[FE80::1]:6391", among: servers) == servers[3])
    }

    @Test("a hint naming any other host or port is never followed")
    func notConfigured() {
        for hint in ["10.0.0.1:6389", "10.0.0.9:6388", "evil.example:6388", "node-2.example.evil:6389",
                     "localhost:6388", "10.0.0.1.:6388", "[::2]:6390"] {
            #expect(LeaderHint.configuredServer(named: hint, among: servers) == nil, "\(hint)")
        }
    }

    @Test("a hint that does not parse, or names no one, is never followed")
    func unparsable() {
        for hint: String? in [nil, "", "10.0.0.1", "10.0.0.1:", ":6388", "10.0.0.1:0", "10.0.0.1:65536", "10.0.0.1:+6388",
                              "10.0.0.1:6388:1", "::1:6390", "[::1]6390", "[::1]:", "10.0.0.1 :6388", "10.0.0.1:63 88",
                              "10.0.0.1:6388\n", "a/b:6388", "10.0.0.1:٦٣٨٨", "10.0.0.1:006388"] {
            #expect(LeaderHint.configuredServer(named: hint, among: servers) == nil, "\(String(describing: hint))")
        }
        #expect(LeaderHint.parse("h:1") == Endpoint(host: "h", port: 1))
        #expect(LeaderHint.parse("[::1]:65535") == Endpoint(host: "::1", port: 65535))
    }
}

/// A scripted follower's script: every request in `requests` (wire text as the transcripts
/// write it) answered `error_not_leader[ hint]`, as doc-cluster.txt documents.
private func follower(_ requests: [String], hint: String?, client: String = "A") -> String {
    requests.map { "\(client) > b'\($0)'\n\(client) < error_not_leader\(hint.map { " \($0)" } ?? "")" }.joined(separator: "\n")
}

/// Whether a connection is waiting on `listener` (never accepted): a dial there would show.
private func someoneDialled(_ listener: Int32) -> Bool {
    SupportSocket.pollOne(listener, events: Int16(POLLIN), timeoutMilliseconds: 100) & Int16(POLLIN) != 0
}

/// Fails unless `body` throws `expected`.
private func expectError<T>(_ expected: LockError, sourceLocation: SourceLocation = #_sourceLocation,
                            _ body: () async throws -> T) async {
    do {
        let value = try await body()
        Issue.record("expected \(expected), got \(value)", sourceLocation: sourceLocation)
    } catch let error as LockError {
        #expect(error == expected, sourceLocation: sourceLocation)
    } catch {
        Issue.record("expected \(expected), got \(error)", sourceLocation: sourceLocation)
    }
}

/// Redirects of a lock or semaphore that holds nothing yet, to real servers standing in for
/// the cluster's leader (the newest server, cluster mode; the scripted follower speaks as its
/// cluster documentation says).
@Suite("Cluster redirects: acquire and enqueue", .timeLimit(.minutes(2)))
struct ClusterRedirectAcquireTests {
    @Test("acquire on a follower naming a configured server: reconnects there and acquires", arguments: ServerKind.allCases)
    func acquireFollowsToConfiguredLeader(on kind: ServerKind) async throws {
        let leader = try await RealServer.launch(kind)
        let follower = try ScriptedPeer(script: follower(["l\\nredirected\\n5\\n"], hint: "127.0.0.1:\(leader.port)"))
        let lock = try DistributedLock(key: "redirected", acquireTimeoutS: 5,
                                       servers: [("127.0.0.1", follower.port), ("127.0.0.1", leader.port)],
                                       shardingStrategy: { _, _ in 0 })
        defer { lock.close() }
        #expect(try await lock.acquire())
        try await follower.finish()
        // held on the leader: another client there finds it taken
        let other = try DistributedLock(key: "redirected", acquireTimeoutS: 0, servers: [("127.0.0.1", leader.port)])
        defer { other.close() }
        #expect(try await other.acquire() == false)
        try await lock.release()
        #expect(try await other.acquire())
        try await other.release()
    }

    @Test("enqueue on a follower naming a configured server: reconnects and enqueues there", arguments: ServerKind.allCases)
    func enqueueFollows(on kind: ServerKind) async throws {
        let leader = try await RealServer.launch(kind)
        let follower = try ScriptedPeer(script: follower(["e\\ntwo-phase\\n\\n"], hint: "127.0.0.1:\(leader.port)"))
        let lock = try DistributedLock(key: "two-phase", servers: [("127.0.0.1", follower.port), ("127.0.0.1", leader.port)],
                                       shardingStrategy: { _, _ in 0 })
        defer { lock.close() }
        #expect(try await lock.enqueue() == .acquired)
        #expect(try await lock.wait(timeoutS: 1))
        try await follower.finish()
        try await lock.release()
    }

    @Test("a semaphore follows too (Go 1.10 as the leader)")
    func semaphoreFollows() async throws {
        let leader = try await RealServer.launch(.go)
        let follower = try ScriptedPeer(script: follower(["sl\\npool\\n5 2\\n"], hint: "127.0.0.1:\(leader.port)"))
        let semaphore = try DistributedSemaphore(key: "pool", limit: 2, acquireTimeoutS: 5,
                                                 servers: [("127.0.0.1", follower.port), ("127.0.0.1", leader.port)],
                                                 shardingStrategy: { _, _ in 0 })
        defer { semaphore.close() }
        #expect(try await semaphore.acquire())
        try await follower.finish()
        try await semaphore.release()
    }

    @Test("a hint naming a server that is not configured is never dialled: notLeader at once")
    func unconfiguredHintNeverDialled() async throws {
        let (listener, port) = try SupportSocket.listenLoopback()
        defer { SupportSocket.closeFD(listener) }
        let hint = "127.0.0.1:\(port)"
        let follower = try ScriptedPeer(script: follower(["l\\nstale\\n5\\n"], hint: hint))
        let lock = try DistributedLock(key: "stale", acquireTimeoutS: 5, servers: [("127.0.0.1", follower.port)])
        defer { lock.close() }
        await expectError(.notLeader(leader: hint)) { try await lock.acquire() }
        try await follower.finish()
        #expect(!someoneDialled(listener), "the unconfigured leader was dialled")
        #expect(lock.state == .closed)
    }

    @Test("a real server that is not configured is never dialled either", arguments: ServerKind.allCases)
    func unconfiguredRealServer(on kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        let hint = "127.0.0.1:\(server.port)"
        let follower = try ScriptedPeer(script: follower(["l\\nelsewhere\\n5\\n"], hint: hint))
        let lock = try DistributedLock(key: "elsewhere", acquireTimeoutS: 5, servers: [("127.0.0.1", follower.port)])
        defer { lock.close() }
        await expectError(.notLeader(leader: hint)) { try await lock.acquire() }
        try await follower.finish()
        // nothing was taken there
        let probe = try DistributedLock(key: "elsewhere", acquireTimeoutS: 0, servers: [("127.0.0.1", server.port)])
        defer { probe.close() }
        #expect(try await probe.acquire())
        try await probe.release()
    }

    @Test("a follower naming nobody, or a hint that does not parse: notLeader at once, nothing retried")
    func noLeaderOrGarbage() async throws {
        for (hint, expected) in [(nil, LockError.notLeader(leader: nil)), ("not-an-address", .notLeader(leader: "not-an-address")),
                                 ("127.0.0.1:99999", .notLeader(leader: "127.0.0.1:99999"))] as [(String?, LockError)] {
            let follower = try ScriptedPeer(script: follower(["l\\nnobody\\n5\\n"], hint: hint))
            let lock = try DistributedLock(key: "nobody", acquireTimeoutS: 5, servers: [("127.0.0.1", follower.port)])
            await expectError(expected) { try await lock.acquire() }
            try await follower.finish()
            lock.close()
        }
    }

    @Test("at most 3 redirects per call: the fourth error_not_leader fails the call, undialled")
    func redirectBudget() async throws {
        // Followers F1 → F2 → F3 → F4, and F4 names a fifth configured server that must never
        // be dialled: 3 redirects are followed, the fourth is reported.
        let (listener, lastPort) = try SupportSocket.listenLoopback()
        defer { SupportSocket.closeFD(listener) }
        var peers: [ScriptedPeer] = []
        var next = lastPort
        for _ in 0..<4 {
            let peer = try ScriptedPeer(script: follower(["l\\nloop\\n5\\n"], hint: "127.0.0.1:\(next)"))
            peers.insert(peer, at: 0)
            next = peer.port
        }
        let servers = peers.map { ("127.0.0.1", $0.port) } + [("127.0.0.1", lastPort)]
        let lock = try DistributedLock(key: "loop", acquireTimeoutS: 5, servers: servers, shardingStrategy: { _, _ in 0 })
        defer { lock.close() }
        await expectError(.notLeader(leader: "127.0.0.1:\(lastPort)")) { try await lock.acquire() }
        for peer in peers { try await peer.finish() }
        #expect(!someoneDialled(listener), "a fourth redirect was followed")
    }
}

/// Redirects of a held lock's renewal and release (cluster mode: the newest server). The
/// leaders are scripted too: a token is only valid on the server that granted it, and the
/// documented cluster promise (a token stays valid for renew and release after a failover) is
/// what a scripted new leader can play.
@Suite("Cluster redirects: renewal and release of a held lock", .timeLimit(.minutes(2)))
struct ClusterRedirectHeldTests {
    static let token = "0001a3f217b3c4d77f3c1f2b3e9a8d6e"

    /// The first leader: grants `key` with a lease of `leaseS`, then answers its renewal (or
    /// release) `error_not_leader <hint>`.
    static func firstLeader(_ key: String, leaseS: Int = 2, hint: String?, then next: String) -> String {
        """
        A > b'l\\n\(key)\\n5 \(leaseS)\\n'
        A < ok \(token) \(leaseS)
        \(follower([next], hint: hint))
        """
    }

    static func renewal(_ key: String) -> String { "n\\n\(key)\\n\(token) 2\\n" }
    static func release(_ key: String) -> String { "r\\n\(key)\\n\(token)\\n" }

    final class LossLog: Sendable {
        let lost = ThreadLock<[(String, String, ContinuousClock.Instant)]>([])
        func record(_ key: String, _ token: String) { lost.withLock { $0.append((key, token, .now)) } }
        var count: Int { lost.withLock { $0.count } }
        var first: ContinuousClock.Instant? { lost.withLock { $0.first?.2 } }
    }

    /// A lock on `key` with a 2 s lease (renewed after 1 s) whose first try goes to the first
    /// of `ports`, recording its losses in `losses`.
    static func lock(_ key: String, leaseS: Int = 2, ports: [Int], losses: LossLog = LossLog()) throws -> DistributedLock {
        try DistributedLock(key: key, acquireTimeoutS: 5, leaseTtlS: leaseS, servers: ports.map { ("127.0.0.1", $0) },
                            shardingStrategy: { _, _ in 0 }, onLockLost: { losses.record($0, $1) })
    }

    /// Acquires `lock`, then waits for its one loss: how long after the acquire began it came.
    static func lossAfterAcquiring(_ lock: DistributedLock, _ losses: LossLog) async throws -> Duration {
        let start = ContinuousClock.now
        #expect(try await lock.acquire())
        #expect(await eventually { losses.count == 1 })
        return try #require(losses.first) - start
    }

    /// Polls `condition` every 20 ms until it holds or `timeout` passes.
    static func eventually(within timeout: Duration = .seconds(10), _ condition: () -> Bool) async -> Bool {
        let deadline = ContinuousClock.now + timeout
        while !condition() {
            if ContinuousClock.now >= deadline { return false }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return true
    }

    @Test("a renewal answered error_not_leader <configured> is sent again to the new leader, with the same token")
    func renewalFollows() async throws {
        let second = try ScriptedPeer(script: """
            B > b'\(Self.renewal("renewed"))'
            B < ok 30
            B > b'\(Self.release("renewed"))'
            B < ok
            """)
        let first = try ScriptedPeer(script: Self.firstLeader("renewed", hint: "127.0.0.1:\(second.port)", then: Self.renewal("renewed")))
        let losses = LossLog()
        let lock = try Self.lock("renewed", ports: [first.port, second.port], losses: losses)
        defer { lock.close() }
        #expect(try await lock.acquire())
        #expect(await Self.eventually { (lock.leaseRemaining ?? .zero) > .seconds(5) }, "the renewal on the new leader was not answered")
        #expect(lock.state == .held)
        #expect(lock.token == Self.token)
        try await lock.release()
        try await first.finish()
        try await second.finish()
        #expect(losses.count == 0)
    }

    @Test("a renewal redirected to a server that is not configured loses the lock at once, undialled")
    func renewalToUnconfiguredLosesLock() async throws {
        let (listener, port) = try SupportSocket.listenLoopback()
        defer { SupportSocket.closeFD(listener) }
        let first = try ScriptedPeer(script: Self.firstLeader("stale-renewal", hint: "127.0.0.1:\(port)", then: Self.renewal("stale-renewal")))
        let losses = LossLog()
        let lock = try Self.lock("stale-renewal", ports: [first.port], losses: losses)
        defer { lock.close() }
        // lost when the renewal was refused (after 1 s), not at the deadline
        let lostAfter = try await Self.lossAfterAcquiring(lock, losses)
        #expect(lostAfter < .milliseconds(1700), "lost after \(lostAfter)")
        await expectError(.lockLost(key: "stale-renewal", token: Self.token)) { try await lock.release() }
        try await first.finish()
        #expect(!someoneDialled(listener))
    }

    @Test("a redirected renewal that cannot be made before the local deadline loses the lock before the lease ends")
    func redirectedRenewalPastDeadline() async throws {
        // The new leader reads the renewal and never answers.
        let silent = try ScriptedPeer(script: "B > b'\(Self.renewal("slow"))'")
        let first = try ScriptedPeer(script: Self.firstLeader("slow", hint: "127.0.0.1:\(silent.port)", then: Self.renewal("slow")))
        let losses = LossLog()
        let lock = try Self.lock("slow", ports: [first.port, silent.port], losses: losses)
        defer { lock.close() }
        let lostAfter = try await Self.lossAfterAcquiring(lock, losses)
        // the renewal went out after 1 s; the server may re-grant 2 s after the grant
        #expect(lostAfter > .milliseconds(1000) && lostAfter < .milliseconds(2000), "lost after \(lostAfter)")
        #expect(lock.state == .closed)
        try await first.finish()
        try await silent.finish()
    }

    @Test("a release answered error_not_leader <configured> is sent again to the new leader")
    func releaseFollows() async throws {
        let second = try ScriptedPeer(script: """
            B > b'\(Self.release("let-go"))'
            B < ok
            """)
        let first = try ScriptedPeer(script: Self.firstLeader("let-go", leaseS: 30, hint: "127.0.0.1:\(second.port)", then: Self.release("let-go")))
        let lock = try Self.lock("let-go", leaseS: 30, ports: [first.port, second.port])
        defer { lock.close() }
        #expect(try await lock.acquire())
        try await lock.release()
        #expect(lock.state == .closed)
        try await first.finish()
        try await second.finish()
    }

    @Test("a release redirected to a server that is not configured fails with notLeader")
    func releaseToUnconfigured() async throws {
        let first = try ScriptedPeer(script: Self.firstLeader("let-go-2", leaseS: 30, hint: "10.255.255.1:6388", then: Self.release("let-go-2")))
        let lock = try Self.lock("let-go-2", leaseS: 30, ports: [first.port])
        defer { lock.close() }
        #expect(try await lock.acquire())
        await expectError(.notLeader(leader: "10.255.255.1:6388")) { try await lock.release() }
        try await first.finish()
    }
}
