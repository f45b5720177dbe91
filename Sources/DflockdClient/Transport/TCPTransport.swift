import CUV
import Glibc

/// A non-blocking TCP client stream on the event loop.
///
/// Resolves the host with `uv_getaddrinfo` (IP literals skip the resolver), tries every address
/// in turn until one accepts, sets `TCP_NODELAY`, and enforces an optional connect timeout over
/// the whole attempt. Reads land in the loop's shared buffer; writes go out with `uv_try_write`
/// and only the part the kernel did not take is copied, once, into a queued `uv_write_t`.
///
/// Every connection has TCP keepalive on (probes after 30 s idle, as the Go client), so a dead
/// peer is found even on an idle connection. A failure found inside ``connect(to:timeoutMilliseconds:)``
/// or ``write(_:)`` is reported on a later turn of the loop, never inside the call.
///
/// Loop thread only. Each libuv handle or request in flight holds a reference to the transport,
/// released in its final callback, so no callback ever meets a freed object.
final class TCPTransport: Transport {
    weak var delegate: (any TransportDelegate)?

    private let loop: EventLoop
    private var phase = Phase.idle
    private var endpoint = Endpoint(host: "", port: 0)
    private var tcp: UnsafeMutablePointer<uv_tcp_t>?
    private var resolveRequest: UnsafeMutablePointer<uv_getaddrinfo_t>?
    private var addresses: [sockaddr_storage] = []
    private var nextAddress = 0
    private var lastConnectError: Int32 = 0
    private var connectTimer: LoopTimer?
    /// The loop's batching window, when it has one: it counts this stream's reads.
    private let batching: ReadBatching?
    /// Set while the owner's connect or write runs: a failure then is reported later.
    private var inOwnerCall = false

    /// Idle time before the first keepalive probe, in seconds.
    static let keepAliveDelaySeconds: UInt32 = 30

    private enum Phase {
        case idle, resolving, connecting, open, closed
    }

    init(loop: EventLoop) {
        self.loop = loop
        batching = ReadBatching.of(loop)
    }

    func connect(to endpoint: Endpoint, timeoutMilliseconds: Int?) {
        loop.assertInLoop()
        guard phase == .idle else { return }
        inOwnerCall = true
        defer { inOwnerCall = false }
        self.endpoint = endpoint
        if let timeoutMilliseconds {
            let timer = LoopTimer(loop: loop, closedByOwner: true) { [weak self] in
                self?.fail(.connectTimeout(host: endpoint.host, port: endpoint.port, milliseconds: timeoutMilliseconds))
            }
            timer.schedule(afterMilliseconds: timeoutMilliseconds)
            connectTimer = timer
        }
        if let literal = Self.parseLiteral(endpoint) {
            addresses = [literal]
            phase = .connecting
            connectToNextAddress()
        } else {
            resolve()
        }
    }

    func write(_ bytes: UnsafeRawBufferPointer) {
        guard phase == .open, let tcp, let base = bytes.baseAddress, !bytes.isEmpty else { return }
        inOwnerCall = true
        defer { inOwnerCall = false }
        var buffer = uv_buf_init(UnsafeMutablePointer(mutating: base.assumingMemoryBound(to: CChar.self)), UInt32(bytes.count))
        // uv_try_write answers EAGAIN while earlier writes are queued, so order is kept.
        let sent = Int(uv_try_write(tcp.asStream, &buffer, 1))
        if sent == bytes.count { return }
        if sent < 0 && sent != Int(UV_EAGAIN.rawValue) {
            fail(.connectionClosed(reason: "write failed: \(uvErrorDescription(Int32(sent)))"))
            return
        }
        let offset = max(0, sent)
        let remaining = bytes.count - offset
        let header = MemoryLayout<uv_write_t>.stride
        let block = UnsafeMutableRawPointer.allocate(byteCount: header + remaining, alignment: 16)
        (block + header).copyMemory(from: base + offset, byteCount: remaining)
        let request = block.bindMemory(to: uv_write_t.self, capacity: 1)
        buffer = uv_buf_init((block + header).assumingMemoryBound(to: CChar.self), UInt32(remaining))
        let result = uv_write(request, tcp.asStream, &buffer, 1, Self.onWrite)
        if result < 0 {
            block.deallocate()
            fail(.connectionClosed(reason: "write failed: \(uvErrorDescription(result))"))
        }
    }

