// A TCP proxy on 127.0.0.1 between a client under test and a server, with a switch that turns
// it into a black hole: a network partition the test controls.
//
//     let proxy = try BlackHoleProxy(targetPort: server.port)
//     let lock = try DistributedLock(key: "k", servers: [("127.0.0.1", proxy.port)])
//     proxy.blackHole()  // from now on every byte, either way, is silently dropped; closes too
//     proxy.heal()       // forward again; connections that lived through the hole are reset
//     proxy.resetAll()   // RST every connection at once, on both sides
//     proxy.traffic      // what crossed the proxy, when: for "when was the last request sent"
//
// Each accepted connection gets its own connection to 127.0.0.1:targetPort (made at accept
// time; when that fails, the client's connection is reset). While the proxy forwards, bytes go
// through as they come, an EOF on one side closes both (after the bytes already read are
// delivered), and a reset on one side resets the other. While it is a black hole, the proxy
// still reads both sides, so neither peer sees back-pressure, but delivers nothing; an EOF or a
// reset is not passed on either (the other side learns nothing), and connections accepted
// meanwhile get no upstream connection at all. That is a partition as TCP peers see it: the
// server keeps a silent session until its lease or read timeout ends it, and the client's
// writes still succeed.
//
// `heal()` resets every connection that existed while the hole was on, on both sides: their
// streams lost bytes, so nothing on them can be trusted again (as after a real partition, where
// the peer has long since dropped the session and answers with RST). New connections forward.
//
// One thread runs everything with poll(2); the control methods only flip shared state and wake
// it, so they never block for long. The thread acts on a switch before it forwards anything
// more, and the control methods return once it has (so after `blackHole()` returns, nothing
// more crosses). Loopback only.

import CUV  // see TestSupport.swift: the socket constants of <netinet/in.h> may live in CUV
import Foundation
import CUV
@testable import DflockdClient

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

final class BlackHoleProxy: Sendable {
    /// The port on 127.0.0.1 clients connect to.
    let port: Int
    /// The server port every connection is forwarded to.
    let targetPort: Int

    enum Direction: Sendable, Hashable {
        /// Client to server.
        case up
        /// Server to client.
        case down
    }

    /// One chunk read from one side of one connection.
    struct Chunk: Sendable {
        /// Accepted connection number, from 1.
        let connection: Int
        let direction: Direction
        let byteCount: Int
        /// Read while the proxy was a black hole: dropped, not delivered.
        let dropped: Bool
        /// When the proxy read it (delivery follows at once when not dropped).
        let at: ContinuousClock.Instant
    }

    private let core: Core

    /// Starts the proxy thread, listening on a free port of 127.0.0.1.
    init(targetPort: Int) throws {
        core = try Core(targetPort: targetPort)
        port = core.port
        self.targetPort = targetPort
        let core = self.core
        let thread = Thread {
            var engine = Engine(core: core)
            engine.run()
            engine.closeEverything()
            core.shared.withLock { $0.threadRunning = false }
            core.finished.signal()
        }
        thread.name = "BlackHoleProxy \(port)"
        thread.start()
    }

    deinit { core.stop() }

    /// From now on drop every byte and every close, both ways, on every connection, old or new.
    func blackHole() { core.control { $0.blackHoled = true } }

    /// Forward again. Connections that existed while the hole was on are reset on both sides.
    func heal() {
        core.control { s in
            s.blackHoled = false
            s.healRequested += 1
        }
    }

    /// Resets (RST) every open connection on both sides now.
    func resetAll() { core.control { $0.resetRequested += 1 } }

    /// Whether the proxy is a black hole now.
    var isBlackHoled: Bool { core.shared.withLock { $0.blackHoled } }

    /// Everything read so far, in order.
    var traffic: [Chunk] { core.shared.withLock { $0.traffic } }

    /// Connections accepted so far, and how many of them are open.
    var connectionCounts: (accepted: Int, open: Int) { core.shared.withLock { ($0.accepted, $0.open) } }

    /// Stops the thread and closes every connection (FIN, not RST). Idempotent; blocks until
    /// the thread has ended (at most a moment: it never blocks on anything but poll).
    func stop() { core.stop() }

    // MARK: - shared between the control methods and the thread

    fileprivate struct Shared {
        var blackHoled = false
        /// Bumped by every control call; the thread acknowledges by copying it to `applied`.
        var requested = 0
        var applied = 0
        var resetRequested = 0
        var healRequested = 0
        var stopRequested = false
        var threadRunning = true
        var traffic: [Chunk] = []
        var accepted = 0
        var open = 0
    }

