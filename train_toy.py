"""Train a small SCoMoE Transformer on a synthetic multilingual translation task.

One command per job (each has its own flags: python train_toy.py COMMAND --help):
  python train_toy.py                                  # demo (the default): GShard, Seq, Feat and Seq +
                                                       # clustering, 4 ranks as 2 nodes (threads of one process)
  python train_toy.py train --moe seq --token-cluster  # one variant
  python train_toy.py sweep --seeds 0,1,2              # quality against inter-node bytes (resumable)
  python train_toy.py trace --moe seq                  # each token's tier, experts, ranks; bytes per link
  python train_toy.py bench --nproc 1                  # one MoE layer per variant, with a cost model
  python train_toy.py bench-assign                     # the auction against scipy's exact solver
  torchrun --nproc_per_node=2 train_toy.py train --moe seq    # GPUs with NCCL (gloo on CPU)
  torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --master_addr=A train_toy.py train ...

Without torchrun the script spawns --nproc CPU processes (gloo, a free localhost
port) with --ranks-per-node ranks on each emulated node. Under torchrun it reads
RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE; --ranks-per-node overrides
LOCAL_WORLD_SIZE to emulate nodes. --batch is the global batch, split over the
ranks. Rank 0 prints one line every few steps and writes its results under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

import scomoe as sc

# ----------------------------------------------------------------------------
# The task: one source language translated into several target languages
#
# A shared source vocabulary of content words w_0 .. w_{S-1} drawn with Zipf
# frequencies. Each target language l has its own words and its own rule:
#   tgt = concat(subst_l[w] for w in order_l(src))
# subst_l is a random bijection onto l's words, except a few source words that
# emit two words (word + particle) and a few that emit none; order_l is one of
# ORDER_RULES. The source starts with a language tag. The same source word needs
# a different output in every language, so experts that specialise by language
# help, and routing locality can cost quality.

PAD, BOS, EOS = 0, 1, 2
ORDER_RULES = ("keep", "reverse", "swap_pairs", "last_first", "first_last", "swap_halves")


@dataclass(frozen=True)
class TaskConfig:
    seed: int = 0  # rules, sentences and the train/valid split all derive from it
    languages: int = 4  # target languages (language pairs)
    src_words: int = 48  # size of the shared source vocabulary
    min_len: int = 4  # source sentence length range, in words
    max_len: int = 12
    zipf: float = 1.0  # p(word of rank k) ~ 1 / k^zipf
    split_words: int = 3  # per language: source words that become two target words
    drop_words: int = 2  # per language: source words that become none
    train: int = 4000  # training pairs (all languages)
    valid: int = 400  # validation pairs


@dataclass(frozen=True)
class Task:
    cfg: TaskConfig
    vocab: int  # size of the joint vocabulary (specials, tags, source words, every target block)
    itos: tuple[str, ...]  # token id -> string ("fr_12")
    subst: tuple[tuple[tuple[int, ...], ...], ...]  # subst[l][w]: target ids of source word w
    orders: tuple[str, ...]  # order rule of each language
    train: list[tuple[tuple[int, ...], tuple[int, ...]]]  # (src ids with tag, tgt ids), no bos/eos
    valid: list[tuple[tuple[int, ...], tuple[int, ...]]]

    def max_target_len(self) -> int:
        return max(len(t) for _, t in self.train + self.valid)


def reorder(order: str, xs: Sequence[int]) -> list[int]:
    """[1, 2, 3, 4, 5] -> keep: same; reverse: [5,4,3,2,1]; swap_pairs: [2,1,4,3,5];
    last_first: [5,1,2,3,4]; first_last: [2,3,4,5,1]; swap_halves: [3,4,5,1,2]."""
    xs, n = list(xs), len(xs)
    if order == "reverse":
        return xs[::-1]
    if order == "swap_pairs":
        return [xs[i ^ 1] if (i ^ 1) < n else xs[i] for i in range(n)]
    if order == "last_first":
        return xs[-1:] + xs[:-1]
    if order == "first_last":
        return xs[1:] + xs[:1]
    if order == "swap_halves":
        return xs[n // 2:] + xs[:n // 2]
    return xs


def make_task(cfg: TaskConfig) -> Task:
    """The task, deterministically from cfg.seed (numpy PCG64 streams, no global RNG)."""
    L, Sw = cfg.languages, cfg.src_words
    names = [("fr", "de", "es", "ja", "ru", "zh", "ko", "ar")[l] if l < 8 else f"x{l}" for l in range(L)]
    per_lang = Sw + cfg.split_words  # target words of one language (with particles)
    tag0, src0 = 3, 3 + L
    tgt0 = [src0 + Sw + l * per_lang for l in range(L)]
    itos = ("<pad>", "<s>", "</s>", *[f"<2{n}>" for n in names], *[f"w_{i}" for i in range(Sw)],
            *[f"{n}_{j}" for n in names for j in range(per_lang)])
    rule_rng, sent_rng, lang_rng = (np.random.Generator(np.random.PCG64(s))
                                    for s in np.random.SeedSequence(cfg.seed).spawn(3))
    subst = []
    for l in range(L):
        perm = rule_rng.permutation(Sw)  # source word i -> target word perm[i]
        special = 4 + rule_rng.permutation(Sw - 4)[:cfg.split_words + cfg.drop_words]  # never the 4 most frequent
        split = {int(w): j for j, w in enumerate(special[:cfg.split_words])}
        drop = {int(w) for w in special[cfg.split_words:]}
        subst.append(tuple(() if i in drop else (tgt0[l] + int(perm[i]), tgt0[l] + Sw + split[i]) if i in split
                           else (tgt0[l] + int(perm[i]),) for i in range(Sw)))
    orders = tuple(ORDER_RULES[l % len(ORDER_RULES)] for l in range(L))

    p = 1.0 / np.arange(1, Sw + 1) ** cfg.zipf  # Zipf frequencies
    sentences, seen = [], set()
    while len(sentences) < cfg.train + cfg.valid:  # unique sentences: train and valid never overlap
        n = int(sent_rng.integers(cfg.min_len, cfg.max_len + 1))
        s = tuple(int(w) for w in sent_rng.choice(Sw, size=n, p=p / p.sum()))
        if s not in seen and all(any(subst[l][w] for w in s) for l in range(L)):
            seen.add(s)
            sentences.append(s)
    langs = lang_rng.permutation(np.arange(cfg.train + cfg.valid) % L)  # balanced languages
    pairs = [((tag0 + int(l),) + tuple(src0 + w for w in s),
              tuple(t for w in reorder(orders[l], s) for t in subst[l][w])) for s, l in zip(sentences, langs)]
    return Task(cfg, len(itos), itos, tuple(subst), orders, pairs[:cfg.train], pairs[cfg.train:])


def collate(pairs: Sequence[tuple[tuple[int, ...], tuple[int, ...]]]) -> tuple[Tensor, Tensor, Tensor]:
    """src [tag, w.., eos], tgt_in [bos, t..], tgt_out [t.., eos], right-padded: (B, S), (B, T), (B, T)."""
    S_len = max(len(s) for s, _ in pairs) + 1
    T_len = max(len(t) for _, t in pairs) + 1
    src = torch.full((len(pairs), S_len), PAD, dtype=torch.long)
    tgt_in = torch.full((len(pairs), T_len), PAD, dtype=torch.long)
    tgt_out = torch.full((len(pairs), T_len), PAD, dtype=torch.long)
    for b, (s, t) in enumerate(pairs):
        src[b, :len(s) + 1] = torch.tensor([*s, EOS])
        tgt_in[b, :len(t) + 1] = torch.tensor([BOS, *t])
        tgt_out[b, :len(t) + 1] = torch.tensor([*t, EOS])
    return src, tgt_in, tgt_out


def train_batch(task: Task, step: int, rank: int, world: int, batch: int, seed: int):
    """This rank's batch at `step`: a pure function of the step, so that a resumed run sees the same data.

    Each epoch is a permutation of the training pairs seeded by (seed, epoch); step s
    takes the s-th block of world * batch pairs, and rank r its r-th slice.
    """
    per_epoch = len(task.train) // (world * batch)
    epoch, i = divmod(step, per_epoch)
    order = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch]))).permutation(len(task.train))
    start = (i * world + rank) * batch
    return collate([task.train[j] for j in order[start:start + batch]])


# ----------------------------------------------------------------------------
# BLEU (Papineni et al. 2002): corpus BLEU-4 with brevity penalty, as sacrebleu computes it


def corpus_bleu(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]],
                smooth: str = "exp") -> float:
    """Corpus BLEU-4 in [0, 100] on tokenised sentences, one reference each.

    BLEU = 100 * BP * exp(1/4 sum_n log p_n), p_n = clipped n-gram matches / hypothesis n-grams
    summed over the corpus, BP = exp(1 - r / c) if c < r else 1 (c, r: hypothesis and reference
    lengths). smooth="exp" (sacrebleu's default): an order with no match counts as
    p_n = 1 / (2^k * total_n) for the k-th such order; smooth="none": it makes BLEU 0.
    Equals sacrebleu.corpus_bleu(..., tokenize="none", smooth_method=smooth).
    """
    matches, totals, c, r = [0] * 4, [0] * 4, 0, 0
    for hyp, ref in zip(hypotheses, references):
        c, r = c + len(hyp), r + len(ref)
        for n in range(1, 5):
            h = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
            g = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
            matches[n - 1] += sum(min(k, g[ngram]) for ngram, k in h.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if c == 0 or matches[0] == 0 or min(totals) == 0:
        return 0.0
    log_p, k = 0.0, 0
    for m, t in zip(matches, totals):
        if m == 0:
            if smooth != "exp":
                return 0.0
            k += 1
            log_p += math.log(1.0 / (2**k * t))
        else:
            log_p += math.log(m / t)
    brevity = 1.0 if c >= r else math.exp(1.0 - r / c)
    return 100.0 * brevity * math.exp(log_p / 4)


# ----------------------------------------------------------------------------
# The model: a small pre-LN Transformer encoder-decoder with MoE FFNs


@dataclass(frozen=True)
class ModelConfig:
    vocab: int  # joint vocabulary
    d_model: int = 64  # width
    heads: int = 4  # attention heads
    d_ffn: int = 128  # hidden width of the dense FFNs and of every expert
    layers: int = 4  # encoder layers, and decoder layers
    max_len: int = 64  # learned positions
    dropout: float = 0.1
    attention_dropout: Optional[float] = None  # on the attention weights; None: dropout
    moe: str = "gshard"  # "dense", "gshard", "seq" or "feat": the FFN of every other layer
    token_cluster: bool = False  # the clustering layer order (NOTES.md, section 1), clustering at the first MoE layer
    reorder_layers: bool = False  # that layer order without clustering (to separate the two effects)
    cluster_gate: str = "softmax"  # "softmax" (differentiable sorting) or "sigmoid" (BASE layers)
    route_to: str = "rank"  # clusters are ranks or nodes
    cluster_assign: str = "balanced"  # clustering: "balanced" (auction) or "argmax" (best cluster; sigmoid gate)
    decode_clustering: Optional[str] = None  # the decoder's clustering at inference; None: as cluster_assign
    moe_cfg: Optional[sc.MoEConfig] = None  # the MoE layers' settings (None for dense)


def layer_plan(layers: int, moe: str, token_cluster: bool, decoder: bool, reorder: bool = False) -> list[str]:
    """The sublayers of one stack, in order: "self", "cross", "ffn", "moe", "cluster".

    Without clustering, layers alternate dense and MoE FFNs (MoE in every other layer).
    With clustering (the paper's order), or with reorder alone: the dense layers, then the attention
    of the MoE layers, then one dense FFN, then the MoE FFNs; with clustering the first MoE
    FFN is the clustering layer.
    """
    attention = ["self", "cross"] if decoder else ["self"]
    n_moe = layers // 2 if moe != "dense" else 0
    if not (token_cluster or reorder):
        return [s for i in range(layers) for s in attention + ["moe" if i % 2 == 1 and n_moe else "ffn"]]
    plan = [s for _ in range(layers - n_moe) for s in attention + ["ffn"]]
    plan += [s for _ in range(n_moe) for s in attention] + ["ffn"]
    return plan + (["cluster"] if token_cluster else ["moe"]) + ["moe"] * (n_moe - 1)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float, weight_dropout: Optional[float] = None) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.weight_dropout = dropout if weight_dropout is None else weight_dropout
        self.norm = nn.LayerNorm(d)
        self.q, self.kv, self.out = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)

    def forward(self, x: Tensor, memory: Optional[Tensor], mask: Tensor) -> Tensor:
        """x + attention(LN(x), memory or LN(x)); mask (B, 1, Tq, Tk) True where allowed."""
        B, Tq, d = x.shape
        h = self.norm(x)
        kv_in = h if memory is None else memory
        q = self.q(h).view(B, Tq, self.heads, -1).transpose(1, 2)  # (B, heads, Tq, dh)
        k, v = self.kv(kv_in).view(B, kv_in.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, heads, Tk, dh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.weight_dropout if self.training else 0.0)
        return x + F.dropout(self.out(y.transpose(1, 2).reshape(B, Tq, d)), self.dropout, self.training)


class FFN(nn.Module):
    def __init__(self, d: int, d_ffn: int, dropout: float) -> None:
        super().__init__()
        self.dropout = dropout
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, d_ffn), nn.Linear(d_ffn, d)

    def forward(self, x: Tensor) -> Tensor:
        return x + F.dropout(self.fc2(F.relu(self.fc1(self.norm(x)))), self.dropout, self.training)


class MoEFFN(nn.Module):
    """x + MoE(LN(x)) on flat tokens; padding tokens are not routed."""

    def __init__(self, cfg: ModelConfig, topo: sc.Topology) -> None:
        super().__init__()
        self.norm, self.topology = nn.LayerNorm(cfg.d_model), topo
        self.moe = sc.make_moe_layer(cfg.moe, cfg.moe_cfg, topo)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, pad: Tensor) -> tuple[Tensor, sc.MoEOutput]:  # (t, d), (t,)
        out = self.moe(self.norm(x), pad)
        return x + F.dropout(out.y, self.dropout, self.training), out


class Replicas(nn.ModuleList):
    """A sublayer once per rank of a VirtualWorld (each on its rank's topology), sharing every parameter but the
    experts': a replicated parameter is one tensor here, as all-reduced gradients keep it one value on every rank."""

    def __init__(self, modules: list[nn.Module]) -> None:
        super().__init__(modules)
        first = dict(modules[0].named_modules())
        for replica in modules[1:]:  # the parameter itself, not a copy: one tensor, one gradient, one Adam state
            for name, m in replica.named_modules():
                if not isinstance(m, sc.Experts):
                    for key in list(m._parameters):
                        m._parameters[key] = first[name]._parameters[key]


class Stack(nn.Module):
    """An encoder or a decoder: pre-LN sublayers in the order of layer_plan, then a final LayerNorm. The MoE and
    clustering sublayers work on flat tokens, each rank on its own; with a VirtualWorld every rank's run in a thread."""

    def __init__(self, cfg: ModelConfig, topo: sc.Topology, decoder: bool,
                 world: Optional[sc.VirtualWorld] = None) -> None:
        super().__init__()
        self.decoder, self.cfg, self.world = decoder, cfg, world
        self.plan = layer_plan(cfg.layers, cfg.moe, cfg.token_cluster, decoder, cfg.reorder_layers)

        def flat(kind: str, topo: sc.Topology) -> nn.Module:
            if kind == "moe":
                return MoEFFN(cfg, topo)
            return sc.TokenClustering(cfg.d_model, cfg.d_ffn, topo, route_to=cfg.route_to, gate=cfg.cluster_gate,
                                      pre_norm=True)
        subs = []
        for kind in self.plan:
            if kind in ("self", "cross"):
                subs.append(Attention(cfg.d_model, cfg.heads, cfg.dropout, cfg.attention_dropout))
            elif kind == "ffn":
                subs.append(FFN(cfg.d_model, cfg.d_ffn, cfg.dropout))
            else:
                subs.append(flat(kind, topo) if world is None else Replicas([flat(kind, t) for t in world.topologies]))
        self.subs = nn.ModuleList(subs)
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, h: Tensor, pad: Tensor, memory: Optional[Tensor] = None, memory_pad: Optional[Tensor] = None,
                split: Optional[tuple[list[int], list[int]]] = None) -> tuple[Tensor, list[sc.MoEOutput]]:
        """h: (B, T, d), pad: (B, T) -> (B, T, d) and the MoE layers' outputs (for losses and stats). With a
        VirtualWorld, `split` gives each rank's sentences (rows, in rank order) and its batch's width."""
        B, T, d = h.shape
        self_mask = ~pad[:, None, None, :]  # (B, 1, 1, T): keys that are not padding
        if self.decoder:
            self_mask = self_mask & torch.ones(T, T, dtype=torch.bool, device=h.device).tril()  # causal
        cross_mask = None if memory_pad is None else ~memory_pad[:, None, None, :]
        outs, i = [], 0
        while i < len(self.plan):
            kind, sub = self.plan[i], self.subs[i]
            if kind == "self":
                h = sub(h, None, self_mask)
            elif kind == "cross":
                h = sub(h, memory, cross_mask)
            elif kind == "ffn":
                h = sub(h)
            else:  # flat tokens from here: one MoE layer, or clustering and the MoE layers after it to the end
                end = len(self.plan) if kind == "cluster" else i + 1
                if self.world is None:
                    h_flat, flat_outs = self.flat(self.subs[i:end], self.plan[i:end], h.reshape(-1, d), pad.reshape(-1))
                    h = h_flat.view(B, T, d)
                    outs += flat_outs
                else:
                    starts = list(itertools.accumulate(split[0], initial=0))

                    def rank_run(r: int) -> tuple[Tensor, list[sc.MoEOutput]]:  # runs before i moves on
                        rows, width = slice(starts[r], starts[r + 1]), split[1][r]  # this rank's batch
                        y, rank_outs = self.flat([sub[r] for sub in self.subs[i:end]], self.plan[i:end],
                                                 h[rows, :width].reshape(-1, d), pad[rows, :width].reshape(-1))
                        return F.pad(y.view(-1, width, d), (0, 0, 0, T - width)), rank_outs
                    results = self.world.run(rank_run)
                    h = torch.cat([y for y, _ in results])
                    outs += [out for _, rank_outs in results for out in rank_outs]
                i = end
                continue
            i += 1
        return self.norm(h), outs

    def flat(self, subs: Sequence[nn.Module], kinds: Sequence[str], h: Tensor,
             pad: Tensor) -> tuple[Tensor, list[sc.MoEOutput]]:
        """One rank's run of flat sublayers, h (t, d), pad (t,): after clustering the tokens live on their cluster's
        rank until the last MoE layer sends them back and undoes the sort."""
        outs, plan, clustering = [], None, None
        for kind, sub in zip(kinds, subs):
            if kind == "cluster":
                assign = self.cfg.cluster_assign
                if self.decoder and not self.training and self.cfg.decode_clustering is not None:
                    assign = self.cfg.decode_clustering
                h, plan = sub(h, pad, detach_router_input=self.decoder and self.training,
                              balanced=assign == "balanced")
                clustering, pad = sub, plan.pad_mask
            else:  # "moe"
                h, out = sub(h, pad)
                outs.append(out)
        if plan is not None:
            h = sc.uncluster(h, plan, clustering.ledger)
        return h, outs


class Translator(nn.Module):
    """Shared embeddings (tied output), learned positions, an encoder and a decoder. With a VirtualWorld it holds every
    rank's MoE and clustering sublayers and takes a batch of every rank's sentences (rows: how many each, in rank order;
    None: an even split)."""

    def __init__(self, cfg: ModelConfig, topo: sc.Topology, world: Optional[sc.VirtualWorld] = None) -> None:
        super().__init__()
        self.cfg, self.world = cfg, world
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model, padding_idx=PAD)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.encoder, self.decoder = Stack(cfg, topo, False, world), Stack(cfg, topo, True, world)
        nn.init.normal_(self.embed.weight, std=cfg.d_model**-0.5)

    def embed_tokens(self, ids: Tensor) -> Tensor:  # (B, T) -> (B, T, d)
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.embed(ids) * self.cfg.d_model**0.5 + self.pos(positions)
        return F.dropout(h, self.cfg.dropout, self.training)

    def split(self, ids: Tensor, rows: Optional[list[int]],
              full: bool = False) -> Optional[tuple[list[int], list[int]]]:
        """Each rank's sentences and the width its own batch would have: its longest sentence (padding trails), or
        the whole width (full: a prefix being decoded)."""
        if self.world is None:
            return None
        W = self.world.world_size
        rows = rows or [ids.shape[0] // W] * W
        if full:
            return rows, [ids.shape[1]] * W
        ends = torch.where(ids != PAD, torch.arange(1, ids.shape[1] + 1, device=ids.device), 0).amax(dim=1)  # (B,)
        return rows, torch.stack([e.max() for e in ends.split(rows)]).tolist()

    def encode(self, src: Tensor, rows: Optional[list[int]] = None) -> tuple[Tensor, list[sc.MoEOutput]]:
        return self.encoder(self.embed_tokens(src), src == PAD, split=self.split(src, rows))

    def decode(self, tgt_in: Tensor, memory: Tensor, src: Tensor, rows: Optional[list[int]] = None,
               full: bool = False) -> tuple[Tensor, list[sc.MoEOutput]]:
        h, outs = self.decoder(self.embed_tokens(tgt_in), tgt_in == PAD, memory, src == PAD,
                               split=self.split(tgt_in, rows, full))
        return h @ self.embed.weight.t(), outs  # (B, T, vocab)

    def forward(self, src: Tensor, tgt_in: Tensor,
                rows: Optional[list[int]] = None) -> tuple[Tensor, list[sc.MoEOutput]]:
        memory, enc_outs = self.encode(src, rows)
        logits, dec_outs = self.decode(tgt_in, memory, src, rows)
        return logits, enc_outs + dec_outs

    def ledgers(self, rank: Optional[int] = None) -> list[sc.CommLedger]:
        """The ledgers of the MoE and clustering layers; with a VirtualWorld and a rank, that rank's."""
        return [m.ledger for m in self.modules() if isinstance(getattr(m, "ledger", None), sc.CommLedger)
                and (rank is None or m.topology.rank == rank)]


def expert_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters each rank holds alone (experts, clustering FFNs): never all-reduced."""
    return {id(p) for m in model.modules() if isinstance(m, sc.Experts) for p in m.parameters()}


@torch.no_grad()
def greedy_decode(model: Translator, src: Tensor, memory: Tensor, max_len: int,
                  rows: Optional[list[int]] = None) -> Tensor:
    """Greedy decoding for max_len steps on every rank (the MoE layers' collectives need every rank
    at every step), given the encoder's output `memory`; returns (B, max_len) token ids."""
    out = torch.full((src.shape[0], 1), BOS, dtype=torch.long, device=src.device)
    for _ in range(max_len):
        logits, _ = model.decode(out, memory, src, rows, full=True)
        out = torch.cat([out, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return out[:, 1:]


# ----------------------------------------------------------------------------
# Training


@dataclass
class Variant:
    """One model to train: what results.json reports about it."""

    moe: str
    token_cluster: bool = False
    cluster_gate: str = "softmax"
    reorder: bool = False  # the clustering layer order without clustering
    cluster_assign: str = "balanced"  # or "argmax": each token to its best cluster (sigmoid gate only)
    point: Optional[tuple[float, float]] = None  # (ratio1, ratio2) of Seq / Feat; None: the command line's

    @property
    def name(self) -> str:
        name = self.moe + ("+reorder" if self.reorder and not self.token_cluster else "")
        if self.token_cluster:
            options = [o for o in (self.cluster_gate, self.cluster_assign) if o not in ("softmax", "balanced")]
            name = f"{self.moe}+cluster" + (f"({','.join(options)})" if options else "")
        return name + (f"@{self.point[0]:g},{self.point[1]:g}" if self.point else "")

    def apply(self, args: argparse.Namespace) -> argparse.Namespace:
        """The command line with this variant's (ratio1, ratio2)."""
        if self.point is None:
            return args
        return argparse.Namespace(**{**vars(args), "ratio1": self.point[0], "ratio2": self.point[1]})


@dataclass
class RunState:
    """What a checkpoint restores besides the parameters and the optimizers."""

    step: int = 0
    losses: list = field(default_factory=list)  # global mean loss per step
    auxes: list = field(default_factory=list)
    step_times: list = field(default_factory=list)
    bytes: dict = field(default_factory=lambda: {link: 0 for link in sc.LINK_CLASSES})  # summed over ranks and steps
    evals: list = field(default_factory=list)  # {"step", "bleu", "valid_loss"} every --eval-every steps
    byte_matrix: list = field(default_factory=list)  # [src][dst] bytes of the last step (rank 0's copy)
    devices: list = field(default_factory=list)  # [first step, device type] of each stretch on one kind of device


def print0(*a, **k) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **k, flush=True)


def all_sum(values: Tensor) -> list[float]:
    """Sum a few numbers over all ranks (identity on one rank); one host sync."""
    values = values.to(torch.float64)
    if dist.is_initialized():
        dist.all_reduce(values)
    return values.tolist()


def moe_config(args: argparse.Namespace) -> sc.MoEConfig:
    """The MoE layers' settings from the command line."""
    return sc.MoEConfig(d_model=args.d_model, d_ffn=args.d_ffn, num_experts=args.experts,
                        capacity_factor=args.capacity_factor, ratio1=args.ratio1, ratio2=args.ratio2,
                        feat_multiple=args.feat_multiple, feat_hidden=args.feat_hidden,
                        batch_prioritized_routing=args.batch_prioritized_routing,
                        eval_capacity_token_fraction=args.eval_capacity_token_fraction,
                        local_no_capacity=args.local_no_capacity)


def cluster_route(args: argparse.Namespace, topo: sc.Topology) -> str:
    """Clusters are nodes when nothing stays on the device (ratio1 = 0) and there are several nodes, as the
    authors' code does; otherwise ranks."""
    return "node" if args.ratio1 == 0 and topo.num_nodes > 1 else "rank"


def build_model(args: argparse.Namespace, variant: Variant, task: Task, topo: sc.Topology,
                device: torch.device) -> Translator:
    """The model of this rank; with --threads, of every rank (a VirtualWorld of --nproc ranks in this process)."""
    world = sc.VirtualWorld(*world_and_rpn(args)) if args.threads else None
    shape = world.topologies[0] if world else topo
    moe_cfg = None if variant.moe == "dense" else moe_config(variant.apply(args))
    cfg = ModelConfig(vocab=task.vocab, d_model=args.d_model, d_ffn=args.d_ffn, layers=args.layers,
                      max_len=max(64, task.max_target_len() + 2), dropout=args.dropout,
                      attention_dropout=args.attention_dropout, moe=variant.moe,
                      token_cluster=variant.token_cluster, reorder_layers=variant.reorder,
                      cluster_gate=variant.cluster_gate, cluster_assign=variant.cluster_assign,
                      route_to=cluster_route(variant.apply(args), shape), decode_clustering=args.decode_clustering,
                      moe_cfg=moe_cfg)
    model = Translator(cfg, topo, world)
    init_shared(model, args.seed)
    init_experts(model, args.seed)
    return model.to(device)


def init_shared(model: Translator, seed: int) -> None:
    """The replicated parameters from one seed, module by module, skipping the experts: the same on every
    rank, and the same whatever the number of experts each rank holds (a module that Replicas shares, once)."""
    torch.manual_seed(seed)
    done = set()
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Embedding)) and id(m.weight) not in done:
            m.reset_parameters()
            done.add(id(m.weight))
    nn.init.normal_(model.embed.weight, std=model.cfg.d_model**-0.5)  # as Translator does


def init_experts(model: nn.Module, seed: int) -> None:
    """Expert e of expert module i starts from a generator seeded by (seed, i, e), e the global expert id:
    the same model whatever the number of ranks it is spread over (and whether they are processes or threads)."""
    i = 0
    for sub in [*model.encoder.subs, *model.decoder.subs]:
        replicas = list(sub) if isinstance(sub, Replicas) else [sub]
        for replica in replicas:  # each rank's expert modules, numbered as in its own model
            for j, experts in enumerate(m for m in replica.modules() if isinstance(m, sc.Experts)):
                for e in range(experts.n):
                    state = np.random.SeedSequence([seed, i + j, replica.topology.rank * experts.n + e])
                    g = torch.Generator().manual_seed(int(state.generate_state(1)[0]))
                    with torch.no_grad():  # as nn.Linear: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))
                        for w, b, fan_in in ((experts.w1, experts.b1, experts.d_model),
                                             (experts.w2, experts.b2, experts.d_ffn)):
                            w[e].uniform_(-fan_in**-0.5, fan_in**-0.5, generator=g)
                            b[e].uniform_(-fan_in**-0.5, fan_in**-0.5, generator=g)
        i += sum(isinstance(m, sc.Experts) for m in replicas[0].modules())


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then inverse square root (as fairseq's inverse_sqrt); independent of --steps."""
    step += 1
    return args.lr * min(step / args.warmup, math.sqrt(args.warmup / step))


# What a checkpoint can only be resumed with: every flag that changes the task, the model, the data order, the
# optimizer or the evaluations (not --steps: the learning-rate schedule does not depend on it), besides the variant
# and the ranks
FINGERPRINT_FLAGS = ("seed", "languages", "src_words", "train_pairs", "batch", "lr", "warmup", "label_smoothing",
                     "dropout", "attention_dropout", "aux_weight", "d_model", "d_ffn", "layers", "experts",
                     "capacity_factor", "ratio1", "ratio2", "feat_multiple", "feat_hidden", "batch_prioritized_routing",
                     "local_no_capacity", "eval_capacity_token_fraction", "decode_clustering", "eval_sentences")


def fingerprint(args: argparse.Namespace, variant: Variant, world: int, ranks_per_node: int) -> dict:
    """The run's settings a checkpoint records and --resume compares, keyed as the user sees them."""
    a = vars(variant.apply(args))
    return {"variant": variant.name, **{f"--{k.replace('_', '-')}": a[k] for k in FINGERPRINT_FLAGS},
            "ranks": world, "--ranks-per-node": ranks_per_node, **({"--threads": True} if a.get("threads") else {})}


def ckpt_dir(args: argparse.Namespace, variant: Variant) -> str:
    return os.path.join(args.out, "ckpt", variant.name)


def manifest_path(root: str, step: int) -> str:
    return os.path.join(root, f"step{step:06d}.manifest.json")


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file, then rename: a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(args, variant, model, opt_shared, opt_experts, state: RunState, topo: sc.Topology) -> None:
    """Shared parameters and their optimizer once (rank 0), each process's experts (with --threads, every
    rank's), optimizer and RNG in its own file, in a directory per step; then, last, rank 0 writes the step's
    manifest (the run's fingerprint and every file's sha256). A step without its manifest was not completely saved."""
    root = ckpt_dir(args, variant)
    step_dir = os.path.join(root, f"step{state.step:06d}")
    os.makedirs(step_dir, exist_ok=True)
    experts = expert_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    rank_state = {
        "step": state.step,
        "experts": {names[i]: p.detach().cpu() for n, p in model.named_parameters() if (i := id(p)) in experts},
        "optimizer": opt_experts.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() and model.embed.weight.is_cuda else None,
    }
    mine = os.path.join(step_dir, f"rank{topo.rank}.pt")
    atomic_save(rank_state, mine)
    digests = dict(gather_objects((os.path.basename(mine), file_sha256(mine))))  # also: every rank's file is on disk
    if topo.rank == 0:
        shared = {n: p.detach().cpu() for n, p in model.named_parameters() if id(p) not in experts}
        atomic_save({"step": state.step, "shared": shared, "optimizer": opt_shared.state_dict(),
                     "state": state.__dict__}, os.path.join(step_dir, "shared.pt"))
        digests["shared.pt"] = file_sha256(os.path.join(step_dir, "shared.pt"))
        manifest = {"step": state.step, "fingerprint": fingerprint(args, variant, *world_and_rpn(args)),
                    "sha256": digests}
        path = manifest_path(root, state.step)
        with open(f"{path}.tmp", "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(f"{path}.tmp", path)
    if dist.is_initialized():
        dist.barrier()


def newest_checkpoint(root: str) -> tuple[Optional[dict], list[str]]:
    """The manifest of the newest complete step in `root` (its manifest there and every file matching its
    sha256), with "dir" added; and why each newer step was skipped."""
    steps = sorted({int(name[4:10]) for name in (os.listdir(root) if os.path.isdir(root) else [])
                    if name.startswith("step") and name[4:10].isdigit()}, reverse=True)
    skipped = []
    for step in steps:
        path, step_dir = manifest_path(root, step), os.path.join(root, f"step{step:06d}")
        try:
            with open(path) as f:
                manifest = json.load(f)
        except FileNotFoundError:
            skipped.append(f"{step_dir}: no manifest {path} (its save did not finish)")
            continue
        except ValueError:
            skipped.append(f"{step_dir}: its manifest {path} is not valid JSON")
            continue
        files = {name: os.path.join(step_dir, name) for name in manifest["sha256"]}
        bad = [name for name, digest in manifest["sha256"].items()
               if not os.path.isfile(files[name]) or file_sha256(files[name]) != digest]
        if bad:
            skipped.append(f"{step_dir}: {', '.join(files[n] for n in bad)} missing or not matching "
                           f"its sha256 in {path}")
            continue
        return {**manifest, "dir": step_dir}, skipped
    return None, skipped


def load_checkpoint(step_dir: str, model, opt_shared, opt_experts, topo: sc.Topology) -> RunState:
    """Restore a step that the launcher chose and verified (newest_checkpoint, check_checkpoints); one written on
    a GPU resumes on the CPU too (and the other way), with the CPU's random stream."""
    shared = torch.load(os.path.join(step_dir, "shared.pt"), map_location="cpu", weights_only=True)
    mine = torch.load(os.path.join(step_dir, f"rank{topo.rank}.pt"), map_location="cpu", weights_only=True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in {**shared["shared"], **mine["experts"]}.items():
            params[n].copy_(t)
    opt_shared.load_state_dict(shared["optimizer"])
    opt_experts.load_state_dict(mine["optimizer"])
    torch.set_rng_state(mine["rng"])
    if mine["cuda_rng"] is not None and next(model.parameters()).is_cuda:
        torch.cuda.set_rng_state(mine["cuda_rng"])
    return RunState(**shared["state"])


def sync_shared_gradients(model: nn.Module, experts: set[int]) -> None:
    """All-reduce (sum) the gradients of the replicated parameters in one flat buffer."""
    for p in model.parameters():  # a parameter no rank used has gradient 0 (Adam moves it as on any world size)
        if id(p) not in experts and p.grad is None:
            p.grad = torch.zeros_like(p)
    if not dist.is_initialized():
        return
    grads = [p.grad for p in model.parameters() if id(p) not in experts]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


@contextlib.contextmanager
def counting_preferred_experts(model: nn.Module, counts: list[int]):
    """While open, every MoE layer adds to counts = [on the rank, in the node, tokens], once per real token it routes:
    whether the top-1 expert of its router (over all E experts) is on the rank that holds the token (after
    clustering, the rank the token moved to) and whether it is in that rank's node. Where tokens would go, whatever
    the layer then allows; tokens that ignore place score 1/W and 1/N."""
    def count(layer: nn.Module, inputs: tuple, output) -> None:
        x, pad = inputs  # MoEFFN calls the layer as moe(x, pad)
        topo = layer.topology
        owner = layer.router(x[~pad]).argmax(dim=-1) // layer.n  # (t_real,): the rank of each token's top-1 expert
        counts[0] += int((owner == topo.rank).sum())
        counts[1] += int((owner // topo.ranks_per_node == topo.node_rank).sum())
        counts[2] += owner.numel()
    hooks = [m.moe.register_forward_hook(count) for m in model.modules() if isinstance(m, MoEFFN)]
    try:
        yield counts
    finally:
        for hook in hooks:
            hook.remove()


def evaluate(model: Translator, task: Task, topo: sc.Topology, device: torch.device, limit: int) -> dict:
    """The validation set, split over the ranks (rank r: sentences r, r + W, ...): greedy decoding for corpus BLEU and
    exact match, the teacher-forced cross-entropy and token accuracy (no decoding involved), and in that pass the
    share of tokens whose preferred expert is on their rank and in their node (counting_preferred_experts, over the
    batches where no rank decodes a dummy); the scores on rank 0. With a VirtualWorld this process holds every rank,
    and each batch is every rank's batch side by side."""
    model.eval()
    valid = task.valid[:limit]
    W = model.world.world_size if model.world else topo.world_size
    held = range(W) if model.world else [topo.rank]
    mine = {r: valid[r::W] for r in held}
    hyps, ce, correct, count, prefer = {r: [] for r in held}, 0.0, 0, 0, [0, 0, 0]
    for start in range(0, math.ceil(len(valid) / W), 100):  # every rank runs the same number of batches
        parts = {r: mine[r][start:start + 100] for r in held}
        batches = [parts[r] or valid[:1] for r in held]  # a rank with nothing left decodes a dummy
        rows = [len(b) for b in batches] if model.world else None
        src, tgt_in, tgt_out = (t.to(device) for t in collate([pair for b in batches for pair in b]))
        dummy = start >= len(valid) // W  # the shortest share, the last rank's, has run out (the same on every rank)
        with torch.no_grad(), contextlib.nullcontext() if dummy else counting_preferred_experts(model, prefer):
            memory, _ = model.encode(src, rows)  # one encoder pass serves the decoding and the teacher-forced loss
            logits, _ = model.decode(tgt_in, memory, src, rows)
        out = greedy_decode(model, src, memory, task.max_target_len() + 1, rows).cpu()
        first = 0
        for r, batch in zip(held, batches):
            if parts[r]:
                these = slice(first, first + len(batch))
                hyps[r] += [decode_ids(task, row) for row in out[these]]
                real = tgt_out[these] != PAD
                ce += float(F.cross_entropy(logits[these][real], tgt_out[these][real], reduction="sum"))
                correct += int((logits[these][real].argmax(-1) == tgt_out[these][real]).sum())
                count += int(real.sum())
            first += len(batch)
    refs = [[task.itos[t] for t in tgt] for r in held for _, tgt in mine[r]]
    every = gather_objects(([h for r in held for h in hyps[r]], refs, ce, correct, count, prefer))
    model.train()
    for ledger in model.ledgers():
        ledger.reset()  # evaluation traffic does not count in the training bytes
    if topo.rank != 0:
        return {}
    all_hyps = [h for hs, *_ in every for h in hs]
    all_refs = [r for _, rs, *_ in every for r in rs]
    tokens = sum(e[4] for e in every)
    on_rank, in_node, routed = (sum(e[5][i] for e in every) for i in range(3))
    return {"bleu": corpus_bleu(all_hyps, all_refs),
            "exact_match": sum(h == r for h, r in zip(all_hyps, all_refs)) / len(all_refs),
            "valid_loss": sum(e[2] for e in every) / tokens, "valid_accuracy": sum(e[3] for e in every) / tokens,
            "example": {"hyp": " ".join(all_hyps[0]), "ref": " ".join(all_refs[0])},
            "preferred_expert": {"on_rank": on_rank / routed, "in_node": in_node / routed} if routed else None}


def decode_ids(task: Task, ids: Tensor) -> list[str]:
    words = []
    for i in ids.tolist():
        if i == EOS:
            break
        if i not in (PAD, BOS):
            words.append(task.itos[i])
    return words


def gather_objects(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def step_losses(logits: Tensor, moe_outs: list, tgt_out: Tensor, args: argparse.Namespace) -> tuple[Tensor, ...]:
    """A training step's cross entropy, summed over this rank's target tokens, and its MoE layers' mean aux loss."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1), ignore_index=PAD,
                         reduction="sum", label_smoothing=args.label_smoothing)
    aux = torch.stack([o.aux_loss for o in moe_outs]).mean() if moe_outs else ce.new_zeros(())
    return ce, aux


def train_variant(args: argparse.Namespace, variant: Variant, task: Task, topo: sc.Topology,
                  device: torch.device) -> Optional[dict]:
    """Train one variant for args.steps steps (resuming if asked) and evaluate it; the result on rank 0."""
    args = variant.apply(args)
    model = build_model(args, variant, task, topo, device)
    experts = expert_parameters(model)
    shared_params = [p for p in model.parameters() if id(p) not in experts]
    expert_params = [p for p in model.parameters() if id(p) in experts]
    adam = dict(lr=args.lr, betas=(0.9, 0.98), eps=1e-9, foreach=True)  # on a CPU too: same numbers, fewer ops
    opt_shared = torch.optim.Adam(shared_params, **adam)
    # (a dense model has no experts: Adam then holds a placeholder that never gets a gradient)
    opt_experts = torch.optim.Adam(expert_params or [torch.zeros(1, requires_grad=True)], **adam)
    step_dir = args.resume_from.get(ckpt_dir(args, variant))  # chosen and verified before any process started
    state = load_checkpoint(step_dir, model, opt_shared, opt_experts, topo) if step_dir else None
    if state is not None:  # the checkpoint restored the RNG too
        print0(f"[{variant.name}] resumed from step {state.step}")
    else:
        state = RunState()
        torch.manual_seed(args.seed * 7919 + topo.rank)  # dropout: different on every rank
    if not state.devices or state.devices[-1][1] != device.type:  # a fresh run, or one resumed on another device
        state.devices.append([state.step, device.type])

    def eval_due() -> bool:  # an evaluation every --eval-every steps before the last (which always has one)
        return bool(args.eval_every) and state.step % args.eval_every == 0 and 0 < state.step < args.steps and \
            all(e["step"] != state.step for e in state.evals)

    def evaluate_on_the_way() -> None:
        scores = evaluate(model, task, topo, device, args.eval_sentences)
        state.evals.append({"step": state.step, **{k: scores.get(k) for k in ("bleu", "valid_loss")}})
        print0(f"[{variant.name}] step {state.step}: BLEU {scores.get('bleu', 0):.1f}, "
               f"valid loss {scores.get('valid_loss', 0):.3f}")

    n_params = sum(p.numel() for p in shared_params) + sum(topo.gather_counts(sum(p.numel() for p in expert_params)))
    W, G = world_and_rpn(args)
    print0(f"[{variant.name}] {n_params / 1e6:.2f}M parameters, {W} ranks ({W // G} node(s) x {G}"
           f"{', threads of one process' if args.threads else ''}), {args.experts} experts, "
           f"layers: enc {' '.join(model.encoder.plan)} | dec {' '.join(model.decoder.plan)}")
    started, first_step, saved = time.perf_counter(), state.step, state.step if step_dir else None
    if eval_due():  # resumed from a checkpoint without its step's evaluation (one written as its run ended)
        evaluate_on_the_way()
    forward = torch.compile(model, dynamic=True) if args.compile else model  # the same parameters
    while state.step < args.steps:
        inject_fault(args, state.step, topo, model)
        batch = train_batch(task, state.step, topo.rank, topo.world_size, args.batch // topo.world_size, args.seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        n_global = sum(topo.gather_counts(int((batch[2] != PAD).sum())))  # target tokens of all ranks (host)
        src, tgt_in, tgt_out = (t.to(device, non_blocking=True) for t in batch)
        for group in opt_shared.param_groups + opt_experts.param_groups:
            group["lr"] = lr_at(state.step, args)
        logits, moe_outs = forward(src, tgt_in)
        ce, aux = step_losses(logits, moe_outs, tgt_out, args)
        loss = ce / n_global + args.aux_weight * aux / topo.world_size  # the gradient sum over ranks is the mean
        opt_shared.zero_grad(set_to_none=True)
        opt_experts.zero_grad(set_to_none=True)
        loss.backward()
        sync_shared_gradients(model, experts)
        opt_shared.step()
        opt_experts.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        state.step_times.append(time.perf_counter() - t0)

        routings = [t.routing for o in moe_outs for t in o.tiers.values()]
        assigned = torch.stack([r.assigned for r in routings]).sum() if routings else ce.new_zeros(())
        accepted = torch.stack([r.load.sum() for r in routings]).sum() if routings else ce.new_zeros(())
        sent = [sum(led.total(link=link) for led in model.ledgers()) for link in sc.LINK_CLASSES]  # host ints
        if state.step + 1 == args.steps:  # the rank-by-rank bytes of one step, for the demo's picture
            held = range(W) if args.threads else [None]  # None: this process's one rank
            matrix = [[sum(led.to_rank.get(r, 0) for led in model.ledgers(rank)) for r in range(W)] for rank in held]
            state.byte_matrix = matrix if args.threads else gather_objects(matrix[0])
        for ledger in model.ledgers():
            ledger.reset()
        # a finite loss can still have non-finite gradients, which leave non-finite weights
        bad_grads = torch.stack([~p.grad.isfinite().all() for p in model.parameters() if p.grad is not None]).sum()
        stats = torch.stack([ce.detach(), aux.detach(), (assigned - accepted).to(ce.dtype), assigned.to(ce.dtype),
                             bad_grads.to(ce.dtype)])
        totals = all_sum(torch.cat([stats.double(), torch.tensor(sent, dtype=torch.float64, device=device)]))
        if not (math.isfinite(totals[0]) and math.isfinite(totals[1])) or totals[4]:  # global sums: all ranks agree
            what = (f"the loss is not finite ({totals[0] / n_global:g})" if not math.isfinite(totals[0]) else
                    f"the aux loss is not finite ({totals[1]:g})" if not math.isfinite(totals[1]) else
                    f"the gradients of {totals[4]:g} parameter tensors are not finite")
            print0(f"[{variant.name}] step {state.step + 1}: {what}; stopped without saving; " +
                   (f"the newest checkpoint is step {saved}, in {ckpt_dir(args, variant)}" if saved is not None
                    else "no checkpoint was saved"))
            if dist.is_initialized():
                dist.barrier()  # rank 0 has spoken before any rank exits
            raise SystemExit(STOPPED)
        state.losses.append(totals[0] / n_global)
        state.auxes.append(totals[1] / topo.world_size)
        for link, b in zip(sc.LINK_CLASSES, totals[5:]):
            state.bytes[link] += int(b)
        state.step += 1
        if state.step % args.log_every == 0 or state.step == args.steps:
            median = statistics.median(state.step_times[-args.log_every:])
            eta = (args.steps - state.step) * median
            mb = " ".join(f"{short} {b / 1e6:.2f}" for short, b in zip(("device", "node", "inter"), totals[5:]))
            print0(f"[{variant.name}] step {state.step}/{args.steps} | loss {state.losses[-1]:.3f} | "
                   f"aux {state.auxes[-1]:.3f} | {n_global / median:,.0f} tgt tok/s | "
                   f"dropped {100 * totals[2] / max(totals[3], 1):.1f}% | MB/step {mb} | ETA {eta:.0f}s "
                   f"({state.step - first_step} steps this run)")
        if eval_due():
            evaluate_on_the_way()
        if args.ckpt_every and state.step % args.ckpt_every == 0:  # after the step's evaluation: it keeps it
            save_checkpoint(args, variant, model, opt_shared, opt_experts, state, topo)
            saved = state.step
    train_time = time.perf_counter() - started
    scores = evaluate(model, task, topo, device, args.eval_sentences)
    if topo.rank != 0:
        return None
    warm = state.step_times[min(5, len(state.step_times) - 1):] or state.step_times
    steps_run = max(len(state.losses), 1)
    return {
        "variant": variant.name, "moe": variant.moe, "token_cluster": variant.token_cluster,
        "reorder_layers": variant.reorder or variant.token_cluster,
        "cluster_gate": variant.cluster_gate if variant.token_cluster else None,
        "cluster_assign": variant.cluster_assign if variant.token_cluster else None,
        "ratio1": args.ratio1 if variant.moe in ("seq", "feat") else None,
        "ratio2": args.ratio2 if variant.moe in ("seq", "feat") else None, "world_size": W,
        "byte_matrix": state.byte_matrix, "threads": args.threads,
        "ranks_per_node": G, "experts": args.experts, "languages": args.languages,
        "layers": args.layers, "batch": args.batch, "evals": state.evals + [
            {"step": state.step, "bleu": scores["bleu"], "valid_loss": scores["valid_loss"]}],
        "capacity_factor": args.capacity_factor, "seed": args.seed, "steps": state.step,
        "final_loss": statistics.mean(state.losses[-10:]), "bleu": scores["bleu"],
        "exact_match": scores["exact_match"], "valid_loss": scores["valid_loss"],
        "valid_accuracy": scores["valid_accuracy"], "example": scores["example"],
        "preferred_expert": scores["preferred_expert"],
        "step_time_s": statistics.median(warm) if warm else None,
        "compute_s": compute_only_step(args, variant, task, device),
        "bytes_per_step": {link: state.bytes[link] / steps_run for link in sc.LINK_CLASSES},
        "train_time_s": train_time, "devices": state.devices, "losses": state.losses, "aux_losses": state.auxes,
    }


# ----------------------------------------------------------------------------
# Reports: the classroom demo's table and traffic picture, the sweep's table and curves


def compute_only_step(args: argparse.Namespace, variant: Variant, task: Task, device: torch.device,
                      reps: int = 10) -> float:
    """The cost model's compute: the median time of one rank's training step, with every exchange a local copy of
    the same shape (rank 0 of the same world, in this process, on its share of the global batch; fresh weights),
    as `bench` times one layer. Two warm-up steps first."""
    W, G = world_and_rpn(args)
    model = build_model(argparse.Namespace(**{**vars(args), "threads": False}), variant, task,
                        sc.emulated_topology(W, G), device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, foreach=True)
    src, tgt_in, tgt_out = (t.to(device) for t in train_batch(task, 0, 0, W, args.batch // W, args.seed))
    n_tokens = int((tgt_out != PAD).sum()) * W  # the global count the training step divides by, as if even
    times = []
    for _ in range(reps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        ce, aux = step_losses(*model(src, tgt_in), tgt_out, args)
        loss = ce / n_tokens + args.aux_weight * aux / W
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def link_bytes(matrix: list[list[int]], G: int) -> list[dict]:
    """Per rank, the bytes of matrix[src][dst] (one step) it sends inside its node and to other nodes: the
    form `predict`, the cost model, reads."""
    W = len(matrix)
    return [{"intra_node": sum(matrix[r][q] for q in range(W) if q != r and q // G == r // G),
             "inter_node": sum(matrix[r][q] for q in range(W) if q // G != r // G)} for r in range(W)]


def try_pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def report(results: list[dict], args: argparse.Namespace) -> None:
    """Print the table and the rank-by-rank traffic of one step; write results-NNNN.json, the next free
    number (an earlier run's results are kept), its copy results.json (the newest), and results.png."""
    os.makedirs(args.out, exist_ok=True)
    for n in itertools.count(1):
        path = os.path.join(args.out, f"results-{n:04d}.json")
        try:
            with open(path, "x") as f:  # "x": never another run's file, even written at the same moment
                json.dump(results, f, indent=1)
            break
        except FileExistsError:
            continue
    shutil.copyfile(path, os.path.join(args.out, "results.json.tmp"))
    os.replace(os.path.join(args.out, "results.json.tmp"), os.path.join(args.out, "results.json"))
    G, W = results[0]["ranks_per_node"], results[0]["world_size"]
    for r in results:
        r["cluster_step_s"] = predict(r["compute_s"], link_bytes(r["byte_matrix"], G), G, args)
    base = next((r for r in results if r["moe"] == "gshard" and not r["token_cluster"]), results[0])
    threads = results[0]["threads"]
    where = f"threads of one process on {results[0]['devices'][-1][1]}" if threads else "processes"
    print(f"\n{W} ranks as {W // G} node(s) x {G}, {where} (this machine, {os.cpu_count()} cores)\n"
          f"step s: measured here; compute s: one rank's step alone, every exchange a local copy (rank 0, its "
          f"share of the batch, fresh weights)"
          f"\ncluster s: compute s + one step's ledger bytes over a cluster of this shape, {args.gbps_intra_node:g} "
          f"Gbit/s per rank inside a node, {args.gbps_inter_node:g} Gbit/s per node between nodes (no latency, no "
          f"overlap)")
    print(f"speed-up: against {base['variant']}")
    print(f"{'variant':<14} {'BLEU':>5} {'valid loss':>10} {'MB/step dev':>11} {'node':>6} {'inter':>6} "
          f"{'step s':>7} {'speed-up':>8} {'compute s':>9} {'cluster s':>9} {'speed-up':>8}")
    for r in results:
        mb = [r["bytes_per_step"][link] / 1e6 for link in sc.LINK_CLASSES]
        print(f"{r['variant']:<14} {r['bleu']:>5.1f} {r['valid_loss']:>10.3f} {mb[0]:>11.2f} {mb[1]:>6.2f} "
              f"{mb[2]:>6.2f} {r['step_time_s']:>7.3f} {base['step_time_s'] / r['step_time_s']:>7.2f}x "
              f"{r['compute_s']:>9.3f} {r['cluster_step_s']:>9.3f} "
              f"{base['cluster_step_s'] / r['cluster_step_s']:>7.2f}x")
    if args.command == "demo":
        print(f"BLEU and valid loss after {args.steps} steps per variant: NOTES.md, section 5.3, has the demo's "
              f"spread over seeds, and section 5.2 the sweep that asks where locality costs quality")
    print(f"\nMB one training step sends from each rank (row) to each rank (column); | and - mark the node "
          f"boundaries, so traffic outside the diagonal blocks crosses nodes")
    for r in results:
        m = r["byte_matrix"]
        print(f"{r['variant']}:")
        for src in range(W):
            cells = [f"{m[src][dst] / 1e6:6.2f}" + (" |" if (dst + 1) % G == 0 and dst + 1 < W else "")
                     for dst in range(W)]
            print("   " + " ".join(cells))
            if (src + 1) % G == 0 and src + 1 < W:
                print("   " + "-" * (7 * W + 2 * (W // G - 1)))
    print(f"\nwrote {path} and its copy {os.path.join(args.out, 'results.json')}")
    plt = try_pyplot()
    if plt is None:
        print("for the pictures: pip install matplotlib, then run again")
        return
    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.4))
    top = max(max(map(max, r["byte_matrix"])) for r in results) / 1e6
    for ax, r in zip(np.atleast_1d(axes), results):
        ax.imshow(np.array(r["byte_matrix"]) / 1e6, cmap="Blues", vmin=0, vmax=top)
        for edge in range(G, W, G):  # node boundaries
            ax.axhline(edge - 0.5, color="red")
            ax.axvline(edge - 0.5, color="red")
        inter = r["bytes_per_step"]["inter_node"] / 1e6
        ax.set(title=f"{r['variant']}\nBLEU {r['bleu']:.1f}, {inter:.1f} MB inter-node", xlabel="to rank",
               ylabel="from rank", xticks=range(W), yticks=range(W))
    fig.suptitle(f"bytes one step sends, rank by rank (red: node boundaries; white 0 to blue {top:.1f} MB)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "results.png"), dpi=110)
    print(f"wrote {os.path.join(args.out, 'results.png')}")


def family(r: dict) -> str:
    """A run's curve in the sweep: the variant without its locality point."""
    return r["variant"].split("@")[0]


def gap_table(rows: list[dict]) -> list[str]:
    """Each variant against GShard, in the sweep's own terms: the difference of the seed means, beside twice the
    pooled seed standard deviation sqrt((sd_variant^2 + sd_gshard^2) / 2); a difference beyond it is marked *.
    For Seq + clustering, the share of Seq's gap at the same point that clustering closes, when Seq is behind by
    more than 2 sd (below 0: clustering widens it; above 100%: it overtakes GShard). Seeds are taken as unpaired
    and the two sds weigh alike; rows with one seed are named, not compared."""
    base = next((r for r in rows if r["family"] == "gshard" and len(r["seeds"]) > 1), None)
    if base is None:
        return ["(no gaps to GShard: they need GShard with at least 2 seeds)"]
    by_name = {r["variant"]: r for r in rows}
    out = ["| variant | seeds | BLEU - GShard | 2 sd | valid loss - GShard | 2 sd | clustering closes "
           "(BLEU, loss) |", "|---|---|---:|---:|---:|---:|---|"]

    def gap(r: dict, key: str) -> tuple[float, float]:  # (difference, 2 pooled sd); BLEU: + is better
        return r[key] - base[key], 2 * math.sqrt((r[key + "_sd"] ** 2 + base[key + "_sd"] ** 2) / 2)

    for r in rows:
        if r is base or r["family"] == "gshard" or len(r["seeds"]) < 2:
            continue
        cells = []
        for key, digits in (("bleu", 1), ("loss", 3)):
            d, two_sd = gap(r, key)
            cells += [f"{d:+.{digits}f}{' *' if abs(d) > two_sd else ''}", f"{two_sd:.{digits}f}"]
        closes = ""
        seq = by_name.get(r["variant"].replace("seq+cluster", "seq", 1)) if r["family"] == "seq+cluster" else None
        if seq is not None and len(seq["seeds"]) > 1:
            shares = []
            for key, sign in (("bleu", -1), ("loss", 1)):  # the gap: how far Seq is behind GShard
                (ds, two_sd), (dc, _) = gap(seq, key), gap(r, key)
                behind = sign * ds
                shares.append(f"{(behind - sign * dc) / behind:.0%}" if behind > two_sd else
                              "Seq ahead" if behind < -two_sd else "Seq within 2 sd")
            closes = ", ".join(shares)
        out.append(f"| {r['variant']} | {','.join(map(str, r['seeds']))} | " + " | ".join(cells) + f" | {closes} |")
    single = [r["variant"] for r in rows if len(r["seeds"]) < 2]
    return out + ([f"(one seed, not compared: {', '.join(single)})"] if single else [])


def sweep_report(args: argparse.Namespace) -> None:
    """Mean and spread over seeds of BLEU and valid loss per (variant, point) against inter-node MB per
    step: a table (printed and in <out>/table.md) and, with matplotlib, <out>/sweep.png."""
    folder = os.path.join(args.out, "runs")
    runs = [json.load(open(os.path.join(folder, f))) for f in sorted(os.listdir(folder)) if f.endswith(".json")] \
        if os.path.isdir(folder) else []
    if not runs:
        print(f"no finished runs in {folder}")
        return
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(r["variant"], []).append(r)
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else float("nan")  # noqa: E731  (one seed: no spread)
    rows = []
    for name, rs in groups.items():
        bleu, loss = [r["bleu"] for r in rs], [r["valid_loss"] for r in rs]
        steps = sorted({e["step"] for r in rs for e in r["evals"]})
        curve = [statistics.mean(e["bleu"] for r in rs for e in r["evals"] if e["step"] == s) for s in steps]
        # where tokens would go, over the seeds whose runs recorded it (runs of older versions did not)
        known = sorted([(r["seed"], r["preferred_expert"]) for r in rs if r.get("preferred_expert")],
                       key=lambda k: k[0])
        prefer = " / ".join(f"{statistics.mean(p[k] for _, p in known):.0%}" for k in ("on_rank", "in_node")) \
            if known else ""
        if known and len(known) < len(rs):  # measured for some seeds only: name them
            prefer += f" (seed{'s' * (len(known) > 1)} {','.join(str(s) for s, _ in known)})"
        rows.append({"variant": name, "family": family(rs[0]), "seeds": sorted(r["seed"] for r in rs), "prefer": prefer,
                     "inter_mb": statistics.mean(r["bytes_per_step"]["inter_node"] for r in rs) / 1e6,
                     "bleu": statistics.mean(bleu), "bleu_sd": sd(bleu), "loss": statistics.mean(loss),
                     "loss_sd": sd(loss), "curve": dict(zip(steps, curve))})
    rows.sort(key=lambda r: (SWEEP_VARIANTS.index(r["family"]) if r["family"] in SWEEP_VARIANTS else 99, r["variant"]))
    lines = ["| variant (ratio1, ratio2) | seeds | inter-node MB/step | BLEU mean ± sd | valid loss mean ± sd | "
             "preferred expert on rank / in node | mean BLEU at steps |", "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        curve = ", ".join(f"{s}: {b:.1f}" for s, b in r["curve"].items())
        spread = lambda v, f: "" if math.isnan(v) else f" ± {v:{f}}"  # noqa: E731
        lines.append(f"| {r['variant']} | {','.join(map(str, r['seeds']))} | {r['inter_mb']:.2f} | "
                     f"{r['bleu']:.1f}{spread(r['bleu_sd'], '.1f')} | {r['loss']:.3f}{spread(r['loss_sd'], '.3f')} | "
                     f"{r['prefer']} | {curve} |")
    table = "\n".join(lines + [""] + gap_table(rows))
    print(table)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    plt = try_pyplot()
    if plt is None:
        print("for the picture: pip install matplotlib, then run again")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for fam in dict.fromkeys(r["family"] for r in rows):
        pts = sorted((r for r in rows if r["family"] == fam), key=lambda r: r["inter_mb"])
        for ax, key in zip(axes, ("bleu", "loss")):
            ax.errorbar([r["inter_mb"] for r in pts], [r[key] for r in pts],
                        yerr=[0 if math.isnan(r[key + "_sd"]) else r[key + "_sd"] for r in pts],
                        marker="o", capsize=3, label=fam)
    axes[0].set(xlabel="inter-node MB per step (all ranks)", ylabel="BLEU (mean ± sd over seeds)", title="quality")
    axes[1].set(xlabel="inter-node MB per step (all ranks)", ylabel="teacher-forced valid loss", title="loss")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "sweep.png"), dpi=110)
    print(f"wrote {os.path.join(args.out, 'sweep.png')}")


# ----------------------------------------------------------------------------
# The teaching trace


def trace(args: argparse.Namespace, topo: sc.Topology, device: torch.device) -> None:
    """One MoE layer on a tiny batch: each token's tier, experts and ranks; bytes per link per tier."""
    d = 8
    n = args.experts // topo.world_size
    cfg = sc.MoEConfig(d_model=d, d_ffn=16, num_experts=args.experts,
                      capacity_factor=args.capacity_factor, ratio1=args.ratio1, ratio2=args.ratio2, feat_multiple=1)
    moe = args.moe
    layer = sc.make_moe_layer(moe, cfg, topo).to(device)
    torch.manual_seed(args.seed + topo.rank)
    x = torch.randn(10, d, device=device, requires_grad=True)  # (t, d): 10 tokens on every rank
    out = layer(x)
    out.y.square().mean().backward()

    rows = []
    for tier, info in out.tiers.items():
        tokens = info.tokens.tolist() if info.tokens is not None else list(range(x.shape[0]))
        r = info.routing
        if tier == "peers":  # node-limited routing's first hop: each token's node
            rows += [(topo.rank, tok, "peers", f"to node {j}{'' if kept else ' (dropped)'}")
                     for tok, j, kept in zip(tokens, r.expert[:, 0].tolist(), r.kept[:, 0].tolist())]
            continue
        if r.expert.shape[0] != len(tokens):  # its second hop routes the slots it received, not its tokens
            continue
        for i, tok in enumerate(tokens):
            experts = [info.first_expert + e for e in r.expert[i].tolist()]
            picks = [f"e{e}@r{e // n}{'' if kept else '(dropped)'} w={w:.2f}"
                     for e, kept, w in zip(experts, r.kept[i].tolist(), r.weight[i].tolist())]
            rows.append((topo.rank, tok, tier, ", ".join(picks)))
    ledger = {(tier, dirn, link): layer.ledger.total(link=link, direction=dirn, tag=tier)
              for tier in (*sc.TIERS, "peers") for dirn in ("forward", "backward") for link in sc.LINK_CLASSES}
    every = gather_objects((sorted(rows, key=lambda r: (r[1], r[2])), ledger))
    if topo.rank != 0:
        return
    print(f"{moe}: W={topo.world_size} ranks, {topo.num_nodes} node(s) x {topo.ranks_per_node}, "
          f"{cfg.num_experts} experts ({n} per rank), alpha={cfg.ratio1} beta={cfg.ratio2}")
    if moe == "feat":
        print(f"slice widths (local, node, global) = {layer.widths} of d_model={d}; every token goes to every tier")
    print(f"{'rank':>4} {'token':>5}  {'tier':<6}  experts (e<id>@r<rank>, combine weight)")
    for rank_rows, _ in every:
        for rank, tok, tier, picks in rank_rows:
            print(f"{rank:>4} {tok:>5}  {tier:<6}  {picks}")
    print("\nbytes handed to each link class, summed over ranks (each direction: to the experts and back)")
    print(f"{'tier':<6} {'direction':<9} " + " ".join(f"{link:>13}" for link in sc.LINK_CLASSES))
    for tier in (*sc.TIERS, "peers"):
        for dirn in ("forward", "backward"):
            total = [sum(led[tier, dirn, link] for _, led in every) for link in sc.LINK_CLASSES]
            if not any(total):
                continue
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


BENCH_KINDS = ("gshard", "node-limited", "seq", "feat", "cluster")  # the layers --bench times, GShard first


def _layer_step(kind: str, layer: nn.Module, x: Tensor):
    """One forward + backward of a layer (the clustering step: there and back), for timing."""
    x.grad = None
    if kind == "experts":
        y = layer(x)
    elif kind == "cluster":
        moved, plan = layer(x)
        y = sc.uncluster(moved, plan, layer.ledger)
    else:
        y = layer(x).y
    y.float().square().mean().backward()


def bench(args: argparse.Namespace, topo: sc.Topology, device: torch.device) -> None:
    """Time one MoE layer forward + backward per variant, with real all-to-alls and with local copies of the same
    shapes (compute only), interleaved rep by rep; the cost model predicts each variant's time on a stated cluster
    from its compute-only time and the ledger's bytes. --emulate NxG: rank 0 of that cluster, compute only."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.emulate:
        topo = sc.emulated_topology(*emulated_world(args.emulate))
    W, t, d = topo.world_size, args.bench_tokens, args.d_model
    cfg = moe_config(args)
    n = args.experts // W

    def make(kind: str, tp: sc.Topology) -> nn.Module:
        torch.manual_seed(args.seed)
        if kind == "cluster":
            return sc.TokenClustering(d, args.d_ffn, tp, route_to=cluster_route(args, tp)).to(device, dtype)
        return sc.make_moe_layer(kind, cfg, tp).to(device, dtype)

    kinds = BENCH_KINDS
    # with real collectives, each variant twice: as is, and with local copies; otherwise compute is all there is
    modes = (("real", topo), ("compute", topo.with_local_copies())) if W > 1 and not topo.local_copy \
        else (("compute", topo),)
    layers = {(kind, mode): make(kind, tp) for kind in kinds for mode, tp in modes}
    torch.manual_seed(args.seed + topo.rank)
    inputs = {key: torch.randn(t, d, device=device, dtype=dtype, requires_grad=True) for key in layers}
    # the expert GEMMs alone, on the buffer GShard's experts see: (n, W * C, d)
    capacity = sc.expert_capacity(t, cfg.num_experts, 2, cfg.capacity_factor)
    layers["experts", "compute"] = sc.Experts(n, d, args.d_ffn).to(device, dtype)
    inputs["experts", "compute"] = torch.randn(n, W * capacity, d, device=device, dtype=dtype,
                                               requires_grad=True)
    steps = {key: (lambda kind=key[0], layer=layer, x=inputs[key]: _layer_step(kind, layer, x))
             for key, layer in layers.items()}
    if args.compile:
        steps = {key: torch.compile(step) for key, step in steps.items()}
    times = {key: [] for key in layers}
    for rep in range(args.reps + 2):  # two warm-up rounds, then reps; the variants interleaved in each
        for key, layer in layers.items():
            if dist.is_initialized():
                dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            steps[key]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = all_max(time.perf_counter() - start, device)  # a layer is as slow as its slowest rank
            if rep >= 2:
                times[key].append(elapsed)
        if rep == 0:
            for key in layers:
                if key[0] != "experts":
                    layers[key].ledger.reset()
        if rep == 1:  # the bytes of exactly one step (the second warm-up), per rank
            one_step = {kind: layers[kind, modes[0][0]].ledger.by_link() for kind in kinds}
    if "real" not in {mode for mode, _ in modes}:
        times.update({(kind, "real"): times[kind, "compute"] for kind in kinds})
    # emulated: every rank sends what this one does
    every_rank = [one_step] * W if topo.local_copy and not dist.is_initialized() else gather_objects(one_step)
    profiles = {}
    if args.profile:
        for key in [(kind, modes[0][0]) for kind in kinds] + [("experts", "compute")]:
            profiles[key[0]], table = profile_step(steps[key], device)
            print0(f"--- profile of {key[0]} (rank 0), forward + backward\n{table}")
    if topo.rank == 0:
        report_bench(args, topo, cfg, dtype, device, times, every_rank, profiles)
    if dist.is_initialized():
        dist.barrier()
    if W == 1:
        bench_dispatch(args, cfg, device, dtype)


def emulated_world(text: str) -> tuple[int, int]:
    """--emulate NxG: (world size, ranks per node)."""
    nodes, per_node = (int(v) for v in text.lower().split("x"))
    return nodes * per_node, per_node


HOST_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def profile_step(step, device: torch.device) -> tuple[dict, str]:
    """One call of step under the profiler: on CUDA its kernels (copies and fills included), the host syncs
    inside it (a blocking copy or synchronize) and the GPU's busy time; and the table of the costliest ops."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    with torch.profiler.profile() as prof:
        with torch.profiler.record_function("bench step"):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    span = next(e.time_range for e in events if e.name == "bench step")
    inside = [e for e in events if span.start <= e.time_range.start <= span.end]
    gpu = sorted((e.time_range.start, e.time_range.end) for e in events
                 if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0, -math.inf  # the union of the GPU's intervals
    for s, f in gpu:
        busy, end = busy + max(0, f - max(s, end)), max(end, f)
    counts = {"kernels": len(gpu), "host_syncs": sum(e.name in HOST_SYNCS for e in inside),
              "gpu_busy_s": busy * 1e-6} if device.type == "cuda" else {}
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return counts, prof.key_averages().table(sort_by=sort_by, row_limit=12, max_name_column_width=40)


def all_max(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def link_load(per_rank: list[dict], G: int) -> tuple[int, int]:
    """The cost model's loads: bytes of the busiest rank inside its node, and of the busiest node's link (its
    ranks share it) to other nodes."""
    intra = max(b["intra_node"] for b in per_rank)
    inter = max(sum(b["inter_node"] for b in per_rank[s:s + G]) for s in range(0, len(per_rank), G))
    return intra, inter


def predict(compute_s: float, per_rank: list[dict], G: int, args: argparse.Namespace) -> float:
    """The cost model: compute-only time plus each link's load over its rate (intra-node: one rank's bytes over
    --gbps-intra-node; inter-node: one node's bytes over --gbps-inter-node). Latency and overlap are ignored."""
    intra, inter = link_load(per_rank, G)
    return compute_s + intra * 8 / (args.gbps_intra_node * 1e9) + inter * 8 / (args.gbps_inter_node * 1e9)


def break_even_gbps(compute: tuple[float, float], per_rank: tuple[list, list], G: int, gbps_intra: float):
    """The inter-node rate per node link (Gbit/s) below which a variant's predicted step beats GShard's, from
    (variant, GShard) compute times and per-rank bytes: where the inter-node bytes it saves cost as much as its
    extra compute and intra-node time. "any": it is faster at every rate; "never": at none."""
    (intra_v, inter_v), (intra_g, inter_g) = (link_load(p, G) for p in per_rank)
    saved_bits = (inter_g - inter_v) * 8
    extra_s = compute[0] - compute[1] + (intra_v - intra_g) * 8 / (gbps_intra * 1e9)
    if saved_bits < 0 and extra_s < 0:
        return f"above {saved_bits / extra_s / 1e9:.3g}"  # it sends more and computes less: wins on fast links
    if extra_s <= 0:
        return "any"
    return "never" if saved_bits <= 0 else saved_bits / extra_s / 1e9


def report_bench(args, topo, cfg, dtype, device, times, every_rank, profiles) -> None:
    med = {key: statistics.median(ts) for key, ts in times.items()}
    kinds, G = BENCH_KINDS, topo.ranks_per_node
    predicted = {k: predict(med[k, "compute"], [r[k] for r in every_rank], G, args) for k in kinds}
    gshard_bytes = [r["gshard"] for r in every_rank]
    rows = []
    for k in kinds:
        rows.append({
            "moe": k, "ratio1": cfg.ratio1, "ratio2": cfg.ratio2, "tokens_per_rank": args.bench_tokens,
            "d_model": cfg.d_model, "d_ffn": cfg.d_ffn, "experts": args.experts, "feat_hidden": cfg.feat_hidden,
            "world_size": topo.world_size, "ranks_per_node": G, "emulated": bool(args.emulate),
            "dtype": str(dtype).split(".")[1], "device": device.type, "compiled": args.compile, "reps": args.reps,
            "median_s": med[k, "real"], "min_s": min(times[k, "real"]), "compute_only_s": med[k, "compute"],
            "bytes_per_step": {link: sum(r[k][link] for r in every_rank) for link in sc.LINK_CLASSES},
            "speedup_vs_gshard": med["gshard", "real"] / med[k, "real"],
            "predicted_s": predicted[k], "predicted_speedup_vs_gshard": predicted["gshard"] / predicted[k],
            "gbps_intra_node": args.gbps_intra_node, "gbps_inter_node": args.gbps_inter_node,
            "break_even_gbps_inter_node": None if k in ("gshard", "cluster") else break_even_gbps(
                (med[k, "compute"], med["gshard", "compute"]), ([r[k] for r in every_rank], gshard_bytes), G,
                args.gbps_intra_node),
            **profiles.get(k, {}),
        })
    rows.append({"moe": "experts", "tokens_per_rank": args.bench_tokens, "d_model": cfg.d_model,
                 "median_s": med["experts", "compute"], "min_s": min(times["experts", "compute"]),
                 "reps": args.reps, "note": "the expert GEMMs alone, forward + backward, on GShard's buffer",
                 **profiles.get("experts", {})})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(rows, f, indent=1)
    where = f"rank 0 of {topo.num_nodes} x {G} emulated: compute only" if args.emulate else \
        f"{topo.world_size} ranks ({topo.num_nodes} node(s) x {G})"
    print(f"bench: {where}, {device.type} {rows[0]['dtype']}{' compiled' if args.compile else ''}, "
          f"{args.bench_tokens} tokens/rank, d={cfg.d_model}, d_ffn={cfg.d_ffn}, {cfg.num_experts} experts, ratios "
          f"({cfg.ratio1}, {cfg.ratio2}); median of {args.reps}; model: {args.gbps_intra_node} Gbit/s intra-node per "
          f"rank, {args.gbps_inter_node} Gbit/s per node link")
    print(f"{'variant':<13} {'median ms':>9} {'min ms':>8} {'compute':>8} {'comm':>8} {'MB dev':>7} {'node':>7} "
          f"{'inter':>7} {'speed-up':>8} {'pred ms':>8} {'pred s-up':>9} {'wins below':>11}")
    for r in rows[:-1]:
        mb = [r["bytes_per_step"][link] / 1e6 for link in sc.LINK_CLASSES]
        b = r["break_even_gbps_inter_node"]
        wins = "-" if b is None else b if isinstance(b, str) else f"{b:.3g} Gb/s"
        print(f"{r['moe']:<13} {1e3 * r['median_s']:>9.2f} {1e3 * r['min_s']:>8.2f} {1e3 * r['compute_only_s']:>8.2f} "
              f"{1e3 * (r['median_s'] - r['compute_only_s']):>8.2f} {mb[0]:>7.2f} {mb[1]:>7.2f} {mb[2]:>7.2f} "
              f"{r['speedup_vs_gshard']:>7.2f}x {1e3 * r['predicted_s']:>8.2f} "
              f"{r['predicted_speedup_vs_gshard']:>8.2f}x {wins:>11}")
    g = rows[0]
    gemms = rows[-1]['median_s']
    print(f"experts  {1e3 * gemms:>9.2f} ms: GShard's layer is {g['median_s'] / gemms:.2f}x "
          f"its expert GEMMs; communication is {100 * (1 - g['compute_only_s'] / g['median_s']):.0f}% of GShard's step")
    print("wins below: the inter-node Gbit/s per node link under which the variant's predicted step beats GShard's")
    if profiles and "kernels" in profiles["gshard"]:
        print(f"{'per step':<13} {'kernels':>8} {'host syncs':>10} {'GPU busy ms':>11}")
        for k, p in profiles.items():
            print(f"{k:<13} {p['kernels']:>8} {p['host_syncs']:>10} {1e3 * p['gpu_busy_s']:>11.2f}")
    print(f"wrote {os.path.join(args.out, 'bench.json')}")


def dense_dispatch_combine(x: Tensor, routing: sc.Routing, num_experts: int) -> Tensor:
    """fairseq-style GShard dispatch, the benchmark's baseline: a dense (S, E, C) combine tensor and
    dispatch mask, and two einsums (s tokens, e experts, c capacity, m model)."""
    t, k = routing.expert.shape
    c = routing.capacity
    combine_sec = x.new_zeros(t, num_experts, c)
    for i in range(k):  # einsum("se,sc->sec") of each choice, as fairseq's bmm
        expert = F.one_hot(routing.expert[:, i], num_experts).to(x.dtype) * routing.weight[:, i, None].to(x.dtype)
        slot = F.one_hot(routing.slot[:, i].clamp(max=c - 1), c).to(x.dtype)
        combine_sec = combine_sec + torch.bmm(expert.unsqueeze(-1), slot.unsqueeze(1))
    dispatch_mask = combine_sec.bool().to(x.dtype)
    dispatched = torch.einsum("sec,sm->ecm", dispatch_mask, x)  # (e, c, m)
    return torch.einsum("sec,ecm->sm", combine_sec, dispatched)  # (s, m): identity experts


def bench_dispatch(args: argparse.Namespace, cfg: sc.MoEConfig, device: torch.device, dtype: torch.dtype) -> None:
    """Index dispatch + combine against the dense einsum version, forward + backward, one process."""
    t, d, E = args.bench_tokens, cfg.d_model, cfg.num_experts
    torch.manual_seed(args.seed)
    x = torch.randn(t, d, device=device, dtype=dtype, requires_grad=True)
    logits = torch.randn(t, E, device=device, requires_grad=True)
    routing = sc.top2_gating(logits, sc.expert_capacity(t, E, 2, cfg.capacity_factor))

    def run(fn) -> float:
        def step():
            x.grad = logits.grad = None
            fn(x, routing, E).float().square().mean().backward(retain_graph=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return timed(step, args.reps)[0]

    dense = run(dense_dispatch_combine)
    index = run(lambda x, r, e: sc.combine(sc.dispatch(x, r, e), r))
    y1, y2 = dense_dispatch_combine(x, routing, E), sc.combine(sc.dispatch(x, routing, E), routing)
    torch.testing.assert_close(y1, y2, rtol=1e-2 if dtype == torch.bfloat16 else 1e-4, atol=1e-3)
    print(f"dispatch + combine, forward + backward, {t} tokens, {E} experts, d={d}, capacity "
          f"{routing.capacity}: dense einsum {1e3 * dense:.1f} ms, index {1e3 * index:.1f} ms: "
          f"index is {dense / index:.1f}x faster (median of {args.reps})")
    with open(os.path.join(args.out, "bench_dispatch.json"), "w") as f:
        json.dump({"tokens": t, "experts": E, "d_model": d, "capacity": routing.capacity, "dense_s": dense,
                   "index_s": index, "speedup": dense / index, "reps": args.reps}, f, indent=1)


def bench_assign(args: argparse.Namespace) -> None:
    """balanced_assignment against scipy's linear_sum_assignment on the expanded (T, T) matrix."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        sys.exit("--bench-assign compares against scipy: pip install scipy")
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    print(f"torch {torch.__version__}, {device.type}, {torch.get_num_threads()} threads; float32 standard-normal "
          f"scores; ours: median of {args.reps}, scipy (CPU): median of 3 (T <= 4096)")
    print("| T | C | ours (ms) | scipy (ms) | scipy / ours | gap (OPT - ours) / OPT | T*eps bound / OPT |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for T in [int(v) for v in args.assign_tokens.split(",")]:
        for C in [int(v) for v in args.assign_clusters.split(",")]:
            g = torch.Generator().manual_seed(1000 * T + C)
            scores = torch.randn(T, C, generator=g)  # (T, C)
            on_device = scores.to(device)
            ours, _, cluster = timed(lambda: sc.balanced_assignment(on_device).cpu(), args.reps)
            s64 = scores.double()
            got = float(s64[torch.arange(T), cluster].sum())
            row = f"| {T} | {C} | {ours * 1e3:.1f} |"
            if T <= 4096:
                expanded = np.repeat(s64.numpy(), T // C, axis=1)  # (T, T): cluster c repeated T / C times
                exact, _, (r, c) = timed(lambda: linear_sum_assignment(expanded, maximize=True), 3)
                opt = float(expanded[r, c].sum())
                bound = T * 1e-7 * float(s64.std())  # T * eps bounds the gap; the default eps is at most 1e-7 std
                row += f" {exact * 1e3:.0f} | {exact / ours:.1f}x | {(opt - got) / opt:.1e} | {bound / opt:.1e} |"
            else:
                row += " - | - | - | - |"
            print(row, flush=True)


# ----------------------------------------------------------------------------
# Command line and launch

COMMANDS = ("demo", "train", "sweep", "trace", "bench", "bench-assign")
STOPPED = 3  # the exit status of a run that stopped itself (a non-finite loss) after saying why
MOE_KINDS = ("dense", "gshard", "seq", "feat", "node-limited")
SWEEP_VARIANTS = ("dense", "gshard", "node-limited", "seq", "seq+cluster", "feat")


def _flags_task() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("task")
    g.add_argument("--languages", type=int, default=16, help="target languages (language pairs)")
    g.add_argument("--src-words", type=int, default=48, help="shared source vocabulary")
    g.add_argument("--train-pairs", type=int, default=8000, help="training sentence pairs (all languages)")
    g.add_argument("--seed", type=int, default=0, help="random seed (the task, initialisation, data order, dropout)")
    return p


def _flags_moe() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("MoE layers")
    g.add_argument("--experts", type=int, default=8, help="experts E in all (a multiple of the number of ranks)")
    g.add_argument("--capacity-factor", type=float, default=1.25, help="C = ceil(capacity_factor * 2 * tokens / E)")
    g.add_argument("--ratio1", type=float, default=0.25,
                   help="alpha: share of tokens (Seq) or of the width (Feat) kept on the device")
    g.add_argument("--ratio2", type=float, default=0.5, help="beta: share served inside the node")
    g.add_argument("--feat-multiple", type=int, default=8,
                   help="Feat slice widths are rounded down to a multiple of this (8 keeps GEMMs aligned; 1: exact)")
    g.add_argument("--feat-hidden", default="full", choices=["full", "proportional"],
                   help="Feat: each slice's FFN keeps d_ffn hidden units (full, the paper) or d_ffn x slice / d_model "
                        "(proportional: not in the paper; GShard's FLOPs)")
    g.add_argument("--batch-prioritized-routing", action="store_true",
                   help="the authors' option: within capacity, tokens with the highest top gate value take slots first")
    g.add_argument("--eval-capacity-token-fraction", type=float, default=None,
                   help="the authors' option: at evaluation, ceil(fraction x tokens) slots per expert (they use 0.5)")
    g.add_argument("--local-no-capacity", action="store_true",
                   help="the authors' option: the local tier (Seq, Feat) never drops a token")
    g.add_argument("--d-model", type=int, default=64, help="model width")
    g.add_argument("--d-ffn", type=int, default=128, help="hidden width of the dense FFNs and of every expert")
    return p


def _flags_training() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model and training")
    g.add_argument("--layers", type=int, default=6,
                   help="encoder layers and decoder layers (MoE in every other: an MoE variant needs >= 2, "
                        "with clustering >= 4)")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout")
    g.add_argument("--attention-dropout", type=float, default=None,
                   help="dropout of the attention weights (None: --dropout's); 0 lets PyTorch's attention take its "
                        "fast kernel on a CPU")
    g.add_argument("--aux-weight", type=float, default=0.01, help="weight of the load-balancing loss")
    g.add_argument("--cluster-gate", default="softmax", choices=["softmax", "sigmoid"],
                   help="clustering gate: softmax with differentiable sorting, or BASE layers' sigmoid")
    g.add_argument("--cluster-assign", default="balanced", choices=["balanced", "argmax"],
                   help="clustering: the balanced assignment, or each token to its best cluster (no balance; "
                        "needs --cluster-gate sigmoid, the only gate that trains the router without the sort)")
    g.add_argument("--decode-clustering", default=None, choices=["balanced", "argmax"],
                   help="the decoder's clustering when decoding (default: as --cluster-assign); argmax is the "
                        "authors' greedy inference option")
    g.add_argument("--steps", type=int, default=600, help="training steps per run")
    g.add_argument("--batch", type=int, default=128, help="sentences per step over all ranks (split evenly)")
    g.add_argument("--lr", type=float, default=5e-3, help="peak learning rate (Adam, inverse-sqrt schedule)")
    g.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing of the cross-entropy")
    g.add_argument("--eval-sentences", type=int, default=400, help="validation sentences decoded for BLEU")
    g.add_argument("--eval-every", type=int, default=0, help="also evaluate every this many steps (0: at the end)")
    g.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    g.add_argument("--ckpt-every", type=int, default=0, help="steps between checkpoints (0: none)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in --out (refused if there is none, or if it "
                        "was written with other settings)")
    g.add_argument("--resume-or-start", action="store_true",
                   help="as --resume, but start afresh when there is no complete checkpoint (torchrun restarts)")
    g.add_argument("--overwrite", action="store_true",
                   help="delete the checkpoints already in --out of the variants this run trains, and start afresh "
                        "(without it a fresh run into a folder with checkpoints is refused)")
    g.add_argument("--compile", action="store_true",
                   help="run the model's forward through torch.compile (dynamic shapes; the MoE layers' host-side "
                        "token counts break the graph)")
    g.add_argument("--out", default="out",
                   help="folder for results, plots and checkpoints; each run adds results-NNNN.json and copies it "
                        "to results.json (the newest)")
    return p


def _flags_cost() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("cost model (a stated cluster)")
    g.add_argument("--gbps-intra-node", type=float, default=50.0,
                   help="Gbit/s one rank sends to the other ranks of its node")
    g.add_argument("--gbps-inter-node", type=float, default=1.0,
                   help="Gbit/s one node's link carries to other nodes (shared by its ranks)")
    return p


def _flags_processes() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("processes")
    g.add_argument("--nproc", type=int, default=4, help="CPU processes to spawn when not under torchrun")
    g.add_argument("--threads", action=argparse.BooleanOptionalAction, default=False,
                   help="run the --nproc ranks as threads of one process on one device (a GPU, or the CPU), not as "
                        "processes: the same model, data and training (train, demo, sweep); dropout masks come "
                        "from one random stream, not one per rank (the demo's default, unless torchrun started it)")
    g.add_argument("--ranks-per-node", type=int, default=None,
                   help="ranks per (emulated) node; default 2 when spawning, LOCAL_WORLD_SIZE under torchrun")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA under torchrun when available, else CPU")
    g.add_argument("--backend", default="auto", choices=["auto", "nccl", "gloo"],
                   help="auto: NCCL on CUDA, gloo on CPU; gloo on CUDA stages collectives through host memory "
                        "(several ranks on one GPU, which NCCL refuses)")
    g.add_argument("--timeout", type=float, default=300.0,
                   help="seconds before a collective that cannot complete fails")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    # fresh parent parsers for every command: set_defaults on one command must not change another's
    task, moe, training, cost, procs = _flags_task, _flags_moe, _flags_training, _flags_cost, _flags_processes
    fmt = argparse.ArgumentDefaultsHelpFormatter

    demo = sub.add_parser("demo", parents=[task(), moe(), training(), cost(), procs()], formatter_class=fmt,
                          help="(default) the classroom demo: GShard, Seq, Feat, Seq + clustering",
                          description="Train each variant at one locality point on a small task that it learns "
                                      "within the budget (2 languages, 4 + 4 layers, 325 steps: about 5 minutes on "
                                      "2 cores, the 4 ranks as threads of one process), then compare quality, bytes "
                                      "per link, each rank's traffic, and the step time predicted on a stated "
                                      "cluster.")
    demo.add_argument_group("demo").add_argument(
        "--variants", default="gshard,seq,feat,seq+cluster",
        help=f"comma-separated, from {','.join(SWEEP_VARIANTS)} (Seq and Feat at --ratio1, --ratio2)")
    demo.set_defaults(steps=325, languages=2, src_words=24, train_pairs=4000, layers=4, attention_dropout=0.0,
                      threads=None, fail_at_step=None, nan_at_step=None)

    train = sub.add_parser("train", parents=[task(), moe(), training(), cost(), procs()], formatter_class=fmt,
                           help="train one variant", description="Train one variant and evaluate it.")
    g = train.add_argument_group("variant")
    g.add_argument("--moe", default="gshard", choices=MOE_KINDS, help="the FFN of every other layer")
    g.add_argument("--token-cluster", action="store_true", help="cluster tokens at the first MoE layer")
    g.add_argument("--reorder-layers", action="store_true",
                   help="the clustering layer order (attention first, MoE FFNs last) without clustering")
    g.add_argument("--fail-at-step", type=int, default=None,
                   help="testing restarts: rank 1 exits at this step on the first attempt (torchrun restarts it)")
    g.add_argument("--nan-at-step", type=int, default=None,
                   help="testing: this step's loss is made not finite (the run must stop there, exit 3)")

    sweep = sub.add_parser("sweep", parents=[task(), moe(), training(), procs()], formatter_class=fmt,
                           help="quality against inter-node bytes: variants x locality points x seeds",
                           description="Train every (variant, point, seed) not yet in <out>/runs (resumable), "
                                       "then write the table (with each variant's gap to GShard beside twice "
                                       "the seed standard deviation) and, with matplotlib, the picture.")
    g = sweep.add_argument_group("sweep")
    g.add_argument("--variants", default=",".join(SWEEP_VARIANTS),
                   help=f"comma-separated, from {','.join(SWEEP_VARIANTS)}")
    g.add_argument("--points", default="0.125:0.375,0.25:0.5,0.5:0.375",
                   help="ratio1:ratio2 pairs of Seq, Seq + clustering and Feat, comma-separated")
    g.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    g.add_argument("--report-only", action="store_true", help="write the table and picture of the runs done so far")
    sweep.set_defaults(out="sweep", eval_every=200, fail_at_step=None, nan_at_step=None)

    trace = sub.add_parser("trace", parents=[moe(), procs()], formatter_class=fmt,
                           help="each token's tier, experts and ranks in one MoE layer; bytes per link")
    trace.add_argument("--moe", default="seq", choices=MOE_KINDS[1:], help="the layer to trace")
    trace.add_argument("--seed", type=int, default=0, help="random seed of the tokens")

    bench = sub.add_parser("bench", parents=[moe(), cost(), procs()], formatter_class=fmt,
                           help="time one MoE layer per variant, with real all-to-alls and compute only")
    g = bench.add_argument_group("benchmark")
    g.add_argument("--bench-tokens", type=int, default=2048, help="tokens per rank")
    g.add_argument("--reps", type=int, default=15, help="timed repetitions per case (after two warm-ups)")
    g.add_argument("--profile", action="store_true",
                   help="per variant: kernels, host syncs and GPU busy time of one step (CUDA), costliest ops")
    g.add_argument("--emulate", metavar="NxG", help="time rank 0 of N nodes x G ranks in one process, every "
                   "collective a local copy (compute only; bytes as a real run's, every rank like rank 0)")
    g.add_argument("--compile", action="store_true", help="run each layer through torch.compile")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--seed", type=int, default=0, help="random seed of the weights and tokens")
    g.add_argument("--out", default="out", help="folder for bench.json")
    bench.set_defaults(d_model=256, d_ffn=256)

    assign = sub.add_parser("bench-assign", formatter_class=fmt,
                            help="time balanced_assignment against scipy's exact solver (needs scipy), one process")
    assign.add_argument("--assign-tokens", default="1024,4096,16384", help="token counts T")
    assign.add_argument("--assign-clusters", default="8,16,32", help="cluster counts C")
    assign.add_argument("--reps", type=int, default=7, help="timed repetitions per case")
    assign.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the auction runs")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; without a command (or with only flags) it is the demo."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["demo", *argv]
    p = build_parser()
    args = p.parse_args(argv)
    if args.command == "demo" and args.threads is None:
        args.threads = "RANK" not in os.environ
    check_args(args, p._subparsers._group_actions[0].choices[args.command])
    return args


def world_and_rpn(args: argparse.Namespace) -> tuple[int, int]:
    """The number of ranks and ranks per node of this launch: checked before any process starts, and the
    topology each rank builds."""
    under_torchrun = "RANK" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if under_torchrun else args.nproc
    rpn = args.ranks_per_node
    if rpn is None:
        rpn = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if under_torchrun else min(2, world)
    return world, rpn


def check_args(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    """Reject bad values before any process starts: each message names the flag and the fix."""
    a = vars(args)
    for name, value in a.items():
        if isinstance(value, float) and not math.isfinite(value):
            p.error(f"--{name.replace('_', '-')} {value}: must be a finite number")
    for name in ("experts", "d_model", "d_ffn", "layers", "steps", "batch", "warmup", "log_every", "bench_tokens",
                 "reps", "eval_sentences", "feat_multiple", "languages", "src_words", "train_pairs", "nproc"):
        if name in a and a[name] < 1:
            p.error(f"--{name.replace('_', '-')} {a[name]}: must be at least 1")
    for name in ("seed", "ckpt_every", "eval_every"):
        if name in a and a[name] < 0:
            p.error(f"--{name.replace('_', '-')} {a[name]}: must be at least 0")
    if args.command == "bench-assign":
        try:
            sizes = [(int(T), int(C)) for T in args.assign_tokens.split(",") for C in args.assign_clusters.split(",")]
        except ValueError:
            p.error(f"--assign-tokens {args.assign_tokens!r} and --assign-clusters {args.assign_clusters!r} "
                    f"must be comma-separated integers")
        if any(C < 1 or T < C or T % C for T, C in sizes):
            p.error("--assign-tokens must be multiples of every --assign-clusters value (and at least as large)")
        if args.device == "cuda" and not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is visible; use --device cpu")
        return
    world, rpn = world_and_rpn(args)
    if a.get("emulate"):
        if not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", args.emulate.lower()):
            p.error(f"--emulate {args.emulate!r}: give nodes x ranks per node, e.g. 2x8")
        if world != 1:
            p.error(f"--emulate {args.emulate} runs in one process, not {world}: add --nproc 1 (or launch torchrun "
                    f"with --nproc_per_node=1)")
        world, rpn = emulated_world(args.emulate)
    if rpn < 1 or world % rpn != 0:
        p.error(f"--ranks-per-node {rpn} does not divide the {world} ranks: every node holds the same number of ranks")
    if args.timeout <= 0:
        p.error(f"--timeout {args.timeout:g}: must be > 0 seconds")
    if args.d_model % 4 != 0:
        p.error(f"--d-model {args.d_model}: must be divisible by the 4 attention heads")
    if "gbps_inter_node" in a and (args.gbps_intra_node <= 0 or args.gbps_inter_node <= 0):
        p.error("--gbps-intra-node and --gbps-inter-node must be > 0")
    if args.experts % world != 0:
        p.error(f"--experts {args.experts} is not a multiple of the {world} ranks: every rank holds E / W experts")
    if "steps" in a:  # a training command
        if args.batch % world != 0:
            p.error(f"--batch {args.batch} does not split evenly over {world} ranks: use a multiple of {world}")
        if args.batch > args.train_pairs:
            p.error(f"--batch {args.batch} exceeds the {args.train_pairs} training pairs (--train-pairs)")
        if not 0 <= args.dropout < 1 or not 0 <= (args.attention_dropout or 0) < 1 or args.lr <= 0 or \
                args.aux_weight < 0:
            p.error(f"need 0 <= --dropout < 1 (got {args.dropout}), 0 <= --attention-dropout < 1 (got "
                    f"{args.attention_dropout}), --lr > 0 (got {args.lr}), --aux-weight >= 0 (got {args.aux_weight})")
        if not 0 <= args.label_smoothing < 1:
            p.error(f"--label-smoothing {args.label_smoothing}: must lie in [0, 1)")
    if args.command == "train":
        if args.reorder_layers and args.moe == "dense":
            p.error("--reorder-layers needs an MoE variant (--moe gshard|seq|feat|node-limited)")
        if args.token_cluster and (args.moe == "dense" or args.layers < 4):
            p.error("--token-cluster needs --layers >= 4 (the clustering layer and at least one MoE layer after "
                    "it) and an MoE variant")
    clustered = args.command in ("demo", "sweep") or a.get("token_cluster")  # the demo and sweep hold clustering
    if a.get("cluster_assign") == "argmax" and not (clustered and args.cluster_gate == "sigmoid"):
        p.error("--cluster-assign argmax needs --token-cluster and --cluster-gate sigmoid (with the softmax gate "
                "only the differentiable sort trains the clustering router)")
    try:
        for variant in variants(args, p):
            if "steps" in a:
                check_plan(args, variant, p)
            cfg = moe_config(variant.apply(args))
            if variant.moe == "feat" or args.command == "bench":
                sc.feat_widths(cfg, world // rpn)
    except ValueError as e:
        p.error(str(e))
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible; use --device cpu")
    if args.backend == "nccl" and args.device != "cuda" and not ("RANK" in os.environ and torch.cuda.is_available()):
        p.error("--backend nccl needs CUDA tensors: add --device cuda and launch with torchrun")
    if a.get("threads") and (args.command not in ("train", "demo", "sweep") or "RANK" in os.environ):
        p.error("--threads runs the ranks of train, demo or sweep as threads of one process: use it with one of "
                "them, and without torchrun")
    if a.get("threads") and a.get("compile"):
        p.error("--compile cannot trace the threads of --threads: pass one of them")
    if args.device == "cuda" and "RANK" not in os.environ and args.nproc > 1 and not a.get("threads"):
        p.error("--device cuda with several processes: launch with torchrun (spawned processes run on the CPU), or "
                "add --threads to run the ranks as threads of one process on the GPU")
    if "out" in a:  # last: a command line refused above creates no folder
        check_writable(args.out, "--out", p)
        if a.get("ckpt_every"):
            check_writable(os.path.join(args.out, "ckpt"), f"--ckpt-every {args.ckpt_every}: the checkpoint folder", p)
    if "resume" in a:
        check_checkpoints(args, p)


def check_plan(args: argparse.Namespace, variant: Variant, p: argparse.ArgumentParser) -> None:
    """An MoE variant must hold an MoE layer (with clustering: one after the clustering layer), as
    layer_plan places them; otherwise it would train a model other than the one it names."""
    def has_moe(layers: int) -> bool:
        return all("moe" in layer_plan(layers, variant.moe, variant.token_cluster, decoder, variant.reorder)
                   for decoder in (False, True))
    if variant.moe != "dense" and not has_moe(args.layers):
        need = next(n for n in range(1, 64) if has_moe(n))
        after = " after its clustering layer" if variant.token_cluster else ""
        p.error(f"--layers {args.layers}: {variant.name} would hold no MoE layer{after} (MoE sits in every other "
                f"layer); use --layers >= {need}")


def check_checkpoints(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    """Before any process starts, for every run this command trains: without --resume, refuse a folder that
    already holds checkpoints (unless --overwrite); with it, find the newest complete step (skipping, with
    a message, a step without its manifest or with a file that fails its sha256), refuse it if it was
    written with other settings or beyond --steps, and record it in args.resume_from for the workers."""
    resume = args.resume or args.resume_or_start
    if resume and args.overwrite:
        p.error("--overwrite deletes the checkpoints that --resume would continue from: pass one of them")
    world, rpn = world_and_rpn(args)
    say = os.environ.get("RANK", "0") == "0"  # under torchrun every rank checks; one speaks
    args.resume_from = {}
    for run_args, variant in checkpoint_runs(args):
        root = ckpt_dir(run_args, variant)
        if not resume:
            if not args.overwrite and os.path.isdir(root) and any(n.startswith("step") for n in os.listdir(root)):
                p.error(f"{root} holds checkpoints of an earlier run: add --resume to continue it, or --overwrite "
                        f"to delete them and start afresh")
            continue
        found, skipped = newest_checkpoint(root)
        for why in skipped if say else []:
            print(f"--resume: skipping {why}", file=sys.stderr, flush=True)
        if found is None:
            if not args.resume_or_start:
                p.error(f"--resume: no complete checkpoint in {root}; use --resume-or-start to start afresh when "
                        f"there is none")
            if say:
                print(f"--resume-or-start: no complete checkpoint in {root}: starting afresh", file=sys.stderr)
            continue
        now, then = fingerprint(run_args, variant, world, rpn), found["fingerprint"]
        if diff := [f"{k} {now.get(k, 'not given')} (checkpoint: {then.get(k, 'not given')})"
                    for k in {**now, **then} if then.get(k) != now.get(k)]:
            p.error(f"--resume: {manifest_path(root, found['step'])} was written with other settings: "
                    f"{', '.join(diff)}; pass the checkpoint's values, or use another --out")
        if args.steps < found["step"]:
            p.error(f"--steps {args.steps} is below the checkpoint's step {found['step']} ({found['dir']}): "
                    f"use --steps >= {found['step']}")
        args.resume_from[root] = found["dir"]


def check_writable(folder: str, what: str, p: argparse.ArgumentParser) -> None:
    """Create `folder` and prove it writable (write and remove a probe file): a run must not fail at
    its first save, after hours of training."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        p.error(f"{what} {folder} is a file, not a folder: choose another --out")
    probe = os.path.join(folder, f".write-probe-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w") as f:
            f.write("probe")
        os.remove(probe)
    except OSError as e:
        p.error(f"{what} {folder} cannot be created or written ({e.strerror}): choose another --out")


def parse_points(text: str, p: argparse.ArgumentParser) -> list[tuple[float, float]]:
    try:
        points = [tuple(float(v) for v in pair.split(":")) for pair in text.split(",")]
    except ValueError:
        p.error(f"--points {text!r}: write ratio1:ratio2 pairs, e.g. 0.25:0.5,0.5:0.375")
    if any(len(pt) != 2 for pt in points):
        p.error(f"--points {text!r}: write ratio1:ratio2 pairs, e.g. 0.25:0.5,0.5:0.375")
    return points


def variants(args: argparse.Namespace, p: Optional[argparse.ArgumentParser] = None) -> list[Variant]:
    """The variants a command trains (the demo's and the sweep's at their locality points)."""
    if args.command == "train":
        return [Variant(args.moe, args.token_cluster, args.cluster_gate, args.reorder_layers, args.cluster_assign)]
    if args.command in ("demo", "sweep"):  # the demo's Seq and Feat at --ratio1, --ratio2; the sweep's at --points
        p = p or argparse.ArgumentParser()
        names = args.variants.split(",")
        if bad := [n for n in names if n not in SWEEP_VARIANTS]:
            p.error(f"--variants: unknown {', '.join(bad)}; choose from {','.join(SWEEP_VARIANTS)}")
        points = parse_points(args.points, p) if args.command == "sweep" else [None]
        out = []
        for name in names:
            moe, cluster = name.split("+")[0], name.endswith("+cluster")
            out += [Variant(moe, cluster, point=pt) for pt in points] if moe in ("seq", "feat") else [Variant(moe)]
        return out
    return [Variant(args.moe)] if args.command == "trace" else [Variant(k) for k in ("gshard", "seq", "feat")]


def sweep_seeds(args: argparse.Namespace) -> list[int]:
    return [int(v) for v in args.seeds.split(",")]


def run_file(args: argparse.Namespace, variant: Variant, seed: int) -> str:
    return os.path.join(args.out, "runs", f"{variant.name}_seed{seed}.json")


def sweep_run_args(args: argparse.Namespace, seed: int) -> argparse.Namespace:
    """One seed of the sweep: its own checkpoint folder."""
    return argparse.Namespace(**{**vars(args), "seed": seed, "out": os.path.join(args.out, "ckpt", f"seed{seed}")})


def checkpoint_runs(args: argparse.Namespace) -> list[tuple[argparse.Namespace, Variant]]:
    """(arguments, variant) of every training run this command will do; its checkpoints are in ckpt_dir."""
    if args.command == "sweep":
        return [] if args.report_only else [
            (sweep_run_args(args, seed), v) for seed in sweep_seeds(args) for v in variants(args)
            if not os.path.exists(run_file(args, v, seed))]
    return [(args, v) for v in variants(args)] if args.command in ("train", "demo") else []


def run(args: argparse.Namespace, topo: sc.Topology, device: torch.device) -> None:
    if args.command == "trace":
        return trace(args, topo, device)
    if args.command == "bench":
        return bench(args, topo, device)
    if args.command == "sweep":  # every rank sees the same finished runs: none is written before the barrier
        todo = [(v, seed) for seed in sweep_seeds(args) for v in variants(args)
                if not os.path.exists(run_file(args, v, seed))]
        if dist.is_initialized():
            dist.barrier()
        for variant, seed in todo:
            run_args = sweep_run_args(args, seed)
            result = train_variant(run_args, variant, make_task(task_config(run_args)), topo, device)
            if topo.rank == 0:
                os.makedirs(os.path.dirname(run_file(args, variant, seed)), exist_ok=True)
                with open(run_file(args, variant, seed) + ".tmp", "w") as f:
                    json.dump(result, f, indent=1)
                os.replace(run_file(args, variant, seed) + ".tmp", run_file(args, variant, seed))
        if topo.rank == 0:
            sweep_report(args)
        return
    task = make_task(task_config(args))
    results = []
    for variant in variants(args):
        result = train_variant(args, variant, task, topo, device)
        if topo.rank == 0:
            results.append(result)
            print0(f"[{variant.name}] BLEU {result['bleu']:.1f}, exact match {result['exact_match']:.2f}, "
                   f"teacher-forced valid loss {result['valid_loss']:.3f} and token accuracy "
                   f"{result['valid_accuracy']:.3f}; "
                   f"e.g. {result['example']['hyp']!r} for {result['example']['ref']!r}")
    if topo.rank == 0:
        report(results, args)


def task_config(args: argparse.Namespace) -> TaskConfig:
    return TaskConfig(seed=args.seed, languages=args.languages, src_words=args.src_words, train=args.train_pairs)


def init_distributed(args: argparse.Namespace, rank: int, world: int,
                     port: Optional[int]) -> tuple[sc.Topology, torch.device]:
    """Join the process group (gloo on CPU, NCCL on CUDA) and build the topology explicitly."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and port is None and torch.cuda.is_available())
    if use_cuda:
        gpu = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        torch.cuda.set_device(gpu)
        device = torch.device("cuda", gpu)
    else:
        device = torch.device("cpu")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if port is None else world
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if world > 1:
        timeout = timedelta(seconds=args.timeout)
        if port is not None:  # spawned: rank 0 hosts the store on the free port
            store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timeout)
        else:  # torchrun: its store, under a prefix per restart, so that a restarted job never reads
            # the addresses that its previous attempt left there
            agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                  is_master=not agent and rank == 0, timeout=timeout)
            store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        backend = args.backend if args.backend != "auto" else "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return sc.build_topology(1 if args.threads else world_and_rpn(args)[1]), device


def inject_fault(args: argparse.Namespace, step: int, topo: sc.Topology, model: nn.Module) -> None:
    """The testing hooks of `train`, before the step after `step` steps. --fail-at-step S (restarts): rank 1
    exits at step S on torchrun's first attempt. --nan-at-step S: the last rank's final decoder LayerNorm
    becomes NaN (after every MoE and clustering layer), so that the S-th step's loss (the log's "step S") is
    not finite."""
    if args.nan_at_step == step + 1 and topo.rank == topo.world_size - 1:
        with torch.no_grad():
            model.decoder.norm.weight.fill_(float("nan"))
    if args.fail_at_step == step and topo.rank == min(1, topo.world_size - 1) \
            and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) == 0:
        print(f"rank {topo.rank}: exiting at step {step} (--fail-at-step)", flush=True)
        os._exit(1)


def die_with_launcher(launcher: int) -> None:
    """A spawned rank ends when its launcher dies, however it dies (SIGKILL included). torch's own
    parent-death signal is SIGINT, which a launcher started with SIGINT ignored (a background job of a
    script) passes on ignored: so SIGKILL from the kernel on Linux, a thread watching the parent elsewhere."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    else:
        def watch() -> None:
            while os.getppid() == launcher:
                time.sleep(0.5)
            os._exit(1)
        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != launcher:  # it died before the lines above
        os._exit(1)


def _worker(rank: int, args: argparse.Namespace, world: int, port: Optional[int],
            launcher: Optional[int] = None) -> None:
    if launcher is not None:
        die_with_launcher(launcher)
    topo, device = init_distributed(args, rank, world, port)
    try:
        run(args, topo, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(args: argparse.Namespace) -> None:
    """Under torchrun: this process is one rank. Otherwise spawn --nproc CPU ranks on a free local port."""
    if vars(args).get("overwrite") and os.environ.get("RANK", "0") == "0":  # before any rank can save
        for root in [ckpt_dir(*run) for run in checkpoint_runs(args) if os.path.isdir(ckpt_dir(*run))]:
            try:
                shutil.rmtree(root)
            except OSError as e:  # left in place, its steps would mix with this run's
                sys.exit(f"--overwrite: cannot delete {root} ({e.strerror}): delete it yourself, or use another --out")
    if "RANK" in os.environ:
        _worker(int(os.environ["RANK"]), args, int(os.environ["WORLD_SIZE"]), None)
    elif args.nproc == 1 or args.threads:
        _worker(0, args, 1, None)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            mp.spawn(_worker, args=(args, args.nproc, port, os.getpid()), nprocs=args.nproc, join=True)
        except mp.ProcessExitedException as e:  # a rank stopped the run (it said why) or was killed
            if e.exit_code != STOPPED:
                print(f"train_toy.py: {e}", file=sys.stderr)
            sys.exit(e.exit_code if e.exit_code > 0 else 1)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.command == "bench-assign":
        bench_assign(arguments)
    elif arguments.command == "sweep" and arguments.report_only:
        sweep_report(arguments)
    else:
        launch(arguments)
