// CallTable (Support/CallTable.swift): the calls of one lock in flight, the first inline.

import Testing
@testable import DflockdClient

@Suite("CallTable")
struct CallTableTests {
    /// Random sets and removals, checked after every step against a dictionary: the table finds
    /// exactly what was set and not removed, whichever entry is the inline one.
    @Test("Behaves as a dictionary under random sets and removals")
    func matchesDictionary() {
        let seed = UInt64.random(in: 1...UInt64.max)
        var random = SplitMix64(seed: seed)
        var table = CallTable<Int, Int>()
        var model: [Int: Int] = [:]
        for step in 0..<5_000 {
            let key = Int(random.next() % 6)
            if random.next() % 2 == 0 {
                let value = Int(random.next() % 1_000)
                table.set(value, for: key)
                model[key] = value
            } else {
                let removed = table.removeValue(forKey: key)
                #expect(removed == model.removeValue(forKey: key), "seed \(seed), step \(step), key \(key)")
            }
            #expect(table.isEmpty == model.isEmpty, "seed \(seed), step \(step)")
            if table.isEmpty != model.isEmpty { return }
        }
        for (key, value) in model {
            #expect(table.removeValue(forKey: key) == value, "seed \(seed): key \(key) at the end")
        }
        #expect(table.isEmpty, "seed \(seed): empty after removing everything")
    }
}
