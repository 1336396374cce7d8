"""optim.AdamW against torch.optim.AdamW: exact with fp32 state, close with bf16 state."""
import io

import pytest
import torch

import optim


def make_problem(seed=0):
    """A small least-squares problem with two parameter groups (different lr and decay)."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(64, 32, generator=g), torch.randn(32, generator=g), torch.randn(32, 8, generator=g)]
    inputs, targets = torch.randn(128, 64, generator=g), torch.randn(128, 8, generator=g)
    return weights, inputs, targets


def train(make_optimizer, steps, seed=0, state=None, weights=None):
    """`steps` AdamW steps on the problem; returns (parameters, optimizer)."""
    initial, inputs, targets = make_problem(seed)
    params = [torch.nn.Parameter(w.clone()) for w in (weights or initial)]
    groups = [{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 3e-3, "weight_decay": 0.1}]
    optimizer = make_optimizer(groups)
    if state is not None:
        optimizer.load_state_dict(state)
    for _ in range(steps):
        hidden = torch.tanh(inputs @ params[0] + params[1])
        loss = (hidden @ params[2] - targets).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return params, optimizer


def torch_adamw(groups):
    return torch.optim.AdamW(groups, weight_decay=1e-2, eps=1e-8, foreach=False, fused=False)


def ours(state_dtype, seed=0):
    return lambda groups: optim.AdamW(groups, weight_decay=1e-2, eps=1e-8, state_dtype=state_dtype, seed=seed)


def test_fp32_state_is_torch_adamw_exactly():
    reference, ref_opt = train(torch_adamw, 25)
    params, opt = train(ours(torch.float32), 25)
    assert all(torch.equal(a, b) for a, b in zip(reference, params)), "tolerance 0: bit-identical"
    for p, q in zip(reference, params):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ref_opt.state[p][key], opt.state[q][key])


def test_bf16_state_halves_the_moments_and_stays_close_to_fp32():
    initial = make_problem()[0]
    reference, _ = train(torch_adamw, 60)
    params, opt = train(ours(torch.bfloat16), 60)
    for p in params:
        assert opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16
        assert p.dtype == torch.float32
    # tolerance: the bf16 run's total update differs from fp32's by < 2% of the update's size
    for w0, a, b in zip(initial, reference, params):
        update = (a - w0).norm()
        assert update > 0.05
        assert (a - b).norm() < 0.02 * update, ((a - b).norm() / update).item()


def test_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(0)
    x = torch.full((200_000,), 1.0 + 2 ** -10)  # a quarter of the way between bf16 1.0 and 1.0078125
    rounded = optim.stochastic_round_to_bf16(x, g).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0078125}
    assert abs(rounded.mean().item() - x[0].item()) < 2e-5  # round-to-nearest is off by 9.8e-4
    assert x.bfloat16().float().mean().item() == 1.0


def test_bf16_second_moment_decays_like_fp32():
    """Gradients vanish after 10 steps: v must decay by beta2 per step. Rounded to nearest, a bf16
    v would never move (0.1% per step is below half its spacing); stochastically rounded, it
    follows fp32 within 1%."""
    def run(make_optimizer):
        p = torch.nn.Parameter(torch.zeros(50_000))
        opt = make_optimizer([{"params": [p], "lr": 1e-3, "weight_decay": 0.0}])
        grads = torch.randn(50_000, generator=torch.Generator().manual_seed(1))
        for step in range(400):
            p.grad = grads if step < 10 else torch.zeros_like(grads)
            opt.step()
        return opt.state[p]["exp_avg_sq"].float()
    v32, v16 = run(torch_adamw), run(ours(torch.bfloat16))
    ratio = v16.sum() / v32.sum()
    assert abs(ratio.item() - 1) < 0.01, ratio


def test_state_dict_resumes_exactly():
    straight, opt = train(ours(torch.bfloat16, seed=3), 8)
    first, opt3 = train(ours(torch.bfloat16, seed=3), 4)
    buffer = io.BytesIO()
    torch.save(opt3.state_dict(), buffer)  # as train.py's checkpoints do
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed, opt_b = train(ours(torch.bfloat16, seed=3), 4, state=state, weights=[p.detach() for p in first])
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed)), "tolerance 0: bit-identical resume"
    for p in resumed:
        assert opt_b.state[p]["exp_avg_sq"].dtype == torch.bfloat16
    # a different seed rounds differently (the seed is what makes the run repeatable)
    other, _ = train(ours(torch.bfloat16, seed=4), 8)
    assert not all(torch.equal(a, b) for a, b in zip(straight, other))


def test_switching_state_precision_on_resume():
    _, opt = train(torch_adamw, 3)
    _, converted = train(ours(torch.bfloat16), 1, state=opt.state_dict())
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in converted.state.values())


def test_bad_state_dtype():
    with pytest.raises(ValueError, match="state_dtype"):
        optim.AdamW([torch.nn.Parameter(torch.zeros(1))], state_dtype=torch.float16)
