// EmbeddedServer: a libuv TCP service of its own that takes a distributed lock per request,
// all on one loop, on one thread.
//
//     make example NAME=EmbeddedServer
//     swift run EmbeddedServer --port 6388         # 6388: the dflockd server, not the service
//
// This is the shape of an event-driven server that embeds the library: the program owns a
// libuv loop and runs it; `EventLoop(borrowing:)` lets the locks run inside that same loop, and
// their completion handlers are called between the program's own libuv callbacks. No thread
// is started for the locks and nothing blocks.
//
// The service is a counter: a client sends `incr\n`, the service answers `count N\n`. The
// counter stands for a record in a store that several instances of the service share (a file,
// a database row), so every increment is a read-modify-write that must not interleave with
// another: each request takes the lock "embedded-counter" on dflockd, reads the value, waits
// 50 ms (the slow store), writes value + 1, releases, and answers. To keep the example
// self-contained the program is also its own client: it opens three connections to its
// service on the same loop, sends one request on each at once, and shuts down after the
// three answers.
import CUV
import DflockdClient

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

func portArgument() -> Int {
    let arguments = CommandLine.arguments
    guard let index = arguments.firstIndex(of: "--port"), index + 1 < arguments.count,
          let port = Int(arguments[index + 1]) else { return 6388 }
    return port
}

// MARK: - Small libuv helpers

// libuv handles are C structs that all begin with the fields of uv_handle_t (and streams with
// those of uv_stream_t): these are the casts C code writes as `(uv_stream_t *)tcp`.
extension UnsafeMutablePointer where Pointee == uv_tcp_t {
    var asHandle: UnsafeMutablePointer<uv_handle_t> { UnsafeMutableRawPointer(self).assumingMemoryBound(to: uv_handle_t.self) }
    var asStream: UnsafeMutablePointer<uv_stream_t> { UnsafeMutableRawPointer(self).assumingMemoryBound(to: uv_stream_t.self) }
}

/// Runs `body` once after `milliseconds`, on the loop (a one-shot uv_timer_t).
func after(milliseconds: UInt64, on uvLoop: UnsafeMutablePointer<uv_loop_t>, _ body: @escaping () -> Void) {
    final class Box { let body: () -> Void; init(_ body: @escaping () -> Void) { self.body = body } }
    let timer = UnsafeMutablePointer<uv_timer_t>.allocate(capacity: 1)
    uv_timer_init(uvLoop, timer)
    timer.pointee.data = Unmanaged.passRetained(Box(body)).toOpaque()
    uv_timer_start(timer, { timer in
        guard let timer else { return }
        Unmanaged<Box>.fromOpaque(timer.pointee.data).takeRetainedValue().body()
        uv_close(UnsafeMutableRawPointer(timer).assumingMemoryBound(to: uv_handle_t.self)) { handle in
            UnsafeMutableRawPointer(handle)?.deallocate()   // libuv is done with the memory now
        }
    }, milliseconds, 0)
}

/// One TCP connection on the loop, either end: reads lines, writes text, closes once.
final class LineStream {
    let tcp = UnsafeMutablePointer<uv_tcp_t>.allocate(capacity: 1)
    /// Called for every complete line received (without its `\n`).
    var onLine: (LineStream, String) -> Void = { _, _ in }
    private var pending: [UInt8] = []
    private var closing = false

    init(on uvLoop: UnsafeMutablePointer<uv_loop_t>) {
        uv_tcp_init(uvLoop, tcp)
        // The handle keeps its LineStream alive until libuv has closed it (see close()).
        tcp.pointee.data = Unmanaged.passRetained(self).toOpaque()
    }

    static func of(_ stream: UnsafeMutablePointer<uv_stream_t>?) -> LineStream {
        Unmanaged<LineStream>.fromOpaque(stream!.pointee.data).takeUnretainedValue()
    }

    func startReading() {
        uv_read_start(tcp.asStream, { _, suggestedSize, buffer in
            buffer?.pointee = uv_buf_init(malloc(suggestedSize)?.assumingMemoryBound(to: CChar.self), UInt32(suggestedSize))
        }, { stream, count, buffer in
            defer { free(buffer?.pointee.base) }
            let me = LineStream.of(stream)
            guard count >= 0 else { return me.close() }      // UV_EOF or an error: done
            me.received(UnsafeRawBufferPointer(start: buffer?.pointee.base, count: count))
        })
    }

