import Glibc

/// A value guarded by a pthread mutex, for the few places other threads meet the loop thread.
///
/// Synchronization's `Mutex` would do the same job, but on Linux ThreadSanitizer cannot see
/// its futex-based locking and reports every access it guards as a race; a pthread mutex keeps
/// `make test-tsan` able to check the cross-thread hand-offs for real.
///
/// The value and the mutex live in one allocation (every lock has one of these, so with
/// 100,000 locks the second allocation of a separate mutex would cost megabytes).
struct ThreadLock<Value>: @unchecked Sendable {
    private let storage: Storage

    init(_ value: Value) {
        storage = unsafeDowncast(Storage.create(minimumCapacity: 1) { _ in value }, to: Storage.self)
        storage.withUnsafeMutablePointerToElements { mutex in
            mutex.initialize(to: pthread_mutex_t())
            pthread_mutex_init(mutex, nil)
        }
    }

    /// Runs `body` with the value, holding the lock.
    func withLock<Result, Failure: Error>(_ body: (inout Value) throws(Failure) -> Result) throws(Failure) -> Result {
        try storage.withUnsafeMutablePointers { (value, mutex) throws(Failure) -> Result in
            pthread_mutex_lock(mutex)
            defer { pthread_mutex_unlock(mutex) }
            return try body(&value.pointee)
        }
    }

    /// The value without taking the lock: only for the one thread that ever writes it (the
    /// loop thread, deciding whether a write is needed at all). Reads on other threads take
    /// the lock, and reads do not race with reads.
    func valueForItsOnlyWriter() -> Value {
        storage.header
    }

    /// The value as the header, the mutex as the one element.
    private final class Storage: ManagedBuffer<Value, pthread_mutex_t> {
        deinit {
            _ = withUnsafeMutablePointerToElements { mutex in pthread_mutex_destroy(mutex) }
        }
    }
}
