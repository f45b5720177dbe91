// A scripted dflockd "server" on 127.0.0.1 that replays a recorded exchange, for behaviour
// the installable 0.5.0 server lacks (auth, TLS-less Go statuses, semaphores, stats, ...).
//
//     let peer = try ScriptedPeer(transcript: "go-1.10-auth.txt",
//                                 section: "auth: command before auth, wrong token, right token")
//     ... point the client under test at 127.0.0.1:\(peer.port) and drive it ...
//     try await peer.finish()          // from async code (never blocks a thread)
//     try peer.finish()                // from synchronous code (blocks until done)
//
//     let custom = try ScriptedPeer(script: """
//         A > b'l\\nk\\n5\\n'
//         A < ok 0123456789abcdef0123456789abcdef 33 fence=7
//         A < garbage line nobody asked for
//         """)
//
// Script syntax (the transcripts' own): one step per line, `<client> <op> <rest>`:
//   A > b'...'   the client writes exactly these bytes on connection A (Python bytes
//                escaping: \n \r \t \\ \' \" \xNN); the peer reads that many bytes and
//                records a mismatch as soon as one byte differs
//   A < text     the peer writes `text` + "\n" on A (text verbatim, tokens included)
//   A ~ ...      the peer closes A ("closed by server"); a later step naming A binds A to
//                the NEXT accepted connection (a reconnect)
//   A . ...      quiet window ("no reply within 1s"): the peer sends nothing on A for
//                `quietWindow` (default 200 ms, not the recorded 1 s) and records a mismatch
//                if the client sends bytes meanwhile; a client close is fine
// Extensions for hand-written scripts (never in transcripts):
//   A << b'...'  the peer writes exactly these bytes (no "\n" added): partial lines, CRLF, ...
//   A ! ...      the peer waits until the client closes A (bytes arriving first = mismatch)
// Lines starting with `#` and blank lines are ignored. In a transcript, the steps of a section
// are the lines after `## <title>` up to the next `## `; `init(script:)` takes every line.
//
// Steps run strictly in order on the peer's own thread. Client letters bind to accepted
// connections in order of first use: the first accepted connection is the first letter the
// script names, and so on; a letter is accepted lazily when a step first needs it.
// On the first failure the peer closes every connection (so a client waiting for a reply
// fails fast) and `finish` throws a ScriptedPeerError naming the step, its line, the
// expected and received bytes, and the steps done before it. After the last step the
// connections stay open until `stop()`/deinit; `finish` then also fails if a client sent
// bytes the script does not account for (best effort: bytes that already arrived).

import CUV  // see TestSupport.swift: the socket constants of <netinet/in.h> may live in CUV
@testable import DflockdClient
import Dispatch
import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

struct ScriptedPeerError: Error, CustomStringConvertible {
    let description: String
    init(_ message: String) { description = message }
}

/// One parsed script line.
struct ScriptStep: Sendable, CustomStringConvertible {
    enum Action: Sendable, Equatable {
        case expect([UInt8])       // `>`
        case reply([UInt8])        // `<` (with "\n") and `<<`
        case close                 // `~`
        case quiet                 // `.`
        case expectClientClose     // `!`
    }

    let client: String
    let action: Action
    /// 1-based line number in its source (transcript file or inline script).
    let line: Int
    /// The source line as written.
    let text: String

    var description: String { "line \(line): \(text)" }

