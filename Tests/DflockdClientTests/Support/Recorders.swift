import CoreMetrics
import Logging
import MetricsTestKit
@testable import DflockdClient

/// One log record as a `LogHandler` received it, rendered once.
struct LogRecord: Sendable, CustomStringConvertible {
    let level: Logger.Level
    let message: String
    let metadata: [String: String]

    var description: String { "[\(level)] \(message) \(metadata.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))" }
}

/// A `LogHandler` that keeps every record in an ``EventLog``, so a test can wait for one.
struct RecordingLogHandler: LogHandler {
    let records: EventLog<LogRecord>
    var logLevel: Logger.Level = .trace
    var metadata: Logger.Metadata = [:]
    var metadataProvider: Logger.MetadataProvider?

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        let merged = metadata.merging(event.metadata ?? [:]) { _, new in new }
        records.append(LogRecord(level: event.level, message: event.message.description,
                                 metadata: merged.mapValues { "\($0)" }))
    }

    /// A logger at `level` recording into a fresh log.
    static func logger(level: Logger.Level = .trace) -> (Logger, EventLog<LogRecord>) {
        let records = EventLog<LogRecord>()
        var logger = Logger(label: "test") { _ in RecordingLogHandler(records: records) }
        logger.logLevel = level
        return (logger, records)
    }
}

/// swift-metrics bootstrapped, once per test process, with MetricsTestKit's recording factory.
/// Tests read differences (other tests may record at the same time).
enum RecordedMetrics {
    static let factory: TestMetrics = {
        let factory = TestMetrics()
        MetricsSystem.bootstrap(factory)
        return factory
    }()

    /// How far each family has moved: counters by their total, timers, meters and recorders by
    /// how many values they received, keyed `label{dimension=value,…}`.
    static func snapshot() -> [String: Int64] {
        var result: [String: Int64] = [:]
        func name(_ label: String, _ dimensions: [(String, String)]) -> String {
            "\(label){\(dimensions.map { "\($0.0)=\($0.1)" }.joined(separator: ","))}"
        }
        for counter in factory.counters where counter.label.hasPrefix("dflockd_") {
            result[name(counter.label, counter.dimensions), default: 0] += counter.totalValue
        }
        for timer in factory.timers where timer.label.hasPrefix("dflockd_") {
            result[name(timer.label, timer.dimensions), default: 0] += Int64(timer.values.count)
        }
        for meter in factory.meters where meter.label.hasPrefix("dflockd_") {
            result[name(meter.label, meter.dimensions), default: 0] += Int64(meter.values.count)
        }
        return result
    }
}
