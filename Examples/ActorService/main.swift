// ActorService: an actor-based service whose executor is the event loop. Each request takes a
// distributed lock for its account, changes the actor's own state inside `withLock`, and
// releases; the actor's code, every lock await and every `withLock` body run on the loop
// thread, so a request costs no thread hop at all.
//
//     make example NAME=ActorService              # starts a throwaway dflockd and runs this
//     swift run ActorService --port 6388          # against a dflockd you started yourself
//
// Keep the thread free: code on the loop's executor runs on the one thread every lock of the
// loop depends on. A blocking call there (a synchronous sleep, blocking file or network I/O, a
// long computation) stalls every lock, renewal and timer of the loop until it returns. Await
// instead, or move such work to another executor.
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

/// The service's books: ordinary mutable state, not `Sendable`, owned by the actor.
final class Ledger {
    var balances: [String: Int] = [:]
    var requestsServed = 0
}

/// Moves money between accounts. Across processes the distributed lock on an account keeps two
/// services from changing it at once; inside this process the actor keeps its own state safe.
actor AccountService {
    let loop: EventLoop
    private let servers: [(String, Int)]
    private let ledger = Ledger()
    /// Whether every step of every request ran on the loop thread (checked, not assumed).
    private(set) var alwaysOnLoop = true

    /// The actor runs where its locks run: on the loop thread.
    nonisolated var unownedExecutor: UnownedSerialExecutor { loop.asUnownedSerialExecutor() }

    init(loop: EventLoop, servers: [(String, Int)]) {
        self.loop = loop
        self.servers = servers
    }

    /// One request: lock the account, change its balance, unlock.
    func deposit(_ amount: Int, into account: String) async throws -> Int {
        note()
        let lock = try DistributedLock(key: "account-\(account)", acquireTimeoutS: 5, servers: servers, loop: loop)
        // The body runs in the actor's isolation: it may touch `ledger` directly.
        let balance = try await lock.withLock {
            note()
            ledger.balances[account, default: 0] += amount
            ledger.requestsServed += 1
            return ledger.balances[account, default: 0]
        }
        note()
        return balance
    }

    var requestsServed: Int { ledger.requestsServed }
    func balance(of account: String) -> Int { ledger.balances[account, default: 0] }

    private func note() {
        alwaysOnLoop = alwaysOnLoop && loop.inEventLoop
    }
}

let port = portArgument()
let loop = EventLoop()
let service = AccountService(loop: loop, servers: [("127.0.0.1", port)])

do {
    // 40 concurrent requests over 4 accounts: each account's requests queue on its dflockd
    // lock, and the actor runs one piece of code at a time on the loop thread.
    let accounts = ["alice", "bob", "carol", "dave"]
    try await withThrowingTaskGroup(of: Int.self) { group in
        for request in 0..<40 {
            group.addTask { try await service.deposit(request + 1, into: accounts[request % accounts.count]) }
        }
        try await group.waitForAll()
    }
    for account in accounts {
        print("\(account): \(await service.balance(of: account))")
    }
    let served = await service.requestsServed
    let onLoop = await service.alwaysOnLoop
    print("served \(served) requests; every step on the loop thread: \(onLoop)")
    loop.shutdown()
    guard served == 40, onLoop else {
        print("actor service: unexpected result")
        exit(1)
    }
    print("actor service: done")
} catch let error as LockError {
    print("actor service failed: \(error)")
    exit(1)
}
