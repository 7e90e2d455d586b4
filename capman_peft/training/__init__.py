"""What the two training scripts share, one role per module (the command line lives in ``capman_peft.flags``, the
Eq. 4 loss in ``capman_peft.objective``, the step draws in ``capman_peft.randomness``, checkpoints in
``capman_peft.checkpointing``, the expert-use report in ``capman_peft.expert_use``):

* ``setup.py``: accelerator, training data, CM settings, optimizer and schedule, ``prepare`` and resume;
* ``loop.py``: the training loop and its callbacks;
* ``export.py``: the staged export, summary, model card, samples and upload of a finished run.
"""
