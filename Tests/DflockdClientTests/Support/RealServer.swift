// A real dflockd server on a free port of 127.0.0.1, for the duration of a test: the Python
// 0.5.0 one (PyPI, in <repo>/.venv) or the Go 1.10.0 one (<repo>/.tools/bin), both installed by
// `make setup`. See ServerKind.swift for the kinds, their options and a parameterised test.
//
//     let server = try RealServer.start(.go, [.readTimeout(seconds: 2)])   // waits until it accepts
//     let old = try RealServer.start(["--read-timeout", "2"])   // raw flags, the Python server
//     let raw = try RawClient(port: server.port)
//     server.freeze(); server.thaw()      // SIGSTOP / SIGCONT (wait until the state changed)
//     server.kill()                       // SIGKILL + reap: like a crash
//     try server.restart()                // same port, same arguments
//     server.stop()                       // SIGTERM + reap (idempotent; deinit does it too)
//
// Failures throw RealServerError with what went wrong, what to do, and the server's log:
// tests fail loudly instead of skipping.
//
// Every start prints one line naming the test, the server kind and its port, so the output
// says which server each server-facing test ran on.
//
// How the Go server is run: posix_spawn of `setpriv --pdeathsig SIGKILL -- .tools/bin/dflockd
// --host 127.0.0.1 --port N <flags>` from one long-lived thread (TiedSpawn): `pid` is the
// server, and the kernel kills it if the test process dies.
//
// How the Python server is run: posix_spawn of `.venv/bin/python -c <launcher> .venv/bin/dflockd --host
// 127.0.0.1 --port N <extra>`. The launcher closes every inherited descriptor above 2, starts
// a thread that exits the process when its stdin (a pipe whose other end only this object
// holds) reaches EOF, then runs the dflockd console script in the same process. So `pid` is
// the server itself (signals reach it directly), and if the test process dies without
// stopping it (crash, SIGKILL) the server exits on its own instead of lingering.
// The child gets default signal dispositions, an empty signal mask and an environment
// without the DFLOCKD_* / MAX_LOCKS / ... variables: dflockd 0.5.0 lets any of them
// silently override the corresponding command-line flag (including --host and --port).

import CUV  // see TestSupport.swift: the socket constants of <netinet/in.h> may live in CUV
@testable import DflockdClient
import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

struct RealServerError: Error, CustomStringConvertible {
    let description: String
    init(_ message: String) { description = message }
}

final class RealServer: @unchecked Sendable, CustomStringConvertible {
    /// Which server this is.
    let kind: ServerKind
    /// The port on 127.0.0.1 the server listens on (stays the same across `restart()`).
    let port: Int
    /// The server's flags after `--host 127.0.0.1 --port N` (options in the kind's spelling,
    /// then any raw arguments).
    let extraArguments: [String]
    /// Where the server's stdout and stderr go (appended to across restarts; removed on deinit).
    let logPath: String
    /// Deadline for the server to accept connections, on start and restart.
    let startupTimeout: Duration

    private struct Child {
        var pid: pid_t
        /// Write end of the child's stdin pipe; closing it makes the child exit. -1 for the Go
        /// server, which its parent-death signal stops instead.
        var watchdogFD: Int32
        var frozen = false
    }

    /// nil while not running. All process operations happen under this lock.
    private let child = ThreadLock<Child?>(nil)

    /// The server's process id, nil when it is not running (after stop/kill).
    var pid: pid_t? { child.withLock { $0?.pid } }
    var isRunning: Bool { pid != nil }

    static var venvDirectory: URL { TestSupport.repoRoot.appendingPathComponent(".venv", isDirectory: true) }
    static var pythonPath: String { venvDirectory.appendingPathComponent("bin/python").path }
    /// The Python server's executable (`ServerKind.python.executablePath`).
    static var dflockdPath: String { ServerKind.python.executablePath }

    var description: String { "\(kind) on 127.0.0.1:\(port)" }

    // MARK: - starting

    /// Starts the Python server, `dflockd --host 127.0.0.1 --port <free port> <extraArguments>`,
    /// and returns once it accepts TCP connections. Do not pass --host or --port.
    static func start(_ extraArguments: [String] = [], startupTimeout: Duration = .seconds(30)) throws -> RealServer {
        try startMany(1, .python, extraArguments: extraArguments, startupTimeout: startupTimeout)[0]
    }

