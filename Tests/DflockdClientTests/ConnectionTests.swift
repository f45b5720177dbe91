// Tests of `Connection`: against both real servers, dflockd 0.5.0 (Python) and 1.10.0 (Go),
// for everything both speak; against the Go one for what only it has (semaphores, stats, auth,
// its statuses); against scripted peers only where a misbehaving server is needed or for what
// neither speaks (2.x `ping`).
import CUV
import Foundation
import Testing
@testable import DflockdClient

#if canImport(Glibc)
import Glibc
#endif

// MARK: - Helpers shared by ConnectionTests and LoopTests

/// A value delivered once, from any thread, and awaited (optionally with a deadline).
final class OneShot<Value: Sendable>: Sendable {
    private struct State {
        var value: Value?
        var waiters: [CheckedContinuation<Value?, Never>] = []
    }
    private let state = ThreadLock(State())

    init() {}

    /// Delivers the value; later calls are ignored (and counted by the caller if it cares).
    @discardableResult
    func fulfil(_ value: Value) -> Bool {
        let waiters = state.withLock { s -> [CheckedContinuation<Value?, Never>]? in
            guard s.value == nil else { return nil }
            s.value = value
            defer { s.waiters = [] }
            return s.waiters
        }
        guard let waiters else { return false }
        for waiter in waiters { waiter.resume(returning: value) }
        return true
    }

    var current: Value? { state.withLock { $0.value } }

    /// The value, or nil if it has not come within `timeout`.
    func value(within timeout: Duration = .seconds(10)) async -> Value? {
        let result: Value? = await withCheckedContinuation { continuation in
            let ready = state.withLock { s -> Value? in
                if let value = s.value { return value }
                s.waiters.append(continuation)
                return nil
            }
            if let ready { continuation.resume(returning: ready); return }
            DispatchQueue.global().asyncAfter(deadline: .now() + timeout.seconds) { [self] in
                let waiters = state.withLock { s -> [CheckedContinuation<Value?, Never>] in
                    guard s.value == nil else { return [] }
                    defer { s.waiters = [] }
                    return s.waiters
                }
                for waiter in waiters { waiter.resume(returning: nil) }
            }
        }
        return result
    }
}

extension Duration {
    var seconds: Double {
        let (s, atto) = components
        return Double(s) + Double(atto) / 1e18
    }
}

enum LoopProbe {
    /// Returns after the loop has run everything submitted before, and one more turn (so the
    /// close callbacks of handles closed in that work have run too).
    static func roundTrip(_ loop: EventLoop) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            loop.execute { loop.execute { c.resume() } }
        }
    }

    /// How often `loop` has waited out its batching window, read on the loop thread.
    static func batchingWaits(_ loop: EventLoop) async -> Int {
        await withCheckedContinuation { (c: CheckedContinuation<Int, Never>) in
            loop.execute { c.resume(returning: ReadBatching.of(loop)?.waits ?? 0) }
        }
    }

    /// The libuv handles on `loop` (counted with `uv_walk` on the loop thread), by type name.
    static func handles(_ loop: EventLoop) async -> [String] {
        await withCheckedContinuation { (c: CheckedContinuation<[String], Never>) in
            loop.execute {
                var names: [String] = []
                withUnsafeMutablePointer(to: &names) { pointer in
                    uv_walk(loop.raw, { handle, context in
                        let names = context!.assumingMemoryBound(to: [String].self)
                        let type = uv_handle_get_type(handle)
                        names.pointee.append(uv_handle_type_name(type).map { String(cString: $0) } ?? "\(type)")
                    }, pointer)
                }
                c.resume(returning: names)
            }
        }
    }
}


/// Every connection acquires and releases a key of its own (`<keyPrefix>-<index>`), all at once.
func acquireAndReleaseAtOnce(_ connections: [Connection], keyPrefix: String) async throws {
    try await withThrowingTaskGroup(of: Void.self) { group in
        for (index, connection) in connections.enumerated() {
            group.addTask {
                let key = "\(keyPrefix)-\(index)"
                let grant = try #require(try await connection.acquire(key: key, timeoutS: 5))
                try await connection.release(key: key, token: grant.token)
            }
        }
        try await group.waitForAll()
    }
}

/// After the connections on `loop` have ended: only the loop's own wake-up handle is left
/// (close callbacks run at the end of the loop turn that closed a handle).
func expectOnlyWakeupHandle(_ loop: EventLoop, sourceLocation: SourceLocation = #_sourceLocation) async {
    await LoopProbe.roundTrip(loop)
    await LoopProbe.roundTrip(loop)
    let handles = await LoopProbe.handles(loop)
    #expect(handles == ["async"], "libuv handles left on the loop: \(handles)", sourceLocation: sourceLocation)
}

enum ProcessFDs {
    /// TCP sockets of this process whose remote end is 127.0.0.1:`port` (any state but the
    /// kernel's own TIME_WAIT leftovers, which belong to no descriptor).
    static func sockets(toPort port: Int) -> Int {
        let fm = FileManager.default
        var inodes = Set<Substring>()
        for fd in (try? fm.contentsOfDirectory(atPath: "/proc/self/fd")) ?? [] {
            // readlink(2): Foundation's destinationOfSymbolicLink gives nil for "socket:[…]"
            var buffer = [CChar](repeating: 0, count: 256)
            let n = readlink("/proc/self/fd/\(fd)", &buffer, buffer.count - 1)
            guard n > 0 else { continue }
            let target = String(decoding: buffer[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
            guard target.hasPrefix("socket:[") else { continue }
            inodes.insert(Substring(target.dropFirst("socket:[".count).dropLast()))
        }
        var count = 0
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            guard let text = TestSupport.readProcFile(table) else { continue }
            for line in text.split(separator: "\n").dropFirst() {
                let f = line.split(separator: " ")
                guard f.count > 9, let remotePort = f[2].split(separator: ":").last.flatMap({ Int($0, radix: 16) }),
                      remotePort == port, inodes.contains(f[9]) else { continue }
                count += 1
            }
        }
        return count
    }
}

/// A port on 127.0.0.1 where a connect is refused: a socket bound to it but not listening
/// keeps anybody else from taking it while the test runs.
final class RefusingPort: @unchecked Sendable {
    let fd: Int32
    let port: Int
    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw TestSupportError("socket: \(SupportSocket.errnoDescription())") }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = in_addr_t(0x7F00_0001).bigEndian
        address.sin_port = 0
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard rc == 0 else {
            SupportSocket.closeFD(fd)
            throw TestSupportError("bind: \(SupportSocket.errnoDescription())")
        }
        var bound = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &bound) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        self.fd = fd
        self.port = Int(UInt16(bigEndian: bound.sin_port))
    }
    deinit { SupportSocket.closeFD(fd) }
}

/// The error an async call throws, as a `LockError` (nil, and an issue, if it returned or
/// threw something else).
func lockError<T>(sourceLocation: SourceLocation = #_sourceLocation, _ body: () async throws -> T) async -> LockError? {
    do {
        let value = try await body()
        Issue.record("expected a LockError, got \(value)", sourceLocation: sourceLocation)
        return nil
    } catch let error as LockError {
        return error
    } catch {
        Issue.record("expected a LockError, got \(error)", sourceLocation: sourceLocation)
        return nil
    }
}

