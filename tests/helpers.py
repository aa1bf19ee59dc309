"""Small helpers shared by the tests."""
import torch


def randomize(model, seed=0):
    """Give every parameter (zero-initialised ones included) a random value so blocks are not identities."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model
