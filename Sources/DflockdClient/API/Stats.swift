/// Asks one server for its ``ServerStats`` over a short-lived connection (dflockd 1.10 and
/// later; the 0.5.0 server answers `error`, reported as ``LockError/serverError(command:key:)``).
///
/// The completion runs on the loop thread.
public func stats(host: String = "127.0.0.1",
                  port: Int = 6388,
                  tls: TLSOptions? = nil,
                  auth: String? = nil,
                  connectTimeoutMs: Int? = nil,
                  loop: EventLoop = .shared,
                  completion: @escaping (Result<ServerStats, LockError>) -> Void) {
    let connection: Connection
    do throws(LockError) {
        connection = try statsConnection(host: host, port: port, tls: tls, auth: auth, connectTimeoutMs: connectTimeoutMs, loop: loop)
    } catch {
        loop.runLater { completion(.failure(error)) }
        return
    }
    connection.stats { result in
        connection.close()
        completion(result)
    }
}

/// Asks one server for its ``ServerStats`` over a short-lived connection (async form).
public func stats(host: String = "127.0.0.1",
                  port: Int = 6388,
                  tls: TLSOptions? = nil,
                  auth: String? = nil,
                  connectTimeoutMs: Int? = nil,
                  loop: EventLoop = .shared) async throws -> ServerStats {
    let connection = try statsConnection(host: host, port: port, tls: tls, auth: auth, connectTimeoutMs: connectTimeoutMs, loop: loop)
    defer { connection.close() }
    return try await connection.stats()
}

/// The short-lived connection of a `stats` call, its options checked the way a lock's are.
private func statsConnection(host: String, port: Int, tls: TLSOptions?, auth: String?, connectTimeoutMs: Int?,
                             loop: EventLoop) throws(LockError) -> Connection {
    try Connection.validate(host: host, port: port)
    let configuration = try ConnectionOptions(tls: tls, auth: auth, connectTimeoutMs: connectTimeoutMs, socketTimeoutMs: nil).validated()
    return Connection(endpoint: Endpoint(host: host, port: port), configuration: configuration, loop: loop)
}
