"""The course kit (assignments/): for every exercise the project's own implementation passes its
grader, the untouched starter fails every check, and plausible wrong answers fail the check they
break with a hint that names the mistake. The experiment's grader is tested on the record of a
tiny real run (--quick: a few steps), and on copies of it with one thing forged."""
import io
import json
import shutil
import textwrap
from pathlib import Path

import pytest

from assignments import grade
from assignments.table3 import run as table3_run

ROOT = Path(__file__).resolve().parents[1]


def graded(name, file=None, solution=False):
    """{check name: Result} of grading `file` (or the solution), and the printed report."""
    out = io.StringIO()
    results = grade.grade(name, file, solution, out=out)
    return {r.name: r for r in results}, out.getvalue()


def student_file(tmp_path, source, name="student.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def expect_failure(results, check, phrase):
    """`check` failed with `phrase` in its hint; returns the checks that passed."""
    assert check in results, f"no check named {check!r}: {list(results)}"
    assert not results[check].passed, f"{check!r} passed"
    assert phrase in results[check].hint, results[check].hint
    return [name for name, r in results.items() if r.passed]


@pytest.mark.parametrize("name", list(grade.EXERCISES))
def test_the_projects_implementation_passes(name):
    results, report = graded(name, solution=True)
    assert len(results) >= 5 and all(r.passed for r in results.values()), report


@pytest.mark.parametrize("name", list(grade.EXERCISES))
def test_the_untouched_starter_fails_every_check(name):
    starter = ROOT / "assignments" / name / "starter.py"
    assert (ROOT / "assignments" / name / "handout.md").is_file()
    results, report = graded(name, starter)
    assert results and not any(r.passed for r in results.values()), report
    assert all("not written yet" in r.hint for r in results.values()), report


def test_command_line(capsys):
    assert grade.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(f"assignments/{name}/handout.md" in listed for name in grade.EXERCISES)
    assert grade.main(["lora", "--solution"]) == 0
    assert grade.main(["lora", "--file", str(ROOT / "assignments" / "lora" / "starter.py")]) == 1
    assert "0/9 checks passed" in capsys.readouterr().out
    with pytest.raises(SystemExit) as error:
        grade.main(["lora", "--file", "no/such/file.py"])
    assert error.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_a_file_that_does_not_import(tmp_path):
    results, _ = graded("lora", student_file(tmp_path, "import no_such_module\n"))
    (result,) = results.values()
    assert not result.passed and "ModuleNotFoundError" in result.hint


# ---- 1. prior_loss -----------------------------------------------------------------------------

PRIOR_LOSS = """
    import torch
    import torch.nn.functional as F

    def prior_preservation_loss(unet, schedule, instance_latents, instance_context, class_latents=None,
                                class_context=None, prior_loss_weight=1.0, *, noise=None, timesteps=None, generator=None):
        n = instance_latents.shape[0]
        def term(latents, context, rows):
            x_t = schedule.add_noise(latents, noise[rows], timesteps[rows])
            return F.mse_loss(unet(x_t, timesteps[rows], context), schedule.training_target(latents, noise[rows], timesteps[rows]))
        if class_latents is None:
            loss = term(instance_latents, instance_context, slice(0, n))
            return loss, loss.detach(), torch.zeros(())
        {body}
"""
TWO_PASSES = """instance, prior = term(instance_latents, instance_context, slice(0, n)), term(class_latents, class_context, slice(n, None))
        return instance + prior_loss_weight * prior, instance.detach(), prior.detach()"""
ONE_PASS_NO_LAMBDA = """latents, context = torch.cat([instance_latents, class_latents]), torch.cat([instance_context, class_context])
        prediction = unet(schedule.add_noise(latents, noise, timesteps), timesteps, context)
        target = schedule.training_target(latents, noise, timesteps)
        instance, prior = F.mse_loss(prediction[:n], target[:n]), F.mse_loss(prediction[n:], target[n:])
        return instance + prior, instance.detach(), prior.detach()"""


def test_prior_loss_in_two_unet_passes_fails(tmp_path):
    results, _ = graded("prior_loss", student_file(tmp_path, PRIOR_LOSS.replace("{body}", TWO_PASSES)))
    passed = expect_failure(results, "one UNet pass over the instance and class rows", "called 2 time(s)")
    assert "loss = instance_loss + lambda x prior_loss" in passed  # the values are right: only the pass count tells


def test_prior_loss_without_lambda_fails(tmp_path):
    results, _ = graded("prior_loss", student_file(tmp_path, PRIOR_LOSS.replace("{body}", ONE_PASS_NO_LAMBDA)))
    passed = expect_failure(results, "loss = instance_loss + lambda x prior_loss", "the weight lambda is not applied")
    assert "one UNet pass over the instance and class rows" in passed


# ---- 2. identifier -----------------------------------------------------------------------------

IDENTIFIER = """
    import random

    def rare_merge_ranks(tokenizer, fraction=0.2):
        n = len(tokenizer.merges)
        return {ranks}

    def rare_token_candidates(tokenizer, merge_ranks=None, max_letters=3):
        low, high = merge_ranks or rare_merge_ranks(tokenizer)
        found = []
        for token in tokenizer.vocab:
            word, rank = token[:-4], tokenizer.merge_rank(token)
            if token.endswith("</w>") and {letters} and len(word) <= max_letters and rank is not None and low <= rank <= high:
                found.append((rank, word))
        return [w for _, w in sorted(found)]

    def choose_identifier(tokenizer, class_noun, *, seed=0, num_tokens=1, merge_ranks=None):
        pool = [w for w in rare_token_candidates(tokenizer, merge_ranks) if w not in class_noun.split()]
        if len(pool) < num_tokens:
            raise ValueError("too few candidates")
        return " ".join(random.Random(seed).sample(pool, num_tokens))

    def check_identifier(tokenizer, identifier, class_noun, template="a photo of {{identifier}} {{class_noun}}"):
        ids, noun = tokenizer.encode(identifier)[1:-1], tokenizer.encode(class_noun)[1:-1]
        if not ids or set(ids) <= set(noun):
            raise ValueError("empty, or the class noun")
        prompt = tokenizer.encode(template.format(identifier=identifier, class_noun=class_noun))[1:-1]
        if {verify} not any(prompt[i:i + len(ids) + len(noun)] == ids + noun for i in range(len(prompt))):
            raise ValueError("the prompt does not keep the identifier's tokens")
        return ids
"""
GOOD_IDENTIFIER = dict(ranks="int(n * (1 - fraction)), n - 1", letters="word.isascii() and word.isalpha()", verify="")


def identifier_file(tmp_path, **mistake):
    return student_file(tmp_path, IDENTIFIER.format(**{**GOOD_IDENTIFIER, **mistake}))


def test_a_correct_identifier_written_from_the_handout_passes(tmp_path):
    results, report = graded("identifier", identifier_file(tmp_path))
    assert all(r.passed for r in results.values()), report


def test_identifier_drawn_among_the_first_merges_fails(tmp_path):
    results, _ = graded("identifier", identifier_file(tmp_path, ranks="0, int(n * fraction)"))
    expect_failure(results, "rare_merge_ranks: the last fifth of the merges", "rare tokens are the LAST ones")
    expect_failure(results, "rare_token_candidates: whole words of <= 3 ASCII letters in the rare range",
                   "outside the range (24, 29)")


def test_identifier_of_non_ascii_letters_fails(tmp_path):
    results, _ = graded("identifier", identifier_file(tmp_path, letters="word.isalpha()"))
    expect_failure(results, "rare_token_candidates: whole words of <= 3 ASCII letters in the rare range",
                   "is not all ASCII letters")


def test_identifier_without_the_prompt_check_fails(tmp_path):
    results, _ = graded("identifier", identifier_file(tmp_path, verify="False and"))
    passed = expect_failure(results, "check_identifier: the prompt must keep the identifier's tokens", "wugcircle")
    assert "check_identifier: returns the identifier's token ids" in passed


# ---- 3. ddim -----------------------------------------------------------------------------------

DDIM = """
    import schedulers

    def abar(schedule, t, like):
        return schedule.alphas_cumprod.to(like.dtype)[t].reshape(-1, 1, 1, 1)

    def add_noise(schedule, x0, noise, t):
        a = {abar}
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def training_target(schedule, x0, noise, t):
        kind = schedule.config.prediction_type
        if kind == "epsilon":
            return noise
        a = abar(schedule, t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0 if kind == "v_prediction" else x0

    def ddim_step(scheduler, model_output, timestep, sample, generator=None):
        t, prev = int(timestep), scheduler.previous_timestep(timestep)
        a = scheduler.alphas_cumprod[t]
        a_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
        if scheduler.config.prediction_type == "epsilon":
            x0, eps = (sample - (1 - a).sqrt() * model_output) / a.sqrt(), model_output
        else:
            x0, eps = a.sqrt() * sample - (1 - a).sqrt() * model_output, a.sqrt() * model_output + (1 - a).sqrt() * sample
        if scheduler.config.clip_sample:
            x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
        eta = {eta}
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
        if eta > 0:
            x_prev = x_prev + sigma * schedulers.randn(model_output.shape, generator, dtype=model_output.dtype)
        return schedulers.StepOutput(x_prev, x0)
"""
GOOD_DDIM = dict(abar="abar(schedule, t, x0)", eta="scheduler.eta")


def ddim_file(tmp_path, **mistake):
    return student_file(tmp_path, DDIM.format(**{**GOOD_DDIM, **mistake}))


def test_a_correct_ddim_written_from_the_handout_passes(tmp_path):
    results, report = graded("ddim", ddim_file(tmp_path))
    assert all(r.passed for r in results.values()), report


def test_ddim_with_eta_ignored_fails(tmp_path):
    results, _ = graded("ddim", ddim_file(tmp_path, eta="0.0"))
    passed = expect_failure(results, "ddim_step, eta > 0: sigma_t z from the generator (one, or one per image)",
                            "the scheduler's eta is ignored")
    assert "ddim_step, eta 0: prev_sample and pred_original_sample" in passed


def test_forward_process_with_the_one_step_alpha_fails(tmp_path):
    results, _ = graded("ddim", ddim_file(tmp_path, abar="schedule.alphas[t].reshape(-1, 1, 1, 1)"))
    expect_failure(results, "add_noise: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, per image",
                   "the one-step alpha_t instead of the cumulative product")


# ---- 4. attention ------------------------------------------------------------------------------

ATTENTION = """
    import math
    import torch

    def attention(attn, x, context=None):
        context = x if context is None else context
        heads = attn.num_heads
        def split(t):
            return {split}
        q, k, v = split(attn.to_q(x)), split(attn.to_k(context)), split(attn.to_v(context))
        weights = torch.softmax(q @ k.transpose(-1, -2) {scale}, dim=-1)
        return attn.to_out[0]((weights @ v).transpose(1, 2).flatten(2))
"""
GOOD_ATTENTION = dict(split="t.unflatten(-1, (heads, -1)).transpose(1, 2)", scale="/ math.sqrt(q.shape[-1])")


def attention_file(tmp_path, **mistake):
    return student_file(tmp_path, ATTENTION.format(**{**GOOD_ATTENTION, **mistake}))


def test_a_correct_attention_written_from_the_handout_passes(tmp_path):
    results, report = graded("attention", attention_file(tmp_path))
    assert all(r.passed for r in results.values()), report


def test_attention_without_the_scale_fails(tmp_path):
    results, _ = graded("attention", attention_file(tmp_path, scale=""))
    expect_failure(results, "cross-attention: softmax(Q K^T / sqrt(d)) V per head, then to_out",
                   "attention without the 1/sqrt(d) scale")


def test_attention_with_the_heads_split_by_a_view_fails(tmp_path):
    results, _ = graded("attention", attention_file(tmp_path, split="t.reshape(t.shape[0], heads, -1, t.shape[-1] // heads)"))
    expect_failure(results, "cross-attention: softmax(Q K^T / sqrt(d)) V per head, then to_out",
                   "the heads split without the transpose")
    expect_failure(results, "in a tiny UNet: self- and cross-attention of its transformer blocks", "first mismatch")


# ---- 5. class_images ---------------------------------------------------------------------------

CLASS_IMAGES = """
    from pathlib import Path
    import sample

    def ensure_class_images(pipeline, class_dir, class_prompt, num_images, *, seed=0, batch_size=4, **sampler_args):
        folder = Path(class_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for start in range(0, num_images, batch_size):
            count = min(batch_size, num_images - start)
            images = sample.generate(pipeline, [class_prompt] * count, seed={seed}, batch_size=batch_size,
                                     progress=False, **sampler_args)
            for k, image in enumerate(images):
                image.save(folder / f"class-{{start + k:05d}}.png")
        return sorted(p for p in folder.iterdir())[:num_images]
"""


def test_class_images_made_again_every_time_fail(tmp_path):
    results, _ = graded("class_images", student_file(tmp_path, CLASS_IMAGES.format(seed="seed + start")))
    passed = expect_failure(results, "only the shortfall, the missing indices first; images already there kept",
                            "make only the shortfall")
    assert "an empty folder: class-{i:05d}.png, image i from seed + i" in passed


def test_class_images_from_one_seed_per_batch_fail(tmp_path):
    results, _ = graded("class_images", student_file(tmp_path, CLASS_IMAGES.format(seed="seed")))
    expect_failure(results, "an empty folder: class-{i:05d}.png, image i from seed + i",
                   "class-00004.png was made with seed 10, expected 14")


# ---- 6. lora -----------------------------------------------------------------------------------

LORA = """
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class LoRALinear(nn.Module):
        def __init__(self, base, rank, alpha=None, dropout=0.0):
            super().__init__()
            self.weight, self.bias = base.weight, base.bias
            self.rank, self.alpha = rank, float(rank if alpha is None else alpha)
            self.dropout = nn.Dropout(dropout)
            self.lora_down = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
            nn.init.zeros_(self.lora_up.weight)
            self.merged, self.original = False, None

        def forward(self, x):
            y = F.linear(x, self.weight, self.bias)
            if self.merged:
                return y
            update = self.lora_up(self.lora_down(self.dropout(x.float())))
            return y + ({factor} * update).to(y.dtype)

        @torch.no_grad()
        def merge(self):
            if not self.merged:
                self.original = self.weight.detach().clone()
                self.weight += ({factor} * self.lora_up.weight @ self.lora_down.weight).to(self.weight.dtype)
                self.merged = True

        @torch.no_grad()
        def unmerge(self):
            if self.merged:
                {unmerge}
                self.merged = False
"""
GOOD_LORA = dict(factor="(self.alpha / self.rank)", unmerge="self.weight.copy_(self.original)")


def lora_file(tmp_path, **mistake):
    return student_file(tmp_path, LORA.format(**{**GOOD_LORA, **mistake}))


def test_a_correct_lora_written_from_the_handout_passes(tmp_path):
    results, report = graded("lora", lora_file(tmp_path))
    assert all(r.passed for r in results.values()), report


def test_lora_without_alpha_over_r_fails(tmp_path):
    results, _ = graded("lora", lora_file(tmp_path, factor="1.0"))
    passed = expect_failure(results, "forward: W0 x + b + (alpha / r) B A x", "the update is not scaled by alpha / r")
    assert "alpha defaults to the rank" in passed  # alpha = r: a factor of 1 is right there


def test_lora_unmerged_by_subtraction_fails(tmp_path):
    unmerge = "self.weight -= ((self.alpha / self.rank) * self.lora_up.weight @ self.lora_down.weight).to(self.weight.dtype)"
    results, _ = graded("lora", lora_file(tmp_path, unmerge=unmerge))
    expect_failure(results, "unmerge(): W0 back bit for bit", "keep a copy of W0")


# ---- 7. table3 ---------------------------------------------------------------------------------

TRAIN_ARGV = """
    from pathlib import Path
    from toy import world

    SUBJECTS = Path(world.__file__).resolve().parent / "subjects"

    def train_argv(config, subject, seed, out_dir):
        noun = world.SUBJECTS[subject].noun
        argv = ["--model", "toy", "--instance_dir", str(SUBJECTS / subject), "--class_noun", noun, "--seed", str(seed),
                "--output_dir", str(Path(out_dir) / "runs" / f"{{config}}-{{seed}}")]
        if config == "prior":
            return argv + {prior}
        return argv + {no_prior}
"""
GOOD_ARGV = dict(prior='["--class_dir", str(Path(out_dir) / "class_images")]', no_prior='["--no_prior_preservation"]')


def train_argv_file(tmp_path, **mistake):
    return student_file(tmp_path, TRAIN_ARGV.format(**{**GOOD_ARGV, **mistake}), "my_table3.py")


def test_a_correct_train_argv_passes(tmp_path):
    results, report = graded("table3", train_argv_file(tmp_path))
    assert all(r.passed for r in results.values()), report


def test_train_argv_with_prior_preservation_left_on_fails(tmp_path):
    results, _ = graded("table3", train_argv_file(tmp_path, no_prior="[]"))
    expect_failure(results, "prior preservation on for 'prior', off for 'no_prior'", "expected off")


def test_train_argv_with_class_images_per_run_fails(tmp_path):
    results, _ = graded("table3", train_argv_file(tmp_path, prior="[]"))
    expect_failure(results, "each run its own folder inside out_dir; one shared class-image folder",
                   "makes the 50 class images again")


def test_the_experiment_checks_train_argv_before_it_runs(tmp_path):
    starter = ROOT / "assignments" / "table3" / "starter.py"
    with pytest.raises(SystemExit, match="fix train_argv first"):
        table3_run.main(["--file", str(starter), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "table3.json").write_text("{}")
    with pytest.raises(SystemExit, match="is not empty"):
        table3_run.main(["--solution", "--out", str(tmp_path / "used")])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The record of a tiny real run (the project's train_argv, 5 training steps, 2 seeds)."""
    out = tmp_path_factory.mktemp("table3") / "run"
    assert table3_run.main(["--solution", "--out", str(out), "--quick", "--seeds", "0", "1"]) == 0
    return out


FULL = "the full experiment: the toy recipe, 3 seeds or more, not --quick"


def test_a_quick_run_is_consistent_but_not_the_experiment(quick_run):
    results, report = graded("table3", quick_run / "table3.json")
    passed = expect_failure(results, FULL, "a --quick run")
    assert len(passed) == len(results) - 1, report  # every consistency check holds
    record = json.loads((quick_run / "table3.json").read_text())
    assert {r["config"] for r in record["runs"]} == {"pretrained", "prior", "no_prior"} and record["timing"]["wall_s"] > 0


def forged(quick_run, tmp_path, change):
    """A copy of the quick run's folder with change(record, folder) applied; the path of its record."""
    folder = tmp_path / "forged"
    shutil.copytree(quick_run, folder)
    record = json.loads((folder / "table3.json").read_text())
    change(record, folder)
    (folder / "table3.json").write_text(json.dumps(record))
    return folder / "table3.json"


def test_a_record_with_an_edited_metric_fails(quick_run, tmp_path):
    def lower_pres(record, folder):
        record["runs"][1]["metrics"]["PRES"] -= 0.05
    results, _ = graded("table3", forged(quick_run, tmp_path, lower_pres))
    expect_failure(results, "the metrics are those of the sample files", "from its sample files")
    expect_failure(results, "the table is the runs' mean and standard deviation", "but the runs give")


def test_a_record_with_a_swapped_sample_fails(quick_run, tmp_path):
    """A careful forger replaces a sample and its checksum: drawing it again from the model tells."""
    def swap(record, folder):
        prior = next(r for r in record["runs"] if r["config"] == "prior")
        entry, other = prior["samples"]["class"][0], prior["samples"]["subject"][0]  # an image of another prompt
        shutil.copy(folder / other["file"], folder / entry["file"])
        entry["sha256"] = table3_run.sha256(folder / entry["file"])
    results, _ = graded("table3", forged(quick_run, tmp_path, swap))
    expect_failure(results, "the samples come from the saved models (drawn again)", "differs by")


def test_a_record_claiming_another_setting_fails(quick_run, tmp_path):
    def relabel(record, folder):
        run = next(r for r in record["runs"] if r["config"] == "no_prior")
        run["argv"] = [a for a in run["argv"] if a != "--no_prior_preservation"]
    results, _ = graded("table3", forged(quick_run, tmp_path, relabel))
    expect_failure(results, "each run's argv: its seed, its setting, the toy subject", "prior preservation on")
    expect_failure(results, "each run's model folder: its dreambooth.json, its loss log, the identifier",
                   "no_prior_preservation=True")
