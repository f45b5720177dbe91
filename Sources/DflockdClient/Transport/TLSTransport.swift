import COpenSSL
import CUV
import Glibc

/// TLS over a ``TCPTransport``, driven on the event loop through OpenSSL memory BIOs.
///
/// The transport owns a TCP transport and is its delegate. Ciphertext the TCP stream reads is
/// written into the SSL object's read BIO; what OpenSSL wants to send (handshake flights,
/// records, alerts) is taken from its write BIO and written to the TCP stream. OpenSSL never
/// touches a socket, so TLS stays non-blocking and on the loop thread.
///
/// - The delegate hears `transportDidConnect` only after the handshake, and the connect timeout
///   covers TCP connect and handshake together.
/// - Decrypted bytes go into the loop thread's shared ``PlaintextBuffer`` and are handed to the
///   delegate before the read callback returns: a connection owns no read buffer, and OpenSSL
///   frees its record buffers while idle (`SSL_MODE_RELEASE_BUFFERS`).
/// - Without an overall connect timeout, the handshake is limited to
///   `handshakeTimeoutMilliseconds` from when TCP is up. A failure found inside
///   ``connect(to:timeoutMilliseconds:)`` or ``write(_:)`` is reported on a later turn.
/// - Plaintext written before the handshake finished is held back and sent encrypted once it
///   has; it never reaches the wire in clear.
/// - ``close()`` sends `close_notify` (best effort: it goes out if the socket takes it at once),
///   then closes the TCP stream. Renegotiation is refused (`SSL_OP_NO_RENEGOTIATION`).
///
/// Loop thread only. The SSL object is freed exactly once: at close, or, when the close happens
/// inside one of this object's own calls (a delegate closing from its read callback), when that
/// call unwinds.
final class TLSTransport: Transport {
    weak var delegate: (any TransportDelegate)?

    private let loop: EventLoop
    private let context: TLSContext
    private let options: TLSOptions
    private var phase = Phase.idle
    private var endpoint = Endpoint(host: "", port: 0)
    private var tcp: TCPTransport?
    private var connectTimer: LoopTimer?
    private let handshakeTimeoutMilliseconds: Int?
    /// How many of the owner's calls (connect, write) are on the stack: a failure found then is
    /// reported on a later turn.
    private var ownerCalls = 0
    /// The SSL object; it owns both BIOs.
    private var ssl: OpaquePointer?
    /// Ciphertext from the network, for OpenSSL to read.
    private var networkIn: OpaquePointer?
    /// Ciphertext OpenSSL produced, for the network.
    private var networkOut: OpaquePointer?
    /// Plaintext written before the handshake finished (a caller error, handled anyway).
    private var heldBack: [UInt8] = []
    /// How many calls of this object are on the stack; the SSL object is freed only at zero.
    private var depth = 0
    /// The server asked for a client certificate and none is configured. With TLS 1.3 the
    /// client's handshake is done before the server judges that, so its refusal comes later, as
    /// an alert or (when a write crosses it) a reset: this explains either.
    private var certificateRequestUnanswered = false
    /// Whether any application data arrived.
    private var receivedPlaintext = false

    /// Largest ciphertext slice handed to OpenSSL at once: a bit over one record, so the read
    /// BIO's buffer stays small even when the TCP read was large.
    private static let feedSliceBytes = 17 * 1024
    /// Chunk for moving OpenSSL's output to the TCP stream.
    private static let drainChunkBytes = 16 * 1024

    private enum Phase {
        case idle, connecting, handshaking, open, closed
    }

    init(loop: EventLoop, context: TLSContext, options: TLSOptions, handshakeTimeoutMilliseconds: Int? = nil) {
        self.loop = loop
        self.context = context
        self.options = options
        self.handshakeTimeoutMilliseconds = handshakeTimeoutMilliseconds
    }

