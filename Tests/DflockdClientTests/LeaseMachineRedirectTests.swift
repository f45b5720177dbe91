import Testing
@testable import DflockdClient

/// Cluster redirects in the lock's state machine, driven by events alone (cluster mode, the
/// newest server): which `error_not_leader` answers are followed, where, how often, and what a
/// held lock's renewal and release do with one.
@Suite struct LeaseMachineRedirectTests {
    private let grant = Grant(token: "4c6af3c93c83e0aa6ca56449a1d1c83f", leaseS: 20)
    private let home = Endpoint(host: "10.0.0.1", port: 6388)
    private let leader = Endpoint(host: "10.0.0.2", port: 6389)
    private let third = Endpoint(host: "10.0.0.3", port: 6390)
    private var members: [Endpoint] { [home, leader, third] }

    private func call(_ raw: UInt64) -> LeaseMachine.CallID { LeaseMachine.CallID(raw: raw) }

    private func connectedForAcquire() -> LeaseMachine {
        var machine = LeaseMachine(key: "job", acquireTimeoutS: 5, renewRatio: 0.5, members: members)
        _ = machine.handle(.acquireRequested(call(1), force: false))
        _ = machine.handle(.connected(1))
        return machine
    }

    /// Held through `acquire` (call 1) on session 1, granted for a request sent at 1 s: the
    /// renewal is due at 11 s, the local deadline is 20 s.
    private func heldMachine() -> LeaseMachine {
        var machine = connectedForAcquire()
        _ = machine.handle(.answered(1, .acquire(timeoutS: 5), .granted(grant), sentAtMs: 1_000))
        return machine
    }

