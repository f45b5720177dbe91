import Foundation
import Testing
@testable import DflockdClient

/// TLS material from memory (`caPEM`, `certificatePEM`, `privateKeyPEM`) and encrypted private
/// keys (`privateKeyPassword`). Server verification is tested against the Go dflockd 1.10
/// server's own TLS (`--tls-cert/--tls-key`); client certificates against stunnel4 requiring
/// one in front of dflockd 0.5.0 (the Go 1.10 server asks for none). Certificates come from
/// Support/TLSFixture.swift.
@Suite(.timeLimit(.minutes(3)))
struct TLSMemoryTests {
    let pki: TestPKI

    init() throws {
        pki = try TLSFixture.pki()
    }

    private func failure(_ options: TLSOptions) -> (name: String, reason: String)? {
        TLSFixture.initializerFailure(options)
    }

    // MARK: - Against the Go server's native TLS (dflockd 1.10)

    @Test("caPEM verifies the Go server's certificate: lock and Connection work over its native TLS")
    func caPEMAgainstGoServer() async throws {
        let server = try await RealServer.launch(.go, [.tls(certificate: pki.serverCertificate, key: pki.serverKey)])
        let tls = TLSOptions(caPEM: try pki.text(pki.caFile))
        let lock = try DistributedLock(key: "tls-memory", acquireTimeoutS: 5, servers: [("127.0.0.1", server.port)],
                                       tls: tls, connectTimeoutMs: 10_000)
        defer { lock.close() }
        #expect(try await lock.acquire())
        #expect(lock.token != nil)
        try await lock.release()

        // by name too: the certificate is for localhost and 127.0.0.1
        let connection = try Connection(host: "localhost", port: server.port, tls: tls, connectTimeoutMs: 10_000)
        defer { connection.close() }
        let grant = try #require(try await connection.acquire(key: "tls-memory-2", timeoutS: 5))
        _ = try await connection.renew(key: "tls-memory-2", token: grant.token)
        try await connection.release(key: "tls-memory-2", token: grant.token)
    }

    @Test("caPEM of another CA: the Go server's certificate is refused")
    func wrongCAPEMAgainstGoServer() async throws {
        let server = try await RealServer.launch(.go, [.tls(certificate: pki.serverCertificate, key: pki.serverKey)])
        let lock = try DistributedLock(key: "tls-memory-wrong-ca", acquireTimeoutS: 5, servers: [("127.0.0.1", server.port)],
                                       tls: TLSOptions(caPEM: try pki.text(pki.otherCAFile)), connectTimeoutMs: 10_000)
        defer { lock.close() }
        do {
            _ = try await lock.acquire()
            Issue.record("acquire succeeded against a certificate the CA did not issue")
        } catch let error as LockError {
            guard case .tls(let reason) = error else { Issue.record("expected LockError.tls, got \(error)"); return }
            #expect(reason.contains("certificate verify failed"), "\(reason)")
        }
    }

    // MARK: - Client certificates and encrypted keys (stunnel requiring a client certificate)

    @Test("mutual TLS with certificate and key from memory, the key encrypted (PKCS#8 and traditional) or not")
    func clientCertificateFromMemory() async throws {
        let server = try await offThePool { try RealServer.start() }
        let mutual = try await offThePool { try Stunnel.start(backendPort: server.port, requireClientCertificate: true) }
        let ca = try pki.text(pki.caFile)
        let certificate = try pki.text(pki.clientCertificate)
        #expect(try pki.text(pki.clientKeyEncryptedPKCS8).contains("BEGIN ENCRYPTED PRIVATE KEY"))
        #expect(try pki.text(pki.clientKeyEncryptedTraditional).contains("Proc-Type: 4,ENCRYPTED"))
        let variants: [(String, TLSOptions)] = [
            ("plain key PEM", TLSOptions(caPEM: ca, certificatePEM: certificate, privateKeyPEM: try pki.text(pki.clientKey))),
            ("PKCS#8 encrypted key PEM", TLSOptions(caPEM: ca, certificatePEM: certificate,
                                                    privateKeyPEM: try pki.text(pki.clientKeyEncryptedPKCS8), privateKeyPassword: pki.clientKeyPassword)),
            ("traditional encrypted key PEM", TLSOptions(caPEM: ca, certificatePEM: certificate,
                                                         privateKeyPEM: try pki.text(pki.clientKeyEncryptedTraditional), privateKeyPassword: pki.clientKeyPassword)),
            ("encrypted key file", TLSOptions(caFile: pki.caFile, certificateFile: pki.clientCertificate,
                                              privateKeyFile: pki.clientKeyEncryptedPKCS8, privateKeyPassword: pki.clientKeyPassword)),
            ("certificate and key in one PEM", TLSOptions(caPEM: ca, certificatePEM: try pki.text(pki.clientCombined))),
            ("file certificate, PEM key", TLSOptions(caFile: pki.caFile, certificateFile: pki.clientCertificate,
                                                     privateKeyPEM: try pki.text(pki.clientKeyEncryptedTraditional), privateKeyPassword: pki.clientKeyPassword)),
        ]
        for (name, tls) in variants {
            let lock = try DistributedLock(key: "tls-mutual-memory", acquireTimeoutS: 5, servers: [("127.0.0.1", mutual.port)],
                                           tls: tls, connectTimeoutMs: 10_000)
            #expect(try await lock.acquire(), "\(name)")
            try await lock.release()
            lock.close()
        }
    }

