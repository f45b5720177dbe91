import DflockdClient
import Dispatch
import Synchronization

/// Throughput mode: `workers` workers, each `rounds` × (acquire + release) on its own persistent
/// connection(s) with raw ``Connection`` commands, all on one event loop thread. One op is one
/// acquire plus its release; its latency runs from sending the acquire to the release's reply.
///
/// The same workload as the Go server project's `cmd/bench` (lock mode): a worker dials its
/// connections, then does its rounds; wall time starts before any dial, latency excludes it.
final class ThroughputBenchmark: @unchecked Sendable {
    struct Settings {
        var workers: Int
        var rounds: Int
        var keyPrefix: String
        var contended: Bool
        var pipeline: Bool
        var api: ClientAPI
        var timeoutS: Int
        var leaseTtlS: Int?
        var servers: [Server]
        var connectionsPerWorker: Int
        /// > 0: every worker's DistributedLock on one LockSession with this many connections
        /// per server.
        var sharedConnections = 0
        var batchingWindow: Duration

        var totalOps: Int { workers * rounds }
    }

    struct Result {
        var totalOps: Int
        var wallS: Double
        var latency: LatencySummary
        var cpu: CPUTime
        var peakRSSKiB: Int
        /// write(2) and read(2) calls of the whole process during the run (/proc/self/io).
        var writeCalls: Int?
        var readCalls: Int?
        var throughput: Double { Double(totalOps) / wallS }
        var cpuPerOpUs: Double { cpu.totalS / Double(totalOps) * 1e6 }
    }

    let settings: Settings
    private let loop: EventLoop
    private let done = DispatchSemaphore(value: 0)
    /// Ops finished so far, for the progress line.
    private let completedOps = Counter()

    // Loop-confined while the run lasts; read by the main thread after `done`.
    private var recorder: LatencyRecorder
    private var workersLeft = 0
    private var failure: String?
    private var connections: [Connection] = []
    private var session: LockSession?
    private var startNs: UInt64 = 0
    private var endNs: UInt64 = 0
    private var startCPU = CPUTime(userS: 0, systemS: 0)
    private var endCPU = CPUTime(userS: 0, systemS: 0)
    private var startIO: IOCounters?
    private var endIO: IOCounters?

    init(settings: Settings) {
        self.settings = settings
        loop = EventLoop(batchingWindow: settings.batchingWindow)
        // Nothing legitimate waits longer than the acquire timeout plus a generous I/O slack.
        recorder = LatencyRecorder(highestNs: UInt64(settings.timeoutS + 120) * 1_000_000_000)
    }

    /// Runs the workload and returns its figures; throws when a worker failed.
    func run() throws -> Result {
        defer { loop.shutdown() }
        let workerKeys = keys()
        let progress = ProgressLine()
        let total = settings.totalOps
        let progressStartNs = monotonicNanoseconds()
        loop.execute { [self] in
            startCPU = CPUTime.now()
            startIO = IOCounters.now()
            startNs = monotonicNanoseconds()
            switch (settings.api, settings.sharedConnections > 0) {
            case (.callbacks, false): startCallbackWorkers(keys: workerKeys)
            case (.async, false): startAsyncWorkers(keys: workerKeys, onLoopExecutor: false)
            case (.asyncLoop, false): startAsyncWorkers(keys: workerKeys, onLoopExecutor: true)
            case (.callbacks, true): startSessionWorkers(keys: workerKeys)
            case (.async, true): startAsyncSessionWorkers(keys: workerKeys, onLoopExecutor: false)
            case (.asyncLoop, true): startAsyncSessionWorkers(keys: workerKeys, onLoopExecutor: true)
            }
        }
        progress.wait(for: done) {
            let finished = completedOps.value
            let elapsedS = Double(monotonicNanoseconds() - progressStartNs) / 1e9
            return "bench: \(finished)/\(total) ops, \(formatted(Double(finished) / elapsedS, decimals: 0)) ops/s"
        }
        // Close every connection on the loop before reading what the loop wrote.
        let closed = DispatchSemaphore(value: 0)
        loop.execute { [self] in
            for connection in connections { connection.close() }
            session?.close()
            closed.signal()
        }
        closed.wait()
        if let failure { throw BenchFailure(failure) }
        return Result(totalOps: recorder.count,
                      wallS: Double(endNs - startNs) / 1e9,
                      latency: recorder.summary,
                      cpu: endCPU - startCPU,
                      peakRSSKiB: ProcessMemory.peakRSSKiB(),
                      writeCalls: startIO.flatMap { start in endIO.map { $0.writeCalls - start.writeCalls } },
                      readCalls: startIO.flatMap { start in endIO.map { $0.readCalls - start.readCalls } })
    }