private func isToken(_ token: String) -> Bool {
    token.utf8.count == 32 && token.utf8.allSatisfy { (0x30...0x39).contains($0) || (0x61...0x66).contains($0) }
}

/// What another, independent client sees: true while somebody holds `key`.
private func heldElsewhere(_ key: String, port: Int) throws -> Bool {
    let raw = try RawClient(port: port)
    defer { raw.close() }
    let reply = try raw.send("l", key, "0")
    if reply == "timeout" { return true }
    let fields = reply.split(separator: " ")
    guard fields.count == 3, fields[0] == "ok" else { throw TestSupportError("unexpected reply \(reply)") }
    _ = try raw.send("r", key, String(fields[1]))
    return false
}

// MARK: - Tests

@Suite("ConnectionTests", .timeLimit(.minutes(2)))
struct ConnectionTests {
    /// One real server of each kind for the suite; tests use distinct keys. (Tests that kill a
    /// server start their own.)
    static let sharedPython: Result<RealServer, any Error> = Result { try RealServer.start(.python, [.maxLocks(8192)]) }
    static let sharedGo: Result<RealServer, any Error> = Result { try RealServer.start(.go, [.maxLocks(8192)]) }
    /// The Python one, under the name the loop tests (and earlier tests) use.
    static var sharedServer: Result<RealServer, any Error> { sharedPython }
    func server(_ kind: ServerKind) throws -> RealServer {
        try (kind == .python ? Self.sharedPython : Self.sharedGo).get()
    }

    // MARK: Against the real server

    @Test("acquire, renew and release, with the values each server gives", arguments: ServerKind.allCases)
    func acquireRenewRelease(on kind: ServerKind) async throws {
        let port = try server(kind).port
        let key = "conn-basic"
        let connection = try Connection(port: port)
        defer { connection.close() }

        let grant = try #require(try await connection.acquire(key: key, timeoutS: 5))
        #expect(grant.leaseS == 33, "the server's default lease")
        #expect(isToken(grant.token), "\(grant.token)")
        #expect(try heldElsewhere(key, port: port))

        // 0.5.0 answers a renew with the seconds remaining, rounded down; 1.10 with the lease.
        let roundedDown = kind == .python ? 1 : 0
        #expect(try await connection.renew(key: key, token: grant.token) == 33 - roundedDown)
        #expect(try await connection.renew(key: key, token: grant.token, leaseTtlS: 45) == 45 - roundedDown)
        #expect(try heldElsewhere(key, port: port))

        try await connection.release(key: key, token: grant.token)
        #expect(try !heldElsewhere(key, port: port))

        // Releasing again: the token no longer holds the key; the connection stays usable.
        #expect(await lockError { try await connection.release(key: key, token: grant.token) } == .notHeld(key: key))
        #expect(await lockError { try await connection.renew(key: key, token: grant.token) } == .notHeld(key: key))

        let second = try #require(try await connection.acquire(key: key, timeoutS: 5, leaseTtlS: 60))
        #expect(second.leaseS == 60)
        #expect(second.token != grant.token)
        #expect(await lockError { try await connection.release(key: key, token: "00000000000000000000000000000000") } == .notHeld(key: key))
        #expect(try heldElsewhere(key, port: port))
        try await connection.release(key: key, token: second.token)
        #expect(try !heldElsewhere(key, port: port))
    }

    @Test("a UTF-8 key is held and released", arguments: ServerKind.allCases)
    func utf8Key(on kind: ServerKind) async throws {
        let port = try server(kind).port
        let key = "conn-clé-锁"
        let connection = try Connection(port: port)
        defer { connection.close() }
        let grant = try #require(try await connection.acquire(key: key, timeoutS: 5))
        #expect(try heldElsewhere(key, port: port))
        try await connection.release(key: key, token: grant.token)
        #expect(try !heldElsewhere(key, port: port))
    }

    /// The validation's longest key must be one the server accepts: otherwise a key that passes
    /// validation gets `error` and the connection closed. (dflockd 0.5.0 counts the line's `\n`
    /// against its 256-byte limit, so it accepts keys of at most 255 bytes.)
    @Test("the longest key validation lets through is accepted by both servers", arguments: ServerKind.allCases)
    func longestKey(on kind: ServerKind) async throws {
        let port = try server(kind).port
        let key = String(repeating: "k", count: Validation.maximumLineBytes - 5) + "-long"
        #expect(key.utf8.count == Validation.maximumLineBytes)
        let connection = try Connection(port: port)
        defer { connection.close() }
        do {
            let grant = try #require(try await connection.acquire(key: key, timeoutS: 5))
            try await connection.release(key: key, token: grant.token)
        } catch {
            Issue.record("a \(key.utf8.count)-byte key passed validation but the server refused it: \(error)")
        }
    }

    @Test("try-lock (timeoutS 0) on a held key gives nil at once; a timeout gives nil after it", arguments: ServerKind.allCases)
    func tryLockAndTimeout(on kind: ServerKind) async throws {
        let port = try server(kind).port
        let key = "conn-trylock"
        let holder = try Connection(port: port)
        let other = try Connection(port: port)
        defer { holder.close(); other.close() }
        let grant = try #require(try await holder.acquire(key: key, timeoutS: 5))

        var start = ContinuousClock.now
        #expect(try await other.acquire(key: key, timeoutS: 0) == nil)
        #expect(ContinuousClock.now - start < .seconds(1))

        start = ContinuousClock.now
        #expect(try await other.acquire(key: key, timeoutS: 1) == nil)
        #expect(ContinuousClock.now - start >= .milliseconds(900))

        // the timed-out attempts left no waiter behind: after the release the key is free
        try await holder.release(key: key, token: grant.token)
        let mine = try #require(try await other.acquire(key: key, timeoutS: 0))
        try await other.release(key: key, token: mine.token)
    }

    @Test("two-phase: enqueue fast path, queued, wait timeout, wait granted on release", arguments: ServerKind.allCases)
    func twoPhase(on kind: ServerKind) async throws {
        let port = try server(kind).port
        let key = "conn-two"
        let a = try Connection(port: port)
        let b = try Connection(port: port)
        defer { a.close(); b.close() }

        guard case .acquired(let first) = try await a.enqueue(key: key) else {
            Issue.record("enqueue on a free key did not take the fast path"); return
        }
        #expect(first.leaseS == 33)
        #expect(isToken(first.token))
        #expect(try await b.enqueue(key: key) == .queued)
        // 0.5.0 answers a second enqueue with plain `error`, 1.10 with error_already_enqueued: both
        // mapped, and not fatal
        #expect(await lockError { try await b.enqueue(key: key) } == .alreadyEnqueued(key: key))
        #expect(try await b.wait(key: key, timeoutS: 1) == nil, "the holder keeps it: the wait times out")
        // the timeout removed the waiter: enqueue again, with a lease of its own
        #expect(try await b.enqueue(key: key, leaseTtlS: 20) == .queued)

        async let waited = b.wait(key: key, timeoutS: 10)
        try await a.release(key: key, token: first.token)
        let second = try #require(try await waited)
        #expect(second.leaseS == 20, "the lease given to enqueue")
        #expect(second.token != first.token)
        #expect(try heldElsewhere(key, port: port))
        try await b.release(key: key, token: second.token)
        #expect(try !heldElsewhere(key, port: port))
    }

