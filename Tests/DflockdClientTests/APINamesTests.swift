// The README's table "The seed's API in Swift" against the user's specification (the seed) and
// against the real API:
//   1. every option, method, property and error the seed names has a row in the table;
//   2. every Swift name the table (and its "Beyond the seed" line) shows is compiled here,
//      with the types and labels it shows, and the defaults it claims are checked.
// The seed is vendored in Fixtures/ (a copy of ../shared/seed/DistributedLock-api.md, checked
// for drift where that folder exists, like the transcripts).

import Foundation
import Testing
@testable import DflockdClient

@Suite("API names: seed, README table, Swift")
struct APINamesTests {
    static let seedName = "DistributedLock-api.md"
    static let vendoredSeed = TestSupport.repoRoot.appendingPathComponent("Tests/DflockdClientTests/Fixtures/\(seedName)")
    static let sharedSeed = TestSupport.repoRoot.deletingLastPathComponent().appendingPathComponent("shared/seed/\(seedName)")
    static let readme = TestSupport.repoRoot.appendingPathComponent("README.md")

    @Test("vendored seed equals ../shared/seed (skipped where that folder is absent)",
          .enabled(if: FileManager.default.fileExists(atPath: sharedSeed.path)))
    func vendoredSeedMatchesShared() throws {
        let ours = FileManager.default.contents(atPath: Self.vendoredSeed.path)
        let theirs = FileManager.default.contents(atPath: Self.sharedSeed.path)
        #expect(ours != nil && ours == theirs,
                "Tests/DflockdClientTests/Fixtures/\(Self.seedName) differs from \(Self.sharedSeed.path): copy it again, then check the README table")
    }

    @Test("the seed parses: options, methods, properties, errors")
    func seedParses() throws {
        let seed = try Seed.load()
        let names = seed.options.map(\.name)
        #expect(names.allSatisfy { $0.range(of: #"^[a-z][A-Za-z]*$"#, options: .regularExpression) != nil }, "\(names)")
        // The seed's own constructor example names four options: the parser must find them.
        #expect(Set(["key", "acquireTimeoutS", "leaseTtlS", "servers"]).isSubset(of: names), "\(names)")
        #expect(names.count == Set(names).count, "no option twice: \(names)")
        #expect(seed.options.allSatisfy { !$0.type.isEmpty && !$0.defaultValue.isEmpty }, "\(seed.options)")
        #expect(Set(["withLock", "acquire", "release"]).isSubset(of: seed.methods.map(\.name)), "\(seed.methods)")
        #expect(seed.properties.map(\.name).contains("token"), "\(seed.properties)")
        #expect(seed.errors.contains("AcquireTimeoutError") && seed.errors.contains("LockError"), "\(seed.errors)")
    }

    @Test("every option, method, property and error of the seed has a row in the README table")
    func everySeedEntryHasARow() throws {
        for problem in try Self.missingRows(seed: Seed.load(), table: ReadmeTable.load()) {
            Issue.record("README table: \(problem)")
        }
    }

    @Test("every Swift name in the README table compiles against the real API, with the defaults it shows")
    func swiftNamesInTheTableCompile() throws {
        let table = try ReadmeTable.load()
        for problem in Self.uncompiledNames(table: table) {
            Issue.record("""
                the README table shows \(problem), which SwiftNames.checks() in APINamesTests.swift does not \
                compile: add an entry that refers to it (with its labels and types), or fix the README
                """)
        }
        let checks = SwiftNames.checks()
        for name in Set(table.allSwiftSpans).sorted() {
            do {
                try checks[name]?()
            } catch {
                Issue.record("checking `\(name)` threw \(error)")
            }
        }
        #expect(table.allSwiftSpans.count > 20, "the README table was found and read: \(table.allSwiftSpans)")
    }

    /// The checks above must catch what they are for: shown here on altered copies of the README.
    @Test("the checks catch a missing row, a wrong default and a Swift name nobody compiled")
    func checksCatchMistakes() throws {
        let seed = try Seed.load()
        let readme = try String(contentsOf: Self.readme, encoding: .utf8)
        func table(_ text: String) throws -> ReadmeTable { try ReadmeTable(parsing: text) }
        #expect(try Self.missingRows(seed: seed, table: table(readme)).isEmpty)

        let withoutRow = readme.split(separator: "\n", omittingEmptySubsequences: false)
            .filter { !$0.hasPrefix("| `socketTimeoutMs`") }.joined(separator: "\n")
        #expect(withoutRow != readme, "the README has a `socketTimeoutMs` row to remove")
        #expect(try Self.missingRows(seed: seed, table: table(withoutRow)).contains { $0.contains("`socketTimeoutMs`") })

        let wrongDefault = readme.replacingOccurrences(of: "`renewRatio: Double = 0.5`", with: "`renewRatio: Double = 0.75`")
        #expect(wrongDefault != readme)
        #expect(try Self.missingRows(seed: seed, table: table(wrongDefault)).contains { $0.contains("`renewRatio` defaults to 0.5") })

        let unknownName = readme.replacingOccurrences(of: "`wait(timeoutS:completion:)`", with: "`waitFor(timeoutS:completion:)`")
        #expect(unknownName != readme)
        #expect(try Self.uncompiledNames(table: table(unknownName)) == ["`waitFor(timeoutS:completion:)`"])
    }

    /// What the seed names that the table lacks, one sentence each.
    static func missingRows(seed: Seed, table: ReadmeTable) -> [String] {
        var problems: [String] = []
        /// The rows whose seed column names `name` in code voice (`name`, `name(…)`, `name({ … })`).
        func rows(naming name: String) -> [ReadmeTable.Row] {
            table.rows.filter { row in row.seedSpans.contains { $0 == name || $0.hasPrefix(name + "(") } }
        }

        if !table.rows.contains(where: { $0.seedSpans.contains { $0.hasPrefix("new DistributedLock(") } }) {
            problems.append("no row for the constructor `new DistributedLock({ … })`")
        }
        for option in seed.options {
            let matching = rows(naming: option.name)
            guard !matching.isEmpty else {
                problems.append("no row for the seed's option `\(option.name)` (\(option.type), default \(option.defaultValue))")
                continue
            }
            guard let row = matching.first(where: { $0.swift.contains("\(option.name):") }) else {
                problems.append("the row for `\(option.name)` shows no Swift label `\(option.name):`")
                continue
            }
            // The Swift default the row shows must be the seed's default.
            let swiftDefault = row.swiftSpans.first { $0.hasPrefix("\(option.name):") } ?? ""
            let agrees: Bool
            switch option.defaultValue {
            case _ where option.about.contains("deprecated"):
                // `host`, `port`: nil in Swift, so that `servers` (nil: the seed's default) wins.
                agrees = swiftDefault.hasSuffix("= nil")
            case "(required)":
                agrees = !swiftDefault.contains("=")
            case "undefined", "server default":
                agrees = swiftDefault.hasSuffix("= nil")
            case let value where Double(value) != nil || value == "stableHashShard":
                agrees = swiftDefault.hasSuffix("= \(value)")
            default:
                // `servers`: nil in Swift, meaning the seed's default; checked against the real
                // initializer by SwiftNames.checks().
                agrees = swiftDefault.hasSuffix("= nil")
            }
            if !agrees {
                problems.append("`\(option.name)` defaults to \(option.defaultValue) in the seed, but the row shows `\(swiftDefault)`")
            }
        }
        for method in seed.methods {
            let matching = rows(naming: method.name)
            if matching.isEmpty {
                problems.append("no row for the seed's method `\(method.signature)`")
            } else if !matching.contains(where: { row in row.swiftSpans.contains { $0.hasPrefix(method.name + "(") || $0.hasPrefix(method.name + " {") } }) {
                problems.append("the row for `\(method.name)` shows no Swift method `\(method.name)(…)`")
            }
        }
        for property in seed.properties
        where !table.rows.contains(where: { row in row.seedSpans.contains(property.name) && row.swiftSpans.contains { $0.hasPrefix("\(property.name): ") } }) {
            problems.append("no row for the seed's property `\(property.name)` with a Swift `\(property.name): Type`")
        }
        for error in seed.errors where !table.rows.contains(where: { $0.seedSpans.contains(error) && $0.swift.contains("LockError") }) {
            problems.append("no row for the seed's `\(error)` mapping it to a `LockError`")
        }
        return problems
    }

    /// The Swift names the table shows that ``SwiftNames/checks()`` does not compile.
    static func uncompiledNames(table: ReadmeTable) -> [String] {
        let checks = SwiftNames.checks()
        return Set(table.allSwiftSpans).subtracting(checks.keys).sorted().map { "`\($0)`" }
    }
}

