// Regression tests for issue #13, items 4 to 6: no call that never ends, embedding on a
// borrowed loop, and the loop's and connection's life cycle; and for the error policy of
// issue #16 (a refused request fails alone).
import CUV
import Foundation
import Testing
@testable import DflockdClient

#if canImport(Glibc)
import Glibc
#endif

@Suite("PromiseTests", .serialized, .timeLimit(.minutes(2)))
struct PromiseTests {
    static let token = "0123456789abcdef0123456789abcdef"

    /// A TCP port that accepts connections (the kernel completes the handshake) and never
    /// answers anything: a peer that went silent.
    final class SilentPeer: Sendable {
        let fd: Int32
        let port: Int
        init() throws {
            (fd, port) = try SupportSocket.listenLoopback()
        }
        deinit { _ = SupportSocket.closeFD(fd) }
    }

    // MARK: Item 4: no call waits forever

    @Test("a blocking acquire against a frozen server returns after its timeout plus the grace", arguments: ServerKind.allCases)
    func blockingAcquireAgainstFrozenServer(kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        defer { server.stop() }
        let connection = try Connection(port: server.port, blockingGraceMs: 500)
        defer { connection.close() }
        try await connection.connect()
        server.freeze()
        defer { server.thaw() }
        let started = ContinuousClock.now
        let result = OneShot<Result<Grant?, LockError>>()
        connection.acquire(key: "frozen-acquire", timeoutS: 1) { result.fulfil($0) }
        let value = try #require(await result.value(within: .seconds(10)), "the acquire never returned")
        let elapsed = ContinuousClock.now - started
        #expect(value == .failure(.requestTimeout(command: "l", key: "frozen-acquire", milliseconds: 1_500)))
        #expect(elapsed >= .milliseconds(1_400) && elapsed < .seconds(5), "returned after \(elapsed)")
    }

    @Test("a lock's blocking acquire with default options against a frozen server returns (acquireTimeoutS + 5 s)", arguments: ServerKind.allCases)
    func lockAcquireAgainstFrozenServerWithDefaults(kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        defer { server.stop() }
        let lock = try DistributedLock(key: "frozen-lock", acquireTimeoutS: 1, port: server.port)
        defer { lock.close() }
        // Connected first, so that only the acquire meets the frozen server.
        let holder = try Connection(port: server.port)
        defer { holder.close() }
        _ = try #require(try await holder.acquire(key: "frozen-lock", timeoutS: 0))
        server.freeze()
        defer { server.thaw() }
        let started = ContinuousClock.now
        let result = OneShot<Result<Bool, LockError>>()
        lock.acquire { result.fulfil($0) }
        let value = try #require(await result.value(within: .seconds(15)), "the acquire never returned")
        let elapsed = ContinuousClock.now - started
        if case .success(true) = value { Issue.record("acquired a lock held by another, from a frozen server") }
        #expect(elapsed < .seconds(10), "returned after \(elapsed)")
    }

    @Test("a release against a frozen server returns with requestTimeout", arguments: ServerKind.allCases)
    func releaseAgainstFrozenServer(kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        defer { server.stop() }
        let connection = try Connection(port: server.port, requestTimeoutMs: 500)
        defer { connection.close() }
        let grant = try #require(try await connection.acquire(key: "frozen-release", timeoutS: 0))
        server.freeze()
        defer { server.thaw() }
        let result = OneShot<Result<Void, LockError>>()
        connection.release(key: "frozen-release", token: grant.token) { result.fulfil($0) }
        let value = try #require(await result.value(within: .seconds(10)), "the release never returned")
        guard case .failure(.requestTimeout(command: "r", key: "frozen-release", milliseconds: 500)) = value else {
            Issue.record("\(value)"); return
        }
    }

