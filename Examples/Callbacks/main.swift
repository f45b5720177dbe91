// Callbacks: the completion-handler API, for code that is not async (or does not want to be).
//
//     make example NAME=Callbacks
//     swift run Callbacks --port 6388
//
// Every async method of DistributedLock has a twin that takes a completion handler instead:
// acquire(force:completion:), release(completion:), enqueue(force:completion:),
// wait(timeoutS:completion:). The handlers run on the lock's EventLoop thread; here that is
// EventLoop.shared, a libuv loop the library starts on a thread of its own on first use.
// Keep handlers short and never block in them: every lock on the loop waits while one runs.
//
// The story: "worker" takes the lock; "reporter" asks for it too and times out while the worker
// holds it; the worker releases; the reporter asks again and gets it.
import Dispatch
import DflockdClient
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

func portArgument() -> Int {
    let arguments = CommandLine.arguments
    guard let index = arguments.firstIndex(of: "--port"), index + 1 < arguments.count,
          let port = Int(arguments[index + 1]) else { return 6388 }
    return port
}

/// Runs the story and calls `finished` exactly once, with the exit status.
func run(port: Int, finished: @escaping @Sendable (Int32) -> Void) throws(LockError) {
    let servers = [("127.0.0.1", port)]
    let worker = try DistributedLock(key: "callbacks-ledger", acquireTimeoutS: 5, servers: servers)
    let reporter = try DistributedLock(key: "callbacks-ledger", acquireTimeoutS: 1, servers: servers)

    /// Reports a failure and ends the program. A real program would retry or log instead.
    func fail(_ step: String, _ error: LockError) {
        print("\(step) failed: \(error)")
        worker.close()        // close() is safe in any state, from any thread
        reporter.close()
        finished(1)
    }

    // Each step starts the next one from its completion handler.
    worker.acquire { result in
        // Result<Bool, LockError>: .success(true) held, .success(false) timed out, .failure(error).
        switch result {
        case .failure(let error): return fail("worker acquire", error)
        case .success(false): return fail("worker acquire", .acquireTimeout(key: worker.key))
        case .success(true): break
        }
        print("worker: holding '\(worker.key)' (state \(worker.state)); handler on the loop thread: \(EventLoop.shared.inEventLoop)")

        reporter.acquire { result in
            guard case .success(let granted) = result else {
                if case .failure(let error) = result { fail("reporter acquire", error) }
                return
            }
            print("reporter: first try \(granted ? "granted?!" : "timed out after 1 s, as the worker holds the lock")")

            worker.release { result in
                if case .failure(let error) = result { return fail("worker release", error) }
                print("worker: released")

                reporter.acquire { result in
                    guard case .success(true) = result else { return fail("reporter acquire", .acquireTimeout(key: reporter.key)) }
                    print("reporter: second try granted, token \(reporter.token ?? "-")")

                    reporter.release { result in
                        if case .failure(let error) = result { return fail("reporter release", error) }
                        print("reporter: released")
                        print("callbacks: done")
                        finished(0)
                    }
                }
            }
        }
    }
}

// The main thread has nothing else to do: it starts the story, then waits for its end. (A
// server or GUI program would go on with its own work instead of waiting.)
let done = DispatchSemaphore(value: 0)
let status = Mutex<Int32>(0)                 // the loop thread writes it, the main thread reads it
do {
    try run(port: portArgument()) { code in
        status.withLock { $0 = code }
        done.signal()
    }
} catch {
    print("invalid options: \(error)")
    exit(2)
}
done.wait()
exit(status.withLock { $0 })
