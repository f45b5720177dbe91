import CUV  // see TestSupport.swift: the socket constants of <netinet/in.h> may live in CUV
@testable import DflockdClient
import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// `posix_spawn` for the test support's child processes (servers, stunnel, examples).
///
/// Foundation's `Process.waitUntilExit()` can hang on Linux, so children are started and reaped
/// by hand. The child starts with an empty signal mask and every signal at its default
/// disposition, whatever the test runner set up for itself.
enum Spawn {
    /// Starts `executable` with `argv` (its first element is argv[0]) and `environment`;
    /// `configure` sets up the child's file descriptors.
    ///
    /// - Returns: The child's pid, or the `errno` of a failed spawn.
    static func start(_ executable: String,
                      argv: [String],
                      environment: [String: String] = ProcessInfo.processInfo.environment,
                      fileActions configure: (inout posix_spawn_file_actions_t) -> Void) -> Result<pid_t, SpawnError> {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        configure(&actions)

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var noSignals = sigset_t()
        sigemptyset(&noSignals)
        posix_spawnattr_setsigmask(&attributes, &noSignals)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for signal: Int32 in 1..<32 where signal != SIGKILL && signal != SIGSTOP { sigaddset(&defaults, signal) }
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

        let envp = environment.map { "\($0.key)=\($0.value)" }
        var pid: pid_t = 0
        let rc = withCStringArray(argv) { argvp in
            withCStringArray(envp) { envpp in posix_spawn(&pid, executable, &actions, &attributes, argvp, envpp) }
        }
        return rc == 0 ? .success(pid) : .failure(SpawnError(executable: executable, code: rc))
    }

    private static func withCStringArray<R>(_ strings: [String], _ body: (UnsafePointer<UnsafeMutablePointer<CChar>?>) -> R) -> R {
        let pointers: [UnsafeMutablePointer<CChar>?] = strings.map { strdup($0) } + [nil]
        defer { pointers.forEach { free($0) } }
        return pointers.withUnsafeBufferPointer { body($0.baseAddress!) }
    }
}

/// A failed `posix_spawn`.
struct SpawnError: Error, CustomStringConvertible {
    let executable: String
    let code: Int32
    var description: String { "posix_spawn \(executable) failed: \(SupportSocket.errnoDescription(code))" }
}

/// Children that die with the test process: started through `setpriv --pdeathsig SIGKILL`
/// (util-linux), so the kernel kills them if the test runner exits without stopping them
/// (a crash, a SIGKILL, a time limit).
///
/// The kernel sends a parent-death signal when the *thread* that spawned the child exits, not
/// the process, and tests spawn from short-lived threads (`offThread`). So every such spawn runs
/// on one thread that lives as long as the test process.
enum TiedSpawn {
    static let setprivPath = "/usr/bin/setpriv"

    /// `Spawn.start(executable, argv:...)` under `setpriv --pdeathsig SIGKILL`, on the
    /// long-lived spawner thread. The returned pid is the executable itself (setpriv execs it).
    static func start(_ executable: String,
                      argv: [String],
                      environment: [String: String],
                      fileActions configure: @escaping @Sendable (inout posix_spawn_file_actions_t) -> Void) -> Result<pid_t, SpawnError> {
        guard FileManager.default.isExecutableFile(atPath: setprivPath) else {
            return .failure(SpawnError(executable: setprivPath, code: ENOENT))
        }
        let wrapped = [setprivPath, "--pdeathsig", "SIGKILL", "--", executable] + argv.dropFirst()
        let done = DispatchSemaphore(value: 0)
        let result = ThreadLock<Result<pid_t, SpawnError>?>(nil)
        SpawnerThread.shared.run {
            result.withLock { $0 = Spawn.start(setprivPath, argv: wrapped, environment: environment, fileActions: configure) }
            done.signal()
        }
        done.wait()
        return result.withLock { $0! }
    }
}

/// One thread, alive for the whole test process, that runs the jobs given to it in order.
private final class SpawnerThread: @unchecked Sendable {
    static let shared = SpawnerThread()

    private let jobs = ThreadLock<[@Sendable () -> Void]>([])
    private let available = DispatchSemaphore(value: 0)

    private init() {
        let thread = Thread { [self] in
            while true {
                available.wait()
                let job = jobs.withLock { $0.removeFirst() }
                job()
            }
        }
        thread.name = "test-support spawner"
        thread.start()
    }

    func run(_ job: @escaping @Sendable () -> Void) {
        jobs.withLock { $0.append(job) }
        available.signal()
    }
}
