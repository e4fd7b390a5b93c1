"""Value checks of a packed forward on a GPU: computed on the device, raised at the next sync.

A packed forward on CUDA never waits for the GPU (a CUDA graph captures it; a sync would also
stall the launch queue), so it cannot read its inputs' values to check them. Instead:

1. each check is computed on the device into a small int64 tensor ``[failed, detail]`` (the
   ids' range from one ``aminmax``; the rules of ``cu_seqlens``), which costs a few tiny kernels
   and no sync;
2. the inputs are made safe to index with before any kernel sees them: ids clamped into their
   table, ``cu_seqlens`` clamped into ``[0, total]`` and made non-decreasing (both are no-ops on
   valid input), so a bad input can never become a device-side assert or an illegal read;
3. the result is raised as the same ``ValueError`` the eager check gives, at the next point where
   the host reads the device anyway: the next padded forward's one sync (the flags ride along
   in its single ``tolist()``), or ``raise_deferred(model)``, which a caller such as the batch
   engine calls after copying a batch's outputs to the host (then it costs nothing).

Flags recorded while a CUDA graph is being captured belong to the graph: each replay rewrites
them, so they are kept and read at every check (they report the latest replay).
"""

from collections.abc import Callable

import torch

Describe = Callable[[int], str]

# cu_seqlens' rules, in the order cu_seqlens_flag tests them (the detail is the first broken one)
_CU_SEQLENS_RULES = (
    "cu_seqlens must start at 0",
    "cu_seqlens must be non-decreasing",
    "cu_seqlens[-1] must equal the number of packed tokens",
    "max_seqlen must be at least the longest sequence",
)


def id_range_message(name: str, upper: int, bad: int) -> str:
    """The id range check's error, the same wherever it is raised."""
    return f"{name} must lie in [0, {upper}), found {bad}"


def ids_flag(ids: torch.Tensor, upper: int) -> torch.Tensor:
    """[failed, offending id] (int64 (2,), on ids' device, no sync): failed when an id of the
    non-empty integer tensor ``ids`` lies outside [0, upper)."""
    low, high = torch.aminmax(ids)
    below = low < 0
    failed = below | (high >= upper)
    return torch.stack([failed.long(), torch.where(below, low, high).long()])


def cu_seqlens_flag(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> torch.Tensor:
    """[failed, index of the first broken rule in _CU_SEQLENS_RULES] (int64 (2,), no sync) for a
    (batch + 1,) cu_seqlens of ``total`` tokens whose longest sequence must be <= max_seqlen."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    broken = torch.stack([cu_seqlens[0] != 0, (lengths < 0).any(), cu_seqlens[-1] != total,
                          lengths.max() > max_seqlen])
    return torch.stack([broken.any().long(), broken.long().argmax()])


def safe_ids(ids: torch.Tensor, upper: int) -> torch.Tensor:
    """ids clamped into [0, upper): what the embedding gathers while the check is pending."""
    return ids.clamp(0, upper - 1)


def safe_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """cu_seqlens clamped into [0, total] and made non-decreasing: every window lies inside the
    packed tensor, whatever the input held (unchanged when valid)."""
    return torch.cummax(cu_seqlens.clamp(0, total), 0).values


def describe_ids(name: str, upper: int) -> Describe:
    return lambda bad: id_range_message(name, upper, bad)


def describe_cu_seqlens(rule: int) -> str:
    return f"{_CU_SEQLENS_RULES[rule]} (cu_seqlens and max_seqlen of packed input)"


class DeferredChecks:
    """The pending device-side checks of one model: recorded by packed forwards on a GPU, read
    (and cleared) by the next sync."""

    def __init__(self):
        self._first: dict[str, tuple[torch.Tensor, Describe]] = {}  # key -> first failure so far
        self._captured: list[tuple[torch.Tensor, Describe]] = []  # rewritten by graph replays

    def record(self, key: str, flag: torch.Tensor, describe: Describe) -> None:
        """Adds a check's ``[failed, detail]``; per key, the first failure is kept (one small
        tensor per key, however many forwards run between two reads)."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            self._captured.append((flag, describe))
            return
        earlier = self._first.get(key)
        if earlier is not None:
            flag = torch.where(earlier[0][0] > 0, earlier[0], flag)
        self._first[key] = (flag, describe)

    def take(self) -> list[tuple[torch.Tensor, Describe]]:
        """The pending checks as (flag, describe), for a caller that reads the flags in its own
        sync; the flags of eager forwards are then cleared (those of captured graphs stay)."""
        entries = [*self._first.values(), *self._captured]
        self._first.clear()
        return entries

    def raise_now(self) -> None:
        """Reads every pending flag (one sync; none when nothing is pending) and raises the
        first failure as the ValueError the eager check gives."""
        entries = self.take()
        if not entries:
            return
        device = entries[0][0].device
        values = torch.stack([flag.to(device) for flag, _ in entries]).tolist()
        for (_, describe), (failed, detail) in zip(entries, values):
            if failed:
                raise ValueError(deferred_message(describe(detail)))


def deferred_message(message: str) -> str:
    """A deferred check's error: the eager check's message, and where it came from."""
    return (f"{message} (found by a packed forward on the GPU: checked on the device and "
            "reported at this sync)")


def raise_deferred(model: torch.nn.Module) -> None:
    """Raises the first failed input check of the packed forwards that ``model`` (any module
    holding distilbert_fast models) ran on a GPU since the last read, as the ValueError the eager
    check gives; one sync, none when nothing is pending. Call it where the host reads the GPU
    anyway (after copying outputs to the host)."""
    for module in model.modules():
        checks = getattr(module, "_deferred_checks", None)
        if isinstance(checks, DeferredChecks):
            checks.raise_now()


__all__ = ["DeferredChecks", "cu_seqlens_flag", "deferred_message", "ids_flag", "raise_deferred", "safe_cu_seqlens",
           "safe_ids"]
