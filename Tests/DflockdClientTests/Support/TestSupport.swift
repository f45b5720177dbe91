// Shared helpers for the test support (RealServer, RawClient, ScriptedPeer):
// repo and transcript locations, Python-style byte escaping, and small POSIX socket
// wrappers. Loopback (127.0.0.1) only, everywhere.
//
// Transcripts are located through #filePath (this file lives at
// <repo>/Tests/DflockdClientTests/Support/TestSupport.swift), not Bundle.module:
// the same lookup then also finds <repo>/.venv and ../shared, and it does not depend
// on the test target declaring resources.

// CUV in every test file that uses socket constants: uv.h includes <netinet/in.h> and
// <sys/socket.h>, and which clang module then owns IPPROTO_TCP, MSG_DONTWAIT and the rest
// depends on build order; a file importing Glibc alone fails some incremental builds.
import CUV
import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

enum TestSupport {
    /// The text of the file at `path` (UTF-8, invalid bytes repaired), or `nil` when it cannot
    /// be read. Plain POSIX reads: Foundation's `String(contentsOfFile:)` leaves its 4 KiB read
    /// buffer behind on this toolchain, which LeakSanitizer reports in `make test-asan`.
    static func readTextFile(_ path: String) -> String? {
        let descriptor = open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else { return nil }
        defer { close(descriptor) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 16_384)
        while true {
            let count = chunk.withUnsafeMutableBytes { read(descriptor, $0.baseAddress, $0.count) }
            if count < 0 {
                if errno == EINTR { continue }
                return nil
            }
            if count == 0 { break }
            bytes.append(contentsOf: chunk[..<count])
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// The package root (the folder holding Package.swift).
    static let repoRoot: URL = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent()  // Support
        .deletingLastPathComponent()  // DflockdClientTests
        .deletingLastPathComponent()  // Tests
        .deletingLastPathComponent()  // <repo>

    /// `<repo>/Tests/DflockdClientTests/Transcripts`, the vendored copies.
    static let transcriptsDirectory: URL = repoRoot
        .appendingPathComponent("Tests/DflockdClientTests/Transcripts", isDirectory: true)

    /// `<repo>/../shared/transcripts`, the originals (present on developer machines and in CI's
    /// checkout layout, absent elsewhere).
    static let sharedTranscriptsDirectory: URL = repoRoot
        .deletingLastPathComponent()
        .appendingPathComponent("shared/transcripts", isDirectory: true)

    /// Text of a vendored transcript, e.g. `transcript("go-1.10-auth.txt")`.
    static func transcript(_ name: String, in directory: URL = transcriptsDirectory) throws -> String {
        let url = directory.appendingPathComponent(name)
        do {
            return try String(contentsOf: url, encoding: .utf8)
        } catch {
            let known = (try? FileManager.default.contentsOfDirectory(atPath: directory.path))?
                .sorted().joined(separator: ", ") ?? "none"
            throw TestSupportError("cannot read transcript \(url.path): \(error). Known transcripts: \(known)")
        }
    }

    /// `<repo>/Tests/DflockdClientTests/DocumentedReplies`: exchanges written by hand from the
    /// servers' documented replies, for servers no machine here can run (each file says so).
    static let documentedRepliesDirectory: URL = repoRoot
        .appendingPathComponent("Tests/DflockdClientTests/DocumentedReplies", isDirectory: true)

    /// Text of a transcript in ``documentedRepliesDirectory``, e.g. `documentedReplies("doc-cluster.txt")`.
    static func documentedReplies(_ name: String) throws -> String {
        try transcript(name, in: documentedRepliesDirectory)
    }

    /// File names of the vendored transcripts, sorted.
    static func transcriptNames() throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: transcriptsDirectory.path)
            .filter { $0.hasSuffix(".txt") }.sorted()
    }

