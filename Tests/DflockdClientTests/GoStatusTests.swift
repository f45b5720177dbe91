import Testing
@testable import DflockdClient

/// The statuses only the Go server sends (0.5.0 answers a bare `error` or has no such limit),
/// each against the real dflockd 1.10.0: the error a user gets, and that the connection is
/// still usable afterwards (1.10 keeps it open after a refused request).
@Suite(.timeLimit(.minutes(1)))
struct GoStatusTests {
    @Test func enqueueTwiceOnOneConnectionIsAlreadyEnqueued() async throws {
        let server = try await RealServer.launch(.go)
        let holder = try Connection(port: server.port)
        let connection = try Connection(port: server.port)
        defer { [holder, connection].forEach { $0.close() } }
        let held = try #require(try await holder.acquire(key: "k", timeoutS: 5))
        #expect(try await connection.enqueue(key: "k") == .queued)
        await #expect(throws: LockError.alreadyEnqueued(key: "k")) { try await connection.enqueue(key: "k") }
        try await holder.release(key: "k", token: held.token)
        let granted = try #require(try await connection.wait(key: "k", timeoutS: 5), "the first enqueue still stands")
        try await connection.release(key: "k", token: granted.token)
    }

    @Test func waitWithoutEnqueueIsNotEnqueued() async throws {
        let server = try await RealServer.launch(.go)
        let connection = try Connection(port: server.port)
        defer { connection.close() }
        await #expect(throws: LockError.notEnqueued(key: "k")) { try await connection.wait(key: "k", timeoutS: 1) }
        let grant = try #require(try await connection.acquire(key: "k", timeoutS: 5), "the connection is still usable")
        try await connection.release(key: "k", token: grant.token)
    }

    @Test func aLockOnASemaphoreKeyIsLimitMismatch() async throws {
        let server = try await RealServer.launch(.go)
        let semaphore = try DistributedSemaphore(key: "shared", limit: 2, servers: [("127.0.0.1", server.port)])
        #expect(try await semaphore.acquire())
        let lock = try DistributedLock(key: "shared", acquireTimeoutS: 0, servers: [("127.0.0.1", server.port)])
        await #expect(throws: LockError.limitMismatch(key: "shared")) { try await lock.acquire() }
        #expect(lock.state == .closed)
        try await semaphore.release()
    }

    @Test func keysBeyondMaxLocksAreMaxLocks() async throws {
        let server = try await RealServer.launch(.go, [.maxLocks(2)])
        let connection = try Connection(port: server.port)
        defer { connection.close() }
        let a = try #require(try await connection.acquire(key: "a", timeoutS: 0))
        let b = try #require(try await connection.acquire(key: "b", timeoutS: 0))
        await #expect(throws: LockError.maxLocks(key: "c")) { try await connection.acquire(key: "c", timeoutS: 0) }
        let lock = try DistributedLock(key: "c", servers: [("127.0.0.1", server.port)])
        await #expect(throws: LockError.maxLocks(key: "c")) { try await lock.acquire() }
        #expect(lock.state == .closed)
        // Semaphore keys share the budget.
        await #expect(throws: LockError.maxLocks(key: "pool")) {
            try await connection.acquireSemaphore(key: "pool", limit: 2, timeoutS: 0)
        }
        try await connection.release(key: "a", token: a.token)
        try await connection.release(key: "b", token: b.token)
    }

    @Test func waitersBeyondMaxWaitersAreMaxWaiters() async throws {
        let server = try await RealServer.launch(.go, [.maxWaiters(1)])
        let holder = try DistributedLock(key: "k", servers: [("127.0.0.1", server.port)])
        #expect(try await holder.acquire())
        let first = try DistributedLock(key: "k", acquireTimeoutS: 10, servers: [("127.0.0.1", server.port)])
        #expect(try await first.enqueue() == .queued)
        let second = try DistributedLock(key: "k", acquireTimeoutS: 10, servers: [("127.0.0.1", server.port)])
        await #expect(throws: LockError.maxWaiters(key: "k")) { try await second.acquire() }
        #expect(second.state == .closed)
        let connection = try Connection(port: server.port)
        defer { connection.close() }
        await #expect(throws: LockError.maxWaiters(key: "k")) { try await connection.enqueue(key: "k") }
        async let granted = first.wait()
        try await holder.release()
        #expect(try await granted)
        try await first.release()
    }

    /// 1.10 answers `error` to a release with a stale token and keeps the connection open;
    /// a user holding other locks on that connection relies on them surviving the mistake.
    @Test func aRefusedReleaseLeavesTheConnectionAndItsOtherLocksAlone() async throws {
        let server = try await RealServer.launch(.go)
        let connection = try Connection(port: server.port)
        defer { connection.close() }
        let kept = try #require(try await connection.acquire(key: "kept", timeoutS: 5))
        await #expect(throws: LockError.notHeld(key: "other")) {
            try await connection.release(key: "other", token: "0123456789abcdef0123456789abcdef")
        }
        #expect(try await connection.renew(key: "kept", token: kept.token) == 33, "the connection and its lock survived")
        try await connection.release(key: "kept", token: kept.token)
    }
}
