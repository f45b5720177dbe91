import CUV
import DequeModule
import Glibc
import Synchronization

/// The jobs of the loop's executor (``EventLoop/enqueue(_:)``) that were enqueued on the loop
/// thread itself: a task resumed by a completion handler, an actor on the loop calling another.
///
/// They wait here, not in the loop's cross-thread inbox, so enqueueing one costs no lock, no
/// `uv_async_send` and no system call. A `uv_idle_t` is active while jobs wait: libuv runs idle
/// callbacks before it polls and never blocks in a poll while an idle handle is active, so the
/// jobs run before the loop waits for I/O again. The active handle is referenced, so a borrowed
/// loop's `uv_run` does not return while jobs wait. Created on first use: a loop that never
/// runs a job has no extra handle.
///
/// A drain runs jobs until none is left, or until it has run ``jobsPerDrain`` of them: the
/// rest run on the next turn, after the loop has polled (without waiting), so two actors
/// calling each other on the loop cannot starve its I/O and timers.
final class RunQueue {
    /// A job and the face of the loop it was enqueued on.
    struct Job {
        let job: UnownedJob
        /// Enqueued on ``LoopActorExecutor`` (an actor's job) rather than on the loop as a task
        /// executor.
        let onActor: Bool
    }

    static let jobsPerDrain = 1024

    /// The loop's face as the serial executor of actors (``EventLoop/asUnownedSerialExecutor()``).
    /// Set once, by ``bind(to:)`` in the loop's initializer, before any other thread sees it.
    private(set) var actorExecutor: LoopActorExecutor!

    // Loop thread only. Those marked `@exclusivity(unchecked)` skip Swift's dynamic exclusivity
    // checks in release builds (a job's enqueue and run cost four, a twentieth of an async
    // call's instructions on the loop's executor); debug builds, which the tests run, check
    // every access.
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    private var jobs = Deque<Job>()
    private var idle: UnsafeMutablePointer<uv_idle_t>?
    /// Set by ``shutDown(loop:)``: later jobs go to ``afterShutdown``.
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    private(set) var isClosed = false
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    private var isDraining = false
    /// The loop, kept alive while jobs wait for it (their executor reference is unowned).
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    private var loopWhileBusy: EventLoop?
    /// Whether the job running now on the loop thread was enqueued on the loop as a task
    /// executor (its task prefers the loop), not on an actor. Loop thread only.
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    var isRunningTaskJob = false
    /// Jobs run from this queue so far, for tests.
    #if !DEBUG
    @exclusivity(unchecked)
    #endif
    private(set) var jobsRun = 0
    /// Jobs that came from other threads, through the loop's inbox (each a wake-up), for tests.
    let jobsThroughInbox = Atomic<Int>(0)

    /// Jobs enqueued on other threads once the loop's inbox has closed. Until the loop thread
    /// has finished shutting down it runs them itself; after that, whichever enqueueing thread
    /// finds no other thread running them does: one at a time, in order, so an actor's jobs
    /// stay serial.
    private let afterShutdown = ThreadLock(AfterShutdown())

    private struct AfterShutdown {
        var jobs = Deque<Job>()
        var runner: pthread_t?
        var loopHasFinished = false
    }

    /// Called once by the loop's initializers.
    func bind(to loop: EventLoop) {
        actorExecutor = LoopActorExecutor(loop: loop)
    }

    /// Adds a job enqueued on the loop thread. Loop thread only; not after ``isClosed``.
    func append(_ job: Job, loop: EventLoop) {
        assert(!isClosed)
        jobs.append(job)
        guard jobs.count == 1, !isDraining else { return }
        startIdle(loop)
    }

    /// Runs the jobs waiting now (all of them, and whatever they enqueue, once the loop is
    /// closing). Loop thread only.
    private func drain(_ loop: EventLoop) {
        guard !isDraining else { return }
        isDraining = true
        var budget = RunQueue.jobsPerDrain
        while budget > 0 || isClosed, let job = jobs.popFirst() {
            budget -= 1
            jobsRun &+= 1
            loop.run(job)
        }
        isDraining = false
        if jobs.isEmpty {
            if let idle { uv_idle_stop(idle) }
            loopWhileBusy = nil
        }
    }

    private func startIdle(_ loop: EventLoop) {
        let handle: UnsafeMutablePointer<uv_idle_t>
        if let idle {
            handle = idle
        } else {
            handle = .allocate(capacity: 1)
            uv_idle_init(loop.raw, handle)
            handle.pointee.data = Unmanaged.passUnretained(self).toOpaque()
            idle = handle
        }
        loopWhileBusy = loop
        uv_idle_start(handle, RunQueue.onIdle)
    }

    private static let onIdle: uv_idle_cb = { handle in
        guard let data = handle?.pointee.data else { return }
        let queue = Unmanaged<RunQueue>.fromOpaque(data).takeUnretainedValue()
        guard let loop = queue.loopWhileBusy else {
            uv_idle_stop(handle)
            return
        }
        queue.drain(loop)
    }

    /// Runs every job still waiting (and what they enqueue while the loop closes), and those
    /// other threads enqueued since the inbox closed, then closes the idle handle; jobs enqueued
    /// from here on go to ``runAfterShutdown(_:loop:)``. Called by the loop's shutdown on the
    /// loop thread, after its connections and timers have failed what they owed (which resumes
    /// the tasks that awaited them).
    func shutDown(loop: EventLoop) {
        guard !isClosed else { return }
        isClosed = true
        // From inside a job (a borrowed loop shut down by a task on it), the drain in progress
        // runs the rest once that job returns.
        drain(loop)
        if let idle {
            self.idle = nil
            uv_close(UnsafeMutableRawPointer(idle).assumingMemoryBound(to: uv_handle_t.self), freeHandleOnClose)
        }
        afterShutdown.withLock { state in
            state.loopHasFinished = true
            state.runner = state.jobs.isEmpty ? nil : pthread_self()
        }
        runClaimedJobs(loop)
    }

    /// Runs a job that can no longer reach the loop's inbox: the loop thread runs it if it is
    /// still shutting down; otherwise this thread does, unless another thread is running such
    /// jobs already, which then runs this one after its own.
    func runAfterShutdown(_ job: Job, loop: EventLoop) {
        let mustRun = afterShutdown.withLock { state -> Bool in
            state.jobs.append(job)
            guard state.loopHasFinished, state.runner == nil else { return false }
            state.runner = pthread_self()
            return true
        }
        if mustRun { runClaimedJobs(loop) }
    }

    /// Runs the jobs after shutdown until none is left, on the thread that claimed them.
    private func runClaimedJobs(_ loop: EventLoop) {
        while let next = afterShutdown.withLock({ state -> Job? in
            guard state.runner.map({ pthread_equal($0, pthread_self()) != 0 }) == true else { return nil }
            if let next = state.jobs.popFirst() { return next }
            state.runner = nil
            return nil
        }) {
            loop.run(next)
        }
    }

    /// Whether the calling thread is running jobs after shutdown (they are isolated to the loop's
    /// executor then, off its thread).
    var isRunningAfterShutdownOnThisThread: Bool {
        afterShutdown.withLock { state in state.runner.map { pthread_equal($0, pthread_self()) != 0 } ?? false }
    }
}
