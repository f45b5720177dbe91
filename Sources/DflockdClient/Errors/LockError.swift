/// Every way a lock, semaphore or connection operation can fail.
///
/// Each case carries what a person needs to act on it; ``description`` says what happened and
/// what to do. Server statuses each have a case of their own (see `protocol.md`), client-side
/// failures likewise.
public enum LockError: Error, Sendable, Hashable, CustomStringConvertible {
    // The cases with more than one payload are `indirect`: the error then takes 17 bytes, not
    // 41, in every reply, event and action that can carry one, which are copied on every step.
    /// The lock was not granted within the acquire timeout (`AcquireTimeoutError` in dflockd's
    /// TypeScript client).
    case acquireTimeout(key: String)
    /// The server rejected the auth secret (`error_auth`), or closed the connection during auth.
    case authFailed
    /// A caller-supplied value cannot be sent: `name` is the option or argument, `reason` why.
    indirect case invalidArgument(name: String, reason: String)
    /// `acquire` or `enqueue` on an instance that is already connected, without `force`.
    case alreadyConnected(key: String)
    /// `release` on an instance that holds no connection (already released or closed).
    case notConnected(key: String)
    /// An acquire, enqueue or wait is still in flight on this instance.
    case operationInProgress(key: String)
    /// The lock was lost while held: a renewal failed or the connection ended, and
    /// `onLockLost` was called. Reported once, by the next `release()`.
    indirect case lockLost(key: String, token: String)
    /// `wait` before `enqueue`, or the server answered `error_not_enqueued`.
    case notEnqueued(key: String)
    /// The server answered `error_already_enqueued`: this connection already waits on the key.
    case alreadyEnqueued(key: String)
    /// `release` or `renew` answered `error`: the token no longer holds the key (released,
    /// expired, or never granted). Another client may own it now.
    case notHeld(key: String)
    /// The server's `--max-locks` budget of distinct keys is used up (`error_max_locks`).
    case maxLocks(key: String)
    /// The key's waiter queue is full (`error_max_waiters`).
    case maxWaiters(key: String)
    /// `error_limit_mismatch`. Up to dflockd 1.13, lock and semaphore keys share a namespace:
    /// the key is in use as the other kind, or as a semaphore with another limit. From 1.14
    /// they are separate, and it means only a semaphore asked for with another limit than the
    /// one it has.
    case limitMismatch(key: String)
    /// The lease ran out before the grant reached this client (`error_lease_expired`).
    case leaseExpired(key: String)
    /// `release` sent, but the server did not confirm it in time (a request deadline passed, it
    /// stopped answering). The connection was closed; the server frees the key when it sees
    /// that, and at the latest when the lease (`leaseS` seconds from the last renewal) ends.
    indirect case releaseUnconfirmed(key: String, leaseS: Int)
    /// The server is shutting down and takes no new grants (`error_draining`, dflockd 1.16 and
    /// later).
    case serverDraining
    /// The server is a follower in a dflockd cluster and does not take mutating commands
    /// (`error_not_leader [host:port]`). `leader` is the leader's client address exactly as the
    /// server sent it, or `nil` when it named none (an election is under way).
    ///
    /// Locks and semaphores follow the redirect themselves when the address is one of their
    /// configured `servers`; they report this error when it is not, when it names no one, or
    /// after three redirects in one call. A ``Connection`` always reports it.
    case notLeader(leader: String?)
    /// The server answered `error` to a request this client sent as well-formed.
    indirect case serverError(command: String, key: String)
    /// The host name did not resolve.
    indirect case resolveFailed(host: String, reason: String)
    /// No address of the server accepted the TCP connection.
    indirect case connectFailed(host: String, port: Int, reason: String)
    /// The TCP (and TLS) connection was not established within `connectTimeoutMs`.
    indirect case connectTimeout(host: String, port: Int, milliseconds: Int)
    /// No byte arrived within `socketTimeoutMs` while a reply was awaited.
    case socketTimeout(milliseconds: Int)
    /// No reply to `command` on `key` came within its deadline of `milliseconds` (a blocking
    /// request's own timeout plus `blockingGraceMs`, any other request's `requestTimeoutMs`,
    /// which a raw ``Connection`` sets; a lock's and a session's requests use the defaults,
    /// 5 s and 10 s): the server is frozen, overloaded or unreachable. The connection was
    /// closed.
    indirect case requestTimeout(command: String, key: String, milliseconds: Int)
    /// The connection ended (the server closed it, it was reset, or a read or write failed).
    case connectionClosed(reason: String)
    /// The server sent something that is not a valid reply to the request outstanding.
    case protocolViolation(String)
    /// The TLS handshake or a TLS read or write failed; `reason` is OpenSSL's text.
    case tls(reason: String)
    /// The operation was cancelled (its Task was cancelled); the connection was closed.
    case cancelled
    /// The ``EventLoop`` this object runs on was shut down; its connections are closed.
    case eventLoopShutDown
    /// The instance or connection was closed by the caller while the operation was under way.
    case closed
    /// The ``LockSession`` the lock or semaphore is placed on was closed: it opens no more
    /// connections. Make a new session (and locks on it).
    case sessionClosed

