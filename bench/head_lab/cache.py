"""Cached-target lab for GENIE head architectures: exact d eps/d gamma targets + U-Net features.

    ulimit -v 12000000; nice -n 10 .venv/bin/python bench/head_lab/cache.py --split test --n 512 --resume
    ... --split traj --n 256 --resume          # states of a 10-step DDIM (logSNR grid) trajectory
    ... --split train --n 2560 --resume        # chunks of 256, resumable

Per sample (float16, except t / label): x_t, t, label, eps, target (exact JVP, `jvp_deps`), temb,
and the U-Net decoder features: f32 (last 32 px decoder block = the shipped head's `features`,
32 ch), f16 (last 16 px decoder block, 64 ch), f8 (last 8 px decoder block incl. attention, 64 ch),
mid (bottleneck after mid ResBlock-Attn-ResBlock, 64 ch at 8 px). The bundled network has
ch_mult (1, 2, 2): 32 / 16 / 8 px, no 4 px level. Chunks: runs/head_lab/cache/<split>_<k>.pt.

Labels: the real label with prob 0.5, else the null class (as distillation). t ~ U[t_end, 1].
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "runs" / "head_lab" / "cache"
CHUNK = 256
FEATS = ("f32", "f16", "f8", "mid")


def load_model():
    from genie_fast.models import load_default
    m = load_default().float().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def attach_taps(unet):
    """Hooks on the module producing each level's output (ModuleLists are not called themselves)."""
    from genie_fast.models.unet import ResBlock
    out, handles, up = {}, [], list(unet.up)
    groups, cur = [], []
    for i, b in enumerate(up):
        if isinstance(b[0], ResBlock):
            cur.append(i)
        else:
            groups.append(cur)
            cur = []
    groups.append(cur)
    res = unet.config.image_size // 2 ** (len(unet.config.ch_mult) - 1)
    names = {}
    for g in groups:
        names[f"f{res}"] = up[g[-1]][-1]   # last module (ResBlock or AttnBlock) of the level's last block
        res *= 2
    names["mid"] = unet.mid[-1]

    def mk(n):
        def fn(module, inp, o):
            out[n] = o
        return fn
    for n, mod in names.items():
        handles.append(mod.register_forward_hook(mk(n)))
    return out, handles


def compute(model, x_t, t, labels, taps):
    """One batch: dict of float16 tensors (x_t, eps, target, temb, features) + t, label."""
    from genie_fast.distill import jvp_deps
    unet = model.unet
    with torch.no_grad():
        eps, feats, temb = unet(x_t, t, labels=labels, return_features=True)
        got = {k: v.clone() for k, v in taps.items()}
    assert torch.equal(got["f32"], feats), "32 px tap is not the head's feature map"
    _, target = jvp_deps(lambda a, tt: unet(a, tt, labels=labels), x_t, t, model.schedule, eps=eps)
    d = {"x_t": x_t, "eps": eps, "target": target, "temb": temb, **{k: got[k] for k in FEATS}}
    d = {k: v.to(torch.float16) for k, v in d.items()}
    d["t"], d["label"] = t.float(), labels
    return d


def draw_fwd(split, k, model, n):
    """Forward-process points of chunk k: deterministic per (split, chunk)."""
    from genie_fast.data import load_fashion_mnist
    from genie_fast.schedule import q_sample
    x, y = load_fashion_mnist("train" if split == "train" else "test")
    g = torch.Generator().manual_seed((1000 if split == "train" else 2000) + k)
    idx = torch.randint(0, len(x), (n,), generator=g)
    x0, lab = x[idx].float(), y[idx].long()
    K = model.unet.config.num_classes
    lab = torch.where(torch.rand(n, generator=g) < 0.5, lab, torch.full_like(lab, K))
    x_t, t, _ = q_sample(x0, model.schedule, g, None)
    return x_t, t.float(), lab


