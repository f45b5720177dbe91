extension ThroughputBenchmark.Result {
    /// The Go tool's report, line for line, then the figures it lacks.
    func text(_ settings: ThroughputBenchmark.Settings) -> String {
        let latency = self.latency
        return """
            bench: mode=lock, \(settings.workers) workers x \(settings.rounds) rounds \
            (key_prefix=\(settings.keyPrefix.debugDescription), \(settings.sharedConnections > 0 ? "shared_connections=\(settings.sharedConnections)" : "conns/worker=\(settings.connectionsPerWorker)")) \
            api=\(settings.api.rawValue) pipeline=\(settings.pipeline ? "on" : "off") \
            batching_window=\(settings.batchingWindow.microseconds) us \
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
              syscalls  : \(syscallsPerOp) per op (/proc/self/io)

            """
    }

    var syscallsPerOp: String {
        guard let writeCalls, let readCalls, totalOps > 0 else { return "n/a" }
        return "write \(formatted(Double(writeCalls) / Double(totalOps), decimals: 3)), read \(formatted(Double(readCalls) / Double(totalOps), decimals: 3))"
    }

    func json(_ settings: ThroughputBenchmark.Settings) -> JSONObject {
        var object = JSONObject()
        object.add("mode", "throughput")
        object.add("shared_connections", settings.sharedConnections)
        object.add("write_calls", writeCalls ?? -1)
        object.add("read_calls", readCalls ?? -1)
        object.add("api", settings.api.rawValue)
        object.add("pipeline", settings.pipeline)
        object.add("batching_window_us", Int(settings.batchingWindow.microseconds))
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

extension HoldersBenchmark.Result {
    func text(_ settings: HoldersBenchmark.Settings) -> String {
        let mib = { (bytes: Int) in formatted(Double(bytes) / 1_048_576, decimals: 1) + " MiB" }
        var renewals = "unknown (/proc/self/io unreadable)"
        let sortedRTTs = serverRTTsMs.sorted()
        var rttSummary = "no sample"
        if let slowest = sortedRTTs.last {
            rttSummary = "median \(formatted(sortedRTTs[sortedRTTs.count / 2], decimals: 1)) ms, max \(formatted(slowest, decimals: 1)) ms"
        }
        if serverPingsUnanswered > 0 { rttSummary += ", \(serverPingsUnanswered) unanswered" }
        if sharedConnections > 0, let renewalsDone, let renewalWrites {
            renewals = "\(renewalsDone) (bytes written in the \(formatted(holdS, decimals: 1)) s hold / \(renewalRequestBytes) per renewal, /proc/self/io; "
                + "in \(renewalWrites) write(2) calls on \(sharedConnections) shared connection(s) per server"
            if let renewalBytes, renewalBytes % max(1, renewalRequestBytes) != 0 { renewals += "; bytes are NOT a whole number of renewals" }
            if let expectedRenewals { renewals += "; expected \(expectedRenewals.lowerBound)...\(expectedRenewals.upperBound)" }
            renewals += ")"
        } else if let renewalWrites {
            renewals = "\(renewalWrites) (write(2) calls in the \(formatted(holdS, decimals: 1)) s hold, /proc/self/io"
            if let bytesAgree { renewals += bytesAgree ? "; bytes agree" : "; bytes DISAGREE: \(renewalBytes ?? 0) written, \(renewalRequestBytes) per renewal" }
            if let expectedRenewals { renewals += "; expected \(expectedRenewals.lowerBound)...\(expectedRenewals.upperBound)" }
            renewals += ")"
        }
        var lines = [
            "bench: holders=\(holders), hold=\(settings.holdSeconds)s, lease=\(settings.leaseTtlS.map { "\($0)s" } ?? "server default"), renew_ratio=\(settings.renewRatio) "
                + "(key_prefix=\(settings.keyPrefix.debugDescription), servers=\(settings.servers.map(\.description).joined(separator: ",")), "
                + "in flight=\(settings.concurrency), open files limit=\(fileLimit))",
            "",
            "  time to acquire all : \(formatted(acquireS))s (\(formatted(Double(holders) / acquireS, decimals: 1)) locks/s)\(acquireFailures > 0 ? "; \(acquireFailures) FAILED, first: \(firstAcquireError ?? "")" : "")",
            "  held at end         : \(heldAtEnd)/\(holders) (state held with the token it had when the hold began, and the server confirms the key taken)",
            "  renewals done       : \(renewals)",
            "  renewals failed     : \(failedDuringHold) during the hold; \(failedLocks) by the end of the server check "
                + "(onLockLost calls \(lockLostCalls), seen not held or with another token \(seenLost), free at the server \(serverNotHeld))",
            "  server answer time  : \(rttSummary) (one request a second from another connection during the hold)",
            "  CPU per renewal     : \(cpuPerRenewalUs.map { formatted($0, decimals: 2) + " us" } ?? "n/a") (user \(formatted(holdCPU.userS))s + sys \(formatted(holdCPU.systemS))s during the hold, whole process); "
                + "loop thread \(loopCPUPerRenewalUs.map { formatted($0, decimals: 2) + " us" } ?? "n/a") (\(holdLoopCPUS.map { formatted($0) + "s" } ?? "n/a"))",
            "  RSS per held lock   : \(formatted(rssPerLockBytes, decimals: 0)) B (/proc/self/statm: \(mib(baselineRSS)) before creating locks, \(mib(heldRSS)) with all held, \(mib(afterHoldRSS)) after the hold)",
            "  peak RSS            : \(peakRSSKiB) KiB",
        ]
        if let firstServerError { lines.append("  first server check  : \(firstServerError)") }
        lines.append("  result              : \(passed ? "PASS" : "FAIL")")
        return lines.joined(separator: "\n") + "\n"
    }

    func json(_ settings: HoldersBenchmark.Settings) -> JSONObject {
        var object = JSONObject()
        object.add("mode", "holders")
        object.add("holders", holders)
        object.add("hold_seconds", settings.holdSeconds)
        object.add("lease_s", settings.leaseTtlS ?? 0)
        object.add("renew_ratio", settings.renewRatio, decimals: 3)
        object.add("acquire_concurrency", settings.concurrency)
        object.add("servers", settings.servers.map(\.description))
        object.add("open_files_limit", fileLimit)
        object.add("acquire_all_s", acquireS, decimals: 6)
        object.add("acquire_failures", acquireFailures)
        object.add("hold_s", holdS, decimals: 6)
        object.add("held_at_end", heldAtEnd)
        object.add("renewals_done", renewalsDone ?? -1)
        object.add("renewal_writes", renewalWrites ?? -1)
        object.add("shared_connections", sharedConnections)
        object.add("renewal_bytes_agree", bytesAgree ?? false)
        object.add("renewals_expected_min", expectedRenewals?.lowerBound ?? -1)
        object.add("renewals_expected_max", expectedRenewals?.upperBound ?? -1)
        object.add("renewals_failed", failedDuringHold)
        object.add("failed_by_end", failedLocks)
        object.add("server_rtt_max_ms", serverRTTsMs.max() ?? .nan)
        object.add("on_lock_lost_calls", lockLostCalls)
        object.add("seen_lost", seenLost)
        object.add("server_not_held", serverNotHeld)
        object.add("hold_cpu_user_s", holdCPU.userS, decimals: 6)
        object.add("hold_cpu_sys_s", holdCPU.systemS, decimals: 6)
        object.add("cpu_us_per_renewal", cpuPerRenewalUs ?? .nan)
        object.add("loop_cpu_us_per_renewal", loopCPUPerRenewalUs ?? .nan)
        object.add("rss_baseline_bytes", baselineRSS)
        object.add("rss_held_bytes", heldRSS)
        object.add("rss_after_hold_bytes", afterHoldRSS)
        object.add("rss_per_lock_bytes", rssPerLockBytes, decimals: 1)
        object.add("peak_rss_kib", peakRSSKiB)
        object.add("passed", passed)
        return object
    }
}

extension Duration {
    /// Whole microseconds, for reports.
    var microseconds: Int64 {
        components.seconds * 1_000_000 + components.attoseconds / 1_000_000_000_000
    }
}
