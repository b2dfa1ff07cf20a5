"""Data parallelism on `torch.distributed`, launched by `torchrun` (issue #14).

geokd never launches processes itself: `torchrun --nproc_per_node N -m geokd distill ...` starts N
ranks, each with `RANK`, `WORLD_SIZE` and `LOCAL_RANK` set, and `init()` joins them into one
process group (gloo on CPU, nccl on CUDA) with a timeout on every collective
(`GEOKD_DIST_TIMEOUT` seconds, default 1800), so a rank that dies or hangs stops the job instead
of leaving the others waiting forever.

The semantics are those of one process reading the global batch:

* `--batch-size B` is the *global* micro-batch. Rank r reads the r-th contiguous shard of every
  global micro-batch (`shard`), so the shards concatenated in rank order are the batch a single
  process reads, and the step is the same at every world size.
* A micro-batch term weighs its rank's share of the step's examples (or response tokens), summed
  over all ranks, times the world size: after the gradients are averaged (`average_gradients`),
  that is the single-process weighting.
* Batch-geometry losses gather the rows of every rank (`gather_rows`, autograd-aware through
  `torch.distributed.nn.functional.all_gather`), so each rank evaluates the global-batch loss. Its
  backward sums the row gradients of every rank's (identical) loss, W·∂F/∂S_r, and averaging over
  W ranks gives ∂F/∂θ exactly (docs/ARCHITECTURE.md has the derivation).
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import sys
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from geokd.errors import GeokdError


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


_PEER_FAILURE = ("Connection closed by peer", "Connection reset by peer", "timed out", "Timed out", "NCCL error",
                 "ProcessGroupNCCL", "Socket Timeout")  # fmt: skip


def peer_failure(exc: BaseException) -> bool:
    """Whether `exc` is a collective that failed because another rank stopped or hung (under
    torchrun): the rank that failed first has printed its own error."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    distributed_error = getattr(dist, "DistError", None)
    if distributed_error is not None and isinstance(exc, distributed_error):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _PEER_FAILURE)


def timeout_seconds() -> float:
    text = os.environ.get("GEOKD_DIST_TIMEOUT", "1800")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise GeokdError(f"GEOKD_DIST_TIMEOUT: expected a positive number of seconds, got {text!r}")
    return value


def init(device: torch.device) -> None:
    """Join the torchrun process group when WORLD_SIZE > 1 (idempotent; a no-op for one process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return
    if not dist.is_available():
        raise GeokdError("WORLD_SIZE > 1, but this PyTorch build has no torch.distributed; run one process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_seconds()))
    atexit.register(shutdown)  # library callers too: never leave the group to interpreter teardown


def shutdown() -> None:
    """Leave the process group (idempotent; a no-op for one process). Every command calls it on
    its way out (`geokd.cli.main`), and `init` registers it to run at exit: a gloo group left to the
    interpreter's teardown can still hold worker threads, and their destructors abort the process
    ("terminate called without an active exception", SIGABRT) after all the work was done."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a peer that already left; nothing more to release here
            pass


