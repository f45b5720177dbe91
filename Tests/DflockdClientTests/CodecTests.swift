// Tests of the pure protocol codec: request encoding, argument validation, reply decoding,
// line framing and fences. No I/O beyond reading the recorded transcripts.
import Foundation
import Testing
@testable import DflockdClient

// MARK: - Transcript access

/// The recorded exchanges in `Tests/DflockdClientTests/Transcripts` (copies of /work/shared/transcripts).
enum Transcripts {
    static let names = ["go-1.10-core.txt", "go-1.10-auth.txt", "go-1.10-caps.txt", "go-1.10-tls-auth.txt", "py-0.5.0-core.txt"]

    /// One `>` or `<` line of a transcript.
    struct Event: Sendable {
        let file: String
        let section: String
        let client: Character
        let isRequest: Bool
        let bytes: [UInt8]       // request: the decoded Python bytes literal; reply: the raw line
    }

    static func data(_ name: String) -> [UInt8] {
        let base = (name as NSString).deletingPathExtension
        if let url = Bundle.module.url(forResource: base, withExtension: "txt", subdirectory: "Transcripts")
            ?? Bundle.module.url(forResource: base, withExtension: "txt"),
           let data = try? Data(contentsOf: url) {
            return Array(data)
        }
        let here = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        let data = try! Data(contentsOf: here.appendingPathComponent("Transcripts").appendingPathComponent(name))
        return Array(data)
    }

    static func events(_ name: String) -> [Event] {
        var section = ""
        var events: [Event] = []
        for rawLine in data(name).split(separator: 0x0A, omittingEmptySubsequences: false) {
            let line = Array(rawLine)
            if line.starts(with: Array("## ".utf8)) {
                section = String(decoding: line.dropFirst(3), as: UTF8.self)
                continue
            }
            guard line.count >= 4, line[1] == 0x20, line[3] == 0x20 else { continue }
            let client = Character(Unicode.Scalar(line[0]))
            guard client.isUppercase else { continue }
            switch line[2] {
            case UInt8(ascii: ">"):
                events.append(Event(file: name, section: section, client: client, isRequest: true,
                                    bytes: pythonBytesLiteral(Array(line.dropFirst(4)))))
            case UInt8(ascii: "<"):
                events.append(Event(file: name, section: section, client: client, isRequest: false,
                                    bytes: Array(line.dropFirst(4))))
            default:
                continue
            }
        }
        return events
    }

    static let all: [Event] = names.flatMap(events)

    /// Every request written in any transcript.
    static let requests: Set<[UInt8]> = Set(all.filter(\.isRequest).map(\.bytes))

    /// Decodes `b'...'` as Python prints it.
    static func pythonBytesLiteral(_ literal: [UInt8]) -> [UInt8] {
        precondition(literal.starts(with: Array("b'".utf8)) && literal.last == UInt8(ascii: "'"), "not a bytes literal")
        let body = literal.dropFirst(2).dropLast()
        var out: [UInt8] = []
        var i = body.startIndex
        while i < body.endIndex {
            let c = body[i]
            if c != UInt8(ascii: "\\") { out.append(c); i += 1; continue }
            let e = body[i + 1]
            switch e {
            case UInt8(ascii: "n"): out.append(0x0A); i += 2
            case UInt8(ascii: "r"): out.append(0x0D); i += 2
            case UInt8(ascii: "t"): out.append(0x09); i += 2
            case UInt8(ascii: "\\"): out.append(0x5C); i += 2
            case UInt8(ascii: "'"): out.append(0x27); i += 2
            case UInt8(ascii: "x"):
                out.append(UInt8(String(decoding: body[(i + 2)..<(i + 4)], as: UTF8.self), radix: 16)!)
                i += 4
            default: preconditionFailure("unknown escape \\\(Character(Unicode.Scalar(e)))")
            }
        }
        return out
    }
}

private func bytes(_ s: String) -> [UInt8] { Array(s.utf8) }

/// Runs `body` and checks that it fails with `invalidArgument` naming `name`.
private func expectInvalid(_ name: String, _ what: String = "",
                           sourceLocation: SourceLocation = #_sourceLocation,
                           _ body: () throws(LockError) -> Void) {
    do throws(LockError) {
        try body()
        Issue.record("expected invalidArgument(name: \(name)) \(what), but it was accepted", sourceLocation: sourceLocation)
    } catch {
        guard case .invalidArgument(let actual, let reason) = error else {
            Issue.record("expected invalidArgument(name: \(name)) \(what), got \(error)", sourceLocation: sourceLocation)
            return
        }
        #expect(actual == name, "\(what)", sourceLocation: sourceLocation)
        #expect(!reason.isEmpty, sourceLocation: sourceLocation)
    }
}

private let T = "4c6af3c93c83e0aa6ca56449a1d1c83f"

@Suite("CodecTests")
struct CodecTests {

    // MARK: - Request encoding

    @Suite("Request encoding")
    struct Encoding {
        struct Case: Sendable, CustomTestStringConvertible {
            let make: @Sendable () throws(LockError) -> Request
            let wire: [UInt8]
            let recorded: Bool       // the exact bytes appear in a transcript
            var testDescription: String { String(decoding: wire, as: UTF8.self).debugDescription }
            init(_ wire: String, recorded: Bool = true, _ make: @escaping @Sendable () throws(LockError) -> Request) {
                self.wire = Array(wire.utf8); self.recorded = recorded; self.make = make
            }
        }

