// Runs every program in Examples/ to completion against real dflockd servers (and the semaphore
// example also against a scripted peer replaying the Go server's semaphore behaviour), the
// way a newcomer runs them: the built binary, `--port N`, exit status 0, the lines it promises.
//
// The binaries come from the build directory: `swift build` and `swift test` build every
// product of the package, examples included, into the folder that also holds the test bundle.

import CUV  // see TestSupport.swift: the socket constants of <netinet/in.h> may live in CUV
import Foundation
import Testing
@testable import DflockdClient

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

@Suite("Examples", .serialized, .timeLimit(.minutes(3)))
struct ExamplesTests {
    /// Every folder in Examples/ is an executable target and must be run by a test here.
    static let tested: Set<String> = ["Quickstart", "Callbacks", "TwoPhase", "LockLost", "Sharding", "Semaphore",
                                      "Embedded", "EmbeddedServer", "Demo", "ActorService", "Service"]

    @Test("every folder in Examples/ is an executable target of Package.swift and is run here")
    func everyExampleIsCovered() throws {
        let folders = try FileManager.default.contentsOfDirectory(atPath: TestSupport.repoRoot.appendingPathComponent("Examples").path)
            .filter { !$0.hasPrefix(".") }
        #expect(Set(folders) == Self.tested, "add a test for each new example (and remove those of deleted ones)")
        let manifest = try String(contentsOf: TestSupport.repoRoot.appendingPathComponent("Package.swift"), encoding: .utf8)
        for name in folders {
            #expect(manifest.contains("name: \"\(name)\"") && manifest.contains("path: \"Examples/\(name)\""),
                    "Package.swift needs .executableTarget(name: \"\(name)\", …, path: \"Examples/\(name)\")")
        }
    }

    @Test func quickstart() async throws {
        let server = try RealServer.start()
        let run = try await ExampleRun.run("Quickstart", ["--port", String(server.port)])
        try run.expect(lines: ["holding 'quickstart-report': state held, lease 10 s",
                               "released; the work computed 6; state now closed",
                               "a second client could not get 'quickstart-report' while it was held: LockError.acquireTimeout",
                               "quickstart: done"])
    }

    @Test func quickstartExplainsAMissingServer() async throws {
        let port = try SupportSocket.freePort()   // nothing listens there
        let run = try await ExampleRun.run("Quickstart", ["--port", String(port)], expectedStatus: 1)
        try run.expect(containing: ["quickstart failed: could not connect to 127.0.0.1:\(port)", "Is dflockd running there?"])
    }

    @Test func actorService() async throws {
        let server = try RealServer.start(.go)
        let run = try await ExampleRun.run("ActorService", ["--port", String(server.port)])
        try run.expect(lines: ["alice: 190", "bob: 200", "carol: 210", "dave: 220",
                               "served 40 requests; every step on the loop thread: true",
                               "actor service: done"])
    }

    @Test func callbacks() async throws {
        let server = try RealServer.start()
        let run = try await ExampleRun.run("Callbacks", ["--port", String(server.port)])
        try run.expect(lines: ["worker: holding 'callbacks-ledger' (state held); handler on the loop thread: true",
                               "reporter: first try timed out after 1 s, as the worker holds the lock",
                               "worker: released",
                               "reporter: released",
                               "callbacks: done"])
        try run.expect(containing: ["reporter: second try granted, token "])
    }

    @Test func twoPhase() async throws {
        let server = try RealServer.start()
        let run = try await ExampleRun.run("TwoPhase", ["--port", String(server.port)])
        try run.expect(lines: ["holder: holding 'twophase-printer'",
                               "worker: queued behind the holder; notifying it",
                               "holder: heard \"worker is queued\"; finishing up and releasing",
                               "worker: wait returned true; state held",
                               "worker: released",
                               "free key: enqueue answered .acquired, wait returned true at once",
                               "twophase: done"], inOrder: true)
    }

    /// The server drops connections that send nothing for 2 s, so the careless lock (renewing
    /// every 30 s) is lost after about 2 s and the careful one (every second) is kept.
    @Test func lockLost() async throws {
        let server = try RealServer.start(["--read-timeout", "2"])
        let started = ContinuousClock.now
        let run = try await ExampleRun.run("LockLost", ["--port", String(server.port)])
        try run.expect(lines: ["careless: state closed, token nil, leaseRemaining nil",
                               "careless: release() reports LockError.lockLost for 'locklost-careless'",
                               "careful: kept its lock the whole time and released it",
                               "locklost: done"])
        try run.expect(containing: ["onLockLost called for 'locklost-careless' (token ",
                                    "locklost-careless: write ", " refused: the lock is no longer safely ours"])
        #expect(!run.output.contains("onLockLost called for 'locklost-careful'"), "\(run)")
        #expect(!run.output.contains("locklost-careful: write 5 refused"), "\(run)")
        #expect(ContinuousClock.now - started < .seconds(15), "the loss shows after the 2 s read timeout, not after 23 s")
    }

    @Test func shardingOverThreeServers() async throws {
        let servers = try RealServer.startMany(3)
        let ports = servers.map(\.port)
        let run = try await ExampleRun.run("Sharding", ["--ports", ports.map(String.init).joined(separator: ",")])
        let keys = ["orders/42", "orders/43", "invoices/7", "users/alice", "my-resource", "clé-锁"]
        var expected = keys.map { key in
            let index = stableHashShard(key, 3)
            return "\(key) → server \(index) (port \(ports[index]))"
        }
        // Each key is held on its own server only: the servers agree with stableHashShard.
        expected += keys.map { "\($0): held on server(s) \(stableHashShard($0, 3))" }
        expected += ["acquired all 6 locks", "released all", "sharding: done"]
        try run.expect(lines: expected)
        #expect(Set(keys.map { stableHashShard($0, 3) }).count == 3, "the example's keys reach every one of three servers")
        #expect(!run.output.contains("one server given"), "\(run)")
    }

    @Test func shardingWithOneServer() async throws {
        let server = try RealServer.start()
        let run = try await ExampleRun.run("Sharding", ["--port", String(server.port)])
        try run.expect(lines: ["one server given (port \(server.port)): using it as all three shards; pass --ports A,B,C for three servers",
                               "orders/42: held on server(s) 0, 1, 2",
                               "sharding: done"])
    }

    /// The installable 0.5.0 server has no semaphores: the example says so and exits 0.
    @Test func semaphoreOnAServerWithoutSemaphores() async throws {
        let server = try RealServer.start()
        let run = try await ExampleRun.run("Semaphore", ["--port", String(server.port)])
        try run.expect(containing: ["this server has no semaphores: it answered `error` to the semaphore command 'sl' (LockError.serverError)",
                                    "Semaphores need dflockd 1.10 or later"])
        try run.expect(lines: ["semaphore: done"])
        #expect(!run.output.contains("holder 1: in"), "\(run)")
    }

    /// What the example does against a server with semaphores, the real Go dflockd 1.10.0:
    /// limit 2, the third holder queued until the first releases.
    @Test func semaphoreOnAServerWithSemaphores() async throws {
        let server = try await RealServer.launch(.go)
        let run = try await ExampleRun.run("Semaphore", ["--port", String(server.port)])
        try run.expect(lines: ["holder 1: in (limit 2)",
                               "holder 2: in; both slots are taken",
                               "holder 3: queued, as the semaphore is full",
                               "holder 1: released its slot",
                               "holder 3: in, in the slot holder 1 freed",
                               "semaphore: done"], inOrder: true)
    }

    @Test func embedded() async throws {
        let server = try RealServer.start()
        let run = try await ExampleRun.run("Embedded", ["--port", String(server.port)])
        try run.expect(lines: ["acquired embedded-job with a 2 s lease; holding it for 3 s on this loop",
                               "tick 3: state held, lease 1 s",
                               "released: success()",
                               "loop finished"], inOrder: true)
    }

    @Test func embeddedServer() async throws {
        let server = try RealServer.start()
        let run = try await ExampleRun.run("EmbeddedServer", ["--port", String(server.port)])
        try run.expect(lines: ["client: got \"count 1\"", "client: got \"count 2\"", "client: got \"count 3\"",
                               "service: 3 requests, counter 3: no update lost",
                               "lock callbacks on the main thread: 6, elsewhere: 0",
                               "loop finished (uv_loop_close: ok)",
                               "embeddedserver: done"])
        #if os(Linux)
        try run.expect(lines: ["threads in this process: 1"])
        #endif
        // The lock serialised the three read-modify-writes: each saw the previous one's value.
        for value in 0..<3 {
            #expect(run.output.contains("holds the lock: counter \(value) → \(value + 1)"), "\(run)")
        }
    }

    /// The service example under a ServiceGroup: it holds a lock per job through a LockSession
    /// until SIGTERM, then shuts down gracefully, exits 0, and the server holds none of its keys.
    @Test func serviceStopsGracefullyOnSIGTERMAndFreesEveryKey() async throws {
        let server = try await RealServer.launch(.go)
        let keys = Set((0..<5).map { "service-job-\($0)" })
        let example = try RunningExample.start("Service", ["--port", String(server.port), "--jobs", "5"])
        defer { example.killIfRunning() }
        try await example.waitForOutput(containing: "service: 5 jobs running", timeout: .seconds(30))
        #expect(Set(try await stats(port: server.port).locks.map(\.key)) == keys)
        kill(example.pid, SIGTERM)
        let run = try await example.waitForExit(timeout: .seconds(30))
        #expect(run.status == 0, "\(run)")
        try run.expect(lines: ["service: stopped; 5 locks released by the session"])
        // The session released them (the locks were still held when it shut down).
        try run.expect(containing: ["job 4: holding its lock", "worker: shutdown requested",
                                    "dflockd.locks_held=5", "graceful shutdown: releasing held locks",
                                    "graceful shutdown: session closed"])
        #expect(try await stats(port: server.port).locks.filter { keys.contains($0.key) }.isEmpty,
                "the server still holds the example's keys after it exited")
    }

    @Test func demo() async throws {
        let server = try RealServer.start()
        let run = try await ExampleRun.run("Demo", ["--port", String(server.port)])
        try run.expect(lines: ["renewal 1: lease now 3 s",
                               "a second connection trying while held: refused, as it should be",
                               "released"], inOrder: true)
        try run.expect(containing: ["acquired demo-resource: token ", "the second connection now holds it: token "])
    }
}