def leave(code: int = 0) -> NoReturn:
    """End this process with exit status `code`, the way every geokd command ends. A torchrun rank
    (WORLD_SIZE > 1) leaves its process group, flushes its streams and exits with `os._exit`: the
    interpreter's teardown runs C++ static destructors, and gloo's transport threads torn down there
    abort the rank now and then ("terminate called without an active exception", SIGABRT) after all
    its work was done, so that torchrun reports a finished job as failed. Scripts that call the
    library under torchrun (`geokd.engine.train` in a loop, say) should end with `leave(0)` too.
    Every file geokd writes is complete (atomically renamed) before this point."""
    shutdown()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed pipe; nothing left to say on it
                pass
        os._exit(code)
    sys.exit(code)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shard(items: list, index: int, world: int) -> list:
    """The index-th of `world` contiguous, near-equal parts of `items` (the first parts one longer)."""
    size, extra = divmod(len(items), world)
    start = index * size + min(index, extra)
    return items[start : start + size + (1 if index < extra else 0)]


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows `[n_r, d]`, concatenated in rank order, differentiable with respect to this
    rank's rows. Ranks may hold different numbers of rows (token rows, an uneven last batch)."""
    world = world_size()
    if world == 1:
        return rows
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = rows
    if rows.shape[0] < max(sizes):
        padded = torch.cat([rows, rows.new_zeros(max(sizes) - rows.shape[0], *rows.shape[1:])])
    if rows.requires_grad:
        from torch.distributed.nn.functional import all_gather

        parts = all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of `params` over the ranks in one flat all-reduce (a parameter that
    got no gradient on some rank, such as a layer above the deepest mapped layer, counts as 0)."""
    world = world_size()
    params = [p for p in params if not is_sharded(p)]  # FSDP reduces the sharded blocks' own
    if world == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(p.dtype)
        offset += n


def gather_json(value: Any, device: torch.device) -> list[Any]:
    """Every rank's JSON-able `value`, in rank order (one per rank), sent as UTF-8 bytes in tensors:
    nothing is pickled. `device` is where the collective runs (the GPU under nccl)."""
    world = world_size()
    if world == 1:
        return [value]
    data = torch.frombuffer(bytearray(json.dumps(value).encode("utf-8")), dtype=torch.uint8).to(device)
    size = torch.tensor([data.numel()], device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(int(s) for s in sizes))
    padded = torch.cat([data, data.new_zeros(longest - data.numel())])
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return [json.loads(bytes(part[: int(n)].cpu().tolist()).decode("utf-8")) for part, n in zip(parts, sizes, strict=True)]


# --------------------------------------------------------------------------------------------
# --strategy fsdp: FSDP2 per transformer block
# --------------------------------------------------------------------------------------------


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks: modules of a class its Hugging Face `_no_split_modules`
    names that sit in an `nn.ModuleList` (so BERT's embeddings, also listed there, are left out)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            blocks += [child for child in module if type(child).__name__ in names]
    return blocks


def shard_blocks(model: torch.nn.Module) -> int:
    """FSDP2 (`fully_shard`) on each transformer block: its parameters become DTensors sharded over
    the ranks and are gathered for its forward and backward only. Everything outside the blocks
    (embeddings, final norm, heads) stays replicated and is averaged by `average_gradients`: the
    decoder losses read the output head's weight directly, outside any forward."""
    from torch.distributed.fsdp import fully_shard

    blocks = transformer_blocks(model)
    if not blocks:
        raise GeokdError(
            f"--strategy fsdp: found no transformer blocks in {type(model).__name__} (no _no_split_modules "
            "classes in a ModuleList); use --strategy ddp"
        )
    for block in blocks:
        fully_shard(block)
    return len(blocks)


def is_sharded(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_state(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict with every sharded tensor gathered whole (a collective: every rank calls it,
    with the same keys); nested dicts (an optimizer's state) are walked."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out[key] = full_state(value)
        elif isinstance(value, list):
            out[key] = [full_state(v) if isinstance(v, dict) else v for v in value]
        else:
            out[key] = value.full_tensor() if is_sharded(value) else value
    return out


def shard_like(full: torch.Tensor, reference: Any) -> Any:
    """`full` cut into `reference`'s shards (`reference` a DTensor), or `full` itself."""
    from torch.distributed.tensor import distribute_tensor

    if not is_sharded(reference):
        return full
    return distribute_tensor(full.to(reference.device, reference.dtype), reference.device_mesh, reference.placements)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for a mix of sharded (DTensor) and replicated gradients:
    the shards' squared norms are summed over the ranks, the replicated ones (equal on every rank
    after `average_gradients`) counted once."""
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device
    local = [g.to_local() for g in grads if is_sharded(g)]
    plain = [g for g in grads if not is_sharded(g)]
    sharded_sq = sum((g.float().pow(2).sum() for g in local), torch.zeros((), device=device))
    plain_sq = sum((g.float().pow(2).sum() for g in plain), torch.zeros((), device=device))
    total = (all_reduce_sum(sharded_sq.reshape(1))[0] + plain_sq).sqrt()
    coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in [*local, *plain]:
        g.mul_(coefficient.to(g.dtype))
    return total
