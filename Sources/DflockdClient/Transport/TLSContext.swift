import COpenSSL
import Glibc

/// One OpenSSL `SSL_CTX` built from a set of ``TLSOptions``, shared by every TLS connection that
/// uses those options.
///
/// Building a context loads files: the CA bundle (the system store holds a few hundred
/// certificates), the client certificate and its key. Thousands of TLS locks must not do that
/// thousands of times, so contexts live in a process-wide cache keyed by the options that shape
/// a context: everything but ``TLSOptions/serverName``, which is set per connection. An
/// `SSL_CTX` is safe to share between threads for `SSL_new`; it is never changed after it is
/// built. Cached contexts live as long as the process (a changed file on disk is read again only
/// by a new process); failures are not cached, so a file fixed later is picked up.
final class TLSContext: @unchecked Sendable {
    /// The `SSL_CTX *`. Immutable after ``init(options:)``.
    let raw: OpaquePointer
    /// Whether connections verify the server's certificate and name.
    let verifiesPeer: Bool

    private static let cache = ThreadLock<[TLSOptions: TLSContext]>([:])

    /// The shared context for `options`, built on first use.
    ///
    /// - Throws: ``LockError/invalidArgument(name:reason:)`` naming the option (`tls.caFile`,
    ///   `tls.certificateFile`, `tls.privateKeyFile`) and the file when a file is missing,
    ///   unreadable or not what it should be, with OpenSSL's reason.
    static func shared(for options: TLSOptions) throws(LockError) -> TLSContext {
        if let serverName = options.serverName {
            // An empty name would switch host name checking off (SSL_set1_host with "").
            if serverName.isEmpty || serverName.utf8.count > 253
                || serverName.unicodeScalars.contains(where: { $0.properties.isWhitespace || $0.value < 0x20 || $0.value == 0x7F }) {
                throw .invalidArgument(name: "tls.serverName", reason: "must be a host name or IP address of 1 to 253 bytes without whitespace or control characters, got \(serverName.debugDescription)")
            }
        }
        var key = options
        key.serverName = nil
        return try cache.withLock { (cache: inout [TLSOptions: TLSContext]) throws(LockError) -> TLSContext in
            if let context = cache[key] { return context }
            // Built under the lock: concurrent first users wait for one load instead of each
            // loading the CA store.
            let context = try TLSContext(options: key)
            cache[key] = context
            return context
        }
    }

    private init(options: TLSOptions) throws(LockError) {
        ERR_clear_error()
        defer { ERR_clear_error() }
        guard let ctx = SSL_CTX_new(TLS_client_method()) else {
            throw .invalidArgument(name: "tls", reason: "OpenSSL could not create a TLS context: \(TLSErrors.drain())")
        }
        var built = false
        defer { if !built { SSL_CTX_free(ctx) } }

        guard dflockd_SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) == 1 else {
            throw .invalidArgument(name: "tls", reason: "OpenSSL refused TLS 1.2 as the minimum version: \(TLSErrors.drain())")
        }
        _ = SSL_CTX_set_options(ctx, dflockd_SSL_OP_NO_RENEGOTIATION())
        // Let OpenSSL free a connection's 16 KiB record buffers while it is idle: an idle lock
        // then costs its SSL object, not ~34 KiB of buffers.
        _ = dflockd_SSL_CTX_set_mode(ctx, Int(SSL_MODE_RELEASE_BUFFERS))
        // An encrypted private key must fail, not prompt on the terminal from the loop thread.
        SSL_CTX_set_default_passwd_cb(ctx) { _, _, _, _ in 0 }

