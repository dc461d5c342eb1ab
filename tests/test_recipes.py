"""The recipe pages (docs/recipes/) run as a reader's script, give what an independent computation
gives, move the way the page says, and give the single-process values on 2 gloo processes.

Each page's ``python`` blocks are written to a file and run as ``__main__`` once per session (a
module fixture); the checks then recompute the metrics by hand from the page's model and data,
without hooks, collections or metric classes (separate clean/transformed forwards instead of a
super-batch, submodules swapped instead of hooks, numpy for the statistics).
"""

from __future__ import annotations

import ast
import math
import runpy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from metrics_suite.testing import run_distributed
from tests import recipes_ddp

transformers = pytest.importorskip("transformers")

PAGES = {page.stem: page for page in sorted(recipes_ddp.RECIPES.glob("*.md"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[str, Any]]]:
    """Every recipe run once as ``python recipe.py`` would, on one thread (as each DDP rank runs)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise the forwards of a rank of run_distributed
    out = {}
    try:
        for name, page in PAGES.items():
            folder = tmp_path_factory.mktemp(name)
            script = folder / f"{name.replace('-', '_')}.py"
            script.write_text(recipes_ddp.recipe_script(page))
            mp.chdir(folder)
            torch.manual_seed(0)
            out[name] = runpy.run_path(str(script), run_name="__main__")
        yield out
    finally:
        torch.set_num_threads(threads)
        mp.undo()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_recipe_pages_are_in_the_nav() -> None:
    nav = (recipes_ddp.RECIPES.parents[1] / "mkdocs.yml").read_text()
    assert set(PAGES) == {"privacy-transform", "sae-splice", "vit-intervention"}
    for name in PAGES:
        assert f"recipes/{name}.md" in nav


def test_core_package_never_imports_transformers() -> None:
    package = Path(__file__).resolve().parents[1] / "metrics_suite"
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.split(".")[0] == "transformers" for n in names), path


# ---------------------------------------------------------------------------------- privacy transform
def test_privacy_transform_metrics_grow_with_sigma(runs: dict[str, dict[str, Any]]) -> None:
    results = runs["privacy-transform"]["results"]
    sigmas = sorted(results)
    for key in (
        "utility/next_token/jensen_shannon",
        "utility/next_token/total_variation",
        "noise/noise/noise_domination_ratio",
        "reconstruction/changed_tokens/token_rate",
    ):
        values = [results[s][key] for s in sigmas]
        assert values == sorted(values), (key, values)
        assert values[-1] > values[0], (key, values)
    assert results[sigmas[-1]]["reconstruction/changed_tokens/token_rate"] > 0.5


def test_privacy_transform_matches_separate_forwards(runs: dict[str, dict[str, Any]]) -> None:
    ns = runs["privacy-transform"]
    model, sigma = ns["model"], 0.4
    assert sigma in ns["results"]
    table = _np(ns["embedding_table"])
    scale = float(torch.tensor(sigma).log().exp())  # the transform stores log sigma in float32
    js_per_sequence, ce, ratios, changed = [], [], [], []
    with torch.no_grad():
        for index, batch in enumerate(ns["batches"]):
            ids, mask = batch["input_ids"], batch["attention_mask"]
            noise_mask = mask.clone()
            noise_mask[:, 0] = False
            embeddings = model.get_input_embeddings()(ids)
            eps = torch.randn(embeddings.shape, generator=torch.Generator().manual_seed(1000 + index))
            noisy_embeddings = embeddings + noise_mask[..., None] * scale * eps
            clean = _log_softmax(_np(model(input_ids=ids, attention_mask=mask).logits))
            noisy = _log_softmax(_np(model(inputs_embeds=noisy_embeddings, attention_mask=mask).logits))
            p, q = np.exp(clean), np.exp(noisy)
            m = np.log((p + q) / 2)
            js = 0.5 * (p * (clean - m)).sum(-1) + 0.5 * (q * (noisy - m)).sum(-1)
            mask_np, noise_np = mask.numpy(), noise_mask.numpy()
            js_per_sequence += [js[b][mask_np[b]].mean() for b in range(len(ids)) if mask_np[b].any()]
            targets = ids[:, 1:].numpy()
            picked = np.take_along_axis(noisy[:, :-1], targets[..., None], -1)[..., 0]
            ce += list(-picked[mask_np[:, 1:]])
            x, shift = _np(embeddings), _np(noisy_embeddings - embeddings)
            ratios += list((np.linalg.norm(shift, axis=-1) / np.linalg.norm(x, axis=-1))[noise_np])
            distances = ((_np(noisy_embeddings)[..., None, :] - table) ** 2).sum(-1)
            changed += list((distances.argmin(-1) != ids.numpy())[noise_np])
    got = ns["results"][sigma]
    assert got["utility/next_token/jensen_shannon"] == pytest.approx(np.mean(js_per_sequence), rel=1e-4)
    assert got["utility/cross_entropy/cross_entropy"] == pytest.approx(np.mean(ce), rel=1e-5)
    assert got["noise/noise/noise_domination_ratio"] == pytest.approx(np.mean(ratios), rel=1e-5)
    assert got["reconstruction/changed_tokens/token_rate"] == pytest.approx(np.mean(changed), abs=1e-12)


# ---------------------------------------------------------------------------------- SAE splice
class _Spliced(torch.nn.Module):
    """A decoder layer whose output goes through ``fn`` (a module swap: no hooks)."""

    def __init__(self, layer: torch.nn.Module, fn: Any) -> None:
        super().__init__()
        self.layer, self.fn = layer, fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.layer(*args, **kwargs))


def _logits_with(model: Any, layer: int, fn: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    original = model.model.layers[layer]
    model.model.layers[layer] = _Spliced(original, fn)
    try:
        return model(**batch).logits
    finally:
        model.model.layers[layer] = original


def test_sae_splice_matches_module_swap(runs: dict[str, dict[str, Any]]) -> None:
    ns = runs["sae-splice"]
    model, saes, results = ns["model"], ns["saes"], ns["results"]
    losses: dict[str, list[np.ndarray]] = {"clean": [], "spliced": [], "zero": []}
    vectors: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {layer: [] for layer in saes}
    kl_spliced: dict[int, list[np.ndarray]] = {layer: [] for layer in saes}

    def token_losses(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> np.ndarray:
        logp = _log_softmax(_np(logits[:, :-1]))
        picked = np.take_along_axis(logp, batch["input_ids"][:, 1:].numpy()[..., None], -1)[..., 0]
        return -picked[batch["attention_mask"][:, 1:].numpy()]

    with torch.no_grad():
        for batch in ns["batches"]:
            out = model(**batch, output_hidden_states=True)
            losses["clean"].append(token_losses(out.logits, batch))
            spliced, zero = [], []
            for layer, sae in saes.items():
                spliced_logits = _logits_with(model, layer, sae, batch)
                spliced.append(token_losses(spliced_logits, batch))
                logp, logq = (_log_softmax(_np(x[:, :-1])) for x in (out.logits, spliced_logits))
                kl_spliced[layer].append(
                    (np.exp(logp) * (logp - logq)).sum(-1)[batch["attention_mask"][:, 1:].numpy()]
                )
                zero.append(token_losses(_logits_with(model, layer, torch.zeros_like, batch), batch))
                # hidden_states[0] is the embedding output, [layer + 1] the output of decoder layer `layer`
                h = out.hidden_states[layer + 1][batch["attention_mask"]]
                vectors[layer].append((_np(h), _np(sae(h)), _np(sae.encode(h))))
            losses["spliced"].append(np.stack(spliced, -1))
            losses["zero"].append(np.stack(zero, -1))
    clean = np.concatenate(losses["clean"]).sum()
    spliced_sum, zero_sum = np.concatenate(losses["spliced"]).sum(0), np.concatenate(losses["zero"]).sum(0)
    for c in range(len(saes)):
        score = (zero_sum[c] - spliced_sum[c]) / (zero_sum[c] - clean)
        assert results[f"reconstruction/reconstruction_score/component_{c}"] == pytest.approx(score, rel=1e-5)
        # the seed relation: the downstream metric's ce_score is the reconstruction score of the same losses
        layer = list(saes)[c]
        assert results[f"layer{layer}/downstream/ce_score"] == pytest.approx(score, rel=1e-5)
    # one ActivationReconstruction and one FeatureSparsity hold both SAEs: component c is LAYERS[c]
    explained_per_sae = []
    for c, rows in enumerate(vectors.values()):
        h, rec, feats = (np.concatenate(part) for part in zip(*rows))
        activations, sparsity = "reconstruction/activations", "reconstruction/feature_sparsity"
        explained = 1 - ((rec - h) ** 2).sum() / ((h - h.mean(0)) ** 2).sum()
        cosine = ((rec * h).sum(-1) / np.linalg.norm(rec, axis=-1) / np.linalg.norm(h, axis=-1)).mean()
        l2_ratio = (np.linalg.norm(rec, axis=-1) / np.linalg.norm(h, axis=-1)).mean()
        assert results[f"{activations}/explained_variance/component_{c}"] == pytest.approx(
            explained, rel=1e-5
        )
        assert results[f"{activations}/cosine_similarity/component_{c}"] == pytest.approx(cosine, rel=1e-5)
        assert results[f"{activations}/l2_ratio/component_{c}"] == pytest.approx(l2_ratio, rel=1e-5)
        assert results[f"{sparsity}/l0/component_{c}"] == pytest.approx((feats != 0).sum(-1).mean())
        assert results[f"{sparsity}/l1/component_{c}"] == pytest.approx(
            np.abs(feats).sum(-1).mean(), rel=1e-5
        )
        frequency = (feats != 0).mean(0)
        assert results[f"{sparsity}/dead_fraction@0/component_{c}"] == pytest.approx((frequency == 0).mean())
        counts, _ = np.histogram(np.log10(frequency[frequency > 0]), bins=np.arange(-8, 1))
        histogram = [results[f"{sparsity}/density_histogram/component_{c}/bin_{i}"] for i in range(9)]
        assert histogram == [(frequency == 0).sum(), *counts]
        assert 0.0 < explained < 1.0
        explained_per_sae.append(explained)
    assert explained_per_sae[0] != pytest.approx(explained_per_sae[1], rel=1e-3)  # a swap would show
    for layer in saes:
        kl = np.concatenate(kl_spliced[layer]).mean()  # KL(clean ‖ spliced), token mean
        assert results[f"layer{layer}/downstream/kl_spliced"] == pytest.approx(kl, rel=1e-5)


# ---------------------------------------------------------------------------------- ViT intervention
def test_vit_intervention_matches_manual_counts(runs: dict[str, dict[str, Any]]) -> None:
    ns = runs["vit-intervention"]
    vit, classifier, layer, patch = ns["vit"], ns["classifier"], ns["LAYER"], ns["PATCH"]
    scale = ns["rows"][-1].intervention_scale
    edit = ns["clamp_feature"](ns["FEATURE"], scale * ns["PEAK"])
    counts = np.zeros((3, 3), dtype=np.int64)
    with torch.no_grad():
        for images, labels in ns["batches"]:
            original = classifier(vit(pixel_values=images).last_hidden_state[:, 1:]).argmax(-1).numpy()
            block = vit.layers[layer]
            vit.layers[layer] = _Spliced(block, edit)
            try:
                intervened = classifier(vit(pixel_values=images).last_hidden_state[:, 1:]).argmax(-1).numpy()
            finally:
                vit.layers[layer] = block
            n, h, w = labels.shape
            for i in range(n):
                for pr in range(h // patch):
                    for pc in range(w // patch):
                        pixels = labels[i, pr * patch : (pr + 1) * patch, pc * patch : (pc + 1) * patch]
                        if np.bincount(pixels.flatten().numpy()).max() >= 0.75 * patch * patch:
                            index = pr * (w // patch) + pc
                            counts[original[i, index], intervened[i, index]] += 1
    row = ns["rows"][-1]
    changed = counts.sum() - np.trace(counts)
    assert row.num_items == counts.sum()
    assert row.target_change == pytest.approx(changed / counts.sum(), abs=1e-12)
    assert 0 < changed < counts.sum()
    for result in ns["metric"].class_results():  # the page's last metric: the last value
        c = result.class_id
        assert (result.n_orig, result.n_changed) == (counts[c].sum(), counts[c].sum() - counts[c, c])
    header, *csv_rows = ns["ms"].PredictionChangeReport.csv_header(), *(r.to_csv_row() for r in ns["rows"])
    assert header.split(",")[:3] == ["method", "intervention_scale", "num_items"]
    assert csv_rows[-1].split(",")[1:3] == [str(scale), str(row.num_items)]


def _at_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of ``t`` that starts ``offset`` elements into a fresh buffer (another memory alignment)."""
    buffer = torch.empty(t.numel() + offset, dtype=t.dtype)
    return buffer[offset:].view(t.shape).copy_(t)


def test_vit_classifier_fit_is_the_same_at_every_memory_alignment(runs: dict[str, dict[str, Any]]) -> None:
    """Regression: the page fitted its classifier with ``torch.linalg.lstsq`` on LayerNorm'd tokens, whose
    features sum to 0 (a rank-deficient system, condition number ~2e7); LAPACK's answer then moved
    (entries by up to 1.6, 5 of 672 predictions) with the alignment of the input buffer, which
    differs between processes, so each DDP rank had its own classifier. The page's fit line, run on
    copies of its inputs at 16 alignments, must give one solution."""
    ns = runs["vit-intervention"]
    script = recipes_ddp.recipe_script(PAGES["vit-intervention"])
    (line,) = [code.strip() for code in script.splitlines() if code.strip().startswith("solution = ")]
    solutions = []
    for offset in range(16):
        scope = {
            **ns,
            **{name: _at_offset(ns[name], offset) for name in ("tokens", "x", "targets") if name in ns},
        }
        exec(line, scope)
        solutions.append(scope["solution"])
    assert all(torch.equal(s, solutions[0]) for s in solutions), [
        float((s - solutions[0]).abs().max()) for s in solutions
    ]


# ---------------------------------------------------------------------------------- DDP
def _same(a: Any, b: Any, where: str = "") -> list[str]:
    """Differences between two nested results; floats up to float64 rounding of a sum's order."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in _same(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _same(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        ok = (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)
        return [] if ok else [f"{where}: {a!r} != {b!r}"]
    return [] if a == b and type(a) is type(b) else [f"{where}: {a!r} != {b!r}"]


def test_recipes_under_ddp_give_the_single_process_values(
    runs: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scripts = {name: recipes_ddp.recipe_script(page) for name, page in PAGES.items()}
    per_rank = run_distributed(recipes_ddp.run_recipes, 2, scripts, timeout=600)
    for rank, values in enumerate(per_rank):
        for name, ns in runs.items():
            single = recipes_ddp.recipe_values(name, ns)
            assert not _same(values[name], single), (rank, name, _same(values[name], single)[:5])