    /// What the thread needs; it outlives the proxy object until the thread has ended.
    fileprivate final class Core: Sendable {
        let shared = ThreadLock(Shared())   // a pthread mutex, which ThreadSanitizer can see
        let port: Int
        let targetPort: Int
        let listenFD: Int32
        let wakeRead: Int32
        let wakeWrite: Int32
        let finished = DispatchSemaphore(value: 0)

        init(targetPort: Int) throws {
            self.targetPort = targetPort
            (listenFD, port) = try SupportSocket.listenLoopback(backlog: 512)
            SupportSocket.setNonBlocking(listenFD)
            var fds: [Int32] = [-1, -1]
            guard pipe(&fds) == 0 else {
                SupportSocket.closeFD(listenFD)
                throw TestSupportError("BlackHoleProxy: pipe() failed: \(SupportSocket.errnoDescription())")
            }
            for fd in fds {
                _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                SupportSocket.setNonBlocking(fd)
            }
            (wakeRead, wakeWrite) = (fds[0], fds[1])
        }

        deinit {
            SupportSocket.closeFD(listenFD)
            SupportSocket.closeFD(wakeRead)
            SupportSocket.closeFD(wakeWrite)
        }

        func stop() {
            let running = shared.withLock { s -> Bool in
                let running = s.threadRunning && !s.stopRequested
                s.stopRequested = true
                return running
            }
            guard running else { return }
            wake()
            finished.wait()
        }

        /// Applies `change`, wakes the thread and waits (briefly: the thread never blocks on
        /// anything but poll) until it has acted on it.
        func control(_ change: (inout Shared) -> Void) {
            let (ticket, running) = shared.withLock { s -> (Int, Bool) in
                change(&s)
                s.requested += 1
                return (s.requested, s.threadRunning)
            }
            guard running else { return }
            wake()
            var pause: UInt32 = 50
            while shared.withLock({ $0.applied < ticket && $0.threadRunning }) {
                usleep(pause)
                pause = min(pause * 2, 1000)
            }
        }

        func wake() {
            var byte: UInt8 = 1
            _ = write(wakeWrite, &byte, 1)
        }
    }

    // MARK: - the proxy thread

    /// The thread's own state: only the proxy thread touches it.
    private struct Engine {
        let core: Core

        final class Pair {
            let id: Int
            /// The client's side (accepted) and the server's side (connected; -1 when none).
            var client: Int32
            var server: Int32
            /// Bytes read but not yet written, per direction.
            var toServer: [UInt8] = []
            var toClient: [UInt8] = []
            /// The pair lived through a black hole: it is reset when the hole heals.
            var poisoned = false
            /// EOF seen on that side while forwarding: close once the other way is flushed.
            var closing = false

            init(id: Int, client: Int32, server: Int32) {
                self.id = id
                self.client = client
                self.server = server
            }
        }

        var pairs: [Pair] = []
        var blackHoled = false
        var seenReset = 0
        var seenHeal = 0

        init(core: Core) { self.core = core }

        mutating func run() {
            var buffer = [UInt8](repeating: 0, count: 64 * 1024)
            while true {
                let (stop, hole, reset, heal, requested) = core.shared.withLock {
                    ($0.stopRequested, $0.blackHoled, $0.resetRequested, $0.healRequested, $0.requested)
                }
                if stop { return }
                if reset != seenReset {
                    seenReset = reset
                    for pair in pairs { resetPair(pair) }
                    pairs.removeAll()
                }
                if heal != seenHeal {
                    seenHeal = heal
                    for pair in pairs where pair.poisoned || pair.server < 0 { resetPair(pair) }
                    pairs.removeAll { $0.client < 0 && $0.server < 0 }
                }
                blackHoled = hole
                if hole {
                    for pair in pairs {
                        pair.poisoned = true
                        pair.toServer.removeAll()
                        pair.toClient.removeAll()
                    }
                }
                core.shared.withLock { s in
                    s.applied = max(s.applied, requested)
                    s.open = pairs.count
                }

                var fds = [pollfd(fd: core.wakeRead, events: Int16(POLLIN), revents: 0),
                           pollfd(fd: core.listenFD, events: Int16(POLLIN), revents: 0)]
                for pair in pairs {
                    fds.append(pollfd(fd: pair.client, events: events(pending: pair.toClient), revents: 0))
                    fds.append(pollfd(fd: pair.server, events: events(pending: pair.toServer), revents: 0))
                }
                let rc = poll(&fds, nfds_t(fds.count), -1)
                if rc < 0 {
                    if errno == EINTR { continue }
                    return
                }
                if fds[0].revents != 0 {
                    var sink = [UInt8](repeating: 0, count: 256)
                    while read(core.wakeRead, &sink, sink.count) > 0 {}
                    // Act on a control change before forwarding another byte.
                    continue
                }
                for (index, pair) in pairs.enumerated() {
                    let clientEvents = fds[2 + 2 * index].revents
                    let serverEvents = fds[3 + 2 * index].revents
                    if clientEvents != 0 { service(pair, side: .up, revents: clientEvents, buffer: &buffer) }
                    if serverEvents != 0 { service(pair, side: .down, revents: serverEvents, buffer: &buffer) }
                }
                pairs.removeAll { $0.client < 0 && $0.server < 0 }
                if fds[1].revents != 0 { acceptAll() }
            }
        }

