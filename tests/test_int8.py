"""W8A8 (`quantization="w8a8"`, models/int8.py): int8 weights per channel x int8 activations per
token, int32 sums: exact integer arithmetic, rows independent of the batch, close to float."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llm

from forkllm import SamplingParams
from forkllm.engine.config import EngineConfig
from forkllm.models import loader
from forkllm.models.int8 import Int8Linear, cpu_has_int8_dot, quantize_rows
from forkllm.models.loader import load_model


@pytest.fixture
def any_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let w8a8 load on a CPU without VNNI (slow there, but the numerics are what is tested)."""
    monkeypatch.setattr(loader, "cpu_has_int8_dot", lambda: True)


def test_quantize_rows_is_symmetric_per_channel() -> None:
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [-4.0, 4.0, 1.0]])
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.shape == (3,)
    assert q[0].tolist() == [64, -127, 32] and q[2].tolist() == [-127, 127, 32]
    assert q[1].tolist() == [0, 0, 0]  # an all-zero row stays zero (no division by zero)
    assert torch.allclose(q.float() * s[:, None], w, atol=float(s.max()) / 2 + 1e-7)


def test_forward_equals_integer_reference_and_is_near_float() -> None:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    x = torch.randn(5, 64, generator=g)
    lin = Int8Linear(w, b)
    # the same numerics written out: per-row activation scale, exact int32 sum, both scales
    xs = x.abs().amax(dim=1, keepdim=True) / 127
    xq = torch.round(x / xs).to(torch.int32)
    ref = (xq @ lin.wq.to(torch.int32)).float() * xs * lin.scale + b
    assert torch.equal(lin(x, float_out=True), ref)
    err = (lin(x, float_out=True) - (x @ w.t() + b)).abs().max()
    assert err < 0.05 * (x @ w.t()).abs().max()
    assert lin(x.bfloat16()).dtype == torch.bfloat16
    assert lin(x[:0]).shape == (0, 48)


def test_rows_do_not_depend_on_the_batch() -> None:
    """Exact int32 sums and per-row scales: a row alone equals the same row among 64."""
    g = torch.Generator().manual_seed(1)
    lin = Int8Linear(torch.randn(96, 128, generator=g))
    x = torch.randn(64, 128, generator=g).bfloat16()
    full = lin(x)
    for i in (0, 17, 63):
        assert torch.equal(lin(x[i : i + 1]), full[i : i + 1])
    assert torch.equal(lin(x[5:13]), full[5:13])


def test_silu_forward_of_a_fused_gate_up() -> None:
    g = torch.Generator().manual_seed(2)
    lin = Int8Linear(torch.randn(32, 16, generator=g))
    x = torch.randn(3, 16, generator=g)
    gu = lin(x, float_out=True)
    assert torch.allclose(lin.silu_forward(x), torch.nn.functional.silu(gu[:, :16]) * gu[:, 16:])


def test_engine_runs_w8a8_and_batches_give_the_rows_alone(any_cpu: None) -> None:
    llm = tiny_llm(quantization="w8a8")
    assert llm.engine.load_info.quantization == "w8a8"
    assert sum(isinstance(m, Int8Linear) for m in llm.engine.runner.model.modules()) == 4 * 2  # 2 layers
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13], [40, 41, 42, 43, 44, 45, 46]]
    batch = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    llm.engine.kv.pool.drop_cached()
    alone = [llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert batch == alone


def test_w8a8_is_a_cpu_option_named_in_errors(any_cpu: None) -> None:
    with pytest.raises(ValueError, match="w8a8"):
        EngineConfig(quantization="w8a9")
    with pytest.raises(ValueError, match="quantization='w8a8' runs on CPU only"):
        load_model("tiny", load_format="dummy", quantization="w8a8", device="cuda")


def test_w8a8_refuses_a_cpu_without_int8_dot_products(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(loader, "cpu_has_int8_dot", lambda: False)
    with pytest.raises(ValueError, match="quantization='w8a8' needs a CPU with int8 dot-product"):
        load_model("tiny", load_format="dummy", quantization="w8a8")
    flags = tmp_path / "cpuinfo"
    flags.write_text("processor : 0\nflags : fpu avx2 fma\n")
    assert not cpu_has_int8_dot(str(flags))
    flags.write_text("processor : 0\nflags : fpu avx2 avx512_vnni\n")
    assert cpu_has_int8_dot(str(flags))
