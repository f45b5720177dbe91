// Safety under faults (issue #6): a held lock is never silently lost, and bad input never
// breaks the client. Against both real servers, dflockd 0.5.0 (Python) and 1.10.0 (Go): killed,
// frozen, partitioned by a black-hole proxy, restarted; and against scripted peers that send
// what no server should (an unsolicited line, a malformed reply, an endless line): no real
// server can be made to.
//
// Every wait here ends on an event (a callback, a completion, a close), with a generous
// timeout only as a safety net. Blocking calls (RealServer, RawClient, proxy switches) run on
// threads of their own (`offThread`), never on the 2-thread cooperative pool the other tests
// and their timers share.

import Foundation
import Testing
@testable import DflockdClient

@Suite("Faults", .timeLimit(.minutes(3)))
struct FaultTests {

    // MARK: - Read while held

    /// A lock is held with a 30 s lease (first renewal due in 10 s); the fault comes right
    /// after. `onLockLost` must follow at once, not at the renewal.
    enum HeldFault: String, CaseIterable, Sendable {
        case unsolicitedLine, endOfStream, reset
    }

    /// The line and the EOF come from a scripted peer (no server sends a line unprompted, and an
    /// EOF with nothing else is what a peer can time exactly); the reset, through a proxy in
    /// front of each real server.
    struct HeldFaultCase: Sendable, CustomTestStringConvertible {
        let fault: HeldFault
        let server: ServerKind?
        var testDescription: String { server.map { "\(fault.rawValue) on \($0)" } ?? "\(fault.rawValue) from a scripted peer" }
        static let all = [HeldFaultCase(fault: .unsolicitedLine, server: nil), HeldFaultCase(fault: .endOfStream, server: nil)]
            + ServerKind.allCases.map { HeldFaultCase(fault: .reset, server: $0) }
    }