        static let cases: [Case] = [
            Case("l\njob\n5\n") { () throws(LockError) in try .acquire(key: "job", timeoutS: 5) },
            Case("l\njob\n5 60\n") { () throws(LockError) in try .acquire(key: "job", timeoutS: 5, leaseTtlS: 60) },
            Case("l\nhot\n0\n") { () throws(LockError) in try .acquire(key: "hot", timeoutS: 0) },
            Case("l\nshort\n5 1\n") { () throws(LockError) in try .acquire(key: "short", timeoutS: 5, leaseTtlS: 1) },
            Case("n\njob\n\(T)\n") { () throws(LockError) in try .renew(key: "job", token: T) },
            Case("n\njob\n\(T) 45\n") { () throws(LockError) in try .renew(key: "job", token: T, leaseTtlS: 45) },
            Case("r\njob\n\(T)\n") { () throws(LockError) in try .release(key: "job", token: T) },
            Case("r\njob\n00000000000000000000000000000000\n") { () throws(LockError) in
                try .release(key: "job", token: "00000000000000000000000000000000")
            },
            Case("e\ntwo\n\n") { () throws(LockError) in try .enqueue(key: "two") },
            Case("e\ntwo\n20\n") { () throws(LockError) in try .enqueue(key: "two", leaseTtlS: 20) },
            Case("w\ntwo\n1\n") { () throws(LockError) in try .wait(key: "two", timeoutS: 1) },
            Case("w\nnever-enqueued\n1\n") { () throws(LockError) in try .wait(key: "never-enqueued", timeoutS: 1) },
            Case("l\nclé-锁\n5\n") { () throws(LockError) in try .acquire(key: "clé-锁", timeoutS: 5) },
            Case("sl\npool\n5 2\n") { () throws(LockError) in try .semaphoreAcquire(key: "pool", limit: 2, timeoutS: 5) },
            Case("sl\npool\n5 2 30\n") { () throws(LockError) in try .semaphoreAcquire(key: "pool", limit: 2, timeoutS: 5, leaseTtlS: 30) },
            Case("sl\npool\n0 2\n") { () throws(LockError) in try .semaphoreAcquire(key: "pool", limit: 2, timeoutS: 0) },
            Case("sl\npool\n0 3\n") { () throws(LockError) in try .semaphoreAcquire(key: "pool", limit: 3, timeoutS: 0) },
            Case("sn\npool\n\(T)\n") { () throws(LockError) in try .semaphoreRenew(key: "pool", token: T) },
            Case("sn\npool\n\(T) 40\n") { () throws(LockError) in try .semaphoreRenew(key: "pool", token: T, leaseTtlS: 40) },
            Case("se\npool\n2\n") { () throws(LockError) in try .semaphoreEnqueue(key: "pool", limit: 2) },
            Case("se\npool\n2 30\n", recorded: false) { () throws(LockError) in try .semaphoreEnqueue(key: "pool", limit: 2, leaseTtlS: 30) },
            Case("sw\npool\n5\n") { () throws(LockError) in try .semaphoreWait(key: "pool", timeoutS: 5) },
            Case("sr\npool\n\(T)\n") { () throws(LockError) in try .semaphoreRelease(key: "pool", token: T) },
            Case("stats\n_\n\n") { () throws(LockError) in .stats },
            Case("ping\n_\n\n") { () throws(LockError) in .ping },
            Case("auth\n_\ns3cret\n") { () throws(LockError) in try .auth(secret: "s3cret") },
            Case("auth\n_\nwrong\n") { () throws(LockError) in try .auth(secret: "wrong") },
            Case("auth\n_\ns3 cret\n", recorded: false) { () throws(LockError) in try .auth(secret: "s3 cret") },
        ]

        @Test("encodes byte for byte as recorded", arguments: cases)
        func encodes(_ c: Case) throws {
            let request = try c.make()
            #expect(request.bytes == c.wire)
            var appended: [UInt8] = [0xFF]
            request.encode(into: &appended)
            #expect(appended == [0xFF] + c.wire, "encode(into:) appends")
        }

        /// The table above is tied to the recordings: a typo in an expected string (rather than in
        /// the encoder) would otherwise go unnoticed.
        @Test("expected bytes are the recorded ones", arguments: cases.filter(\.recorded))
        func recorded(_ c: Case) {
            // Tokens differ between runs: compare with every 32-hex-digit token masked.
            let found = Transcripts.requests.contains(c.wire)
                || Transcripts.requests.contains { Self.withoutTokens($0) == Self.withoutTokens(c.wire) }
            #expect(found, "\(c.testDescription) is not a request in the transcripts")
        }

        static func withoutTokens(_ bytes: [UInt8]) -> String {
            let text = String(decoding: bytes, as: UTF8.self)
            return text.replacing(/[0-9a-f]{32}/, with: "<token>")
        }

        @Test("UTF-8 key is sent as its UTF-8 bytes")
        func utf8Key() throws {
            let request = try Request.acquire(key: "clé-锁", timeoutS: 5)
            #expect(request.bytes == [0x6C, 0x0A, 0x63, 0x6C, 0xC3, 0xA9, 0x2D, 0xE9, 0x94, 0x81, 0x0A, 0x35, 0x0A])
            let release = try Request.release(key: "clé-锁", token: "bbf0883dc69aeb568ba92edf5bc52462")
            #expect(Transcripts.requests.contains(release.bytes))
        }

        @Test("blocking commands carry their timeout")
        func blockingSeconds() throws {
            #expect(try Request.acquire(key: "k", timeoutS: 7).blockingSeconds == 7)
            #expect(try Request.wait(key: "k", timeoutS: 3).blockingSeconds == 3)
            #expect(try Request.semaphoreAcquire(key: "k", limit: 2, timeoutS: 4).blockingSeconds == 4)
            #expect(try Request.semaphoreWait(key: "k", timeoutS: 6).blockingSeconds == 6)
            #expect(try Request.release(key: "k", token: T).blockingSeconds == nil)
            #expect(try Request.enqueue(key: "k").blockingSeconds == nil)
            #expect(Request.stats.blockingSeconds == nil)
        }
    }

    // MARK: - Validation

    @Suite("Validation")
    struct ValidationRules {
        static let badWords: [(String, String)] = [
            ("", "empty"),
            ("a b", "space"),
            ("a\tb", "tab"),
            ("a\rb", "CR"),
            ("a\nb", "LF"),
            ("a\r\nb", "CRLF"),
            ("a\0b", "NUL"),
            ("a\u{0B}b", "vertical tab"),
            ("a\u{0C}b", "form feed"),
            ("a\u{85}b", "NEL"),
            ("a\u{A0}b", "no-break space"),
            ("a\u{2003}b", "em space"),
            ("a\u{2028}b", "line separator"),
            ("a\u{3000}b", "ideographic space"),
            ("é b", "space after a non-ASCII character"),
            ("trailing ", "trailing space"),
            ("\nl\nx\n0", "injected command"),
            // dflockd 0.5.0 counts the `\n` against its 256-byte line limit: 255 bytes is the most
            (String(repeating: "k", count: 256), "256 ASCII bytes"),
            (String(repeating: "é", count: 128), "256 UTF-8 bytes in 128 characters"),
            (String(repeating: "锁", count: 85) + "k", "256 UTF-8 bytes in 86 characters"),
            (String(repeating: "k", count: 1000), "1000 bytes"),
        ]

        static let keyTakers: [(String, @Sendable (String) throws(LockError) -> Request)] = [
            ("l", { (k: String) throws(LockError) in try .acquire(key: k, timeoutS: 1) }),
            ("r", { (k: String) throws(LockError) in try .release(key: k, token: T) }),
            ("n", { (k: String) throws(LockError) in try .renew(key: k, token: T) }),
            ("e", { (k: String) throws(LockError) in try .enqueue(key: k) }),
            ("w", { (k: String) throws(LockError) in try .wait(key: k, timeoutS: 1) }),
            ("sl", { (k: String) throws(LockError) in try .semaphoreAcquire(key: k, limit: 2, timeoutS: 1) }),
            ("sr", { (k: String) throws(LockError) in try .semaphoreRelease(key: k, token: T) }),
            ("sn", { (k: String) throws(LockError) in try .semaphoreRenew(key: k, token: T) }),
            ("se", { (k: String) throws(LockError) in try .semaphoreEnqueue(key: k, limit: 2) }),
            ("sw", { (k: String) throws(LockError) in try .semaphoreWait(key: k, timeoutS: 1) }),
        ]

