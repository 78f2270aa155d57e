"""`chatrlhf eval`: evaluate trained models without training anything (docs/eval.md). Each part runs when its inputs
are given:

1. **Perplexity** of each model on SFT-format records: exp of the mean NLL of the response tokens, the SFT stage's
   held-out measure (`train/sft.py:perplexity`).
2. **Reward-model accuracy** on preference pairs: the share of pairs whose chosen answer scores above the rejected
   one (with a 95% interval), the mean score gap, the pairwise loss, and both score distributions — the end score
   of the reward stage (`train/reward.py:pair_scores`).
3. **Side by side** (`side_by_side`): every model answers the same prompts (k samples each), every answer is scored
   by the reward model and by each judge and verifier function; means per model, paired differences and win rates
   per pair of models, pass@k per verifier (eval/compare.py). With `env`, each sample is a multi-turn episode
   (`play_and_score`), scored by its return and the judges. The pipeline's final comparison is this function.

Everything is validated (every record, every model directory) before the first model generates. Output in
`output_dir`: `eval.json` (every number), `samples.jsonl` (every response with its scores), `eval.html` (one
self-contained page); the tables are printed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from chatrlhf.config import EvaluateConfig
from chatrlhf.data import PromptRecord, to_pair, to_prompt, to_sft
from chatrlhf.data.cache import Prep
from chatrlhf.data.collate import encode_all, encode_pair, encode_prompt, encode_sft
from chatrlhf.engine.backends import open_configured, start
from chatrlhf.envs.episode import load_environment
from chatrlhf.envs.runner import EpisodeLimits, EpisodeRunner, collate_episodes
from chatrlhf.errors import UserError
from chatrlhf.eval.compare import ModelSamples, compare_models, sample_and_score, write_samples
from chatrlhf.eval.page import print_eval, write_page
from chatrlhf.eval.stats import distribution, mean_ci
from chatrlhf.models.load import (
    check_fits_context,
    load_causal_lm,
    load_tokenizer,
    load_value_model,
    same_vocabulary,
)
from chatrlhf.models.rewards import (
    EnvironmentReward,
    FunctionReward,
    RewardSource,
    ScoringBatch,
    load_function,
    load_reward_model,
)
from chatrlhf.rlhf import pairwise_loss
from chatrlhf.train.data import convert, read_all
from chatrlhf.train.outputs import Stopwatch
from chatrlhf.train.reward import pair_scores
from chatrlhf.train.sft import perplexity

FILES = ("eval.json", "samples.jsonl", "eval.html")


def model_names(cfg: EvaluateConfig) -> list[str]:
    """`names`, or each model directory's name; a name two directories share (`model` for runs/x/sft/model and
    runs/x/rl/model) becomes the parent's name."""
    if cfg.names:
        return list(cfg.names)
    names = [Path(m).name for m in cfg.models]
    names = [Path(m).parent.name if names.count(n) > 1 else n for m, n in zip(cfg.models, names)]
    if len(set(names)) != len(names):
        names = [str(Path(m)) for m in cfg.models]
    return names


def score_names(specs: list[str]) -> list[str]:
    """Each function's score key: its function name, or the whole `module:function` when names repeat."""
    short = [s.rsplit(":", 1)[-1] for s in specs]
    return [sp if short.count(n) > 1 or n == "reward_model" else n for sp, n in zip(specs, short)]


@dataclass
class SideBySide:
    """What `side_by_side` returns."""

    report: dict
    """`compare_models`' report, plus `prompts` and `samples_per_prompt`."""
    samples: dict[str, ModelSamples]
    """Per model name, in `cfg.models` order."""
    texts: list[str]
    """The prompts' text (a conversation's last user turn)."""