    private func received(_ bytes: UnsafeRawBufferPointer) {
        pending.append(contentsOf: bytes)
        while let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
            let line = String(decoding: pending[..<newline], as: UTF8.self)
            pending.removeSubrange(...newline)
            onLine(self, line)
        }
    }

    func write(_ text: String) {
        guard !closing else { return }
        let bytes = Array(text.utf8)
        let storage = UnsafeMutablePointer<CChar>.allocate(capacity: bytes.count)
        bytes.withUnsafeBytes { UnsafeMutableRawPointer(storage).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        let request = UnsafeMutablePointer<uv_write_t>.allocate(capacity: 1)
        request.pointee.data = UnsafeMutableRawPointer(storage)  // freed when the write is done
        var buffer = uv_buf_init(storage, UInt32(bytes.count))
        uv_write(request, tcp.asStream, &buffer, 1) { request, _ in
            request?.pointee.data.deallocate()
            request?.deallocate()
        }
    }

    func close() {
        guard !closing else { return }
        closing = true
        uv_close(tcp.asHandle) { handle in
            let me = Unmanaged<LineStream>.fromOpaque(handle!.pointee.data).takeRetainedValue()
            me.tcp.deallocate()
        }
    }
}

// MARK: - The service

/// `incr\n` → `count N\n`, one distributed lock per request.
final class CounterService {
    let uvLoop: UnsafeMutablePointer<uv_loop_t>
    let loop: EventLoop
    let lockServers: [(String, Int)]
    let listener = UnsafeMutablePointer<uv_tcp_t>.allocate(capacity: 1)
    private(set) var port = 0
    /// The shared record (see the top of the file).
    private(set) var counter = 0
    private var requests = 0
    /// The locks of the requests in progress. A DistributedLock that nobody references any more
    /// closes its connection and drops its pending completion handlers, so the service keeps
    /// each one until its last handler (release's) has run.
    private var locks: [Int: DistributedLock] = [:]
    /// Lock completion handlers that ran on the main thread (the loop's) and elsewhere.
    private(set) var callbacksOnLoopThread = 0
    private(set) var callbacksElsewhere = 0

    init(uvLoop: UnsafeMutablePointer<uv_loop_t>, loop: EventLoop, lockServers: [(String, Int)]) {
        self.uvLoop = uvLoop
        self.loop = loop
        self.lockServers = lockServers
    }

    /// Listens on 127.0.0.1 on a port the system picks (port 0), and returns that port.
    func start() -> Int {
        uv_tcp_init(uvLoop, listener)
        listener.pointee.data = Unmanaged.passUnretained(self).toOpaque()
        var address = sockaddr_in()
        uv_ip4_addr("127.0.0.1", 0, &address)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { uv_tcp_bind(listener, $0, 0) }
        }
        precondition(bound == 0, "bind failed: \(String(cString: uv_strerror(bound)))")
        let listening = uv_listen(listener.asStream, 16) { listener, status in
            guard status == 0 else { return }
            Unmanaged<CounterService>.fromOpaque(listener!.pointee.data).takeUnretainedValue().accept()
        }
        precondition(listening == 0, "listen failed: \(String(cString: uv_strerror(listening)))")

        // Which port did we get? Ask the socket.
        var bound4 = sockaddr_in()
        var length = Int32(MemoryLayout<sockaddr_in>.size)
        withUnsafeMutablePointer(to: &bound4) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { _ = uv_tcp_getsockname(listener, $0, &length) }
        }
        port = Int(UInt16(bigEndian: bound4.sin_port))
        return port
    }

    private func accept() {
        let client = LineStream(on: uvLoop)
        guard uv_accept(listener.asStream, client.tcp.asStream) == 0 else { return client.close() }
        client.onLine = { [unowned self] client, line in serve(line, replyingOn: client) }
        client.startReading()
    }

    private func serve(_ line: String, replyingOn client: LineStream) {
        guard line == "incr" else { return client.write("error unknown request \(line.debugDescription)\n") }
        requests += 1
        let number = requests
        let lock: DistributedLock
        do {
            // One lock object per request: each is its own session with dflockd, so concurrent
            // requests queue for the key in FIFO order. `loop:` puts it on our loop.
            lock = try DistributedLock(key: "embedded-counter", acquireTimeoutS: 5, leaseTtlS: 10,
                                       servers: lockServers, loop: loop)
        } catch {
            return client.write("error \(error)\n")
        }
        locks[number] = lock
        print("service: request \(number) asks for the lock")
        lock.acquire { [self] result in
            // Called on this program's loop thread, between its own libuv callbacks.
            countCallback()
            guard case .success(true) = result else {
                locks[number] = nil
                return client.write("error the lock was not granted: \(result)\n")
            }
            let seen = counter                       // read ...
            after(milliseconds: 50, on: uvLoop) { [self] in
                counter = seen + 1                   // ... and write, 50 ms later, under the lock
                let value = counter
                print("service: request \(number) holds the lock: counter \(seen) → \(value)")
                lock.release { [self] result in
                    countCallback()
                    locks[number] = nil
                    if case .failure(let error) = result { print("service: release failed: \(error)") }
                    client.write("count \(value)\n")
                }
            }
        }
    }

    private func countCallback() {
        if loop.inEventLoop { callbacksOnLoopThread += 1 } else { callbacksElsewhere += 1 }
    }

    func close() {
        uv_close(listener.asHandle) { handle in UnsafeMutableRawPointer(handle)?.deallocate() }
    }
}