/// One finished run of an example binary: its exit status and everything it printed.
struct ExampleRun: CustomStringConvertible {
    let name: String
    let arguments: [String]
    let status: Int32
    let output: String
    let duration: Duration

    var lines: [String] { output.split(separator: "\n", omittingEmptySubsequences: false).map(String.init) }

    var description: String {
        "\(name) \(arguments.joined(separator: " ")) → exit \(status) after \(duration.supportDescription); output:\n\(output)"
    }

    /// Checks that each of `expected` is a whole line of the output (in that order if asked).
    func expect(lines expected: [String], inOrder: Bool = false, sourceLocation: SourceLocation = #_sourceLocation) throws {
        var searchFrom = 0
        for line in expected {
            guard let index = lines[searchFrom...].firstIndex(of: line) else {
                Issue.record("missing line \(line.debugDescription)\(inOrder ? " (in order)" : "") in \(self)", sourceLocation: sourceLocation)
                return
            }
            if inOrder { searchFrom = index + 1 }
        }
    }

    /// Checks that the output contains each of `fragments` somewhere.
    func expect(containing fragments: [String], sourceLocation: SourceLocation = #_sourceLocation) throws {
        for fragment in fragments where !output.contains(fragment) {
            Issue.record("missing \(fragment.debugDescription) in \(self)", sourceLocation: sourceLocation)
        }
    }