    deinit {
        // Normally freed at close on the loop thread; this only catches a transport dropped
        // without close (for instance after its loop shut down).
        if let ssl { SSL_free(ssl) }
    }

    // MARK: - Transport

    func connect(to endpoint: Endpoint, timeoutMilliseconds: Int?) {
        loop.assertInLoop()
        guard phase == .idle else { return }
        ownerCalls += 1
        defer { ownerCalls -= 1 }
        busy {
            self.endpoint = endpoint
            phase = .connecting
            if let timeoutMilliseconds { startConnectTimer(timeoutMilliseconds) }
            let tcp = TCPTransport(loop: loop)
            tcp.delegate = self
            self.tcp = tcp
            // No TCP timeout of its own: this transport's timer covers connect and handshake.
            tcp.connect(to: endpoint, timeoutMilliseconds: nil)
        }
    }

    private func startConnectTimer(_ milliseconds: Int) {
        let endpoint = self.endpoint
        let timer = LoopTimer(loop: loop, closedByOwner: true) { [weak self] in
            guard let self else { return }
            busy { fail(.connectTimeout(host: endpoint.host, port: endpoint.port, milliseconds: milliseconds)) }
        }
        timer.schedule(afterMilliseconds: milliseconds)
        connectTimer = timer
    }

    func write(_ bytes: UnsafeRawBufferPointer) {
        guard !bytes.isEmpty else { return }
        ownerCalls += 1
        defer { ownerCalls -= 1 }
        switch phase {
        case .idle, .connecting, .handshaking:
            heldBack.append(contentsOf: bytes)
        case .open:
            busy { encrypt(bytes) }
        case .closed:
            break
        }
    }

    func close() {
        guard phase != .closed else { return }
        let wasOpen = phase == .open
        phase = .closed
        delegate = nil
        busy { release(sendingCloseNotify: wasOpen) }
    }

    // MARK: - Handshake

