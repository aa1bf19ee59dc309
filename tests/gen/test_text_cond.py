"""Text conditioning: Cond's text field through select/cat/where and the null/drop path, the set transformer's
cross-attention (a fresh text model is the class-only one, equivariance with text, text matters, guidance with the
null text), the CLIP text encoder read from a local folder and its missing-weights error, and overfitting two shapes
that only their captions tell apart."""
import pytest
import torch
from helpers import randomize, tiny_clip

from gen.cond import Cond, Conditioning
from gen.errors import message
from gen.models import build_model
from gen.objectives import FlowObjective
from gen.sampling.guidance import network_fn, with_cfg
from gen.text import TextEncoder, encoder_folder

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(sample_shape=(24, 13), depth=2, hidden_size=32, num_heads=4, num_classes=5)


def text_cond(n=3, tokens=6, dim=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Cond(torch.tensor([0, 4, 5, 2])[:n], torch.randn(n, tokens, dim, generator=g))


def test_cond_moves_text_with_the_labels_and_the_null_text_is_zeros():
    a, b = text_cond(seed=1), text_cond(seed=2)
    assert torch.equal(a.select([2, 0]).text, a.text[[2, 0]]) and torch.equal(a.select([2, 0]).labels, a.labels[[2, 0]])
    assert torch.equal(a.cat(b).text, torch.cat([a.text, b.text]))
    mask = torch.tensor([True, False, True])
    mixed = a.where(mask, b)
    assert torch.equal(mixed.text[0], b.text[0]) and torch.equal(mixed.text[1], a.text[1])
    conditioning = Conditioning(5, 0.5, text=True)
    dropped = conditioning.drop(a, mask)
    assert dropped.labels.tolist() == [5, 4, 5]
    assert dropped.text[[0, 2]].abs().max() == 0 and torch.equal(dropped.text[1], a.text[1])
    assert conditioning.null(a).text.abs().max() == 0
    with pytest.raises(ValueError, match="with and without text"):
        a.cat(Cond(b.labels))
    # label-only conditions keep their meaning: no text appears anywhere
    labels = Cond(torch.tensor([1, 2]))
    assert conditioning.drop(labels, torch.tensor([True, False])).text is None


def test_from_batch_reads_text_tokens_or_refuses_their_absence():
    batch = {"label": torch.tensor([1, 2]), "text": torch.ones(2, 3, 4, dtype=torch.float16)}
    cond = Conditioning(5, 0.1, text=True).from_batch(batch, "cpu")
    assert cond.text.dtype == torch.float32 and cond.text.shape == (2, 3, 4)
    assert Conditioning(5, 0.1).from_batch(batch, "cpu").text is None  # a class-only run ignores cached text
    with pytest.raises(Exception, match="no text tokens"):
        Conditioning(5, 0.1, text=True).from_batch({"label": batch["label"]}, "cpu")


def test_a_fresh_text_model_computes_what_the_class_only_model_computes():
    torch.manual_seed(0)
    plain = build_model("SetT-S", **TINY)
    torch.manual_seed(0)
    text = build_model("SetT-S", **TINY, text_dim=8)
    shared = plain.state_dict()
    assert all(torch.equal(v, text.state_dict()[k]) for k, v in shared.items())  # same draws for shared weights
    randomize(plain)
    text.load_state_dict(plain.state_dict(), strict=False)  # context blocks keep their zero output projection
    x, t = torch.randn(3, 24, 13), torch.rand(3)
    cond = text_cond()
    with torch.no_grad():
        assert torch.equal(text(x, t, cond).out, plain(x, t, Cond(cond.labels)).out)


def test_text_model_is_permutation_equivariant_and_reads_the_text():
    model = randomize(build_model("SetT-S", **TINY, text_dim=8)).eval()
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(3, 24, 13, generator=g), torch.rand(3, generator=g)
    perm = torch.randperm(24, generator=g)
    cond = text_cond()
    with torch.no_grad():
        a, b = model(x, t, cond, taps=(1, 2)), model(x[:, perm], t, cond, taps=(1, 2))
        other = model(x, t, Cond(cond.labels, cond.text + 1.0)).out
    torch.testing.assert_close(b.out, a.out[:, perm], atol=1e-5, rtol=0)
    for k in (1, 2):
        torch.testing.assert_close(b.feats[k], a.feats[k][:, perm], atol=1e-5, rtol=0)
    assert (other - a.out).abs().max() > 1e-3  # the text is read
    with pytest.raises(ValueError, match="text tokens"):
        model(x, t, Cond(cond.labels))


def test_guidance_contrasts_the_caption_with_the_null_text_and_null_class():
    model = randomize(build_model("SetT-S", **TINY, text_dim=8)).eval()
    x, t, cond = torch.randn(3, 24, 13), torch.rand(3), text_cond()
    fn = network_fn(model)
    with torch.no_grad():
        guided = with_cfg(fn, 2.5, Conditioning(5, 0.1, text=True))(x, t, cond)
        c = fn(x, t, cond)
        u = fn(x, t, Cond(torch.full((3,), 5), torch.zeros_like(cond.text)))
    torch.testing.assert_close(guided, u + 2.5 * (c - u), atol=1e-5, rtol=1e-5)


def test_text_encoder_reads_a_local_folder_and_names_what_is_missing(tmp_path):
    folder = tiny_clip(tmp_path / "clip", dim=16, positions=12)
    encoder = TextEncoder(folder, max_tokens=10)
    tokens = encoder(["a tall box", "a tall cone", ""])
    assert tokens.shape == (3, 10, 16) and encoder.dim == 16
    assert (tokens[0] - tokens[1]).abs().max() > 1e-3
    torch.testing.assert_close(encoder(["a tall cone"])[0], tokens[1])  # batch-independent
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as err:
        encoder_folder(folder)
    line = message(err.value)
    assert "model.safetensors or pytorch_model.bin" in line and "cond.text_encoder" in line
    assert "openai/clip-vit-large-patch14" in line and "\n" not in line
    with pytest.raises(FileNotFoundError, match=f"no folder {tmp_path / 'nowhere'}.*cond.text_encoder"):
        encoder_folder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="'cond.text_encoder' is not set"):
        encoder_folder(None)


