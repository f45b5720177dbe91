// A tiny blocking dflockd client on plain POSIX sockets, independent of the library under
// test, for cross-checks ("does the server agree the library holds the lock?").
//
//     let raw = try RawClient(port: server.port)
//     let reply = try raw.send("l", "job", "5")          // "ok <token> 33"
//     try raw.sendNoReply("l", "job", "5")               // reply read later with readLine()
//     let line = try raw.readLine(timeout: .seconds(2))  // nil = server closed the connection
//     raw.close()
//
// Calls block the calling thread (up to their timeout). It is safe to call `close()` from
// another thread while a read is blocked: the read ends with RawClientError.closedLocally.
// Nothing is validated: a RawClient sends whatever it is given (handy for malformed input).

import CUV  // see TestSupport.swift: the socket constants of <netinet/in.h> may live in CUV
@testable import DflockdClient
import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

enum RawClientError: Error, CustomStringConvertible {
    /// No complete reply line arrived within the timeout.
    case timedOut(String)
    /// The server closed the connection where a reply was expected.
    case closedByServer(String)
    /// `close()` was called on this client (possibly from another thread).
    case closedLocally
    /// Connect / read / write failed.
    case io(String)

    var description: String {
        switch self {
        case .timedOut(let m): return "RawClient: timed out: \(m)"
        case .closedByServer(let m): return "RawClient: closed by server: \(m)"
        case .closedLocally: return "RawClient: used after close()"
        case .io(let m): return "RawClient: \(m)"
        }
    }
}

final class RawClient: @unchecked Sendable {
    let port: Int
    /// Immutable; only closed inside `io` by `close()`, after which every call checks `isClosed`.
    private let fd: Int32
    private let isClosed = Atomic<Bool>(false)
    /// Serialises socket I/O and guards the bytes received past the last returned line.
    private let io = ThreadLock<[UInt8]>([])

    /// Connects to 127.0.0.1:port.
    init(port: Int) throws {
        self.port = port
        do {
            fd = try SupportSocket.connectLoopback(port: port)
        } catch {
            throw RawClientError.io("\(error)")
        }
    }

    deinit { close() }

    /// Writes `command\nkey\narg\n` and returns the reply line (without `\n`, a trailing `\r`
    /// stripped). Throws `.closedByServer` if the server closes instead of replying.
    func send(_ command: String, _ key: String, _ arg: String, timeout: Duration = .seconds(10)) throws -> String {
        try sendNoReply(command, key, arg)
        guard let line = try readLine(timeout: timeout) else {
            throw RawClientError.closedByServer(
                "server closed 127.0.0.1:\(port) instead of replying to \(TestSupport.pythonBytes(Self.frame(command, key, arg)))")
        }
        return line
    }

    /// Writes `command\nkey\narg\n` without reading anything.
    func sendNoReply(_ command: String, _ key: String, _ arg: String) throws {
        try write(Self.frame(command, key, arg))
    }

    /// Writes raw bytes (e.g. CRLF framing, half a request, garbage).
    func write(_ bytes: [UInt8]) throws {
        try io.withLock { _ in
            guard !isClosed.load(ordering: .acquiring) else { throw RawClientError.closedLocally }
            do {
                try SupportSocket.writeAll(fd, bytes)
            } catch {
                throw RawClientError.io("write to 127.0.0.1:\(port): \(error)")
            }
        }
    }

    func write(_ text: String) throws { try write(Array(text.utf8)) }

    /// Reads one reply line (without `\n`; a trailing `\r` stripped).
    /// Returns nil if the server closed the connection cleanly before sending anything more.
    /// Throws `.timedOut` if no complete line arrives within `timeout`, `.closedByServer` if the
    /// connection closed in the middle of a line.
    func readLine(timeout: Duration = .seconds(10)) throws -> String? {
        let deadline = ContinuousClock.now.advanced(by: timeout)
        return try io.withLock { buffer -> String? in
            while true {
                guard !isClosed.load(ordering: .acquiring) else { throw RawClientError.closedLocally }
                if let nl = buffer.firstIndex(of: 0x0A) {
                    var line = Array(buffer[..<nl])
                    buffer.removeSubrange(...nl)
                    if line.last == 0x0D { line.removeLast() }
                    return String(decoding: line, as: UTF8.self)
                }
                switch try receive(into: &buffer, until: deadline) {
                case .data: continue
                case .timedOut:
                    throw RawClientError.timedOut(
                        "no reply line from 127.0.0.1:\(port) within \(timeout.supportDescription)"
                            + (buffer.isEmpty ? "" : " (partial line so far: \(TestSupport.pythonBytes(buffer)))"))
                case .eof:
                    if buffer.isEmpty { return nil }
                    throw RawClientError.closedByServer(
                        "connection closed in the middle of a line: \(TestSupport.pythonBytes(buffer))")
                }
            }
        }
    }

    /// Waits until the server closes the connection. Throws if a line (or any byte) arrives
    /// first, or if the connection is still open after `timeout`.
    func expectClose(timeout: Duration = .seconds(10)) throws {
        let deadline = ContinuousClock.now.advanced(by: timeout)
        try io.withLock { buffer in
            while true {
                guard !isClosed.load(ordering: .acquiring) else { throw RawClientError.closedLocally }
                if !buffer.isEmpty {
                    throw RawClientError.io("expected the server to close 127.0.0.1:\(port), but it sent \(TestSupport.pythonBytes(buffer))")
                }
                switch try receive(into: &buffer, until: deadline) {
                case .data: continue
                case .eof: return
                case .timedOut:
                    throw RawClientError.timedOut("server did not close 127.0.0.1:\(port) within \(timeout.supportDescription)")
                }
            }
        }
    }

    /// Closes the connection. Idempotent; safe from any thread (wakes a blocked reader).
    func close() {
        guard !isClosed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        _ = shutdown(fd, Int32(SHUT_RDWR))  // wakes a reader blocked in poll/recv
        io.withLock { _ in _ = SupportSocket.closeFD(fd) }
    }

    // MARK: - internals

    private enum ReceiveResult { case data, eof, timedOut }

    /// One poll+recv step; appends what arrived. Must be called inside `io`.
    private func receive(into buffer: inout [UInt8], until deadline: ContinuousClock.Instant) throws -> ReceiveResult {
        let remaining = deadline - ContinuousClock.now
        if remaining <= .zero { return .timedOut }
        let revents = SupportSocket.pollOne(fd, events: Int16(POLLIN), timeoutMilliseconds: remaining.supportPollMilliseconds)
        if revents == 0 { return ContinuousClock.now >= deadline ? .timedOut : .data }
        if isClosed.load(ordering: .acquiring) { throw RawClientError.closedLocally }
        var chunk = [UInt8](repeating: 0, count: 64 * 1024)
        let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        if n > 0 {
            buffer.append(contentsOf: chunk[..<n])
            return .data
        }
        if n == 0 { return .eof }
        let code = errno
        if code == EINTR || code == EAGAIN { return .data }
        if code == ECONNRESET { return .eof }
        throw RawClientError.io("read from 127.0.0.1:\(port): \(SupportSocket.errnoDescription(code))")
    }

    private static func frame(_ command: String, _ key: String, _ arg: String) -> [UInt8] {
        Array("\(command)\n\(key)\n\(arg)\n".utf8)
    }
}