    /// Starts a server of `kind` with `options` (then `extraArguments`, raw flags) and returns
    /// once it accepts TCP connections. Throws for an option `kind` does not have.
    static func start(_ kind: ServerKind, _ options: [ServerOption] = [], extraArguments: [String] = [],
                      startupTimeout: Duration = .seconds(30)) throws -> RealServer {
        try startMany(1, kind, options, extraArguments: extraArguments, startupTimeout: startupTimeout)[0]
    }

    /// `start(kind, options, ...)` on a thread of its own, off the cooperative pool (a start
    /// blocks for up to a second): what async tests call.
    static func launch(_ kind: ServerKind, _ options: [ServerOption] = [], extraArguments: [String] = [],
                       startupTimeout: Duration = .seconds(30)) async throws -> RealServer {
        try await offThread { try start(kind, options, extraArguments: extraArguments, startupTimeout: startupTimeout) }
    }

    /// `startMany(n, kind, options, ...)` off the cooperative pool.
    static func launchMany(_ n: Int, _ kind: ServerKind, _ options: [ServerOption] = [], extraArguments: [String] = [],
                           startupTimeout: Duration = .seconds(30)) async throws -> [RealServer] {
        try await offThread { try startMany(n, kind, options, extraArguments: extraArguments, startupTimeout: startupTimeout) }
    }

    /// Starts `n` Python servers with the same arguments, in parallel (about one start-up time in all).
    static func startMany(_ n: Int, _ extraArguments: [String] = [], startupTimeout: Duration = .seconds(30)) throws -> [RealServer] {
        try startMany(n, .python, extraArguments: extraArguments, startupTimeout: startupTimeout)
    }

    /// Starts `n` servers of `kind` with the same options, in parallel.
    static func startMany(_ n: Int, _ kind: ServerKind, _ options: [ServerOption] = [], extraArguments: [String] = [],
                          startupTimeout: Duration = .seconds(30)) throws -> [RealServer] {
        try checkInstallation(kind)
        let extraArguments = try kind.arguments(for: options) + extraArguments
        for arg in extraArguments where arg == "--host" || arg == "--port" || arg.hasPrefix("--host=") || arg.hasPrefix("--port=") {
            throw RealServerError("RealServer.start: do not pass \(arg): RealServer always uses --host 127.0.0.1 and picks the port itself")
        }
        var started = [RealServer?](repeating: nil, count: n)
        var todo = Array(0..<n)
        for _ in 1...5 {
            let deadline = ContinuousClock.now.advanced(by: startupTimeout)
            var attempts: [(index: Int, server: RealServer, logOffset: Int)] = []
            for i in todo {
                let server = RealServer(kind: kind, port: try allocatePort(), extraArguments: extraArguments, startupTimeout: startupTimeout)
                attempts.append((i, server, try server.spawn()))
            }
            todo = []
            for a in attempts {
                if try a.server.waitUntilReady(logOffset: a.logOffset, deadline: deadline) {
                    started[a.index] = a.server
                } else {
                    todo.append(a.index)  // someone else took the port first: new port, new try
                }
            }
            if todo.isEmpty {
                let servers = started.map { $0! }
                announce(servers)
                return servers
            }
        }
        throw RealServerError("RealServer.start: dflockd kept finding its port taken (5 attempts); is something binding many loopback ports?")
    }

    private init(kind: ServerKind, port: Int, extraArguments: [String], startupTimeout: Duration) {
        self.kind = kind
        self.port = port
        self.extraArguments = extraArguments
        self.startupTimeout = startupTimeout
        self.logPath = FileManager.default.temporaryDirectory
            .appendingPathComponent("dflockd-test-\(getpid())-\(port)-\(UUID().uuidString.prefix(8)).log").path
    }

    deinit {
        stop()
        _ = unlink(logPath)
    }

    // MARK: - controlling

    /// SIGTERM (and SIGCONT, in case it is frozen), then reap. Falls back to SIGKILL if it has
    /// not exited within 5 s. Idempotent.
    func stop() {
        child.withLock { child in
            guard let c = child else { return }
            _ = sendSignal(c.pid, SIGTERM)
            _ = sendSignal(c.pid, SIGCONT)
            if !Self.reap(c.pid, within: .seconds(5)) {
                _ = sendSignal(c.pid, SIGKILL)
                Self.reapBlocking(c.pid)
            }
            if c.watchdogFD >= 0 { SupportSocket.closeFD(c.watchdogFD) }
            child = nil
        }
    }

    /// SIGKILL, then reap: the server vanishes without any cleanup, like a crash. Idempotent.
    func kill() {
        child.withLock { child in
            guard let c = child else { return }
            _ = sendSignal(c.pid, SIGKILL)
            Self.reapBlocking(c.pid)
            if c.watchdogFD >= 0 { SupportSocket.closeFD(c.watchdogFD) }
            child = nil
        }
    }

