"""Why does stage 3's discriminator sit at chance? Separability of the predictor's next state from the model's.

    OMP_NUM_THREADS=1 python benchmarks/gan_diagnosis.py \
        --model_dir outputs/restricted_meanflow/export --predictor_dir outputs/predictor_gan_nogan/export \
        --data_dir data/digits --num_pairs 256 --out /tmp/gan_diagnosis.json

Real / fake pairs come from the stage-3 module's own code path (`PredictorGANModule.sample_pairs`,
`predict_velocity`, `next_features`): real = the frozen model's next-state velocity u* = M(x_t', r', t'),
fake = the trained predictor's u = P(C, x_t', r', t'), both on the same (x0, eps, t, Delta). Each row of
the table then varies ONE thing against the baseline (today's training: D on the DiT's features of
x_t'' = x_t' - (t' - r') u, feature layers of the config, Adam lr 1e-2, 64 channels, Delta_max 0.2):

  view      x_next    F(x_t'') at (r', r' - (t' - r'))                 (today's D input)
            x0        F(x0_hat) at (0, 0), x0_hat = x_t' - t' u          (the error scaled by t', not t' - r')
            residual  u - u_reuse patchified to the token grid, no DiT   (u_reuse = head(C, vec): the
                      training-free reuse, the same for real and fake; only the correction is left)
  layers    which DiT blocks feed D (views x_next / x0)
  lr, channels        D's Adam learning rate and head width
  delta_max           the cache distance of the pairs
  scale k             fake = u* + k (u - u*): how large must the predictor's error be before D sees it

Per row: D trained ALONE on fixed pairs (`--d_steps` hinge steps on the first half of the pairs; patch
accuracy on the held-out half, as `train/d_accuracy` counts it), and a logistic-regression probe on
per-sample token statistics (mean and std of every channel of every layer): its held-out accuracy on
single samples (what D must do) and on pairs (is real scored above its own fake: a paired D's task).
Error sizes: ||u - u*|| / ||u*||, the same for the reuse, the offset of x_t'' and of the features
relative to the spread between samples.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.latent_video import LatentVideoDataModule, batch_text  # noqa: E402
from lightning_modules.predictor_gan import PredictorGANModule  # noqa: E402
from losses.flow import expand_time  # noqa: E402
from losses.gan import discriminator_accuracy, hinge_d_loss  # noqa: E402
from models.discriminator import Discriminator, dit_features, patchify  # noqa: E402
from models.io import load_backbone  # noqa: E402
from models.predictor import ReusePredictor, embed_tokens, load_predictor  # noqa: E402
from sampling.cached import CachedVelocity, paper_schedule  # noqa: E402
from sampling.sampler import ModelVelocity, sample, time_grid  # noqa: E402

VIEWS = ("x_next", "x0", "residual")


@dataclass(frozen=True)
class Row:
    """One discriminator setting; every field not named in `name` is the baseline's."""

    name: str
    view: str = "x_next"
    layers: tuple[int, ...] = (1, 3)
    lr: float = 1e-2
    channels: int = 64
    delta_max: float = 0.2
    scale: float = 1.0
    gain: float = 1.0  # Discriminator(gain=): its input times this, raising the spectral-norm Lipschitz bound


def default_rows(num_blocks: int, layers: tuple[int, ...]) -> list[Row]:
    """The baseline and one change at a time."""
    base = Row("baseline (today)", layers=layers)
    rows = [base, replace(base, name="lr 1e-3", lr=1e-3), replace(base, name="lr 1e-4", lr=1e-4),
            replace(base, name="channels 256", channels=256)]
    rows += [replace(base, name=f"layer {i}", layers=(i,)) for i in (0, num_blocks - 1) if (i,) != layers]
    rows += [replace(base, name="view x0", view="x0"), replace(base, name="view residual", view="residual"),
             replace(base, name="delta_max 0.5", delta_max=0.5), replace(base, name="error x4", scale=4.0),
             replace(base, name="input gain 10", gain=10.0),
             replace(base, name="residual, lr 1e-3", view="residual", lr=1e-3),
             replace(base, name="residual, gain 10", view="residual", gain=10.0)]
    return rows


