"""`Generator.complete`: per-request sampling, stop strings and streaming, the same in both backends.

The sampling filters are checked against transformers' own warpers, the inverse-CDF draw against each token's
probability interval found by a plain loop, the text assembly on hand-built cases, and both backends on a tiny
llama after a 300-step SFT (so that greedy answers vary and end with EOS): greedy completions are those of
`generate(greedy=True)` and the same in `hf` and `vllm`; seeded ones repeat and do not depend on the rest of the
batch; stop strings, max_new_tokens and streaming behave alike.

The vLLM half needs vLLM (the CPU build); CI sets CHATRLHF_REQUIRE_VLLM=1 so that it fails there instead of skipping.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from chatrlhf.config import GenerationConfig, RolloutConfig
from chatrlhf.data.collate import prompt_ids, render_prompt
from chatrlhf.engine.generation import (
    HFGenerator,
    Request,
    Sampling,
    TextStream,
    draw_tokens,
    held_back,
    stop_index,
    warp_logits,
)
from chatrlhf.models.load import load_causal_lm, load_tokenizer

CPU = torch.device("cpu")
PROMPTS = ["Name 3 words that begin with m.", "Give me 2 words starting with t.", "List 4 words that start with s."]


# ------------------------------------------------------------------------------------------- filters and draws


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.8), (0.5, 5, 0.6)])
def test_warp_logits_is_transformers_warpers_in_their_order(temperature, top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    b = logits.shape[0]
    ours = warp_logits(logits, torch.full((b,), temperature), torch.full((b,), top_k), torch.full((b,), top_p))
    assert torch.equal(torch.isfinite(ours), torch.isfinite(expected))
    kept = torch.isfinite(expected)
    assert torch.allclose(ours[kept], expected[kept], atol=1e-6)


def test_warp_logits_takes_each_rows_own_settings():
    torch.manual_seed(1)
    logits = torch.randn(2, 30)
    ours = warp_logits(logits, torch.tensor([1.0, 0.5]), torch.tensor([3, 0]), torch.tensor([1.0, 0.5]))
    assert int(torch.isfinite(ours[0]).sum()) == 3
    alone = warp_logits(logits[1:], torch.tensor([0.5]), torch.tensor([0]), torch.tensor([0.5]))
    assert torch.equal(torch.isfinite(ours[1]), torch.isfinite(alone[0]))


def test_draw_tokens_picks_the_token_whose_probability_interval_holds_u():
    logits = torch.log(torch.tensor([[0.1, 0.0, 0.3, 0.6], [0.25, 0.25, 0.25, 0.25]]))
    for row in range(2):
        probs = [float(p) for p in logits[row].exp()]
        low = 0.0
        for token, p in enumerate(probs):  # [low, low + p) is the token's interval
            if p > 0:
                u = torch.tensor([low + p / 2] * 2)
                assert int(draw_tokens(logits, u)[row]) == token
            low += p
    assert int(draw_tokens(logits, torch.tensor([0.0, 0.0]))[0]) == 0  # never a zero-probability token
    assert int(draw_tokens(logits, torch.tensor([0.9999999, 0.9999999]))[0]) == 3


# ------------------------------------------------------------------------------------------- text and stops


def test_stop_index_and_held_back():
    assert stop_index("hello world", ["wor", "lo"]) == 3
    assert stop_index("hello", ["x"]) is None
    assert held_back("abc", ["bcd"]) == 2  # "bc" may become "bcd"
    assert held_back("abc", ["cx", "abcz"]) == 3
    assert held_back("abc", ["x"]) == 0
    assert held_back("ab\ufffd\ufffd", []) == 2  # an unfinished UTF-8 character


@pytest.fixture(scope="module")
def tok(tiny_dirs):
    return load_tokenizer(str(tiny_dirs["llama"]))


def pieces(tok, text: str, stop=(), extra: list[int] = ()) -> tuple[list[str], TextStream]:
    stream = TextStream(tok, stop)
    ids = tok(text, add_special_tokens=False)["input_ids"] + list(extra)
    out = [stream.add([t]) for t in ids]
    out.append(stream.finish())
    return out, stream


def test_text_stream_cuts_before_a_stop_string_across_tokens(tok):
    out, stream = pieces(tok, "one two three", stop=["wo", "e t"])
    assert stream.text == "on" and "".join(out) == "on" and stream.stopped
    # the tokens end with the one that completed the earliest stop string, "e t"; later ones are not taken
    assert tok.decode(stream.tokens) == "one t"


def test_text_stream_holds_back_only_what_is_undecided(tok):
    out, stream = pieces(tok, "abcabd", stop=["abx"])
    # "a" and "ab" could start "abx": held back until the next token decides
    assert out == ["", "", "abc", "", "", "abd", ""]
    assert stream.text == "abcabd" and not stream.stopped


def test_text_stream_waits_for_a_whole_utf8_character_and_skips_eos(tok):
    out, stream = pieces(tok, "né", extra=[tok.eos_token_id])
    assert "\ufffd" not in "".join(out) and stream.text == "né"
    assert stream.tokens[-1] == tok.eos_token_id


# ------------------------------------------------------------------------------------------- the hf backend


@pytest.fixture(scope="module")
def hf(sft_llama):
    tok = load_tokenizer(str(sft_llama))
    model = load_causal_lm(str(sft_llama), tok, "float32", CPU)
    return HFGenerator(model, tok, GenerationConfig(max_new_tokens=24))


def ids(tok) -> list[list[int]]:
    return [prompt_ids(tok, render_prompt(tok, p)) for p in PROMPTS]


def greedy(n: int = 24, **kw) -> Sampling:
    return Sampling(max_new_tokens=n, temperature=0.0, **kw)


def test_hf_greedy_completions_are_generate_greedy(hf):
    prompts = ids(hf.tokenizer)
    ref = hf.generate(prompts, greedy=True)
    out = hf.complete([Request(p, greedy()) for p in prompts])
    for i, c in enumerate(out):
        n = int(ref.mask[i].sum())
        assert c.tokens == ref.tokens[i, :n].tolist()
        assert c.finish_reason == ref.finish_reasons[i]
        assert c.text == hf.tokenizer.decode(c.tokens, skip_special_tokens=True)
    assert len({c.text for c in out}) > 1 and any(c.finish_reason == "stop" for c in out)


def test_hf_streamed_pieces_add_up_to_each_completion(hf):
    prompts = ids(hf.tokenizer)
    seen: dict[int, list[str]] = {i: [] for i in range(len(prompts))}
    finished = []

    def on_update(i, text, done):
        assert i not in finished, "an update after the request finished"
        seen[i].append(text)
        if done is not None:
            finished.append(i)

    out = hf.complete([Request(p, Sampling(max_new_tokens=24, temperature=0.8, seed=i)) for i, p in enumerate(prompts)],
                      on_update)  # fmt: skip
    assert sorted(finished) == [0, 1, 2]
    for i, c in enumerate(out):
        assert "".join(seen[i]) == c.text
        assert len([t for t in seen[i] if t]) > 1  # streamed in pieces, not at the end


def test_hf_seeded_sampling_repeats_and_does_not_depend_on_the_batch(hf):
    prompts = ids(hf.tokenizer)
    s = Sampling(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=7)
    alone = hf.complete([Request(prompts[0], s)])[0]
    again = hf.complete([Request(prompts[0], s)])[0]
    mixed = hf.complete(
        [Request(prompts[1], greedy(10)), Request(prompts[0], s), Request(prompts[2], Sampling(seed=1))]
    )
    assert alone.tokens == again.tokens == mixed[1].tokens
    others = {
        tuple(hf.complete([Request(prompts[0], Sampling(max_new_tokens=24, seed=k))])[0].tokens) for k in range(4)
    }
    assert len(others) > 1


def test_hf_stop_strings_and_max_new_tokens_per_request(hf):
    prompts = ids(hf.tokenizer)
    full = hf.complete([Request(p, greedy()) for p in prompts])
    word = full[0].text.strip().split()[1]
    out = hf.complete([Request(prompts[0], greedy(stop=(word,))), Request(prompts[1], greedy(3))])
    assert out[0].text == full[0].text[: full[0].text.index(word)] and out[0].finish_reason == "stop"
    assert out[0].tokens == full[0].tokens[: len(out[0].tokens)]
    assert hf.tokenizer.decode(out[0].tokens).endswith(word)
    assert len(out[1].tokens) == 3 and out[1].finish_reason == "length"
    assert out[1].tokens == full[1].tokens[:3]


# ------------------------------------------------------------------------------------------- the vllm backend


@pytest.fixture(scope="module")
def vllm(sft_llama):
    if os.environ.get("CHATRLHF_REQUIRE_VLLM") != "1":
        pytest.importorskip("vllm")
    from chatrlhf.engine.vllm import VLLMGenerator

    tok = load_tokenizer(str(sft_llama))
    rollout = RolloutConfig(backend="vllm", cpu_kv_cache_gib=0.25)
    gen = VLLMGenerator(str(sft_llama), tok, GenerationConfig(max_new_tokens=24), rollout, "float32", 128, CPU)
    yield gen
    gen.close()  # the engine's process group would otherwise outlive the module (and later in-process runs)
    assert not torch.distributed.is_initialized()


def test_vllm_greedy_completions_are_hfs(hf, vllm):
    prompts = ids(hf.tokenizer)
    ours = hf.complete([Request(p, greedy()) for p in prompts])
    theirs = vllm.complete([Request(p, greedy()) for p in prompts])
    assert [c.tokens for c in theirs] == [c.tokens for c in ours]
    assert [(c.text, c.finish_reason) for c in theirs] == [(c.text, c.finish_reason) for c in ours]


def test_vllm_stop_strings_and_max_new_tokens_are_hfs(hf, vllm):
    prompts = ids(hf.tokenizer)
    word = hf.complete([Request(prompts[0], greedy())])[0].text.strip().split()[1]
    requests = [Request(prompts[0], greedy(stop=(word, "zzz"))), Request(prompts[1], greedy(3))]
    ours, theirs = hf.complete(requests), vllm.complete(requests)
    assert [(c.tokens, c.text, c.finish_reason) for c in theirs] == [(c.tokens, c.text, c.finish_reason) for c in ours]


def test_vllm_seeded_sampling_repeats_and_streams(vllm, hf):
    prompts = ids(hf.tokenizer)
    s = Sampling(max_new_tokens=24, temperature=1.0, top_k=20, seed=3)
    seen: list[str] = []
    first = vllm.complete([Request(prompts[0], s)], lambda i, text, done: seen.append(text))[0]
    mixed = vllm.complete([Request(prompts[1], greedy()), Request(prompts[0], s)])
    assert first.tokens == mixed[1].tokens
    assert "".join(seen) == first.text and len([t for t in seen if t]) > 1
    draws = {
        tuple(vllm.complete([Request(prompts[0], Sampling(max_new_tokens=24, seed=k))])[0].tokens) for k in range(4)
    }
    assert len(draws) > 1
