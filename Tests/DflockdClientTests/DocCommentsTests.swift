// Every public declaration of the library has a `///` documentation comment, and so does every
// case of a public enum (DocC shows them all). `make docs` checks the comments' symbol links;
// this checks that none is missing, without building the documentation.

import Foundation
import Testing

@Suite("Documentation comments")
struct DocCommentsTests {
    @Test("every public declaration in Sources/ has a /// comment")
    func everyPublicDeclarationIsDocumented() throws {
        let sources = TestSupport.repoRoot.appendingPathComponent("Sources")
        let files = try #require(FileManager.default.enumerator(atPath: sources.path)).compactMap { $0 as? String }
            .filter { $0.hasSuffix(".swift") }.sorted()
        var checked = 0
        for file in files {
            let text = try String(contentsOf: sources.appendingPathComponent(file), encoding: .utf8)
            let declarations = Self.publicDeclarations(in: text)
            checked += declarations.count
            for (line, declaration) in declarations where !Self.isDocumented(line: line, in: text) {
                Issue.record("Sources/\(file):\(line + 1): no /// comment above the public \(declaration.debugDescription)")
            }
        }
        #expect(checked > 100, "public declarations found: \(checked)")
    }

    @Test("the check sees public declarations, attributes, and cases of public enums")
    func checkFindsWhatItShould() {
        let text = """
            /// Documented.
            public struct A {
                /// Documented.
                @inlinable
                public var b: Int { 1 }
                public func undocumented() {}
                var internalOne = 0
            }
            /// Documented.
            public enum E {
                /// Documented.
                case one
                case two(String)
                func f(_ e: E) -> Int {
                    switch e {
                    case .one: return 1
                    case .two: return 2
                    }
                }
            }
            enum Internal {
                case hidden
            }
            """
        let found = Self.publicDeclarations(in: text)
        #expect(found.map(\.text) == ["public struct A {", "public var b: Int { 1 }", "public func undocumented() {}",
                                      "public enum E {", "case one", "case two(String)"])
        #expect(found.filter { !Self.isDocumented(line: $0.line, in: text) }.map(\.text) == ["public func undocumented() {}", "case two(String)"])
    }

    /// Lines (0-based) holding a public or open declaration, or a case directly inside a public enum.
    static func publicDeclarations(in text: String) -> [(line: Int, text: String)] {
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false).map { $0.trimmingCharacters(in: .whitespaces) }
        var found: [(Int, String)] = []
        var depth = 0
        var publicEnumDepths: [Int] = []   // brace depth inside each open public enum
        for (index, line) in lines.enumerated() {
            if line.hasPrefix("//") { continue }
            var words = line.split(separator: " ").map(String.init)
            while let first = words.first, first.hasPrefix("@") { words.removeFirst() }   // attributes
            let isPublic = words.first == "public" || words.first == "open"
            if isPublic {
                found.append((index, line))
            } else if words.first == "case", publicEnumDepths.last == depth {
                found.append((index, line))
            }
            let opens = Self.braceCount(line, "{"), closes = Self.braceCount(line, "}")
            if isPublic, words.contains("enum"), opens > closes {
                publicEnumDepths.append(depth + 1)
            }
            depth += opens - closes
            while let last = publicEnumDepths.last, depth < last { publicEnumDepths.removeLast() }
        }
        return found
    }

    /// Whether the declaration at `line` has a `///` comment right above it (attributes between
    /// the two are fine).
    static func isDocumented(line: Int, in text: String) -> Bool {
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false).map { $0.trimmingCharacters(in: .whitespaces) }
        var index = line - 1
        while index >= 0, lines[index].hasPrefix("@") { index -= 1 }
        return index >= 0 && lines[index].hasPrefix("///")
    }

    /// Braces outside string literals and comments on one line.
    private static func braceCount(_ line: String, _ brace: Character) -> Int {
        var count = 0
        var inString = false
        var previous: Character = " "
        for character in line {
            if character == "\"" && previous != "\\" { inString.toggle() }
            if !inString {
                if character == "/" && previous == "/" { break }
                if character == brace { count += 1 }
            }
            previous = character
        }
        return count
    }
}
