// What the people who run a service see of this client (#17): swift-log records at the levels
// the README's "Operating it" promises, with no secret in any record, and the dflockd_ metrics
// moving through swift-metrics. Against the real Go dflockd 1.10 server (auth is Go only).

import Foundation
import Logging
import Testing
@testable import DflockdClient

@Suite("Operations: logging and metrics", .serialized, .timeLimit(.minutes(2)))
struct OperationsTests {
    /// A held lock lost to a killed server is a `warning` that names the key and the reason;
    /// every record, at every level down to `trace` (requests and replies included), is free of
    /// the auth secret and of any whole token.
    @Test func lostLockIsAWarningNamingTheKeyAndNoRecordCarriesASecret() async throws {
        let secret = "ops-secret-\(UUID().uuidString)"
        let server = try await RealServer.launch(.go, [.authToken(secret)])
        let (logger, records) = RecordingLogHandler.logger(level: .trace)
        let key = "ops-lost-\(UInt32.random(in: 0...UInt32.max))"
        let lost = EventLog<String>()
        let lock = try DistributedLock(key: key, leaseTtlS: 2, servers: [("127.0.0.1", server.port)], auth: secret,
                                       onLockLost: { _, token in lost.append(token) }, logger: logger)
        #expect(try await lock.acquire())
        var tokens = [try #require(lock.token)]

        // A renewal (every second on a 2 s lease) and, on a raw connection with the same logger,
        // a grant, a renewal and a release: every request and reply that carries a token.
        #expect(await records.wait(timeout: .seconds(10)) { $0.contains { $0.value.message == "renewed" || $0.value.message == "renewal answered late" } })
        let connection = try Connection(host: "127.0.0.1", port: server.port, auth: secret, logger: logger)
        let grant = try #require(try await connection.acquire(key: key + "-raw", timeoutS: 0))
        tokens.append(grant.token)
        _ = try await connection.renew(key: key + "-raw", token: grant.token)
        try await connection.release(key: key + "-raw", token: grant.token)
        connection.close()

        server.kill()
        #expect(await lost.wait(timeout: .seconds(10)) { !$0.isEmpty })
        #expect(await records.wait(timeout: .seconds(5)) { $0.contains { $0.value.level == .warning && $0.value.message == "lock lost" } })

        let all = records.entries.map(\.value)
        let warning = try #require(all.first { $0.level == .warning && $0.message == "lock lost" })
        #expect(warning.metadata["dflockd.key"] == key)
        #expect(warning.metadata["dflockd.reason"] == "connection_lost")
        #expect(warning.metadata["dflockd.server"] == "127.0.0.1:\(server.port)")
        #expect(Int(warning.metadata["dflockd.before_deadline_ms"] ?? "") != nil, "\(warning)")
        // The check below is not vacuous: requests with tokens and the auth exchange were logged.
        #expect(all.contains { $0.metadata["dflockd.command"]?.hasPrefix("n \(key) ") == true }, "no renewal request traced")
        #expect(all.contains { $0.message == "connecting" && $0.metadata["dflockd.auth"] == "true" }, "no authenticated connection logged")
        #expect(all.contains { $0.metadata["dflockd.reply"]?.hasPrefix("ok ") == true && $0.metadata["dflockd.command"]?.hasPrefix("l ") == true })
        for record in all {
            let text = record.description
            #expect(!text.contains(secret), "the auth secret in \(record)")
            for token in tokens {
                #expect(!text.contains(token), "a whole token in \(record)")
            }
        }
        #expect(all.contains { $0.level == .info && $0.message == "connect failed" } == false, "nothing failed to connect here")
    }

    /// TLS from memory with an encrypted client key, on a session and on a lock of its own, with
    /// auth, logged down to `trace`: no record, and no description of the options or of the
    /// error a wrong password raises, carries the key's password or the auth secret.
    @Test func tlsKeyPasswordAndSecretAppearInNoRecord() async throws {
        let pki = try await offThePool { try TLSFixture.pki() }
        let secret = "ops-tls-secret-\(UUID().uuidString)"
        let server = try await RealServer.launch(.go, [.authToken(secret), .tls(certificate: pki.serverCertificate, key: pki.serverKey)])
        let (logger, records) = RecordingLogHandler.logger(level: .trace)
        let password = pki.clientKeyPassword
        let tls = try TLSOptions(caPEM: pki.text(pki.caFile), certificatePEM: pki.text(pki.clientCertificate),
                                 privateKeyPEM: pki.text(pki.clientKeyEncryptedPKCS8), privateKeyPassword: password)
        #expect(!String(describing: tls).contains(password) && !String(reflecting: tls).contains(password))

        let session = try LockSession(servers: [("localhost", server.port)], tls: tls, auth: secret,
                                      connectTimeoutMs: 10_000, logger: logger)
        defer { session.close() }
        let onSession = try DistributedLock(key: "ops-tls-session", leaseTtlS: 2, session: session, logger: logger)
        let ownConnection = try DistributedLock(key: "ops-tls-own", leaseTtlS: 2, servers: [("localhost", server.port)],
                                                tls: tls, auth: secret, connectTimeoutMs: 10_000, logger: logger)
        #expect(try await onSession.acquire())
        #expect(try await ownConnection.acquire())
        try await onSession.release()
        try await ownConnection.release()

        let wrongPassword = TLSOptions(caPEM: try pki.text(pki.caFile), certificatePEM: try pki.text(pki.clientCertificate),
                                       privateKeyPEM: try pki.text(pki.clientKeyEncryptedPKCS8), privateKeyPassword: "not-\(password)")
        do {
            _ = try DistributedLock(key: "ops-tls-wrong", servers: [("localhost", server.port)], tls: wrongPassword, logger: logger)
            Issue.record("a wrong key password was accepted")
        } catch {
            #expect(!String(describing: error).contains(password), "\(error)")
        }

        let all = records.entries.map(\.value)
        #expect(all.contains { $0.metadata["dflockd.tls"] == "true" }, "no TLS connection logged")
        for record in all {
            #expect(!record.description.contains(password), "the key password in \(record)")
            #expect(!record.description.contains(secret), "the auth secret in \(record)")
        }
    }

    /// Only what is enabled is formatted: at `warning`, a whole acquire/renew/release cycle
    /// produces no record and never evaluates a message.
    @Test func quietLoggerRecordsNothingOnAHealthyCycle() async throws {
        let server = try await RealServer.launch(.go)
        let (logger, records) = RecordingLogHandler.logger(level: .warning)
        let lock = try DistributedLock(key: "ops-quiet", leaseTtlS: 2, servers: [("127.0.0.1", server.port)], logger: logger)
        #expect(try await lock.acquire())
        try await lock.release()
        #expect(records.entries.isEmpty, "\(records.entries.map(\.value))")
    }

    /// One run that acquires, times out, renews, loses a lock, reconnects and fails to connect:
    /// every dflockd_ metric family moves.
    @Test func everyMetricFamilyMovesInARun() async throws {
        _ = RecordedMetrics.factory
        let before = RecordedMetrics.snapshot()
        let server = try await RealServer.launch(.go)
        let (logger, records) = RecordingLogHandler.logger(level: .trace)
        let key = "ops-metrics-\(UInt32.random(in: 0...UInt32.max))"
        let lost = EventLog<String>()
        let holder = try DistributedLock(key: key, leaseTtlS: 2, servers: [("127.0.0.1", server.port)],
                                         onLockLost: { _, token in lost.append(token) }, logger: logger)
        #expect(try await holder.acquire())
        let rival = try DistributedLock(key: key, acquireTimeoutS: 1, servers: [("127.0.0.1", server.port)])
        #expect(try await rival.acquire() == false)
        #expect(await records.wait(timeout: .seconds(10)) { $0.contains { $0.value.message == "renewed" || $0.value.message == "renewal answered late" } })
        let semaphore = try DistributedSemaphore(key: key + "-sem", limit: 2, servers: [("127.0.0.1", server.port)])
        #expect(try await semaphore.acquire())
        try await semaphore.release()

        server.kill()
        #expect(await lost.wait(timeout: .seconds(10)) { !$0.isEmpty })
        try server.restart()
        #expect(try await holder.acquire(), "acquired again after the loss: a reconnect")
        try await holder.release()
        let nowhere = try DistributedLock(key: key, servers: [("127.0.0.1", try SupportSocket.freePort())])
        await #expect(throws: LockError.self) { try await nowhere.acquire() }

        let after = RecordedMetrics.snapshot()
        func moved(_ name: String) -> Int64 { (after[name] ?? 0) - (before[name] ?? 0) }
        let families = [
            "dflockd_acquires_total{kind=lock,outcome=granted}", "dflockd_acquires_total{kind=lock,outcome=timed_out}",
            "dflockd_acquires_total{kind=lock,outcome=failed}", "dflockd_acquires_total{kind=semaphore,outcome=granted}",
            "dflockd_acquire_wait_seconds{kind=lock}", "dflockd_renewal_rtt_seconds{kind=lock}",
            "dflockd_locks_lost_total{kind=lock,reason=connection_lost}", "dflockd_locks_held{kind=lock}",
            "dflockd_locks_held{kind=semaphore}", "dflockd_connections_open{}", "dflockd_reconnects_total{}",
            "dflockd_connect_failures_total{}",
        ]
        for family in families {
            #expect(moved(family) > 0, "\(family) did not move; moved: \(after.filter { $0.value != before[$0.key] ?? 0 }.keys.sorted())")
        }
        #expect(moved("dflockd_renewals_total{kind=lock,outcome=renewed}") + moved("dflockd_renewals_total{kind=lock,outcome=late}") > 0)
        #expect(moved("dflockd_acquires_total{kind=lock,outcome=granted}") >= 2)
    }
}
