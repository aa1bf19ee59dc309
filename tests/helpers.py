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
