"""`chatrlhf pipeline`: SFT → reward model → RLHF → side-by-side evaluation, in one run directory.

Between the reward model and RL the reward-model gate tests the reward model's held-out accuracy against chance and,
by default, stops the pipeline when it is not above it (`reward_gate`, docs/report.md).

With `method: dpo`, DPO replaces steps 2+3: SFT → DPO from the SFT model → the same evaluation, SFT vs DPO, scored
by the judge only (there is no reward model).

Data: one pool of pair records ({prompt, chosen, rejected}) is blended from `data.paths`, shuffled with the seed
and split across the stages by `data.split` (DeepSpeed-Chat's 2,4,4: SFT trains on prompt+chosen, the reward
model on the pairs, RL on the prompts); a stage with its own `data.<stage>_paths` uses those instead. DPO trains
on the pairs of the reward and RL shares together, or on `data.reward_paths`.

Output: `run_dir/{sft,reward,rl}/` (or `{sft,dpo}/`; each with `model/`, metrics.jsonl, summary.json),
`run_dir/config.yaml`, and `run_dir/summary.json` with the comparison, also printed as a table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from chatrlhf import distributed as dist
from chatrlhf.config import (
    DataConfig,
    DPOConfig,
    EvaluateConfig,
    PipelineConfig,
    RewardConfig,
    RewardGateConfig,
    RLConfig,
    RunOptions,
    SFTConfig,
)
from chatrlhf.data import parse_split, to_prompt
from chatrlhf.data.blend import split_indices
from chatrlhf.data.prepare import Rows
from chatrlhf.engine import factory
from chatrlhf.engine.vllm import check_vllm_support
from chatrlhf.errors import UserError
from chatrlhf.eval.compare import pipeline_view, write_samples
from chatrlhf.eval.report import write_report
from chatrlhf.eval.stats import binomial_upper_tail
from chatrlhf.models.load import check_value_model_support, pick_device
from chatrlhf.train.data import convert, load_raw, prep_of, read_all, train_eval_split
from chatrlhf.train.dpo import run_dpo
from chatrlhf.train.evaluate import side_by_side
from chatrlhf.train.outputs import Stopwatch, write_summary
from chatrlhf.train.reward import run_reward
from chatrlhf.train.rl import run_rl
from chatrlhf.train.sft import run_sft
from chatrlhf.train.stage import run_directory, seed_everything

STAGES = ("sft", "reward", "rl")
"""The shares of the pool, in `data.split` order."""

OWN_PATHS = {"sft": "sft_paths", "reward": "reward_paths", "rl": "rl_paths", "dpo": "reward_paths"}
"""The `data` field that replaces each stage's share."""


def stage_data(cfg: PipelineConfig, workdir: Path) -> dict[str, Rows]:
    """Raw records per stage (index arrays into the read sources): the stage's own sources, or its share of the
    split pool. With method dpo, the `dpo` stage's share is the reward and RL shares together."""
    d = cfg.data
    prep = prep_of(d)
    fractions = parse_split(d.split)
    shares: dict = {s: [] for s in STAGES}
    if d.paths:
        pool = load_raw(d.paths, d.weights, cfg.run.seed, workdir, d.format, prep)
        shares = {s: pool.take(part) for s, part in zip(STAGES, split_indices(len(pool), fractions, cfg.run.seed))}
    shares["dpo"] = shares["reward"] + shares["rl"]
    out = {}
    stages = ("sft", "dpo") if cfg.method == "dpo" else STAGES if cfg.train_reward_model else ("sft", "rl")
    for stage in stages:
        own = getattr(d, OWN_PATHS[stage])
        if own:
            out[stage] = load_raw(own, None, cfg.run.seed, workdir, d.format, prep)
        elif shares[stage]:
            out[stage] = shares[stage]
        else:
            raise UserError(
                f"stage '{stage}' has no data: data.split={d.split!r} gives it no share of the "
                f"{sum(len(shares[s]) for s in STAGES)} pooled records and data.{OWN_PATHS[stage]} is empty"
            )
        print(f"pipeline: {stage}: {len(out[stage])} records")
    return out


def options(cfg: PipelineConfig, stage: str) -> dict:
    """What every stage takes from the pipeline's config as is: engine, LoRA, checkpoints, resume, run settings
    (the stage's tracker run named `NAME/stage`)."""
    run = dataclasses.replace(cfg.run, name=f"{cfg.run.name or Path(cfg.run_dir).name}/{stage}")
    return {"engine": cfg.engine, "lora": cfg.lora, "checkpoint": cfg.checkpoint, "resume": cfg.resume, "run": run}


