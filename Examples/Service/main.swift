// Service: the lock client inside a swift-service-lifecycle service. A ServiceGroup runs a
// LockSession and a job worker that holds one lock per job through the session; SIGTERM or
// SIGINT starts a graceful shutdown: the worker stops its jobs, then the session releases every
// lock it still holds and closes, and the program exits 0. Logs go to stderr through swift-log.
//
//     make example NAME=Service                    # starts a throwaway dflockd and runs this
//     swift run Service --port 6388 --jobs 5       # then press Ctrl-C (SIGINT) or send SIGTERM
//     swift run Service --stop-after 3             # sends itself SIGTERM after 3 s (make examples)
//     swift run Service --log-level debug          # also the library's debug records
import DflockdClient
import Logging
import ServiceLifecycle
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// `--name N` from the command line, or `default`.
func intArgument(_ name: String, default value: Int) -> Int {
    let arguments = CommandLine.arguments
    guard let index = arguments.firstIndex(of: name), index + 1 < arguments.count,
          let parsed = Int(arguments[index + 1]) else { return value }
    return parsed
}

/// Writes a line to standard output at once (also into a pipe or file, where `print` buffers).
func say(_ line: String) {
    let text = line + "\n"
    _ = text.withCString { write(1, $0, strlen($0)) }
}

/// The jobs' locks, kept as long as the program runs. (A lock of a session that is dropped
/// while held is released at once; these stay held until the session's graceful shutdown.)
final class HeldLocks: Sendable {
    private let locks = Mutex<[DistributedLock]>([])
    func add(_ lock: DistributedLock) { locks.withLock { $0.append(lock) } }
    var count: Int { locks.withLock { $0.count } }
}

/// Takes one lock per job through the session and holds it while the job runs; the jobs run
/// until the group shuts down. It does not release the locks itself: the session, shut down
/// after it, releases whatever is still held.
struct JobWorker: Service {
    let session: LockSession
    let jobs: Int
    let held: HeldLocks
    let logger: Logger

    func run() async throws {
        for job in 0..<jobs {
            let lock = try DistributedLock(key: "service-job-\(job)", acquireTimeoutS: 5, leaseTtlS: 10, session: session,
                                           logger: logger)
            guard try await lock.acquire() else {
                logger.error("job \(job): the lock is taken elsewhere", metadata: ["dflockd.key": "\(lock.key)"])
                continue
            }
            held.add(lock)
            logger.info("job \(job): holding its lock", metadata: ["dflockd.key": "\(lock.key)"])
        }
        say("service: \(held.count) jobs running, each holding its lock; send SIGTERM or SIGINT to stop")
        // The jobs' work would run here; this example just waits for the shutdown.
        try? await gracefulShutdown()
        logger.info("worker: shutdown requested; leaving \(held.count) locks to the session")
    }
}

LoggingSystem.bootstrap { label in
    var handler = StreamLogHandler.standardError(label: label)
    // `--log-level debug` (or trace) shows what the library logs below `info`.
    let arguments = CommandLine.arguments
    handler.logLevel = arguments.firstIndex(of: "--log-level").flatMap { index in
        index + 1 < arguments.count ? Logger.Level(rawValue: arguments[index + 1]) : nil
    } ?? .info
    return handler
}
let logger = Logger(label: "service-example")
let port = intArgument("--port", default: 6388)

do {
    // A loop of the service's own: the session shuts it down when it has stopped.
    let session = try LockSession(servers: [("127.0.0.1", port)], loop: EventLoop(), logger: logger)
    session.shutsDownLoopAfterRun = true
    let held = HeldLocks()
    let worker = JobWorker(session: session, jobs: intArgument("--jobs", default: 5), held: held, logger: logger)
    // On shutdown a group stops its services in reverse order: the worker first, then the
    // session, which releases what the worker still holds.
    let group = ServiceGroup(configuration: .init(
        services: [.init(service: session),
                   .init(service: worker, successTerminationBehavior: .gracefullyShutdownGroup)],
        gracefulShutdownSignals: [.sigterm, .sigint],
        logger: logger))
    if let seconds = Optional(intArgument("--stop-after", default: -1)), seconds >= 0 {
        Task {
            try await Task.sleep(for: .seconds(seconds))
            kill(getpid(), SIGTERM)   // the same path as a SIGTERM from outside
        }
    }
    try await group.run()
    say("service: stopped; \(held.count) locks released by the session")
} catch {
    say("service failed: \(error)")
    exit(1)
}