def side_by_side(
    cfg: EvaluateConfig,
    records: list[PromptRecord],
    names: list[str],
    device: torch.device,
    judge_names: list[str] | None = None,
) -> SideBySide:
    """Every model of `cfg.models` (named `names`) answers `records`, and every answer is scored by the reward model,
    the judges (named `judge_names`, default `score_names`) and the verifiers; then `compare_models`."""
    texts = [r.prompt if r.prompt is not None else r.messages[-1]["content"] for r in records]
    extras = [r.extra for r in records]
    specs = cfg.judges + [v for v in cfg.verifiers if v not in cfg.judges]  # a function both is scored once
    keys = score_names(specs)
    if judge_names is not None:
        keys[: len(judge_names)] = judge_names
    key = dict(zip(specs, keys))
    roles = {spec: "judge" if spec in cfg.judges else "verifier" for spec in specs}
    scorers = [FunctionReward(load_function(spec, roles[spec]), key[spec], spec, roles[spec]) for spec in specs]
    reward_models: list[tuple] = []  # (tokenizer, source): one reward-model source per vocabulary
    env = load_environment(cfg.env) if cfg.env else None
    samples: dict[str, ModelSamples] = {}
    for name, path in zip(names, cfg.models):
        opened = open_configured(cfg, path, device, generation=cfg.generation)
        tok = opened.tokenizer
        prompts = encode_all(records, encode_prompt, tok, max_len=cfg.max_prompt_len) if env is None else records
        if env is None:
            max_new = cfg.generation.max_new_tokens
            check_fits_context(zip(prompts, texts), cfg.max_prompt_len, max_new, opened.context, options="")
        sources: list[RewardSource] = list(scorers)
        if cfg.reward_model:
            rm = next((s for t, s in reward_models if same_vocabulary(t, tok)), None)
            if rm is None:
                rm = load_reward_model(cfg.reward_model, tok, cfg.run.dtype, device, episodes=env is not None)
                reward_models.append((tok, rm))
            sources.insert(0, rm)
        print(f"eval: {name}: {len(prompts)} prompts × {cfg.samples_per_prompt} {'episodes' if env else 'samples'}")
        if env is not None:
            e = cfg.episode
            limits = EpisodeLimits(
                e.max_turns, e.max_tool_calls, e.tool_timeout_s, e.max_tokens, cfg.generation.max_new_tokens,
                opened.context, options="",
            )  # fmt: skip
            runner = EpisodeRunner(env, tok, limits)
            samples[name] = play_and_score(opened.generator, runner, texts, extras, cfg, sources)
            opened.close()
            continue
        samples[name] = sample_and_score(
            opened.generator,
            tok,
            prompts,
            samples=cfg.samples_per_prompt,
            batch_size=cfg.batch_size,
            seed=cfg.run.seed,
            sources=sources,
            texts=texts,
            extras=extras,
            device=device,
        )
        opened.close()  # one model at a time: a vLLM engine's memory goes before the next model's engine starts
    verifiers = {key[spec]: cfg.pass_threshold for spec in cfg.verifiers}
    report = compare_models(samples, verifiers, cfg.pass_at)
    report.update(prompts=len(records), samples_per_prompt=cfg.samples_per_prompt)
    return SideBySide(report, samples, texts)


@torch.no_grad()
def play_and_score(
    generator, runner: EpisodeRunner, texts: list[str], extras: list[dict], cfg: EvaluateConfig, judges
) -> ModelSamples:
    """`cfg.samples_per_prompt` episodes per prompt (its text and fields, reset as RL resets them), in batches of
    `cfg.batch_size` with the seed `cfg.run.seed`: each scored by its return (`env`), by the reward model (if in
    `judges`) on the episode's tokens as played, and by every judge on the policy's last turn, with the conversation
    as `messages`. A sample's text is the conversation after the
    environment's first messages, one `role: content` line per message."""
    torch.manual_seed(cfg.run.seed)
    records = [{"prompt": t, **x} for t, x in zip(texts, extras)]
    conversations: list[list[str]] = [[] for _ in records]
    scores: dict[str, list[list[float]]] = {s.name: [[] for _ in records] for s in [EnvironmentReward(), *judges]}
    flat = [i for i in range(len(records)) for _ in range(cfg.samples_per_prompt)]
    for b0 in range(0, len(flat), cfg.batch_size):
        idx = flat[b0 : b0 + cfg.batch_size]
        episodes = runner.run(generator, [records[i] for i in idx])
        for i, ep in zip(idx, episodes):
            conversations[i].append(transcript(ep))
            scores["env"][i].append(ep.reward)
        if judges:
            batch = collate_episodes(episodes, runner.tok.pad_token_id)
            scoring = ScoringBatch(
                sequences=batch.ids,
                attention_mask=batch.attention_mask,
                last_index=batch.attention_mask.sum(1) - 1,
                prompts=[texts[i] for i in idx],
                responses=[[m for m in e.messages if m["role"] == "assistant"][-1]["content"] for e in episodes],
                extras=[{**extras[i], "messages": e.messages} for i, e in zip(idx, episodes)],
            )
            for judge in judges:
                for i, value in zip(idx, judge.score(scoring).tolist()):
                    scores[judge.name][i].append(float(value))
    return ModelSamples(conversations, scores)


def transcript(episode) -> str:
    """The conversation after the environment's first messages, one `role: content` line per message."""
    first = next(i for i, m in enumerate(episode.messages) if m["role"] == "assistant")
    return "\n".join(f"{m['role']}: {m['content']}" for m in episode.messages[first:])