def build_module(model: torch.nn.Module, predictor: torch.nn.Module, delta_max: float, restrict: float) -> \
        PredictorGANModule:
    """A stage-3 module around the trained pieces, extracting every block's features (rows pick theirs)."""
    module = PredictorGANModule(model, predictor=predictor.config, delta_max=delta_max, restrict=restrict,
                                discriminator={"feature_layers": list(range(model.num_blocks))})
    module.predictor.load_state_dict(predictor.state_dict())
    return module.eval()


@torch.no_grad()
def collect_pairs(module: PredictorGANModule, batches: list[dict], seed: int = 0) -> list[dict]:
    """Per batch: the module's own draws (times, x_t', cache, target u*), the predictor's u and the reuse's."""
    out = []
    for i, batch in enumerate(batches):
        text = batch_text(batch)
        s = module.sample_pairs(batch["latents"], text, torch.Generator().manual_seed(seed + i))
        s["fake"] = module.predict_velocity(s, text)
        s["reuse"] = module.predict_velocity(s, text, ReusePredictor())
        s["text"] = text
        out.append(s)
    return out


@torch.no_grad()
def d_inputs(module: PredictorGANModule, s: dict, u: Tensor, view: str) -> tuple[list[Tensor], tuple[int, int, int]]:
    """What D sees for velocity u under `view`: a list of (B, N, C) token maps and the patch grid."""
    if view == "x_next":  # today's path, every block (module built with all layers)
        return module.next_features(s, u, s["text"])
    if view == "x0":
        x0 = s["x_tp"] - expand_time(s["tp"], u) * u
        zero = torch.zeros_like(s["tp"])
        return dit_features(module.model, x0, zero, s["text"], zero, s["g"], module.feature_layers)
    if view == "residual":  # = PredictorGANModule.next_features with discriminator input 'residual'
        grid = embed_tokens(module.model, s["x_tp"], s["text"], s["tp"]).grid
        return [patchify(u - s["reuse"], grid)], grid
    raise ValueError(f"view {view!r} not in {VIEWS}")


def view_tensors(module: PredictorGANModule, pairs: list[dict], view: str, scale: float = 1.0) -> dict:
    """Real and fake D inputs of all pairs, concatenated over batches: {real: [L x (P, N, C)], fake, grid}."""
    real, fake, grid = [], [], None
    for s in pairs:
        u = s["target"] + scale * (s["fake"] - s["target"])
        r_feats, grid = d_inputs(module, s, s["target"], view)
        f_feats, _ = d_inputs(module, s, u, view)
        real.append(r_feats)
        fake.append(f_feats)
    cat = lambda parts: [torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))]  # noqa: E731
    return {"real": cat(real), "fake": cat(fake), "grid": grid}


def select_layers(view: str, feats: list[Tensor], layers: tuple[int, ...]) -> list[Tensor]:
    return feats if view == "residual" else [feats[i] for i in layers]


def error_sizes(pairs: list[dict]) -> dict:
    """Global norm ratios over all pairs (rms of the difference / rms of the reference)."""
    cat = lambda k: torch.cat([s[k] for s in pairs]).float()  # noqa: E731
    u, ut, ur, x_tp = cat("fake"), cat("target"), cat("reuse"), cat("x_tp")
    dt = expand_time(torch.cat([s["tp"] - s["rp"] for s in pairs]), u)
    tp = expand_time(torch.cat([s["tp"] for s in pairs]), u)
    rel = lambda a, b: (a.norm() / b.norm()).item()  # noqa: E731
    return {"pairs": u.shape[0], "mse_pred": (u - ut).pow(2).mean().item(), "mse_reuse": (ur - ut).pow(2).mean().item(),
            "err_pred_rel": rel(u - ut, ut), "err_reuse_rel": rel(ur - ut, ut),
            "err_pred_vs_true_correction": rel(u - ut, ut - ur),
            "correction_energy": rel(u - ur, ut - ur),  # < 1: the predictor's corrections are shrunk (MSE's mean)
            "dt_mean": dt.mean().item(), "x_next_offset_rel": rel(dt * (u - ut), x_tp - dt * ut),
            "x0_offset_rel": rel(tp * (u - ut), x_tp - tp * ut)}