    func close() {
        guard phase != .closed else { return }
        phase = .closed
        delegate = nil
        releaseHandles()
    }

    // MARK: - Connecting

    private func resolve() {
        phase = .resolving
        let request = UnsafeMutablePointer<uv_getaddrinfo_t>.allocate(capacity: 1)
        request.pointee.data = Unmanaged.passRetained(self).toOpaque()
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        let result = uv_getaddrinfo(loop.raw, request, Self.onResolve, endpoint.host, String(endpoint.port), &hints)
        if result < 0 {
            Unmanaged<TCPTransport>.fromOpaque(request.pointee.data).release()
            request.deallocate()
            fail(.resolveFailed(host: endpoint.host, reason: uvErrorDescription(result)))
            return
        }
        resolveRequest = request
    }

    private func didResolve(status: Int32, result: UnsafeMutablePointer<addrinfo>?) {
        resolveRequest = nil
        defer { uv_freeaddrinfo(result) }
        guard phase == .resolving else { return }
        guard status == 0 else {
            fail(.resolveFailed(host: endpoint.host, reason: uvErrorDescription(status)))
            return
        }
        var entry = result
        while let info = entry {
            if let address = info.pointee.ai_addr {
                var storage = sockaddr_storage()
                withUnsafeMutableBytes(of: &storage) { target in
                    target.copyMemory(from: UnsafeRawBufferPointer(start: address, count: Int(info.pointee.ai_addrlen)))
                }
                addresses.append(storage)
            }
            entry = info.pointee.ai_next
        }
        phase = .connecting
        connectToNextAddress()
    }

    private func connectToNextAddress() {
        while nextAddress < addresses.count {
            let handle = UnsafeMutablePointer<uv_tcp_t>.allocate(capacity: 1)
            uv_tcp_init(loop.raw, handle)
            handle.pointee.data = Unmanaged.passRetained(self).toOpaque()
            uv_tcp_nodelay(handle, 1)
            let request = UnsafeMutablePointer<uv_connect_t>.allocate(capacity: 1)
            let result = withUnsafePointer(to: &addresses[nextAddress]) { address in
                address.withMemoryRebound(to: sockaddr.self, capacity: 1) { address in
                    uv_tcp_connect(request, handle, address, Self.onConnect)
                }
            }
            nextAddress += 1
            if result == 0 {
                tcp = handle
                return
            }
            request.deallocate()
            lastConnectError = result
            uv_close(handle.asHandle, Self.onClose)
        }
        let reason = lastConnectError == 0 ? "no address found" : uvErrorDescription(lastConnectError)
        fail(.connectFailed(host: endpoint.host, port: endpoint.port, reason: reason))
    }

    private func didConnect(status: Int32) {
        guard phase == .connecting, let tcp else { return }
        guard status == 0 else {
            // A failed connect leaves the socket unusable: the next address gets a new handle.
            lastConnectError = status
            self.tcp = nil
            uv_close(tcp.asHandle, Self.onClose)
            connectToNextAddress()
            return
        }
        phase = .open
        connectTimer?.close()
        connectTimer = nil
        // Not needed again (a connection is never re-dialled), and 128 bytes an address for
        // every connection of 15,000 locks.
        addresses = []
        // Set on the open socket: before there is one, libuv 1.44 records only "on" and applies
        // its own 60 s delay at connect.
        uv_tcp_keepalive(tcp, 1, Self.keepAliveDelaySeconds)
        let result = uv_read_start(tcp.asStream, Self.onAllocate, Self.onRead)
        guard result == 0 else {
            fail(.connectionClosed(reason: "could not start reading: \(uvErrorDescription(result))"))
            return
        }
        delegate?.transportDidConnect(self)
    }

    // MARK: - Ending

    private func fail(_ error: LockError) {
        guard phase != .closed else { return }
        phase = .closed
        let delegate = self.delegate
        self.delegate = nil
        releaseHandles()
        guard let delegate else { return }
        if inOwnerCall {
            // Found inside the owner's call (libuv's delayed error): reported on a later turn.
            loop.runLater { [self] in delegate.transport(self, didFailWith: error) }
        } else {
            delegate.transport(self, didFailWith: error)
        }
    }

