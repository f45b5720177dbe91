import Logging
import ServiceLifecycle
import Synchronization

/// A session as a swift-service-lifecycle `Service`: put it in a `ServiceGroup` beside the
/// services that take locks through it.
///
/// ```swift
/// let session = try LockSession(servers: [("10.0.0.5", 6388)], logger: logger)
/// let group = ServiceGroup(configuration: .init(
///     services: [.init(service: session), .init(service: worker)],   // stopped in reverse order
///     gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
/// try await group.run()
/// ```
///
/// `run()` waits until the session is closed. On graceful shutdown (a signal, or
/// `ServiceGroup.triggerGracefulShutdown()`) the session stops what is in flight and gives the
/// keys back: waits (acquires, enqueues) of its locks fail with ``LockError/closed``, every lock
/// held through it is released and the answers awaited, at most for the request deadline
/// (10 s by default) plus a second; then the session closes and `run()` returns. Cancelling
/// `run()` closes the session at once (held keys are released without waiting, as
/// ``close()`` does). A session closed with ``close()`` ends `run()` too.
extension LockSession: Service {
    /// Runs until the session is closed: by a graceful shutdown (releasing every held lock
    /// first), by cancellation (closing at once), or by ``close()``. Then, when
    /// ``shutsDownLoopAfterRun`` is set, shuts ``loop`` down.
    public func run() async throws {
        await withTaskCancellationHandler {
            await withGracefulShutdownHandler {
                await lifecycle.waitUntilClosed()
            } onGracefulShutdown: {
                self.lifecycle.startShutdown { await self.shutDownGracefully() }
            }
        } onCancel: {
            self.close()
        }
        if lifecycle.shutsDownLoop {
            let loop = self.loop
            // Not on the loop's own thread (a task preferring the loop's executor may run there).
            await Task.detached { loop.shutdown() }.value
        }
    }

    /// Whether ``run()`` shuts ``loop`` down once the session has closed: set it when the loop
    /// was made for this session alone (never for ``EventLoop/shared``). Default `false`.
    public var shutsDownLoopAfterRun: Bool {
        get { lifecycle.shutsDownLoop }
        set { lifecycle.shutsDownLoop = newValue }
    }

    /// How long a graceful shutdown waits for the releases' answers before closing anyway.
    var gracefulShutdownLimit: Duration { .milliseconds(ownConfiguration.requestTimeoutMs + 1_000) }

    /// Fails the waits, releases what is held (answers awaited, bounded), then closes.
    func shutDownGracefully() async {
        let leases = placedLeases
        let held = leases.filter { $0.state == .held }
        logger.notice("graceful shutdown: releasing held locks", metadata: [
            "dflockd.locks_held": .stringConvertible(held.count), "dflockd.locks": .stringConvertible(leases.count)])
        // Waits first, so that no lock is granted a key that another one releases below.
        for lease in leases where lease.state == .connecting || lease.state == .queued { lease.close() }
        let limit = gracefulShutdownLimit
        let released = await Self.firstOf(limit) {
            await withTaskGroup(of: Void.self) { group in
                for lease in held { group.addTask { await lease.release() } }
            }
        }
        if !released {
            logger.warning("graceful shutdown: releases not all answered in time; closing", metadata: [
                "dflockd.limit_ms": .stringConvertible(limit.components.seconds * 1000)])
        }
        close()
        logger.notice("graceful shutdown: session closed")
    }

    /// Runs `work` and returns true when it finishes within `limit`, false when the limit passes
    /// first (the work then goes on by itself).
    private static func firstOf(_ limit: Duration, _ work: @escaping @Sendable () async -> Void) async -> Bool {
        let timer = Mutex<Task<Void, Never>?>(nil)
        let finished = await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
            let once = Mutex<CheckedContinuation<Bool, Never>?>(continuation)
            let resume: @Sendable (Bool) -> Void = { value in once.withLock { $0.take() }?.resume(returning: value) }
            Task { await work(); resume(true) }
            timer.withLock { $0 = Task { try? await Task.sleep(for: limit); resume(false) } }
        }
        timer.withLock { $0?.cancel() }
        return finished
    }
}

/// The run-time state ``LockSession/run()`` needs: whether the session has closed, who waits
/// for that, and whether a graceful shutdown has begun. Any thread.
final class SessionLifecycle: Sendable {
    private struct State {
        var closed = false
        var waiters: [CheckedContinuation<Void, Never>] = []
        var shuttingDown = false
        var shutsDownLoop = false
    }

    private let state = Mutex(State())

    var shutsDownLoop: Bool {
        get { state.withLock { $0.shutsDownLoop } }
        set { state.withLock { $0.shutsDownLoop = newValue } }
    }

    func waitUntilClosed() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let closed = state.withLock { state in
                if !state.closed { state.waiters.append(continuation) }
                return state.closed
            }
            if closed { continuation.resume() }
        }
    }

    func markClosed() {
        let waiters = state.withLock { state in
            state.closed = true
            defer { state.waiters = [] }
            return state.waiters
        }
        for waiter in waiters { waiter.resume() }
    }

    /// Starts `shutdown` once, however often a graceful shutdown is requested.
    func startShutdown(_ shutdown: @escaping @Sendable () async -> Void) {
        let first = state.withLock { state in
            defer { state.shuttingDown = true }
            return !state.shuttingDown && !state.closed
        }
        if first { Task { await shutdown() } }
    }
}