    /// Parses one step line.
    init(parsing source: Substring, line: Int) throws {
        self.line = line
        text = String(source)
        guard let firstSpace = source.firstIndex(of: " ") else {
            throw ScriptedPeerError("line \(line): not a step (expected `<client> <op> ...`): \(source)")
        }
        client = String(source[..<firstSpace])
        guard client.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "_" }) else {
            throw ScriptedPeerError("line \(line): bad client name \"\(client)\" in: \(source)")
        }
        let afterClient = source[source.index(after: firstSpace)...]
        let opEnd = afterClient.firstIndex(of: " ") ?? afterClient.endIndex
        let op = afterClient[..<opEnd]
        let rest = opEnd == afterClient.endIndex ? afterClient[opEnd...] : afterClient[afterClient.index(after: opEnd)...]
        do {
            switch op {
            case ">": action = .expect(try TestSupport.parsePythonBytes(rest))
            case "<": action = .reply(Array(rest.utf8) + [0x0A])
            case "<<": action = .reply(try TestSupport.parsePythonBytes(rest))
            case "~": action = .close
            case ".": action = .quiet
            case "!": action = .expectClientClose
            default: throw ScriptedPeerError("unknown op \"\(op)\" (known: > < << ~ . !)")
            }
        } catch {
            throw ScriptedPeerError("line \(line): \(error): \(source)")
        }
        if case .expect(let bytes) = action, bytes.isEmpty {
            throw ScriptedPeerError("line \(line): `>` with no bytes: \(source)")
        }
    }

    /// Titles of the `## ` sections of a transcript, in order.
    static func sectionTitles(inTranscript text: String) -> [String] {
        text.split(separator: "\n", omittingEmptySubsequences: false)
            .filter { $0.hasPrefix("## ") }
            .map { String($0.dropFirst(3)).trimmingCharacters(in: .whitespaces) }
    }

    /// The steps of the section titled `section` (exact match after "## ").
    static func steps(inTranscript text: String, section: String, name: String) throws -> [ScriptStep] {
        var steps: [ScriptStep] = []
        var inSection = false
        var found = false
        for (i, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.hasSuffix("\r") ? raw.dropLast() : raw
            if line.hasPrefix("## ") {
                inSection = line.dropFirst(3).trimmingCharacters(in: .whitespaces) == section
                found = found || inSection
                continue
            }
            if inSection, !line.hasPrefix("#"), !line.trimmingCharacters(in: .whitespaces).isEmpty {
                steps.append(try ScriptStep(parsing: line, line: i + 1))
            }
        }
        guard found else {
            let titles = sectionTitles(inTranscript: text).map { "  \"\($0)\"" }.joined(separator: "\n")
            throw ScriptedPeerError("\(name) has no section \"\(section)\". Its sections:\n\(titles)")
        }
        return steps
    }

    /// Every step line of an inline script (`#` lines and blank lines ignored).
    static func steps(inScript text: String) throws -> [ScriptStep] {
        var steps: [ScriptStep] = []
        for (i, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            var line = raw.hasSuffix("\r") ? raw.dropLast() : raw
            while line.first == " " || line.first == "\t" { line = line.dropFirst() }
            if line.isEmpty || line.hasPrefix("#") { continue }
            steps.append(try ScriptStep(parsing: line, line: i + 1))
        }
        return steps
    }
}

final class ScriptedPeer: Sendable {
    /// The port on 127.0.0.1 the peer listens on.
    let port: Int
    /// The parsed steps it replays.
    let steps: [ScriptStep]
    private let engine: PeerEngine

    /// Replays section `section` (the text after "## ") of the vendored transcript `transcript`
    /// (a file name in Tests/DflockdClientTests/Transcripts, e.g. "go-1.10-auth.txt").
    convenience init(transcript: String, section: String, quietWindow: Duration = .milliseconds(200)) throws {
        let text = try TestSupport.transcript(transcript)
        let steps = try ScriptStep.steps(inTranscript: text, section: section, name: transcript)
        try self.init(steps: steps, origin: "\(transcript) § \"\(section)\"", quietWindow: quietWindow)
    }

    /// Replays one section of a transcript written from a server's documented replies
    /// (`Tests/DflockdClientTests/DocumentedReplies/`), after replacing each key of
    /// `substitutions` (e.g. `{leader}`) in its text.
    convenience init(documented name: String, section: String, substitutions: [String: String] = [:],
                     quietWindow: Duration = .milliseconds(200)) throws {
        var text = try TestSupport.documentedReplies(name)
        for (placeholder, value) in substitutions {
            text = text.replacingOccurrences(of: placeholder, with: value)
        }
        let steps = try ScriptStep.steps(inTranscript: text, section: section, name: name)
        try self.init(steps: steps, origin: "\(name) § \"\(section)\"", quietWindow: quietWindow)
    }

