import DflockdClient
import Dispatch
import Glibc
import Logging
import Synchronization

/// Holders mode: N ``DistributedLock``s acquired and held at once on one event loop thread, each
/// renewing its lease on its own timer, for `holdSeconds`.
///
/// The library exposes no renewal counter, so renewals are counted where they become visible at
/// the process boundary: during the hold the only thing this process writes (besides its own
/// progress line, which it counts and subtracts) is renewal requests, one `write(2)` each, so
/// the change in `/proc/self/io`'s `syscw` is the number of renewals sent, and the change in
/// `wchar` must equal that number times the size of one renewal request.
///
/// A lock counts as failed when `onLockLost` named it, when it was seen (once a second, a
/// rotating slice of a tenth of the locks, at least 10,000, so that each lock is looked at
/// every 10 s without this thread's reads of 100,000 locks a second weighing in the process's
/// CPU per renewal; and all of them at the end) not `.held` or holding another token than when
/// the hold began, or when the server,
/// asked at the end on a connection of its own (`l <key> 0`), did not find the key taken.
/// Once a second the main thread also times one request to each server on a blocking socket
/// of its own (its writes are taken out of the count too): when locks are lost, that tells a
/// slow server from a slow client.
/// The locks are then closed, not released: dflockd 0.5.0 scans every lock on each disconnect,
/// so 15,000 orderly releases take it minutes, which says nothing about the client.
final class HoldersBenchmark: @unchecked Sendable {
    struct Settings {
        var holders: Int
        var holdSeconds: Int
        var leaseTtlS: Int?
        var renewRatio: Double
        var timeoutS: Int
        var keyPrefix: String
        var servers: [Server]
        var concurrency: Int
        /// > 0: every lock on one LockSession with this many connections per server.
        var sharedConnections = 0
        var batchingWindow: Duration
    }

    struct Result {
        var holders: Int
        var fileLimit: Int
        var acquireS: Double
        var acquireFailures: Int
        var firstAcquireError: String?
        var holdS: Double
        var lockLostCalls: Int
        var seenLost: Int
        var serverNotHeld: Int
        var firstServerError: String?
        /// Locks lost by the end of the hold (onLockLost or seen), each counted once.
        var failedDuringHold: Int
        /// Locks that failed in any of the three ways by the end of the server check.
        var failedLocks: Int
        /// The server's answer times sampled once a second during the hold, in ms.
        var serverRTTsMs: [Double]
        var serverPingsUnanswered: Int
        var renewalWrites: Int?
        var renewalBytes: Int?
        var renewalRequestBytes: Int
        var expectedRenewals: ClosedRange<Int>?
        var holdCPU: CPUTime
        /// CPU of the loop thread alone during the hold: the library's share, without this
        /// benchmark's own once-a-second check of every lock from the main thread.
        var holdLoopCPUS: Double?
        var baselineRSS: Int
        var heldRSS: Int
        var afterHoldRSS: Int
        var peakRSSKiB: Int

        var heldAtEnd: Int { holders - failedLocks }
        var passed: Bool { acquireFailures == 0 && failedDuringHold == 0 && failedLocks == 0 }
        var rssPerLockBytes: Double { Double(heldRSS - baselineRSS) / Double(holders) }
        var bytesAgree: Bool? {
            guard let renewalWrites, let renewalBytes else { return nil }
            return renewalBytes == renewalWrites * renewalRequestBytes
        }
        /// With shared connections a write carries many renewals: counted from the bytes.
        var sharedConnections = 0
        var renewalsDone: Int? {
            guard sharedConnections > 0 else { return renewalWrites }
            guard let renewalBytes, renewalRequestBytes > 0 else { return nil }
            return renewalBytes / renewalRequestBytes
        }
        var cpuPerRenewalUs: Double? {
            guard let renewalsDone, renewalsDone > 0 else { return nil }
            return holdCPU.totalS / Double(renewalsDone) * 1e6
        }
        var loopCPUPerRenewalUs: Double? {
            guard let renewalsDone, renewalsDone > 0, let holdLoopCPUS else { return nil }
            return holdLoopCPUS / Double(renewalsDone) * 1e6
        }
    }

    let settings: Settings
    private let loop: EventLoop
    /// The session's warnings (a shared connection lost, with its reason and the number of
    /// locks lost with it) on standard error: what stopped a run that stopped.
    private static let warningsToStandardError: Logger = {
        var logger = Logger(label: "dflockd-bench", factory: { StreamLogHandler.standardError(label: $0) })
        logger.logLevel = .warning
        return logger
    }()
    private let lostKeys = LostKeys()