    @Test("wait without enqueue: notEnqueued, and the connection stays usable", arguments: ServerKind.allCases)
    func waitWithoutEnqueue(on kind: ServerKind) async throws {
        let connection = try Connection(port: try server(kind).port)
        defer { connection.close() }
        #expect(await lockError { try await connection.wait(key: "conn-never-enqueued", timeoutS: 1) } == .notEnqueued(key: "conn-never-enqueued"))
        let grant = try #require(try await connection.acquire(key: "conn-never-enqueued", timeoutS: 1))
        try await connection.release(key: "conn-never-enqueued", token: grant.token)
    }

    @Test("FIFO: waiters get the key in the order they queued", arguments: ServerKind.allCases)
    func fifoHandOver(on kind: ServerKind) async throws {
        let port = try server(kind).port
        let key = "conn-fifo"
        let a = try Connection(port: port)
        let b = try Connection(port: port)
        let c = try Connection(port: port)
        defer { a.close(); b.close(); c.close() }

        let held = try #require(try await a.acquire(key: key, timeoutS: 5))
        // `queued` is the server's word that the waiter is in line: B is first, C second.
        #expect(try await b.enqueue(key: key) == .queued)
        #expect(try await c.enqueue(key: key) == .queued)
        let cGot = OneShot<Result<Grant?, LockError>>()
        c.wait(key: key, timeoutS: 20) { cGot.fulfil($0) }
        async let bGot = b.wait(key: key, timeoutS: 20)

        try await a.release(key: key, token: held.token)
        let bGrant = try #require(try await bGot)
        #expect(cGot.current == nil, "C was granted while B holds the key")
        try await b.release(key: key, token: bGrant.token)
        let cResult = try #require(await cGot.value())
        let cGrant = try #require(try cResult.get())
        #expect(cGrant.token != bGrant.token)
        try await c.release(key: key, token: cGrant.token)
        #expect(try !heldElsewhere(key, port: port))
    }

    @Test("FIFO with blocking acquires: the released key goes to the waiter queued first", arguments: ServerKind.allCases)
    func fifoBlockingAcquire(on kind: ServerKind) async throws {
        let port = try server(kind).port
        let key = "conn-fifo-l"
        let a = try Connection(port: port)
        let b = try Connection(port: port)
        let c = try Connection(port: port)
        defer { a.close(); b.close(); c.close() }

        let held = try #require(try await a.acquire(key: key, timeoutS: 5))
        #expect(try await b.enqueue(key: key) == .queued)      // B is in line before C's acquire is sent
        let cGot = OneShot<Result<Grant?, LockError>>()
        c.acquire(key: key, timeoutS: 20) { cGot.fulfil($0) }
        async let bGot = b.wait(key: key, timeoutS: 20)
        try await a.release(key: key, token: held.token)
        let bGrant = try #require(try await bGot)
        #expect(cGot.current == nil)
        try await b.release(key: key, token: bGrant.token)
        let cResult = try #require(await cGot.value())
        let cGrant = try #require(try cResult.get())
        try await c.release(key: key, token: cGrant.token)
    }

    @Test("pipelining: requests issued in one loop turn each get their own reply, in order", arguments: ServerKind.allCases)
    func pipelinedCompletions(on kind: ServerKind) async throws {
        let port = try server(kind).port
        let connection = try Connection(port: port)
        defer { connection.close() }
        let k1 = "conn-pipe-1", k2 = "conn-pipe-2", k3 = "conn-pipe-3", k4 = "conn-pipe-4"
        let t1 = try #require(try await connection.acquire(key: k1, timeoutS: 5)).token

        enum Outcome: Sendable, Equatable {
            case grant(Grant?), done, seconds(Int), enqueued(EnqueueOutcome), failed(LockError)
        }
        let count = 8
        let results = ThreadLock<[(Int, Outcome, Bool)]>([])
        let all = OneShot<Void>()
        let loop = connection.loop
        loop.execute {
            func record(_ index: Int) -> (Outcome) -> Void {
                { outcome in
                    let n = results.withLock { $0.append((index, outcome, loop.inEventLoop)); return $0.count }
                    if n == count { all.fulfil(()) }
                }
            }
            func map<T>(_ index: Int, _ f: @escaping (T) -> Outcome) -> (Result<T, LockError>) -> Void {
                let r = record(index)
                return { result in
                    switch result {
                    case .success(let v): r(f(v))
                    case .failure(let e): r(.failed(e))
                    }
                }
            }
            // all eight are written before the first reply can be read
            connection.acquire(key: k2, timeoutS: 0, completion: map(0) { .grant($0) })
            connection.release(key: k1, token: t1, completion: map(1) { _ in .done })
            connection.renew(key: k1, token: t1, completion: map(2) { .seconds($0) })           // released: not held
            connection.acquire(key: k1, timeoutS: 0, leaseTtlS: 7, completion: map(3) { .grant($0) })
            connection.enqueue(key: k3, completion: map(4) { .enqueued($0) })
            connection.release(key: k1, token: "0123456789abcdef0123456789abcdef", completion: map(5) { _ in .done })
            connection.acquire(key: k4, timeoutS: 0, leaseTtlS: 9, completion: map(6) { .grant($0) })
            connection.renew(key: k1, token: t1, leaseTtlS: 5, completion: map(7) { .seconds($0) })
        }
        #expect(await all.value() != nil, "not every completion was called")
        let outcomes = results.withLock { $0 }
        #expect(outcomes.map(\.0) == Array(0..<count), "completions out of request order")
        #expect(outcomes.allSatisfy { $0.2 }, "a completion ran off the loop thread")
        let byIndex = Dictionary(uniqueKeysWithValues: outcomes.map { ($0.0, $0.1) })

        guard case .grant(let g2?)? = byIndex[0] else { Issue.record("k2: \(String(describing: byIndex[0]))"); return }
        #expect(g2.leaseS == 33)
        #expect(byIndex[1] == .done)
        #expect(byIndex[2] == .failed(.notHeld(key: k1)))
        guard case .grant(let g1?)? = byIndex[3] else { Issue.record("k1 again: \(String(describing: byIndex[3]))"); return }
        #expect(g1.leaseS == 7)
        guard case .enqueued(.acquired(let g3))? = byIndex[4] else { Issue.record("k3: \(String(describing: byIndex[4]))"); return }
        #expect(g3.leaseS == 33)
        #expect(byIndex[5] == .failed(.notHeld(key: k1)))
        guard case .grant(let g4?)? = byIndex[6] else { Issue.record("k4: \(String(describing: byIndex[6]))"); return }
        #expect(g4.leaseS == 9)
        #expect(byIndex[7] == .failed(.notHeld(key: k1)))
        #expect(Set([g1.token, g2.token, g3.token, g4.token]).count == 4)

        // each token belongs to its own key: the releases succeed only if no reply was misrouted
        try await connection.release(key: k1, token: g1.token)
        try await connection.release(key: k2, token: g2.token)
        try await connection.release(key: k3, token: g3.token)
        try await connection.release(key: k4, token: g4.token)
    }

