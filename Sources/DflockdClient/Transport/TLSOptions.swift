/// How to secure a connection with TLS. `TLSOptions()` verifies the server against the system
/// CA store and checks its host name (the TypeScript client's `tls: {}`).
///
/// TLS 1.2 is the minimum; renegotiation is refused. The host name checked is `serverName`, or
/// else the host connected to: a DNS name is also sent as SNI and must match a DNS name in the
/// certificate, an IP literal must match one of its IP addresses (no SNI). Every connection
/// with equal options (`serverName` aside) shares one OpenSSL context, built, with its files
/// read, when the first lock or connection with those options is created; a file that cannot be
/// used is reported then, as ``LockError/invalidArgument(name:reason:)`` naming the option
/// (`tls.caFile`, `tls.certificateFile`, `tls.privateKeyFile`) and the file.
public struct TLSOptions: Sendable, Hashable {
    /// A PEM bundle of CAs to trust instead of the system store.
    public var caFile: String?
    /// The name sent as SNI and verified in the server's certificate; defaults to the host
    /// connected to.
    public var serverName: String?
    /// A client certificate (PEM, optionally followed by its chain) to present, for mutual TLS.
    public var certificateFile: String?
    /// The private key (PEM, unencrypted) of ``certificateFile``; when `nil`, the key is read
    /// from ``certificateFile``.
    public var privateKeyFile: String?
    /// Turns off certificate and host name verification. Anyone on the path can then read and
    /// change the traffic; use it only against a test server.
    public var insecureSkipVerify: Bool

    /// Creates TLS options; every default verifies the server.
    public init(caFile: String? = nil,
                serverName: String? = nil,
                certificateFile: String? = nil,
                privateKeyFile: String? = nil,
                insecureSkipVerify: Bool = false) {
        self.caFile = caFile
        self.serverName = serverName
        self.certificateFile = certificateFile
        self.privateKeyFile = privateKeyFile
        self.insecureSkipVerify = insecureSkipVerify
    }
}