    /// SIGSTOP; returns once the process is stopped. Connections stay open but nothing is
    /// answered (connects still complete: the kernel accepts them into the backlog).
    func freeze() {
        child.withLock { child in
            guard let c = child, !c.frozen else { return }
            _ = sendSignal(c.pid, SIGSTOP)
            if Self.waitForStateChange(c.pid, options: WUNTRACED) == .exited {
                if c.watchdogFD >= 0 { SupportSocket.closeFD(c.watchdogFD) }
                child = nil
                return
            }
            child?.frozen = true
        }
    }

    /// SIGCONT; returns once the process runs again.
    func thaw() {
        child.withLock { child in
            guard let c = child, c.frozen else { return }
            _ = sendSignal(c.pid, SIGCONT)
            if Self.waitForStateChange(c.pid, options: WCONTINUED) == .exited {
                if c.watchdogFD >= 0 { SupportSocket.closeFD(c.watchdogFD) }
                child = nil
                return
            }
            child?.frozen = false
        }
    }

    /// Stops the server if it runs, then starts it again on the same port with the same
    /// arguments (a fresh server: no locks). Retries while the port is still briefly taken.
    func restart() throws {
        stop()
        let deadline = ContinuousClock.now.advanced(by: max(startupTimeout, .seconds(10)))
        while true {
            let offset = try spawn()
            if try waitUntilReady(logOffset: offset, deadline: deadline) { return }
            if ContinuousClock.now >= deadline {
                throw RealServerError("RealServer.restart: port 127.0.0.1:\(port) stayed in use; dflockd could not bind it again. Server log:\n\(logTail())")
            }
            usleep(50_000)  // the old listener is still going away: try again shortly
        }
    }

    /// The last `maxBytes` of the server's log (stdout and stderr).
    func logTail(maxBytes: Int = 4000) -> String {
        Self.readLog(logPath, from: 0, maxBytes: maxBytes)
    }

    // MARK: - internals

    private static let allocatedPorts = ThreadLock<Set<Int>>([])

    /// A free port not handed out before in this process (parallel tests never race for one).
    private static func allocatePort() throws -> Int {
        for _ in 0..<100 {
            let port = try SupportSocket.freePort()
            if allocatedPorts.withLock({ $0.insert(port).inserted }) { return port }
        }
        throw RealServerError("RealServer: no unused loopback port found")
    }

    /// "RealServer: Suite/test → dflockd 1.10.0 (Go) on 127.0.0.1:N": which server each test ran on.
    private static func announce(_ servers: [RealServer]) {
        let test = Test.current.map { "\($0.sourceLocation.fileName.replacingOccurrences(of: ".swift", with: ""))/\($0.name)" }
            ?? "(outside a test)"
        let ports = servers.map { String($0.port) }.joined(separator: ", ")
        print("RealServer: \(test) → \(servers[0].kind) on 127.0.0.1:\(ports)")
    }

    private static func checkInstallation(_ kind: ServerKind) throws {
        let fm = FileManager.default
        guard fm.isExecutableFile(atPath: kind.executablePath) else {
            throw RealServerError("\(kind) not found at \(kind.executablePath): run `make setup` (make test does it)")
        }
        if kind == .go { return }
        guard fm.isExecutableFile(atPath: pythonPath) else {
            throw RealServerError("the venv's python is missing at \(pythonPath) (.venv is broken): run `make setup`, which recreates it")
        }
    }

    /// Closes inherited descriptors, exits when stdin reaches EOF, then runs the console script.
    private static let launcher = """
        import os, sys, threading, runpy
        os.closerange(3, 65536)
        def _watchdog():
            try:
                while os.read(0, 512):
                    pass
            except OSError:
                pass
            os._exit(0)
        threading.Thread(target=_watchdog, daemon=True).start()
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
        """

    /// Environment variables through which dflockd 0.5.0 overrides its command-line flags (and
    /// through which 1.10 sets any flag not given, DFLOCKD_AUTH_TOKEN even over --auth-token).
    private static func isServerOverride(_ name: String) -> Bool {
        name.hasPrefix("DFLOCKD_")
            || ["DEFAULT_LEASE_TTL_S", "LEASE_SWEEP_INTERVAL_S", "GC_LOOP_SLEEP", "GC_MAX_UNUSED_TIME", "MAX_LOCKS"].contains(name)
    }