    private func startHandshake() {
        guard let ssl = SSL_new(context.raw) else {
            fail(.tls(reason: "OpenSSL could not create a connection: \(TLSErrors.drain())"))
            return
        }
        self.ssl = ssl
        guard let networkIn = BIO_new(BIO_s_mem()), let networkOut = BIO_new(BIO_s_mem()) else {
            fail(.tls(reason: "OpenSSL could not create memory BIOs: \(TLSErrors.drain())"))
            return
        }
        // An empty read BIO means "wait for more", not end of stream.
        _ = dflockd_BIO_set_mem_eof_return(networkIn, -1)
        _ = dflockd_BIO_set_mem_eof_return(networkOut, -1)
        SSL_set_bio(ssl, networkIn, networkOut)
        // For serverRequestedCertificate: the SSL object never outlives this transport.
        SSL_set_ex_data(ssl, 0, Unmanaged.passUnretained(self).toOpaque())
        self.networkIn = networkIn
        self.networkOut = networkOut

        let name = options.serverName ?? endpoint.host
        let isAddress = Self.isIPAddress(name)
        // SNI carries DNS names only (RFC 6066 forbids IP literals in it).
        if !isAddress, dflockd_SSL_set_tlsext_host_name(ssl, name) != 1 {
            fail(.tls(reason: "cannot send '\(name)' as the TLS server name: \(TLSErrors.drain())"))
            return
        }
        if context.verifiesPeer {
            let configured: Bool
            if isAddress {
                configured = X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), name) == 1
            } else {
                SSL_set_hostflags(ssl, UInt32(X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS))
                configured = SSL_set1_host(ssl, name) == 1
            }
            guard configured else {
                fail(.tls(reason: "cannot verify the server as '\(name)': \(TLSErrors.drain())"))
                return
            }
        }
        SSL_set_connect_state(ssl)
        phase = .handshaking
        continueHandshake()
    }

    private func continueHandshake() {
        guard phase == .handshaking, let ssl else { return }
        ERR_clear_error()
        let result = SSL_do_handshake(ssl)
        let error = result == 1 ? SSL_ERROR_NONE : SSL_get_error(ssl, result)
        // Read OpenSSL's per-thread error queue now, before anything else runs on this thread.
        let failure = result == 1 || error == SSL_ERROR_WANT_READ ? nil : handshakeFailure(error)
        // The ClientHello, the Finished, or the alert telling the server why we give up.
        flushOutput()
        guard phase == .handshaking else { return }
        if let failure {
            fail(.tls(reason: failure))
            return
        }
        if result == 1 {
            phase = .open
            connectTimer?.close()
            connectTimer = nil
            if !heldBack.isEmpty {
                let bytes = heldBack
                heldBack = []
                bytes.withUnsafeBytes { encrypt($0) }
                guard phase == .open else { return }
            }
            delegate?.transportDidConnect(self)
            // Application data may have come with the server's last handshake flight.
            readPlaintext()
        }
    }

    /// Why the handshake failed, verification first: OpenSSL's own text for that is only
    /// "certificate verify failed", the verify result says which check failed.
    private func handshakeFailure(_ error: Int32) -> String {
        let queued = TLSErrors.drain(fallback: "")
        let peer = "\(endpoint)"
        if context.verifiesPeer, let ssl {
            let verify = SSL_get_verify_result(ssl)
            if verify != X509_V_OK {
                let what = X509_verify_cert_error_string(verify).map { String(cString: $0) } ?? "verify error \(verify)"
                let name = options.serverName ?? endpoint.host
                let hint: String
                switch Int32(verify) {
                case X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH:
                    hint = "the certificate of \(peer) is not valid for '\(name)'; connect by a name it lists or set serverName"
                default:
                    hint = "the certificate of \(peer) is not trusted; set caFile to the CA that issued it"
                }
                return "certificate verify failed: \(what) (\(hint))"
            }
        }
        if !queued.isEmpty {
            return "handshake with \(peer) failed: \(queued)"
        }
        return "handshake with \(peer) failed (SSL_get_error \(error))"
    }

    // MARK: - Reading

    /// Feeds ciphertext to OpenSSL slice by slice, advancing the handshake or decrypting.
    private func receive(_ bytes: UnsafeRawBufferPointer) {
        guard let base = bytes.baseAddress else { return }
        var offset = 0
        while offset < bytes.count, phase == .handshaking || phase == .open, let networkIn {
            let count = min(Self.feedSliceBytes, bytes.count - offset)
            // A memory BIO takes everything (it grows); it fails only when out of memory.
            guard BIO_write(networkIn, base + offset, Int32(count)) == Int32(count) else {
                fail(.tls(reason: "OpenSSL could not buffer received data: \(TLSErrors.drain())"))
                return
            }
            offset += count
            if phase == .handshaking {
                continueHandshake()
            } else {
                readPlaintext()
            }
        }
    }

    /// Decrypts everything OpenSSL can from what it has, into the loop's shared plaintext
    /// buffer, handing it to the delegate whenever the buffer is full and at the end.
    private func readPlaintext() {
        guard phase == .open, let ssl else { return }
        let buffer = PlaintextBuffer.take()
        defer { PlaintextBuffer.giveBack() }
        guard let base = buffer.baseAddress else { return }
        var filled = 0
        while phase == .open {
            ERR_clear_error()
            let result = SSL_read(ssl, base + filled, Int32(buffer.count - filled))
            if result > 0 {
                receivedPlaintext = true
                filled += Int(result)
                if filled == buffer.count {
                    deliver(UnsafeRawBufferPointer(start: base, count: filled))
                    filled = 0
                }
                // Nothing more to decrypt: deliver now instead of asking OpenSSL for a WANT_READ.
                if filled > 0, let networkIn, BIO_ctrl_pending(networkIn) == 0, SSL_has_pending(ssl) == 0 {
                    deliver(UnsafeRawBufferPointer(start: base, count: filled))
                    return
                }
                continue
            }
            let error = SSL_get_error(ssl, result)
            // Taken before the delegate runs: other connections' calls clear the thread's queue.
            let detail = error == SSL_ERROR_WANT_READ || error == SSL_ERROR_ZERO_RETURN
                ? "" : TLSErrors.drain(fallback: "SSL_get_error \(error)")
            if filled > 0 {
                deliver(UnsafeRawBufferPointer(start: base, count: filled))
                filled = 0
            }
            guard phase == .open else { return }
            // Reading can make OpenSSL answer (a key update, an alert).
            flushOutput()
            guard phase == .open else { return }
            switch error {
            case SSL_ERROR_WANT_READ:
                return
            case SSL_ERROR_ZERO_RETURN:
                fail(.connectionClosed(reason: "the server closed the connection (TLS close_notify)"), sendingCloseNotify: true)
            default:
                fail(.tls(reason: "reading from \(endpoint) failed: \(detail)"))
            }
            return
        }
    }

    private func deliver(_ plaintext: UnsafeRawBufferPointer) {
        delegate?.transport(self, didRead: plaintext)
    }

    // MARK: - Writing

    private func encrypt(_ bytes: UnsafeRawBufferPointer) {
        guard phase == .open, let ssl, let base = bytes.baseAddress else { return }
        var offset = 0
        while offset < bytes.count {
            let count = min(bytes.count - offset, Int(Int32.max))
            ERR_clear_error()
            // The write BIO never pushes back, so OpenSSL takes the whole slice.
            let written = SSL_write(ssl, base + offset, Int32(count))
            guard written > 0 else {
                let error = SSL_get_error(ssl, written)
                fail(.tls(reason: "writing to \(endpoint) failed: \(TLSErrors.drain(fallback: "SSL_get_error \(error)"))"))
                return
            }
            offset += Int(written)
        }
        flushOutput()
    }

    /// Moves what OpenSSL wrote into the write BIO to the TCP stream (which sends at once what
    /// the kernel takes and copies only the rest). A temporary chunk, not the shared plaintext
    /// buffer: a write can happen while that buffer is being delivered.
    private func flushOutput() {
        guard let networkOut else { return }
        while let tcp, BIO_ctrl_pending(networkOut) > 0 {
            withUnsafeTemporaryAllocation(byteCount: Self.drainChunkBytes, alignment: 16) { chunk in
                let count = BIO_read(networkOut, chunk.baseAddress, Int32(chunk.count))
                if count > 0 {
                    tcp.write(UnsafeRawBufferPointer(rebasing: chunk[..<Int(count)]))
                }
            }
        }
    }

    // MARK: - Ending

    private func fail(_ error: LockError, sendingCloseNotify: Bool = false) {
        guard phase != .closed else { return }
        var error = error
        if certificateRequestUnanswered, !receivedPlaintext {
            switch error {
            case .tls(let detail), .connectionClosed(let detail):
                error = .tls(reason: "the server asked for a client certificate and none is configured (set certificateFile and privateKeyFile); it then ended the connection: \(detail)")
            default:
                break
            }
        }
        phase = .closed
        let delegate = self.delegate
        self.delegate = nil
        release(sendingCloseNotify: sendingCloseNotify)
        guard let delegate else { return }
        if ownerCalls > 0 {
            // Found inside the owner's call (libuv's delayed error): reported on a later turn.
            loop.runLater { [self] in delegate.transport(self, didFailWith: error) }
        } else {
            delegate.transport(self, didFailWith: error)
        }
    }

    /// Stops the timer, says goodbye if the session is healthy, closes the TCP stream. The SSL
    /// object goes when the outermost call of this object returns.
    private func release(sendingCloseNotify: Bool) {
        connectTimer?.close()
        connectTimer = nil
        heldBack = []
        if sendingCloseNotify, let ssl {
            ERR_clear_error()
            _ = SSL_shutdown(ssl)
            flushOutput()
            ERR_clear_error()
        }
        if let tcp {
            self.tcp = nil
            tcp.delegate = nil
            tcp.close()
        }
    }

    /// Runs `body` with this object marked busy; on the way out of the outermost call, frees the
    /// SSL object if the transport closed meanwhile.
    private func busy(_ body: () -> Void) {
        depth += 1
        body()
        depth -= 1
        if depth == 0, phase == .closed, let ssl {
            self.ssl = nil
            networkIn = nil
            networkOut = nil
            SSL_free(ssl)  // frees both BIOs too
        }
    }

    /// The client-certificate callback of contexts without a certificate (see ``TLSContext``).
    static func serverRequestedCertificate(_ ssl: OpaquePointer?) {
        guard let data = SSL_get_ex_data(ssl, 0) else { return }
        Unmanaged<TLSTransport>.fromOpaque(data).takeUnretainedValue().certificateRequestUnanswered = true
    }

    private static func isIPAddress(_ name: String) -> Bool {
        var storage = in6_addr()
        return inet_pton(AF_INET, name, &storage) == 1 || inet_pton(AF_INET6, name, &storage) == 1
    }
}

