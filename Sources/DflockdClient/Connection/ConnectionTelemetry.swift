import Logging

/// The log records and metrics of one connection's life: connecting, ready, its end, and (at
/// `trace`) each request and reply. Loop-confined, like the connection that owns it. Nothing
/// here decides anything about the connection; it only reports what the core did.
struct ConnectionTelemetry {
    private let server: String
    private let logger: Logger
    /// Whether `logger` can log at all (``Logger/logsNothing``): a request skips the trace
    /// level check when it cannot.
    private let logs: Bool
    private let metrics: DflockdMetrics
    private var connectingSince: UInt64?
    private var openSince: UInt64?
    private var hasEnded = false
    private var startedConnecting = false

    init(endpoint: Endpoint, logger: Logger, metrics: DflockdMetrics) {
        self.server = endpoint.description
        self.logger = logger
        self.logs = !logger.logsNothing
        self.metrics = metrics
    }

    mutating func connecting(tls: Bool, auth: Bool) {
        startedConnecting = true
        logger.debug("connecting", metadata: [LogField.server: .string(server), "dflockd.tls": .stringConvertible(tls),
                                              "dflockd.auth": .stringConvertible(auth)])
    }

    mutating func ready(nowMs: UInt64) {
        guard openSince == nil, !hasEnded else { return }
        openSince = nowMs
        metrics.connectionsOpen.increment()
        logger.debug("connected", metadata: [LogField.server: .string(server)])
    }

    /// `byItself`: the server, the network or a deadline ended it, not its owner's close.
    mutating func ended(_ error: LockError, byItself: Bool, nowMs: UInt64) {
        guard !hasEnded else { return }
        hasEnded = true
        if let openSince {
            metrics.connectionsOpen.decrement()
            self.openSince = nil
            if byItself {
                logger.notice("connection ended", metadata: [LogField.server: .string(server),
                                                             LogField.reason: .string(Redaction.error(error)),
                                                             "dflockd.open_ms": .stringConvertible(nowMs &- openSince)])
            } else {
                logger.debug("connection closed", metadata: [LogField.server: .string(server)])
            }
        } else if startedConnecting && !Self.isOwnersClose(error) {
            metrics.connectFailures.increment()
            logger.info("connect failed", metadata: [LogField.server: .string(server), LogField.reason: .string(Redaction.error(error))])
        }
    }

    /// The connection object went away without its end having been seen (a loop torn down
    /// under it): keeps the open-connections gauge true.
    func released() {
        if openSince != nil, !hasEnded { metrics.connectionsOpen.decrement() }
    }

    /// At `trace`, wraps `completion` to log the reply; otherwise returns it as it is, so a
    /// request costs nothing more with tracing off.
    func tracing(_ request: Request, completion: @escaping Connection.Completion, nowMs: UInt64) -> Connection.Completion {
        guard logs, logger.logLevel <= .trace else { return completion }
        let logger = logger, server = server
        let sent = Self.shown(request)
        logger.trace("request", metadata: [LogField.server: .string(server), LogField.command: .string(sent)])
        return { result in
            switch result {
            case .success(let reply):
                logger.trace("reply", metadata: [LogField.server: .string(server), LogField.command: .string(sent),
                                                 "dflockd.reply": .string(Self.shown(reply))])
            case .failure(let error):
                logger.trace("request failed", metadata: [LogField.server: .string(server), LogField.command: .string(sent),
                                                          LogField.reason: .string(Redaction.error(error))])
            }
            completion(result)
        }
    }

    /// A request as it may be logged: the auth secret redacted, a token shortened.
    static func shown(_ request: Request) -> String {
        switch request.command {
        case .auth:
            return "auth <redacted>"
        case .release, .renew, .semaphoreRelease, .semaphoreRenew:
            let parts = request.argument.split(separator: " ", maxSplits: 1)
            let token = parts.first.map { Redaction.token(String($0)) } ?? ""
            let rest = parts.count > 1 ? " " + parts[1] : ""
            return "\(request.command.rawValue) \(request.key) \(token)\(rest)"
        default:
            return request.description
        }
    }

    /// A reply as it may be logged: a grant's token shortened.
    static func shown(_ reply: Reply) -> String {
        switch reply {
        case .granted(let grant): return "ok \(Redaction.token(grant.token)) \(grant.leaseS)"
        case .renewed(let remainingS): return "ok \(remainingS)"
        case .ok: return "ok"
        case .queued: return "queued"
        case .timeout: return "timeout"
        case .stats: return "ok <stats>"
        }
    }

    private static func isOwnersClose(_ error: LockError) -> Bool {
        switch error {
        case .closed, .cancelled, .eventLoopShutDown: return true
        default: return false
        }
    }
}
