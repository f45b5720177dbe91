import CUV  // see TestSupport.swift: the socket constants of <netinet/in.h> may live in CUV
import Foundation
import Testing
@testable import DflockdClient

#if canImport(Glibc)
import Glibc
#endif

/// `auth` against the real Go dflockd 1.10.0 started with `--auth-token s3cret`: in clear and
/// over its native TLS (`--tls-cert/--tls-key`, verified against the test PKI's private CA as
/// localhost). The sequence is the one recorded in go-1.10-auth.txt and go-1.10-tls-auth.txt.
@Suite(.timeLimit(.minutes(2)))
struct AuthTests {
    static let secret = "s3cret"
    static let wrongSecret = "wrong"
    /// Refused before anything is sent. Each contains the secret, to check it is never echoed.
    static let invalidSecrets = ["s3cret\n", "s3cret\nl\nk\n5", "s3cret\r", "\0s3cret",
                                 "s3cret" + String(repeating: "x", count: 64 * 1024)]

    enum API: String, CustomStringConvertible, CaseIterable {
        case lock, connection
        var description: String { rawValue }
    }

    enum Wire: String, CustomStringConvertible, CaseIterable {
        case plain, tls
        var description: String { rawValue }
    }

    /// Collects every error a test produced, and every text form of its objects, for the
    /// secret check.
    final class Evidence: Sendable {
        private let texts = ThreadLock<[String]>([])
        private let errors = ThreadLock<[LockError]>([])

        func record(_ error: LockError) {
            errors.withLock { $0.append(error) }
            note(error)
        }

        /// Every way a lock or connection can be turned into text. On its loop thread: a dump
        /// reads loop-confined state.
        func note(_ object: any Sendable, on loop: EventLoop) async {
            await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
                loop.execute {
                    self.note(object)
                    done.resume()
                }
            }
        }

        /// Every way the value can be turned into text.
        func note(_ value: Any) {
            var dumped = ""
            dump(value, to: &dumped)
            var forms = [String(describing: value), String(reflecting: value), dumped]
            if let error = value as? any Error { forms.append(error.localizedDescription) }
            texts.withLock { $0 += forms }
        }

        var recordedErrors: [LockError] { errors.withLock { $0 } }

