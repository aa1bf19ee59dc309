"""Fixtures shared by the whole suite, and the `slow` marker (deselected unless --runslow or REPGEN_SLOW=1)."""
import os

import pytest
import torch

from gen.precision import flush_denormals

flush_denormals()  # the arithmetic every job runs in (tests that call components directly, not through a job)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (minutes each)")


def pytest_collection_modifyitems(config, items):
    """Skip `slow` tests in the default run (CI keeps within its time); --runslow or REPGEN_SLOW=1 runs them."""
    if config.getoption("--runslow") or os.environ.get("REPGEN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or REPGEN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Single-threaded torch: tiny models are many times slower under thread contention on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_accelerate():
    """Reset accelerate's process-wide state after a test that built an Accelerator in this process."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny random VAE, an image folder and a random-init DINOv2 ViT-S/14 in timm's published layout."""
    from helpers import make_image_folder
    from latent_helpers import save_tiny_vae
    from safetensors.torch import save_file
    from timm.models import get_pretrained_cfg

    from align.encoders import ENCODERS, create_encoder_model

    tmp = tmp_path_factory.mktemp("assets")
    spec = ENCODERS["dinov2-vit-s"]
    torch.manual_seed(0)
    grid = get_pretrained_cfg(spec.pretrained_tag).input_size[-1] // spec.patch_size
    encoder = create_encoder_model(spec, grid, final_norm=True)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(tmp / "dinov2_s.safetensors"))
    return save_tiny_vae(tmp / "vae"), make_image_folder(tmp / "images"), tmp / "dinov2_s.safetensors"