    /// Unique random keys `<prefix>_<n>`, n in 100000..<10000000 as in the Go tool; with
    /// `contended`, the one key `<prefix>` for every worker.
    private func keys() -> [String] {
        if settings.contended { return Array(repeating: settings.keyPrefix, count: settings.workers) }
        var used = Set<Int>()
        var keys: [String] = []
        while keys.count < settings.workers {
            let number = Int.random(in: 100_000..<10_000_000)
            if used.insert(number).inserted { keys.append("\(settings.keyPrefix)_\(number)") }
        }
        return keys
    }

    private func connections(for key: String) -> [Connection] {
        let server = settings.servers[stableHashShard(key, settings.servers.count)]
        return (0..<settings.connectionsPerWorker).map { _ in
            // Host and port were validated when the flags were parsed.
            try! Connection(host: server.host, port: server.port, loop: loop)
        }
    }

    // MARK: - Loop-thread bookkeeping

    fileprivate func record(_ nanoseconds: UInt64) {
        recorder.record(nanoseconds)
        completedOps.increment()
    }

    fileprivate func workerFinished() {
        workersLeft -= 1
        if workersLeft == 0 { finishRun() }
    }

    fileprivate var stopped: Bool { failure != nil }

    fileprivate func fail(worker: Int, _ message: String) {
        guard failure == nil else { return }
        failure = "worker \(worker) error: \(message)"
        finishRun()
    }

    private func finishRun() {
        endNs = monotonicNanoseconds()
        endCPU = CPUTime.now()
        endIO = IOCounters.now()
        done.signal()
    }

    // MARK: - Completion-handler workers

    private func startCallbackWorkers(keys: [String]) {
        workersLeft = keys.count
        for (index, key) in keys.enumerated() {
            let workerConnections = connections(for: key)
            connections += workerConnections
            CallbackWorker(bench: self, index: index, key: key, connections: workerConnections).start()
        }
    }

    // MARK: - Workers with DistributedLocks on one LockSession

    private func makeSessionLocks(keys: [String]) -> [DistributedLock] {
        // Validated when the flags were parsed.
        let session = try! LockSession(servers: settings.servers.map(\.pair), connectionsPerServer: settings.sharedConnections, loop: loop)
        self.session = session
        return keys.map { try! DistributedLock(key: $0, acquireTimeoutS: settings.timeoutS, leaseTtlS: settings.leaseTtlS, session: session) }
    }

    private func startSessionWorkers(keys: [String]) {
        workersLeft = keys.count
        for (index, lock) in makeSessionLocks(keys: keys).enumerated() {
            SessionWorker(bench: self, index: index, lock: lock).start()
        }
    }

    private func startAsyncSessionWorkers(keys: [String], onLoopExecutor: Bool) {
        let locks = makeSessionLocks(keys: keys)
        let (rounds, completedOps) = (settings.rounds, completedOps)
        let runWorkers = { @Sendable [self] in
            let outcomes = await withTaskGroup(of: AsyncWorker.Outcome.self) { group in
                for (index, lock) in locks.enumerated() {
                    group.addTask {
                        var latencies = AsyncWorker.Latencies(capacity: rounds)
                        do {
                            for _ in 0..<rounds {
                                let startNs = monotonicNanoseconds()
                                guard try await lock.acquire() else { return .failed(worker: index, message: "acquire timed out") }
                                try await lock.release()
                                latencies.append(monotonicNanoseconds() - startNs)
                                completedOps.increment()
                            }
                        } catch {
                            return .failed(worker: index, message: "\(error)")
                        }
                        return .finished(latencies)
                    }
                }
                return await group.reduce(into: []) { $0.append($1) }
            }
            loop.execute { [self] in finish(with: outcomes) }
        }
        launch(runWorkers, onLoopExecutor: onLoopExecutor)
    }

