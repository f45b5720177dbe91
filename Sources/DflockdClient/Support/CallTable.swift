/// A map from call identity to what the call needs, for the calls of one lock in flight.
///
/// A lock nearly always has no call in flight or one (a caller operation, or a release), so
/// the first entry lives inline and only more spill into a dictionary, dropped again when it
/// empties. A dictionary per lock keeps its storage after its last removal: with 100,000
/// locks that was about 140 bytes a lock for nothing.
struct CallTable<Key: Hashable, Value> {
    private var first: (key: Key, value: Value)?
    private var more: [Key: Value] = [:]

    var isEmpty: Bool { first == nil && more.isEmpty }

    /// Stores `value` for `key`, replacing what `key` had.
    mutating func set(_ value: Value, for key: Key) {
        // A key is in one place: inline if it is there or the inline place is free and the
        // key is not already among the others.
        if first?.key == key || (first == nil && more[key] == nil) {
            first = (key, value)
        } else {
            more[key] = value
        }
    }

    /// Removes and returns the value for `key`, if any.
    mutating func removeValue(forKey key: Key) -> Value? {
        if let entry = first, entry.key == key {
            first = nil
            return entry.value
        }
        guard !more.isEmpty, let value = more.removeValue(forKey: key) else { return nil }
        if more.isEmpty { more = [:] }
        return value
    }
}
