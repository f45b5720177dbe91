import CUV
import Foundation
import Testing
@testable import DflockdClient

#if canImport(Glibc)
import Glibc
#endif

/// TLS on the wire: stunnel4 terminates TLS in front of the real dflockd 0.5.0, with
/// certificates the tests make with `openssl` (Support/TLSFixture.swift).
@Suite(.timeLimit(.minutes(3)))
struct TLSTests {
    let pki: TestPKI
    let server: RealServer
    let tunnel: Stunnel

    init() async throws {
        // One dflockd and one stunnel in front of it for the whole suite (tests use keys of
        // their own); a test that needs another setup starts its own.
        (pki, server, tunnel) = try await offThePool { try SharedTLSBackend.get() }
    }

    private func lock(_ key: String, host: String = "127.0.0.1", port: Int? = nil, tls: TLSOptions,
                      leaseTtlS: Int? = nil, connectTimeoutMs: Int? = 10_000) throws -> DistributedLock {
        try DistributedLock(key: key, acquireTimeoutS: 5, leaseTtlS: leaseTtlS, servers: [(host, port ?? tunnel.port)],
                            tls: tls, connectTimeoutMs: connectTimeoutMs)
    }

    /// Whether another client, on the plain server port, finds the key taken.
    private func isHeldOnServer(_ key: String) throws -> Bool {
        let client = try RawClient(port: server.port)
        defer { client.close() }
        let reply = try client.send("l", key, "0")
        if reply == "timeout" { return true }
        let fields = reply.split(separator: " ")
        #expect(fields.first == "ok", "unexpected reply \(reply)")
        _ = try client.send("r", key, String(fields[1]))
        return false
    }

    /// The failure of `acquire()`, which must be a `LockError`.
    private func acquireError(_ lock: DistributedLock) async -> LockError? {
        do {
            let acquired = try await lock.acquire()
            Issue.record("acquire returned \(acquired) instead of failing")
            try? await lock.release()
            return nil
        } catch let error as LockError {
            return error
        } catch {
            Issue.record("not a LockError: \(error)")
            return nil
        }
    }

    private func tlsReason(_ error: LockError?) -> String? {
        if case .tls(let reason) = error { return reason }
        return nil
    }

    // MARK: - A lock over TLS

    @Test func lockOverTLSIsAcquiredRenewedAndReleased() async throws {
        // By IP: the certificate's IP:127.0.0.1 SAN is what is verified.
        let lock = try lock("tls-renewed", tls: TLSOptions(caFile: pki.caFile), leaseTtlS: 2)
        #expect(try await lock.acquire())
        #expect(lock.state == .held)
        let token = lock.token
        #expect((1...2).contains(lock.lease), "2, or 1 if a renewal (0.5.0 rounds down) came first")
        // Five seconds is 2.5 leases: without renewals over TLS the key would be free.
        for _ in 0..<5 {
            try await Task.sleep(for: .seconds(1))
            #expect(try isHeldOnServer("tls-renewed"))
            #expect(lock.state == .held)
            #expect(lock.token == token)
        }
        try await lock.release()
        #expect(lock.state == .closed)
        #expect(try !isHeldOnServer("tls-renewed"))
    }

    @Test func connectingToLocalhostVerifiesTheDNSName() async throws {
        let lock = try lock("tls-localhost", host: "localhost", tls: TLSOptions(caFile: pki.caFile))
        #expect(try await lock.acquire())
        #expect(try isHeldOnServer("tls-localhost"))
        try await lock.release()
        #expect(try !isHeldOnServer("tls-localhost"))
    }

