import Logging

/// A distributed counting semaphore: up to `limit` holders of one key at a time, granted in
/// FIFO order (dflockd 1.10 and later; the 0.5.0 server has no semaphores).
///
/// The same life cycle, methods and renewal as ``DistributedLock`` (see ``DistributedLease``),
/// over the `sl`/`sr`/`sn`/`se`/`sw` commands. Every user of a key must give the same `limit`:
/// the server answers ``LockError/limitMismatch(key:)`` otherwise.
public final class DistributedSemaphore: DistributedLease, @unchecked Sendable {
    /// How many holders the semaphore admits at once.
    public let limit: Int

    /// Creates a semaphore. Nothing touches the network until `acquire` or `enqueue`.
    ///
    /// The parameters are those of ``DistributedLock/init(key:acquireTimeoutS:leaseTtlS:servers:shardingStrategy:host:port:renewRatio:tls:auth:onLockLost:connectTimeoutMs:socketTimeoutMs:maxIdleMs:loop:logger:)``,
    /// with `limit` (at least 1) after `key`.
    ///
    /// - Throws: ``LockError/invalidArgument(name:reason:)`` naming the first invalid option.
    public init(key: String,
                limit: Int,
                acquireTimeoutS: Int = 10,
                leaseTtlS: Int? = nil,
                servers: [(String, Int)]? = nil,
                shardingStrategy: @escaping ShardingStrategy = stableHashShard,
                host: String? = nil,
                port: Int? = nil,
                renewRatio: Double = 0.5,
                tls: TLSOptions? = nil,
                auth: String? = nil,
                onLockLost: (@Sendable (String, String) -> Void)? = nil,
                connectTimeoutMs: Int? = nil,
                socketTimeoutMs: Int? = nil,
                maxIdleMs: Int? = DistributedLease.defaultMaxIdleMs,
                loop: EventLoop = .shared,
                logger: Logger = .disabled) throws(LockError) {
        let settings = try LeaseSettings(.semaphore(limit: limit), LeaseOptions(
            key: key, acquireTimeoutS: acquireTimeoutS, leaseTtlS: leaseTtlS, servers: servers, shardingStrategy: shardingStrategy,
            host: host, port: port, renewRatio: renewRatio, tls: tls, auth: auth, onLockLost: onLockLost,
            connectTimeoutMs: connectTimeoutMs, socketTimeoutMs: socketTimeoutMs, maxIdleMs: maxIdleMs, logger: logger))
        self.limit = limit
        super.init(settings: settings, loop: loop)
    }

    /// Creates a semaphore placed on `session` (see ``LockSession``). The parameters are those
    /// of ``DistributedLock/init(key:acquireTimeoutS:leaseTtlS:renewRatio:onLockLost:session:logger:)``,
    /// with `limit` (at least 1) after `key`.
    ///
    /// - Throws: ``LockError/invalidArgument(name:reason:)`` naming the first invalid option.
    public init(key: String,
                limit: Int,
                acquireTimeoutS: Int = 10,
                leaseTtlS: Int? = nil,
                renewRatio: Double = 0.5,
                onLockLost: (@Sendable (String, String) -> Void)? = nil,
                session: LockSession,
                logger: Logger = .disabled) throws(LockError) {
        let settings = try LeaseSettings(.semaphore(limit: limit),
                                         .onSession(session, key: key, acquireTimeoutS: acquireTimeoutS, leaseTtlS: leaseTtlS,
                                                    renewRatio: renewRatio, onLockLost: onLockLost, logger: logger),
                                         session: session)
        self.limit = limit
        super.init(settings: settings, loop: session.loop)
    }
}
