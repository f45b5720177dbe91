import Logging

/// The options of a lock or semaphore as the caller gave them: the parameters of
/// ``DistributedLock``'s and ``DistributedSemaphore``'s initializers, in one value. Validated
/// once, into ``LeaseSettings``.
struct LeaseOptions: Sendable {
    var key: String
    var acquireTimeoutS: Int
    var leaseTtlS: Int?
    var servers: [(String, Int)]?
    var shardingStrategy: ShardingStrategy
    var host: String?
    var port: Int?
    var renewRatio: Double
    var tls: TLSOptions?
    var auth: String?
    var onLockLost: (@Sendable (String, String) -> Void)?
    var connectTimeoutMs: Int?
    var socketTimeoutMs: Int?
    var maxIdleMs: Int?
    /// Where the lock and its connections log (the default logs nothing).
    var logger = Logger.disabled

    /// The options of a lock or semaphore placed on `session`: servers, sharding, TLS, auth and
    /// timeouts are the session's; a connection of the lock's own is kept from the servers'
    /// read timeout by the default `maxIdleMs`.
    static func onSession(_ session: LockSession, key: String, acquireTimeoutS: Int, leaseTtlS: Int?, renewRatio: Double,
                          onLockLost: (@Sendable (String, String) -> Void)?, logger: Logger) -> LeaseOptions {
        LeaseOptions(key: key, acquireTimeoutS: acquireTimeoutS, leaseTtlS: leaseTtlS, servers: nil, shardingStrategy: session.shardingStrategy,
                     host: nil, port: nil, renewRatio: renewRatio, tls: nil, auth: nil, onLockLost: onLockLost,
                     connectTimeoutMs: nil, socketTimeoutMs: nil, maxIdleMs: DistributedLease.defaultMaxIdleMs, logger: logger)
    }

    /// The connection-level part.
    var connection: ConnectionOptions {
        ConnectionOptions(tls: tls, auth: auth, connectTimeoutMs: connectTimeoutMs, socketTimeoutMs: socketTimeoutMs, logger: logger)
    }
}

/// The options every connection a lock, semaphore or `stats` call opens shares, as given.
struct ConnectionOptions: Sendable {
    var tls: TLSOptions?
    var auth: String?
    var connectTimeoutMs: Int?
    var socketTimeoutMs: Int?
    var logger = Logger.disabled
    /// The deadline of a request that does not block on the server, and of `auth` and the TLS
    /// handshake; locks, semaphores and `stats` take the default.
    var requestTimeoutMs = Connection.defaultRequestTimeoutMs
    /// Added to a blocking request's own timeout for its deadline.
    var blockingGraceMs = Connection.defaultBlockingGraceMs

    /// Checks every option, naming the one at fault, and derives the connection's
    /// configuration. Loads (once per distinct options in the process) the files TLS needs, so
    /// a missing CA file or key is reported here rather than at the first connect.
    func validated() throws(LockError) -> Connection.Configuration {
        if let auth { try Validation.secret(auth, name: "auth") }
        let tlsContext = try tls.map { options throws(LockError) in try TLSContext.shared(for: options) }
        try Connection.validate(milliseconds: connectTimeoutMs, name: "connectTimeoutMs")
        try Connection.validate(milliseconds: socketTimeoutMs, name: "socketTimeoutMs")
        try Connection.validate(milliseconds: requestTimeoutMs, name: "requestTimeoutMs")
        if blockingGraceMs < 0 {
            throw .invalidArgument(name: "blockingGraceMs", reason: "must be 0 or more milliseconds, got \(blockingGraceMs)")
        }
        return Connection.Configuration(tls: tls, auth: auth, connectTimeoutMs: connectTimeoutMs, socketTimeoutMs: socketTimeoutMs,
                                        tlsContext: tlsContext, requestTimeoutMs: requestTimeoutMs, blockingGraceMs: blockingGraceMs,
                                        logger: logger, metrics: DflockdMetrics.current)
    }
}
