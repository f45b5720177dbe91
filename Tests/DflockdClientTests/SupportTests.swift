// Tests of the test support itself (Support/): the real server, the raw client and the
// scripted peer must be trustworthy before anything is judged with them.

import Foundation
import Testing

@Suite("Test support")
struct SupportTests {
    /// Replays the `l`/`r` requests of py-0.5.0-core.txt's first section against a real
    /// server and checks each reply against the recorded one, with the recorded tokens mapped
    /// to the live ones. (The section's `n` steps are left out: their "seconds remaining"
    /// depends on timing.)
    @Test("RealServer starts; RawClient's l/r replies match py-0.5.0-core.txt")
    func realServerAndRawClient() throws {
        let section = "lock: acquire, renew, release (default and explicit lease)"
        let steps = try ScriptStep.steps(inTranscript: try TestSupport.transcript("py-0.5.0-core.txt"),
                                         section: section, name: "py-0.5.0-core.txt")
        let server = try RealServer.start()
        let raw = try RawClient(port: server.port)
        defer { raw.close() }

        var liveToken: [String: String] = [:]  // recorded token -> token issued now
        var checked = 0
        var index = 0
        while index + 1 < steps.count {
            guard case .expect(let request) = steps[index].action, case .reply(let recordedReply) = steps[index + 1].action else {
                Issue.record("unexpected step shape at \(steps[index])")
                return
            }
            index += 2
            let lines = String(decoding: request, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false)
            guard lines[0] == "l" || lines[0] == "r" else { continue }
            let arg = liveToken[String(lines[2])] ?? String(lines[2])
            let reply = try raw.send(String(lines[0]), String(lines[1]), arg)
            let recorded = String(decoding: recordedReply.dropLast(), as: UTF8.self)  // without "\n"
            let recordedFields = recorded.split(separator: " ").map(String.init)
            let fields = reply.split(separator: " ").map(String.init)
            if recordedFields.count == 3, recordedFields[0] == "ok" {  // a grant: "ok <token> <lease>"
                #expect(fields.count == 3 && fields[0] == "ok" && fields[2] == recordedFields[2],
                        "reply to \(steps[index - 2]): \(reply), recorded: \(recorded)")
                #expect(fields.count > 1 && fields[1].count == 32 && fields[1].allSatisfy(\.isHexDigit)
                        && fields[1] == fields[1].lowercased(), "token in \(reply)")
                if fields.count > 1 { liveToken[recordedFields[1]] = fields[1] }
            } else {
                #expect(reply == recorded, "reply to \(steps[index - 2])")
            }
            checked += 1
        }
        #expect(checked == 6, "the section's l/r steps: l, r, r again, l with lease, r with a wrong token, r")
    }

    @Test("RealServer: freeze/thaw hold back replies; kill + restart serve the same port again",
          arguments: ServerKind.allCases)
    func realServerLifecycle(on kind: ServerKind) throws {
        let server = try RealServer.start(kind)
        #expect(server.kind == kind)
        let port = server.port

        let raw = try RawClient(port: port)
        server.freeze()
        try raw.sendNoReply("l", "frozen", "5")
        #expect(throws: RawClientError.self) { try raw.readLine(timeout: .milliseconds(300)) }
        server.thaw()
        #expect(try raw.readLine()?.hasPrefix("ok ") == true)

        server.kill()
        #expect(server.pid == nil)
        #expect(try raw.readLine() == nil, "the connection ends with the server")
        raw.close()

        try server.restart()
        #expect(server.port == port && server.pid != nil)
        let again = try RawClient(port: port)
        defer { again.close() }
        #expect(try again.send("l", "frozen", "0").hasPrefix("ok "), "a fresh server: the old holder is gone")
        server.stop()
        server.stop()  // idempotent
        #expect(server.pid == nil)
    }

    @Test("RealServer(.go): options in the Go spelling reach the server; Python-only kinds refuse Go options")
    func goServerOptions() throws {
        let server = try RealServer.start(.go, [.maxLocks(2), .autoReleaseOnDisconnect(true), .readTimeout(seconds: 5)])
        let raw = try RawClient(port: server.port)
        defer { raw.close() }
        #expect(try raw.send("l", "a", "0").hasPrefix("ok "))
        #expect(try raw.send("l", "b", "0").hasPrefix("ok "))
        #expect(try raw.send("l", "c", "0") == "error_max_locks", "--max-locks 2 took effect")
        #expect(try raw.send("l", "a", "0") == "timeout", "the connection stays open after error_max_locks")
        #expect(throws: RealServerError.self) { try RealServer.start(.python, [.authToken("x")]) }
        #expect(throws: RealServerError.self) { try RealServer.start(.python, [.maxWaiters(1)]) }
        #expect(try ServerKind.python.arguments(for: [.autoReleaseOnDisconnect(false)]) == ["--no-auto-release-on-disconnect"])
        #expect(try ServerKind.go.arguments(for: [.autoReleaseOnDisconnect(false)]) == ["--auto-release-on-disconnect=false"])
    }

    static let authSection = "auth: command before auth, wrong token, right token"

    @Test("ScriptedPeer replays go-1.10-auth.txt, with a reconnect after each close")
    func scriptedPeerReplaysAuth() throws {
        let peer = try ScriptedPeer(transcript: "go-1.10-auth.txt", section: Self.authSection)

        let first = try RawClient(port: peer.port)
        #expect(try first.send("l", "k", "5") == "error_auth")
        try first.expectClose()
        first.close()

        let second = try RawClient(port: peer.port)
        #expect(try second.send("auth", "_", "wrong") == "error_auth")
        try second.expectClose()
        second.close()

        let third = try RawClient(port: peer.port)
        defer { third.close() }
        #expect(try third.send("auth", "_", "s3cret") == "ok")
        #expect(try third.send("l", "k", "5") == "ok 944852e4fbb1fdb042c600c23f0c9c7f 33")
        #expect(try third.send("r", "k", "944852e4fbb1fdb042c600c23f0c9c7f") == "ok")
        try peer.finish()
    }

    @Test("ScriptedPeer reports a client that sends something else, and drops the connection")
    func scriptedPeerReportsMismatch() async throws {
        let peer = try ScriptedPeer(transcript: "go-1.10-auth.txt", section: Self.authSection)
        let raw = try RawClient(port: peer.port)
        defer { raw.close() }
        try raw.sendNoReply("auth", "_", "s3cret")  // the script expects `l k 5` first
        #expect(try raw.readLine() == nil, "the peer closes everything on a mismatch")

        let error = await #expect(throws: ScriptedPeerError.self) { try await peer.finish() }
        let message = error?.description ?? ""
        #expect(message.contains("step 1 of 12"), "\(message)")
        #expect(message.contains("line 4: A > b'l\\nk\\n5\\n'"), "\(message)")
        #expect(message.contains("expected b'l\\nk\\n5\\n'"), "\(message)")
        #expect(message.contains("received b'auth\\n_\\ns3cret\\n'"), "\(message)")
    }

    @Test("ScriptedPeer inline script: unsolicited line, raw bytes, quiet window, client close")
    func scriptedPeerInlineScript() throws {
        let peer = try ScriptedPeer(script: """
            # a grant with an extra trailing field, then a line nobody asked for
            A > b'l\\nk\\n5\\n'
            A < ok 0123456789abcdef0123456789abcdef 33 fence=7
            A < unsolicited
            A << b'half a li'
            A << b'ne\\r\\n'
            A .
            A !
            """)
        let raw = try RawClient(port: peer.port)
        #expect(try raw.send("l", "k", "5") == "ok 0123456789abcdef0123456789abcdef 33 fence=7")
        #expect(try raw.readLine() == "unsolicited")
        #expect(try raw.readLine() == "half a line")
        raw.close()
        try peer.finish()
    }

    /// The vendored copies (Tests/DflockdClientTests/Transcripts) must equal the originals in
    /// ../shared/transcripts. That folder sits beside the repo on developer machines and in
    /// CI; where it is absent (a lone clone) the comparison is skipped: nothing to compare to.
    @Test("vendored transcripts equal ../shared/transcripts (skipped where that folder is absent)",
          .enabled(if: FileManager.default.fileExists(atPath: TestSupport.sharedTranscriptsDirectory.path)))
    func transcriptsMatchShared() throws {
        let fm = FileManager.default
        let shared = try fm.contentsOfDirectory(atPath: TestSupport.sharedTranscriptsDirectory.path)
            .filter { $0.hasSuffix(".txt") }.sorted()
        let vendored = try TestSupport.transcriptNames()
        #expect(vendored == shared, "copy new or changed transcripts from ../shared/transcripts into Tests/DflockdClientTests/Transcripts")
        for name in Set(vendored).intersection(shared).sorted() {
            let ours = fm.contents(atPath: TestSupport.transcriptsDirectory.appendingPathComponent(name).path)
            let theirs = fm.contents(atPath: TestSupport.sharedTranscriptsDirectory.appendingPathComponent(name).path)
            #expect(ours != nil && ours == theirs, "\(name) differs from ../shared/transcripts/\(name): copy it again")
        }
    }
}
