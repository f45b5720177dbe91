import DflockdClient
import Dispatch

/// `--connection-micro`: what the async API costs over completion handlers when both run on the
/// loop thread. One persistent ``Connection``, `rounds` sequential acquire + release per run,
/// once through completion handlers and once through async calls in a task preferring the
/// loop's executor, alternated `repeats` times in one process so that both see the same
/// machine. Each run's CPU is the process's (getrusage) from its first request to its last
/// reply; the main thread sleeps on a semaphore meanwhile.
struct ConnectionMicroBenchmark {
    struct Settings {
        var rounds: Int
        var repeats: Int
        var key: String
        var timeoutS: Int
        var leaseTtlS: Int?
        var server: Server
    }

    struct Run {
        var cpu: CPUTime
        var wallS: Double
    }

    struct Result {
        var callbacks: [Run]
        var asyncLoop: [Run]

        static func median(_ values: [Double]) -> Double {
            let sorted = values.sorted()
            return sorted.count % 2 == 1 ? sorted[sorted.count / 2] : (sorted[sorted.count / 2 - 1] + sorted[sorted.count / 2]) / 2
        }

        var callbacksCPUS: Double { Self.median(callbacks.map(\.cpu.totalS)) }
        var asyncLoopCPUS: Double { Self.median(asyncLoop.map(\.cpu.totalS)) }
        var ratio: Double { asyncLoopCPUS / callbacksCPUS }
    }

    let settings: Settings

    func run() throws -> Result {
        let loop = EventLoop()
        defer { loop.shutdown() }
        let connection = try Connection(host: settings.server.host, port: settings.server.port, loop: loop)
        defer { connection.close() }
        try wait { done in connection.connect { done($0.mapError { BenchFailure("connect: \($0)") }) } }
        var result = Result(callbacks: [], asyncLoop: [])
        // One unmeasured round of each warms the caches and the allocator.
        _ = try runCallbacks(connection, rounds: 1)
        _ = try runAsync(connection, loop: loop, rounds: 1)
        for _ in 0..<settings.repeats {
            result.callbacks.append(try runCallbacks(connection, rounds: settings.rounds))
            result.asyncLoop.append(try runAsync(connection, loop: loop, rounds: settings.rounds))
        }
        return result
    }

    private func runCallbacks(_ connection: Connection, rounds: Int) throws -> Run {
        let key = settings.key, timeoutS = settings.timeoutS, leaseTtlS = settings.leaseTtlS
        return try wait { done in
            connection.loop.execute {
                let startCPU = CPUTime.now(), startNs = monotonicNanoseconds()
                var left = rounds
                func round() {
                    connection.acquire(key: key, timeoutS: timeoutS, leaseTtlS: leaseTtlS) { result in
                        guard case .success(let grant?) = result else { return done(.failure(BenchFailure("acquire: \(result)"))) }
                        connection.release(key: key, token: grant.token) { result in
                            if case .failure(let error) = result { return done(.failure(BenchFailure("release: \(error)"))) }
                            left -= 1
                            if left > 0 { return round() }
                            done(.success(Run(cpu: CPUTime.now() - startCPU, wallS: Double(monotonicNanoseconds() - startNs) / 1e9)))
                        }
                    }
                }
                round()
            }
        }
    }

    private func runAsync(_ connection: Connection, loop: EventLoop, rounds: Int) throws -> Run {
        let key = settings.key, timeoutS = settings.timeoutS, leaseTtlS = settings.leaseTtlS
        return try wait { done in
            Task(executorPreference: loop) {
                let startCPU = CPUTime.now(), startNs = monotonicNanoseconds()
                do {
                    for _ in 0..<rounds {
                        guard let grant = try await connection.acquire(key: key, timeoutS: timeoutS, leaseTtlS: leaseTtlS) else {
                            return done(.failure(BenchFailure("acquire timed out")))
                        }
                        try await connection.release(key: key, token: grant.token)
                    }
                } catch {
                    return done(.failure(BenchFailure("\(error)")))
                }
                done(.success(Run(cpu: CPUTime.now() - startCPU, wallS: Double(monotonicNanoseconds() - startNs) / 1e9)))
            }
        }
    }

    /// Blocks the calling thread until `body` calls its completion.
    private func wait<Value>(_ body: (@escaping @Sendable (Swift.Result<Value, BenchFailure>) -> Void) -> Void) throws -> Value {
        let outcome = Outcome<Value>()
        body { outcome.set($0) }
        outcome.semaphore.wait()
        switch outcome.value! {
        case .success(let value): return value
        case .failure(let failure): throw BenchFailure("connection micro-benchmark: \(failure)")
        }
    }
}

/// One result handed from the loop thread to the waiting main thread (the semaphore orders it).
private final class Outcome<Value>: @unchecked Sendable {
    let semaphore = DispatchSemaphore(value: 0)
    var value: Swift.Result<Value, BenchFailure>?

    func set(_ result: Swift.Result<Value, BenchFailure>) {
        value = result
        semaphore.signal()
    }
}

extension ConnectionMicroBenchmark.Result {
    func text(_ settings: ConnectionMicroBenchmark.Settings) -> String {
        let perOp = { (seconds: Double) in formatted(seconds / Double(settings.rounds) * 1e6, decimals: 2) }
        let runs = { (runs: [ConnectionMicroBenchmark.Run]) in
            runs.map { "\(perOp($0.cpu.totalS))" }.joined(separator: " ")
        }
        let wall = { (runs: [ConnectionMicroBenchmark.Run]) in
            formatted(Double(settings.rounds) / Self.median(runs.map(\.wallS)), decimals: 0)
        }
        return """
            bench: connection micro-benchmark, one Connection to \(settings.server), \(settings.rounds) sequential \
            acquire + release per run, \(settings.repeats) runs of each style, alternated

              callbacks         : cpu/op \(perOp(callbacksCPUS)) us (median; runs: \(runs(callbacks))), \(wall(callbacks)) ops/s
              async, loop exec. : cpu/op \(perOp(asyncLoopCPUS)) us (median; runs: \(runs(asyncLoop))), \(wall(asyncLoop)) ops/s
              ratio async/callbacks CPU: \(formatted(ratio, decimals: 3))x

            """
    }

    func json(_ settings: ConnectionMicroBenchmark.Settings) -> JSONObject {
        var object = JSONObject()
        object.add("mode", "connection-micro")
        object.add("rounds", settings.rounds)
        object.add("repeats", settings.repeats)
        object.add("server", settings.server.description)
        object.add("callbacks_cpu_us_per_op", callbacksCPUS / Double(settings.rounds) * 1e6)
        object.add("async_loop_cpu_us_per_op", asyncLoopCPUS / Double(settings.rounds) * 1e6)
        object.add("cpu_ratio_async_loop_to_callbacks", ratio, decimals: 4)
        return object
    }
}