    /// Replays an inline script (same syntax; every non-comment line is a step).
    convenience init(script: String, quietWindow: Duration = .milliseconds(200)) throws {
        try self.init(steps: try ScriptStep.steps(inScript: script), origin: "inline script", quietWindow: quietWindow)
    }

    private init(steps: [ScriptStep], origin: String, quietWindow: Duration) throws {
        guard !steps.isEmpty else { throw ScriptedPeerError("ScriptedPeer(\(origin)): the script has no steps") }
        self.steps = steps
        engine = try PeerEngine(steps: steps, origin: origin, quietWindow: quietWindow)
        port = engine.port
        engine.start()
    }

    deinit { engine.stop() }

    /// Waits (blocking this thread) until every step ran; throws on a mismatch, an early
    /// client disconnect, unscripted bytes, or when `timeout` expires first (the peer then
    /// stops). In async code the async overload is chosen: use `try await peer.finish()`.
    func finish(timeout: Duration = .seconds(10)) throws {
        engine.setDeadline(after: timeout)
        engine.done.wait()
        try engine.verdict()
    }

    /// As the synchronous `finish`, without blocking a thread. Cancelling the awaiting task
    /// stops the peer and makes this throw.
    func finish(timeout: Duration = .seconds(10)) async throws {
        engine.setDeadline(after: timeout)
        let engine = self.engine
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                engine.done.notify(queue: .global()) { continuation.resume() }
            }
        } onCancel: {
            engine.stop()
        }
        try engine.verdict()
    }

    /// True once the script ran to its end, failed, or was stopped.
    var isDone: Bool { engine.done.wait(timeout: .now()) == .success }

    /// Stops the peer and closes every connection and the listener. Idempotent.
    func stop() { engine.stop() }
}

/// The machinery behind ScriptedPeer. The engine thread alone uses the descriptors while it
/// runs; afterwards they are only touched under `shared`.
private final class PeerEngine: @unchecked Sendable {
    let steps: [ScriptStep]
    let origin: String
    let quietWindow: Duration
    let listenFD: Int32
    let port: Int
    /// Self-pipe that wakes the engine thread's poll (stop, new deadline).
    private let wakeRead: Int32
    private let wakeWrite: Int32
    /// Entered at creation, left when the engine thread ends.
    let done = DispatchGroup()

    private struct Shared {
        var deadline: ContinuousClock.Instant?
        var deadlineReason = ""
        var stopRequested = false
        var threadRunning = true
        var completed = false
        var failure: String?
        /// Open connection descriptors and the script letter each is bound to.
        var connections: [Int32: String] = [:]
        var listenerOpen = true
    }

    private let shared = ThreadLock(Shared())

    init(steps: [ScriptStep], origin: String, quietWindow: Duration) throws {
        self.steps = steps
        self.origin = origin
        self.quietWindow = quietWindow
        do {
            (listenFD, port) = try SupportSocket.listenLoopback()
        } catch {
            throw ScriptedPeerError("ScriptedPeer(\(origin)): \(error)")
        }
        SupportSocket.setNonBlocking(listenFD)
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else {
            SupportSocket.closeFD(listenFD)
            throw ScriptedPeerError("ScriptedPeer: pipe() failed: \(SupportSocket.errnoDescription())")
        }
        for fd in fds {
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            SupportSocket.setNonBlocking(fd)
        }
        (wakeRead, wakeWrite) = (fds[0], fds[1])
        done.enter()
    }

    deinit {
        shared.withLock { closeEverything(&$0) }
        SupportSocket.closeFD(wakeRead)
        SupportSocket.closeFD(wakeWrite)
    }