// MARK: - The Swift names, compiled

/// One closure per Swift name the README shows, keyed by the name exactly as the README writes
/// it. Each refers to the API with the labels and types shown (so it compiles only if the name
/// is real) and checks what can be checked without a server: defaults, cases, results.
enum SwiftNames {
    static let full = "try DistributedLock(key:acquireTimeoutS:leaseTtlS:servers:shardingStrategy:host:port:renewRatio:tls:auth:onLockLost:connectTimeoutMs:socketTimeoutMs:maxIdleMs:loop:logger:)"

    /// A lock with every option at its default (nothing touches the network).
    static func defaultLock() throws -> DistributedLock { try DistributedLock(key: "names") }

    static func checks() -> [String: () throws -> Void] {
        [
            // The initializer: the name, and a call with every label in the README's order.
            full: { () throws in
                let initializer = DistributedLock.init(key:acquireTimeoutS:leaseTtlS:servers:shardingStrategy:host:port:renewRatio:tls:auth:onLockLost:connectTimeoutMs:socketTimeoutMs:maxIdleMs:loop:logger:)
                _ = initializer
                let lock = try DistributedLock(key: "names", acquireTimeoutS: 10, leaseTtlS: 20, servers: [("127.0.0.1", 6388)],
                                               shardingStrategy: stableHashShard, host: nil, port: nil, renewRatio: 0.5,
                                               tls: nil, auth: nil, onLockLost: { _, _ in }, connectTimeoutMs: 1_000,
                                               socketTimeoutMs: 1_000, maxIdleMs: 10_000, loop: .shared)
                #expect(lock.state == .idle)
            },
            "LockError.invalidArgument": { () throws in
                let _: (String, String) -> LockError = LockError.invalidArgument(name:reason:)
                do {
                    _ = try DistributedLock(key: "names", renewRatio: 2)
                    Issue.record("renewRatio 2 was accepted")
                } catch LockError.invalidArgument(let name, _) {
                    #expect(name == "renewRatio")
                } catch {
                    Issue.record("unexpected \(error)")
                }
            },
            "key: String": { () throws in
                let key: String = "names"
                let lock = try DistributedLock(key: key)
                let path: KeyPath<DistributedLock, String> = \.key
                #expect(lock[keyPath: path] == key)
            },
            "acquireTimeoutS: Int = 10": { () throws in
                let value: Int = 3
                #expect(try DistributedLock(key: "names", acquireTimeoutS: value).settings.acquireTimeoutS == 3)
                #expect(try defaultLock().settings.acquireTimeoutS == 10)
            },
            "leaseTtlS: Int? = nil": { () throws in
                let value: Int? = 20
                #expect(try DistributedLock(key: "names", leaseTtlS: value).settings.leaseTtlS == 20)
                #expect(try defaultLock().settings.leaseTtlS == nil)
            },
            "servers: [(String, Int)]? = nil": { () throws in
                let value: [(String, Int)]? = [("localhost", 7000)]
                #expect(try DistributedLock(key: "names", servers: value).settings.endpoint == Endpoint(host: "localhost", port: 7000))
                // nil is the seed's default, [["127.0.0.1", 6388]].
                #expect(try defaultLock().settings.endpoint == Endpoint(host: "127.0.0.1", port: 6388))
            },
            "shardingStrategy: ShardingStrategy = stableHashShard": { () throws in
                let three = [("127.0.0.1", 7000), ("127.0.0.1", 7001), ("127.0.0.1", 7002)]
                let last: ShardingStrategy = { _, count in count - 1 }
                #expect(try DistributedLock(key: "names", servers: three, shardingStrategy: last).settings.endpoint.port == 7002)
                // By default, protocol.md's vector: "clé-锁" lives on server 1 of 3.
                #expect(try DistributedLock(key: "clé-锁", servers: three).settings.endpoint.port == 7001)
            },
            "host: String? = nil": { () throws in
                let host: String? = "localhost"
                #expect(try DistributedLock(key: "names", host: host).settings.endpoint == Endpoint(host: "localhost", port: 6388))
                // Used only when servers is nil.
                #expect(try DistributedLock(key: "names", servers: [("127.0.0.1", 7000)], host: host).settings.endpoint.host == "127.0.0.1")
            },
            "port: Int? = nil": { () throws in
                let port: Int? = 7000
                #expect(try DistributedLock(key: "names", port: port).settings.endpoint == Endpoint(host: "127.0.0.1", port: 7000))
                #expect(try DistributedLock(key: "names", servers: [("127.0.0.1", 7001)], port: port).settings.endpoint.port == 7001)
            },
            "servers": { () throws in
                _ = try DistributedLock(key: "names", servers: nil)
            },
            "renewRatio: Double = 0.5": { () throws in
                let value: Double = 0.25
                #expect(try DistributedLock(key: "names", renewRatio: value).settings.renewRatio == 0.25)
                #expect(try defaultLock().settings.renewRatio == 0.5)
            },
            "tls: TLSOptions? = nil": { () throws in
                let value: TLSOptions? = TLSOptions(serverName: "locks.example")
                #expect(try DistributedLock(key: "names", tls: value).settings.connection.value.tls == value)
                #expect(try defaultLock().settings.connection.value.tls == nil)
            },
            "TLSOptions()": { () throws in
                let options = TLSOptions()
                #expect(options.caFile == nil && options.serverName == nil && options.certificateFile == nil
                        && options.privateKeyFile == nil && !options.insecureSkipVerify, "verifies by default")
            },
            "auth: String? = nil": { () throws in
                let value: String? = "s3cret"
                #expect(try DistributedLock(key: "names", auth: value).settings.connection.value.auth == "s3cret")
                #expect(try defaultLock().settings.connection.value.auth == nil)
            },
            "onLockLost: (@Sendable (String, String) -> Void)? = nil": { () throws in
                let handler: (@Sendable (String, String) -> Void)? = { _, _ in }
                #expect(try DistributedLock(key: "names", onLockLost: handler).settings.onLockLost != nil)
                #expect(try defaultLock().settings.onLockLost == nil)
            },
            "connectTimeoutMs: Int? = nil": { () throws in
                let value: Int? = 500
                #expect(try DistributedLock(key: "names", connectTimeoutMs: value).settings.connection.value.connectTimeoutMs == 500)
                #expect(try defaultLock().settings.connection.value.connectTimeoutMs == nil)
            },
            "socketTimeoutMs: Int? = nil": { () throws in
                let value: Int? = 500
                #expect(try DistributedLock(key: "names", socketTimeoutMs: value).settings.connection.value.socketTimeoutMs == 500)
                #expect(try defaultLock().settings.connection.value.socketTimeoutMs == nil)
            },
            "maxIdleMs: Int? = 10_000": { () throws in
                let value: Int? = nil
                #expect(try DistributedLock(key: "names", maxIdleMs: value).settings.maxIdleMs == nil)
                #expect(try defaultLock().settings.maxIdleMs == 10_000)
                #expect(DistributedLease.defaultMaxIdleMs == 10_000)
            },
            "loop: EventLoop = .shared": { () throws in
                let loop: EventLoop = .shared
                #expect(try DistributedLock(key: "names", loop: loop).loop === EventLoop.shared)
                #expect(try defaultLock().loop === EventLoop.shared)
            },
            "withLock { … } async throws": { () throws in
                // Compiled, not run: withLock needs a server.
                func use(_ lock: DistributedLock) async throws -> Int {
                    try await lock.withLock { 42 }
                }
                _ = use
            },
            "acquire(force:) async throws -> Bool": { () throws in
                let _: (DistributedLock) -> (Bool) async throws -> Bool = DistributedLock.acquire(force:)
                let _: (DistributedLock) -> () async throws -> Bool = { lock in { try await lock.acquire() } }
            },
            "acquire(force:completion:)": { () throws in
                let _: (DistributedLock) -> (Bool, @escaping (Result<Bool, LockError>) -> Void) -> Void = DistributedLock.acquire(force:completion:)
            },
            "release() async throws": { () throws in
                let _: (DistributedLock) -> () async throws -> Void = DistributedLock.release
            },
            "release(completion:)": { () throws in
                let _: (DistributedLock) -> (@escaping (Result<Void, LockError>) -> Void) -> Void = DistributedLock.release(completion:)
            },
            "enqueue(force:) async throws -> EnqueueResult": { () throws in
                let _: (DistributedLock) -> (Bool) async throws -> EnqueueResult = DistributedLock.enqueue(force:)
            },
            ".acquired": { () throws in
                let result: EnqueueResult = .acquired
                #expect(result != .queued)
            },
            ".queued": { () throws in
                let result: EnqueueResult = .queued
                #expect(result != .acquired)
            },
            "enqueue(force:completion:)": { () throws in
                let _: (DistributedLock) -> (Bool, @escaping (Result<EnqueueResult, LockError>) -> Void) -> Void = DistributedLock.enqueue(force:completion:)
            },
            "wait(timeoutS:) async throws -> Bool": { () throws in
                let _: (DistributedLock) -> (Int?) async throws -> Bool = DistributedLock.wait(timeoutS:)
            },
            "wait(timeoutS:completion:)": { () throws in
                let _: (DistributedLock) -> (Int?, @escaping (Result<Bool, LockError>) -> Void) -> Void = DistributedLock.wait(timeoutS:completion:)
            },
            "close()": { () throws in
                let _: (DistributedLock) -> () -> Void = DistributedLock.close
                let lock = try defaultLock()
                lock.close()
                lock.close()   // idempotent
            },
            "token: String?": { () throws in
                let path: KeyPath<DistributedLock, String?> = \.token
                #expect(try defaultLock()[keyPath: path] == nil)
            },
            "lease: Int": { () throws in
                let path: KeyPath<DistributedLock, Int> = \.lease
                #expect(try DistributedLock(key: "names", leaseTtlS: 20)[keyPath: path] == 20, "before a grant: leaseTtlS")
            },
            "LockError.acquireTimeout(key:)": { () throws in
                let make: (String) -> LockError = LockError.acquireTimeout(key:)
                #expect(make("k") == .acquireTimeout(key: "k"))
            },
            "LockError.authFailed": { () throws in
                let error: LockError = .authFailed
                #expect(!error.description.isEmpty)
            },
            "LockError": { () throws in
                let _: any Error.Type = LockError.self
            },
            "stableHashShard(_:_:)": { () throws in
                let function: (String, Int) -> Int = stableHashShard(_:_:)
                // protocol.md's vectors.
                #expect(function("my-resource", 5) == 3)
                #expect(function("orders/42", 7) == 6)
            },
            // "Beyond the seed".
            "state: LockState": { () throws in
                let path: KeyPath<DistributedLock, LockState> = \.state
                #expect(try defaultLock()[keyPath: path] == .idle)
            },
            "leaseRemaining: Duration?": { () throws in
                let path: KeyPath<DistributedLock, Duration?> = \.leaseRemaining
                #expect(try defaultLock()[keyPath: path] == nil)
            },
            "fence: UInt64?": { () throws in
                let path: KeyPath<DistributedLock, UInt64?> = \.fence
                #expect(try defaultLock()[keyPath: path] == nil)
                let _: KeyPath<Grant, UInt64?> = \.fence
            },
            "DistributedSemaphore(key:limit:…)": { () throws in
                let semaphore = try DistributedSemaphore(key: "names", limit: 2, acquireTimeoutS: 10, leaseTtlS: 20,
                                                         servers: [("127.0.0.1", 6388)], shardingStrategy: stableHashShard,
                                                         host: nil, port: nil, renewRatio: 0.5, tls: nil, auth: nil,
                                                         onLockLost: nil, connectTimeoutMs: nil, socketTimeoutMs: nil,
                                                         maxIdleMs: 10_000, loop: .shared)
                #expect(semaphore.limit == 2)
                // The same members as DistributedLock.
                let _: (DistributedSemaphore) -> (Bool) async throws -> Bool = DistributedSemaphore.acquire(force:)
                let _: (DistributedSemaphore) -> (Bool) async throws -> EnqueueResult = DistributedSemaphore.enqueue(force:)
                let _: (DistributedSemaphore) -> (Int?) async throws -> Bool = DistributedSemaphore.wait(timeoutS:)
                let _: (DistributedSemaphore) -> () async throws -> Void = DistributedSemaphore.release
                let _: KeyPath<DistributedSemaphore, String?> = \.token
                let _: KeyPath<DistributedSemaphore, Int> = \.lease
            },
            "stats(host:port:…)": { () throws in
                let _: (String, Int, TLSOptions?, String?, Int?, EventLoop) async throws -> ServerStats = stats(host:port:tls:auth:connectTimeoutMs:loop:)
                let _: (String, Int, TLSOptions?, String?, Int?, EventLoop, @escaping (Result<ServerStats, LockError>) -> Void) -> Void =
                    stats(host:port:tls:auth:connectTimeoutMs:loop:completion:)
            },
            "Connection": { () throws in
                let connection = try Connection(host: "127.0.0.1", port: 6388)   // connects on first use only
                #expect(connection.endpoint == Endpoint(host: "127.0.0.1", port: 6388))
                connection.close()
            },
            "fenceFromToken(_:)": { () throws in
                #expect(fenceFromToken("00000000000000ff0123456789abcdef") == 255)
                #expect(fenceFromToken("short") == nil)
            },
        ]
    }
}

