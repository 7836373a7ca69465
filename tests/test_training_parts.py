"""The parts around the loop: configuration, method recipes, optimizer groups and schedule,
the temperature clamp, checkpoints (exact round trip, completeness, latest-complete pick),
the open_clip export and the inference rebuild."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from training import checkpoint, export
from training.config import (
    MaskingConfig,
    ModelConfig,
    OptimConfig,
    Temperature,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    temperature_of,
)
from training.inference import load_inference_model
from training.methods.recipes import METHODS, build_method_config
from training.model import build_model
from training.optim import build_optimizer, build_param_groups, build_scheduler, compute_lr_factor
from training.towers import build_tokenizer, register_tiny_configs

ARCH = "clip-micro-p8-32"


pytestmark = pytest.mark.usefixtures("single_torch_thread")  # see conftest


def test_config_round_trips_through_json():
    config = apply_overrides(
        build_method_config("flip"),
        {
            "model.arch": ARCH,
            "optim.lr": 1e-3,
            "optim.betas": (0.9, 0.95),
            "data.crop_scale": (0.5, 1.0),
            "run.max_steps": 7,
            "run.tensorboard_dir": "/tmp/tb",
        },
    )
    restored = config_from_dict(json.loads(json.dumps(config_to_dict(config))))
    assert restored == config
    assert isinstance(restored.data.crop_scale, tuple) and isinstance(restored.optim.betas, tuple)


def test_string_overrides_take_the_field_type():
    config = apply_overrides(
        TrainConfig(),
        {
            "optim.lr": "0.001",
            "run.max_steps": "12",
            "data.crop_scale": "[0.5, 1.0]",
            "run.name": "abc",
            "run.use_gpu": "true",
            "run.seed": "3",
            "method": "flip",
        },
    )
    assert config.optim.lr == 0.001 and config.run.max_steps == 12 and config.run.seed == 3
    assert config.data.crop_scale == (0.5, 1.0) and config.run.name == "abc"
    assert config.run.use_gpu is True and config.method == "flip"
    assert apply_overrides(config, {"run.max_steps": "None"}).run.max_steps is None


def test_string_override_of_optional_path_field():
    """`--pretrained /x.pt`: an unset optional field takes a plain (non-JSON) string as is."""
    config = apply_overrides(TrainConfig(), {"model.pretrained": "/ckpt/model.pt", "run.tensorboard_dir": "/tmp/tb"})
    assert config.model.pretrained == "/ckpt/model.pt"
    assert config.run.tensorboard_dir == "/tmp/tb"


@pytest.mark.parametrize("dotted, value", [("optim.lr", "fast"), ("data.crop_scale", "(0.5, 1)")])
def test_unparsable_string_override_is_an_error(dotted, value):
    with pytest.raises(ValueError, match="cannot parse"):
        apply_overrides(TrainConfig(), {dotted: value})


@pytest.mark.parametrize("dotted", ["optim.lrr", "nonsense", "run.optim.lr"])
def test_unknown_config_field_is_an_error(dotted):
    with pytest.raises(ValueError, match="unknown config field"):
        apply_overrides(TrainConfig(), {dotted: 1})


def test_unknown_field_error_lists_known_fields():
    with pytest.raises(ValueError, match=r"'lrr'.*lr, weight_decay"):
        apply_overrides(TrainConfig(), {"optim.lrr": 1})


def test_method_configs_and_unknown_method():
    flip = build_method_config("flip")
    assert flip.method == "flip" and flip.masking == MaskingConfig("random", 0.5)
    assert build_method_config("clip").masking == MaskingConfig("none", 0.0)
    with pytest.raises(ValueError) as error:
        build_method_config("no-such-method")
    message = str(error.value)
    assert "no-such-method" in message
    assert all(name in message for name in METHODS)


# ---------------------------------------------------------------- optimizer and schedule


@pytest.fixture(scope="module")
def micro_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(ARCH), MaskingConfig("random", 0.5), Temperature())


def expected_no_decay(name: str) -> bool:
    """Written out independently of training.optim: biases, LayerNorm gains, embeddings of
    tokens, positions and the class token, and the temperature."""
    return name.endswith("bias") or ".ln_" in name or "embedding" in name or name == "tower.logit_scale"


def test_param_groups_by_name(micro_model):
    groups = build_param_groups(micro_model, weight_decay=0.2)
    by_group = {g["name"]: g for g in groups}
    assert by_group["decay"]["weight_decay"] == 0.2 and by_group["no_decay"]["weight_decay"] == 0.0
    names = {id(p): n for n, p in micro_model.named_parameters()}
    decay = {names[id(p)] for p in by_group["decay"]["params"]}
    no_decay = {names[id(p)] for p in by_group["no_decay"]["params"]}
    for name in (
        "tower.logit_scale",
        "tower.token_embedding.weight",
        "tower.positional_embedding",
        "tower.visual.positional_embedding",
        "tower.visual.class_embedding",
        "tower.visual.ln_pre.weight",
        "tower.ln_final.weight",
        "tower.visual.transformer.resblocks.0.ln_1.weight",
        "tower.transformer.resblocks.1.ln_2.weight",
        "tower.visual.transformer.resblocks.0.attn.in_proj_bias",
        "tower.transformer.resblocks.0.mlp.c_fc.bias",
    ):
        assert name in no_decay, name
    for name in (
        "tower.visual.conv1.weight",
        "tower.visual.proj",
        "tower.text_projection",
        "tower.visual.transformer.resblocks.0.attn.in_proj_weight",
        "tower.visual.transformer.resblocks.1.attn.out_proj.weight",
        "tower.transformer.resblocks.0.mlp.c_fc.weight",
        "tower.transformer.resblocks.1.mlp.c_proj.weight",
    ):
        assert name in decay, name
    assert no_decay == {n for n in names.values() if expected_no_decay(n)}
    assert all(dict(micro_model.named_parameters())[n].ndim >= 2 for n in decay)


def test_every_trainable_parameter_in_exactly_one_group(micro_model):
    model = build_model(ModelConfig(ARCH), MaskingConfig(), Temperature())
    model.tower.visual.conv1.weight.requires_grad_(False)  # frozen parameters stay out
    optimizer = build_optimizer(model, OptimConfig())
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(set(grouped))
    assert sorted(grouped) == sorted(trainable)
    assert id(model.tower.visual.conv1.weight) not in grouped


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.1),
        (4, 0.5),
        (9, 1.0),  # warmup: (step + 1) / 10
        (10, 1.0),  # cosine starts at 1
        (35, 0.5 * (1 + math.cos(math.pi / 4))),  # progress 25 / 100
        (60, 0.5),  # progress 1/2
        (85, 0.5 * (1 + math.cos(3 * math.pi / 4))),
        (110, 0.0),
        (500, 0.0),  # clipped after total_steps
    ],
)
def test_lr_factor_warmup_then_cosine(step, expected):
    assert compute_lr_factor(step, warmup_steps=10, total_steps=110) == pytest.approx(expected, abs=1e-12)


def test_scheduler_applies_the_factor_per_step():
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=2.0)
    scheduler = build_scheduler(optimizer, warmup_steps=4, total_steps=12)
    seen = []
    for _ in range(14):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([2.0 * compute_lr_factor(s, 4, 12) for s in range(14)], abs=1e-12)
    assert seen[3] == pytest.approx(2.0) and seen[8] == pytest.approx(1.0)


def test_logit_scale_clamped_at_max(micro_model):
    model = build_model(ModelConfig(ARCH), MaskingConfig(), Temperature(max_logit_scale=100.0))
    assert model.tower.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        model.tower.logit_scale.fill_(math.log(500.0))
    model.clamp_logit_scale()
    assert model.tower.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-6)
    with torch.no_grad():
        model.tower.logit_scale.fill_(math.log(50.0))
    before = model.tower.logit_scale.clone()
    model.clamp_logit_scale()
    assert torch.equal(model.tower.logit_scale, before)  # inside the range: untouched
    with torch.no_grad():
        model.tower.logit_scale.fill_(-1.0)
    model.clamp_logit_scale()
    assert model.tower.logit_scale.item() == 0.0  # temperature at most 1


# ---------------------------------------------------------------- checkpoints


def micro_config() -> TrainConfig:
    return apply_overrides(build_method_config("flip"), {"model.arch": ARCH, "run.seed": 5})


def make_batch(batch_size: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, 32, 32, generator=g)
    texts = build_tokenizer(ARCH)([f"caption number {i}" for i in range(batch_size)])
    return images, texts


def build_trained_micro(config: TrainConfig, steps: int, seed: int = 0):
    """(model, optimizer, scheduler) after `steps` AdamW steps: optimizer state is non-trivial."""
    from training.methods.clip.loss import ContrastiveLoss

    torch.manual_seed(seed)
    model = build_model(config.model, config.masking, temperature_of(config.loss, config.topology))
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=10)
    images, texts = make_batch()
    for _ in range(steps):
        loss = ContrastiveLoss()(model(images, texts))["contrastive"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


@pytest.fixture(scope="module")
def saved_micro(tmp_path_factory):
    """A micro flip checkpoint after 2 steps, and the objects it was saved from."""
    config = micro_config()
    model, optimizer, scheduler = build_trained_micro(config, steps=2)
    directory = tmp_path_factory.mktemp("run") / "step_00000002"
    checkpoint.save_checkpoint(
        directory, model, optimizer, scheduler, 2, config, {"manifest_digest": "abc123", "code_version": "test"}
    )
    return {"dir": directory, "config": config, "model": model.eval(), "optimizer": optimizer, "scheduler": scheduler}


def normalize_group(group: dict) -> dict:
    """A param group with JSON-compatible values (tuples as lists) for comparison."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}


