"""Exercise table3: the prior-preservation ablation (DreamBooth, Table 3) on the toy model.

1. Write train_argv, then check it (seconds):
       python -m assignments.grade table3 --file my_table3.py
2. Run the experiment (about 10 minutes on 2 CPU cores):
       python -m assignments.table3.run --file my_table3.py --out results/table3
3. Check the run's record, then write the report (assignments/table3/handout.md):
       python -m assignments.grade table3 --file results/table3/table3.json
"""
from pathlib import Path  # noqa: F401

from toy import world  # noqa: F401  (world.SUBJECTS[subject].noun is the subject's class noun)

SUBJECTS_DIR = Path(world.__file__).resolve().parent / "subjects"  # toy/subjects: the photos, one folder per subject


def train_argv(config, subject, seed, out_dir):
    """train.py's command line (a list of strings, as train.main takes it) for one fine-tuning
    of Table 3 on the toy model (`--model toy`, whose recipe train.py brings: leave it as is):

    config   "prior": DreamBooth as published, with prior preservation (Eq. 2);
             "no_prior": the same without it (the instance term alone).
    subject  a folder name of toy/subjects (e.g. "eye_circle"); its class noun is
             world.SUBJECTS[subject].noun.
    seed     the run's seed (it draws the identifier, the data order and the noise).
    out_dir  the experiment's folder: each run writes its model into its own folder inside it,
             and the prior runs of every seed share one class-image folder inside it (the 50
             class images are made once, not once per seed).
    """
    raise NotImplementedError