    private var commandLine: [String] {
        [kind.executablePath, "--host", "127.0.0.1", "--port", String(port)] + extraArguments
    }

    /// Spawns the server process; returns the log size before it started.
    private func spawn() throws -> Int {
        try child.withLock { child in
            precondition(child == nil, "RealServer.spawn while running")
            let logOffset = (try? FileManager.default.attributesOfItem(atPath: logPath)[.size] as? Int) ?? 0
            if kind == .go {
                child = Child(pid: try spawnGo(), watchdogFD: -1)
                return logOffset
            }

            var pipeFDs: [Int32] = [-1, -1]
            guard pipe(&pipeFDs) == 0 else {
                throw RealServerError("RealServer: pipe() failed: \(SupportSocket.errnoDescription())")
            }
            _ = fcntl(pipeFDs[0], F_SETFD, FD_CLOEXEC)
            _ = fcntl(pipeFDs[1], F_SETFD, FD_CLOEXEC)
            defer { SupportSocket.closeFD(pipeFDs[0]) }

            let argv = [Self.pythonPath, "-c", Self.launcher] + commandLine
            var environment = ProcessInfo.processInfo.environment.filter { !Self.isServerOverride($0.key) }
            environment["PYTHONUNBUFFERED"] = "1"
            let spawned = Spawn.start(Self.pythonPath, argv: argv, environment: environment) { actions in
                posix_spawn_file_actions_adddup2(&actions, pipeFDs[0], 0)
                posix_spawn_file_actions_addopen(&actions, 1, logPath, O_WRONLY | O_CREAT | O_APPEND, 0o644)
                posix_spawn_file_actions_adddup2(&actions, 1, 2)
                Self.addCloseFrom(&actions, 3)
            }
            let pid: pid_t
            switch spawned {
            case .success(let spawnedPID): pid = spawnedPID
            case .failure(let error):
                SupportSocket.closeFD(pipeFDs[1])
                throw RealServerError("RealServer: \(error)")
            }
            child = Child(pid: pid, watchdogFD: pipeFDs[1])
            return logOffset
        }
    }

    private func spawnGo() throws -> pid_t {
        let environment = ProcessInfo.processInfo.environment.filter { !Self.isServerOverride($0.key) }
        let logPath = self.logPath
        let spawned = TiedSpawn.start(kind.executablePath, argv: commandLine, environment: environment) { actions in
            posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
            posix_spawn_file_actions_addopen(&actions, 1, logPath, O_WRONLY | O_CREAT | O_APPEND, 0o644)
            posix_spawn_file_actions_adddup2(&actions, 1, 2)
            Self.addCloseFrom(&actions, 3)
        }
        switch spawned {
        case .success(let pid): return pid
        case .failure(let error):
            throw RealServerError("RealServer: \(error) (the Go server is started through setpriv, from util-linux: install it)")
        }
    }

    /// Polls (every 20 ms) until the server accepts connections on its port and owns the
    /// listening socket. Returns false if it exited because the port was taken; throws on
    /// any other exit or at the deadline (after killing it).
    private func waitUntilReady(logOffset: Int, deadline: ContinuousClock.Instant) throws -> Bool {
        while true {
            let exited: Int32? = try child.withLock { child in
                guard let c = child else {
                    throw RealServerError("RealServer: server on port \(port) was stopped while starting")
                }
                var status: Int32 = 0
                let r = waitpid(c.pid, &status, WNOHANG)
                guard r == c.pid else { return nil }
                if c.watchdogFD >= 0 { SupportSocket.closeFD(c.watchdogFD) }
                child = nil
                return status
            }
            if let status = exited {
                let log = Self.readLog(logPath, from: logOffset, maxBytes: 4000)
                if log.lowercased().contains("address already in use") { return false }
                throw RealServerError("""
                    dflockd exited during startup (\(Self.describe(waitStatus: status))).
                    Command: \(commandLine.joined(separator: " "))
                    (\(kind == .go ? "A broken Go build? `rm -rf .tools && make setup` rebuilds it." : "A broken .venv? `rm -rf .venv && make setup` rebuilds it."))
                    --- server log (\(logPath)) ---
                    \(log)
                    """)
            }
            if SupportSocket.canConnect(port: port), let pid, Self.ownsListener(pid: pid, port: port) {
                return true
            }
            if ContinuousClock.now >= deadline {
                kill()
                throw RealServerError("""
                    dflockd did not accept connections on 127.0.0.1:\(port) within \(startupTimeout.supportDescription) (killed it).
                    Command: \(commandLine.joined(separator: " "))
                    --- server log (\(logPath)) ---
                    \(Self.readLog(logPath, from: logOffset, maxBytes: 4000))
                    """)
            }
            usleep(20_000)
        }
    }