def test_checkpoint_round_trip_restores_training_state_exactly(saved_micro):
    config = saved_micro["config"]
    model, optimizer, scheduler = build_trained_micro(config, steps=0, seed=1)  # other init
    state = checkpoint.load_training_state(saved_micro["dir"], model, optimizer, scheduler)
    assert state["step"] == 2 and state["manifest_digest"] == "abc123"
    assert checkpoint.load_config(saved_micro["dir"]) == config

    original = saved_micro["model"].state_dict()
    restored = model.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key

    want, got = saved_micro["optimizer"].state_dict(), optimizer.state_dict()
    assert want["state"].keys() == got["state"].keys() and len(want["state"]) > 0
    for index, entries in want["state"].items():
        assert entries.keys() == got["state"][index].keys() >= {"exp_avg", "exp_avg_sq", "step"}
        for name, value in entries.items():
            assert torch.equal(value, got["state"][index][name]), (index, name)
    assert [normalize_group(g) for g in want["param_groups"]] == [normalize_group(g) for g in got["param_groups"]]
    assert scheduler.state_dict() == saved_micro["scheduler"].state_dict()
    assert scheduler.get_last_lr() == saved_micro["scheduler"].get_last_lr()


def save_tiny_checkpoint(directory: Path, step: int) -> Path:
    """A small checkpoint (a linear layer) for file-level tests."""
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = build_scheduler(optimizer, warmup_steps=1, total_steps=5)
    return checkpoint.save_checkpoint(directory, model, optimizer, scheduler, step, TrainConfig(), {})


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage",
    [
        "none",
        "truncate_model",
        "truncate_optimizer",
        "truncate_state",
        "missing_model",
        "missing_optimizer",
        "missing_state",
        "flipped_byte",
    ],
)
def test_is_complete_detects_missing_or_truncated_files(tmp_path, damage):
    directory = save_tiny_checkpoint(tmp_path / "ckpt", step=1)
    model_file = directory / checkpoint.MODEL_FILE
    if damage.startswith("truncate_"):
        name = {"model": checkpoint.MODEL_FILE, "optimizer": checkpoint.OPTIMIZER_FILE, "state": checkpoint.STATE_FILE}[
            damage.split("_")[1]
        ]
        truncate(directory / name)
    elif damage.startswith("missing_"):
        name = {"model": checkpoint.MODEL_FILE, "optimizer": checkpoint.OPTIMIZER_FILE, "state": checkpoint.STATE_FILE}[
            damage.split("_")[1]
        ]
        (directory / name).unlink()
    elif damage == "flipped_byte":
        data = bytearray(model_file.read_bytes())
        data[-1] ^= 0xFF
        model_file.write_bytes(bytes(data))
    assert checkpoint.is_complete(directory) is (damage == "none")
    if damage != "none":
        with pytest.raises(ValueError, match="incomplete"):
            model = nn.Linear(3, 2)
            optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
            checkpoint.load_training_state(directory, model, optimizer, build_scheduler(optimizer, 1, 5))