    @Test func rawConnectionCommandsWorkOverTLS() async throws {
        let connection = try Connection(host: "localhost", port: tunnel.port, tls: TLSOptions(caFile: pki.caFile), connectTimeoutMs: 10_000)
        defer { connection.close() }
        let grant = try #require(try await connection.acquire(key: "tls-raw", timeoutS: 1, leaseTtlS: 30))
        #expect(grant.token.count == 32)
        #expect(try await connection.renew(key: "tls-raw", token: grant.token, leaseTtlS: 30) >= 29)
        // Pipelined: several requests in flight on one TLS session, answered in order.
        async let a = connection.acquire(key: "tls-raw-a", timeoutS: 0)
        async let b = connection.acquire(key: "tls-raw-b", timeoutS: 0)
        async let c = connection.acquire(key: "tls-raw", timeoutS: 0)
        let (ga, gb, gc) = try await (a, b, c)
        #expect(ga != nil && gb != nil)
        #expect(gc == nil, "the session already holds tls-raw; a second l times out")
        try await connection.release(key: "tls-raw", token: grant.token)
        #expect(try !isHeldOnServer("tls-raw"))
    }

    // MARK: - Verification

    @Test func systemStoreDoesNotTrustThePrivateCA() async throws {
        let error = await acquireError(try lock("tls-system-store", tls: TLSOptions()))
        let reason = try #require(tlsReason(error), "expected LockError.tls, got \(String(describing: error))")
        #expect(reason.hasPrefix("certificate verify failed: unable to get local issuer certificate"), "\(reason)")
        #expect(error?.description.contains("set caFile") == true, "\(String(describing: error))")
    }

    @Test func certificateFromAnotherCAFailsVerification() async throws {
        let other = try await offThePool { [server] in try Stunnel.start(backendPort: server.port, certificate: .otherCA) }
        let error = await acquireError(try lock("tls-other-ca", port: other.port, tls: TLSOptions(caFile: pki.caFile)))
        let reason = try #require(tlsReason(error), "expected LockError.tls, got \(String(describing: error))")
        #expect(reason.contains("certificate verify failed: unable to get local issuer certificate"), "\(reason)")
        #expect(try !isHeldOnServer("tls-other-ca"))
    }

    @Test func insecureSkipVerifyAcceptsAnyCertificate() async throws {
        let other = try await offThePool { [server] in try Stunnel.start(backendPort: server.port, certificate: .otherCA) }
        let lock = try lock("tls-insecure", port: other.port, tls: TLSOptions(serverName: "wrong.example", insecureSkipVerify: true))
        #expect(try await lock.acquire())
        try await lock.release()
    }

    @Test func hostNameMismatchFails() async throws {
        let error = await acquireError(try lock("tls-wrong-name", tls: TLSOptions(caFile: pki.caFile, serverName: "wrong.example")))
        let reason = try #require(tlsReason(error), "expected LockError.tls, got \(String(describing: error))")
        #expect(reason.hasPrefix("certificate verify failed: hostname mismatch"), "\(reason)")
        #expect(reason.contains("'wrong.example'"), "\(reason)")
    }

    @Test func ipAddressMismatchFails() async throws {
        // The certificate names IP 127.0.0.1, not 127.0.0.2.
        let error = await acquireError(try lock("tls-wrong-ip", tls: TLSOptions(caFile: pki.caFile, serverName: "127.0.0.2")))
        let reason = try #require(tlsReason(error), "expected LockError.tls, got \(String(describing: error))")
        #expect(reason.hasPrefix("certificate verify failed: IP address mismatch"), "\(reason)")
    }

    @Test func serverNameOverridesTheHostConnectedTo() async throws {
        // Connected by IP, verified as localhost (the DNS SAN).
        let lock = try lock("tls-server-name", tls: TLSOptions(caFile: pki.caFile, serverName: "localhost"))
        #expect(try await lock.acquire())
        try await lock.release()
    }

    // MARK: - Mutual TLS

