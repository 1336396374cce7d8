"""Grader of the prior_loss exercise: the student's prior_preservation_loss against
dreambooth.prior_preservation_loss on a tiny seeded UNet."""
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import dreambooth
from assignments import tiny
from assignments.checking import Check, compare, compare_number, expect, load_file, source_notes

FUNCTIONS = ("prior_preservation_loss",)
MINUTES = "about 30 min to write; grading takes about 1 s"
B = 2  # instance rows (and as many class rows)


def load(path):
    return load_file(path, FUNCTIONS)


def solution():
    return SimpleNamespace(prior_preservation_loss=dreambooth.prior_preservation_loss)


def notes(path):
    return source_notes(path, {"dreambooth.prior_preservation_loss": "your file calls the project's own "
                                                                     "prior_preservation_loss: write it yourself"})


def inputs(with_class=True, seed=0):
    latents, context = tiny.randn(2 * B, 4, 8, 8, seed=seed), tiny.randn(2 * B, tiny.CONTEXT_LENGTH, 32, seed=seed + 1)
    noise, timesteps = tiny.randn(2 * B, 4, 8, 8, seed=seed + 2), torch.tensor([10, 400, 700, 999])
    rows = 2 * B if with_class else B
    x = dict(instance_latents=latents[:B], instance_context=context[:B], noise=noise[:rows], timesteps=timesteps[:rows])
    if with_class:
        x.update(class_latents=latents[B:], class_context=context[B:])
    return x


def run(fn, preset="sd15", weight=1.0, with_class=True):
    """(unet wrapper, schedule, outputs) of fn on the tiny UNet and fixed inputs."""
    unet, schedule = tiny.CountingUNet(tiny.unet()), tiny.schedule(preset)
    x = inputs(with_class)
    if with_class:
        out = fn(unet, schedule, x["instance_latents"], x["instance_context"], x["class_latents"],
                 x["class_context"], weight, noise=x["noise"], timesteps=x["timesteps"])
    else:
        out = fn(unet, schedule, x["instance_latents"], x["instance_context"], noise=x["noise"], timesteps=x["timesteps"])
    expect(isinstance(out, (tuple, list)) and len(out) == 3,
           f"expected (loss, instance_loss, prior_loss), got {type(out).__name__}"
           + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))
    return unet, schedule, out


@torch.no_grad()
def known_mistakes(preset="sd15", rows=slice(0, B)):
    """One term (the instance rows, or the class rows) as common mistakes compute it."""
    unet, schedule, x = tiny.unet(), tiny.schedule(preset), inputs()
    latents = torch.cat([x["instance_latents"], x["class_latents"]])
    context = torch.cat([x["instance_context"], x["class_context"]])
    noise, t = x["noise"], x["timesteps"]
    prediction = unet(schedule.add_noise(latents, noise, t), t, context)
    target = schedule.training_target(latents, noise, t)
    return {"the mean over the whole batch (instance and class rows together)": F.mse_loss(prediction, target),
            "a sum of squares instead of a mean": ((prediction[rows] - target[rows]) ** 2).sum(),
            "the clean latents as the UNet's input (x_t, the noisy latents, is missing)":
                F.mse_loss(unet(latents, t, context)[rows], target[rows]),
            "the noise as the target: read it from noise_schedule.training_target":
                F.mse_loss(prediction[rows], noise[rows])}


def check_outputs(student):
    _, _, out = run(student.prior_preservation_loss)
    for name, value in zip(("loss", "instance_loss", "prior_loss"), out):
        expect(isinstance(value, torch.Tensor), f"{name}: expected a tensor, got {type(value).__name__}")
        expect(value.ndim == 0, f"{name}: expected a 0-d tensor (a scalar), got shape {tuple(value.shape)}")
        expect(value.dtype == torch.float32, f"{name}: expected float32, got {value.dtype}")


def check_terms(student, preset="sd15"):
    _, _, (_, instance, prior) = run(student.prior_preservation_loss, preset)
    _, _, (_, ref_instance, ref_prior) = run(dreambooth.prior_preservation_loss, preset)
    for name, got, ref, rows in (("instance_loss", instance, ref_instance, slice(0, B)),
                                 ("prior_loss (the class term)", prior, ref_prior, slice(B, 2 * B))):
        mistakes = {k: v.item() for k, v in known_mistakes(preset, rows).items()}
        compare_number(name, got, ref.item(), known=mistakes)


def check_weight(student):
    weight = 0.25
    _, _, (loss, instance, prior) = run(student.prior_preservation_loss, weight=weight)
    _, _, (ref, ref_instance, ref_prior) = run(dreambooth.prior_preservation_loss, weight=weight)
    i, p = ref_instance.item(), ref_prior.item()
    compare_number(f"loss with prior_loss_weight={weight}", loss, ref.item(), known={
        "instance_loss + prior_loss: the weight lambda is not applied": i + p,
        "lambda x instance_loss + prior_loss: lambda weighs the class term, not the instance term": weight * i + p})


def check_one_pass(student):
    unet, _, _ = run(student.prior_preservation_loss)
    expect(unet.batches == [2 * B],
           f"the UNet was called {len(unet.batches)} time(s) with batches {unet.batches}, expected once with "
           f"{2 * B} rows: Eq. 2's two terms are one pass over the instance rows and the class rows together")


def check_gradients(student):
    unet, _, (loss, _, _) = run(student.prior_preservation_loss, weight=0.5)
    ref_unet, _, (ref_loss, _, _) = run(dreambooth.prior_preservation_loss, weight=0.5)
    expect(loss.requires_grad, "loss carries no autograd graph: was it computed under torch.no_grad or detached?")
    loss.backward()
    ref_loss.backward()
    for (name, p), (_, ref) in zip(unet.unet.named_parameters(), ref_unet.unet.named_parameters()):
        expect(p.grad is not None, f"no gradient reached the UNet's {name}")
        compare(f"gradient of {name}", p.grad, ref.grad, atol=1e-7, rtol=1e-3)


def check_detached(student):
    _, _, (_, instance, prior) = run(student.prior_preservation_loss)
    for name, value in (("instance_loss", instance), ("prior_loss", prior)):
        expect(not value.requires_grad, f"{name} keeps its autograd graph: return it detached (it is for the log)")


def check_no_class(student):
    unet, _, (loss, instance, prior) = run(student.prior_preservation_loss, with_class=False)
    _, _, (ref, _, _) = run(dreambooth.prior_preservation_loss, with_class=False)
    compare_number("loss without class latents", loss, ref.item())
    compare_number("instance_loss without class latents", instance, ref.item())
    compare_number("prior_loss without class latents", prior, 0.0)
    expect(unet.batches == [B], f"without class latents the UNet should see the {B} instance rows once, "
                                f"got batches {unet.batches}")


def checks(student):
    return [Check("returns (loss, instance_loss, prior_loss) as 0-d float32 tensors", lambda: check_outputs(student)),
            Check("each term is the mean squared error of its rows (noise target)", lambda: check_terms(student)),
            Check("loss = instance_loss + lambda x prior_loss", lambda: check_weight(student)),
            Check("one UNet pass over the instance and class rows", lambda: check_one_pass(student)),
            Check("gradients of every UNet weight match", lambda: check_gradients(student)),
            Check("instance_loss and prior_loss are detached", lambda: check_detached(student)),
            Check("without class latents: the instance term alone, prior_loss 0", lambda: check_no_class(student)),
            Check("v-prediction model: the target is the velocity", lambda: check_terms(student, "sd21"))]
