"""THE ASYNCHRONOUS LOOP (trainer.max_staleness = S > 0): generation overlaps learning.

A producer thread samples and scores batch after batch while the main thread trains on the
batch before it. After each update the new weights are pushed at once: each engine loads them
between two of its prompt chunks (an actor runs one call at a time, so an engine never serves a
half-loaded model), the chunks it already took finish on the old weights (trainer.in_flight=finish)
or are sampled again on the new ones (requeue), and every rollout carries the version that
sampled it. A batch can therefore mix versions.

Admission (as AReaL): the producer starts batch j only once the learner has pushed version
j - S. Batch j is trained at version j, so no rollout of it is more than S versions behind; the
loop checks that per rollout and logs the staleness histogram. Off-policy correction: rows
sampled by older weights get importance weights (algo.off_policy, in the learner).

What a resume continues from: the checkpoint after step k holds the prompt stream's position
before batch k + 1's prompts; batches in flight then are sampled again, with the checkpoint's
weights. The rollout pool does not change within an asynchronous run (autoscale is refused; a
lost engine leaves the pool, its chunk goes to another one, and it is not replaced).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

from rlsys.loops.rollouts import Collected, collect
from rlsys.math.batch import make_batch
from rlsys.observe.metrics import Timer


@dataclass
class Produced:
    got: Collected
    timings: dict[str, float]
    """The producer's generate and reward seconds for this batch (they overlap the learner's)."""
    spans: list


class Producer:
    """The thread that samples and scores batches start, start + 1, ... under the staleness bound."""

    def __init__(self, run, start: int, version: int):
        self.run, self.cfg = run, run.cfg
        self.version = version
        self.ready: dict[int, Produced] = {}
        self.positions: dict[int, dict] = {}   # batch -> the prompt stream's position before its prompts
        self.error: BaseException | None = None
        self.stopped = False
        self.lock = threading.Condition()
        self.thread = threading.Thread(target=self._work, args=(start,), name="rlsys-producer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _work(self, start: int) -> None:
        cfg, groups, prompts = self.cfg, self.run.groups, self.run.prompts
        try:
            for j in range(start, cfg.trainer.total_steps):
                with self.lock:  # admission: batch j waits for version j - S
                    self.lock.wait_for(lambda: self.stopped or self.version >= j - cfg.trainer.max_staleness)
                    if self.stopped:
                        return
                    self.positions[j] = prompts.state()
                timer = Timer(trace=cfg.profile.enabled)
                got = collect(prompts.next(), prompts.next, groups.generators.generate, groups.rewards.score, cfg, j,
                              phase=timer)
                with self.lock:
                    self.ready[j] = Produced(got, timer.pop(), timer.spans.take())
                    self.lock.notify_all()
        except BaseException as e:  # handed to the main thread, which raises it
            with self.lock:
                self.error = e
                self.lock.notify_all()

    def take(self, j: int) -> Produced:
        """Batch j, once sampled and scored; the producer's error if it failed."""
        with self.lock:
            self.lock.wait_for(lambda: j in self.ready or self.error is not None)
            if j not in self.ready:
                raise RuntimeError(f"the rollout producer failed before batch {j}") from self.error
            return self.ready.pop(j)

    def advance(self, version: int) -> None:
        """The generators now serve `version`: admit the batches it allows."""
        with self.lock:
            self.version = version
            self.lock.notify_all()

    def position(self, j: int) -> dict:
        """Where the prompt stream stood before batch j: what a resume after batch j - 1 continues from."""
        with self.lock:  # not started yet: it has drawn nothing for j, and cannot start while we hold the lock
            return self.positions[j] if j in self.positions else self.run.prompts.state()

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            self.lock.notify_all()
        # A batch being sampled finishes first (it is not cut short); the actors go with the run.
        self.thread.join(timeout=self.cfg.deadlines.generate_s + self.cfg.deadlines.score_s)


def shared_cores(placement: list[dict]) -> list[str]:
    """Addresses of the nodes where a generator and a learner rank run on the same CPUs (neither
    holds a GPU). Overlapping generation with learning adds no compute there: the two compete
    for the same cores, and the asynchronous loop can be slower than the synchronous one."""
    def cpu_nodes(role: str) -> dict[str, str]:
        return {r["node_id"]: r["ip"] for r in placement if r["role"] == role and not r.get("gpu_ids")}

    learners = cpu_nodes("learner")
    return sorted({ip for node, ip in cpu_nodes("generator").items() if node in learners})


def asynchronous(run, start: int, version: int) -> None:
    """Every step: take the next scored batch (sampled meanwhile), learn, push the new weights."""
    cfg, groups, timer = run.cfg, run.groups, run.timer
    bound = cfg.trainer.max_staleness
    if shared := shared_cores(groups.placement):
        print(f"[rlsys] trainer.max_staleness={bound} with generators and learners on the same CPUs (node(s) "
              f"{', '.join(shared)}): generation and learning overlap in time but compete for the same cores, "
              f"so this can be slower than synchronous; asynchronous mode pays when rollouts and learners have "
              f"resources of their own (nodes or cores: cluster.placement=disaggregated, or GPUs)", flush=True)
    producer = Producer(run, start, version)
    producer.start()
    try:
        for step in run.steps(start):
            t0 = time.perf_counter()
            with timer.spans.span("step", step=step):
                with timer("wait"):  # the learner idles only when generation is the slower side
                    made = producer.take(step)
                got = made.got
                staleness = [version - r.weight_version for r in got.rollouts]
                assert all(0 <= s <= bound for s in staleness), \
                    f"step {step}: rollouts {sorted(set(staleness))} versions behind {version}, more than " \
                    f"trainer.max_staleness={bound}"
                batch = make_batch(got.rollouts, got.rewards, cfg.algo, version=version)
                with timer("learn"):
                    learn = groups.learner.train(batch)
                if cfg.trainer.in_flight == "requeue":  # chunks still sampling on the old weights go again
                    groups.generators.requeue_older_than(version + 1)
                with timer("sync"):  # lands on each engine between two of its chunks
                    versions = groups.sync.push(version + 1)
            assert versions == [version + 1] * len(versions), f"step {step}: generators report versions {versions}"
            version += 1
            producer.advance(version)
            if run.timeline is not None:
                run.timeline.add("producer", made.spans)
            pool = {"events": [], "engines": {e.index: e.where.get("node_id") for e in groups.generators.engines},
                    "starting": []}
            run.record(step, version, got, learn, timer.pop() | made.timings, time.perf_counter() - t0, pool,
                       prompt_state=producer.position(step + 1),
                       extra=staleness_metrics(staleness, bound) | requeue_metrics(cfg, groups.generators))
    finally:
        producer.stop()


def staleness_metrics(staleness: list[int], bound: int) -> dict[str, float]:
    """The share of the batch's rollouts at each staleness 0..bound, and the mean.

    >>> staleness_metrics([0, 1, 1, 1], bound=2)
    {'staleness/mean': 0.75, 'staleness/0': 0.25, 'staleness/1': 0.75, 'staleness/2': 0.0}
    """
    counts = Counter(staleness)
    return {"staleness/mean": sum(staleness) / len(staleness),
            **{f"staleness/{s}": counts[s] / len(staleness) for s in range(bound + 1)}}


def requeue_metrics(cfg, pool) -> dict[str, float]:
    """trainer.in_flight=requeue: the chunks sampled again (dropped on the old weights) since the last step."""
    return {"generate/requeued_chunks": float(pool.take_requeued())} if cfg.trainer.in_flight == "requeue" else {}
