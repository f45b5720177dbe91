// Quickstart: the five-minute example. Take a distributed lock, do some work while holding it,
// release it, with `withLock`.
//
//     make example NAME=Quickstart                 # starts a throwaway dflockd and runs this
//     swift run Quickstart --port 6388             # against a dflockd you started yourself
//
// A dflockd lock is a named mutex that every process talking to the same server shares: while
// this program holds "quickstart-report", nobody else can, on this machine or any other.
import DflockdClient

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// `--port N` from the command line; 6388 (dflockd's default port) when absent.
func portArgument() -> Int {
    let arguments = CommandLine.arguments
    guard let index = arguments.firstIndex(of: "--port"), index + 1 < arguments.count,
          let port = Int(arguments[index + 1]) else { return 6388 }
    return port
}

let port = portArgument()

do {
    // Creating the lock only checks the options: nothing touches the network yet.
    let lock = try DistributedLock(
        key: "quickstart-report",          // the lock's name: everyone who uses this name shares it
        acquireTimeoutS: 5,                // wait at most 5 s for it before giving up
        leaseTtlS: 10,                     // the server frees it 10 s after our last renewal
        servers: [("127.0.0.1", port)]     // where dflockd listens
    )

    // withLock: connect, wait for the lock, run the closure, release. The release happens even
    // if the closure throws. While the closure runs, the library renews the lease in the
    // background, so work longer than `leaseTtlS` stays protected.
    let total = try await lock.withLock {
        print("holding '\(lock.key)': state \(lock.state), lease \(lock.lease) s")
        var total = 0
        for step in 1...3 {
            total += step                              // the work that must not run twice at once
            try await Task.sleep(for: .milliseconds(200))
        }
        return total                                   // withLock returns what the closure returns
    }
    print("released; the work computed \(total); state now \(lock.state)")

    // When someone else holds the lock, withLock waits up to acquireTimeoutS and then throws
    // LockError.acquireTimeout. Show it with a second lock of the same name and no patience.
    let holder = try DistributedLock(key: "quickstart-report", servers: [("127.0.0.1", port)])
    let impatient = try DistributedLock(key: "quickstart-report", acquireTimeoutS: 0,
                                        servers: [("127.0.0.1", port)])
    _ = try await holder.acquire()                     // true: the key was free
    do {
        try await impatient.withLock { print("unexpected: got a lock someone else holds") }
    } catch LockError.acquireTimeout(let key) {
        print("a second client could not get '\(key)' while it was held: LockError.acquireTimeout")
    }
    try await holder.release()

    print("quickstart: done")
} catch let error as LockError {
    // Every LockError says what happened and what to do, e.g. "could not connect to
    // 127.0.0.1:6388: ECONNREFUSED (connection refused). Is dflockd running there?"
    print("quickstart failed: \(error)")
    exit(1)
}