def feature_offset(real: list[Tensor], fake: list[Tensor]) -> dict:
    """How far a fake's D input is from its own real one, relative and absolute (all layers together).

    relative: rms ||F(fake) - F(real)|| / rms ||F(real) - mean F(real)|| (the spread between samples);
    per token: rms over tokens of the vector norm of the offset and of the real token, the scale that a
    spectral-normed (Lipschitz-bounded) head turns into at most a proportional logit gap."""
    off = sum((f - r).pow(2).sum().item() for r, f in zip(real, fake))
    spread = sum((r - r.mean(0, keepdim=True)).pow(2).sum().item() for r in real)
    tokens = sum(r.shape[0] * r.shape[1] for r in real)
    norm = sum(r.pow(2).sum().item() for r in real)
    return {"feature_offset": math.sqrt(off / max(spread, 1e-30)), "token_offset_norm": math.sqrt(off / tokens),
            "token_norm": math.sqrt(norm / tokens)}


def split_indices(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: n // 2], perm[n // 2:]


def train_discriminator(real: list[Tensor], fake: list[Tensor], grid: tuple[int, int, int], train_idx: Tensor,
                        test_idx: Tensor, *, lr: float = 1e-2, channels: int = 64, scales: tuple[int, ...] = (1, 2),
                        gain: float = 1.0, steps: int = 200, batch: int = 16, betas: tuple[float, float] = (0.5, 0.999),
                        seed: int = 0) -> dict:
    """Train models.discriminator.Discriminator alone with Eq. 7's hinge loss on fixed pairs (real and fake
    of the same samples in each batch, as in training); its accuracy on the held-out pairs."""
    torch.manual_seed(seed)
    d = Discriminator(real[0].shape[-1], len(real), scales, channels, gain)
    opt = torch.optim.Adam(d.parameters(), lr=lr, betas=betas)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = train_idx[torch.randint(len(train_idx), (batch,), generator=gen)]
        loss = hinge_d_loss(d([f[idx] for f in real], grid), d([f[idx] for f in fake], grid))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def evaluate(idx: Tensor) -> dict:
        rl, fl = d([f[idx] for f in real], grid), d([f[idx] for f in fake], grid)
        return {"acc": discriminator_accuracy(rl, fl).item(), "L_D": hinge_d_loss(rl, fl).item(),
                "logit_gap": (rl.mean() - fl.mean()).item(), "logit_std": torch.cat([rl, fl]).std().item()}

    d.eval()
    train, test = evaluate(train_idx), evaluate(test_idx)
    return {"d_train_acc": train["acc"], "d_test_acc": test["acc"], "d_test_L_D": test["L_D"],
            "d_test_logit_gap": test["logit_gap"], "d_test_logit_std": test["logit_std"]}


def token_statistics(feats: list[Tensor]) -> Tensor:
    """(P, 2 * sum C): per-sample mean and std over tokens of every channel of every layer."""
    return torch.cat([torch.cat([f.mean(1), f.std(1)], dim=1) for f in feats], dim=1)


def positive(x: Tensor) -> Tensor:
    """1 where x > 0, 0.5 on ties (a probe that learned nothing scores chance, not 0)."""
    return (x > 0).double() + 0.5 * (x == 0).double()


def linear_probe(real: list[Tensor], fake: list[Tensor], train_idx: Tensor, test_idx: Tensor,
                 weight_decay: float = 1e-3, iters: int = 100) -> dict:
    """Logistic regression real vs fake on token statistics; held-out accuracy per sample and per pair."""
    xr, xf = token_statistics(real).double(), token_statistics(fake).double()
    mean = torch.cat([xr[train_idx], xf[train_idx]]).mean(0)
    std = torch.cat([xr[train_idx], xf[train_idx]]).std(0).clamp(min=1e-8)
    xr, xf = (xr - mean) / std, (xf - mean) / std
    x = torch.cat([xr[train_idx], xf[train_idx]])
    y = torch.cat([torch.ones(len(train_idx)), torch.zeros(len(train_idx))]).double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        sr, sf = xr[test_idx] @ w + b, xf[test_idx] @ w + b
        return {"probe_test_acc": ((positive(sr).mean() + positive(-sf).mean()) / 2).item(),
                "probe_paired_acc": positive(sr - sf).mean().item()}


def evaluate_rows(module: PredictorGANModule, batches: list[dict], rows: list[Row], *, d_steps: int = 200,
                  d_batch: int = 16, seed: int = 0, log=print) -> tuple[dict, list[dict]]:
    """Error sizes of the module's pairs and one result dict per row (pairs and views computed once each)."""
    base_delta = module.hparams.delta_max  # error sizes at the module's own Delta_max even with no rows
    pair_sets: dict[float, list[dict]] = {base_delta: collect_pairs(module, batches, seed)}
    views: dict[tuple, dict] = {}
    results = []
    for row in rows:
        if row.view not in VIEWS:
            raise ValueError(f"row {row.name!r}: view {row.view!r} not in {VIEWS}")
        if row.delta_max not in pair_sets:
            module.hparams.delta_max = row.delta_max
            pair_sets[row.delta_max] = collect_pairs(module, batches, seed)
        key = (row.delta_max, row.view, row.scale)
        if key not in views:
            views[key] = view_tensors(module, pair_sets[row.delta_max], row.view, row.scale)
        v = views[key]
        real, fake = select_layers(row.view, v["real"], row.layers), select_layers(row.view, v["fake"], row.layers)
        train_idx, test_idx = split_indices(real[0].shape[0], seed)
        start = time.perf_counter()
        res = {**asdict(row), **feature_offset(real, fake),
               **linear_probe(real, fake, train_idx, test_idx),
               **train_discriminator(real, fake, v["grid"], train_idx, test_idx, lr=row.lr, channels=row.channels,
                                     gain=row.gain, steps=d_steps, batch=d_batch, seed=seed),
               "seconds": time.perf_counter() - start}
        log(json.dumps(res))
        results.append(res)
    module.hparams.delta_max = base_delta
    sizes = {dm: error_sizes(p) for dm, p in pair_sets.items()}
    return sizes, results


@torch.no_grad()
def cached_sample_error(model: torch.nn.Module, predictor: torch.nn.Module, batches: list[dict], *,
                        interval: int = 4, num_steps: int = 20, guidance: float = 4.0, seed: int = 0) -> dict:
    """DisCa sampling (the paper's N-interval schedule) against the same model sampled without the cache, same
    noise and prompts: mean squared distance of the final latents, for `predictor` and for the reuse."""
    grid, schedule = time_grid(num_steps), paper_schedule(interval, num_steps)
    err: dict[str, list[Tensor]] = {"predictor": [], "reuse": []}
    for i, batch in enumerate(batches):
        text = batch_text(batch)
        noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(seed + i))
        full = sample(ModelVelocity(model, text, mode="meanflow", guidance=guidance), noise, grid)
        for name, p in (("predictor", predictor), ("reuse", ReusePredictor())):
            cached = sample(CachedVelocity(model, p, text, schedule, guidance=guidance), noise, grid)
            err[name].append((cached - full).pow(2).flatten(1).mean(1))
    return {f"sample_mse_{k}": torch.cat(v).mean().item() for k, v in err.items()}