    init(settings: Settings) {
        self.settings = settings
        loop = EventLoop(batchingWindow: settings.batchingWindow)
    }

    func run() throws -> Result {
        defer { loop.shutdown() }
        let fileLimit = try raiseFileLimit(toHold: settings.sharedConnections > 0 ? settings.sharedConnections * settings.servers.count : settings.holders)
        let progress = ProgressLine()
        let count = settings.holders

        // Settle the loop thread before the baseline.
        let ready = DispatchSemaphore(value: 0)
        loop.execute { ready.signal() }
        ready.wait()
        guard let baselineRSS = ProcessMemory.currentRSSBytes() else { throw BenchFailure("cannot read /proc/self/statm") }

        let tag = Int.random(in: 100_000..<1_000_000)
        let width = String(count - 1).count
        let session = settings.sharedConnections > 0
            ? try LockSession(servers: settings.servers.map(\.pair), connectionsPerServer: settings.sharedConnections, loop: loop,
                              logger: Self.warningsToStandardError) : nil
        defer { session?.close() }
        let locks = try (0..<count).map { index -> DistributedLock in
            let number = String(index)
            let key = "\(settings.keyPrefix)_holder_\(tag)_\(String(repeating: "0", count: width - number.count))\(number)"
            if let session {
                return try DistributedLock(key: key, acquireTimeoutS: settings.timeoutS, leaseTtlS: settings.leaseTtlS,
                                           renewRatio: settings.renewRatio,
                                           onLockLost: { [lostKeys] key, _ in lostKeys.insert(key) }, session: session)
            }
            return try DistributedLock(key: key, acquireTimeoutS: settings.timeoutS, leaseTtlS: settings.leaseTtlS,
                                       servers: settings.servers.map(\.pair), renewRatio: settings.renewRatio,
                                       onLockLost: { [lostKeys] key, _ in lostKeys.insert(key) }, loop: loop)
        }

        // Acquire every lock, `concurrency` at a time.
        let acquireStart = monotonicNanoseconds()
        let acquired = runWindowed(count, concurrency: settings.concurrency, progress: progress, verb: "acquired") { index, finish in
            let lock = locks[index]
            lock.acquire { result in
                switch result {
                case .success(true): finish(nil)
                case .success(false): finish("acquire of \(lock.key) timed out")
                case .failure(let error): finish("acquire of \(lock.key): \(error)")
                }
            }
        }
        let acquireS = Double(monotonicNanoseconds() - acquireStart) / 1e9
        guard let heldRSS = ProcessMemory.currentRSSBytes() else { throw BenchFailure("cannot read /proc/self/statm") }
        let tokens = locks.map(\.token)

        // Hold. This thread only reads the locks' published state, once a second.
        var seenLost = [Bool](repeating: false, count: count)
        for index in 0..<count where tokens[index] == nil { seenLost[index] = true }
        var nextToCheck = 0
        func check(all: Bool = false) {
            let slice = all ? count : min(count, max(10_000, count / 10))
            for _ in 0..<slice {
                let index = nextToCheck
                nextToCheck = (nextToCheck + 1) % count
                if !seenLost[index], locks[index].state != .held || locks[index].token != tokens[index] { seenLost[index] = true }
            }
        }
        let pingers = try settings.servers.map { try ServerPinger(server: $0, key: "\(settings.keyPrefix)_holder_\(tag)_ping") }
        var rtts: [Double] = []
        var unanswered = 0
        let loopClock = ThreadCPUClock(of: loop)
        let holdStartLoopCPU = loopClock?.seconds
        let holdStartCPU = CPUTime.now()
        let holdStartIO = IOCounters.now()
        let progressCallsBefore = progress.writeCalls
        let progressBytesBefore = progress.writtenBytes
        let holdStart = monotonicNanoseconds()
        let holdEnd = holdStart + UInt64(settings.holdSeconds) * 1_000_000_000
        var nextTick = holdStart
        while true {
            nextTick += 1_000_000_000
            let now = monotonicNanoseconds()
            if now >= holdEnd { break }
            // A tick that overran (a slow server answer) starts the next one at once.
            if nextTick > now { sleepNanoseconds(min(nextTick, holdEnd) - now) } else { nextTick = now }
            check()
            var lastRTT = "-"
            for pinger in pingers {
                if let rtt = pinger.ping() {
                    rtts.append(rtt)
                    lastRTT = formatted(rtt, decimals: 1)
                } else {
                    unanswered += 1
                }
            }
            let elapsed = Double(monotonicNanoseconds() - holdStart) / 1e9
            let seen = seenLost.lazy.filter { $0 }.count
            progress.update("holders: holding \(count - seen)/\(count), \(formatted(elapsed, decimals: 0))/\(settings.holdSeconds) s, "
                            + "onLockLost \(lostKeys.calls), server answers in \(lastRTT) ms")
        }
        let holdS = Double(monotonicNanoseconds() - holdStart) / 1e9
        let holdCPU = CPUTime.now() - holdStartCPU
        let holdLoopCPUS = holdStartLoopCPU.flatMap { start in loopClock.map { $0.seconds - start } }
        let holdEndIO = IOCounters.now()
        let ownCalls = progress.writeCalls - progressCallsBefore + pingers.reduce(0) { $0 + $1.writeCalls }
        let ownBytes = progress.writtenBytes - progressBytesBefore + pingers.reduce(0) { $0 + $1.writtenBytes }
        progress.finish()
        check(all: true)
        let lostAtHoldEnd = lostKeys.keys
        var failed = seenLost
        for index in 0..<count where lostAtHoldEnd.contains(locks[index].key) { failed[index] = true }
        let failedDuringHold = failed.lazy.filter { $0 }.count
        let afterHoldRSS = ProcessMemory.currentRSSBytes() ?? 0

        // Ask the server: from a connection that holds nothing, `l <key> 0` must time out.
        let probes = settings.servers.map { try! Connection(host: $0.host, port: $0.port, loop: loop) }
        let probed = runWindowed(count, concurrency: settings.concurrency, progress: progress, verb: "server confirms held") { index, finish in
            let key = locks[index].key
            probes[stableHashShard(key, probes.count)].acquire(key: key, timeoutS: 0) { result in
                switch result {
                case .success(nil): finish(nil)
                case .success(_?): finish("the server granted \(key) to another connection: nobody held it")
                case .failure(let error): finish("probing \(key): \(error)")
                }
            }
        }
        for probe in probes { probe.close() }

        for index in probed.failedIndices { failed[index] = true }
        let lostByEnd = lostKeys.keys
        for index in 0..<count where lostByEnd.contains(locks[index].key) { failed[index] = true }

        var renewalWrites: Int?
        var renewalBytes: Int?
        if let holdStartIO, let holdEndIO {
            renewalWrites = holdEndIO.writeCalls - holdStartIO.writeCalls - ownCalls
            renewalBytes = holdEndIO.writtenBytes - holdStartIO.writtenBytes - ownBytes
        }
        let sampleToken = tokens.first(where: { $0 != nil }).flatMap { $0 } ?? String(repeating: "0", count: 32)
        let leaseArgument = settings.leaseTtlS.map { " \($0)" } ?? ""
        let renewalRequestBytes = "n\n\(locks[0].key)\n\(sampleToken)\(leaseArgument)\n".utf8.count

        var result = Result(holders: count, fileLimit: fileLimit, acquireS: acquireS,
                      acquireFailures: acquired.failedIndices.count, firstAcquireError: acquired.firstError,
                      holdS: holdS, lockLostCalls: lostKeys.calls, seenLost: seenLost.lazy.filter { $0 }.count,
                      serverNotHeld: probed.failedIndices.count, firstServerError: probed.firstError,
                      failedDuringHold: failedDuringHold, failedLocks: failed.lazy.filter { $0 }.count,
                      serverRTTsMs: rtts, serverPingsUnanswered: unanswered,
                      renewalWrites: renewalWrites, renewalBytes: renewalBytes, renewalRequestBytes: renewalRequestBytes,
                      expectedRenewals: expectedRenewals(holdS: holdS, medianAnswerS: (rtts.sorted().dropFirst(rtts.count / 2).first ?? 0) / 1000),
                      holdCPU: holdCPU, baselineRSS: baselineRSS, heldRSS: heldRSS, afterHoldRSS: afterHoldRSS,
                      peakRSSKiB: ProcessMemory.peakRSSKiB())
        result.sharedConnections = settings.sharedConnections
        result.holdLoopCPUS = holdLoopCPUS
        return result
    }

