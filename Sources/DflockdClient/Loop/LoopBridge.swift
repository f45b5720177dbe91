import Synchronization

extension EventLoop {
    /// Runs a completion-handler operation as an async call, with as few hops as the caller's
    /// executor allows. The async forms of ``Connection`` and ``DistributedLease`` all end here.
    ///
    /// - On the loop thread (a task preferring the loop's executor, an actor whose executor is
    ///   the loop): `start` runs at once, inside the call, and the completion's resume lands in
    ///   the loop's run queue, so the task continues on the loop thread without a wake-up.
    /// - Anywhere else: one hop to the loop (`start` runs there), and the completion resumes the
    ///   task on its own executor.
    ///
    /// The caller keeps its isolation throughout (`nonisolated(nonsending)`): an actor's async
    /// call does not leave the actor's executor before the operation starts.
    ///
    /// Cancellation: `onCancel` runs (on the cancelling thread) when the task is cancelled while
    /// the call is in flight, and should end the operation, which then completes with its
    /// error. A task cancelled before `start` ran never starts it: the call throws
    /// ``LockError/cancelled``; unless `startsWhenCancelled`, for an operation that must happen
    /// even then (a release from a cancelled task), which starts regardless. When the loop has
    /// shut down the call throws ``LockError/eventLoopShutDown`` and `start` never runs.
    ///
    /// The bridge allocates one object per call, the ``LoopCall``: the completion handed to
    /// `start` captures only it, the continuation lives in the task, and the hop to the loop
    /// (when there is one) captures only it too. The caller's `start` closure is the other
    /// allocation of an async call.
    nonisolated(nonsending)
    func bridge<Value: Sendable>(startsWhenCancelled: Bool = false,
                                 _ start: @escaping (_ completion: @escaping (Result<Value, LockError>) -> Void) -> Void,
                                 onCancel: @Sendable () -> Void) async throws -> Value {
        // A job the loop runs as a task executor belongs to a task that prefers the loop: it
        // resumes there already.
        guard inEventLoop, !runQueue.isRunningTaskJob else {
            return try await suspend(startsWhenCancelled, start, onCancel: onCancel)
        }
        // A continuation resumes its task on the task's executor (the global pool when it has
        // no preference), and an actor's code then hops to the actor: two hops for an actor on
        // the loop. Preferring the loop for the length of the call makes the resume land in
        // the loop's run queue, where the actor, whose executor is the loop, goes on at once.
        return try await withTaskExecutorPreference(self) {
            try await suspend(startsWhenCancelled, start, onCancel: onCancel)
        }
    }

    nonisolated(nonsending)
    private func suspend<Value: Sendable>(_ startsWhenCancelled: Bool,
                                          _ start: @escaping (_ completion: @escaping (Result<Value, LockError>) -> Void) -> Void,
                                          onCancel: @Sendable () -> Void) async throws -> Value {
        let call = LoopCall<Value>(startsWhenCancelled: startsWhenCancelled)
        return try await withTaskCancellationHandler {
            try await withUnsafeThrowingContinuation { continuation in
                call.begin(continuation, start, on: self)
            }
        } onCancel: {
            call.cancel()
            onCancel()
        }
    }
}

/// One async call in flight through ``EventLoop/bridge(startsWhenCancelled:_:onCancel:)``: the suspended task's
/// continuation, resumed exactly once, and whether the task was cancelled before the operation
/// started.
final class LoopCall<Value: Sendable>: @unchecked Sendable {
    // Written by the calling thread before the call reaches the loop, then loop thread only.
    private var continuation: UnsafeContinuation<Value, any Error>?
    private var start: ((@escaping (Result<Value, LockError>) -> Void) -> Void)?
    // Any thread.
    private let cancelled = Atomic<Bool>(false)
    private let startsWhenCancelled: Bool

    init(startsWhenCancelled: Bool) {
        self.startsWhenCancelled = startsWhenCancelled
    }

    func begin(_ continuation: UnsafeContinuation<Value, any Error>,
               _ start: @escaping (@escaping (Result<Value, LockError>) -> Void) -> Void,
               on loop: EventLoop) {
        self.continuation = continuation
        if loop.inEventLoop {
            startIfNotCancelled(start)
            return
        }
        self.start = start
        // The inbox's lock publishes `continuation` and `start` to the loop thread.
        if !loop.tryExecute({ self.startOnLoop() }) {
            self.start = nil
            resume(.failure(.eventLoopShutDown))
        }
    }

    func cancel() {
        cancelled.store(true, ordering: .releasing)
    }

    private func startOnLoop() {
        guard let start else { return }
        self.start = nil
        startIfNotCancelled(start)
    }

    private func startIfNotCancelled(_ start: (@escaping (Result<Value, LockError>) -> Void) -> Void) {
        if !startsWhenCancelled, cancelled.load(ordering: .acquiring) {
            resume(.failure(.cancelled))
        } else {
            start { self.resume($0) }
        }
    }

    private func resume(_ result: Result<Value, LockError>) {
        guard let continuation else {
            assertionFailure("an operation completed twice")
            return
        }
        self.continuation = nil
        continuation.resume(with: result.mapError { $0 as any Error })
    }
}
