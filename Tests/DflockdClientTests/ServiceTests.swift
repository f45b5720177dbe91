// LockSession as a swift-service-lifecycle Service (#17): graceful shutdown releases every lock
// held through the session and fails the waits, then run() returns; cancelling run() closes at
// once. Against the real Go dflockd 1.10 server (its `stats` shows what is held).

import Foundation
import Logging
import ServiceLifecycle
import Testing
@testable import DflockdClient

@Suite("LockSession as a Service", .serialized, .timeLimit(.minutes(2)))
struct ServiceTests {
    static func heldKeys(_ port: Int) async throws -> Set<String> {
        Set(try await stats(port: port).locks.map(\.key))
    }

    @Test func gracefulShutdownReleasesTwentyHeldLocksFailsTheWaitAndRunReturns() async throws {
        let server = try await RealServer.launch(.go)
        let (logger, records) = RecordingLogHandler.logger(level: .debug)
        let session = try LockSession(servers: [("127.0.0.1", server.port)], logger: logger)
        let keys = (0..<20).map { "service-\($0)" }
        let locks = try keys.map { try DistributedLock(key: $0, leaseTtlS: 30, session: session, logger: logger) }
        for lock in locks { #expect(try await lock.acquire()) }
        #expect(try await Self.heldKeys(server.port) == Set(keys))

        let group = ServiceGroup(configuration: .init(services: [session], logger: logger))
        let running = Task { try await group.run() }
        // A lock of the session waiting for a key another client holds: shutdown fails its wait.
        let blocker = try DistributedLock(key: "service-blocked", servers: [("127.0.0.1", server.port)])
        #expect(try await blocker.acquire())
        let waiter = try DistributedLock(key: "service-blocked", acquireTimeoutS: 60, session: session, logger: logger)
        let waiting = Task { try await waiter.acquire() }
        #expect(await records.wait(timeout: .seconds(10)) { $0.contains { $0.value.message == "state changed" && $0.value.metadata["dflockd.state"] == "queued" } })

        let started = ContinuousClock.now
        await group.triggerGracefulShutdown()
        try await running.value
        #expect(ContinuousClock.now - started < .seconds(10), "graceful shutdown is bounded")
        await #expect(throws: LockError.self) { try await waiting.value }
        for lock in locks { #expect(lock.state == .closed, "\(lock.key): \(lock.state)") }
        #expect(try await Self.heldKeys(server.port) == ["service-blocked"], "the server still holds keys after run() returned")
        try await blocker.release()
        #expect(records.entries.contains { $0.value.message == "released" && $0.value.metadata["dflockd.key"] == keys[19] })
    }

    @Test func cancellingRunClosesAtOnce() async throws {
        let server = try await RealServer.launch(.go)
        let session = try LockSession(servers: [("127.0.0.1", server.port)])
        let lock = try DistributedLock(key: "service-cancel", leaseTtlS: 30, session: session)
        #expect(try await lock.acquire())
        let running = Task { try await session.run() }
        running.cancel()
        _ = await running.result
        #expect(lock.state == .closed)
        await #expect(throws: LockError.self) { try await lock.acquire() }
        // The session's connection is gone: the server frees the key.
        let other = try DistributedLock(key: "service-cancel", acquireTimeoutS: 5, servers: [("127.0.0.1", server.port)])
        #expect(try await other.acquire())
        try await other.release()
    }
}
