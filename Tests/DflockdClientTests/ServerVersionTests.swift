// What each server version speaks, tested against the exchanges written from that version's
// documented replies (Tests/DflockdClientTests/DocumentedReplies: no 1.14+, 2.x or cluster
// server can be installed on these machines; each file names its sources). What the Go 1.10
// and Python 0.5.0 servers speak is tested against them, or against recorded transcripts, in
// the other suites. Each test names the server version it stands for.
import Foundation
import Testing
@testable import DflockdClient

private func decode(_ line: String, _ request: Request) -> Result<Reply, LockError> {
    Array(line.utf8).withUnsafeBytes { ReplyDecoder.decode($0, for: request) }
}

private let sampleToken = "0001a3f217b3c4d87f3c1f2b3e9a8d6e"

@Suite("Server versions")
struct ServerVersionTests {

    // MARK: - Cluster mode: the codec

    @Suite("cluster mode (newest server, beta): error_not_leader and stats.cluster decoded")
    struct ClusterCodec {
        static let everyCommand: [Request] = [
            try! .acquire(key: "job", timeoutS: 5), try! .release(key: "job", token: sampleToken),
            try! .renew(key: "job", token: sampleToken), try! .enqueue(key: "job"), try! .wait(key: "job", timeoutS: 5),
            try! .semaphoreAcquire(key: "pool", limit: 2, timeoutS: 5), try! .semaphoreRelease(key: "pool", token: sampleToken),
            try! .semaphoreRenew(key: "pool", token: sampleToken), try! .semaphoreEnqueue(key: "pool", limit: 2),
            try! .semaphoreWait(key: "pool", timeoutS: 5), .stats, .ping, try! .auth(secret: "s"),
        ]

        @Test("error_not_leader with an address, on every command, keeps the address as sent")
        func withAddress() {
            for request in Self.everyCommand {
                #expect(decode("error_not_leader 10.0.0.2:6389", request) == .failure(.notLeader(leader: "10.0.0.2:6389")), "\(request.command)")
                #expect(decode("error_not_leader [::1]:6388", request) == .failure(.notLeader(leader: "[::1]:6388")), "\(request.command)")
                // Whatever follows is reported as sent; judging it is the follower of redirects' job.
                #expect(decode("error_not_leader   evil.example:6388  ", request) == .failure(.notLeader(leader: "evil.example:6388")))
                #expect(decode("error_not_leader not an address", request) == .failure(.notLeader(leader: "not an address")))
            }
        }

        @Test("error_not_leader without an address: no leader known")
        func withoutAddress() {
            for request in Self.everyCommand {
                #expect(decode("error_not_leader", request) == .failure(.notLeader(leader: nil)), "\(request.command)")
                #expect(decode("error_not_leader ", request) == .failure(.notLeader(leader: nil)), "\(request.command)")
            }
            // the text path and the byte path agree (the fast path leaves these to the text path)
            for request in Self.everyCommand {
                #expect(ReplyDecoder.decode("error_not_leader h:1", for: request) == decode("error_not_leader h:1", request))
            }
        }

        /// That it leaves the connection usable is tested on a connection (ClusterConnection).
        @Test("notLeader says what to do")
        func described() {
            let named = LockError.notLeader(leader: "10.0.0.2:6389").description
            #expect(named.contains("10.0.0.2:6389") && named.contains("servers"), "\(named)")
            let nobody = LockError.notLeader(leader: nil).description
            #expect(nobody.contains("election"), "\(nobody)")
        }