    @Test func clientCertificateIsPresentedWhenConfigured() async throws {
        let mutual = try await offThePool { [server] in try Stunnel.start(backendPort: server.port, requireClientCertificate: true) }
        let withCertificate = try lock("tls-mutual", port: mutual.port,
                                       tls: TLSOptions(caFile: pki.caFile, certificateFile: pki.clientCertificate, privateKeyFile: pki.clientKey))
        #expect(try await withCertificate.acquire())
        #expect(try isHeldOnServer("tls-mutual"))
        try await withCertificate.release()

        // Certificate and key in one PEM file.
        let combined = try lock("tls-mutual", port: mutual.port, tls: TLSOptions(caFile: pki.caFile, certificateFile: pki.clientCombined))
        #expect(try await combined.acquire())
        try await combined.release()

        // TLS 1.3: the client finishes its handshake before the server checks the certificate,
        // so the refusal arrives as an alert on the first read.
        let without = try lock("tls-mutual", port: mutual.port, tls: TLSOptions(caFile: pki.caFile))
        let error = await acquireError(without)
        let reason = try #require(tlsReason(error), "expected LockError.tls, got \(String(describing: error))")
        // Whether the alert is read or a reset comes first, the error says what was missing.
        #expect(reason.hasPrefix("the server asked for a client certificate and none is configured"), "\(reason)")
        #expect(await mutual.logContains("peer did not return a certificate"), "\(mutual.logTail())")
        #expect(try !isHeldOnServer("tls-mutual"))
    }

    // MARK: - Options checked at construction

    @Test func unusableFilesAreRejectedAtConstructionNamingThem() throws {
        let failure = TLSFixture.initializerFailure
        let missing = "/nonexistent/dflockd/ca.pem"
        let ca = failure(TLSOptions(caFile: missing))
        #expect(ca?.name == "tls.caFile")
        #expect(ca?.reason == "cannot read '\(missing)': No such file or directory")

        let notPEM = failure(TLSOptions(caFile: pki.directory + "/openssl.cnf"))
        #expect(notPEM?.name == "tls.caFile")
        #expect(notPEM?.reason.contains("openssl.cnf") == true, "\(String(describing: notPEM))")

        let certificate = failure(TLSOptions(caFile: pki.caFile, certificateFile: "/nonexistent/client.pem", privateKeyFile: pki.clientKey))
        #expect(certificate?.name == "tls.certificateFile")
        #expect(certificate?.reason.contains("/nonexistent/client.pem") == true)

        let key = failure(TLSOptions(caFile: pki.caFile, certificateFile: pki.clientCertificate, privateKeyFile: "/nonexistent/client.key"))
        #expect(key?.name == "tls.privateKeyFile")
        #expect(key?.reason.contains("/nonexistent/client.key") == true)

        let mismatch = failure(TLSOptions(caFile: pki.caFile, certificateFile: pki.clientCertificate, privateKeyFile: pki.serverKey))
        #expect(mismatch?.name == "tls.privateKeyFile")
        #expect(mismatch?.reason.contains("does not match") == true, "\(String(describing: mismatch))")

        let keyOnly = failure(TLSOptions(caFile: pki.caFile, privateKeyFile: pki.clientKey))
        #expect(keyOnly?.name == "tls.privateKeyFile")

        let noKey = failure(TLSOptions(caFile: pki.caFile, certificateFile: pki.clientCertificate))
        #expect(noKey?.name == "tls.certificateFile", "the key is looked for in the certificate file: \(String(describing: noKey))")

        #expect(failure(TLSOptions(caFile: pki.caFile, serverName: ""))?.name == "tls.serverName",
                "an empty name would turn host name checking off")
        #expect(failure(TLSOptions(caFile: pki.caFile, serverName: "a b"))?.name == "tls.serverName")

