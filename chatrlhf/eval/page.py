"""`chatrlhf eval`'s results as terminal tables (`print_eval`) and as one self-contained HTML page (`write_page`:
plots embedded as PNG, nothing fetched), both from the report that eval.json holds."""

from __future__ import annotations

import base64
import datetime
import os
from pathlib import Path

from chatrlhf import __version__
from chatrlhf.eval.compare import ModelSamples
from chatrlhf.eval.plots import histogram_plot, interval_plot
from chatrlhf.eval.report import CSS, _resp, esc, fmt, note, table


def ci_text(d: dict | None, sign: str = "") -> str:
    """`mean [low, high]`, or `mean (n=1)` when there is no interval."""
    if not d:
        return "—"
    if d.get("ci95") is None:
        return f"{d['mean']:{sign}.3f} (n={d['n']})"
    low, high = d["ci95"]
    return f"{d['mean']:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]"


# ------------------------------------------------------------------------------------------------- terminal


def print_eval(report: dict) -> None:
    models = list(report["models"])
    if "perplexity" in report:
        print("\nperplexity on the SFT records (response tokens)")
        for m, p in report["perplexity"].items():
            print(f"  {m:20} {p['perplexity']:10.4f}   ({p['records']} records, {p['tokens']} tokens)")
    rm = report.get("reward_model")
    if rm:
        print(f"\nreward model {rm['model']} on {rm['pairs']} pairs")
        print(f"  accuracy {ci_text(rm['accuracy'])}; score gap {ci_text(rm['score_gap'], '+')}; loss {rm['loss']:.4f}")
        for side in ("chosen", "rejected"):
            d = rm[side]
            q = d["quantiles"]
            print(f"  {side:9} mean {d['mean']:.3f}, std {d['std']:.3f}, 5-95% [{q['0.05']:.3f}, {q['0.95']:.3f}]")
    sbs = report.get("side_by_side")
    if not sbs:
        return
    width = 30
    print(f"\nside by side: {sbs['prompts']} prompts × {sbs['samples_per_prompt']} samples; mean [95% CI]")
    print(f"{'':16}" + "".join(f"{m:>{width}}" for m in models))
    for score, r in sbs["scores"].items():
        print(f"{score:16}" + "".join(f"{ci_text(r['models'][m]):>{width}}" for m in models))
    for score, r in sbs["scores"].items():
        for pair in r["pairs"]:
            better = f"  ({pair['b']} better)" if pair["b_better"] else ""
            print(
                f"{score}: {pair['b']} − {pair['a']} {ci_text(pair['b_minus_a'], '+')}, "
                f"win rate of {pair['b']} over {pair['a']} {ci_text(pair['b_win_rate'])}{better}"
            )
    for verifier, per_model in sbs["pass_at_k"].items():
        for m, ks in per_model.items():
            print(f"{verifier}: {m}: " + ", ".join(f"{k} {ci_text(v)}" for k, v in ks.items()))


# ------------------------------------------------------------------------------------------------- HTML


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}"></figure>'


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>'


def _reward_model(rm: dict) -> str:
    rows = [
        ["pairs", fmt(rm["pairs"])],
        ["accuracy (chosen > rejected)", esc(ci_text(rm["accuracy"]))],
        ["score gap (chosen − rejected)", esc(ci_text(rm["score_gap"], "+"))],
        ["pairwise loss", fmt(rm["loss"])],
    ]
    for side in ("chosen", "rejected"):
        d = rm[side]
        q = ", ".join(f"{k}: {v:.3f}" for k, v in d["quantiles"].items())
        rows.append([f"{side} scores", esc(f"mean {d['mean']:.3f}, std {d['std']:.3f}, quantiles {q}")])
    groups = [(side, [s[side] for s in rm["scores"]]) for side in ("chosen", "rejected")]
    plot = _img(histogram_plot("Reward-model scores of held-out pairs", groups, "score"), "reward-model scores")
    return note(rm["model"]) + table(["", "value"], rows, "kv") + plot


