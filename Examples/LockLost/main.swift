// LockLost: what happens when a held lock is lost, and how a program notices in time.
//
//     make example NAME=LockLost                   # the server drops idle clients after 3 s
//     swift run LockLost --port 6388               # a default server: about 23 s
//
// A lock is only as good as its lease. If the lease cannot be renewed (the server crashed, the
// network broke, the process was paused too long) the server frees the lock and someone else
// may take it while this program still thinks it holds it. The library notices in two ways:
//   - the connection ends or a renewal is refused: `onLockLost(key, token)` is called at once;
//   - no renewal has been answered by the end of the lease, by the client's own clock: the
//     lock is declared lost (and `onLockLost` called) before the server can give it away.
// `leaseRemaining` is that client-side bound: check it right before any write that must not
// happen without the lock. (It cannot see a server that ends the session early, as below;
// that is noticed when the connection's end arrives, which is at once on a live network.)
//
// To lose a lock for real without killing anything, this example uses a rule of every dflockd
// server: a connection that sends nothing for `--read-timeout` seconds (23 by default) is
// closed, and the locks it holds are released. Two locks are taken with a 60-second lease:
//   - "careless" turns off the library's idle cap (`maxIdleMs: nil`), so it renews only at half
//     the lease, after 30 s: the server gives up on it first, and the lock is lost;
//   - "careful" renews at least every second (`maxIdleMs: 1_000`) and keeps its lock. (The
//     default cap, 10 s, suits the default 23-second read timeout; 1 s also survives a server
//     started with `--read-timeout 2`.)
import DflockdClient

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

/// The write that must never happen without the lock: checks the lease first.
func criticalWrite(_ number: Int, under lock: DistributedLock, quiet: Bool = false) -> Bool {
    // Refuse unless the lock is held with a comfortable margin: a write takes time too.
    guard lock.state == .held, let remaining = lock.leaseRemaining, remaining > .seconds(2) else {
        print("\(lock.key): write \(number) refused: the lock is no longer safely ours")
        return false
    }
    if !quiet { print("\(lock.key): write \(number) done (lease certain for another \(remaining.components.seconds) s)") }
    return true
}

let servers = [("127.0.0.1", portArgument())]

do {
    // onLockLost runs on the library's loop thread: hand the news to the main program through
    // a stream rather than doing much work there.
    let (lostLocks, reportLost) = AsyncStream<(key: String, token: String)>.makeStream()
    let careless = try DistributedLock(key: "locklost-careless", leaseTtlS: 60, servers: servers,
                                       onLockLost: { key, token in reportLost.yield((key, token)) },
                                       maxIdleMs: nil)
    let careful = try DistributedLock(key: "locklost-careful", leaseTtlS: 60, servers: servers,
                                      onLockLost: { key, token in reportLost.yield((key, token)) },
                                      maxIdleMs: 1_000)
    guard try await careless.acquire(), try await careful.acquire() else {
        print("the example's locks are held by another program; try again later")
        exit(1)
    }
    print("holding both locks with a 60 s lease; careless renews after 30 s, careful every second")
    print("waiting for the server to drop the silent connection (after its --read-timeout: 23 s by default)…")

    // Work under both locks, once a second, until the careless one is lost (40 s at most).
    let started = ContinuousClock.now
    var write = 0
    while careless.state == .held, ContinuousClock.now - started < .seconds(40) {
        write += 1
        _ = criticalWrite(write, under: careless, quiet: write > 3)
        _ = criticalWrite(write, under: careful, quiet: write > 3)
        if write == 3 { print("(writing once a second, quietly from now on)") }
        try await Task.sleep(for: .seconds(1))
    }

    if careless.state == .held {
        // A server started with `--read-timeout 0` (or a large one) never drops idle clients.
        print("the server kept the idle connection for 40 s, so nothing was lost; lockLost: nothing to show")
        try await careless.release()
        try await careful.release()
        exit(0)
    }

    // The handler was called once, with the key and the token that was lost.
    for await lost in lostLocks {
        print("onLockLost called for '\(lost.key)' (token \(lost.token)) after about \((ContinuousClock.now - started).components.seconds) s")
        break
    }
    print("careless: state \(careless.state), token \(careless.token ?? "nil"), leaseRemaining \(careless.leaseRemaining.map { "\($0)" } ?? "nil")")
    _ = criticalWrite(write + 1, under: careless)      // refused: the guard does its job

    // The first release() after a loss reports it (the server already freed the lock).
    do {
        try await careless.release()
    } catch LockError.lockLost(let key, _) {
        print("careless: release() reports LockError.lockLost for '\(key)'")
    }

    // The careful lock never went quiet long enough: still held, still renewed.
    _ = criticalWrite(write + 1, under: careful)
    try await careful.release()
    print("careful: kept its lock the whole time and released it")

    print("locklost: done")
} catch let error as LockError {
    print("locklost failed: \(error)")
    exit(1)
}