        static let tokenTakers: [(String, @Sendable (String) throws(LockError) -> Request)] = [
            ("r", { (t: String) throws(LockError) in try .release(key: "k", token: t) }),
            ("n", { (t: String) throws(LockError) in try .renew(key: "k", token: t) }),
            ("n+ttl", { (t: String) throws(LockError) in try .renew(key: "k", token: t, leaseTtlS: 5) }),
            ("sr", { (t: String) throws(LockError) in try .semaphoreRelease(key: "k", token: t) }),
            ("sn", { (t: String) throws(LockError) in try .semaphoreRenew(key: "k", token: t) }),
        ]

        @Test("bad keys are refused, naming the key", arguments: keyTakers.map(\.0))
        func badKeys(_ command: String) {
            let make = Self.keyTakers.first { $0.0 == command }!.1
            for (key, what) in Self.badWords {
                expectInvalid("key", "\(command) with \(what) key") { () throws(LockError) in _ = try make(key) }
            }
        }

        @Test("bad tokens are refused, naming the token", arguments: tokenTakers.map(\.0))
        func badTokens(_ command: String) {
            let make = Self.tokenTakers.first { $0.0 == command }!.1
            for (token, what) in Self.badWords {
                expectInvalid("token", "\(command) with \(what) token") { () throws(LockError) in _ = try make(token) }
            }
        }

        @Test("keys and tokens up to 255 UTF-8 bytes are accepted and sent unchanged")
        func longestWords() throws {
            #expect(Validation.maximumLineBytes == 255)
            let words = [
                String(repeating: "k", count: 255),
                String(repeating: "é", count: 127) + "k",        // 255 bytes, 128 characters
                String(repeating: "锁", count: 85),               // 255 bytes
                "clé-锁", "a", "orders/42", "x\u{200B}y",         // zero-width space is not whitespace
            ]
            for word in words {
                for (command, make) in Self.keyTakers {
                    let request = try make(word)
                    #expect(request.key == word, "\(command)")
                }
                for (_, make) in Self.tokenTakers {
                    let request = try make(word)
                    #expect(request.argument.hasPrefix(word))
                }
            }
        }

        @Test("auth secret rules")
        func secrets() throws {
            expectInvalid("auth", "empty") { () throws(LockError) in _ = try Request.auth(secret: "") }
            expectInvalid("auth", "CR") { () throws(LockError) in _ = try Request.auth(secret: "hunter2\r") }
            expectInvalid("auth", "LF") { () throws(LockError) in _ = try Request.auth(secret: "hun\nter2") }
            expectInvalid("auth", "NUL") { () throws(LockError) in _ = try Request.auth(secret: "hunter2\0") }
            expectInvalid("auth", "64 KiB + 1") { () throws(LockError) in
                _ = try Request.auth(secret: String(repeating: "s", count: 64 * 1024 + 1))
            }
            expectInvalid("auth", "64 KiB + 1 in UTF-8") { () throws(LockError) in
                _ = try Request.auth(secret: String(repeating: "é", count: 32 * 1024) + "s")
            }
            let longest = String(repeating: "s", count: 64 * 1024)
            #expect(try Request.auth(secret: longest).argument == longest)
            #expect(try Request.auth(secret: "s3 cret\twith spaces").argument == "s3 cret\twith spaces")
            #expect(try Request.auth(secret: "mot de passe é").bytes == bytes("auth\n_\nmot de passe é\n"))
        }

        @Test("a rejected secret never appears in the error")
        func secretNotEchoed() {
            let secrets = ["hunter2-TOPSECRET\n", "hunter2-TOPSECRET\r", "hunter2-TOPSECRET\0",
                           "hunter2-TOPSECRET" + String(repeating: "x", count: 64 * 1024)]
            for secret in secrets {
                var errors: [LockError] = []
                do { _ = try Request.auth(secret: secret); Issue.record("secret accepted by Request.auth") } catch { errors.append(error) }
                do { _ = try Connection(port: 1, auth: secret); Issue.record("secret accepted by Connection") } catch { errors.append(error) }
                #expect(errors.count == 2)
                for error in errors {
                    guard case .invalidArgument(let name, let reason) = error else {
                        Issue.record("unexpected \(error)"); continue
                    }
                    #expect(name == "auth")
                    for text in [reason, error.description, String(describing: error), String(reflecting: error), "\(error)"] {
                        #expect(!text.contains("TOPSECRET"), "secret leaked into \(text.prefix(120).debugDescription)")
                    }
                }
            }
        }

