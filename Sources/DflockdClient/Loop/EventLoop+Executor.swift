/// The loop as an executor: tasks and actors that run on the loop thread, where every lock of
/// the loop lives, so their calls start lock operations without a thread hop and their awaits
/// resume on the thread that completed them.
///
/// ```swift
/// try await withTaskExecutorPreference(loop) {
///     try await lock.withLock { … }      // every step on the loop thread
/// }
///
/// actor Service {
///     nonisolated var unownedExecutor: UnownedSerialExecutor { loop.asUnownedSerialExecutor() }
/// }
/// ```
///
/// A job enqueued on the loop thread (a continuation resumed by a completion handler, an actor
/// on the loop calling another) waits in a run queue of the loop's own that is drained before
/// the loop next polls: no lock, no wake-up, no system call. A job enqueued on any other thread
/// travels through the same inbox as ``execute(_:)`` and wakes the loop.
///
/// Jobs are never dropped. Those waiting when ``shutdown()`` runs still run, on the loop thread,
/// after the loop's connections and timers have failed what they owed with
/// ``LockError/eventLoopShutDown`` (so the tasks awaiting them see that error). A job enqueued
/// once the loop has shut down runs on the thread that enqueued it, one at a time with any other
/// such job of this loop (an actor's jobs stay serial), and every lock call it makes fails with
/// ``LockError/eventLoopShutDown``.
///
/// Code on the loop's executor runs on the loop thread: a job that blocks the thread (a
/// synchronous sleep, blocking I/O, a long computation) stalls every lock, renewal and timer of
/// the loop until it returns. Keep such work on other executors.
extension EventLoop: TaskExecutor, SerialExecutor {
    /// Runs `job` on the loop thread: from the loop thread itself at the end of the current turn
    /// (before the loop polls again), from any other thread on the loop's next turn.
    public func enqueue(_ job: consuming ExecutorJob) {
        schedule(RunQueue.Job(job: UnownedJob(job), onActor: false))
    }

    /// The loop as the serial executor of an actor (return it from the actor's
    /// `unownedExecutor`): the actor's code runs on the loop thread.
    ///
    /// The executor it wraps is a companion object of the loop's, so that the loop can tell an
    /// actor's jobs from those of tasks preferring the loop, and run nonisolated code of such a
    /// task without a switch of executor at each call.
    public func asUnownedSerialExecutor() -> UnownedSerialExecutor {
        UnownedSerialExecutor(ordinary: runQueue.actorExecutor)
    }

    /// The loop as a task executor (`withTaskExecutorPreference(_:operation:)`).
    public func asUnownedTaskExecutor() -> UnownedTaskExecutor {
        UnownedTaskExecutor(ordinary: self)
    }

    /// Stops the program unless the caller runs on the loop thread (or, once the loop has shut
    /// down, is running this executor's jobs): what `assumeIsolated` and `assertIsolated` of an
    /// actor on the loop check.
    public func checkIsolated() {
        precondition(inEventLoop || runQueue.isRunningAfterShutdownOnThisThread,
                     "expected to run on the event loop's thread (the executor of this actor or task)")
    }

    func schedule(_ job: RunQueue.Job) {
        if inEventLoop, !runQueue.isClosed {
            runQueue.append(job, loop: self)
        } else if tryExecute({ [self] in run(job) }) {
            runQueue.jobsThroughInbox.add(1, ordering: .relaxed)
        } else {
            runQueue.runAfterShutdown(job, loop: self)
        }
    }

    /// Runs one job: an actor's isolated to the actor's executor; a task's on the loop as its
    /// task executor, with no serial executor (nonisolated code then needs no switch).
    func run(_ job: RunQueue.Job) {
        // Off the loop thread only after shutdown, where nothing reads the flag.
        let onLoop = inEventLoop
        let outer = onLoop ? runQueue.isRunningTaskJob : false
        if onLoop { runQueue.isRunningTaskJob = !job.onActor }
        if job.onActor {
            job.job.runSynchronously(on: UnownedSerialExecutor(ordinary: runQueue.actorExecutor))
        } else {
            job.job.runSynchronously(on: asUnownedTaskExecutor())
        }
        if onLoop { runQueue.isRunningTaskJob = outer }
    }
}

/// The face of an ``EventLoop`` that actors use as their serial executor.
final class LoopActorExecutor: SerialExecutor, @unchecked Sendable {
    unowned let loop: EventLoop

    init(loop: EventLoop) {
        self.loop = loop
    }

    func enqueue(_ job: consuming ExecutorJob) {
        loop.schedule(RunQueue.Job(job: UnownedJob(job), onActor: true))
    }

    func checkIsolated() {
        loop.checkIsolated()
    }
}
