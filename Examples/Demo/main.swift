// Takes a lock through the low-level `Connection`, renews it twice, releases it, and shows that
// a second connection sees the key free again. `make demo` starts a server and runs this.
import DflockdClient
import Glibc

func port(from arguments: [String]) -> Int {
    if let index = arguments.firstIndex(of: "--port"), index + 1 < arguments.count, let port = Int(arguments[index + 1]) {
        return port
    }
    return 6388
}

let server = port(from: CommandLine.arguments)
let connection = try Connection(host: "127.0.0.1", port: server)
guard let grant = try await connection.acquire(key: "demo-resource", timeoutS: 5, leaseTtlS: 4) else {
    print("demo-resource is held by someone else; try again later")
    exit(1)
}
print("acquired demo-resource: token \(grant.token), lease \(grant.leaseS) s")

for round in 1...2 {
    try await Task.sleep(for: .seconds(1))
    let seconds = try await connection.renew(key: "demo-resource", token: grant.token, leaseTtlS: 4)
    print("renewal \(round): lease now \(seconds) s")
}

let rival = try Connection(host: "127.0.0.1", port: server)
let attempt = try await rival.acquire(key: "demo-resource", timeoutS: 0)
print("a second connection trying while held: \(attempt == nil ? "refused, as it should be" : "granted?!")")

try await connection.release(key: "demo-resource", token: grant.token)
print("released")

if let second = try await rival.acquire(key: "demo-resource", timeoutS: 0) {
    print("the second connection now holds it: token \(second.token)")
    try await rival.release(key: "demo-resource", token: second.token)
}
connection.close()
rival.close()
