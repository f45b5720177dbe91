// Tests of `EventLoop`: cross-thread submission, ordering, shutdown, and embedding.
import CUV
import Foundation
import Testing
@testable import DflockdClient

#if canImport(Glibc)
import Glibc
#endif

@Suite("LoopTests", .timeLimit(.minutes(1)))
struct LoopTests {
    @Test("execute from many threads runs every item exactly once, on the loop thread")
    func executeFromManyThreads() async {
        let loop = EventLoop()
        defer { loop.shutdown() }
        #expect(!loop.inEventLoop)
        let threads = 8, perThread = 2000
        // touched only on the loop thread
        let runs = ThreadLock([Int](repeating: 0, count: threads * perThread))
        let offLoop = ThreadLock(0)
        DispatchQueue.concurrentPerform(iterations: threads) { t in
            for i in 0..<perThread {
                loop.execute {
                    if !loop.inEventLoop { offLoop.withLock { $0 += 1 } }
                    runs.withLock { $0[t * perThread + i] += 1 }
                }
            }
        }
        // every item was submitted before this one: the inbox is first in, first out
        await LoopProbe.roundTrip(loop)
        let counts = runs.withLock { $0 }
        #expect(counts.allSatisfy { $0 == 1 }, "items run \(Set(counts)) times")
        #expect(offLoop.withLock { $0 } == 0)
    }

    @Test("items from one thread run in submission order; execute on the loop thread runs later")
    func ordering() async {
        let loop = EventLoop()
        defer { loop.shutdown() }
        let log = ThreadLock<[String]>([])
        for i in 0..<100 { loop.execute { log.withLock { $0.append("\(i)") } } }
        loop.execute {
            log.withLock { $0.append("outer-start") }
            loop.execute { log.withLock { $0.append("inner") } }
            log.withLock { $0.append("outer-end") }
        }
        await LoopProbe.roundTrip(loop)
        #expect(log.withLock { $0 } == (0..<100).map(String.init) + ["outer-start", "outer-end", "inner"])
    }

    @Test("a batching window never delays a loop that reads from one connection at a time")
    func batchingWindowLeavesOneConnectionAlone() async throws {
        let server = try ConnectionTests.sharedServer.get()
        let key = "loop-window-one"
        let loop = EventLoop(batchingWindow: .milliseconds(5))
        defer { loop.shutdown() }
        let connection = try Connection(port: server.port, loop: loop)
        defer { connection.close() }
        for _ in 0..<50 {
            let grant = try #require(try await connection.acquire(key: key, timeoutS: 5))
            try await connection.release(key: key, token: grant.token)
        }
        #expect(await LoopProbe.batchingWaits(loop) == 0)
        #expect(await LoopProbe.handles(loop).sorted() == ["async", "prepare", "tcp", "timer"])
    }

    @Test("a batching window waits after a turn that read from several connections; shutdown closes its handle")
    func batchingWindowWaitsWhenBusy() async throws {
        let server = try ConnectionTests.sharedServer.get()
        let loop = EventLoop(batchingWindow: .microseconds(300))
        let connections = try (0..<20).map { _ in try Connection(port: server.port, loop: loop) }
        // A burst of replies from one server may still arrive one per turn; a few bursts are
        // all but certain to bring two within one turn.
        var bursts = 0
        while await LoopProbe.batchingWaits(loop) == 0, bursts < 50 {
            bursts += 1
            try await acquireAndReleaseAtOnce(connections, keyPrefix: "loop-window-busy")
        }
        #expect(await LoopProbe.batchingWaits(loop) > 0, "no turn read from two connections in \(bursts) bursts of 20")
        for connection in connections { connection.close() }
        // uv_loop_close inside shutdown() traps if the window's prepare handle were left open.
        loop.shutdown()
    }

    @Test("a zero or negative batching window adds no handle to the loop")
    func batchingWindowOff() async {
        for window: Duration in [.zero, .seconds(-1)] {
            let loop = EventLoop(batchingWindow: window)
            #expect(await LoopProbe.handles(loop) == ["async"], "window \(window)")
            loop.shutdown()
        }
    }

    @Test("an owned loop shuts down cleanly with a connection still open, and the socket is closed")
    func shutdownWithOpenConnection() async throws {
        let server = try ConnectionTests.sharedServer.get()
        let key = "loop-shutdown-open"
        let loop = EventLoop()
        let connection = try Connection(port: server.port, loop: loop)
        let grant = try #require(try await connection.acquire(key: key, timeoutS: 5))
        #expect(grant.leaseS == 33)
        #expect(ProcessFDs.sockets(toPort: server.port) >= 1)
        loop.shutdown()      // returns only after uv_loop_close succeeded (else it traps)
        loop.shutdown()      // idempotent
        // the server saw the session end and released the lock
        let raw = try RawClient(port: server.port)
        defer { raw.close() }
        #expect(try raw.send("l", key, "5").hasPrefix("ok "))
        withExtendedLifetime(connection) {}
    }