    /// Bytes shown the way Python shows them and the transcripts spell them: `b'l\nk\n5\n'`.
    static func pythonBytes<C: Collection>(_ bytes: C) -> String where C.Element == UInt8 {
        var out = "b'"
        for b in bytes {
            switch b {
            case 0x5C: out += "\\\\"
            case 0x27: out += "\\'"
            case 0x0A: out += "\\n"
            case 0x0D: out += "\\r"
            case 0x09: out += "\\t"
            case 0x20...0x7E: out.unicodeScalars.append(Unicode.Scalar(b))
            default:
                let hex = String(b, radix: 16)
                out += "\\x" + (hex.count == 1 ? "0" + hex : hex)
            }
        }
        return out + "'"
    }

    /// Parses a Python bytes literal (`b'...'` or `b"..."`) with the escapes Python's repr uses:
    /// `\n \r \t \\ \' \" \xNN`. Non-ASCII characters (allowed in hand-written scripts) stand
    /// for their UTF-8 bytes.
    static func parsePythonBytes(_ literal: Substring) throws -> [UInt8] {
        let s = Array(literal.utf8)
        guard s.count >= 3, s[0] == UInt8(ascii: "b"), s[1] == UInt8(ascii: "'") || s[1] == UInt8(ascii: "\""),
              s[s.count - 1] == s[1]
        else { throw TestSupportError("not a Python bytes literal b'...': \(literal)") }
        var out: [UInt8] = []
        var i = 2
        let end = s.count - 1
        while i < end {
            let c = s[i]
            if c != UInt8(ascii: "\\") {
                out.append(c)
                i += 1
                continue
            }
            guard i + 1 < end else { throw TestSupportError("dangling backslash in \(literal)") }
            let e = s[i + 1]
            switch e {
            case UInt8(ascii: "n"): out.append(0x0A); i += 2
            case UInt8(ascii: "r"): out.append(0x0D); i += 2
            case UInt8(ascii: "t"): out.append(0x09); i += 2
            case UInt8(ascii: "\\"), UInt8(ascii: "'"), UInt8(ascii: "\""): out.append(e); i += 2
            case UInt8(ascii: "x"):
                guard i + 3 < end,
                      let v = UInt8(String(decoding: s[(i + 2)...(i + 3)], as: UTF8.self), radix: 16)
                else { throw TestSupportError("bad \\x escape in \(literal)") }
                out.append(v)
                i += 4
            default:
                throw TestSupportError("unsupported escape \\\(Character(Unicode.Scalar(e))) in \(literal)")
            }
        }
        return out
    }
}

/// Error thrown by the shared helpers; the message says what went wrong.
struct TestSupportError: Error, CustomStringConvertible {
    let description: String
    init(_ message: String) { description = message }
}

extension Duration {
    /// Whole milliseconds, rounded up, clamped to Int32 (for poll(2)).
    var supportPollMilliseconds: Int32 {
        let (seconds, attoseconds) = components
        if seconds < 0 { return 0 }
        let ms = seconds * 1000 + (attoseconds + 999_999_999_999_999) / 1_000_000_000_000_000
        return Int32(clamping: ms)
    }

    /// For messages: "10 s", "200 ms", "1.5 s".
    var supportDescription: String {
        let (seconds, attoseconds) = components
        let ms = seconds * 1000 + attoseconds / 1_000_000_000_000_000
        if ms < 1000 { return "\(ms) ms" }
        if ms % 1000 == 0 { return "\(ms / 1000) s" }
        return "\(Double(ms) / 1000) s"
    }
}

/// Minimal POSIX socket helpers, 127.0.0.1 only. Every descriptor is close-on-exec so
/// spawned servers never inherit a test's sockets.
enum SupportSocket {
    // With swift-service-lifecycle and swift-metrics in the test target, some of Glibc's
    // enum-backed macros (IPPROTO_TCP, MSG_DONTWAIT) are no longer visible in every file that
    // imports Glibc: their Linux values, spelled once here.
    /// `IPPROTO_TCP`.
    static let tcpLevel: Int32 = 6
    /// `MSG_PEEK | MSG_DONTWAIT`.
    static let peekWithoutWaiting: Int32 = 0x02 | 0x40

    static func errnoDescription(_ code: Int32 = errno) -> String {
        String(cString: strerror(code)) + " (errno \(code))"
    }