def markdown_table(results: list[dict]) -> str:
    head = ("| row | view | layers | D lr | ch | Δmax | error × | gain | offset / spread | token offset / norm | "
            "D train acc | D held-out acc | D held-out L_D | D logit gap | probe acc | probe paired acc |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        layers = "-" if r["view"] == "residual" else ",".join(map(str, r["layers"]))
        lines.append(f"| {r['name']} | {r['view']} | {layers} | {r['lr']:g} | {r['channels']} | {r['delta_max']:g} | "
                     f"{r['scale']:g} | {r['gain']:g} | {r['feature_offset']:.4f} | "
                     f"{r['token_offset_norm']:.3g} / {r['token_norm']:.3g} | {r['d_train_acc']:.3f} | "
                     f"{r['d_test_acc']:.3f} | {r['d_test_L_D']:.3f} | {r['d_test_logit_gap']:.3g} | "
                     f"{r['probe_test_acc']:.3f} | {r['probe_paired_acc']:.3f} |")
    return "\n".join(lines)


def load_batches(data_dir: str, split: str, num_pairs: int, batch_size: int) -> list[dict]:
    dm = LatentVideoDataModule(data_dir, batch_size=batch_size, val_batch_size=batch_size, shuffle=False,
                               verify_checksums=False)
    loader = dm.val_dataloader() if split == "val" else dm.train_dataloader()
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) * batch_size >= num_pairs:
            return out
    raise ValueError(f"split {split!r} of {data_dir} has fewer than {num_pairs} samples")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_dir", required=True, help="the stage-2 export (M, also D's feature network)")
    p.add_argument("--predictor_dir", required=True, help="a stage-3 predictor export trained for that model")
    p.add_argument("--data_dir", required=True)
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--num_pairs", type=int, default=256, help="pairs; half train D and the probe, half test")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--restrict", type=float, default=0.2, help="R of the stage-2 model")
    p.add_argument("--layers", type=int, nargs="+", default=[1, 3], help="the baseline's feature layers")
    p.add_argument("--d_steps", type=int, default=200)
    p.add_argument("--d_batch", type=int, default=16)
    p.add_argument("--rows", nargs="*", default=None, help="names of default rows to run (default: all)")
    p.add_argument("--sample_batches", type=int, default=0,
                   help="also sample this many batches with DisCa (N=4, 20 steps) and without the cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.num_pairs < 4 or args.num_pairs % args.batch_size:
        raise ValueError(f"--num_pairs must be a multiple of --batch_size ({args.batch_size}) and >= 4, "
                         f"got {args.num_pairs}")
    start = time.perf_counter()
    model = load_backbone(args.model_dir)
    module = build_module(model, load_predictor(args.predictor_dir, model), 0.2, args.restrict)
    rows = default_rows(model.num_blocks, tuple(args.layers))
    if args.rows is not None:
        unknown = sorted(set(args.rows) - {r.name for r in rows})
        if unknown:
            raise ValueError(f"unknown rows {unknown}; the rows are {[r.name for r in rows]}")
        rows = [r for r in rows if r.name in args.rows]
    batches = load_batches(args.data_dir, args.split, args.num_pairs, args.batch_size)
    sizes, results = evaluate_rows(module, batches, rows, d_steps=args.d_steps, d_batch=args.d_batch,
                                   seed=args.seed, log=lambda s: print(s, flush=True))
    report = {"args": vars(args), "error_sizes": sizes, "rows": results}
    if args.sample_batches:
        report["cached_sampling"] = cached_sample_error(model, module.predictor, batches[: args.sample_batches],
                                                        seed=args.seed)
        print(json.dumps(report["cached_sampling"]))
    report["seconds"] = time.perf_counter() - start
    print(json.dumps(sizes, indent=1))
    print(markdown_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
