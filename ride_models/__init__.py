"""ride-models: RIDE (Routing Diverse Distribution-Aware Experts, ICLR 2021) for timm.

Importing this package registers every ``ride_*`` model with timm::

    import timm, ride_models
    model = timm.create_model("ride_resnet32_4e")
"""

from ride_models._compat import check_versions

# Before the models import timm's newer APIs: a clear message, not an ImportError from deep inside.
check_versions()

from ride_models.models import (  # noqa: E402, F401  (registers)
    RIDEOutput,
    RIDEResNet,
    RoutedOutput,
    RouterTrainOutput,
)

__version__ = "0.1.0.dev0"
