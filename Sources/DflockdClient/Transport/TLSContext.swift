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

        let ca = try PEMSource(file: options.caFile, fileOption: "tls.caFile", pem: options.caPEM, pemOption: "tls.caPEM")
        let certificate = try PEMSource(file: options.certificateFile, fileOption: "tls.certificateFile",
                                        pem: options.certificatePEM, pemOption: "tls.certificatePEM")
        let explicitKey = try PEMSource(file: options.privateKeyFile, fileOption: "tls.privateKeyFile",
                                        pem: options.privateKeyPEM, pemOption: "tls.privateKeyPEM")

        if let ca {
            try Self.trust(ca, in: ctx)
        } else if !options.insecureSkipVerify {
            guard SSL_CTX_set_default_verify_paths(ctx) == 1 else {
                throw .invalidArgument(name: "tls", reason: "cannot load the system CA store: \(TLSErrors.drain())")
            }
        }
        SSL_CTX_set_verify(ctx, options.insecureSkipVerify ? SSL_VERIFY_NONE : SSL_VERIFY_PEER, nil)

        switch (certificate, explicitKey) {
        case (nil, nil):
            if options.privateKeyPassword != nil {
                throw .invalidArgument(name: "tls.privateKeyPassword", reason: "is set without a private key; give tls.privateKeyFile or tls.privateKeyPEM (and a certificate) for mutual TLS")
            }
            // Called when a server asks for a client certificate and none is set: there is none
            // to give, but the connection notes it, to explain the refusal that usually follows.
            SSL_CTX_set_client_cert_cb(ctx) { ssl, _, _ in
                TLSTransport.serverRequestedCertificate(ssl)
                return 0
            }
        case (nil, .some(let key)):
            throw .invalidArgument(name: key.option, reason: "is set without tls.certificateFile or tls.certificatePEM; give both a certificate and its key for mutual TLS")
        case (.some(let certificate), let explicitKey):
            try Self.useCertificateChain(certificate, in: ctx)
            // Without a key of its own the key is looked for in the certificate's PEM (one PEM
            // holding both), as most TLS tools do.
            let key = explicitKey ?? certificate
            try Self.usePrivateKey(key, password: options.privateKeyPassword, certificate: certificate,
                                   keyIsSeparate: explicitKey != nil, in: ctx)
        }

        raw = ctx
        verifiesPeer = !options.insecureSkipVerify
        built = true
    }

    deinit {
        SSL_CTX_free(raw)
    }

    /// Adds every certificate of `source` to the context's trust store.
    private static func trust(_ source: PEMSource, in ctx: OpaquePointer) throws(LockError) {
        let store = SSL_CTX_get_cert_store(ctx)
        var added = 0
        let failure: String? = source.withBIO { bio in
            while let certificate = PEM_read_bio_X509_AUX(bio, nil, nil, nil) {
                defer { X509_free(certificate) }
                guard X509_STORE_add_cert(store, certificate) == 1 else { return TLSErrors.drain() }
                added += 1
            }
            return nil
        }
        if let failure {
            throw .invalidArgument(name: source.option, reason: "cannot load CA certificates from \(source.origin): \(failure)")
        }
        // Reading stops at the first block that is not a certificate, or at the end: only a
        // source without any certificate is wrong.
        guard added > 0 else {
            throw .invalidArgument(name: source.option, reason: "cannot load CA certificates from \(source.origin): no PEM certificate in it (\(TLSErrors.drain()))")
        }
        ERR_clear_error()
    }

    /// The first certificate of `source` is the client certificate; those after it its chain.
    private static func useCertificateChain(_ source: PEMSource, in ctx: OpaquePointer) throws(LockError) {
        let failure: String? = source.withBIO { bio in
            guard let leaf = PEM_read_bio_X509_AUX(bio, nil, nil, nil) else {
                return "no PEM certificate in it (\(TLSErrors.drain()))"
            }
            defer { X509_free(leaf) }
            guard SSL_CTX_use_certificate(ctx, leaf) == 1 else { return TLSErrors.drain() }
            while let intermediate = PEM_read_bio_X509(bio, nil, nil, nil) {
                // add0: the context owns the certificate from here on.
                guard SSL_CTX_ctrl(ctx, SSL_CTRL_CHAIN_CERT, 0, UnsafeMutableRawPointer(intermediate)) == 1 else {
                    X509_free(intermediate)
                    return TLSErrors.drain()
                }
            }
            ERR_clear_error()  // the end of the chain is reported as "no start line"
            return nil
        }
        if let failure {
            throw .invalidArgument(name: source.option, reason: "cannot load a PEM certificate from \(source.origin): \(failure)")
        }
    }

    private static func usePrivateKey(_ source: PEMSource, password: String?, certificate: PEMSource,
                                      keyIsSeparate: Bool, in ctx: OpaquePointer) throws(LockError) {
        let passphrase = Passphrase(password)
        let key: OpaquePointer? = source.withBIO { bio in
            withExtendedLifetime(passphrase) {
                PEM_read_bio_PrivateKey(bio, nil, { buffer, size, _, userData in
                    // Asked only for an encrypted key. Never prompts: without a password, none.
                    let passphrase = Unmanaged<Passphrase>.fromOpaque(userData!).takeUnretainedValue()
                    passphrase.wasAsked = true
                    guard let buffer, let bytes = passphrase.bytes, bytes.count <= Int(size) else { return -1 }
                    bytes.withUnsafeBytes { password in
                        if let start = password.baseAddress { UnsafeMutableRawPointer(buffer).copyMemory(from: start, byteCount: password.count) }
                    }
                    return Int32(bytes.count)
                }, Unmanaged.passUnretained(passphrase).toOpaque())
            }
        }
        guard let key else {
            let detail = TLSErrors.drain()
            if passphrase.wasAsked {
                if password == nil {
                    throw .invalidArgument(name: "tls.privateKeyPassword", reason: "is needed: the private key in \(source.origin) is encrypted")
                }
                throw .invalidArgument(name: "tls.privateKeyPassword", reason: "does not decrypt the private key in \(source.origin) (wrong password?): \(detail)")
            }
            let hint = keyIsSeparate ? "" : " (no separate private key was given, so the key must be in the certificate's PEM)"
            throw .invalidArgument(name: source.option, reason: "cannot load a PEM private key from \(source.origin)\(hint): \(detail)")
        }
        defer { EVP_PKEY_free(key) }
        guard SSL_CTX_use_PrivateKey(ctx, key) == 1, SSL_CTX_check_private_key(ctx) == 1 else {
            throw .invalidArgument(name: source.option, reason: "the private key in \(source.origin) does not match the certificate in \(certificate.origin): \(TLSErrors.drain())")
        }
    }
}