    @Test("a line, an EOF or a reset while the lock is held loses it at once", arguments: HeldFaultCase.all)
    func readWhileHeld(_ scenario: HeldFaultCase) async throws {
        let fault = scenario.fault
        let lost = EventLog<String>()
        let token = "0123456789abcdef0123456789abcdef"
        var peer: ScriptedPeer?
        var server: RealServer?
        var proxy: BlackHoleProxy?
        let port: Int
        switch fault {
        case .unsolicitedLine, .endOfStream:
            // `A .` keeps the grant and the fault in separate reads: the lock is idle and held.
            peer = try ScriptedPeer(script: """
                A > b'l\\nheld\\n5 30\\n'
                A < ok \(token) 30
                A .
                \(fault == .unsolicitedLine ? "A < ok" : "A ~ closed by server")
                \(fault == .unsolicitedLine ? "A !" : "")
                """)
            port = peer!.port
        case .reset:
            server = try await SharedServers.plain(try #require(scenario.server))
            proxy = try BlackHoleProxy(targetPort: server!.port)
            port = proxy!.port
        }
        let lock = try DistributedLock(key: "held", acquireTimeoutS: 5, leaseTtlS: 30, servers: [("127.0.0.1", port)],
                                       onLockLost: { _, token in lost.append(token) })
        // The token and the time of the grant are taken on the loop thread, in the completion:
        // a scripted fault follows the grant by only 200 ms, and this task may resume later.
        let grants = EventLog<String?>()
        lock.acquire { result in grants.append(try? result.get() == true ? lock.token : nil) }
        #expect(await grants.wait(timeout: .seconds(10)) { !$0.isEmpty }, "the acquire never completed")
        let grant = try #require(grants.entries.first)
        let heldToken = try #require(grant.value, "not acquired")
        if fault != .reset { #expect(heldToken == token) }
        var faultAt = grant.at
        if let proxy {
            faultAt = .now
            await offThread { proxy.resetAll() }
        }

        #expect(await lost.wait(timeout: .seconds(10)) { !$0.isEmpty }, "onLockLost was not called")
        let entries = lost.entries
        #expect(entries.map(\.value) == [heldToken])
        if let first = entries.first {
            #expect(first.at - faultAt < .seconds(2), "lost after \(first.at - faultAt): that is not 'at once'")
        }
        #expect(lock.state == .closed)
        #expect(lock.leaseRemaining == nil)
        await #expect(throws: LockError.lockLost(key: "held", token: heldToken)) { try await lock.release() }
        await lock.loop.roundTrip()
        #expect(lost.entries.count == 1, "onLockLost more than once")

        if let peer { try await peer.finish() }
        if let server {
            // The reset reached the server too: it released the key.
            #expect(try await offThread { try !isHeld("held", port: server.port) })
        }
        proxy?.stop()
    }

    // MARK: - Server killed

    @Test("SIGKILL with 100 locks held: every onLockLost fires exactly once, within 1 s", arguments: ServerKind.allCases)
    func serverKilledWithAHundredLocksHeld(on kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        let lost = EventLog<String>()
        let locks = try (0..<100).map { index in
            try DistributedLock(key: "killed-\(index)", acquireTimeoutS: 5, leaseTtlS: 30,
                                servers: [("127.0.0.1", server.port)], onLockLost: { _, token in lost.append(token) })
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for lock in locks {
                group.addTask {
                    let acquired = try await lock.acquire()
                    #expect(acquired)
                }
            }
            try await group.waitForAll()
        }
        let tokens = locks.compactMap(\.token)
        #expect(Set(tokens).count == 100)

        let killedAt = ContinuousClock.now
        await offThread { server.kill() }
        #expect(await lost.wait(timeout: .seconds(10)) { $0.count >= 100 }, "only \(lost.entries.count) of 100 losses reported")
        // Anything reported twice would have been queued on the loop by now.
        await EventLoop.shared.roundTrip()
        try await Task.sleep(for: .milliseconds(200))
        await EventLoop.shared.roundTrip()

        let entries = lost.entries
        #expect(entries.count == 100, "\(entries.count) onLockLost calls for 100 locks")
        #expect(Set(entries.map(\.value)) == Set(tokens))
        let slowest = entries.map { $0.at - killedAt }.max() ?? .zero
        #expect(slowest < .seconds(1), "the last onLockLost came \(slowest) after SIGKILL")
        print("SIGKILL on \(kind): \(entries.count) onLockLost calls, the last \(slowest) after the signal")
        for lock in locks { #expect(lock.state == .closed) }
    }

    // MARK: - Server frozen, network black hole

    enum Partition: String, Sendable, CaseIterable {
        /// SIGSTOP: the server's sockets stay open, nothing is answered.
        case frozenServer
        /// The proxy drops every byte both ways and passes on no close.
        case blackHole
    }

    struct PartitionCase: Sendable, CustomTestStringConvertible {
        let server: ServerKind
        let partition: Partition
        /// Whether a renewal was answered before the fault (the deadline then comes from it),
        /// or the fault came right after the grant.
        let afterRenewal: Bool
        var testDescription: String { "\(server): \(partition.rawValue), \(afterRenewal ? "after a renewal" : "right after the grant")" }
        static let all = ServerKind.allCases.flatMap { server in
            Partition.allCases.flatMap { p in [false, true].map { PartitionCase(server: server, partition: p, afterRenewal: $0) } }
        }
    }

    /// A lock with a 3 s lease is held through a proxy; a waiter on the same key talks to the
    /// server directly. Then the holder's server stops answering (frozen, or the proxy becomes a
    /// black hole). The holder must report the loss before 3 s have passed since the last
    /// request that was answered went through the proxy (the server started that lease no
    /// earlier), and the server must then hand the key to the waiter: at no moment do both
    /// hold it.
    @Test("partition while held: onLockLost before the lease can end on the server; the waiter gets the key",
          arguments: PartitionCase.all)
    func partitionWhileHeld(_ scenario: PartitionCase) async throws {
        // A frozen server is of no use to anyone else; a black hole only hides the shared one.
        let server = scenario.partition == .frozenServer
            ? try await RealServer.launch(scenario.server)
            : try await SharedServers.plain(scenario.server)
        let proxy = try BlackHoleProxy(targetPort: server.port)
        let lost = EventLog<String>()
        let key = "partition-\(scenario.server.rawValue)-\(scenario.partition.rawValue)-\(scenario.afterRenewal)"
        let holder = try DistributedLock(key: key, acquireTimeoutS: 5, leaseTtlS: 3, servers: [("127.0.0.1", proxy.port)],
                                         onLockLost: { _, token in lost.append(token) })
        let waiter = try DistributedLock(key: key, acquireTimeoutS: 30, leaseTtlS: 3, servers: [("127.0.0.1", server.port)])

        #expect(try await holder.acquire())
        let token = try #require(holder.token)
        if scenario.afterRenewal {
            // The renewal (due after 1 s) is answered: a second reply came down through the
            // proxy. (0.5.0 answers it with 2, the seconds left; 1.10 with the full 3.)
            await waitUntil {
                proxy.traffic.filter { $0.connection == 1 && $0.direction == .down && !$0.dropped }.count >= 2
                    || holder.state != .held
            }
            #expect(holder.state == .held)
        }

        // The waiter's grant is checked on the loop thread, where the holder's state changes:
        // a total order, so "the holder still held it" cannot slip between two reads.
        let grants = EventLog<LockState>()
        waiter.acquire { result in
            if case .success(true) = result { grants.append(holder.state) }
        }
        await waitUntil { waiter.state == .queued }

        switch scenario.partition {
        case .frozenServer: await offThread { server.freeze() }
        case .blackHole: await offThread { proxy.blackHole() }
        }

        #expect(await lost.wait(timeout: .seconds(10)) { !$0.isEmpty }, "the holder never reported the loss")
        let lostAt = lost.entries.first?.at ?? .now
        #expect(lost.entries.map(\.value) == [token])
        #expect(holder.state == .closed)

        // When did the server last see an answered request? The proxy saw it first.
        let traffic = proxy.traffic.filter { $0.connection == 1 }
        let lastReply = try #require(traffic.last { $0.direction == .down && !$0.dropped })
        let lastAnsweredRequest = try #require(traffic.last { $0.direction == .up && $0.at <= lastReply.at })
        let heldFor = lostAt - lastAnsweredRequest.at
        #expect(heldFor < .seconds(3), "onLockLost came \(heldFor) after the last answered request reached the proxy")
        #expect(heldFor > .milliseconds(1500), "onLockLost came only \(heldFor) after the last answered request: too early")
        #expect(traffic.contains { $0.direction == .up && $0.at > lastReply.at },
                "the holder tried to renew after the fault")

        if scenario.partition == .frozenServer { await offThread { server.thaw() } }
        let thawedAt = ContinuousClock.now
        #expect(await grants.wait(timeout: .seconds(10)) { !$0.isEmpty }, "the waiter never got the key")
        if let grant = grants.entries.first {
            #expect(grant.value != .held, "the waiter was granted the key while the holder still held it")
            #expect(grant.at > lostAt)
            // The server hands the key over once the lease ends (its sweep runs every second),
            // or at once when the holder's close reaches it.
            #expect(grant.at - thawedAt < .seconds(5), "the waiter got the key \(grant.at - thawedAt) after the fault ended")
            print("partition \(scenario.testDescription): holder lost the key \(heldFor) after its last answered request reached the server; the waiter got it \(grant.at - lostAt) later")
        }
        try await waiter.release()
        proxy.stop()
        if scenario.partition == .frozenServer { await offThread { server.stop() } }
    }

    // MARK: - Bad input from the server

    struct BadReply: Sendable, CustomTestStringConvertible {
        let name: String
        /// Sent in answer to the first of three pipelined requests.
        let bytes: [UInt8]
        var testDescription: String { name }

        init(_ name: String, _ bytes: [UInt8]) {
            self.name = name
            self.bytes = bytes
        }

        init(_ name: String, _ text: String) {
            self.init(name, Array(text.utf8))
        }

        static let token = "0123456789abcdef0123456789abcdef"
        static let all: [BadReply] = [
            BadReply("a line over 1 MiB that never ends", [UInt8](repeating: 0x78, count: LineFramer.maximumLineBytes + 2)),
            BadReply("a line over 1 MiB with its newline", [UInt8](repeating: 0x78, count: LineFramer.maximumLineBytes + 1) + [0x0A]),
            BadReply("binary garbage", [0x00, 0xFF, 0x13, 0x37, 0x80, 0x1B, 0x5B, 0x32, 0x4A, 0x0A]),
            BadReply("invalid UTF-8 in a grant", Array("ok ".utf8) + [0xC3, 0x28] + Array(" 33\n".utf8)),
            BadReply("an overlong UTF-8 NUL", Array("ok \(token) 33 ".utf8) + [0xC0, 0x80, 0x0A]),
            BadReply("the wrong type: queued to l", "queued\n"),
            BadReply("the wrong type: stats JSON to l", "ok {\"connections\":1,\"locks\":[]}\n"),
            BadReply("the wrong type: a renewal answer to l", "ok 33\n"),
            BadReply("a lease that overflows Int", "ok \(token) 99999999999999999999999\n"),
            BadReply("a negative lease", "ok \(token) -5\n"),
            BadReply("an empty line", "\n"),
            BadReply("a bare CR LF", "\r\n"),
            BadReply("an unknown status", "granted \(token) 33\n"),
        ]
    }

    /// Three requests are pipelined; the answer to the first is bad. All three fail with a
    /// protocol violation, the connection closes (the peer sees it), and the next request
    /// fails at once with the same error: nothing is left hanging, nothing crashes.
    @Test("a bad reply fails every pending call, closes the connection, and nothing crashes", arguments: BadReply.all)
    func badReplyFailsEverythingPending(_ bad: BadReply) async throws {
        let token = BadReply.token
        let peer = try ScriptedPeer(script: """
            A > b'l\\nbad\\n0\\n'
            A > b'n\\nbad\\n\(token)\\n'
            A > b'r\\nbad\\n\(token)\\n'
            A << \(TestSupport.pythonBytes(bad.bytes))
            A !
            """)
        let connection = try Connection(port: peer.port)
        let results = EventLog<Result<String, LockError>>()
        // Issued in one turn of the loop, so they go out in this order, pipelined.
        connection.loop.execute {
            connection.acquire(key: "bad", timeoutS: 0) { results.append($0.map { "\($0 as Any)" }) }
            connection.renew(key: "bad", token: token) { results.append($0.map { "\($0)" }) }
            connection.release(key: "bad", token: token) { results.append($0.map { "\($0)" }) }
        }
        #expect(await results.wait(timeout: .seconds(10)) { $0.count == 3 }, "only \(results.entries.count) of 3 calls completed")
        let errors = results.entries.map { entry -> LockError? in
            if case .failure(let error) = entry.value { return error }
            return nil
        }
        #expect(errors.allSatisfy { $0 != nil }, "\(results.entries.map(\.value))")
        let first = try #require(errors.first ?? nil)
        guard case .protocolViolation(let detail) = first else {
            Issue.record("expected a protocol violation, got \(first)")
            return
        }
        #expect(!detail.isEmpty && detail.count < 300, "a short, clear message: \(detail)")
        #expect(first.description.contains("The connection was closed"))
        #expect(errors.allSatisfy { $0 == first }, "every pending call fails with the same reason")
        try await peer.finish()
        // Closed for good: a later request fails at once with the same reason.
        await #expect(throws: first) { try await connection.acquire(key: "bad", timeoutS: 0) }
    }

    /// A line while nothing is pending on an open connection: the connection closes, and the
    /// next request says why.
    @Test("a reply with no request pending closes the connection")
    func unsolicitedReplyOnAnIdleConnection() async throws {
        let peer = try ScriptedPeer(script: """
            A > b'l\\nidle\\n0\\n'
            A < timeout
            A < ok
            A !
            """)
        let connection = try Connection(port: peer.port)
        #expect(try await connection.acquire(key: "idle", timeoutS: 0) == nil)
        try await peer.finish()  // the client closed the connection
        let error = await #expect(throws: LockError.self) { try await connection.acquire(key: "idle", timeoutS: 0) }
        guard case .protocolViolation(let detail)? = error else {
            Issue.record("expected a protocol violation, got \(error as Any)")
            return
        }
        #expect(detail.contains("no request outstanding"), "\(detail)")
    }

    /// A server that streams one endless line: the client gives up after 1 MiB and closes, so
    /// the server cannot push more than the socket buffers hold. Memory stays bounded.
    @Test("an endless line is cut off after 1 MiB: the client stops reading and closes")
    func endlessLineIsCutOff() async throws {
        let (listener, port) = try SupportSocket.listenLoopback()
        defer { SupportSocket.closeFD(listener) }
        let pushed = Task.detached { () -> Int in
            await offThread { Self.pushEndlessLine(listener: listener, upTo: 256 << 20) }
        }
        let connection = try Connection(port: port)
        let error = await #expect(throws: LockError.self) { try await connection.acquire(key: "endless", timeoutS: 0) }
        guard case .protocolViolation(let detail)? = error else {
            Issue.record("expected a protocol violation, got \(error as Any)")
            return
        }
        #expect(detail.contains("longer than"), "\(detail)")
        let bytes = await pushed.value
        // The kernel's socket buffers take some megabytes; the client read about one.
        #expect(bytes < 64 << 20, "the peer pushed \(bytes) bytes: the client kept reading")
    }

    /// Accepts one connection, reads a request, then writes `x` until the client goes away (or
    /// `limit` bytes, or 10 s without progress). Returns the bytes written.
    private static func pushEndlessLine(listener: Int32, upTo limit: Int) -> Int {
        let fd = accept(listener, nil, nil)
        guard fd >= 0 else { return -1 }
        defer { SupportSocket.closeFD(fd) }
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var request = [UInt8](repeating: 0, count: 64)
        _ = recv(fd, &request, request.count, 0)
        let chunk = [UInt8](repeating: 0x78, count: 64 * 1024)
        var total = 0
        while total < limit {
            let n = chunk.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, SupportSocket.sendFlags) }
            if n <= 0 { break }
            total += n
        }
        return total
    }

