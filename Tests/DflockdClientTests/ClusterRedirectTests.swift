// Cluster mode (the newest dflockd; beta on the server): a follower answers mutating commands
// with `error_not_leader [host:port]`, and locks and semaphores follow the redirect to a
// configured member. The followers here are scripted peers written from the server's cluster
// documentation (DocumentedReplies/doc-cluster.txt); the leaders they name are real servers
// where what the test needs is a real grant.
import Foundation
import Testing
@testable import DflockdClient

@Suite("LeaderHint: which redirects are followed")
struct LeaderHintTests {
    let servers = [Endpoint(host: "10.0.0.1", port: 6388), Endpoint(host: "Node-2.Example", port: 6389),
                   Endpoint(host: "::1", port: 6390), Endpoint(host: "[fe80::1]", port: 6391)]

    @Test("a hint naming a configured server, as written, is followed to that server")
    func configured() {
        #expect(LeaderHint.configuredServer(named: "10.0.0.1:6388", among: servers) == servers[0])
        #expect(LeaderHint.configuredServer(named: "node-2.example:6389", among: servers) == servers[1], "host names ignore case")
        #expect(LeaderHint.configuredServer(named: "[::1]:6390", among: servers) == servers[2])
        #expect(LeaderHint.configuredServer(named: "[FE80::1]:6391", among: servers) == servers[3])
    }

    @Test("a hint naming any other host or port is never followed")
    func notConfigured() {
        for hint in ["10.0.0.1:6389", "10.0.0.9:6388", "evil.example:6388", "node-2.example.evil:6389",
                     "localhost:6388", "10.0.0.1.:6388", "[::2]:6390"] {
            #expect(LeaderHint.configuredServer(named: hint, among: servers) == nil, "\(hint)")
        }
    }

    @Test("a hint that does not parse, or names no one, is never followed")
    func unparsable() {
        for hint: String? in [nil, "", "10.0.0.1", "10.0.0.1:", ":6388", "10.0.0.1:0", "10.0.0.1:65536", "10.0.0.1:+6388",
                              "10.0.0.1:6388:1", "::1:6390", "[::1]6390", "[::1]:", "10.0.0.1 :6388", "10.0.0.1:63 88",
                              "10.0.0.1:6388\n", "a/b:6388", "10.0.0.1:٦٣٨٨", "10.0.0.1:006388"] {
            #expect(LeaderHint.configuredServer(named: hint, among: servers) == nil, "\(String(describing: hint))")
        }
        #expect(LeaderHint.parse("h:1") == Endpoint(host: "h", port: 1))
        #expect(LeaderHint.parse("[::1]:65535") == Endpoint(host: "::1", port: 65535))
    }
}
