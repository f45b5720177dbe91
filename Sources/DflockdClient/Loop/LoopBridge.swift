extension EventLoop {
    /// Runs a completion-handler operation as an async call, with as few hops as the caller's
    /// executor allows. The async forms of ``Connection`` and ``DistributedLease`` all end here.
    ///
    /// `start` runs inside the call, on the caller's thread, and hands the operation to a
    /// completion-handler form (which reaches the loop by itself from any thread):
    ///
    /// - In a task preferring the loop's executor that is the loop thread, and the
    ///   completion's resume lands in the loop's run queue: the task goes on on the loop
    ///   thread, with no hop and no wake-up.
    /// - From an actor whose executor is the loop, the task prefers the loop for the length of
    ///   the call, so that the resume lands in the run queue too and the actor goes on at once.
    /// - Anywhere else: the operation's one hop to the loop (its inbox), and the completion
    ///   resumes the task on its own executor.
    ///
    /// The caller keeps its isolation throughout (`nonisolated(nonsending)`): an actor's async
    /// call does not leave the actor's executor before the operation starts, and its code goes
    /// on there afterwards.
    ///
    /// Cancellation: `onCancel` runs (on the cancelling thread) when the task is cancelled while
    /// the call is in flight, and should end the operation, which then completes with its
    /// error. A task cancelled before `start` ran never starts it: the call throws
    /// ``LockError/cancelled``; unless `startsWhenCancelled`, for an operation that must happen
    /// even then and that cancellation does not end (a release from a cancelled task): it
    /// starts regardless and `onCancel` never runs. Once the loop has shut down the
    /// completion-handler form fails the operation with ``LockError/eventLoopShutDown``, and so
    /// the call throws it.
    ///
    /// `start` does not escape (it has run when the call suspends), so its context needs no
    /// allocation: the bridge's one allocation per call is the completion handed to `start`,
    /// which captures only the continuation.
    @inline(__always)
    nonisolated(nonsending)
    func bridge<Value: Sendable>(startsWhenCancelled: Bool = false,
                                 _ start: (_ completion: @escaping (Result<Value, LockError>) -> Void) -> Void,
                                 onCancel: @Sendable () -> Void) async throws -> Value {
        try await bridge(startsWhenCancelled: startsWhenCancelled, resuming: { resume in start { resume($0) } }, onCancel: onCancel)
    }

    /// ``bridge(startsWhenCancelled:_:onCancel:)`` for an operation that resumes the call
    /// itself: `start` gets the continuation, which the operation's one escaping closure can
    /// capture instead of a completion closure made for it.
    @inline(__always)
    nonisolated(nonsending)
    func bridge<Value: Sendable>(startsWhenCancelled: Bool = false,
                                 resuming start: (_ resume: BridgedContinuation<Value>) -> Void,
                                 onCancel: @Sendable () -> Void) async throws -> Value {
        // A continuation resumes its task on the task's executor (the global pool when it has
        // no preference), and an actor's code then hops to the actor: two hops for an actor on
        // the loop. Preferring the loop for the length of the call makes the resume land in
        // the loop's run queue, where the actor, whose executor is the loop, goes on at once.
        // (A job the loop runs as a task executor belongs to a task that prefers the loop
        // already.)
        if inEventLoop, !runQueue.isRunningTaskJob {
            return try await withTaskExecutorPreference(self) {
                try await suspend(startsWhenCancelled, start, onCancel: onCancel)
            }
        }
        return try await suspend(startsWhenCancelled, start, onCancel: onCancel)
    }

    @inline(__always)
    nonisolated(nonsending)
    private func suspend<Value: Sendable>(_ startsWhenCancelled: Bool,
                                          _ start: (_ resume: BridgedContinuation<Value>) -> Void,
                                          onCancel: @Sendable () -> Void) async throws -> Value {
        // Nothing for a cancellation to do: no handler, whose record would cost a lock of the
        // task's status records to remove, and the call is one suspension in the caller's frame.
        if startsWhenCancelled {
            return try await withUnsafeThrowingContinuation { continuation in start(BridgedContinuation(continuation)) }
        }
        // `withTaskCancellationHandler` is an opaque, unspecialised async function that switches
        // executor on entry, on return, and in its operation closure: in a task preferring an
        // executor (the loop's) each switch reads the preference under the task's status-record
        // lock (a global mutex and an allocation), three times a call. The executor-inheriting
        // form switches nowhere: the operation runs where the call runs, which is what a caller
        // that keeps its isolation (`nonisolated(nonsending)`) wants anyway.
        return try await _unsafeInheritExecutor_withTaskCancellationHandler(operation: {
            try await withUnsafeThrowingContinuation { continuation in
                // Read once the handler is in place: a task cancelled from here on has
                // `onCancel` end the operation started below.
                if Task.isCancelled {
                    continuation.resume(throwing: LockError.cancelled)
                    return
                }
                start(BridgedContinuation(continuation))
                // Off the loop thread `start` only queues the operation for the loop, and a
                // cancellation meanwhile may have queued `onCancel`'s work ahead of it (which
                // then finds no such operation). Once more, behind the operation: ending an
                // operation twice ends it once.
                if Task.isCancelled { onCancel() }
            }
        }, onCancel: onCancel)
    }
}

/// Resumes a bridged call with an operation's result, once. Debug builds stop the program when
/// an operation completes twice: an unsafe continuation resumed twice is undefined behaviour.
struct BridgedContinuation<Value: Sendable>: @unchecked Sendable {
    private let continuation: UnsafeContinuation<Value, any Error>
    #if DEBUG
    // Touched only by the operation's completion, which runs once (on the loop thread, or on
    // the caller's after shutdown): the reason for `@unchecked`.
    private let completed = CompletedFlag()
    #endif

    init(_ continuation: UnsafeContinuation<Value, any Error>) {
        self.continuation = continuation
    }

    func callAsFunction(_ result: Result<Value, LockError>) {
        #if DEBUG
        precondition(!completed.isSet, "an operation completed twice")
        completed.isSet = true
        #endif
        continuation.resume(with: result.mapError { $0 as any Error })
    }
}

#if DEBUG
/// Whether a bridged operation has completed. Touched only by the operation's completion.
private final class CompletedFlag {
    var isSet = false
}
#endif