        @Test("stats: the cluster object is decoded when present")
        func clusterStats() throws {
            let text = try TestSupport.documentedReplies("doc-cluster.txt")
            let lines = text.split(separator: "\n").filter { $0.hasPrefix("A < ok {") }.map { String($0.dropFirst(4)) }
            try #require(lines.count == 2)
            guard case .success(.stats(let follower)) = decode(lines[0], .stats) else {
                Issue.record("stats did not decode: \(decode(lines[0], .stats))"); return
            }
            #expect(follower.cluster == ServerStats.ClusterInfo(
                nodeId: "n2", role: "follower", term: 7, leaderId: "n1", leaderAddress: "10.0.0.1:6388",
                commitIndex: 1042, lastLogIndex: 1042, snapshotIndex: 1000, voters: ["n1", "n2", "n3"]))
            guard case .success(.stats(let candidate)) = decode(lines[1], .stats) else {
                Issue.record("stats did not decode: \(decode(lines[1], .stats))"); return
            }
            #expect(candidate.cluster?.role == "candidate")
            #expect(candidate.cluster?.leaderId == "")
            #expect(candidate.cluster?.leaderAddress == nil)
        }

        @Test("stats: no cluster object (a single server, 1.10 to 2.x) or null means nil")
        func noClusterStats() throws {
            let base = #""connections":2,"locks":[],"semaphores":[],"idle_locks":[],"idle_semaphores":[]"#
            for line in ["ok {\(base)}", "ok {\(base),\"cluster\":null}"] {
                guard case .success(.stats(let stats)) = decode(line, .stats) else {
                    Issue.record("\(line) did not decode"); continue
                }
                #expect(stats.cluster == nil)
                #expect(stats.connections == 2)
            }
            // the recorded 1.10 reply has none either
            let recorded = try #require(Transcripts.events("go-1.10-core.txt").first { !$0.isRequest && $0.client == "S" })
            guard case .success(.stats(let stats)) = recorded.bytes.withUnsafeBytes({ ReplyDecoder.decode($0, for: .stats) }) else {
                Issue.record("recorded stats did not decode"); return
            }
            #expect(stats.cluster == nil)
        }

        @Test("stats: a cluster object that is not the documented shape is a protocol violation")
        func malformedClusterStats() {
            let base = #""connections":2,"locks":[],"semaphores":[],"idle_locks":[],"idle_semaphores":[]"#
            for cluster in [#""cluster":{"node_id":"n1"}"#, #""cluster":[]"#, #""cluster":{"node_id":"n1","role":"leader","term":-1,"leader_id":"n1","commit_index":1,"last_log_index":1,"snapshot_index":0,"voters":["n1"]}"#] {
                let result = decode("ok {\(base),\(cluster)}", .stats)
                guard case .failure(.protocolViolation) = result else {
                    Issue.record("\(cluster) gave \(result)"); continue
                }
            }
        }
    }

    // MARK: - Cluster mode: the raw Connection reports, never follows

    @Suite("cluster mode (newest server, beta): a Connection reports notLeader")
    struct ClusterConnection {
        @Test("every mutating command on a follower fails with notLeader(leader:), and the connection stays open")
        func followerRedirects() async throws {
            let peer = try ScriptedPeer(documented: "doc-cluster.txt", section: "follower: every mutating command is redirected to the leader",
                                        substitutions: ["{leader}": "10.0.0.1:6388"])
            let connection = try Connection(port: peer.port)
            defer { connection.close() }
            let expected = LockError.notLeader(leader: "10.0.0.1:6388")
            #expect(await lockError { try await connection.acquire(key: "job", timeoutS: 5) } == expected)
            #expect(await lockError { try await connection.enqueue(key: "job") } == expected)
            #expect(await lockError { try await connection.wait(key: "job", timeoutS: 5) } == expected)
            #expect(await lockError { try await connection.renew(key: "job", token: sampleToken) } == expected)
            #expect(await lockError { try await connection.release(key: "job", token: sampleToken) } == expected)
            #expect(await lockError { try await connection.acquireSemaphore(key: "pool", limit: 2, timeoutS: 5) } == expected)
            #expect(await lockError { try await connection.enqueueSemaphore(key: "pool", limit: 2) } == expected)
            #expect(await lockError { try await connection.waitSemaphore(key: "pool", timeoutS: 5) } == expected)
            #expect(await lockError { try await connection.renewSemaphore(key: "pool", token: sampleToken) } == expected)
            #expect(await lockError { try await connection.releaseSemaphore(key: "pool", token: sampleToken) } == expected)
            try await connection.ping()  // the same connection: a redirect is an answer, not a failure
            try await peer.finish()
        }

        @Test("a follower that knows no leader: notLeader(leader: nil)")
        func noLeaderKnown() async throws {
            let peer = try ScriptedPeer(documented: "doc-cluster.txt", section: "follower during an election: no leader known")
            let connection = try Connection(port: peer.port)
            defer { connection.close() }
            #expect(await lockError { try await connection.acquire(key: "job", timeoutS: 5) } == .notLeader(leader: nil))
            #expect(await lockError { try await connection.acquire(key: "job", timeoutS: 5) } == .notLeader(leader: nil))
            try await peer.finish()
        }

        @Test("stats() through the public API returns the follower's cluster view")
        func statsOnFollower() async throws {
            let peer = try ScriptedPeer(documented: "doc-cluster.txt", section: "stats on a follower carries the cluster object")
            let stats = try await DflockdClient.stats(port: peer.port)
            #expect(stats.cluster?.nodeId == "n2")
            #expect(stats.cluster?.leaderAddress == "10.0.0.1:6388")
            #expect(stats.cluster?.voters.sorted() == ["n1", "n2", "n3"])
            try await peer.finish()
        }
    }

    // MARK: - 1.14 and later

    @Suite("dflockd 1.14 and later (documented replies)")
    struct From114 {
        @Test("ping answers ok, on an idle connection and between lock commands")
        func ping() async throws {
            let idle = try ScriptedPeer(documented: "doc-1.14-ping.txt", section: "ping: an idle connection kept open by pings")
            let a = try Connection(port: idle.port)
            defer { a.close() }
            try await a.ping()
            try await a.ping()
            try await idle.finish()

            let mixed = try ScriptedPeer(documented: "doc-1.14-ping.txt", section: "ping between lock commands on one connection")
            let b = try Connection(port: mixed.port)
            defer { b.close() }
            let grant = try #require(try await b.acquire(key: "job", timeoutS: 5))
            try await b.ping()
            try await b.release(key: "job", token: grant.token)
            try await mixed.finish()
        }

        @Test("a lock and a semaphore may share a key; limitMismatch then means a semaphore limit clash only")
        func separateNamespaces() async throws {
            let peer = try ScriptedPeer(documented: "doc-1.14-ping.txt", section: "a lock and a semaphore may share a key (separate namespaces from 1.14)")
            let connection = try Connection(port: peer.port)
            defer { connection.close() }
            let lock = try #require(try await connection.acquire(key: "shared", timeoutS: 0))
            let slot = try #require(try await connection.acquireSemaphore(key: "shared", limit: 2, timeoutS: 0))
            #expect(await lockError { try await connection.acquireSemaphore(key: "shared", limit: 3, timeoutS: 0) } == .limitMismatch(key: "shared"))
            try await connection.releaseSemaphore(key: "shared", token: slot.token)
            try await connection.release(key: "shared", token: lock.token)
            try await peer.finish()
        }
    }

    // MARK: - 2.1 and later

    @Suite("dflockd 2.1 and later (documented replies)")
    struct From21 {
        @Test("fencing tokens: every grant's fence is higher than the one before")
        func fences() async throws {
            let peer = try ScriptedPeer(documented: "doc-2.1-fencing.txt", section: "fenced tokens: every grant carries a higher fence")
            let connection = try Connection(port: peer.port)
            defer { connection.close() }
            let first = try #require(try await connection.acquire(key: "orders", timeoutS: 5))
            try await connection.release(key: "orders", token: first.token)
            guard case .acquired(let second) = try await connection.enqueue(key: "orders") else {
                Issue.record("enqueue did not acquire"); return
            }
            #expect(try await connection.renew(key: "orders", token: second.token) == 33)
            try await connection.release(key: "orders", token: second.token)
            let third = try #require(try await connection.acquireSemaphore(key: "pool", limit: 2, timeoutS: 5))
            try await connection.releaseSemaphore(key: "pool", token: third.token)
            try await peer.finish()

            let fences = [first, second, third].map(\.fence)
            #expect(fences == [0x0001_a3f2_17b3_c4d7, 0x0001_a3f2_17b3_c4d8, 0x0001_a3f2_17b3_c4d9])
            #expect(fences == [fenceFromToken(first.token), fenceFromToken(second.token), fenceFromToken(third.token)])
        }

        /// Before 2.1 a token is 32 random hex characters: `fenceFromToken` still reads a number
        /// from it, which orders nothing. The recorded 1.10 grants show it.
        @Test("before 2.1 (Go 1.10, recorded): fences read from random tokens do not increase")
        func randomTokensBefore21() throws {
            let grants = Transcripts.events("go-1.10-core.txt").filter { !$0.isRequest }
                .compactMap { event -> UInt64? in
                    let fields = String(decoding: event.bytes, as: UTF8.self).split(separator: " ")
                    guard fields.count == 3, fields[0] == "ok" || fields[0] == "acquired" else { return nil }
                    return fenceFromToken(String(fields[1]))
                }
            try #require(grants.count >= 5)
            #expect(grants != grants.sorted(), "1.10 tokens happen to be in order: the test cannot tell random from fenced")
        }

        @Test("draining (1.16 and later): error_draining is serverDraining, and the connection stays usable")
        func draining() async throws {
            let peer = try ScriptedPeer(documented: "doc-2.1-fencing.txt", section: "draining: a server shutting down refuses new grants (1.16 and later)")
            let connection = try Connection(port: peer.port)
            defer { connection.close() }
            #expect(await lockError { try await connection.acquire(key: "orders", timeoutS: 5) } == .serverDraining)
            #expect(await lockError { try await connection.acquire(key: "orders", timeoutS: 5) } == .serverDraining)
            try await peer.finish()
        }
    }
}