    func start() {
        let thread = Thread { [self] in
            run()
            shared.withLock { s in
                s.threadRunning = false
                if s.failure != nil || s.stopRequested { closeEverything(&s) }
            }
            done.leave()
        }
        thread.name = "ScriptedPeer \(port)"
        thread.start()
    }

    func setDeadline(after timeout: Duration) {
        let deadline = ContinuousClock.now.advanced(by: timeout)
        shared.withLock { s in
            if s.deadline == nil || deadline < s.deadline! {
                s.deadline = deadline
                s.deadlineReason = "finish(timeout: \(timeout.supportDescription)) expired"
            }
        }
        wake()
    }

    func stop() {
        shared.withLock { s in
            s.stopRequested = true
            if !s.threadRunning { closeEverything(&s) }
        }
        wake()
    }

    /// Throws the failure, if any; after success, looks for bytes nobody scripted.
    func verdict() throws {
        try shared.withLock { s in
            if let failure = s.failure { throw ScriptedPeerError(failure) }
            guard s.completed else {
                throw ScriptedPeerError("ScriptedPeer (\(origin)): stopped before the script finished")
            }
            var problems: [String] = []
            // Connections the client opened beyond those the script names: complain only if
            // they carry bytes.
            if s.listenerOpen {
                while true {
                    let fd = accept(listenFD, nil, nil)
                    guard fd >= 0 else { break }
                    _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                    SupportSocket.setNonBlocking(fd)
                    s.connections[fd] = "(unscripted connection)"
                }
            }
            for (fd, name) in s.connections.sorted(by: { $0.key < $1.key }) {
                var buffer = [UInt8](repeating: 0, count: 4096)
                let n = recv(fd, &buffer, buffer.count, SupportSocket.peekWithoutWaiting)
                if n > 0 {
                    problems.append("connection \(name) received unscripted bytes after the last step: \(TestSupport.pythonBytes(buffer[..<n]))")
                }
            }
            if !problems.isEmpty {
                throw ScriptedPeerError("ScriptedPeer (\(origin)): all \(steps.count) steps ran, but:\n  " + problems.joined(separator: "\n  "))
            }
        }
    }

    // MARK: - engine thread

    private enum Abort: Error {
        case stopped
        case timedOut(String)
        case failed(String)
    }

    /// What the engine thread alone knows.
    private struct Progress {
        var bound: [String: Int32] = [:]
        var acceptedCount = 0
        var ordinal: [String: Int] = [:]  // letter -> number of its current accepted connection
        var done: [ScriptStep] = []
    }

    private func run() {
        var progress = Progress()
        for (index, step) in steps.enumerated() {
            do {
                try execute(step, &progress)
                progress.done.append(step)
            } catch {
                let what: String
                switch error as? Abort {
                case .stopped?: what = "stopped (stop() was called, or the task awaiting finish() was cancelled)"
                case .timedOut(let m)?: what = "timed out: \(m)"
                case .failed(let m)?: what = m
                case nil: what = "\(error)"
                }
                var message = "ScriptedPeer (\(origin)): step \(index + 1) of \(steps.count) failed\n"
                message += "  at \(step)\n  \(what.replacingOccurrences(of: "\n", with: "\n  "))"
                if !progress.done.isEmpty {
                    message += "\n  steps done before it:"
                    if progress.done.count > 12 { message += "\n    …" }
                    for s in progress.done.suffix(12) { message += "\n    \(s)" }
                }
                shared.withLock { $0.failure = message }
                return
            }
        }
        shared.withLock { $0.completed = true }
    }

    private func name(_ client: String, _ progress: Progress) -> String {
        "\(client) (accepted connection #\(progress.ordinal[client] ?? 0))"
    }