def _side_by_side(sbs: dict, models: list[str], texts: list[str], samples: dict[str, ModelSamples]) -> str:
    body = note(f"{sbs['prompts']} prompts × {sbs['samples_per_prompt']} samples per model; mean [95% CI] over prompts")
    rows = [[esc(score)] + [esc(ci_text(r["models"][m])) for m in models] for score, r in sbs["scores"].items()]
    if rows:
        body += table(["score", *models], rows)
        intervals = [
            (score, [(m, r["models"][m]["mean"], *(r["models"][m]["ci95"] or (None, None))) for m in models])
            for score, r in sbs["scores"].items()
        ]
        body += _img(interval_plot("Mean score per model, 95% CI", intervals), "scores")
        pairs = [
            [esc(score), esc(f"{p['b']} vs {p['a']}"), esc(ci_text(p["b_minus_a"], "+")), esc(ci_text(p["b_win_rate"])),
             fmt(p["b_better"])]
            for score, r in sbs["scores"].items()
            for p in r["pairs"]
        ]  # fmt: skip
        if pairs:
            body += "<h3>Pairs (paired over prompts)</h3>" + table(
                ["score", "B vs A", "B − A", "win rate of B over A", "B better"], pairs
            )
    else:
        body += note("nothing scored the responses (no reward model, judge or verifier)")
    if sbs["pass_at_k"]:
        ks = sorted({k for per in sbs["pass_at_k"].values() for m in per.values() for k in m})
        rows = [
            [esc(v), esc(m)] + [esc(ci_text(per[m].get(k))) for k in ks]
            for v, per in sbs["pass_at_k"].items()
            for m in models
        ]
        body += "<h3>pass@k</h3>" + table(["verifier", "model", *ks], rows)
    body += "<h3>Responses</h3>" + _responses(models, texts, samples)
    return body


def _responses(models: list[str], texts: list[str], samples: dict[str, ModelSamples]) -> str:
    def cell(m: str, i: int, k: int) -> str:
        s = samples[m]
        scores = " ".join(f"{esc(name)} {fmt(v[i][k])}" for name, v in s.scores.items())
        return f"{_resp(s.texts[i][k])}<br><small>{scores}</small>"

    rows = [[esc(t)] + [cell(m, i, 0) for m in models] for i, t in enumerate(texts)]
    first = table(["prompt", *models], rows, "sbs")
    every = [
        [esc(t), str(k)] + [cell(m, i, k) for m in models]
        for i, t in enumerate(texts)
        for k in range(len(samples[models[0]].texts[i]))
    ]
    rest = table(["prompt", "sample", *models], every, "sbs")
    return first + f"<details><summary>every sample</summary>{rest}</details>"


def render(report: dict, texts: list[str], samples: dict[str, ModelSamples]) -> str:
    models = list(report["models"])
    listing = table(["name", "directory"], [[esc(m), esc(p)] for m, p in report["models"].items()])
    sections = [_section("models", "Models", listing)]
    if "perplexity" in report:
        rows = [
            [esc(m), fmt(p["perplexity"]), fmt(p["records"]), fmt(p["tokens"])] for m, p in report["perplexity"].items()
        ]
        sections.append(_section("perplexity", "Perplexity", table(["model", "perplexity", "records", "tokens"], rows)))
    if "reward_model" in report:
        body = _reward_model(report["reward_model"])
        sections.append(_section("reward-model", "Reward model on preference pairs", body))
    if "side_by_side" in report:
        body = _side_by_side(report["side_by_side"], models, texts, samples)
        sections.append(_section("side-by-side", "Side by side", body))
    made = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    title = "chatrlhf eval — " + ", ".join(models)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{CSS}</style></head><body><main><h1>{esc(title)}</h1>"
        f'<p class="note">made {esc(made)} by chatrlhf {esc(__version__)} in {report["time_s"]:.0f} s</p>'
        + "".join(sections)
        + "</main></body></html>\n"
    )


def write_page(path: Path, report: dict, texts: list[str], samples: dict[str, ModelSamples]) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(render(report, texts, samples), encoding="utf-8")
    tmp.replace(path)
    return path
