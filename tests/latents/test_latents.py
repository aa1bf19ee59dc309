"""Latent spaces: quantisation conventions, pixel round trip, SD-VAE against the VAE it wraps."""
import pytest
import torch
from latent_helpers import save_tiny_vae

from gen.config import ConfigError, default_config
from latents import LATENTS, SDVAE, PixelSpace, build_latent, to_uint8


def test_rounding_conventions_on_known_values():
    # 127.5 (x + 1) = 0, 1.4, 1.6, 127.5, 255 and two values outside [-1, 1].
    x = torch.tensor([-1.0, -1 + 1.4 / 127.5, -1 + 1.6 / 127.5, 0.0, 1.0, -1.5, 1.5])
    assert to_uint8(x, "round").tolist() == [0, 1, 2, 128, 255, 0, 255]  # DiT/SiT: round half up
    assert to_uint8(x, "floor").tolist() == [0, 1, 1, 127, 255, 0, 255]  # REPA: floor
    assert to_uint8(x.to(torch.bfloat16), "round").dtype == torch.uint8
    with pytest.raises(ValueError, match="sample.rounding"):
        to_uint8(x, "nearest")


@pytest.mark.parametrize("channels", [1, 3])
def test_pixel_round_trip(channels):
    space = PixelSpace(channels, 8)
    images = torch.randint(0, 256, (4, channels, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    raw = space.encode_raw(images)
    assert raw.dtype == torch.float32 and raw.shape[1:] == space.raw_shape == space.shape
    assert raw.min() >= -1 and raw.max() <= 1
    assert space.to_model(raw) is raw
    back = space.decode(raw.double())  # samplers hand back float64
    assert back.dtype == torch.uint8 and back.shape == (4, 3, 8, 8)
    assert torch.equal(back, images.expand(-1, 3, -1, -1))
    # floor sits at most one level below round, never above.
    floor = space.decode(raw, rounding="floor").int()
    assert ((back.int() - floor) >= 0).all() and ((back.int() - floor) <= 1).all()
    with pytest.raises(ValueError, match="expects images of shape"):
        space.encode_raw(images[:, :, :4])


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-sd-vae")


@pytest.fixture(scope="module")
def reference_vae(vae_dir):
    from diffusers.models import AutoencoderKL

    return AutoencoderKL.from_pretrained(vae_dir).eval()


def _images(n=5, side=32, channels=3, seed=0):
    return torch.randint(0, 256, (n, channels, side, side), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def test_sd_vae_raw_is_posterior_mean_and_std(vae_dir, reference_vae):
    space = SDVAE(vae_dir, 32, batch_size=2)  # 5 images in 3 chunks
    assert space._vae is None  # nothing loads before first use
    images = _images()
    raw = space.encode_raw(images)
    assert raw.shape == (5, *space.raw_shape) == (5, 8, 4, 4) and raw.dtype == torch.float32
    with torch.no_grad():
        posterior = reference_vae.encode(images.float() / 127.5 - 1).latent_dist
    torch.testing.assert_close(raw, torch.cat([posterior.mean, posterior.std], 1), atol=1e-5, rtol=1e-5)
    assert not raw.requires_grad
    # A 1-channel image is encoded as its grey RGB version.
    grey = _images(2, channels=1)
    torch.testing.assert_close(space.encode_raw(grey), space.encode_raw(grey.expand(-1, 3, -1, -1)))


def test_sd_vae_to_model_uses_the_generator(vae_dir):
    space = SDVAE(vae_dir, 32)
    raw = space.encode_raw(_images())
    z1 = space.to_model(raw, torch.Generator().manual_seed(7))
    z2 = space.to_model(raw, torch.Generator().manual_seed(7))
    z3 = space.to_model(raw, torch.Generator().manual_seed(8))
    assert z1.shape == (5, *space.shape) == (5, 4, 4, 4)
    assert torch.equal(z1, z2) and not torch.equal(z1, z3)
    eps = torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z1, (raw[:, :4] + raw[:, 4:] * eps) * 0.18215)
    # Explicit noise (a trainer's slice of one global draw) is used as given.
    torch.testing.assert_close(space.to_model(raw, noise=eps.double()), z1)
    with pytest.raises(ValueError, match="noise of shape"):
        space.to_model(raw, noise=eps[:2])


def test_sd_vae_decode(vae_dir, reference_vae):
    space = SDVAE(vae_dir, 32, scale=0.5)
    z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    images = space.decode(z)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 32, 32)
    with torch.no_grad():
        expected = to_uint8(reference_vae.decode(z / 0.5).sample)
    assert (images.int() - expected.int()).abs().max() <= 1  # float noise may flip a level at a boundary
    assert space.state_dict() == {"scale": 0.5}
    space.load_state_dict({"scale": 0.25})
    assert space.scale == 0.25


def test_sd_vae_missing_weights_error(tmp_path):
    missing = tmp_path / "no-such-vae"
    space = SDVAE(missing, 32)  # lazy: constructing is fine
    with pytest.raises(FileNotFoundError) as err:
        space.encode_raw(_images(1))
    message = str(err.value)
    assert str(missing) in message and "latent.sd_vae.vae_path" in message and "stabilityai/sd-vae-ft-ema" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no loadable AutoencoderKL"):
        SDVAE(tmp_path / "empty", 32).load_weights()
    with pytest.raises(FileNotFoundError, match="latent.sd_vae.vae_path is not set"):
        SDVAE(None, 32).load_weights()
    with pytest.raises(ValueError, match="divisible by 8"):
        SDVAE(missing, 30)


def config(data_name="latent_cache", image_size=256, latent="sd-vae", **sd_vae):
    """A run config at its defaults but for the data and latent keys given (not validated, as build_latent sees it)."""
    cfg = default_config()
    cfg.data.name, cfg.data.image_size, cfg.latent.name = data_name, image_size, latent
    for key, value in sd_vae.items():
        setattr(cfg.latent.sd_vae, key, value)
    return cfg


def test_build_latent_from_config():
    assert set(LATENTS) == {"pixel", "sd-vae", "binary", "mosaic-sdf", "vq"}
    digits = build_latent(config("digits", 16, "pixel"))
    assert isinstance(digits, PixelSpace) and digits.shape == (1, 16, 16)
    folder = build_latent(config("image_folder", 32, "pixel"))
    assert folder.shape == (3, 32, 32)
    vae = build_latent(config("image_folder", 256, "sd-vae", vae_path="x", scale=0.3))
    assert isinstance(vae, SDVAE) and vae.shape == (4, 32, 32) and vae.raw_shape == (8, 32, 32) and vae.scale == 0.3
    with pytest.raises(ConfigError, match="latent.name"):
        build_latent(config(latent="vq-gan"))
