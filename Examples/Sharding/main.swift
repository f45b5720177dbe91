// Sharding: spreading keys over several dflockd servers.
//
//     make example NAME=Sharding                   # one throwaway server, used three times
//     swift run Sharding --ports 6388,6389,6390    # three servers you started yourself
//     swift run Sharding --port 6388               # one server
//
// dflockd servers do not talk to each other. With several of them, each key lives on exactly
// one, chosen by the client: give every DistributedLock the same `servers` list (in the same
// order) and it connects to the server its `shardingStrategy` picks for the key. The default,
// `stableHashShard`, is CRC-32 of the key modulo the number of servers, the rule every official
// dflockd client uses, so programs in other languages agree on where each key lives.
import DflockdClient

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// `--ports A,B,C`, else `--port N`, else 6388.
func portsArgument() -> [Int] {
    let arguments = CommandLine.arguments
    func value(of option: String) -> String? {
        guard let index = arguments.firstIndex(of: option), index + 1 < arguments.count else { return nil }
        return arguments[index + 1]
    }
    if let list = value(of: "--ports") {
        let ports = list.split(separator: ",").compactMap { Int($0) }
        if !ports.isEmpty { return ports }
    }
    return [value(of: "--port").flatMap { Int($0) } ?? 6388]
}

var ports = portsArgument()
if ports.count == 1 {
    // The placement below is the same whatever the servers are, so one server listed three
    // times shows it just as well; only the "held on" check below cannot tell them apart.
    print("one server given (port \(ports[0])): using it as all three shards; pass --ports A,B,C for three servers")
    ports = Array(repeating: ports[0], count: 3)
}
let servers = ports.map { ("127.0.0.1", $0) }
let keys = ["orders/42", "orders/43", "invoices/7", "users/alice", "my-resource", "clé-锁"]

do {
    // Where does each key live? stableHashShard(key, numberOfServers) is a pure function:
    // no network needed to answer.
    for key in keys {
        let index = stableHashShard(key, servers.count)
        print("\(key) → server \(index) (port \(servers[index].1))")
    }

    // Take every lock at once. Each DistributedLock gets the whole list and connects only to
    // the server of its key.
    let locks = try keys.map { key in
        try DistributedLock(key: key, acquireTimeoutS: 5, servers: servers)
    }
    try await withThrowingTaskGroup(of: Void.self) { group in
        for lock in locks {
            group.addTask {
                guard try await lock.acquire() else { throw LockError.acquireTimeout(key: lock.key) }
            }
        }
        try await group.waitForAll()
    }
    print("acquired all \(locks.count) locks")

    // Check the placement from the servers' side: ask each server, with a raw Connection and a
    // zero timeout, whether it would grant the key right now. Only the key's own server says no.
    if Set(ports).count == 1 {
        print("(one server plays all three shards here, so each key shows up as held on all three)")
    }
    let connections = try ports.map { try Connection(host: "127.0.0.1", port: $0) }
    for key in keys {
        var heldOn: [Int] = []
        for (index, connection) in connections.enumerated() {
            if let grant = try await connection.acquire(key: key, timeoutS: 0) {
                try await connection.release(key: key, token: grant.token)   // it was free there
            } else {
                heldOn.append(index)
            }
        }
        print("\(key): held on server(s) \(heldOn.map(String.init).joined(separator: ", "))")
    }
    connections.forEach { $0.close() }

    for lock in locks { try await lock.release() }
    print("released all")
    print("sharding: done")
} catch let error as LockError {
    print("sharding failed: \(error)")
    exit(1)
}