    // MARK: - Bad input from the caller

    /// Every validation rule, through the raw `Connection` commands and the lock API: a
    /// `LockError.invalidArgument` naming the argument, and not one byte on the wire (the peer
    /// expects exactly one valid request, sent last).
    @Test("invalid arguments fail naming the argument, and nothing reaches the wire")
    func invalidArgumentsNeverReachTheWire() async throws {
        let peer = try ScriptedPeer(script: """
            A > b'l\\nvalid\\n0\\n'
            A < timeout
            A !
            """)
        let c = try Connection(port: peer.port)
        let token = BadReply.token
        let tooLong = String(repeating: "k", count: Validation.maximumLineBytes + 1)
        let injected = "k\nr\nk\n\(token)"
        let calls: [(String, @Sendable () async throws -> Void)] = [
            ("key", { _ = try await c.acquire(key: "", timeoutS: 0) }),
            ("key", { _ = try await c.acquire(key: "a b", timeoutS: 0) }),
            ("key", { _ = try await c.acquire(key: injected, timeoutS: 0) }),
            ("key", { _ = try await c.acquire(key: "k\r", timeoutS: 0) }),
            ("key", { _ = try await c.acquire(key: "k\0", timeoutS: 0) }),
            ("key", { _ = try await c.acquire(key: "k\t", timeoutS: 0) }),
            ("key", { _ = try await c.acquire(key: "k\u{2028}", timeoutS: 0) }),
            ("key", { _ = try await c.acquire(key: tooLong, timeoutS: 0) }),
            ("timeoutS", { _ = try await c.acquire(key: "k", timeoutS: -1) }),
            ("leaseTtlS", { _ = try await c.acquire(key: "k", timeoutS: 0, leaseTtlS: 0) }),
            ("key", { try await c.release(key: "", token: token) }),
            ("token", { try await c.release(key: "k", token: "") }),
            ("token", { try await c.release(key: "k", token: "\(token)\nl\nk\n0") }),
            ("token", { try await c.release(key: "k", token: tooLong) }),
            ("token", { _ = try await c.renew(key: "k", token: "a b") }),
            ("leaseTtlS", { _ = try await c.renew(key: "k", token: token, leaseTtlS: -3) }),
            ("key", { _ = try await c.enqueue(key: "k k") }),
            ("leaseTtlS", { _ = try await c.enqueue(key: "k", leaseTtlS: 0) }),
            ("key", { _ = try await c.wait(key: "\n", timeoutS: 1) }),
            ("timeoutS", { _ = try await c.wait(key: "k", timeoutS: -1) }),
            ("limit", { _ = try await c.acquireSemaphore(key: "k", limit: 0, timeoutS: 0) }),
            ("timeoutS", { _ = try await c.acquireSemaphore(key: "k", limit: 1, timeoutS: -1) }),
            ("leaseTtlS", { _ = try await c.acquireSemaphore(key: "k", limit: 1, timeoutS: 0, leaseTtlS: 0) }),
            ("token", { try await c.releaseSemaphore(key: "k", token: "t\0") }),
            ("token", { _ = try await c.renewSemaphore(key: "k", token: "") }),
            ("limit", { _ = try await c.enqueueSemaphore(key: "k", limit: -1) }),
            ("timeoutS", { _ = try await c.waitSemaphore(key: "k", timeoutS: -2) }),
            ("timeoutS", { _ = try await DistributedLock(key: "k", servers: [("127.0.0.1", peer.port)]).wait(timeoutS: -1) }),
            ("timeoutS", { _ = try await DistributedSemaphore(key: "k", limit: 2, servers: [("127.0.0.1", peer.port)]).wait(timeoutS: -1) }),
            ("host", { _ = try Connection(host: "", port: peer.port) }),
            ("host", { _ = try Connection(host: "127.0.0.1\nl", port: peer.port) }),
            ("port", { _ = try Connection(port: 0) }),
            ("port", { _ = try Connection(port: 65536) }),
            ("auth", { _ = try Connection(port: peer.port, auth: "") }),
            ("auth", { _ = try Connection(port: peer.port, auth: "s3cret\nl\nk\n0") }),
            ("auth", { _ = try Connection(port: peer.port, auth: String(repeating: "s", count: Validation.maximumSecretBytes + 1)) }),
            ("connectTimeoutMs", { _ = try Connection(port: peer.port, connectTimeoutMs: 0) }),
            ("socketTimeoutMs", { _ = try Connection(port: peer.port, socketTimeoutMs: -1) }),
            ("maxIdleMs", { _ = try DistributedLock(key: "k", servers: [("127.0.0.1", peer.port)], maxIdleMs: 0) }),
            ("limit", { _ = try DistributedSemaphore(key: "k", limit: 0, servers: [("127.0.0.1", peer.port)]) }),
        ]
        for (index, (name, call)) in calls.enumerated() {
            do {
                try await call()
                Issue.record("call \(index) (\(name)) was accepted")
            } catch let error as LockError {
                guard case .invalidArgument(let actual, let reason) = error else {
                    Issue.record("call \(index): expected invalidArgument(\(name)), got \(error)")
                    continue
                }
                #expect(actual == name, "call \(index)")
                #expect(!reason.isEmpty && error.description.hasPrefix("invalid \(name): "), "call \(index): \(error)")
            }
        }
        // The one valid request is the first thing the peer sees.
        #expect(try await c.acquire(key: "valid", timeoutS: 0) == nil)
        c.close()
        try await peer.finish()
    }

