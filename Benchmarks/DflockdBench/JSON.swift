/// A JSON object written in the order its fields were added (no Foundation: the benchmark's
/// own footprint stays small, which matters for the RSS figures it reports).
struct JSONObject {
    private var fields: [(String, String)] = []

    mutating func add(_ name: String, _ value: String) { fields.append((name, Self.quoted(value))) }
    mutating func add(_ name: String, _ value: Int) { fields.append((name, String(value))) }
    mutating func add(_ name: String, _ value: Bool) { fields.append((name, value ? "true" : "false")) }
    mutating func add(_ name: String, _ value: [String]) {
        fields.append((name, "[" + value.map(Self.quoted).joined(separator: ",") + "]"))
    }
    /// Non-finite numbers (no sample) become `null`.
    mutating func add(_ name: String, _ value: Double, decimals: Int = 3) {
        fields.append((name, value.isFinite ? formatted(value, decimals: decimals) : "null"))
    }

    var text: String {
        "{\n" + fields.map { "  \(Self.quoted($0.0)): \($0.1)" }.joined(separator: ",\n") + "\n}\n"
    }

    private static func quoted(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20:
                let hex = String(scalar.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}

/// `value` with exactly `decimals` digits after the point (what `%.3f` prints), without Foundation.
func formatted(_ value: Double, decimals: Int = 3) -> String {
    guard value.isFinite else { return "nan" }
    var scale = 1.0
    for _ in 0..<decimals { scale *= 10 }
    let negative = value < 0
    let scaled = (abs(value) * scale).rounded()
    guard scaled < 9e18 else { return String(value) }
    let units = UInt64(scaled)
    let whole = units / UInt64(scale)
    var text = (negative && units != 0 ? "-" : "") + String(whole)
    if decimals > 0 {
        let fraction = String(units % UInt64(scale))
        text += "." + String(repeating: "0", count: decimals - fraction.count) + fraction
    }
    return text
}