    @Test("auth without connectTimeoutMs against a silent peer returns with requestTimeout")
    func authAgainstSilentPeer() async throws {
        let peer = try SilentPeer()
        let connection = try Connection(port: peer.port, auth: "s3cret", requestTimeoutMs: 300)
        let result = OneShot<Result<Void, LockError>>()
        connection.connect { result.fulfil($0) }
        let value = try #require(await result.value(within: .seconds(10)), "connect with auth never returned")
        guard case .failure(.requestTimeout(command: "auth", key: "_", milliseconds: 300)) = value else {
            Issue.record("\(value)"); return
        }
    }

    @Test("a TLS handshake without connectTimeoutMs against a silent peer returns after requestTimeoutMs")
    func tlsHandshakeAgainstSilentPeer() async throws {
        let peer = try SilentPeer()
        let connection = try Connection(port: peer.port, tls: TLSOptions(insecureSkipVerify: true), requestTimeoutMs: 300)
        let result = OneShot<Result<Void, LockError>>()
        connection.connect { result.fulfil($0) }
        let value = try #require(await result.value(within: .seconds(10)), "the TLS handshake never returned")
        #expect(value.mapError { $0 }.map { "ok" } == .failure(.connectTimeout(host: "127.0.0.1", port: peer.port, milliseconds: 300)))
    }

    @Test("the stats helper has a deadline (the default 10 s) against a silent peer")
    func statsHelperDeadline() async throws {
        let peer = try SilentPeer()
        let result = OneShot<Result<ServerStats, LockError>>()
        stats(port: peer.port) { result.fulfil($0) }
        let value = try #require(await result.value(within: .seconds(20)), "stats never returned")
        guard case .failure(.requestTimeout(command: "stats", key: "_", milliseconds: Connection.defaultRequestTimeoutMs)) = value else {
            Issue.record("\(value)"); return
        }
    }

    // MARK: Issue #16: a refused request fails alone