    /// Renewals the hold should see. A lock renews `lease × ratio` seconds after the answer to
    /// its last renewal; dflockd 0.5.0 answers with the remaining seconds rounded down
    /// (lease − 1), which the library schedules from, so a cycle lasts between
    /// `(lease − 1) × ratio` and `lease × ratio`, plus the server's answer time (its median as
    /// sampled, for the lower bound).
    private func expectedRenewals(holdS: Double, medianAnswerS: Double) -> ClosedRange<Int>? {
        guard let lease = settings.leaseTtlS else { return nil }
        // Locks on connections of their own renew at least every DistributedLease.defaultMaxIdleMs,
        // whatever the lease; on a session the first renewal comes up to a tenth early.
        // On a session they renew by the ratio alone (the session keeps the connection busy).
        let maxIdleS = settings.sharedConnections > 0 ? Double.infinity : Double(DistributedLease.defaultMaxIdleMs) / 1000
        let longest = min(Double(lease) * settings.renewRatio, maxIdleS) + medianAnswerS
        let shortest = min(Double(max(1, lease - 1)) * settings.renewRatio, maxIdleS) * (settings.sharedConnections > 0 ? 0.9 : 1)
        let low = Int((holdS / longest).rounded(.down)) * settings.holders
        let high = Int((holdS / shortest).rounded(.up)) * settings.holders
        return low...high
    }

