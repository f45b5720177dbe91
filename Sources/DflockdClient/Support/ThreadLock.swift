import Glibc

/// A value guarded by a pthread mutex, for the few places other threads meet the loop thread.
///
/// Synchronization's `Mutex` would do the same job, but on Linux ThreadSanitizer cannot see
/// its futex-based locking and reports every access it guards as a race; a pthread mutex keeps
/// `make test-tsan` able to check the cross-thread hand-offs for real.
final class ThreadLock<Value>: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private var value: Value

    init(_ value: Value) {
        self.value = value
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    /// Runs `body` with the value, holding the lock.
    func withLock<Result, Failure: Error>(_ body: (inout Value) throws(Failure) -> Result) throws(Failure) -> Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }
}
