import Testing
@testable import DflockdClient

/// `DistributedLock` against both real servers: every test that does not need one server's
/// own behaviour runs once on dflockd 0.5.0 (Python) and once on dflockd 1.10.0 (Go).
@Suite(.timeLimit(.minutes(2)))
struct LockTests {
    /// A fresh server of one kind for one test case, and the helpers that talk to it.
    struct Bed {
        let kind: ServerKind
        let server: RealServer

        // Off the cooperative pool: a start blocks for up to a second (longer on a loaded
        // machine), which would stall the other tests' timers.
        init(_ kind: ServerKind) async throws {
            self.kind = kind
            server = try await RealServer.launch(kind)
        }

        func lock(_ key: String, acquireTimeoutS: Int = 5, leaseTtlS: Int? = nil,
                  onLockLost: (@Sendable (String, String) -> Void)? = nil) throws -> DistributedLock {
            try DistributedLock(key: key, acquireTimeoutS: acquireTimeoutS, leaseTtlS: leaseTtlS,
                                servers: [("127.0.0.1", server.port)], onLockLost: onLockLost)
        }

        /// What another client sees: `timeout` while the key is held, a grant (released at once)
        /// when it is free.
        func isHeldElsewhere(_ key: String, port: Int? = nil) throws -> Bool {
            try isHeld(key, port: port ?? server.port)
        }
    }

    @Test(arguments: ServerKind.allCases)
    func acquireHoldsUntilRelease(on kind: ServerKind) async throws {
        let bed = try await Bed(kind)
        let lock = try bed.lock("lock-basic")
        #expect(lock.state == .idle)
        #expect(try await lock.acquire())
        #expect(lock.state == .held)
        #expect(lock.token?.count == 32)
        #expect(lock.lease == kind.defaultLeaseSeconds, "the server's default lease")
        #expect(try bed.isHeldElsewhere("lock-basic"))
        try await lock.release()
        #expect(lock.state == .closed)
        #expect(lock.token == nil)
        #expect(try !bed.isHeldElsewhere("lock-basic"))
    }

    @Test(arguments: ServerKind.allCases)
    func secondLockTimesOutThenGetsTheKeyAfterRelease(on kind: ServerKind) async throws {
        let bed = try await Bed(kind)
        let first = try bed.lock("lock-contended")
        let second = try bed.lock("lock-contended", acquireTimeoutS: 1)
        #expect(try await first.acquire())
        let started = ContinuousClock.now
        #expect(try await second.acquire() == false)
        #expect(ContinuousClock.now - started >= .milliseconds(900), "the server waited the acquire timeout")
        #expect(second.state == .closed)
        try await first.release()
        #expect(try await second.acquire())
        try await second.release()
    }

    @Test(arguments: ServerKind.allCases)
    func fiveWaitersAreGrantedInFifoOrder(on kind: ServerKind) async throws {
        let bed = try await Bed(kind)
        let holder = try bed.lock("lock-fifo")
        #expect(try await holder.acquire())
        var waiters: [DistributedLock] = []
        for _ in 0..<5 {
            let waiter = try bed.lock("lock-fifo", acquireTimeoutS: 20)
            // enqueue answers only once the server has queued us, so the queue order is ours.
            #expect(try await waiter.enqueue() == .queued)
            waiters.append(waiter)
        }
        let order = Recorder<Int>()
        try await withThrowingTaskGroup(of: Void.self) { group in
            for (index, waiter) in waiters.enumerated() {
                group.addTask {
                    #expect(try await waiter.wait())
                    order.append(index)
                    try await waiter.release()
                }
            }
            try await holder.release()
            try await group.waitForAll()
        }
        #expect(order.items == [0, 1, 2, 3, 4])
    }

