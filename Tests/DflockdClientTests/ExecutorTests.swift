// Tests of `EventLoop` as a task and serial executor: tasks preferring the loop and actors on
// it stay on the loop thread through every lock await, without a cross-thread hop per call;
// borrowed loops run jobs enqueued before they run; shutdown never loses a job.
import CUV
import Foundation
import Testing
@testable import DflockdClient

#if canImport(Glibc)
import Glibc
#endif

/// State an actor owns that is not `Sendable`: touched inside `withLock` bodies.
final class RequestLedger {
    var served = 0
    var keys: [String] = []
}

/// The one operation in flight of a hand-made bridged call. Loop thread only.
final class PendingOperation: @unchecked Sendable {
    var completion: ((Result<Int, LockError>) -> Void)?
}

/// A service whose isolation is the loop: its methods, its awaits on locks and its `withLock`
/// bodies all run on the loop thread.
actor LoopService {
    let loop: EventLoop
    let port: Int
    private let ledger = RequestLedger()

    nonisolated var unownedExecutor: UnownedSerialExecutor { loop.asUnownedSerialExecutor() }

    init(loop: EventLoop, port: Int) {
        self.loop = loop
        self.port = port
    }

    var served: Int { ledger.served }

    /// One request: a lock around a change to the actor's state, and the thread at every step.
    func serve(key: String) async throws -> [Bool] {
        var onLoop = [loop.inEventLoop]
        let lock = try DistributedLock(key: key, acquireTimeoutS: 10, servers: [("127.0.0.1", port)], loop: loop)
        try await lock.withLock {
            onLoop.append(loop.inEventLoop)
            ledger.served += 1
            ledger.keys.append(key)
        }
        onLoop.append(loop.inEventLoop)
        let acquired = try await lock.acquire()
        onLoop.append(loop.inEventLoop && acquired)
        try await lock.release()
        onLoop.append(loop.inEventLoop)
        return onLoop
    }

    /// Sequential raw commands on one connection, from the actor.
    func roundTrips(_ count: Int, key: String, on connection: Connection) async throws -> [Bool] {
        var onLoop: [Bool] = []
        for _ in 0..<count {
            // Plain awaits: #require's expansion would add closures of its own around the call.
            guard let grant = try await connection.acquire(key: key, timeoutS: 5) else { throw LockError.acquireTimeout(key: key) }
            onLoop.append(loop.inEventLoop)
            try await connection.release(key: key, token: grant.token)
            onLoop.append(loop.inEventLoop)
        }
        return onLoop
    }

    /// Whether the caller is isolated to the actor by the executor's own check.
    func checkedIsolation() -> Bool {
        assumeIsolated { _ in true }
    }
}

@Suite("ExecutorTests", .timeLimit(.minutes(2)))
struct ExecutorTests {
    var server: RealServer { get throws { try ConnectionTests.sharedServer.get() } }

    @Test("a task preferring the loop runs on the loop thread before and after every lock await, and withLock's body runs there")
    func taskPreferringTheLoop() async throws {
        let port = try server.port
        let loop = EventLoop()
        defer { loop.shutdown() }
        let lock = try DistributedLock(key: "exec-pref-lock", acquireTimeoutS: 5, servers: [("127.0.0.1", port)], loop: loop)
        let connection = try Connection(port: port, loop: loop)
        defer { connection.close() }
        let hopsBefore = loop.runQueue.jobsThroughInbox.load(ordering: .relaxed)
        let rounds = 20
        let onLoop = try await withTaskExecutorPreference(loop) {
            var onLoop = [loop.inEventLoop]
            #expect(try await lock.acquire())
            onLoop.append(loop.inEventLoop)
            try await lock.release()
            onLoop.append(loop.inEventLoop)
            #expect(try await lock.enqueue() == .acquired)
            onLoop.append(loop.inEventLoop)
            #expect(try await lock.wait())
            onLoop.append(loop.inEventLoop)
            try await lock.release()
            onLoop.append(loop.inEventLoop)
            let value = try await lock.withLock {
                onLoop.append(loop.inEventLoop)
                return 42
            }
            #expect(value == 42)
            onLoop.append(loop.inEventLoop)
            for _ in 0..<rounds {
                let grant = try #require(try await connection.acquire(key: "exec-pref-conn", timeoutS: 5))
                onLoop.append(loop.inEventLoop)
                try await connection.release(key: "exec-pref-conn", token: grant.token)
                onLoop.append(loop.inEventLoop)
            }
            return onLoop
        }
        #expect(onLoop.count == 8 + 2 * rounds)
        #expect(onLoop.allSatisfy { $0 }, "off the loop thread at steps \(onLoop.indices.filter { !onLoop[$0] })")
        // Entering the preference is the one job that has to come from another thread; every
        // resume after a lock operation was enqueued on the loop thread itself.
        let hops = loop.runQueue.jobsThroughInbox.load(ordering: .relaxed) - hopsBefore
        #expect(hops <= 2, "\(hops) jobs crossed threads for \(6 + 2 * rounds) lock operations")
        let jobsRun = await withCheckedContinuation { c in loop.execute { c.resume(returning: loop.runQueue.jobsRun) } }
        #expect(jobsRun >= 6 + 2 * rounds, "only \(jobsRun) jobs ran from the run queue")
    }