// MARK: - The program's own client

/// Opens `count` connections to the service at once, sends `incr` on each, and calls `done`
/// with the answers once all have come.
func sendRequests(count: Int, to port: Int, on uvLoop: UnsafeMutablePointer<uv_loop_t>,
                  done: @escaping ([String]) -> Void) {
    var answers: [String] = []
    var address = sockaddr_in()
    uv_ip4_addr("127.0.0.1", Int32(port), &address)
    for _ in 0..<count {
        let connection = LineStream(on: uvLoop)
        connection.onLine = { connection, answer in
            connection.close()
            answers.append(answer)
            print("client: got \"\(answer)\"")
            if answers.count == count { done(answers) }
        }
        let request = UnsafeMutablePointer<uv_connect_t>.allocate(capacity: 1)
        request.pointee.data = Unmanaged.passUnretained(connection).toOpaque()
        withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { address in
                _ = uv_tcp_connect(request, connection.tcp, address) { request, status in
                    let connection = Unmanaged<LineStream>.fromOpaque(request!.pointee.data).takeUnretainedValue()
                    request?.deallocate()
                    guard status == 0 else {
                        print("client: connect failed: \(String(cString: uv_strerror(status)))")
                        return connection.close()
                    }
                    connection.startReading()
                    connection.write("incr\n")
                }
            }
        }
    }
}

// MARK: - Main

func main() -> Int32 {
    let uvLoop = UnsafeMutablePointer<uv_loop_t>.allocate(capacity: 1)
    uv_loop_init(uvLoop)
    // Created on the thread that will run uvLoop: the locks' work and callbacks happen there.
    let loop = EventLoop(borrowing: uvLoop)

    let service = CounterService(uvLoop: uvLoop, loop: loop, lockServers: [("127.0.0.1", portArgument())])
    let servicePort = service.start()
    print("service: listening on 127.0.0.1:\(servicePort); dflockd at 127.0.0.1:\(portArgument())")

    var status: Int32 = 1
    sendRequests(count: 3, to: servicePort, on: uvLoop) { answers in
        let expected = ["count 1", "count 2", "count 3"]
        let ok = answers.sorted() == expected
        print(ok ? "service: 3 requests, counter \(service.counter): no update lost"
                 : "service: answers \(answers.sorted()), expected \(expected)")
        print("lock callbacks on the main thread: \(service.callbacksOnLoopThread), elsewhere: \(service.callbacksElsewhere)")
        status = ok ? 0 : 1
        // Shut down: stop listening, and close what the library still has on the loop.
        // uv_run below returns once the last handle is closed.
        service.close()
        loop.shutdown()
    }

    uv_run(uvLoop, UV_RUN_DEFAULT)
    let closed = uv_loop_close(uvLoop)
    uvLoop.deallocate()
    print("loop finished (uv_loop_close: \(closed == 0 ? "ok" : String(cString: uv_strerror(closed))))")
    #if os(Linux)
    // The whole run used this one thread: no thread was started for the locks.
    var threads = 0
    if let directory = opendir("/proc/self/task") {
        while let entry = readdir(directory) { if entry.pointee.d_name.0 != CChar(UInt8(ascii: ".")) { threads += 1 } }
        closedir(directory)
    }
    print("threads in this process: \(threads)")
    #endif
    if status == 0 { print("embeddedserver: done") }
    return status
}

exit(main())
