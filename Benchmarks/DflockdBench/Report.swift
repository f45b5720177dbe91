extension ThroughputBenchmark.Result {
    /// The Go tool's report, line for line, then the figures it lacks.
    func text(_ settings: ThroughputBenchmark.Settings) -> String {
        let latency = self.latency
        return """
            bench: mode=lock, \(settings.workers) workers x \(settings.rounds) rounds \
            (key_prefix=\(settings.keyPrefix.debugDescription), conns/worker=\(settings.connectionsPerWorker)) \
            api=\(settings.api.rawValue) pipeline=\(settings.pipeline ? "on" : "off") \
            keys=\(settings.contended ? "contended" : "uncontended") servers=\(settings.servers.map(\.description).joined(separator: ","))

              total ops : \(totalOps)
              wall time : \(formatted(wallS))s
              throughput: \(formatted(throughput, decimals: 1)) ops/s

              mean      : \(formatted(latency.meanMs)) ms
              min       : \(formatted(latency.minMs)) ms
              max       : \(formatted(latency.maxMs)) ms
              p50       : \(formatted(latency.p50Ms)) ms
              p99       : \(formatted(latency.p99Ms)) ms
              stdev     : \(formatted(latency.stdevMs)) ms

              cpu/op    : \(formatted(cpuPerOpUs, decimals: 2)) us (user \(formatted(cpu.userS))s + sys \(formatted(cpu.systemS))s, getrusage)
              peak RSS  : \(peakRSSKiB) KiB

            """
    }

    func json(_ settings: ThroughputBenchmark.Settings) -> JSONObject {
        var object = JSONObject()
        object.add("mode", "throughput")
        object.add("api", settings.api.rawValue)
        object.add("pipeline", settings.pipeline)
        object.add("contended", settings.contended)
        object.add("workers", settings.workers)
        object.add("rounds", settings.rounds)
        object.add("connections_per_worker", settings.connectionsPerWorker)
        object.add("key_prefix", settings.keyPrefix)
        object.add("servers", settings.servers.map(\.description))
        object.add("total_ops", totalOps)
        object.add("wall_time_s", wallS, decimals: 6)
        object.add("throughput_ops_per_s", throughput, decimals: 1)
        object.add("mean_ms", latency.meanMs)
        object.add("min_ms", latency.minMs)
        object.add("max_ms", latency.maxMs)
        object.add("p50_ms", latency.p50Ms)
        object.add("p99_ms", latency.p99Ms)
        object.add("stdev_ms", latency.stdevMs)
        object.add("cpu_user_s", cpu.userS, decimals: 6)
        object.add("cpu_sys_s", cpu.systemS, decimals: 6)
        object.add("cpu_us_per_op", cpuPerOpUs, decimals: 3)
        object.add("peak_rss_kib", peakRSSKiB)
        return object
    }
}