    /// Records the async workers' latencies in the run's one recorder, or the first failure, on
    /// the loop thread.
    private func finish(with outcomes: [AsyncWorker.Outcome]) {
        for outcome in outcomes {
            switch outcome {
            case .finished(let latencies): for nanoseconds in latencies.samples { recorder.record(nanoseconds) }
            case .failed(let worker, let message): fail(worker: worker, message)
            }
        }
        if failure == nil { finishRun() }
    }

    // MARK: - Async workers

    /// With `onLoopExecutor`, the workers' tasks prefer the loop as their executor: each call
    /// starts on the loop thread and each await resumes there, no thread hop at all.
    private func startAsyncWorkers(keys: [String], onLoopExecutor: Bool) {
        let workers = keys.enumerated().map { index, key in
            let workerConnections = connections(for: key)
            connections += workerConnections
            return AsyncWorker(index: index, key: key, connections: workerConnections, settings: settings,
                               completedOps: completedOps)
        }
        let runWorkers = { @Sendable [self] in
            let outcomes = await withTaskGroup(of: AsyncWorker.Outcome.self) { group in
                for worker in workers { group.addTask { await worker.run() } }
                return await group.reduce(into: []) { $0.append($1) }
            }
            loop.execute { [self] in finish(with: outcomes) }
        }
        launch(runWorkers, onLoopExecutor: onLoopExecutor)
    }

    /// Starts the async workers' parent task: preferring the loop's executor (`--api
    /// async-loop`; child tasks inherit the preference) or on the global pool.
    private func launch(_ runWorkers: @escaping @Sendable () async -> Void, onLoopExecutor: Bool) {
        if onLoopExecutor {
            Task(executorPreference: loop) { await runWorkers() }
        } else {
            Task.detached { await runWorkers() }
        }
    }
}

/// What the completion-handler workers share: the count of their rounds, keeping themselves
/// alive until the last one, and reporting to the bench. Loop thread only.
private class CallbackRounds {
    unowned let bench: ThroughputBenchmark
    let index: Int
    let rounds: Int
    private var completed = 0
    /// Keeps the worker alive until its last round: the connections hold only its closures.
    private var selfWhileRunning: CallbackRounds?

    init(bench: ThroughputBenchmark, index: Int) {
        self.bench = bench
        self.index = index
        rounds = bench.settings.rounds
    }

    /// Starts the worker; it runs until its last round or a failure.
    final func start() {
        selfWhileRunning = self
        begin()
    }

    /// The worker's first step (dial, or the first round).
    func begin() {}

    /// Records a round that started at `startNs`; finishes the worker after its last round.
    /// Whether rounds remain.
    final func roundFinished(startedAtNs startNs: UInt64) -> Bool {
        bench.record(monotonicNanoseconds() - startNs)
        completed += 1
        guard completed == rounds else { return true }
        selfWhileRunning = nil
        bench.workerFinished()
        return false
    }

    final func fail(_ message: String) {
        selfWhileRunning = nil
        bench.fail(worker: index, message)
    }
}

/// One worker driven by completion handlers on the loop thread: no thread hop anywhere.
private final class CallbackWorker: CallbackRounds {
    private let key: String
    private let connections: [Connection]
    private let pipeline: Bool
    private let timeoutS: Int
    private let leaseTtlS: Int?
    private var started = 0

