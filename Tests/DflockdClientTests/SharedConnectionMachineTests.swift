import Testing
@testable import DflockdClient

/// A lock on a session (``LeaseMachine`` with `sharesConnection`) and the shared connection's
/// own machine, driven by events alone: no socket, no timer, no loop.
@Suite struct SharedConnectionMachineTests {
    private let grant = Grant(token: "4c6af3c93c83e0aa6ca56449a1d1c83f", leaseS: 20)
    private func call(_ raw: UInt64) -> LeaseMachine.CallID { LeaseMachine.CallID(raw: raw) }
    private func member(_ raw: UInt64) -> SharedConnectionMachine.Member { .init(raw: raw) }

    private func sessionLock(acquireTimeoutS: Int = 10) -> LeaseMachine {
        LeaseMachine(key: "job", acquireTimeoutS: acquireTimeoutS, renewRatio: 0.5, sharesConnection: true, jitterSeed: 42)
    }

    /// The actions with the (jittered) first renewal delay taken out, and that delay.
    private func splitTimer(_ actions: [LeaseMachine.Action]) -> ([LeaseMachine.Action], Int?) {
        var delay: Int?
        let rest = actions.filter { action in
            if case .scheduleTimer(_, let afterMs) = action { delay = afterMs; return false }
            return true
        }
        return (rest, delay)
    }

    private func heldOnShared() -> LeaseMachine {
        var machine = sessionLock()
        _ = machine.handle(.acquireRequested(call(1), force: false))
        _ = machine.handle(.connected(1))
        _ = machine.handle(.answered(1, .acquire(timeoutS: 0), .granted(grant), sentAtMs: 1_000))
        return machine
    }

    @Test func anUncontendedAcquireIsATryOnTheSharedConnection() {
        var machine = sessionLock()
        #expect(machine.handle(.acquireRequested(call(1), force: false)) == [.attachShared(1), .stateChanged(.connecting)])
        #expect(machine.handle(.connected(1)) == [.send(1, .acquire(timeoutS: 0)), .stateChanged(.queued)])
        let (actions, delay) = splitTimer(machine.handle(.answered(1, .acquire(timeoutS: 0), .granted(grant), sentAtMs: 1_000)))
        #expect(actions == [.complete(call(1), .acquire, .granted), .stateChanged(.held)])
        // 10 s by ratio, up to a tenth early.
        #expect((9_000...10_000).contains(delay ?? -1))
        #expect(machine.holding?.deadlineMs == 20_000, "the local deadline is unchanged by the jitter")
        #expect(machine.route == .shared)
    }

