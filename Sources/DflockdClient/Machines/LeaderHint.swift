/// The redirect rule for a dflockd cluster: where a follower's `error_not_leader <host:port>`
/// may send a lock next. Pure.
///
/// A hint is followed only to one of the servers the lock was configured with, matched on host
/// and port as written (host names without regard to case, IPv6 literals with or without
/// brackets): a stale or hostile hint naming any other host is never dialled, and neither is a
/// hint that does not parse. The Go client's cluster wrapper has the same rule. No name is
/// resolved to compare it: list the members as the followers name them (their
/// `--advertise-addr`).
enum LeaderHint {
    /// Redirects one call follows before it fails with ``LockError/notLeader(leader:)``: enough
    /// for a follower, then a leader that lost its place during an election, then the new one.
    static let redirectBudget = 3

    /// The configured server that `hint` names, or `nil` when it names none of them, names no
    /// one, or is not `host:port` (`[v6]:port` for an IPv6 literal) with a port in 1...65535.
    static func configuredServer(named hint: String?, among servers: [Endpoint]) -> Endpoint? {
        guard let hint, let named = parse(hint) else { return nil }
        return servers.first { sameHost($0.host, named.host) && $0.port == named.port }
    }

    /// `host:port` or `[v6]:port` as a host and a port; nil when it is neither.
    static func parse(_ hint: String) -> Endpoint? {
        let host: Substring
        let port: Substring
        if hint.hasPrefix("[") {
            guard let close = hint.firstIndex(of: "]"), hint[hint.index(after: close)...].hasPrefix(":") else { return nil }
            host = hint[hint.index(after: hint.startIndex)..<close]
            port = hint[hint.index(close, offsetBy: 2)...]
        } else {
            // A bare IPv6 literal's colons make its port ambiguous: servers bracket it.
            let parts = hint.split(separator: ":", omittingEmptySubsequences: false)
            guard parts.count == 2 else { return nil }
            host = parts[0]
            port = parts[1]
        }
        guard !host.isEmpty, host.utf8.count <= 253,
              !host.unicodeScalars.contains(where: { $0.properties.isWhitespace || $0.value < 0x21 || $0.value == 0x7F || $0 == "/" }),
              (1...5).contains(port.utf8.count), port.utf8.allSatisfy({ (0x30...0x39).contains($0) }),
              let number = Int(port), (1...65535).contains(number) else { return nil }
        return Endpoint(host: String(host), port: number)
    }

    private static func sameHost(_ configured: String, _ named: String) -> Bool {
        func unbracketed(_ host: String) -> Substring {
            host.hasPrefix("[") && host.hasSuffix("]") ? host.dropFirst().dropLast() : Substring(host)
        }
        return unbracketed(configured).lowercased() == unbracketed(named).lowercased()
    }
}