        #expect(throws: LockError.self) { try Connection(port: 1, tls: TLSOptions(caFile: missing)) }
        #expect(failure(TLSOptions(caFile: pki.caFile)) == nil)
        #expect(failure(TLSOptions()) == nil)
    }

    @Test func oneContextPerDistinctOptionsIsShared() throws {
        let a = try TLSContext.shared(for: TLSOptions(caFile: pki.caFile))
        let b = try TLSContext.shared(for: TLSOptions(caFile: pki.caFile))
        let c = try TLSContext.shared(for: TLSOptions(caFile: pki.caFile, serverName: "localhost"))
        let d = try TLSContext.shared(for: TLSOptions(caFile: pki.caFile, insecureSkipVerify: true))
        #expect(a === b)
        #expect(a === c, "serverName is set per connection, not in the context")
        #expect(a !== d)
        #expect(a.verifiesPeer && !d.verifiesPeer)
    }

    // MARK: - Failure modes

    @Test func connectTimeoutCoversTheHandshake() async throws {
        // A listener that never accepts: the kernel completes the TCP handshake, nobody answers
        // the ClientHello.
        let (fd, port) = try SupportSocket.listenLoopback()
        defer { SupportSocket.closeFD(fd) }
        let lock = try lock("tls-silent", port: port, tls: TLSOptions(caFile: pki.caFile), connectTimeoutMs: 300)
        // Timed on the loop thread: a busy test run can be slow to resume the awaiting task.
        let (result, elapsed) = await withCheckedContinuation { (done: CheckedContinuation<(Result<Bool, LockError>, Duration), Never>) in
            let started = ContinuousClock.now
            lock.acquire { result in done.resume(returning: (result, ContinuousClock.now - started)) }
        }
        #expect(result == .failure(.connectTimeout(host: "127.0.0.1", port: port, milliseconds: 300)))
        #expect(elapsed >= .milliseconds(250))
        #expect(elapsed < .seconds(3))
    }

    @Test func plainServerGivesATLSErrorWithOpenSSLsReason() async throws {
        let lock = try lock("tls-to-plain", port: server.port, tls: TLSOptions(caFile: pki.caFile), connectTimeoutMs: 10_000)
        let error = await acquireError(lock)
        let reason = try #require(tlsReason(error), "expected LockError.tls, got \(String(describing: error))")
        // dflockd answers the ClientHello with a plain `error` line, or just closes.
        #expect(reason.contains("SSL routines") || reason.contains("did not complete"), "\(reason)")
    }

    @Test func plaintextWrittenBeforeTheHandshakeNeverGoesOutInClear() async throws {
        let (listener, port) = try SupportSocket.listenLoopback()
        defer { SupportSocket.closeFD(listener) }
        let loop = EventLoop.shared
        let context = try TLSContext.shared(for: TLSOptions(caFile: pki.caFile))
        let transport = UncheckedSendable(TLSTransport(loop: loop, context: context, options: TLSOptions(caFile: pki.caFile)))
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            loop.execute {
                // A caller error (written before connecting), handled by holding the bytes back.
                Array("l\nk\n5\n".utf8).withUnsafeBytes { transport.value.write($0) }
                transport.value.connect(to: Endpoint(host: "127.0.0.1", port: port), timeoutMilliseconds: 5_000)
                done.resume()
            }
        }
        let accepted = accept(listener, nil, nil)
        #expect(accepted >= 0)
        defer { SupportSocket.closeFD(accepted) }
        var first = [UInt8](repeating: 0, count: 4096)
        #expect(SupportSocket.pollOne(accepted, events: Int16(POLLIN), timeoutMilliseconds: 5_000) != 0)
        let count = recv(accepted, &first, first.count, 0)
        #expect(count > 5)
        #expect(first[0] == 0x16, "a TLS handshake record (ClientHello) comes first")
        #expect(!String(decoding: first.prefix(max(0, count)), as: UTF8.self).contains("l\nk\n5"))
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            loop.execute {
                transport.value.close()
                done.resume()
            }
        }
    }

    @Test func heldBackPlaintextIsSentEncryptedAfterTheHandshake() async throws {
        let loop = EventLoop.shared
        let options = TLSOptions(caFile: pki.caFile)
        let transport = UncheckedSendable(TLSTransport(loop: loop, context: try TLSContext.shared(for: options), options: options))
        let probe = TransportProbe()
        let line: String = await withCheckedContinuation { (done: CheckedContinuation<String, Never>) in
            loop.execute {
                probe.onLine = { done.resume(returning: $0) }
                transport.value.delegate = probe
                Array("l\ntls-held-back\n5\n".utf8).withUnsafeBytes { transport.value.write($0) }
                transport.value.connect(to: Endpoint(host: "127.0.0.1", port: tunnel.port), timeoutMilliseconds: 10_000)
            }
        }
        #expect(line.hasPrefix("ok "), "\(line); events: \(probe.events)")
        #expect(probe.events.first == "connected")
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            loop.execute {
                transport.value.close()
                done.resume()
            }
        }
    }

    @Test(arguments: [false, true])
    func aConnectThatFailsAtOnceCompletesTheRequest(tls: Bool) async throws {
        // uv_tcp_connect refuses a broadcast address synchronously (ENETUNREACH).
        let connection = try Connection(host: "255.255.255.255", port: 9, tls: tls ? TLSOptions(caFile: pki.caFile) : nil)
        await #expect(throws: LockError.self) { try await connection.acquire(key: "k", timeoutS: 0) }
        await #expect(throws: LockError.self) { try await connection.ping() }
    }

    // MARK: - Many

    @Test(.timeLimit(.minutes(3)))
    func fiveHundredConcurrentTLSLocksHoldAndReleaseCleanly() async throws {
        let count = 500
        let server = try await offThePool { try RealServer.start(["--max-locks", "2000"]) }
        let tunnel = try await offThePool { try Stunnel.start(backendPort: server.port) }
        let loop = EventLoop()
        defer { loop.shutdown() }
        let options = TLSOptions(caFile: pki.caFile)
        let locks = try (0..<count).map { index in
            try DistributedLock(key: "tls-many-\(index)", acquireTimeoutS: 30, servers: [("127.0.0.1", tunnel.port)],
                                tls: options, connectTimeoutMs: 60_000, loop: loop)
        }
        // Other suites run in parallel and open descriptors of their own, so the count that must
        // return to its start is that of this process's sockets connected to this stunnel.
        #expect(FileDescriptors.sockets(connectedToPort: tunnel.port) == 0)
        let totalBefore = FileDescriptors.count()
        let heapBefore = FileDescriptors.heapInUseKiB()
        let started = ContinuousClock.now

        try await withThrowingTaskGroup(of: Void.self) { group in
            for lock in locks {
                group.addTask {
                    let acquired = try await lock.acquire()
                    #expect(acquired, "\(lock.key)")
                }
            }
            try await group.waitForAll()
        }
        let acquiredIn = ContinuousClock.now - started
        #expect(locks.allSatisfy { $0.state == .held })
        #expect(FileDescriptors.sockets(connectedToPort: tunnel.port) == count)
        let heapHeld = FileDescriptors.heapInUseKiB()

        // The server agrees: every key is taken.
        let raw = try RawClient(port: server.port)
        let held = try await offThePool {
            try (0..<count).filter { try raw.send("l", "tls-many-\($0)", "0") == "timeout" }.count
        }
        #expect(held == count)

        try await withThrowingTaskGroup(of: Void.self) { group in
            for lock in locks {
                group.addTask { try await lock.release() }
            }
            try await group.waitForAll()
        }
        #expect(locks.allSatisfy { $0.state == .closed })
        // Let the loop run the close callbacks.
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in loop.execute { loop.execute { c.resume() } } }
        #expect(FileDescriptors.sockets(connectedToPort: tunnel.port) == 0)
        // Every handle is closed: only the loop's own wake-up handle is left.
        #expect(await FileDescriptors.handleCount(on: loop) == 1)

        let free = try await offThePool {
            try (0..<count).filter { index in
                let fields = try raw.send("l", "tls-many-\(index)", "0").split(separator: " ")
                guard fields.first == "ok" else { return false }
                _ = try raw.send("r", "tls-many-\(index)", String(fields[1]))
                return true
            }.count
        }
        #expect(free == count)
        raw.close()
        let totalAfter = FileDescriptors.count()
        print("TLS × \(count): acquired in \(acquiredIn), RSS after malloc_trim \(heapBefore) KiB → \(heapHeld) KiB held (≈ \((heapHeld - heapBefore) / count) KiB per TLS lock, all sessions open); descriptors in the process \(totalBefore) → \(totalAfter)")
    }
}

