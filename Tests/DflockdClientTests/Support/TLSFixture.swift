// Real TLS on the wire for tests: a throw-away PKI made with the `openssl` command, and
// `stunnel4` terminating TLS in front of a plain TCP server (the real dflockd, or a ScriptedPeer).
//
//     let pki = try TLSFixture.pki()                    // made once per test process
//     let server = try RealServer.start()
//     let tunnel = try Stunnel.start(backendPort: server.port)          // waits until it accepts
//     let lock = try DistributedLock(key: "k", servers: [("127.0.0.1", tunnel.port)],
//                                    tls: TLSOptions(caFile: pki.caFile))
//     tunnel.stop()                                     // SIGTERM + reap (deinit does it too)
//
//     Stunnel.start(backendPort:, certificate: .otherCA)          // a server cert from another CA
//     Stunnel.start(backendPort:, requireClientCertificate: true) // verify = 2 against pki.caFile
//
// The PKI (all EC P-256, valid for three days from now):
//   ca.pem / ca.key              "dflockd test CA": basicConstraints CA:TRUE, keyUsage keyCertSign,cRLSign
//   server.pem / server.key      signed by it; subjectAltName DNS:localhost, IP:127.0.0.1
//   other-ca.pem                 a second, unrelated CA
//   other-server.pem / .key      signed by the other CA, same names as server.pem
//   client.pem / client.key      signed by ca.pem, extendedKeyUsage clientAuth
//   client-combined.pem          client.pem and client.key in one file
//   client-key-*-encrypted.pem   client.key encrypted (PKCS#8 and traditional PEM), TestPKI.clientKeyPassword
//
// stunnel runs in the foreground from a config file in a temp dir, its log beside it. It is
// started through a tiny launcher (the venv's python, as for RealServer) that forks a watchdog
// and then execs stunnel, so `pid` is stunnel itself; the watchdog kills it when its stdin pipe,
// whose write end only this object holds, reaches EOF: if the test process dies without stopping
// it, stunnel does not linger. Failures throw with what to do (`make setup` installs stunnel4
// and openssl) and the log: tests fail loudly instead of skipping.

import CUV  // see TestSupport.swift: the socket constants of <netinet/in.h> may live in CUV
@testable import DflockdClient
import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

struct TLSFixtureError: Error, CustomStringConvertible {
    let description: String
    init(_ message: String) { description = message }
}

/// Paths of the generated certificates and keys.
struct TestPKI: Sendable {
    let directory: String
    var caFile: String { directory + "/ca.pem" }
    var serverCertificate: String { directory + "/server.pem" }
    var serverKey: String { directory + "/server.key" }
    var otherCAFile: String { directory + "/other-ca.pem" }
    var otherServerCertificate: String { directory + "/other-server.pem" }
    var otherServerKey: String { directory + "/other-server.key" }
    var clientCertificate: String { directory + "/client.pem" }
    var clientKey: String { directory + "/client.key" }
    var clientCombined: String { directory + "/client-combined.pem" }
    /// client.key encrypted with ``clientKeyPassword``: PKCS#8 (`ENCRYPTED PRIVATE KEY`).
    var clientKeyEncryptedPKCS8: String { directory + "/client-key-pkcs8-encrypted.pem" }
    /// client.key encrypted with ``clientKeyPassword``: the traditional `Proc-Type: 4,ENCRYPTED` form.
    var clientKeyEncryptedTraditional: String { directory + "/client-key-traditional-encrypted.pem" }
    /// The password of the encrypted client keys.
    var clientKeyPassword: String { "correct horse battery staple" }

    /// A file's text (the tests hand PEM to the client from memory).
    func text(_ path: String) throws -> String { try String(contentsOfFile: path, encoding: .utf8) }
}

enum TLSFixture {
    private static let made = ThreadLock<TestPKI?>(nil)

    /// The test PKI, generated on first use (about 0.2 s) in a temp directory that lives as long
    /// as the test process (removed at exit).
    static func pki() throws -> TestPKI {
        try made.withLock { made in
            if let pki = made { return pki }
            let pki = try generate()
            made = pki
            return pki
        }
    }

