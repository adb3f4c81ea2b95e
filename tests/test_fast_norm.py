"""The hand-written RMSNorm against Hugging Face's, alone and installed in a Llama backbone."""

import torch
from transformers import AutoModel
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from ubsmoe.model.pretrained import load_dense_backbone
from ubsmoe.model.fast_norm import FastRMSNorm, rms_norm


def test_rms_norm_gradients_pass_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = (torch.rand(7, dtype=torch.float64, generator=g) + 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-5), (x, w))


def test_rms_norm_matches_hugging_face_forward_and_backward():
    g = torch.Generator().manual_seed(1)
    theirs = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        theirs.weight.copy_(torch.rand(48, generator=g) + 0.5)
    ours = FastRMSNorm(theirs)
    x = torch.randn(3, 10, 48, generator=g) * 4
    grad = torch.randn(3, 10, 48, generator=g)
    results = []
    for norm in (theirs, ours):
        inp = x.clone().requires_grad_(True)
        out = norm(inp)
        out.backward(grad)
        results.append((out.detach(), inp.grad, norm.weight.grad.clone()))
        norm.weight.grad = None
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    low = x.to(torch.bfloat16)
    torch.testing.assert_close(ours(low), theirs(low), rtol=0, atol=0)  # lower precisions: Hugging Face's forward


def test_llama_backbone_gets_fast_norms_and_the_same_outputs_and_gradients(tiny_llama):
    """Against the float64 model as the truth, the backbone with fast norms is as close as Hugging Face's
    own float32 model (the first norm's r is about 50 on these small random embeddings, so float32
    rounding of the input gradient shows at 1e-4 of its largest value in both)."""
    ours, _ = load_dense_backbone(str(tiny_llama))
    theirs = AutoModel.from_pretrained(tiny_llama, dtype=torch.float32)
    truth = AutoModel.from_pretrained(tiny_llama, dtype=torch.float64)
    assert sum(isinstance(m, FastRMSNorm) for m in ours.modules()) == 2 * 2 + 1  # two per layer, one final
    assert not any(type(m).__name__ == "LlamaRMSNorm" for m in ours.modules())
    ids = torch.tensor([[5, 9, 13, 20, 7, 3], [8, 8, 30, 2, 11, 4]])
    results = []
    for model in (ours, theirs, truth):
        model.eval()
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        hidden = model(inputs_embeds=embeds).last_hidden_state
        hidden.square().sum().backward()
        results.append((hidden.detach().double(), embeds.grad.double()))
    for ours_t, theirs_t, true_t in zip(*results):
        ours_err, theirs_err = (ours_t - true_t).abs().max(), (theirs_t - true_t).abs().max()
        assert ours_err <= 1.5 * theirs_err + 1e-9
        assert ours_err <= 1e-4 * true_t.abs().max()