def test_fetch_checkpoint_picks_highest_complete_step(tmp_path):
    run = tmp_path / "run"
    for step in (2, 10, 4):
        save_tiny_checkpoint(run / f"step_{step:08d}", step)
    truncate(save_tiny_checkpoint(run / "step_00000012", 12) / checkpoint.OPTIMIZER_FILE)
    (save_tiny_checkpoint(run / "step_00000014", 14) / checkpoint.STATE_FILE).unlink()
    assert checkpoint.fetch_checkpoint(str(run)) == run / "step_00000010"
    # A checkpoint directory itself resolves to that directory.
    assert checkpoint.fetch_checkpoint(str(run / "step_00000004")) == run / "step_00000004"


def test_fetch_checkpoint_without_complete_one_is_an_error(tmp_path):
    truncate(save_tiny_checkpoint(tmp_path / "run" / "step_00000001", 1) / checkpoint.MODEL_FILE)
    with pytest.raises(FileNotFoundError):
        checkpoint.fetch_checkpoint(str(tmp_path / "run"))


# ---------------------------------------------------------------- export and inference


def encode(tower: nn.Module, images: torch.Tensor, texts: torch.Tensor):
    with torch.no_grad():
        return tower.encode_image(images, normalize=True), tower.encode_text(texts, normalize=True)