    private static func removePKI() {
        if let directory = made.withLock({ $0?.directory }) {
            _ = try? FileManager.default.removeItem(atPath: directory)
        }
    }

    /// How a lock's initializer refuses `options` (building their TLS context): the option
    /// named and the reason, or nil when it accepts them.
    static func initializerFailure(_ options: TLSOptions) -> (name: String, reason: String)? {
        do {
            _ = try DistributedLock(key: "k", tls: options)
            return nil
        } catch {
            if case .invalidArgument(let name, let reason) = error { return (name, reason) }
            return ("not invalidArgument", "\(error)")
        }
    }

    /// The `openssl` command, or an error saying how to get it.
    static func opensslPath() throws -> String {
        try locate(["openssl"], package: "openssl")
    }

    /// The `stunnel4` (or `stunnel`) command, or an error saying how to get it.
    static func stunnelPath() throws -> String {
        try locate(["stunnel4", "stunnel"], package: "stunnel4")
    }

    private static func locate(_ names: [String], package: String) throws -> String {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        let directories = path.split(separator: ":").map(String.init) + ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/bin"]
        for name in names {
            for directory in directories where access(directory + "/" + name, X_OK) == 0 {
                return directory + "/" + name
            }
        }
        throw TLSFixtureError("\(names.joined(separator: " / ")) not found (looked in PATH and /usr/bin, /usr/sbin, /usr/local/bin): run `make setup`, which installs the Debian package \(package)")
    }

    private static let opensslConfig = """
        [req]
        distinguished_name = dn
        prompt = no
        [dn]
        CN = placeholder
        [ca_ext]
        basicConstraints = critical,CA:TRUE
        keyUsage = critical,keyCertSign,cRLSign
        subjectKeyIdentifier = hash
        [server_ext]
        basicConstraints = critical,CA:FALSE
        keyUsage = critical,digitalSignature
        extendedKeyUsage = serverAuth
        subjectAltName = DNS:localhost,IP:127.0.0.1
        subjectKeyIdentifier = hash
        authorityKeyIdentifier = keyid
        [client_ext]
        basicConstraints = critical,CA:FALSE
        keyUsage = critical,digitalSignature
        extendedKeyUsage = clientAuth
        subjectKeyIdentifier = hash
        authorityKeyIdentifier = keyid

        """

    private static func generate() throws -> TestPKI {
        let openssl = try opensslPath()
        let directory = try makeTemporaryDirectory(prefix: "dflockd-pki")
        atexit { TLSFixture.removePKI() }
        let pki = TestPKI(directory: directory)
        let config = directory + "/openssl.cnf"
        try opensslConfig.write(toFile: config, atomically: true, encoding: .utf8)
        let newKey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-noenc"]
        func run(_ arguments: [String]) throws {
            try ChildProcess.run(openssl, arguments, logPath: directory + "/openssl.log")
        }
        func makeCA(_ name: String, _ subject: String) throws {
            try run(["req", "-x509", "-config", config, "-extensions", "ca_ext"] + newKey
                    + ["-keyout", "\(directory)/\(name).key", "-out", "\(directory)/\(name).pem", "-days", "3", "-subj", subject])
        }
        func makeLeaf(_ name: String, _ subject: String, ca: String, extensions: String, serial: Int) throws {
            try run(["req", "-new", "-config", config] + newKey
                    + ["-keyout", "\(directory)/\(name).key", "-out", "\(directory)/\(name).csr", "-subj", subject])
            try run(["x509", "-req", "-in", "\(directory)/\(name).csr", "-CA", "\(directory)/\(ca).pem",
                     "-CAkey", "\(directory)/\(ca).key", "-set_serial", String(serial), "-days", "3",
                     "-extfile", config, "-extensions", extensions, "-out", "\(directory)/\(name).pem"])
        }
        try makeCA("ca", "/CN=dflockd test CA")
        try makeCA("other-ca", "/CN=some other CA")
        try makeLeaf("server", "/CN=localhost", ca: "ca", extensions: "server_ext", serial: 2)
        try makeLeaf("other-server", "/CN=localhost", ca: "other-ca", extensions: "server_ext", serial: 3)
        try makeLeaf("client", "/CN=dflockd test client", ca: "ca", extensions: "client_ext", serial: 4)
        let combined = try String(contentsOfFile: pki.clientCertificate, encoding: .utf8)
            + String(contentsOfFile: pki.clientKey, encoding: .utf8)
        try combined.write(toFile: pki.clientCombined, atomically: true, encoding: .utf8)
        let passout = "pass:" + pki.clientKeyPassword
        try run(["pkcs8", "-topk8", "-v2", "aes-256-cbc", "-in", pki.clientKey, "-passout", passout, "-out", pki.clientKeyEncryptedPKCS8])
        try run(["ec", "-in", pki.clientKey, "-aes256", "-passout", passout, "-out", pki.clientKeyEncryptedTraditional])
        return pki
    }

