import ArgumentParser
import Glibc
import Metrics
import Prometheus

/// `dflockd-bench`: lock throughput (the Go server project's `cmd/bench` workload and flags) and
/// many concurrently held locks, measured on the library's event loop.
@main
struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dflockd-bench",
        abstract: "Benchmark dflockd lock throughput, or hold many locks at once.",
        discussion: """
            Throughput mode (default) runs the Go server project's cmd/bench workload: --workers \
            workers each do --rounds rounds of acquire + release on their own random key \
            (<key>_<n>), on persistent connections. It prints the same figures in the same order \
            (total ops, wall time, throughput, mean, min, max, p50, p99, stdev), then the client's \
            CPU time per op and peak RSS.

            Connection micro-benchmark (--connection-micro): one persistent Connection, \
            --micro-rounds sequential acquire + release through completion handlers and through async \
            calls on the loop's executor, alternated, in one process: the CPU of each and the ratio.

            Holders mode (--holders N) holds N DistributedLocks at once on one event loop thread \
            for --hold-seconds while they renew their leases, and reports time to acquire all, \
            renewals done and failed, CPU per renewal and RSS per held lock.
            """)

    // MARK: Throughput (names and defaults as in the Go tool)

    @Option(help: "Number of concurrent workers.")
    var workers = 10

    @Option(help: "Acquire/release rounds per worker.")
    var rounds = 50

    @Option(help: "Key prefix: each worker uses <key>_<random>; with --contended, the one key <key>.")
    var key = "bench"

    @Option(help: "Acquire timeout in seconds.")
    var timeout = 30

    @Option(help: "Lease TTL in seconds (0: the server's default).")
    var lease = 10

    @Option(help: "Comma-separated host:port pairs; keys are placed on them with stableHashShard.")
    var servers = "127.0.0.1:6388"

    @Option(help: "Connections per worker, used round-robin by round (0 = 1 persistent connection).")
    var connections = 0

    @Option(help: "Place every worker's (or holder's) DistributedLock on one LockSession with this many shared connections per server (0 = today: raw connections per worker in throughput mode, one connection per holder in holders mode).")
    var sharedConnections = 0

    @Flag(help: "Put every worker on the one key <key>.")
    var contended = false

    @Flag(help: "Send each release and the next acquire back to back, without waiting for the release reply.")
    var pipeline = false

    @Option(help: "Client API: 'callbacks' (completion handlers on the loop thread), 'async' (async/await from the global pool: a hop to the loop and back per call) or 'async-loop' (async/await in tasks preferring the loop's executor: no hop).")
    var api = ClientAPI.callbacks

    @Option(help: "Event loop batching window in microseconds: after a turn that read from several connections, wait this long before polling again (EventLoop(batchingWindow:)); 0 = off.")
    var batchingWindowUs = 0

    @Flag(help: "Write the result as JSON on standard output.")
    var json = false

    // MARK: Connection micro-benchmark

    @Flag(help: "Connection micro-benchmark: on one persistent Connection, --micro-rounds sequential acquire + release through completion handlers, then the same through async calls on the loop's executor, alternated --micro-repeat times; reports the CPU of each and their ratio.")
    var connectionMicro = false

    @Option(help: "Connection micro-benchmark: acquire + release rounds per run.")
    var microRounds = 3000

    @Option(help: "Connection micro-benchmark: runs of each style (alternated; medians reported).")
    var microRepeat = 5

    @Flag(help: "Bootstrap swift-metrics with an in-process Prometheus registry (swift-prometheus) first, so that the library's dflockd_ metrics are recorded for real; the dflockd_ samples are counted on standard error at the end.")
    var metrics = false

    // MARK: Holders

    @Option(help: "Holders mode: hold this many locks at once.")
    var holders: Int?

    @Option(help: "Holders mode: seconds to hold every lock.")
    var holdSeconds = 60

    @Option(help: "Holders mode: renew when this fraction of the lease has passed.")
    var renewRatio = 0.5

    @Option(help: "Holders mode: acquires (and releases) in flight at once.")
    var acquireConcurrency = 100

    func validate() throws {
        guard workers >= 1 else { throw ValidationError("--workers must be at least 1") }
        guard rounds >= 1 else { throw ValidationError("--rounds must be at least 1") }
        guard timeout >= 0 else { throw ValidationError("--timeout must be at least 0") }
        guard lease >= 0 else { throw ValidationError("--lease must be at least 0 (0: server default)") }
        guard connections >= 0 else { throw ValidationError("--connections must be at least 0") }
        guard (0...1024).contains(sharedConnections) else { throw ValidationError("--shared-connections must be 0...1024") }
        if sharedConnections > 0 && (pipeline || connections > 0) {
            throw ValidationError("--shared-connections places DistributedLocks on a session: --pipeline and --connections apply to raw connections only")
        }
        guard (0...10_000).contains(batchingWindowUs) else { throw ValidationError("--batching-window-us must be between 0 and 10000") }
        _ = try parsedServers()
        if pipeline && contended {
            throw ValidationError("--pipeline applies to uncontended keys only: a worker on a shared key cannot send its next acquire before the others had their turn")
        }
        if pipeline && api != .callbacks {
            throw ValidationError("--pipeline needs --api callbacks: two async calls in flight from one task give no order on the wire")
        }
        if connectionMicro {
            guard microRounds >= 1 else { throw ValidationError("--micro-rounds must be at least 1") }
            guard microRepeat >= 1 else { throw ValidationError("--micro-repeat must be at least 1") }
            guard holders == nil else { throw ValidationError("--connection-micro and --holders are separate modes: choose one") }
        }
        if let holders {
            guard holders >= 1 else { throw ValidationError("--holders must be at least 1") }
            guard holdSeconds >= 0 else { throw ValidationError("--hold-seconds must be at least 0") }
            guard renewRatio > 0, renewRatio < 1 else { throw ValidationError("--renew-ratio must be between 0 and 1 (exclusive)") }
            guard acquireConcurrency >= 1 else { throw ValidationError("--acquire-concurrency must be at least 1") }
        }
    }

    func run() throws {
        let servers = try parsedServers()
        let registry = metrics ? PrometheusCollectorRegistry() : nil
        if let registry { MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry)) }
        defer {
            if let registry {
                let samples = registry.emitToString().split(separator: "\n").filter { $0.hasPrefix("dflockd_") }
                writeAll("metrics: \(samples.count) dflockd_ samples in the Prometheus registry\n", to: 2)
            }
        }
        if connectionMicro {
            let settings = ConnectionMicroBenchmark.Settings(rounds: microRounds, repeats: microRepeat, key: key, timeoutS: timeout,
                                                             leaseTtlS: lease > 0 ? lease : nil, server: servers[0])
            let result = try ConnectionMicroBenchmark(settings: settings).run()
            writeAll(json ? result.json(settings).text : result.text(settings), to: 1)
        } else if let holders {
            let settings = HoldersBenchmark.Settings(holders: holders, holdSeconds: holdSeconds, leaseTtlS: lease > 0 ? lease : nil,
                                                     renewRatio: renewRatio, timeoutS: timeout, keyPrefix: key,
                                                     servers: servers, concurrency: acquireConcurrency,
                                                     sharedConnections: sharedConnections,
                                                     batchingWindow: .microseconds(batchingWindowUs))
            let result = try HoldersBenchmark(settings: settings).run()
            writeAll(json ? result.json(settings).text : result.text(settings), to: 1)
            if !result.passed { throw ExitCode(1) }
        } else {
            let settings = ThroughputBenchmark.Settings(workers: workers, rounds: rounds, keyPrefix: key, contended: contended,
                                                        pipeline: pipeline, api: api, timeoutS: timeout,
                                                        leaseTtlS: lease > 0 ? lease : nil, servers: servers,
                                                        connectionsPerWorker: max(1, connections),
                                                        sharedConnections: sharedConnections,
                                                        batchingWindow: .microseconds(batchingWindowUs))
            let result = try ThroughputBenchmark(settings: settings).run()
            writeAll(json ? result.json(settings).text : result.text(settings), to: 1)
        }
    }

    private func parsedServers() throws -> [Server] {
        let servers = try servers.split(separator: ",").map { try Server(parsing: $0.trimmingSpaces) }
        guard !servers.isEmpty else { throw ValidationError("--servers must name at least one host:port") }
        return servers
    }
}

enum ClientAPI: String, ExpressibleByArgument, CaseIterable {
    case callbacks, async
    case asyncLoop = "async-loop"
}

/// One `host:port` from `--servers` (`[v6-literal]:port` too).
struct Server: Sendable, CustomStringConvertible {
    let host: String
    let port: Int

    init(parsing text: Substring) throws {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]), (1...65535).contains(port) else {
            throw ValidationError("--servers: \(String(text).debugDescription) is not host:port")
        }
        var host = text[..<colon]
        if host.hasPrefix("["), host.hasSuffix("]") { host = host.dropFirst().dropLast() }
        guard !host.isEmpty, !host.contains(where: \.isWhitespace) else {
            throw ValidationError("--servers: \(String(text).debugDescription) has no host, or a host with spaces")
        }
        self.host = String(host)
        self.port = port
    }

    var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
    var pair: (String, Int) { (host, port) }
}

/// A failure that ends a run: printed on stderr as it is, exit status 1.
struct BenchFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

extension Substring {
    var trimmingSpaces: Substring {
        var text = self
        while text.first == " " { text.removeFirst() }
        while text.last == " " { text.removeLast() }
        return text
    }
}
