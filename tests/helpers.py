"""Small helpers shared by the tests."""
import torch


def randomize(model, seed=0):
    """Give every parameter (zero-initialised ones included) a random value so blocks are not identities."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def free_port() -> int:
    """An unused local TCP port for a process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(script, args, processes=1, timeout=300):
    """Run a job (train.py, sample.py, prepare.py) in a subprocess, under `accelerate launch` for several processes.

    `accelerate launch --cpu --num_processes N` starts one process (accelerate issue #2741); the torchrun launcher
    plus ACCELERATE_USE_CPU gives N processes on gloo. One thread each: two processes share two cores.
    """
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if processes == 1:
        cmd = [sys.executable, script, *map(str, args)]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), script, *map(str, args)]
    return subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def make_image_folder(root, n_per_class=8, size=40):
    """Small RGB crops of scikit-learn's bundled photos in two class folders."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    for c, photo in enumerate(photos):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(n_per_class):
            crop = photo[i * 30:i * 30 + size, i * 40:i * 40 + size]
            Image.fromarray(crop).save(root / f"class{c}" / f"{i}.png")
    return root


def assert_two_processes_match_one(tmp_path, args, lr: float, steps: int):
    """train.py `args` (ending after `steps` steps at learning rate `lr`) on 1 and on 2 processes: same logged losses
    and weights up to float reduction order.

    Attention key biases shift every logit of a query's softmax alike: their gradient is exactly 0 up to rounding,
    which Adam normalises into steps of up to lr; they are held to that bound, the query and value biases to the rest's.
    """
    import json

    import numpy as np
    from safetensors.torch import load_file

    from gen.checkpoint import latest_checkpoint

    runs = {}
    for processes in (1, 2):
        run = tmp_path / f"p{processes}"
        result = run_job("train.py", [*args, f"train.run_dir={run}"], processes=processes)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes] = run
    loss = {p: [json.loads(x)["loss"] for x in (r / "logs" / "scalars.jsonl").read_text().splitlines()]
            for p, r in runs.items()}
    np.testing.assert_allclose(loss[1], loss[2], rtol=1e-5)
    w1, w2 = (load_file(str(latest_checkpoint(r) / "model.safetensors")) for r in runs.values())
    for k in w1:
        a, b = w1[k], w2[k]
        if k.endswith("attn.qkv.bias"):
            d = a.shape[0] // 3
            assert float((a[d:2 * d] - b[d:2 * d]).abs().max()) <= 2 * lr * steps
            keep = torch.arange(3 * d) // d != 1
            a, b = a[keep], b[keep]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def tiny_clip(folder, dim=16, positions=12):
    """A random-init CLIP text encoder saved in the transformers layout (config.json, model.safetensors, vocab.json,
    merges.txt): a character-level BPE vocabulary without merges, 2 layers of width `dim`, for gen.text's loader."""
    import json
    import string
    from pathlib import Path

    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    letters = list(string.ascii_lowercase)
    vocab = letters + [c + "</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=positions, bos_token_id=len(vocab) - 2,
                         eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1)
    torch.manual_seed(0)
    CLIPTextModel(cfg).save_pretrained(str(folder))
    return folder
