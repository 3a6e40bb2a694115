"""Diffusion + sample(): losses, overfitting one pair and sampling it back, guidance, seeds, errors, CUDA."""

import pytest
import torch
from torch import nn

from checkpoints_dataset.params import float_layer_shapes
from gpt_params import Diffusion, ParameterDiT, ParameterTokenizer, sample



def make_tokenizer():
    shapes = float_layer_shapes(nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)))
    return ParameterTokenizer(shapes, layout="neuron", chunk_size=5)  # rows of 5 + 1 + 3 -> 2 pieces, padding


def make_model(tok, **kw):
    torch.manual_seed(0)
    return ParameterDiT(tok.num_tokens, tok.token_dim, tok.token_layer_ids, hidden_size=64, depth=2, num_heads=4,
                        token_mask=tok.mask, **kw)


def perturbed(model):
    """A model whose zero-initialized layers are random, so outputs and guidance matter."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if (p == 0).all():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def train_pair(tok, model, diffusion, start, target, steps, device="cpu"):
    """Overfit ``model`` on one (start, target) pair; returns the final loss over fixed noise."""
    model.to(device).train()
    st, tt = tok.tokenize(start.to(device)), tok.tokenize(target.to(device))  # [1, T, C]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator(device).manual_seed(0)
    batch = lambda x: x.expand(16, -1, -1)  # noqa: E731
    metrics = (torch.full((16,), 0.8, device=device), torch.full((16,), 0.1, device=device))
    for _ in range(steps):
        loss = diffusion.training_loss(model, batch(tt), batch(st), *metrics, mask=tok.mask, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return diffusion.training_loss(model, tt.expand(64, -1, -1), st.expand(64, -1, -1), metrics[0][:1].expand(64),
                                       metrics[1][:1].expand(64), cond_drop_prob=0.0, mask=tok.mask,
                                       generator=torch.Generator(device).manual_seed(1)).item()


@pytest.fixture(scope="module")
def trained():
    tok = make_tokenizer()
    g = torch.Generator().manual_seed(0)
    start, target = torch.randn(1, tok.num_params, generator=g), torch.randn(1, tok.num_params, generator=g)
    model = make_model(tok)
    loss = train_pair(tok, model, Diffusion(), start, target, steps=200)
    return tok, model, start, target, loss


def test_overfit_one_pair_then_sample_reproduces_target(trained):
    tok, model, start, target, loss = trained
    assert loss < 1e-3
    for sampler, steps in (("ddim", 20), ("dpm++", 10), ("ddpm", 50)):
        out = sample(model, tok, start.expand(2, -1), 0.8, torch.tensor([0.1, 0.1]), sampler=sampler, steps=steps,
                     generator=torch.Generator().manual_seed(2))
        assert out.shape == (2, tok.num_params) and out.dtype == torch.float32
        assert ((out - target) ** 2).mean() < 1e-3, sampler


def test_losses_of_untrained_model():
    tok = make_tokenizer()
    target = tok.tokenize(torch.randn(4, tok.num_params))  # [N, T, C]
    start, metrics = torch.zeros_like(target), (torch.rand(4), torch.rand(4))
    loss = Diffusion().training_loss(make_model(tok), target, start, *metrics, mask=tok.mask)
    assert loss.item() == pytest.approx((target[:, tok.mask] ** 2).mean().item(), rel=1e-5)  # zero output
    for prediction in ("epsilon", "v"):
        for gamma in (None, 5.0):
            model = make_model(tok, prediction=prediction)
            loss = Diffusion(prediction=prediction, min_snr_gamma=gamma).training_loss(model, target, start, *metrics)
            loss.backward()
            assert loss.ndim == 0 and torch.isfinite(loss) and model.final_layer.linear.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="prediction"):
        Diffusion(prediction="x0").training_loss(make_model(tok, prediction="v"), target, start, *metrics)


def test_guidance_one_is_unguided_and_guidance_combines_both_passes():
    tok = make_tokenizer()
    model = perturbed(make_model(tok)).eval()
    diffusion = Diffusion()
    start = tok.tokenize(torch.randn(3, tok.num_params, generator=torch.Generator().manual_seed(0)))
    sm, tm = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0.1, 0.2, 0.3])
    run = lambda s: diffusion.sample_tokens(model, start, sm, tm, sampler="ddim", steps=5, guidance=s,  # noqa: E731
                                            generator=torch.Generator().manual_seed(3), mask=tok.mask)
    # hand-written unguided DDIM loop: one conditional forward per step
    sched = diffusion.make_scheduler("ddim", 5)
    x = torch.randn(start.shape, generator=torch.Generator().manual_seed(3)) * tok.mask
    guided_x = x.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model(x, t.expand(3), start, tm, sm), t, x).prev_sample * tok.mask
    assert torch.equal(run(1.0), x)
    sched = diffusion.make_scheduler("ddim", 5)
    with torch.no_grad():
        for t in sched.timesteps:
            cond = model(guided_x, t.expand(3), start, tm, sm)
            uncond = model(guided_x, t.expand(3), start, tm, sm, drop_target=torch.ones(3, dtype=torch.bool))
            guided_x = sched.step(uncond + 3.0 * (cond - uncond), t, guided_x).prev_sample * tok.mask
    assert torch.allclose(run(3.0), guided_x, atol=1e-4) and not torch.allclose(run(3.0), x, atol=1e-3)


def test_seeds_reproduce_and_padding_stays_zero():
    tok = make_tokenizer()
    model = perturbed(make_model(tok))
    start = torch.randn(2, tok.num_params)
    for sampler in ("ddpm", "ddim", "dpm++"):
        a, b, c = (sample(model, tok, start, 0.5, 0.2, sampler=sampler, steps=4, guidance=2.0,
                          generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8))
        assert torch.equal(a, b) and not torch.allclose(a, c)
    tokens = Diffusion().sample_tokens(model, tok.tokenize(start), torch.rand(2), torch.rand(2), steps=3, mask=tok.mask)
    assert (tokens[:, ~tok.mask] == 0).all()
    assert model.training  # sample() restores the training mode


def test_bad_inputs_raise():
    tok = make_tokenizer()
    model = make_model(tok)
    start = torch.randn(2, tok.num_params)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(model, tok, start, 0.5, 0.2, sampler="euler")
    with pytest.raises(ValueError, match="steps"):
        sample(model, tok, start, 0.5, 0.2, steps=0)
    with pytest.raises(ValueError, match="NaN or inf"):
        sample(model, tok, start.index_fill(1, torch.tensor([3]), float("nan")), 0.5, 0.2)
    with pytest.raises(ValueError, match="target_metric contains NaN"):
        sample(model, tok, start, 0.5, torch.tensor([0.2, float("inf")]))
    with pytest.raises(ValueError, match="one per prompt"):
        sample(model, tok, start, torch.rand(3), 0.2)
    with pytest.raises(ValueError, match="shape"):
        sample(model, tok, torch.randn(2, tok.num_params + 1), 0.5, 0.2)


@pytest.mark.gpu
def test_cuda_overfit_sample_and_determinism():
    tok = make_tokenizer()
    g = torch.Generator().manual_seed(0)
    start, target = torch.randn(1, tok.num_params, generator=g), torch.randn(1, tok.num_params, generator=g)
    model = make_model(tok)
    assert train_pair(tok, model, Diffusion(), start, target, steps=300, device="cuda") < 1e-3
    for gen_device in ("cpu", "cuda"):
        a, b = (sample(model, tok, start.cuda(), 0.8, 0.1, steps=20, guidance=1.5,
                       generator=torch.Generator(gen_device).manual_seed(5)) for _ in range(2))
        assert a.device.type == "cuda" and torch.equal(a, b)
        assert ((a.cpu() - target) ** 2).mean() < 1e-3
    out = sample(model, tok, start, 0.8, 0.1, sampler="ddpm", steps=50, generator=torch.Generator().manual_seed(5))
    assert out.device.type == "cpu"  # results come back on start_params' device


@pytest.mark.parametrize("prediction", ["x0", "epsilon", "v"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_the_step_callback_sees_every_step_and_ends_at_the_sample(prediction, sampler):
    """``callback(i, t, x0)`` after each of the steps, timesteps falling; the last predicted clean sample is the
    result (every sampler's last step lands on its x0 prediction); padding stays zero in every prediction."""
    tok = make_tokenizer()
    model = perturbed(make_model(tok, prediction=prediction)).eval()
    diffusion = Diffusion(prediction=prediction)
    start = torch.randn(3, tok.num_tokens, tok.token_dim) * tok.mask
    seen = []
    with torch.no_grad():
        out = diffusion.sample_tokens(model, start, 0.9, 0.2, sampler=sampler, steps=4, guidance=2.0,
                                      generator=torch.Generator().manual_seed(0), mask=tok.mask,
                                      callback=lambda i, t, x0: seen.append((i, t, x0.clone())))
    assert [i for i, _, _ in seen] == [0, 1, 2, 3]
    assert all(a > b for (_, a, _), (_, b, _) in zip(seen, seen[1:])) and seen[0][1] == 999
    assert torch.allclose(seen[-1][2], out, atol=1e-5)
    assert all((x0[:, ~tok.mask] == 0).all() for _, _, x0 in seen)
    assert not torch.allclose(seen[0][2], seen[1][2])   # the prediction moves as the noise falls


def test_sample_decodes_every_step_to_parameters():
    tok = make_tokenizer()
    model = perturbed(make_model(tok))
    start = torch.randn(2, tok.num_params)
    params = []
    out = sample(model, tok, start, 0.9, 0.1, sampler="ddim", steps=3, generator=torch.Generator().manual_seed(0),
                 callback=lambda i, t, p: params.append(p))
    assert len(params) == 3 and all(p.shape == (2, tok.num_params) for p in params)
    assert torch.allclose(params[-1], out, atol=1e-5)


@pytest.mark.parametrize("prediction", ["x0", "epsilon", "v"])
def test_training_terms_return_the_clean_prediction(prediction):
    """A model that outputs the exact target of its parameterization has zero loss, and the clean sample
    returned for it (what the function-space loss scores) is the data, whatever it predicts."""
    diffusion = Diffusion(prediction=prediction)
    x0 = torch.randn(16, 5, 3, generator=torch.Generator().manual_seed(0))

    class Oracle(torch.nn.Module):
        def forward(self, x_t, t, start, target_metric, start_metric, drop_target=None, **_):
            a = diffusion.alphas_cumprod[t][:, None, None]
            eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
            return {"x0": x0, "epsilon": eps, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[prediction]

    oracle = Oracle()
    oracle.prediction = prediction
    err, clean = diffusion.training_terms(oracle, x0, torch.zeros_like(x0), torch.rand(16), torch.rand(16),
                                          generator=torch.Generator().manual_seed(1))
    assert err.max() < 1e-6
    torch.testing.assert_close(clean, x0, atol=1e-3, rtol=0)
