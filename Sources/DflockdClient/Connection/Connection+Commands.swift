/// The outcome of `e` / `se`: granted at once, or queued behind the holders.
public enum EnqueueOutcome: Sendable, Hashable {
    /// The key was free: the grant is already held (fast path).
    case acquired(Grant)
    /// The connection is in the key's FIFO queue; `wait` collects the grant.
    case queued
}

// The raw commands of `protocol.md`, each in completion-handler and async form. Arguments are
// validated before anything is sent; a bad one fails the call with `invalidArgument`.
extension Connection {
    // MARK: Locks

    /// `l`: waits up to `timeoutS` seconds for the lock. Completes with the grant, or `nil` when
    /// the timeout passed (0 = try once).
    public func acquire(key: String, timeoutS: Int, leaseTtlS: Int? = nil,
                        completion: @escaping (Result<Grant?, LockError>) -> Void) {
        perform({ () throws(LockError) in try .acquire(key: key, timeoutS: timeoutS, leaseTtlS: leaseTtlS) }, completion, grantOrTimeout)
    }

    /// `r`: releases the lock held with `token`. Fails with ``LockError/notHeld(key:)`` when
    /// the token does not hold it.
    public func release(key: String, token: String, completion: @escaping (Result<Void, LockError>) -> Void) {
        perform({ () throws(LockError) in try .release(key: key, token: token) }, completion, done)
    }

    /// `n`: renews the lease; completes with the seconds the server now grants (0.5.0 rounds the
    /// remaining time down).
    public func renew(key: String, token: String, leaseTtlS: Int? = nil,
                      completion: @escaping (Result<Int, LockError>) -> Void) {
        perform({ () throws(LockError) in try .renew(key: key, token: token, leaseTtlS: leaseTtlS) }, completion, renewed)
    }

    /// `e`: joins the key's FIFO queue without blocking (two-phase step 1).
    public func enqueue(key: String, leaseTtlS: Int? = nil,
                        completion: @escaping (Result<EnqueueOutcome, LockError>) -> Void) {
        perform({ () throws(LockError) in try .enqueue(key: key, leaseTtlS: leaseTtlS) }, completion, enqueued)
    }

    /// `w`: waits up to `timeoutS` for the grant after ``enqueue(key:leaseTtlS:completion:)``;
    /// `nil` on timeout (the server then drops the waiter).
    public func wait(key: String, timeoutS: Int, completion: @escaping (Result<Grant?, LockError>) -> Void) {
        perform({ () throws(LockError) in try .wait(key: key, timeoutS: timeoutS) }, completion, grantOrTimeout)
    }

    // MARK: Semaphores

    /// `sl`: waits up to `timeoutS` for one of `limit` slots; `nil` on timeout.
    public func acquireSemaphore(key: String, limit: Int, timeoutS: Int, leaseTtlS: Int? = nil,
                                 completion: @escaping (Result<Grant?, LockError>) -> Void) {
        perform({ () throws(LockError) in try .semaphoreAcquire(key: key, limit: limit, timeoutS: timeoutS, leaseTtlS: leaseTtlS) }, completion, grantOrTimeout)
    }

    /// `sr`: releases the slot held with `token`.
    public func releaseSemaphore(key: String, token: String, completion: @escaping (Result<Void, LockError>) -> Void) {
        perform({ () throws(LockError) in try .semaphoreRelease(key: key, token: token) }, completion, done)
    }

    /// `sn`: renews a slot's lease; completes with the seconds granted.
    public func renewSemaphore(key: String, token: String, leaseTtlS: Int? = nil,
                               completion: @escaping (Result<Int, LockError>) -> Void) {
        perform({ () throws(LockError) in try .semaphoreRenew(key: key, token: token, leaseTtlS: leaseTtlS) }, completion, renewed)
    }

    /// `se`: joins the semaphore's queue without blocking.
    public func enqueueSemaphore(key: String, limit: Int, leaseTtlS: Int? = nil,
                                 completion: @escaping (Result<EnqueueOutcome, LockError>) -> Void) {
        perform({ () throws(LockError) in try .semaphoreEnqueue(key: key, limit: limit, leaseTtlS: leaseTtlS) }, completion, enqueued)
    }

    /// `sw`: waits up to `timeoutS` for a slot after ``enqueueSemaphore(key:limit:leaseTtlS:completion:)``.
    public func waitSemaphore(key: String, timeoutS: Int, completion: @escaping (Result<Grant?, LockError>) -> Void) {
        perform({ () throws(LockError) in try .semaphoreWait(key: key, timeoutS: timeoutS) }, completion, grantOrTimeout)
    }

    // MARK: Server

    /// `stats`: the server's view of connections, locks and semaphores (1.10 and later).
    public func stats(completion: @escaping (Result<ServerStats, LockError>) -> Void) {
        perform({ () throws(LockError) in .stats }, completion) { reply in
            if case .stats(let stats) = reply { return stats }
            return nil
        }
    }