    init(bench: ThroughputBenchmark, index: Int, key: String, connections: [Connection]) {
        self.key = key
        self.connections = connections
        pipeline = bench.settings.pipeline
        timeoutS = bench.settings.timeoutS
        leaseTtlS = bench.settings.leaseTtlS
        super.init(bench: bench, index: index)
    }

    override func begin() {
        dial(0)
    }

    /// Opens the worker's connections one after the other, then starts the rounds.
    private func dial(_ index: Int) {
        guard index < connections.count else {
            startRound()
            return
        }
        connections[index].connect { [self] result in
            if case .failure(let error) = result { return fail("dial: \(error)") }
            dial(index + 1)
        }
    }

    private func startRound() {
        guard !bench.stopped else { return }
        let connection = connections[started % connections.count]
        started += 1
        let startNs = monotonicNanoseconds()
        connection.acquire(key: key, timeoutS: timeoutS, leaseTtlS: leaseTtlS) { [self] result in
            switch result {
            case .success(let grant?):
                connection.release(key: key, token: grant.token) { [self] result in
                    if case .failure(let error) = result { return fail("release: \(error)") }
                    if roundFinished(startedAtNs: startNs), !pipeline { startRound() }
                }
                // Pipelined: the next acquire goes out right behind the release.
                if pipeline && started < rounds { startRound() }
            case .success(nil):
                fail("acquire timed out")
            case .failure(let error):
                fail("acquire: \(error)")
            }
        }
    }
}

/// One worker with a DistributedLock on the bench's LockSession, driven by completion handlers
/// on the loop thread.
private final class SessionWorker: CallbackRounds {
    private let lock: DistributedLock

    init(bench: ThroughputBenchmark, index: Int, lock: DistributedLock) {
        self.lock = lock
        super.init(bench: bench, index: index)
    }

    override func begin() {
        startRound()
    }

    private func startRound() {
        guard !bench.stopped else { return }
        let startNs = monotonicNanoseconds()
        lock.acquire { [self] result in
            switch result {
            case .success(true):
                lock.release { [self] result in
                    if case .failure(let error) = result { return fail("release: \(error)") }
                    if roundFinished(startedAtNs: startNs) { startRound() }
                }
            case .success(false):
                fail("acquire timed out")
            case .failure(let error):
                fail("acquire: \(error)")
            }
        }
    }
}

/// One worker as an async task: each call hops to the loop thread and back, unless the task
/// prefers the loop's executor (`--api async-loop`).
private struct AsyncWorker: Sendable {
    enum Outcome: Sendable {
        case finished(Latencies)
        case failed(worker: Int, message: String)
    }

    /// A worker's latencies, kept as plain samples and recorded in the run's one recorder when
    /// the workers are done (as the callback workers record into it): a histogram per worker
    /// would cost each async row 100 histograms' worth of page faults and cache misses that
    /// the callback row does not pay, and that no user of the async API pays.
    struct Latencies: Sendable {
        private(set) var samples: [UInt64] = []

        init(capacity: Int) {
            samples.reserveCapacity(capacity)
        }

        mutating func append(_ nanoseconds: UInt64) {
            samples.append(nanoseconds)
        }
    }

    let index: Int
    let key: String
    let connections: [Connection]
    let settings: ThroughputBenchmark.Settings
    let completedOps: Counter

    func run() async -> Outcome {
        var latencies = Latencies(capacity: settings.rounds)
        var step = "dial"
        do {
            for connection in connections { try await connection.connect() }
            for round in 0..<settings.rounds {
                let connection = connections[round % connections.count]
                let startNs = monotonicNanoseconds()
                step = "acquire"
                guard let grant = try await connection.acquire(key: key, timeoutS: settings.timeoutS, leaseTtlS: settings.leaseTtlS) else {
                    return .failed(worker: index, message: "acquire timed out")
                }
                step = "release"
                try await connection.release(key: key, token: grant.token)
                latencies.append(monotonicNanoseconds() - startNs)
                completedOps.increment()
            }
        } catch {
            return .failed(worker: index, message: "\(step): \(error)")
        }
        return .finished(latencies)
    }
}