/// The password for an encrypted private key, handed to OpenSSL's password callback, which
/// notes that it was asked (the key was encrypted).
private final class Passphrase {
    let bytes: [UInt8]?
    var wasAsked = false

    init(_ password: String?) {
        bytes = password.map { Array($0.utf8) }
    }
}

/// PEM text for one TLS option, from a file or given inline. Never the two: which would win?
private struct PEMSource {
    /// The option it came from, as errors name it: `tls.caFile`, `tls.caPEM`, ...
    let option: String
    /// Where it came from, for errors: `'/path/ca.pem'` or `tls.caPEM`. Never the text itself
    /// (a private key).
    let origin: String
    let bytes: [UInt8]

    /// Files over this size are not PEM anyone meant (the system store is about 200 KiB).
    static let maximumFileBytes = 16 << 20

    init?(file: String?, fileOption: String, pem: String?, pemOption: String) throws(LockError) {
        switch (file, pem) {
        case (nil, nil):
            return nil
        case (.some, .some):
            throw .invalidArgument(name: pemOption, reason: "is set together with \(fileOption); give the file or the PEM text, not both")
        case (nil, .some(let pem)):
            guard !pem.isEmpty else { throw .invalidArgument(name: pemOption, reason: "is empty") }
            option = pemOption
            origin = pemOption
            bytes = Array(pem.utf8)
        case (.some(let path), nil):
            option = fileOption
            origin = "'\(path)'"
            bytes = try Self.read(path, option: fileOption)
        }
    }

    /// Runs `body` with a read-only memory BIO over the text.
    func withBIO<T>(_ body: (OpaquePointer) -> T) -> T {
        bytes.withUnsafeBytes { buffer in
            let bio = BIO_new_mem_buf(buffer.baseAddress, Int32(buffer.count))!
            defer { BIO_free(bio) }
            return body(bio)
        }
    }

    /// The file's bytes, or an error that says plainly why not (instead of OpenSSL's `system
    /// library` wording).
    private static func read(_ path: String, option: String) throws(LockError) -> [UInt8] {
        if path.isEmpty {
            throw .invalidArgument(name: option, reason: "is an empty path")
        }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw .invalidArgument(name: option, reason: "cannot read '\(path)': \(String(cString: strerror(errno)))")
        }
        defer { Glibc.close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            let count = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if count == 0 { return bytes }
            if count < 0 {
                if errno == EINTR { continue }
                throw .invalidArgument(name: option, reason: "cannot read '\(path)': \(String(cString: strerror(errno)))")
            }
            bytes += chunk[..<count]
            if bytes.count > maximumFileBytes {
                throw .invalidArgument(name: option, reason: "'\(path)' is larger than \(maximumFileBytes >> 20) MiB, which no PEM file is")
            }
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