// MARK: - Parsing the seed

/// The seed's options, methods, properties and error names.
///
/// The seed is a web page saved as text: each table cell that held code sits on a line of its
/// own, so a table is read by joining its lines and splitting the cells on `|` (`\|` is a pipe
/// inside a cell).
struct Seed {
    struct Option: CustomStringConvertible { let name, type, defaultValue, about: String; var description: String { name } }
    struct Method: CustomStringConvertible { let name, signature: String; var description: String { signature } }
    struct Property: CustomStringConvertible { let name, type: String; var description: String { name } }

    var options: [Option] = []
    var methods: [Method] = []
    var properties: [Property] = []
    var errors: [String] = []

    static func load() throws -> Seed {
        try Seed(parsing: String(contentsOf: APINamesTests.vendoredSeed, encoding: .utf8))
    }

    init(parsing text: String) throws {
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false).map { $0.trimmingCharacters(in: .whitespaces) }
        func section(_ title: String, until next: String?) throws -> ArraySlice<String> {
            guard let start = lines.firstIndex(of: title + "¶") else { throw TestSupportError("seed: no section \(title)¶") }
            let end = next.flatMap { lines[(start + 1)...].firstIndex(of: $0 + "¶") } ?? lines.endIndex
            return lines[(start + 1)..<end]
        }
        func tableCells(_ lines: ArraySlice<String>, columns: Int) throws -> [[String]] {
            guard let separator = lines.firstIndex(where: { $0.hasPrefix("|---") }) else { throw TestSupportError("seed: a table without |---|") }
            let joined = lines[(separator + 1)...].joined(separator: " ").replacingOccurrences(of: "\\|", with: "\u{0}")
            var cells = joined.split(separator: "|", omittingEmptySubsequences: false)
                .map { $0.trimmingCharacters(in: .whitespaces).replacingOccurrences(of: "\u{0}", with: "|") }
            if cells.last == "" { cells.removeLast() }
            guard cells.count % columns == 0 else {
                throw TestSupportError("seed: \(cells.count) cells do not make rows of \(columns): \(cells)")
            }
            return stride(from: 0, to: cells.count, by: columns).map { Array(cells[$0..<($0 + columns)]) }
        }