    private func execute(_ step: ScriptStep, _ progress: inout Progress) throws {
        let client = step.client
        let fd = try connection(for: client, &progress)
        let conn = name(client, progress)
        switch step.action {
        case .expect(let expected):
            var received: [UInt8] = []
            var buffer = [UInt8](repeating: 0, count: 4096)
            while received.count < expected.count {
                do {
                    _ = try waitFor(fd, events: Int16(POLLIN))
                } catch Abort.timedOut(let reason) {
                    throw Abort.timedOut("\(reason) while waiting for \(conn) to send \(TestSupport.pythonBytes(expected)) (received so far: \(TestSupport.pythonBytes(received)))")
                }
                let n = recv(fd, &buffer, min(buffer.count, expected.count - received.count), 0)
                if n > 0 {
                    received += buffer[..<n]
                    if !expected.starts(with: received) {
                        received += readMore(fd, limit: expected.count + 256 - received.count)
                        throw Abort.failed("""
                            mismatch on connection \(conn):
                              expected \(TestSupport.pythonBytes(expected))
                              received \(TestSupport.pythonBytes(received))
                            """)
                    }
                } else if n == 0 || errno == ECONNRESET {
                    throw Abort.failed("the client closed connection \(conn) while the peer expected \(TestSupport.pythonBytes(expected)) (received before the close: \(TestSupport.pythonBytes(received)))")
                } else if errno != EAGAIN && errno != EINTR {
                    throw Abort.failed("reading from \(conn): \(SupportSocket.errnoDescription())")
                }
            }

        case .reply(let bytes):
            if clientHasClosed(fd) {
                throw Abort.failed("the client closed connection \(conn) before the peer could send \(TestSupport.pythonBytes(bytes))")
            }
            var offset = 0
            while offset < bytes.count {
                let n = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + offset, $0.count - offset, SupportSocket.sendFlags) }
                if n >= 0 {
                    offset += n
                } else if errno == EAGAIN {
                    do {
                        _ = try waitFor(fd, events: Int16(POLLOUT))
                    } catch Abort.timedOut(let reason) {
                        throw Abort.timedOut("\(reason) while writing \(TestSupport.pythonBytes(bytes)) to \(conn) (the client is not reading)")
                    }
                } else if errno == EPIPE || errno == ECONNRESET {
                    throw Abort.failed("the client closed connection \(conn) before the peer could send \(TestSupport.pythonBytes(bytes))")
                } else if errno != EINTR {
                    throw Abort.failed("writing to \(conn): \(SupportSocket.errnoDescription())")
                }
            }

        case .close:
            unbind(client, fd, &progress)

        case .quiet:
            let end = ContinuousClock.now.advanced(by: quietWindow)
            while try waitFor(fd, events: Int16(POLLIN), until: end) != nil {
                var buffer = [UInt8](repeating: 0, count: 4096)
                let n = recv(fd, &buffer, buffer.count, 0)
                if n > 0 {
                    let more = readMore(fd, limit: 256)
                    throw Abort.failed("expected nothing from \(conn) for \(quietWindow.supportDescription) (`.` step), received \(TestSupport.pythonBytes(buffer[..<n] + more))")
                }
                if n == 0 || errno == ECONNRESET { break }  // the client closed: fine here
            }