def test_overfits_two_shapes_that_only_their_captions_tell_apart():
    """One class; a box and a torus differ only in their text tokens: text-conditional flow matching learns both, and a
    guided sample of caption c is nearest (as a token set) to shape c."""
    from latents.mosaic_sdf import MosaicSDFSpace
    from latents.mosaic_sdf.procedural import ProceduralShapes

    shapes = ProceduralShapes(2, seed=0, classes=("box", "torus"))
    space = MosaicSDFSpace(n=16, k=3, surface_samples=2000)
    raw = space.encode_raw([shapes[i][0] for i in range(2)])
    space.fit(raw)
    torch.manual_seed(0)
    text = torch.randn(2, 4, 8)
    model = build_model("SetT-S", sample_shape=space.shape, depth=2, hidden_size=64, num_heads=4, num_classes=1,
                        text_dim=8)
    objective = FlowObjective(label_dropout=0.1, null_class=model.null_class)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    cond = Cond(torch.zeros(16, dtype=torch.long), text.repeat(8, 1, 1))
    for step in range(300):
        x0 = space.to_model(raw.repeat(8, 1, 1), generator=g)
        loss = objective.loss(model, x0, cond, taps=(), **objective.draw(16, space.shape, g)).loss
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        z = objective.sample(objective.model_fn(model), torch.randn(4, *space.shape, generator=g),
                             Cond(torch.zeros(4, dtype=torch.long), text.repeat(2, 1, 1)), sampler="euler",
                             num_steps=30, cfg_scale=2.0)
    target = space.to_model(raw, order=torch.arange(16).expand(2, -1))

    def chamfer(a, b):
        d = torch.cdist(a, b).square()
        return d.amin(1).mean() + d.amin(0).mean()

    nearest = [min(range(2), key=lambda j: float(chamfer(z[i], target[j]))) for i in range(4)]
    assert nearest == [0, 1, 0, 1]


def test_config_refuses_text_for_a_backbone_that_reads_none():
    from helpers import REPO

    from gen.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="'cond.text_dim'.*reads no text tokens"):
        load_config(REPO / "configs" / "quickstart.yaml", ["cond.text_dim=8"])
    assert load_config(REPO / "configs" / "quickstart_3d.yaml", ["cond.text_dim=8"]).cond.text_dim == 8
