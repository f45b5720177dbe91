import Foundation
import Testing
@testable import DflockdClient

/// Several clients run random mixes of acquire, two-phase with delays (longer than a lease at
/// times), force, cancel, close and release on a few keys, while a random fault schedule kills
/// (and restarts), freezes and black-holes the server. A counter per key, written only under
/// the lock after checking it is still held, finds any overlap as a lost update; every call
/// must end within its own bound.
///
/// `FAULT_RUN_SECONDS` (default 10 per server) sets the length; `make soak` runs it longer.
/// The fault schedule's seed is printed; `FAULT_RUN_SEED` replays the schedule (the timing of
/// a real server is not replayable).
@Suite(.timeLimit(.minutes(10)))
struct RandomFaultRunTests {
    static let keys = ["fault-a", "fault-b", "fault-c"]
    static let clients = 9
    /// No commit with less of the lease left than this (the section's own write is instant).
    static let commitMargin = Duration.milliseconds(300)

    static var duration: Duration {
        .seconds(ProcessInfo.processInfo.environment["FAULT_RUN_SECONDS"].flatMap { Int($0) } ?? 10)
    }

    /// The longest any call may take with these options: the acquire or wait timeout (2 s), a
    /// connect (1 s), a reply timeout (1.5 s) and a confirming renewal (1.5 s), with slack for a
    /// loaded machine.
    static let callBound = Duration.seconds(9)

    final class Ledger: Sendable {
        struct Commit: Sendable { let key: String; let client: Int; let enter: ContinuousClock.Instant; let exit: ContinuousClock.Instant }
        struct State {
            var counters: [String: Int] = [:]
            var commits: [Commit] = []
            var aborts = 0
            var outcomes: [String: Int] = [:]
            var slowCalls: [String] = []
            var faults: [String] = []
        }

        let state = ThreadLock(State())

        func read(_ key: String) -> Int { state.withLock { $0.counters[key, default: 0] } }

        func commit(_ key: String, client: Int, enter: ContinuousClock.Instant, value: Int) {
            state.withLock { s in
                s.counters[key] = value
                s.commits.append(Commit(key: key, client: client, enter: enter, exit: .now))
            }
        }

        func note(_ outcome: String) { state.withLock { $0.outcomes[outcome, default: 0] += 1 } }
        func abort() { state.withLock { $0.aborts += 1 } }
        func fault(_ what: String) { state.withLock { $0.faults.append(what) } }

        /// Runs one call and records how it ended and whether it kept within its bound.
        func timed<T>(_ name: String, client: Int, _ call: () async throws -> T) async -> Result<T, any Error> {
            let started = ContinuousClock.now
            let result: Result<T, any Error>
            do { result = .success(try await call()) } catch { result = .failure(error) }
            let took = ContinuousClock.now - started
            if took > RandomFaultRunTests.callBound {
                state.withLock { $0.slowCalls.append("client \(client) \(name) took \(took) (\(result))") }
            }
            switch result {
            case .success: note("\(name): ok")
            case .failure(let error as LockError): note("\(name): \(Mirror(reflecting: error).children.first?.label ?? "\(error)")")
            case .failure(let error): note("\(name): \(type(of: error))")
            }
            return result
        }
    }

    /// Works under the lock if it holds it: read, pause, check it still holds with margin, write.
    static func section(_ lock: DistributedLock, client: Int, ledger: Ledger) async {
        guard lock.state == .held else { return }
        let enter = ContinuousClock.now
        let seen = ledger.read(lock.key)
        try? await Task.sleep(for: .milliseconds(Int.random(in: 1...30)))
        // Check, then write, with no suspension point in between.
        if lock.state == .held, let remaining = lock.leaseRemaining, remaining > commitMargin {
            ledger.commit(lock.key, client: client, enter: enter, value: seen + 1)
        } else {
            ledger.abort()
        }
    }

