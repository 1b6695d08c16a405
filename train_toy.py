"""Run SCoMoE layers on CPU processes, under torchrun on GPUs, or across nodes.

Launch (one code path; a single rank simply skips communication):
  python train_toy.py --trace                       # 4 CPU processes as 2 emulated nodes (gloo)
  python train_toy.py --trace --nproc 4 --ranks-per-node 4
  torchrun --nproc_per_node=2 train_toy.py --trace  # GPUs with NCCL (gloo on CPU)

--trace runs one MoE layer on a tiny batch and prints, for every token, its tier,
experts and their ranks, then the bytes each tier's all-to-alls handed to each
link class (intra-device, intra-node, inter-node).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import scomoe as S

# ----------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to run
    p.add_argument("--trace", action="store_true", help="print each token's tier, experts and ranks, and the bytes per link")
    p.add_argument("--bench-assign", action="store_true",
                   help="time balanced_assignment against scipy's exact solver (needs scipy), in this process")
    p.add_argument("--moe", default="seq", choices=["gshard", "seq", "feat"], help="MoE layer kind")
    # SCoMoE
    p.add_argument("--ratio1", type=float, default=0.2, help="alpha: share of tokens (Seq) or width (Feat) kept on the device")
    p.add_argument("--ratio2", type=float, default=0.5, help="beta: share served inside the node")
    p.add_argument("--experts-per-rank", type=int, default=2, help="experts on each rank (E = this * world size)")
    p.add_argument("--capacity-factor", type=float, default=1.0, help="C = ceil(capacity_factor * 2 * tokens / experts)")
    # processes
    p.add_argument("--nproc", type=int, default=4, help="CPU processes to spawn when not under torchrun")
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="ranks per (emulated) node; default 2 when spawning, LOCAL_WORLD_SIZE under torchrun")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="cuda under torchrun when available")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--reps", type=int, default=15, help="timed repetitions per benchmark case (after a warm-up)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a stuck collective fails")
    args = p.parse_args(argv)
    check_args(args, p)
    return args


def check_args(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    """Reject bad values before any process starts."""
    if "RANK" not in os.environ:
        if args.nproc < 1:
            p.error(f"--nproc {args.nproc}: need at least one process")
        rpn = args.ranks_per_node or min(2, args.nproc)
        if args.nproc % rpn != 0:
            p.error(f"--nproc {args.nproc} is not divisible by --ranks-per-node {rpn}: every node holds the same number of ranks")
    if args.experts_per_rank < 1:
        p.error(f"--experts-per-rank {args.experts_per_rank}: need at least one expert per rank")
    try:
        S.MoEConfig(d_model=8, d_ffn=8, num_experts=1, capacity_factor=args.capacity_factor,
                    ratio1=args.ratio1, ratio2=args.ratio2)
    except ValueError as e:
        p.error(str(e))
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible; use --device cpu")
    if args.device == "cuda" and "RANK" not in os.environ and args.nproc > 1:
        p.error("--device cuda with several processes: launch with torchrun (spawned processes run on the CPU)")


# ----------------------------------------------------------------------------
# Distributed setup: spawned CPU processes or torchrun


def print0(*a, **k) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **k, flush=True)


def init_distributed(args: argparse.Namespace, rank: int, world: int, port: int | None) -> tuple[S.Topology, torch.device]:
    """Join the process group (gloo on CPU, NCCL on CUDA) and build the topology explicitly."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available() and port is None)
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        init = f"tcp://127.0.0.1:{port}" if port is not None else "env://"
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method=init, rank=rank, world_size=world,
                                timeout=timedelta(seconds=args.timeout))
    rpn = args.ranks_per_node
    if rpn is None and port is not None:
        rpn = min(2, world)
    return S.build_topology(rpn), device


def _worker(rank: int, args: argparse.Namespace, world: int, port: int | None) -> None:
    topo, device = init_distributed(args, rank, world, port)
    try:
        run(args, topo, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(args: argparse.Namespace) -> None:
    """Under torchrun: this process is one rank. Otherwise spawn --nproc CPU ranks on a free local port."""
    if "RANK" in os.environ:
        _worker(int(os.environ["RANK"]), args, int(os.environ["WORLD_SIZE"]), None)
    elif args.nproc == 1:
        _worker(0, args, 1, None)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_worker, args=(args, args.nproc, port), nprocs=args.nproc, join=True)


# ----------------------------------------------------------------------------
# The teaching trace


