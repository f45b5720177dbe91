import Testing
@testable import DflockdClient

/// The lock's state machine driven by events alone: no socket, no timer, no loop.
@Suite struct LeaseMachineTests {
    private let grant = Grant(token: "4c6af3c93c83e0aa6ca56449a1d1c83f", leaseS: 20)

    private func heldMachine() -> LeaseMachine {
        var machine = LeaseMachine(key: "job", acquireTimeoutS: 10, renewRatio: 0.5)
        _ = machine.handle(.acquireRequested(force: false))
        _ = machine.handle(.connected)
        _ = machine.handle(.granted(grant, sentAtMs: 1_000))
        return machine
    }

    @Test func acquireWalksIdleConnectingQueuedHeld() {
        var machine = LeaseMachine(key: "job", acquireTimeoutS: 7, renewRatio: 0.5)
        #expect(machine.publicState == .idle)
        #expect(machine.handle(.acquireRequested(force: false)) == [.accept(.acquire), .openConnection, .stateChanged(.connecting)])
        #expect(machine.handle(.connected) == [.send(.acquire(timeoutS: 7)), .stateChanged(.queued)])
        #expect(machine.handle(.granted(grant, sentAtMs: 1_000)) == [
            .scheduleTimer(afterMs: 10_000), .finish(.acquire, .granted), .stateChanged(.held),
        ])
        #expect(machine.holding?.grant == grant)
        // 1 s + 20 s, less the safety margin: a tenth of the lease, at most 1 s.
        #expect(machine.holding?.deadlineMs == 20_000)
    }

    @Test func timeoutClosesTheSessionAndReportsFalse() {
        var machine = LeaseMachine(key: "job", acquireTimeoutS: 1, renewRatio: 0.5)
        _ = machine.handle(.acquireRequested(force: false))
        _ = machine.handle(.connected)
        #expect(machine.handle(.timedOut) == [.closeConnection, .finish(.acquire, .timedOut), .stateChanged(.closed)])
        // Reusable: a new acquire starts over.
        #expect(machine.handle(.acquireRequested(force: false)).contains(.openConnection))
    }

    @Test func acquireWhileConnectedIsRejectedUnlessForced() {
        var machine = heldMachine()
        #expect(machine.handle(.acquireRequested(force: false)) == [.reject(.alreadyConnected(key: "job"))])
        #expect(machine.publicState == .held)
        #expect(machine.handle(.acquireRequested(force: true)) == [
            .cancelTimer, .closeConnection, .accept(.acquire), .openConnection, .stateChanged(.connecting),
        ])
    }

    @Test func renewalUpdatesLeaseAndDeadlineAndReschedules() {
        var machine = heldMachine()
        // Granted at 1 s with 20 s: renew at 11 s, and wait for the answer until 20 s at most
        // (21 s less the 1 s margin).
        #expect(machine.handle(.timerFired(nowMs: 11_000)) == [.send(.renew(token: grant.token)), .scheduleTimer(afterMs: 9_000)])
        // A tick while the renewal is in flight sends nothing more.
        #expect(machine.handle(.timerFired(nowMs: 15_000)) == [.scheduleTimer(afterMs: 5_000)])
        #expect(machine.handle(.renewed(leaseS: 8, sentAtMs: 11_000)) == [.scheduleTimer(afterMs: 4_000)])
        #expect(machine.holding?.leaseS == 8)
        // 11 s + 8 s, less 0.8 s.
        #expect(machine.holding?.deadlineMs == 18_200)
    }

    @Test func unansweredRenewalLosesTheLockAtTheLocalDeadline() {
        var machine = heldMachine()
        _ = machine.handle(.timerFired(nowMs: 11_000))
        #expect(machine.handle(.timerFired(nowMs: 19_999)) == [.scheduleTimer(afterMs: 1)])
        #expect(machine.handle(.timerFired(nowMs: 20_000)) == [
            .cancelTimer, .closeConnection, .reportLockLost(token: grant.token), .stateChanged(.closed),
        ])
        // The renewal's answer, arriving after all, changes nothing.
        #expect(machine.handle(.renewed(leaseS: 20, sentAtMs: 11_000)) == [])
    }

    /// The server starts the lease when it reads the request, after we sent it; a timer only
    /// ever fires late. The margin keeps the loss ahead of the earliest server-side expiry.
    @Test func theLocalDeadlineKeepsASafetyMarginBeforeTheLeaseEnds() {
        func deadline(leaseS: Int, renewRatio: Double = 0.5, maxIdleMs: Int? = nil) -> UInt64? {
            var machine = LeaseMachine(key: "job", acquireTimeoutS: 10, renewRatio: renewRatio, maxIdleMs: maxIdleMs)
            _ = machine.handle(.acquireRequested(force: false))
            _ = machine.handle(.connected)
            _ = machine.handle(.granted(Grant(token: grant.token, leaseS: leaseS), sentAtMs: 0))
            return machine.holding?.deadlineMs
        }
        #expect(deadline(leaseS: 33) == 32_000, "a tenth of the lease, at most 1 s")
        #expect(deadline(leaseS: 3) == 2_700)
        #expect(deadline(leaseS: 1) == 900)
        #expect(deadline(leaseS: 60, maxIdleMs: 10_000) == 59_000)
        // The renewal keeps at least as much time to be answered as the margin takes.
        #expect(deadline(leaseS: 1, renewRatio: 0.95) == 975)
        #expect(deadline(leaseS: 0) == 0)
        #expect(LeaseMachine.safetyMarginMs(leaseMs: 3_000, renewalDelayMs: 1_500) == 300)
        #expect(LeaseMachine.safetyMarginMs(leaseMs: 1_000, renewalDelayMs: 1_000) == 0)
    }

    @Test func aLateTimerPastTheDeadlineLosesTheLockWithoutRenewing() {
        var machine = heldMachine()
        #expect(machine.handle(.timerFired(nowMs: 30_000)).contains(.reportLockLost(token: grant.token)))
    }

    @Test func maxIdleCapsTheRenewalInterval() {
        var machine = LeaseMachine(key: "job", acquireTimeoutS: 10, renewRatio: 0.5, maxIdleMs: 10_000)
        _ = machine.handle(.acquireRequested(force: false))
        _ = machine.handle(.connected)
        let long = Grant(token: grant.token, leaseS: 60)
        #expect(machine.handle(.granted(long, sentAtMs: 0)).first == .scheduleTimer(afterMs: 10_000))
        _ = machine.handle(.timerFired(nowMs: 10_000))
        #expect(machine.handle(.renewed(leaseS: 60, sentAtMs: 10_000)) == [.scheduleTimer(afterMs: 10_000)])
        // A short lease still renews by the ratio.
        var short = LeaseMachine(key: "job", acquireTimeoutS: 10, renewRatio: 0.5, maxIdleMs: 10_000)
        _ = short.handle(.acquireRequested(force: false))
        _ = short.handle(.connected)
        #expect(short.handle(.granted(Grant(token: grant.token, leaseS: 4), sentAtMs: 0)).first == .scheduleTimer(afterMs: 2_000))
    }

    @Test func failedRenewalLosesTheLockOnceAndLeavesItReusable() {
        var machine = heldMachine()
        _ = machine.handle(.timerFired(nowMs: 11_000))
        #expect(machine.handle(.requestFailed(.notHeld(key: "job"))) == [
            .cancelTimer, .closeConnection, .reportLockLost(token: grant.token), .stateChanged(.closed),
        ])
        // The connection's own close report arrives next and changes nothing.
        #expect(machine.handle(.connectionLost(.connectionClosed(reason: "x"))) == [])
        // release() then says what happened, once.
        #expect(machine.handle(.releaseRequested) == [.reject(.lockLost(key: "job", token: grant.token))])
        #expect(machine.handle(.releaseRequested) == [.reject(.notConnected(key: "job"))])
        #expect(machine.handle(.acquireRequested(force: false)).contains(.openConnection))
    }

    @Test func connectionLostWhileHeldReportsTheLoss() {
        var machine = heldMachine()
        #expect(machine.handle(.connectionLost(.connectionClosed(reason: "EOF"))) == [
            .cancelTimer, .closeConnection, .reportLockLost(token: grant.token), .stateChanged(.closed),
        ])
    }

    @Test func releaseSendsReleaseThenCloses() {
        var machine = heldMachine()
        #expect(machine.handle(.releaseRequested) == [
            .acceptRelease, .cancelTimer, .send(.release(token: grant.token)), .stateChanged(.releasing),
        ])
        #expect(machine.handle(.released) == [.closeConnection, .finishRelease(error: nil), .stateChanged(.closed)])
        #expect(machine.handle(.releaseRequested) == [.reject(.notConnected(key: "job"))])
    }

    @Test func releaseWhoseConnectionDiedSucceeds() {
        var machine = heldMachine()
        _ = machine.handle(.releaseRequested)
        #expect(machine.handle(.connectionLost(.connectionClosed(reason: "reset"))) == [
            .closeConnection, .finishRelease(error: nil), .stateChanged(.closed),
        ])
    }

    @Test func releaseRefusedByTheServerReportsNotHeld() {
        var machine = heldMachine()
        _ = machine.handle(.releaseRequested)
        #expect(machine.handle(.requestFailed(.notHeld(key: "job"))) == [
            .closeConnection, .finishRelease(error: .notHeld(key: "job")), .stateChanged(.closed),
        ])
    }

    @Test func releaseOnNeverConnectedInstanceIsRejected() {
        var machine = LeaseMachine(key: "job", acquireTimeoutS: 1, renewRatio: 0.5)
        #expect(machine.handle(.releaseRequested) == [.reject(.notConnected(key: "job"))])
    }

    @Test func twoPhaseFastPathHoldsAndWaitIsTrueAtOnce() {
        var machine = LeaseMachine(key: "two", acquireTimeoutS: 5, renewRatio: 0.5)
        _ = machine.handle(.enqueueRequested(force: false))
        #expect(machine.handle(.connected) == [.send(.enqueue), .stateChanged(.queued)])
        #expect(machine.handle(.granted(grant, sentAtMs: 0)) == [
            .scheduleTimer(afterMs: 10_000), .finish(.enqueue, .granted), .stateChanged(.held),
        ])
        #expect(machine.handle(.waitRequested(timeoutS: 3)) == [.accept(.wait), .finish(.wait, .granted)])
    }

    @Test func twoPhaseQueuedThenWaitGranted() {
        var machine = LeaseMachine(key: "two", acquireTimeoutS: 5, renewRatio: 0.5)
        _ = machine.handle(.enqueueRequested(force: false))
        _ = machine.handle(.connected)
        #expect(machine.handle(.enqueuedBehindHolder) == [.finish(.enqueue, .queued)])
        #expect(machine.publicState == .queued)
        #expect(machine.handle(.waitRequested(timeoutS: 3)) == [.accept(.wait), .send(.wait(timeoutS: 3))])
        #expect(machine.handle(.waitRequested(timeoutS: 3)) == [.reject(.operationInProgress(key: "two"))])
        #expect(machine.handle(.granted(grant, sentAtMs: 0)).contains(.finish(.wait, .granted)))
    }

    @Test func waitBeforeEnqueueIsRejected() {
        var machine = LeaseMachine(key: "two", acquireTimeoutS: 5, renewRatio: 0.5)
        #expect(machine.handle(.waitRequested(timeoutS: 1)) == [.reject(.notEnqueued(key: "two"))])
    }

    @Test func closeFailsTheOperationInFlightAndIsIdempotent() {
        var machine = LeaseMachine(key: "job", acquireTimeoutS: 5, renewRatio: 0.5)
        _ = machine.handle(.acquireRequested(force: false))
        #expect(machine.handle(.closeRequested) == [
            .cancelTimer, .closeConnection, .finish(.acquire, .failed(.closed)), .stateChanged(.closed),
        ])
        #expect(machine.handle(.closeRequested) == [])
    }

    @Test func cancelOnlyActsOnAnOperationInFlight() {
        var held = heldMachine()
        #expect(held.handle(.cancelRequested) == [])
        var machine = LeaseMachine(key: "job", acquireTimeoutS: 5, renewRatio: 0.5)
        _ = machine.handle(.acquireRequested(force: false))
        _ = machine.handle(.connected)
        #expect(machine.handle(.cancelRequested) == [
            .cancelTimer, .closeConnection, .finish(.acquire, .failed(.cancelled)), .stateChanged(.closed),
        ])
    }

    @Test func serverRefusalFailsTheAcquire() {
        var machine = LeaseMachine(key: "job", acquireTimeoutS: 5, renewRatio: 0.5)
        _ = machine.handle(.acquireRequested(force: false))
        _ = machine.handle(.connected)
        #expect(machine.handle(.requestFailed(.maxLocks(key: "job"))).contains(.finish(.acquire, .failed(.maxLocks(key: "job")))))
        #expect(machine.publicState == .closed)
    }

    @Test func staleRepliesAfterCloseAreIgnored() {
        var machine = heldMachine()
        _ = machine.handle(.closeRequested)
        #expect(machine.handle(.granted(grant, sentAtMs: 0)) == [])
        #expect(machine.handle(.renewed(leaseS: 5, sentAtMs: 0)) == [])
        #expect(machine.handle(.timerFired(nowMs: 11_000)) == [])
        #expect(machine.handle(.timedOut) == [])
    }
}

@Suite struct ShardingTests {
    /// The vectors of protocol.md: every official client must agree on placement.
    @Test(arguments: [
        ("my-resource", UInt32(1_352_043_018), [0, 0, 0, 3, 4]),
        ("a", UInt32(3_904_355_907), [0, 1, 0, 2, 4]),
        ("bench-0", UInt32(2_530_901_313), [0, 1, 0, 3, 3]),
        ("clé-锁", UInt32(3_873_615_673), [0, 1, 1, 3, 4]),
        ("orders/42", UInt32(370_287_966), [0, 0, 0, 1, 6]),
    ])
    func stableHashShardMatchesProtocolVectors(key: String, crc: UInt32, indices: [Int]) {
        #expect(crc32(key.utf8) == crc)
        #expect([1, 2, 3, 5, 7].map { stableHashShard(key, $0) } == indices)
    }
}