    static func runClient(_ lock: DistributedLock, client: Int, ledger: Ledger, until end: ContinuousClock.Instant) async {
        while ContinuousClock.now < end {
            switch Int.random(in: 0..<100) {
            case 0..<35:
                if case .success(true) = await ledger.timed("acquire", client: client, { try await lock.acquire(force: Bool.random() && Bool.random()) }) {
                    await section(lock, client: client, ledger: ledger)
                }
            case 35..<60:
                let enqueued = await ledger.timed("enqueue", client: client) { try await lock.enqueue() }
                if case .success(.queued) = enqueued {
                    // Sometimes longer than the 2 s lease: a grant made meanwhile may run out.
                    try? await Task.sleep(for: .milliseconds(Int.random(in: 0...3_000)))
                    _ = await ledger.timed("wait", client: client) { try await lock.wait(timeoutS: 2) }
                }
                await section(lock, client: client, ledger: ledger)
            case 60..<72:
                let attempt = Task { try await lock.acquire() }
                try? await Task.sleep(for: .milliseconds(Int.random(in: 0...300)))
                attempt.cancel()
                if case .success(true) = await ledger.timed("cancelled acquire", client: client, { try await attempt.value }) {
                    await section(lock, client: client, ledger: ledger)
                }
            case 72..<80:
                // Force while something may be in flight.
                let first = Task { try await lock.enqueue() }
                try? await Task.sleep(for: .milliseconds(Int.random(in: 0...50)))
                if case .success(true) = await ledger.timed("forced acquire", client: client, { try await lock.acquire(force: true) }) {
                    await section(lock, client: client, ledger: ledger)
                }
                _ = await ledger.timed("forced-over enqueue", client: client) { try await first.value }
            case 80..<86:
                lock.close()
            default:
                try? await Task.sleep(for: .milliseconds(Int.random(in: 0...100)))
            }
            if Bool.random() || lock.state == .held {
                _ = await ledger.timed("release", client: client) { try await lock.release() }
            }
        }
        _ = await ledger.timed("final release", client: client) { try await lock.release() }
        lock.close()
    }

    @Test(arguments: ServerKind.allCases)
    func randomClientsUnderRandomFaults(on kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind, [.leaseSweepInterval(seconds: 1)])
        let proxy = try BlackHoleProxy(targetPort: server.port)
        let ledger = Ledger()
        let seed = ProcessInfo.processInfo.environment["FAULT_RUN_SEED"].flatMap { UInt64($0) } ?? UInt64.random(in: 1...UInt64.max)
        var schedule = SplitMix64(seed: seed)
        let locks = try (0..<Self.clients).map { client in
            try DistributedLock(key: Self.keys[client % Self.keys.count], acquireTimeoutS: 2, leaseTtlS: 2,
                                servers: [("127.0.0.1", client.isMultiple(of: 2) ? server.port : proxy.port)],
                                connectTimeoutMs: 1000, socketTimeoutMs: 1500)
        }
        let start = ContinuousClock.now
        let end = start.advanced(by: Self.duration)
        let faults = (0..<100).map { _ in (pause: 500 + schedule.below(2_500), kind: schedule.below(3), length: 300 + schedule.below(2_000)) }
        print("RandomFaultRunTests(\(kind)): FAULT_RUN_SEED=\(seed)")

        await withTaskGroup(of: Void.self) { group in
            group.addTask {
                for fault in faults {
                    try? await Task.sleep(for: .milliseconds(fault.pause))
                    guard ContinuousClock.now < end else { return }
                    switch fault.kind {
                    case 0:
                        ledger.fault("kill at \(ContinuousClock.now - start)")
                        await offThread { server.kill() }
                        try? await Task.sleep(for: .milliseconds(fault.length / 4))
                        _ = try? await offThread { try server.restart() }
                    case 1:
                        ledger.fault("freeze at \(ContinuousClock.now - start)")
                        await offThread { server.freeze() }
                        try? await Task.sleep(for: .milliseconds(fault.length))
                        await offThread { server.thaw() }
                    default:
                        ledger.fault("black hole at \(ContinuousClock.now - start)")
                        await offThread { proxy.blackHole() }
                        try? await Task.sleep(for: .milliseconds(fault.length))
                        await offThread { proxy.heal() }
                    }
                }
            }
            for (client, lock) in locks.enumerated() {
                group.addTask { await Self.runClient(lock, client: client, ledger: ledger, until: end) }
            }
        }

        let s = ledger.state.withLock { $0 }
        print("""
            RandomFaultRunTests(\(kind)): \(s.commits.count) commits, \(s.aborts) aborts, faults \(s.faults.count), \
            outcomes \(s.outcomes.sorted { $0.key < $1.key })
            """)
        for key in Self.keys {
            let commits = s.commits.filter { $0.key == key }
            #expect(s.counters[key, default: 0] == commits.count, "lost updates on \(key): the counter is \(s.counters[key, default: 0]) after \(commits.count) commits (seed \(seed))")
            let ordered = commits.sorted { $0.enter < $1.enter }
            for (before, after) in zip(ordered, ordered.dropFirst()) where after.enter < before.exit {
                Issue.record("overlap on \(key): client \(before.client) until \(before.exit - start), client \(after.client) from \(after.enter - start) (seed \(seed))")
            }
        }
        #expect(s.slowCalls.isEmpty, "calls past their bound (seed \(seed)): \(s.slowCalls)")
        #expect(s.commits.count >= 10, "too few commits to mean anything: \(s.commits.count)")
        #expect(!s.faults.isEmpty)
        proxy.stop()
        await offThread { server.stop() }
    }
}
