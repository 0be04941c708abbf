"""Shards over torch.distributed ranks: the process group a sharded cache lives on, and its one collective.

Every rank runs the same model on the same inputs (the weights are replicated, as in vLLM / SGLang decode
context parallelism) and holds the tokens of its own shards only. At each decode step and layer, a rank
computes the partial attention of the query over the shards it holds, ``(output, lse)``, and
:meth:`ShardGroup.merge` all-gathers those partials (``B x Hq x Lq x (Dv + 1)`` float32 per rank, never
keys or values) and merges them exactly by log-sum-exp, in rank order, so that every rank ends with the
same attention output. Works with NCCL on GPUs and gloo on CPU; launch with ``torchrun``.
"""

from __future__ import annotations

import datetime
import logging
import pickle
from typing import Any

import torch
import torch.distributed as dist

from pikvpress.kernels.attention import merge_partials

logger = logging.getLogger(__name__)


class ShardGroup:
    """The ranks a sharded cache spreads its shards over.

    Parameters
    ----------
    process_group : torch.distributed.ProcessGroup or "default" or None
        The group (None / ``"default"``: the default group of ``init_process_group``).
    timeout : float
        Seconds a rank waits for the others at a collective before it raises (a dead or stalled rank).

    Raises
    ------
    RuntimeError
        If torch.distributed is not initialised.
    ValueError
        If this process is not a member of ``process_group`` or ``timeout`` is not positive.
    """

    def __init__(self, process_group: Any = "default", timeout: float = 300.0):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: launch with torchrun and call "
                "torch.distributed.init_process_group(backend='nccl' on GPUs or 'gloo' on CPU) before sharding "
                "a cache over a process group"
            )
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        if process_group is not None and not isinstance(process_group, (str, dist.ProcessGroup)):
            raise ValueError(
                f"process_group must be a torch.distributed ProcessGroup or 'default', got {type(process_group).__name__}"
            )
        if isinstance(process_group, str) and process_group != "default":
            raise ValueError(f"process_group must be a ProcessGroup or 'default', got {process_group!r}")
        self.group = None if process_group in (None, "default") else process_group
        self.rank = dist.get_rank(self.group)
        if self.rank < 0:
            raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of process_group")
        self.world_size = dist.get_world_size(self.group)
        self.backend = str(dist.get_backend(self.group))
        self.timeout = float(timeout)
        self.payload_bytes = 0  # bytes this rank contributed to collectives since the last reset_counters
        self.collectives = 0

    # ----------------------------------------------------------------------------------------------
    def _device(self, tensor: torch.Tensor) -> torch.device:
        """The device a collective of this backend takes (gloo: CPU; NCCL: the tensor's GPU)."""
        return torch.device("cpu") if self.backend == "gloo" else tensor.device

    def _failed(self, what: str, error: RuntimeError) -> RuntimeError:
        """The error a collective that did not complete raises on this rank: ``what`` happened, and why."""
        return RuntimeError(
            f"rank {self.rank}/{self.world_size}: {what} ({error}). A rank has probably died or stopped decoding; "
            "every rank must run the same model call on the same inputs."
        )

    def _wait(self, work: Any, what: str) -> None:
        try:
            work.wait(timeout=datetime.timedelta(seconds=self.timeout))
        except RuntimeError as error:
            raise self._failed(
                f"{what} with the other ranks did not complete within {self.timeout:g} s", error
            ) from error

    def check_consistent(self, settings: dict[str, Any]) -> None:
        """Raise ``ValueError`` on every rank unless all ranks pass equal ``settings`` (a collective)."""
        gathered = self.exchange(settings, "the sharded cache's settings")
        mismatched = [r for r, other in enumerate(gathered) if other != settings]
        if mismatched:
            raise ValueError(
                f"rank {self.rank}: the ranks of the process group disagree on the sharded cache's settings: "
                f"this rank has {settings}, rank {mismatched[0]} has {gathered[mismatched[0]]}"
            )

    def exchange(self, obj: Any, what: str = "data") -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order: one collective, for rare events (the settings check), never per step."""
        gathered: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(gathered, obj, group=self.group)
        except RuntimeError as error:
            raise self._failed(f"exchanging {what} with the other ranks failed", error) from error
        self.payload_bytes += len(pickle.dumps(obj))  # what all_gather_object sends: the pickled object
        self.collectives += 1
        return gathered

    def _all_gather(self, payload: torch.Tensor, what: str, dim: int = -1) -> torch.Tensor:
        """Every rank's ``payload`` stacked along a new dimension ``dim``, in rank order, on ``payload``'s device."""
        sent = payload.to(self._device(payload)).contiguous()
        gathered = [torch.empty_like(sent) for _ in range(self.world_size)]
        self._wait(dist.all_gather(gathered, sent, group=self.group, async_op=True), f"exchanging {what}")
        self.payload_bytes += sent.numel() * sent.element_size()
        self.collectives += 1
        return torch.stack(gathered, dim=dim).to(payload.device)

    def all_gather(self, tensor: torch.Tensor, what: str = "data") -> torch.Tensor:
        """``(W, *tensor.shape)``: every rank's ``tensor`` (same shape and dtype on every rank), in rank order, on
        ``tensor``'s device. One collective."""
        return self._all_gather(tensor, what, dim=0)

    def merge(
        self, out: torch.Tensor, lse: torch.Tensor, what: str = "partial attention"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All-gather every rank's partial ``out`` ``(..., Dv)`` and ``lse`` ``(...)`` (float32) and merge them
        exactly, in rank order. One collective; returns ``(out, lse)`` on ``out``'s device."""
        dv = out.shape[-1]
        payload = torch.cat([out.float(), lse.float().unsqueeze(-1)], dim=-1)
        stacked = self._all_gather(payload, what, dim=-2)  # (..., W, Dv + 1)
        return merge_partials(stacked[..., :dv], stacked[..., dv], dim=-1)

    def logsumexp(self, lse: torch.Tensor, what: str = "attention log-sum-exp") -> torch.Tensor:
        """The log-sum-exp over the ranks of every rank's ``lse`` (float32, any shape), in rank order: the
        softmax denominator of tokens spread over the ranks. One collective."""
        return torch.logsumexp(self._all_gather(lse.float(), what), dim=-1)

    def reset_counters(self) -> None:
        """Zero :attr:`payload_bytes` and :attr:`collectives`."""
        self.payload_bytes = 0
        self.collectives = 0

    def __repr__(self) -> str:
        return f"ShardGroup(rank={self.rank}, world_size={self.world_size}, backend={self.backend!r})"
