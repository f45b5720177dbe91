import Logging

/// A distributed FIFO lock on one key of a dflockd server: the Swift form of the
/// `DistributedLock` of dflockd's TypeScript client, with the same options and methods.
///
/// ```swift
/// let lock = try DistributedLock(key: "my-resource", acquireTimeoutS: 10, leaseTtlS: 20,
///                                servers: [("127.0.0.1", 6388)])
/// try await lock.withLock {
///     // critical section
/// }
/// ```
///
/// Each instance is one session at a time, driven as an explicit state machine on its
/// ``EventLoop`` (``LockState``: idle → connecting → queued → held → closed). While held, the
/// lease is renewed every `lease × renewRatio` seconds, and at least every `maxIdleMs`, by a
/// libuv timer. Methods, completion handlers, errors and threading rules are documented on
/// ``DistributedLease``.
public final class DistributedLock: DistributedLease, @unchecked Sendable {
    /// Creates a lock. Nothing touches the network until `acquire` or `enqueue`.
    ///
    /// - Parameters:
    ///   - key: The lock's name: non-empty, at most 256 UTF-8 bytes, no whitespace.
    ///   - acquireTimeoutS: Seconds to wait for the lock before giving up (0: try once).
    ///   - leaseTtlS: Lease length in seconds; `nil` takes the server's default. On dflockd
    ///     0.5.0 use 2 or more: it answers renewals with the seconds left rounded down, so a
    ///     1-second lease reads as 0 and is declared lost.
    ///   - servers: `(host, port)` pairs; the key lives on the one `shardingStrategy` picks.
    ///     Default `[("127.0.0.1", 6388)]`.
    ///   - shardingStrategy: Maps `(key, servers.count)` to a server index.
    ///   - host: Deprecated, use `servers`: used only when `servers` is `nil`.
    ///   - port: Deprecated, use `servers`: used only when `servers` is `nil`.
    ///   - renewRatio: Renew when this fraction of the lease has passed (0 < ratio < 1).
    ///   - tls: TLS options; `TLSOptions()` verifies against the system CAs. The files they
    ///     name are read here, once per distinct options in the process.
    ///   - auth: The server's `--auth-token`, sent first on every connection.
    ///   - onLockLost: Called with `(key, token)` on the loop thread when a held lock is lost:
    ///     a renewal was refused, the connection ended or sent something unasked for, or no
    ///     renewal was answered before the local lease deadline (see
    ///     ``DistributedLease/leaseRemaining``). The connection is closed by then.
    ///   - connectTimeoutMs: Limit on connecting (TCP and, with `tls`, the handshake); `nil`
    ///     waits as long as TCP does.
    ///   - socketTimeoutMs: Close the connection when no byte arrives for this long while a
    ///     reply is awaited (a blocking acquire or wait adds its own timeout).
    ///   - maxIdleMs: The longest gap between renewals, whatever the lease: servers close a
    ///     connection that sends nothing for their `--read-timeout` (23 s by default) and
    ///     release its locks. The default, 10 s, is safely under that; `nil` renews by
    ///     `renewRatio` alone.
    ///   - loop: The loop that runs the lock.
    ///   - logger: Where the lock and its connections log (swift-log): a lost lock and a late
    ///     renewal at `warning`, connect failures and reconnects at `info`/`notice`, requests and
    ///     state changes at `debug`/`trace`. Secrets are never logged, tokens only by a prefix.
    ///     The default logs nothing.
    /// - Throws: ``LockError/invalidArgument(name:reason:)`` naming the first invalid option.
    public init(key: String,
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
        let settings = try LeaseSettings(.lock, LeaseOptions(
            key: key, acquireTimeoutS: acquireTimeoutS, leaseTtlS: leaseTtlS, servers: servers, shardingStrategy: shardingStrategy,
            host: host, port: port, renewRatio: renewRatio, tls: tls, auth: auth, onLockLost: onLockLost,
            connectTimeoutMs: connectTimeoutMs, socketTimeoutMs: socketTimeoutMs, maxIdleMs: maxIdleMs, logger: logger))
        super.init(settings: settings, loop: loop)
    }

    /// Creates a lock placed on `session`: its requests travel on the session's shared
    /// connections (see ``LockSession`` for what that changes), and its servers, TLS, auth and
    /// timeouts are the session's. Nothing touches the network until `acquire` or `enqueue`.
    ///
    /// - Parameters:
    ///   - key: The lock's name: non-empty, at most 256 UTF-8 bytes, no whitespace.
    ///   - acquireTimeoutS: Seconds to wait for the lock before giving up (0: try once, on the
    ///     shared connection).
    ///   - leaseTtlS: Lease length in seconds; `nil` takes the server's default.
    ///   - renewRatio: Renew when this fraction of the lease has passed (0 < ratio < 1). On the
    ///     shared connection that is the only rule (the session keeps the connection from
    ///     going silent); on a connection of the lock's own, it also renews at least every
    ///     ``DistributedLease/defaultMaxIdleMs``.
    ///   - onLockLost: Called with `(key, token)` on the loop thread when a held lock is lost;
    ///     when a shared connection ends, every lock held through it is lost.
    ///   - session: The session to place the lock on.
    ///   - logger: Where the lock and the connections of its own log (the shared connections
    ///     log to the session's logger). The default logs nothing.
    /// - Throws: ``LockError/invalidArgument(name:reason:)`` naming the first invalid option.
    public init(key: String,
                acquireTimeoutS: Int = 10,
                leaseTtlS: Int? = nil,
                renewRatio: Double = 0.5,
                onLockLost: (@Sendable (String, String) -> Void)? = nil,
                session: LockSession,
                logger: Logger = .disabled) throws(LockError) {
        let settings = try LeaseSettings(.lock, .onSession(session, key: key, acquireTimeoutS: acquireTimeoutS, leaseTtlS: leaseTtlS,
                                                           renewRatio: renewRatio, onLockLost: onLockLost, logger: logger),
                                         session: session)
        super.init(settings: settings, loop: session.loop)
    }
}
