"""AdamW whose moment estimates can be stored in bfloat16: the optimizer of train.py's memory mode.

AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019, Algorithm 2),
written as torch.optim.AdamW computes it, for a parameter theta with gradient g at step t:

    theta <- theta - lr * weight_decay * theta          (decoupled weight decay)
    m     <- beta1 * m + (1 - beta1) * g                 (first moment)
    v     <- beta2 * v + (1 - beta2) * g^2               (second moment)
    theta <- theta - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)

The two moments m and v cost 8 bytes per parameter in fp32: 6.9 GB for SD 1.5's UNet, half of
everything a fine-tuning run keeps on the GPU. With state_dtype=torch.bfloat16 they cost 4 bytes.
Each step still computes in fp32 (the stored moments are widened, updated, used for the
parameter update, then stored back); only the storage is rounded:

  - m is rounded to the nearest bf16. With beta1 = 0.9 every step moves m by about a tenth of
    the distance to g, far more than bf16's relative spacing (2^-8), so rounding cannot stall it.
  - v is rounded STOCHASTICALLY (up with probability equal to the distance from the bf16 value
    below; Zamirai et al., "Revisiting BFloat16 Training", 2020). With beta2 = 0.999 a step moves
    v by about 0.1%, less than half of bf16's spacing: rounded to nearest, v would never decay,
    and would grow only on large gradients. Stochastic rounding is unbiased (E[round(v)] = v), so
    v follows its fp32 trajectory on average. The random bits come from a generator seeded by
    (seed, parameter index, step), so a run is repeatable and resumes exactly with no extra state.

With state_dtype=torch.float32 (the default) this is exactly torch.optim.AdamW's single-tensor
path (foreach=False, fused=False): same operations in the same order, bit-identical results.
Trainable weights and gradients stay fp32 in both cases (see train.py).
"""
import torch

STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def stochastic_round_to_bf16(x, generator):
    """fp32 -> bf16 with probability-weighted rounding: bf16 keeps the top 16 bits of an fp32
    number, so adding uniform random 16-bit noise to the bit pattern before cutting the low 16
    bits rounds the magnitude up with probability (dropped bits) / 2^16. Finite inputs only."""
    bits = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, generator=generator, device=x.device)
    bits.add_(x.view(torch.int32))  # the noise plus x's bit pattern; a carry into the exponent is a round-up
    return bits.bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)  # exact: low bits are zero


class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update with the moments stored in `state_dtype` (fp32 or bf16).
    `seed` drives the stochastic rounding of bf16 second moments."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *,
                 state_dtype=torch.float32, seed=0):
        if state_dtype not in STATE_DTYPES.values():
            raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0 or lr < 0 or eps < 0:
            raise ValueError(f"invalid AdamW hyperparameters: lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.state_dtype, self.seed = state_dtype, seed

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0  # the parameter's position over all groups: part of its rounding seed
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for param in group["params"]:
                index += 1
                if param.grad is None:
                    continue
                grad, state = param.grad, self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, dtype=self.state_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=self.state_dtype)
                state["step"] += 1
                step = state["step"].item()

                param.mul_(1 - lr * group["weight_decay"])
                # fp32 working moments: the state itself when it is fp32 (.float() returns the same
                # tensor, updated in place as torch does), else a widened copy
                exp_avg, exp_avg_sq = state["exp_avg"].float(), state["exp_avg_sq"].float()
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if self.state_dtype == torch.bfloat16:
                    state["exp_avg"].copy_(exp_avg)  # round to nearest
                    generator = torch.Generator(param.device).manual_seed(
                        hash((self.seed, index, int(step))) & (2**63 - 1))
                    state["exp_avg_sq"].copy_(stochastic_round_to_bf16(exp_avg_sq, generator))

                bias_correction1 = 1 - beta1 ** step
                bias_correction2 = 1 - beta2 ** step
                denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
                param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        return loss

    def load_state_dict(self, state_dict):
        # torch.optim.Optimizer.load_state_dict would cast every state tensor to its parameter's
        # dtype (fp32), holding the whole state in fp32 at once. The base class restores the
        # groups' hyperparameters; the moments are placed here, parameter by parameter, in
        # self.state_dtype (bf16 moments come back bit for bit; a checkpoint of the other
        # precision, after a switch of --optimizer_state, is converted).
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            entry = state_dict["state"].get(saved_id)
            if entry is not None:
                moments = {name: entry[name].to(param.device, self.state_dtype, copy=True)
                           for name in ("exp_avg", "exp_avg_sq")}
                self.state[param] = {"step": entry["step"].float().cpu(), **moments}