        @Test("a lock's renewals, releases and acquires, built from a validated key and token, are the checked factories' requests")
        func validatedFactories() throws {
            let token = "0123456789abcdef0123456789abcdef"
            for lease in [nil, 30] as [Int?] {
                #expect(Request.renew(validatedKey: "k", validatedToken: token, leaseTtlS: lease, semaphore: false)
                        == (try .renew(key: "k", token: token, leaseTtlS: lease)))
                #expect(Request.renew(validatedKey: "k", validatedToken: token, leaseTtlS: lease, semaphore: true)
                        == (try .semaphoreRenew(key: "k", token: token, leaseTtlS: lease)))
                for timeout in [0, 7] {
                    let acquire = try Request.acquire(validatedKey: "k", timeoutS: timeout, leaseTtlS: lease)
                    #expect(acquire == (try .acquire(key: "k", timeoutS: timeout, leaseTtlS: lease)))
                    #expect(acquire.bytes == Array("l\nk\n\(timeout)\(lease.map { " \($0)" } ?? "")\n".utf8))
                    #expect(try Request.semaphoreAcquire(validatedKey: "k", limit: 3, timeoutS: timeout, leaseTtlS: lease)
                            == (try .semaphoreAcquire(key: "k", limit: 3, timeoutS: timeout, leaseTtlS: lease)))
                }
            }
            // The one argument they still check: a timeout that cannot be sent.
            expectInvalid("timeoutS", "l") { () throws(LockError) in _ = try Request.acquire(validatedKey: "k", timeoutS: -1, leaseTtlS: nil) }
            expectInvalid("timeoutS", "sl") { () throws(LockError) in
                _ = try Request.semaphoreAcquire(validatedKey: "k", limit: 1, timeoutS: -1, leaseTtlS: nil)
            }
            #expect(Request.release(validatedKey: "k", validatedToken: token, semaphore: false) == (try .release(key: "k", token: token)))
            #expect(Request.release(validatedKey: "k", validatedToken: token, semaphore: true) == (try .semaphoreRelease(key: "k", token: token)))
        }

        @Test("negative timeouts are refused; zero means try once")
        func timeouts() throws {
            for t in [-1, -100, Int.min] {
                expectInvalid("timeoutS", "l") { () throws(LockError) in _ = try Request.acquire(key: "k", timeoutS: t) }
                expectInvalid("timeoutS", "w") { () throws(LockError) in _ = try Request.wait(key: "k", timeoutS: t) }
                expectInvalid("timeoutS", "sl") { () throws(LockError) in _ = try Request.semaphoreAcquire(key: "k", limit: 1, timeoutS: t) }
                expectInvalid("timeoutS", "sw") { () throws(LockError) in _ = try Request.semaphoreWait(key: "k", timeoutS: t) }
            }
            #expect(try Request.acquire(key: "k", timeoutS: 0).argument == "0")
            #expect(try Request.wait(key: "k", timeoutS: 0).argument == "0")
        }

        /// Numbers are written into the buffer digit by digit, not formatted as strings first:
        /// the bytes must still be exactly the decimal text.
        @Test("numbers on the wire are their decimal text, at every magnitude")
        func numbersAreDecimal() throws {
            for n in [0, 1, 9, 10, 11, 99, 100, 101, 999, 1_000, 86_400, 1_000_000_007, Int(Int32.max), Int.max] {
                let lease = max(1, n)
                #expect(try Request.acquire(key: "k", timeoutS: n, leaseTtlS: lease).bytes == Array("l\nk\n\(n) \(lease)\n".utf8))
                #expect(try Request.semaphoreAcquire(key: "k", limit: lease, timeoutS: n, leaseTtlS: lease).bytes
                        == Array("sl\nk\n\(n) \(lease) \(lease)\n".utf8))
                #expect(try Request.renew(key: "k", token: "abc", leaseTtlS: lease).bytes == Array("n\nk\nabc \(lease)\n".utf8))
                #expect(try Request.wait(key: "k", timeoutS: n).argument == String(n))
            }
            #expect(try Request.enqueue(key: "k").bytes == Array("e\nk\n\n".utf8))
            #expect(try Request.renew(key: "k", token: "abc").bytes == Array("n\nk\nabc\n".utf8))
        }

        @Test("leases under one second are refused")
        func leases() throws {
            for ttl in [0, -1, Int.min] {
                expectInvalid("leaseTtlS", "l") { () throws(LockError) in _ = try Request.acquire(key: "k", timeoutS: 1, leaseTtlS: ttl) }
                expectInvalid("leaseTtlS", "n") { () throws(LockError) in _ = try Request.renew(key: "k", token: T, leaseTtlS: ttl) }
                expectInvalid("leaseTtlS", "e") { () throws(LockError) in _ = try Request.enqueue(key: "k", leaseTtlS: ttl) }
                expectInvalid("leaseTtlS", "sl") { () throws(LockError) in _ = try Request.semaphoreAcquire(key: "k", limit: 1, timeoutS: 1, leaseTtlS: ttl) }
                expectInvalid("leaseTtlS", "sn") { () throws(LockError) in _ = try Request.semaphoreRenew(key: "k", token: T, leaseTtlS: ttl) }
                expectInvalid("leaseTtlS", "se") { () throws(LockError) in _ = try Request.semaphoreEnqueue(key: "k", limit: 1, leaseTtlS: ttl) }
            }
            #expect(try Request.acquire(key: "k", timeoutS: 1, leaseTtlS: 1).argument == "1 1")
        }

        @Test("semaphore limits under one are refused")
        func limits() throws {
            for limit in [0, -1, Int.min] {
                expectInvalid("limit", "sl") { () throws(LockError) in _ = try Request.semaphoreAcquire(key: "k", limit: limit, timeoutS: 1) }
                expectInvalid("limit", "se") { () throws(LockError) in _ = try Request.semaphoreEnqueue(key: "k", limit: limit) }
            }
            #expect(try Request.semaphoreAcquire(key: "k", limit: 1, timeoutS: 1).argument == "1 1")
        }

        /// Every malformed request recorded in the transcripts is one the client refuses to build.
        @Test("the recorded bad-input requests cannot be built")
        func recordedBadInput() {
            let bad = Transcripts.all.filter { $0.isRequest && $0.section.hasPrefix("bad input") }
            #expect(bad.count > 10)
            for event in bad {
                // The UTF-8 key is fine, and so is the release that follows the CRLF request.
                let expectedBuildable = event.section.contains("UTF-8 key")
                    || (event.section.contains("CRLF") && !event.bytes.contains(0x0D))
                let built = TranscriptRequest.build(event.bytes)
                #expect((built != nil) == expectedBuildable,
                        "\(event.file) / \(event.section): \(String(decoding: event.bytes, as: UTF8.self).debugDescription)")
            }
        }
    }

    // MARK: - Reply decoding

    @Suite("Reply decoding")
    struct Decoding {
        static func decode(_ line: String, _ request: Request) -> Result<Reply, LockError> {
            Array(line.utf8).withUnsafeBytes { ReplyDecoder.decode($0, for: request) }
        }

        static func decodeBytes(_ line: [UInt8], _ request: Request) -> Result<Reply, LockError> {
            line.withUnsafeBytes { ReplyDecoder.decode($0, for: request) }
        }

        static func isProtocolViolation(_ result: Result<Reply, LockError>) -> Bool {
            if case .failure(.protocolViolation) = result { return true }
            return false
        }

        @Test("success forms")
        func successes() throws {
            let tok = "1a5156bd66d84875b6acf80090932e4b"
            let grant = Grant(token: tok, leaseS: 33)
            #expect(Self.decode("ok \(tok) 33", try .acquire(key: "job", timeoutS: 5)) == .success(.granted(grant)))
            #expect(Self.decode("ok \(tok) 60", try .acquire(key: "job", timeoutS: 5, leaseTtlS: 60)) == .success(.granted(Grant(token: tok, leaseS: 60))))
            #expect(Self.decode("ok \(tok) 20", try .wait(key: "two", timeoutS: 5)) == .success(.granted(Grant(token: tok, leaseS: 20))))
            #expect(Self.decode("ok \(tok) 30", try .semaphoreAcquire(key: "p", limit: 2, timeoutS: 5)) == .success(.granted(Grant(token: tok, leaseS: 30))))
            #expect(Self.decode("ok \(tok) 33", try .semaphoreWait(key: "p", timeoutS: 5)) == .success(.granted(grant)))
            #expect(Self.decode("acquired \(tok) 33", try .enqueue(key: "two")) == .success(.granted(grant)))
            #expect(Self.decode("acquired \(tok) 33", try .semaphoreEnqueue(key: "p", limit: 2)) == .success(.granted(grant)))
            #expect(Self.decode("queued", try .enqueue(key: "two")) == .success(.queued))
            #expect(Self.decode("queued", try .semaphoreEnqueue(key: "p", limit: 2)) == .success(.queued))
            #expect(Self.decode("ok 32", try .renew(key: "job", token: tok)) == .success(.renewed(remainingS: 32)))
            #expect(Self.decode("ok 44", try .renew(key: "job", token: tok, leaseTtlS: 45)) == .success(.renewed(remainingS: 44)))
            #expect(Self.decode("ok 40", try .semaphoreRenew(key: "p", token: tok)) == .success(.renewed(remainingS: 40)))
            #expect(Self.decode("ok", try .release(key: "job", token: tok)) == .success(.ok))
            #expect(Self.decode("ok", try .semaphoreRelease(key: "p", token: tok)) == .success(.ok))
            #expect(Self.decode("ok", try .auth(secret: "s3cret")) == .success(.ok))
            #expect(Self.decode("ok", .ping) == .success(.ok))
            for request in [try Request.acquire(key: "k", timeoutS: 0), try .wait(key: "k", timeoutS: 1),
                            try .semaphoreAcquire(key: "k", limit: 1, timeoutS: 0), try .semaphoreWait(key: "k", timeoutS: 1)] {
                #expect(Self.decode("timeout", request) == .success(.timeout), "\(request.command)")
            }
        }

        @Test("extra trailing fields are ignored")
        func trailingFields() throws {
            let tok = "0000000000000007a1b2c3d4e5f60718"
            #expect(Self.decode("ok \(tok) 33 7 more", try .acquire(key: "k", timeoutS: 5)) == .success(.granted(Grant(token: tok, leaseS: 33))))
            #expect(Self.decode("acquired \(tok) 33 7", try .enqueue(key: "k")) == .success(.granted(Grant(token: tok, leaseS: 33))))
            #expect(Self.decode("ok \(tok) 33 7", try .wait(key: "k", timeoutS: 1)) == .success(.granted(Grant(token: tok, leaseS: 33))))
            #expect(Self.decode("ok 33 7", try .renew(key: "k", token: tok)) == .success(.renewed(remainingS: 33)))
            #expect(Self.decode("ok 7", try .release(key: "k", token: tok)) == .success(.ok))
            #expect(Self.decode("queued 3", try .enqueue(key: "k")) == .success(.queued))
            #expect(Self.decode("timeout 1", try .acquire(key: "k", timeoutS: 1)) == .success(.timeout))
            #expect(Self.decode("ok \(tok) 33 7", try .acquire(key: "k", timeoutS: 5)).map { reply -> UInt64? in
                if case .granted(let g) = reply { return g.fence }
                return nil
            } == .success(7))
        }

        @Test("error statuses map to their own cases")
        func errorStatuses() throws {
            let l = try Request.acquire(key: "hot", timeoutS: 5)
            #expect(Self.decode("error_auth", l) == .failure(.authFailed))
            #expect(Self.decode("error_auth", try .auth(secret: "wrong")) == .failure(.authFailed))
            #expect(Self.decode("error_max_locks", l) == .failure(.maxLocks(key: "hot")))
            #expect(Self.decode("error_max_waiters", l) == .failure(.maxWaiters(key: "hot")))
            #expect(Self.decode("error_max_waiters", try .enqueue(key: "one")) == .failure(.maxWaiters(key: "one")))
            #expect(Self.decode("error_limit_mismatch", try .semaphoreAcquire(key: "pool", limit: 3, timeoutS: 0)) == .failure(.limitMismatch(key: "pool")))
            #expect(Self.decode("error_limit_mismatch", try .acquire(key: "pool", timeoutS: 0)) == .failure(.limitMismatch(key: "pool")))
            #expect(Self.decode("error_not_enqueued", try .wait(key: "never", timeoutS: 1)) == .failure(.notEnqueued(key: "never")))
            #expect(Self.decode("error_already_enqueued", try .enqueue(key: "two")) == .failure(.alreadyEnqueued(key: "two")))
            #expect(Self.decode("error_lease_expired", try .wait(key: "two", timeoutS: 1)) == .failure(.leaseExpired(key: "two")))
            #expect(Self.decode("error_lease_expired", l) == .failure(.leaseExpired(key: "hot")))
            #expect(Self.decode("error_draining", l) == .failure(.serverDraining))
            #expect(Self.decode("error_something_new", l) == .failure(.serverError(command: "l", key: "hot")))
        }

        @Test("plain `error` (0.5.0) maps per command")
        func plainError() throws {
            let expectations: [(Request, LockError)] = [
                (try .release(key: "job", token: T), .notHeld(key: "job")),
                (try .renew(key: "short", token: T), .notHeld(key: "short")),
                (try .renew(key: "short", token: T, leaseTtlS: 5), .notHeld(key: "short")),
                (try .semaphoreRelease(key: "pool", token: T), .notHeld(key: "pool")),
                (try .semaphoreRenew(key: "pool", token: T), .notHeld(key: "pool")),
                (try .wait(key: "never-enqueued", timeoutS: 1), .notEnqueued(key: "never-enqueued")),
                (try .semaphoreWait(key: "pool", timeoutS: 1), .notEnqueued(key: "pool")),
                (try .enqueue(key: "two"), .alreadyEnqueued(key: "two")),
                (try .semaphoreEnqueue(key: "pool", limit: 2), .alreadyEnqueued(key: "pool")),
                (try .acquire(key: "k", timeoutS: 5), .serverError(command: "l", key: "k")),
                (try .semaphoreAcquire(key: "pool", limit: 2, timeoutS: 5), .serverError(command: "sl", key: "pool")),
                (.ping, .serverError(command: "ping", key: "_")),
                (.stats, .serverError(command: "stats", key: "_")),
                (try .auth(secret: "x"), .serverError(command: "auth", key: "_")),
            ]
            for (request, error) in expectations {
                #expect(Self.decode("error", request) == .failure(error), "\(request.command)")
            }
        }

        @Test("a server's refusal leaves the connection usable; an unreadable reply or refused secret does not")
        func recoverable() {
            for e in [LockError.notHeld(key: "k"), .notEnqueued(key: "k"), .alreadyEnqueued(key: "k"), .maxLocks(key: "k"),
                      .maxWaiters(key: "k"), .limitMismatch(key: "k"), .leaseExpired(key: "k"), .serverDraining,
                      .serverError(command: "l", key: "k")] {
                #expect(!ConnectionCore<Int>.endsConnection(e), "\(e)")
            }
            for e in [LockError.authFailed, .protocolViolation("x")] {
                #expect(ConnectionCore<Int>.endsConnection(e), "\(e)")
            }
        }

        @Test("malformed replies are protocol violations")
        func malformed() throws {
            let l = try Request.acquire(key: "k", timeoutS: 5)
            let n = try Request.renew(key: "k", token: T)
            let e = try Request.enqueue(key: "k")
            let r = try Request.release(key: "k", token: T)
            let cases: [(String, Request)] = [
                ("ok", l), ("ok \(T)", l), ("ok \(T) abc", l), ("ok \(T) -1", l), ("ok \(T) 3.5", l),
                ("acquired \(T) 33", l), ("queued", l), ("", l), ("   ", l), ("OK \(T) 33", l), ("wat", l),
                ("ok", n), ("ok abc", n), ("ok -3", n), ("timeout", n),
                ("acquired", e), ("acquired \(T)", e), ("acquired \(T) x", e), ("ok \(T) 33", e), ("timeout", e),
                ("timeout", r), ("queued", r), ("granted", r),
                ("ok", try .wait(key: "k", timeoutS: 1)), ("queued", try .wait(key: "k", timeoutS: 1)),
                ("ok", .stats), ("ok not-json", .stats), ("ok {\"connections\":3", .stats), ("ok []", .stats),
                ("ok {\"connections\":\"three\",\"locks\":[],\"semaphores\":[],\"idle_locks\":[],\"idle_semaphores\":[]}", .stats),
                ("ok {}", .stats), ("stats", .stats), ("queued", .ping),
            ]
            for (line, request) in cases {
                let result = Self.decode(line, request)
                #expect(Self.isProtocolViolation(result), "\(line.debugDescription) to \(request.command.rawValue) gave \(result)")
            }
        }

        /// Found by the fuzzer: `ok \0<token> 33` was a grant whose token this client could
        /// never send back in a renewal or release.
        @Test("a grant whose token could not be sent back is a protocol violation")
        func unsendableTokens() throws {
            let requests = [try Request.acquire(key: "k", timeoutS: 5), try .wait(key: "k", timeoutS: 1), try .enqueue(key: "k"),
                            try .semaphoreAcquire(key: "k", limit: 2, timeoutS: 0), try .semaphoreWait(key: "k", timeoutS: 1),
                            try .semaphoreEnqueue(key: "k", limit: 2)]
            let status = ["l": "ok", "w": "ok", "e": "acquired", "sl": "ok", "sw": "ok", "se": "acquired"]
            for request in requests {
                let ok = status[request.command.rawValue]!
                for token in ["\0\(T)", "a\tb", "a\u{0B}b", "a\u{A0}b", "a\u{2028}b", String(repeating: "f", count: 256)] {
                    let result = Self.decode("\(ok) \(token) 33", request)
                    guard case .failure(.protocolViolation(let detail)) = result else {
                        Issue.record("\(token.debugDescription) to \(request.command.rawValue) gave \(result)")
                        continue
                    }
                    #expect(detail.contains("token cannot be sent back"), "\(detail)")
                }
                // The longest token the client can send back is fine.
                let longest = String(repeating: "f", count: 255)
                #expect(Self.decode("\(ok) \(longest) 33", request) == .success(.granted(Grant(token: longest, leaseS: 33))))
            }
        }

        @Test("invalid UTF-8 is a protocol violation")
        func invalidUTF8() throws {
            let l = try Request.acquire(key: "k", timeoutS: 5)
            for line: [UInt8] in [[0x6F, 0x6B, 0x20, 0xFF, 0x20, 0x33, 0x33], Array("ok ".utf8) + [0xC3] + Array(" 33".utf8),
                                  [0xE9, 0x94], Array("ok \(T) 33 ".utf8) + [0xC0, 0x80]] {
                #expect(Self.isProtocolViolation(Self.decodeBytes(line, l)), "\(line)")
            }
            // but valid multi-byte UTF-8 in a reply is fine
            #expect(Self.decodeBytes(Array("ok tøken 33".utf8), l) == .success(.granted(Grant(token: "tøken", leaseS: 33))))
        }

        @Test("the recorded stats reply decodes with the right values")
        func recordedStats() throws {
            let event = try #require(Transcripts.events("go-1.10-core.txt").first { !$0.isRequest && $0.client == "S" })
            #expect(event.bytes.starts(with: Array("ok {\"connections\":3".utf8)))
            let result = Self.decodeBytes(event.bytes, .stats)
            guard case .success(.stats(let stats)) = result else {
                Issue.record("stats did not decode: \(result)"); return
            }
            #expect(stats.connections == 3)
            #expect(stats.locks == [ServerStats.LockInfo(key: "s1", ownerConnId: 20, leaseExpiresInS: 32.799063312, waiters: 1)])
            #expect(stats.semaphores.isEmpty)
            #expect(stats.idleLocks.map(\.key) == ["drop", "hot", "short", "job", "clé-锁", "crlf", "two"])
            #expect(stats.idleLocks[0].idleS == 10.070362386)
            #expect(stats.idleLocks.first { $0.key == "clé-锁" }?.idleS == 0.403538947)
            #expect(stats.idleSemaphores == [ServerStats.IdleInfo(key: "pool", idleS: 0.201914348)])

            // and the same through the line framer, cut in two in the middle of `é`
            let wire = event.bytes + [0x0D, 0x0A]
            let cut = try #require(wire.firstIndex(of: 0xC3)) + 1
            var framer = LineFramer()
            var decoded: [Result<Reply, LockError>] = []
            for part in [wire[..<cut], wire[cut...]] {
                try Array(part).withUnsafeBytes { buffer in
                    try framer.feed(buffer) { line in decoded.append(ReplyDecoder.decode(line, for: .stats)); return true }
                }
            }
            #expect(decoded == [result])
        }

        @Test("stats with semaphores")
        func statsWithSemaphores() throws {
            let line = #"ok {"connections":2,"locks":[],"semaphores":[{"key":"pool","limit":2,"holders":2,"waiters":1}],"idle_locks":[],"idle_semaphores":[],"future_field":true}"#
            let result = Self.decode(line, .stats)
            #expect(result == .success(.stats(ServerStats(connections: 2, locks: [],
                semaphores: [.init(key: "pool", limit: 2, holders: 2, waiters: 1)], idleLocks: [], idleSemaphores: []))))
        }

        /// Every reply recorded in every transcript, decoded as the answer to the request it
        /// answered (replies on one client come back in request order).
        @Test("every recorded reply decodes to what it means", arguments: Transcripts.names)
        func recordedReplies(_ file: String) throws {
            var pending: [Character: [[UInt8]]] = [:]
            var checked = 0
            for event in Transcripts.events(file) {
                if event.isRequest {
                    pending[event.client, default: []].append(event.bytes)
                    continue
                }
                let requestBytes = try #require(pending[event.client]?.first, "reply without request in \(file)")
                pending[event.client]!.removeFirst()
                guard let request = TranscriptRequest.build(requestBytes) else { continue }  // not producible by the client
                let reply = String(decoding: event.bytes, as: UTF8.self)
                let expected = TranscriptRequest.meaning(of: reply, for: request)
                let actual = Self.decodeBytes(event.bytes, request)
                #expect(actual == expected, "\(file): \(reply.prefix(60).debugDescription) to \(String(decoding: requestBytes, as: UTF8.self).debugDescription)")
                checked += 1
            }
            #expect(checked >= 4)
        }
    }

    // MARK: - Line framing

    @Suite("LineFramer")
    struct Framing {
        /// Feeds `parts` in order and returns the lines, or the error.
        static func frame(_ parts: [[UInt8]], stopAfter: Int = .max) -> (lines: [[UInt8]], error: LockError?, framer: LineFramer) {
            var framer = LineFramer()
            var lines: [[UInt8]] = []
            for part in parts {
                do {
                    try part.withUnsafeBytes { buffer in
                        try framer.feed(buffer) { line in
                            lines.append(Array(line))
                            return lines.count < stopAfter
                        }
                    }
                } catch let error as LockError {
                    return (lines, error, framer)
                } catch {
                    Issue.record("feed threw a non-LockError \(error)")
                    return (lines, nil, framer)
                }
                if lines.count >= stopAfter { break }
            }
            return (lines, nil, framer)
        }

        static let stream = Array("ok 1a5156bd 33\r\nacquired clé-锁 20\nqueued\n\ntimeout\r\n".utf8)
        static let expected = ["ok 1a5156bd 33", "acquired clé-锁 20", "queued", "", "timeout"].map { Array($0.utf8) }

        @Test("several lines in one feed, CRLF stripped")
        func oneFeed() {
            let result = Self.frame([Self.stream])
            #expect(result.error == nil)
            #expect(result.lines == Self.expected)
            #expect(result.framer.bufferedByteCount == 0)
        }

        @Test("a cut at every byte position gives the same lines")
        func everyCut() {
            for cut in 0...Self.stream.count {
                let result = Self.frame([Array(Self.stream[..<cut]), Array(Self.stream[cut...])])
                #expect(result.error == nil)
                #expect(result.lines == Self.expected, "cut at \(cut)")
            }
        }

        @Test("two cuts at every pair of positions, and one byte at a time")
        func everyPairOfCuts() {
            let s = Self.stream
            for a in 0...s.count {
                for b in a...s.count {
                    let lines = Self.frame([Array(s[..<a]), Array(s[a..<b]), Array(s[b...])]).lines
                    if lines != Self.expected {
                        Issue.record("cuts at \(a), \(b) gave \(lines.map { String(decoding: $0, as: UTF8.self) })")
                        return
                    }
                }
            }
            #expect(Self.frame(s.map { [$0] }).lines == Self.expected)
        }

        @Test("an incomplete line is kept until its newline arrives")
        func partial() {
            var result = Self.frame([Array("ok 1a".utf8)])
            #expect(result.lines.isEmpty)
            #expect(result.framer.bufferedByteCount == 5)
            result = Self.frame([Array("ok 1a".utf8), Array("b 33\r".utf8), [], Array("\nqu".utf8)])
            #expect(result.lines == [Array("ok 1ab 33".utf8)])
            #expect(result.framer.bufferedByteCount == 2)
        }

        @Test("a lone CR inside a line is kept; only the one before LF goes")
        func innerCR() {
            #expect(Self.frame([Array("a\rb\r\r\n".utf8)]).lines == [Array("a\rb\r".utf8)])
        }

        @Test("onLine returning false stops the feed")
        func stops() {
            var framer = LineFramer()
            var lines: [String] = []
            Array("ok\nqueued\ntimeout\npart".utf8).withUnsafeBytes { buffer in
                try! framer.feed(buffer) { line in
                    lines.append(String(decoding: line, as: UTF8.self))
                    return lines.count < 2
                }
            }
            #expect(lines == ["ok", "queued"])
        }

        static let mib = LineFramer.maximumLineBytes

        @Test("a line of exactly 1 MiB is accepted, whole or in pieces")
        func longestLine() {
            #expect(Self.mib == 1 << 20)
            let line = [UInt8](repeating: UInt8(ascii: "x"), count: Self.mib)
            for parts in [[line + [0x0A]],
                          [Array(line[..<1000]), Array(line[1000...]) + [0x0A]],
                          [line, [0x0A]],
                          [Array(line[..<(Self.mib - 1)]), [UInt8(ascii: "x"), 0x0A, UInt8(ascii: "o"), UInt8(ascii: "k"), 0x0A]]] {
                let result = Self.frame(parts)
                #expect(result.error == nil)
                #expect(result.lines.first?.count == Self.mib)
            }
        }

        @Test("a line of 1 MiB + 1 is refused, whole or in pieces, even before its newline")
        func tooLong() {
            let line = [UInt8](repeating: UInt8(ascii: "x"), count: Self.mib + 1)
            for parts in [[line + [0x0A]], [line], [Array(line[..<1000]), Array(line[1000...])],
                          [Array(line[..<Self.mib]), [UInt8(ascii: "x")]],
                          [Array("ok\n".utf8) + line + [0x0A]]] {
                let result = Self.frame(parts)
                guard case .protocolViolation = result.error else {
                    Issue.record("expected protocolViolation, got \(String(describing: result.error)) for parts \(parts.map(\.count))")
                    continue
                }
                #expect(result.lines.allSatisfy { $0.count <= Self.mib })
            }
        }

        /// The limit is documented as "without its line break"; `\r\n` is a line break the framer
        /// accepts, so a 1 MiB line ending in `\r\n` must be accepted like one ending in `\n`.
        @Test("a 1 MiB line ending in CRLF is accepted")
        func longestLineCRLF() {
            let line = [UInt8](repeating: UInt8(ascii: "x"), count: Self.mib)
            for parts in [[line + [0x0D, 0x0A]], [line + [0x0D], [0x0A]], [Array(line[..<10]), Array(line[10...]) + [0x0D, 0x0A]]] {
                let result = Self.frame(parts)
                #expect(result.error == nil, "parts \(parts.map(\.count))")
                #expect(result.lines.first?.count == Self.mib)
            }
        }
    }

    // MARK: - Fences

    @Suite("fenceFromToken")
    struct Fences {
        @Test("the first 16 hex characters, big-endian")
        func values() {
            #expect(fenceFromToken("0000000000000001a1b2c3d4e5f60718") == 1)
            #expect(fenceFromToken("00000000000000ff0000000000000000") == 255)
            #expect(fenceFromToken("0123456789abcdef") == 0x0123_4567_89ab_cdef)
            #expect(fenceFromToken("0123456789ABCDEF") == 0x0123_4567_89ab_cdef)
            #expect(fenceFromToken("0123456789AbCdEfzz") == 0x0123_4567_89ab_cdef)
            #expect(fenceFromToken("ffffffffffffffff0000") == .max)
            #expect(fenceFromToken("FFFFFFFFFFFFFFFF") == .max)
            #expect(fenceFromToken("0000000000000000") == 0)
            #expect(fenceFromToken("1000000000000000") == 1 << 60)
            // strictly increasing grants compare as numbers, not strings of other lengths
            #expect(fenceFromToken("00000000000000090000000000000000")! < fenceFromToken("000000000000000a0000000000000000")!)
            #expect(Grant(token: "00000000000000100123456789abcdef", leaseS: 33).fence == 16)
        }

        @Test("short or non-hex tokens have no fence")
        func invalid() {
            for token in ["", "0", "0123456789abcde", "0123456789abcdeg", "0x23456789abcdef", "-123456789abcdef",
                          " 123456789abcdef", "0123456789abcdé0", "０123456789abcdef", "0123456789abcde\n"] {
                #expect(fenceFromToken(token) == nil, "\(token.debugDescription)")
            }
        }
    }
}

