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
        perform({ () throws(LockError) in try .acquire(key: key, timeoutS: timeoutS, leaseTtlS: leaseTtlS) }) { completion(answer($0, .acquire, grantOrTimeout)) }
    }

    /// `r`: releases the lock held with `token`. Fails with ``LockError/notHeld(key:)`` when
    /// the token does not hold it.
    public func release(key: String, token: String, completion: @escaping (Result<Void, LockError>) -> Void) {
        perform({ () throws(LockError) in try .release(key: key, token: token) }) { completion(answer($0, .release, done)) }
    }

    /// `n`: renews the lease; completes with the seconds the server now grants (0.5.0 rounds the
    /// remaining time down).
    public func renew(key: String, token: String, leaseTtlS: Int? = nil,
                      completion: @escaping (Result<Int, LockError>) -> Void) {
        perform({ () throws(LockError) in try .renew(key: key, token: token, leaseTtlS: leaseTtlS) }) { completion(answer($0, .renew, renewed)) }
    }

    /// `e`: joins the key's FIFO queue without blocking (two-phase step 1).
    public func enqueue(key: String, leaseTtlS: Int? = nil,
                        completion: @escaping (Result<EnqueueOutcome, LockError>) -> Void) {
        perform({ () throws(LockError) in try .enqueue(key: key, leaseTtlS: leaseTtlS) }) { completion(answer($0, .enqueue, enqueued)) }
    }

    /// `w`: waits up to `timeoutS` for the grant after ``enqueue(key:leaseTtlS:completion:)``;
    /// `nil` on timeout (the server then drops the waiter).
    public func wait(key: String, timeoutS: Int, completion: @escaping (Result<Grant?, LockError>) -> Void) {
        perform({ () throws(LockError) in try .wait(key: key, timeoutS: timeoutS) }) { completion(answer($0, .wait, grantOrTimeout)) }
    }

    // MARK: Semaphores

    /// `sl`: waits up to `timeoutS` for one of `limit` slots; `nil` on timeout.
    public func acquireSemaphore(key: String, limit: Int, timeoutS: Int, leaseTtlS: Int? = nil,
                                 completion: @escaping (Result<Grant?, LockError>) -> Void) {
        perform({ () throws(LockError) in try .semaphoreAcquire(key: key, limit: limit, timeoutS: timeoutS, leaseTtlS: leaseTtlS) }) { completion(answer($0, .semaphoreAcquire, grantOrTimeout)) }
    }

    /// `sr`: releases the slot held with `token`.
    public func releaseSemaphore(key: String, token: String, completion: @escaping (Result<Void, LockError>) -> Void) {
        perform({ () throws(LockError) in try .semaphoreRelease(key: key, token: token) }) { completion(answer($0, .semaphoreRelease, done)) }
    }

    /// `sn`: renews a slot's lease; completes with the seconds granted.
    public func renewSemaphore(key: String, token: String, leaseTtlS: Int? = nil,
                               completion: @escaping (Result<Int, LockError>) -> Void) {
        perform({ () throws(LockError) in try .semaphoreRenew(key: key, token: token, leaseTtlS: leaseTtlS) }) { completion(answer($0, .semaphoreRenew, renewed)) }
    }

    /// `se`: joins the semaphore's queue without blocking.
    public func enqueueSemaphore(key: String, limit: Int, leaseTtlS: Int? = nil,
                                 completion: @escaping (Result<EnqueueOutcome, LockError>) -> Void) {
        perform({ () throws(LockError) in try .semaphoreEnqueue(key: key, limit: limit, leaseTtlS: leaseTtlS) }) { completion(answer($0, .semaphoreEnqueue, enqueued)) }
    }

    /// `sw`: waits up to `timeoutS` for a slot after ``enqueueSemaphore(key:limit:leaseTtlS:completion:)``.
    public func waitSemaphore(key: String, timeoutS: Int, completion: @escaping (Result<Grant?, LockError>) -> Void) {
        perform({ () throws(LockError) in try .semaphoreWait(key: key, timeoutS: timeoutS) }) { completion(answer($0, .semaphoreWait, grantOrTimeout)) }
    }

    // MARK: Server

    /// `stats`: the server's view of connections, locks and semaphores (1.10 and later).
    public func stats(completion: @escaping (Result<ServerStats, LockError>) -> Void) {
        perform({ () throws(LockError) in .stats }) { completion(answer($0, .stats, serverStats)) }
    }

    /// `ping`: a round trip that also resets the server's idle read timeout (dflockd 1.14 and
    /// later; older servers answer `error`, which fails the call with
    /// ``LockError/serverError(command:key:)``).
    public func ping(completion: @escaping (Result<Void, LockError>) -> Void) {
        perform({ () throws(LockError) in .ping }) { completion(answer($0, .ping, done)) }
    }

    // MARK: - Async forms
    //
    // Each builds its request and reply mapping itself rather than calling the completion form:
    // the one closure the connection keeps then captures the continuation, where going through
    // the completion form costs a second closure and a reabstraction thunk per call.

    /// `l`; returns the grant, or `nil` on timeout. Cancelling the task closes the connection.
    public func acquire(key: String, timeoutS: Int, leaseTtlS: Int? = nil) async throws -> Grant? {
        try await bridge { resume in
            perform({ () throws(LockError) in try .acquire(key: key, timeoutS: timeoutS, leaseTtlS: leaseTtlS) }) { resume(answer($0, .acquire, grantOrTimeout)) }
        }
    }

    /// `r`.
    public func release(key: String, token: String) async throws {
        try await bridge { resume in
            perform({ () throws(LockError) in try .release(key: key, token: token) }) { resume(answer($0, .release, done)) }
        }
    }

    /// `n`; returns the seconds granted.
    public func renew(key: String, token: String, leaseTtlS: Int? = nil) async throws -> Int {
        try await bridge { resume in
            perform({ () throws(LockError) in try .renew(key: key, token: token, leaseTtlS: leaseTtlS) }) { resume(answer($0, .renew, renewed)) }
        }
    }

    /// `e`.
    public func enqueue(key: String, leaseTtlS: Int? = nil) async throws -> EnqueueOutcome {
        try await bridge { resume in
            perform({ () throws(LockError) in try .enqueue(key: key, leaseTtlS: leaseTtlS) }) { resume(answer($0, .enqueue, enqueued)) }
        }
    }

    /// `w`; returns the grant, or `nil` on timeout. Cancelling the task closes the connection.
    public func wait(key: String, timeoutS: Int) async throws -> Grant? {
        try await bridge { resume in
            perform({ () throws(LockError) in try .wait(key: key, timeoutS: timeoutS) }) { resume(answer($0, .wait, grantOrTimeout)) }
        }
    }

    /// `sl`.
    public func acquireSemaphore(key: String, limit: Int, timeoutS: Int, leaseTtlS: Int? = nil) async throws -> Grant? {
        try await bridge { resume in
            perform({ () throws(LockError) in
                try .semaphoreAcquire(key: key, limit: limit, timeoutS: timeoutS, leaseTtlS: leaseTtlS)
            }) { resume(answer($0, .semaphoreAcquire, grantOrTimeout)) }
        }
    }

    /// `sr`.
    public func releaseSemaphore(key: String, token: String) async throws {
        try await bridge { resume in
            perform({ () throws(LockError) in try .semaphoreRelease(key: key, token: token) }) { resume(answer($0, .semaphoreRelease, done)) }
        }
    }

    /// `sn`.
    public func renewSemaphore(key: String, token: String, leaseTtlS: Int? = nil) async throws -> Int {
        try await bridge { resume in
            perform({ () throws(LockError) in
                try .semaphoreRenew(key: key, token: token, leaseTtlS: leaseTtlS)
            }) { resume(answer($0, .semaphoreRenew, renewed)) }
        }
    }

    /// `se`.
    public func enqueueSemaphore(key: String, limit: Int, leaseTtlS: Int? = nil) async throws -> EnqueueOutcome {
        try await bridge { resume in
            perform({ () throws(LockError) in
                try .semaphoreEnqueue(key: key, limit: limit, leaseTtlS: leaseTtlS)
            }) { resume(answer($0, .semaphoreEnqueue, enqueued)) }
        }
    }

    /// `sw`.
    public func waitSemaphore(key: String, timeoutS: Int) async throws -> Grant? {
        try await bridge { resume in
            perform({ () throws(LockError) in try .semaphoreWait(key: key, timeoutS: timeoutS) }) { resume(answer($0, .semaphoreWait, grantOrTimeout)) }
        }
    }

    /// `stats`.
    public func stats() async throws -> ServerStats {
        try await bridge { resume in
            perform({ () throws(LockError) in .stats }) { resume(answer($0, .stats, serverStats)) }
        }
    }

    /// `ping`.
    public func ping() async throws {
        try await bridge { resume in
            perform({ () throws(LockError) in .ping }) { resume(answer($0, .ping, done)) }
        }
    }

    /// Opens the connection (and authenticates) if it is not open yet.
    public func connect() async throws {
        try await bridge { resume in connect { resume($0) } }
    }

    // MARK: - Plumbing

    /// Validates a request and sends it on the loop; `answered` gets its reply (or why there is
    /// none: a refused argument, on a later turn; a loop that has shut down).
    ///
    /// Validation is pure, so it runs on the caller's thread. On the loop thread the request
    /// goes to the core at once: the only allocation is `answered`, which the core keeps (a
    /// closure queued for the loop would cost another per call).
    private func perform(_ makeRequest: () throws(LockError) -> Request, _ answered: @escaping Completion) {
        let request: Request
        do throws(LockError) {
            request = try makeRequest()
        } catch {
            loop.runOnLoop(ifShutDown: { answered(.failure(.eventLoopShutDown)) }) { [loop] in
                loop.runLater { answered(.failure(error)) }
            }
            return
        }
        // `runOnLoop` would do this too, but its body, an escaping closure, is allocated even
        // when it runs inline (inlining it does not move the allocation into the other branch).
        if loop.inEventLoop, !loop.isShutDown {
            send(request, completion: answered)
            return
        }
        loop.runOnLoop(ifShutDown: { answered(.failure(.eventLoopShutDown)) }) { [self] in
            send(request, completion: answered)
        }
    }

    /// Runs an operation as an async call (see `EventLoop.bridge`); `start` gets the function
    /// that resumes the call. Cancelling the task closes the connection, which fails the
    /// operation with ``LockError/cancelled`` and makes the server drop any wait or hold of
    /// this session.
    @inline(__always)
    func bridge<Value: Sendable>(_ start: (_ resume: BridgedContinuation<Value>) -> Void) async throws -> Value {
        try await loop.bridge(resuming: start) { self.cancel() }
    }
}

/// The value a reply carries for the command it answers, or the failure: a reply of the wrong
/// kind means the stream is out of step.
@inline(__always)
private func answer<Value>(_ result: Result<Reply, LockError>, _ command: Command, _ value: (Reply) -> Value?) -> Result<Value, LockError> {
    result.flatMap { reply in
        value(reply).map(Result.success) ?? .failure(.protocolViolation("reply \(reply) does not answer '\(command.rawValue)'"))
    }
}

private func serverStats(_ reply: Reply) -> ServerStats? {
    if case .stats(let stats) = reply { return stats }
    return nil
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
