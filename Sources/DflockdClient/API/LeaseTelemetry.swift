import CoreMetrics
import Logging

/// What a lock's or semaphore's driver logs and counts, read off each step of its
/// ``LeaseMachine``: the event, the state before, the actions the machine chose and the state
/// after. It decides nothing; every transition is the machine's. Loop-confined, like the driver.
///
/// Levels: a lost lease and a renewal answered late (after half of what was left of the lease
/// when it was sent) at `warning`; a reconnect and an unconfirmed release at `notice`/`info`;
/// outcomes and state changes at `debug`; renewals at `trace`.
struct LeaseTelemetry {
    /// The lock's settings (shared with it): its logger, metrics, key, kind and server.
    private let settings: LeaseSettings
    private let reconnects: Counter
    /// nil when the lock's logger logs nothing (``Logger/logsNothing``): every statement is
    /// then skipped whole.
    private var logger: Logger? { logs ? settings.logger : nil }
    private var metrics: DflockdMetrics.Lease { settings.metrics }
    /// When each acquire, enqueue and wait in flight was started (loop clock).
    private var startedMs = CallTable<LeaseMachine.CallID, UInt64>()
    /// Whether the held gauge counts this lease now.
    private(set) var countsAsHeld = false
    /// Whether the logger can log (see `logger`). Beside the other flag: a lone `Bool` between
    /// the 8-byte fields cost 8 bytes a lock in padding.
    private let logs: Bool
    /// Why the last session ended, when it failed rather than being closed or released: the
    /// next connection is then a reconnect.
    private var lastFailure: String?

    init(settings: LeaseSettings) {
        self.settings = settings
        logs = !settings.logger.logsNothing
        reconnects = (settings.connectionMetrics ?? .current).reconnects
    }

    /// What the telemetry needs of the state before a step.
    struct Before {
        let holding: LeaseMachine.Holding?
    }

    /// `after` and `isConnected` are the machine's after the step (passed apart, so that the
    /// whole machine is not copied on every step).
    mutating func observe(_ event: LeaseMachine.Event, before: Before, actions: [LeaseMachine.Action],
                          after holding: LeaseMachine.Holding?, isConnected: Bool, nowMs: UInt64) {
        switch event {
        case .acquireRequested(let call, _), .enqueueRequested(let call, _), .waitRequested(let call, _):
            startedMs.set(nowMs, for: call)
        case .answered(_, .renew, .renewed(let leaseS), let sentAtMs):
            if let previous = before.holding, holding != nil {
                renewed(leaseS: leaseS, sentAtMs: sentAtMs, deadlineMs: previous.deadlineMs, nowMs: nowMs)
            }
        case .failed(_, .renew, let error) where before.holding != nil && holding == nil:
            (error.isServerAnswer ? metrics.renewalRefused : metrics.renewalFailed).increment()
        default:
            break
        }
        guard !actions.isEmpty else { return }
        for action in actions {
            switch action {
            case .openConnection:
                if let reason = lastFailure {
                    lastFailure = nil
                    reconnects.increment()
                    logger?.info("reconnecting", metadata: metadata([LogField.reason: .string(reason)]))
                }
            case .redirectSession(_, _, let leader):
                logger?.info("following a redirect to the cluster leader", metadata: metadata([LogField.leader: .string("\(leader)")]))
            case .complete(let call, let operation, let outcome):
                completed(call, operation, outcome, holding: holding, nowMs: nowMs)
            case .reportLockLost(let token):
                lost(token, event: event, before: before, nowMs: nowMs)
            case .stateChanged(let state):
                let held = state == .held
                if held != countsAsHeld {
                    countsAsHeld = held
                    held ? metrics.held.increment() : metrics.held.decrement()
                }
                logger?.debug("state changed", metadata: metadata([LogField.state: .string("\(state)")]))
            default:
                break
            }
        }
        if case .failed(_, nil, let error) = event, lastFailure == nil, !isConnected {
            lastFailure = Redaction.error(error)
        }
    }