// MARK: - Building requests from recorded bytes

/// Maps a recorded request back to the client call that would produce it, so recorded replies can
/// be decoded as answers to the right `Request`. `nil` when the client cannot produce those bytes.
enum TranscriptRequest {
    static func build(_ wire: [UInt8]) -> Request? {
        let lines = wire.split(separator: 0x0A, omittingEmptySubsequences: false)
        guard lines.count == 4, lines[3].isEmpty,
              let command = String(validating: lines[0], as: UTF8.self),
              let key = String(validating: lines[1], as: UTF8.self),
              let argument = String(validating: lines[2], as: UTF8.self) else { return nil }
        let words = argument.split(separator: " ", omittingEmptySubsequences: false).map(String.init)
        let numbers = words.map { Int($0) }
        func int(_ i: Int) -> Int?? { i < numbers.count ? numbers[i] : .some(nil) }
        let request: Request?
        do throws(LockError) {
            switch command {
            case "l":
                guard (1...2).contains(words.count), let t = numbers[0], words.count == 1 || numbers[1] != nil else { return nil }
                request = try .acquire(key: key, timeoutS: t, leaseTtlS: words.count == 2 ? numbers[1] : nil)
            case "r": request = try .release(key: key, token: argument)
            case "sr": request = try .semaphoreRelease(key: key, token: argument)
            case "n", "sn":
                guard (1...2).contains(words.count), words.count == 1 || numbers[1] != nil else { return nil }
                let ttl = words.count == 2 ? numbers[1] : nil
                request = command == "n" ? try .renew(key: key, token: words[0], leaseTtlS: ttl)
                                         : try .semaphoreRenew(key: key, token: words[0], leaseTtlS: ttl)
            case "e":
                if argument.isEmpty { request = try .enqueue(key: key) } else {
                    guard words.count == 1, let ttl = numbers[0] else { return nil }
                    request = try .enqueue(key: key, leaseTtlS: ttl)
                }
            case "w", "sw":
                guard words.count == 1, let t = numbers[0] else { return nil }
                request = command == "w" ? try .wait(key: key, timeoutS: t) : try .semaphoreWait(key: key, timeoutS: t)
            case "sl":
                guard (2...3).contains(words.count), let t = numbers[0], let limit = numbers[1], words.count == 2 || numbers[2] != nil else { return nil }
                request = try .semaphoreAcquire(key: key, limit: limit, timeoutS: t, leaseTtlS: words.count == 3 ? numbers[2] : nil)
            case "se":
                guard (1...2).contains(words.count), let limit = numbers[0], words.count == 1 || numbers[1] != nil else { return nil }
                request = try .semaphoreEnqueue(key: key, limit: limit, leaseTtlS: words.count == 2 ? numbers[1] : nil)
            case "auth":
                guard key == "_" else { return nil }
                request = try .auth(secret: argument)
            case "stats": request = key == "_" && argument.isEmpty ? .stats : nil
            case "ping": request = key == "_" && argument.isEmpty ? .ping : nil
            default: return nil
            }
        } catch {
            return nil
        }
        // The client's encoding must give back exactly the recorded bytes.
        guard let request, request.bytes == wire else { return nil }
        return request
    }