    @Test(arguments: ServerKind.allCases)
    func shortLeaseStaysHeldByRenewal(on kind: ServerKind) async throws {
        let bed = try await Bed(kind)
        let lock = try bed.lock("lock-renewed", leaseTtlS: 2)
        #expect(try await lock.acquire())
        let token = lock.token
        // 2 from the grant, or already 1 if a renewal (due after 1 s) beat this line.
        #expect([1, 2].contains(lock.lease))
        // Seven seconds is 3.5 leases: without renewal the key would be free well before.
        for _ in 0..<7 {
            try await Task.sleep(for: .seconds(1))
            #expect(try bed.isHeldElsewhere("lock-renewed"))
            #expect(lock.state == .held)
            #expect(lock.token == token)
        }
        // 0.5.0 answers a renewal with the seconds left, rounded down; 1.10 with the full lease.
        #expect(lock.lease == (kind == .python ? 1 : 2))
        try await lock.release()
    }

    @Test(arguments: ServerKind.allCases)
    func serverKilledWhileHeldReportsLockLostOnce(on kind: ServerKind) async throws {
        let own = try await RealServer.launch(kind)
        let (lost, report) = AsyncStream<(String, String)>.makeStream()
        let calls = Recorder<String>()
        let lock = try DistributedLock(key: "lock-killed", servers: [("127.0.0.1", own.port)], onLockLost: { key, token in
            calls.append(token)
            report.yield((key, token))
        })
        #expect(try await lock.acquire())
        let token = try #require(lock.token)
        await offThread { own.kill() }
        var iterator = lost.makeAsyncIterator()
        let first = await iterator.next()
        #expect(first?.0 == "lock-killed")
        #expect(first?.1 == token)
        #expect(lock.state == .closed)
        await lock.loop.roundTrip()
        #expect(calls.items.count == 1)
        await #expect(throws: LockError.lockLost(key: "lock-killed", token: token)) { try await lock.release() }
        await #expect(throws: LockError.notConnected(key: "lock-killed")) { try await lock.release() }
    }

    @Test(arguments: ServerKind.allCases)
    func acquireWhileConnectedNeedsForce(on kind: ServerKind) async throws {
        let bed = try await Bed(kind)
        let lock = try bed.lock("lock-force")
        #expect(try await lock.acquire())
        let firstToken = lock.token
        await #expect(throws: LockError.alreadyConnected(key: "lock-force")) { try await lock.acquire() }
        await #expect(throws: LockError.alreadyConnected(key: "lock-force")) { try await lock.enqueue() }
        #expect(lock.state == .held, "a rejected call leaves the lock as it was")
        // force closes the first session (the server frees the key) and acquires anew.
        #expect(try await lock.acquire(force: true))
        #expect(lock.token != firstToken)
        try await lock.release()
    }

    @Test(arguments: ServerKind.allCases)
    func releaseAfterCloseOrReleaseThrows(on kind: ServerKind) async throws {
        let bed = try await Bed(kind)
        let lock = try bed.lock("lock-release-twice")
        await #expect(throws: LockError.notConnected(key: "lock-release-twice")) { try await lock.release() }
        #expect(try await lock.acquire())
        lock.close()
        lock.close()
        await lock.loop.roundTrip()
        #expect(lock.state == .closed)
        await #expect(throws: LockError.notConnected(key: "lock-release-twice")) { try await lock.release() }
        // close() sent no release, but ending the session freed the key on the server, once
        // the server has seen the end of the connection (nothing to await on this side).
        let port = bed.server.port
        await waitUntil(timeout: .seconds(10)) { (try? !isHeld("lock-release-twice", port: port)) ?? false }
    }

    @Test(arguments: ServerKind.allCases)
    func twoPhaseEnqueueAndWait(on kind: ServerKind) async throws {
        let bed = try await Bed(kind)
        let first = try bed.lock("lock-two-phase")
        let second = try bed.lock("lock-two-phase")
        await #expect(throws: LockError.notEnqueued(key: "lock-two-phase")) { try await second.wait(timeoutS: 1) }
        #expect(try await first.enqueue() == .acquired)
        #expect(first.state == .held)
        #expect(try await first.wait(timeoutS: 1), "wait is true at once after the fast path")
        #expect(try await second.enqueue() == .queued)
        #expect(second.state == .queued)
        #expect(try await second.wait(timeoutS: 1) == false)
        #expect(second.state == .closed)
        #expect(try await second.enqueue() == .queued)
        async let granted = second.wait(timeoutS: 10)
        try await first.release()
        #expect(try await granted)
        #expect(second.state == .held)
        try await second.release()
    }