    private mutating func completed(_ call: LeaseMachine.CallID, _ operation: LeaseMachine.Operation,
                                    _ outcome: LeaseMachine.Outcome, holding: LeaseMachine.Holding?, nowMs: UInt64) {
        guard operation != .release else {
            switch outcome {
            case .failed(.releaseUnconfirmed(let key, let leaseS)):
                logger?.notice("release unconfirmed", metadata: metadata([
                    LogField.reason: .string(LockError.releaseUnconfirmed(key: key, leaseS: leaseS).description)]))
            case .failed(let error):
                logger?.debug("release failed", metadata: metadata([LogField.reason: .string(Redaction.error(error))]))
            default:
                logger?.debug("released", metadata: metadata())
            }
            return
        }
        let started = startedMs.removeValue(forKey: call)
        let elapsedMs = started.map { nowMs &- $0 } ?? 0
        switch outcome {
        case .granted:
            metrics.granted.increment()
            if started != nil { metrics.acquireWait.recordMilliseconds(elapsedMs) }
            logger?.debug("acquired", metadata: metadata([
                LogField.token: .string(holding.map { Redaction.token($0.grant.token) } ?? ""),
                LogField.leaseS: .stringConvertible(holding?.leaseS ?? 0),
                LogField.elapsedMs: .stringConvertible(elapsedMs)]))
        case .timedOut:
            metrics.timedOut.increment()
            if started != nil { metrics.acquireWait.recordMilliseconds(elapsedMs) }
            logger?.debug("acquire timed out", metadata: metadata([LogField.elapsedMs: .stringConvertible(elapsedMs)]))
        case .queued:
            logger?.debug("queued", metadata: metadata())
        case .failed(let error):
            metrics.failed.increment()
            logger?.debug("\(operation) failed", metadata: metadata([LogField.reason: .string(Redaction.error(error))]))
        case .released:
            break
        }
    }

    private mutating func renewed(leaseS: Int, sentAtMs: UInt64, deadlineMs: UInt64, nowMs: UInt64) {
        let roundTripMs = nowMs &- sentAtMs
        metrics.renewalRoundTrip.recordMilliseconds(roundTripMs)
        let remainingMs = deadlineMs > sentAtMs ? deadlineMs - sentAtMs : 0
        if roundTripMs > 0 && roundTripMs * 2 > remainingMs {
            metrics.renewedLate.increment()
            logger?.warning("renewal answered late", metadata: metadata([
                LogField.roundTripMs: .stringConvertible(roundTripMs), LogField.remainingMs: .stringConvertible(remainingMs),
                LogField.leaseS: .stringConvertible(leaseS)]))
        } else {
            metrics.renewed.increment()
            logger?.trace("renewed", metadata: metadata([LogField.roundTripMs: .stringConvertible(roundTripMs),
                                                        LogField.leaseS: .stringConvertible(leaseS)]))
        }
    }

    private mutating func lost(_ token: String, event: LeaseMachine.Event, before: Before, nowMs: UInt64) {
        let reason: LossReason
        let detail: String
        switch event {
        case .timerFired, .renewalRequested:
            reason = .deadline
            detail = "no renewal was answered before the lease's local deadline"
        case .failed(_, let request, let error):
            reason = request != nil && error.isServerAnswer ? .refused : .connectionLost
            detail = Redaction.error(error)
            if reason == .connectionLost { lastFailure = detail }
        default:
            reason = .protocolViolation
            detail = "the server's reply did not fit the lock's state"
        }
        metrics.lost(reason).increment()
        let beforeDeadlineMs = before.holding.map { Int64(bitPattern: $0.deadlineMs &- nowMs) } ?? 0
        logger?.warning("lock lost", metadata: metadata([
            LogField.reason: .string(reason.rawValue), "dflockd.detail": .string(detail),
            LogField.token: .string(Redaction.token(token)),
            LogField.beforeDeadlineMs: .stringConvertible(beforeDeadlineMs)]))
    }

    /// The lease is dropped while the gauge counts it (the lock object went away while held).
    func released() {
        if countsAsHeld { metrics.held.decrement() }
    }

    private func metadata(_ extra: Logger.Metadata = [:]) -> Logger.Metadata {
        var metadata: Logger.Metadata = [LogField.key: .string(settings.key), LogField.server: .string(settings.endpoint.description),
                                         LogField.kind: .string(settings.kindName)]
        metadata.merge(extra) { _, new in new }
        return metadata
    }
}