    /// What a recorded reply means, written out independently of `ReplyDecoder`.
    static func meaning(of reply: String, for request: Request) -> Result<Reply, LockError> {
        let f = reply.split(separator: " ").map(String.init)
        let key = request.key
        switch (request.command, f[0]) {
        case (.acquire, "ok"), (.wait, "ok"), (.semaphoreAcquire, "ok"), (.semaphoreWait, "ok"),
             (.enqueue, "acquired"), (.semaphoreEnqueue, "acquired"):
            return .success(.granted(Grant(token: f[1], leaseS: Int(f[2])!)))
        case (.renew, "ok"), (.semaphoreRenew, "ok"):
            return .success(.renewed(remainingS: Int(f[1])!))
        case (.release, "ok"), (.semaphoreRelease, "ok"), (.auth, "ok"), (.ping, "ok"):
            return .success(.ok)
        case (.stats, "ok"):
            let stats = try! JSONDecoder().decode(ServerStats.self, from: Data(reply.dropFirst(3).utf8))
            return .success(.stats(stats))
        case (_, "queued"): return .success(.queued)
        case (_, "timeout"): return .success(.timeout)
        case (_, "error_auth"): return .failure(.authFailed)
        case (_, "error_max_locks"): return .failure(.maxLocks(key: key))
        case (_, "error_max_waiters"): return .failure(.maxWaiters(key: key))
        case (_, "error_limit_mismatch"): return .failure(.limitMismatch(key: key))
        case (_, "error_already_enqueued"): return .failure(.alreadyEnqueued(key: key))
        case (_, "error_not_enqueued"): return .failure(.notEnqueued(key: key))
        case (.release, "error"), (.renew, "error"), (.semaphoreRelease, "error"), (.semaphoreRenew, "error"):
            return .failure(.notHeld(key: key))
        case (.enqueue, "error"), (.semaphoreEnqueue, "error"): return .failure(.alreadyEnqueued(key: key))
        case (.wait, "error"), (.semaphoreWait, "error"): return .failure(.notEnqueued(key: key))
        case (_, "error"): return .failure(.serverError(command: request.command.rawValue, key: key))
        default:
            return .failure(.protocolViolation("test oracle does not know \(reply)"))
        }
    }
}

