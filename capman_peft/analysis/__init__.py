"""Where a trained model spends its capacity, per class: pruning sensitivity and expert usage.

``capman-analyze prune --pipeline out/ --fraction 0.1`` (paper Fig. 1b, Eq. G.1): zero the ``fraction`` of UNet
weights with the smallest magnitude and report, per class c, the relative loss change
``(L_pruned^c - L_raw^c) / L_raw^c``. Pruned are the weights of every ``nn.Linear`` and ``nn.Conv*`` layer of the UNet
(attention projections, convolutions, time-embedding MLP, ...), ranked globally by |w|; biases, norm parameters and
embedding tables are kept. Exactly ``round(fraction * #weights)`` weights are zeroed (ties at the threshold in
parameter order). The pipeline on disk is never written: the pruned model is an in-memory copy.

``capman-analyze capacity --pipeline out/`` (a CM run, needs ``out/adapter``): per class the mean
``d = mean((ε_θ - ε_θg)^2)`` (the per-sample d of the CM loss, Eq. 2), i.e. how much the expert changes the prediction
for that class, together with the base loss of θ and of θ^g.

``L^c`` is the training objective's MSE (target ε, or v / x0 when the scheduler says so) on the long-tailed training
images of class c, with noise and timesteps fixed by the seed: every class gets ``num_batches * batch_size`` samples
(its images cycled), and noise/timesteps for batch b of class c come from a generator seeded by ``(seed, c, b)``, so
the numbers are deterministic and both models see exactly the same inputs. Stable Diffusion images are encoded with
the VAE's posterior mean (not a sample) for the same reason.

JSON (``prune.json`` / ``capacity.json``) holds lists aligned with ``class_names`` (class ids 0..C-1, 0 the largest
class), per-split means and the settings; the plots put classes on the x axis sorted by training-set size.

Modules: :mod:`.probes` (the shared setup: pipeline, training data and the loss setup of
:mod:`capman_peft.expert_use`), :mod:`.prune` (magnitude pruning, :func:`pruning_sensitivity`), :mod:`.capacity`
(:func:`expert_capacity`), :mod:`.heldout` (:func:`heldout_loss` on images training never saw, :func:`push_gradient`:
where the CM push goes), :mod:`.plot` (the per-class chart), :mod:`.cli` (``capman-analyze``).
"""

from .capacity import expert_capacity
from .heldout import heldout_loss, push_gradient, timestep_grid
from .plot import plot_per_class
from .probes import AnalysisSetup, make_loss_setup, prepare_analysis
from .prune import magnitude_prune_, prunable_weights, pruning_sensitivity

__all__ = [
    "AnalysisSetup",
    "expert_capacity",
    "heldout_loss",
    "magnitude_prune_",
    "make_loss_setup",
    "plot_per_class",
    "prepare_analysis",
    "prunable_weights",
    "pruning_sensitivity",
    "push_gradient",
    "timestep_grid",
]