    /// Runs `operation` for indices `0..<count` on the loop thread with at most `concurrency` in
    /// flight, showing progress; returns the indices that failed and the first failure.
    private func runWindowed(_ count: Int, concurrency: Int, progress: ProgressLine, verb: String,
                             _ operation: @escaping (Int, @escaping (String?) -> Void) -> Void) -> (failedIndices: [Int], firstError: String?) {
        let window = Window(count: count, concurrency: concurrency, operation: operation)
        let done = DispatchSemaphore(value: 0)
        loop.execute { window.start { done.signal() } }
        progress.wait(for: done) { "holders: \(verb) \(window.finishedCount.value)/\(count)" }
        return (window.failedIndices, window.firstError)
    }

    /// Raises the soft limit on open files to cover one socket per lock plus a margin, or says
    /// why it cannot.
    private func raiseFileLimit(toHold holders: Int) throws -> Int {
        let needed = rlim_t(holders + 64)
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return -1 }
        if limit.rlim_cur >= needed { return Int(limit.rlim_cur) }
        guard limit.rlim_max >= needed else {
            throw BenchFailure("holding \(holders) locks needs \(needed) open files (one socket each, plus a margin), but `ulimit -n` allows at most \(limit.rlim_max)")
        }
        limit.rlim_cur = needed
        guard setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else {
            throw BenchFailure("could not raise the open-file limit to \(needed)")
        }
        return Int(needed)
    }
}

/// Starts an operation per index, keeping `concurrency` in flight. Loop thread only, except
/// `finishedCount` (read by the progress line) and the results (read after `done`).
private final class Window: @unchecked Sendable {
    let count: Int
    let concurrency: Int
    let operation: (Int, @escaping (String?) -> Void) -> Void
    let finishedCount = Counter()
    private(set) var failedIndices: [Int] = []
    private(set) var firstError: String?
    private var next = 0
    private var inFlight = 0
    private var finished = 0
    private var done: (() -> Void)?

    init(count: Int, concurrency: Int, operation: @escaping (Int, @escaping (String?) -> Void) -> Void) {
        self.count = count
        self.concurrency = concurrency
        self.operation = operation
    }

    func start(done: @escaping () -> Void) {
        self.done = done
        if count == 0 { return done() }
        launch()
    }

    private func launch() {
        while inFlight < concurrency && next < count {
            let index = next
            next += 1
            inFlight += 1
            operation(index) { [self] error in
                inFlight -= 1
                finished += 1
                finishedCount.increment()
                if let error {
                    failedIndices.append(index)
                    if firstError == nil { firstError = error }
                }
                if finished == count {
                    done?()
                    done = nil
                } else {
                    launch()
                }
            }
        }
    }
}

/// The keys `onLockLost` reported (it runs on the loop thread; the main thread reads).
private final class LostKeys: Sendable {
    private let state = Mutex<(calls: Int, keys: Set<String>)>((0, []))
    func insert(_ key: String) { state.withLock { $0.calls += 1; $0.keys.insert(key) } }
    var keys: Set<String> { state.withLock { $0.keys } }
    var calls: Int { state.withLock { $0.calls } }
}

func sleepNanoseconds(_ nanoseconds: UInt64) {
    var request = timespec(tv_sec: Int(nanoseconds / 1_000_000_000), tv_nsec: Int(nanoseconds % 1_000_000_000))
    var remaining = timespec()
    while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
}