    static func makeTemporaryDirectory(prefix: String) throws -> String {
        var template = Array((FileManager.default.temporaryDirectory.path + "/\(prefix)-XXXXXX").utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw TLSFixtureError("mkdtemp failed: \(SupportSocket.errnoDescription())")
        }
        return String(cString: made)
    }
}

/// One stunnel4 process terminating TLS on 127.0.0.1:`port` in front of 127.0.0.1:`backendPort`.
final class Stunnel: @unchecked Sendable {
    enum Certificate: Sendable {
        /// server.pem, signed by the test CA.
        case trusted
        /// other-server.pem, signed by an unrelated CA.
        case otherCA
    }

    /// The TLS port on 127.0.0.1.
    let port: Int
    let backendPort: Int
    let directory: String
    var logPath: String { directory + "/stunnel.log" }

    private struct Child {
        var pid: pid_t
        var watchdogFD: Int32
    }

    private let child = ThreadLock<Child?>(nil)

    /// The stunnel process id, nil once stopped.
    var pid: pid_t? { child.withLock { $0?.pid } }

    private static let allocatedPorts = ThreadLock<Set<Int>>([])

    /// Starts stunnel and returns once its port accepts TCP connections (and is stunnel's).
    static func start(backendPort: Int, certificate: Certificate = .trusted, requireClientCertificate: Bool = false,
                      startupTimeout: Duration = .seconds(10)) throws -> Stunnel {
        let pki = try TLSFixture.pki()
        let stunnel = try TLSFixture.stunnelPath()
        let python = RealServer.pythonPath
        guard access(python, X_OK) == 0 else {
            throw TLSFixtureError("the venv's python is missing at \(python): run `make setup`")
        }
        for _ in 1...5 {
            let port = try allocatePort()
            let tunnel = try Stunnel(port: port, backendPort: backendPort, pki: pki, certificate: certificate,
                                     requireClientCertificate: requireClientCertificate)
            if try tunnel.launch(stunnel: stunnel, python: python, deadline: .now.advanced(by: startupTimeout)) {
                return tunnel
            }
        }
        throw TLSFixtureError("stunnel kept finding its port taken (5 attempts)")
    }

    private init(port: Int, backendPort: Int, pki: TestPKI, certificate: Certificate, requireClientCertificate: Bool) throws {
        self.port = port
        self.backendPort = backendPort
        directory = try TLSFixture.makeTemporaryDirectory(prefix: "dflockd-stunnel")
        let (cert, key) = certificate == .trusted ? (pki.serverCertificate, pki.serverKey) : (pki.otherServerCertificate, pki.otherServerKey)
        var config = """
            foreground = yes
            pid =
            debug = notice

            [dflockd]
            accept = 127.0.0.1:\(port)
            connect = 127.0.0.1:\(backendPort)
            cert = \(cert)
            key = \(key)
            TIMEOUTclose = 0

            """
        if requireClientCertificate {
            config += "CAfile = \(pki.caFile)\nverify = 2\n"
        }
        try config.write(toFile: directory + "/stunnel.conf", atomically: true, encoding: .utf8)
    }

    deinit {
        stop()
        _ = try? FileManager.default.removeItem(atPath: directory)
    }