        if let caFile = options.caFile {
            try Self.checkReadable(caFile, option: "tls.caFile")
            guard SSL_CTX_load_verify_locations(ctx, caFile, nil) == 1 else {
                throw .invalidArgument(name: "tls.caFile", reason: "cannot load CA certificates from '\(caFile)': \(TLSErrors.drain())")
            }
        } else if !options.insecureSkipVerify {
            guard SSL_CTX_set_default_verify_paths(ctx) == 1 else {
                throw .invalidArgument(name: "tls", reason: "cannot load the system CA store: \(TLSErrors.drain())")
            }
        }
        SSL_CTX_set_verify(ctx, options.insecureSkipVerify ? SSL_VERIFY_NONE : SSL_VERIFY_PEER, nil)

        switch (options.certificateFile, options.privateKeyFile) {
        case (nil, nil):
            // Called when a server asks for a client certificate and none is set: there is none
            // to give, but the connection notes it, to explain the refusal that usually follows.
            SSL_CTX_set_client_cert_cb(ctx) { ssl, _, _ in
                TLSTransport.serverRequestedCertificate(ssl)
                return 0
            }
        case (nil, .some):
            throw .invalidArgument(name: "tls.privateKeyFile", reason: "is set without tls.certificateFile; give both for mutual TLS")
        case (.some(let certificateFile), let privateKeyFile):
            try Self.checkReadable(certificateFile, option: "tls.certificateFile")
            guard SSL_CTX_use_certificate_chain_file(ctx, certificateFile) == 1 else {
                throw .invalidArgument(name: "tls.certificateFile", reason: "cannot load a PEM certificate from '\(certificateFile)': \(TLSErrors.drain())")
            }
            // Without privateKeyFile the key is looked for in the certificate file (one PEM
            // holding both), as most TLS tools do.
            let keyFile = privateKeyFile ?? certificateFile
            let keyOption = privateKeyFile == nil ? "tls.certificateFile" : "tls.privateKeyFile"
            try Self.checkReadable(keyFile, option: keyOption)
            guard SSL_CTX_use_PrivateKey_file(ctx, keyFile, SSL_FILETYPE_PEM) == 1 else {
                let detail = TLSErrors.drain()
                if detail.contains("key values mismatch") {
                    throw .invalidArgument(name: keyOption, reason: "the private key in '\(keyFile)' does not match the certificate in '\(certificateFile)': \(detail)")
                }
                let hint = privateKeyFile == nil ? " (no privateKeyFile was given, so the key must be in the certificate file)" : ""
                throw .invalidArgument(name: keyOption, reason: "cannot load a PEM private key from '\(keyFile)'\(hint): \(detail)")
            }
            guard SSL_CTX_check_private_key(ctx) == 1 else {
                throw .invalidArgument(name: keyOption, reason: "the private key in '\(keyFile)' does not match the certificate in '\(certificateFile)': \(TLSErrors.drain())")
            }
        }

        raw = ctx
        verifiesPeer = !options.insecureSkipVerify
        built = true
    }

    deinit {
        SSL_CTX_free(raw)
    }

    /// A file OpenSSL is about to read: say plainly when it is missing or unreadable, instead of
    /// OpenSSL's `system library` wording.
    private static func checkReadable(_ path: String, option: String) throws(LockError) {
        if path.isEmpty {
            throw .invalidArgument(name: option, reason: "is an empty path")
        }
        if access(path, R_OK) != 0 {
            let reason = String(cString: strerror(errno))
            throw .invalidArgument(name: option, reason: "cannot read '\(path)': \(reason)")
        }
    }
}

/// OpenSSL's per-thread error queue, as text.
enum TLSErrors {
    /// Takes every error queued on this thread and joins OpenSSL's texts for them, e.g.
    /// `error:0A000086:SSL routines::certificate verify failed`. Leaves the queue empty.
    static func drain(fallback: String = "no further detail from OpenSSL") -> String {
        var texts: [String] = []
        while true {
            let code = ERR_get_error()
            if code == 0 { break }
            var buffer = [CChar](repeating: 0, count: 256)
            ERR_error_string_n(code, &buffer, buffer.count)
            let text = String(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if !texts.contains(text) { texts.append(text) }
        }
        return texts.isEmpty ? fallback : texts.joined(separator: "; ")
    }
}