def perplexities(cfg: EvaluateConfig, records: list, names: list[str], device: torch.device) -> dict:
    out = {}
    for name, path in zip(names, cfg.models):
        tok = load_tokenizer(path)
        encoded = encode_all(records, encode_sft, tok, max_len=cfg.max_seq_len, loss_on_prompt=False)
        model = load_causal_lm(path, tok, cfg.run.dtype, device)
        value = perplexity(model, encoded, cfg.batch_size, tok.pad_token_id)
        tokens = sum(sum(e.loss_mask[1:]) for e in encoded)
        out[name] = {"perplexity": value, "records": len(encoded), "tokens": tokens}
        print(f"eval: {name}: perplexity {value:.4g} on {len(encoded)} records ({tokens} response tokens)")
    return out


@torch.no_grad()
def reward_model_accuracy(cfg: EvaluateConfig, records: list, device: torch.device) -> dict:
    tok = load_tokenizer(cfg.reward_model)
    pairs = encode_all(records, encode_pair, tok, max_len=cfg.max_seq_len)
    model = load_value_model(cfg.reward_model, tok, cfg.run.dtype, device).eval()
    chosen, rejected = [], []
    for i in range(0, len(pairs), cfg.batch_size):
        c, r = pair_scores(model, pairs[i : i + cfg.batch_size], tok.pad_token_id, device)
        chosen += c.float().tolist()
        rejected += r.float().tolist()
    accuracy = mean_ci([float(c > r) for c, r in zip(chosen, rejected)])
    gap = mean_ci([c - r for c, r in zip(chosen, rejected)])
    loss = float(pairwise_loss(torch.tensor(chosen), torch.tensor(rejected)))
    print(f"eval: reward model: accuracy {accuracy.mean:.3f} on {len(pairs)} pairs, score gap {gap.mean:.3f}")
    return {
        "model": cfg.reward_model,
        "pairs": len(pairs),
        "accuracy": accuracy.as_dict(),
        "score_gap": gap.as_dict(),
        "loss": loss,
        "chosen": distribution(chosen),
        "rejected": distribution(rejected),
        "scores": [{"chosen": c, "rejected": r} for c, r in zip(chosen, rejected)],
    }


def output_directory(cfg: EvaluateConfig) -> Path:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out}: exists and is not a directory")
    earlier = [f for f in FILES if (out / f).exists()]
    if earlier and not cfg.overwrite:
        raise UserError(
            f"output_dir {out} already holds an evaluation ({', '.join(earlier)}); set overwrite or another output_dir"
        )
    return out


def run_eval(cfg: EvaluateConfig) -> dict:
    """Validate the inputs, run each part that has them, write eval.json, samples.jsonl, eval.html."""
    cfg.validate()
    clock = Stopwatch()
    out = output_directory(cfg)
    created = not out.exists()
    try:
        return _run_eval(cfg, out, clock)
    except BaseException:
        if created:  # a failed evaluation leaves nothing behind (generated prompt files included)
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run_eval(cfg: EvaluateConfig, out: Path, clock: Stopwatch) -> dict:
    for path in [*cfg.models, *([cfg.reward_model] if cfg.reward_model else [])]:
        if not Path(path).is_dir():
            raise UserError(f"model '{path}': not a directory (give a model directory written by chatrlhf)")
    device = start(cfg)
    names = model_names(cfg)

    # data: every record of every part, validated before any model runs
    def load(paths: list[str], to, what: str) -> list:
        """The sources' records in their order (no shuffle: `num_prompts` takes the first ones)."""
        return convert(read_all(paths, out, Prep(), cfg.format), to, False, what)

    prompts = load(cfg.prompts, to_prompt, "evaluation prompt").head(cfg.num_prompts) if cfg.prompts else []
    sft_records = load(cfg.perplexity_data, to_sft, "SFT") if cfg.perplexity_data else []
    pair_records = load(cfg.pairs, to_pair, "preference-pair") if cfg.pairs else []

    report: dict = {"models": dict(zip(names, cfg.models))}
    if sft_records:
        report["perplexity"] = perplexities(cfg, sft_records, names, device)
    if pair_records:
        report["reward_model"] = reward_model_accuracy(cfg, pair_records, device)
    texts, samples = [], {}
    if prompts and cfg.models:
        result = side_by_side(cfg, prompts, names, device)
        report["side_by_side"], samples, texts = result.report, result.samples, result.texts
    report["time_s"] = clock.elapsed()

    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if samples:
        write_samples(out / "samples.jsonl", texts, samples)
    page = write_page(out / "eval.html", report, texts, samples)
    print_eval(report)
    print(f"eval: {out / 'eval.json'}, {page}" + (f", {out / 'samples.jsonl'}" if samples else ""))
    return report