    /// Shutting a loop down closes its connections; a call that was waiting for a reply, or
    /// that comes afterwards, must fail rather than never complete (an async caller would hang).
    @Test("calls pending at shutdown, or made after it, complete with an error")
    func shutdownFailsPendingCalls() async throws {
        let server = try ConnectionTests.sharedServer.get()
        let key = "loop-shutdown-pending"
        let holder = try Connection(port: server.port)
        defer { holder.close() }
        let held = try #require(try await holder.acquire(key: key, timeoutS: 5))

        let loop = EventLoop()
        let connection = try Connection(port: server.port, loop: loop)
        try await connection.connect()
        let pending = OneShot<Result<Grant?, LockError>>()
        connection.acquire(key: key, timeoutS: 30) { pending.fulfil($0) }
        await LoopProbe.roundTrip(loop)
        loop.shutdown()

        let pendingResult = await pending.value(within: .seconds(2))
        #expect(pendingResult != nil, "the acquire pending at shutdown never completed")
        #expect(pendingResult == .failure(.eventLoopShutDown))

        let later = OneShot<Result<Void, LockError>>()
        connection.release(key: key, token: held.token) { later.fulfil($0) }
        let laterResult = await later.value(within: .seconds(2))
        #expect(laterResult != nil, "a call after shutdown never completed")
        if let laterResult, case .failure(.eventLoopShutDown) = laterResult {} else {
            Issue.record("call after shutdown: \(String(describing: laterResult))")
        }
        // the async form too (it must not hang: run it in a task we can give up on)
        let asyncResult = OneShot<LockError?>()
        Task { asyncResult.fulfil(await lockError { try await connection.acquire(key: key, timeoutS: 0) }) }
        let asyncError = await asyncResult.value(within: .seconds(2))
        #expect(asyncError == .some(.eventLoopShutDown), "async call after shutdown")
        // and a fresh connection on the shut-down loop
        let fresh = try Connection(port: server.port, loop: loop)
        #expect(await lockError { try await fresh.connect() } == .eventLoopShutDown)

        try await holder.release(key: key, token: held.token)
    }

    /// Work that runs during `shutdown()` (queued just before it) may issue calls of its own.
    /// Their completions cannot run on a later loop turn, so they must run at once (as calls
    /// made after the shutdown do), not be queued behind a loop that will never turn again.
    @Test("a call issued by loop work while the loop shuts down still completes")
    func callDuringShutdown() async throws {
        let loop = EventLoop()
        let connection = try Connection(port: 1, loop: loop)
        connection.close()
        let result = OneShot<Result<Void, LockError>>()
        loop.execute {
            // queued after shutdown()'s own work item: runs inside the shutdown
            loop.execute {
                connection.release(key: "k", token: "0123456789abcdef0123456789abcdef") { result.fulfil($0) }
            }
        }
        loop.shutdown()
        let value = await result.value(within: .seconds(2))
        #expect(value != nil, "the completion was queued on a loop that had shut down, and never ran")
        if let value, case .success = value { Issue.record("release on a closed connection succeeded") }
    }

    /// Threads calling `execute` while another shuts the loop down: nothing may touch the
    /// closed loop (libuv aborts the process when `uv_async_send` meets a closed loop), and every
    /// call must complete one way or the other. Run in a child process, which must exit normally.
    @Test("calls racing shutdown() from other threads neither crash nor get lost")
    func executeRacingShutdown() async {
        await #expect(processExitsWith: .success) {
            // Bounded on both axes: unbounded spinning threads on 2 cores only measure how
            // fast the loop drains a flood, not whether anything is lost.
            for _ in 0..<40 {
                let loop = EventLoop()
                let connection = try Connection(port: 1, loop: loop)
                connection.close()
                let issued = ThreadLock(0), completed = ThreadLock(0), stop = ThreadLock(false)
                let group = DispatchGroup()
                for _ in 0..<3 {
                    group.enter()
                    Thread {
                        var calls = 0
                        while !stop.withLock({ $0 }) && calls < 2_000 {
                            calls += 1
                            issued.withLock { $0 += 1 }
                            connection.release(key: "k", token: "0123456789abcdef0123456789abcdef") { _ in
                                completed.withLock { $0 += 1 }
                            }
                            loop.execute {}
                        }
                        group.leave()
                    }.start()
                }
                usleep(300)
                loop.shutdown()
                stop.withLock { $0 = true }
                group.wait()
                if issued.withLock({ $0 }) != completed.withLock({ $0 }) {
                    print("calls that never completed: \(issued.withLock { $0 } - completed.withLock { $0 })")
                    exit(3)
                }
            }
        }
    }

    /// Embedding: the caller runs its own libuv loop on its own thread.
    @Test("a borrowed loop runs connections on the caller's thread and shuts down cleanly")
    func borrowedLoop() async throws {
        let port = try ConnectionTests.sharedServer.get().port
        let key = "loop-borrowed"
        let outcome = OneShot<(granted: Bool, released: Bool, onLoop: Bool, closeResult: Int32)>()
        let thread = Thread {
            let raw = UnsafeMutablePointer<uv_loop_t>.allocate(capacity: 1)
            defer { raw.deallocate() }
            precondition(uv_loop_init(raw) == 0)
            let loop = EventLoop(borrowing: raw)
            var granted = false, released = false, onLoop = true
            do {
                let connection = try Connection(port: port, loop: loop)
                connection.acquire(key: key, timeoutS: 5) { result in
                    onLoop = onLoop && loop.inEventLoop
                    guard case .success(let grant?) = result else { connection.close(); return }
                    granted = true
                    connection.release(key: key, token: grant.token) { result in
                        onLoop = onLoop && loop.inEventLoop
                        released = (try? result.get()) != nil
                        connection.close()
                    }
                }
                // returns once nothing referenced is active: the connection closed, the
                // wrapper's own wake-up handle is unreferenced
                uv_run(raw, UV_RUN_DEFAULT)
            } catch {
                onLoop = false
            }
            loop.shutdown()
            uv_run(raw, UV_RUN_DEFAULT)
            outcome.fulfil((granted, released, onLoop, uv_loop_close(raw)))
        }
        thread.start()
        let result = try #require(await outcome.value(within: .seconds(20)), "the borrowed loop never returned")
        #expect(result.granted)
        #expect(result.released)
        #expect(result.onLoop)
        #expect(result.closeResult == 0, "uv_loop_close: a handle outlived shutdown()")
    }
}
