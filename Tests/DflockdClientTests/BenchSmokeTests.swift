import CUV  // see TestSupport.swift: the socket constants of <netinet/in.h> may live in CUV
import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Runs the built `dflockd-bench` briefly against a real server so that the tool cannot rot.
///
/// The test target cannot depend on an executable target, so the binary is found next to the
/// test bundle in the build directory (`swift test` builds every product first), or at
/// `$DFLOCKD_BENCH` when set.
@Suite(.timeLimit(.minutes(2)))
struct BenchSmokeTests {
    @Test(arguments: ServerKind.allCases)
    func throughputSmokeRunWritesJSON(on kind: ServerKind) throws {
        let server = try RealServer.start(kind)
        let run = try runBench(["--servers", "127.0.0.1:\(server.port)", "--workers", "2", "--rounds", "5", "--json"])
        #expect(run.status == 0, "dflockd-bench exited with \(run.status); stderr: \(run.stderr)")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any],
                                  "stdout is not a JSON object: \(run.stdout)")
        #expect(object["total_ops"] as? Int == 10)
        for field in ["wall_time_s", "throughput_ops_per_s", "mean_ms", "min_ms", "max_ms", "p50_ms", "p99_ms",
                      "stdev_ms", "cpu_us_per_op", "peak_rss_kib"] {
            #expect(object[field] is NSNumber, "field \(field) missing or not a number in \(run.stdout)")
        }
        let p50 = try #require(object["p50_ms"] as? Double)
        let p99 = try #require(object["p99_ms"] as? Double)
        let minimum = try #require(object["min_ms"] as? Double)
        #expect(minimum > 0 && minimum <= p50 && p50 <= p99)
    }

    /// `make bench` runs the Go client, `cmd/bench` built by `make setup`, and reads its text
    /// report (Benchmarks/compare.py, parse_go_bench): the lines it reads must be there.
    @Test func goBenchRunsAgainstTheGoServerAndReportsWhatCompareReads() throws {
        let server = try RealServer.start(.go)
        let binary = TestSupport.repoRoot.appendingPathComponent(".tools/bin/bench").path
        guard FileManager.default.isExecutableFile(atPath: binary) else {
            throw TestSupportError("the Go cmd/bench is missing at \(binary): run `make setup`")
        }
        let run = try runBench(["--servers", "127.0.0.1:\(server.port)", "--workers", "3", "--rounds", "4"], binary: binary)
        #expect(run.status == 0, "cmd/bench exited with \(run.status); stderr: \(run.stderr)")
        #expect(run.stdout.contains("total ops : 12"), "\(run.stdout)")
        for label in ["throughput", "p50       ", "p99       "] {
            #expect(run.stdout.contains("  \(label):"), "no '\(label)' line in \(run.stdout)")
        }
    }

    @Test func pipelinedSmokeRunCountsEveryOp() throws {
        let server = try RealServer.start()
        let run = try runBench(["--servers", "127.0.0.1:\(server.port)", "--workers", "3", "--rounds", "4",
                                "--pipeline", "--connections", "2", "--json"])
        #expect(run.status == 0, "dflockd-bench exited with \(run.status); stderr: \(run.stderr)")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any])
        #expect(object["total_ops"] as? Int == 12)
        #expect(object["pipeline"] as? Bool == true)
    }

    @Test func batchingWindowSmokeRunCountsEveryOpAndSaysSo() throws {
        let server = try RealServer.start()
        let run = try runBench(["--servers", "127.0.0.1:\(server.port)", "--workers", "8", "--rounds", "5",
                                "--batching-window-us", "300", "--json"])
        #expect(run.status == 0, "dflockd-bench exited with \(run.status); stderr: \(run.stderr)")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any])
        #expect(object["total_ops"] as? Int == 40)
        #expect(object["batching_window_us"] as? Int == 300)

        let refused = try runBench(["--servers", "127.0.0.1:\(server.port)", "--batching-window-us", "20000"])
        #expect(refused.status != 0)
        #expect(refused.stderr.contains("--batching-window-us must be between 0 and 10000"), "stderr: \(refused.stderr)")
    }

    @Test func asyncLoopSmokeRunCountsEveryOpAndSaysSo() throws {
        let server = try RealServer.start(.go)
        let run = try runBench(["--servers", "127.0.0.1:\(server.port)", "--workers", "6", "--rounds", "5",
                                "--api", "async-loop", "--json"])
        #expect(run.status == 0, "dflockd-bench exited with \(run.status); stderr: \(run.stderr)")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any])
        #expect(object["total_ops"] as? Int == 30)
        #expect(object["api"] as? String == "async-loop")

        let refused = try runBench(["--servers", "127.0.0.1:\(server.port)", "--api", "async-loop", "--pipeline"])
        #expect(refused.status != 0)
        #expect(refused.stderr.contains("--pipeline needs --api callbacks"), "stderr: \(refused.stderr)")
    }

    @Test func connectionMicroSmokeRunReportsBothStylesAndTheirRatio() throws {
        let server = try RealServer.start(.go)
        let run = try runBench(["--servers", "127.0.0.1:\(server.port)", "--connection-micro",
                                "--micro-rounds", "200", "--micro-repeat", "3", "--json"])
        #expect(run.status == 0, "dflockd-bench exited with \(run.status); stderr: \(run.stderr)")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any])
        #expect(object["mode"] as? String == "connection-micro")
        #expect(object["rounds"] as? Int == 200)
        let callbacks = try #require(object["callbacks_cpu_us_per_op"] as? Double)
        let asyncLoop = try #require(object["async_loop_cpu_us_per_op"] as? Double)
        let ratio = try #require(object["cpu_ratio_async_loop_to_callbacks"] as? Double)
        #expect(callbacks > 0 && asyncLoop > 0)
        #expect(abs(ratio - asyncLoop / callbacks) < 0.01 * ratio + 0.001, "ratio \(ratio) is not \(asyncLoop) / \(callbacks)")
    }

    @Test func holdersSmokeRunPasses() throws {
        let server = try RealServer.start()
        let run = try runBench(["--servers", "127.0.0.1:\(server.port)", "--holders", "5", "--hold-seconds", "2",
                                "--lease", "2", "--json"])
        #expect(run.status == 0, "dflockd-bench exited with \(run.status); stderr: \(run.stderr)")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any],
                                  "stdout is not a JSON object: \(run.stdout)")
        #expect(object["held_at_end"] as? Int == 5)
        #expect(object["renewals_failed"] as? Int == 0)
        #expect(object["passed"] as? Bool == true)
        // A 2 s lease renews at least once a second: 5 locks x 2 s.
        #expect((object["renewals_done"] as? Int ?? 0) >= 5)
        #expect(object["renewal_bytes_agree"] as? Bool == true)
    }

    // MARK: - Running the binary

    private struct Run {
        var status: Int32
        var stdout: String
        var stderr: String
    }

    /// The built `dflockd-bench`, or a failure that says how to get it.
    private func benchBinary() throws -> String {
        if let path = ProcessInfo.processInfo.environment["DFLOCKD_BENCH"], !path.isEmpty {
            guard FileManager.default.isExecutableFile(atPath: path) else {
                throw TestSupportError("DFLOCKD_BENCH=\(path) is not an executable file")
            }
            return path
        }
        // The test bundle (an executable on Linux) sits in the build directory with the products.
        let testBinary = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
        var directory = testBinary.deletingLastPathComponent()
        if directory.path.hasSuffix(".xctest/Contents/MacOS") {
            directory = directory.deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        }
        let candidate = directory.appendingPathComponent("dflockd-bench").path
        guard FileManager.default.isExecutableFile(atPath: candidate) else {
            throw TestSupportError("""
                dflockd-bench not found at \(candidate): build it first (`swift build`, which builds every \
                product, or `swift build --product dflockd-bench`), or point DFLOCKD_BENCH at the binary
                """)
        }
        return candidate
    }

    /// Runs the benchmark with `arguments` (posix_spawn + waitpid), capturing its output.
    private func runBench(_ arguments: [String], binary: String? = nil) throws -> Run {
        let binary = try binary ?? benchBinary()
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("bench-smoke-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let stdoutPath = directory.appendingPathComponent("stdout").path
        let stderrPath = directory.appendingPathComponent("stderr").path

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, stdoutPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_addopen(&actions, 2, stderrPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)

        let argv: [UnsafeMutablePointer<CChar>?] = ([binary] + arguments).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var pid: pid_t = 0
        let rc = argv.withUnsafeBufferPointer { posix_spawn(&pid, binary, &actions, nil, $0.baseAddress!, environ) }
        guard rc == 0 else { throw TestSupportError("posix_spawn \(binary) failed: \(String(cString: strerror(rc)))") }

        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let exitStatus: Int32 = (status & 0x7F) == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F)
        return Run(status: exitStatus,
                   stdout: TestSupport.readTextFile(stdoutPath) ?? "",
                   stderr: TestSupport.readTextFile(stderrPath) ?? "")
    }
}
