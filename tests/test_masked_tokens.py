"""Masked token modelling (gen.objectives.masked_tokens) and MAGE's token transformer (gen.models.mage): mask and
decoding schedules, the loss against PyTorch's smoothed cross-entropy, the released predictors' key map against a
functional reference forward, overfitting a batch, and 1 vs 2 processes with per-batch mask ratios."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_two_processes_match_one, randomize

from gen.models.mage import MaskedTokenTransformer, from_mage, load_mage
from gen.objectives.masked_tokens import MaskedTokensObjective

pytestmark = pytest.mark.usefixtures("one_thread")
K, GRID = 8, (4, 4)
L = GRID[0] * GRID[1]


def tiny(num_classes=None, seed=0, **kw) -> MaskedTokenTransformer:
    torch.manual_seed(seed)
    sizes = dict(depth=2, hidden_size=16, num_heads=2, decoder_depth=2, decoder_hidden_size=12, decoder_num_heads=2)
    return MaskedTokenTransformer(GRID, K, class_slots=1000, num_classes=num_classes, **{**sizes, **kw})


def objective(model, **kw) -> MaskedTokensObjective:
    return MaskedTokensObjective(model.mask_id, model.codebook_size, null_class=model.null_class, **kw)


# ---------------------------------------------------------------------------------------------------
# Masks and loss


@pytest.mark.parametrize("schedule,per_batch", [("cosine", False), ("truncnorm", True)])
def test_mask_counts_follow_the_schedule(schedule, per_batch):
    obj = objective(tiny(), mask_schedule=schedule, per_batch=per_batch, drop_ratio=0.5 if per_batch else 0.0)
    g = torch.Generator().manual_seed(0)
    draws = obj.draw(64, GRID, g)
    mask, drop = obj.masks(64, L, draws["u"], draws["u_batch"], draws["scores"])
    u = draws["u_batch"].expand(64) if per_batch else draws["u"]
    if schedule == "cosine":
        ratio = torch.cos(math.pi / 2 * u.double())
    else:  # MAGE's truncated normal by scipy's inverse CDF
        from scipy import stats

        ratio = torch.from_numpy(stats.truncnorm((0.5 - 0.55) / 0.25, (1 - 0.55) / 0.25, loc=0.55, scale=0.25)
                                 .ppf(u.double().numpy()))
    expected = torch.ceil(L * ratio).long().clamp(1, L)
    assert torch.equal(mask.sum(1), expected)
    ranks = draws["scores"].reshape(64, L).argsort(1).argsort(1)
    assert torch.equal(mask, ranks < expected[:, None])  # the lowest scores
    if per_batch:
        assert len(set(mask.sum(1).tolist())) == 1 and float(ratio[0]) >= 0.5
        assert torch.equal(drop.sum(1), torch.full((64,), L // 2)) and not bool((drop & ~mask).any())


def test_loss_is_smoothed_cross_entropy_on_masked_positions_only():
    model = randomize(tiny(num_classes=3))
    obj = objective(model, label_smoothing=0.1)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, K, (5, *GRID), generator=g)
    cond = torch.tensor([0, 1, 2, 0, 3])  # 3: the null label
    draws = obj.draw(5, GRID, g)
    draws["drop"] = torch.zeros(5, dtype=torch.bool)
    out = obj.loss(model, x0, cond, **draws)
    mask, _ = obj.masks(5, L, draws["u"], draws["u_batch"], draws["scores"])
    assert torch.equal(out.x_t.reshape(5, L), torch.where(mask, model.mask_id, x0.reshape(5, L)))
    logits = model(out.x_t, out.t, cond).out.reshape(5, L, K)
    ce = F.cross_entropy(logits.transpose(1, 2), x0.reshape(5, L), label_smoothing=0.1, reduction="none")
    expected = (ce * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    # The head reads a detached embedding table: only the input lookup gives E a gradient.
    out.loss.sum().backward()
    table = model.token_emb.word_embeddings.weight.grad
    used = torch.zeros(model.vocab_size, dtype=torch.bool)
    used[torch.cat([out.x_t.reshape(-1), K + out.cond.labels])] = True
    assert bool((table[~used] == 0).all()) and bool((table[used] != 0).any(dim=1).all())


# ---------------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decoding_schedule_counts_and_revealed_ids_stay(schedule):
    model = randomize(tiny()).eval()
    obj = objective(model, sample_schedule=schedule, choice_temperature=4.5)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    x_T = obj.prior(GRID, gens)
    assert torch.equal(x_T, torch.full((3, *GRID), model.mask_id))
    steps = []
    out = obj.sample(obj.model_fn(model), x_T, torch.zeros(3, dtype=torch.long), generator=gens, num_steps=6,
                     callback=steps.append)
    assert out.shape == (3, *GRID) and int(out.max()) < K and int(out.min()) >= 0
    unknown = L
    for s in steps:
        keep = math.cos(math.pi / 2 * (s["i"] + 1) / 6) if schedule == "cosine" else 1 - (s["i"] + 1) / 6
        expected = max(1, min(unknown - 1, math.floor(L * keep)))
        assert s["mask"].reshape(3, L).sum(1).tolist() == [expected] * 3
        unknown = expected
    for before, after in zip(steps, steps[1:]):  # revealed ids never change
        revealed = ~before["mask"]
        assert torch.equal(after["ids"][revealed], before["ids"][revealed])
    assert torch.equal(out, steps[-1]["ids"])
    # Sample i depends on its own generator only.
    alone = obj.sample(obj.model_fn(model), x_T[1:2], torch.zeros(1, dtype=torch.long),
                       generator=[torch.Generator().manual_seed(1)], num_steps=6)
    assert torch.equal(alone, out[1:2])


def test_tiny_predictor_overfits_a_batch():
    # One class per sample: fully masked rows are told apart by their class id. The head's logits are h E^T with the
    # detached, N(0, 0.02)-initialised id table E (MAGE), which grows through the input lookup only: slow to sharpen.
    model = tiny(num_classes=4, hidden_size=32, decoder_hidden_size=32, depth=1, decoder_depth=1)
    obj = objective(model, label_smoothing=0.0)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, K, (4, *GRID), generator=g)
    cond = torch.arange(4)
    draws = {**obj.draw(4, GRID, g), "drop": torch.zeros(4, dtype=torch.bool)}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        out = obj.loss(model, x0, cond, **draws)
        opt.zero_grad()
        out.loss.mean().backward()
        opt.step()
        first = float(out.loss.detach().mean()) if first is None else first
    assert float(out.loss.detach().mean()) < 0.25 * first
    assert bool((out.logs["masked_acc"] == 1).all())


def test_dropout_only_while_training_and_the_embedding_init_scale():
    from gen.dropout import SampleDropout

    plain, dropped = tiny(num_classes=4), tiny(num_classes=4, dropout=0.1)
    assert not any(isinstance(m, SampleDropout) for m in plain.modules())  # the default draws nothing
    # embeddings + 4 per block (attention weights, attention output, the MLP's two)
    assert sum(isinstance(m, SampleDropout) for m in dropped.modules()) == 1 + 4 * 4
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in dropped.state_dict().items())  # same parameters
    ids, cond, t = torch.randint(0, K, (2, *GRID)), torch.tensor([0, 1]), torch.zeros(2)
    dropped.eval()
    assert torch.equal(dropped(ids, t, cond).out, plain(ids, t, cond).out)
    dropped.train()
    assert not torch.equal(dropped(ids, t, cond).out, dropped(ids, t, cond).out)
    wide = tiny(num_classes=4, embed_init_std=1.0)
    for key in ("token_emb.word_embeddings.weight", "token_emb.position_embeddings.weight",
                "decoder_pos_embed_learned"):
        assert plain.state_dict()[key].std() < 0.03 and 0.8 < wide.state_dict()[key].std() < 1.2, key


# ---------------------------------------------------------------------------------------------------
# Released predictors: the reference's state dict and token-path forward (LTH14/mage models_mage.py; the
# generation path of gen_img_uncond.py and, with drop, forward_encoder/forward_decoder).


def ref_shapes(depth, width, dec_depth, dec_width, vocab, length, codes=K) -> dict[str, tuple]:
    shapes = {"cls_token": (1, 1, width), "pos_embed": (1, length + 1, width),
              "patch_embed.proj.weight": (width, 3, 16, 16), "patch_embed.proj.bias": (width,),
              "token_emb.word_embeddings.weight": (vocab, width), "token_emb.position_ids": (1, length + 1),
              "token_emb.position_embeddings.weight": (length + 1, width), "token_emb.LayerNorm.weight": (width,),
              "token_emb.LayerNorm.bias": (width,), "norm.weight": (width,), "norm.bias": (width,),
              "decoder_embed.weight": (dec_width, width), "decoder_embed.bias": (dec_width,),
              "mask_token": (1, 1, dec_width), "decoder_pos_embed": (1, length + 1, dec_width),
              "decoder_pos_embed_learned": (1, length + 1, dec_width), "decoder_norm.weight": (dec_width,),
              "decoder_norm.bias": (dec_width,), "decoder_pred.weight": (768, dec_width), "decoder_pred.bias": (768,),
              "mlm_layer.fc.weight": (width, dec_width), "mlm_layer.fc.bias": (width,),
              "mlm_layer.ln.weight": (width,), "mlm_layer.ln.bias": (width,), "mlm_layer.bias": (1, 1, vocab),
              "vqgan.quantize.embedding.weight": (codes, 256), "vqgan.decoder.conv_in.bias": (512,)}
    for prefix, n, d in (("blocks", depth, width), ("decoder_blocks", dec_depth, dec_width)):
        for i in range(n):
            b = f"{prefix}.{i}"
            shapes.update({f"{b}.norm1.weight": (d,), f"{b}.norm1.bias": (d,), f"{b}.attn.qkv.weight": (3 * d, d),
                           f"{b}.attn.qkv.bias": (3 * d,), f"{b}.attn.proj.weight": (d, d),
                           f"{b}.attn.proj.bias": (d,), f"{b}.norm2.weight": (d,), f"{b}.norm2.bias": (d,),
                           f"{b}.mlp.fc1.weight": (4 * d, d), f"{b}.mlp.fc1.bias": (4 * d,),
                           f"{b}.mlp.fc2.weight": (d, 4 * d), f"{b}.mlp.fc2.bias": (d,)})
    return shapes


def ref_forward(sd, heads, ids, drop):
    """MAGE's token path from its state dict: ids (N, 1 + L) with the class id first; drop (N, 1 + L) or zeros."""
    def ln(x, key, eps=1e-6):
        return F.layer_norm(x, x.shape[-1:], sd[f"{key}.weight"], sd[f"{key}.bias"], eps)

    def lin(x, key):
        return x @ sd[f"{key}.weight"].t() + sd[f"{key}.bias"]

    def block(x, key, h):
        b, n, c = x.shape
        q, k, v = lin(ln(x, f"{key}.norm1"), f"{key}.attn.qkv").reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (c // h) ** -0.5).softmax(-1)
        x = x + lin((attn @ v).transpose(1, 2).reshape(b, n, c), f"{key}.attn.proj")
        return x + lin(F.gelu(lin(ln(x, f"{key}.norm2"), f"{key}.mlp.fc1")), f"{key}.mlp.fc2")

    word = sd["token_emb.word_embeddings.weight"]
    x = ln(word[ids] + sd["token_emb.position_embeddings.weight"][: ids.shape[1]], "token_emb.LayerNorm")
    x = x[drop == 0].reshape(ids.shape[0], -1, x.shape[-1])
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        x = block(x, f"blocks.{i}", heads[0])
    x = lin(ln(x, "norm"), "decoder_embed")
    pad = x[:, 0:1].repeat(1, ids.shape[1], 1)
    full = pad.clone()
    full[(1 - drop).nonzero(as_tuple=True)] = x.reshape(-1, x.shape[-1])
    full = torch.where((ids == word.shape[0] - 1)[..., None], pad, full) + sd["decoder_pos_embed_learned"]
    dec_depth = len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")})
    for i in range(dec_depth):
        full = block(full, f"decoder_blocks.{i}", heads[1])
    h = F.layer_norm(F.gelu(lin(ln(full, "decoder_norm"), "mlm_layer.fc")), (word.shape[1],),
                     sd["mlm_layer.ln.weight"], sd["mlm_layer.ln.bias"], 1e-5)
    return h @ word.t() + sd["mlm_layer.bias"]


def test_mage_key_map_names_and_shapes_of_the_released_models():
    for name, (depth, width) in {"MAGE-B": (12, 768), "MAGE-L": (24, 1024)}.items():
        with torch.device("meta"):
            ours = MaskedTokenTransformer.MODELS[name]()
        ref = {k: torch.empty(s, device="meta") for k, s in ref_shapes(depth, width, 8, width, 2025, 256, 1024).items()}
        mapped = {k: tuple(v.shape) for k, v in from_mage({"model": ref}).items()}
        assert mapped == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert (ours.vocab_size, ours.mask_id, ours.codebook_size + ours.fake_class_slot) == (2025, 2024, 1100)


def test_released_predictor_loads_and_computes_the_reference_network(tmp_path):
    model = tiny()  # unconditional: the fake class id K + 76
    g = torch.Generator().manual_seed(0)
    sd = {k: 0.3 * torch.randn(s, generator=g) for k, s in
          ref_shapes(2, 16, 2, 12, model.vocab_size, L).items()}
    sd["token_emb.position_ids"] = torch.arange(L + 1)[None]
    torch.save({"model": sd, "epoch": 1599}, tmp_path / "mage-vitb-1600.pth")
    load_mage(model, str(tmp_path / "mage-vitb-1600.pth"), "objective.addp.predictor_weights")
    model.eval()
    x = torch.randint(0, K, (3, *GRID), generator=g)
    masked = torch.rand(3, L, generator=g) < 0.6
    x = torch.where(masked.reshape(x.shape), model.mask_id, x)
    ids = torch.cat([torch.full((3, 1), K + 76), x.reshape(3, L)], dim=1)
    expected = ref_forward(sd, (2, 2), ids, torch.zeros_like(ids))[:, 1:, :K].reshape(3, *GRID, K)
    torch.testing.assert_close(model(x, torch.zeros(3), None).out, expected, rtol=1e-4, atol=1e-4)
    # Token drop (MAGE training): 6 of each row's masked positions leave the encoder.
    drop = torch.zeros(3, L, dtype=torch.bool)
    for i in range(3):
        drop[i, masked[i].nonzero()[:6, 0]] = True
    ref_drop = torch.cat([torch.zeros(3, 1, dtype=torch.long), drop.long()], dim=1)
    expected = ref_forward(sd, (2, 2), ids, ref_drop)[:, 1:, :K].reshape(3, *GRID, K)
    torch.testing.assert_close(model(x, torch.zeros(3), None, drop=drop).out, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(FileNotFoundError, match=r"objective.addp.predictor_weights=.*nope.pth.*LTH14/mage"):
        load_mage(model, str(tmp_path / "nope.pth"), "objective.addp.predictor_weights")


# ---------------------------------------------------------------------------------------------------
# Through the jobs: two processes equal one, with MAGE's per-batch ratios, token drop and dropout (slow, ~45 s).

JOB = ["data.name=digits", "data.image_size=16", "data.num_workers=0", "cond.num_classes=10", "model.name=MAGE-T",
       "latent.name=vq", "latent.vq.quantizer=palette", "latent.vq.codebook_size=8", "latent.vq.code_dim=3",
       "latent.vq.factor=4", "objective.name=masked_tokens", "objective.masked_tokens.mask_schedule=truncnorm",
       "objective.masked_tokens.per_batch=true", "objective.masked_tokens.drop_ratio=0.5", "sampler.sampler=maskgit",
       "sampler.num_steps=4", "train.global_batch_size=16", "train.lr=1e-3", "train.max_steps=3", "log.tracker=none",
       "log.every_steps=1", "log.preview_every_steps=0", "train.ema_decay=0.9", "model.mage.dropout=0.1"]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    assert_two_processes_match_one(tmp_path, JOB, lr=1e-3, steps=3)
