"""The instruction set each framework computes with, and the CPU choices that
read it: what a framework reports, what its caps change, and each backend's
rules per instruction set (``kerasbn._isa``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kerasbn import _isa as isa
from tests.conftest import BACKEND

AVX512_FLAGS = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"}
CAPS = {  # benchmarks/harness.py's ``--isa avx2``
    "TF_ENABLE_ONEDNN_OPTS": "0",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "XLA_FLAGS": "--xla_cpu_max_isa=AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
}


@pytest.mark.parametrize(
    "flags, cap, expected",
    [
        (AVX512_FLAGS, None, "avx512"),
        (AVX512_FLAGS, "ALL", "avx512"),
        (AVX512_FLAGS, "AVX512_CORE", "avx512"),
        (AVX512_FLAGS, "avx512_core_amx", "avx512"),
        (AVX512_FLAGS, "AVX2", "avx2"),
        (AVX512_FLAGS, "avx2_vnni", "avx2"),
        (AVX512_FLAGS, "AVX", "other"),
        (AVX512_FLAGS, "SSE4_2", "other"),
        (AVX512_FLAGS - {"avx512bw"}, None, "avx2"),  # AVX-512F alone: no level
        ({"avx2", "fma"}, None, "avx2"),
        ({"avx2", "fma"}, "AVX512_CORE", "avx2"),  # a cap never widens
        ({"avx2"}, None, "other"),  # AVX2 without FMA
        (set(), None, "other"),  # another architecture
    ],
)
def test_instruction_set_is_the_widest_the_cpu_has_and_the_cap_allows(
    flags, cap, expected
):
    assert isa.instruction_set(cap, flags=flags) == expected


def test_device_names_carry_the_instruction_set_and_libraries():
    assert isa.cpu_device(isa.AVX2, isa.ONEDNN) == "cpu:avx2:onednn"
    assert isa.device_isa("cpu:avx2:onednn") == "avx2"
    assert isa.device_isa("cpu") == "other"
    assert isa.device_isa("cuda") is None
    assert isa.uses("cpu:avx512:onednn", isa.ONEDNN)
    assert not isa.uses("cpu:avx512", isa.ONEDNN)
    assert isa.resolve("cpu", "cpu:avx2") == "cpu:avx2"
    assert isa.resolve("gpu", "cpu:avx2") == "gpu"
    with pytest.raises(ValueError, match=r"`isa` must be one of .*got isa='sse'"):
        isa.cpu_device("sse")


def test_cpu_flags_agree_with_numpy():
    flags = isa.cpu_flags()
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as numpy_sees
    except ImportError:
        pytest.skip("this NumPy does not expose its CPU features")
    assert ("avx2" in flags) == bool(numpy_sees.get("AVX2"))
    assert ("avx512f" in flags) == bool(numpy_sees.get("AVX512F"))


def _report(environ: dict[str, str]) -> dict:
    """The framework's own report and kerasbn's CPU device, in a fresh process
    with ``environ`` added (the caps are read when a framework starts)."""
    code = f"""
import json, os
os.environ["KERAS_BACKEND"] = {BACKEND!r}
from kerasbn.backends import {BACKEND} as module
report = {{"device": module.CPU_DEVICE}}
if {BACKEND!r} == "tensorflow":
    from tensorflow.python.util import _pywrap_util_port
    report["framework"] = bool(_pywrap_util_port.IsMklEnabled())
elif {BACKEND!r} == "torch":
    import torch
    report["framework"] = torch.backends.cpu.get_cpu_capability()
else:
    import jax
    report["framework"] = jax.devices()[0].platform