    // MARK: - Idle read timeout

    /// `--read-timeout 3`: the server drops a connection that is silent for 3 s, and its lock.
    /// A 60 s lease renews every 30 s by the ratio; `maxIdleMs` caps the gap.
    @Test("a 60 s lease stays held on a server with --read-timeout 3 when maxIdleMs is 1000", arguments: ServerKind.allCases)
    func maxIdleKeepsTheSessionAlive(on kind: ServerKind) async throws {
        let server = try await SharedServers.readTimeout3(kind)
        let lost = EventLog<String>()
        let lock = try DistributedLock(key: "idle-capped", acquireTimeoutS: 5, leaseTtlS: 60, servers: [("127.0.0.1", server.port)],
                                       onLockLost: { _, token in lost.append(token) }, maxIdleMs: 1000)
        #expect(try await lock.acquire())
        let token = lock.token
        // Eight seconds: more than twice the read timeout.
        for _ in 0..<8 {
            #expect(await lost.wait(timeout: .seconds(1)) { !$0.isEmpty } == false, "lost at \(lost.entries.first?.at as Any)")
            #expect(lock.state == .held)
            #expect(lock.token == token)
            #expect(try await offThread { try isHeld("idle-capped", port: server.port) })
        }
        try await lock.release()
    }

    /// The same lock without the cap: the server drops it after 3 s of silence (sending an
    /// unsolicited `error` and closing), which the client reports at once.
    @Test("with maxIdleMs nil the same lock is lost to the read timeout (so the test above can fail)", arguments: ServerKind.allCases)
    func withoutMaxIdleTheReadTimeoutWins(on kind: ServerKind) async throws {
        let server = try await SharedServers.readTimeout3(kind)
        let lost = EventLog<String>()
        let lock = try DistributedLock(key: "idle-uncapped", acquireTimeoutS: 5, leaseTtlS: 60, servers: [("127.0.0.1", server.port)],
                                       onLockLost: { _, token in lost.append(token) }, maxIdleMs: nil)
        #expect(try await lock.acquire())
        let acquiredAt = ContinuousClock.now
        #expect(await lost.wait(timeout: .seconds(10)) { !$0.isEmpty }, "the lock was not reported lost")
        if let lostAt = lost.entries.first?.at {
            #expect(lostAt - acquiredAt > .milliseconds(2500))
            #expect(lostAt - acquiredAt < .seconds(6))
        }
        #expect(lock.state == .closed)
        #expect(try await offThread { try !isHeld("idle-uncapped", port: server.port) }, "the server released the key")
    }
}