        options = try tableCells(section("Options", until: "Methods"), columns: 4).map {
            Option(name: $0[0], type: $0[1], defaultValue: $0[2], about: $0[3])
        }
        for line in try section("Methods", until: "Properties") {
            // e.g. `acquire(opts?: { force?: boolean }): Promise<boolean>¶`
            guard line.hasSuffix("¶"), let match = line.firstMatch(of: /^([a-zA-Z]+)(<[A-Za-z]+>)?\(/) else { continue }
            methods.append(Method(name: String(match.1), signature: String(line.dropLast())))
        }
        properties = try tableCells(section("Properties", until: nil), columns: 3).map { Property(name: $0[0], type: $0[1]) }
        errors = Array(Set(text.matches(of: /\b[A-Z][A-Za-z]*Error\b/).map { String($0.0) })).sorted()
    }
}

// MARK: - Parsing the README table

/// The two-column table of README.md's section "The seed's API in Swift", and the code spans of
/// the "Beyond the seed" line under it.
struct ReadmeTable {
    struct Row {
        let seed: String
        let swift: String
        var seedSpans: [String] { ReadmeTable.codeSpans(seed) }
        var swiftSpans: [String] { ReadmeTable.codeSpans(swift) }
    }

    var rows: [Row] = []
    var beyondTheSeedSpans: [String] = []