/// The decoder reads common replies straight from the bytes and leaves the rest to the text
/// path; both must agree on every reply line, for every command.
@Suite("Reply decoder fast path")
struct ReplyFastPathTests {
    static let requests: [Request] = [
        try! .acquire(key: "k", timeoutS: 5), try! .release(key: "k", token: "t"), try! .renew(key: "k", token: "t"),
        try! .enqueue(key: "k"), try! .wait(key: "k", timeoutS: 5),
        try! .semaphoreAcquire(key: "k", limit: 2, timeoutS: 5), try! .semaphoreRelease(key: "k", token: "t"),
        try! .semaphoreRenew(key: "k", token: "t"), try! .semaphoreEnqueue(key: "k", limit: 2),
        try! .semaphoreWait(key: "k", timeoutS: 5), try! .auth(secret: "s"), .stats, .ping,
    ]

    static let lines: [[UInt8]] = Transcripts.all.filter { !$0.isRequest }.map(\.bytes) + [
        "ok", "ok 32", "ok  32", " ok", "ok ", "ok +5", "ok 0033", "ok 99999999999999999999",
        "ok 4c6af3c93c83e0aa6ca56449a1d1c83f 33", "ok 4c6af3c93c83e0aa6ca56449a1d1c83f 33 fence=7",
        "ok 4c6af3c9\u{1}3c83 33", "ok tok\tx 33", "acquired tok 33", "acquired tok", "queued", "queued x",
        "timeout", "timeout 3", "ok " + String(repeating: "t", count: 255) + " 5",
        "ok " + String(repeating: "t", count: 256) + " 5", "ok clé 5", "error", "error_max_locks",
        "ok to\u{7F}k 33", "ok\u{7F} 3", "ok 3\u{7F}", "ok tok 3\r", "\u{1F}ok", "~ok ~ 3",
    ].map { Array($0.utf8) }

    @Test func bytesAndTextAgreeOnEveryLineForEveryCommand() {
        for request in Self.requests {
            for line in Self.lines {
                let fromBytes = line.withUnsafeBytes { ReplyDecoder.decode($0, for: request) }
                let fromText = ReplyDecoder.decode(String(decoding: line, as: UTF8.self), for: request)
                #expect(fromBytes == fromText, "\(String(decoding: line, as: UTF8.self).debugDescription) to \(request.command)")
            }
        }
    }
}