// MARK: - Mutual exclusion under faults

/// Twenty locks on one key for 30 s; half reach the server directly, half through a proxy.
/// Meanwhile the server is killed and restarted twice, and the proxy becomes a black hole twice.
/// Each fault is injected from inside a critical section (while that worker holds the key), and
/// that section then outlasts the fault, so its lock is certainly lost: by EOF after SIGKILL, by
/// the local lease deadline in the black hole, where the server hands the key on only when the
/// 2 s lease runs out. Every critical section reads a shared counter, sleeps, and writes the
/// incremented value only if its lock is still `.held` with `leaseRemaining` above a margin
/// right before the write; otherwise it aborts. No two committed sections may overlap, and the
/// counter must equal the number of commits (an overlap would also lose an update).
@Suite("Mutual exclusion under faults", .timeLimit(.minutes(3)))
struct MutualExclusionTests {
    static let workers = 20
    static let duration = Duration.seconds(30)
    static let commitMargin = Duration.milliseconds(300)

    enum Fault: String, Sendable {
        case kill, blackHole
    }

    /// When each fault is armed, from the start; the next suitable worker to enter its critical
    /// section injects it.
    static let plan: [(at: Duration, fault: Fault)] = [
        (.seconds(4), .kill), (.seconds(10), .blackHole), (.seconds(17), .kill), (.seconds(22), .blackHole),
    ]

