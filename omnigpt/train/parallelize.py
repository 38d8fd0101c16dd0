"""Distributed training, applied from outside the model: process groups, FSDP2, expert parallelism, full state dicts.

Launch
------
One process per GPU (or per CPU "rank" for tests) through torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; `init_distributed()` reads them (gloo on CPU, nccl on CUDA). Without them the trainer
runs as one plain process.

    # one machine, 8 GPUs
    torchrun --standalone --nproc-per-node 8 -m omnigpt.cli train --data corpus/ --preset small ...

    # several machines: run the same command on every node. torchrun's c10d rendezvous needs one reachable
    # host:port (any node, usually the first), a job id shared by all nodes, and the node count.
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node0.example:29400 \
             --rdzv-id my-run-42 -m omnigpt.cli train --data corpus/ --preset small --out /shared/run ...
    # `--nnodes 1:4` makes the job elastic (starts with >= 1 node, admits up to 4). Set NCCL_SOCKET_IFNAME /
    # GLOO_SOCKET_IFNAME if the nodes have several network interfaces. --out must be a filesystem every node
    # sees (checkpoints are written by rank 0, plus one small RNG file per rank) and --data must exist on all nodes.

Sharding
--------
FSDP2 (`fully_shard`) shards every parameter along dim 0 over all ranks: one FSDP unit per transformer block and
one for the root (embedding, final norm, head), so at most one block's parameters are gathered at a time. On CUDA
the mixed-precision policy gathers bf16 parameters and reduces gradients in float32 (no autocast needed); on CPU
everything stays float32 by choice: the CPU runs are the exact reference (the 2-rank test matches a 1-rank float32
run to 1e-5) and CPUs gain little from bf16. (FSDP2's bf16 policy itself does run over gloo in torch 2.13.)

Expert parallelism (`expert_parallel=True`, MoE models): each rank keeps E/W whole experts of every MoE layer and
FSDP leaves those weights alone (`ignored_params`); the router and everything else are still FSDP-sharded. The MoE
layer's routing, weighting and combining are untouched: we replace only its `expert_mlp` (tokens already sorted by
expert), which sends each token to the rank that owns its expert with an all-to-all, runs the local experts and
sends the results back in the same order. So the MoE math is the single-process math, row for row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from omnigpt.model.moe import MoE, expert_mlp_grouped, expert_mlp_loop, grouped_mm_available
from omnigpt.model.transformer import prefer_cudnn_attention

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor, distribute_tensor = (), None


# ---- process group ---------------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object = None  # 1-D DeviceMesh over all ranks (None on one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Read torchrun's environment; start the process group when WORLD_SIZE > 1. device: "cpu", "cuda" or None
    (CUDA when available)."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device("cuda", local) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(dev)
    info = DistInfo(rank, world, local, dev)
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if kind == "cuda" else "gloo", rank=rank, world_size=world,
                                    **({"device_id": dev} if kind == "cuda" else {}))
        from torch.distributed.device_mesh import init_device_mesh
        info.mesh = init_device_mesh(dev.type, (world,))
    return info


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ---- expert parallelism ----------------------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: the backward sends gradients back along the same routes."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExpertParallel:
    """The expert computation of one MoE layer spread over ranks. Shapes: N routed pairs on this rank, R ranks,
    El = E/R local experts; `counts_E` is this rank's pairs per (global) expert, x_ND sorted by expert."""

    def __init__(self, moe: MoE, rank: int, world: int, group=None):
        E = moe.n_experts
        if E % world:
            raise ValueError(f"expert parallelism needs n_experts ({E}) divisible by the number of ranks ({world})")
        self.moe, self.rank, self.world, self.group = moe, rank, world, group
        self.n_local = E // world
        lo, hi = rank * self.n_local, (rank + 1) * self.n_local
        # Keep only this rank's experts (the model was initialised identically on every rank).
        moe.w_gate_up = nn.Parameter(moe.w_gate_up.detach()[lo:hi].clone())
        moe.w_down = nn.Parameter(moe.w_down.detach()[lo:hi].clone())
        for p in (moe.w_gate_up, moe.w_down):
            # Each rank's loss is a mean over its own tokens and the global loss is their mean, so the gradient of
            # a weight no other rank holds is (1/R) * (sum of what all ranks' tokens sent back).
            p.register_hook(lambda g: g / world)

    def __call__(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        R, El = self.world, self.n_local
        counts_RE = counts_E.view(R, El)
        # 1. Exchange counts: recv_RE[s, e] = pairs rank s sends to my local expert e.
        recv_RE = torch.empty_like(counts_RE)
        dist.all_to_all_single(recv_RE, counts_RE.contiguous(), group=self.group)
        send = counts_RE.sum(1).tolist()
        recv = recv_RE.sum(1).tolist()
        # 2. Dispatch: experts of one rank are contiguous in x_ND, so rank r's slice is one block.
        x_recv = all_to_all(x_ND, recv, send, self.group)
        # 3. Regroup from (source rank, expert) order to (expert, source rank) order for the grouped matmul.
        expert_of_row = torch.arange(El, device=x_ND.device).repeat(R).repeat_interleave(recv_RE.reshape(-1))
        order = expert_of_row.argsort(stable=True)
        y_local = self._experts(x_recv[order], recv_RE.sum(0))
        y_recv = torch.empty_like(y_local).index_copy(0, order, y_local)  # undo the regrouping
        # 4. Combine: send every result back to the rank and position its token came from.
        return all_to_all(y_recv, send, recv, self.group)

    def _experts(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        moe = self.moe
        w_gate_up, w_down = moe.w_gate_up, moe.w_down
        if torch.is_autocast_enabled(x_ND.device.type):
            dtype = torch.get_autocast_dtype(x_ND.device.type)
            x_ND = x_ND.to(dtype)
        # FSDP leaves these weights in float32; under its bf16 policy the activations arrive in bf16.
        w_gate_up, w_down = w_gate_up.to(x_ND.dtype), w_down.to(x_ND.dtype)
        if moe.use_grouped_mm and grouped_mm_available(x_ND):
            return expert_mlp_grouped(x_ND, counts_E, w_gate_up, w_down)
        return expert_mlp_loop(x_ND, counts_E, w_gate_up, w_down)


def apply_expert_parallel(model: nn.Module, info: DistInfo) -> dict[str, int]:
    """Split every MoE layer's experts over the ranks. Returns {parameter name: ranks it is split over}."""
    split = {}
    if not info.distributed:
        return split
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            module.expert_mlp = ExpertParallel(module, info.rank, info.world_size)  # instance attribute shadows the method
            for pname in ("w_gate_up", "w_down"):
                split[f"{name}.{pname}"] = info.world_size
    model.expert_split = split
    return split


# ---- FSDP2 -----------------------------------------------------------------------------------------------------
def apply_fsdp(model: nn.Module, info: DistInfo, mixed_precision: bool) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else MixedPrecisionPolicy()
    split = getattr(model, "expert_split", {})
    ignored = {p for n, p in model.named_parameters() if n in split}
    for block in model.layers:
        # Resharding after forward frees the gathered block until backward needs it again (saves memory).
        fully_shard(block, mesh=info.mesh, mp_policy=mp, reshard_after_forward=True,
                    ignored_params={p for p in block.parameters() if p in ignored} or None)
    # The root's parameters (embedding, final norm, head) are used last in forward and first in backward.
    fully_shard(model, mesh=info.mesh, mp_policy=mp, reshard_after_forward=False)


def apply_compile(model: nn.Module) -> None:
    """Compile each block (not the whole model): blocks are identical so one graph is reused, and FSDP's hooks
    stay between blocks. nn.Module.compile keeps parameter names unchanged."""
    for block in model.layers:
        block.compile()


def parallelize(model: nn.Module, info: DistInfo, *, expert_parallel: bool = False, compile: bool = False) -> nn.Module:
    """Order matters: experts are split first (FSDP must know which weights to leave alone), then compile (so the
    compiled blocks are what FSDP wraps), then FSDP."""
    model.expert_split = {}
    if info.device.type == "cuda":
        prefer_cudnn_attention()  # before any tracing: compiled graphs keep the attention kernel they traced
    if expert_parallel:
        if not getattr(model.cfg, "n_experts", 0):
            raise ValueError("--expert-parallel needs an MoE model (n_experts > 0)")
        apply_expert_parallel(model, info)
    if compile:
        apply_compile(model)
    if info.distributed:
        apply_fsdp(model, info, mixed_precision=info.device.type == "cuda")
    return model


def uses_autocast(info: DistInfo) -> bool:
    """bf16 autocast on one GPU; with FSDP on GPUs the mixed-precision policy casts instead; CPU is float32."""
    return info.device.type == "cuda" and not info.distributed


# ---- gradients -------------------------------------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def clip_grad_norm(params, max_norm: float, info: DistInfo) -> torch.Tensor:
    """Global gradient L2 norm, and scale gradients down to max_norm when above it (max_norm <= 0: measure only).

    Every parameter's storage is split disjointly over ranks (FSDP row shards, or whole experts under expert
    parallelism), so the global squared norm is the sum over ranks of each rank's local squares."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sq = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]).square().sum()
    norm = all_reduce_sum(sq, info).sqrt()
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    return norm


# ---- full (unsharded) state dicts ------------------------------------------------------------------------------
def gather_full(name: str, t: torch.Tensor, model: nn.Module, info: DistInfo) -> torch.Tensor:
    """The whole tensor on CPU (collective: every rank must call it for the same names in the same order)."""
    if isinstance(t, DTensor):
        return t.full_tensor().cpu()
    world = getattr(model, "expert_split", {}).get(name)
    if world:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts).cpu()
    return t.detach().cpu()


def shard_like(name: str, full: torch.Tensor, ref: torch.Tensor, model: nn.Module, info: DistInfo) -> torch.Tensor:
    """This rank's part of `full`, laid out as `ref` (a DTensor row shard, a block of experts, or the whole)."""
    if isinstance(ref, DTensor):
        # src_data_rank=None: every rank holds the full tensor already, so each slices its own shard locally.
        return distribute_tensor(full.to(ref.device, ref.dtype), ref.device_mesh, ref.placements, src_data_rank=None)
    world = getattr(model, "expert_split", {}).get(name)
    if world:
        n = full.shape[0] // world
        full = full[info.rank * n:(info.rank + 1) * n]
    return full.to(ref.device, ref.dtype)


def full_model_state(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    return {k: gather_full(k, v, model, info).contiguous() for k, v in model.state_dict().items()}


def full_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Global shapes of the model's tensors (what a single-process model of this config would have)."""
    split = getattr(model, "expert_split", {})
    out = {}
    for k, v in model.state_dict().items():
        shape = tuple(v.shape)
        if k in split:
            shape = (shape[0] * split[k],) + shape[1:]
        out[k] = shape
    return out


@torch.no_grad()
def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor], info: DistInfo) -> None:
    from omnigpt.model.weights import load_state_dict_checked

    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"checkpoint: missing tensor {missing[0]!r}; {len(missing)} missing in all")
    load_state_dict_checked(model, {k: shard_like(k, state[k], own[k], model, info) for k in own})