    /// Stops stunnel (SIGTERM; SIGKILL after 5 s) and reaps it. Idempotent.
    func stop() {
        child.withLock { child in
            guard let c = child else { return }
            // The watchdog's pipe first: the process is not reaped yet, so its pid cannot have
            // been reused when the watchdog signals it.
            SupportSocket.closeFD(c.watchdogFD)
            _ = Glibc.kill(c.pid, SIGTERM)
            if !ChildProcess.reap(c.pid, within: .seconds(5)) {
                _ = Glibc.kill(c.pid, SIGKILL)
                ChildProcess.reapBlocking(c.pid)
            }
            child = nil
        }
    }

    /// Whether stunnel's log comes to contain `text` within `timeout` (it logs on its own
    /// threads, a moment after the client has seen the outcome).
    func logContains(_ text: String, within timeout: Duration = .seconds(5)) async -> Bool {
        let deadline = ContinuousClock.now.advanced(by: timeout)
        while true {
            if ChildProcess.readLog(logPath, maxBytes: 1 << 20).contains(text) { return true }
            if ContinuousClock.now >= deadline { return false }
            try? await Task.sleep(for: .milliseconds(20))
        }
    }

    /// The last `maxBytes` of stunnel's log.
    func logTail(maxBytes: Int = 4000) -> String {
        ChildProcess.readLog(logPath, maxBytes: maxBytes)
    }

    /// Forks a watchdog that SIGTERMs the launcher's pid (stunnel after the exec) when stdin
    /// reaches EOF, then becomes stunnel.
    private static let launcher = """
        import os, sys, signal
        os.closerange(3, 65536)
        target = os.getpid()
        if os.fork() == 0:
            try:
                while os.read(0, 512):
                    pass
            except OSError:
                pass
            try:
                os.kill(target, signal.SIGTERM)
            except OSError:
                pass
            os._exit(0)
        os.execv(sys.argv[1], sys.argv[1:])
        """

    /// Returns false when the port turned out to be taken.
    private func launch(stunnel: String, python: String, deadline: ContinuousClock.Instant) throws -> Bool {
        let spawned = try ChildProcess.spawn(python, ["-c", Self.launcher, stunnel, directory + "/stunnel.conf"], logPath: logPath)
        child.withLock { $0 = Child(pid: spawned.pid, watchdogFD: spawned.stdinFD) }
        while true {
            let exited: Int32? = child.withLock { child in
                guard let c = child else { return 0 }
                var status: Int32 = 0
                guard waitpid(c.pid, &status, WNOHANG) == c.pid else { return nil }
                SupportSocket.closeFD(c.watchdogFD)
                child = nil
                return status
            }
            if exited != nil {
                let log = logTail()
                if log.lowercased().contains("address already in use") { return false }
                throw TLSFixtureError("stunnel exited during startup.\n--- config (\(directory)/stunnel.conf) ---\n\((try? String(contentsOfFile: directory + "/stunnel.conf", encoding: .utf8)) ?? "")\n--- log ---\n\(log)")
            }
            if SupportSocket.canConnect(port: port), let pid, RealServer.ownsListener(pid: pid, port: port) {
                return true
            }
            if ContinuousClock.now >= deadline {
                stop()
                let listeners = Self.listenerInodes(port: port)
                let sockets = ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid ?? 0)/fd")) ?? []).compactMap {
                    try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid ?? 0)/fd/\($0)")
                }
                throw TLSFixtureError("stunnel did not accept connections on 127.0.0.1:\(port) in time (stopped it). pid \(String(describing: pid)), listeners \(listeners), its fds \(sockets)\n--- log ---\n\(logTail())")
            }
            usleep(20_000)
        }
    }

    static func listenerInodes(port: Int) -> [String] {
        guard let table = TestSupport.readProcFile("/proc/net/tcp") else { return ["unreadable"] }
        var found: [String] = []
        for line in table.split(separator: "\n").dropFirst() {
            let f = line.split(separator: " ")
            guard f.count > 9 else { continue }
            let local = f[1].split(separator: ":")
            guard local.count == 2, Int(local[1], radix: 16) == port else { continue }
            found.append("\(f[1]) \(f[2]) st=\(f[3]) inode=\(f[9])")
        }
        return found
    }

    private static func allocatePort() throws -> Int {
        for _ in 0..<100 {
            let port = try SupportSocket.freePort()
            if allocatedPorts.withLock({ $0.insert(port).inserted }) { return port }
        }
        throw TLSFixtureError("no unused loopback port found")
    }
}

