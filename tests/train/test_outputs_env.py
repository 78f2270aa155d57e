"""The `env/*` keys every summary.json records: the CPU's name and its family/model/stepping parsed from
/proc/cpuinfo's text, and torch's CPU capability (the kernels torch picked, which decide the float results)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from chatrlhf.train.outputs import cpu_id, cpu_name, environment

# The first two CPUs of a 2-vCPU AMD EPYC VM's /proc/cpuinfo, abridged.
EPYC = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 26
model		: 2
model name	: AMD EPYC
stepping	: 1
flags		: fpu vme avx2 avx512f

processor	: 1
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 1
model name	: Another
stepping	: 0
"""

# An arm64 machine's: no family, model or stepping lines of that kind, no model name.
ARM = """processor	: 0
BogoMIPS	: 50.00
CPU implementer	: 0x41
CPU architecture: 8
CPU part	: 0xd0c
"""


def test_cpu_id_is_the_first_cpus_family_model_and_stepping():
    assert cpu_id(EPYC) == "family 26 model 2 stepping 1"
    assert cpu_name(EPYC) == "AMD EPYC"


def test_cpu_id_is_unknown_without_those_lines():
    assert cpu_id(ARM) == "unknown" and cpu_id("") == "unknown"


def test_environment_records_this_machines_cpu_id_and_torchs_capability():
    env = environment()
    assert env["env/cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    found = [re.search(rf"^{key}\s*:\s*(\S+)", info, re.M) for key in ("cpu family", "model", "stepping")]
    expected = "unknown" if not all(found) else "family {} model {} stepping {}".format(*(m[1] for m in found))
    assert env["env/cpu_id"] == expected