    static let sectionTitle = "## The seed's API in Swift"

    /// The Swift column's code spans, and those of the "Beyond the seed" line.
    var allSwiftSpans: [String] { rows.flatMap(\.swiftSpans) + beyondTheSeedSpans }

    static func load() throws -> ReadmeTable {
        try ReadmeTable(parsing: String(contentsOf: APINamesTests.readme, encoding: .utf8))
    }

    init(parsing text: String) throws {
        guard let start = text.range(of: Self.sectionTitle + "\n") else {
            throw TestSupportError("README.md has no section \(Self.sectionTitle.debugDescription)")
        }
        let rest = text[start.upperBound...]
        let section = rest.range(of: "\n## ").map { rest[..<$0.lowerBound] } ?? rest
        for line in section.split(separator: "\n") where line.hasPrefix("|") && !line.hasPrefix("|---") {
            let cells = line.replacingOccurrences(of: "\\|", with: "\u{0}").split(separator: "|", omittingEmptySubsequences: false)
                .map { $0.trimmingCharacters(in: .whitespaces).replacingOccurrences(of: "\u{0}", with: "|") }
            // "| a | b |" splits into "", a, b, "".
            guard cells.count == 4 else { throw TestSupportError("README table: a row without two columns: \(line)") }
            if cells[1] == "seed (TypeScript)" { continue }   // the header
            rows.append(Row(seed: cells[1], swift: cells[2]))
        }
        if let beyond = section.range(of: "Beyond the seed:") {
            let paragraph = section[beyond.upperBound...].prefix { $0 != "|" }
            let end = paragraph.range(of: "\n\n").map { paragraph[..<$0.lowerBound] } ?? paragraph
            beyondTheSeedSpans = Self.codeSpans(String(end))
        }
        guard !rows.isEmpty else { throw TestSupportError("README.md: no table rows under \(Self.sectionTitle.debugDescription)") }
    }

    static func codeSpans(_ text: String) -> [String] {
        text.matches(of: /`([^`]+)`/).map { String($0.1) }
    }
}
