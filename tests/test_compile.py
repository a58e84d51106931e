"""--compile (torch.compile of the transformer blocks) computes what the eager model computes: forward and the
gradients train.py uses, for both families, fp32 on the CPU."""

import pytest
import torch

import model
from tiny import randomise_


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", ["zimage", "flux2"])
def test_compiled_blocks_match_eager(family):
    torch.manual_seed(0)
    if family == "zimage":
        cfg = model.ZImageConfig(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=24,
                                 axes_dims=(8, 12, 12))
        net, x = model.ZImageDiT(cfg), torch.randn(2, 16, 8, 12)
    else:
        cfg = model.Flux2Config(in_channels=16, num_layers=1, num_single_layers=2, num_attention_heads=2,
                                attention_head_dim=16, joint_attention_dim=24, axes_dims_rope=(4, 4, 4, 4))
        net, x = model.Flux2DiT(cfg), torch.randn(2, 16, 4, 6)
    randomise_(net)
    sigma, cap = torch.rand(2), torch.randn(2, 7, 24)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = family == "flux2"  # Z-Image: a batch of two caption lengths (its key mask); FLUX.2 has none

    def run():
        net.zero_grad(set_to_none=True)
        v = net(x, sigma, cap, mask)
        v.square().mean().backward()
        return v.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}

    v_eager, grads_eager = run()
    assert model.compile_blocks(net) is net
    compiled = [m for m in net.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert len(compiled) == (2 + 2 * 1 if family == "zimage" else 3)  # every block, nothing else
    v, grads = run()
    assert rel(v, v_eager) < 1e-4
    assert max(rel(grads[n], grads_eager[n]) for n in grads if grads_eager[n].norm() > 0) < 1e-4
