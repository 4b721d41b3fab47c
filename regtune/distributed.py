"""Data parallelism for the training step, without the DDP wrapper (torch.distributed only).

A trial may run as N data-parallel workers (ranks of one ``torch.distributed``
process group: gloo on CPU, NCCL on GPUs; Ray Train starts them, see
``trainables.train_dp``). Every worker builds the same *global* batch for
``(seed, step)`` (``task.train_batch(step)``) and the step function takes its
share, so a run of N workers follows the trajectory of one process with the
same global batch, to floating-point round-off, for every method family:

* standard step (AdamW, AdamCPR, Adam + rescaling, SGD): worker r takes examples
  ``bounds(n)[r]`` of the batch (near-equal contiguous shares), computes the
  gradient of its shard's mean loss, and the gradients are combined as
  ``sum_r (n_r / n) g_r`` (n_r = the shard's labelled targets), which is the
  gradient of the global batch's mean loss also for uneven shares. Clipping,
  the optimizer and any constraint (CPR's lambda / kappa, rescaling) then act on
  identical gradients and parameters, so their state stays replicated.
* micro-batch steps (the implicit-regularization penalties, grafting, NGD):
  the K micro-batches of the global batch are split over the workers (whole
  micro-batches: BatchNorm statistics per micro-batch as in one process);
  each worker sums its micro-batches' gradients (penalty terms included: the
  double backward stays local), the sums are all-reduced and divided by K.
  Penalty randomness (sampled Fisher labels, unit directions) is drawn from the
  method generator in micro-batch order on every worker (a worker draws and
  discards the values of micro-batches it does not own), so the draws are the
  single process's. Grafting / NGD norms are norms of the all-reduced direction;
  ``iter_graft``'s random micro-batch norm comes from the worker that owns it.
* IRE: the mask-refresh gradient (labels sampled from the model) is computed per
  shard, combined like the standard step's, and every worker thresholds the same
  all-reduced scores: one global mask, identical on every worker.
* SAM: the perturbation comes from the all-reduced gradient and the second
  (perturbed) gradient is all-reduced too: the single-process definition of
  Foret et al. (not the per-worker "m-sharpness" variant some codebases run).

Why no DDP wrapper: ``loss.backward(create_graph=True)`` under DDP fails and
``torch.autograd.grad`` bypasses its hooks (the penalties differentiate
gradients). Parameters are broadcast from rank 0 once, gradients are
all-reduced where a step's gradient is complete, and BatchNorm running
statistics (buffers) are broadcast from rank 0 after every step (like DDP's
``broadcast_buffers``), so every worker holds rank 0's state and rank 0's
checkpoint restores them all.

Not identical to one process: BatchNorm *batch* statistics in the standard
step are per worker shard (as gradient accumulation's chunks, or DDP without
SyncBatchNorm); dropout masks come from each worker's own RNG stream (seeded
from seed, rank and step). Models without BatchNorm and dropout, and every
micro-batch method, match one process to round-off (tests/test_data_parallel.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

BUCKET_ELEMENTS = 1 << 24  # elements per all-reduce bucket (bounds the flat copy's memory)


class DataParallel:
    """This process's place in a data-parallel group, and the collectives the steps need.

    ``DataParallel()`` is one process (every operation is the identity); ``DataParallel.from_torch()``
    reads the initialized default process group.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, group: Any = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} world_size={world_size}: expected 0 <= rank < world_size")
        self.rank, self.world_size, self.group = int(rank), int(world_size), group

    @classmethod
    def from_torch(cls) -> DataParallel:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def __repr__(self) -> str:
        return f"DataParallel(rank={self.rank}, world_size={self.world_size})"

    # ------------------------------------------------------------------ shares
    def bounds(self, n: int) -> list[tuple[int, int]]:
        """Contiguous near-equal shares of ``range(n)`` for every rank (the first ``n % N`` one larger)."""
        q, r = divmod(int(n), self.world_size)
        out, start = [], 0
        for k in range(self.world_size):
            stop = start + q + (1 if k < r else 0)
            out.append((start, stop))
            start = stop
        return out

    def share(self, n: int) -> slice:
        """This rank's share of ``range(n)``."""
        return slice(*self.bounds(n)[self.rank])

    def shard(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(this rank's inputs, its targets, its weight n_r / n in the global mean loss).

        n counts labelled targets (``targets >= 0`` for integer targets, the convention of the tasks'
        losses and of ``accuracy``), so shard means combine into the global batch's mean exactly.
        """
        if not self.active:
            return inputs, targets, 1.0
        n = inputs.shape[0]
        if n < self.world_size:
            raise ValueError(f"a batch of {n} examples cannot be split over {self.world_size} workers:"
                             f" expected batch_size >= workers")
        s = self.share(n)
        x, y = inputs[s], targets[s]
        return x, y, labelled(y) / max(labelled(targets), 1)

    # ------------------------------------------------------------------ collectives
    def all_sum_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Sum ``tensors`` over the ranks, in place (bucketed per device and dtype); identity in one process."""
        if not self.active:
            return
        import torch.distributed as dist

        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.device, t.dtype), []).append(t)
        for ts in groups.values():
            for bucket in _buckets(ts):
                if len(bucket) == 1 and bucket[0].is_contiguous():
                    dist.all_reduce(bucket[0], group=self.group)
                    continue
                flat = torch.cat([t.reshape(-1) for t in bucket])
                dist.all_reduce(flat, group=self.group)
                offset = 0
                for t in bucket:
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Sum a few numbers over the ranks (float64); the numbers themselves in one process."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device())
        self.all_sum_([t])
        return t.cpu().tolist()

    def broadcast_(self, tensors: Iterable[torch.Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` with rank ``src``'s values (in place); identity in one process."""
        if not self.active:
            return
        import torch.distributed as dist

        for t in tensors:
            if t.is_contiguous():
                dist.broadcast(t, src=src, group=self.group)
            else:
                tmp = t.contiguous()
                dist.broadcast(tmp, src=src, group=self.group)
                t.copy_(tmp)

    def sync_model(self, model: nn.Module) -> None:
        """Every rank takes rank 0's parameters and buffers."""
        with torch.no_grad():
            self.broadcast_([p.data for p in model.parameters()])
            self.sync_buffers(model)

    def sync_buffers(self, model: nn.Module) -> None:
        """Every rank takes rank 0's buffers (BatchNorm running statistics ...)."""
        with torch.no_grad():
            self.broadcast_(list(model.buffers()))

    def _comm_device(self) -> torch.device:
        import torch.distributed as dist

        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" \
            else torch.device("cpu")


LOCAL = DataParallel()  # one process: every collective is the identity


def labelled(targets: torch.Tensor) -> int:
    """Number of labelled targets (integer targets < 0 are ignored by the tasks' losses)."""
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        return int(targets.shape[0]) if targets.ndim else 1
    return int((targets >= 0).sum())


def _buckets(tensors: list[torch.Tensor]):
    bucket, size = [], 0
    for t in tensors:
        bucket.append(t)
        size += t.numel()
        if size >= BUCKET_ELEMENTS:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def sync_gradients(dp: DataParallel, model: nn.Module, weight: float) -> None:
    """``p.grad <- sum_r weight_r * p.grad_r`` over the ranks for every parameter with a gradient.

    ``weight``: this rank's share of the global mean (``DataParallel.shard``). Identity in one process.
    Which parameters have a gradient must not depend on the data (the same on every rank).
    """
    if not dp.active:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if weight != 1.0:
        torch._foreach_mul_(grads, weight)
    dp.all_sum_(grads)
