/// Where a ``DistributedLock`` or ``DistributedSemaphore`` is in its life cycle.
public enum LockState: Sendable, Hashable {
    /// Never connected.
    case idle
    /// Opening the connection to the key's server.
    case connecting
    /// Asking for the key or waiting in its FIFO queue.
    case queued
    /// Holding the key; the lease is renewed in the background.
    case held
    /// A release is on its way to the server.
    case releasing
    /// Released, closed, timed out or lost. `acquire()` or `enqueue()` starts again.
    case closed
}
