"""The process-group environment the fit runs in: rank, world size, all-reduce and barrier.

The fitting core takes one of these and calls nothing else of ``torch.distributed``, so the one-process
fit (:class:`SingleProcess`, where every collective is a no-op) and the data-parallel fit (:class:`DistEnv`)
are the same code.
"""

from __future__ import annotations

import os

import torch


class SingleProcess:
    """One process: collectives return their input unchanged.

    ``fit_heads`` uses it even inside an initialized process group, so a per-rank call never communicates.
    """

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        return None

    def close(self) -> None:
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DistEnv(SingleProcess):
    """Rank, world size and the few collectives the fit needs over ``torch.distributed``; a no-op stand-in
    when no process group is initialized."""

    def __init__(self) -> None:
        import torch.distributed as td

        self._td = td if td.is_available() and td.is_initialized() else None
        self._owns_group = False
        self.rank = self._td.get_rank() if self._td else 0
        self.world_size = self._td.get_world_size() if self._td else 1
        backend = str(self._td.get_backend()) if self._td else "none"
        # A pure NCCL group cannot reduce CPU tensors; accelerate's default "cuda:nccl,cpu:gloo" can.
        self._device = (torch.device("cuda", torch.cuda.current_device())
                        if backend == "nccl" and torch.cuda.is_available() else None)

    @classmethod
    def init(cls, cpu: bool | None = None) -> DistEnv:
        """Join the process group that ``accelerate launch`` / ``torchrun`` describe in the environment.

        Without those variables (a plain ``python`` run) this is a single process and nothing is started.
        Use it as a context manager (or call :meth:`close`) so the group it starts is destroyed on exit.
        """
        import torch.distributed as td

        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not td.is_initialized():
            from accelerate import PartialState

            if cpu is None:
                cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes") or \
                    not torch.cuda.is_available()
            PartialState(cpu=cpu)
            env = cls()
            env._owns_group = True
            return env
        return cls()

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce (sum or max) of a CPU tensor; returns it."""
        if self._td is None or self.world_size == 1:
            return tensor
        red = self._td.ReduceOp.SUM if op == "sum" else self._td.ReduceOp.MAX
        if self._device is not None:
            moved = tensor.to(self._device)
            self._td.all_reduce(moved, op=red)
            tensor.copy_(moved.cpu())
        else:
            self._td.all_reduce(tensor, op=red)
        return tensor

    def barrier(self) -> None:
        if self._td is not None and self.world_size > 1:
            self._td.barrier()

    def close(self) -> None:
        """Destroy the process group this env started (a no-op otherwise).

        A process that exits with a live gloo group can abort at interpreter shutdown ("terminate called
        without an active exception", SIGABRT) while gloo's worker threads still hold work objects; tearing
        the group down while Python is fully alive avoids that.
        """
        if self._owns_group and self._td is not None and self._td.is_initialized():
            self._td.destroy_process_group()
        self._owns_group = False
        self._td = None