    @Test func aTakenKeyIsWaitedForOnAConnectionOfTheLocksOwn() {
        var machine = sessionLock(acquireTimeoutS: 7)
        _ = machine.handle(.acquireRequested(call(1), force: false))
        _ = machine.handle(.connected(1))
        #expect(machine.handle(.answered(1, .acquire(timeoutS: 0), .timeout, sentAtMs: 0)) == [
            .detachShared(1), .openConnection(2), .stateChanged(.connecting),
        ])
        #expect(machine.handle(.connected(2)) == [.send(2, .acquire(timeoutS: 7)), .stateChanged(.queued)])
        #expect(machine.handle(.answered(2, .acquire(timeoutS: 7), .granted(grant), sentAtMs: 0)).contains(.complete(call(1), .acquire, .granted)))
        #expect(machine.route == .own)
        // It stays there: the release closes that connection.
        #expect(machine.handle(.releaseRequested(call(2))) == [.cancelTimer, .send(2, .release(token: grant.token)), .stateChanged(.releasing)])
        #expect(machine.handle(.answered(2, .release(token: grant.token), .ok, sentAtMs: 0)) == [
            .closeConnection(2), .complete(call(2), .release, .released), .stateChanged(.closed),
        ])
    }

    @Test func aTryWithoutTimeoutReportsFalseAtOnce() {
        var machine = sessionLock(acquireTimeoutS: 0)
        _ = machine.handle(.acquireRequested(call(1), force: false))
        _ = machine.handle(.connected(1))
        #expect(machine.handle(.answered(1, .acquire(timeoutS: 0), .timeout, sentAtMs: 0)) == [
            .detachShared(1), .complete(call(1), .acquire, .timedOut), .stateChanged(.closed),
        ])
    }

    @Test func enqueueTakesAFreeKeyOnTheSharedConnectionAndQueuesOnItsOwn() {
        var free = sessionLock()
        _ = free.handle(.enqueueRequested(call(1), force: false))
        #expect(free.handle(.connected(1)) == [.send(1, .acquire(timeoutS: 0)), .stateChanged(.queued)])
        let (actions, _) = splitTimer(free.handle(.answered(1, .acquire(timeoutS: 0), .granted(grant), sentAtMs: 0)))
        #expect(actions == [.complete(call(1), .enqueue, .granted), .stateChanged(.held)])

        var taken = sessionLock()
        _ = taken.handle(.enqueueRequested(call(1), force: false))
        _ = taken.handle(.connected(1))
        #expect(taken.handle(.answered(1, .acquire(timeoutS: 0), .timeout, sentAtMs: 0)) == [.detachShared(1), .openConnection(2), .stateChanged(.connecting)])
        #expect(taken.handle(.connected(2)) == [.send(2, .enqueue), .stateChanged(.queued)])
        #expect(taken.handle(.answered(2, .enqueue, .queued, sentAtMs: 0)) == [.complete(call(1), .enqueue, .queued)])
        #expect(taken.handle(.waitRequested(call(2), timeoutS: 3)) == [.send(2, .wait(timeoutS: 3))])
    }

    @Test func closeReleasesUnansweredAndLeavesTheSharedConnection() {
        var machine = heldOnShared()
        #expect(machine.handle(.closeRequested) == [
            .cancelTimer, .releaseUnanswered(1, token: grant.token), .detachShared(1), .stateChanged(.closed),
        ])
        // The release's answer, should it come, is stale.
        #expect(machine.handle(.answered(1, .release(token: grant.token), .ok, sentAtMs: 0)) == [])
    }

    @Test func aDroppedHeldLockNamesItsRelease() {
        let machine = heldOnShared()
        #expect(machine.releaseWhenDropped?.token == grant.token)
        #expect(sessionLock().releaseWhenDropped == nil)
    }

    @Test func aRefusedRenewalLosesTheLockAndLeavesTheConnection() {
        var machine = heldOnShared()
        _ = machine.handle(.timerFired(1, nowMs: 11_000))
        #expect(machine.handle(.failed(1, .renew(token: grant.token), .notHeld(key: "job"))) == [
            .cancelTimer, .detachShared(1), .reportLockLost(token: grant.token), .stateChanged(.closed),
        ])
    }

    @Test func theLocalDeadlineFreesTheKeyOnTheSharedConnection() {
        var machine = heldOnShared()
        _ = machine.handle(.timerFired(1, nowMs: 11_000))
        #expect(machine.handle(.timerFired(1, nowMs: 20_000)) == [
            .releaseUnanswered(1, token: grant.token), .cancelTimer, .detachShared(1), .reportLockLost(token: grant.token), .stateChanged(.closed),
        ])
    }

    @Test func aConnectionLossLosesTheHeldLock() {
        var machine = heldOnShared()
        #expect(machine.handle(.failed(1, nil, .connectionClosed(reason: "EOF"))) == [
            .cancelTimer, .detachShared(1), .reportLockLost(token: grant.token), .stateChanged(.closed),
        ])
    }

    @Test func aGrantThatArrivesAfterTheTryWasAbandonedIsReleased() {
        var machine = sessionLock()
        _ = machine.handle(.acquireRequested(call(1), force: false))
        _ = machine.handle(.connected(1))
        #expect(machine.handle(.cancelRequested(call(1))) == [
            .cancelTimer, .detachShared(1), .complete(call(1), .acquire, .failed(.cancelled)), .stateChanged(.closed),
        ])
        #expect(machine.handle(.answered(1, .acquire(timeoutS: 0), .granted(grant), sentAtMs: 0)) == [.releaseUnanswered(1, token: grant.token)])
        #expect(machine.orphanedTry == nil)
        #expect(machine.handle(.answered(1, .acquire(timeoutS: 0), .granted(grant), sentAtMs: 0)) == [], "only once")
    }

    @Test func aRefusedTryFailsThatLockOnly() {
        var machine = sessionLock()
        _ = machine.handle(.acquireRequested(call(1), force: false))
        _ = machine.handle(.connected(1))
        #expect(machine.handle(.failed(1, .acquire(timeoutS: 0), .maxLocks(key: "job"))) == [
            .cancelTimer, .detachShared(1), .complete(call(1), .acquire, .failed(.maxLocks(key: "job"))), .stateChanged(.closed),
        ])
    }

    @Test func renewalsOfLocksAcquiredTogetherAreSpread() {
        var delays = Set<Int>()
        for seed in 1...20 as ClosedRange<UInt64> {
            var machine = LeaseMachine(key: "job", acquireTimeoutS: 10, renewRatio: 0.5, sharesConnection: true, jitterSeed: seed * 7919)
            _ = machine.handle(.acquireRequested(call(1), force: false))
            _ = machine.handle(.connected(1))
            let (_, delay) = splitTimer(machine.handle(.answered(1, .acquire(timeoutS: 0), .granted(grant), sentAtMs: 0)))
            delays.insert(delay ?? -1)
        }
        #expect(delays.allSatisfy { (9_000...10_000).contains($0) })
        #expect(delays.count > 10, "20 locks acquired together renew at different times: \(delays.sorted())")
    }

    // MARK: - The shared connection

    @Test func theFirstLockOpensTheConnectionAndWaitersAreAdmittedTogether() {
        var shared = SharedConnectionMachine()
        #expect(shared.handle(.attachRequested(member(1), nowMs: 0)) == [.open(1)])
        #expect(shared.handle(.attachRequested(member(2), nowMs: 0)) == [])
        #expect(shared.handle(.connected(1)) == [.admit([member(1), member(2)])])
        #expect(shared.handle(.attachRequested(member(3), nowMs: 0)) == [.admit([member(3)])])
        #expect(shared.handle(.detachRequested(member(2))) == [])
        #expect(shared.attached == [member(1), member(3)])
    }

    @Test func anEndedConnectionLosesExactlyTheLocksOnItAndReopensOnDemand() {
        var shared = SharedConnectionMachine()
        _ = shared.handle(.attachRequested(member(1), nowMs: 0))
        _ = shared.handle(.connected(1))
        _ = shared.handle(.attachRequested(member(2), nowMs: 0))
        _ = shared.handle(.attachRequested(member(3), nowMs: 0))
        _ = shared.handle(.detachRequested(member(3)))
        let actions = shared.handle(.ended(1, .connectionClosed(reason: "EOF"), nowMs: 5, random: 0))
        guard case .lost(let lost, let error)? = actions.first, actions.count == 1 else {
            Issue.record("expected one .lost, got \(actions)")
            return
        }
        #expect(Set(lost) == [member(1), member(2)])
        #expect(error == .connectionClosed(reason: "EOF"))
        #expect(shared.handle(.ended(1, .closed, nowMs: 5, random: 0)) == [], "a second report of the end is stale")
        #expect(shared.handle(.attachRequested(member(4), nowMs: 6)) == [.open(2)], "no back-off after an open connection ended")
    }

    @Test func aFailedConnectFailsItsWaitersAndBacksOff() {
        var shared = SharedConnectionMachine()
        let refused = LockError.connectFailed(host: "127.0.0.1", port: 1, reason: "refused")
        _ = shared.handle(.attachRequested(member(1), nowMs: 1_000))
        _ = shared.handle(.attachRequested(member(2), nowMs: 1_000))
        #expect(shared.handle(.ended(1, refused, nowMs: 1_000, random: 0)) == [.reject([member(1), member(2)], refused)])
        #expect(shared.handle(.attachRequested(member(3), nowMs: 1_050)) == [.reject([member(3)], refused)], "within the back-off")
        #expect(shared.handle(.attachRequested(member(4), nowMs: 1_100)) == [.open(2)], "the first lock after it tries again")
        _ = shared.handle(.ended(2, refused, nowMs: 1_100, random: 0))
        #expect(shared.phase == .backingOff(untilMs: 1_300, reason: refused), "doubled")
        #expect(SharedConnectionMachine.backoffMs(failures: 30, random: 0) == SharedConnectionMachine.maxBackoffMs, "bounded")
        #expect((3_750...5_000).contains(SharedConnectionMachine.backoffMs(failures: 30, random: 987_654_321)), "jitter takes up to a quarter")
    }

    @Test func closeRejectsWaitersClosesWhenAnsweredAndRefusesLaterLocks() {
        var shared = SharedConnectionMachine()
        _ = shared.handle(.attachRequested(member(1), nowMs: 0))
        #expect(shared.handle(.closeRequested) == [.reject([member(1)], .sessionClosed), .closeWhenAnswered(1)])
        #expect(shared.handle(.attachRequested(member(2), nowMs: 0)) == [.reject([member(2)], .sessionClosed)])
        #expect(shared.handle(.connected(1)) == [], "a connect that completes after the close is stale")
    }
}
