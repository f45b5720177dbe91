import CoreMetrics
import Synchronization

/// The library's metrics, through swift-metrics (names begin with `dflockd_`; see the README's
/// "Operating it"). One set per process and kind, shared by every lock, semaphore and
/// connection, so a lock costs one reference, not a set of handlers.
///
/// The set is made from `MetricsSystem.factory` the first time it is needed, and again when
/// that factory has changed since (`MetricsSystem.bootstrap` after the first lock was made):
/// objects made before the bootstrap keep the set they were made with.
final class DflockdMetrics: Sendable {
    /// Per kind of lease (`kind` = `lock` or `semaphore`).
    final class Lease: Sendable {
        let granted: Counter
        let timedOut: Counter
        let failed: Counter
        let acquireWait: Timer
        let renewed: Counter
        let renewedLate: Counter
        let renewalRefused: Counter
        let renewalFailed: Counter
        let renewalRoundTrip: Timer
        let lostRefused: Counter
        let lostConnection: Counter
        let lostDeadline: Counter
        let lostProtocol: Counter
        let held: Meter

        init(kind: String, factory: any MetricsFactory) {
            let kindDimension = ("kind", kind)
            func counter(_ label: String, _ name: String, _ value: String) -> Counter {
                Counter(label: label, dimensions: [kindDimension, (name, value)], factory: factory)
            }
            granted = counter("dflockd_acquires_total", "outcome", "granted")
            timedOut = counter("dflockd_acquires_total", "outcome", "timed_out")
            failed = counter("dflockd_acquires_total", "outcome", "failed")
            acquireWait = Timer(label: "dflockd_acquire_wait_seconds", dimensions: [kindDimension], preferredDisplayUnit: .seconds, factory: factory)
            renewed = counter("dflockd_renewals_total", "outcome", "renewed")
            renewedLate = counter("dflockd_renewals_total", "outcome", "late")
            renewalRefused = counter("dflockd_renewals_total", "outcome", "refused")
            renewalFailed = counter("dflockd_renewals_total", "outcome", "failed")
            renewalRoundTrip = Timer(label: "dflockd_renewal_rtt_seconds", dimensions: [kindDimension], preferredDisplayUnit: .seconds, factory: factory)
            lostRefused = counter("dflockd_locks_lost_total", "reason", "refused")
            lostConnection = counter("dflockd_locks_lost_total", "reason", "connection_lost")
            lostDeadline = counter("dflockd_locks_lost_total", "reason", "deadline")
            lostProtocol = counter("dflockd_locks_lost_total", "reason", "protocol_violation")
            held = Meter(label: "dflockd_locks_held", dimensions: [kindDimension], factory: factory)
        }

        func lost(_ reason: LossReason) -> Counter {
            switch reason {
            case .refused: return lostRefused
            case .connectionLost: return lostConnection
            case .deadline: return lostDeadline
            case .protocolViolation: return lostProtocol
            }
        }
    }

    let lock: Lease
    let semaphore: Lease
    /// Connections whose handshake (TCP, TLS, auth) completed and that have not ended.
    let connectionsOpen: Meter
    /// Connections that could not be established.
    let connectFailures: Counter
    /// New connections opened by a lock or session after its previous one failed.
    let reconnects: Counter

    private init(factory: any MetricsFactory) {
        lock = Lease(kind: "lock", factory: factory)
        semaphore = Lease(kind: "semaphore", factory: factory)
        connectionsOpen = Meter(label: "dflockd_connections_open", dimensions: [], factory: factory)
        connectFailures = Counter(label: "dflockd_connect_failures_total", dimensions: [], factory: factory)
        reconnects = Counter(label: "dflockd_reconnects_total", dimensions: [], factory: factory)
    }

    private static let cache = Mutex<(factoryType: ObjectIdentifier, metrics: DflockdMetrics)?>(nil)

    /// The set for the factory bootstrapped now.
    static var current: DflockdMetrics {
        let factory = MetricsSystem.factory
        let factoryType = ObjectIdentifier(type(of: factory))
        return cache.withLock { cached in
            if let cached, cached.factoryType == factoryType { return cached.metrics }
            let metrics = DflockdMetrics(factory: factory)
            cached = (factoryType, metrics)
            return metrics
        }
    }
}

/// Why a held lease was lost, as the metrics and logs name it.
enum LossReason: String, Sendable {
    /// The server refused a renewal (the token no longer holds the key).
    case refused
    /// The connection ended or failed under the lease.
    case connectionLost = "connection_lost"
    /// No renewal was answered before the local lease deadline.
    case deadline
    /// The server sent something the client cannot accept.
    case protocolViolation = "protocol_violation"
}