    /// Linux: true if `pid` holds the socket listening on 127.0.0.1:port (so a connect that
    /// succeeded reached this server, not another process that happened to take the port).
    static func ownsListener(pid: pid_t, port: Int) -> Bool {
        #if os(Linux)
        guard let table = TestSupport.readProcFile("/proc/net/tcp") else { return true }
        var inodes: Set<Substring> = []
        for line in table.split(separator: "\n").dropFirst() {
            let f = line.split(separator: " ")
            guard f.count > 9, f[3] == "0A" else { continue }  // 0A = LISTEN
            let local = f[1].split(separator: ":")
            guard local.count == 2, Int(local[1], radix: 16) == port else { continue }
            inodes.insert(f[9])
        }
        guard !inodes.isEmpty else { return false }
        let fm = FileManager.default
        guard let fds = try? fm.contentsOfDirectory(atPath: "/proc/\(pid)/fd") else { return true }
        for fd in fds {
            guard let target = try? fm.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\(fd)"),
                  target.hasPrefix("socket:[") else { continue }
            if inodes.contains(target.dropFirst("socket:[".count).dropLast()) { return true }
        }
        return false
        #else
        return true
        #endif
    }

    private enum StateChange { case changed, exited }

    /// waitpid with WUNTRACED / WCONTINUED: blocks until the child stopped / continued / exited.
    private static func waitForStateChange(_ pid: pid_t, options: Int32) -> StateChange {
        var status: Int32 = 0
        while true {
            let r = waitpid(pid, &status, options)
            if r == pid {
                // low 7 bits 0x7F: stopped (or continued, status 0xFFFF); else exited or killed
                return status & 0x7F == 0x7F ? .changed : .exited
            }
            if r < 0 && errno == EINTR { continue }
            return .exited  // ECHILD: already gone
        }
    }

    /// Non-blocking reaping with a bounded wait; true once reaped (or already gone).
    private static func reap(_ pid: pid_t, within timeout: Duration) -> Bool {
        let deadline = ContinuousClock.now.advanced(by: timeout)
        var pause: UInt32 = 500
        while true {
            var status: Int32 = 0
            let r = waitpid(pid, &status, WNOHANG)
            if r == pid || (r < 0 && errno == ECHILD) { return true }
            if ContinuousClock.now >= deadline { return false }
            usleep(pause)
            pause = min(pause * 2, 20_000)
        }
    }

    private static func reapBlocking(_ pid: pid_t) {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    }

    private static func describe(waitStatus s: Int32) -> String {
        let sig = s & 0x7F
        return sig == 0 ? "exit status \((s >> 8) & 0xFF)" : "killed by signal \(sig)"
    }

    private static func readLog(_ path: String, from offset: Int, maxBytes: Int) -> String {
        guard let data = FileManager.default.contents(atPath: path) else { return "(no log at \(path))" }
        let bytes = data.count > offset ? data[data.startIndex.advanced(by: offset)...] : Data()[...]
        let tail = bytes.suffix(maxBytes)
        let text = String(decoding: tail, as: UTF8.self)
        if text.isEmpty { return "(log is empty)" }
        return (tail.count < bytes.count ? "…" : "") + text
    }

    /// posix_spawn_file_actions_addclosefrom_np (glibc ≥ 2.34) when available; it is not in
    /// Swift's Glibc module, hence dlsym. The launcher closes descriptors too, as a fallback.
    private static func addCloseFrom(_ actions: inout posix_spawn_file_actions_t, _ lowFD: Int32) {
        #if os(Linux)
        typealias AddCloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>?, Int32) -> Int32
        guard let handle = dlopen(nil, RTLD_NOW) else { return }
        defer { dlclose(handle) }
        guard let symbol = dlsym(handle, "posix_spawn_file_actions_addclosefrom_np") else { return }
        _ = unsafeBitCast(symbol, to: AddCloseFrom.self)(&actions, lowFD)
        #endif
    }

}

/// kill(2), named so it does not clash with `RealServer.kill()`.
private func sendSignal(_ pid: pid_t, _ signal: Int32) -> Int32 {
    #if canImport(Glibc)
    Glibc.kill(pid, signal)
    #elseif canImport(Musl)
    Musl.kill(pid, signal)
    #else
    Darwin.kill(pid, signal)
    #endif
}