    struct Commit: Sendable {
        let worker: Int
        let token: String
        let enter: ContinuousClock.Instant
        let exit: ContinuousClock.Instant
    }

    struct Injection: Sendable {
        let fault: Fault
        let worker: Int
        let token: String
        var committed: Bool?
    }

    /// Everything the workers share, under one lock.
    final class Ledger: Sendable {
        struct State {
            var counter = 0
            var commits: [Commit] = []
            var aborts = 0
            var errors: [String: Int] = [:]
            var timeouts = 0
            var losses: [(worker: Int, token: String)] = []
            var armed: [Fault] = []
            var injections: [Injection] = []
        }

        let state = ThreadLock(State())

        func read() -> Int { state.withLock { $0.counter } }

        func commit(worker: Int, token: String, enter: ContinuousClock.Instant, value: Int) {
            state.withLock { s in
                s.counter = value
                s.commits.append(Commit(worker: worker, token: token, enter: enter, exit: .now))
            }
        }

        func abort() { state.withLock { $0.aborts += 1 } }
        func timedOut() { state.withLock { $0.timeouts += 1 } }

        func failed(_ error: any Error) {
            // The case name: connectFailed, connectionClosed, socketTimeout, ...
            let kind = (error as? LockError).map { Mirror(reflecting: $0).children.first?.label ?? "\($0)" } ?? "\(error)"
            state.withLock { $0.errors[kind, default: 0] += 1 }
        }

