// Semaphore: up to N holders at once instead of one.
//
//     make example NAME=Semaphore
//     swift run Semaphore --port 6388
//
// A DistributedSemaphore is a lock that admits `limit` holders at a time, in FIFO order, e.g.
// "at most 2 workers call the payment provider at once". Same methods as DistributedLock.
//
// Semaphores need a dflockd 1.10 or later (the Go server). The 0.5.0 server that
// `make setup` installs from PyPI has locks only: it answers the semaphore command with a bare
// `error`, which the library reports as LockError.serverError. This example says so and exits
// normally; against a newer server it shows three holders sharing a limit of 2.
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

let servers = [("127.0.0.1", portArgument())]

do {
    // Every user of a semaphore key must agree on its limit (the server refuses a different one).
    let holders = try (1...3).map { _ in
        try DistributedSemaphore(key: "semaphore-payments", limit: 2, acquireTimeoutS: 5, leaseTtlS: 30,
                                 servers: servers)
    }

    do {
        guard try await holders[0].acquire() else {
            print("the semaphore is full (other programs hold it); try again later")
            exit(1)
        }
    } catch LockError.serverError(let command, _) {
        print("""
            this server has no semaphores: it answered `error` to the semaphore command '\(command)' \
            (LockError.serverError). Semaphores need dflockd 1.10 or later (the Go server); the \
            PyPI dflockd 0.5.0 has locks only. Nothing else to show here.
            """)
        print("semaphore: done")
        exit(0)
    }
    print("holder 1: in (limit 2)")

    guard try await holders[1].acquire() else {
        print("the semaphore is full (other programs hold it); try again later")
        exit(1)
    }
    print("holder 2: in; both slots are taken")

    // The third holder joins the queue without blocking (enqueue, as with locks), then waits.
    switch try await holders[2].enqueue() {
    case .queued: print("holder 3: queued, as the semaphore is full")
    case .acquired: print("holder 3: in at once?! (someone released meanwhile)")
    }

    try await holders[0].release()
    print("holder 1: released its slot")

    let granted = try await holders[2].wait(timeoutS: 5)
    print("holder 3: \(granted ? "in, in the slot holder 1 freed" : "still waiting after 5 s")")

    try await holders[1].release()
    if granted { try await holders[2].release() }
    print("semaphore: done")
} catch let error as LockError {
    print("semaphore failed: \(error)")
    exit(1)
}