extension TLSTransport: TransportDelegate {
    func transportDidConnect(_ transport: any Transport) {
        guard phase == .connecting else { return }
        busy {
            if connectTimer == nil, let handshakeTimeoutMilliseconds { startConnectTimer(handshakeTimeoutMilliseconds) }
            startHandshake()
        }
    }

    func transport(_ transport: any Transport, didRead bytes: UnsafeRawBufferPointer) {
        busy { receive(bytes) }
    }

    func transport(_ transport: any Transport, didFailWith error: LockError) {
        busy {
            // The TCP transport has closed itself.
            tcp = nil
            switch phase {
            case .handshaking:
                let reason: String
                if case .connectionClosed(let detail) = error {
                    reason = detail
                } else {
                    reason = error.description
                }
                fail(.tls(reason: "the TLS handshake with \(endpoint) did not complete: \(reason) (is it a TLS port? did it reject this client's certificate?)"))
            default:
                // Connecting: resolve and connect errors as TCP tells them. Open: the stream ended
                // without close_notify; the layer above treats it as the server closing.
                fail(error)
            }
        }
    }
}

/// The buffer every TLS connection on a thread decrypts into (the ciphertext it decrypts sits
/// in the loop's read buffer at the time, hence a second buffer). A connection fills it with
/// `SSL_read` and hands it to its delegate before returning from its read callback, and libuv
/// never nests read callbacks, so one buffer per loop thread serves them all. 16 KiB is the
/// largest plaintext of one TLS record. Allocated on a thread's first TLS read; freed when the
/// thread exits.
enum PlaintextBuffer {
    static let byteCount = 16 * 1024

    /// Allocation: the buffer, then one byte saying whether it is in use.
    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        precondition(pthread_key_create(&key, { $0?.deallocate() }) == 0, "pthread_key_create failed")
        return key
    }()

    /// The calling thread's buffer, marked in use.
    static func take() -> UnsafeMutableRawBufferPointer {
        let base: UnsafeMutableRawPointer
        if let existing = pthread_getspecific(key) {
            base = existing
        } else {
            base = .allocate(byteCount: byteCount + 1, alignment: 16)
            base.storeBytes(of: 0, toByteOffset: byteCount, as: UInt8.self)
            pthread_setspecific(key, base)
        }
        assert(base.load(fromByteOffset: byteCount, as: UInt8.self) == 0, "two TLS connections decrypting into the shared buffer at once")
        base.storeBytes(of: 1, toByteOffset: byteCount, as: UInt8.self)
        return UnsafeMutableRawBufferPointer(start: base, count: byteCount)
    }

    /// Marks the calling thread's buffer free again.
    static func giveBack() {
        pthread_getspecific(key)?.storeBytes(of: 0, toByteOffset: byteCount, as: UInt8.self)
    }
}
