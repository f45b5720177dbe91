import CUV
import Foundation
import Testing
@testable import DflockdClient

#if canImport(Glibc)
import Glibc
#endif

/// TLS on the wire, against two real TLS servers (certificates the tests make with `openssl`,
/// Support/TLSFixture.swift): the Go dflockd 1.10.0's own TLS (`--tls-cert/--tls-key`), and
/// stunnel4 terminating TLS in front of dflockd 0.5.0. Tests of what the server side does run
/// on both (`TLSServer`); mutual TLS only behind stunnel (1.10 asks for no client certificate).
@Suite(.timeLimit(.minutes(3)))
struct TLSTests {
    let pki: TestPKI

    init() async throws {
        pki = try await offThePool { try TLSFixture.pki() }
    }

    private func lock(_ key: String, host: String = "127.0.0.1", port: Int, tls: TLSOptions,
                      leaseTtlS: Int? = nil, connectTimeoutMs: Int? = 10_000) throws -> DistributedLock {
        try DistributedLock(key: key, acquireTimeoutS: 5, leaseTtlS: leaseTtlS, servers: [(host, port)],
                            tls: tls, connectTimeoutMs: connectTimeoutMs)
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

    @Test(arguments: TLSServer.allCases)
    func lockOverTLSIsAcquiredRenewedAndReleased(on server: TLSServer) async throws {
        let bed = try await server.shared()
        // By IP: the certificate's IP:127.0.0.1 SAN is what is verified.
        // 3 s: dflockd 0.5.0 answers a renewal with a second less, and a 2 s lease then leaves
        // 1 s, too little for ThreadSanitizer's slower loop on a loaded machine.
        let lock = try lock("tls-renewed", port: bed.tlsPort, tls: TLSOptions(caFile: pki.caFile), leaseTtlS: 3)
        #expect(try await lock.acquire())
        #expect(lock.state == .held)
        let token = lock.token
        #expect((2...3).contains(lock.lease), "3, or 2 if a renewal (0.5.0 rounds down) came first")
        // Seven seconds is more than two leases: without renewals over TLS the key would be free.
        for _ in 0..<7 {
            try await Task.sleep(for: .seconds(1))
            #expect(try await bed.isHeld("tls-renewed"))
            #expect(lock.state == .held)
            #expect(lock.token == token)
        }
        try await lock.release()
        #expect(lock.state == .closed)
        #expect(try await !bed.isHeld("tls-renewed"))
    }

    @Test(arguments: TLSServer.allCases)
    func connectingToLocalhostVerifiesTheDNSName(on server: TLSServer) async throws {
        let bed = try await server.shared()
        let lock = try lock("tls-localhost", host: "localhost", port: bed.tlsPort, tls: TLSOptions(caFile: pki.caFile))
        #expect(try await lock.acquire())
        #expect(try await bed.isHeld("tls-localhost"))
        try await lock.release()
        #expect(try await !bed.isHeld("tls-localhost"))
    }

    @Test(arguments: TLSServer.allCases)
    func rawConnectionCommandsWorkOverTLS(on server: TLSServer) async throws {
        let bed = try await server.shared()
        let connection = try Connection(host: "localhost", port: bed.tlsPort, tls: TLSOptions(caFile: pki.caFile), connectTimeoutMs: 10_000)
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
        #expect(try await !bed.isHeld("tls-raw"))
    }

    // MARK: - Verification

    @Test(arguments: TLSServer.allCases)
    func systemStoreDoesNotTrustThePrivateCA(on server: TLSServer) async throws {
        let bed = try await server.shared()
        let error = await acquireError(try lock("tls-system-store", port: bed.tlsPort, tls: TLSOptions()))
        let reason = try #require(tlsReason(error), "expected LockError.tls, got \(String(describing: error))")
        #expect(reason.hasPrefix("certificate verify failed: unable to get local issuer certificate"), "\(reason)")
        #expect(error?.description.contains("set caFile") == true, "\(String(describing: error))")
    }

    @Test(arguments: TLSServer.allCases)
    func certificateFromAnotherCAFailsVerification(on server: TLSServer) async throws {
        let bed = try await server.shared()
        let other = try await bed.withOtherCA()
        let error = await acquireError(try lock("tls-other-ca", port: other.tlsPort, tls: TLSOptions(caFile: pki.caFile)))
        let reason = try #require(tlsReason(error), "expected LockError.tls, got \(String(describing: error))")
        #expect(reason.contains("certificate verify failed: unable to get local issuer certificate"), "\(reason)")
        #expect(try await !other.isHeld("tls-other-ca"))
    }

    @Test(arguments: TLSServer.allCases)
    func insecureSkipVerifyAcceptsAnyCertificate(on server: TLSServer) async throws {
        let bed = try await server.shared()
        let other = try await bed.withOtherCA()
        let lock = try lock("tls-insecure", port: other.tlsPort, tls: TLSOptions(serverName: "wrong.example", insecureSkipVerify: true))
        #expect(try await lock.acquire())
        try await lock.release()
    }

    @Test(arguments: TLSServer.allCases)
    func hostNameMismatchFails(on server: TLSServer) async throws {
        let bed = try await server.shared()
        let error = await acquireError(try lock("tls-wrong-name", port: bed.tlsPort, tls: TLSOptions(caFile: pki.caFile, serverName: "wrong.example")))
        let reason = try #require(tlsReason(error), "expected LockError.tls, got \(String(describing: error))")
        #expect(reason.hasPrefix("certificate verify failed: hostname mismatch"), "\(reason)")
        #expect(reason.contains("'wrong.example'"), "\(reason)")
    }

    @Test(arguments: TLSServer.allCases)
    func ipAddressMismatchFails(on server: TLSServer) async throws {
        let bed = try await server.shared()
        // The certificate names IP 127.0.0.1, not 127.0.0.2.
        let error = await acquireError(try lock("tls-wrong-ip", port: bed.tlsPort, tls: TLSOptions(caFile: pki.caFile, serverName: "127.0.0.2")))
        let reason = try #require(tlsReason(error), "expected LockError.tls, got \(String(describing: error))")
        #expect(reason.hasPrefix("certificate verify failed: IP address mismatch"), "\(reason)")
    }

    @Test(arguments: TLSServer.allCases)
    func serverNameOverridesTheHostConnectedTo(on server: TLSServer) async throws {
        let bed = try await server.shared()
        // Connected by IP, verified as localhost (the DNS SAN).
        let lock = try lock("tls-server-name", port: bed.tlsPort, tls: TLSOptions(caFile: pki.caFile, serverName: "localhost"))
        #expect(try await lock.acquire())
        try await lock.release()
    }

    // MARK: - Mutual TLS

    @Test func clientCertificateIsPresentedWhenConfigured() async throws {
        let bed = try await TLSServer.stunnelPython.shared()
        let server = try #require(bed.plainServer)
        let mutual = try await offThePool { [server] in try Stunnel.start(backendPort: server.port, requireClientCertificate: true) }
        let withCertificate = try lock("tls-mutual", port: mutual.port,
                                       tls: TLSOptions(caFile: pki.caFile, certificateFile: pki.clientCertificate, privateKeyFile: pki.clientKey))
        #expect(try await withCertificate.acquire())
        #expect(try await bed.isHeld("tls-mutual"))
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
        #expect(try await !bed.isHeld("tls-mutual"))
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

    @Test(arguments: TLSServer.allCases)
    func plainServerGivesATLSErrorWithOpenSSLsReason(on server: TLSServer) async throws {
        let bed = try await server.shared()
        let plain = try await bed.plainServerOfTheSameKind()
        let lock = try lock("tls-to-plain", port: plain.port, tls: TLSOptions(caFile: pki.caFile), connectTimeoutMs: 10_000)
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

    @Test(arguments: TLSServer.allCases)
    func heldBackPlaintextIsSentEncryptedAfterTheHandshake(on server: TLSServer) async throws {
        let bed = try await server.shared()
        let loop = EventLoop.shared
        let options = TLSOptions(caFile: pki.caFile)
        let transport = UncheckedSendable(TLSTransport(loop: loop, context: try TLSContext.shared(for: options), options: options))
        let probe = TransportProbe()
        let line: String = await withCheckedContinuation { (done: CheckedContinuation<String, Never>) in
            loop.execute {
                probe.onLine = { done.resume(returning: $0) }
                transport.value.delegate = probe
                Array("l\ntls-held-back\n5\n".utf8).withUnsafeBytes { transport.value.write($0) }
                transport.value.connect(to: Endpoint(host: "127.0.0.1", port: bed.tlsPort), timeoutMilliseconds: 10_000)
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

    @Test(.timeLimit(.minutes(3)), arguments: TLSServer.allCases)
    func fiveHundredConcurrentTLSLocksHoldAndReleaseCleanly(on server: TLSServer) async throws {
        let count = 500
        let bed = try await server.start(maxLocks: 2000)
        let tunnelPort = bed.tlsPort
        let loop = EventLoop()
        defer { loop.shutdown() }
        let options = TLSOptions(caFile: pki.caFile)
        let locks = try (0..<count).map { index in
            try DistributedLock(key: "tls-many-\(index)", acquireTimeoutS: 30, servers: [("127.0.0.1", tunnelPort)],
                                tls: options, connectTimeoutMs: 60_000, loop: loop)
        }
        // Other suites run in parallel and open descriptors of their own, so the count that must
        // return to its start is that of this process's sockets connected to this stunnel.
        #expect(FileDescriptors.sockets(connectedToPort: tunnelPort) == 0)
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
        #expect(FileDescriptors.sockets(connectedToPort: tunnelPort) == count)
        let heapHeld = FileDescriptors.heapInUseKiB()

        // The server agrees: every key is taken.
        var held = 0
        for index in 0..<count where try await bed.isHeld("tls-many-\(index)") { held += 1 }
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
        #expect(FileDescriptors.sockets(connectedToPort: tunnelPort) == 0)
        // Every handle is closed: only the loop's own wake-up handle is left.
        #expect(await FileDescriptors.handleCount(on: loop) == 1)

        var free = 0
        for index in 0..<count where try await !bed.isHeld("tls-many-\(index)") { free += 1 }
        #expect(free == count)
        let totalAfter = FileDescriptors.count()
        print("TLS × \(count) on \(server.testDescription): acquired in \(acquiredIn), RSS after malloc_trim \(heapBefore) KiB → \(heapHeld) KiB held (≈ \((heapHeld - heapBefore) / count) KiB per TLS lock, all sessions open); descriptors in the process \(totalBefore) → \(totalAfter)")
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

/// A real TLS dflockd endpoint for the tests: the Go server's own TLS, or stunnel in front of
/// the Python server.
enum TLSServer: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case goNative
    case stunnelPython

    var testDescription: String {
        switch self {
        case .goNative: "\(ServerKind.go), native TLS"
        case .stunnelPython: "stunnel4 in front of \(ServerKind.python)"
        }
    }

    /// The suite's shared endpoint of this kind (tests use keys of their own), started on first
    /// use and stopped at exit.
    func shared() async throws -> TLSBed {
        try await offThePool { try SharedTLSBackend.get(self) }
    }

    /// An endpoint of its own, for a test that needs a fresh server.
    func start(maxLocks: Int? = nil, certificate: Stunnel.Certificate = .trusted) async throws -> TLSBed {
        try await offThePool { try TLSBed.start(self, maxLocks: maxLocks, certificate: certificate) }
    }
}

/// One TLS endpoint and what runs behind it.
struct TLSBed: Sendable {
    let kind: TLSServer
    let pki: TestPKI
    /// Where TLS clients connect.
    let tlsPort: Int
    /// The CA that issued the endpoint's certificate.
    let caFile: String
    /// The Python server behind stunnel (plain TCP); nil for the Go server, which speaks TLS only.
    let plainServer: RealServer?
    /// What keeps the endpoint alive: the Go server, or stunnel.
    let owners: [any Sendable]

    static func start(_ kind: TLSServer, maxLocks: Int? = nil, certificate: Stunnel.Certificate = .trusted) throws -> TLSBed {
        let pki = try TLSFixture.pki()
        let options: [ServerOption] = maxLocks.map { [.maxLocks($0)] } ?? []
        switch kind {
        case .goNative:
            let (cert, key) = certificate == .otherCA
                ? (pki.otherServerCertificate, pki.otherServerKey) : (pki.serverCertificate, pki.serverKey)
            let server = try RealServer.start(.go, options + [.tls(certificate: cert, key: key)])
            return TLSBed(kind: kind, pki: pki, tlsPort: server.port, caFile: certificate == .otherCA ? pki.otherCAFile : pki.caFile,
                          plainServer: nil, owners: [server])
        case .stunnelPython:
            let server = try RealServer.start(.python, options)
            let tunnel = try Stunnel.start(backendPort: server.port, certificate: certificate)
            return TLSBed(kind: kind, pki: pki, tlsPort: tunnel.port, caFile: certificate == .otherCA ? pki.otherCAFile : pki.caFile,
                          plainServer: server, owners: [server, tunnel])
        }
    }

    /// An endpoint of the same kind presenting a certificate from another CA.
    func withOtherCA() async throws -> TLSBed {
        switch kind {
        case .goNative: return try await kind.start(certificate: .otherCA)
        case .stunnelPython:
            let server = try #require(plainServer)
            let tunnel = try await offThePool { try Stunnel.start(backendPort: server.port, certificate: .otherCA) }
            return TLSBed(kind: kind, pki: pki, tlsPort: tunnel.port, caFile: pki.otherCAFile, plainServer: server,
                          owners: owners + [tunnel])
        }
    }

    /// A plain-TCP server of the same kind (the one behind stunnel, or a new Go server without TLS).
    func plainServerOfTheSameKind() async throws -> RealServer {
        if let plainServer { return plainServer }
        return try await RealServer.launch(.go)
    }

    /// Whether another client finds `key` taken: `l <key> 0` answered `timeout` (a grant is
    /// released at once). On the plain port behind stunnel with a raw client; on the Go server
    /// through a TLS connection of this library, verified against the test CA.
    func isHeld(_ key: String) async throws -> Bool {
        if let plainServer {
            return try await offThePool { try DflockdClientTests.isHeld(key, port: plainServer.port) }
        }
        let connection = try Connection(port: tlsPort, tls: TLSOptions(caFile: caFile), connectTimeoutMs: 10_000)
        defer { connection.close() }
        guard let grant = try await connection.acquire(key: key, timeoutS: 0) else { return true }
        try await connection.release(key: key, token: grant.token)
        return false
    }
}

/// The suite's shared endpoints, one per kind, started on first use and stopped at exit.
enum SharedTLSBackend {
    private static let started = ThreadLock<[TLSServer: TLSBed]>([:])

    static func get(_ kind: TLSServer) throws -> TLSBed {
        try started.withLock { started in
            if let bed = started[kind] { return bed }
            let bed = try TLSBed.start(kind)
            if started.isEmpty { atexit { SharedTLSBackend.stop() } }
            started[kind] = bed
            return bed
        }
    }

    private static func stop() {
        started.withLock { started in
            for bed in started.values {
                for case let tunnel as Stunnel in bed.owners { tunnel.stop() }
                for case let server as RealServer in bed.owners { server.stop() }
            }
            started = [:]
        }
    }
}