print(json.dumps(report))
"""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **environ}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not {"avx2", "fma"} <= isa.cpu_flags(), reason="the CPU has no AVX2 and FMA"
)
def test_each_framework_reports_the_avx2_cap_and_kerasbn_reads_it():
    capped = _report(CAPS)
    assert capped["device"] == "cpu:avx2"
    if BACKEND == "tensorflow":
        assert capped["framework"] is False  # oneDNN off, as on an AVX2 CPU
    if BACKEND == "torch":
        assert capped["framework"] == "AVX2"
    native = _report({})
    if BACKEND == "torch":  # ATen's own report names kerasbn's instruction set
        assert isa.device_isa(native["device"]) == native["framework"].lower()
    else:
        assert isa.device_isa(native["device"]) == isa.instruction_set(
            os.environ.get("ONEDNN_MAX_CPU_ISA") if BACKEND == "tensorflow" else None
        )
    if BACKEND == "tensorflow":  # ":onednn" exactly where TensorFlow says so
        assert isa.uses(native["device"], isa.ONEDNN) == native["framework"]


# ---------------------------------------------------------------- the rules
def _tensorflow(shape, axes, device, training=True):
    from kerasbn.backends import tensorflow as tf_backend

    plan = tf_backend.formulation(shape, axes, device=device, training=training)
    return plan.formulation, plan


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the TensorFlow fast path")
@pytest.mark.parametrize(
    "device", ["cpu:avx512:onednn", "cpu:avx2:onednn", "cpu:avx512", "cpu:avx2"]
)
def test_tensorflow_rules_of_each_measured_cpu(device):
    from kerasbn.backends import tensorflow as tf_backend

    rules = tf_backend.CPU_RULES[device]
    conv = (32, 56, 56, 64), [0, 1, 2]
    # Large channels-last inputs take the fused kernel, in training and inference.
    assert _tensorflow(*conv, device)[0] == "fused"
    assert _tensorflow(*conv, device, training=False)[0] == "fused"
    # Few channels: a view whose rows fill whole vectors of the CPU's width.
    name, plan = _tensorflow((32, 24, 24, 10), [0, 1, 2], device)
    assert name == "widened"
    k = tf_backend._widening(plan)
    assert (k * 10) % rules.vector_width == 0 and (32 * 24 * 24) % k == 0
    # Channels first, and small inputs: the composite.
    assert _tensorflow((32, 64, 56, 56), [0, 2, 3], device)[0] == "composite"
    assert _tensorflow((32, 100), [0], device)[0] == "composite"


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the TensorFlow fast path")
@pytest.mark.parametrize("device", ["cpu:other", "cpu:other:onednn"])
def test_tensorflow_unmeasured_cpu_takes_the_composite(device):
    for shape, axes in [((32, 56, 56, 64), [0, 1, 2]), ((32, 24, 24, 10), [0, 1, 2])]:
        assert _tensorflow(shape, axes, device)[0] == "composite"
        assert _tensorflow(shape, axes, device, training=False)[0] == "affine"


@pytest.mark.skipif(BACKEND != "jax", reason="the JAX fast path")
def test_jax_rough_statistics_per_instruction_set():
    from kerasbn.backends import jax as jax_backend

    shape, axes = (32, 56, 56, 64), [0, 1, 2]
    for device, expected in [
        ("cpu:avx512", "rough"),
        ("cpu:avx2", "rough"),
        ("cpu:other", "shifted"),  # unmeasured: the exact shifted statistics
    ]:
        assert jax_backend.formulation(shape, axes, device=device).formulation == (
            expected
        )
    small = jax_backend.formulation((32, 24, 24, 10), axes, device="cpu:avx2")
    assert small.formulation == "shifted"


@pytest.mark.skipif(BACKEND != "torch", reason="the PyTorch fast path")
def test_torch_matvec_per_instruction_set():
    from kerasbn.backends import torch as torch_backend

    shape, axes = (32, 24, 24, 10), [0, 1, 2]

    def name(device, shape=shape):
        return torch_backend.formulation(shape, axes, device=device).formulation

    assert name("cpu:avx512") == name("cpu:avx2") == "matvec"
    assert name("cpu:other") == "channels_last"  # unmeasured: torch's own views
    assert name("cpu:avx2", (32, 24, 24, 16)) == "channels_last"  # full vectors
    assert name("cpu:avx2", (2, 24, 24, 10)) == "channels_last"  # few samples
