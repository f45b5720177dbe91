/// A server address as the caller gave it: a host name or IP literal, and a TCP port.
public struct Endpoint: Sendable, Hashable, CustomStringConvertible {
    /// Host name, IPv4 or IPv6 literal.
    public var host: String
    /// TCP port.
    public var port: Int

    /// Creates an endpoint.
    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    /// `host:port`, with an IPv6 literal in brackets.
    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

/// What a transport reports to the layer above it, on the loop thread.
protocol TransportDelegate: AnyObject {
    /// The byte stream is ready (TCP connected and, for TLS, the handshake done).
    func transportDidConnect(_ transport: any Transport)
    /// Bytes arrived. The buffer is only valid during the call.
    func transport(_ transport: any Transport, didRead bytes: UnsafeRawBufferPointer)
    /// The transport ended for a reason other than its owner's ``Transport/close()``: connect
    /// failure, EOF, reset, timeout. Called at most once, and nothing follows it; never inside
    /// the owner's ``Transport/connect(to:timeoutMilliseconds:)`` or ``Transport/write(_:)``.
    func transport(_ transport: any Transport, didFailWith error: LockError)
}

/// A byte stream to one server, driven by the event loop: ``TCPTransport``, or
/// ``TLSTransport`` (TLS over a TCP transport it owns).
///
/// Loop thread only. After ``close()`` the delegate hears nothing more.
protocol Transport: AnyObject {
    var delegate: (any TransportDelegate)? { get set }
    /// Starts connecting; the delegate hears `transportDidConnect` or `didFailWith`.
    func connect(to endpoint: Endpoint, timeoutMilliseconds: Int?)
    /// Queues bytes for sending, in order. Bytes written before the connection is up are an
    /// error of the caller's (TCP drops them; TLS holds them back until its handshake is done,
    /// so they never go out in clear).
    func write(_ bytes: UnsafeRawBufferPointer)
    /// Closes the stream at once, dropping unsent bytes. Idempotent.
    func close()
}