        /// Always read (a test's traffic is small, so no back-pressure); write when bytes
        /// wait. poll ignores a closed side (-1).
        private func events(pending: [UInt8]) -> Int16 {
            pending.isEmpty ? Int16(POLLIN) : Int16(POLLIN | POLLOUT)
        }

        /// Handles readiness on one side of `pair`: `side` names the direction of bytes read
        /// from it (`.up` = the client's descriptor).
        private mutating func service(_ pair: Pair, side: Direction, revents: Int16, buffer: inout [UInt8]) {
            let fd = side == .up ? pair.client : pair.server
            guard fd >= 0 else { return }
            if revents & Int16(POLLOUT) != 0 { flush(pair, toward: side == .up ? .down : .up) }
            guard revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 else { return }
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n > 0 {
                core.shared.withLock { s in
                    s.traffic.append(Chunk(connection: pair.id, direction: side, byteCount: n, dropped: blackHoled, at: .now))
                }
                guard !blackHoled else { return }
                if side == .up {
                    pair.toServer += buffer[..<n]
                    flush(pair, toward: .up)
                } else {
                    pair.toClient += buffer[..<n]
                    flush(pair, toward: .down)
                }
                return
            }
            if n < 0 && (errno == EAGAIN || errno == EINTR) { return }
            let wasReset = n < 0
            // This side ended (EOF or reset).
            closeSide(pair, side)
            if blackHoled { return }  // the other side learns nothing
            let other = side == .up ? pair.server : pair.client
            guard other >= 0 else { return }
            if wasReset {
                resetFD(other)
            } else {
                // Deliver what was read from the other side's peer already, then close.
                flush(pair, toward: side)
                _ = SupportSocket.closeFD(other)
            }
            if side == .up { pair.server = -1 } else { pair.client = -1 }
        }

        /// Writes what waits toward `direction` (`.up` = to the server).
        private func flush(_ pair: Pair, toward direction: Direction) {
            let fd = direction == .up ? pair.server : pair.client
            guard fd >= 0 else { return }
            var pending = direction == .up ? pair.toServer : pair.toClient
            while !pending.isEmpty {
                let n = pending.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, SupportSocket.sendFlags | Int32(MSG_DONTWAIT)) }
                if n > 0 {
                    pending.removeFirst(n)
                } else {
                    break  // EAGAIN: poll for POLLOUT; an error shows up as POLLERR/POLLHUP on read
                }
            }
            if direction == .up { pair.toServer = pending } else { pair.toClient = pending }
        }

        private mutating func acceptAll() {
            while true {
                let fd = accept(core.listenFD, nil, nil)
                if fd < 0 {
                    if errno == EINTR || errno == ECONNABORTED { continue }
                    return  // EAGAIN: nothing more waits
                }
                _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                var one: Int32 = 1
                _ = setsockopt(fd, SupportSocket.tcpLevel, TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                let id = core.shared.withLock { s -> Int in
                    s.accepted += 1
                    return s.accepted
                }
                var server: Int32 = -1
                if !blackHoled {
                    guard let upstream = try? SupportSocket.connectLoopback(port: core.targetPort) else {
                        resetFD(fd)  // nothing listens behind the proxy: as a refused connect would
                        continue
                    }
                    server = upstream
                    SupportSocket.setNonBlocking(server)
                }
                SupportSocket.setNonBlocking(fd)
                let pair = Pair(id: id, client: fd, server: server)
                pair.poisoned = blackHoled
                pairs.append(pair)
            }
        }

        private func closeSide(_ pair: Pair, _ side: Direction) {
            if side == .up {
                if pair.client >= 0 { _ = SupportSocket.closeFD(pair.client) }
                pair.client = -1
            } else {
                if pair.server >= 0 { _ = SupportSocket.closeFD(pair.server) }
                pair.server = -1
            }
        }

        private func resetPair(_ pair: Pair) {
            if pair.client >= 0 { resetFD(pair.client) }
            if pair.server >= 0 { resetFD(pair.server) }
            pair.client = -1
            pair.server = -1
        }

        /// Closes with SO_LINGER 0: the peer gets RST, not FIN.
        private func resetFD(_ fd: Int32) {
            var linger = linger(l_onoff: 1, l_linger: 0)
            _ = setsockopt(fd, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<linger>.size))
            _ = SupportSocket.closeFD(fd)
        }

        mutating func closeEverything() {
            for pair in pairs {
                if pair.client >= 0 { _ = SupportSocket.closeFD(pair.client) }
                if pair.server >= 0 { _ = SupportSocket.closeFD(pair.server) }
            }
            pairs.removeAll()
            core.shared.withLock { $0.open = 0 }
        }
    }
}