    /// Runs the built example `name` with `arguments` (stdin /dev/null, stdout and stderr
    /// captured together) and waits at most `timeout` for it to exit. Throws when the binary
    /// is missing, on a timeout (after killing it), or on an exit status other than
    /// `expectedStatus`, with the output in the message.
    static func run(_ name: String, _ arguments: [String], expectedStatus: Int32 = 0,
                    timeout: Duration = .seconds(60)) async throws -> ExampleRun {
        let binary = try ExampleBinaries.path(of: name)
        let outputPath = FileManager.default.temporaryDirectory
            .appendingPathComponent("dflockd-example-\(name)-\(getpid())-\(UUID().uuidString.prefix(8)).out").path
        defer { unlink(outputPath) }

        let started = ContinuousClock.now
        let spawned = Spawn.start(binary, argv: [binary] + arguments) { actions in
            posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
            posix_spawn_file_actions_addopen(&actions, 1, outputPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
            posix_spawn_file_actions_adddup2(&actions, 1, 2)
        }
        let pid = try spawned.mapError { TestSupportError("\($0)") }.get()

        // Poll without blocking a thread of the cooperative pool.
        var status: Int32 = 0
        while true {
            let reaped = waitpid(pid, &status, WNOHANG)
            if reaped == pid { break }
            if reaped < 0 && errno != EINTR {
                throw TestSupportError("waitpid for \(name) failed: \(SupportSocket.errnoDescription())")
            }
            if ContinuousClock.now - started > timeout {
                kill(pid, SIGKILL)
                while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
                let output = TestSupport.readTextFile(outputPath) ?? ""
                throw TestSupportError("""
                    example \(name) \(arguments.joined(separator: " ")) did not finish within \(timeout.supportDescription) \
                    (killed it). Its output so far (stdout is block-buffered when not a terminal, so it may be incomplete):
                    \(output)
                    """)
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        let duration = ContinuousClock.now - started
        let output = TestSupport.readTextFile(outputPath) ?? "(no output file)"
        // Exited normally: the status; killed by a signal: 128 + signal, as a shell shows it.
        let exitStatus = status & 0x7F == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F)
        let run = ExampleRun(name: name, arguments: arguments, status: exitStatus, output: output, duration: duration)
        guard exitStatus == expectedStatus else {
            throw TestSupportError("expected exit status \(expectedStatus): \(run)")
        }
        return run
    }

}

/// An example started in the background, to be signalled while it runs.
struct RunningExample: Sendable {
    let name: String
    let arguments: [String]
    let pid: pid_t
    let outputPath: String
    let started: ContinuousClock.Instant

    static func start(_ name: String, _ arguments: [String]) throws -> RunningExample {
        let binary = try ExampleBinaries.path(of: name)
        let outputPath = FileManager.default.temporaryDirectory
            .appendingPathComponent("dflockd-example-\(name)-\(getpid())-\(UUID().uuidString.prefix(8)).out").path
        let spawned = Spawn.start(binary, argv: [binary] + arguments) { actions in
            posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
            posix_spawn_file_actions_addopen(&actions, 1, outputPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
            posix_spawn_file_actions_adddup2(&actions, 1, 2)
        }
        let pid = try spawned.mapError { TestSupportError("\($0)") }.get()
        return RunningExample(name: name, arguments: arguments, pid: pid, outputPath: outputPath, started: .now)
    }

    var output: String { TestSupport.readTextFile(outputPath) ?? "" }

    /// Polls the output file (the example writes line by line) until it contains `fragment`.
    func waitForOutput(containing fragment: String, timeout: Duration) async throws {
        let deadline = ContinuousClock.now + timeout
        while !output.contains(fragment) {
            var status: Int32 = 0
            if waitpid(pid, &status, WNOHANG) == pid {
                throw TestSupportError("\(name) exited (status \(status)) before printing \(fragment.debugDescription):\n\(output)")
            }
            if ContinuousClock.now > deadline {
                throw TestSupportError("\(name) did not print \(fragment.debugDescription) within \(timeout.supportDescription):\n\(output)")
            }
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    func waitForExit(timeout: Duration) async throws -> ExampleRun {
        let deadline = ContinuousClock.now + timeout
        var status: Int32 = 0
        while waitpid(pid, &status, WNOHANG) != pid {
            if ContinuousClock.now > deadline {
                killIfRunning()
                throw TestSupportError("\(name) did not exit within \(timeout.supportDescription) (killed it):\n\(output)")
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        let exitStatus = status & 0x7F == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F)
        defer { unlink(outputPath) }
        return ExampleRun(name: name, arguments: arguments, status: exitStatus, output: output, duration: .now - started)
    }

    func killIfRunning() {
        var status: Int32 = 0
        if waitpid(pid, &status, WNOHANG) == 0 {
            kill(pid, SIGKILL)
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        }
    }
}

/// Where the example binaries were built.
enum ExampleBinaries {
    /// Folders that may hold the products of this build, most specific first: the folder of
    /// the running test binary (on Linux `.build/<triple>/debug/…PackageTests.xctest` is a
    /// plain executable next to the products; on macOS a bundle inside that folder), then
    /// `<repo>/.build/debug`.
    static var candidateDirectories: [URL] {
        var directories: [URL] = []
        #if os(Linux)
        if let executable = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe") {
            directories.append(URL(fileURLWithPath: executable).deletingLastPathComponent())
        }
        #endif
        let bundle = Bundle.main.bundleURL
        directories.append(bundle.pathExtension == "xctest" ? bundle.deletingLastPathComponent() : bundle)
        for bundle in Bundle.allBundles where bundle.bundleURL.pathExtension == "xctest" {
            directories.append(bundle.bundleURL.deletingLastPathComponent())
        }
        directories.append(TestSupport.repoRoot.appendingPathComponent(".build/debug", isDirectory: true))
        var seen = Set<String>()
        return directories.filter { seen.insert($0.standardizedFileURL.path).inserted }
    }

    /// The path of the built example `name`, or an error naming where it was looked for.
    static func path(of name: String) throws -> String {
        let fm = FileManager.default
        for directory in candidateDirectories {
            let path = directory.appendingPathComponent(name).path
            if fm.isExecutableFile(atPath: path) { return path }
        }
        throw TestSupportError("""
            the example binary \(name) was not found in \(candidateDirectories.map(\.path).joined(separator: ", ")). \
            Build the examples first: `swift build` (`make test` and `swift test` build every product).
            """)
    }
}