    @Test("pipelining: concurrent async calls on one connection each get their own reply", arguments: ServerKind.allCases)
    func pipelinedAsync(on kind: ServerKind) async throws {
        let port = try server(kind).port
        let connection = try Connection(port: port)
        defer { connection.close() }
        let n = 40
        let grants = try await withThrowingTaskGroup(of: (Int, Grant?).self) { group in
            for i in 0..<n {
                group.addTask { (i, try await connection.acquire(key: "conn-par-\(i)", timeoutS: 0, leaseTtlS: 100 + i)) }
            }
            return try await group.reduce(into: [Int: Grant]()) { $0[$1.0] = $1.1 }
        }
        #expect(grants.count == n)
        for i in 0..<n {
            #expect(grants[i]?.leaseS == 100 + i, "key \(i) got another request's reply")
        }
        #expect(Set(grants.values.map(\.token)).count == n)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for (i, grant) in grants {
                group.addTask { try await connection.release(key: "conn-par-\(i)", token: grant.token) }
            }
            try await group.waitForAll()
        }
    }

    @Test("the server dying mid-request fails the pending call and every later one with connectionClosed",
          arguments: ServerKind.allCases)
    func serverKilledMidRequest(on kind: ServerKind) async throws {
        let loop = EventLoop()
        defer { loop.shutdown() }
        let server = try RealServer.start(kind)
        let key = "conn-killed"
        let holder = try Connection(port: server.port, loop: loop)
        let waiter = try Connection(port: server.port, loop: loop)
        defer { holder.close(); waiter.close() }
        let grant = try #require(try await holder.acquire(key: key, timeoutS: 5))
        try await waiter.connect()

        let pending = OneShot<Result<Grant?, LockError>>()
        waiter.acquire(key: key, timeoutS: 30) { pending.fulfil($0) }
        await LoopProbe.roundTrip(waiter.loop)   // the request is on the wire
        #expect(pending.current == nil)
        server.kill()

        let result = try #require(await pending.value(), "the pending acquire never completed")
        guard case .failure(.connectionClosed) = result else {
            Issue.record("expected connectionClosed, got \(result)"); return
        }
        let later = await lockError { try await waiter.acquire(key: "other", timeoutS: 0) }
        guard case .connectionClosed? = later else { Issue.record("later request: \(String(describing: later))"); return }
        // the idle holder noticed too
        let holderError = await lockError { try await holder.release(key: key, token: grant.token) }
        guard case .connectionClosed? = holderError else { Issue.record("holder: \(String(describing: holderError))"); return }
        await expectOnlyWakeupHandle(loop)
    }

    @Test("close() fails pending calls with .closed, later calls too, and the server drops the session", arguments: ServerKind.allCases)
    func closeWhilePending(on kind: ServerKind) async throws {
        let port = try server(kind).port
        let key = "conn-close"
        let holder = try Connection(port: port)
        let waiter = try Connection(port: port)
        defer { holder.close() }
        let held = try #require(try await holder.acquire(key: key, timeoutS: 5))
        let pending = OneShot<Result<Grant?, LockError>>()
        waiter.acquire(key: key, timeoutS: 30) { pending.fulfil($0) }
        await LoopProbe.roundTrip(waiter.loop)
        waiter.close()
        let result = try #require(await pending.value())
        #expect(result == .failure(.closed))
        #expect(await lockError { try await waiter.acquire(key: "conn-close-2", timeoutS: 0) } == .closed)
        waiter.close()  // idempotent

        // the closed waiter never gets the key: after the release another client gets it quickly
        try await holder.release(key: key, token: held.token)
        let raw = try RawClient(port: port)
        defer { raw.close() }
        #expect(try raw.send("l", key, "5").hasPrefix("ok "))
    }

    /// Cancelling the task that awaits a wait closes the connection: the call throws
    /// `.cancelled` at once (not after its 30 s), and the server drops the waiter. Proof of the
    /// latter: after the holder releases, another client gets the key within seconds; had the
    /// cancelled session stayed open, it would have been granted the key for its 33 s lease.
    /// (0.5.0 serves a session's requests one at a time, so it notices the close only after
    /// the wait ends, which the release causes; a try-lock right after the release can race
    /// with that clean-up, hence the short acquire timeout rather than 0.)
    @Test("a cancelled async wait throws .cancelled and the server drops the waiter", arguments: ServerKind.allCases)
    func cancelledWait(on kind: ServerKind) async throws {
        let port = try server(kind).port
        let key = "conn-cancel"
        let holder = try Connection(port: port)
        let waiter = try Connection(port: port)
        let third = try Connection(port: port)
        defer { holder.close(); waiter.close(); third.close() }
        let held = try #require(try await holder.acquire(key: key, timeoutS: 5))
        #expect(try await waiter.enqueue(key: key) == .queued)

        let task = Task { try await waiter.wait(key: key, timeoutS: 30) }
        await LoopProbe.roundTrip(waiter.loop)
        let start = ContinuousClock.now
        task.cancel()
        let error = await lockError { try await task.value }
        #expect(error == .cancelled)
        #expect(ContinuousClock.now - start < .seconds(5))
        #expect(await lockError { try await waiter.acquire(key: "conn-cancel-2", timeoutS: 0) } == .cancelled)

        try await holder.release(key: key, token: held.token)
        let start2 = ContinuousClock.now
        let grant = try await third.acquire(key: key, timeoutS: 10)
        #expect(grant != nil, "the cancelled waiter still held its place")
        #expect(ContinuousClock.now - start2 < .seconds(5))
        if let grant { try await third.release(key: key, token: grant.token) }
    }

    /// The same on the wire, with a scripted peer: the wait is sent, and cancelling closes the
    /// connection. The peer answers B's request only once it has read A's `w`, so the test
    /// knows the wait is in flight before it cancels.
    @Test("cancelling a wait that is on the wire closes the connection")
    func cancelledWaitOnTheWire() async throws {
        let loop = EventLoop()
        defer { loop.shutdown() }
        let peer = try ScriptedPeer(script: """
            A > b'e\\nwire-cancel\\n\\n'
            A < queued
            B > b'l\\nsignal\\n5\\n'
            A > b'w\\nwire-cancel\\n30\\n'
            B < timeout
            A ! the cancelled task's connection is closed
            """)
        let a = try Connection(port: peer.port, loop: loop)
        let b = try Connection(port: peer.port, loop: loop)
        defer { a.close(); b.close() }
        #expect(try await a.enqueue(key: "wire-cancel") == .queued)
        let signal = OneShot<Result<Grant?, LockError>>()
        b.acquire(key: "signal", timeoutS: 5) { signal.fulfil($0) }
        let task = Task { try await a.wait(key: "wire-cancel", timeoutS: 30) }
        let signalled = try #require(await signal.value())
        #expect(signalled == .success(nil))   // the peer has read A's wait
        task.cancel()
        #expect(await lockError { try await task.value } == .cancelled)
        try await peer.finish()
        b.close()
        await expectOnlyWakeupHandle(loop)
    }

    @Test("an async call on a task already cancelled fails with .cancelled", arguments: ServerKind.allCases)
    func alreadyCancelled(on kind: ServerKind) async throws {
        let connection = try Connection(port: try server(kind).port)
        defer { connection.close() }
        let task = Task {
            withUnsafeCurrentTask { $0?.cancel() }
            return try await connection.acquire(key: "conn-precancelled", timeoutS: 0)
        }
        #expect(await lockError { try await task.value } == .cancelled)
    }

    @Test("connection refused: connectFailed for every pending and later call")
    func connectRefused() async throws {
        let loop = EventLoop()
        defer { loop.shutdown() }
        let refusing = try RefusingPort()
        let connection = try Connection(port: refusing.port, loop: loop)
        let first = OneShot<Result<Grant?, LockError>>()
        let second = OneShot<Result<Void, LockError>>()
        connection.loop.execute {
            connection.acquire(key: "k", timeoutS: 0) { first.fulfil($0) }
            connection.release(key: "k", token: "0123456789abcdef0123456789abcdef") { second.fulfil($0) }
        }
        let firstResult = try #require(await first.value())
        let secondResult = try #require(await second.value())
        let results: [Result<Void, LockError>] = [firstResult.map { _ in () }, secondResult]
        for result in results {
            guard case .failure(.connectFailed(let host, let port, let reason)) = result else {
                Issue.record("expected connectFailed, got \(result)"); continue
            }
            #expect(host == "127.0.0.1")
            #expect(port == refusing.port)
            #expect(reason.contains("ECONNREFUSED"), "\(reason)")
        }
        let later = await lockError { try await connection.connect() }
        guard case .connectFailed? = later else { Issue.record("later: \(String(describing: later))"); return }
        await expectOnlyWakeupHandle(loop)
    }

    /// connect(2) to a broadcast address fails at once (ENETUNREACH), inside `uv_tcp_connect`,
    /// before the request that started the connection was queued: that request must still fail.
    @Test("a connect that fails immediately fails the request that started it")
    func connectFailsSynchronously() async throws {
        let connection = try Connection(host: "255.255.255.255", port: 6388)
        let result = OneShot<Result<Grant?, LockError>>()
        connection.acquire(key: "k", timeoutS: 0) { result.fulfil($0) }
        let value = await result.value(within: .seconds(3))
        guard let value else {
            Issue.record("the acquire never completed (connect failed inside uv_tcp_connect)"); return
        }
        guard case .failure(.connectFailed(host: "255.255.255.255", port: 6388, _)) = value else {
            Issue.record("expected connectFailed, got \(value)"); return
        }
        // connect() on a fresh connection to the same address reports it too
        let other = try Connection(host: "255.255.255.255", port: 6388)
        let error = await lockError { try await other.connect() }
        guard case .connectFailed? = error else { Issue.record("\(String(describing: error))"); return }
    }

    @Test("host names are resolved; an unknown one gives resolveFailed", arguments: ServerKind.allCases)
    func resolution(on kind: ServerKind) async throws {
        let port = try server(kind).port
        let connection = try Connection(host: "localhost", port: port)
        defer { connection.close() }
        let grant = try #require(try await connection.acquire(key: "conn-localhost", timeoutS: 5))
        try await connection.release(key: "conn-localhost", token: grant.token)

        let unknown = try Connection(host: "no-such-host.invalid", port: port)
        let error = await lockError { try await unknown.acquire(key: "k", timeoutS: 0) }
        guard case .resolveFailed(host: "no-such-host.invalid", _)? = error else {
            Issue.record("expected resolveFailed, got \(String(describing: error))"); return
        }
    }

    /// A listener with a backlog of 0 whose one slot is taken: the kernel drops further SYNs,
    /// so a connect hangs until its timeout.
    @Test("connect timeout against a listener that never completes the handshake")
    func connectTimeout() async throws {
        let loop = EventLoop()
        defer { loop.shutdown() }
        let (listener, port) = try SupportSocket.listenLoopback(backlog: 0)
        defer { SupportSocket.closeFD(listener) }
        let filler = try SupportSocket.connectLoopback(port: port)
        defer { SupportSocket.closeFD(filler) }

        let connection = try Connection(port: port, connectTimeoutMs: 300, loop: loop)
        let start = ContinuousClock.now
        let error = await lockError { try await connection.acquire(key: "k", timeoutS: 0) }
        let elapsed = ContinuousClock.now - start
        #expect(error == .connectTimeout(host: "127.0.0.1", port: port, milliseconds: 300))
        #expect(elapsed >= .milliseconds(250) && elapsed < .seconds(10), "\(elapsed)")
        await expectOnlyWakeupHandle(loop)
    }

    /// Scripted: the peer fails the test on any byte but the one valid request it expects.
    @Test("invalid arguments fail at once, never reach the wire, and leave the connection usable")
    func invalidArgumentsStayLocal() async throws {
        let token = "0123456789abcdef0123456789abcdef"
        let peer = try ScriptedPeer(script: """
            A > b'l\\nlocal-ok\\n5\\n'
            A < ok \(token) 33
            A > b'r\\nlocal-ok\\n\(token)\\n'
            A < ok
            """)
        let connection = try Connection(port: peer.port)
        defer { connection.close() }
        func name(_ error: LockError?) -> String? {
            if case .invalidArgument(let name, _)? = error { return name }
            return nil
        }
        // before the connection is open…
        #expect(name(await lockError { try await connection.acquire(key: "bad key", timeoutS: 5) }) == "key")
        #expect(name(await lockError { try await connection.acquire(key: "k\nl", timeoutS: 5) }) == "key")
        #expect(name(await lockError { try await connection.acquire(key: "k", timeoutS: -1) }) == "timeoutS")
        #expect(name(await lockError { try await connection.enqueue(key: "k", leaseTtlS: 0) }) == "leaseTtlS")
        let grant = try #require(try await connection.acquire(key: "local-ok", timeoutS: 5))
        #expect(grant == Grant(token: token, leaseS: 33))
        // …and while it is
        #expect(name(await lockError { try await connection.release(key: "local-ok", token: "\(token)\nr") }) == "token")
        #expect(name(await lockError { try await connection.acquireSemaphore(key: "k", limit: 0, timeoutS: 1) }) == "limit")
        #expect(name(await lockError { try await connection.wait(key: "", timeoutS: 1) }) == "key")
        try await connection.release(key: "local-ok", token: token)
        try await peer.finish()
    }

    @Test("completions run on the loop thread, after the call returned, even for invalid arguments", arguments: ServerKind.allCases)
    func completionAfterReturn(on kind: ServerKind) async throws {
        let connection = try Connection(port: try server(kind).port)
        defer { connection.close() }
        let loop = connection.loop
        let outcome = OneShot<(returned: Bool, onLoop: Bool, result: Result<Grant?, LockError>)>()
        loop.execute {
            let returned = ThreadLock(false)
            connection.acquire(key: "bad key", timeoutS: 1) { result in
                outcome.fulfil((returned.withLock { $0 }, loop.inEventLoop, result))
            }
            returned.withLock { $0 = true }
        }
        let value = try #require(await outcome.value())
        #expect(value.returned, "the completion ran inside the call")
        #expect(value.onLoop)
        guard case .failure(.invalidArgument(name: "key", _)) = value.result else {
            Issue.record("\(value.result)"); return
        }
    }

    @Test("Connection's own options are validated")
    func initValidation() {
        func name(_ body: () throws -> Connection) -> String? {
            do { _ = try body(); return nil } catch let error as LockError {
                if case .invalidArgument(let name, _) = error { return name }
                return "\(error)"
            } catch { return "\(error)" }
        }
        #expect(name { try Connection(port: 0) } == "port")
        #expect(name { try Connection(port: 65536) } == "port")
        #expect(name { try Connection(port: -1) } == "port")
        #expect(name { try Connection(host: "", port: 6388) } == "host")
        #expect(name { try Connection(host: "local host", port: 6388) } == "host")
        #expect(name { try Connection(host: "localhost\n", port: 6388) } == "host")
        #expect(name { try Connection(port: 6388, connectTimeoutMs: -1) } == "connectTimeoutMs")
        #expect(name { try Connection(port: 6388, socketTimeoutMs: -1) } == "socketTimeoutMs")
        #expect(name { try Connection(port: 6388, auth: "") } == "auth")
        #expect(name { try Connection(port: 6388, connectTimeoutMs: 0) } == "connectTimeoutMs")
        #expect(name { try Connection(port: 6388, socketTimeoutMs: 0) } == "socketTimeoutMs")
        #expect(name { try Connection(host: "::1", port: 65535, auth: "s3 cret", connectTimeoutMs: 1, socketTimeoutMs: 10) } == nil)
    }

    @Test("a connection dropped by its owner closes its socket, so the server releases its lock", arguments: ServerKind.allCases)
    func droppedConnectionCloses(on kind: ServerKind) async throws {
        let port = try server(kind).port
        let key = "conn-dropped"
        func holdAndDrop() async throws {
            let connection = try Connection(port: port)
            _ = try #require(try await connection.acquire(key: key, timeoutS: 5))
        }
        try await holdAndDrop()
        let raw = try RawClient(port: port)
        defer { raw.close() }
        #expect(try raw.send("l", key, "5").hasPrefix("ok "), "the dropped connection still holds the lock")
    }

    @Test("a connection dropped with a call outstanding still completes the call", arguments: ServerKind.allCases)
    func droppedWhileBusy(on kind: ServerKind) async throws {
        let port = try server(kind).port
        let result = OneShot<Result<Grant?, LockError>>()
        do {
            let connection = try Connection(port: port)
            connection.acquire(key: "conn-dropped-busy", timeoutS: 0) { result.fulfil($0) }
        }
        let value = try #require(await result.value())
        guard case .success(let grant?) = value else { Issue.record("\(value)"); return }
        #expect(grant.leaseS == 33)
    }

    // MARK: Timeouts

    /// Scripted: a peer that reads the request and never answers, on a connection that stays up.
    @Test("socketTimeoutMs: a peer that never answers fails the call with socketTimeout and is hung up on")
    func socketTimeout() async throws {
        let loop = EventLoop()
        defer { loop.shutdown() }
        let token = "0123456789abcdef0123456789abcdef"
        // The script ends by waiting for the client to close: no mismatch when nothing more comes.
        let peer = try ScriptedPeer(script: """
            A > b'r\\nsilent\\n\(token)\\n'
            A ! the client gives up after socketTimeoutMs and closes
            """)
        let connection = try Connection(port: peer.port, socketTimeoutMs: 300, loop: loop)
        defer { connection.close() }
        try await connection.connect()
        let start = ContinuousClock.now
        let error = await lockError { try await connection.release(key: "silent", token: token) }
        let elapsed = ContinuousClock.now - start
        #expect(error == .socketTimeout(milliseconds: 300))
        #expect(elapsed >= .milliseconds(250) && elapsed < .seconds(10), "\(elapsed)")
        try await peer.finish()
        #expect(await lockError { try await connection.release(key: "silent", token: token) } == .socketTimeout(milliseconds: 300))
        await expectOnlyWakeupHandle(loop)
    }

    @Test("socketTimeoutMs allows a blocking acquire its own timeout, and does not fire while idle", arguments: ServerKind.allCases)
    func socketTimeoutAllowsBlocking(on kind: ServerKind) async throws {
        let port = try server(kind).port
        let key = "conn-sockto"
        let holder = try Connection(port: port)
        let other = try Connection(port: port, socketTimeoutMs: 600)
        defer { holder.close(); other.close() }
        let held = try #require(try await holder.acquire(key: key, timeoutS: 5))
        let start = ContinuousClock.now
        #expect(try await other.acquire(key: key, timeoutS: 1) == nil, "the server's timeout, not the socket timeout")
        #expect(ContinuousClock.now - start >= .milliseconds(900))
        // idle for longer than socketTimeoutMs with nothing outstanding: still open
        try await Task.sleep(for: .milliseconds(900))
        try await holder.release(key: key, token: held.token)
        let grant = try #require(try await other.acquire(key: key, timeoutS: 5))
        try await other.release(key: key, token: grant.token)
    }

    /// `socketTimeoutMs` accepts any positive value, and a blocking request adds its own
    /// timeout to it: the sum must not overflow (a trap would take down the whole process).
    /// Run in a child process, which must exit normally.
    @Test("a huge socketTimeoutMs or acquire timeout does not crash the process",
          arguments: [0, 1])
    func socketTimeoutOverflow(variant: Int) async {
        await #expect(processExitsWith: .success) { [variant] in
            let (listener, port) = try SupportSocket.listenLoopback()
            defer { SupportSocket.closeFD(listener) }
            // variant 0: "no limit" spelled Int.max; variant 1: an absurd acquire timeout
            let connection = try Connection(port: port, socketTimeoutMs: variant == 0 ? Int.max : 1000)
            try await connection.connect()   // the kernel completes the handshake; nobody answers
            connection.acquire(key: "k", timeoutS: variant == 0 ? 1 : Int.max / 1000 + 1) { _ in }
            await LoopProbe.roundTrip(connection.loop)
            connection.close()
            await LoopProbe.roundTrip(connection.loop)
        }
    }

    // MARK: Against scripted peers

    /// A recorded section, cut before the first request this client cannot produce.
    struct Replay: Sendable, CustomTestStringConvertible {
        let file: String
        let title: String
        let script: String
        let exchanges: Int
        var testDescription: String { "\(file) § \(title) (\(exchanges) requests)" }

        static let all: [Replay] = ["go-1.10-core.txt", "go-1.10-caps.txt", "py-0.5.0-core.txt"].flatMap { file -> [Replay] in
            var replays: [Replay] = []
            var title: String?
            var lines: [String] = []
            var cut = false
            func flush() {
                if let title, lines.contains(where: { $0.dropFirst(2).hasPrefix("<") }) {
                    replays.append(Replay(file: file, title: title, script: lines.joined(separator: "\n"),
                                          exchanges: lines.filter { $0.dropFirst(2).hasPrefix(">") }.count))
                }
                lines = []
                cut = false
            }
            let text = String(decoding: Transcripts.data(file), as: UTF8.self)
            for line in text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init) {
                if line.hasPrefix("## ") { flush(); title = String(line.dropFirst(3)); continue }
                guard title != nil, !cut, !line.isEmpty, !line.hasPrefix("#") else { continue }
                let parts = line.split(separator: " ", maxSplits: 2).map(String.init)
                if parts.count == 3, parts[1] == ">" {
                    let bytes = Transcripts.pythonBytesLiteral(Array(parts[2].utf8))
                    if TranscriptRequest.build(bytes) == nil { cut = true; continue }
                }
                lines.append(line)
            }
            flush()
            return replays
        }
    }

    /// Every recorded exchange the client can produce, replayed through `Connection` against a
    /// scripted peer: one connection per client letter, every request issued at once
    /// (pipelined), each completion checked against what its recorded reply means. A check of
    /// the decoder against every reply the servers were recorded sending, byte for byte
    /// (tokens, fractional stats); the servers' behaviour itself is tested live above.
    @Test("recorded exchanges replay through pipelined connections", arguments: Replay.all)
    func replay(_ replay: Replay) async throws {
        let peer = try ScriptedPeer(script: replay.script)
        let steps = try ScriptStep.steps(inScript: replay.script)
        var letters: [String] = []
        var requests: [(letter: String, request: Request, reply: [UInt8]?)] = []
        var waiting: [String: [Int]] = [:]
        for step in steps {
            if !letters.contains(step.client) { letters.append(step.client) }
            switch step.action {
            case .expect(let bytes):
                let request = try #require(TranscriptRequest.build(bytes))
                waiting[step.client, default: []].append(requests.count)
                requests.append((step.client, request, nil))
            case .reply(let bytes):
                let index = try #require(waiting[step.client]?.first, "reply before request at \(step)")
                waiting[step.client]!.removeFirst()
                requests[index].reply = Array(bytes.dropLast())   // without "\n"
            default:
                break
            }
        }
        // letters are bound to connections in the order the peer accepts them
        var connections: [String: Connection] = [:]
        for letter in letters {
            let connection = try Connection(port: peer.port)
            try await connection.connect()
            connections[letter] = connection
        }
        defer { connections.values.forEach { $0.close() } }

        let answered = requests.filter { $0.reply != nil }.count
        let results = ThreadLock<[Int: Result<Reply, LockError>]>([:])
        let done = OneShot<Void>()
        let loop = connections[letters[0]]!.loop
        let work = UncheckedSendable((requests, connections))
        loop.execute {
            let (requests, connections) = work.value
            for (index, item) in requests.enumerated() where item.reply != nil {
                connections[item.letter]!.send(item.request) { result in
                    if results.withLock({ $0[index] = result; return $0.count }) == answered { done.fulfil(()) }
                }
            }
        }
        #expect(await done.value() != nil, "not every request was answered")
        let actual = results.withLock { $0 }
        for (index, item) in requests.enumerated() {
            guard let reply = item.reply else { continue }
            let expected = TranscriptRequest.meaning(of: String(decoding: reply, as: UTF8.self), for: item.request)
            #expect(actual[index] == expected, "\(item.letter) \(item.request.command.rawValue) \(item.request.key): \(String(decoding: reply, as: UTF8.self).prefix(60))")
        }
        try await peer.finish()
    }

    // Semaphores and stats through Connection against the real Go server: SemaphoreTests and
    // StatsTests.

    /// 1.10 has no `ping` (1.14+): it answers `error` and, as after any refused request, keeps
    /// the connection open. A user who pings to probe the server must not lose the locks that
    /// connection holds.
    @Test("ping on the real 1.10 server: serverError, and the connection and its locks survive")
    func pingOnOldServer() async throws {
        let server = try RealServer.start(.go)
        let connection = try Connection(port: server.port)
        defer { connection.close() }
        let held = try #require(try await connection.acquire(key: "ping-held", timeoutS: 5))
        #expect(await lockError { try await connection.ping() } == .serverError(command: "ping", key: "_"))
        // 1.10 keeps the connection after refusing ping: the lock it holds must survive.
        #expect(try heldElsewhere("ping-held", port: server.port), "the server kept the connection and its lock")
        let renewed = try await connection.renew(key: "ping-held", token: held.token)
        #expect(renewed > 0, "the connection is still usable after the server refused ping")
        try await connection.release(key: "ping-held", token: held.token)
    }

    /// Replayed: only 2.x servers answer `ping`, and neither server here is 2.x.
    @Test("ping on a 2.x server")
    func ping() async throws {
        let peer = try ScriptedPeer(script: """
            A > b'ping\\n_\\n\\n'
            A < ok
            A > b'ping\\n_\\n\\n'
            A < ok
            """)
        let connection = try Connection(port: peer.port)
        defer { connection.close() }
        try await connection.ping()
        try await connection.ping()
        try await peer.finish()
    }

    @Test("auth on the real Go server: no secret and a wrong one give authFailed, the right one works")
    func auth() async throws {
        let loop = EventLoop()
        defer { loop.shutdown() }
        let server = try RealServer.start(.go, [.authToken("s3cret")])
        let noSecret = try Connection(port: server.port, loop: loop)
        defer { noSecret.close() }
        #expect(await lockError { try await noSecret.acquire(key: "k", timeoutS: 5) } == .authFailed)

        let wrong = try Connection(port: server.port, auth: "wrong", loop: loop)
        defer { wrong.close() }
        #expect(await lockError { try await wrong.connect() } == .authFailed)
        #expect(await lockError { try await wrong.acquire(key: "k", timeoutS: 5) } == .authFailed)

        let right = try Connection(port: server.port, auth: "s3cret", loop: loop)
        defer { right.close() }
        let grant = try #require(try await right.acquire(key: "k", timeoutS: 5))
        #expect(isToken(grant.token) && grant.leaseS == 33)
        try await right.release(key: "k", token: grant.token)
        right.close()
        await expectOnlyWakeupHandle(loop)
    }

    @Test("a wrong secret fails the calls waiting behind the auth with authFailed (real Go server)")
    func authFailsPendingCalls() async throws {
        let server = try RealServer.start(.go, [.authToken("s3cret")])
        let connection = try Connection(port: server.port, auth: "wrong")
        defer { connection.close() }
        let first = OneShot<Result<Grant?, LockError>>()
        let second = OneShot<Result<Grant?, LockError>>()
        connection.acquire(key: "k", timeoutS: 5) { first.fulfil($0) }
        connection.acquire(key: "k2", timeoutS: 5) { second.fulfil($0) }
        #expect(try #require(await first.value()) == .failure(.authFailed))
        #expect(try #require(await second.value()) == .failure(.authFailed))
    }

    /// Replayed: the peer holds back `error_auth` until the client has called connect(), an
    /// ordering no real server can be made to keep.
    /// `connect()` promises a connection that is ready, authenticated when a secret is set. Called
    /// while the auth sent by an earlier request is still unanswered, it must wait for the answer.
    @Test("connect() during an unanswered auth waits for its outcome")
    func connectWaitsForAuth() async throws {
        let peer = try ScriptedPeer(script: """
            A > b'auth\\n_\\nwrong\\n'
            A > b'l\\nk\\n5\\n'
            B > b'l\\nsignal-1\\n0\\n'
            B < timeout
            B > b'l\\nsignal-2\\n0\\n'
            B < timeout
            A < error_auth
            A ~ closed by server
            """)
        let a = try Connection(port: peer.port, auth: "wrong")
        let b = try Connection(port: peer.port)
        defer { a.close(); b.close() }
        let pending = OneShot<Result<Grant?, LockError>>()
        a.acquire(key: "k", timeoutS: 5) { pending.fulfil($0) }
        // the peer answers B once it has read A's auth and request: A's TCP connection is up
        #expect(try await b.acquire(key: "signal-1", timeoutS: 0) == nil)
        let connected = OneShot<Result<Void, LockError>>()
        a.connect { connected.fulfil($0) }
        // the peer sends error_auth only after this
        #expect(try await b.acquire(key: "signal-2", timeoutS: 0) == nil)
        let connectResult = try #require(await connected.value())
        if case .failure(.authFailed) = connectResult {} else {
            Issue.record("connect() gave \(connectResult) while the auth was unanswered; the server then refused the secret")
        }
        #expect(try #require(await pending.value()) == .failure(.authFailed))
        try await peer.finish()
    }

    @Test("Go statuses on the real server (--max-locks 1 --max-waiters 1) map to their errors and keep the connection usable")
    func capsStatuses() async throws {
        let server = try RealServer.start(.go, [.maxLocks(1), .maxWaiters(1)])
        let a = try Connection(port: server.port)
        let b = try Connection(port: server.port)
        let c = try Connection(port: server.port)
        defer { a.close(); b.close(); c.close() }
        let held = try #require(try await a.acquire(key: "one", timeoutS: 5))
        #expect(await lockError { try await a.acquire(key: "two", timeoutS: 5) } == .maxLocks(key: "two"))
        #expect(try await b.enqueue(key: "one") == .queued)
        #expect(await lockError { try await c.acquire(key: "one", timeoutS: 5) } == .maxWaiters(key: "one"))
        #expect(await lockError { try await c.enqueue(key: "one") } == .maxWaiters(key: "one"))
        #expect(try await a.renew(key: "one", token: held.token) == 33, "a is still usable after error_max_locks")
        async let bGot = b.wait(key: "one", timeoutS: 5)
        try await a.release(key: "one", token: held.token)
        let bGrant = try #require(try await bGot)
        #expect(isToken(bGrant.token))
        try await b.release(key: "one", token: bGrant.token)
        let cGrant = try #require(try await c.acquire(key: "one", timeoutS: 5), "c is still usable after error_max_waiters")
        try await c.release(key: "one", token: cGrant.token)
    }

    @Test("a reply with no request outstanding is a protocol violation that closes the connection")
    func unsolicitedReply() async throws {
        let loop = EventLoop()
        defer { loop.shutdown() }
        let token = "0123456789abcdef0123456789abcdef"
        let peer = try ScriptedPeer(script: """
            A > b'r\\nextra\\n\(token)\\n'
            A < ok
            A < ok
            A ! the client hangs up on the reply nobody asked for
            """)
        let connection = try Connection(port: peer.port, loop: loop)
        defer { connection.close() }
        try await connection.release(key: "extra", token: token)
        try await peer.finish()   // returns once the client closed
        let error = await lockError { try await connection.release(key: "extra", token: token) }
        guard case .protocolViolation? = error else { Issue.record("\(String(describing: error))"); return }
        await expectOnlyWakeupHandle(loop)
    }

    /// Scripted: replies no real server sends.
    @Test("garbage or a malformed reply fails every pending call and closes",
          arguments: [
            ("A << b'\\xff\\xfe garbage\\n'", "protocolViolation"),
            ("A < queued", "protocolViolation"),
            ("A < ok", "protocolViolation"),
            ("A < ok 0123456789abcdef0123456789abcdef thirty-three", "protocolViolation"),
          ])
    func fatalReplies(reply: String, kind: String) async throws {
        let loop = EventLoop()
        defer { loop.shutdown() }
        let peer = try ScriptedPeer(script: """
            A > b'l\\nbad-1\\n0\\n'
            A > b'l\\nbad-2\\n0\\n'
            \(reply)
            A ! the client hangs up
            """)
        let connection = try Connection(port: peer.port, loop: loop)
        defer { connection.close() }
        let first = OneShot<Result<Grant?, LockError>>()
        let second = OneShot<Result<Grant?, LockError>>()
        connection.loop.execute {
            connection.acquire(key: "bad-1", timeoutS: 0) { first.fulfil($0) }
            connection.acquire(key: "bad-2", timeoutS: 0) { second.fulfil($0) }
        }
        let results = [try #require(await first.value()), try #require(await second.value())]
        for result in results {
            switch (kind, result) {
            case ("protocolViolation", .failure(.protocolViolation)): break
            default: Issue.record("expected \(kind), got \(result)")
            }
        }
        #expect(results[0] == results[1], "the pending call fails with the same reason")
        try await peer.finish()
        let later = await lockError { try await connection.acquire(key: "bad-3", timeoutS: 0) }
        #expect(later.map { Result<Grant?, LockError>.failure($0) } == results[0])
        await expectOnlyWakeupHandle(loop)
    }

    /// Scripted: no real server here splits a reply, ends it with CRLF or adds fields.
    @Test("a reply split into pieces, with CRLF and trailing fields, is read as one")
    func fragmentedReply() async throws {
        let peer = try ScriptedPeer(script: """
            A > b'l\\nfrag\\n5\\n'
            A << b'ok 0000000000000007'
            A << b'a1b2c3d4e5f60718 3'
            A << b'3 extra\\r'
            A << b'\\nqueued\\r\\n'
            A ! the client hangs up on the reply nobody asked for
            """)
        let connection = try Connection(port: peer.port)
        defer { connection.close() }
        let grant = try #require(try await connection.acquire(key: "frag", timeoutS: 5))
        #expect(grant == Grant(token: "0000000000000007a1b2c3d4e5f60718", leaseS: 33))
        #expect(grant.fence == 7)
        // "queued" arrived before the request it answers was sent: a protocol violation
        let error = await lockError { try await connection.enqueue(key: "frag2") }
        guard case .protocolViolation? = error else { Issue.record("\(String(describing: error))"); return }
        try await peer.finish()
    }

    // MARK: Resources

    /// 1,000 connections opened, used and closed on one loop leave no descriptor and no libuv
    /// handle behind.
    @Test("1,000 connections leave no file descriptors and no libuv handles behind", arguments: ServerKind.allCases)
    func noLeaks(on kind: ServerKind) async throws {
        let server = try RealServer.start(kind, [.maxLocks(4096)])
        let loop = EventLoop()
        defer { loop.shutdown() }
        #expect(await LoopProbe.handles(loop) == ["async"])

        let batch = 100
        for round in 0..<(1000 / batch) {
            let connections = try (0..<batch).map { _ in try Connection(port: server.port, loop: loop) }
            try await acquireAndReleaseAtOnce(connections, keyPrefix: "leak-\(round)")
            if round == 0 {
                // the probes see open connections (so they can see leaks)
                #expect(ProcessFDs.sockets(toPort: server.port) == batch)
                // each connection: its TCP stream and its deadline timer
                #expect(await LoopProbe.handles(loop).count == 2 * batch + 1)
            }
            for connection in connections { connection.close() }
        }
        await LoopProbe.roundTrip(loop)
        await LoopProbe.roundTrip(loop)
        #expect(ProcessFDs.sockets(toPort: server.port) == 0)
        #expect(await LoopProbe.handles(loop) == ["async"], "only the loop's wake-up handle may remain")
        // (The process-wide count in /proc/self/fd is not compared: other suites running in
        // parallel open and close descriptors of their own. The count of sockets to this test's
        // own server above is exact.)
    }
}