    @Test("an actor on the loop's executor: methods, lock awaits and withLock bodies on the loop thread, its state touched inside withLock")
    func actorOnTheLoop() async throws {
        let port = try server.port
        let loop = EventLoop()
        defer { loop.shutdown() }
        let service = LoopService(loop: loop, port: port)
        let requests = 16
        let trails = try await withThrowingTaskGroup(of: [Bool].self) { group in
            for index in 0..<requests {
                group.addTask { try await service.serve(key: "exec-actor-\(index % 4)") }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(trails.count == requests)
        #expect(trails.allSatisfy { $0.count == 5 && $0.allSatisfy { $0 } }, "off the loop thread: \(trails)")
        #expect(await service.served == requests)
        #expect(await service.checkedIsolation())

        // Inside one actor method, sequential calls never leave the loop: no job crosses threads.
        let connection = try Connection(port: port, loop: loop)
        defer { connection.close() }
        try await connection.connect()
        let hopsBefore = loop.runQueue.jobsThroughInbox.load(ordering: .relaxed)
        let onLoop = try await service.roundTrips(20, key: "exec-actor-conn", on: connection)
        let hops = loop.runQueue.jobsThroughInbox.load(ordering: .relaxed) - hopsBefore
        #expect(onLoop.count == 40 && onLoop.allSatisfy { $0 })
        #expect(hops <= 1, "\(hops) jobs crossed threads for 40 calls from an actor on the loop")
    }

    @Test("cancelling a task on the loop's executor ends its blocked acquire; the task goes on on the loop thread")
    func cancelOnTheLoop() async throws {
        let port = try server.port
        let loop = EventLoop()
        defer { loop.shutdown() }
        let key = "exec-cancel"
        let holder = try Connection(port: port, loop: loop)
        defer { holder.close() }
        _ = try #require(try await holder.acquire(key: key, timeoutS: 5))
        let waiter = try Connection(port: port, loop: loop)
        defer { waiter.close() }
        let queued = OneShot<Bool>()
        let task = Task(executorPreference: loop) { () -> (LockError?, Bool) in
            do {
                #expect(try await waiter.enqueue(key: key) == .queued)
                queued.fulfil(true)
                _ = try await waiter.wait(key: key, timeoutS: 30)
                return (nil, loop.inEventLoop)
            } catch {
                return (error as? LockError, loop.inEventLoop)
            }
        }
        #expect(await queued.value() == true)
        task.cancel()
        let (error, onLoop) = await task.value
        #expect(error == .cancelled)
        #expect(onLoop)

        // Cancelled before the call: the operation never starts.
        let fresh = try Connection(port: port, loop: loop)
        defer { fresh.close() }
        let early = Task(executorPreference: loop) { () -> LockError? in
            withUnsafeCurrentTask { $0?.cancel() }
            do {
                _ = try await fresh.acquire(key: "exec-cancel-early", timeoutS: 5)
                return nil
            } catch {
                return error as? LockError
            }
        }
        #expect(await early.value == .cancelled)
    }

    @Test("the bridge: a cancelled task never starts an operation, unless it must start even then; either way it resumes")
    func bridgeAndCancellation() async throws {
        let loop = EventLoop()
        defer { loop.shutdown() }
        for startsWhenCancelled in [false, true] {
            for onLoop in [false, true] {
                let started = ThreadLock(false)
                let body = { () async -> Result<Int, LockError> in
                    withUnsafeCurrentTask { $0?.cancel() }
                    do {
                        let value: Int = try await loop.bridge(startsWhenCancelled: startsWhenCancelled, { completion in
                            started.withLock { $0 = true }
                            loop.runLater { completion(.success(7)) }
                        }, onCancel: {})
                        return .success(value)
                    } catch {
                        return .failure(error as? LockError ?? .closed)
                    }
                }
                let result = onLoop ? await Task(executorPreference: loop) { await body() }.value : await Task { await body() }.value
                let label = "startsWhenCancelled \(startsWhenCancelled), on the loop \(onLoop)"
                #expect(started.withLock { $0 } == startsWhenCancelled, "\(label)")
                #expect(result == (startsWhenCancelled ? .success(7) : .failure(.cancelled)), "\(label)")
            }
        }
    }

    @Test("the bridge: an operation that completes inside its start resumes the call once, on the loop and off it")
    func bridgeCompletionInsideStart() async throws {
        let loop = EventLoop()
        defer { loop.shutdown() }
        for onLoop in [false, true] {
            // What a completion-handler call does once the loop has shut down: it completes at
            // once, inside the call.
            let body = { () async -> Result<Int, LockError> in
                do {
                    let value: Int = try await loop.bridge({ completion in completion(.success(11)) }, onCancel: {})
                    return .success(value)
                } catch {
                    return .failure(error as? LockError ?? .closed)
                }
            }
            let result = onLoop ? await Task(executorPreference: loop) { await body() }.value : await Task { await body() }.value
            #expect(result == .success(11), "on the loop \(onLoop)")
        }
    }

    /// An operation that reaches the loop through its inbox, as every completion-handler call
    /// made off the loop thread does, and a cancellation that comes while `start` queues it:
    /// the cancellation's work, queued first, finds no operation yet. The bridge cancels once
    /// more behind the operation, so the call still ends (without that it would wait forever).
    @Test("the bridge: a cancellation while start hands the operation to the loop still ends it", .timeLimit(.minutes(1)))
    func bridgeCancellationRacingTheStart() async throws {
        let loop = EventLoop()
        defer { loop.shutdown() }
        for onLoop in [false, true] {
            let events = ThreadLock([String]())
            let pending = PendingOperation()
            let body = { () async -> Result<Int, LockError> in
                do {
                    let value: Int = try await loop.bridge({ completion in
                        withUnsafeCurrentTask { $0?.cancel() }
                        events.withLock { $0.append("queued") }
                        let completion = UncheckedSendable(completion)
                        loop.execute { pending.completion = completion.value }
                    }, onCancel: {
                        events.withLock { $0.append("cancel") }
                        loop.execute {
                            pending.completion?(.failure(.cancelled))
                            pending.completion = nil
                        }
                    })
                    return .success(value)
                } catch {
                    return .failure(error as? LockError ?? .closed)
                }
            }
            let result = onLoop ? await Task(executorPreference: loop) { await body() }.value : await Task { await body() }.value
            #expect(result == .failure(.cancelled), "on the loop \(onLoop)")
            #expect(events.withLock { $0 } == ["cancel", "queued", "cancel"], "on the loop \(onLoop)")
        }
    }

    @Test("an async call on a loop that has shut down throws eventLoopShutDown, on the loop's executor and off it")
    func asyncCallAfterShutdown() async throws {
        let loop = EventLoop()
        let connection = try Connection(host: "127.0.0.1", port: 1, loop: loop)
        loop.shutdown()
        for onLoop in [false, true] {
            let body = { () async -> LockError? in
                do {
                    try await connection.ping()
                    return nil
                } catch {
                    return error as? LockError ?? .closed
                }
            }
            let error = onLoop ? await Task(executorPreference: loop) { await body() }.value : await Task { await body() }.value
            #expect(error == .eventLoopShutDown, "on the loop's executor \(onLoop)")
        }
    }

    @Test("jobs enqueued on a borrowed loop before it runs keep uv_run going until they have run")
    func borrowedLoopRunsJobsEnqueuedBeforeItRuns() async throws {
        let port = try server.port
        let outcome = OneShot<(tasks: [Bool], actor: [Bool], closeResult: Int32)>()
        let thread = Thread {
            let raw = UnsafeMutablePointer<uv_loop_t>.allocate(capacity: 1)
            defer { raw.deallocate() }
            precondition(uv_loop_init(raw) == 0)
            let loop = EventLoop(borrowing: raw)
            let taskResults = ThreadLock<[Bool]>([])
            let actorResult = ThreadLock<[Bool]>([])
            // Enqueued on this thread (the loop's) before uv_run: into the run queue.
            for index in 0..<3 {
                Task(executorPreference: loop) {
                    var onLoop = loop.inEventLoop
                    do {
                        let connection = try Connection(port: port, loop: loop)
                        let key = "exec-borrowed-\(index)"
                        let grant = try await connection.acquire(key: key, timeoutS: 5)
                        onLoop = onLoop && loop.inEventLoop && grant != nil
                        if let grant { try await connection.release(key: key, token: grant.token) }
                        onLoop = onLoop && loop.inEventLoop
                        connection.close()
                    } catch {
                        onLoop = false
                    }
                    taskResults.withLock { $0.append(onLoop) }
                }
            }
            let service = LoopService(loop: loop, port: port)
            Task(executorPreference: loop) {
                let trail = (try? await service.serve(key: "exec-borrowed-actor")) ?? [false]
                actorResult.withLock { $0 = trail }
            }
            // No connection is open yet: only the pending jobs keep this from returning at once.
            uv_run(raw, UV_RUN_DEFAULT)
            loop.shutdown()
            uv_run(raw, UV_RUN_DEFAULT)
            outcome.fulfil((taskResults.withLock { $0 }, actorResult.withLock { $0 }, uv_loop_close(raw)))
        }
        thread.start()
        let result = try #require(await outcome.value(within: .seconds(30)), "the borrowed loop never returned")
        #expect(result.tasks == [true, true, true])
        #expect(result.actor.count == 5 && result.actor.allSatisfy { $0 }, "\(result.actor)")
        #expect(result.closeResult == 0, "uv_loop_close: a handle outlived shutdown()")
    }

    @Test("shutdown with tasks waiting on the loop: they resume with eventLoopShutDown and run to their end; later jobs still run")
    func shutdownWithJobsPending() async throws {
        let port = try server.port
        let key = "exec-shutdown"
        let holderLoop = EventLoop()
        defer { holderLoop.shutdown() }
        let holder = try Connection(port: port, loop: holderLoop)
        defer { holder.close() }
        _ = try #require(try await holder.acquire(key: key, timeoutS: 5))

        let loop = EventLoop()
        let waiters = 5
        let queued = (0..<waiters).map { _ in OneShot<Bool>() }
        let tasks = try (0..<waiters).map { index in
            let connection = try Connection(port: port, loop: loop)
            return Task(executorPreference: loop) { () -> (LockError?, Bool) in
                do {
                    #expect(try await connection.enqueue(key: key) == .queued)
                    queued[index].fulfil(true)
                    _ = try await connection.wait(key: key, timeoutS: 60)
                    return (nil, loop.inEventLoop)
                } catch {
                    return (error as? LockError, loop.inEventLoop)
                }
            }
        }
        for waiter in queued { #expect(await waiter.value() == true) }
        loop.shutdown()
        for task in tasks {
            let (error, onLoop) = await task.value
            #expect(error == .eventLoopShutDown)
            #expect(onLoop, "a task failed by shutdown resumes on the loop thread while it shuts down")
        }

        // After shutdown the executor still runs what it is given, on the enqueueing thread,
        // and lock calls made there fail at once.
        let late = try Connection(port: port, loop: loop)
        let lateOutcome: (LockError?, Bool) = await withTaskExecutorPreference(loop) {
            do {
                _ = try await late.acquire(key: key, timeoutS: 5)
                return (nil, loop.inEventLoop)
            } catch {
                return (error as? LockError, loop.inEventLoop)
            }
        }
        #expect(lateOutcome.0 == .eventLoopShutDown)
        #expect(!lateOutcome.1)
        let service = LoopService(loop: loop, port: port)
        #expect(await service.checkedIsolation())
        await #expect(throws: LockError.eventLoopShutDown) { try await service.serve(key: key) }
    }

    @Test("a plain task (no preference) still works: the async forms hop to the loop and back")
    func plainTaskStillWorks() async throws {
        let port = try server.port
        let loop = EventLoop()
        defer { loop.shutdown() }
        let connection = try Connection(port: port, loop: loop)
        defer { connection.close() }
        for _ in 0..<10 {
            #expect(!loop.inEventLoop)
            let grant = try #require(try await connection.acquire(key: "exec-plain", timeoutS: 5))
            #expect(!loop.inEventLoop)
            try await connection.release(key: "exec-plain", token: grant.token)
        }
        let lock = try DistributedLock(key: "exec-plain-lock", servers: [("127.0.0.1", port)], loop: loop)
        #expect(try await lock.withLock { !loop.inEventLoop })
    }
}