def gather0(obj):
    """Every rank's obj on rank 0 (a list in rank order); None elsewhere."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def trace(args: argparse.Namespace, topo: S.Topology, device: torch.device) -> None:
    d = 8
    cfg = S.MoEConfig(d_model=d, d_ffn=16, num_experts=args.experts_per_rank * topo.world_size,
                      capacity_factor=args.capacity_factor, ratio1=args.ratio1, ratio2=args.ratio2)
    layer = {"gshard": S.GShardMoE, "seq": S.SCoMoESeq, "feat": S.SCoMoEFeat}[args.moe](cfg, topo).to(device)
    torch.manual_seed(args.seed + topo.rank)
    x = torch.randn(10, d, device=device, requires_grad=True)  # (t, d): 10 tokens on every rank
    out = layer(x)
    out.y.square().mean().backward()

    rows = []
    for tier, info in out.tiers.items():
        tokens = info.tokens.tolist() if info.tokens is not None else list(range(x.shape[0]))
        r = info.routing
        for i, tok in enumerate(tokens):
            experts = [info.first_expert + e for e in r.expert[i].tolist()]
            picks = [f"e{e}@r{e // args.experts_per_rank}{'' if kept else '(dropped)'} w={w:.2f}"
                     for e, kept, w in zip(experts, r.kept[i].tolist(), r.weight[i].tolist())]
            rows.append((topo.rank, tok, tier, ", ".join(picks)))
    ledger = {tier: {(dirn, link): layer.ledger.total(link=link, direction=dirn, tag=tier)
                     for dirn in ("forward", "backward") for link in S.LINK_CLASSES} for tier in S.TIERS}
    every_rows, every_ledger = gather0(sorted(rows, key=lambda r: (r[1], r[2]))), gather0(ledger)
    if topo.rank != 0:
        return
    print(f"{args.moe}: W={topo.world_size} ranks, {topo.num_nodes} node(s) x {topo.ranks_per_node}, "
          f"{cfg.num_experts} experts ({args.experts_per_rank} per rank), alpha={cfg.ratio1} beta={cfg.ratio2}")
    if args.moe == "feat":
        print(f"slice widths (local, node, global) = {layer.widths} of d_model={d}; every token goes to every tier")
    print(f"{'rank':>4} {'token':>5}  {'tier':<6}  experts (e<id>@r<rank>, combine weight)")
    for rank_rows in every_rows:
        for rank, tok, tier, picks in rank_rows:
            print(f"{rank:>4} {tok:>5}  {tier:<6}  {picks}")
    print("\nbytes handed to each link class, summed over ranks (forward + backward: two all-to-alls each)")
    print(f"{'tier':<6} {'direction':<9} " + " ".join(f"{link:>13}" for link in S.LINK_CLASSES))
    for tier in S.TIERS:
        for dirn in ("forward", "backward"):
            total = [sum(led[tier][dirn, link] for led in every_ledger) for link in S.LINK_CLASSES]
            print(f"{tier:<6} {dirn:<9} " + " ".join(f"{b:>13,}" for b in total))


# ----------------------------------------------------------------------------
# Benchmarks


def timed(fn, reps: int) -> tuple[float, float, object]:
    """(median, min) seconds of fn() over reps runs after one warm-up, and its last result."""
    out = fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), out


def bench_assign(args: argparse.Namespace) -> None:
    """balanced_assignment against scipy's linear_sum_assignment on the expanded (T, T) matrix."""
    try:
        import numpy as np
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        sys.exit("--bench-assign compares against scipy: pip install scipy")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; float32 standard-normal scores; "
          f"ours: median of {args.reps}, scipy: median of 3 (T <= 4096)")
    print("| T | C | ours (ms) | scipy (ms) | scipy / ours | gap (OPT - ours) / OPT | T*eps bound / OPT |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for T in (1024, 4096, 16384):
        for C in (8, 16, 32):
            g = torch.Generator().manual_seed(1000 * T + C)
            scores = torch.randn(T, C, generator=g)  # (T, C)
            ours, _, cluster = timed(lambda: S.balanced_assignment(scores), args.reps)
            s64 = scores.double()
            got = float(s64[torch.arange(T), cluster].sum())
            row = f"| {T} | {C} | {ours * 1e3:.1f} |"
            if T <= 4096:
                expanded = np.repeat(s64.numpy(), T // C, axis=1)  # (T, T): cluster c repeated T / C times
                exact, _, (r, c) = timed(lambda: linear_sum_assignment(expanded, maximize=True), 3)
                opt = float(expanded[r, c].sum())
                bound = T * float(s64.max() - s64.min()) / (T + 1)  # T * eps with the default eps
                row += f" {exact * 1e3:.0f} | {exact / ours:.1f}x | {(opt - got) / opt:.1e} | {bound / opt:.1e} |"
            else:
                row += " - | - | - | - |"
            print(row, flush=True)


def run(args: argparse.Namespace, topo: S.Topology, device: torch.device) -> None:
    if args.trace:
        trace(args, topo, device)


if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    if args.bench_assign:
        bench_assign(args)
    else:
        launch(args)