    private func releaseHandles() {
        connectTimer?.close()
        connectTimer = nil
        if let resolveRequest {
            // Its callback still runs (with UV_EAI_CANCELED) and drops its reference then.
            uv_cancel(UnsafeMutableRawPointer(resolveRequest).assumingMemoryBound(to: uv_req_t.self))
        }
        if let tcp {
            self.tcp = nil
            uv_close(tcp.asHandle, Self.onClose)
        }
    }

    // MARK: - libuv callbacks

    private static func transport(of handle: UnsafeMutableRawPointer?) -> TCPTransport? {
        guard let data = handle?.assumingMemoryBound(to: uv_handle_t.self).pointee.data else { return nil }
        return Unmanaged<TCPTransport>.fromOpaque(data).takeUnretainedValue()
    }

    private static let onResolve: uv_getaddrinfo_cb = { request, status, result in
        guard let request else { return }
        let transport = Unmanaged<TCPTransport>.fromOpaque(request.pointee.data).takeRetainedValue()
        request.deallocate()
        transport.didResolve(status: status, result: result)
    }

    private static let onConnect: uv_connect_cb = { request, status in
        guard let request else { return }
        let stream = request.pointee.handle
        request.deallocate()
        transport(of: UnsafeMutableRawPointer(stream))?.didConnectAttempt(stream: stream, status: status)
    }

    private func didConnectAttempt(stream: UnsafeMutablePointer<uv_stream_t>?, status: Int32) {
        // A cancelled attempt belongs to a handle already being closed.
        guard status != UV_ECANCELED.rawValue, UnsafeMutableRawPointer(stream) == UnsafeMutableRawPointer(tcp) else { return }
        didConnect(status: status)
    }

    private static let onAllocate: uv_alloc_cb = { handle, _, buffer in
        guard let transport = transport(of: UnsafeMutableRawPointer(handle)) else { return }
        let storage = transport.loop.readBuffer
        buffer?.pointee = uv_buf_init(storage.baseAddress?.assumingMemoryBound(to: CChar.self), UInt32(storage.count))
    }

    private static let onRead: uv_read_cb = { stream, count, buffer in
        guard let transport = transport(of: UnsafeMutableRawPointer(stream)) else { return }
        if count > 0, let base = buffer?.pointee.base {
            transport.batching?.readsSincePoll &+= 1
            transport.delegate?.transport(transport, didRead: UnsafeRawBufferPointer(start: base, count: count))
        } else if count == Int(UV_EOF.rawValue) {
            transport.fail(.connectionClosed(reason: "the server closed the connection"))
        } else if count < 0 {
            transport.fail(.connectionClosed(reason: uvErrorDescription(Int32(count))))
        }
    }

    private static let onWrite: uv_write_cb = { request, status in
        guard let request else { return }
        let stream = request.pointee.handle
        UnsafeMutableRawPointer(request).deallocate()
        guard status < 0, status != UV_ECANCELED.rawValue, let transport = transport(of: UnsafeMutableRawPointer(stream)) else { return }
        transport.fail(.connectionClosed(reason: "write failed: \(uvErrorDescription(status))"))
    }

    private static let onClose: uv_close_cb = { handle in
        guard let handle else { return }
        if let data = handle.pointee.data {
            Unmanaged<TCPTransport>.fromOpaque(data).release()
        }
        UnsafeMutableRawPointer(handle).deallocate()
    }

    private static func parseLiteral(_ endpoint: Endpoint) -> sockaddr_storage? {
        var storage = sockaddr_storage()
        let parsed = withUnsafeMutablePointer(to: &storage) { pointer -> Bool in
            let port = Int32(endpoint.port)
            if pointer.withMemoryRebound(to: sockaddr_in.self, capacity: 1, { uv_ip4_addr(endpoint.host, port, $0) }) == 0 {
                return true
            }
            return pointer.withMemoryRebound(to: sockaddr_in6.self, capacity: 1, { uv_ip6_addr(endpoint.host, port, $0) }) == 0
        }
        return parsed ? storage : nil
    }
}