        func lost(worker: Int, token: String) { state.withLock { $0.losses.append((worker, token)) } }

        func arm(_ fault: Fault) { state.withLock { $0.armed.append(fault) } }

        /// The armed fault this worker may inject, claimed: a black hole needs a worker behind
        /// the proxy.
        func claim(worker: Int, token: String, proxied: Bool) -> Fault? {
            state.withLock { s in
                guard let fault = s.armed.first, fault == .kill || proxied else { return nil }
                s.armed.removeFirst()
                s.injections.append(Injection(fault: fault, worker: worker, token: token))
                return fault
            }
        }

        func settle(token: String, committed: Bool) {
            state.withLock { s in
                if let index = s.injections.lastIndex(where: { $0.token == token }) { s.injections[index].committed = committed }
            }
        }
    }

    /// Injects the faults.
    final class Injector: Sendable {
        let server: RealServer
        let proxy: BlackHoleProxy
        let restarts = ThreadLock<[Task<Void, any Error>]>([])

        init(server: RealServer, proxy: BlackHoleProxy) {
            self.server = server
            self.proxy = proxy
        }

        /// Injects `fault` while the caller holds the key; returns how long its section must
        /// last to outlive the fault.
        func inject(_ fault: Fault) async -> Duration {
            switch fault {
            case .kill:
                await offThread { [server] in server.kill() }
                let restart = Task { [server] in
                    try await Task.sleep(for: .milliseconds(300))
                    try await offThread { try server.restart() }
                }
                restarts.withLock { $0.append(restart) }
                return .seconds(3)
            case .blackHole:
                await offThread { [proxy] in proxy.blackHole() }
                return .seconds(4)  // the 2 s lease, the server's 1 s sweep, and some
            }
        }
    }

