"""Randomized smoothing (Cohen et al. 2019) and its Lipschitz-aware refinements (LVM-RS, CPM).

Every certifier has ``certify(x, n0, n, alpha, batch_size, generator=None) -> (prediction, radius)``, batched
across images and noise draws on the base model's device, with ``ABSTAIN`` and radius 0 when it cannot certify.
"""

from stablenet.smoothing.cohen import ABSTAIN, Smooth
from stablenet.smoothing.cpm import CPMSmooth, cpm_radius
from stablenet.smoothing.lvm import SIMPLEX_MAPS, LVMSmooth, lvm_radius, sparsemax

__all__ = ["ABSTAIN", "SIMPLEX_MAPS", "CPMSmooth", "LVMSmooth", "Smooth", "cpm_radius", "lvm_radius", "sparsemax"]
