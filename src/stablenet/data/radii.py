"""Standard l2 certification radii per data set: the radii certified accuracy is reported at."""

__all__ = ["HEADLINE_RADIUS", "STANDARD_RADII"]

STANDARD_RADII: dict[str, tuple[float, ...]] = {
    # Our own choice for scikit-learn's 8×8 digits scaled to [0, 1] (no published convention exists):
    # the image diagonal is 8, so these span "imperceptible" to "clearly visible" perturbations.
    "digits": (0.25, 0.5, 1.0, 1.5),
    # The l2 radii of the Lipschitz-network literature for 28×28 images in [0, 1].
    "mnist": (0.5, 1.0, 1.58, 2.0),
    "fashion-mnist": (0.5, 1.0, 1.58, 2.0),
    # The l2 radii of the CIFAR literature (Trockman & Kolter 2021; Araujo et al. 2023), for [0, 1] pixels.
    "cifar10": (36 / 255, 72 / 255, 108 / 255, 255 / 255),
    "cifar100": (36 / 255, 72 / 255, 108 / 255, 255 / 255),
}
"""Standard l2 certification radii per data set, used by reports and training metrics when none are given."""

HEADLINE_RADIUS: dict[str, float] = {
    "digits": 0.5,  # ours, as above: the middle of the digits' radii
    "mnist": 1.58,  # GloRo, SLL and the Lipschitz literature's MNIST headline
    "fashion-mnist": 1.58,
    "cifar10": 36 / 255,  # the CIFAR headline of every Lipschitz-network paper
    "cifar100": 36 / 255,
}
"""The one radius a summary quotes per data set (one of its :data:`STANDARD_RADII`)."""