    @Test(arguments: ServerKind.allCases)
    func withLockReleasesWhenTheBodyThrows(on kind: ServerKind) async throws {
        let bed = try await Bed(kind)
        struct BodyFailed: Error, Equatable {}
        let lock = try bed.lock("lock-with-throwing")
        await #expect(throws: BodyFailed()) {
            try await lock.withLock {
                #expect(try bed.isHeldElsewhere("lock-with-throwing"))
                throw BodyFailed()
            }
        }
        #expect(lock.state == .closed)
        #expect(try !bed.isHeldElsewhere("lock-with-throwing"))
        let value = try await lock.withLock { 42 }
        #expect(value == 42)
    }

    @Test(arguments: ServerKind.allCases)
    func withLockTimesOutWithAcquireTimeout(on kind: ServerKind) async throws {
        let bed = try await Bed(kind)
        let holder = try bed.lock("lock-with-timeout")
        #expect(try await holder.acquire())
        let late = try bed.lock("lock-with-timeout", acquireTimeoutS: 0)
        await #expect(throws: LockError.acquireTimeout(key: "lock-with-timeout")) {
            try await late.withLock { Issue.record("the body must not run") }
        }
        try await holder.release()
    }

    @Test(arguments: ServerKind.allCases)
    func cancelledAcquireEndsTheSessionAndLeavesTheLockReusable(on kind: ServerKind) async throws {
        let bed = try await Bed(kind)
        let holder = try bed.lock("lock-cancel")
        #expect(try await holder.acquire())
        let waiter = try bed.lock("lock-cancel", acquireTimeoutS: 30)
        let task = Task { try await waiter.acquire() }
        await waitUntil { waiter.state == .queued }
        task.cancel()
        await #expect(throws: LockError.cancelled) { try await task.value }
        #expect(waiter.state == .closed)
        try await holder.release()
        #expect(try await waiter.acquire())
        try await waiter.release()
    }

    @Test(arguments: ServerKind.allCases)
    func aDroppedLockStillCompletesItsOperationThenFreesTheKey(on kind: ServerKind) async throws {
        let bed = try await Bed(kind)
        let port = bed.server.port
        let acquired = await withCheckedContinuation { (done: CheckedContinuation<Result<Bool, LockError>, Never>) in
            // No reference survives this statement but the lock's own.
            try! DistributedLock(key: "lock-dropped", servers: [("127.0.0.1", port)]).acquire { done.resume(returning: $0) }
        }
        #expect(try acquired.get())
        // Once its completion has run, nothing keeps the lock: it closes its session.
        let other = try Connection(port: port)
        defer { other.close() }
        let grant = try await other.acquire(key: "lock-dropped", timeoutS: 5)
        #expect(grant != nil, "the dropped lock's session was never closed")
    }

    @Test(arguments: ServerKind.allCases)
    func completionHandlerFormRunsOnTheLoopThread(on kind: ServerKind) async throws {
        let bed = try await Bed(kind)
        let lock = try bed.lock("lock-callbacks")
        let loop = lock.loop
        let results = await withCheckedContinuation { (done: CheckedContinuation<[String], Never>) in
            lock.acquire { acquired in
                var log = ["acquire \(acquired) onLoop=\(loop.inEventLoop)"]
                lock.release { released in
                    log.append("release \(released) onLoop=\(loop.inEventLoop)")
                    done.resume(returning: log)
                }
            }
        }
        #expect(results == ["acquire success(true) onLoop=true", "release success() onLoop=true"])
    }

    @Test(arguments: ServerKind.allCases)
    func eachKeyLivesOnTheServerStableHashShardPicks(on kind: ServerKind) async throws {
        let bed = try await Bed(kind)
        let others = try await RealServer.launchMany(2, kind)
        let ports = [bed.server.port, others[0].port, others[1].port]
        let servers = ports.map { ("127.0.0.1", $0) }
        for key in ["my-resource", "a", "bench-0", "clé-锁", "orders/42", "shard-x", "shard-y"] {
            let lock = try DistributedLock(key: key, servers: servers)
            #expect(try await lock.acquire())
            let chosen = stableHashShard(key, 3)
            for (index, port) in ports.enumerated() {
                #expect(try bed.isHeldElsewhere(key, port: port) == (index == chosen), "\(key) on server \(index)")
            }
            try await lock.release()
        }
    }

    @Test func invalidOptionsThrowNamingTheOption() {
        func option(_ make: () throws(LockError) -> DistributedLock) -> String? {
            do {
                _ = try make()
                return nil
            } catch {
                if case .invalidArgument(let name, _) = error { return name }
                return "\(error)"
            }
        }
        #expect(option { () throws(LockError) in try DistributedLock(key: "") } == "key")
        #expect(option { () throws(LockError) in try DistributedLock(key: "a b") } == "key")
        #expect(option { () throws(LockError) in try DistributedLock(key: "a\nr") } == "key")
        #expect(option { () throws(LockError) in try DistributedLock(key: "k", acquireTimeoutS: -1) } == "acquireTimeoutS")
        #expect(option { () throws(LockError) in try DistributedLock(key: "k", leaseTtlS: 0) } == "leaseTtlS")
        #expect(option { () throws(LockError) in try DistributedLock(key: "k", renewRatio: 0) } == "renewRatio")
        #expect(option { () throws(LockError) in try DistributedLock(key: "k", renewRatio: 1) } == "renewRatio")
        #expect(option { () throws(LockError) in try DistributedLock(key: "k", servers: []) } == "servers")
        #expect(option { () throws(LockError) in try DistributedLock(key: "k", servers: [("127.0.0.1", 0)]) } == "port")
        #expect(option { () throws(LockError) in try DistributedLock(key: "k", servers: [("a", 1), ("b", 2)], shardingStrategy: { _, _ in 2 }) } == "shardingStrategy")
        #expect(option { () throws(LockError) in try DistributedLock(key: "k", auth: "se\ncret") } == "auth")
        #expect(option { () throws(LockError) in try DistributedLock(key: "k", connectTimeoutMs: 0) } == "connectTimeoutMs")
        #expect(option { () throws(LockError) in try DistributedLock(key: "k", socketTimeoutMs: -5) } == "socketTimeoutMs")
        #expect(option { () throws(LockError) in try DistributedLock(key: "k", host: "127.0.0.1", port: 6389) } == nil)
    }
}

extension EventLoop {
    /// Returns after the loop has run everything queued so far, and the close callbacks those
    /// turns scheduled.
    func roundTrip() async {
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            execute { self.execute { done.resume() } }
        }
    }
}

/// Collects values from any thread.
final class Recorder<Element: Sendable>: Sendable {
    private let storage = ThreadLock<[Element]>([])
    func append(_ element: Element) { storage.withLock { $0.append(element) } }
    var items: [Element] { storage.withLock { $0 } }
}

/// Polls a condition that has no event to await (a state reached on the loop thread).
/// Gives up, recording an issue, after `timeout` or when the test is cancelled (its time limit),
/// so that a condition that never comes fails the test instead of spinning forever.
func waitUntil(timeout: Duration = .seconds(30), sourceLocation: SourceLocation = #_sourceLocation,
               _ condition: @Sendable () -> Bool) async {
    let deadline = ContinuousClock.now + timeout
    while !condition() {
        guard ContinuousClock.now < deadline, (try? await Task.sleep(for: .milliseconds(5))) != nil else {
            Issue.record("the awaited condition did not hold within \(timeout)", sourceLocation: sourceLocation)
            return
        }
    }
}