@dataclass
class Tuned:
    """What the steps after SFT (reward model and RL, or DPO) hand to the comparison and the run summary."""

    policy_dir: Path
    """The trained policy's model directory, compared with the SFT model."""
    reward_model_dir: Path | None
    """The reward model that also scores the comparison; None with DPO."""
    eval_raws: list
    """Held-out records whose prompts the comparison samples (unless eval.prompts is set)."""
    sections: dict
    """The run summary's sections of these steps: `reward_model` and `rl`, or `dpo`."""
    times: dict[str, float]
    """Wall seconds per step."""


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run the steps in `run_dir`; with `resume auto` finished steps are skipped and an interrupted one continues
    from its newest checkpoint."""
    cfg.validate()
    factory.start(cfg.engine, cfg.run)  # join the process group first when the stages run on DeepSpeed
    if cfg.method == "rlhf" and cfg.train_reward_model:
        check_value_model_support(cfg.reward_base or cfg.model)  # before SFT trains: the reward model needs a head
    if cfg.method == "rlhf" and cfg.rl.rollout.backend == "vllm":
        check_vllm_support(cfg.model)  # before SFT trains: vLLM is installed and runs this architecture
    with run_directory(cfg.run_dir, cfg, cfg.run.overwrite, cfg.resume) as run_dir:
        return _run_pipeline(cfg, run_dir)


def _run_pipeline(cfg: PipelineConfig, run_dir: Path) -> dict:
    seed_everything(cfg.run.seed)
    data = stage_data(cfg, run_dir)
    d = cfg.data
    stage_data_cfg = DataConfig(
        eval_fraction=d.eval_fraction, skip_invalid=d.skip_invalid, num_proc=d.num_proc, cache_dir=d.cache_dir
    )
    times: dict[str, float] = {}

    # step 1: SFT
    sft_dir = run_dir / "sft"
    clock = Stopwatch()
    sft = run_sft(
        SFTConfig(model=cfg.model, output_dir=str(sft_dir), data=stage_data_cfg, train=cfg.sft, **options(cfg, "sft")),
        raws=data["sft"],
    )
    times["sft"] = clock.elapsed()

    # steps 2+3: reward model and RL, or DPO in their place
    tuned = (dpo_step if cfg.method == "dpo" else rlhf_steps)(cfg, run_dir, data, stage_data_cfg)
    times.update(tuned.times)

    # evaluation: SFT vs the tuned policy on the same held-out prompts, by the main process
    if not dist.is_main():
        return {}
    clock = Stopwatch()
    report = evaluate(cfg, run_dir, tuned.eval_raws, tuned.policy_dir, tuned.reward_model_dir)
    times["eval"] = clock.elapsed()

    summary = {
        "method": cfg.method,
        "sft": {"eval/perplexity": sft.get("eval/perplexity"), "steps": sft["steps"]},
        **tuned.sections,
        "comparison": report,
        "time_s": times,
    }
    write_summary(run_dir / "summary.json", summary)
    print_table(summary)
    print(f"report: {write_report(run_dir)}")
    return summary


def train_reward_model(cfg: PipelineConfig, run_dir: Path, data: dict[str, list], stage_data_cfg: DataConfig):
    """Step 2 → (reward model run directory, its summary, wall seconds)."""
    clock = Stopwatch()
    rm_dir = run_dir / "reward"
    reward = run_reward(
        RewardConfig(
            model=cfg.reward_base or str(run_dir / "sft" / "model"),
            output_dir=str(rm_dir),
            data=stage_data_cfg,
            train=cfg.reward,
            **options(cfg, "reward"),
        ),
        raws=data["reward"],
    )
    return rm_dir, reward, clock.elapsed()


def reward_gate(gate: RewardGateConfig, reward: dict, run_dir: Path) -> dict | None:
    """Step 2's held-out accuracy tested before RL: k of n pairs ranked right, the one-sided exact binomial test of
    H₀ "accuracy ≤ gate.min_accuracy" (½, chance, by default). Returns what the run summary records; with action
    stop, a reward model that fails ends the pipeline here, and the message says how to go on."""
    if gate.action == "off":
        return None
    n, accuracy = int(reward.get("eval_pairs") or 0), reward.get("eval/accuracy")
    if n == 0 or accuracy is None:
        print(
            "pipeline: warning: the reward model has no held-out pairs (data.eval_fraction gives its share none), "
            "so its accuracy is not tested before RL"
        )
        return {"pairs": 0, "passed": None}
    correct = round(accuracy * n)  # exact: the summary's accuracy is k/n to float32 precision (error < 1e-6·n)
    p_value = binomial_upper_tail(correct, n, gate.min_accuracy)
    passed = p_value <= gate.p
    result = {"accuracy": accuracy, "correct": correct, "pairs": n, "min_accuracy": gate.min_accuracy,
              "p_value": p_value, "passed": passed}  # fmt: skip
    bar = "chance" if gate.min_accuracy == 0.5 else f"reward_gate.min_accuracy {gate.min_accuracy}"
    said = (
        f"reward model: held-out accuracy {accuracy:.3f} ({correct} of {n} pairs), p = {p_value:.2g} against "
        f"{bar} (one-sided exact binomial test)"
    )
    if passed:
        print(f"pipeline: {said} <= reward_gate.p {gate.p}: above {bar}")
        return result
    problem = f"{said} > reward_gate.p {gate.p}: not shown to rank answers better than {bar}"
    if gate.min_accuracy == 0.5:
        problem += ", so RL would optimise noise"
    if binomial_upper_tail(n, n, gate.min_accuracy) > gate.p:
        problem += f" (with {n} held-out pairs not even all right would pass: raise data.eval_fraction)"
    if gate.action == "warn":
        print(f"pipeline: warning: {problem}; RL runs anyway (reward_gate.action warn)")
        return result
    raise UserError(
        f"{problem}. Stopped before RL, keeping {run_dir / 'sft'} and {run_dir / 'reward'}. To train the reward model "
        f"again, remove {run_dir / 'reward'} and rerun with --resume auto and more reward training (--reward.epochs, "
        "--reward.optim.lr); to run RL on this one, rerun with --resume auto --reward_gate.action warn"
    )


def rlhf_steps(cfg: PipelineConfig, run_dir: Path, data: dict[str, list], stage_data_cfg: DataConfig) -> Tuned:
    """Steps 2 and 3: the reward model, then RL from the SFT model."""
    d = cfg.data
    sft_dir = run_dir / "sft"
    times = {}

    # step 2: reward model (InstructGPT initialises it from the SFT model unless another base is given), unless the
    # RL reward comes from Python reward functions alone
    rm_dir, reward, gate = None, {}, None
    if cfg.train_reward_model:
        rm_dir, reward, times["reward"] = train_reward_model(cfg, run_dir, data, stage_data_cfg)
        gate = reward_gate(cfg.reward_gate, reward, run_dir)

    # step 3: RLHF; the held-out prompts are kept for the final comparison
    clock = Stopwatch()
    rl_train, rl_eval = train_eval_split(data["rl"], [], d.eval_fraction, cfg.run.seed)
    rl_dir = run_dir / "rl"
    rl = run_rl(
        RLConfig(
            actor=str(sft_dir / "model"),
            reward_model=str(rm_dir / "model") if rm_dir else "",
            reward_functions=cfg.reward_functions,
            reward_weights=cfg.reward_weights,
            env=cfg.env,
            judge=cfg.eval.judge,
            output_dir=str(rl_dir),
            data=stage_data_cfg,
            train=cfg.rl,
            **options(cfg, "rl"),
        ),
        raws=rl_train,
        eval_raws=rl_eval,
    )
    times["rl"] = clock.elapsed()

    sections = {"rl": {k: v for k, v in rl.items() if k.startswith("final/")}}
    if reward:
        keys = ("eval/accuracy", "eval/chosen_score", "eval/rejected_score", "eval/score_gap")
        sections["reward_model"] = {k: reward.get(k) for k in keys}
        if gate is not None:
            sections["reward_model"]["gate"] = gate
    return Tuned(
        policy_dir=rl_dir / "model",
        reward_model_dir=rm_dir / "model" if rm_dir else None,
        eval_raws=rl_eval,
        sections=sections,
        times=times,
    )


def dpo_step(cfg: PipelineConfig, run_dir: Path, data: dict[str, list], stage_data_cfg: DataConfig) -> Tuned:
    """DPO from the SFT model in place of steps 2+3; the held-out pairs' prompts are kept for the comparison."""
    clock = Stopwatch()
    dpo_train, dpo_eval = train_eval_split(data["dpo"], [], cfg.data.eval_fraction, cfg.run.seed)
    dpo_dir = run_dir / "dpo"
    dpo = run_dpo(
        DPOConfig(
            model=str(run_dir / "sft" / "model"),
            output_dir=str(dpo_dir),
            data=stage_data_cfg,
            train=cfg.dpo,
            **options(cfg, "dpo"),
        ),
        raws=dpo_train,
        eval_raws=dpo_eval,
    )
    section = {"steps": dpo["steps"], **{k: v for k, v in dpo.items() if k.startswith("eval/")}}
    return Tuned(
        policy_dir=dpo_dir / "model",
        reward_model_dir=None,
        eval_raws=dpo_eval,
        sections={"dpo": section},
        times={"dpo": clock.elapsed()},
    )


