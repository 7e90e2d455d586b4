"""What the two training scripts share, one role per module (the command line lives in ``capman_peft.flags``, the
Eq. 4 loss in ``capman_peft.objective``, checkpoints in ``capman_peft.checkpointing``):

* ``setup.py``: accelerator, training data, CM settings, optimizer and schedule, ``prepare`` and resume;
* ``randomness.py``: the per-step random choices that make resume exact and accumulation equal one larger batch;
* ``loop.py``: the training loop;
* ``export.py``: the expert-use report, summary, model card, samples and upload of a finished run.
"""
