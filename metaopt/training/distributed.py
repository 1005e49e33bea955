"""Meta-training on several processes and machines with ``torch.distributed``, launched by ``torchrun``.

Every process (a *rank*) builds the same run from the same config and seed, so the meta-parameters
start equal; each meta-update, the estimator splits its work over the ranks and the ranks exchange
only what the estimate needs, so every rank takes the same outer step and the parameters stay equal
(checked at the start and at every checkpoint, :meth:`World.check_identical`). How each estimator
splits its work (``Estimator.distribute``):

- backpropagation (MAML and its family) and truncated backpropagation: rank ``r`` takes a
  contiguous share of the meta-batch's tasks (:meth:`World.share`: the union over ranks is the
  single-process batch), and the meta-gradients are summed as **one flat bucket**, each rank's
  weighted by its share of the tasks (:meth:`World.all_reduce_gradients`). A parameter without a
  gradient on a rank enters as zeros, so the ranks never disagree on the collective, and stays
  without gradient when no rank gave it one. ``DistributedDataParallel`` is not used: it supports
  neither double backward nor :func:`torch.autograd.grad` (pytorch#63812, #47562);
- evolution strategies (ES, PES): the perturbations are regenerated on every rank from their
  counter-based keys (:mod:`metaopt.estimators.perturbations`); each rank unrolls its share of the
  particles and the particles' losses are gathered (PES also gathers the particles' inner states,
  which every rank carries on; ES the one branch it carries on), so every rank computes the
  single-process estimate;
- rule search (PPO): every rank samples the same rules, scores its share of the new ones, and the
  rewards are gathered; every rank then takes the same controller update.

Rank 0 alone writes checkpoints, TensorBoard events, metrics and progress, and evaluates; it
reads a checkpoint to resume and sends it to the others (:meth:`World.from_leader`), so the ranks
need no shared file system, and a run resumes on any number of processes. Whether to stop (the
iterations, the time budget, Ctrl-C on any rank) is agreed on after every meta-update
(:meth:`World.agree`). When a collective fails, because a rank died or lost its connection, the
others raise :class:`DistributedError` naming the ranks that no longer answer; the last checkpoint
is left intact, and ``metaopt train --resume`` restarts the whole run from it.

Launch with ``torchrun --nproc-per-node N -m metaopt train ...`` (the CPU uses gloo, CUDA uses
NCCL with one device per local rank), or ``metaopt train --nproc N ...`` on one machine
(:func:`launch_command`).

Example:
    >>> world = World(rank=1, size=3)
    >>> [list(World(rank, 3).share(8)) for rank in range(3)]
    [[0, 1, 2], [3, 4, 5], [6, 7]]
    >>> SINGLE.active, world.leader
    (False, False)
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["SINGLE", "DistributedError", "World", "current_world", "init_world", "launch_command", "leave_world"]

T = TypeVar("T")

#: Seconds the surviving ranks wait for each other to answer after a failed collective.
_ROLL_CALL_S = 5.0


class DistributedError(RuntimeError):
    """A collective failed (a rank died or lost its connection), or a run cannot be shared over the ranks."""


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a run: its rank, their number, its rank on its machine.

    ``World()`` is a single process (:data:`SINGLE`), whose collectives are the identity.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """Whether several processes share the run."""
        return self.size > 1

    @property
    def leader(self) -> bool:
        """Whether this is rank 0, which alone writes files and evaluates."""
        return self.rank == 0

    def share(self, count: int) -> range:
        """This rank's contiguous share of ``count`` items: sizes differ by at most one, lower ranks take more."""
        base, extra = divmod(count, self.size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    # ------------------------------------------------------------------------------- collectives

    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        """Turn the failure of a collective into a :class:`DistributedError` naming the ranks that do not answer."""
        try:
            yield
        except (RuntimeError, ConnectionError) as error:
            if isinstance(error, DistributedError):
                raise
            raise DistributedError(f"rank {self.rank} of {self.size}: {what} failed ({_first_line(error)}); "
                                   f"{self._roll_call()}. The other ranks stop as well; the last checkpoint is "
                                   "intact: restart the whole run with metaopt train --resume RUN_DIR") from error

    def _roll_call(self) -> str:
        """Which ranks still answer, by the rendezvous store, after a failed collective."""
        try:
            store = dist.distributed_c10d._get_default_store()
            attempt = store.add(f"metaopt/failure/{self.rank}", 1)
            store.set(f"metaopt/alive/{attempt}/{self.rank}", "1")
            deadline = time.monotonic() + _ROLL_CALL_S
            missing = list(range(self.size))
            while missing and time.monotonic() < deadline:
                missing = [r for r in missing if not store.check([f"metaopt/alive/{attempt}/{r}"])]
                time.sleep(0.1)
        except Exception:  # noqa: BLE001  (the store itself is gone: it lived with rank 0 or the launcher)
            return "the rendezvous store does not answer either: rank 0 or the launcher has died"
        if not missing:
            return "every rank still answers: a connection between ranks failed"
        named = ", ".join(str(r) for r in missing)
        return f"rank{'s' if len(missing) > 1 else ''} {named} did not answer within {_ROLL_CALL_S:g} s (died?)"

    def all_reduce_gradients(self, params: Sequence[nn.Parameter], weight: float,
                             metrics: dict[str, float]) -> dict[str, float]:
        """Sum ``weight · grad`` of ``params`` over the ranks, in one flat bucket; the metrics' weighted sums.

        Each rank's weight is its share of the work (its tasks over all tasks), so the sum is the
        mean meta-gradient of the whole batch. A parameter whose ``.grad`` is ``None`` enters as zeros;
        it keeps ``None`` only when it is ``None`` on every rank. The metrics (the same keys on every
        rank) travel in the same bucket, weighted alike.
        """
        if not self.active:
            return metrics
        like = params[0]
        names = sorted(metrics)
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) * weight for p in params]
        flags = torch.tensor([p.grad is not None for p in params], dtype=like.dtype, device=like.device)
        values = torch.tensor([metrics[k] * weight for k in names], dtype=like.dtype, device=like.device)
        bucket = torch.cat([*parts, flags, values])
        with self._collective("the all-reduce of the meta-gradient"):
            dist.all_reduce(bucket)
        offset = 0
        for p in params:
            p.grad = bucket[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        for p, flag in zip(params, bucket[offset:offset + len(params)].tolist()):
            if flag == 0:
                p.grad = None
        return dict(zip(names, bucket[offset + len(params):].tolist()))

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value`` (picklable; tensors on the CPU), in rank order."""
        if not self.active:
            return [value]
        out: list[Any] = [None] * self.size
        with self._collective("gathering results from the ranks"):
            dist.all_gather_object(out, value)
        return out

    def from_leader(self, compute: Callable[[], T]) -> T:
        """``compute()`` run on rank 0 alone, its value (or the error it raised) sent to every rank."""
        if not self.active:
            return compute()
        box: list[Any] = [None]
        if self.leader:
            try:
                box[0] = ("value", compute())
            except Exception as error:  # noqa: BLE001  (re-raised on every rank, rank 0 included)
                box[0] = ("error", error)
        with self._collective("receiving from rank 0"):
            dist.broadcast_object_list(box, src=0)
        kind, payload = box[0]
        if kind == "error":
            raise payload
        return payload

    def agree(self, flags: Sequence[bool]) -> list[bool]:
        """Each flag true on every rank when it is true on any (whether to stop: time up, a signal)."""
        if not self.active:
            return list(flags)
        tensor = torch.tensor([float(f) for f in flags], device=self._device())
        with self._collective("agreeing on whether to stop"):
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return [bool(v) for v in tensor.tolist()]

    def sync_buffers(self, module: nn.Module, before: dict[str, torch.Tensor]) -> None:
        """Floating buffers (batch-norm running statistics) set to their mean over the ranks; counters to the sum.

        ``before`` holds the buffers before the meta-update: a counter (``num_batches_tracked``)
        becomes its value then plus every rank's increment. Buffers no rank changed stay as they are
        exactly; running statistics that ranks accumulated on their own tasks become their mean,
        which is not the single process's value (there the tasks' updates compound one after another).
        """
        buffers = [(name, b) for name, b in module.named_buffers() if name in before]
        if not self.active or not buffers or all(torch.equal(b, before[name]) for name, b in buffers):
            changed = torch.zeros(1, device=self._device())
        else:
            changed = torch.ones(1, device=self._device())
        if self.active and buffers:
            with self._collective("the all-reduce of the buffers"):
                dist.all_reduce(changed)
        if not changed.item():
            return
        values = [(b.double() / self.size if b.is_floating_point() else (b - before[name]).double()).reshape(-1)
                  for name, b in buffers]
        bucket = torch.cat(values)
        with self._collective("the all-reduce of the buffers"):
            dist.all_reduce(bucket)
        offset = 0
        for name, b in buffers:
            value = bucket[offset:offset + b.numel()].view_as(b)
            b.copy_(value if b.is_floating_point() else before[name] + value.round().to(b.dtype))
            offset += b.numel()

    def check_identical(self, module: nn.Module, where: str) -> None:
        """Raise :class:`DistributedError` naming the first tensor of ``module`` whose bytes differ between ranks."""
        if not self.active:
            return
        digests = [(name, _digest(value)) for name, value in module.state_dict().items()]
        everyone = self.gather(digests)
        for rank, theirs in enumerate(everyone[1:], start=1):
            for (name, ours), (_, other) in zip(everyone[0], theirs):
                if ours != other:
                    raise DistributedError(f"{where}: {name} differs between rank 0 and rank {rank}; the ranks must "
                                           "hold the same meta-parameters. They start from the same config and seed "
                                           "and take the same steps, so a difference means a rank ran other code, "
                                           "other data or another torch version: launch every rank alike")
            if len(theirs) != len(everyone[0]):
                raise DistributedError(f"{where}: rank {rank} holds {len(theirs)} tensors, rank 0 "
                                       f"{len(everyone[0])}: the ranks built different learners")

    def _device(self) -> torch.device:
        backend = dist.get_backend() if dist.is_initialized() else "gloo"
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


#: A run of one process.
SINGLE = World()


def _digest(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        return hashlib.sha1(tensor.view(torch.uint8).numpy().tobytes() + str(tensor.dtype).encode()).hexdigest()
    return hashlib.sha1(repr(value).encode()).hexdigest()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def current_world() -> World:
    """The world of the initialised default process group, else :data:`SINGLE`."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def init_world(device: torch.device, timeout_s: float | None = None) -> World:
    """Join the process group ``torchrun`` set up in the environment (``WORLD_SIZE`` > 1), or stay alone.

    The backend is NCCL for CUDA devices (each local rank on its own device) and gloo otherwise.
    ``timeout_s`` bounds how long a rank waits for the others in a collective (default: the environment's
    ``METAOPT_DIST_TIMEOUT``, else 1800 s: longer than rank 0's evaluations, which the others wait for).
    A rank that dies is noticed at once (its connections close); the timeout catches a rank that hangs.

    Raises:
        DistributedError: a CUDA run with more local ranks than devices.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or dist.is_initialized():
        return current_world()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "gloo"
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"local rank {local_rank} has no CUDA device ({torch.cuda.device_count()} here): "
                                   "start at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    if timeout_s is None:
        timeout_s = float(os.environ.get("METAOPT_DIST_TIMEOUT", "1800"))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    _JOINED.append(True)
    return current_world()


#: Whether :func:`init_world` created the default process group (then :func:`leave_world` destroys it).
_JOINED: list[bool] = []


def leave_world() -> None:
    """Destroy the process group :func:`init_world` created; a no-op alone or for a group created elsewhere.

    A rank that exits with its group alive can abort at interpreter exit ("terminate called without
    an active exception": gloo's threads still joinable), so a finished run leaves it first.
    """
    if _JOINED and dist.is_initialized():
        dist.barrier()  # no rank tears its connections down while another still uses them
        dist.destroy_process_group()
    _JOINED.clear()


def launch_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The ``torchrun`` command that runs ``metaopt train argv`` on ``nproc`` processes of this machine.

    It is torch's launcher through :mod:`metaopt.training.torchrun`, which stops quietly on Ctrl-C.

    Example:
        >>> launch_command(2, ["--preset", "maml-sinusoid-5shot"])[2:]
        ['metaopt.training.torchrun', '--standalone', '--nproc-per-node=2', '-m', 'metaopt', 'train', '--preset', \
'maml-sinusoid-5shot']
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    return [sys.executable, "-m", "metaopt.training.torchrun", "--standalone", f"--nproc-per-node={nproc}", "-m",
            "metaopt", "train", *argv]
