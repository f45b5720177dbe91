/// How to secure a connection with TLS. `TLSOptions()` verifies the server against the system
/// CA store and checks its host name (the seed's `tls: {}`).
public struct TLSOptions: Sendable, Hashable {
    /// A PEM bundle of CAs to trust instead of the system store.
    public var caFile: String?
    /// The name sent as SNI and verified in the server's certificate; defaults to the host
    /// connected to.
    public var serverName: String?
    /// A client certificate (PEM) to present, for mutual TLS.
    public var certificateFile: String?
    /// The private key (PEM) of ``certificateFile``.
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
