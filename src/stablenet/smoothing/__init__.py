"""Randomized smoothing (Cohen et al. 2019) and its Lipschitz-aware refinements (LVM-RS, CPM).

Every certifier has ``certify(x, n0, n, alpha, batch_size, generator=None) -> (prediction, radius)``, batched
across images and noise draws on the base model's device, with ``ABSTAIN`` and radius 0 when it cannot certify.
Cohen's hard-vote classifier has :meth:`Smooth.predict`; the soft classifiers of LVM-RS and CPM (a smoothed
simplex map of the logits) have :func:`soft_predict`.
"""

from stablenet.smoothing.cohen import ABSTAIN, Smooth
from stablenet.smoothing.cpm import CPMSmooth
from stablenet.smoothing.cpm_radii import cpm_radius
from stablenet.smoothing.lvm import LVMSmooth
from stablenet.smoothing.lvm_radii import lvm_radius
from stablenet.smoothing.simplex import SIMPLEX_MAPS, sparsemax
from stablenet.smoothing.soft import soft_predict

__all__ = [
    "ABSTAIN",
    "SIMPLEX_MAPS",
    "CPMSmooth",
    "LVMSmooth",
    "Smooth",
    "cpm_radius",
    "lvm_radius",
    "soft_predict",
    "sparsemax",
]
