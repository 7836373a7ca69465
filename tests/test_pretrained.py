"""Fine-tuning starts: an open_clip checkpoint file (local, and on a moto S3 server), a
checkpoint directory of this project, an unknown name; the logit-scale reset; stretching
applied on top of the loaded weights."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import S3_BUCKET as BUCKET  # the s3_env fixture (moto on loopback) is in conftest
from training import checkpoint
from training.config import MaskingConfig, ModelConfig, Temperature, apply_overrides
from training.methods.longclip.positions import stretch_positional_table
from training.methods.recipes import build_method_config
from training.model import build_model, build_training_model
from training.optim import build_optimizer, build_scheduler

ARCH = "clip-micro-p8-32"

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def trained_tower_state(seed: int = 7) -> dict:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(ARCH), MaskingConfig(), Temperature(init_logit_scale=2.0))
    return {k: v.clone() for k, v in model.tower.state_dict().items()}


def assert_same_tower(state: dict, tower: torch.nn.Module, skip=("positional_embedding",)):
    loaded = tower.state_dict()
    for key, value in state.items():
        if key not in skip:
            assert torch.equal(loaded[key], value), key


def write_open_clip_file(path, state: dict) -> str:
    torch.save({"state_dict": state}, path)
    return str(path)


def test_open_clip_file_start(tmp_path):
    state = trained_tower_state()
    pretrained = write_open_clip_file(tmp_path / "tiny.pt", state)
    model = build_model(ModelConfig(ARCH, pretrained=pretrained), MaskingConfig(), Temperature())
    assert_same_tower(state, model.tower, skip=())  # logit scale kept (no reset)


def test_project_checkpoint_start_with_long_text_and_reset_scale(tmp_path):
    torch.manual_seed(3)
    config = apply_overrides(build_method_config("clip"), {"model.arch": ARCH})
    source = build_training_model(config)
    optimizer = build_optimizer(source, config.optim)
    checkpoint.save_checkpoint(
        tmp_path / "run" / "step_00000005", source, optimizer, build_scheduler(optimizer, 1, 2), 5, config, {}
    )
    tuned = apply_overrides(
        build_method_config("smartclip"), {"model.arch": ARCH, "model.pretrained": str(tmp_path / "run")}
    )
    model = build_training_model(tuned)
    state = source.tower.state_dict()
    assert_same_tower({k: v for k, v in state.items() if k != "logit_scale"}, model.tower)
    torch.testing.assert_close(
        model.tower.positional_embedding.data, stretch_positional_table(state["positional_embedding"], 20, 4)
    )
    assert model.tower.logit_scale.item() == pytest.approx(4.6052)  # Long-CLIP's reset to 100


def test_checkpoint_of_another_arch_is_refused(tmp_path):
    config = apply_overrides(build_method_config("clip"), {"model.arch": "clip-tiny-p8-64"})
    model = build_training_model(config)
    optimizer = build_optimizer(model, config.optim)
    checkpoint.save_checkpoint(tmp_path, model, optimizer, build_scheduler(optimizer, 1, 2), 1, config, {})
    with pytest.raises(ValueError, match="clip-tiny-p8-64"):
        build_model(ModelConfig(ARCH, pretrained=str(tmp_path)), MaskingConfig(), Temperature())


def test_unknown_pretrained_name_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="neither a file, a checkpoint directory nor an open_clip tag"):
        build_model(ModelConfig(ARCH, pretrained="no-such-weights"), MaskingConfig(), Temperature())


def test_open_clip_file_on_s3(s3_env, tmp_path):
    import s3fs

    state = trained_tower_state(seed=11)
    local = write_open_clip_file(tmp_path / "tiny.pt", state)
    s3fs.S3FileSystem().put(local, f"{BUCKET}/weights/tiny.pt")
    model = build_model(ModelConfig(ARCH, pretrained=f"s3://{BUCKET}/weights/tiny.pt"), MaskingConfig(), Temperature())
    assert_same_tower(state, model.tower, skip=())