def evaluate(cfg: PipelineConfig, run_dir: Path, eval_raws: list, policy_dir: Path, rm_dir: Path | None) -> dict:
    """The final comparison is `chatrlhf eval`'s side by side (train/evaluate.py:side_by_side): the SFT model and
    the tuned policy at `policy_dir` sample k responses per held-out prompt with the RL generation settings, scored
    by the reward model at `rm_dir` (if any) and the judge (if any). Writes `run_dir/samples.jsonl` (every response
    with its scores, for the run report). The report calls the tuned policy `rlhf` whatever the method."""
    e = cfg.eval
    device = pick_device(cfg.run.device)
    raws = eval_raws
    if e.prompts:
        raws = read_all(e.prompts, run_dir, prep_of(cfg.data))
    if not raws:
        raise UserError("no held-out prompts to evaluate: set eval.prompts or data.eval_fraction > 0")
    recs = convert(raws, to_prompt, cfg.data.skip_invalid, "evaluation prompt").head(e.num_prompts)
    names = ["sft", "rlhf"]
    spec = EvaluateConfig(
        models=[str(run_dir / "sft" / "model"), str(policy_dir)],
        names=names,
        reward_model=str(rm_dir) if rm_dir is not None else "",
        judges=[e.judge] if e.judge else [],
        num_prompts=len(recs),
        samples_per_prompt=e.samples_per_prompt,
        batch_size=e.batch_size,
        max_prompt_len=cfg.rl.max_prompt_len,
        generation=cfg.rl.generation,
        env=cfg.env,
        episode=cfg.rl.episode,
        run=RunOptions(seed=cfg.run.seed + 1, device=cfg.run.device, dtype=cfg.run.dtype),
    )
    result = side_by_side(spec, recs, names, device, judge_names=["judge"])
    write_samples(run_dir / "samples.jsonl", result.texts, result.samples)
    report = pipeline_view(result.report)
    report["prompts"] = len(recs)
    report["samples_per_prompt"] = e.samples_per_prompt
    sft, tuned = result.samples["sft"], result.samples["rlhf"]
    report["examples"] = [
        {"prompt": result.texts[i], "sft": sft.texts[i][0], "rlhf": tuned.texts[i][0]} for i in range(min(5, len(recs)))
    ]
    return report


