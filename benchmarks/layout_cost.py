"""Probe: one learner update laid out with shared prompts against rows, timed and FLOP-counted, to
check that the FLOP count rlsys.math.packing.shard uses to choose ranks the layouts as the clock does.

One learner rank (this process, DeepSpeed ZeRO-0 fp32, gloo) on a random Qwen2 (hidden, layers,
heads; default the 2M model of benchmarks/packing.py), one group of 8 answers to a 130-token
prompt, answers of about 64, 256 and 768 tokens. Each layout is forced (packing.shard without the
model's shape keeps what it is asked), 4 updates each, the median of the last 3. Prints, per answer
length, both times and both layouts' dense and attention GFLOP of a forward
(rlsys.math.flops.padded_forward_flops), and the seconds per dense and per attention GFLOP that
solve the two layouts' times.

    python benchmarks/layout_cost.py [HIDDEN LAYERS HEADS]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import tiny_model  # noqa: E402

G, PROMPT = 8, 130


def group(answer: int) -> tuple:
    """One group: 8 answers of answer/2 .. ~1.4 answer tokens to one prompt."""
    from rlsys.types import TrainBatch

    g = torch.Generator().manual_seed(0)
    lens = [answer // 2 + (answer * i) // G for i in range(G)]
    width = PROMPT + max(lens)
    ids = torch.randint(5, 100, (G, width), generator=g)
    ids[:, :PROMPT] = ids[0, :PROMPT]
    attention, loss = torch.zeros(G, width, dtype=torch.long), torch.zeros(G, width)
    for i, n in enumerate(lens):
        attention[i, :PROMPT + n] = 1
        loss[i, PROMPT:PROMPT + n] = 1
    batch = TrainBatch(ids * attention, attention, loss, torch.zeros(G, width), torch.linspace(-1, 1, G),
                       torch.zeros(G), prompt_lens=torch.full((G,), PROMPT))
    return batch, lens


def main() -> None:
    from rlsys.actors.learner import Learner
    from rlsys.actors.weight_sync import free_port
    from rlsys.config import AlgoConfig, LearnerConfig
    from rlsys.math.flops import padded_forward_flops
    from rlsys.math.packing import shard

    hidden, layers, heads = (int(x) for x in sys.argv[1:4]) if len(sys.argv) > 3 else (256, 4, 4)
    path, params = tiny_model(hidden, layers, heads)
    cfg = LearnerConfig(num_ranks=1, mini_batch_size=G, micro_batch_size=G, max_tokens_per_micro_batch=100_000,
                        lr=1e-6)
    learner = Learner(path, "float32", cfg, AlgoConfig(group_size=G, beta=0.0), temperature=1.0, rank=0, world=1,
                      backend="gloo", seed=0)
    learner.setup("127.0.0.1", free_port())
    shape = learner.model_shape()
    print(f"model: hidden {hidden}, {layers} layers, {heads} heads, {params / 1e6:.1f}M params; {G} answers to a "
          f"{PROMPT}-token prompt", flush=True)
    for answer in (64, 256, 768):
        batch, lens = group(answer)
        seconds = {}
        for name, group_size in (("shared", G), ("rows", 0)):
            times = []
            for _ in range(4):
                work = shard(batch, 0, 1, G, G, cfg.max_tokens_per_micro_batch, 0, learner.steps, "token", group_size)
                assert work.shared == (group_size > 0)
                start = time.perf_counter()
                learner.train(work)
                times.append(time.perf_counter() - start)
            seconds[name] = statistics.median(times[1:])
        packed, longest = PROMPT + sum(lens), PROMPT + max(lens)
        attention = layers * 4 * shape.heads * shape.head_dim
        dense = {"shared": padded_forward_flops(shape, 1, packed) - attention * packed ** 2,
                 "rows": padded_forward_flops(shape, G, longest) - attention * G * longest ** 2}
        pairs = {"shared": attention * packed ** 2, "rows": attention * G * longest ** 2}
        # seconds = a * dense + b * attention for both layouts: two equations, two unknowns
        m = torch.tensor([[dense[k] / 1e9, pairs[k] / 1e9] for k in ("shared", "rows")], dtype=torch.float64)
        a, b = torch.linalg.solve(m, torch.tensor([seconds["shared"], seconds["rows"]], dtype=torch.float64)).tolist()
        print(f"answers ~{answer}: shared {seconds['shared']:.3f}s, rows {seconds['rows']:.3f}s | dense GFLOP shared "
              f"{dense['shared'] / 1e9:.2f}, rows {dense['rows'] / 1e9:.2f} | attention GFLOP shared "
              f"{pairs['shared'] / 1e9:.2f}, rows {pairs['rows'] / 1e9:.2f} | s per GFLOP: dense {a:.4f}, "
              f"attention {b:.4f} ({b / a:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