    @Test func anAcquireRedirectedToAMemberStartsOverThere() {
        var machine = connectedForAcquire()
        #expect(machine.handle(.failed(1, .acquire(timeoutS: 5), .notLeader(leader: "10.0.0.2:6389"))) == [
            .redirectSession(from: 1, to: 2, server: leader), .stateChanged(.connecting),
        ])
        // the follower's session is over: its late events change nothing
        #expect(machine.handle(.failed(1, nil, .closed)) == [])
        #expect(machine.handle(.connected(2)) == [.send(2, .acquire(timeoutS: 5)), .stateChanged(.queued)])
        #expect(machine.handle(.answered(2, .acquire(timeoutS: 5), .granted(grant), sentAtMs: 1_000)) == [
            .scheduleTimer(2, afterMs: 10_000), .complete(call(1), .acquire, .granted), .stateChanged(.held),
        ])
    }

    @Test func anEnqueueIsRedirectedToo() {
        var machine = LeaseMachine(key: "job", acquireTimeoutS: 5, renewRatio: 0.5, members: members)
        _ = machine.handle(.enqueueRequested(call(1), force: false))
        _ = machine.handle(.connected(1))
        #expect(machine.handle(.failed(1, .enqueue, .notLeader(leader: "10.0.0.3:6390"))) == [
            .redirectSession(from: 1, to: 2, server: third), .stateChanged(.connecting),
        ])
        #expect(machine.handle(.connected(2)) == [.send(2, .enqueue), .stateChanged(.queued)])
        #expect(machine.handle(.answered(2, .enqueue, .queued, sentAtMs: 0)) == [.complete(call(1), .enqueue, .queued)])
    }

    @Test(arguments: ["10.9.9.9:6388", "evil.example:6389", "10.0.0.2", "garbage", ""])
    func aHintNamingNoMemberFailsAtOnce(_ hint: String) {
        var machine = connectedForAcquire()
        let error = LockError.notLeader(leader: hint.isEmpty ? nil : hint)
        #expect(machine.handle(.failed(1, .acquire(timeoutS: 5), error)) == [
            .cancelTimer, .closeConnection(1), .complete(call(1), .acquire, .failed(error)), .stateChanged(.closed),
        ])
    }

    @Test func atMostThreeRedirectsPerCall() {
        var machine = connectedForAcquire()
        for session: UInt64 in 1...3 {
            let actions = machine.handle(.failed(session, .acquire(timeoutS: 5), .notLeader(leader: "10.0.0.2:6389")))
            #expect(actions.first == .redirectSession(from: session, to: session + 1, server: leader))
            _ = machine.handle(.connected(session + 1))
        }
        let fourth = LockError.notLeader(leader: "10.0.0.2:6389")
        #expect(machine.handle(.failed(4, .acquire(timeoutS: 5), fourth)) == [
            .cancelTimer, .closeConnection(4), .complete(call(1), .acquire, .failed(fourth)), .stateChanged(.closed),
        ])
        // the next call has a budget of its own
        _ = machine.handle(.acquireRequested(call(2), force: false))
        _ = machine.handle(.connected(5))
        #expect(machine.handle(.failed(5, .acquire(timeoutS: 5), fourth)).first == .redirectSession(from: 5, to: 6, server: leader))
    }

    @Test func aWaitIsNotRedirected() {
        var machine = LeaseMachine(key: "job", acquireTimeoutS: 5, renewRatio: 0.5, members: members)
        _ = machine.handle(.enqueueRequested(call(1), force: false))
        _ = machine.handle(.connected(1))
        _ = machine.handle(.answered(1, .enqueue, .queued, sentAtMs: 0))
        _ = machine.handle(.waitRequested(call(2), timeoutS: 5))
        let error = LockError.notLeader(leader: "10.0.0.2:6389")
        #expect(machine.handle(.failed(1, .wait(timeoutS: 5), error)) == [
            .cancelTimer, .closeConnection(1), .complete(call(2), .wait, .failed(error)), .stateChanged(.closed),
        ])
    }

    @Test func aRedirectedRenewalIsSentAgainToTheLeaderWithTheSameToken() {
        var machine = heldMachine()
        #expect(machine.handle(.timerFired(1, nowMs: 11_000)) == [.send(1, .renew(token: grant.token)), .scheduleTimer(1, afterMs: 9_000)])
        #expect(machine.handle(.failed(1, .renew(token: grant.token), .notLeader(leader: "10.0.0.2:6389"))) == [
            .redirectSession(from: 1, to: 2, server: leader),
        ])
        #expect(machine.publicState == .held)
        #expect(machine.handle(.connected(2)) == [.send(2, .renew(token: grant.token))])
        #expect(machine.handle(.answered(2, .renew(token: grant.token), .renewed(remainingS: 20), sentAtMs: 12_000)) == [
            .scheduleTimer(2, afterMs: 10_000),
        ])
        #expect(machine.holding?.deadlineMs == 31_000)
        // an event of the follower's session is stale
        #expect(machine.handle(.timerFired(1, nowMs: 20_000)) == [])
    }

    @Test func aRedirectedRenewalNotAnsweredByTheLocalDeadlineLosesTheLock() {
        var machine = heldMachine()
        _ = machine.handle(.timerFired(1, nowMs: 11_000))
        _ = machine.handle(.failed(1, .renew(token: grant.token), .notLeader(leader: "10.0.0.2:6389")))
        // still connecting to the leader when the lease timer, which went on for session 2,
        // reaches the deadline
        #expect(machine.handle(.timerFired(2, nowMs: 20_000)) == [
            .cancelTimer, .closeConnection(2), .reportLockLost(token: grant.token), .stateChanged(.closed),
        ])
        #expect(machine.handle(.connected(2)) == [])
    }

    @Test func aRedirectedRenewalWhoseConnectionFailsLosesTheLock() {
        var machine = heldMachine()
        _ = machine.handle(.timerFired(1, nowMs: 11_000))
        _ = machine.handle(.failed(1, .renew(token: grant.token), .notLeader(leader: "10.0.0.2:6389")))
        let refused = LockError.connectFailed(host: "10.0.0.2", port: 6389, reason: "refused")
        #expect(machine.handle(.failed(2, nil, refused)) == [
            .cancelTimer, .closeConnection(2), .reportLockLost(token: grant.token), .stateChanged(.closed),
        ])
    }

    @Test func aRenewalRedirectedToNoMemberLosesTheLock() {
        var machine = heldMachine()
        _ = machine.handle(.timerFired(1, nowMs: 11_000))
        #expect(machine.handle(.failed(1, .renew(token: grant.token), .notLeader(leader: "10.9.9.9:1"))) == [
            .cancelTimer, .closeConnection(1), .reportLockLost(token: grant.token), .stateChanged(.closed),
        ])
    }

    @Test func aReleaseDuringARedirectedRenewalGoesToTheLeader() {
        var machine = heldMachine()
        _ = machine.handle(.timerFired(1, nowMs: 11_000))
        _ = machine.handle(.failed(1, .renew(token: grant.token), .notLeader(leader: "10.0.0.2:6389")))
        #expect(machine.handle(.releaseRequested(call(2))) == [.cancelTimer, .stateChanged(.releasing)])
        #expect(machine.handle(.connected(2)) == [.send(2, .release(token: grant.token))])
        #expect(machine.handle(.answered(2, .release(token: grant.token), .ok, sentAtMs: 12_000)) == [
            .closeConnection(2), .complete(call(2), .release, .released), .stateChanged(.closed),
        ])
    }

    @Test func aRedirectedReleaseIsSentAgainToTheLeader() {
        var machine = heldMachine()
        #expect(machine.handle(.releaseRequested(call(2))) == [.cancelTimer, .send(1, .release(token: grant.token)), .stateChanged(.releasing)])
        #expect(machine.handle(.failed(1, .release(token: grant.token), .notLeader(leader: "10.0.0.2:6389"))) == [
            .redirectSession(from: 1, to: 2, server: leader),
        ])
        #expect(machine.handle(.connected(2)) == [.send(2, .release(token: grant.token))])
        #expect(machine.handle(.answered(2, .release(token: grant.token), .ok, sentAtMs: 12_000)) == [
            .closeConnection(2), .complete(call(2), .release, .released), .stateChanged(.closed),
        ])
    }

    @Test func aReleaseRedirectedToNoMemberFailsWithNotLeader() {
        var machine = heldMachine()
        _ = machine.handle(.releaseRequested(call(2)))
        let error = LockError.notLeader(leader: nil)
        #expect(machine.handle(.failed(1, .release(token: grant.token), error)) == [
            .closeConnection(1), .complete(call(2), .release, .failed(error)), .stateChanged(.closed),
        ])
    }
}
