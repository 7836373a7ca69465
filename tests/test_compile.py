"""run.compile: the towers' transformer blocks under torch.compile (inductor, on the CPU)
give one training step the eager loss and gradients, with no graph break; CLIP-PGS compiles
with the static-length compaction (what pgs.compaction=auto resolves to under compile) and is
refused with batch_min."""

from __future__ import annotations

import pytest
import torch

from training.compilation import compile_metrics, compile_towers, graph_breaks, transformer_blocks
from training.config import apply_overrides
from training.loop import LoopSettings, train_step
from training.methods.recipes import build_method_config
from training.model import build_training_model
from training.objectives import build_training_objective
from training.optim import build_scheduler
from tests.test_accumulation import ARCH, assert_equal_gradients, make_batch

pytestmark = [pytest.mark.usefixtures("single_torch_thread"), pytest.mark.slow]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def one_step(method: str, overrides: dict, compiled: bool) -> tuple[torch.Tensor, dict]:
    """(loss, every parameter's gradient) of one step from the same seeded model and batch."""
    config = apply_overrides(
        build_method_config(method),
        {"model.arch": ARCH, "loss.learn_temperature": True, "run.compile": compiled, **overrides},
    )
    torch.manual_seed(0)
    model = build_training_model(config)
    if compiled:
        assert compile_towers(model) == len(transformer_blocks(model)) == 4  # 2 blocks per tower
    objective = build_training_objective(config, 0, 1, model, torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    settings = LoopSettings(0, 1, 0, 0, 1, torch.device("cpu"), grad_clip_norm=1e9)
    for module in model.modules():  # the selectors' draws, seeded as the loop does
        if hasattr(module, "generator"):
            module.generator = torch.Generator().manual_seed(7)
    metrics = train_step(
        model,
        objective,
        optimizer,
        build_scheduler(optimizer, 1, 10),
        make_batch(model.tower.context_length),
        settings,
        step=0,
    )
    return metrics["loss/total"], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method, overrides", [("clip", {}), ("pgs0.5", {"pgs.compaction": "static"})])
def test_a_compiled_step_equals_the_eager_one(method, overrides, fresh_dynamo):
    eager_loss, eager = one_step(method, overrides, compiled=False)
    assert compile_metrics() == {}  # nothing compiled yet: no compile/ figures in the reports
    loss, grads = one_step(method, overrides, compiled=True)
    metrics = compile_metrics()
    # one graph per tower's block (its siblings reuse it), forward and backward, no break
    assert metrics["compile/graphs"] >= 2 and metrics["compile/graph_breaks"] == 0, graph_breaks()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(eager)
    # fused kernels sum in another order: errors relative to each tensor's scale (seen: <= 3e-6)
    assert_equal_gradients(
        {n: (grads[n] - g).abs().max().item() / (g.abs().max().item() + 1e-12) for n, g in eager.items()}
    )


def test_pgs_under_compile_uses_the_static_compaction_and_refuses_batch_min():
    from training.methods.recipes import resolve_auto_fields

    config = apply_overrides(build_method_config("pgs0.5"), {"model.arch": ARCH, "run.compile": True})
    assert resolve_auto_fields(config).pgs.compaction == "static"
    eager = apply_overrides(config, {"run.compile": False})
    assert resolve_auto_fields(eager).pgs.compaction == "batch_min"
    flip = apply_overrides(build_method_config("flip"), {"model.arch": ARCH, "run.compile": True})
    assert resolve_auto_fields(flip).pgs.compaction == "batch_min"  # what runs without PGS always saved
    with pytest.raises(ValueError, match="pgs.compaction=static"):
        build_training_model(apply_overrides(config, {"pgs.compaction": "batch_min"}))


def test_an_unknown_backend_is_named():
    config = apply_overrides(build_method_config("clip"), {"model.arch": ARCH, "run.compile_backend": "tvm"})
    with pytest.raises(ValueError, match="compile_backend='tvm'.*inductor"):
        build_training_model(config)