    // MARK: - Refused at the initializer, naming the option

    @Test("a file and PEM text for the same thing is an invalidArgument naming the PEM option")
    func fileAndPEMConflict() throws {
        let ca = try pki.text(pki.caFile)
        #expect(failure(TLSOptions(caFile: pki.caFile, caPEM: ca))?.name == "tls.caPEM")
        #expect(failure(TLSOptions(caFile: pki.caFile, certificateFile: pki.clientCertificate, privateKeyFile: pki.clientKey,
                                   certificatePEM: try pki.text(pki.clientCertificate)))?.name == "tls.certificatePEM")
        #expect(failure(TLSOptions(caFile: pki.caFile, certificateFile: pki.clientCertificate, privateKeyFile: pki.clientKey,
                                   privateKeyPEM: try pki.text(pki.clientKey)))?.name == "tls.privateKeyPEM")
        #expect(throws: LockError.self) { try Connection(port: 1, tls: TLSOptions(caFile: pki.caFile, caPEM: ca)) }
    }

    @Test("unusable PEM text is refused naming its option, without quoting the key")
    func unusablePEM() throws {
        let ca = try pki.text(pki.caFile)
        let certificate = try pki.text(pki.clientCertificate)
        let key = try pki.text(pki.clientKey)
        #expect(failure(TLSOptions(caPEM: "not a certificate"))?.name == "tls.caPEM")
        #expect(failure(TLSOptions(caPEM: ""))?.name == "tls.caPEM")
        #expect(failure(TLSOptions(caPEM: key))?.name == "tls.caPEM", "a key is no CA certificate")
        let truncated = String(ca.prefix(ca.count / 2))
        #expect(failure(TLSOptions(caPEM: truncated))?.name == "tls.caPEM")
        #expect(failure(TLSOptions(caPEM: ca, certificatePEM: "junk", privateKeyPEM: key))?.name == "tls.certificatePEM")
        let badKey = failure(TLSOptions(caPEM: ca, certificatePEM: certificate, privateKeyPEM: "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"))
        #expect(badKey?.name == "tls.privateKeyPEM", "\(String(describing: badKey))")
        let mismatch = failure(TLSOptions(caPEM: ca, certificatePEM: certificate, privateKeyPEM: try pki.text(pki.serverKey)))
        #expect(mismatch?.name == "tls.privateKeyPEM")
        #expect(mismatch?.reason.contains("does not match") == true, "\(String(describing: mismatch))")
        #expect(mismatch?.reason.contains("BEGIN") == false, "the key's text must not be quoted")
        let noKey = failure(TLSOptions(caPEM: ca, certificatePEM: certificate))
        #expect(noKey?.name == "tls.certificatePEM", "the key is looked for in the certificate's PEM: \(String(describing: noKey))")
        #expect(failure(TLSOptions(caPEM: ca, privateKeyPEM: key))?.name == "tls.privateKeyPEM", "a key without a certificate")
        #expect(failure(TLSOptions(caPEM: ca)) == nil)
    }

    @Test("encrypted keys: a wrong or missing password is refused naming tls.privateKeyPassword, never showing it")
    func passwords() throws {
        let ca = try pki.text(pki.caFile)
        let certificate = try pki.text(pki.clientCertificate)
        for encrypted in [pki.clientKeyEncryptedPKCS8, pki.clientKeyEncryptedTraditional] {
            let pem = try pki.text(encrypted)
            let wrong = "Tr0ub4dor&3-wrong"
            let wrongPEM = failure(TLSOptions(caPEM: ca, certificatePEM: certificate, privateKeyPEM: pem, privateKeyPassword: wrong))
            #expect(wrongPEM?.name == "tls.privateKeyPassword", "\(encrypted): \(String(describing: wrongPEM))")
            #expect(wrongPEM?.reason.contains(wrong) == false)
            let wrongFile = failure(TLSOptions(caFile: pki.caFile, certificateFile: pki.clientCertificate, privateKeyFile: encrypted,
                                               privateKeyPassword: wrong))
            #expect(wrongFile?.name == "tls.privateKeyPassword")
            #expect(wrongFile?.reason.contains(encrypted) == true, "names the file: \(String(describing: wrongFile))")
            #expect(wrongFile?.reason.contains(wrong) == false)
            let empty = failure(TLSOptions(caPEM: ca, certificatePEM: certificate, privateKeyPEM: pem, privateKeyPassword: ""))
            #expect(empty?.name == "tls.privateKeyPassword", "an empty password is a wrong one: \(String(describing: empty))")
            let missing = failure(TLSOptions(caPEM: ca, certificatePEM: certificate, privateKeyPEM: pem))
            #expect(missing?.name == "tls.privateKeyPassword", "\(String(describing: missing))")
            #expect(missing?.reason.contains("encrypted") == true)
            // and the right one works (a password for a plain key is ignored)
            #expect(failure(TLSOptions(caPEM: ca, certificatePEM: certificate, privateKeyPEM: pem, privateKeyPassword: pki.clientKeyPassword)) == nil)
        }
        #expect(failure(TLSOptions(caPEM: ca, certificatePEM: certificate, privateKeyPEM: try pki.text(pki.clientKey),
                                   privateKeyPassword: "unused")) == nil)
        #expect(failure(TLSOptions(caPEM: ca, privateKeyPassword: "no key"))?.name == "tls.privateKeyPassword")
    }

    @Test("the private key and its password never appear in a description, a dump or a lock's description")
    func secretsNeverShown() throws {
        let key = try pki.text(pki.clientKeyEncryptedPKCS8)
        let options = TLSOptions(caPEM: try pki.text(pki.caFile), certificatePEM: try pki.text(pki.clientCertificate),
                                 privateKeyPEM: key, privateKeyPassword: pki.clientKeyPassword)
        var dumped = ""
        dump(options, to: &dumped)
        let lock = try DistributedLock(key: "k", tls: options)
        defer { lock.close() }
        var dumpedLock = ""
        dump(lock, to: &dumpedLock)
        let connection = try Connection(port: 1, tls: options)
        defer { connection.close() }
        var dumpedConnection = ""
        dump(connection, to: &dumpedConnection)
        let keyBody = key.split(separator: "\n")[1]
        for shown in [String(describing: options), String(reflecting: options), dumped, "\(lock)", dumpedLock,
                      String(reflecting: connection), dumpedConnection] {
            #expect(!shown.contains(pki.clientKeyPassword), "\(shown)")
            #expect(!shown.contains(keyBody), "\(shown)")
        }
        #expect(String(describing: options).contains("privateKeyPassword: <redacted>"))
        #expect(String(describing: options).contains("caPEM: <PEM, "))
    }

    @Test("equal options from memory share one OpenSSL context; different ones do not")
    func contextsShared() throws {
        let ca = try pki.text(pki.caFile)
        let certificate = try pki.text(pki.clientCertificate)
        let key = try pki.text(pki.clientKeyEncryptedPKCS8)
        func options(_ serverName: String? = nil) -> TLSOptions {
            TLSOptions(serverName: serverName, caPEM: ca, certificatePEM: certificate, privateKeyPEM: key,
                       privateKeyPassword: pki.clientKeyPassword)
        }
        let a = try TLSContext.shared(for: options())
        #expect(try TLSContext.shared(for: options()) === a)
        #expect(try TLSContext.shared(for: options("localhost")) === a, "serverName is set per connection")
        #expect(try TLSContext.shared(for: TLSOptions(caPEM: ca)) !== a)
        #expect(try TLSContext.shared(for: TLSOptions(caFile: pki.caFile)) !== TLSContext.shared(for: TLSOptions(caPEM: ca)),
                "a file is read once per process; PEM text is its own key")
    }
}