    /// `ping`: a round trip that also resets the server's idle read timeout (dflockd 1.14 and
    /// later; older servers answer `error`, which fails the call with
    /// ``LockError/serverError(command:key:)``).
    public func ping(completion: @escaping (Result<Void, LockError>) -> Void) {
        perform({ () throws(LockError) in .ping }, completion, done)
    }

    // MARK: - Async forms

    /// `l`; returns the grant, or `nil` on timeout. Cancelling the task closes the connection.
    public func acquire(key: String, timeoutS: Int, leaseTtlS: Int? = nil) async throws -> Grant? {
        try await bridge { self.acquire(key: key, timeoutS: timeoutS, leaseTtlS: leaseTtlS, completion: $0) }
    }

    /// `r`.
    public func release(key: String, token: String) async throws {
        try await bridge { self.release(key: key, token: token, completion: $0) }
    }

    /// `n`; returns the seconds granted.
    public func renew(key: String, token: String, leaseTtlS: Int? = nil) async throws -> Int {
        try await bridge { self.renew(key: key, token: token, leaseTtlS: leaseTtlS, completion: $0) }
    }

    /// `e`.
    public func enqueue(key: String, leaseTtlS: Int? = nil) async throws -> EnqueueOutcome {
        try await bridge { self.enqueue(key: key, leaseTtlS: leaseTtlS, completion: $0) }
    }

    /// `w`; returns the grant, or `nil` on timeout. Cancelling the task closes the connection.
    public func wait(key: String, timeoutS: Int) async throws -> Grant? {
        try await bridge { self.wait(key: key, timeoutS: timeoutS, completion: $0) }
    }

    /// `sl`.
    public func acquireSemaphore(key: String, limit: Int, timeoutS: Int, leaseTtlS: Int? = nil) async throws -> Grant? {
        try await bridge { self.acquireSemaphore(key: key, limit: limit, timeoutS: timeoutS, leaseTtlS: leaseTtlS, completion: $0) }
    }

    /// `sr`.
    public func releaseSemaphore(key: String, token: String) async throws {
        try await bridge { self.releaseSemaphore(key: key, token: token, completion: $0) }
    }

    /// `sn`.
    public func renewSemaphore(key: String, token: String, leaseTtlS: Int? = nil) async throws -> Int {
        try await bridge { self.renewSemaphore(key: key, token: token, leaseTtlS: leaseTtlS, completion: $0) }
    }

    /// `se`.
    public func enqueueSemaphore(key: String, limit: Int, leaseTtlS: Int? = nil) async throws -> EnqueueOutcome {
        try await bridge { self.enqueueSemaphore(key: key, limit: limit, leaseTtlS: leaseTtlS, completion: $0) }
    }

    /// `sw`.
    public func waitSemaphore(key: String, timeoutS: Int) async throws -> Grant? {
        try await bridge { self.waitSemaphore(key: key, timeoutS: timeoutS, completion: $0) }
    }

    /// `stats`.
    public func stats() async throws -> ServerStats {
        try await bridge { self.stats(completion: $0) }
    }

    /// `ping`.
    public func ping() async throws {
        try await bridge { self.ping(completion: $0) }
    }

    /// Opens the connection (and authenticates) if it is not open yet.
    public func connect() async throws {
        try await bridge { self.connect(completion: $0) }
    }

    // MARK: - Plumbing

    /// Validates and sends a request on the loop, mapping the reply with `transform`.
    private func perform<Value>(_ makeRequest: @escaping () throws(LockError) -> Request,
                                _ completion: @escaping (Result<Value, LockError>) -> Void,
                                _ transform: @escaping (Reply) -> Value?) {
        loop.runOnLoop(ifShutDown: { completion(.failure(.eventLoopShutDown)) }) { [self] in
            let request: Request
            do throws(LockError) {
                request = try makeRequest()
            } catch {
                loop.runLater { completion(.failure(error)) }
                return
            }
            send(request) { result in
                completion(result.flatMap { reply in
                    transform(reply).map(Result.success)
                        ?? .failure(.protocolViolation("reply \(reply) does not answer '\(request.command.rawValue)'"))
                })
            }
        }
    }

    /// Runs a completion-handler operation as an async call (see `EventLoop.bridge`). Cancelling
    /// the task closes the connection, which fails the operation with ``LockError/cancelled``
    /// and makes the server drop any wait or hold of this session.
    @inline(__always)
    func bridge<Value: Sendable>(_ start: (@escaping (Result<Value, LockError>) -> Void) -> Void) async throws -> Value {
        try await loop.bridge(start) { self.cancel() }
    }
}

private func grantOrTimeout(_ reply: Reply) -> Grant?? {
    switch reply {
    case .granted(let grant): return .some(grant)
    case .timeout: return .some(nil)
    default: return nil
    }
}

private func done(_ reply: Reply) -> Void? {
    if case .ok = reply { return () }
    return nil
}

private func renewed(_ reply: Reply) -> Int? {
    if case .renewed(let seconds) = reply { return seconds }
    return nil
}

private func enqueued(_ reply: Reply) -> EnqueueOutcome? {
    switch reply {
    case .granted(let grant): return .acquired(grant)
    case .queued: return .queued
    default: return nil
    }
}