def test_export_loads_in_open_clip_with_same_features(saved_micro, tmp_path):
    import open_clip

    out_file = tmp_path / "export.pt"
    assert export.export_open_clip(str(saved_micro["dir"].parent), str(out_file)) == str(out_file)
    register_tiny_configs()
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded, _, preprocess_val = open_clip.create_model_and_transforms(ARCH, pretrained=str(out_file))
    loaded.eval()
    images, texts = make_batch(3, seed=9)
    want = encode(saved_micro["model"].tower, images, texts)
    got = encode(loaded, images, texts)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert torch.equal(loaded.logit_scale, saved_micro["model"].tower.logit_scale)
    assert torch.load(out_file, weights_only=True)["arch"] == ARCH


def test_load_inference_model_rebuilds_identical_model(saved_micro):
    inference = load_inference_model(str(saved_micro["dir"]))
    assert not inference.model.training
    assert inference.info["step"] == 2 and inference.info["arch"] == ARCH
    assert inference.info["method"] == "flip"
    assert inference.info["manifest_digests"] == ["abc123"]
    images, _ = make_batch(3, seed=9)
    texts = inference.tokenizer(["a cat", "a dog", "a bird"])
    want = encode(saved_micro["model"].tower, images, texts)
    with torch.no_grad():
        got = inference.model.encode_image(images), inference.model.encode_text(texts)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    similarity = inference.similarity(got[0], got[1])
    assert similarity.shape == (3, 3)
    torch.testing.assert_close(similarity, got[0] @ got[1].T)


RESNET_ARCH = "clip-rn-micro-32"  # the demo's kind of image tower (open_clip ModifiedResNet)


def test_convolutional_tower_trains_clip():
    """The demo trains a ModifiedResNet image tower: CLIP's step runs on it, and the data
    stage's geometry reads the whole image as one 'patch'."""
    from training.model import tower_geometry
    from training.objectives import build_objective

    register_tiny_configs()
    config = apply_overrides(build_method_config("clip"), {"model.arch": RESNET_ARCH})
    model = build_model(config.model, config.masking, temperature_of(config.loss, config.topology))
    assert type(model.tower.visual).__name__ == "ModifiedResNet"
    assert tower_geometry(model) == (32, 32)
    texts = build_tokenizer(RESNET_ARCH)(["a red circle", "a blue square", "a cyan star", "a pink cross"])
    out = model(torch.randn(4, 3, 32, 32), texts=texts)
    loss = sum(build_objective(config.loss, config.smartclip, 0, 1)(out).values())
    loss.backward()
    assert torch.isfinite(loss) and model.tower.visual.attnpool.c_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "method, names", [("flip", "FLIP's patch dropout"), ("pgs0.5", "CLIP-PGS"), ("multi", "topology.kind=multi")]
)
def test_patch_methods_refuse_a_convolutional_tower(method, names):
    """FLIP on open_clip's ResNet would set a patch-dropout hook the tower never calls: a
    silent no-op. Every method that needs patches or class tokens refuses it by name."""
    from training.model import build_training_model

    register_tiny_configs()
    config = apply_overrides(build_method_config(method), {"model.arch": RESNET_ARCH})
    with pytest.raises(ValueError, match=names):
        build_training_model(config)


