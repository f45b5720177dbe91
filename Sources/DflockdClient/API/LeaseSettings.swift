import Logging

/// The validated options of a lock or semaphore (from ``LeaseOptions``), and the commands that
/// speak for it.
///
/// A class, so that the lock, its machine (whose configuration this is) and its telemetry share
/// one copy: with 100,000 locks on a session, every byte per lock counts (a lock on a session
/// keeps no connection options of its own; it takes the session's when it opens a connection).
final class LeaseSettings: LeaseMachine.Configuration, @unchecked Sendable {
    enum Kind: Sendable, Hashable {
        case lock
        case semaphore(limit: Int)
    }

    let kind: Kind
    let leaseTtlS: Int?
    let endpoint: Endpoint
    /// The connection options of a lock that is not on a session.
    private let ownConnection: Connection.SharedConfiguration?
    let onLockLost: (@Sendable (String, String) -> Void)?
    let logger: Logger
    /// The process's metrics for this kind of lease, as bootstrapped when the lock was made.
    let metrics: DflockdMetrics.Lease
    /// The session the lock is placed on, and the index of its shared connection there.
    let session: LockSession?
    let channel: Int

    /// Validates every option the way the initializers document, naming the option at fault.
    init(_ kind: Kind, _ options: LeaseOptions) throws(LockError) {
        try Self.validateLease(kind, options)
        let connection = try options.connection.validated()
        try Connection.validate(milliseconds: options.maxIdleMs, name: "maxIdleMs")

        let servers = options.servers ?? [(options.host ?? "127.0.0.1", options.port ?? 6388)]
        guard !servers.isEmpty else {
            throw .invalidArgument(name: "servers", reason: "must name at least one (host, port)")
        }
        for (host, port) in servers {
            try Connection.validate(host: host, port: port)
        }
        let index = options.shardingStrategy(options.key, servers.count)
        guard servers.indices.contains(index) else {
            throw .invalidArgument(name: "shardingStrategy", reason: "returned \(index) for \(servers.count) servers; it must return 0..<\(servers.count)")
        }

        self.kind = kind
        self.leaseTtlS = options.leaseTtlS
        self.endpoint = Endpoint(host: servers[index].0, port: servers[index].1)
        self.ownConnection = Connection.SharedConfiguration(connection)
        self.onLockLost = options.onLockLost
        self.logger = options.logger
        self.metrics = Self.leaseMetrics(for: kind)
        self.session = nil
        self.channel = 0
        // Every configured server, the key's shard among them: a cluster's members, to which a
        // follower's redirect may lead.
        super.init(key: options.key, acquireTimeoutS: options.acquireTimeoutS, renewRatio: options.renewRatio,
                   maxIdleMs: options.maxIdleMs, members: servers.map { Endpoint(host: $0.0, port: $0.1) }, sharesConnection: false)
    }

    /// The settings of a lock placed on `session`: servers, TLS, auth and timeouts are the
    /// session's.
    init(_ kind: Kind, _ options: LeaseOptions, session: LockSession) throws(LockError) {
        try Self.validateLease(kind, options)
        try Connection.validate(milliseconds: options.maxIdleMs, name: "maxIdleMs")
        let placement = try session.place(key: options.key)
        self.kind = kind
        self.leaseTtlS = options.leaseTtlS
        self.endpoint = placement.endpoint
        self.ownConnection = nil
        self.onLockLost = options.onLockLost
        self.logger = options.logger
        self.metrics = Self.leaseMetrics(for: kind)
        self.session = session
        self.channel = placement.channel
        // A request on a connection of the lock's own follows a redirect among the session's
        // servers; one on the shared connection does not (LeaseMachine.redirect).
        super.init(key: options.key, acquireTimeoutS: options.acquireTimeoutS, renewRatio: options.renewRatio,
                   maxIdleMs: options.maxIdleMs, members: session.endpoints, sharesConnection: true)
    }

    /// The options of a connection the lock opens for itself: its own, or on a session the
    /// session's, logging to the lock's logger.
    var connection: Connection.SharedConfiguration {
        if let ownConnection { return ownConnection }
        guard let session else { preconditionFailure("LeaseSettings without connection options or a session") }
        var connection = session.ownConfiguration
        connection.logger = logger
        return Connection.SharedConfiguration(connection)
    }

    /// The metrics set the lock's connections count in (`nil`: the one bootstrapped when each
    /// connection is made).
    var connectionMetrics: DflockdMetrics? {
        ownConnection?.value.metrics ?? session?.ownConfiguration.metrics
    }

    /// `"lock"` or `"semaphore"`, for logs.
    var kindName: String {
        if case .lock = kind { return "lock" }
        return "semaphore"
    }

    private static func validateLease(_ kind: Kind, _ options: LeaseOptions) throws(LockError) {
        try Validation.key(options.key)
        if case .semaphore(let limit) = kind { try Validation.limit(limit) }
        try Validation.timeout(options.acquireTimeoutS, name: "acquireTimeoutS")
        try Validation.lease(options.leaseTtlS, name: "leaseTtlS")
        guard options.renewRatio.isFinite, options.renewRatio > 0, options.renewRatio < 1 else {
            throw .invalidArgument(name: "renewRatio", reason: "must be between 0 and 1 (exclusive), got \(options.renewRatio)")
        }
    }

    /// The process's metrics for `kind` (`kind` = `lock` or `semaphore` in their labels).
    private static func leaseMetrics(for kind: Kind) -> DflockdMetrics.Lease {
        let metrics = DflockdMetrics.current
        if case .lock = kind { return metrics.lock }
        return metrics.semaphore
    }

    /// The wire request for one of the machine's outgoing messages. The key was validated when
    /// the lock was made and a token when its grant was decoded, so renewals, releases and
    /// acquires are built without checking them again; a failure of the others is reported as
    /// the request failing, not trapped.
    func request(for outgoing: LeaseMachine.Outgoing) throws(LockError) -> Request {
        let isSemaphore: Bool
        if case .semaphore = kind { isSemaphore = true } else { isSemaphore = false }
        switch (kind, outgoing) {
        // The hot ones: every renewal, every acquire, and a release per acquire.
        case (_, .renew(let token)):
            return .renew(validatedKey: key, validatedToken: token, leaseTtlS: leaseTtlS, semaphore: isSemaphore)
        case (_, .release(let token)):
            return .release(validatedKey: key, validatedToken: token, semaphore: isSemaphore)
        case (.lock, .acquire(let timeoutS)):
            return try .acquire(validatedKey: key, timeoutS: timeoutS, leaseTtlS: leaseTtlS)
        case (.lock, .enqueue):
            return try .enqueue(key: key, leaseTtlS: leaseTtlS)
        case (.lock, .wait(let timeoutS)):
            return try .wait(key: key, timeoutS: timeoutS)
        case (.semaphore(let limit), .acquire(let timeoutS)):
            return try .semaphoreAcquire(validatedKey: key, limit: limit, timeoutS: timeoutS, leaseTtlS: leaseTtlS)
        case (.semaphore(let limit), .enqueue):
            return try .semaphoreEnqueue(key: key, limit: limit, leaseTtlS: leaseTtlS)
        case (.semaphore, .wait(let timeoutS)):
            return try .semaphoreWait(key: key, timeoutS: timeoutS)
        }
    }
}