    @Test("ten pipelined requests, one refused with `error`: the other nine complete normally", arguments: ServerKind.allCases)
    func refusedRequestAmongTen(kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        defer { server.stop() }
        let connection = try Connection(port: server.port)
        defer { connection.close() }
        try await connection.connect()
        let results = (0..<10).map { _ in OneShot<Result<String, LockError>>() }
        connection.loop.execute {
            for index in 0..<10 {
                if index == 4 {
                    // Nobody holds this key with this token: the server answers `error`.
                    connection.release(key: "ten-4", token: Self.token) { results[index].fulfil($0.map { "released" }) }
                } else {
                    connection.acquire(key: "ten-\(index)", timeoutS: 0) { results[index].fulfil($0.map { $0 == nil ? "timeout" : "granted" }) }
                }
            }
        }
        var values: [Result<String, LockError>] = []
        for result in results { values.append(try #require(await result.value(within: .seconds(10)))) }
        for (index, value) in values.enumerated() {
            if index == 4 {
                #expect(value == .failure(.notHeld(key: "ten-4")))
            } else {
                #expect(value == .success("granted"), "request \(index): \(value)")
            }
        }
        // and the connection goes on
        #expect(try await connection.acquire(key: "ten-after", timeoutS: 0) != nil)
    }

    // MARK: Item 5: embedding

    @Test("on a borrowed loop, work given to execute before the caller runs the loop runs: the acquire starts and finishes")
    func executeKeepsBorrowedLoopAlive() async throws {
        let port = try ConnectionTests.sharedServer.get().port
        let outcome = OneShot<(acquired: Bool, released: Bool, closeResult: Int32)>()
        let thread = Thread {
            let raw = UnsafeMutablePointer<uv_loop_t>.allocate(capacity: 1)
            defer { raw.deallocate() }
            precondition(uv_loop_init(raw) == 0)
            let loop = EventLoop(borrowing: raw)
            let acquired = ThreadLock(false), released = ThreadLock(false), done = ThreadLock(false)
            let lock = try! DistributedLock(key: "borrowed-execute", acquireTimeoutS: 5, port: port, loop: loop)
            loop.execute {
                lock.acquire { result in
                    acquired.withLock { $0 = (try? result.get()) == true }
                    lock.release { result in
                        released.withLock { $0 = (try? result.get()) != nil }
                        done.withLock { $0 = true }
                    }
                }
            }
            let deadline = ContinuousClock.now + .seconds(5)
            while !done.withLock({ $0 }), ContinuousClock.now < deadline {
                uv_run(raw, UV_RUN_NOWAIT)
            }
            loop.shutdown()
            uv_run(raw, UV_RUN_DEFAULT)
            outcome.fulfil((acquired.withLock { $0 }, released.withLock { $0 }, uv_loop_close(raw)))
        }
        thread.start()
        let result = try #require(await outcome.value(within: .seconds(20)), "the borrowed loop never returned")
        #expect(result.acquired, "the acquire never started or did not finish")
        #expect(result.released)
        #expect(result.closeResult == 0, "uv_loop_close: a handle outlived shutdown()")
    }

    // MARK: Item 6: life cycles

    @Test("an owned EventLoop dropped without shutdown() shuts itself down, off its thread and on it")
    func droppedLoopShutsDown() async {
        await #expect(processExitsWith: .success) {
            func threads() -> Int { (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task").count) ?? -1 }
            let before = threads()
            for round in 0..<40 {
                var loop: EventLoop? = EventLoop()
                let connection = try Connection(port: 1, loop: loop!)
                let done = DispatchSemaphore(value: 0)
                connection.connect { _ in done.signal() }
                done.wait()
                if round.isMultiple(of: 2) {
                    loop = nil   // the connection still holds it
                    _ = connection
                } else {
                    // The last reference goes on the loop thread, inside its own work.
                    let box = UncheckedSendable(loop!)
                    loop = nil
                    box.value.execute { _ = box }
                }
            }
            // Threads of dropped loops exit; give the detached ones a moment to finish.
            var after = threads()
            for _ in 0..<100 where after > before + 2 {
                usleep(10_000)
                after = threads()
            }
            if after > before + 2 {
                print("loop threads left running: \(after - before)")
                exit(3)
            }
        }
    }

    @Test("Connection.connect(completion:) completes although the caller keeps no reference")
    func connectWithoutKeepingTheConnection() async throws {
        let port = try ConnectionTests.sharedServer.get().port
        let result = OneShot<Result<Void, LockError>>()
        try Connection(port: port).connect { result.fulfil($0) }
        let value = try #require(await result.value(within: .seconds(10)), "the completion was dropped")
        #expect((try? value.get()) != nil, "\(value)")
    }

    @Test("after shutdown(), a call on the loop thread runs no work: a borrowed loop does not connect and uv_loop_close succeeds")
    func noWorkAfterShutdown() async throws {
        let port = try ConnectionTests.sharedServer.get().port
        let outcome = OneShot<(result: Result<Grant?, LockError>?, closeResult: Int32)>()
        let thread = Thread {
            let raw = UnsafeMutablePointer<uv_loop_t>.allocate(capacity: 1)
            defer { raw.deallocate() }
            precondition(uv_loop_init(raw) == 0)
            let loop = EventLoop(borrowing: raw)
            let connection = try! Connection(port: port, loop: loop)
            loop.shutdown()
            var result: Result<Grant?, LockError>?
            connection.acquire(key: "after-shutdown", timeoutS: 0) { result = $0 }
            uv_run(raw, UV_RUN_DEFAULT)
            outcome.fulfil((result, uv_loop_close(raw)))
        }
        thread.start()
        let value = try #require(await outcome.value(within: .seconds(10)))
        #expect(value.result == .failure(.eventLoopShutDown))
        #expect(value.closeResult == 0, "uv_loop_close: \(value.closeResult) (the call connected after shutdown)")
    }

    @Test("concurrent shutdown() calls are safe and all return after the loop is down")
    func concurrentShutdown() async {
        await #expect(processExitsWith: .success) {
            for _ in 0..<50 {
                let loop = EventLoop()
                let connection = try Connection(port: 1, loop: loop)
                connection.close()
                DispatchQueue.concurrentPerform(iterations: 4) { _ in loop.shutdown() }
                let shutDown = OneShotFlag()
                connection.connect { result in if case .failure(.eventLoopShutDown) = result { shutDown.set() } }
                if !shutDown.isSet { exit(4) }
            }
        }
    }

    @Test("a TLS connection in its handshake at shutdown reports eventLoopShutDown, not a TLS error")
    func shutdownMidHandshake() async throws {
        let peer = try SilentPeer()
        let loop = EventLoop()
        let connections = try (0..<8).map { _ in try Connection(port: peer.port, tls: TLSOptions(insecureSkipVerify: true), loop: loop) }
        let results = connections.map { _ in OneShot<Result<Void, LockError>>() }
        for (connection, result) in zip(connections, results) { connection.connect { result.fulfil($0) } }
        // The TCP connects complete against the listen backlog; the ClientHellos go out.
        for _ in 0..<5 { await LoopProbe.roundTrip(loop) }
        #expect(results.allSatisfy { $0.current == nil })
        loop.shutdown()
        for result in results {
            let value = await result.value(within: .seconds(5))
            #expect(value.map { $0.map { "ok" } } == .failure(.eventLoopShutDown))
        }
    }

    @Test("a loop-thread caller whose connect fails at once gets its completion after the call returns")
    func synchronousConnectFailureIsDeferred() async throws {
        let loop = EventLoop()
        defer { loop.shutdown() }
        let order = ThreadLock<[String]>([])
        let finished = OneShot<Void>()
        // A TLS file that vanished after validation: the transport cannot be made, inside the call.
        let missing = TLSOptions(caFile: "/nonexistent/ca.pem")
        let configurations = [
            Connection.Configuration(tls: missing, auth: nil, connectTimeoutMs: nil, socketTimeoutMs: nil),
            // A broadcast address: uv_tcp_connect refuses it inside the call.
            Connection.Configuration(tls: nil, auth: nil, connectTimeoutMs: nil, socketTimeoutMs: nil),
        ]
        let hosts = ["127.0.0.1", "255.255.255.255"]
        loop.execute {
            for (configuration, host) in zip(configurations, hosts) {
                let connection = Connection(endpoint: Endpoint(host: host, port: 9), configuration: configuration, loop: loop)
                connection.connect { result in
                    order.withLock { $0.append("completed \(host): \((try? result.get()) == nil ? "failed" : "ok")") }
                    if host == hosts.last { finished.fulfil(()) }
                }
                order.withLock { $0.append("returned \(host)") }
            }
        }
        _ = try #require(await finished.value(within: .seconds(10)))
        #expect(order.withLock { $0 } == ["returned 127.0.0.1", "returned 255.255.255.255",
                                           "completed 127.0.0.1: failed", "completed 255.255.255.255: failed"])
    }

    @Test("close() completes what was outstanding on a later turn, not inside the call")
    func closeCompletesLater() async throws {
        let port = try ConnectionTests.sharedServer.get().port
        let loop = EventLoop()
        defer { loop.shutdown() }
        let connection = try Connection(port: port, loop: loop)
        try await connection.connect()
        let order = ThreadLock<[String]>([])
        let finished = OneShot<Void>()
        loop.execute {
            connection.acquire(key: "close-later", timeoutS: 5) { result in
                order.withLock { $0.append(result == .failure(.closed) ? "completed: closed" : "completed: \(result)") }
                finished.fulfil(())
            }
            connection.close()
            order.withLock { $0.append("close returned") }
        }
        _ = try #require(await finished.value(within: .seconds(10)))
        #expect(order.withLock { $0 } == ["close returned", "completed: closed"])
    }
}

/// A flag set once, read from any thread.
final class OneShotFlag: Sendable {
    private let state = ThreadLock(false)
    func set() { state.withLock { $0 = true } }
    var isSet: Bool { state.withLock { $0 } }
}
