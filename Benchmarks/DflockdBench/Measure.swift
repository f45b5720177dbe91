import DflockdClient
import Dispatch
import Glibc
import Histogram
import Synchronization

/// Monotonic time in nanoseconds (`CLOCK_MONOTONIC`, a vDSO call: cheap enough per operation).
func monotonicNanoseconds() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
}

/// CPU time this process has used, all threads (`getrusage(RUSAGE_SELF)`).
struct CPUTime {
    var userS: Double
    var systemS: Double

    var totalS: Double { userS + systemS }

    static func now() -> CPUTime {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        return CPUTime(userS: Double(usage.ru_utime.tv_sec) + Double(usage.ru_utime.tv_usec) / 1e6,
                       systemS: Double(usage.ru_stime.tv_sec) + Double(usage.ru_stime.tv_usec) / 1e6)
    }

    static func - (lhs: CPUTime, rhs: CPUTime) -> CPUTime {
        CPUTime(userS: lhs.userS - rhs.userS, systemS: lhs.systemS - rhs.systemS)
    }
}

/// The CPU time of one thread of this process (user + system), by its pthread CPU clock.
struct ThreadCPUClock: @unchecked Sendable {
    private let clock: clockid_t

    /// The clock of the thread `loop` runs on (asked on that thread).
    init?(of loop: EventLoop) {
        let thread = Mutex<pthread_t?>(nil)
        let asked = DispatchSemaphore(value: 0)
        loop.execute {
            thread.withLock { $0 = pthread_self() }
            asked.signal()
        }
        asked.wait()
        var clock = clockid_t()
        guard let pthread = thread.withLock({ $0 }), pthread_getcpuclockid(pthread, &clock) == 0 else { return nil }
        self.clock = clock
    }

    /// Seconds of CPU the thread has used so far.
    var seconds: Double {
        var time = timespec()
        clock_gettime(clock, &time)
        return Double(time.tv_sec) + Double(time.tv_nsec) / 1e9
    }
}

enum ProcessMemory {
    /// The peak resident set size so far, in KiB (`ru_maxrss`, which Linux reports in KiB).
    static func peakRSSKiB() -> Int {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        return Int(usage.ru_maxrss)
    }

    /// The resident set size now, in bytes: the second field of `/proc/self/statm` (pages).
    static func currentRSSBytes() -> Int? {
        guard let text = readSmallFile("/proc/self/statm") else { return nil }
        let fields = text.split(separator: " ")
        guard fields.count >= 2, let pages = Int(fields[1]) else { return nil }
        return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
    }
}

/// This process's I/O counters from `/proc/self/io`: every `write(2)`-family call counts in
/// `syscw` and its bytes in `wchar`, sockets included.
struct IOCounters {
    var writeCalls: Int
    var writtenBytes: Int
    /// read(2)-family calls (`syscr`).
    var readCalls = 0

    static func now() -> IOCounters? {
        guard let text = readSmallFile("/proc/self/io") else { return nil }
        var calls: Int?
        var bytes: Int?
        var reads = 0
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: ":")
            guard parts.count == 2 else { continue }
            let value = Int(parts[1].drop(while: { $0 == " " }))
            switch parts[0] {
            case "syscw": calls = value
            case "wchar": bytes = value
            case "syscr": reads = value ?? 0
            default: break
            }
        }
        guard let calls, let bytes else { return nil }
        return IOCounters(writeCalls: calls, writtenBytes: bytes, readCalls: reads)
    }
}

/// Reads a small text file (a few KiB at most) with plain `read(2)`.
func readSmallFile(_ path: String) -> String? {
    let descriptor = open(path, O_RDONLY | O_CLOEXEC)
    guard descriptor >= 0 else { return nil }
    defer { close(descriptor) }
    var bytes = [UInt8](repeating: 0, count: 4096)
    var total = 0
    while total < bytes.count {
        let count = bytes.withUnsafeMutableBytes { read(descriptor, $0.baseAddress! + total, $0.count - total) }
        if count <= 0 { break }
        total += count
    }
    return String(decoding: bytes[..<total], as: UTF8.self)
}

/// Writes a whole string to a file descriptor with `write(2)`; returns the calls and bytes used
/// (the holders mode subtracts its own writes from the process's I/O counters).
@discardableResult
func writeAll(_ text: String, to descriptor: Int32) -> (calls: Int, bytes: Int) {
    var calls = 0
    var bytes = 0
    var utf8 = Array(text.utf8)
    utf8.withUnsafeMutableBytes { buffer in
        while bytes < buffer.count {
            let count = write(descriptor, buffer.baseAddress! + bytes, buffer.count - bytes)
            calls += 1
            if count < 0 {
                if errno == EINTR { continue }
                break
            }
            bytes += count
        }
    }
    return (calls, bytes)
}

