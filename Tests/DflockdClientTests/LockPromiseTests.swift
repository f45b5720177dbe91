import Testing
@testable import DflockdClient

/// Regression tests of issue #13's broken promises that involve the lock, each against both
/// real servers: no two holders after a late `wait`, no lost release under cancellation, no
/// forced call that hangs, no release that claims a success nobody confirmed.
@Suite(.timeLimit(.minutes(2)))
struct LockPromiseTests {
    private func lock(_ key: String, on server: RealServer, acquireTimeoutS: Int = 10, leaseTtlS: Int? = nil,
                      socketTimeoutMs: Int? = nil) throws -> DistributedLock {
        try DistributedLock(key: key, acquireTimeoutS: acquireTimeoutS, leaseTtlS: leaseTtlS,
                            servers: [("127.0.0.1", server.port)], socketTimeoutMs: socketTimeoutMs)
    }

    /// Item 1: B enqueues behind A (lease 2 s); A releases, so the server grants B and its lease
    /// starts then; C queues behind B and gets the key when B's lease runs out; B calls `wait`
    /// 3.5 s after the grant. B must not report held.
    @Test(arguments: ServerKind.allCases)
    func aLateWaitDoesNotReportAGrantWhoseLeaseRanOut(on kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind, [.leaseSweepInterval(seconds: 1)])
        let a = try lock("late-grant", on: server, leaseTtlS: 2)
        let b = try lock("late-grant", on: server, leaseTtlS: 2)
        let c = try lock("late-grant", on: server, leaseTtlS: 10)
        #expect(try await a.acquire())
        #expect(try await b.enqueue() == .queued)
        let cAcquired = Task { try await c.acquire() }
        try await a.release()
        // C gets the key once B's 2-second lease has run out on the server.
        #expect(try await cAcquired.value, "C, queued behind B, gets the key when B's lease ends")
        #expect(c.state == .held)
        try await Task.sleep(for: .milliseconds(1_000))
        let granted: Bool
        do {
            granted = try await b.wait(timeoutS: 1)
        } catch let error as LockError {
            #expect(error == .leaseExpired(key: "late-grant") || error == .notEnqueued(key: "late-grant"), "\(error)")
            granted = false
        }
        #expect(!granted, "B's grant ran out while it was not waiting: C holds the key")
        #expect(b.state != .held)
        #expect(b.token == nil)
        #expect(c.state == .held)
        try await c.release()
    }

    /// Item 1, the other side: a grant that `wait` finds while its lease still runs is confirmed
    /// and held, with a deadline counted from the confirmation.
    @Test(arguments: ServerKind.allCases)
    func aWaitThatFindsALiveGrantHoldsIt(on kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        let a = try lock("live-grant", on: server)
        let b = try lock("live-grant", on: server, leaseTtlS: 20)
        #expect(try await a.acquire())
        #expect(try await b.enqueue() == .queued)
        try await a.release()
        #expect(try await b.wait(timeoutS: 5))
        #expect(b.state == .held)
        let remaining = try #require(b.leaseRemaining)
        #expect(remaining > .seconds(15) && remaining <= .seconds(20))
        #expect(try isHeld("live-grant", port: server.port))
        try await b.release()
        #expect(try !isHeld("live-grant", port: server.port))
    }

    /// Item 2: a `withLock` whose task is cancelled during the body releases before it throws.
    @Test(arguments: ServerKind.allCases)
    func aCancelledWithLockReleasesBeforeItThrows(on kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        let lock = try lock("cancel-body", on: server)
        let (entered, enteredContinuation) = AsyncStream<Void>.makeStream()
        let task = Task {
            try await lock.withLock {
                enteredContinuation.yield()
                try await Task.sleep(for: .seconds(60))
            }
        }
        var iterator = entered.makeAsyncIterator()
        _ = await iterator.next()
        task.cancel()
        await #expect(throws: CancellationError.self) { try await task.value }
        #expect(lock.state == .closed)
        #expect(try !isHeld("cancel-body", port: server.port), "the key was released")
    }

    /// Item 2: `release()` from a task that is already cancelled still releases.
    @Test(arguments: ServerKind.allCases)
    func releaseFromACancelledTaskStillReleases(on kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        let lock = try lock("cancel-release", on: server)
        #expect(try await lock.acquire())
        let task = Task {
            withUnsafeCurrentTask { $0?.cancel() }
            #expect(Task.isCancelled)
            try await lock.release()
        }
        try await task.value
        #expect(lock.state == .closed)
        #expect(try !isHeld("cancel-release", port: server.port))
    }

    /// Item 2: a cancelled blocking acquire closes its session, so the server drops its wait and
    /// the key goes to the next in line.
    @Test(arguments: ServerKind.allCases)
    func aCancelledAcquireLeavesTheQueue(on kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        let holder = try lock("cancel-wait", on: server)
        let waiter = try lock("cancel-wait", on: server)
        let next = try lock("cancel-wait", on: server)
        #expect(try await holder.acquire())
        let waiting = Task { try await waiter.acquire() }
        while waiter.state != .queued { try await Task.sleep(for: .milliseconds(5)) }
        let nextAcquired = Task { try await next.acquire() }
        while next.state != .queued { try await Task.sleep(for: .milliseconds(5)) }
        waiting.cancel()
        await #expect(throws: LockError.cancelled) { try await waiting.value }
        #expect(waiter.state == .closed)
        try await holder.release()
        #expect(try await nextAcquired.value)
        try await next.release()
    }

    /// Item 3: B's blocking acquire is in flight when B forces a new one. The first ends with
    /// `closed`; the forced one is granted once A releases.
    @Test(arguments: ServerKind.allCases)
    func aForcedAcquireDuringABlockedOneCompletes(on kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        let a = try lock("force-blocked", on: server)
        let b = try lock("force-blocked", on: server)
        #expect(try await a.acquire())
        let first = Task { try await b.acquire() }
        while b.state != .queued { try await Task.sleep(for: .milliseconds(5)) }
        let forced = Task { try await b.acquire(force: true) }
        await #expect(throws: LockError.closed) { try await first.value }
        while b.state != .queued { try await Task.sleep(for: .milliseconds(5)) }
        try await a.release()
        #expect(try await forced.value)
        #expect(b.state == .held)
        #expect(try isHeld("force-blocked", port: server.port))
        try await b.release()
        #expect(try !isHeld("force-blocked", port: server.port))
    }

    /// Item 3: forced enqueue and acquire while held start a new session and complete; the old
    /// session's key is freed with its connection.
    @Test(arguments: ServerKind.allCases)
    func forcedCallsWhileHeldComplete(on kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        let lock = try lock("force-held", on: server)
        #expect(try await lock.acquire())
        let firstToken = lock.token
        // The server frees the old session's key when it sees that connection close, which
        // may be just after the new enqueue arrives.
        if try await lock.enqueue(force: true) == .queued {
            #expect(try await lock.wait(timeoutS: 5))
        }
        #expect(lock.state == .held)
        #expect(lock.token != firstToken)
        #expect(try await lock.acquire(force: true))
        #expect(lock.state == .held)
        // A forced enqueue while a wait is in flight.
        let other = try self.lock("force-held", on: server)
        #expect(try await other.enqueue() == .queued)
        // Both calls reach the loop in the order they are made: the wait is in flight when the
        // forced enqueue arrives.
        let waited = ResultBox<Bool>()
        let enqueued = ResultBox<EnqueueResult>()
        other.wait(timeoutS: 10) { waited.set($0) }
        other.enqueue(force: true) { enqueued.set($0) }
        #expect(try await enqueued.value() == .queued)
        await #expect(throws: LockError.closed) { try await waited.value() }
        try await lock.release()
        #expect(try await other.wait(timeoutS: 5))
        try await other.release()
    }

    /// Item 4: a release the server never answers (it is frozen) fails after the default
    /// request deadline (10 s), saying the key is freed at the latest when its lease ends,
    /// instead of claiming success or never returning.
    @Test(arguments: ServerKind.allCases)
    func aReleaseAFrozenServerNeverConfirmsFails(on kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        let lock = try lock("frozen-release", on: server, leaseTtlS: 30)
        #expect(try await lock.acquire())
        server.freeze()
        defer { server.thaw() }
        let started = ContinuousClock.now
        await #expect(throws: LockError.releaseUnconfirmed(key: "frozen-release", leaseS: 30)) { try await lock.release() }
        let elapsed = ContinuousClock.now - started
        #expect(elapsed >= .milliseconds(9_500) && elapsed < .seconds(14), "returned after \(elapsed)")
        #expect(lock.state == .closed)
    }

    /// The same with `socketTimeoutMs`: it keeps its meaning (no byte for that long while a
    /// reply is owed) and ends the release sooner, with the same error.
    @Test(arguments: ServerKind.allCases)
    func aReleaseUnderSocketTimeoutFailsTheSameWay(on kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        let lock = try lock("frozen-release-socket", on: server, leaseTtlS: 5, socketTimeoutMs: 500)
        #expect(try await lock.acquire())
        server.freeze()
        defer { server.thaw() }
        await #expect(throws: LockError.releaseUnconfirmed(key: "frozen-release-socket", leaseS: 5)) { try await lock.release() }
        #expect(lock.state == .closed)
    }

    /// Item 4's counterpart: a release whose connection the server closed succeeds (the server
    /// frees a closed session's keys).
    @Test(arguments: ServerKind.allCases)
    func aReleaseWhoseConnectionClosedSucceeds(on kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        let lock = try lock("killed-release", on: server)
        #expect(try await lock.acquire())
        server.kill()
        // The loss is reported (onLockLost) or the release itself finds the connection closed.
        do {
            try await lock.release()
        } catch let error as LockError {
            guard case .lockLost = error else {
                Issue.record("a release after the server died failed with \(error)")
                return
            }
        }
        #expect(lock.state == .closed)
    }
}

/// The result of a completion-handler call, awaited once it arrives.
final class ResultBox<Value: Sendable>: @unchecked Sendable {
    private let state = ThreadLock<(result: Result<Value, LockError>?, waiter: CheckedContinuation<Result<Value, LockError>, Never>?)>((nil, nil))

    func set(_ result: Result<Value, LockError>) {
        let waiter = state.withLock { state -> CheckedContinuation<Result<Value, LockError>, Never>? in
            state.result = result
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume(returning: result)
    }

    func value() async throws -> Value {
        let result = await withCheckedContinuation { continuation in
            let ready = state.withLock { state -> Result<Value, LockError>? in
                if let result = state.result { return result }
                state.waiter = continuation
                return nil
            }
            if let ready { continuation.resume(returning: ready) }
        }
        return try result.get()
    }
}