def test_class_token_features_refuse_a_convolutional_tower():
    register_tiny_configs()
    model = build_model(ModelConfig(RESNET_ARCH), MaskingConfig(), Temperature())
    with pytest.raises(ValueError, match="class-token features needs a VisionTransformer"):
        model.image_class_states(torch.randn(2, 3, 32, 32))


def run_projection_only_steps(arch: str, learn_temperature: bool, steps: int = 3):
    """(state before, state after, trainable names) of `steps` optimiser steps of CLIP with
    model.trainable=projections, through the training loop."""
    from tests.test_loop import Recorder
    from training.loop import LoopSettings, run_training
    from training.model import build_training_model
    from training.objectives import build_objective
    from training.batches import IMAGES, TEXTS

    register_tiny_configs()
    config = apply_overrides(
        build_method_config("clip"),
        {
            "model.arch": arch,
            "model.trainable": "projections",
            "optim.lr": 1e-2,
            "loss.learn_temperature": learn_temperature,
        },
    )
    torch.manual_seed(0)
    model = build_training_model(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, config.optim)
    tokenizer = build_tokenizer(arch)
    batches = [
        {
            IMAGES: torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8).numpy(),
            TEXTS: tokenizer([f"a {c} shape {b}" for c in ("red", "blue", "green", "pink")]).numpy(),
        }
        for b in range(steps)
    ]
    settings = LoopSettings(start_step=0, total_steps=steps, seed=0, rank=0, world_size=1, device=torch.device("cpu"))
    run_training(
        model,
        build_objective(config.loss, config.smartclip, 0, 1),
        optimizer,
        build_scheduler(optimizer, 1, steps),
        batches,
        settings,
        Recorder(),
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return before, model.state_dict(), trainable


@pytest.mark.parametrize(
    "arch, projections",
    [
        (ARCH, {"tower.visual.proj", "tower.text_projection"}),
        (
            RESNET_ARCH,
            {"tower.visual.attnpool.c_proj.weight", "tower.visual.attnpool.c_proj.bias", "tower.text_projection"},
        ),
    ],
)
@pytest.mark.parametrize("learn_temperature", [True, False])
def test_projection_only_training_leaves_every_other_weight_bit_identical(arch, projections, learn_temperature):
    """Cross the Gap §5.6 trains only the final projections (and a learned temperature):
    every other parameter and buffer (a ResNet's BatchNorm statistics too) is bit-identical."""
    before, after, trainable = run_projection_only_steps(arch, learn_temperature)
    moving = projections | ({"tower.logit_scale"} if learn_temperature else set())
    assert trainable == moving
    for name, value in after.items():
        if name.endswith("num_batches_tracked"):
            continue  # a counter, not a weight
        if name in moving:
            assert not torch.equal(value, before[name]), f"{name} did not train"
        else:
            assert torch.equal(value, before[name]), f"{name} changed"


def test_projection_only_refuses_what_it_would_leave_untrained():
    from training.model import build_training_model

    register_tiny_configs()
    with pytest.raises(ValueError, match="mask network would then never train"):
        build_training_model(
            apply_overrides(build_method_config("smartclip"), {"model.arch": ARCH, "model.trainable": "projections"})
        )
    with pytest.raises(ValueError, match="unknown model.trainable='towers'"):
        build_training_model(
            apply_overrides(build_method_config("clip"), {"model.arch": ARCH, "model.trainable": "towers"})
        )