    /// What happened and what to do about it, in a sentence or two.
    public var description: String {
        switch self {
        case .acquireTimeout(let key):
            return "lock '\(key)' was not acquired within the acquire timeout; another holder has it. Retry later or raise acquireTimeoutS."
        case .authFailed:
            return "the server rejected the auth secret. Check the `auth` option against the server's --auth-token."
        case .invalidArgument(let name, let reason):
            return "invalid \(name): \(reason)"
        case .alreadyConnected(let key):
            return "lock '\(key)' is already connected; call release() or close() first, or pass force: true."
        case .notConnected(let key):
            return "lock '\(key)' has no open connection (already released or closed); acquire it first."
        case .operationInProgress(let key):
            return "an acquire, enqueue or wait on '\(key)' is still in progress; wait for it to finish (or close()) first."
        case .lockLost(let key, let token):
            return "lock '\(key)' (token \(token)) was lost while held: its lease could not be renewed or its connection ended, so another client may own it now. Treat work done under it as unprotected."
        case .notEnqueued(let key):
            return "'\(key)' is not enqueued on this connection; call enqueue() before wait()."
        case .alreadyEnqueued(let key):
            return "this connection already waits on '\(key)'; call wait() instead of enqueueing twice."
        case .notHeld(let key):
            return "the server says this token does not hold '\(key)': it was released or its lease expired, and another client may own it now."
        case .maxLocks(let key):
            return "the server refused '\(key)': its --max-locks budget of distinct keys is used up. Release unused keys or raise --max-locks."
        case .maxWaiters(let key):
            return "the server refused to queue on '\(key)': its waiter queue is full. Retry later or raise the server's --max-waiters."
        case .limitMismatch(let key):
            return "'\(key)' exists on the server as a semaphore with another limit (or, before dflockd 1.14, as the other kind of key); use the same kind and limit as its other users."
        case .leaseExpired(let key):
            return "the lease on '\(key)' expired before the grant reached this client; acquire again."
        case .releaseUnconfirmed(let key, let leaseS):
            return "the server did not confirm the release of '\(key)' in time; the connection was closed, so the key is freed when the server notices, at the latest when its lease ends (\(leaseS) s after the last renewal)."
        case .serverDraining:
            return "the server is draining (shutting down) and grants nothing new; retry on another server or later."
        case .notLeader(let leader):
            if let leader {
                return "the server is not its cluster's leader; it names \(leader.debugDescription) as the leader. List every cluster member in `servers` so that redirects to them are followed, or connect to the leader."
            }
            return "the server is not its cluster's leader and knows of none (an election is under way); retry shortly."
        case .serverError(let command, let key):
            return "the server answered `error` to '\(command)' on '\(key)'; it treats the request as malformed or not allowed."
        case .resolveFailed(let host, let reason):
            return "could not resolve host '\(host)': \(reason). Check the server address."
        case .connectFailed(let host, let port, let reason):
            return "could not connect to \(host):\(port): \(reason). Is dflockd running there?"
        case .connectTimeout(let host, let port, let milliseconds):
            return "connecting to \(host):\(port) took longer than \(milliseconds) ms; check the network or raise connectTimeoutMs."
        case .socketTimeout(let milliseconds):
            return "no reply byte arrived within \(milliseconds) ms (socketTimeoutMs); the connection was closed."
        case .requestTimeout(let command, let key, let milliseconds):
            return "no reply to '\(command)' on '\(key)' within its deadline of \(milliseconds) ms; the server may be frozen or unreachable, so the connection was closed. If it is just slow: on a raw Connection raise requestTimeoutMs or blockingGraceMs; for locks, lighten its load (longer leases renew less often, more servers share the keys)."
        case .connectionClosed(let reason):
            return "the connection to the server ended: \(reason)."
        case .protocolViolation(let detail):
            return "the server sent something this client cannot accept: \(detail). The connection was closed."
        case .tls(let reason):
            return "TLS failed: \(reason)."
        case .cancelled:
            return "the operation was cancelled; its connection was closed, so the server dropped any wait or hold it had."
        case .eventLoopShutDown:
            return "the event loop was shut down, which closed its connections; use objects bound to a running loop."
        case .closed:
            return "the connection was closed by the caller before the operation finished."
        case .sessionClosed:
            return "the LockSession this lock is placed on was closed; create a new session and place new locks on it."
        }
    }
}
