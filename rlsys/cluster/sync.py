"""The weight push, as the driver runs it: every learner rank sends its buckets to every worker
of every engine in the pool, by handle on the ranks' node (rlsys.actors.shared_weights), else over
a collective (rlsys.actors.weight_sync; rlsys.actors.engine_worker receives), checksums compared.
"""

from __future__ import annotations

import ray

from rlsys.actors.weight_sync import Bucket, combined
from rlsys.cluster.deadlines import LOST, ActorLost, get_all
from rlsys.cluster.learners import LearnerGroup
from rlsys.cluster.pool import Engine, GeneratorPool


def check_received(sent: list[int], received: dict[int, list[list[int]]]) -> None:
    """Every worker of every engine got exactly the buckets the learners sent (checksums per bucket), or
    the run stops: a generator serving other weights than the learner's is a silent error.

    >>> check_received([7, 9], {0: [[7, 9]], 1: [[7, 9], [7, 9]]})
    >>> check_received([7, 9], {0: [[7, 9]], 1: [[7, 9], [7, 8]]})
    Traceback (most recent call last):
    ...
    RuntimeError: weight sync: generator 1 worker 1 received bucket 1 with checksum 8, the learners sent 9 (buckets differ: [1])
    """
    for engine, workers in received.items():
        for worker, got in enumerate(workers):
            if got != sent:
                differ = [i for i in range(max(len(got), len(sent)))
                          if i >= len(got) or i >= len(sent) or got[i] != sent[i]]
                first = differ[0]
                raise RuntimeError(
                    f"weight sync: generator {engine} worker {worker} received bucket {first} with checksum "
                    f"{got[first] if first < len(got) else None}, the learners sent "
                    f"{sent[first] if first < len(sent) else None} (buckets differ: {differ})")


