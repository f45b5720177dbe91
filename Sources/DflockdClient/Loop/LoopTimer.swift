import CUV

/// A restartable one-shot timer on a loop: a `uv_timer_t` that exists from `init` until
/// ``close()``, with one action fixed at creation, so rescheduling allocates nothing.
///
/// Loop thread only. The handle keeps the timer object alive until libuv has finished closing
/// it, so a callback never reaches a freed object; the owner must call ``close()``.
final class LoopTimer: LoopResource {
    private let loop: EventLoop
    private var handle: UnsafeMutablePointer<uv_timer_t>?
    private var action: (() -> Void)?
    private let isRegistered: Bool

    /// Creates an unscheduled timer that will run `action` each time it fires.
    ///
    /// - Parameter closedByOwner: Whether an owner that the loop's shutdown closes (a
    ///   connection, a transport) closes this timer itself; otherwise the shutdown closes it,
    ///   after the connections.
    init(loop: EventLoop, closedByOwner: Bool = false, action: @escaping () -> Void) {
        loop.assertInLoop()
        self.loop = loop
        self.action = action
        isRegistered = !closedByOwner
        let handle = UnsafeMutablePointer<uv_timer_t>.allocate(capacity: 1)
        uv_timer_init(loop.raw, handle)
        handle.pointee.data = Unmanaged.passRetained(self).toOpaque()
        self.handle = handle
        if isRegistered { loop.register(self) }
    }

    var closesBeforeTimers: Bool { false }

    /// Whether the timer is scheduled and has not fired yet.
    var isScheduled: Bool {
        guard let handle else { return false }
        return uv_is_active(handle.asHandle) != 0
    }

    /// Fires once after `milliseconds` (from the loop's current time), replacing any earlier
    /// schedule.
    func schedule(afterMilliseconds milliseconds: Int) {
        guard let handle else { return }
        uv_timer_start(handle, LoopTimer.onFire, UInt64(max(0, milliseconds)), 0)
    }

    /// Unschedules the timer; it can be scheduled again.
    func cancel() {
        guard let handle else { return }
        uv_timer_stop(handle)
    }

    func closeForShutdown() {
        close()
    }

    /// Closes the handle; the timer never fires again. Idempotent.
    func close() {
        guard let handle else { return }
        self.handle = nil
        action = nil
        if isRegistered { loop.unregister(self) }
        uv_close(handle.asHandle, LoopTimer.onClose)
    }

    private static let onFire: uv_timer_cb = { handle in
        guard let data = handle?.pointee.data else { return }
        Unmanaged<LoopTimer>.fromOpaque(data).takeUnretainedValue().action?()
    }

    private static let onClose: uv_close_cb = { handle in
        guard let handle, let data = handle.pointee.data else { return }
        Unmanaged<LoopTimer>.fromOpaque(data).release()
        UnsafeMutableRawPointer(handle).deallocate()
    }
}
