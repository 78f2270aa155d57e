"""`chatrlhf sft | reward | rl | dpo | pipeline | eval | chat | serve | report`.

Each command takes its typed config (chatrlhf/config/): defaults, then `--recipe FILE.yaml`, then flags such as
`--train.optim.lr 1e-5` (run `chatrlhf COMMAND --help` for every field); `chat` and `serve` take the model
directory as their first argument. User errors print one message and exit 2; a numerical failure (NaN/inf) exits 3.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from chatrlhf.errors import UserError

USAGE = """usage: chatrlhf {sft,reward,rl,dpo,pipeline,eval} [--recipe FILE.yaml] [--FIELD VALUE ...]
       chatrlhf {chat,serve} MODEL_DIR [--FIELD VALUE ...]
       chatrlhf report RUN_DIR

  sft        step 1: supervised fine-tuning on prompt/response records
  reward     step 2: reward model on prompt/chosen/rejected pairs
  rl         step 3: RLHF with PPO (actor, critic, reference, reward model) or GRPO, DAPO, GSPO, CISPO, ...
  dpo        DPO on prompt/chosen/rejected pairs: steps 2+3 in one, without a reward model
  pipeline   steps 1-3 (or SFT then DPO: --method dpo), then SFT vs the result on held-out prompts
  eval       perplexity, reward-model accuracy, and models side by side (scores, win rates, pass@k)
  chat       talk to a model in the terminal, replies streamed as they are generated
  serve      an OpenAI-compatible HTTP server for a model (/v1/chat/completions, /v1/completions)
  report     rebuild RUN_DIR/report.html and its plots from a run's files (finished, running or resumed)

`chatrlhf COMMAND --help` lists every option with its default and meaning."""


# stage → (config class name in chatrlhf.config, driver module, driver function); drivers are imported only when
# run, so `--help` and config errors answer without loading torch.
STAGES = {
    "sft": ("SFTConfig", "chatrlhf.train.sft", "run_sft"),
    "reward": ("RewardConfig", "chatrlhf.train.reward", "run_reward"),
    "rl": ("RLConfig", "chatrlhf.train.rl", "run_rl"),
    "dpo": ("DPOConfig", "chatrlhf.train.dpo", "run_dpo"),
    "pipeline": ("PipelineConfig", "chatrlhf.train.pipeline", "run_pipeline"),
    "eval": ("EvaluateConfig", "chatrlhf.train.evaluate", "run_eval"),
    "chat": ("ChatConfig", "chatrlhf.serve.chat", "run_chat"),
    "serve": ("ServeConfig", "chatrlhf.serve.server", "run_serve"),
}

MODEL_FIRST = ("chat", "serve")
"""Commands whose first argument, when it is not a flag, is the model directory (`--model`)."""


def _split_recipe(args: list[str]) -> tuple[str | None, list[str]]:
    """Take `--recipe PATH` (or `--recipe=PATH`) out of the arguments."""
    recipe, rest, i = None, [], 0
    while i < len(args):
        a = args[i]
        if a == "--recipe":
            if i + 1 >= len(args):
                raise UserError("--recipe needs a path")
            recipe, i = args[i + 1], i + 2
            continue
        if a.startswith("--recipe="):
            recipe = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return recipe, rest


def parse(stage: str, args: list[str]):
    """Config for `stage` from defaults, the recipe and the flags."""
    import tyro

    from chatrlhf import config
    from chatrlhf.config import check_renamed_flags, load_recipe

    cls = getattr(config, STAGES[stage][0])
    recipe, rest = _split_recipe(args)
    if stage in MODEL_FIRST and rest and not rest[0].startswith("-"):
        rest = ["--model", rest[0], *rest[1:]]
    check_renamed_flags(cls, rest)  # an old name gets its new one, not tyro's "unrecognized arguments"
    default = load_recipe(cls, recipe) if recipe else cls()
    return tyro.cli(
        cls,
        default=default,
        args=rest,
        prog=f"chatrlhf {stage} MODEL_DIR" if stage in MODEL_FIRST else f"chatrlhf {stage}",
        use_underscores=True,
        config=(tyro.conf.FlagConversionOff,),
    )


def _quiet_libraries(engine_kind: str) -> None:
    """Our own progress bars and messages say what happens; transformers' per-load bars and reports (e.g. "score.weight
    newly initialized" when the reward stage starts from a causal LM, which is intended and announced by our own note)
    would bury them. A single-process run also drops DeepSpeed's report of the accelerator it picked
    (`DeepSpeedAcceleratorReport`)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if engine_kind == "single":
        logging.getLogger("DeepSpeed").addFilter(DeepSpeedAcceleratorReport())


class DeepSpeedAcceleratorReport(logging.Filter):
    """Drops DeepSpeed's accelerator-detection messages ("Setting accelerator to CPU. If you have GPU or other
    accelerator, we were unable to detect it."), and only those: with DeepSpeed installed, transformers'
    `save_pretrained` imports it just to check whether the model is wrapped in a DeepSpeedEngine, and that import
    reports which accelerator DeepSpeed would use. A single-process run never uses DeepSpeed, so the report (on a
    CPU machine, an alarming one) is about nothing the run does. DeepSpeed's other messages, and every message of
    an `engine.kind=deepspeed` run, pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.pathname.endswith("real_accelerator.py")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    stage, args = argv[0], argv[1:]
    if stage == "report":
        return report(args)
    if stage not in STAGES:
        print(f"chatrlhf: unknown command '{stage}'\n\n{USAGE}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) > 0:
        sys.stdout = open(os.devnull, "w")  # under a launcher, rank 0 speaks for all; errors still reach stderr
    code = 0
    try:
        cfg = parse(stage, args)
        _quiet_libraries(cfg.engine.kind if hasattr(cfg, "engine") else "single")
        _, module, function = STAGES[stage]
        getattr(importlib.import_module(module), function)(cfg)
    except UserError as e:
        print(f"chatrlhf {stage}: error: {e}", file=sys.stderr)
        code = 2
    except FloatingPointError as e:
        print(f"chatrlhf {stage}: numerical failure: {e}", file=sys.stderr)
        code = 3
    _finish_distributed(code)
    return code


REPORT_USAGE = """usage: chatrlhf report RUN_DIR

Rebuild RUN_DIR/report.html (self-contained) and the plots in RUN_DIR/report/ from the run's metrics.jsonl,
summary.json, config.yaml and the files the drivers write for the report (docs/report.md). RUN_DIR is a stage
run directory or a pipeline run directory; it may be finished, still running, or resumed."""


def report(args: list[str]) -> int:
    """`chatrlhf report RUN_DIR`: no torch import, so it answers fast and works beside a running job."""
    if args in (["-h"], ["--help"]):
        print(REPORT_USAGE)
        return 0
    if len(args) != 1 or args[0].startswith("-"):
        print(f"chatrlhf report: error: expected one run directory, got {args}\n\n{REPORT_USAGE}", file=sys.stderr)
        return 2
    from pathlib import Path

    from chatrlhf.eval.report import write_report

    try:
        path = write_report(Path(args[0]))
    except UserError as e:
        print(f"chatrlhf report: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


def _finish_distributed(code: int) -> None:
    """A distributed run ends through `distributed.finish` (it exits the process; see there why)."""
    if "torch.distributed" in sys.modules:
        from chatrlhf.distributed import finish

        finish(code)


if __name__ == "__main__":
    sys.exit(main())