        case .expectClientClose:
            while true {
                do {
                    _ = try waitFor(fd, events: Int16(POLLIN))
                } catch Abort.timedOut(let reason) {
                    throw Abort.timedOut("\(reason) while waiting for the client to close \(conn)")
                }
                var buffer = [UInt8](repeating: 0, count: 4096)
                let n = recv(fd, &buffer, buffer.count, 0)
                if n > 0 {
                    throw Abort.failed("expected the client to close \(conn), but it sent \(TestSupport.pythonBytes(buffer[..<n] + readMore(fd, limit: 256)))")
                }
                if n == 0 || errno == ECONNRESET {
                    unbind(client, fd, &progress)
                    return
                }
            }
        }
    }

    /// The connection bound to `client`, accepting the next one if the letter is unbound.
    private func connection(for client: String, _ progress: inout Progress) throws -> Int32 {
        if let fd = progress.bound[client] { return fd }
        while true {
            do {
                _ = try waitFor(listenFD, events: Int16(POLLIN))
            } catch Abort.timedOut(let reason) {
                throw Abort.timedOut("\(reason) while waiting for the client to open connection \(client) (it would be accepted connection #\(progress.acceptedCount + 1))")
            }
            let fd = accept(listenFD, nil, nil)
            if fd < 0 {
                if errno == EAGAIN || errno == EINTR || errno == ECONNABORTED { continue }
                throw Abort.failed("accept failed: \(SupportSocket.errnoDescription())")
            }
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            SupportSocket.setNonBlocking(fd)
            progress.acceptedCount += 1
            progress.bound[client] = fd
            progress.ordinal[client] = progress.acceptedCount
            shared.withLock { $0.connections[fd] = client }
            return fd
        }
    }

    private func unbind(_ client: String, _ fd: Int32, _ progress: inout Progress) {
        progress.bound[client] = nil
        shared.withLock { _ = $0.connections.removeValue(forKey: fd) }
        SupportSocket.closeFD(fd)
    }

    /// Waits for `events` on `fd`. Returns revents, or nil once `until` passes. Throws when
    /// stopped or when the finish deadline passes.
    private func waitFor(_ fd: Int32, events: Int16, until local: ContinuousClock.Instant? = nil) throws -> Int16? {
        while true {
            let (deadline, reason, stopped) = shared.withLock { ($0.deadline, $0.deadlineReason, $0.stopRequested) }
            if stopped { throw Abort.stopped }
            let now = ContinuousClock.now
            if let deadline, now >= deadline { throw Abort.timedOut(reason) }
            if let local, now >= local { return nil }
            let next = [deadline, local].compactMap { $0 }.min()
            let timeout = next.map { ($0 - now).supportPollMilliseconds } ?? -1
            var fds = [pollfd(fd: fd, events: events, revents: 0), pollfd(fd: wakeRead, events: Int16(POLLIN), revents: 0)]
            let rc = poll(&fds, 2, timeout)
            if rc < 0 {
                if errno == EINTR { continue }
                throw Abort.failed("poll failed: \(SupportSocket.errnoDescription())")
            }
            if fds[1].revents != 0 {
                var sink = [UInt8](repeating: 0, count: 64)
                while read(wakeRead, &sink, sink.count) > 0 {}
            }
            if fds[0].revents != 0 { return fds[0].revents }
        }
    }

    /// True if the client has closed its side and nothing more is pending to read.
    private func clientHasClosed(_ fd: Int32) -> Bool {
        guard SupportSocket.pollOne(fd, events: Int16(POLLIN), timeoutMilliseconds: 0) != 0 else { return false }
        var byte: UInt8 = 0
        let n = recv(fd, &byte, 1, SupportSocket.peekWithoutWaiting)
        return n == 0 || (n < 0 && errno == ECONNRESET)
    }

    /// For messages: whatever else arrives within 100 ms (up to `limit` bytes).
    private func readMore(_ fd: Int32, limit: Int) -> [UInt8] {
        var out: [UInt8] = []
        let end = ContinuousClock.now.advanced(by: .milliseconds(100))
        var buffer = [UInt8](repeating: 0, count: 4096)
        while out.count < limit {
            let remaining = end - ContinuousClock.now
            guard remaining > .zero,
                  SupportSocket.pollOne(fd, events: Int16(POLLIN), timeoutMilliseconds: remaining.supportPollMilliseconds) != 0
            else { break }
            let n = recv(fd, &buffer, min(buffer.count, limit - out.count), 0)
            if n <= 0 { break }
            out += buffer[..<n]
        }
        return out
    }

    private func wake() {
        var byte: UInt8 = 1
        _ = write(wakeWrite, &byte, 1)
    }

    private func closeEverything(_ s: inout Shared) {
        for fd in s.connections.keys { SupportSocket.closeFD(fd) }
        s.connections = [:]
        if s.listenerOpen {
            SupportSocket.closeFD(listenFD)
            s.listenerOpen = false
        }
    }
}
