"""Does `torch.compile` pay on the CPU for the tiny models the other benches run? Eager against compiled, side by side.

For each size (`--hidden`), trl_compare's tiny Llama (4 layers, random init, unable to sample EOS, so every response
is `--new-tokens` long) is loaded twice from the same directory: one copy runs eager, as chatrlhf and TRL run it; the
other has its `forward` wrapped in `torch.compile(dynamic=False)` (inductor, the default backend). Two pieces of an
RL step are timed on both, in alternating rounds so a change in the machine's load hits both alike:

- `train`: one forward over `--batch` sequences of `--prompt-tokens` + `--new-tokens` tokens, the log-softmax of
  the response positions, the mean log-prob as loss, backward and a fused AdamW step: the update's work;
- `generate`: `generate()` of `--new-tokens` tokens for `--batch` prompts, sampling at temperature 1; the eager copy
  with transformers' default dynamic KV cache, the compiled copy with its static cache
  (`cache_implementation="static"`), which compiling the decode step needs (fixed shapes).

Per round, the median over `--steps` calls; per variant, the median of the rounds; then eager ÷ compiled. The
first calls of the compiled copy (compiling) are timed apart and reported as `compile_s`: a run pays it once per
shape. One thread by default, like the other CPU benches.

    python bench/compile.py --hidden 64 256 --json bench/results/compile.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _runner import fmt_table, machine_summary, write_json
from trl_compare import build_model, token_logprobs


def train_step(model, opt, seq: torch.Tensor, prompt: int) -> None:
    logits = model(seq).logits[:, prompt - 1 : -1]
    (-token_logprobs(logits, seq[:, prompt:].unsqueeze(2)).mean()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def generate(model, ids: torch.Tensor, config) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)


def median_s(call, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(path: Path, a: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig

    g = torch.Generator().manual_seed(0)
    seq = torch.randint(3, 200, (a.batch, a.prompt_tokens + a.new_tokens), generator=g)
    ids = seq[:, : a.prompt_tokens].contiguous()
    sampling = dict(max_new_tokens=a.new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                    pad_token_id=0, eos_token_id=2)  # fmt: skip
    variants = {}
    for name in ("eager", "compiled"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        config = GenerationConfig(**sampling, **({"cache_implementation": "static"} if name == "compiled" else {}))
        if name == "compiled":
            model.forward = torch.compile(model.forward, dynamic=False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=True)
        if name == "eager":
            reference = model, config  # the check below: every response runs to the limit
        variants[name] = {
            "train": lambda m=model, o=opt: train_step(m.train(), o, seq, a.prompt_tokens),
            "generate": lambda m=model, c=config: generate(m.eval(), ids, c),
        }
    compile_s, runs = {}, {(n, p): [] for n in variants for p in ("train", "generate")}
    for name, calls in variants.items():  # warm-up: the compiled copy compiles here (each shape, each mode)
        for piece, call in calls.items():
            start = time.perf_counter()
            for _ in range(2):
                call()
            if name == "compiled":
                compile_s[piece] = time.perf_counter() - start
    out = generate(reference[0].eval(), ids, reference[1])
    assert out.shape == (a.batch, a.prompt_tokens + a.new_tokens), f"a response ended early: {tuple(out.shape)}"
    for _ in range(a.rounds):
        for name, calls in variants.items():
            for piece, call in calls.items():
                runs[name, piece].append(median_s(call, a.steps))
    row = {"hidden": int(path.name.split("-h")[1]), "compile_s": compile_s}
    for piece in ("train", "generate"):
        eager, compiled = statistics.median(runs["eager", piece]), statistics.median(runs["compiled", piece])
        row[piece] = {"eager_s": eager, "compiled_s": compiled, "eager_over_compiled": eager / compiled,
                      "eager_runs_s": runs["eager", piece], "compiled_runs_s": runs["compiled", piece]}  # fmt: skip
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--batch", type=int, default=32, help="sequences (trl_compare's GRPO: 8 prompts × 4)")
    parser.add_argument("--prompt-tokens", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="calls per round")
    parser.add_argument("--json", type=Path, default=None)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="chatrlhf-compile-") as tmp:
        rows = [measure(build_model(Path(tmp), h), a) for h in a.hidden]
    print(f"torch {torch.__version__}, {a.threads} thread(s), batch {a.batch}, {a.prompt_tokens} + {a.new_tokens} "
          f"tokens; median of {a.rounds} rounds × {a.steps} calls")  # fmt: skip
    print(fmt_table(
        ["hidden", "piece", "eager s", "compiled s", "eager ÷ compiled", "compiling s"],
        [[str(r["hidden"]), p, f"{r[p]['eager_s']:.3f}", f"{r[p]['compiled_s']:.3f}",
          f"{r[p]['eager_over_compiled']:.2f}", f"{r['compile_s'][p]:.1f}"]
         for r in rows for p in ("train", "generate")],
    ))  # fmt: skip
    if a.json:
        write_json(a.json, {"machine": machine_summary(), "settings": vars(a) | {"json": None}, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