def _fmt(ci: dict, sign: str = "") -> str:
    if ci["ci95"] is None:
        return f"{ci['mean']:{sign}.3f}  (n={ci['n']}, no interval)"
    return f"{ci['mean']:{sign}.3f}  [{ci['ci95'][0]:{sign}.3f}, {ci['ci95'][1]:{sign}.3f}]"


def print_table(summary: dict) -> None:
    c = summary["comparison"]
    tuned = "DPO" if summary["method"] == "dpo" else "RLHF"
    rows = []
    for name in ("judge", "env", "reward_model"):
        if name in c:
            r = c[name]
            rows.append((f"{name} score", _fmt(r["sft"]), _fmt(r["rlhf"]), _fmt(r["rlhf_minus_sft"], "+")))
    print()
    print(f"held-out prompts: {c['prompts']} × {c['samples_per_prompt']} samples; mean [95% CI]")
    print(f"{'':16} {'SFT':>28} {tuned:>28} {tuned + ' − SFT (paired)':>28}")
    for row in rows:
        print(f"{row[0]:16} {row[1]:>28} {row[2]:>28} {row[3]:>28}")
    if not rows:
        print("(nothing scored the samples: set eval.judge; the DPO pipeline has no reward model)")
    rm = summary.get("reward_model", {})
    if rm.get("eval/accuracy") is not None:
        gate = rm.get("gate") or {}
        tested = ""
        if gate.get("p_value") is not None:
            tested = f" ({'passed' if gate['passed'] else 'FAILED'} the gate before RL: p = {gate['p_value']:.2g})"
        print(f"reward model held-out accuracy {rm['eval/accuracy']:.3f}{tested}, score gap {rm['eval/score_gap']:.3f}")
    dpo = summary.get("dpo", {})
    if dpo.get("eval/rewards/accuracy") is not None:
        print(
            f"DPO implicit reward held-out accuracy {dpo['eval/rewards/accuracy']:.3f}, "
            f"margin {dpo['eval/rewards/margin']:.3f}"
        )
    kl = summary.get("rl", {}).get("final/kl/mean")
    if kl is not None:
        print(f"final KL(actor ‖ reference) per response {kl:.3f}")
    print("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in summary["time_s"].items()))
