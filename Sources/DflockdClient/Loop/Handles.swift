import CUV

/// libuv handle types all begin with the `uv_handle_t` fields, and streams with the
/// `uv_stream_t` ones; these views are the C casts libuv's own API expects.
extension UnsafeMutablePointer where Pointee == uv_async_t {
    var asHandle: UnsafeMutablePointer<uv_handle_t> { UnsafeMutableRawPointer(self).assumingMemoryBound(to: uv_handle_t.self) }
}

extension UnsafeMutablePointer where Pointee == uv_prepare_t {
    var asHandle: UnsafeMutablePointer<uv_handle_t> { UnsafeMutableRawPointer(self).assumingMemoryBound(to: uv_handle_t.self) }
}

extension UnsafeMutablePointer where Pointee == uv_timer_t {
    var asHandle: UnsafeMutablePointer<uv_handle_t> { UnsafeMutableRawPointer(self).assumingMemoryBound(to: uv_handle_t.self) }
}

extension UnsafeMutablePointer where Pointee == uv_tcp_t {
    var asHandle: UnsafeMutablePointer<uv_handle_t> { UnsafeMutableRawPointer(self).assumingMemoryBound(to: uv_handle_t.self) }
    var asStream: UnsafeMutablePointer<uv_stream_t> { UnsafeMutableRawPointer(self).assumingMemoryBound(to: uv_stream_t.self) }
}

/// The close callback for handles this package allocated with `UnsafeMutablePointer.allocate`:
/// by the time libuv calls it the loop no longer refers to the memory.
let freeHandleOnClose: uv_close_cb = { handle in
    UnsafeMutableRawPointer(handle)?.deallocate()
}

/// libuv's name for an error code, e.g. `ECONNREFUSED (connection refused)`.
func uvErrorDescription(_ code: Int32) -> String {
    let name = uv_err_name(code).map { String(cString: $0) } ?? "E\(code)"
    let text = uv_strerror(code).map { String(cString: $0) } ?? "unknown error"
    return "\(name) (\(text))"
}