class WeightSync:
    """The learner ranks -> every generator worker: each sending rank its share of the buckets
    (learner.sync_from_all_ranks; else rank 0 sends them all). An engine on the node of every
    sending rank gets them by handle (learner.sync_by_handle: the ranks' shared buffers, mapped by
    the engine's workers: rlsys.actors.shared_weights); the others over a collective group of each
    sending rank and them.

    The group is built for one membership of the engines it serves; `push` rebuilds it first
    whenever that changed (an engine joined, left or was lost): collective groups cannot grow or
    shrink in place. Engines reached by handle need no group."""

    def __init__(self, learners: LearnerGroup, generators: GeneratorPool, backend: str, workers_per_engine: int,
                 timeout_s: float = 600.0, by_handle: bool = True):
        """timeout_s: one push or group rebuild, both sides (deadlines.sync_s)."""
        self.learners, self.generators, self.timeout_s = learners, generators, timeout_s
        self.backend, self.workers, self.by_handle = backend, workers_per_engine, by_handle
        rank0 = learners.actors[0]
        self.plan: list[Bucket] = ray.get(rank0.sync_plan.remote())
        self.senders = learners.actors[:ray.get(rank0.senders.remote())]  # each sends its share of the buckets
        self.shards: int = ray.get(rank0.sync_shards.remote())  # > 1: ZeRO-3 ranks each send their partitions
        where = ray.get([a.whereami.remote() for a in self.senders])
        self.addrs = [w["ip"] for w in where]
        self.sender_nodes = {w["node_id"] for w in where}
        self.members: list[int] | None = None  # the engines the group serves, by index
        self.in_flight: dict = {}  # the last push's calls -> who was called
        self.connect()

    def by_hand(self, engine: Engine) -> bool:
        """Does this engine receive by handle: sync_by_handle, and every sending rank on its node."""
        return self.by_handle and self.sender_nodes == {engine.where.get("node_id")}

    def _group(self, engines: list[Engine]) -> None:
        """One group per sending learner rank: that rank and every worker of these engines."""
        ports = ray.get([a.free_port.remote() for a in self.senders])  # fresh ports beside the learners' own
        world = 1 + len(engines) * self.workers
        rendezvous = list(zip(self.addrs, ports))
        senders = [a.join_sync.remote(addr, port, world, self.timeout_s)
                   for a, (addr, port) in zip(self.senders, rendezvous)]
        receivers = [e.actor.join_sync.remote(rendezvous, 1 + i * self.workers, world, self.backend, self.timeout_s)
                     for i, e in enumerate(engines)]
        get_all(senders + receivers, self.learners.names[:len(self.senders)] + [f"generator {e.index}" for e in engines],
                "sync (group)", self.timeout_s, "deadlines.sync_s")

    def _sent(self, per_rank: list[dict[int, int]]) -> list[int]:
        """Every bucket's checksum, in plan order, from the ranks that sent it (its pieces' checksums
        combined when each rank sent a piece of every bucket)."""
        merged: dict[int, list[int]] = {}
        for sums in per_rank:
            for i, c in sums.items():
                merged.setdefault(i, []).append(c)
        assert sorted(merged) == list(range(len(self.plan))), f"buckets sent: {sorted(merged)} of {len(self.plan)}"
        assert all(len(pieces) == self.shards for pieces in merged.values()), f"pieces per bucket, {self.shards} expected"
        return [combined(merged[i]) for i in range(len(self.plan))]

    def _by_collective(self, engines: list[Engine]) -> list[Engine]:
        return [e for e in engines if not self.by_hand(e)]

    def connect(self) -> None:
        """(Re)build the group over the pool's engines that receive over it, as they are now."""
        remote = self._by_collective(self.generators.engines)
        if remote:
            self._group(remote)
        self.members = [e.index for e in remote]

    def catch_up(self, engines: list[Engine], version: int) -> None:
        """Engines joining the pool get the current weights (as `version`) before they serve a
        prompt, by handle or over a group of rank 0 and them alone; the engines already serving
        are not disturbed. The next push rebuilds the full group."""
        remote = self._by_collective(engines)
        if remote:
            self._group(remote)
            self.members = None
        versions = self._send(engines, version)
        assert versions == [version] * len(engines), f"joining engines report versions {versions}, expected {version}"

    def _send(self, engines: list[Engine], version: int | None) -> list:
        """Every learner rank sends its buckets; the engines load them as `version`, or, with None,
        only receive them (the wire alone). By handle first: the ranks fill their shared buffers
        (a collective among the learners under ZeRO-3), then those engines read them while the
        ranks broadcast to the others. Returns what each engine's receive returned, in `engines`' order."""
        local = [e for e in engines if self.by_hand(e)]
        remote = self._by_collective(engines)
        learners = self.learners.names

        def receive(e: Engine, shares: list | None):
            return (e.actor.receive_wire.remote(self.plan, self.shards, shares) if version is None
                    else e.actor.receive_weights.remote(self.plan, version, self.shards, shares))

        shares = []
        if local:
            shared = [a.share_weights.remote(self.plan) for a in self.learners.actors]
            self.in_flight = dict(zip(shared, learners))
            # one per sending rank, in rank order (a rank with no buckets returns None: it is the
            # last of the round robin, so the others' owners are the same without it)
            shares = [s for s in get_all(shared, learners, "sync (share)", self.timeout_s, "deadlines.sync_s")
                      if s is not None]
        sends = [a.broadcast_weights.remote(self.plan) for a in self.learners.actors] if remote else []
        by_handle = [receive(e, shares) for e in local]
        by_collective = [receive(e, None) for e in remote]
        calls = by_handle + sends + by_collective
        names = [f"generator {e.index}" for e in local] + (learners if remote else []) + \
                [f"generator {e.index}" for e in remote]
        self.in_flight = dict(zip(calls, names))  # for _lost_in_push
        # Both sides done (every worker has loaded what it received) before the loop goes on.
        done = dict(zip(calls, get_all(calls, names, "sync", self.timeout_s, "deadlines.sync_s")))
        received = {}
        for group, receives, sent in ((local, by_handle, [{i: c for i, _, c in s["buckets"]} for s in shares]),
                                      (remote, by_collective, [done[call] for call in sends])):
            if group:
                got = {e.index: done[call] for e, call in zip(group, receives)}  # (version, each worker's checksums)
                check_received(self._sent(sent), {index: sums for index, (_, sums) in got.items()})
                received |= got
        return [received[e.index][0] for e in engines]

    def _current_engines(self) -> list[Engine]:
        """The pool's live engines, the group rebuilt over them if it changed. Engines that died
        since the step's generate leave first (a dead member breaks a broadcast: gloo's sender
        fails at once, the other receivers would wait out the group timeout)."""
        self.generators.drop_dead()
        if self.members != [e.index for e in self._by_collective(self.generators.engines)]:
            self.connect()
        return self.generators.engines

    def push(self, version: int) -> list[int]:
        """Broadcast the learner's weights; returns the version each generator now reports.

        Two phases: the pool first stops handing out chunks and lets the ones in flight finish
        (GeneratorPool.paused: the asynchronous loop generates meanwhile), then the learners post
        and every engine receives at once. An engine that dies during the push leaves the pool
        (replaced between steps, as one lost while generating) and the push goes again to the
        others: the failed send closed every member's group (Learner.broadcast_weights), so the
        survivors stopped waiting at once. A lost learner rank, a failure with every engine
        alive, or more than `max_restarts` engines lost in this push stops the run."""
        with self.generators.paused():
            for attempt in range(self.generators.max_restarts + 1):
                engines = self._current_engines()
                try:
                    return self._send(engines, version)
                except (ActorLost, ray.exceptions.RayTaskError) as error:
                    lost = self._lost_in_push(engines, error)
                    if not lost or attempt == self.generators.max_restarts:
                        raise
                print(f"[rlsys] weight push {version}: generator(s) {[e.index for e in lost]} died during it; "
                      f"pushing again to the {len(self.generators.engines)} left", flush=True)
        raise AssertionError("unreachable: the last attempt raises")

    def _lost_in_push(self, engines: list[Engine], error: Exception) -> list[Engine]:
        """After a failed push: wait for every call of it to end (the failed send closed the groups,
        so the others fail at once; deadlines.sync_s at most), then the engines whose actor died
        leave the pool. Returns them; none when a learner rank died (that stops the run) or
        every engine is alive (the push failed for another reason)."""
        calls = self.in_flight
        ready, _ = ray.wait(list(calls), num_returns=len(calls), timeout=self.timeout_s)
        dead: dict[str, Exception] = {}
        for ref in ready:
            try:
                ray.get(ref)
            except LOST as e:
                dead[calls[ref]] = e
            except ray.exceptions.RayTaskError:  # a survivor's receive or a send that lost a peer
                pass
        if isinstance(error, ActorLost):
            dead.setdefault(error.name, error)
        if any(name.startswith("learner") for name in dead):
            return []
        lost = [e for e in engines if f"generator {e.index}" in dead]
        for engine in lost:
            self.generators.lost_engine(engine, dead[f"generator {engine.index}"], found="during the weight push")
        return lost

    def push_wire(self) -> None:
        """A push's wire part alone: the learners' buckets (copied from their parameters, as in
        `push`) into the engines' receive buffers (by handle: the ranks' shared buffers, mapped by
        the engines), checksums compared, nothing loaded (the sync benchmark sets it against
        push_raw and against the whole push)."""
        self._send(self._current_engines(), None)

    def push_raw(self) -> None:
        """The same bytes as `push` in one flat buffer, over the same group: the link's best case."""
        assert self.members == [e.index for e in self.generators.engines], \
            "push_raw measures the collective: every engine must receive over it (learner.sync_by_handle=false)"
        dtype = self.plan[0][0].dtype
        assert all(m.dtype == dtype for b in self.plan for m in b), "raw broadcast assumes one dtype"
        numel = sum(m.numel for b in self.plan for m in b)
        sends = [self.learners.actors[0].broadcast_raw.remote(numel, dtype)]
        ray.get(sends + [g.receive_raw.remote(numel, dtype) for g in self.generators.actors])