    private static func loopbackAddress(port: Int) -> sockaddr_in {
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(truncatingIfNeeded: port)).bigEndian
        addr.sin_addr.s_addr = in_addr_t(0x7F00_0001).bigEndian  // 127.0.0.1
        return addr
    }

    private static func newTCPSocket() throws -> Int32 {
        #if os(Linux)
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        #else
        let fd = socket(AF_INET, SOCK_STREAM, 0)
        if fd >= 0 { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        #endif
        guard fd >= 0 else { throw TestSupportError("socket() failed: \(errnoDescription())") }
        #if canImport(Darwin)
        var one: Int32 = 1
        _ = setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, socklen_t(MemoryLayout<Int32>.size))
        #endif
        return fd
    }

    /// Blocking connect to 127.0.0.1:port. Returns the descriptor (blocking mode).
    static func connectLoopback(port: Int) throws -> Int32 {
        let fd = try newTCPSocket()
        var addr = loopbackAddress(port: port)
        var rc: Int32
        repeat {
            rc = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
        } while rc != 0 && errno == EINTR
        if rc != 0 {
            let code = errno
            _ = close(fd)
            throw TestSupportError("cannot connect to 127.0.0.1:\(port): \(errnoDescription(code))")
        }
        var one: Int32 = 1
        _ = setsockopt(fd, SupportSocket.tcpLevel, TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        return fd
    }

    /// True if something accepts TCP connections on 127.0.0.1:port right now.
    static func canConnect(port: Int) -> Bool {
        guard let fd = try? connectLoopback(port: port) else { return false }
        _ = close(fd)
        return true
    }

    /// A listening socket on 127.0.0.1 (port 0 = kernel's choice). Returns descriptor and port.
    static func listenLoopback(port: Int = 0, backlog: Int32 = 64) throws -> (fd: Int32, port: Int) {
        let fd = try newTCPSocket()
        var one: Int32 = 1
        _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = loopbackAddress(port: port)
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard rc == 0, listen(fd, backlog) == 0 else {
            let code = errno
            _ = close(fd)
            throw TestSupportError("cannot listen on 127.0.0.1:\(port): \(errnoDescription(code))")
        }
        var bound = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &bound) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        return (fd, Int(UInt16(bigEndian: bound.sin_port)))
    }

    /// A port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
    static func freePort() throws -> Int {
        let (fd, port) = try listenLoopback()
        _ = close(fd)
        return port
    }

    /// `close(2)`, callable from types that have a `close()` method of their own.
    @discardableResult
    static func closeFD(_ fd: Int32) -> Int32 { close(fd) }

    static func setNonBlocking(_ fd: Int32) {
        let flags = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
    }

    /// Writes all bytes (blocking descriptor), never raising SIGPIPE.
    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) throws {
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { raw in
                send(fd, raw.baseAddress! + offset, raw.count - offset, sendFlags)
            }
            if n < 0 {
                if errno == EINTR { continue }
                throw TestSupportError("write failed after \(offset) of \(bytes.count) bytes: \(errnoDescription())")
            }
            offset += n
        }
    }

    #if os(Linux)
    static let sendFlags = Int32(MSG_NOSIGNAL)
    #else
    static let sendFlags: Int32 = 0
    #endif

    /// poll(2) on one descriptor; returns revents (0 on timeout). Retries EINTR.
    static func pollOne(_ fd: Int32, events: Int16, timeoutMilliseconds: Int32) -> Int16 {
        var p = pollfd(fd: fd, events: events, revents: 0)
        while true {
            let rc = poll(&p, 1, timeoutMilliseconds)
            if rc >= 0 { return rc == 0 ? 0 : p.revents }
            if errno != EINTR { return Int16(POLLERR) }
        }
    }
}

extension TestSupport {
    /// The whole text of a /proc file. Foundation's `String(contentsOfFile:)` trusts the size
    /// the file reports (0 for /proc) and does a single read, so it sees only the first page
    /// or so: on a busy machine /proc/net/tcp holds thousands of lines and the ones a test
    /// looks for are missed. This reads until EOF.
    static func readProcFile(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { _ = close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 * 1024)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n > 0 {
                bytes += chunk[..<n]
            } else if n == 0 {
                break
            } else if errno != EINTR {
                return nil
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}