def draw_traj(model, n, nfe=10, seed=3000):
    """States a 10-step DDIM on a uniform logSNR grid visits (t = 1 .. before t_end): n // nfe noises."""
    s = model.schedule
    m = math.ceil(n / nfe)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, 1, 32, 32, generator=g)
    K = model.unet.config.num_classes
    lab = torch.where(torch.arange(m) % 2 == 0, torch.randint(0, K, (m,), generator=g), torch.full((m,), K))
    lam = torch.linspace(float(s.log_snr(torch.tensor(1.0, dtype=torch.float64))),
                         float(s.log_snr(torch.tensor(s.t_end, dtype=torch.float64))), nfe + 1, dtype=torch.float64)
    ts = s.t_of_log_snr(lam)
    xs, tt, ll = [], [], []
    x = z.clone()
    with torch.no_grad():
        for i in range(nfe):
            t = torch.full((m,), float(ts[i]))
            xs.append(x.clone()), tt.append(t), ll.append(lab)
            eps = model.unet(x, t, labels=lab)
            g0, g1 = s.gamma(ts[i]), s.gamma(ts[i + 1])
            xbar = x.double() * math.sqrt(1 + float(g0) ** 2) + (float(g1) - float(g0)) * eps.double()
            x = (xbar / math.sqrt(1 + float(g1) ** 2)).float()
    return torch.cat(xs)[:n], torch.cat(tt)[:n], torch.cat(ll)[:n]


EXTRA = ("e32a", "e32b", "e32c")


def attach_extra_taps(unet):
    """The other 32 px activations the last decoder block reads: e32a = conv_in output (its skip),
    e32b = the encoder's 32 px ResBlock output (skip of the first 32 px decoder block), e32c = the
    first 32 px decoder block's output (the last block's main input)."""
    from genie_fast.models.unet import ResBlock
    out, up = {}, list(unet.up)
    i32 = [i for i, b in enumerate(up) if isinstance(b[0], ResBlock)][-2]
    mods = {"e32a": unet.conv_in, "e32b": unet.down[0][-1], "e32c": up[i32][-1]}

    def mk(n):
        def fn(module, inp, o):
            out[n] = o
        return fn
    return out, [m.register_forward_hook(mk(n)) for n, m in mods.items()]


def build_extra(model, split, n, batch=64):
    """Forward-only pass over the same (deterministic) draws as the cached chunks: <split>_<k>_extra.pt."""
    taps, _ = attach_extra_taps(model.unet)
    traj = draw_traj(model, n) if split == "traj" else None
    for k in range(math.ceil(n / CHUNK)):
        path = CACHE / f"{split}_{k}_extra.pt"
        if path.exists():
            continue
        base = torch.load(CACHE / f"{split}_{k}.pt")
        nk = len(base["t"])
        x_t, t, lab = draw_fwd(split, k, model, nk) if traj is None else (v[k * CHUNK:k * CHUNK + nk] for v in traj)
        assert torch.equal(t.float(), base["t"]) and torch.equal(lab, base["label"]), "draws differ from the cache"
        assert (x_t.half() - base["x_t"]).abs().max() < 1e-2
        parts = []
        with torch.no_grad():
            for i in range(0, nk, batch):
                model.unet(x_t[i:i + batch], t[i:i + batch], labels=lab[i:i + batch])
                parts.append({e: taps[e].to(torch.float16) for e in EXTRA})
        d = {e: torch.cat([q[e] for q in parts]) for e in EXTRA}
        torch.save(d, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
        print(f"saved {path}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--extra", action="store_true", help="only the extra 32 px activations of existing chunks")
    p.add_argument("--split", choices=["train", "test", "traj"], required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    CACHE.mkdir(parents=True, exist_ok=True)
    model = load_model()
    if a.extra:
        return build_extra(model, a.split, a.n, a.batch)
    taps, _ = attach_taps(model.unet)
    n_chunks = math.ceil(a.n / CHUNK)
    traj = draw_traj(model, a.n) if a.split == "traj" else None
    t_start = time.time()
    for k in range(n_chunks):
        path = CACHE / f"{a.split}_{k}.pt"
        if path.exists() and a.resume:
            continue
        nk = min(CHUNK, a.n - k * CHUNK)
        if traj is None:
            x_t, t, lab = draw_fwd(a.split, k, model, nk)
        else:
            x_t, t, lab = (v[k * CHUNK:k * CHUNK + nk] for v in traj)
        parts = []
        for i in range(0, nk, a.batch):
            parts.append(compute(model, x_t[i:i + a.batch], t[i:i + a.batch], lab[i:i + a.batch], taps))
            print(f"{a.split} chunk {k}: {i + a.batch}/{nk}  {time.time() - t_start:.0f}s", flush=True)
        d = {key: torch.cat([q[key] for q in parts]) for key in parts[0]}
        tmp = path.with_suffix(".tmp")
        torch.save(d, tmp)
        tmp.rename(path)
        nbytes = sum(v.numel() * v.element_size() for v in d.values())
        print(f"saved {path} ({nbytes / nk / 1e3:.1f} kB/sample)", flush=True)


if __name__ == "__main__":
    main()