/// posix_spawn helpers (no Foundation.Process: see notes on waiting for children on Linux).
enum ChildProcess {
    /// Runs a command to completion; throws with its output when it fails.
    static func run(_ path: String, _ arguments: [String], logPath: String, timeout: Duration = .seconds(30)) throws {
        let offset = (try? FileManager.default.attributesOfItem(atPath: logPath)[.size] as? Int) ?? 0
        let spawned = try spawn(path, arguments, logPath: logPath)
        SupportSocket.closeFD(spawned.stdinFD)
        let deadline = ContinuousClock.now.advanced(by: timeout)
        var status: Int32 = 0
        while true {
            let r = waitpid(spawned.pid, &status, WNOHANG)
            if r == spawned.pid { break }
            if r < 0 && errno != EINTR { throw TLSFixtureError("waitpid failed: \(SupportSocket.errnoDescription())") }
            if ContinuousClock.now >= deadline {
                _ = Glibc.kill(spawned.pid, SIGKILL)
                reapBlocking(spawned.pid)
                throw TLSFixtureError("\(path) \(arguments.joined(separator: " ")) did not finish within \(timeout.supportDescription)")
            }
            usleep(5_000)
        }
        if status != 0 {
            let output = readLog(logPath, from: offset, maxBytes: 4000)
            throw TLSFixtureError("\(path) \(arguments.joined(separator: " ")) failed (wait status \(status)):\n\(output)")
        }
    }

    /// Spawns `path` with stdout and stderr appended to `logPath` and stdin a pipe whose write end
    /// (close-on-exec) is returned.
    static func spawn(_ path: String, _ arguments: [String], logPath: String) throws -> (pid: pid_t, stdinFD: Int32) {
        var pipeFDs: [Int32] = [-1, -1]
        guard pipe(&pipeFDs) == 0 else {
            throw TLSFixtureError("pipe() failed: \(SupportSocket.errnoDescription())")
        }
        _ = fcntl(pipeFDs[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(pipeFDs[1], F_SETFD, FD_CLOEXEC)
        defer { SupportSocket.closeFD(pipeFDs[0]) }

        let spawned = Spawn.start(path, argv: [path] + arguments) { actions in
            posix_spawn_file_actions_adddup2(&actions, pipeFDs[0], 0)
            posix_spawn_file_actions_addopen(&actions, 1, logPath, O_WRONLY | O_CREAT | O_APPEND, 0o644)
            posix_spawn_file_actions_adddup2(&actions, 1, 2)
        }
        let pid: pid_t
        switch spawned {
        case .success(let spawnedPID): pid = spawnedPID
        case .failure(let error):
            SupportSocket.closeFD(pipeFDs[1])
            throw TLSFixtureError("\(error)")
        }
        return (pid, pipeFDs[1])
    }

    /// True once reaped (or already gone) within `timeout`.
    static func reap(_ pid: pid_t, within timeout: Duration) -> Bool {
        let deadline = ContinuousClock.now.advanced(by: timeout)
        while true {
            var status: Int32 = 0
            let r = waitpid(pid, &status, WNOHANG)
            if r == pid || (r < 0 && errno == ECHILD) { return true }
            if ContinuousClock.now >= deadline { return false }
            usleep(2_000)
        }
    }

    static func reapBlocking(_ pid: pid_t) {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    }

    static func readLog(_ path: String, from offset: Int = 0, maxBytes: Int) -> String {
        guard let data = FileManager.default.contents(atPath: path) else { return "(no log at \(path))" }
        let bytes = data.count > offset ? data[data.startIndex.advanced(by: offset)...] : Data()[...]
        let tail = bytes.suffix(maxBytes)
        let text = String(decoding: tail, as: UTF8.self)
        if text.isEmpty { return "(log is empty)" }
        return (tail.count < bytes.count ? "…" : "") + text
    }

}

/// Runs blocking work (starting a process and polling until it listens, blocking socket round
/// trips) on a thread of its own instead of one of the few threads Swift concurrency runs all
/// tests on: tests that wait for a reply within a short window then keep being scheduled.
func offThePool<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, any Error>) in
        Thread { continuation.resume(with: Result { try work() }) }.start()
    }
}
