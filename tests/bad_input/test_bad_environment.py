"""An environment that cannot do what was asked: a device this machine does not have, or a dtype its device cannot
run. Refused when the stage starts, naming the option, before anything is written."""

from __future__ import annotations

import re

import pytest
import torch

from .conftest import jsonl

GOOD = [{"prompt": "p", "response": "r"}] * 4


@pytest.fixture()
def data(tmp_path):
    return jsonl(tmp_path / "d.jsonl", GOOD)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_cuda(sft, fail, data):
    err = fail(sft(data, "--run.device", "cuda"))
    assert re.search(
        rf"run\.device=cuda: PyTorch {re.escape(torch.__version__)} finds no cuda device on this machine.*; use "
        r"--run\.device cpu \(or auto\)",
        err,
    ), err


@pytest.mark.parametrize("device", ["mps", "xpu"])
def test_accelerator_this_machine_lacks(device, sft, fail, data):
    available = torch.backends.mps.is_available() if device == "mps" else torch.xpu.is_available()
    if available:
        pytest.skip(f"this machine has {device}")
    err = fail(sft(data, "--run.device", device))
    assert re.search(rf"run\.device={device}: PyTorch .* finds no {device} device on this machine; use", err), err


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda:-1"])
def test_device_string_that_is_not_a_device(device, sft, fail, data):
    err = fail(sft(data, "--run.device", device))
    assert re.search(rf"run\.device: '{re.escape(device)}' is not a device; expected auto, cpu, or an accelerator", err)


def test_device_type_chatrlhf_does_not_train_on(sft, fail, data):
    err = fail(sft(data, "--run.device", "meta"))
    assert re.search(r"run\.device=meta: chatrlhf trains on cpu, cuda, mps, xpu, not meta", err), err


def test_device_index_past_the_last_device(sft, fail, data, monkeypatch):
    """cuda:3 on a machine with one GPU (simulated: the check runs before anything touches the device)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    err = fail(sft(data, "--run.device", "cuda:3"))
    assert re.search(r"run\.device=cuda:3: there is no cuda device 3; this machine has 1 \(cuda:0\)", err), err


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_float16_on_the_cpu(device, sft, fail, data):
    if device == "auto" and torch.cuda.is_available():
        pytest.skip("auto picks CUDA here")
    err = fail(sft(data, "--run.device", device, "--run.dtype", "float16"))
    assert re.search(
        rf"run\.dtype=float16 on the CPU \(run\.device={device}\): sampling in float16 fails on the CPU \(NaN "
        r"probabilities\), so RL and the evaluation cannot run; use --run\.dtype bfloat16 or float32 there",
        err,
    ), err


def test_bfloat16_on_the_cpu_is_accepted(sft, data, out):
    """bfloat16 runs on the CPU (matmuls, training and sampling): not refused."""
    from chatrlhf.cli import main

    assert main(sft(data, "--run.device", "cpu", "--run.dtype", "bfloat16")) == 0
    assert (out / "model" / "config.json").is_file()