        /// Texts that contain `secret`. The transcript's wrong secret is the plain word "wrong":
        /// the phrases other suites legitimately use (`serverName: "wrong.example"`, OpenSSL's
        /// "wrong version number") are left out, in case a dump reaches them.
        func leaks(of secret: String) -> [String] {
            texts.withLock { texts in
                texts.filter {
                    $0.replacingOccurrences(of: "wrong.example", with: "")
                        .replacingOccurrences(of: "wrong version number", with: "")
                        .contains(secret)
                }
            }
        }
    }

    /// Runs `body`, which must throw a LockError; records and returns it.
    private func expectFailure(_ evidence: Evidence, _ what: String, _ body: () async throws -> Void) async -> LockError? {
        do {
            try await body()
            Issue.record("\(what) succeeded")
            return nil
        } catch let error as LockError {
            evidence.record(error)
            return error
        } catch {
            Issue.record("\(what): not a LockError: \(error)")
            return nil
        }
    }

    /// Plays the client side of the recorded sequence against `port`: a command before auth,
    /// the wrong secret, the right one.
    private func authSequence(host: String, port: Int, tls: TLSOptions?, api: API, evidence: Evidence) async throws {
        let anyToken = "0123456789abcdef0123456789abcdef"
        // A loop of its own: dumps of its objects then show this test's state only.
        let loop = EventLoop()
        defer { loop.shutdown() }
        // Secrets with a line break, a NUL or over 64 KiB: refused at construction, so no byte
        // (not even a connection) reaches the peer; its first connection must be the next step's.
        for invalid in Self.invalidSecrets {
            let error = await expectFailure(evidence, "a secret with a line break or NUL") {
                switch api {
                case .lock: _ = try DistributedLock(key: "k", servers: [(host, port)], tls: tls, auth: invalid, loop: loop)
                case .connection: _ = try Connection(host: host, port: port, tls: tls, auth: invalid, loop: loop)
                }
            }
            guard case .invalidArgument(let name, _)? = error else {
                Issue.record("expected invalidArgument(auth), got \(String(describing: error))")
                continue
            }
            #expect(name == "auth")
        }

        func lock(auth: String?) async throws -> DistributedLock {
            let lock = try DistributedLock(key: "k", acquireTimeoutS: 5, servers: [(host, port)], tls: tls, auth: auth,
                                           connectTimeoutMs: 10_000, loop: loop)
            await evidence.note(lock, on: loop)
            return lock
        }
        func connection(auth: String?) async throws -> Connection {
            let connection = try Connection(host: host, port: port, tls: tls, auth: auth, connectTimeoutMs: 10_000, loop: loop)
            await evidence.note(connection, on: loop)
            return connection
        }

        // A command before auth: error_auth, and the server closes.
        switch api {
        case .lock:
            let noAuth = try await lock(auth: nil)
            #expect(await expectFailure(evidence, "acquire without auth") { _ = try await noAuth.acquire() } == .authFailed)
            #expect(noAuth.state == .closed)
        case .connection:
            let noAuth = try await connection(auth: nil)
            #expect(await expectFailure(evidence, "l without auth") { _ = try await noAuth.acquire(key: "k", timeoutS: 5) } == .authFailed)
            #expect(await expectFailure(evidence, "a request after the failure") { try await noAuth.release(key: "k", token: anyToken) } == .authFailed,
                    "the connection stays closed with the reason")
        }

        // The wrong secret: error_auth, and the server closes.
        switch api {
        case .lock:
            let wrong = try await lock(auth: Self.wrongSecret)
            #expect(await expectFailure(evidence, "acquire with the wrong secret") { _ = try await wrong.acquire() } == .authFailed)
            await evidence.note(wrong, on: loop)
        case .connection:
            let wrong = try await connection(auth: Self.wrongSecret)
            #expect(await expectFailure(evidence, "connect with the wrong secret") { try await wrong.connect() } == .authFailed)
            await evidence.note(wrong, on: loop)
        }

        // The right secret: auth ok, then the lock.
        switch api {
        case .lock:
            let right = try await lock(auth: Self.secret)
            #expect(try await right.acquire())
            #expect(right.token?.count == 32)
            await evidence.note(right, on: loop)
            try await right.release()
        case .connection:
            let right = try await connection(auth: Self.secret)
            try await right.connect()
            await evidence.note(right, on: loop)
            let grant = try #require(try await right.acquire(key: "k", timeoutS: 5))
            #expect(grant.token.count == 32)
            try await right.release(key: "k", token: grant.token)
            right.close()
        }
    }

    @Test(arguments: Wire.allCases, API.allCases)
    func authOnTheGoServer(wire: Wire, api: API) async throws {
        let evidence = Evidence()
        switch wire {
        case .plain:
            let server = try await RealServer.launch(.go, [.authToken(Self.secret)])
            try await authSequence(host: "127.0.0.1", port: server.port, tls: nil, api: api, evidence: evidence)
        case .tls:
            let pki = try await offThePool { try TLSFixture.pki() }
            let server = try await RealServer.launch(.go, [.authToken(Self.secret),
                                                           .tls(certificate: pki.serverCertificate, key: pki.serverKey)])
            try await authSequence(host: "localhost", port: server.port, tls: TLSOptions(caFile: pki.caFile), api: api,
                                   evidence: evidence)
        }
        let expected = Self.invalidSecrets.count + (api == .lock ? 2 : 3)
        #expect(evidence.recordedErrors.count == expected)
        #expect(evidence.recordedErrors.dropFirst(Self.invalidSecrets.count).allSatisfy { $0 == .authFailed })
        for secret in [Self.secret, Self.wrongSecret] {
            let leaks = evidence.leaks(of: secret)
            #expect(leaks.isEmpty, "the secret '\(secret)' appears in: \(leaks.map { String($0.prefix(300)) })")
        }
    }

    @Test func anUnvalidatedSecretIsRefusedBeforeConnecting() async throws {
        // The internal initializer skips validation; connecting must still refuse the secret
        // rather than connect without auth (or with a second command smuggled in).
        let (listener, port) = try SupportSocket.listenLoopback()
        defer { SupportSocket.closeFD(listener) }
        let caFile = try await offThePool { try TLSFixture.pki().caFile }
        for tls in [nil, TLSOptions(caFile: caFile)] {
            let configuration = Connection.Configuration(tls: tls, auth: "s3cret\nl\nk\n5", connectTimeoutMs: 5_000, socketTimeoutMs: nil)
            let connection = Connection(endpoint: Endpoint(host: "127.0.0.1", port: port), configuration: configuration, loop: .shared)
            await #expect(throws: LockError.invalidArgument(name: "auth", reason: "must not contain a line break or NUL")) {
                try await connection.acquire(key: "k", timeoutS: 5)
            }
            #expect(!"\(connection.configuration)".contains("s3cret"))
        }
        SupportSocket.setNonBlocking(listener)
        let accepted = accept(listener, nil, nil)
        #expect(accepted < 0 && errno == EAGAIN, "no connection was made")
        if accepted >= 0 { SupportSocket.closeFD(accepted) }
    }

    @Test func requestsAndConfigurationsNeverShowTheSecret() async throws {
        let request = try Request.auth(secret: "s3cret")
        var dumped = ""
        dump(request, to: &dumped)
        for text in [String(describing: request), String(reflecting: request), dumped] {
            #expect(!text.contains("s3cret"), "\(text)")
            #expect(text.contains("<redacted>"), "\(text)")
        }
        #expect(request.bytes == Array("auth\n_\ns3cret\n".utf8), "what goes on the wire is unchanged")
        let loop = EventLoop()
        defer { loop.shutdown() }
        let lock = try DistributedLock(key: "k", auth: "s3cret", loop: loop)
        let connection = try Connection(auth: "s3cret", loop: loop)
        let evidence = Evidence()
        await evidence.note(lock, on: loop)
        await evidence.note(connection, on: loop)
        #expect(evidence.leaks(of: "s3cret").isEmpty, "\(evidence.leaks(of: "s3cret"))")
        let release = try Request.release(key: "k", token: "0123456789abcdef0123456789abcdef")
        #expect(String(describing: release) == "r k 0123456789abcdef0123456789abcdef", "other arguments are shown")
    }
}
