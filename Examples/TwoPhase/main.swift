// TwoPhase: join the lock's queue first, tell someone, then wait for the lock.
//
//     make example NAME=TwoPhase
//     swift run TwoPhase --port 6388
//
// acquire() does two things in one call: it joins the key's FIFO queue and then blocks until
// the lock is granted. Split in two, enqueue() and wait(), the program can act in between,
// knowing its place in the queue is already secured: here a worker that finds the lock taken
// tells the current holder "I'm waiting" (a notification), and only then blocks in wait().
// Anything that must happen *after* you are in line but *before* you hold the lock fits there:
// notifying a coordinator, logging the queue position, starting a timer for a progress bar.
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
    // The holder: takes the lock and keeps it until someone says they are waiting for it.
    let holder = try DistributedLock(key: "twophase-printer", servers: servers)
    guard try await holder.acquire() else {
        print("the lock is busy (another program holds 'twophase-printer'); try again later")
        exit(1)
    }
    print("holder: holding '\(holder.key)'")

    // The notification channel between the worker and the holder. In real life this could be
    // a message queue, an HTTP call, or a row in a database; here it is an in-process stream.
    let (notices, notify) = AsyncStream<String>.makeStream()
    let holderTask = Task {
        for await notice in notices {
            print("holder: heard \"\(notice)\"; finishing up and releasing")
            break
        }
        try await holder.release()
    }

    // The worker, phase 1: enqueue() connects and joins the FIFO queue without blocking.
    let worker = try DistributedLock(key: "twophase-printer", acquireTimeoutS: 10, servers: servers)
    switch try await worker.enqueue() {
    case .acquired:
        // The fast path: the key was free, so the worker holds it already (renewal runs).
        print("worker: the lock was free; holding it already")
    case .queued:
        // In line behind the holder. The server keeps our place while we do something else.
        print("worker: queued behind the holder; notifying it")
        notify.yield("worker is queued")
    }

    // Phase 2: wait() blocks until the lock is granted (true) or timeoutS passes (false; the
    // server then drops us from the queue). After the .acquired fast path it returns true at once.
    let granted = try await worker.wait(timeoutS: 10)
    print("worker: wait returned \(granted); state \(worker.state)")
    try await holderTask.value
    if granted {
        try await worker.release()
        print("worker: released")
    }

    // The fast path on a free key: enqueue answers .acquired, and wait() is then immediate.
    let quick = try DistributedLock(key: "twophase-printer", servers: servers)
    let first = try await quick.enqueue()
    let immediate = try await quick.wait()
    print("free key: enqueue answered .\(first), wait returned \(immediate) at once")
    try await quick.release()

    print("twophase: done")
} catch let error as LockError {
    print("twophase failed: \(error)")
    exit(1)
}