    @Test("20 locks, one key, 30 s, server killed and restarted twice, partitioned twice: no overlap, no lost update",
          arguments: ServerKind.allCases)
    func mutualExclusionUnderFaults(on kind: ServerKind) async throws {
        let server = try await RealServer.launch(kind)
        let proxy = try BlackHoleProxy(targetPort: server.port)
        let ledger = Ledger()
        let injector = Injector(server: server, proxy: proxy)
        let locks = try (0..<Self.workers).map { worker in
            try DistributedLock(key: "mutex", acquireTimeoutS: 2, leaseTtlS: 2,
                                servers: [("127.0.0.1", worker.isMultiple(of: 2) ? server.port : proxy.port)],
                                onLockLost: { _, token in ledger.lost(worker: worker, token: token) },
                                connectTimeoutMs: 1000, socketTimeoutMs: 1500)
        }
        let start = ContinuousClock.now
        let end = start.advanced(by: Self.duration)

        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                for (at, fault) in Self.plan {
                    try await Task.sleep(until: start.advanced(by: at))
                    ledger.arm(fault)
                }
            }
            for (worker, lock) in locks.enumerated() {
                let proxied = !worker.isMultiple(of: 2)
                group.addTask {
                    while ContinuousClock.now < end {
                        let acquired: Bool
                        do {
                            acquired = try await lock.acquire()
                        } catch {
                            // The server is down or restarting, the proxy resets or drops the
                            // connection: try again shortly.
                            ledger.failed(error)
                            try await Task.sleep(for: .milliseconds(Int.random(in: 20...80)))
                            continue
                        }
                        guard acquired, let token = lock.token else {
                            ledger.timedOut()
                            continue
                        }
                        let enter = ContinuousClock.now
                        let seen = ledger.read()
                        let fault = ledger.claim(worker: worker, token: token, proxied: proxied)
                        let pause = fault != nil ? await injector.inject(fault!) : .milliseconds(Int.random(in: 2...20))
                        try await Task.sleep(for: pause)
                        // Check, then write, with no suspension point in between.
                        if lock.state == .held, let remaining = lock.leaseRemaining, remaining > Self.commitMargin {
                            ledger.commit(worker: worker, token: token, enter: enter, value: seen + 1)
                            if fault != nil { ledger.settle(token: token, committed: true) }
                        } else {
                            ledger.abort()
                            if fault != nil { ledger.settle(token: token, committed: false) }
                        }
                        if fault == .blackHole { await offThread { proxy.heal() } }
                        try? await lock.release()
                    }
                }
            }
            try await group.waitForAll()
        }
        for restart in injector.restarts.withLock({ $0 }) { try await restart.value }

        let s = ledger.state.withLock { $0 }
        print("""
            mutual exclusion on \(kind): \(s.commits.count) commits, \(s.aborts) aborts, \(s.timeouts) acquire timeouts, \
            \(s.losses.count) onLockLost, errors \(s.errors.sorted { $0.key < $1.key }), \
            commits direct/proxied \(s.commits.filter { $0.worker.isMultiple(of: 2) }.count)/\(s.commits.filter { !$0.worker.isMultiple(of: 2) }.count), \
            injections \(s.injections.map { "\($0.fault.rawValue) by \($0.worker): \($0.committed.map { $0 ? "committed" : "aborted" } ?? "?")" })
            """)

        #expect(s.counter == s.commits.count, "lost updates: the counter is \(s.counter) after \(s.commits.count) commits")
        let ordered = s.commits.sorted { $0.enter < $1.enter }
        for (before, after) in zip(ordered, ordered.dropFirst()) where after.enter < before.exit {
            Issue.record("""
                overlap: worker \(before.worker) (\(before.token)) held the key until \(before.exit - start), \
                worker \(after.worker) (\(after.token)) entered at \(after.enter - start)
                """)
        }
        #expect(Set(s.commits.map(\.token)).count == s.commits.count, "a grant committed twice")
        #expect(s.commits.count >= 100, "too few commits to mean anything: \(s.commits.count)")
        #expect(s.commits.contains { $0.worker.isMultiple(of: 2) } && s.commits.contains { !$0.worker.isMultiple(of: 2) })
        // Every fault was injected while its worker held the key, and lost it that worker.
        #expect(s.injections.map(\.fault) == Self.plan.map(\.fault), "not every fault was injected: \(s.injections)")
        for injection in s.injections {
            #expect(injection.committed == false, "the section that \(injection.fault) interrupted committed anyway")
            #expect(s.losses.contains { $0.token == injection.token }, "no onLockLost for the lock \(injection.fault) took")
        }
        #expect(s.errors.count > 0, "the faults never reached a worker outside its critical section")
        proxy.stop()
        await offThread { server.stop() }
    }
}

// MARK: - Helpers

/// Servers shared by the tests that neither kill, freeze nor restart them (each uses keys of
/// its own): fewer processes starting at once on a small machine. Started on first use, off
/// the cooperative pool; they end with the test process (RealServer's watchdog pipe, or the
/// Go server's parent-death signal).
enum SharedServers {
    private static let plainPython = Task { try await RealServer.launch(.python) }
    private static let plainGo = Task { try await RealServer.launch(.go) }
    private static let readTimeout3Python = Task { try await RealServer.launch(.python, [.readTimeout(seconds: 3)]) }
    private static let readTimeout3Go = Task { try await RealServer.launch(.go, [.readTimeout(seconds: 3)]) }

    static func plain(_ kind: ServerKind) async throws -> RealServer {
        try await (kind == .python ? plainPython : plainGo).value
    }

    static func readTimeout3(_ kind: ServerKind) async throws -> RealServer {
        try await (kind == .python ? readTimeout3Python : readTimeout3Go).value
    }
}

/// Whether another client finds `key` held: `l key 0` answers `timeout`. A grant is released at
/// once. Blocking: call through `offThread`.
func isHeld(_ key: String, port: Int) throws -> Bool {
    let client = try RawClient(port: port)
    defer { client.close() }
    let reply = try client.send("l", key, "0")
    if reply == "timeout" { return true }
    let fields = reply.split(separator: " ")
    guard fields.first == "ok", fields.count >= 2 else { throw TestSupportError("unexpected reply \(reply) to l \(key) 0") }
    _ = try client.send("r", key, String(fields[1]))
    return false
}
