// Concurrency helpers for tests that wait on events from other threads (the loop thread,
// proxy and peer threads, server processes) without blocking the cooperative pool.
//
//     let server = try await offThread { try RealServer.start() }   // blocking work on a thread of its own
//     let lost = EventLog<String>()                                  // append from any thread
//     #expect(await lost.wait(timeout: .seconds(5)) { $0.count == 3 })
//     lost.entries                                                   // values, each with its arrival time
//
// Swift Testing runs tests in parallel on the cooperative pool, two threads on a 2-core machine:
// a test that blocks one of them (waitpid, poll, a blocking connect) stalls every other test's
// continuations and timers for that long.

@testable import DflockdClient
import Foundation

/// Runs blocking work on a thread of its own, off the cooperative pool.
func offThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        Thread { continuation.resume(with: Result { try body() }) }.start()
    }
}

/// Runs blocking work on a thread of its own, off the cooperative pool.
func offThread<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { continuation in
        Thread { continuation.resume(returning: body()) }.start()
    }
}

/// Values appended from any thread, each with the time it arrived; tasks can wait for a
/// condition on them without polling.
final class EventLog<Element: Sendable>: Sendable {
    struct Entry: Sendable {
        let value: Element
        let at: ContinuousClock.Instant
    }

    private struct Waiter {
        let predicate: @Sendable ([Entry]) -> Bool
        let continuation: CheckedContinuation<Bool, Never>
    }

    private struct State {
        var entries: [Entry] = []
        var waiters: [Int: Waiter] = [:]
        var nextID = 0
    }

    private let state = ThreadLock(State())

    func append(_ value: Element) {
        let ready = state.withLock { s -> [CheckedContinuation<Bool, Never>] in
            s.entries.append(Entry(value: value, at: .now))
            var ready: [CheckedContinuation<Bool, Never>] = []
            for (id, waiter) in s.waiters where waiter.predicate(s.entries) {
                ready.append(waiter.continuation)
                s.waiters[id] = nil
            }
            return ready
        }
        for continuation in ready { continuation.resume(returning: true) }
    }

    var entries: [Entry] { state.withLock { $0.entries } }

    /// True once `predicate` holds for the entries, false if `timeout` passes first.
    func wait(timeout: Duration, until predicate: @escaping @Sendable ([Entry]) -> Bool) async -> Bool {
        let id = state.withLock { s -> Int in
            s.nextID += 1
            return s.nextID
        }
        return await withCheckedContinuation { continuation in
            let satisfied = state.withLock { s -> Bool in
                if predicate(s.entries) { return true }
                s.waiters[id] = Waiter(predicate: predicate, continuation: continuation)
                return false
            }
            if satisfied {
                continuation.resume(returning: true)
                return
            }
            Task {
                try? await Task.sleep(for: timeout)
                self.expire(id)
            }
        }
    }

    private func expire(_ id: Int) {
        let waiter = state.withLock { $0.waiters.removeValue(forKey: id) }
        waiter?.continuation.resume(returning: false)
    }
}