/// Operation latencies: exact count, min, max, mean and sample standard deviation (as the Go
/// server project's `cmd/bench` computes them), and percentiles from an HdrHistogram with three
/// significant digits (at most 0.1 % relative error).
struct LatencyRecorder: Sendable {
    private(set) var histogram: Histogram<UInt64>
    private(set) var count = 0
    private(set) var minNs = UInt64.max
    private(set) var maxNs: UInt64 = 0
    // Welford's running mean and sum of squared deviations, in nanoseconds.
    private var meanNs = 0.0
    private var squaredDeviations = 0.0

    /// - Parameter highestNs: the largest latency tracked exactly; longer ones are clamped into
    ///   the histogram's top bucket (min/max/mean/stdev stay exact).
    init(highestNs: UInt64) {
        histogram = Histogram(lowestDiscernibleValue: 1, highestTrackableValue: highestNs, numberOfSignificantValueDigits: .three)
    }

    mutating func record(_ nanoseconds: UInt64) {
        _ = histogram.record(Swift.min(nanoseconds, histogram.highestTrackableValue))
        count += 1
        minNs = Swift.min(minNs, nanoseconds)
        maxNs = Swift.max(maxNs, nanoseconds)
        let delta = Double(nanoseconds) - meanNs
        meanNs += delta / Double(count)
        squaredDeviations += delta * (Double(nanoseconds) - meanNs)
    }

    var summary: LatencySummary {
        guard count > 0 else { return LatencySummary(meanMs: 0, minMs: 0, maxMs: 0, p50Ms: 0, p99Ms: 0, stdevMs: 0) }
        let stdevNs = count > 1 ? (squaredDeviations / Double(count - 1)).squareRoot() : 0
        return LatencySummary(meanMs: meanNs / 1e6,
                              minMs: Double(minNs) / 1e6,
                              maxMs: Double(maxNs) / 1e6,
                              p50Ms: Double(histogram.valueAtPercentile(50)) / 1e6,
                              p99Ms: Double(histogram.valueAtPercentile(99)) / 1e6,
                              stdevMs: stdevNs / 1e6)
    }
}

struct LatencySummary {
    var meanMs: Double
    var minMs: Double
    var maxMs: Double
    var p50Ms: Double
    var p99Ms: Double
    var stdevMs: Double
}

/// Measures a server's answer time from the calling thread, on a blocking socket of its own:
/// it sends a release of a key nobody holds (`r <key> 000…`), which every server answers with
/// `error` at once and without side effects, and times the reply. Counts its own `write(2)`
/// calls and bytes, which the holders mode takes out of the process's I/O counters.
final class ServerPinger {
    private var descriptor: Int32 = -1
    private let request: [UInt8]
    private(set) var writeCalls = 0
    private(set) var writtenBytes = 0

    init(server: Server, key: String) throws {
        request = Array("r\n\(key)\n\(String(repeating: "0", count: 32))\n".utf8)
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(server.host, String(server.port), &hints, &list) == 0, let first = list else {
            throw BenchFailure("cannot resolve \(server)")
        }
        defer { freeaddrinfo(list) }
        let fd = socket(first.pointee.ai_family, first.pointee.ai_socktype, first.pointee.ai_protocol)
        guard fd >= 0, connect(fd, first.pointee.ai_addr, first.pointee.ai_addrlen) == 0 else {
            if fd >= 0 { close(fd) }
            throw BenchFailure("cannot connect to \(server) to time its answers")
        }
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        var timeout = timeval(tv_sec: 30, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        descriptor = fd
    }

    deinit {
        if descriptor >= 0 { close(descriptor) }
    }

    /// One round trip in milliseconds, or nil when the server did not answer (the connection is
    /// then given up).
    func ping() -> Double? {
        guard descriptor >= 0 else { return nil }
        let start = monotonicNanoseconds()
        let sent = request.withUnsafeBytes { write(descriptor, $0.baseAddress, $0.count) }
        writeCalls += 1
        if sent > 0 { writtenBytes += sent }
        guard sent == request.count else { return giveUp() }
        var byte: UInt8 = 0
        while true {
            guard read(descriptor, &byte, 1) == 1 else { return giveUp() }
            if byte == 0x0A { break }
        }
        return Double(monotonicNanoseconds() - start) / 1e6
    }

    private func giveUp() -> Double? {
        close(descriptor)
        descriptor = -1
        return nil
    }
}

/// A counter the loop (or worker tasks) bump and the progress line reads.
final class Counter: Sendable {
    private let atomic = Atomic<Int>(0)
    var value: Int { atomic.load(ordering: .relaxed) }
    func increment() { atomic.add(1, ordering: .relaxed) }
}
