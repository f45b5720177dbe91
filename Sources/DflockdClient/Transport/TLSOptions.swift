/// How to secure a connection with TLS. `TLSOptions()` verifies the server against the system
/// CA store and checks its host name (the TypeScript client's `tls: {}`).
///
/// TLS 1.2 is the minimum; renegotiation is refused. The host name checked is `serverName`, or
/// else the host connected to: a DNS name is also sent as SNI and must match a DNS name in the
/// certificate, an IP literal must match one of its IP addresses (no SNI). Every connection
/// with equal options (`serverName` aside) shares one OpenSSL context, built, with its files
/// read, when the first lock or connection with those options is created; a file or PEM text
/// that cannot be used, or a wrong ``privateKeyPassword``, is reported then, as
/// ``LockError/invalidArgument(name:reason:)`` naming the option (`tls.caFile`, `tls.caPEM`,
/// `tls.certificateFile`, `tls.certificatePEM`, `tls.privateKeyFile`, `tls.privateKeyPEM`,
/// `tls.privateKeyPassword`) and the file.
///
/// Each piece of material comes from a file or from PEM text in memory (a secret store, an
/// environment variable), never both: a file and PEM text for the same thing is an
/// `invalidArgument`. A private key may be encrypted (PKCS#8 `ENCRYPTED PRIVATE KEY`, or the
/// traditional `Proc-Type: 4,ENCRYPTED` form) when ``privateKeyPassword`` is given. The private
/// key and its password never appear in an error, a description or a `dump`.
public struct TLSOptions: Sendable, Hashable {
    /// A PEM bundle of CAs to trust instead of the system store.
    public var caFile: String?
    /// The name sent as SNI and verified in the server's certificate; defaults to the host
    /// connected to.
    public var serverName: String?
    /// A client certificate (PEM, optionally followed by its chain) to present, for mutual TLS.
    public var certificateFile: String?
    /// The private key (PEM; encrypted only with ``privateKeyPassword``) of the client
    /// certificate; when neither this nor ``privateKeyPEM`` is set, the key is read from the
    /// certificate's PEM.
    public var privateKeyFile: String?
    /// Turns off certificate and host name verification. Anyone on the path can then read and
    /// change the traffic; use it only against a test server.
    public var insecureSkipVerify: Bool
    /// PEM text of the CAs to trust instead of the system store (instead of ``caFile``).
    public var caPEM: String?
    /// PEM text of the client certificate, optionally followed by its chain (instead of
    /// ``certificateFile``).
    public var certificatePEM: String?
    /// PEM text of the client certificate's private key (instead of ``privateKeyFile``).
    public var privateKeyPEM: String?
    /// The password of an encrypted private key, from ``privateKeyFile``, ``privateKeyPEM`` or
    /// the certificate's PEM. Ignored for a key that is not encrypted.
    public var privateKeyPassword: String?

    /// Creates TLS options; every default verifies the server.
    public init(caFile: String? = nil,
                serverName: String? = nil,
                certificateFile: String? = nil,
                privateKeyFile: String? = nil,
                insecureSkipVerify: Bool = false,
                caPEM: String? = nil,
                certificatePEM: String? = nil,
                privateKeyPEM: String? = nil,
                privateKeyPassword: String? = nil) {
        self.caFile = caFile
        self.serverName = serverName
        self.certificateFile = certificateFile
        self.privateKeyFile = privateKeyFile
        self.insecureSkipVerify = insecureSkipVerify
        self.caPEM = caPEM
        self.certificatePEM = certificatePEM
        self.privateKeyPEM = privateKeyPEM
        self.privateKeyPassword = privateKeyPassword
    }
}

extension TLSOptions: CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    /// The options, with PEM text shown by size and the private key and its password redacted.
    public var description: String {
        "TLSOptions(" + shownFields.map { "\($0.label): \($0.value)" }.joined(separator: ", ") + ")"
    }

    /// The same as ``description``.
    public var debugDescription: String { description }

    /// The fields of ``description``, so that `dump` and reflection show no secret either.
    public var customMirror: Mirror {
        Mirror(self, children: shownFields.map { (label: $0.label as String?, value: $0.value as Any) }, displayStyle: .struct)
    }

    private var shownFields: [(label: String, value: String)] {
        func path(_ value: String?) -> String { value.map { $0.debugDescription } ?? "nil" }
        func pem(_ value: String?) -> String { value.map { "<PEM, \($0.utf8.count) bytes>" } ?? "nil" }
        func secret(_ value: String?) -> String { value == nil ? "nil" : "<redacted>" }
        return [("caFile", path(caFile)), ("serverName", path(serverName)), ("certificateFile", path(certificateFile)),
                ("privateKeyFile", path(privateKeyFile)), ("insecureSkipVerify", "\(insecureSkipVerify)"),
                ("caPEM", pem(caPEM)), ("certificatePEM", pem(certificatePEM)), ("privateKeyPEM", secret(privateKeyPEM)),
                ("privateKeyPassword", secret(privateKeyPassword))]
    }
}