/// A transport delegate that records what it hears, for tests driving a transport directly.
final class TransportProbe: TransportDelegate, @unchecked Sendable {
    var events: [String] = []
    var onLine: ((String) -> Void)?
    private var received: [UInt8] = []

    func transportDidConnect(_ transport: any Transport) {
        events.append("connected")
    }

    func transport(_ transport: any Transport, didRead bytes: UnsafeRawBufferPointer) {
        events.append("read \(bytes.count)")
        received += bytes
        if let newline = received.firstIndex(of: 0x0A) {
            let line = String(decoding: received[..<newline], as: UTF8.self)
            received.removeSubrange(...newline)
            onLine?(line)
            onLine = nil
        }
    }

    func transport(_ transport: any Transport, didFailWith error: LockError) {
        events.append("failed: \(error)")
        onLine?("failed: \(error)")
        onLine = nil
    }
}

/// This process's descriptors and handles, for leak checks.
enum FileDescriptors {
    /// Entries in /proc/self/fd.
    static func count() -> Int {
        (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? -1
    }

    /// This process's descriptors that are TCP sockets whose remote end is 127.0.0.1:`port`.
    static func sockets(connectedToPort port: Int) -> Int {
        guard let table = TestSupport.readProcFile("/proc/net/tcp") else { return -1 }
        let remote = String(format: "0100007F:%04X", port)
        var inodes: Set<Substring> = []
        for line in table.split(separator: "\n").dropFirst() {
            let fields = line.split(separator: " ")
            guard fields.count > 9, fields[2] == remote else { continue }
            inodes.insert(fields[9])
        }
        let fm = FileManager.default
        guard let fds = try? fm.contentsOfDirectory(atPath: "/proc/self/fd") else { return -1 }
        var found = 0
        for fd in fds {
            guard let target = try? fm.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(fd)"),
                  target.hasPrefix("socket:[") else { continue }
            if inodes.contains(target.dropFirst("socket:[".count).dropLast()) { found += 1 }
        }
        return found
    }

    /// VmRSS after giving free heap pages back to the system (glibc's `malloc_trim`, looked up
    /// with dlsym as malloc.h is not in Swift's Glibc module): close to what is held now rather
    /// than the peak, which 500 simultaneous handshakes push up.
    static func heapInUseKiB() -> Int {
        typealias Trim = @convention(c) (Int) -> Int32
        if let handle = dlopen(nil, RTLD_NOW) {
            defer { dlclose(handle) }
            if let symbol = dlsym(handle, "malloc_trim") { _ = unsafeBitCast(symbol, to: Trim.self)(0) }
        }
        return residentKiB()
    }

    /// VmRSS of this process, in KiB.
    static func residentKiB() -> Int {
        guard let status = TestSupport.readProcFile("/proc/self/status") else { return 0 }
        for line in status.split(separator: "\n") where line.hasPrefix("VmRSS:") {
            return Int(line.split(separator: " ")[1]) ?? 0
        }
        return 0
    }

    /// The number of libuv handles (open or closing) on `loop`.
    static func handleCount(on loop: EventLoop) async -> Int {
        await withCheckedContinuation { (done: CheckedContinuation<Int, Never>) in
            loop.execute {
                var count = 0
                uv_walk(loop.raw, { _, argument in
                    argument?.assumingMemoryBound(to: Int.self).pointee += 1
                }, &count)
                done.resume(returning: count)
            }
        }
    }
}

/// The suite's shared dflockd and stunnel, started on first use and stopped at exit.
enum SharedTLSBackend {
    private static let started = ThreadLock<(RealServer, Stunnel)?>(nil)

    static func get() throws -> (TestPKI, RealServer, Stunnel) {
        let pki = try TLSFixture.pki()
        let (server, tunnel) = try started.withLock { started in
            if let started { return started }
            let server = try RealServer.start()
            let tunnel = try Stunnel.start(backendPort: server.port)
            started = (server, tunnel)
            atexit { SharedTLSBackend.stop() }
            return (server, tunnel)
        }
        return (pki, server, tunnel)
    }

    private static func stop() {
        started.withLock { started in
            started?.1.stop()
            started?.0.stop()
            started = nil
        }
    }
}
