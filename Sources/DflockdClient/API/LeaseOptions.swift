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

    /// The connection-level part.
    var connection: ConnectionOptions {
        ConnectionOptions(tls: tls, auth: auth, connectTimeoutMs: connectTimeoutMs, socketTimeoutMs: socketTimeoutMs)
    }
}

/// The options every connection a lock, semaphore or `stats` call opens shares, as given.
struct ConnectionOptions: Sendable {
    var tls: TLSOptions?
    var auth: String?
    var connectTimeoutMs: Int?
    var socketTimeoutMs: Int?

    /// Checks every option, naming the one at fault, and derives the connection's
    /// configuration. Loads (once per distinct options in the process) the files TLS needs, so
    /// a missing CA file or key is reported here rather than at the first connect.
    func validated() throws(LockError) -> Connection.Configuration {
        if let auth { try Validation.secret(auth, name: "auth") }
        let tlsContext = try tls.map { options throws(LockError) in try TLSContext.shared(for: options) }
        try Connection.validate(milliseconds: connectTimeoutMs, name: "connectTimeoutMs")
        try Connection.validate(milliseconds: socketTimeoutMs, name: "socketTimeoutMs")
        return Connection.Configuration(tls: tls, auth: auth, connectTimeoutMs: connectTimeoutMs, socketTimeoutMs: socketTimeoutMs,
                                        tlsContext: tlsContext)
    }
}
